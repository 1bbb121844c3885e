"""Two models in one process (the champion and a candidate beside it) admit their batches
against one KV budget: a batch reserves its KV bytes before it starts and gives them back at
its end, and the other model's batch waits while too little is left; models loaded with
another budget do not share it.

Two tiny Phi-3 models are loaded straight from `phi3_chat.model`; ``og.Generator`` is wrapped
to hold the first batch and to see how much of the budget was reserved when each batch began.
"""

from __future__ import annotations

import json
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from phi3_chat import model as served
from phi3_chat.admission import kv_bytes_per_token
from phi3ops.serving.signatures import MODEL_DIR_ARTIFACT

pytestmark = pytest.mark.slow


class Generators:
    """Stands in for ``og.Generator``: notes what ``reserved()`` said as each batch began and
    holds the first batch's steps while `gate` is clear.
    """

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.stepping = threading.Event()
        self.reserved: Callable[[], int] = lambda: 0
        self.seen: list[int] = []  # reserved bytes when each batch began

    def __call__(self, og_model: Any, params: Any) -> Any:
        self.seen.append(self.reserved())
        first, owner, real = len(self.seen) == 1, self, self.real(og_model, params)

        class Generator:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def generate_next_token(self) -> None:
                if first:
                    owner.stepping.set()
                    assert owner.gate.wait(60), "the test never opened the gate"
                real.generate_next_token()

        return Generator()


@pytest.fixture
def generators(monkeypatch: pytest.MonkeyPatch) -> Iterator[Generators]:
    wrapped = Generators(served.og.Generator)
    monkeypatch.setattr(served.og, "Generator", wrapped)
    yield wrapped
    wrapped.gate.set()


@pytest.fixture
def per_token(tiny_phi3) -> int:
    config = json.loads((tiny_phi3.onnx_model_dir / "genai_config.json").read_text())
    return kv_bytes_per_token(config["model"])


@pytest.fixture
def load(tiny_phi3) -> Callable[..., Any]:
    def load(**config: Any) -> Any:
        model = served.OnnxChatModel()
        context = types.SimpleNamespace(
            artifacts={MODEL_DIR_ARTIFACT: str(tiny_phi3.onnx_model_dir)},
            model_config={"batch_wait_ms": 0, **config},
        )
        model.load_context(context)
        return model

    return load


def sized(model: Any, tokens: int) -> dict[str, Any]:
    """A request whose prompt plus max_tokens is ``tokens``."""
    row = {"messages": [{"role": "user", "content": "hi"}]}
    prompt = len(model._requests([row], None)[0].input_ids)
    return {**row, "max_tokens": tokens - prompt}


def run_beside(
    generators: Generators, champion: Any, candidate: Any, tokens: int
) -> tuple[threading.Thread, threading.Thread, list[Any]]:
    """The champion's request holds its batch; the candidate's comes meanwhile; then both end."""
    generators.seen.clear()
    generators.stepping.clear()
    generators.gate.clear()
    first = threading.Thread(target=champion.predict, args=(None, [sized(champion, tokens)]))
    first.start()
    assert generators.stepping.wait(30)
    answers: list[Any] = []
    second = threading.Thread(
        target=lambda: answers.append(candidate.predict(None, [sized(candidate, tokens)]))
    )
    second.start()
    return first, second, answers


def test_the_two_arms_take_turns_within_one_budget(load, generators, per_token) -> None:
    champion = load(kv_budget_bytes=per_token * 100)
    candidate = load(kv_budget_bytes=per_token * 100)
    budget = champion._batcher.kv_shared
    assert candidate._batcher.kv_shared is budget and budget.total == per_token * 100
    generators.reserved = lambda: budget.reserved

    # 60 tokens each: either fits alone, the two together (120) do not.
    first, second, answers = run_beside(generators, champion, candidate, 60)
    while candidate._batcher.queued != 1:
        threading.Event().wait(0.005)
    assert budget.reserved == per_token * 60  # the champion's batch holds its share
    generators.gate.set()
    first.join(60)
    second.join(60)
    assert answers and answers[0][0]["usage"]["completion_tokens"] >= 1
    # When the candidate's batch began, the champion's had given its bytes back.
    assert generators.seen == [per_token * 60, per_token * 60]
    # Its bytes go back once its batch has ended (just after the answer was handed over).
    for _ in range(6000):
        if budget.reserved == 0:
            break
        threading.Event().wait(0.005)
    assert budget.reserved == 0


def test_models_with_another_budget_do_not_share_it(load, generators, per_token) -> None:
    champion = load(kv_budget_bytes=per_token * 100)
    other = load(kv_budget_bytes=per_token * 101)
    assert other._batcher.kv_shared is not champion._batcher.kv_shared
    budget = champion._batcher.kv_shared
    generators.reserved = lambda: budget.reserved
    first, second, answers = run_beside(generators, champion, other, 60)
    while len(generators.seen) < 2:  # the other model starts while the champion's batch runs
        threading.Event().wait(0.005)
    assert generators.seen == [per_token * 60, per_token * 60]
    generators.gate.set()
    first.join(60)
    second.join(60)
    assert answers
