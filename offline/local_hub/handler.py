"""The HTTP side of the local hub: the threading server and the request handler.

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

The server is stdlib only (``http.server``, one thread per connection) and imports nothing from
``huggingface_hub``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from offline.local_hub.faults import Fault, corrupt, fault_error
from offline.local_hub.git import COMMIT_TITLE, HubFile
from offline.local_hub.routes import (
    HttpError,
    Route,
    flag,
    int_param,
    parse_range,
    parse_route,
)
from offline.local_hub.state import Commit, HubState, LoggedRequest, Repo

__all__ = ["HubServer"]

logger = logging.getLogger(__name__)

_CHUNK = 256 * 1024


class HubServer(ThreadingHTTPServer):
    """Threading server that tracks its connections, so ``close()`` leaks none.

    Args:
        address: ``(host, port)`` to bind; port ``0`` picks a free one.
        state: What to serve. The server holds no reference to the ``LocalHub``, so a
            forgotten hub can be collected (its finalizer stops the server).

    Attributes:
        state: What the handlers serve.
        url: ``http://127.0.0.1:<port>``, the base of ``Link`` headers.
    """

    daemon_threads = True
    request_queue_size = 64  # snapshot_download opens 8 connections at once

    def __init__(self, address: tuple[str, int], state: HubState) -> None:
        self.state = state
        self._conn_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        super().__init__(address, _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def server_bind(self) -> None:
        """Bind without ``HTTPServer``'s host name lookup."""
        # HTTPServer.server_bind resolves the host name (getfqdn): slow where DNS is missing.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve a connection in a tracked daemon thread."""
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
        """Log a handler's crash, but not a client that went away."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return  # the client went away mid-response: normal for dropped or cancelled downloads
        logger.exception("local hub: error while serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's httpx client expects
    server_version = "phi3ops-local-hub/1"
    timeout = 300  # idle keep-alive connections of a crashed client do not live forever
    server: HubServer

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
        state = self.server.state
        split = urlsplit(self.path)
        self._query = parse_qs(split.query)
        self._raw_query = split.query
        self._route = Route("unknown", unquote(split.path))
        self._fault: Fault | None = None
        self._head_sent = False
        try:
            body = self._read_body()
            self._route = parse_route(split.path, state.repo_ids())
            self._fault = state.take_fault(self.command, self._route)
            self._dispatch(body)
        except HttpError as error:
            self._send_error(error)
        except (ConnectionError, TimeoutError):
            raise  # the client left: nothing to answer
        except Exception as error:
            # A bug here must not look like a network fault to the client: answer 500 if we can.
            logger.exception("local hub: error while answering %s %s", self.command, self.path)
            if self._head_sent:
                raise
            self._send_error(HttpError(500, f"Local hub error: {type(error).__name__}: {error}"))

    def _dispatch(self, body: bytes) -> None:
        fault = self._fault
        if fault is not None and fault.kind == "silent" and not fault.alters_body:
            self._log(0)
            self._stay_silent()
            return
        if fault is not None and not fault.alters_body:
            raise fault_error(fault, self._route)
        if fault is not None and self.command == "HEAD" and fault.kind != "corrupt":
            self._log(0)  # a HEAD has no body to cut: drop it (or stall) before any response
            if fault.kind == "silent":
                self._stay_silent()
            else:
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
            raise HttpError(404, f"Not found: {self._route.url_path}")

    def _read_body(self) -> bytes:
        # Always drain the body: leftover bytes would corrupt the next request on a keep-alive.
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True  # cannot tell where the next request starts
            raise HttpError(400, "Invalid Content-Length.") from None
        return self.rfile.read(length) if length > 0 else b""

    # -- endpoints -------------------------------------------------------------------------

    def _serve_model_info(self) -> None:
        repo, commit = self.server.state.lookup(self._route.repo_id, self._route.revision)
        blobs = flag(self._query, "blobs")
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
        state = self.server.state
        repo, commit = state.lookup(self._route.repo_id, self._route.revision)
        base = (self._route.file or "").strip("/")
        if base not in commit.dirs:
            raise HttpError(
                404,
                f"Directory {base!r} not found in {repo.repo_id}@{commit.sha}.",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.sha},
            )
        recursive = flag(self._query, "recursive")
        expand = flag(self._query, "expand")
        paths = list(_iter_tree(commit, base, recursive=recursive))
        start = int_param(self._query, "cursor")
        page = paths[start : start + state.page_size]
        headers: dict[str, str] = {}
        if start + state.page_size < len(paths):
            # Absolute, and pinned to the sha: the client follows it verbatim, even if the branch
            # moves between two pages.
            suffix = "/" + quote(base, safe="") if base else ""
            params = urlencode(
                {
                    "recursive": str(recursive).lower(),
                    "expand": str(expand).lower(),
                    "cursor": start + state.page_size,
                }
            )
            next_url = (
                f"{self.server.url}/api/models/{repo.repo_id}/tree/{commit.sha}{suffix}?{params}"
            )
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(
            [_tree_entry(state, repo, commit, path, expand=expand) for path in page],
            headers=headers,
        )

    def _serve_paths_info(self, body: bytes) -> None:
        state = self.server.state
        repo, commit = state.lookup(self._route.repo_id, self._route.revision)
        if "json" in (self.headers.get("Content-Type") or ""):
            try:
                payload = json.loads(body or b"{}")
            except ValueError:
                raise HttpError(400, "paths-info: the body is not JSON.") from None
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode("utf-8"))
            paths, expand = form.get("paths", []), flag(form, "expand")
        if isinstance(paths, str):
            paths = [paths]
        entries = [
            _tree_entry(state, repo, commit, path.strip("/"), expand=expand)
            for path in paths
            if path.strip("/") in commit.files
            or (path.strip("/") and path.strip("/") in commit.dirs)
        ]
        self._send_json(entries)

    def _serve_refs(self) -> None:
        branches, tags = self.server.state.refs(self._route.repo_id)

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
        state = self.server.state
        repo, commit = state.lookup(self._route.repo_id, self._route.revision)
        history = state.history(repo, commit)
        start = int_param(self._query, "cursor")
        page = history[start : start + state.page_size]
        headers: dict[str, str] = {}
        if start + state.page_size < len(history):
            cursor = urlencode({"cursor": start + state.page_size})
            next_url = f"{self.server.url}/api/models/{repo.repo_id}/commits/{commit.sha}?{cursor}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(
            [
                {
                    "id": item.sha,
                    "title": COMMIT_TITLE,
                    "message": "",
                    "authors": [{"user": "local-hub", "avatar": None}],
                    "date": _iso(item.created_at),
                }
                for item in page
            ],
            headers=headers,
        )

    def _serve_resolve(self) -> None:
        state = self.server.state
        repo, commit = state.lookup(self._route.repo_id, self._route.revision)
        state.check_access(repo, self.headers.get("Authorization"))
        entry = commit.files.get(self._route.file or "")
        if entry is None:
            raise HttpError(
                404,
                f"Entry not found: {self._route.file} in {repo.repo_id}@{commit.sha}.",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.sha},
            )
        if entry.stat_key is not None:
            stat = entry.blob.stat() if entry.blob.exists() else None
            if stat is None or (stat.st_size, stat.st_mtime_ns) != entry.stat_key:
                raise HttpError(500, f"{entry.path}: file changed on disk since it was added.")
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
        byte_range = parse_range(self.headers.get("Range"), entry.size)
        if byte_range == "unsatisfiable":
            raise HttpError(
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

    def _send_error(self, error: HttpError) -> None:
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
        budget = fault.cut_budget(length) if fault is not None else None
        reset = fault is not None and fault.kind == "reset_connection"
        for chunk in chunks:
            if fault is not None and fault.kind == "corrupt":
                chunk = corrupt(chunk)
            if budget is not None and len(chunk) >= budget:
                self.wfile.write(chunk[:budget])
                if fault is not None and fault.kind == "silent":
                    self._stay_silent()  # a stalled download: the rest never comes
                else:
                    self._abort(reset=reset)
                return
            if budget is not None:
                budget -= len(chunk)
            self.wfile.write(chunk)
        if budget is not None:  # empty body: nothing to cut, still drop the connection
            self._abort(reset=reset)

    def _stay_silent(self) -> None:
        """Hold the connection open and answer nothing, until the client leaves or the hub closes.

        ``LocalHub.close`` shuts every connection down, which wakes this loop like a client that
        left; whatever the client sends meanwhile is read and ignored.
        """
        self.close_connection = True
        sock = self.connection
        while True:
            readable, _, _ = select.select([sock], [], [], 1.0)
            if not readable:
                continue
            try:
                if not sock.recv(64 * 1024):
                    return  # the client closed its end (or the hub shut the connection down)
            except OSError:
                return

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
        self.server.state.record(
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


# -- response helpers ----------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _iter_tree(commit: Commit, base: str, *, recursive: bool) -> Iterator[str]:
    for child in commit.children.get(base, ()):
        yield child
        if recursive and child in commit.dirs:
            yield from _iter_tree(commit, child, recursive=True)


def _tree_entry(
    state: HubState, repo: Repo, commit: Commit, path: str, *, expand: bool
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
        last = state.last_commit(repo, commit, path)
        entry["lastCommit"] = {
            "id": last.sha,
            "title": COMMIT_TITLE,
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


def _read_chunks(source: BinaryIO, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining > 0:
        chunk = source.read(min(_CHUNK, remaining))
        if not chunk:
            # The blob shrank under us: the promised Content-Length cannot be honoured.
            raise ConnectionAbortedError("blob truncated while serving")
        remaining -= len(chunk)
        yield chunk
