"""The ASGI app behind `phi3ops serve`: MLflow's scoring server, a guard for chat requests, and
inference records.

``mlflow models serve --env-manager local`` runs ``uvicorn mlflow.pyfunc.scoring_server.app:app``
on a downloaded model. This module builds the very same app (``scoring_server.init``) and wraps
it, because the serving layer is the one place that sees every request of both flavors: the
transformers flavor's ``predict`` is MLflow's own code and happily generates from a prompt
longer than the model's context, so that check happens here, before the model runs. For the
same reason every request row is recorded here, as an MLflow trace (`phi3ops.serving.records`).
It also streams (``"stream": true``) as server-sent events, which the scoring server cannot.

One middleware, `ServingMiddleware`, does all of it for each ``/invocations`` request: parse
once (`phi3ops.serving.request`) -> validate -> route (refuse, stream, or MLflow's app) ->
record.

Run by uvicorn as ``phi3ops.serving.app:create_app`` (``--factory``); the model folder comes
from ``PHI3OPS_SERVE_MODEL_PATH``, the registered name and version that records are tagged with
from ``PHI3OPS_SERVE_MODEL_NAME`` / ``PHI3OPS_SERVE_MODEL_VERSION`` (set by `start_server`).
"""

from __future__ import annotations

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
from phi3ops.serving.records import InferenceRecorder, completion_from_events
from phi3ops.serving.request import (
    ASGIApp,
    Message,
    ParsedRequest,
    Receive,
    Scope,
    Send,
    is_invocation,
    parse_json,
    read_request,
)
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking

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
    """ASGI middleware around MLflow's scoring app for ``/invocations``: parse the request once,
    validate it, route it (refuse with a 400, stream, or pass to MLflow's app) and record it.

    - Validate: with a ``limit`` (transformers flavor), a chat row that is malformed or cannot
      fit the context is refused with a 400 before the model runs.
    - Stream: a chat request with ``"stream": true`` is answered as OpenAI-style server-sent
      events (``data: <chat.completion.chunk>``..., ``data: [DONE]``) from the model's
      ``predict_stream``; MLflow's scoring server itself cannot stream. A model without
      ``predict_stream`` (MLflow's transformers flavor) or an invalid request gets a 400 before
      any event is sent.
    - Record: with a ``recorder``, every row is recorded as a trace, whichever route answered
      it, refusals too; the latency is the whole call's, and a streamed answer's time to first
      token is when its first text reached the client.

    Other paths and scopes (``/ping``, lifespan) go to MLflow's app untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        model: Any,
        limit: TransformersContextLimit | None = None,
        recorder: InferenceRecorder | None = None,
    ) -> None:
        self.app = app
        self.model = model
        self.limit = limit
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Parse once, validate, route, record (other paths pass through untouched)."""
        if not is_invocation(scope):
            await self.app(scope, receive, send)
            return
        started, clock = time.time(), time.perf_counter()
        request = await read_request(scope, receive)  # the only read and parse of the body
        if self.recorder is None:
            await self._route(scope, request, send)
            return
        response = _SentResponse(send, clock)
        try:
            await self._route(scope, request, response.send)
        finally:  # an app that raised is recorded too, as a 500 unless it had answered
            latency = time.perf_counter() - clock
            await _record(self.recorder, request, response, started=started, latency_s=latency)

    async def _route(self, scope: Scope, request: ParsedRequest, send: Send) -> None:
        """Validates ``request``, then refuses it, streams it or hands it to MLflow's app."""
        problem = self._problem(request)
        if problem:
            await _send_json(
                send, 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": problem}
            )
        elif request.wants_stream:
            await self._stream(request, send)
        else:
            await self.app(scope, request.replay(), send)

    def _problem(self, request: ParsedRequest) -> str | None:
        """Why the request is refused (its first bad row's reason), or None. A body that is not
        JSON has no rows and goes on: MLflow's app answers it itself.
        """
        if self.limit is None:
            return None
        for row in request.rows:
            problem = self.limit.problem(row)
            if problem:
                return problem
        return None

    async def _stream(self, request: ParsedRequest, send: Send) -> None:
        import anyio
        from mlflow.exceptions import MlflowException

        chat = request.without_stream()
        chunks = _iterate_in_thread(lambda: self.model.predict_stream(chat))
        # The first chunk before any header: the request is validated when iteration starts.
        kind, value = await anyio.to_thread.run_sync(chunks.get)
        if kind == "error":
            if not isinstance(value, MlflowException):
                raise value
            message = value.message
            if "predict_stream" in message:
                message = f"This model cannot stream ({message}); send the request without stream."
            await _send_json(send, 400, {"error_code": value.error_code, "message": message})
            return
        headers = [(b"content-type", SSE_CONTENT_TYPE.encode()), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        while kind == "chunk":
            await _send_event(send, json.dumps(value))
            kind, value = await anyio.to_thread.run_sync(chunks.get)
        if kind == "error":  # headers are gone: the error can only be the last event
            await _send_event(send, json.dumps({"error": {"message": str(value)}}))
        await _send_event(send, "[DONE]", last=True)


class _SentResponse:
    """Passes a response on to the client and keeps what was sent, for the record."""

    def __init__(self, send: Send, clock: float) -> None:
        self._send = send
        self._clock = clock
        self.status = 500  # stays so when the app raised before answering
        self.streamed = False
        self.parts: list[tuple[float, bytes]] = []  # (seconds since the request came, body)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            self.streamed = content_type.split(b";")[0] == SSE_CONTENT_TYPE.encode()
        await self._send(message)
        if message["type"] == "http.response.body":  # timed once the client has it
            self.parts.append((time.perf_counter() - self._clock, message.get("body", b"")))

    def answer(self) -> tuple[Any, float | None]:
        """The answer sent (a streamed one added up to a chat completion) and its TTFT."""
        if self.streamed:
            return completion_from_events(self.parts)
        answer, _ = parse_json(b"".join(data for _, data in self.parts))
        return answer, None


async def _record(
    recorder: InferenceRecorder,
    request: ParsedRequest,
    response: _SentResponse,
    *,
    started: float,
    latency_s: float,
) -> None:
    """Records every row of ``request`` with the ``response`` it got."""
    import anyio

    answer, ttft = response.answer()
    # Writing to the tracking store blocks: off the event loop.
    await anyio.to_thread.run_sync(
        lambda: recorder.record_exchange(
            request.payload,
            rows=request.rows,
            status_code=response.status,
            body=answer,
            started=started,
            latency_s=latency_s,
            ttft_s=ttft,
        )
    )


async def _send_event(send: Send, data: str, *, last: bool = False) -> None:
    """One server-sent event, ``data: <data>``."""
    body = f"data: {data}\n\n".encode()
    await send({"type": "http.response.body", "body": body, "more_body": not last})


def _iterate_in_thread(start: Callable[[], Any]) -> queue.Queue:
    """Runs ``start()`` and iterates what it returns in one thread of its own, putting
    ("chunk", item)..., then ("end", None) or ("error", exception) on the returned queue.

    One thread for the whole iteration: MLflow's ``predict_stream`` generator sets a context
    variable around each step, which fails when the steps run in different threads' contexts.
    """
    chunks: queue.Queue = queue.Queue()

    def produce() -> None:
        try:
            for item in start():
                chunks.put(("chunk", item))
            chunks.put(("end", None))
        except Exception as exc:
            chunks.put(("error", exc))

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
    app.add_middleware(ServingMiddleware, model=model, limit=limit, recorder=recorder)
    return app


def recorder_for(model_path: Path, *, model_name: str, model_version: str) -> InferenceRecorder:
    """A recorder writing to the inference experiment of the project's tracking store."""
    settings = get_settings()
    return InferenceRecorder(
        model_name=model_name,
        model_version=model_version,
        experiment_id=configure_tracking(settings.inference_experiment_name),
        record_prompts=settings.record_prompts,
        context_tokens=context_tokens(model_path),
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
