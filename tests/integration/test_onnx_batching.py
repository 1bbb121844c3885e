"""Concurrent calls to the ONNX chat model share onnxruntime-genai batches through its batcher.

The model is loaded straight from `phi3_chat.model` (``load_context`` with a plain
context), once per test with the batcher settings the test needs. ``og.Generator`` is replaced
by a wrapper that records every batch and can hold each generation step at a gate, so that what
waits where is known when a test looks.
"""

from __future__ import annotations

import gc
import json
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mlflow.exceptions import MlflowException

from phi3_chat import model as served
from phi3ops.serving.signatures import MODEL_DIR_ARTIFACT

pytestmark = pytest.mark.slow

PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How many days are there in a week?",
    "Explain why the sky is blue in one sentence.",
    "List three colours.",
    "Give me a JSON object with keys a and b.",
    "Summarise the plot of a detective story.",
    "Name a prime number larger than ten.",
)


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **fields}


def content_of(answer: dict[str, Any]) -> str:
    return answer["choices"][0]["message"]["content"]


class GatedGenerators:
    """Stands in for ``og.Generator``: records each generator's search options and steps, and
    holds every step while `gate` is clear.
    """

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.stepping = threading.Event()  # set once a step has reached the gate
        self.options: list[dict[str, float]] = []
        self.steps: list[int] = []

    def __call__(self, og_model: Any, params: Any) -> _GatedGenerator:
        self.options.append(params.get_search_options())
        self.steps.append(0)
        return _GatedGenerator(self, self.real(og_model, params), len(self.steps) - 1)

    @property
    def batch_sizes(self) -> list[int]:
        return [int(options["batch_size"]) for options in self.options]


class _GatedGenerator:
    def __init__(self, owner: GatedGenerators, generator: Any, number: int) -> None:
        self._owner, self._generator, self._number = owner, generator, number

    def append_tokens(self, tokens: Any) -> None:
        self._generator.append_tokens(tokens)

    def is_done(self) -> bool:
        return self._generator.is_done()

    def get_next_tokens(self) -> Any:
        return self._generator.get_next_tokens()

    def get_logits(self) -> Any:
        return self._generator.get_logits()

    def set_logits(self, logits: Any) -> None:
        self._generator.set_logits(logits)

    def generate_next_token(self) -> None:
        self._owner.stepping.set()
        assert self._owner.gate.wait(60), "the test never opened the gate"
        self._owner.steps[self._number] += 1
        self._generator.generate_next_token()


@pytest.fixture
def generators(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedGenerators]:
    gated = GatedGenerators(served.og.Generator)
    monkeypatch.setattr(served.og, "Generator", gated)
    yield gated
    gated.gate.set()  # never leave an engine thread waiting


@pytest.fixture
def load(tiny_phi3, generators) -> Callable[..., Any]:
    """Loads a fresh model with the given ``model_config``; its warm-up is not recorded."""

    def load(**config: Any) -> Any:
        model = served.OnnxChatModel()
        context = types.SimpleNamespace(
            artifacts={MODEL_DIR_ARTIFACT: str(tiny_phi3.onnx_model_dir)}, model_config=config
        )
        model.load_context(context)
        del generators.options[:], generators.steps[:]
        generators.stepping.clear()
        return model

    return load


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Runs ``call`` in a thread; its result or exception lands in the returned dict."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as error:  # checked by the test
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_until(condition: Callable[[], bool], what: str) -> None:
    limit = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < limit, f"timed out waiting until {what}"
        time.sleep(0.005)


def joined_stream(model: Any, request: dict[str, Any]) -> dict[str, Any]:
    """A stream's chunks put back together: content, finish reason, usage."""
    chunks = list(model.predict_stream(None, request))
    return {
        "content": "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks),
        "finish_reason": chunks[-1]["choices"][0]["finish_reason"],
        "usage": chunks[-1]["usage"],
    }


# --- batching ---------------------------------------------------------------------------------


def test_concurrent_greedy_calls_share_a_batch_and_answer_as_alone(load, generators) -> None:
    model = load(batch_wait_ms=500)
    requests = [chat(prompt, max_tokens=6 + 5 * n) for n, prompt in enumerate(PROMPTS)]
    alone = []
    for request in requests:
        (answer,) = model.predict(None, request)
        alone.append({k: answer[k] for k in ("usage",)} | {"content": content_of(answer)})
    assert generators.batch_sizes == [1] * len(requests)
    del generators.options[:]

    start = threading.Barrier(len(requests))
    streamed = {len(requests) - 2, len(requests) - 1}  # two callers stream from the batch

    def call(n: int) -> Callable[[], Any]:
        def run() -> dict[str, Any]:
            start.wait()
            if n in streamed:
                joined = joined_stream(model, requests[n])
                assert joined["finish_reason"] == "length"
                return {"usage": joined["usage"], "content": joined["content"]}
            (answer,) = model.predict(None, requests[n])
            return {"usage": answer["usage"], "content": content_of(answer)}

        return run

    running = [in_thread(call(n)) for n in range(len(requests))]
    for thread, _ in running:
        thread.join(timeout=120)
    outcomes = [outcome for _, outcome in running]
    assert [outcome.get("error") for outcome in outcomes] == [None] * len(requests)
    together = [outcome["result"] for outcome in outcomes]

    assert together == alone  # token for token, and the usage of each request
    assert [a["usage"]["completion_tokens"] for a in together] == [6 + 5 * n for n in range(8)]
    assert sum(generators.batch_sizes) == len(requests)
    assert max(generators.batch_sizes) > 1, generators.batch_sizes


def test_calls_with_any_sampling_and_seed_share_one_batch(load, generators) -> None:
    model = load(batch_wait_ms=0)
    generators.gate.clear()
    blocker, _ = in_thread(lambda: model.predict(None, chat(PROMPTS[0], max_tokens=2)))
    wait_until(generators.stepping.is_set, "the first call generates")

    settings = [
        {"temperature": 0.7},
        {"temperature": 0.9, "top_p": 0.5},
        {"temperature": 0.0},
        {"temperature": 0.7, "seed": 3},
        {"temperature": 0.9, "top_p": 0.5, "top_k": 4, "seed": 4},
        {"temperature": 0.0},
    ]
    running = [
        in_thread(lambda n=n, s=s: model.predict(None, chat(PROMPTS[n], max_tokens=3, **s)))
        for n, s in enumerate(settings)
    ]
    wait_until(lambda: model._batcher.queued == len(settings), "every call waits")
    generators.gate.set()
    for thread, outcome in running:
        thread.join(timeout=60)
        assert "error" not in outcome
        assert outcome["result"][0]["usage"]["completion_tokens"] == 3
    blocker.join(timeout=60)

    # Each row samples on its own, so one greedy generator runs them all.
    assert [(int(o["batch_size"]), bool(o["do_sample"])) for o in generators.options[1:]] == [
        (6, False)
    ]


def test_a_seed_repeats_its_answer_alone_or_beside_other_rows(load, generators) -> None:
    model = load(batch_wait_ms=0)
    seeded = chat(PROMPTS[1], max_tokens=8, temperature=1.0, seed=11)
    (alone,) = model.predict(None, seeded)
    (again,) = model.predict(None, seeded)
    others = [chat(PROMPTS[n], max_tokens=8, temperature=1.0) for n in range(3)]
    batched = model.predict(None, [*others, seeded])
    assert generators.batch_sizes == [1, 1, 4]
    assert content_of(alone) == content_of(again) == content_of(batched[-1])
    unseeded = {content_of(model.predict(None, {**seeded, "seed": None})[0]) for _ in range(3)}
    assert len(unseeded) > 1  # without a seed, fresh noise each time


# --- overload: a bounded queue, deadlines, consumers that leave ----------------------------


def test_a_full_queue_refuses_at_once_with_resource_exhausted(load, generators) -> None:
    model = load(max_batch_size=1, max_queue=1, batch_wait_ms=0)
    generators.gate.clear()
    running, _ = in_thread(lambda: model.predict(None, chat(PROMPTS[0], max_tokens=5)))
    wait_until(generators.stepping.is_set, "the first call generates")
    waiting, _ = in_thread(lambda: model.predict(None, chat(PROMPTS[1], max_tokens=5)))
    wait_until(lambda: model._batcher.queued == 1, "the second call waits")

    with pytest.raises(MlflowException) as refused:
        model.predict(None, chat(PROMPTS[2], max_tokens=5))
    # At once: refused while the engine is still held at its gate, so it waited for no one.
    assert running.is_alive() and waiting.is_alive() and not generators.gate.is_set()
    assert refused.value.error_code == "RESOURCE_EXHAUSTED"
    assert refused.value.get_http_status_code() == 429
    assert "queue is full" in refused.value.message
    assert "retry later" in refused.value.message
    with pytest.raises(MlflowException, match="queue is full"):
        model.predict_stream(None, chat(PROMPTS[2], max_tokens=5))  # refused before streaming

    generators.gate.set()
    running.join(timeout=60)
    waiting.join(timeout=60)
    (answer,) = model.predict(None, chat(PROMPTS[2], max_tokens=5))  # room again
    assert answer["usage"]["completion_tokens"] == 5
    assert generators.batch_sizes == [1, 1, 1]


def test_calls_past_their_deadline_are_cancelled_and_free_their_slot(load, generators) -> None:
    model = load(max_batch_size=1, batch_wait_ms=0, admission=False)
    generators.gate.clear()
    long_params = {"timeout_s": 0.6}
    running, ran = in_thread(
        lambda: model.predict(None, chat(PROMPTS[0], max_tokens=500), params=long_params)
    )
    wait_until(generators.stepping.is_set, "the first call generates")
    started = time.monotonic()
    with pytest.raises(MlflowException) as waited:  # never left the queue
        model.predict(None, chat(PROMPTS[1], max_tokens=5), params={"timeout_s": 0.2})
    assert 0.2 <= time.monotonic() - started < 5
    assert waited.value.error_code == "DEADLINE_EXCEEDED"
    assert waited.value.get_http_status_code() == 504
    assert "cancelled" in waited.value.message
    assert "timeout of 0.2 s" in waited.value.message
    assert model._batcher.queued == 0

    running.join(timeout=30)
    assert isinstance(ran.get("error"), MlflowException)
    assert ran["error"].error_code == "DEADLINE_EXCEEDED"
    generators.gate.set()
    (answer,) = model.predict(None, chat(PROMPTS[2], max_tokens=4))  # the slot is free
    assert answer["usage"]["completion_tokens"] == 4
    # The running call stopped at its next step instead of generating its 500 tokens.
    assert generators.batch_sizes == [1, 1]
    assert generators.steps[0] <= 2


def test_the_default_timeout_comes_from_model_config(load, generators) -> None:
    model = load(max_batch_size=1, batch_wait_ms=0, request_timeout_s=0.2, admission=False)
    generators.gate.clear()
    running, ran = in_thread(lambda: model.predict(None, chat(PROMPTS[0], max_tokens=50)))
    running.join(timeout=30)
    assert ran["error"].error_code == "DEADLINE_EXCEEDED"
    assert "timeout of 0.2 s" in ran["error"].message


def test_a_stream_closed_early_stops_its_row_and_frees_its_slot(load, generators) -> None:
    model = load(max_batch_size=1, batch_wait_ms=0)
    stream = model.predict_stream(None, chat(PROMPTS[0], max_tokens=1900))
    first = [next(stream) for _ in range(3)]
    assert first[0]["choices"][0]["delta"]["role"] == "assistant"
    stream.close()  # the consumer leaves (GeneratorExit inside the stream)

    (answer,) = model.predict(None, chat(PROMPTS[1], max_tokens=4))
    assert answer["usage"]["completion_tokens"] == 4
    assert generators.batch_sizes == [1, 1]
    assert generators.steps[0] < 1000  # not the 1900 tokens it asked for


def test_a_stream_that_waits_past_its_timeout_raises_deadline_exceeded(load, generators) -> None:
    model = load(max_batch_size=1, batch_wait_ms=0)
    generators.gate.clear()
    running, _ = in_thread(lambda: model.predict(None, chat(PROMPTS[0], max_tokens=3)))
    wait_until(generators.stepping.is_set, "the first call generates")
    stream = model.predict_stream(None, chat(PROMPTS[1]), params={"timeout_s": 0.2})
    assert next(stream)["choices"][0]["delta"]["role"] == "assistant"
    with pytest.raises(MlflowException) as waited:
        next(stream)
    assert waited.value.error_code == "DEADLINE_EXCEEDED"
    assert model._batcher.queued == 0
    generators.gate.set()
    running.join(timeout=30)
    assert generators.batch_sizes == [1]  # the stream never ran


def test_a_stream_dropped_before_it_is_read_leaves_the_queue(load, generators) -> None:
    model = load(max_batch_size=1, batch_wait_ms=0)
    generators.gate.clear()
    running, _ = in_thread(lambda: model.predict(None, chat(PROMPTS[0], max_tokens=3)))
    wait_until(generators.stepping.is_set, "the first call generates")
    stream = model.predict_stream(None, chat(PROMPTS[1]))
    assert model._batcher.queued == 1
    del stream  # never iterated, so its own cleanup never runs
    gc.collect()
    assert model._batcher.queued == 0
    generators.gate.set()
    running.join(timeout=30)
    assert generators.batch_sizes == [1]


def test_a_bad_timeout_param_is_refused(load) -> None:
    model = load()
    with pytest.raises(MlflowException, match=r"params\['timeout_s'\]") as refused:
        model.predict(None, chat(PROMPTS[0], max_tokens=2), params={"timeout_s": -1})
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"


# --- admission by measured speed and the KV budget ---------------------------------------------


def test_the_warm_up_measures_the_models_rates(load, generators) -> None:
    model = load()
    rates = model._batcher.rates
    assert rates.known  # measured at load, never assumed
    assert rates.prefill_s_per_token > 0 and rates.step_s(1) > 0
    assert load(admission=False)._batcher.rates is None


def test_a_request_predicted_to_overrun_its_timeout_is_refused_before_any_work(
    load, generators
) -> None:
    model = load(max_batch_size=1, batch_wait_ms=0)
    # 1,900 steps at the measured rate cannot finish in 10 ms.
    with pytest.raises(MlflowException) as refused:
        model.predict(None, chat(PROMPTS[0], max_tokens=1900), params={"timeout_s": 0.01})
    assert refused.value.error_code == "RESOURCE_EXHAUSTED"
    assert refused.value.get_http_status_code() == 429
    assert "refused before any work" in refused.value.message
    assert "fewer max_tokens" in refused.value.message
    assert generators.batch_sizes == []  # nothing was generated
    assert model._batcher.queued == 0

    (answer,) = model.predict(None, chat(PROMPTS[1], max_tokens=3), params={"timeout_s": 30})
    assert answer["usage"]["completion_tokens"] == 3  # one that fits is served
    assert generators.batch_sizes == [1]


def test_a_request_behind_a_long_batch_is_told_when_to_retry(load, generators) -> None:
    model = load(max_batch_size=1, batch_wait_ms=0)
    model._batcher.rates = rates = served._Rates()  # known rates: 10 ms a step, free prefill
    rates.observe_prefill(1, 0.0)
    rates.observe_step(1, 0.01)
    generators.gate.clear()
    running, ran = in_thread(lambda: model.predict(None, chat(PROMPTS[0], max_tokens=500)))
    wait_until(generators.stepping.is_set, "the first call generates")
    with pytest.raises(MlflowException) as refused:  # ~5 s ahead of it, 2 s allowed
        model.predict(None, chat(PROMPTS[1], max_tokens=5), params={"timeout_s": 2})
    assert refused.value.error_code == "RESOURCE_EXHAUSTED"
    assert "retry in about 5 s" in refused.value.message
    # A stream needs only its first token in time: accepted behind a 5 s batch with 6 s.
    stream = model.predict_stream(None, chat(PROMPTS[2], max_tokens=50), params={"timeout_s": 6})
    generators.gate.set()
    running.join(timeout=60)
    assert ran["result"][0]["usage"]["completion_tokens"] == 500
    assert joined_stream_of(stream)["usage"]["completion_tokens"] == 50


def joined_stream_of(stream: Iterator[dict[str, Any]]) -> dict[str, Any]:
    chunks = list(stream)
    return {"usage": chunks[-1]["usage"]}


def test_max_tokens_left_out_means_what_fits_the_deadline(load, generators) -> None:
    model = load(max_batch_size=1, batch_wait_ms=0)
    model._batcher.rates = rates = served._Rates()  # 10 ms a step, free prefill
    rates.observe_prefill(1, 0.0)
    rates.observe_step(1, 0.01)
    (answer,) = model.predict(None, chat(PROMPTS[0]), params={"timeout_s": 0.5})
    assert answer["usage"]["completion_tokens"] == 50  # not the default 256
    assert answer["choices"][0]["finish_reason"] == "length"
    # Asked for explicitly, it is refused instead of cut short.
    with pytest.raises(MlflowException, match="refused before any work"):
        model.predict(None, chat(PROMPTS[0], max_tokens=256), params={"timeout_s": 0.5})


def test_rows_past_the_kv_budget_wait_for_the_next_batch(load, generators, tiny_phi3) -> None:
    config = json.loads((tiny_phi3.onnx_model_dir / "genai_config.json").read_text())["model"]
    per_token = served.kv_bytes_per_token(config)
    assert per_token == 2 * 4 * 16 * 2 * 4  # the tiny model: 2 layers, 4 KV heads of 16
    # Room for one row of (prompt + 40) tokens, not two.
    model = load(batch_wait_ms=500, kv_budget_bytes=per_token * 100)
    requests = [chat(prompt, max_tokens=40) for prompt in PROMPTS[:3]]
    running = [in_thread(lambda r=r: model.predict(None, r)) for r in requests]
    for thread, _ in running:
        thread.join(timeout=60)
    assert all("result" in outcome for _, outcome in running)
    assert generators.batch_sizes == [1, 1, 1]

    with pytest.raises(MlflowException) as refused:  # alone over the budget
        model.predict(None, chat(PROMPTS[0], max_tokens=200))
    assert refused.value.error_code == "RESOURCE_EXHAUSTED"
    assert "KV cache" in refused.value.message
    assert generators.batch_sizes == [1, 1, 1]
