"""Fault injection: the ways :meth:`~offline.local_hub.LocalHub.inject` makes requests fail.

Fault injection makes the first N matching requests fail in a chosen way, then stops. What
``huggingface_hub`` 2.4 does with them:

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
* ``silent``: the request is read and never answered; the connection stays open until the client
  gives up (or the hub closes). ``huggingface_hub``'s own client has no timeout on API calls
  (``model_info``, ``list_repo_tree``), so without one of its own a caller waits forever. With
  ``after_bytes``, the headers and that many body bytes are sent first (a stalled download).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal, get_args

from offline.local_hub.routes import HttpError, Route

__all__ = [
    "AFTER_BYTES_FAULTS",
    "BODY_FAULTS",
    "CUT_FAULTS",
    "FAULT_KINDS",
    "Fault",
    "FaultKind",
    "corrupt",
    "fault_error",
]

FaultKind = Literal[
    "server_error",
    "rate_limit",
    "drop_connection",
    "reset_connection",
    "corrupt",
    "unauthorized",
    "forbidden",
    "not_found",
    "silent",
]
FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))
#: Faults that alter a response body: by default they wait for a GET (a HEAD has no body).
BODY_FAULTS = frozenset({"drop_connection", "reset_connection", "corrupt"})
#: Faults that cut the body short, after ``after_bytes``.
CUT_FAULTS = frozenset({"drop_connection", "reset_connection"})
#: Faults that take ``after_bytes`` (``silent`` stalls after that many body bytes when given).
AFTER_BYTES_FAULTS = CUT_FAULTS | {"silent"}

_FLIP = bytes(255 - i for i in range(256))  # bytes.translate table: flips every bit


@dataclass
class Fault:
    """A fault not yet consumed.

    Attributes:
        kind: One of :data:`FaultKind`.
        remaining: How many more matching requests it shapes.
        path: Glob on the file path (``resolve``) or on the URL path (API calls); ``None``
            matches every request.
        method: Only requests with this method (upper case); ``None``: see :meth:`matches`.
        status: The status of a ``server_error``, ``None`` for 500.
        after_bytes: Body bytes sent before a cut; ``None`` for half the body.
    """

    kind: str
    remaining: int
    path: str | None
    method: str | None
    status: int | None
    after_bytes: int | None

    @classmethod
    def create(
        cls,
        fault: str,
        *,
        count: int,
        path: str | None,
        method: str | None,
        status: int | None,
        after_bytes: int | None,
    ) -> Fault:
        """Check the arguments of :meth:`~offline.local_hub.LocalHub.inject` and build the fault.

        Raises:
            ValueError: If an argument does not fit the fault.
        """
        if fault not in FAULT_KINDS:
            raise ValueError(f"Unknown fault {fault!r}; expected one of {sorted(FAULT_KINDS)}.")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if status is not None and (fault != "server_error" or not 500 <= status <= 599):
            raise ValueError("status is only for server_error, and must be 500-599.")
        if after_bytes is not None and (fault not in AFTER_BYTES_FAULTS or after_bytes < 0):
            raise ValueError(
                "after_bytes is only for drop/reset_connection and silent, and must be >= 0."
            )
        return cls(
            kind=fault,
            remaining=count,
            path=path,
            method=method.upper() if method else None,
            status=status,
            after_bytes=after_bytes,
        )

    def matches(self, method: str, route: Route) -> bool:
        """Whether this fault shapes a request.

        Without an explicit method, body faults wait for a ``GET``; ``corrupt`` only matches
        file downloads (only file bytes have a "right length" to keep).

        Args:
            method: The request's HTTP method.
            route: What its URL names.

        Returns:
            ``True`` when the request matches.
        """
        wanted = self.method or ("GET" if self.alters_body else None)
        if wanted is not None and method != wanted:
            return False
        if self.kind == "corrupt" and route.endpoint != "resolve":
            return False  # only file bytes have a "right length" to keep
        if self.path is None:
            return True
        target = route.file if route.endpoint == "resolve" else route.url_path
        return target is not None and fnmatch.fnmatchcase(target, self.path)

    @property
    def alters_body(self) -> bool:
        """Whether the fault shapes a response body (so it waits for a ``GET`` by default)."""
        return self.kind in BODY_FAULTS or (self.kind == "silent" and self.after_bytes is not None)

    def cut_budget(self, length: int) -> int | None:
        """Body bytes to send before cutting (or stalling) a body of ``length`` bytes; ``None``:
        no cut.

        The body is always cut short, even when ``after_bytes`` is larger than it.
        """
        stalls = self.kind == "silent" and self.after_bytes is not None
        if self.kind not in CUT_FAULTS and not stalls:
            return None
        budget = self.after_bytes if self.after_bytes is not None else length // 2
        return min(budget, max(length - 1, 0))


def corrupt(chunk: bytes) -> bytes:
    """The ``corrupt`` fault's bytes: every bit of ``chunk`` flipped, same length."""
    return chunk.translate(_FLIP)


def fault_error(fault: Fault, route: Route) -> HttpError:
    """The error response of a fault that answers instead of serving (not a body fault, not
    ``silent``).

    Args:
        fault: A fault whose kind is not in :data:`BODY_FAULTS`.
        route: What the request's URL names (``not_found`` answers per endpoint).

    Returns:
        The error to send.
    """
    if fault.kind == "server_error":
        return HttpError(fault.status or 500, "Injected server error.")
    if fault.kind == "rate_limit":
        return HttpError(429, "Injected rate limit.", headers={"Retry-After": "0"})
    if fault.kind == "unauthorized":
        return HttpError(401, "Injected: authentication required.", code="GatedRepo")
    if fault.kind == "forbidden":
        return HttpError(403, "Injected: not in the authorized list.", code="GatedRepo")
    code = "EntryNotFound" if route.endpoint == "resolve" else "RepoNotFound"
    return HttpError(404, "Injected: not found.", code=code)
