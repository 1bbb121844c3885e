"""The operations layer of `phi3ops serve` over ASGI: probes while the model loads, is served
and drains; API keys; metrics of the calls that pass through it (several workers added up).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from phi3ops.errors import InvalidInputError
from phi3ops.serving.auth import (
    API_KEY_ENV,
    ApiKeyGuard,
    resolve_api_key,
    take_api_key,
)
from phi3ops.serving.follow import LoadedModel, ModelSwitcher
from phi3ops.serving.metrics import MULTIPROC_DIR_ENV, ServingMetrics, route_label
from phi3ops.serving.middleware import ServingMiddleware
from phi3ops.serving.openai_routes import ServedModel
from phi3ops.serving.operations import OperationsApp

SERVED = ServedModel.of(name="phi3-mini", version="3", uri="models:/phi3-mini@champion")
USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "phi3-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello there"},
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
}
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


class ScoringApp:
    """MLflow's scoring app in miniature: ``/ping`` is 200, ``/invocations`` answers ANSWER,
    anything else is a 404.
    """

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["path"] != "/invocations":
            status = 200 if scope["path"] == "/ping" else 404
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"\n"})
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps([ANSWER]).encode()})


class Batcher:
    """A loaded pyfunc whose python model reports its batcher, as OnnxChatModel does."""

    def __init__(self, queue_depth: int) -> None:
        self.stats = {"queue_depth": queue_depth, "running_rows": 2, "last_batch_size": 4}

    def unwrap_python_model(self) -> Batcher:
        return self

    def load_stats(self) -> dict:
        return dict(self.stats)


def serving(metrics: ServingMetrics | None = None) -> ServingMiddleware:
    loaded = LoadedModel(app=ScoringApp(), model=Batcher(1), served=SERVED, version="3")
    return ServingMiddleware(ModelSwitcher(loaded), metrics=metrics)


def call(
    app: Any, path: str, body: Any = None, *, method: str = "POST", headers: Any = ()
) -> tuple[int, dict, bytes]:
    """One request over ASGI: (status, headers, body)."""
    data = b"" if body is None else json.dumps(body).encode()
    sent: list[dict] = []

    async def run() -> None:
        finished = asyncio.Event()
        pending = [{"type": "http.request", "body": data, "more_body": False}]

        async def receive() -> dict:
            if pending:
                return pending.pop(0)
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished.set()

        scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    heads = {bytes(k).decode(): bytes(v).decode() for k, v in start.get("headers", [])}
    body_bytes = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], heads, body_bytes


def samples(app: OperationsApp) -> dict[tuple, float]:
    status, heads, body = call(app, "/metrics", method="GET")
    assert status == 200 and heads["content-type"].startswith("text/plain")
    return {
        (s.name, *sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


# --- /health, /ready, /ping through loading, serving and draining ------------------------------


def test_probes_while_the_model_loads_then_serves_then_drains() -> None:
    release = threading.Event()

    def build(metrics: ServingMetrics) -> ServingMiddleware:
        release.wait(30)
        return serving(metrics)

    app = OperationsApp(build)
    app.start()
    status, _, body = call(app, "/health", method="GET")
    assert (status, json.loads(body)) == (200, {"status": "ok", "state": "loading"})
    status, _, body = call(app, "/ready", method="GET")
    assert status == 503 and json.loads(body)["status"] == "loading"
    assert call(app, "/ping", method="GET")[0] == 503  # wait_until_ready keeps waiting
    status, heads, body = call(app, "/v1/chat/completions", HELLO)
    assert status == 503 and heads["retry-after"] == "1"
    error = json.loads(body)["error"]
    assert error["code"] == "model_not_ready" and "loading" in error["message"]
    status, _, body = call(app, "/invocations", HELLO)  # MLflow's error shape there
    assert status == 503 and json.loads(body)["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert samples(app)[("phi3ops_ready",)] == 0

    release.set()
    assert app.loaded.wait(30)
    status, _, body = call(app, "/ready", method="GET")
    assert (status, json.loads(body)) == (200, {"status": "ready"})
    assert call(app, "/ping", method="GET")[0] == 200
    assert call(app, "/v1/chat/completions", HELLO)[0] == 200
    assert samples(app)[("phi3ops_ready",)] == 1

    app.drain()  # what SIGTERM does first
    status, _, body = call(app, "/ready", method="GET")
    assert status == 503 and json.loads(body)["status"] == "draining"
    assert json.loads(call(app, "/health", method="GET")[2])["state"] == "draining"
    assert call(app, "/v1/chat/completions", HELLO)[0] == 200  # still served meanwhile


def test_a_request_reaching_a_worker_still_loading_waits_for_its_model() -> None:
    release = threading.Event()

    def build(metrics: ServingMetrics) -> ServingMiddleware:
        release.wait(30)
        return serving(metrics)

    app = OperationsApp(build, load_wait_s=60)
    app.start()
    answers: list[int] = []
    waiting = threading.Thread(
        target=lambda: answers.append(call(app, "/v1/chat/completions", HELLO)[0])
    )
    waiting.start()
    assert call(app, "/ready", method="GET")[0] == 503  # probes do not wait
    assert call(app, "/ping", method="GET")[0] == 503
    assert answers == []  # the model is not loaded: the request is still waiting for it
    release.set()
    waiting.join(30)
    assert answers == [200]


def test_a_model_that_fails_to_load_is_not_ready_and_says_so() -> None:
    def build(metrics: ServingMetrics) -> ServingMiddleware:
        raise OSError("model.onnx is missing")

    app = OperationsApp(build, exit_on_failure=False)  # the server exits with code 3 instead
    app.start()
    assert app.loaded.wait(30)
    status, _, body = call(app, "/ready", method="GET")
    assert status == 503 and "failed to load" in json.loads(body)["reason"]
    assert json.loads(call(app, "/health", method="GET")[2])["state"] == "failed"


def test_lifespan_loads_in_the_background_and_stops_the_serving_app() -> None:
    stopped = []

    class Serving(ServingMiddleware):
        async def stop(self) -> None:
            stopped.append(True)
            await super().stop()

    def build(metrics: ServingMetrics) -> ServingMiddleware:
        loaded = LoadedModel(app=ScoringApp(), model=None, served=SERVED, version="3")
        return Serving(ModelSwitcher(loaded), metrics=metrics)

    app = OperationsApp(build)
    sent: list[str] = []

    async def lifespan() -> None:
        queue = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

        async def receive() -> dict:
            return queue.pop(0)

        async def send(message: dict) -> None:
            sent.append(message["type"])

        await app({"type": "lifespan"}, receive, send)

    asyncio.run(lifespan())
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert stopped == [True] and app.lifecycle.state == "draining"


# --- API keys ----------------------------------------------------------------------------------


def test_the_key_is_required_on_every_route_but_the_open_ones() -> None:
    app = OperationsApp(serving, guard=ApiKeyGuard("sk-right", open_paths=["/health", "/ready"]))
    app.start()
    assert app.loaded.wait(30)
    for headers in (
        [],
        [(b"authorization", b"Bearer sk-wrong")],
        [(b"authorization", b"sk-right")],  # no scheme
        [(b"authorization", b"Basic sk-right")],
        [(b"authorization", b"Bearer ")],
    ):
        for path, method in (("/v1/chat/completions", "POST"), ("/metrics", "GET")):
            status, heads, body = call(app, path, HELLO, method=method, headers=headers)
            assert status == 401 and heads["www-authenticate"] == "Bearer", (path, headers)
            assert json.loads(body) == {
                "error": {
                    "message": json.loads(body)["error"]["message"],
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
            assert b"sk-right" not in body and b"sk-wrong" not in body
    right = [(b"Authorization", b"Bearer sk-right")]
    assert call(app, "/v1/chat/completions", HELLO, headers=right)[0] == 200
    assert call(app, "/metrics", method="GET", headers=right)[0] == 200
    assert call(app, "/health", method="GET")[0] == 200
    assert call(app, "/ready", method="GET")[0] == 200
    assert "sk-right" not in repr(app.guard)


def test_the_key_comes_from_the_named_variable_and_leaves_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MY_KEY", " sk-1 ")
    assert resolve_api_key(env_name="MY_KEY") == "sk-1"
    assert resolve_api_key() is None  # no variable, no block: an open server
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(InvalidInputError, match="MY_KEY is not set"):
        resolve_api_key(env_name="MY_KEY")
    monkeypatch.setenv("MY_KEY", "")
    with pytest.raises(InvalidInputError, match="MY_KEY is empty"):
        resolve_api_key(env_name="MY_KEY")
    with pytest.raises(InvalidInputError, match="empty"):
        ApiKeyGuard("")
    monkeypatch.setenv(API_KEY_ENV, "sk-2")
    assert take_api_key() == "sk-2" and API_KEY_ENV not in os.environ
    assert take_api_key() is None


def test_the_key_comes_from_a_prefect_secret_block(prefect_harness) -> None:
    from prefect.blocks.system import Secret

    Secret(value="sk-from-block").save("serve-key", overwrite=True)
    assert resolve_api_key(secret_block="serve-key") == "sk-from-block"
    with pytest.raises(InvalidInputError, match=r"'no-such-block'.*does not exist"):
        resolve_api_key(secret_block="no-such-block")


# --- metrics -----------------------------------------------------------------------------------


def test_calls_are_counted_with_their_labels_tokens_and_the_batcher() -> None:
    app = OperationsApp(serving)
    app.start()
    assert app.loaded.wait(30)
    assert call(app, "/v1/chat/completions", HELLO)[0] == 200
    assert call(app, "/v1/chat/completions", {"messages": [{"role": "user"}]})[0] == 400
    assert call(app, "/invocations", HELLO)[0] == 200
    assert call(app, "/no/such/path", method="GET")[0] == 404
    got = samples(app)
    labels = {"arm": "champion", "version": "3", "shadow": "false"}
    served = {**labels, "route": "/v1/chat/completions", "status": "200", "outcome": "served"}
    refused = {**labels, "route": "/v1/chat/completions", "status": "400", "outcome": "refused"}
    invocation = {**labels, "route": "/invocations", "status": "200", "outcome": "served"}
    for expected in (served, refused, invocation):
        assert got[("phi3ops_requests_total", *sorted(expected.items()))] == 1
    tokens = sorted({"arm": "champion", "version": "3"}.items())
    assert got[("phi3ops_prompt_tokens_total", *tokens)] == 2 * USAGE["prompt_tokens"]
    assert got[("phi3ops_completion_tokens_total", *tokens)] == 2 * USAGE["completion_tokens"]
    assert got[("phi3ops_queue_depth", *tokens)] == 1
    assert got[("phi3ops_last_batch_size", *tokens)] == 4
    other = sorted({"route": "other", "status": "404"}.items())
    assert got[("phi3ops_http_requests_total", *other)] == 1
    assert route_label("/v1/models/phi3-mini") == "/v1/models/{id}"


def test_two_apps_in_one_process_count_apart() -> None:
    first, second = ServingMetrics(), ServingMetrics()
    first.observe_http("/ready", 200)
    assert b'route="/ready"' in first.render()[0]
    assert b'route="/ready"' not in second.render()[0]


WORKER = """
import sys
from phi3ops.serving.metrics import ServingMetrics
from phi3ops.serving.operations import OperationsApp
from tests.unit.test_serving_probes_keys_metrics import Batcher

metrics = ServingMetrics(models=lambda: [("champion", "3", Batcher(int(sys.argv[1])))])
for _ in range(int(sys.argv[1])):
    metrics.observe_http("/v1/chat/completions", 200)
sys.stdout.buffer.write(metrics.render()[0])
"""


def test_several_workers_add_up_in_multiprocess_mode(tmp_path) -> None:
    env = {**os.environ, MULTIPROC_DIR_ENV: str(tmp_path)}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", WORKER, str(n)],
            env=env,
            capture_output=True,
            check=True,
            cwd=os.getcwd(),
        ).stdout.decode()
        for n in (2, 3)
    ]
    got = {
        (s.name, *sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(outputs[-1])
        for s in family.samples
    }
    route = sorted({"route": "/v1/chat/completions", "status": "200"}.items())
    assert got[("phi3ops_http_requests_total", *route)] == 5  # both workers' counts
