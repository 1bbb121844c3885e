"""The public :class:`LocalHub`: the server's lifecycle and the API tests drive it with."""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

from offline.local_hub.faults import Fault, FaultKind
from offline.local_hub.git import DEFAULT_LFS_PATTERNS, DEFAULT_REVISION, HubFile
from offline.local_hub.handler import HubServer
from offline.local_hub.state import HubState, LoggedRequest

__all__ = ["LocalHub"]


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
        owned = Path(tempfile.mkdtemp(prefix="local-hub-")) if storage_dir is None else None
        self._storage = owned or Path(storage_dir)  # type: ignore[arg-type]
        try:
            (self._storage / "blobs").mkdir(parents=True, exist_ok=True)
            self._state = HubState(
                lfs_threshold=lfs_threshold,
                lfs_patterns=lfs_patterns,
                page_size=page_size,
                storage=self._storage,
            )
            self._server = HubServer(("127.0.0.1", port), self._state)
        except BaseException:
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        self.url = self._server.url
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
        return f"LocalHub(url={self.url!r}, repos={sorted(self._state.repo_ids())}, {state})"

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
        return self._state.add_repo(
            repo_id, folder, branch=branch, tags=tags, gated=gated, copy=copy
        )

    def resolve(self, repo_id: str, revision: str = DEFAULT_REVISION) -> str:
        """Return the commit sha a revision points to now.

        Args:
            repo_id: A repo added with :meth:`add_repo`.
            revision: Branch, tag, ``refs/heads/...``/``refs/tags/...`` name, or (prefix of a)
                commit sha.

        Raises:
            LookupError: If the repo or the revision is unknown.
        """
        repo, commit = self._state.find(repo_id, revision)
        if repo is None:
            raise LookupError(f"Repo {repo_id!r} is not served by {self.url}.")
        if commit is None:
            raise LookupError(f"Revision {revision!r} not found in {repo_id}.")
        return commit.sha

    def files(self, repo_id: str, revision: str = DEFAULT_REVISION) -> dict[str, HubFile]:
        """Return the files of a revision, by path (sizes, sha256, git ids, LFS flags).

        Raises:
            LookupError: If the repo or the revision is unknown.
        """
        repo, commit = self._state.find(repo_id, revision)
        if repo is None:
            raise LookupError(f"Repo {repo_id!r} is not served by {self.url}.")
        if commit is None:
            raise LookupError(f"Revision {revision!r} not found in {repo_id}.")
        return dict(commit.files)

    def allow_token(self, token: str, *, repos: Iterable[str] | None = None) -> None:
        """Accept a bearer token for gated repos.

        Args:
            token: The token value, sent as ``Authorization: Bearer <token>``.
            repos: Gated repos this token may read; all of them when ``None``. A known token
                asking for another gated repo gets 403 ``GatedRepo``.

        Raises:
            ValueError: If ``token`` is empty.
        """
        self._state.allow_token(token, repos)

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

        Faults are matched in the order they were injected; a request takes at most one. See
        :mod:`offline.local_hub.faults` for what ``huggingface_hub`` does with each.

        Args:
            fault: ``server_error`` (500, or ``status``); ``rate_limit`` (429 with
                ``Retry-After: 0``); ``drop_connection`` (headers and ``after_bytes`` of the
                body, default half, then a clean close: the client sees a short body);
                ``reset_connection`` (the same, then a TCP reset); ``corrupt`` (a file's bytes
                with every bit flipped, right length and headers); ``unauthorized`` /
                ``forbidden`` (401 / 403 ``GatedRepo``); ``not_found`` (404 ``EntryNotFound``
                for files, ``RepoNotFound`` for API calls); ``silent`` (the request is read and
                never answered: the connection stays open until the client gives up; with
                ``after_bytes``, the headers and that many body bytes come first).
            count: How many matching requests fail.
            path: Glob (``fnmatch``, ``*`` crosses ``/``) on the file path in the repo for
                ``resolve`` requests (``"*.safetensors"``), on the decoded URL path for API
                calls (``"/api/models/*/tree/*"``); ``None`` matches every request.
            method: Only requests with this method. Default: ``GET`` for ``drop_connection``,
                ``reset_connection`` and ``corrupt`` (a ``HEAD`` has no body), any otherwise.
                A dropped ``HEAD`` is closed before any response; a ``silent`` one stalls.
            status: The status of a ``server_error`` (500-599).
            after_bytes: Body bytes sent before ``drop_connection`` / ``reset_connection``
                cut the connection, or before ``silent`` stalls it.

        Raises:
            ValueError: If an argument does not fit the fault.
        """
        self._state.add_fault(
            Fault.create(
                fault,
                count=count,
                path=path,
                method=method,
                status=status,
                after_bytes=after_bytes,
            )
        )

    def clear_faults(self) -> None:
        """Drop every fault not yet consumed."""
        self._state.clear_faults()

    @property
    def pending_faults(self) -> list[tuple[str, int]]:
        """Faults not yet consumed, as ``(kind, remaining count)``."""
        return self._state.pending_faults()

    @property
    def requests(self) -> list[LoggedRequest]:
        """A snapshot of the requests answered so far, oldest first."""
        return self._state.logged_requests()

    def clear_requests(self) -> None:
        """Forget the logged requests."""
        self._state.clear_requests()


def _shutdown(server: HubServer, thread: threading.Thread, storage: Path | None) -> None:
    server.shutdown()  # stops accepting: returns once serve_forever has exited
    server.server_close()
    server.close_connections(timeout=5.0)
    thread.join(timeout=5.0)
    if storage is not None:
        shutil.rmtree(storage, ignore_errors=True)
