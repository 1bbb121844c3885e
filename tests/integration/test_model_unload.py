"""A model closed at shutdown (after the server's drain) or when its version is released ends
its calls at once: waiting and generating calls get a 503, the running batch stops, its engine
thread ends, and new calls are refused; so no request thread keeps the process from exiting.
The tiny Phi-3, loaded straight from `phi3_chat.model`; ``og.Generator`` is wrapped to hold the
first batch.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest
from mlflow.exceptions import MlflowException

from phi3_chat import model as served
from phi3ops.serving.follow import LoadedModel, ModelSwitcher
from phi3ops.serving.openai_routes import ServedModel
from phi3ops.serving.signatures import MODEL_DIR_ARTIFACT

pytestmark = pytest.mark.slow


class Held:
    """Wraps ``og.Generator``: steps wait while `gate` is clear."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.stepping = threading.Event()

    def __call__(self, og_model: Any, params: Any) -> Any:
        real, held = self.real(og_model, params), self

        class Generator:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def generate_next_token(self) -> None:
                held.stepping.set()
                assert held.gate.wait(60)
                real.generate_next_token()

        return Generator()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[Held]:
    wrapped = Held(served.og.Generator)
    monkeypatch.setattr(served.og, "Generator", wrapped)
    yield wrapped
    wrapped.gate.set()


@pytest.fixture
def model(tiny_phi3, held: Held) -> Any:
    loaded = served.OnnxChatModel()
    context = types.SimpleNamespace(
        artifacts={MODEL_DIR_ARTIFACT: str(tiny_phi3.onnx_model_dir)},
        model_config={"batch_wait_ms": 0},
    )
    loaded.load_context(context)
    held.stepping.clear()  # the warm-up at load stepped too
    return loaded


def chat(max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


def test_closing_a_model_ends_its_calls_at_once(model: Any, held: Held) -> None:
    outcomes: dict[str, BaseException | None] = {}

    def call(name: str, **kwargs: Any) -> None:
        try:
            model.predict(None, [chat(50)], params=kwargs or None)
            outcomes[name] = None
        except BaseException as error:  # checked below
            outcomes[name] = error

    held.gate.clear()
    running = threading.Thread(target=call, args=("running",))
    running.start()
    assert held.stepping.wait(30)
    waiting = threading.Thread(target=call, args=("waiting",), kwargs={"timeout_s": 600})
    waiting.start()
    while model._batcher.queued != 1:
        threading.Event().wait(0.005)

    # Shutdown, as the server's lifespan does it: the switcher closes every model.
    switcher = ModelSwitcher(
        LoadedModel(app=None, model=model, served=ServedModel.of(name=None, version=None, uri=None))
    )
    switcher.close()
    waiting.join(30)  # at once, not after its 600 s
    assert not waiting.is_alive()
    held.gate.set()  # the step in progress ends; the batch stops at the next
    running.join(30)
    for name in ("running", "waiting"):
        error = outcomes[name]
        assert isinstance(error, MlflowException), (name, error)
        assert error.get_http_status_code() == 503 and "unloaded" in error.message
    engine = model._batcher._thread
    if engine is not None:
        engine.join(30)
    assert model._batcher._thread is None and model._batcher.queued == 0
    with pytest.raises(MlflowException, match="unloaded") as refused:
        model.predict(None, [chat(2)])
    assert refused.value.get_http_status_code() == 503
