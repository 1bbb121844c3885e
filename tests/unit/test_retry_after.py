"""``Retry-After`` is the model's predicted wait: admission's refusal carries it as a field of
its own, through MLflow's JSON error body (``/invocations``, ``/v1/chat/completions``) or the
stream's exception, to the header; a refusal that predicts nothing keeps the fixed second.

A real `_Batcher` with seeded rates refuses; a stand-in for MLflow's scoring app answers its
exception as MLflow's own ``_async_catch_mlflow_exception`` does.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import _async_catch_mlflow_exception

from phi3_chat.admission import RETRY_AFTER_FIELD, _Rates, refused, retry_after_of
from phi3_chat.batcher import _Batcher
from phi3_chat.request import _Request, _Sampling
from phi3ops.serving.app import ServingMiddleware
from phi3ops.serving.exchange import RETRY_AFTER_S
from phi3ops.serving.follow import LoadedModel, ModelSwitcher
from phi3ops.serving.openai_routes import ServedModel

SERVED = ServedModel.of(name="phi3-mini", version="3", uri="models:/phi3-mini@champion")
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def request(max_tokens: int) -> _Request:
    return _Request(
        index=0,
        shape="chat",
        input_ids=np.arange(10, dtype=np.int32),
        max_tokens=max_tokens,
        stop=(),
        sampling=_Sampling(do_sample=False, temperature=0.0, top_p=1.0, top_k=0),
    )


@pytest.fixture
def busy() -> Iterator[_Batcher]:
    """A batcher at 1 s per step (batch 1), running a 30-token request that never ends."""
    release = threading.Event()
    started = threading.Event()

    def steps(batch: list[_Request]) -> Iterator[list[Any]]:
        started.set()
        release.wait(30)
        return iter(())

    rates = _Rates()
    rates.observe_prefill(10, 0.0)
    rates.observe_step(1, 1.0)
    batcher = _Batcher(
        steps, lambda rows: True, max_batch_size=1, max_queue=1, wait_s=0, rates=rates
    )
    batcher.submit([request(30)], timeout_s=60, stream=False)
    assert started.wait(5)
    yield batcher
    release.set()


class Model:
    """The pyfunc's two entry points, on ``batcher``."""

    def __init__(self, batcher: _Batcher) -> None:
        self.batcher = batcher

    def predict(self, max_tokens: int) -> None:
        self.batcher.submit([request(max_tokens)], timeout_s=10, stream=False)

    def predict_stream(self, row: dict) -> Iterator[dict]:
        self.batcher.submit([request(row["max_tokens"])], timeout_s=10, stream=True)
        return iter(())


def scoring_app(model: Model) -> Any:
    """MLflow's /invocations as far as errors go: the exception, serialized by MLflow."""

    @_async_catch_mlflow_exception
    async def invocations(max_tokens: int) -> Any:
        await asyncio.to_thread(model.predict, max_tokens)

    async def app(scope: dict, receive: Any, send: Any) -> None:
        body = json.loads((await receive())["body"])
        response = await invocations(body.get("max_tokens", 0))
        await response(scope, receive, send)

    return app


def call(app: Any, path: str, body: Any) -> tuple[int, dict, bytes]:
    sent: list[dict] = []

    async def run() -> None:
        pending = [{"type": "http.request", "body": json.dumps(body).encode()}]

        async def receive() -> dict:
            if pending:
                return pending.pop(0)
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {bytes(k).decode().lower(): bytes(v).decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def middleware(batcher: _Batcher) -> ServingMiddleware:
    model = Model(batcher)
    loaded = LoadedModel(app=scoring_app(model), model=model, served=SERVED, version="3")
    return ServingMiddleware(ModelSwitcher(loaded))


def test_the_refusal_carries_the_predicted_wait_as_a_field() -> None:
    error = refused("busy", retry_after_s=12.2)
    assert error.get_http_status_code() == 429
    assert json.loads(error.serialize_as_json())[RETRY_AFTER_FIELD] == 13  # rounded up
    assert retry_after_of(error) == 13
    assert retry_after_of(refused("never fits")) is None
    assert retry_after_of({RETRY_AFTER_FIELD: 0.2}) == 1  # at least a second
    for junk in ("12", True, -1, float("nan"), float("inf"), None):
        assert retry_after_of({RETRY_AFTER_FIELD: junk}) is None


@pytest.mark.parametrize("path", ["/invocations", "/v1/chat/completions"])
def test_both_routes_send_the_predicted_wait_as_retry_after(busy: _Batcher, path: str) -> None:
    # 30 steps at 1 s ahead (the running batch), then 5 of its own: past its 10 s timeout,
    # but it fits alone: come back when the work ahead is done.
    status, headers, body = call(middleware(busy), path, HELLO)
    assert status == 429
    assert headers["retry-after"] == "30"
    assert "retry in about 30 s" in body.decode()


def test_a_refused_stream_sends_the_predicted_wait_too(busy: _Batcher) -> None:
    status, headers, _ = call(middleware(busy), "/v1/chat/completions", {**HELLO, "stream": True})
    # a stream needs only its first token in time: 30 s ahead is past its 10 s
    assert (status, headers["retry-after"]) == (429, "30")


def test_a_request_that_never_fits_and_a_full_queue_keep_a_retry_after(busy: _Batcher) -> None:
    # 400 steps alone are past the timeout: waiting does not help, the header stays the default
    status, headers, body = call(middleware(busy), "/invocations", {**HELLO, "max_tokens": 400})
    assert (status, headers["retry-after"]) == (429, str(RETRY_AFTER_S))
    assert "fewer max_tokens" in body.decode()
    # a full queue (max_queue 1) says when the work ahead is done
    busy.rates = None  # admit without predicting, to fill the queue
    busy.submit([request(5)], timeout_s=60, stream=False)
    busy.rates = _Rates()
    busy.rates.observe_prefill(10, 0.0)
    busy.rates.observe_step(1, 1.0)
    with pytest.raises(MlflowException) as refusal:
        busy.submit([request(5)], timeout_s=60, stream=False)
    assert retry_after_of(refusal.value) == 30 + 5  # the running batch, then the queued row
