"""``Retry-After`` through the real stack: the tiny Phi-3 saved as the ONNX pyfunc, MLflow's
scoring app and phi3ops' middleware. The engine is made slow (each of its steps waits 0.2 s,
which the model measures as its speed) and then held, so admission predicts minutes of work
ahead and says so in the header of both routes' 429s, and of a refused stream's.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from phi3_chat import model as served
from phi3ops.serving.app import load_model
from phi3ops.serving.follow import ModelSwitcher
from phi3ops.serving.middleware import ServingMiddleware
from phi3ops.serving.openai_routes import ServedModel
from phi3ops.serving.signatures import MODEL_DIR_ARTIFACT, ONNX_CHAT_SIGNATURE

pytestmark = pytest.mark.slow

STEP_S = 0.2


class SlowEngine:
    """Wraps ``og.Generator``: every step takes at least `STEP_S`; `hold` stops the steps."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.go = threading.Event()
        self.go.set()
        self.held = threading.Event()
        self.slow = True

    def __call__(self, og_model: Any, params: Any) -> Any:
        real, engine = self.real(og_model, params), self

        class Generator:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def generate_next_token(self) -> None:
                if not engine.go.is_set():
                    engine.held.set()
                    assert engine.go.wait(120)
                if engine.slow:
                    threading.Event().wait(STEP_S)
                real.generate_next_token()

        return Generator()


@pytest.fixture
def app(tiny_phi3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    import mlflow

    from tasks.packaging import MODEL_ENTRY_FILE, served_model_package

    folder = tmp_path / "model"
    mlflow.pyfunc.save_model(
        str(folder),
        python_model=str(MODEL_ENTRY_FILE),
        code_paths=[str(served_model_package())],
        artifacts={MODEL_DIR_ARTIFACT: str(tiny_phi3.onnx_model_dir)},
        signature=ONNX_CHAT_SIGNATURE,
        model_config={"batch_wait_ms": 0, "structured_outputs": False},
    )
    engine = SlowEngine(served.og.Generator)
    monkeypatch.setattr(served.og, "Generator", engine)
    name = ServedModel.of(name="phi3", version="1", uri="models:/phi3@champion")
    middleware = ServingMiddleware(ModelSwitcher(load_model(folder, served=name, version="1")))
    yield middleware, engine
    engine.slow = False
    engine.go.set()


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

        headers = [(b"content-type", b"application/json")]
        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": headers,
        }
        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {bytes(k).decode().lower(): bytes(v).decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def chat(max_tokens: int, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **fields}


def test_a_busy_model_says_when_to_come_back(app) -> None:
    middleware, engine = app
    # Measured, not assumed: a few slow steps teach the model its speed.
    status, _, _ = call(middleware, "/invocations", chat(3))
    assert status == 200
    engine.go.clear()
    patient = chat(1000, timeout_s=900)  # top-level params of MLflow's chat input
    busy = threading.Thread(target=call, args=(middleware, "/invocations", patient))
    busy.start()
    assert engine.held.wait(60)  # ~1,000 steps of ~0.2 s ahead of anyone now
    answers = [  # each fits its 60 s timeout alone, not after the work ahead
        call(middleware, "/invocations", chat(2)),
        call(middleware, "/v1/chat/completions", chat(2)),
        call(middleware, "/v1/chat/completions", chat(2, stream=True)),
    ]
    engine.slow = False
    engine.go.set()
    busy.join(120)
    for status, headers, body in answers:
        assert status == 429, body
        wait = int(headers["retry-after"])
        assert wait > 60  # the predicted work ahead, not the fixed second
        assert f"retry in about {wait} s" in body.decode()
