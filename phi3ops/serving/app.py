"""The ASGI app behind `phi3ops serve`: MLflow's scoring server, a guard for chat requests, and
inference records.

``mlflow models serve --env-manager local`` runs ``uvicorn mlflow.pyfunc.scoring_server.app:app``
on a downloaded model. This module builds the very same app (``scoring_server.init``) and wraps
it, because the serving layer is the one place that sees every request of both flavors: the
transformers flavor's ``predict`` is MLflow's own code and happily generates from a prompt
longer than the model's context, so that check happens here, before the model runs. For the
same reason every request row is recorded here, as an MLflow trace (`phi3ops.serving.records`).
It also streams (``"stream": true``) as server-sent events, which the scoring server cannot.

One middleware, `ServingMiddleware`, does all of it for each ``/invocations`` request: read
within the body limit and parse once (`phi3ops.serving.request`) -> validate (row cap, context)
-> route (refuse, stream, or MLflow's app) while watching for the client leaving -> record
(`phi3ops.serving.records`, through the durable spool of `phi3ops.serving.spool`).

Run by uvicorn as ``phi3ops.serving.app:create_app`` (``--factory``); the model folder comes
from ``PHI3OPS_SERVE_MODEL_PATH``, the registered name and version that records are tagged with
from ``PHI3OPS_SERVE_MODEL_NAME`` / ``PHI3OPS_SERVE_MODEL_VERSION`` (set by `start_server`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from phi3ops.serving.onnx_chat_model import usable_context
from phi3ops.serving.records import (
    CANCELLED_STATUS,
    InferenceRecorder,
    completion_from_events,
    write_entries,
)
from phi3ops.serving.request import (
    ASGIApp,
    BodyTooLarge,
    ClientDisconnected,
    Message,
    ParsedRequest,
    Receive,
    Scope,
    Send,
    is_invocation,
    parse_json,
    read_request,
)
from phi3ops.serving.spool import RecordSpool
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking, tracking_uri

MODEL_PATH_ENV = "PHI3OPS_SERVE_MODEL_PATH"
MODEL_NAME_ENV = "PHI3OPS_SERVE_MODEL_NAME"
MODEL_VERSION_ENV = "PHI3OPS_SERVE_MODEL_VERSION"
SSE_CONTENT_TYPE = "text/event-stream"


class TransformersContextLimit:
    """Counts a chat request's prompt tokens with a transformers model's own tokenizer."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        config = json.loads((model_path / "model" / "config.json").read_text())
        self.context = int(config["max_position_embeddings"])
        mlmodel = _mlmodel(model_path)
        inference = mlmodel["flavors"]["transformers"].get("inference_config") or {}
        model_config = mlmodel["flavors"]["python_function"].get("config") or {}
        self.default_new_tokens = int(
            model_config.get("max_new_tokens") or inference.get("max_new_tokens") or 0
        )

    @cached_property
    def tokenizer(self) -> Any:
        """The served model's tokenizer, loaded on first use."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path / "components" / "tokenizer")

    def problem(self, request: Any) -> str | None:
        """Why ``request`` cannot fit the context, or None when it fits (or is not chat)."""
        messages = request.get("messages") if isinstance(request, dict) else None
        if not isinstance(messages, list):
            return None  # not a chat request: MLflow's schema check answers it
        for i, message in enumerate(messages):
            # MLflow's transformers predict fails with a 500 on these; they are the caller's.
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                return f"messages[{i}].content: each message needs a string 'content'."
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True
            )
        except Exception:
            return None  # e.g. an unknown role: left to the model's own validation
        # transformers 5 returns a BatchEncoding (a Mapping) where 4.x returned a list.
        prompt_tokens = len(ids["input_ids"] if isinstance(ids, Mapping) else ids)
        max_tokens = request.get("max_tokens")
        new_tokens = max_tokens if isinstance(max_tokens, int) else self.default_new_tokens
        if prompt_tokens >= self.context:
            return (
                f"messages: the prompt is {prompt_tokens} tokens but the model's context is "
                f"{self.context} tokens; shorten the conversation."
            )
        if prompt_tokens + new_tokens > self.context:
            return (
                f"max_tokens={new_tokens} does not fit: prompt uses {prompt_tokens} of "
                f"{self.context} tokens; lower max_tokens or shorten the conversation."
            )
        return None


class ServingMiddleware:
    """ASGI middleware around MLflow's scoring app for ``/invocations``: read the request once
    (within the body limit), validate it, route it (refuse, stream, or pass to MLflow's app),
    watch the client, and record it.

    - Limits: a body over ``max_body_bytes`` is refused with a 413 before it is parsed (by its
      ``content-length`` before a byte is read); a request of more than ``max_rows`` rows with
      a 413 before the model runs, recorded as one row.
    - Validate: with a ``limit`` (transformers flavor), a chat row that is malformed or cannot
      fit the context is refused with a 400 before the model runs.
    - Stream: a chat request with ``"stream": true`` is answered as OpenAI-style server-sent
      events (``data: <chat.completion.chunk>``..., ``data: [DONE]``) from the model's
      ``predict_stream``; MLflow's scoring server itself cannot stream. A model without
      ``predict_stream`` (MLflow's transformers flavor) or an invalid request gets a 400 before
      any event is sent.
    - Disconnects: a client that leaves is recorded as cancelled (status 499), whatever the
      route; a stream's generation stops at the next token and its thread is freed. A client
      that leaves while sending the body is recorded the same way, and nothing is routed.
    - Record: with a ``recorder``, every row is recorded exactly once, whichever route answered
      it, refusals too, before the client has the last byte of its answer; the latency is the
      whole call's, and a streamed answer's time to first token is when its first text was
      sent. On the app's lifespan shutdown the recorder stores what it holds before the
      process ends.

    Other paths and scopes (``/ping``) go to MLflow's app untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        model: Any,
        limit: TransformersContextLimit | None = None,
        recorder: InferenceRecorder | None = None,
        max_body_bytes: int = 2 * 1024**2,
        max_rows: int = 64,
    ) -> None:
        self.app = app
        self.model = model
        self.limit = limit
        self.recorder = recorder
        self.max_body_bytes = max_body_bytes
        self.max_rows = max_rows

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read once, validate, route, watch, record (other paths pass through untouched)."""
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._draining_at_shutdown(send))
            return
        if not is_invocation(scope):
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(send, self.recorder)
        try:
            try:
                request = await read_request(scope, receive, max_bytes=self.max_body_bytes)
            except BodyTooLarge as exc:
                exchange.reason = str(exc)
                await _send_json(
                    exchange.send, 413, {"error_code": "REQUEST_TOO_LARGE", "message": f"{exc}."}
                )
                return
            except ClientDisconnected:
                exchange.gone.set()
                return
            exchange.request = request
            watcher = asyncio.ensure_future(_watch_client(receive, exchange))
            try:
                await self._route(scope, request, exchange)
            finally:
                watcher.cancel()
        finally:  # an app that raised is recorded too, as a 500 unless it had answered
            exchange.record()

    def _draining_at_shutdown(self, send: Send) -> Send:
        """``send`` for the lifespan scope: store the spooled records before shutdown ends."""

        async def lifespan_send(message: Message) -> None:
            if self.recorder is not None and message["type"].startswith("lifespan.shutdown."):
                import anyio

                await anyio.to_thread.run_sync(self.recorder.close)
            await send(message)

        return lifespan_send

    async def _route(self, scope: Scope, request: ParsedRequest, exchange: _Exchange) -> None:
        """Validates ``request``, then refuses it, streams it or hands it to MLflow's app."""
        problem = self._problem(request)
        if problem:
            status, code, why = problem
            exchange.reason = why  # our own words: recorded even when prompts are not
            await _send_json(exchange.send, status, {"error_code": code, "message": why})
        elif request.wants_stream:
            await self._stream(request, exchange)
        else:
            await self.app(scope, request.replay(), exchange.send)

    def _problem(self, request: ParsedRequest) -> tuple[int, str, str] | None:
        """(status, error code, why) the request is refused with, or None. The why never quotes
        the request (it is recorded even when prompts are not). A body that is not JSON has no
        rows and goes on: MLflow's app answers it itself.
        """
        if len(request.rows) > self.max_rows:
            return (
                413,
                "REQUEST_TOO_LARGE",
                f"the request has {len(request.rows)} rows; the server takes at most "
                f"{self.max_rows} per request (PHI3OPS_SERVE_MAX_ROWS): split it.",
            )
        if self.limit is None:
            return None
        for row in request.rows:
            problem = self.limit.problem(row)
            if problem:
                return 400, "INVALID_PARAMETER_VALUE", problem
        return None

    async def _stream(self, request: ParsedRequest, exchange: _Exchange) -> None:
        import anyio
        from mlflow.exceptions import MlflowException

        chat = request.without_stream()
        send = exchange.send
        # A client that leaves sets ``gone``: the producer stops at the next token.
        chunks = _iterate_in_thread(lambda: self.model.predict_stream(chat), exchange.gone)
        # The first chunk before any header: the request is validated when iteration starts.
        kind, value = await anyio.to_thread.run_sync(chunks.get)
        if kind == "error":
            if not isinstance(value, MlflowException):
                raise value
            message = value.message
            if "predict_stream" in message:
                exchange.reason = "this model cannot stream; send the request without stream."
                message = f"This model cannot stream ({message}); send the request without stream."
            await _send_json(send, 400, {"error_code": value.error_code, "message": message})
            return
        headers = [(b"content-type", SSE_CONTENT_TYPE.encode()), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        while kind == "chunk":
            await _send_event(send, json.dumps(value))
            kind, value = await anyio.to_thread.run_sync(chunks.get)
        if kind == "cancelled":
            return  # the client is gone: nothing more to send, the row is recorded as such
        if kind == "error":  # headers are gone: the error can only be the last event
            await _send_event(send, json.dumps({"error": {"message": str(value)}}))
        await _send_event(send, "[DONE]", last=True)


class _Exchange:
    """One ``/invocations`` call: passes the response on to the client, keeps what was sent,
    and records the call's rows exactly once (`record`).
    """

    def __init__(self, send: Send, recorder: InferenceRecorder | None) -> None:
        self._send = send
        self._recorder = recorder
        self._clock = time.perf_counter()
        self.started = time.time()
        self.request: ParsedRequest | None = None
        self.status = 500  # stays so when the app raised before answering
        self.streamed = False
        self.complete = False  # the last byte of the answer was handed to the server
        self.gone = threading.Event()  # the client left before that
        self.reason: str | None = None  # the serving layer's own words for a refusal
        self.parts: list[tuple[float, bytes]] = []  # (seconds since the request came, body)
        self._recorded = False

    async def send(self, message: Message) -> None:
        """Passes ``message`` on; the records are spooled before the answer's last byte."""
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            self.streamed = content_type.split(b";")[0] == SSE_CONTENT_TYPE.encode()
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            self.parts.append((time.perf_counter() - self._clock, message.get("body", b"")))
            self.record()  # spooled before the client has its answer
            self.complete = True
            await self._send(message)
            return
        await self._send(message)
        if message["type"] == "http.response.body":  # timed once the client has it
            self.parts.append((time.perf_counter() - self._clock, message.get("body", b"")))

    def record(self) -> None:
        """Spools the records of every row of the call, once; a client that left makes them
        cancelled (499).
        """
        if self._recorded or self._recorder is None:
            return
        self._recorded = True
        latency = time.perf_counter() - self._clock
        request = self.request
        status, answer, ttft = self.status, None, None
        if self.gone.is_set():
            status, self.reason = CANCELLED_STATUS, "cancelled: the client disconnected"
        elif self.streamed:
            answer, ttft = completion_from_events(self.parts)
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
        )


async def _watch_client(receive: Receive, exchange: _Exchange) -> None:
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


async def _send_event(send: Send, data: str, *, last: bool = False) -> None:
    """One server-sent event, ``data: <data>``."""
    body = f"data: {data}\n\n".encode()
    await send({"type": "http.response.body", "body": body, "more_body": not last})


def _iterate_in_thread(start: Callable[[], Any], stop: threading.Event) -> queue.Queue:
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


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def build_app(model_path: Path, *, recorder: InferenceRecorder | None = None) -> Any:
    """MLflow's scoring app for the model at ``model_path``, guarded, recording when given one.

    Args:
        model_path: A downloaded MLflow model folder (either flavor).
        recorder: Where each request row is recorded; None records nothing.

    Returns:
        The ASGI app: MLflow's scoring app wrapped in `ServingMiddleware`.
    """
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(str(model_path))
    app = scoring_server.init(model)
    is_transformers = "transformers" in _mlmodel(model_path).get("flavors", {})
    limit = TransformersContextLimit(model_path) if is_transformers else None
    settings = get_settings()
    app.add_middleware(
        ServingMiddleware,
        model=model,
        limit=limit,
        recorder=recorder,
        max_body_bytes=settings.serve_max_body_bytes,
        max_rows=settings.serve_max_rows,
    )
    return app


def recorder_for(model_path: Path, *, model_name: str, model_version: str) -> InferenceRecorder:
    """A recorder writing to the inference experiment of the project's tracking store, through
    this process's spool under ``<data dir>/serving/spool`` (started here: it first stores any
    records a killed server left behind).
    """
    settings = get_settings()
    experiment_id = configure_tracking(settings.inference_experiment_name)
    uri = tracking_uri()
    spool = RecordSpool(
        settings.data_dir / "serving" / "spool",
        functools.partial(write_entries, tracking_uri=uri),
    )
    return InferenceRecorder(
        model_name=model_name,
        model_version=model_version,
        experiment_id=experiment_id,
        record_prompts=settings.record_prompts,
        context_tokens=context_tokens(model_path),
        spool=spool.start(),
    )


def create_app() -> Any:
    """The app for ``$PHI3OPS_SERVE_MODEL_PATH``; it records when the served version is known."""
    model_path = Path(os.environ[MODEL_PATH_ENV])
    name, version = os.environ.get(MODEL_NAME_ENV), os.environ.get(MODEL_VERSION_ENV)
    recorder = (
        recorder_for(model_path, model_name=name, model_version=version)
        if name and version
        else None
    )
    return build_app(model_path, recorder=recorder)


def context_tokens(model_path: Path) -> int | None:
    """The served model's context window (prompt plus answer), for either flavor."""
    flavors = _mlmodel(model_path).get("flavors", {})
    if "transformers" in flavors:
        return TransformersContextLimit(model_path).context
    for config in model_path.rglob("genai_config.json"):
        return usable_context(json.loads(config.read_text())["model"])
    return None


def _mlmodel(model_path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((model_path / "MLmodel").read_text())
