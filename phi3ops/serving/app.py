"""The ASGI app behind `phi3ops serve`: MLflow's scoring server, a guard for chat requests,
OpenAI-compatible routes, and inference records.

``mlflow models serve --env-manager local`` runs ``uvicorn mlflow.pyfunc.scoring_server.app:app``
on a downloaded model. This module builds the very same app (``scoring_server.init``) and wraps
it, because the serving layer is the one place that sees every request of both flavors: the
transformers flavor's ``predict`` is MLflow's own code and happily generates from a prompt
longer than the model's context, so that check happens here, before the model runs. For the
same reason every request row is recorded here, as an MLflow trace (`phi3ops.serving.records`).
It also streams (``"stream": true``) as server-sent events, which the scoring server cannot,
and answers OpenAI's ``/v1/chat/completions`` and ``/v1/models`` (`phi3ops.serving.openai_routes`).

One middleware, `ServingMiddleware`, does all of it for each ``/invocations`` and
``/v1/chat/completions`` request: read within the body limit and parse once
(`phi3ops.serving.request`) -> validate (row cap, the ONNX pyfunc's validators for both flavors
(`phi3ops.serving.validate`), context) -> route (refuse, stream, or MLflow's app) while watching
for the client leaving -> record (`phi3ops.serving.exchange`, `phi3ops.serving.records`, through
the durable spool of `phi3ops.serving.spool`).

Run by uvicorn as ``phi3ops.serving.app:create_app`` (``--factory``); the model folder comes
from ``PHI3OPS_SERVE_MODEL_PATH``, the registered name and version that records are tagged with
from ``PHI3OPS_SERVE_MODEL_NAME`` / ``PHI3OPS_SERVE_MODEL_VERSION``, the URI it was asked for from
``PHI3OPS_SERVE_MODEL_URI`` (all set by `start_server`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from phi3ops.serving.exchange import (
    Exchange,
    iterate_in_thread,
    next_chunk,
    send_event,
    send_json,
    start_events,
    watch_client,
)
from phi3ops.serving.onnx_chat_model import usable_context
from phi3ops.serving.openai_routes import (
    CHAT_COMPLETIONS_PATH,
    MODELS_PATH,
    ChatCompletions,
    ServedModel,
    error_body,
)
from phi3ops.serving.records import InferenceRecorder, write_entries
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
    read_request,
)
from phi3ops.serving.spool import RecordSpool
from phi3ops.serving.validate import chat_problem, quiet_reason
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking, tracking_uri

MODEL_PATH_ENV = "PHI3OPS_SERVE_MODEL_PATH"
MODEL_NAME_ENV = "PHI3OPS_SERVE_MODEL_NAME"
MODEL_VERSION_ENV = "PHI3OPS_SERVE_MODEL_VERSION"
MODEL_URI_ENV = "PHI3OPS_SERVE_MODEL_URI"


class TransformersContextLimit:
    """Counts a chat request's prompt tokens with a transformers model's own tokenizer."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        config = json.loads((model_path / "model" / "config.json").read_text())
        self.context = int(config["max_position_embeddings"])
        mlmodel = read_mlmodel(model_path)
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
    """ASGI middleware around MLflow's scoring app for ``/invocations`` and the OpenAI-compatible
    ``/v1`` routes: read the request once (within the body limit), validate it, route it
    (refuse, stream, or pass to MLflow's app), watch the client, and record it.

    - Limits: a body over ``max_body_bytes`` is refused with a 413 before it is parsed (by its
      ``content-length`` before a byte is read); a request of more than ``max_rows`` rows with
      a 413 before the model runs, recorded as one row.
    - Validate: every chat row, whatever the flavor, is checked by the ONNX pyfunc's own
      validators (`phi3ops.serving.validate`) and refused with its 400 and message before the
      model runs; with a ``limit`` (transformers flavor), a row that cannot fit the context too.
    - Stream: a chat request with ``"stream": true`` is answered as OpenAI-style server-sent
      events (``data: <chat.completion.chunk>``..., ``data: [DONE]``) from the model's
      ``predict_stream``; MLflow's scoring server itself cannot stream. A model without
      ``predict_stream`` (MLflow's transformers flavor) or an invalid request gets a 400 before
      any event is sent; a model error its MLflow status (RESOURCE_EXHAUSTED: 429).
    - OpenAI: ``POST /v1/chat/completions`` and ``GET /v1/models``
      (`phi3ops.serving.openai_routes`), answered by the same model, validator and records.
    - Time: a stream with no answer within ``timeout_s`` is cut off and recorded as a 504
      (MLflow's app times the other requests itself, with the same limit); every 429 / 503
      carries ``Retry-After``.
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
        served: ServedModel | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.model = model
        self.limit = limit
        self.recorder = recorder
        self.max_body_bytes = max_body_bytes
        self.max_rows = max_rows
        self.served = served or ServedModel.of(name=None, version=None, uri=None)
        self.timeout_s = timeout_s
        self.chat = ChatCompletions(
            app, model=model, served=self.served, problem=self._problem, timeout_s=timeout_s
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read once, validate, route, watch, record (other paths pass through untouched)."""
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._draining_at_shutdown(send))
            return
        path = scope.get("path", "") if scope["type"] == "http" else ""
        openai = path == CHAT_COMPLETIONS_PATH
        if path == MODELS_PATH or path.startswith(f"{MODELS_PATH}/"):
            await self._models(scope, send)
            return
        if path.startswith("/v1/") and not openai:
            message = f"{path[:200]} is not a route of this server: use {CHAT_COMPLETIONS_PATH}"
            await send_json(send, 404, error_body(404, message, code="ENDPOINT_NOT_FOUND"))
            return
        if not (openai or is_invocation(scope)):
            await self.app(scope, receive, send)
            return
        exchange = Exchange(send, self.recorder, timeout_s=self.timeout_s)
        try:
            try:
                request = await read_request(scope, receive, max_bytes=self.max_body_bytes)
            except BodyTooLarge as exc:
                exchange.reason = str(exc)
                if openai:
                    await self.chat.refuse(exchange, 413, "REQUEST_TOO_LARGE", f"{exc}.")
                else:
                    body = {"error_code": "REQUEST_TOO_LARGE", "message": f"{exc}."}
                    await send_json(exchange.send, 413, body)
                return
            except ClientDisconnected:
                exchange.gone.set()
                return
            exchange.request = request
            watcher = asyncio.ensure_future(watch_client(receive, exchange))
            try:
                if openai:
                    await self.chat(scope, request, exchange)
                else:
                    await self._route(scope, request, exchange)
            finally:
                watcher.cancel()
        finally:  # an app that raised is recorded too, as a 500 unless it had answered
            exchange.record()

    async def _models(self, scope: Scope, send: Send) -> None:
        """``GET /v1/models`` and ``GET /v1/models/<id>`` (not recorded: no inference)."""
        wanted = scope["path"].removeprefix(MODELS_PATH).removeprefix("/")
        if not wanted:
            await send_json(send, 200, self.served.listing())
        elif wanted in self.served.names:
            await send_json(send, 200, self.served.card())
        else:
            message = f"model {wanted[:200]!r} is not served here; this server serves " + (
                f"{self.served.id!r}"
            )
            await send_json(send, 404, error_body(404, message, code="RESOURCE_DOES_NOT_EXIST"))

    def _draining_at_shutdown(self, send: Send) -> Send:
        """``send`` for the lifespan scope: store the spooled records before shutdown ends."""

        async def lifespan_send(message: Message) -> None:
            if self.recorder is not None and message["type"].startswith("lifespan.shutdown."):
                import anyio

                await anyio.to_thread.run_sync(self.recorder.close)
            await send(message)

        return lifespan_send

    async def _route(self, scope: Scope, request: ParsedRequest, exchange: Exchange) -> None:
        """Validates ``request``, then refuses it, streams it or hands it to MLflow's app."""
        problem = self._problem(request.payload, request.rows)
        if problem:
            status, code, why = problem
            exchange.reason = quiet_reason(why)  # recorded even when prompts are not
            await send_json(exchange.send, status, {"error_code": code, "message": why})
        elif request.wants_stream:
            await self._stream(request, exchange)
        else:
            await self.app(scope, request.replay(), exchange.send)

    def _problem(self, payload: Any, rows: list[Any]) -> tuple[int, str, str] | None:
        """(status, error code, why) the request is refused with, or None. A body that is not
        JSON has no rows and goes on: MLflow's app answers it itself.
        """
        if len(rows) > self.max_rows:
            return (
                413,
                "REQUEST_TOO_LARGE",
                f"the request has {len(rows)} rows; the server takes at most "
                f"{self.max_rows} per request (PHI3OPS_SERVE_MAX_ROWS): split it.",
            )
        problem = chat_problem(payload, rows)
        if problem:
            return 400, "INVALID_PARAMETER_VALUE", problem
        if self.limit is None:
            return None
        for row in rows:
            problem = self.limit.problem(row)
            if problem:
                return 400, "INVALID_PARAMETER_VALUE", problem
        return None

    async def _stream(self, request: ParsedRequest, exchange: Exchange) -> None:
        from mlflow.exceptions import MlflowException

        chat = request.without_stream()
        send = exchange.send
        # A client that leaves sets ``gone``: the producer stops at the next token.
        chunks = iterate_in_thread(lambda: self.model.predict_stream(chat), exchange.gone)
        # The first chunk before any header: the request is validated when iteration starts.
        kind, value = await next_chunk(chunks, exchange, self.timeout_s)
        if kind == "timeout":
            message = f"{exchange.timeout_reason()}; try again"
            await send_json(send, 504, {"error_code": "DEADLINE_EXCEEDED", "message": message})
            return
        if kind == "error":
            if not isinstance(value, MlflowException):
                raise value
            status, code, message = value.get_http_status_code(), value.error_code, value.message
            if "predict_stream" in message:
                status, code = 400, "BAD_REQUEST"
                exchange.reason = "this model cannot stream; send the request without stream."
                message = f"This model cannot stream ({message}); send the request without stream."
            await send_json(send, status, {"error_code": code, "message": message})
            return
        await start_events(send)
        while kind == "chunk":
            await send_event(send, json.dumps(value))
            kind, value = await next_chunk(chunks, exchange, self.timeout_s)
        if kind == "cancelled":
            return  # the client is gone: nothing more to send, the row is recorded as such
        if kind == "timeout":
            why = f"{exchange.timeout_reason()}; the answer is cut short"
            await send_event(send, json.dumps({"error": {"message": why}}))
        elif kind == "error":  # headers are gone: the error can only be the last event
            await send_event(send, json.dumps({"error": {"message": str(value)}}))
        await send_event(send, "[DONE]", last=True)


def build_app(
    model_path: Path,
    *,
    recorder: InferenceRecorder | None = None,
    served: ServedModel | None = None,
) -> Any:
    """MLflow's scoring app for the model at ``model_path``, guarded, recording when given one.

    Args:
        model_path: A downloaded MLflow model folder (either flavor).
        recorder: Where each request row is recorded; None records nothing.
        served: How the OpenAI routes name the model; None names it by nothing but ``model``.

    Returns:
        The ASGI app: MLflow's scoring app wrapped in `ServingMiddleware`. Both time requests
        out after ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` seconds (60 by default).
    """
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(str(model_path))
    app = scoring_server.init(model)
    is_transformers = "transformers" in read_mlmodel(model_path).get("flavors", {})
    limit = TransformersContextLimit(model_path) if is_transformers else None
    settings = get_settings()
    app.add_middleware(
        ServingMiddleware,
        model=model,
        limit=limit,
        recorder=recorder,
        max_body_bytes=settings.serve_max_body_bytes,
        max_rows=settings.serve_max_rows,
        served=served,
        timeout_s=float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()),
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
    served = ServedModel.of(name=name, version=version, uri=os.environ.get(MODEL_URI_ENV))
    return build_app(model_path, recorder=recorder, served=served)


def context_tokens(model_path: Path) -> int | None:
    """The served model's context window (prompt plus answer), for either flavor."""
    flavors = read_mlmodel(model_path).get("flavors", {})
    if "transformers" in flavors:
        return TransformersContextLimit(model_path).context
    for config in model_path.rglob("genai_config.json"):
        return usable_context(json.loads(config.read_text())["model"])
    return None


def read_mlmodel(model_path: Path) -> dict[str, Any]:
    """The ``MLmodel`` file of the model folder ``model_path``, parsed."""
    import yaml

    return yaml.safe_load((model_path / "MLmodel").read_text())
