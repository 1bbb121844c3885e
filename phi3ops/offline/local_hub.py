"""A Hugging Face hub on loopback, serving model repos from local folders.

Tests and the offline demo run the real ``huggingface_hub`` download code against this server,
so pinning, caching, resuming and error mapping are exercised exactly as they would be against
huggingface.co. The server is stdlib only (``http.server`` in a background thread) and imports
nothing from ``huggingface_hub``.

What it serves (everything ``huggingface_hub`` 2.4 calls for model repos):

* ``GET /api/models/{repo_id}`` and ``GET /api/models/{repo_id}/revision/{revision}``:
  ``model_info`` / ``repo_info`` / ``resolve_revision`` (``?blobs=true`` adds sizes, blob ids
  and LFS data to ``siblings``).
* ``GET /api/models/{repo_id}/tree/{revision}[/{path}]``: ``list_repo_tree`` and
  ``list_repo_files``, with ``recursive``, ``expand`` and ``Link: <...>; rel="next"`` pagination.
* ``POST /api/models/{repo_id}/paths-info/{revision}``: ``get_paths_info``.
* ``GET /api/models/{repo_id}/refs`` and ``/commits/{revision}``: ``list_repo_refs`` and
  ``list_repo_commits``.
* ``HEAD`` / ``GET /{repo_id}/resolve/{revision}/{path}``: ``hf_hub_download``,
  ``snapshot_download``, ``file_exists``; single byte ranges (``206``) so resumed downloads work.

Repos are git-like: every :meth:`LocalHub.add_repo` is a commit whose sha is the real git commit
id of the folder's tree and its parent (fixed author and timestamp, so the same folder and parent
always give the same sha). Small files carry their git blob id as ``ETag``; LFS files (over
``lfs_threshold`` bytes, or matching ``lfs_patterns`` like the hub's default ``.gitattributes``)
carry their sha256 as ``ETag`` and ``X-Linked-Etag``, and their blob id is the one of the LFS
pointer file, as on the hub. No ``X-Xet-*`` header and no ``xetHash`` is ever sent, so
``huggingface_hub`` always takes its plain HTTP path even with ``hf_xet`` installed.

Errors carry the ``X-Error-Code`` header that ``huggingface_hub.utils.hf_raise_for_status`` maps:
unknown repo -> 404 ``RepoNotFound`` (``RepositoryNotFoundError``), unknown revision -> 404
``RevisionNotFound`` (``RevisionNotFoundError``), unknown file -> 404 ``EntryNotFound``
(``RemoteEntryNotFoundError``), gated file without an allowed token -> 401/403 ``GatedRepo``
(``GatedRepoError``). As on the hub, gating covers file contents only: ``model_info`` and tree
listings stay public and report ``gated: "manual"``. A token that :meth:`LocalHub.allow_token`
never saw gets 401 with ``X-Error-Message: Invalid credentials in Authorization header``, which
``huggingface_hub`` 2.4 raises as a plain ``HfHubHTTPError`` (status 401). Tokens are only
checked where access is restricted, so a real hub token in the environment does not break the
offline demo.

Pointing ``huggingface_hub`` 2.4 at the server:

* In a subprocess: set ``HF_ENDPOINT=hub.url`` in its environment (``huggingface_hub.constants``
  reads it at import time), and unset ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``.
* In-process, preferred: pass the endpoint explicitly, ``HfApi(endpoint=hub.url)``,
  ``hf_hub_download(..., endpoint=hub.url)``, ``snapshot_download(..., endpoint=hub.url)``.
  ``hf_hub_url`` swaps the import-time ``constants.ENDPOINT`` prefix for ``endpoint``.
* In-process, for code that takes no endpoint (``transformers``' ``from_pretrained``, the
  top-level ``huggingface_hub.model_info``...): :func:`use_hf_endpoint`. Setting
  ``os.environ["HF_ENDPOINT"]`` after import does nothing; three values must be patched:
  ``huggingface_hub.constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (formatted by
  ``hf_hub_url``) and ``huggingface_hub.hf_api.api.endpoint`` (the module-level ``HfApi`` behind
  ``huggingface_hub.model_info`` and friends, built at import). ``transformers`` keeps its own
  cached ``HfApi`` in ``transformers.utils.hub._hf_api``, patched too when already built.
* Offline mode: ``constants.is_offline_mode()`` returns the import-time
  ``constants.HF_HUB_OFFLINE``; with it set, every request raises ``OfflineModeIsEnabled``
  before reaching the server. Patch that attribute to toggle it in-process.

Fault injection (:meth:`LocalHub.inject`) makes the first N matching requests fail in a chosen
way, then stops. What ``huggingface_hub`` 2.4 does with them:

* ``model_info`` / ``repo_info`` / ``get_paths_info`` / ``list_repo_refs``: one plain request,
  never retried (``get_session().get``/``post``).
* ``list_repo_tree`` / ``list_repo_commits``: ``http_backoff``, retried on 408/429/5xx and
  connection errors, up to 5 retries.
* ``hf_hub_download`` metadata ``HEAD`` (``get_hf_file_metadata``): first try without retries;
  on 408/429/5xx or a connect error with nothing cached it tries again with ``http_backoff``.
  A dropped ``HEAD`` raises ``httpx2.RemoteProtocolError`` at once (that error is not caught there).
* ``hf_hub_download`` body ``GET`` (``http_get``): retried on 408/429 only, so a 5xx there fails
  the download. A body cut short (``drop_connection``: ``httpx2.RemoteProtocolError``) is fetched
  again, 1 s later, up to 5 times in a row: from the bytes already written, with a ``Range``
  request, but ``http_get`` writes in ``constants.DOWNLOAD_CHUNK_SIZE`` (10 MiB) chunks, so a file
  cut before its first 10 MiB restarts from byte 0. A TCP reset (``reset_connection``:
  ``httpx2.ReadError``) is not retried and fails the download.
* Sleeps: 1 s, 2 s, 4 s... between retries, or ``Retry-After`` + 1 s on a 429.
* ``corrupt`` is not detected: ``http_get`` checks the length only, never the sha256; callers
  must check the sha256 against the tree listing themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import socketserver
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, Literal, get_args
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = [
    "DEFAULT_LFS_PATTERNS",
    "FaultKind",
    "HubFile",
    "LocalHub",
    "LoggedRequest",
    "main",
    "use_hf_endpoint",
]

logger = logging.getLogger(__name__)

FaultKind = Literal[
    "server_error",
    "rate_limit",
    "drop_connection",
    "reset_connection",
    "corrupt",
    "unauthorized",
    "forbidden",
    "not_found",
]
_FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))
# Faults that alter a response body: by default they wait for a GET (a HEAD has no body).
_BODY_FAULTS = frozenset({"drop_connection", "reset_connection", "corrupt"})

# Always LFS whatever their size, as in the hub's default .gitattributes.
DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.bin",
    "*.onnx",
    "*.onnx.data",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.gguf",
    "*.model",
)
DEFAULT_REVISION = "main"

_CHUNK = 256 * 1024
_REPO_ID_RE = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_HEX_PREFIX_RE = re.compile(r"^[0-9a-f]{7,39}$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_FLIP = bytes(255 - i for i in range(256))  # bytes.translate table: flips every bit
_AUTHOR = b"LocalHub <local-hub@localhost> 0 +0000"
_COMMIT_TITLE = "Upload folder with LocalHub"
_API_SUBPATHS = frozenset({"revision", "tree", "paths-info", "refs", "commits"})
_SKIPPED_DIRS = frozenset({".git", ".cache/huggingface"})


@dataclass(frozen=True)
class HubFile:
    """One file of a commit, as the hub describes it.

    Attributes:
        path: Path in the repo, with ``/`` separators.
        size: Size in bytes.
        sha256: Hex sha256 of the content.
        git_oid: Git blob id: of the content for small files, of the LFS pointer for LFS files.
        lfs: Whether the file is stored with LFS.
        pointer_size: Size of the LFS pointer file, ``None`` for small files.
        blob: Where the bytes are read from when serving.
        stat_key: ``(size, mtime_ns)`` of ``blob`` for files served in place, ``None`` for copies.
    """

    path: str
    size: int
    sha256: str
    git_oid: str
    lfs: bool
    pointer_size: int | None
    blob: Path
    stat_key: tuple[int, int] | None = None

    @property
    def etag(self) -> str:
        """The ``ETag`` the hub sends: sha256 for LFS files, git blob id otherwise."""
        return self.sha256 if self.lfs else self.git_oid


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
class _Commit:
    sha: str
    parent: str | None
    tree_oid: str
    files: Mapping[str, HubFile]
    dirs: Mapping[str, str]  # directory path ("" for the root) -> git tree id
    children: Mapping[str, tuple[str, ...]]  # directory path -> sorted child paths
    created_at: datetime


@dataclass
class _Repo:
    repo_id: str
    created_at: datetime
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    gated: bool = False


@dataclass
class _Fault:
    kind: str
    remaining: int
    path: str | None
    method: str | None
    status: int | None
    after_bytes: int | None

    def matches(self, method: str, route: _Route) -> bool:
        wanted = self.method or ("GET" if self.kind in _BODY_FAULTS else None)
        if wanted is not None and method != wanted:
            return False
        if self.kind == "corrupt" and route.endpoint != "resolve":
            return False  # only file bytes have a "right length" to keep
        if self.path is None:
            return True
        target = route.file if route.endpoint == "resolve" else route.url_path
        return target is not None and fnmatch.fnmatchcase(target, self.path)


@dataclass(frozen=True)
class _Route:
    endpoint: str
    url_path: str
    repo_id: str | None = None
    revision: str | None = None
    file: str | None = None


class _HttpError(Exception):
    """An error response: status, hub error code and message."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


class LocalHub:
    """A hub-compatible HTTP server on ``127.0.0.1`` serving repos from local folders.

    The server starts in the constructor (well under a second) and serves from a background
    thread until :meth:`close`. Use it as a context manager::

        with LocalHub() as hub:
            sha = hub.add_repo("org/tiny", folder)
            HfApi(endpoint=hub.url).model_info("org/tiny").sha == sha

    All methods are thread-safe.

    Args:
        port: Port to bind; ``0`` picks a free one.
        lfs_threshold: Files larger than this many bytes are stored with LFS.
        lfs_patterns: Basename globs always stored with LFS, whatever their size.
        page_size: Entries per page of tree and commit listings (the hub uses 1000).
        storage_dir: Where copied file contents are kept; a temporary folder removed by
            :meth:`close` when ``None``.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        lfs_threshold: int = 1024 * 1024,
        lfs_patterns: Sequence[str] = DEFAULT_LFS_PATTERNS,
        page_size: int = 1000,
        storage_dir: Path | None = None,
    ) -> None:
        if lfs_threshold < 0:
            raise ValueError(f"lfs_threshold must be >= 0, got {lfs_threshold}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self._lfs_threshold = lfs_threshold
        self._lfs_patterns = tuple(lfs_patterns)
        self._page_size = page_size
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._faults: list[_Fault] = []
        self._tokens: dict[str, frozenset[str] | None] = {}
        # Bounded so a long-running demo server cannot grow without limit.
        self._requests: deque[LoggedRequest] = deque(maxlen=100_000)
        owned = Path(tempfile.mkdtemp(prefix="local-hub-")) if storage_dir is None else None
        self._storage = owned or Path(storage_dir)  # type: ignore[arg-type]
        try:
            (self._storage / "blobs").mkdir(parents=True, exist_ok=True)
            self._server = _Server(("127.0.0.1", port), self)
        except BaseException:
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # A short poll keeps close() fast; the loop idles in select() meanwhile.
            kwargs={"poll_interval": 0.05},
            name=f"local-hub-{self.port}",
            daemon=True,
        )
        self._thread.start()
        # Runs once: on close(), when a forgotten hub is collected, or at interpreter exit.
        self._finalizer = weakref.finalize(self, _shutdown, self._server, self._thread, owned)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        return int(self._server.server_address[1])

    def __enter__(self) -> LocalHub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "serving" if self._finalizer.alive else "closed"
        return f"LocalHub(url={self.url!r}, repos={sorted(self._repos)}, {state})"

    def close(self) -> None:
        """Stop serving, close every connection and join every server thread. Idempotent.

        Also removes the temporary storage folder (not a ``storage_dir`` given by the caller).
        """
        self._finalizer()

    # -- repos ---------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        branch: str = DEFAULT_REVISION,
        tags: Sequence[str] = (),
        gated: bool | None = None,
        copy: bool = True,
    ) -> str:
        """Commit a folder's files to a repo branch, creating the repo if needed.

        A new branch starts from ``main`` when ``main`` exists. Earlier commits stay served by
        their sha; the branch (and ``tags``) point at the new commit.

        Args:
            repo_id: ``name`` or ``namespace/name``.
            folder: Folder whose files (recursively, ``.git`` and ``.cache/huggingface``
                excluded, symlinks followed) become the commit's tree.
            branch: Branch to commit to; slashes are allowed (``refs/pr/1``).
            tags: Tags to create on the new commit; an existing tag cannot be moved.
            gated: Gate the repo's files (``True``), open them (``False``), or keep the repo's
                current setting (``None``; new repos are open).
            copy: Copy the contents into the hub's storage, so the folder may change
                afterwards. With ``False`` files are served in place and a file changed since
                this call is answered with a 500.

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
            _check_ref_name(ref)
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"Cannot serve {folder}: not a directory.")
        # Hashing (and copying) is the slow part: done before taking the lock.
        files = self._ingest(folder, copy=copy)
        if not files:
            raise ValueError(f"Cannot serve {folder}: it holds no file.")
        dirs, children = _git_trees(files)
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                repo = _Repo(repo_id=repo_id, created_at=_now())
            parent = repo.branches.get(branch, repo.branches.get(DEFAULT_REVISION))
            sha = _git_commit_oid(dirs[""], parent)
            for tag in tags:
                if repo.tags.get(tag, sha) != sha:
                    raise ValueError(
                        f"Tag {tag!r} of {repo_id} already points to {repo.tags[tag]}: tags do"
                        " not move; use a branch."
                    )
            repo.commits.setdefault(
                sha,
                _Commit(
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
            self._repos[repo_id] = repo
        logger.info("local hub: %s@%s = %s (%d files)", repo_id, branch, sha, len(files))
        return sha

    def resolve(self, repo_id: str, revision: str = DEFAULT_REVISION) -> str:
        """Return the commit sha a revision points to now.

        Args:
            repo_id: A repo added with :meth:`add_repo`.
            revision: Branch, tag, ``refs/heads/...``/``refs/tags/...`` name, or (prefix of a)
                commit sha.

        Raises:
            LookupError: If the repo or the revision is unknown.
        """
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                raise LookupError(f"Repo {repo_id!r} is not served by {self.url}.")
            commit = _resolve_revision(repo, revision)
            if commit is None:
                raise LookupError(f"Revision {revision!r} not found in {repo_id}.")
            return commit.sha

    def files(self, repo_id: str, revision: str = DEFAULT_REVISION) -> dict[str, HubFile]:
        """Return the files of a revision, by path (sizes, sha256, git ids, LFS flags)."""
        sha = self.resolve(repo_id, revision)
        with self._lock:
            return dict(self._repos[repo_id].commits[sha].files)

    def allow_token(self, token: str, *, repos: Iterable[str] | None = None) -> None:
        """Accept a bearer token for gated repos.

        Args:
            token: The token value, sent as ``Authorization: Bearer <token>``.
            repos: Gated repos this token may read; all of them when ``None``. A known token
                asking for another gated repo gets 403 ``GatedRepo``.
        """
        if not token:
            raise ValueError("token must be a non-empty string")
        with self._lock:
            self._tokens[token] = None if repos is None else frozenset(repos)

    # -- faults and request log ------------------------------------------------------------

    def inject(
        self,
        fault: FaultKind,
        *,
        count: int = 1,
        path: str | None = None,
        method: str | None = None,
        status: int | None = None,
        after_bytes: int | None = None,
    ) -> None:
        """Make the next ``count`` matching requests fail; later ones are served normally.

        Faults are matched in the order they were injected; a request takes at most one.

        Args:
            fault: ``server_error`` (500, or ``status``); ``rate_limit`` (429 with
                ``Retry-After: 0``); ``drop_connection`` (headers and ``after_bytes`` of the
                body, default half, then a clean close: the client sees a short body);
                ``reset_connection`` (the same, then a TCP reset); ``corrupt`` (a file's bytes
                with every bit flipped, right length and headers); ``unauthorized`` /
                ``forbidden`` (401 / 403 ``GatedRepo``); ``not_found`` (404 ``EntryNotFound``
                for files, ``RepoNotFound`` for API calls).
            count: How many matching requests fail.
            path: Glob (``fnmatch``, ``*`` crosses ``/``) on the file path in the repo for
                ``resolve`` requests (``"*.safetensors"``), on the decoded URL path for API
                calls (``"/api/models/*/tree/*"``); ``None`` matches every request.
            method: Only requests with this method. Default: ``GET`` for ``drop_connection``,
                ``reset_connection`` and ``corrupt`` (a ``HEAD`` has no body), any otherwise.
                A dropped ``HEAD`` is closed before any response.
            status: The status of a ``server_error`` (500-599).
            after_bytes: Body bytes sent before ``drop_connection`` / ``reset_connection``.

        Raises:
            ValueError: If an argument does not fit the fault.
        """
        if fault not in _FAULT_KINDS:
            raise ValueError(f"Unknown fault {fault!r}; expected one of {sorted(_FAULT_KINDS)}.")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if status is not None and (fault != "server_error" or not 500 <= status <= 599):
            raise ValueError("status is only for server_error, and must be 500-599.")
        if after_bytes is not None and (
            fault not in {"drop_connection", "reset_connection"} or after_bytes < 0
        ):
            raise ValueError("after_bytes is only for drop/reset_connection, and must be >= 0.")
        with self._lock:
            self._faults.append(
                _Fault(
                    kind=fault,
                    remaining=count,
                    path=path,
                    method=method.upper() if method else None,
                    status=status,
                    after_bytes=after_bytes,
                )
            )

    def clear_faults(self) -> None:
        """Drop every fault not yet consumed."""
        with self._lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> list[tuple[str, int]]:
        """Faults not yet consumed, as ``(kind, remaining count)``."""
        with self._lock:
            return [(f.kind, f.remaining) for f in self._faults]

    @property
    def requests(self) -> list[LoggedRequest]:
        """A snapshot of the requests answered so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the logged requests."""
        with self._lock:
            self._requests.clear()

    # -- internals used by the handler -------------------------------------------------------

    def _take_fault(self, method: str, route: _Route) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, route):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._requests.append(entry)
        logger.debug(
            "local hub: %s %s -> %s%s",
            entry.method,
            entry.path,
            entry.status,
            f" (fault {entry.fault})" if entry.fault else "",
        )

    def _lookup(self, repo_id: str | None, revision: str | None) -> tuple[_Repo, _Commit]:
        with self._lock:
            repo = self._repos.get(repo_id or "")
            if repo is None:
                raise _HttpError(404, f"Repository {repo_id} not found.", code="RepoNotFound")
            commit = _resolve_revision(repo, revision or DEFAULT_REVISION)
            if commit is None:
                raise _HttpError(
                    404, f"Invalid rev id: {revision} for {repo_id}.", code="RevisionNotFound"
                )
            return repo, commit

    def _check_access(self, repo: _Repo, authorization: str | None) -> None:
        with self._lock:
            if not repo.gated:
                return
            token = _bearer_token(authorization)
            if token is None:
                raise _HttpError(
                    401,
                    f"Access to model {repo.repo_id} is restricted. You must have access to it"
                    " and be authenticated to access it. Please log in.",
                    code="GatedRepo",
                )
            if token not in self._tokens:
                raise _HttpError(401, "Invalid credentials in Authorization header")
            allowed = self._tokens[token]
            if allowed is not None and repo.repo_id not in allowed:
                raise _HttpError(
                    403,
                    f"Access to model {repo.repo_id} is restricted and you are not in the"
                    " authorized list.",
                    code="GatedRepo",
                )

    def _is_lfs(self, rel_path: str, size: int) -> bool:
        name = rel_path.rsplit("/", 1)[-1]
        return size > self._lfs_threshold or any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self._lfs_patterns
        )

    def _ingest(self, folder: Path, *, copy: bool) -> dict[str, HubFile]:
        files: dict[str, HubFile] = {}
        for source, rel_path in _walk(folder):
            size = source.stat().st_size
            files[rel_path] = _ingest_file(
                source,
                rel_path,
                lfs=self._is_lfs(rel_path, size),
                blobs_dir=self._storage / "blobs" if copy else None,
            )
        return dict(sorted(files.items()))

    def _last_commit(self, repo: _Repo, commit: _Commit, path: str) -> _Commit:
        """The oldest commit, walking back from ``commit``, since which ``path`` is unchanged."""
        oid = _oid_at(commit, path)
        current = commit
        with self._lock:
            while current.parent is not None:
                parent = repo.commits[current.parent]
                if _oid_at(parent, path) != oid:
                    break
                current = parent
        return current


# -- the HTTP side -------------------------------------------------------------------------------


def _shutdown(server: _Server, thread: threading.Thread, storage: Path | None) -> None:
    server.shutdown()  # stops accepting: returns once serve_forever has exited
    server.server_close()
    server.close_connections(timeout=5.0)
    thread.join(timeout=5.0)
    if storage is not None:
        shutil.rmtree(storage, ignore_errors=True)


class _Server(ThreadingHTTPServer):
    """Threading server that tracks its connections, so ``close()`` leaks none."""

    daemon_threads = True
    request_queue_size = 64  # snapshot_download opens 8 connections at once

    def __init__(self, address: tuple[str, int], hub: LocalHub) -> None:
        # A proxy: the server must not keep a forgotten hub alive (its finalizer stops us).
        self.hub: LocalHub = weakref.proxy(hub)
        self._conn_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn): slow where DNS is missing.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"local-hub-conn-{client_address[1]}",
            daemon=True,
        )
        with self._conn_lock:
            self._connections[request] = thread
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._connections.pop(request, None)

    def close_connections(self, *, timeout: float) -> None:
        """Shut every open connection down (idle keep-alives included) and join its thread."""
        with self._conn_lock:
            connections = list(self._connections.items())
        for sock, _ in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked reading the next request
        deadline = time.monotonic() + timeout
        for _, thread in connections:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return  # the client went away mid-response: normal for dropped or cancelled downloads
        logger.exception("local hub: error while serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's httpx client expects
    server_version = "phi3ops-local-hub/1"
    timeout = 300  # idle keep-alive connections of a crashed client do not live forever
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded in LocalHub.requests instead of stderr

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    # -- dispatch ----------------------------------------------------------------------------

    def _handle(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        self._query = parse_qs(split.query)
        self._raw_query = split.query
        self._route = _Route("unknown", unquote(split.path))
        self._fault: _Fault | None = None
        self._head_sent = False
        try:
            body = self._read_body()
            with hub._lock:
                known = set(hub._repos)
            self._route = _parse_route(split.path, known)
            self._fault = hub._take_fault(self.command, self._route)
            self._dispatch(body)
        except _HttpError as error:
            self._send_error(error)
        except (ConnectionError, TimeoutError):
            raise  # the client left: nothing to answer
        except Exception as error:
            # A bug here must not look like a network fault to the client: answer 500 if we can.
            logger.exception("local hub: error while answering %s %s", self.command, self.path)
            if self._head_sent:
                raise
            self._send_error(_HttpError(500, f"Local hub error: {type(error).__name__}: {error}"))

    def _dispatch(self, body: bytes) -> None:
        fault = self._fault
        if fault is not None and fault.kind not in _BODY_FAULTS:
            raise _fault_error(fault, self._route)
        if fault is not None and self.command == "HEAD" and fault.kind != "corrupt":
            self._log(0)  # a HEAD has no body to cut: drop it before any response
            self._abort(reset=fault.kind == "reset_connection")
            return
        endpoint = self._route.endpoint
        if endpoint == "resolve":
            self._serve_resolve()
        elif endpoint == "model_info":
            self._serve_model_info()
        elif endpoint == "tree":
            self._serve_tree()
        elif endpoint == "paths_info":
            self._serve_paths_info(body)
        elif endpoint == "refs":
            self._serve_refs()
        elif endpoint == "commits":
            self._serve_commits()
        else:
            raise _HttpError(404, f"Not found: {self._route.url_path}")

    def _read_body(self) -> bytes:
        # Always drain the body: leftover bytes would corrupt the next request on a keep-alive.
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True  # cannot tell where the next request starts
            raise _HttpError(400, "Invalid Content-Length.") from None
        return self.rfile.read(length) if length > 0 else b""

    # -- endpoints -------------------------------------------------------------------------

    def _serve_model_info(self) -> None:
        hub = self.server.hub
        repo, commit = hub._lookup(self._route.repo_id, self._route.revision)
        blobs = _flag(self._query, "blobs")
        siblings = []
        for entry in commit.files.values():
            sibling: dict[str, Any] = {"rfilename": entry.path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": entry.pointer_size,
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": _iso(commit.created_at),
            "createdAt": _iso(repo.created_at),
            "private": False,
            "disabled": False,
            "gated": "manual" if repo.gated else False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(entry.size for entry in commit.files.values()),
        }
        config = _small_json(commit.files.get("config.json"))
        if config is not None:
            info["config"] = {
                key: config[key] for key in ("architectures", "model_type") if key in config
            }
        self._send_json(info)

    def _serve_tree(self) -> None:
        hub = self.server.hub
        repo, commit = hub._lookup(self._route.repo_id, self._route.revision)
        base = (self._route.file or "").strip("/")
        if base not in commit.dirs:
            raise _HttpError(
                404,
                f"Directory {base!r} not found in {repo.repo_id}@{commit.sha}.",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.sha},
            )
        recursive = _flag(self._query, "recursive")
        expand = _flag(self._query, "expand")
        paths = list(_iter_tree(commit, base, recursive=recursive))
        start = _int_param(self._query, "cursor")
        page = paths[start : start + hub._page_size]
        headers: dict[str, str] = {}
        if start + hub._page_size < len(paths):
            # Absolute, and pinned to the sha: the client follows it verbatim, even if the branch
            # moves between two pages.
            suffix = "/" + quote(base, safe="") if base else ""
            params = urlencode(
                {
                    "recursive": str(recursive).lower(),
                    "expand": str(expand).lower(),
                    "cursor": start + hub._page_size,
                }
            )
            next_url = f"{hub.url}/api/models/{repo.repo_id}/tree/{commit.sha}{suffix}?{params}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(
            [_tree_entry(hub, repo, commit, path, expand=expand) for path in page], headers=headers
        )

    def _serve_paths_info(self, body: bytes) -> None:
        hub = self.server.hub
        repo, commit = hub._lookup(self._route.repo_id, self._route.revision)
        if "json" in (self.headers.get("Content-Type") or ""):
            try:
                payload = json.loads(body or b"{}")
            except ValueError:
                raise _HttpError(400, "paths-info: the body is not JSON.") from None
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode("utf-8"))
            paths, expand = form.get("paths", []), _flag(form, "expand")
        if isinstance(paths, str):
            paths = [paths]
        entries = [
            _tree_entry(hub, repo, commit, path.strip("/"), expand=expand)
            for path in paths
            if path.strip("/") in commit.files
            or (path.strip("/") and path.strip("/") in commit.dirs)
        ]
        self._send_json(entries)

    def _serve_refs(self) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = hub._repos.get(self._route.repo_id or "")
            if repo is None:
                raise _HttpError(
                    404, f"Repository {self._route.repo_id} not found.", code="RepoNotFound"
                )
            branches = dict(repo.branches)
            tags = dict(repo.tags)

        def ref(name: str, full: str, sha: str) -> dict[str, str]:
            return {"name": name, "ref": full, "targetCommit": sha}

        self._send_json(
            {
                "branches": [
                    ref(name, f"refs/heads/{name}", sha)
                    for name, sha in sorted(branches.items())
                    if not name.startswith("refs/pr/")
                ],
                "converts": [],
                "tags": [ref(name, f"refs/tags/{name}", sha) for name, sha in sorted(tags.items())],
                "pullRequests": [
                    ref(name, name, sha)
                    for name, sha in sorted(branches.items())
                    if name.startswith("refs/pr/")
                ],
            }
        )

    def _serve_commits(self) -> None:
        hub = self.server.hub
        repo, commit = hub._lookup(self._route.repo_id, self._route.revision)
        history: list[_Commit] = []
        with hub._lock:
            current: _Commit | None = commit
            while current is not None:
                history.append(current)
                current = repo.commits[current.parent] if current.parent else None
        start = _int_param(self._query, "cursor")
        page = history[start : start + hub._page_size]
        headers: dict[str, str] = {}
        if start + hub._page_size < len(history):
            cursor = urlencode({"cursor": start + hub._page_size})
            next_url = f"{hub.url}/api/models/{repo.repo_id}/commits/{commit.sha}?{cursor}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(
            [
                {
                    "id": item.sha,
                    "title": _COMMIT_TITLE,
                    "message": "",
                    "authors": [{"user": "local-hub", "avatar": None}],
                    "date": _iso(item.created_at),
                }
                for item in page
            ],
            headers=headers,
        )

    def _serve_resolve(self) -> None:
        hub = self.server.hub
        repo, commit = hub._lookup(self._route.repo_id, self._route.revision)
        hub._check_access(repo, self.headers.get("Authorization"))
        entry = commit.files.get(self._route.file or "")
        if entry is None:
            raise _HttpError(
                404,
                f"Entry not found: {self._route.file} in {repo.repo_id}@{commit.sha}.",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.sha},
            )
        if entry.stat_key is not None:
            stat = entry.blob.stat() if entry.blob.exists() else None
            if stat is None or (stat.st_size, stat.st_mtime_ns) != entry.stat_key:
                raise _HttpError(500, f"{entry.path}: file changed on disk since it was added.")
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{entry.etag}"',
            "X-Repo-Commit": commit.sha,
        }
        if entry.lfs:
            # What the hub sends for LFS files; huggingface_hub prefers them to ETag/Content-Length.
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        byte_range = _parse_range(self.headers.get("Range"), entry.size)
        if byte_range == "unsatisfiable":
            raise _HttpError(
                416,
                f"Range {self.headers.get('Range')} not satisfiable for {entry.size} bytes.",
                headers={"Content-Range": f"bytes */{entry.size}"},
            )
        start, end = byte_range if byte_range else (0, entry.size - 1)
        length = end - start + 1
        status = 200
        if byte_range:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        headers["Content-Length"] = str(length)
        with open(entry.blob, "rb") as source:  # opened first: a missing blob is a clean 500
            self._send_head(status, headers)
            if self.command == "HEAD":
                return
            source.seek(start)
            self._stream(_read_chunks(source, length), length)

    # -- responses -------------------------------------------------------------------------

    def _send_json(self, payload: Any, *, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send_head(
            200,
            {
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
                **(headers or {}),
            },
        )
        if self.command != "HEAD":
            self._stream(iter((body,)), len(body))

    def _send_error(self, error: _HttpError) -> None:
        body = json.dumps({"error": error.message}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        headers.update(error.headers)
        if error.code:
            headers["X-Error-Code"] = error.code
        headers["X-Error-Message"] = error.message.encode("ascii", "backslashreplace").decode()
        self._send_head(error.status, headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_head(self, status: int, headers: Mapping[str, str]) -> None:
        # Logged before the first byte goes out: a client that has its answer always finds its
        # request in hub.requests.
        self._log(status)
        self._head_sent = True
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _stream(self, chunks: Iterator[bytes], length: int) -> None:
        fault = self._fault
        budget: int | None = None
        if fault is not None and fault.kind in {"drop_connection", "reset_connection"}:
            budget = fault.after_bytes if fault.after_bytes is not None else length // 2
            budget = min(budget, max(length - 1, 0))  # always cut the body short
        for chunk in chunks:
            if fault is not None and fault.kind == "corrupt":
                chunk = chunk.translate(_FLIP)
            if budget is not None and len(chunk) >= budget:
                self.wfile.write(chunk[:budget])
                self._abort(reset=fault is not None and fault.kind == "reset_connection")
                return
            if budget is not None:
                budget -= len(chunk)
            self.wfile.write(chunk)
        if budget is not None:  # empty body: nothing to cut, still drop the connection
            self._abort(reset=fault is not None and fault.kind == "reset_connection")

    def _abort(self, *, reset: bool) -> None:
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            if reset:
                # Linger 0 turns the close into a TCP RST; the fd really closes in finish().
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            else:
                sock.shutdown(socket.SHUT_RDWR)

    def _log(self, status: int) -> None:
        route = self._route
        self.server.hub._record(
            LoggedRequest(
                method=self.command,
                path=route.url_path,
                query=self._raw_query,
                status=status,
                range=self.headers.get("Range"),
                endpoint=route.endpoint,
                repo_id=route.repo_id,
                revision=route.revision,
                file=route.file,
                authorized=self.headers.get("Authorization") is not None,
                fault=self._fault.kind if self._fault else None,
            )
        )


# -- helpers -------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _check_ref_name(ref: str) -> None:
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


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    values = query.get(name) or query.get(f"{name}[]") or []
    return bool(values) and values[-1].lower() in {"1", "true", "yes"}


def _int_param(query: Mapping[str, list[str]], name: str) -> int:
    values = query.get(name) or ["0"]
    try:
        return max(0, int(values[-1]))
    except ValueError:
        raise _HttpError(400, f"Invalid {name}: {values[-1]!r}.") from None


def _walk(folder: Path) -> Iterator[tuple[Path, str]]:
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        dirnames[:] = sorted(
            name
            for name in dirnames
            if name != ".git" and (rel_dir / name).as_posix() not in _SKIPPED_DIRS
        )
        for name in sorted(filenames):
            source = Path(dirpath) / name
            if source.is_file():  # follows symlinks (a hub cache snapshot is all symlinks)
                yield source, (rel_dir / name).as_posix()


def _ingest_file(source: Path, rel_path: str, *, lfs: bool, blobs_dir: Path | None) -> HubFile:
    stat = source.stat()
    size = stat.st_size
    sha256 = hashlib.sha256()
    git_blob = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    copied = 0
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(open(source, "rb"))
        writer: BinaryIO | None = None
        if blobs_dir is not None:
            writer = stack.enter_context(tempfile.NamedTemporaryFile(dir=blobs_dir, delete=False))
        try:
            while chunk := reader.read(1024 * 1024):
                sha256.update(chunk)
                if not lfs:
                    git_blob.update(chunk)
                if writer is not None:
                    writer.write(chunk)
                copied += len(chunk)
        except BaseException:
            if writer is not None:
                Path(writer.name).unlink(missing_ok=True)
            raise
    if copied != size:
        if writer is not None:
            Path(writer.name).unlink(missing_ok=True)
        raise RuntimeError(f"{source} changed size while being read ({size} -> {copied} bytes).")
    digest = sha256.hexdigest()
    pointer_size: int | None = None
    git_oid = git_blob.hexdigest()
    if lfs:
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {size}\n"
        pointer_size = len(pointer)
        git_oid = _git_object_oid(b"blob", pointer.encode())
    if writer is None:
        return HubFile(
            path=rel_path,
            size=size,
            sha256=digest,
            git_oid=git_oid,
            lfs=lfs,
            pointer_size=pointer_size,
            blob=source.resolve(),
            stat_key=(size, stat.st_mtime_ns),
        )
    blob = blobs_dir / digest  # type: ignore[operator]  # writer implies blobs_dir
    os.replace(writer.name, blob)  # same content under the same name: replacing is harmless
    return HubFile(
        path=rel_path,
        size=size,
        sha256=digest,
        git_oid=git_oid,
        lfs=lfs,
        pointer_size=pointer_size,
        blob=blob,
    )


def _git_object_oid(kind: bytes, body: bytes) -> str:
    header = kind + b" %d\0" % len(body)
    return hashlib.sha1(header + body, usedforsecurity=False).hexdigest()


def _git_trees(
    files: Mapping[str, HubFile],
) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Git tree ids of every directory, and each directory's children (sorted paths)."""
    children: dict[str, set[str]] = {"": set()}
    for path in files:
        parts = path.split("/")
        for depth in range(len(parts)):
            parent = "/".join(parts[:depth])
            child = "/".join(parts[: depth + 1])
            children.setdefault(parent, set()).add(child)
            if depth < len(parts) - 1:
                children.setdefault(child, set())
    dirs: dict[str, str] = {}

    def tree_oid(directory: str) -> str:
        entries: list[tuple[bytes, bytes]] = []
        for child in children[directory]:
            name = child.rsplit("/", 1)[-1].encode()
            if child in children:
                entries.append(
                    (name + b"/", b"40000 " + name + b"\0" + bytes.fromhex(tree_oid(child)))
                )
            else:
                oid = bytes.fromhex(files[child].git_oid)
                entries.append((name, b"100644 " + name + b"\0" + oid))
        # Git orders tree entries by name, directories compared as if they ended with "/".
        body = b"".join(entry for _, entry in sorted(entries))
        dirs[directory] = _git_object_oid(b"tree", body)
        return dirs[directory]

    tree_oid("")
    ordered = {
        directory: tuple(sorted(kids, key=lambda p: (p not in children, p)))
        for directory, kids in children.items()
    }
    return dirs, ordered


def _git_commit_oid(tree: str, parent: str | None) -> str:
    lines = [f"tree {tree}".encode()]
    if parent is not None:
        lines.append(f"parent {parent}".encode())
    lines += [b"author " + _AUTHOR, b"committer " + _AUTHOR, b"", _COMMIT_TITLE.encode(), b""]
    return _git_object_oid(b"commit", b"\n".join(lines))


def _oid_at(commit: _Commit, path: str) -> str | None:
    if path in commit.files:
        return commit.files[path].git_oid
    return commit.dirs.get(path)


def _resolve_revision(repo: _Repo, revision: str) -> _Commit | None:
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


def _iter_tree(commit: _Commit, base: str, *, recursive: bool) -> Iterator[str]:
    for child in commit.children.get(base, ()):
        yield child
        if recursive and child in commit.dirs:
            yield from _iter_tree(commit, child, recursive=True)


def _tree_entry(
    hub: LocalHub, repo: _Repo, commit: _Commit, path: str, *, expand: bool
) -> dict[str, Any]:
    entry: dict[str, Any]
    file = commit.files.get(path)
    if file is not None:
        entry = {"type": "file", "oid": file.git_oid, "size": file.size, "path": path}
        if file.lfs:
            entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": file.pointer_size}
    else:
        entry = {"type": "directory", "oid": commit.dirs[path], "size": 0, "path": path}
    if expand:
        last = hub._last_commit(repo, commit, path)
        entry["lastCommit"] = {
            "id": last.sha,
            "title": _COMMIT_TITLE,
            "date": _iso(last.created_at),
        }
    return entry


def _small_json(entry: HubFile | None) -> dict[str, Any] | None:
    if entry is None or entry.size > 1024 * 1024:
        return None
    try:
        data = json.loads(entry.blob.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _parse_range(
    header: str | None, size: int
) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """One byte range, clamped; ``None`` means serve it all (no, invalid or multiple ranges)."""
    if not header:
        return None
    match = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None  # RFC 9110: an unparsable (or multi-part) Range is ignored
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _read_chunks(source: BinaryIO, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining > 0:
        chunk = source.read(min(_CHUNK, remaining))
        if not chunk:
            # The blob shrank under us: the promised Content-Length cannot be honoured.
            raise ConnectionAbortedError("blob truncated while serving")
        remaining -= len(chunk)
        yield chunk


def _parse_route(raw_path: str, known_repos: set[str]) -> _Route:
    """Split a raw (still percent-encoded) URL path into endpoint, repo, revision and file."""
    url_path = unquote(raw_path)
    segments = raw_path.strip("/").split("/")
    if len(segments) >= 3 and segments[:2] == ["api", "models"]:
        rest = segments[2:]
        if len(rest) >= 2 and f"{rest[0]}/{rest[1]}" in known_repos:
            split = 2
        elif rest[0] in known_repos or (len(rest) >= 2 and rest[1] in _API_SUBPATHS):
            split = 1
        else:
            split = min(2, len(rest))
        repo_id = "/".join(unquote(part) for part in rest[:split])
        tail = rest[split:]
        if not tail:
            return _Route("model_info", url_path, repo_id, DEFAULT_REVISION)
        action, args = tail[0], [unquote(part) for part in tail[1:]]
        if action == "refs" and not args:
            return _Route("refs", url_path, repo_id)
        if action in {"revision", "commits", "paths-info"} and args:
            endpoint = {"revision": "model_info", "paths-info": "paths_info"}.get(action, action)
            return _Route(endpoint, url_path, repo_id, "/".join(args))
        if action == "tree" and args:
            return _Route("tree", url_path, repo_id, args[0], "/".join(args[1:]))
        return _Route("unknown", url_path, repo_id)
    for index in (2, 1):
        if len(segments) > index + 2 and segments[index] == "resolve":
            repo_id = "/".join(unquote(part) for part in segments[:index])
            revision = unquote(segments[index + 1])
            file = "/".join(unquote(part) for part in segments[index + 2 :])
            return _Route("resolve", url_path, repo_id, revision, file)
    return _Route("unknown", url_path)


def _fault_error(fault: _Fault, route: _Route) -> _HttpError:
    if fault.kind == "server_error":
        return _HttpError(fault.status or 500, "Injected server error.")
    if fault.kind == "rate_limit":
        return _HttpError(429, "Injected rate limit.", headers={"Retry-After": "0"})
    if fault.kind == "unauthorized":
        return _HttpError(401, "Injected: authentication required.", code="GatedRepo")
    if fault.kind == "forbidden":
        return _HttpError(403, "Injected: not in the authorized list.", code="GatedRepo")
    code = "EntryNotFound" if route.endpoint == "resolve" else "RepoNotFound"
    return _HttpError(404, "Injected: not found.", code=code)


# -- pointing huggingface_hub at a hub in-process ------------------------------------------------


@contextlib.contextmanager
def use_hf_endpoint(url: str) -> Iterator[None]:
    """Point an already imported ``huggingface_hub`` (and ``transformers``) at ``url``.

    Patches ``huggingface_hub.constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``,
    the module-level ``HfApi`` behind ``huggingface_hub.model_info`` and friends,
    ``transformers``' cached ``HfApi`` when it exists, and ``os.environ["HF_ENDPOINT"]`` for
    subprocesses; everything is restored on exit. Not thread-safe: patch around a test, not
    inside concurrent code. Prefer passing ``endpoint=`` explicitly where the API takes it.

    Args:
        url: Base URL of the hub, e.g. ``LocalHub.url``.

    Yields:
        Nothing; the patch lasts for the ``with`` block.
    """
    from huggingface_hub import constants, hf_api

    url = url.rstrip("/")
    apis = [hf_api.api]
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if getattr(transformers_hub, "_hf_api", None) is not None:
        apis.append(transformers_hub._hf_api)  # type: ignore[union-attr]
    saved_constants = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE)
    saved_endpoints = [api.endpoint for api in apis]
    saved_env = os.environ.get("HF_ENDPOINT")
    constants.ENDPOINT = url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = url + "/{repo_id}/resolve/{revision}/{filename}"
    for api in apis:
        api.endpoint = url
    os.environ["HF_ENDPOINT"] = url
    try:
        yield
    finally:
        constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE = saved_constants
        for api, endpoint in zip(apis, saved_endpoints, strict=True):
            api.endpoint = endpoint
        if saved_env is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = saved_env


# -- command line --------------------------------------------------------------------------------


def _repo_arg(value: str) -> tuple[str, Path]:
    repo_id, sep, folder = value.partition("=")
    if not sep or not repo_id or not folder:
        raise argparse.ArgumentTypeError(f"expected REPO_ID=FOLDER, got {value!r}")
    return repo_id, Path(folder)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve folders as hub repos until Ctrl-C or SIGTERM.

    Prints ``HF_ENDPOINT=<url>`` as the first line on stdout, then one line per repo on stderr.

    Args:
        argv: Command-line arguments; ``sys.argv[1:]`` when ``None``.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m phi3ops.offline.local_hub",
        description="Serve local folders as Hugging Face hub model repos on 127.0.0.1.",
    )
    parser.add_argument(
        "--repo",
        action="append",
        type=_repo_arg,
        required=True,
        metavar="REPO_ID=FOLDER",
        help="serve FOLDER as REPO_ID@main; repeat a REPO_ID to stack commits",
    )
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: a free one)")
    parser.add_argument(
        "--gated", action="append", default=[], metavar="REPO_ID", help="gate this repo's files"
    )
    parser.add_argument(
        "--allow-token", action="append", default=[], metavar="TOKEN", help="token for gated repos"
    )
    parser.add_argument(
        "--no-copy", action="store_true", help="serve files in place instead of copying them"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    try:
        hub = LocalHub(port=args.port)
    except OSError as error:
        print(f"local hub: cannot listen on port {args.port}: {error}", file=sys.stderr)
        return 1
    with hub:
        try:
            for repo_id, folder in args.repo:
                sha = hub.add_repo(
                    repo_id, folder, gated=repo_id in args.gated, copy=not args.no_copy
                )
                print(f"local hub: {repo_id}@main = {sha} ({folder})", file=sys.stderr)
        except (ValueError, OSError) as error:
            print(f"local hub: {error}", file=sys.stderr)
            return 2
        for token in args.allow_token:
            hub.allow_token(token)
        print(f"HF_ENDPOINT={hub.url}", flush=True)
        print("local hub: serving; Ctrl-C to stop", file=sys.stderr, flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
