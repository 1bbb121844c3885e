"""The hub's URL scheme and HTTP vocabulary: routes, query parameters, ranges, errors.

Errors carry the ``X-Error-Code`` header that ``huggingface_hub.utils.hf_raise_for_status`` maps:
unknown repo -> 404 ``RepoNotFound`` (``RepositoryNotFoundError``), unknown revision -> 404
``RevisionNotFound`` (``RevisionNotFoundError``), unknown file -> 404 ``EntryNotFound``
(``RemoteEntryNotFoundError``), gated file without an allowed token -> 401/403 ``GatedRepo``
(``GatedRepoError``). As on the hub, gating covers file contents only: ``model_info`` and tree
listings stay public and report ``gated: "manual"``. A token that
:meth:`~offline.local_hub.LocalHub.allow_token` never saw gets 401 with
``X-Error-Message: Invalid credentials in Authorization header``, which ``huggingface_hub`` 2.4
raises as a plain ``HfHubHTTPError`` (status 401). Tokens are only checked where access is
restricted, so a real hub token in the environment does not break the offline demo.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from offline.local_hub.git import DEFAULT_REVISION

__all__ = ["HttpError", "Route", "flag", "int_param", "parse_range", "parse_route"]

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_API_SUBPATHS = frozenset({"revision", "tree", "paths-info", "refs", "commits"})


class HttpError(Exception):
    """An error response: status, hub error code and message.

    Args:
        status: HTTP status.
        message: Sent as the JSON body's ``error`` and as ``X-Error-Message``.
        code: Sent as ``X-Error-Code`` (``RepoNotFound``, ``GatedRepo``...), if any.
        headers: Extra response headers.
    """

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


@dataclass(frozen=True)
class Route:
    """What a request's URL names.

    Attributes:
        endpoint: ``model_info``, ``tree``, ``paths_info``, ``refs``, ``commits``, ``resolve``
            or ``unknown``.
        url_path: Percent-decoded URL path, without the query string.
        repo_id: Repo named by the URL, if any.
        revision: Revision named by the URL (decoded), if any.
        file: Path in the repo for ``resolve`` requests (the tree path for ``tree``).
    """

    endpoint: str
    url_path: str
    repo_id: str | None = None
    revision: str | None = None
    file: str | None = None


def parse_route(raw_path: str, known_repos: set[str]) -> Route:
    """Split a raw (still percent-encoded) URL path into endpoint, repo, revision and file.

    Args:
        raw_path: The URL path as sent, without the query string.
        known_repos: Repos served now: they tell ``/api/models/name/tree/...`` (a repo without
            namespace) from ``/api/models/org/name``.

    Returns:
        The route; endpoint ``unknown`` when the path names nothing served.
    """
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
            return Route("model_info", url_path, repo_id, DEFAULT_REVISION)
        action, args = tail[0], [unquote(part) for part in tail[1:]]
        if action == "refs" and not args:
            return Route("refs", url_path, repo_id)
        if action in {"revision", "commits", "paths-info"} and args:
            endpoint = {"revision": "model_info", "paths-info": "paths_info"}.get(action, action)
            return Route(endpoint, url_path, repo_id, "/".join(args))
        if action == "tree" and args:
            return Route("tree", url_path, repo_id, args[0], "/".join(args[1:]))
        return Route("unknown", url_path, repo_id)
    for index in (2, 1):
        if len(segments) > index + 2 and segments[index] == "resolve":
            repo_id = "/".join(unquote(part) for part in segments[:index])
            revision = unquote(segments[index + 1])
            file = "/".join(unquote(part) for part in segments[index + 2 :])
            return Route("resolve", url_path, repo_id, revision, file)
    return Route("unknown", url_path)


def flag(query: Mapping[str, list[str]], name: str) -> bool:
    """Whether a boolean query (or form) parameter is set (``1``, ``true``, ``yes``).

    Args:
        query: Parsed parameters, as ``urllib.parse.parse_qs`` returns them.
        name: Parameter name; ``name[]`` is accepted too.

    Returns:
        The parameter's last value as a boolean, ``False`` when absent.
    """
    values = query.get(name) or query.get(f"{name}[]") or []
    return bool(values) and values[-1].lower() in {"1", "true", "yes"}


def int_param(query: Mapping[str, list[str]], name: str) -> int:
    """A non-negative integer query parameter (a pagination cursor), ``0`` when absent.

    Args:
        query: Parsed parameters, as ``urllib.parse.parse_qs`` returns them.
        name: Parameter name.

    Returns:
        The parameter's last value, clamped at ``0``.

    Raises:
        HttpError: 400 if the value is not an integer.
    """
    values = query.get(name) or ["0"]
    try:
        return max(0, int(values[-1]))
    except ValueError:
        raise HttpError(400, f"Invalid {name}: {values[-1]!r}.") from None


def parse_range(header: str | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """One byte range, clamped; ``None`` means serve it all (no, invalid or multiple ranges).

    Args:
        header: The ``Range`` header, if any.
        size: Size of the file in bytes.

    Returns:
        ``(first, last)`` byte offsets (inclusive), ``"unsatisfiable"`` for a 416, or ``None``.
    """
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
