"""The hub's state: repos, their commits and refs, tokens, pending faults and the request log.

:class:`HubState` is shared by the public :class:`~offline.local_hub.LocalHub` and the request
handler threads; every read and write of it happens under its lock. It knows nothing of sockets:
the HTTP side lives in :mod:`offline.local_hub.handler`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from offline.local_hub.faults import Fault
from offline.local_hub.git import (
    DEFAULT_REVISION,
    HubFile,
    git_commit_oid,
    git_trees,
    ingest_file,
    is_lfs,
    walk,
)
from offline.local_hub.routes import HttpError, Route

__all__ = [
    "Commit",
    "HubState",
    "LoggedRequest",
    "Repo",
    "bearer_token",
    "check_ref_name",
    "resolve_revision",
]

logger = logging.getLogger(__name__)

_REPO_ID_RE = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_HEX_PREFIX_RE = re.compile(r"^[0-9a-f]{7,39}$")


@dataclass(frozen=True)
class LoggedRequest:
    """One request the server answered (or dropped). Never holds credentials.

    Attributes:
        method: HTTP method.
        path: Percent-decoded URL path, without the query string.
        query: Raw query string.
        status: Status sent; ``0`` when the connection was dropped before any response.
        range: The ``Range`` header, if any.
        endpoint: ``model_info``, ``tree``, ``paths_info``, ``refs``, ``commits``, ``resolve``
            or ``unknown``.
        repo_id: Repo named by the URL, if any.
        revision: Revision named by the URL (decoded), if any.
        file: Path in the repo for ``resolve`` requests (the tree path for ``tree``).
        authorized: Whether an ``Authorization`` header was sent (its value is never kept).
        fault: The injected fault that shaped this response, if any.
    """

    method: str
    path: str
    query: str
    status: int
    range: str | None
    endpoint: str
    repo_id: str | None
    revision: str | None
    file: str | None
    authorized: bool
    fault: str | None


@dataclass(frozen=True)
class Commit:
    """One commit of a repo: its files and its git trees.

    Attributes:
        sha: Git commit id.
        parent: Sha of the parent commit, ``None`` for the first one.
        tree_oid: Git tree id of the root directory.
        files: The files, by path.
        dirs: Directory path (``""`` for the root) -> git tree id.
        children: Directory path -> sorted child paths.
        created_at: When the commit was added.
    """

    sha: str
    parent: str | None
    tree_oid: str
    files: Mapping[str, HubFile]
    dirs: Mapping[str, str]
    children: Mapping[str, tuple[str, ...]]
    created_at: datetime


@dataclass
class Repo:
    """One repo: every commit ever added, its branches and tags, and whether it is gated.

    Attributes:
        repo_id: ``name`` or ``namespace/name``.
        created_at: When the repo was first added.
        commits: Every commit, by sha.
        branches: Branch name -> sha.
        tags: Tag name -> sha.
        gated: Whether file contents need an allowed token.
    """

    repo_id: str
    created_at: datetime
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    gated: bool = False


class HubState:
    """Everything a hub serves and remembers, behind one re-entrant lock.

    Args:
        lfs_threshold: Files larger than this many bytes are stored with LFS.
        lfs_patterns: Basename globs always stored with LFS, whatever their size.
        page_size: Entries per page of tree and commit listings.
        storage: Folder whose ``blobs`` subfolder (existing) receives copied file contents.
    """

    def __init__(
        self,
        *,
        lfs_threshold: int,
        lfs_patterns: Sequence[str],
        page_size: int,
        storage: Path,
    ) -> None:
        self.lfs_threshold = lfs_threshold
        self.lfs_patterns = tuple(lfs_patterns)
        self.page_size = page_size
        self.storage = storage
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.tokens: dict[str, frozenset[str] | None] = {}
        # Bounded so a long-running demo server cannot grow without limit.
        self.requests: deque[LoggedRequest] = deque(maxlen=100_000)

    # -- repos -----------------------------------------------------------------------------

    def repo_ids(self) -> set[str]:
        """The ids of the repos served now."""
        with self.lock:
            return set(self.repos)

    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        branch: str,
        tags: Sequence[str],
        gated: bool | None,
        copy: bool,
    ) -> str:
        """Commit a folder's files to a repo branch; see :meth:`LocalHub.add_repo`.

        Returns:
            The 40-hex sha of the new commit.

        Raises:
            ValueError: If the repo id, branch or a tag is invalid, a tag already points
                elsewhere, or the folder holds no file.
            NotADirectoryError: If ``folder`` is not a directory.
        """
        if not _REPO_ID_RE.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
            raise ValueError(f"Invalid repo id {repo_id!r}: expected 'name' or 'namespace/name'.")
        for ref in (branch, *tags):
            check_ref_name(ref)
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"Cannot serve {folder}: not a directory.")
        # Hashing (and copying) is the slow part: done before taking the lock.
        files = self._ingest(folder, copy=copy)
        if not files:
            raise ValueError(f"Cannot serve {folder}: it holds no file.")
        dirs, children = git_trees(files)
        with self.lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = Repo(repo_id=repo_id, created_at=_now())
            parent = repo.branches.get(branch, repo.branches.get(DEFAULT_REVISION))
            sha = git_commit_oid(dirs[""], parent)
            for tag in tags:
                if repo.tags.get(tag, sha) != sha:
                    raise ValueError(
                        f"Tag {tag!r} of {repo_id} already points to {repo.tags[tag]}: tags do"
                        " not move; use a branch."
                    )
            repo.commits.setdefault(
                sha,
                Commit(
                    sha=sha,
                    parent=parent,
                    tree_oid=dirs[""],
                    files=files,
                    dirs=dirs,
                    children=children,
                    created_at=_now(),
                ),
            )
            repo.branches[branch] = sha
            repo.tags.update(dict.fromkeys(tags, sha))
            if gated is not None:
                repo.gated = gated
            self.repos[repo_id] = repo
        logger.info("local hub: %s@%s = %s (%d files)", repo_id, branch, sha, len(files))
        return sha

    def find(self, repo_id: str, revision: str) -> tuple[Repo | None, Commit | None]:
        """The repo and the commit a revision points to now, ``None`` where unknown."""
        with self.lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                return None, None
            return repo, resolve_revision(repo, revision)

    def lookup(self, repo_id: str | None, revision: str | None) -> tuple[Repo, Commit]:
        """The repo and commit a request names.

        Raises:
            HttpError: 404 ``RepoNotFound`` or ``RevisionNotFound``.
        """
        repo, commit = self.find(repo_id or "", revision or DEFAULT_REVISION)
        if repo is None:
            raise HttpError(404, f"Repository {repo_id} not found.", code="RepoNotFound")
        if commit is None:
            raise HttpError(
                404, f"Invalid rev id: {revision} for {repo_id}.", code="RevisionNotFound"
            )
        return repo, commit

    def refs(self, repo_id: str | None) -> tuple[dict[str, str], dict[str, str]]:
        """Snapshots of a repo's branches and tags (name -> sha).

        Raises:
            HttpError: 404 ``RepoNotFound``.
        """
        with self.lock:
            repo = self.repos.get(repo_id or "")
            if repo is None:
                raise HttpError(404, f"Repository {repo_id} not found.", code="RepoNotFound")
            return dict(repo.branches), dict(repo.tags)

    def history(self, repo: Repo, commit: Commit) -> list[Commit]:
        """``commit`` and its ancestors, newest first."""
        history: list[Commit] = []
        with self.lock:
            current: Commit | None = commit
            while current is not None:
                history.append(current)
                current = repo.commits[current.parent] if current.parent else None
        return history

    def last_commit(self, repo: Repo, commit: Commit, path: str) -> Commit:
        """The oldest commit, walking back from ``commit``, since which ``path`` is unchanged."""
        oid = _oid_at(commit, path)
        current = commit
        with self.lock:
            while current.parent is not None:
                parent = repo.commits[current.parent]
                if _oid_at(parent, path) != oid:
                    break
                current = parent
        return current

    def _ingest(self, folder: Path, *, copy: bool) -> dict[str, HubFile]:
        files: dict[str, HubFile] = {}
        for source, rel_path in walk(folder):
            size = source.stat().st_size
            files[rel_path] = ingest_file(
                source,
                rel_path,
                lfs=is_lfs(
                    rel_path, size, threshold=self.lfs_threshold, patterns=self.lfs_patterns
                ),
                blobs_dir=self.storage / "blobs" if copy else None,
            )
        return dict(sorted(files.items()))

    # -- access ----------------------------------------------------------------------------

    def allow_token(self, token: str, repos: Iterable[str] | None) -> None:
        """Accept a bearer token for gated repos (all of them when ``repos`` is ``None``).

        Raises:
            ValueError: If the token is empty.
        """
        if not token:
            raise ValueError("token must be a non-empty string")
        with self.lock:
            self.tokens[token] = None if repos is None else frozenset(repos)

    def check_access(self, repo: Repo, authorization: str | None) -> None:
        """Let a request read a repo's files, or refuse it.

        Args:
            repo: The repo asked for.
            authorization: The request's ``Authorization`` header, if any.

        Raises:
            HttpError: 401 ``GatedRepo`` without a token, 401 for an unknown token, 403
                ``GatedRepo`` for a token not allowed on this repo.
        """
        with self.lock:
            if not repo.gated:
                return
            token = bearer_token(authorization)
            if token is None:
                raise HttpError(
                    401,
                    f"Access to model {repo.repo_id} is restricted. You must have access to it"
                    " and be authenticated to access it. Please log in.",
                    code="GatedRepo",
                )
            if token not in self.tokens:
                raise HttpError(401, "Invalid credentials in Authorization header")
            allowed = self.tokens[token]
            if allowed is not None and repo.repo_id not in allowed:
                raise HttpError(
                    403,
                    f"Access to model {repo.repo_id} is restricted and you are not in the"
                    " authorized list.",
                    code="GatedRepo",
                )

    # -- faults and request log ------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        """Queue a fault after the ones already pending."""
        with self.lock:
            self.faults.append(fault)

    def clear_faults(self) -> None:
        """Drop every fault not yet consumed."""
        with self.lock:
            self.faults.clear()

    def pending_faults(self) -> list[tuple[str, int]]:
        """Faults not yet consumed, as ``(kind, remaining count)``."""
        with self.lock:
            return [(f.kind, f.remaining) for f in self.faults]

    def take_fault(self, method: str, route: Route) -> Fault | None:
        """Consume one use of the first pending fault that matches a request, if any."""
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, route):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def record(self, entry: LoggedRequest) -> None:
        """Append a request to the log."""
        with self.lock:
            self.requests.append(entry)
        logger.debug(
            "local hub: %s %s -> %s%s",
            entry.method,
            entry.path,
            entry.status,
            f" (fault {entry.fault})" if entry.fault else "",
        )

    def logged_requests(self) -> list[LoggedRequest]:
        """A snapshot of the request log, oldest first."""
        with self.lock:
            return list(self.requests)

    def clear_requests(self) -> None:
        """Forget the logged requests."""
        with self.lock:
            self.requests.clear()


def check_ref_name(ref: str) -> None:
    r"""Reject a branch or tag name git (or the hub) would not accept.

    Raises:
        ValueError: If the name is empty, has spaces or ``~^:?*[\``, ``..``, a leading or
            trailing ``/``, or looks like a commit sha.
    """
    if (
        not ref
        or ref != ref.strip()
        or any(c.isspace() or c in "~^:?*[\\" for c in ref)
        or ".." in ref
        or ref.startswith("/")
        or ref.endswith("/")
        or _SHA_RE.fullmatch(ref)
    ):
        raise ValueError(f"Invalid branch or tag name {ref!r}.")


def resolve_revision(repo: Repo, revision: str) -> Commit | None:
    """The commit a revision names: branch, tag, ``refs/...`` name, sha or unique sha prefix.

    Args:
        repo: The repo.
        revision: The revision, as a client sends it.

    Returns:
        The commit, or ``None`` when the revision names none.
    """
    for name in (revision, revision.removeprefix("refs/heads/")):
        if name in repo.branches:
            return repo.commits[repo.branches[name]]
    tag = revision.removeprefix("refs/tags/")
    if tag in repo.tags:
        return repo.commits[repo.tags[tag]]
    lowered = revision.lower()
    if _SHA_RE.fullmatch(lowered):
        return repo.commits.get(lowered)
    if _HEX_PREFIX_RE.fullmatch(lowered):
        matches = [sha for sha in repo.commits if sha.startswith(lowered)]
        if len(matches) == 1:
            return repo.commits[matches[0]]
    return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, ``None`` for anything else."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def _oid_at(commit: Commit, path: str) -> str | None:
    if path in commit.files:
        return commit.files[path].git_oid
    return commit.dirs.get(path)


def _now() -> datetime:
    return datetime.now(UTC)
