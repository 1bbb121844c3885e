"""The outermost layer of `phi3ops serve`: probes, metrics, API keys, and loading the model in
the background so the server answers its probes from the moment it listens.

`OperationsApp` wraps the serving app (`phi3ops.serving.middleware.ServingMiddleware`), which
it builds in a thread once uvicorn has started (`build`), and answers by itself:

- ``GET /health``: 200 whenever the process serves HTTP (liveness), with its state
  (``loading``, ``ready``, ``draining``) and the inference records waiting in the spool;
- ``GET /ready``: 200 only while a model is loaded and the server is not draining, else 503
  with the reason (readiness: what a load balancer routes by);
- ``GET /metrics``: Prometheus' text format (`phi3ops.serving.metrics`);
- ``GET /ping`` while the model loads: 503 (MLflow's scoring server, which answers it once the
  model is loaded, has no model yet); once it is loaded, MLflow's own answer;
- any other request while loading: it waits for the model (at most the request timeout), then
  503 with ``Retry-After`` (OpenAI's error shape on ``/v1``, MLflow's elsewhere). With several
  workers on one port, a request may reach a worker still loading while another serves: it is
  answered late, not refused. With an API key, a request without it gets a 401
  (`phi3ops.serving.auth`).

Draining: on ``SIGTERM`` the server reports ``draining`` (``/ready`` 503) at once; uvicorn then
stops accepting connections and lets the requests in flight finish. With
``PHI3OPS_SERVE_DRAIN_DELAY_S`` > 0 the server keeps serving for that many seconds first, so a
load balancer polling ``/ready`` takes it out of rotation before it stops listening
(``SIGINT`` stops waiting; another ``SIGTERM`` does not). A model that fails to load ends the
worker with uvicorn's startup failure code (3), as a model failing in the factory did.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from phi3ops.serving.auth import UNAUTHORIZED_HEADERS, ApiKeyGuard, unauthorized_body
from phi3ops.serving.exchange import RETRY_AFTER_S, send_json
from phi3ops.serving.metrics import ServingMetrics
from phi3ops.serving.middleware import ServingMiddleware
from phi3ops.serving.request import Message, Receive, Scope, Send
from phi3ops.serving.spool import read_backlog

_log = logging.getLogger(__name__)

HEALTH_PATH = "/health"
READY_PATH = "/ready"
METRICS_PATH = "/metrics"
PING_PATH = "/ping"
#: uvicorn's exit code for an app that failed to start (its supervisor then stops too).
STARTUP_FAILURE = 3
#: Seconds between looks at a model still loading, for a request waiting for it.
_LOAD_POLL_S = 0.05


@dataclass
class Lifecycle:
    """Where this worker is: ``loading`` -> ``ready`` -> ``draining``, or ``failed``."""

    state: str = "loading"
    reason: str = "the model is loading"


class OperationsApp:
    """The served ASGI app: see the module docstring.

    Args:
        build: Loads the model and returns the serving app counting into the metrics it is
            given (run once, in a thread, at startup).
        guard: The API key requests must present; None serves without a key.
        drain_delay_s: Seconds the server keeps serving after ``SIGTERM`` while ``/ready``
            answers 503.
        exit_on_failure: End the process when ``build`` fails (the server); False leaves the
            app answering 503 (tests).
        load_wait_s: Seconds a request other than a probe waits for a model still loading
            before its 503 (the request timeout: what it would wait for a worker to accept it).
    """

    def __init__(
        self,
        build: Callable[[ServingMetrics], ServingMiddleware],
        *,
        guard: ApiKeyGuard | None = None,
        drain_delay_s: float = 0.0,
        exit_on_failure: bool = True,
        load_wait_s: float = 0.0,
    ) -> None:
        self._build = build
        self.guard = guard
        self.drain_delay_s = drain_delay_s
        self.exit_on_failure = exit_on_failure
        self.load_wait_s = load_wait_s
        self.lifecycle = Lifecycle()
        self.inner: ServingMiddleware | None = None
        self.loaded = threading.Event()  # set once the load ended, loaded or failed
        self._loader: threading.Thread | None = None
        self._drain_timer: threading.Timer | None = None
        self.metrics = ServingMetrics(
            readiness=lambda: self.lifecycle.state,
            models=self._models,
            spool_backlog=self._backlog,
        )

    # --- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Probes, metrics and the key here; the rest to the serving app once loaded."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            inner = self.inner
            if inner is not None:
                await inner(scope, receive, send)
            return
        path = scope.get("path", "")
        status: list[int] = []

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self._http(scope, receive, counted, path)
        finally:
            self.metrics.observe_http(path, status[0] if status else 500)

    async def _http(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        if self.guard is not None:
            refusal = self.guard.refusal(path, scope.get("headers", []))
            if refusal is not None:
                body = unauthorized_body(refusal)
                await send_json(send, 401, body, headers=UNAUTHORIZED_HEADERS)
                return
        if path == HEALTH_PATH:
            await self._health(send)
            return
        if path == READY_PATH:
            ready = self.lifecycle.state == "ready" and self.inner is not None
            body = {"status": self.lifecycle.state}
            if not ready:
                body["reason"] = self.lifecycle.reason
            await send_json(send, 200 if ready else 503, body, headers=_no_cache())
            return
        if path == METRICS_PATH:
            data, content_type = self.metrics.render()
            head = [(b"content-type", content_type.encode()), *_no_cache()]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            await send({"type": "http.response.body", "body": data})
            return
        inner = self.inner
        if inner is None and path != PING_PATH:
            inner = await self._wait_for_model()
        if inner is None:
            await self._not_loaded(send, path)
            return
        await inner(scope, receive, send)

    async def _wait_for_model(self) -> ServingMiddleware | None:
        """The serving app once loaded, waiting for it at most ``load_wait_s`` (a request that
        reaches a worker still loading, beside one that serves, waits instead of failing).
        """
        waited = 0.0
        while self.inner is None and self.lifecycle.state == "loading":
            if waited >= self.load_wait_s:
                break
            await asyncio.sleep(_LOAD_POLL_S)
            waited += _LOAD_POLL_S
        return self.inner

    async def _not_loaded(self, send: Send, path: str) -> None:
        """503 with ``Retry-After`` while there is no model (OpenAI's shape on ``/v1``)."""
        message = f"The server has no model to answer with yet: {self.lifecycle.reason}."
        retry = [(b"retry-after", str(RETRY_AFTER_S).encode())]
        if path.startswith("/v1/"):
            error = {
                "message": message,
                "type": "server_error",
                "param": None,
                "code": "model_not_ready",
            }
            await send_json(send, 503, {"error": error}, headers=retry)
        else:
            body = {"error_code": "TEMPORARILY_UNAVAILABLE", "message": message}
            await send_json(send, 503, body, headers=retry)

    async def _health(self, send: Send) -> None:
        """Alive: 200 with the state and the records waiting in the spool."""
        import anyio

        body: dict[str, Any] = {"status": "ok", "state": self.lifecycle.state}
        backlog = await anyio.to_thread.run_sync(self._backlog)
        if backlog is not None:
            waiting, age = backlog
            body["records_waiting"] = waiting
            body["oldest_record_age_s"] = None if age is None else round(age, 3)
        await send_json(send, 200, body, headers=_no_cache())

    # --- lifecycle ------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Startup: load the model in the background and watch for ``SIGTERM``; shutdown:
        stop the serving app (it stores the spooled records) once the load has ended.
        """
        import anyio

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._watch_sigterm()
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.drain("the server is shutting down")
                await anyio.to_thread.run_sync(self.loaded.wait)
                if self._drain_timer is not None:
                    self._drain_timer.cancel()
                if self.inner is not None:
                    await self.inner.stop()
                self.metrics.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def start(self) -> None:
        """Starts loading the model in a thread of its own (once)."""
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, name="phi3ops-load", daemon=True)
            self._loader.start()

    def _load(self) -> None:
        try:
            inner = self._build(self.metrics)
            inner.start()
        except BaseException as exc:
            self._become("failed", f"the model failed to load: {type(exc).__name__}")
            self.loaded.set()
            _log.exception("The model failed to load; the server stops")
            if self.exit_on_failure:
                logging.shutdown()
                os._exit(STARTUP_FAILURE)
            return
        self.inner = inner
        if self.lifecycle.state == "loading":  # not draining meanwhile
            self._become("ready", "")
        self.loaded.set()

    def drain(self, reason: str = "the server is draining") -> None:
        """From now on ``/ready`` answers 503 (requests are still served until uvicorn stops)."""
        if self.lifecycle.state != "failed":
            self._become("draining", reason)

    def _become(self, state: str, reason: str) -> None:
        self.lifecycle = Lifecycle(state, reason)
        # Set now, not when scraped: with several workers, every worker's own value counts.
        self.metrics.ready.set(1 if state == "ready" else 0)

    def _watch_sigterm(self) -> None:
        """Marks the server draining on ``SIGTERM`` before uvicorn's own handler stops it,
        ``drain_delay_s`` later. Another ``SIGTERM`` meanwhile does not cut the delay short
        (with several workers, uvicorn's supervisor passes on the one the whole group got);
        ``SIGINT`` does (uvicorn's own handler, untouched). Only the main thread can handle
        signals: elsewhere (an app run by a test client) nothing is watched.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            if self._drain_timer is not None:
                return  # already draining for the delay: the timer stops the server
            self.drain("the server received SIGTERM and is draining")
            if self.drain_delay_s <= 0:
                previous(signum, frame)
                return
            _log.warning(
                "SIGTERM: /ready answers 503; serving %g s more before stopping (SIGINT stops now)",
                self.drain_delay_s,
            )
            self._drain_timer = threading.Timer(self.drain_delay_s, previous, args=(signum, None))
            self._drain_timer.daemon = True
            self._drain_timer.start()

        signal.signal(signal.SIGTERM, on_sigterm)

    def _models(self) -> list[tuple[str, str, Any]]:
        inner = self.inner
        return [] if inner is None else inner.loaded_arms()

    def _backlog(self) -> tuple[int, float | None] | None:
        inner = self.inner
        recorder = None if inner is None else inner.models.current.recorder
        if recorder is None or recorder.spool is None:
            return None
        backlog = read_backlog(recorder.spool.directory)
        return backlog.waiting, backlog.oldest_age_s()


def _no_cache() -> list[tuple[bytes, bytes]]:
    return [(b"cache-control", b"no-store")]
