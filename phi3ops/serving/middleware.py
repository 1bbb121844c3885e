"""The serving layer's middleware: MLflow's scoring server, a guard for chat requests,
OpenAI-compatible routes, and inference records (assembled by `phi3ops.serving.app`).

``mlflow models serve --env-manager local`` runs ``uvicorn mlflow.pyfunc.scoring_server.app:app``
on a downloaded model. `ServingMiddleware` wraps that very app (``scoring_server.init``),
because the serving layer is the one place that sees every request of both flavors: the
transformers flavor's ``predict`` is MLflow's own code and happily generates from a prompt
longer than the model's context, so that check happens here, before the model runs. For the
same reason every request row is recorded here, as an MLflow trace (`phi3ops.serving.records`),
and counted for ``/metrics`` (`phi3ops.serving.metrics`). It also streams (``"stream": true``)
as server-sent events, which the scoring server cannot, and answers OpenAI's
``/v1/chat/completions`` and ``/v1/models`` (`phi3ops.serving.openai_routes`).

For each ``/invocations`` and ``/v1/chat/completions`` request: read within the body limit and
parse once (`phi3ops.serving.request`) -> validate (row cap, the ONNX pyfunc's validators for
both flavors (`phi3ops.serving.validate`), context) -> route (refuse, stream, or MLflow's app)
while watching for the client leaving -> record (`phi3ops.serving.exchange`,
`phi3ops.serving.records`, through the durable spool of `phi3ops.serving.spool`).
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

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
from phi3ops.serving.follow import AliasFollower, ContextLimit, LoadedModel, ModelSwitcher
from phi3ops.serving.json_bounds import BodyRefused
from phi3ops.serving.metrics import ServingMetrics
from phi3ops.serving.openai_routes import (
    CHAT_COMPLETIONS_PATH,
    MODELS_PATH,
    ChatCompletions,
    answer_invocation,
    error_body,
)
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
from phi3ops.serving.spool import read_backlog
from phi3ops.serving.validate import chat_problem, feature_problem, model_features, quiet_reason
from phi3ops.traffic import Arm, TrafficMode

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
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.models = models
        self.metrics = metrics
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
            if self.metrics is not None:
                route = CHAT_COMPLETIONS_PATH if openai else scope.get("path", "")
                self.metrics.observe_call(exchange, route=route, version=loaded.version)
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
            problem=functools.partial(self._problem, limit=loaded.limit),  # checks features
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
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def start(self) -> None:
        """Starts following the alias (when following one)."""
        if self.follower is not None:
            self.follower.start()

    async def stop(self) -> None:
        """Stops the shadow copies and the follower, releases the models and stores the
        spooled records.
        """
        import anyio

        await self.shadows.close()
        await anyio.to_thread.run_sync(self._shut_down)

    def loaded_arms(self) -> list[tuple[str, str, Any]]:
        """(arm, version, pyfunc) of each model answering now (for the metrics' gauges)."""
        out = []
        for arm in Arm:
            loaded = self.models.serving(arm)
            if loaded is not None:
                out.append((arm.value, loaded.version or "", loaded.model))
        return out

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
        problem = self._problem(
            request.payload, request.rows, limit=loaded.limit, model=loaded.model
        )
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
        self,
        payload: Any,
        rows: list[Any],
        *,
        limit: ContextLimit | None = None,
        model: Any = None,
    ) -> tuple[int, str, str] | None:
        """(status, error code, why) the request is refused with, or None; ``limit`` is the
        answering model's context check, ``model`` the answering model, whose features a row
        may ask for: given for /invocations, where MLflow's schema check would drop a field the
        model does not know without a word (an ONNX version packaged before structured
        outputs); the OpenAI route checks them itself. A body that is not JSON has no rows and
        goes on: MLflow's app answers it itself.
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
        if model is not None:
            features = model_features(model)
            for row in rows:
                problem = feature_problem(row, features) if isinstance(row, dict) else None
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
