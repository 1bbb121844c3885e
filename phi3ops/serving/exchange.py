"""One HTTP call through the serving layer, from its first byte to its record.

`Exchange` passes a route's answer on to the client, keeps what was sent, and records the
call's rows exactly once; `watch_client` notices a client that leaves; `iterate_in_thread`
runs a model's stream in one thread that stops at the next token once asked to; the rest
writes JSON answers and server-sent events. Every route of `phi3ops.serving.app` (MLflow's
``/invocations`` and the OpenAI-compatible ``/v1`` routes) answers through these, so each
gets the same guarantees: a record per row whatever happened, ``Retry-After`` on every 429 /
503, and a freed slot when the client leaves.

``Retry-After`` is the model's own prediction where it made one: admission's refusal carries the
predicted wait as a field (`phi3_chat.admission.RETRY_AFTER_FIELD`), which arrives here either
in the exception of a stream (`stream_refusal`), set on the exchange by the route that read
MLflow's error body (`Exchange.retry_after_s`), or in the JSON body of the 429 itself (a held
``http.response.start`` waits for its body); otherwise `RETRY_AFTER_S`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from phi3_chat.admission import retry_after_of
from phi3ops.serving.records import (
    CANCELLED_STATUS,
    SHED_STATUSES,
    InferenceRecorder,
    completion_from_events,
)
from phi3ops.serving.request import Message, ParsedRequest, Receive, Send, parse_json

SSE_CONTENT_TYPE = "text/event-stream"
#: Seconds a client told to come back (429 / 503) waits first, when the model predicted nothing.
RETRY_AFTER_S = 1
#: The status of a request the server stopped waiting for (``--timeout``).
TIMEOUT_STATUS = 504


class Exchange:
    """One call: passes the response on to the client, keeps what was sent, and records the
    call's rows exactly once (`record`).

    Args:
        send: The server's ASGI ``send``.
        recorder: Where the call's rows are recorded; None records nothing.
        timeout_s: The server's request timeout, named in the record of a call that hit it.
        arm: The alias whose model answers (``champion`` / ``candidate``), for the records.
        shadow: The call is a shadow copy: its answer goes nowhere but the records.
    """

    def __init__(
        self,
        send: Send,
        recorder: InferenceRecorder | None,
        *,
        timeout_s: float | None = None,
        arm: str = "champion",
        shadow: bool = False,
    ) -> None:
        self._send = send
        self._recorder = recorder
        self.arm = arm
        self.shadow = shadow
        self._timeout_s = timeout_s
        self._clock = time.perf_counter()
        self.started = time.time()
        self.request: ParsedRequest | None = None
        self.status = 500  # stays so when the app raised before answering
        self.streamed = False
        self.complete = False  # the last byte of the answer was handed to the server
        self.gone = threading.Event()  # the client left before that (or the server gave up)
        self.timed_out = False  # the server stopped waiting for the answer (recorded as 504)
        self.reason: str | None = None  # the serving layer's own words for a refusal
        self.usage: dict[str, Any] | None = None  # a stream's usage, when not sent
        self.retry_after_s: int | None = None  # the model's predicted wait, for a 429 / 503
        self._held: Message | None = None  # a 429 / 503 start, until its body says the wait
        self.parts: list[tuple[float, bytes]] = []  # (seconds since the request came, body)
        self._recorded = False

    def elapsed(self) -> float:
        """Seconds since the request came."""
        return time.perf_counter() - self._clock

    async def send(self, message: Message) -> None:
        """Passes ``message`` on; the records are spooled before the answer's last byte.
        A 429 or 503 gets a ``Retry-After`` header if it has none: the model's predicted wait
        (`retry_after_s`, else the field in the error body), else `RETRY_AFTER_S`.
        """
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            headers = list(message.get("headers", []))
            names = {bytes(name).lower() for name, _ in headers}
            content_type = dict(headers).get(b"content-type", b"")
            self.streamed = content_type.split(b";")[0] == SSE_CONTENT_TYPE.encode()
            if self.status == TIMEOUT_STATUS and self.reason is None:
                self.reason = self.timeout_reason()
            if self.status in SHED_STATUSES and b"retry-after" not in names:
                self._held = message  # sent with its body, which may say how long to wait
                return
        elif message["type"] == "http.response.body" and self._held is not None:
            await self._send_held(message.get("body", b""))
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.parts.append((self.elapsed(), message.get("body", b"")))
            self.record()  # spooled before the client has its answer
            self.complete = True
            await self._send(message)
            return
        await self._send(message)
        if message["type"] == "http.response.body":  # timed once the client has it
            self.parts.append((self.elapsed(), message.get("body", b"")))

    async def _send_held(self, body: bytes) -> None:
        """Sends the held 429 / 503 start with its ``Retry-After``."""
        held, self._held = self._held, None
        assert held is not None
        wait = self.retry_after_s
        if wait is None:
            answer, _ = parse_json(body)
            wait = retry_after_of(answer)
        headers = [*held.get("headers", []), (b"retry-after", str(wait or RETRY_AFTER_S).encode())]
        await self._send({**held, "headers": headers})

    def timeout_reason(self) -> str:
        """The recorded reason of a call the server stopped waiting for."""
        limit = f" of {self._timeout_s:g} s" if self._timeout_s else ""
        return f"cancelled: no answer within the server's request timeout{limit}"

    def record(self) -> None:
        """Spools the records of every row of the call, once; a client that left makes them
        cancelled (499), a call the server gave up on timed out (504).
        """
        if self._recorded or self._recorder is None:
            return
        self._recorded = True
        latency = self.elapsed()
        request = self.request
        status, answer, ttft = self.status, None, None
        if self.timed_out:
            status, self.reason = TIMEOUT_STATUS, self.timeout_reason()
        elif self.gone.is_set():
            status, self.reason = CANCELLED_STATUS, "cancelled: the client disconnected"
        elif self.streamed:
            answer, ttft = completion_from_events(self.parts)
            if answer is not None and not answer.get("usage") and self.usage:
                answer["usage"] = self.usage
        else:
            answer, _ = parse_json(b"".join(data for _, data in self.parts))
        rows = None if request is None else request.rows
        if status == 413 or rows is None:
            rows = [None if request is None else request.payload]  # one record, not thousands
        self._recorder.record_exchange(
            None if request is None else request.payload,
            rows=rows,
            status_code=status,
            body=answer,
            started=self.started,
            latency_s=latency,
            ttft_s=ttft,
            reason=self.reason,
            arm=self.arm,
            shadow=self.shadow,
        )


async def watch_client(receive: Receive, exchange: Exchange) -> None:
    """Sets ``exchange.gone`` if the client disconnects before its answer is complete (the
    server's ``receive`` gives ``http.disconnect`` then, or once the answer is complete).
    """
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not exchange.complete:
                    exchange.gone.set()
                return
    except Exception:  # the server has nothing more to say about this client
        return


async def send_event(send: Send, data: str, *, last: bool = False) -> None:
    """One server-sent event, ``data: <data>``."""
    body = f"data: {data}\n\n".encode()
    await send({"type": "http.response.body", "body": body, "more_body": not last})


async def start_events(send: Send) -> None:
    """The headers of a server-sent event stream (status 200)."""
    headers = [(b"content-type", SSE_CONTENT_TYPE.encode()), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})


def iterate_in_thread(start: Callable[[], Any], stop: threading.Event) -> queue.Queue:
    """Runs ``start()`` and iterates what it returns in one thread of its own, putting
    ("chunk", item)..., then ("end", None), ("error", exception) or, once ``stop`` is set,
    ("cancelled", None) on the returned queue.

    One thread for the whole iteration: MLflow's ``predict_stream`` generator sets a context
    variable around each step, which fails when the steps run in different threads' contexts.
    When ``stop`` is set the iteration ends at the next item and the iterator is closed, which
    ends the model's generation (its generator's cleanup runs) and frees the thread.
    """
    chunks: queue.Queue = queue.Queue()

    def produce() -> None:
        iterator: Any = None
        try:
            iterator = iter(start())
            for item in iterator:
                if stop.is_set():
                    chunks.put(("cancelled", None))
                    return
                chunks.put(("chunk", item))
            chunks.put(("end", None))
        except Exception as exc:
            chunks.put(("error", exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    threading.Thread(target=produce, name="phi3ops-stream", daemon=True).start()
    return chunks


async def next_chunk(chunks: queue.Queue, exchange: Exchange, deadline: float | None) -> tuple:
    """The next ``(kind, value)`` of `iterate_in_thread`'s queue, or ``("timeout", None)`` once
    the call has run ``deadline`` seconds (the producer is then told to stop at its next item).
    """
    import anyio

    wait = None if deadline is None else max(deadline - exchange.elapsed(), 0.0)
    try:
        return await anyio.to_thread.run_sync(chunks.get, True, wait)
    except queue.Empty:
        exchange.timed_out = True
        exchange.gone.set()  # the producer stops at its next token
        return "timeout", None


def stream_refusal(kind: str, value: Any, exchange: Exchange) -> tuple[int, str, str] | None:
    """Why a stream is answered with an error instead of events, from its first `next_chunk`:
    (status, error code, message) for a timeout or a model error, None for a chunk (or the end).
    A model that cannot stream (MLflow's transformers pyfunc) is the caller's 400.

    Raises:
        Exception: ``value``, when it is an error that is not MLflow's (the app answers 500).
    """
    if kind == "timeout":
        return TIMEOUT_STATUS, "DEADLINE_EXCEEDED", f"{exchange.timeout_reason()}; try again"
    if kind != "error":
        return None
    from mlflow.exceptions import MlflowException

    if not isinstance(value, MlflowException):
        raise value
    if "predict_stream" in value.message:
        exchange.reason = "this model cannot stream; send the request without stream"
        return 400, "BAD_REQUEST", exchange.reason
    exchange.retry_after_s = retry_after_of(value)
    return value.get_http_status_code(), value.error_code, value.message


async def send_json(
    send: Send, status: int, body: Any, *, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A whole JSON answer."""
    data = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": data})
