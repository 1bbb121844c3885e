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
``PHI3OPS_SERVE_MODEL_URI`` (all set by `start_server`). When that URI names an alias, the app
follows it (`phi3ops.serving.follow`): each call is answered, validated and recorded by the
version serving when it started, whichever the alias names by the time it ends.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phi3ops.names import CANDIDATE_ALIAS, CHAMPION_ALIAS
from phi3ops.serving.exchange import (
    Exchange,
    iterate_in_thread,
    next_chunk,
    send_event,
    send_json,
    start_events,
    stream_refusal,
    watch_client,
)
from phi3ops.serving.follow import (
    AliasFollower,
    ContextLimit,
    LoadedModel,
    ModelSwitcher,
    alias_of,
)
from phi3ops.serving.json_bounds import BodyRefused
from phi3ops.serving.model_folder import TransformersContextLimit, context_tokens, read_mlmodel
from phi3ops.serving.openai_routes import (
    CHAT_COMPLETIONS_PATH,
    MODELS_PATH,
    ChatCompletions,
    ServedModel,
    answer_invocation,
    error_body,
)
from phi3ops.serving.records import InferenceRecorder, write_entries
from phi3ops.serving.request import (
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
from phi3ops.serving.shadow import ShadowCopies, ShadowCopy
from phi3ops.serving.spool import RecordSpool, read_backlog
from phi3ops.serving.validate import chat_problem, quiet_reason
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking, tracking_uri
from phi3ops.traffic import Arm, TrafficMode

MODEL_PATH_ENV = "PHI3OPS_SERVE_MODEL_PATH"
MODEL_NAME_ENV = "PHI3OPS_SERVE_MODEL_NAME"
MODEL_VERSION_ENV = "PHI3OPS_SERVE_MODEL_VERSION"
MODEL_URI_ENV = "PHI3OPS_SERVE_MODEL_URI"
#: The folder `start_server` downloads into; versions the server switches to go there too.
DOWNLOAD_DIR_ENV = "PHI3OPS_SERVE_DOWNLOAD_DIR"
#: The setting with the seconds between looks at the alias served (`Settings.serve_poll_s`).
POLL_ENV = "PHI3OPS_SERVE_POLL_S"
#: MLflow's health route: its status code as MLflow gives it, the record backlog in the body.
HEALTH_PATH = "/health"


class ServingMiddleware:
    """The served ASGI app, in front of MLflow's scoring app, for ``/invocations`` and the
    OpenAI-compatible ``/v1`` routes: read the request once (within the body limit), validate
    it, route it (refuse, stream, or pass to MLflow's app), watch the client, and record it.

    - Model: each call is answered by the model ``models`` holds when it starts (its scoring
      app, context check, OpenAI name and recorder), held until the call ends; with a
      ``follower`` (started with the app's lifespan), the alias it follows moves that model for
      later calls only (`phi3ops.serving.follow`).

    - Limits: a body over ``max_body_bytes`` is refused with a 413 before it is parsed (by its
      ``content-length`` before a byte is read); a request of more than ``max_rows`` rows with
      a 413 before the model runs, recorded as one row; a body nesting too deep, holding too
      many JSON values or ``NaN`` / ``Infinity`` with a 400 before it is parsed
      (`phi3ops.serving.json_bounds`), recorded the same way.
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
    - Record: with a model's ``recorder``, every row is recorded exactly once, tagged with the
      version that answered it, whichever route answered it, refusals too, before the client
      has the last byte of its answer; the latency is the whole call's, and a streamed answer's
      time to first token is when its first text was sent. On the app's lifespan shutdown the
      records spooled are stored before the process ends.

    Other paths and scopes (``/ping``) go to the current model's scoring app untouched;
    ``/health`` too, but its body says the records waiting for the store (`read_backlog`).
    """

    def __init__(
        self,
        models: ModelSwitcher,
        *,
        max_body_bytes: int = 2 * 1024**2,
        max_rows: int = 64,
        timeout_s: float | None = None,
        follower: AliasFollower | None = None,
    ) -> None:
        self.models = models
        self.max_body_bytes = max_body_bytes
        self.max_rows = max_rows
        self.timeout_s = timeout_s
        self.follower = follower
        self.shadows = ShadowCopies(self._answer_copy)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read once, validate, route, watch, record (other paths pass through untouched)."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        path = scope.get("path", "") if scope["type"] == "http" else ""
        openai = path == CHAT_COMPLETIONS_PATH
        if path == MODELS_PATH or path.startswith(f"{MODELS_PATH}/"):
            await self._models(scope, send)
            return
        if path == HEALTH_PATH:
            await self._health(scope, receive, send)
            return
        if path.startswith("/v1/") and not openai:
            message = f"{path[:200]} is not a route of this server: use {CHAT_COMPLETIONS_PATH}"
            await send_json(send, 404, error_body(404, message, code="ENDPOINT_NOT_FOUND"))
            return
        if openai or is_invocation(scope):
            with self.shadows.client_call():
                await self._call(scope, receive, send, openai=openai)
            return
        with self.models.using() as loaded:
            await loaded.app(scope, receive, send)

    async def _call(
        self, scope: Scope, receive: Receive, send: Send, *, openai: bool, shadow: bool = False
    ) -> None:
        """One ``/invocations`` or ``/v1/chat/completions`` call: read it, pick its arm under
        the traffic plan (a ``shadow`` copy: the candidate's, or none), answer it with that
        arm's model, held until the call ends however the aliases move; then, in shadow mode,
        offer a call the champion served to the candidate.
        """
        read: ParsedRequest | Exception
        try:
            read = await read_request(scope, receive, max_bytes=self.max_body_bytes)
        except (BodyTooLarge, BodyRefused, ClientDisconnected) as exc:
            read = exc
        stream = isinstance(read, ParsedRequest) and read.wants_stream
        wanted = Arm.CANDIDATE if shadow else self.models.arm_for(_user(read), stream=stream)
        with self.models.using_arm(wanted) as (arm, loaded):
            if arm is not wanted:  # a shadow copy whose candidate left traffic meanwhile
                return
            exchange = Exchange(
                send, loaded.recorder, timeout_s=self.timeout_s, arm=arm.value, shadow=shadow
            )
            await self._exchange(loaded, scope, receive, read, exchange, openai=openai)
        plan = self.models.plan
        if (
            not shadow
            and arm is Arm.CHAMPION
            and plan is not None
            and plan.mode is TrafficMode.SHADOW
            and isinstance(read, ParsedRequest)
            and exchange.complete
            and exchange.status < 400
        ):
            self.shadows.offer(ShadowCopy(scope=dict(scope), body=read.body, openai=openai))

    async def _exchange(
        self,
        loaded: LoadedModel,
        scope: Scope,
        receive: Receive,
        read: ParsedRequest | Exception,
        exchange: Exchange,
        *,
        openai: bool,
    ) -> None:
        """Answers the call read (or refuses what could not be read) with ``loaded``."""
        chat = ChatCompletions(
            loaded.app,
            model=loaded.model,
            served=loaded.served,
            problem=functools.partial(self._problem, limit=loaded.limit),
            timeout_s=self.timeout_s,
        )
        try:
            if isinstance(read, BodyTooLarge):
                exchange.reason = str(read)
                if openai:
                    await chat.refuse(exchange, 413, "REQUEST_TOO_LARGE", f"{read}.")
                else:
                    body = {"error_code": "REQUEST_TOO_LARGE", "message": f"{read}."}
                    await send_json(exchange.send, 413, body)
                return
            if isinstance(read, BodyRefused):  # too deep, too many values, NaN: not parsed
                exchange.reason = str(read)
                code = "INVALID_PARAMETER_VALUE"
                if openai:
                    await chat.refuse(exchange, 400, code, f"{read}.")
                else:
                    await send_json(exchange.send, 400, {"error_code": code, "message": f"{read}."})
                return
            if not isinstance(read, ParsedRequest):  # the client left while sending the body
                exchange.gone.set()
                return
            exchange.request = read
            watcher = asyncio.ensure_future(watch_client(receive, exchange))
            try:
                if openai:
                    await chat(scope, read, exchange)
                else:
                    await self._route(loaded, scope, read, exchange)
            finally:
                watcher.cancel()
        finally:  # an app that raised is recorded too, as a 500 unless it had answered
            exchange.record()

    async def _answer_copy(self, copy: ShadowCopy, preempt: asyncio.Event) -> None:
        """Answers a shadow copy with the candidate, into nothing but its record: streamed
        when its model can, so a client call arriving cuts it off at the next token
        (``preempt`` reads as the client leaving).
        """
        candidate = self.models.serving(Arm.CANDIDATE)
        if candidate is None:
            return
        body = copy.body
        payload, _ = parse_json(body)
        if candidate.streams and isinstance(payload, dict) and "messages" in payload:
            body = json.dumps({**payload, "stream": True}).encode()
        headers = [
            (name, value)
            for name, value in copy.scope.get("headers", [])
            if name.lower() != b"content-length"
        ]
        length = (b"content-length", str(len(body)).encode())
        scope = {**copy.scope, "headers": [*headers, length]}
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await preempt.wait()
            return {"type": "http.disconnect"}

        async def discard(message: Message) -> None:
            return None

        await self._call(scope, receive, discard, openai=copy.openai, shadow=True)

    async def _models(self, scope: Scope, send: Send) -> None:
        """``GET /v1/models`` and ``GET /v1/models/<id>`` (not recorded: no inference)."""
        served = self.models.current.served
        wanted = scope["path"].removeprefix(MODELS_PATH).removeprefix("/")
        if not wanted:
            await send_json(send, 200, served.listing())
        elif wanted in served.names:
            await send_json(send, 200, served.card())
        else:
            message = f"model {wanted[:200]!r} is not served here; this server serves " + (
                f"{served.id!r}"
            )
            await send_json(send, 404, error_body(404, message, code="RESOURCE_DOES_NOT_EXIST"))

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        """MLflow's ``/health`` status code, with ``{"status", "records_waiting",
        "oldest_record_age_s"}``: the records every server on this data dir has spooled and
        not yet stored (absent when this server does not record).
        """
        import anyio

        status: list[int] = []

        async def keep_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))

        with self.models.using() as loaded:
            await loaded.app(scope, receive, keep_status)
        code = status[0] if status else 500
        body: dict[str, Any] = {"status": "ok" if code == 200 else "unhealthy"}
        recorder = self.models.current.recorder
        if recorder is not None and recorder.spool is not None:
            backlog = await anyio.to_thread.run_sync(read_backlog, recorder.spool.directory)
            age = backlog.oldest_age_s()
            body["records_waiting"] = backlog.waiting
            body["oldest_record_age_s"] = None if age is None else round(age, 3)
        await send_json(send, code, body)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Start following the alias at startup; at shutdown stop, and store the spooled
        records before shutdown ends.
        """
        import anyio

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.follower is not None:
                    self.follower.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shadows.close()
                await anyio.to_thread.run_sync(self._shut_down)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _shut_down(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        recorder = self.models.current.recorder  # every version's recorder shares its spool
        self.models.close()
        if recorder is not None:
            recorder.close()

    async def _route(
        self, loaded: LoadedModel, scope: Scope, request: ParsedRequest, exchange: Exchange
    ) -> None:
        """Validates ``request``, then refuses it, streams it or hands it to ``loaded``'s
        scoring app.
        """
        problem = self._problem(request.payload, request.rows, limit=loaded.limit)
        if problem:
            status, code, why = problem
            exchange.reason = quiet_reason(why)  # recorded even when prompts are not
            await send_json(exchange.send, status, {"error_code": code, "message": why})
        elif request.wants_stream:
            await self._stream(loaded.model, request, exchange)
        else:
            replay, served = request.replay(), loaded.served  # named as /v1 names it: no path
            await answer_invocation(loaded.app, scope, replay, exchange.send, served=served)

    def _problem(
        self, payload: Any, rows: list[Any], *, limit: ContextLimit | None = None
    ) -> tuple[int, str, str] | None:
        """(status, error code, why) the request is refused with, or None; ``limit`` is the
        answering model's context check. A body that is not JSON has no rows and goes on:
        MLflow's app answers it itself.
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
        if limit is None:
            return None
        for row in rows:
            problem = limit.problem(row)
            if problem:
                return 400, "INVALID_PARAMETER_VALUE", problem
        return None

    async def _stream(self, model: Any, request: ParsedRequest, exchange: Exchange) -> None:
        chat = request.without_stream()
        send = exchange.send
        # A client that leaves sets ``gone``: the producer stops at the next token.
        chunks = iterate_in_thread(lambda: model.predict_stream(chat), exchange.gone)
        # The first chunk before any header: the request is validated when iteration starts.
        kind, value = await next_chunk(chunks, exchange, self.timeout_s)
        refusal = stream_refusal(kind, value, exchange)
        if refusal is not None:
            status, code, message = refusal
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


def _user(read: ParsedRequest | Exception) -> str | None:
    """The OpenAI ``user`` of a request (what keeps a canary sticky), if it names one."""
    payload = read.payload if isinstance(read, ParsedRequest) else None
    user = payload.get("user") if isinstance(payload, dict) else None
    return user if isinstance(user, str) and user else None


def load_model(
    model_path: Path,
    *,
    served: ServedModel,
    version: str | None = None,
    recorder: InferenceRecorder | None = None,
) -> LoadedModel:
    """Loads the model at ``model_path`` with what answers with it: MLflow's scoring app (the
    one ``mlflow models serve`` runs) and, for the transformers flavor, its context check
    (tokenizer loaded now, not by the first request).

    Args:
        model_path: A downloaded MLflow model folder (either flavor).
        served: How the OpenAI routes name the model.
        version: Its registry version, if it is one.
        recorder: Where its requests are recorded; None records nothing.
    """
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(str(model_path))
    limit = None
    transformers = "transformers" in read_mlmodel(model_path).get("flavors", {})
    if transformers:
        limit = TransformersContextLimit(model_path)
        _ = limit.tokenizer
    return LoadedModel(
        app=scoring_server.init(model),
        model=model,
        served=served,
        version=version,
        limit=limit,
        recorder=recorder,
        streams=not transformers,  # MLflow's transformers pyfunc has no predict_stream
    )


def build_app(
    model_path: Path,
    *,
    recorder: InferenceRecorder | None = None,
    served: ServedModel | None = None,
    follow: Callable[[ModelSwitcher], AliasFollower] | None = None,
) -> ServingMiddleware:
    """MLflow's scoring app for the model at ``model_path``, guarded, recording when given one.

    Args:
        model_path: A downloaded MLflow model folder (either flavor).
        recorder: Where each request row is recorded; None records nothing.
        served: How the OpenAI routes name the model; None names it by nothing but ``model``.
        follow: Makes the follower that moves the served model with its alias; None serves
            this one model.

    Returns:
        The ASGI app: `ServingMiddleware` before MLflow's scoring app. Both time requests
        out after ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` seconds (60 by default).
    """
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    first = load_model(
        model_path,
        served=served or ServedModel.of(name=None, version=None, uri=None),
        version=recorder.model_version if recorder is not None else None,
        recorder=recorder,
    )
    models = ModelSwitcher(first)
    settings = get_settings()
    return ServingMiddleware(
        models,
        max_body_bytes=settings.serve_max_body_bytes,
        max_rows=settings.serve_max_rows,
        timeout_s=float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()),
        follower=follow(models) if follow is not None else None,
    )


def recorder_for(
    model_path: Path, *, model_name: str, model_version: str, spool: RecordSpool | None = None
) -> InferenceRecorder:
    """A recorder writing to the inference experiment of the project's tracking store, through
    ``spool``, else this process's spool under ``<data dir>/serving/spool`` (started here: it
    first stores any records a killed server left behind).
    """
    settings = get_settings()
    experiment_id = configure_tracking(settings.inference_experiment_name)
    if spool is None:
        spool = RecordSpool(
            settings.data_dir / "serving" / "spool",
            functools.partial(write_entries, tracking_uri=tracking_uri()),
        ).start()
    return InferenceRecorder(
        model_name=model_name,
        model_version=model_version,
        experiment_id=experiment_id,
        record_prompts=settings.record_prompts,
        context_tokens=context_tokens(model_path),
        spool=spool,
        model_id=read_mlmodel(model_path).get("model_id"),
    )


def create_app() -> ServingMiddleware:
    """The app for ``$PHI3OPS_SERVE_MODEL_PATH``; it records when the served version is known,
    and follows the alias of ``$PHI3OPS_SERVE_MODEL_URI`` every ``PHI3OPS_SERVE_POLL_S`` seconds
    when it names one.
    """
    model_path = Path(os.environ[MODEL_PATH_ENV])
    name, version = os.environ.get(MODEL_NAME_ENV), os.environ.get(MODEL_VERSION_ENV)
    uri = os.environ.get(MODEL_URI_ENV)
    if not (name and version):
        return build_app(model_path, served=ServedModel.of(name=None, version=None, uri=uri))
    recorder = recorder_for(model_path, model_name=name, model_version=version)
    settings = get_settings()
    followed = alias_of(uri)
    follow = None
    if followed is not None and followed[0] == name and settings.serve_poll_s > 0:
        _log_like_uvicorn()

        def load(new_version: str, path: Path) -> LoadedModel:
            new_recorder = recorder_for(
                path, model_name=name, model_version=new_version, spool=recorder.spool
            )
            served = ServedModel.of(name=name, version=new_version, uri=uri)
            return load_model(path, served=served, version=new_version, recorder=new_recorder)

        def follow(models: ModelSwitcher) -> AliasFollower:
            return AliasFollower(
                models,
                model_name=name,
                alias=followed[1],
                load=load,
                download_dir=Path(
                    os.environ.get(DOWNLOAD_DIR_ENV) or settings.data_dir / "serving"
                ),
                poll_s=settings.serve_poll_s,
                # Serving the champion, a traffic plan may give the candidate live traffic.
                candidate_alias=CANDIDATE_ALIAS if followed[1] == CHAMPION_ALIAS else None,
            )

    served = ServedModel.of(name=name, version=version, uri=uri)
    return build_app(model_path, recorder=recorder, served=served, follow=follow)


def _log_like_uvicorn() -> None:
    """Writes the serving layer's news (a switch, a version that failed to load) to the
    server's log as uvicorn writes its own (its handlers are set before the app is made).
    """
    ours, uvicorn = logging.getLogger("phi3ops.serving"), logging.getLogger("uvicorn")
    if uvicorn.handlers and not ours.handlers:
        for handler in uvicorn.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
