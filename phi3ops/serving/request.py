"""One ``/invocations`` request, read and parsed once for the whole serving layer.

The guard, the streamer and the recorder of `phi3ops.serving.app` all need the request's JSON
and its rows, and MLflow's scoring app needs the body itself. `read_request` reads the ASGI body
once and returns a `ParsedRequest` with both: the parsed view for the serving layer, and the
received messages, which `ParsedRequest.replay` hands to MLflow's app as if unread.

Reading stops early, before anything is parsed, when the body is larger than the server takes
(`BodyTooLarge`: by its ``content-length`` before a byte is read, else as soon as it grows past
the limit) or when the client leaves while sending it (`ClientDisconnected`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from phi3ops.serving.json_bounds import parse_request_json
from phi3ops.serving.records import request_rows

INVOCATIONS_PATH = "/invocations"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body is larger than the server reads."""

    def __init__(self, size: int | None, limit: int) -> None:
        self.size = size
        self.limit = limit
        what = f"is {size} bytes" if size is not None else f"is over {limit} bytes"
        super().__init__(
            f"the request body {what}; the server takes at most {limit} bytes "
            f"(PHI3OPS_SERVE_MAX_BODY_BYTES)"
        )


class ClientDisconnected(Exception):
    """The client went away before the whole request body arrived."""


@dataclass(frozen=True)
class ParsedRequest:
    """An ``/invocations`` request as read once: its raw body and what that parses to.

    Attributes:
        path: The request path.
        method: The HTTP method.
        body: The raw body.
        payload: The parsed JSON body; None when the body is empty or not JSON.
        error: Why the body is not JSON, or None. MLflow's app answers such a body itself.
        rows: The request rows of ``payload`` (`request_rows`); empty when it has none.
        messages: The ASGI messages the body came in, for `replay`.
    """

    path: str
    method: str
    body: bytes
    payload: Any
    error: str | None
    rows: list[Any]
    messages: tuple[Message, ...]

    @property
    def wants_stream(self) -> bool:
        """Whether this is a chat request with ``"stream": true``."""
        payload = self.payload
        return isinstance(payload, dict) and "messages" in payload and bool(payload.get("stream"))

    def without_stream(self) -> dict[str, Any]:
        """The chat request without its ``stream`` key, as ``predict_stream`` takes it."""
        return {k: v for k, v in self.payload.items() if k != "stream"}

    def replay(self) -> Receive:
        """An ASGI ``receive`` that gives the already-read body again.

        Returns:
            A callable returning the received messages in order, then ``http.disconnect``.
        """
        pending = list(self.messages)

        async def receive() -> Message:
            return pending.pop(0) if pending else {"type": "http.disconnect"}

        return receive


def is_invocation(scope: Scope) -> bool:
    """Whether ``scope`` is an HTTP request to MLflow's ``/invocations`` (the only one parsed)."""
    return scope["type"] == "http" and scope["path"] == INVOCATIONS_PATH


async def read_request(scope: Scope, receive: Receive, *, max_bytes: int) -> ParsedRequest:
    """Reads the whole body of a request and parses it.

    Args:
        scope: The request's ASGI scope.
        receive: The request's ASGI ``receive``; it is drained here, so use `replay` after.
        max_bytes: The largest body read.

    Returns:
        The request, parsed; a body that is not JSON gives ``payload=None`` and ``error``.

    Raises:
        BodyTooLarge: The body is over ``max_bytes`` (by its declared length, or as read);
            nothing more is read.
        ClientDisconnected: The client left before the body was complete.
        BodyRefused: The body nests too deep, holds too many values, or holds ``NaN`` /
            ``Infinity`` (`phi3ops.serving.json_bounds`); it is not parsed.
    """
    declared = _content_length(scope)
    if declared is not None and declared > max_bytes:
        raise BodyTooLarge(declared, max_bytes)
    messages, chunks, size = [], [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending the request")
        messages.append(message)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(None, max_bytes)
        chunks.append(chunk)
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    body = b"".join(chunks)
    payload, error = parse_request_json(body)
    return ParsedRequest(
        path=scope["path"],
        method=scope.get("method", ""),
        body=body,
        payload=payload,
        error=error,
        rows=request_rows(payload),
        messages=tuple(messages),
    )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def parse_json(data: bytes) -> tuple[Any, str | None]:
    """``(value, None)`` for JSON ``data``, ``(None, why)`` otherwise; empty data is ``None``.

    Args:
        data: A request or response body.

    Returns:
        The parsed value and the parse error, one of them None.
    """
    if not data:
        return None, None
    try:
        return json.loads(data), None
    except ValueError as exc:  # UnicodeDecodeError included
        return None, str(exc)
