"""Long prefills leave the server turns: onnxruntime-genai holds the GIL through
``append_tokens``, so a row's prompt is appended in chunks sized from the model's measured
prefill rate (`phi3_chat.admission.prefill_chunks`), with the same answer, and a batch whose
predicted prefill passes ``prefill_slice_s`` is split (og appends only once per batch).

The tiny Phi-3 is loaded straight from `phi3_chat.model`; ``og.Generator`` is wrapped to see
each call of ``append_tokens`` and to hold the first batch while others queue.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from phi3_chat import model as served
from phi3_chat.admission import MIN_PREFILL_CHUNK, prefill_slice_setting
from phi3ops.serving.signatures import MODEL_DIR_ARTIFACT

pytestmark = pytest.mark.slow

LONG = "the quick brown fox jumps over the lazy dog " * 30


class Generators:
    """Stands in for ``og.Generator``: keeps each generator's batch size and appended widths,
    and holds every step while `gate` is clear.
    """

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.stepping = threading.Event()
        self.batches: list[int] = []
        self.appended: list[list[int]] = []  # per generator: the width of each append

    def __call__(self, og_model: Any, params: Any) -> Any:
        self.batches.append(int(params.get_search_options()["batch_size"]))
        self.appended.append([])
        owner, widths, real = self, self.appended[-1], self.real(og_model, params)

        class Generator:
            def append_tokens(self, tokens: Any) -> None:
                widths.append(tokens.shape[1])
                real.append_tokens(tokens)

            def is_done(self) -> bool:
                return real.is_done()

            def get_next_tokens(self) -> Any:
                return real.get_next_tokens()

            def generate_next_token(self) -> None:
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
def load(tiny_phi3, generators: Generators) -> Callable[..., Any]:
    def load(**config: Any) -> Any:
        model = served.OnnxChatModel()
        context = types.SimpleNamespace(
            artifacts={MODEL_DIR_ARTIFACT: str(tiny_phi3.onnx_model_dir)}, model_config=config
        )
        model.load_context(context)  # its warm-up measures the prefill rate
        del generators.batches[:], generators.appended[:]
        generators.stepping.clear()
        return model

    return load


def chat(content: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8}


def test_a_long_prompt_is_appended_in_chunks_with_the_same_answer(load, generators) -> None:
    whole = load(prefill_slice_s=0)  # 0: one append, however long
    (expected,) = whole.predict(None, [chat(LONG)])
    assert len(generators.appended) == 1 and len(generators.appended[0]) == 1
    width = generators.appended[0][0]
    assert width > 4 * MIN_PREFILL_CHUNK  # long enough to be chunked

    # A slice far below any measured rate: chunks of the smallest size.
    sliced = load(prefill_slice_s=1e-9)
    assert sliced._rates.prefill_s_per_token > 0  # measured at load, not assumed
    (answer,) = sliced.predict(None, [chat(LONG)])
    (widths,) = generators.appended
    assert sum(widths) == width and len(widths) > 1
    assert set(widths[:-1]) == {MIN_PREFILL_CHUNK} and widths[-1] <= MIN_PREFILL_CHUNK
    assert answer["choices"] == expected["choices"]  # greedy: token for token the same


@pytest.mark.parametrize(("slice_s", "batches"), [(1e-9, [1, 1, 1, 1]), (0, [1, 3])])
def test_a_batch_whose_prefill_passes_the_slice_is_split(load, generators, slice_s, batches):
    model = load(prefill_slice_s=slice_s, batch_wait_ms=0)
    generators.gate.clear()
    threads = [threading.Thread(target=model.predict, args=(None, [chat(LONG)]))]
    threads[0].start()
    assert generators.stepping.wait(30)  # the first request holds the engine
    for _ in range(3):
        threads.append(threading.Thread(target=model.predict, args=(None, [chat(LONG)])))
        threads[-1].start()
    while model._batcher.queued < 3:
        threading.Event().wait(0.005)
    generators.gate.set()
    for thread in threads:
        thread.join(60)
    # Rows over the slice run alone (each appended in chunks); unbounded, they share a batch.
    assert generators.batches == batches
    if slice_s:
        assert all(len(widths) > 1 for widths in generators.appended[1:])


def test_the_slice_setting_is_checked() -> None:
    assert prefill_slice_setting(0) is None and prefill_slice_setting(None) is None
    assert prefill_slice_setting(2) == 2.0
    for bad in (-1, "2", True):
        with pytest.raises(Exception, match="prefill_slice_s"):
            prefill_slice_setting(bad)
