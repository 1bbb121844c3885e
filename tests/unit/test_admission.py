"""The admission arithmetic: predicted completion from measured rates, and the KV budget."""

from __future__ import annotations

import pytest

from phi3_chat.admission import (
    _Rates,
    batch_kv_bytes,
    default_kv_budget,
    fitting_max_tokens,
    kv_bytes_per_token,
    predicted_completion_s,
)

# Phi-3-mini's real decoder (genai_config.json of the cpu-int4 build).
MINI = {
    "decoder": {
        "head_size": 96,
        "hidden_size": 3072,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
    }
}


def rates(prefill: float = 0.01, steps: dict[int, float] | None = None) -> _Rates:
    measured = _Rates()
    measured.observe_prefill(100, prefill * 100)
    for size, seconds in (steps or {1: 0.25}).items():
        measured.observe_step(size, seconds)
    return measured


def test_unmeasured_rates_are_not_known_and_a_measurement_seeds_them() -> None:
    fresh = _Rates()
    assert not fresh.known
    assert fresh.step_s(1) is None
    fresh.observe_step(1, 0.2)
    assert not fresh.known  # prefill not measured yet
    fresh.observe_prefill(10, 0.5)
    assert fresh.known
    assert fresh.prefill_s_per_token == pytest.approx(0.05)


def test_rates_are_moving_averages() -> None:
    measured = rates(steps={1: 1.0})
    measured.observe_step(1, 2.0)
    assert measured.step_s(1) == pytest.approx(0.8 * 1.0 + 0.2 * 2.0)


def test_an_unmeasured_batch_size_scales_from_a_smaller_one_never_down() -> None:
    measured = rates(steps={2: 0.3})
    assert measured.step_s(4) == pytest.approx(0.6)  # at most proportionally more
    assert measured.step_s(1) == pytest.approx(0.3)  # a smaller batch: no faster than measured


def test_one_request_on_an_idle_model_is_its_prefill_plus_its_steps() -> None:
    # 3.7 tokens/s and 10 ms per prompt token: 100 prompt tokens + 256 new tokens.
    measured = rates(prefill=0.01, steps={1: 1 / 3.7})
    when = predicted_completion_s(measured, 0.0, [], [(100, 256)], max_batch_size=8)
    assert when == pytest.approx(1.0 + 256 / 3.7)  # ~70 s: past a 60 s timeout


def test_the_queue_ahead_and_the_running_batch_add_their_work() -> None:
    measured = rates(prefill=0.0, steps={1: 1.0, 2: 1.5})
    queued = [(10, 4), (10, 6), (10, 2)]
    # max_batch_size 2: [(10,4),(10,6)] = 6 steps x 1.5; [(10,2), new (10,3)] = 3 x 1.5
    when = predicted_completion_s(measured, 5.0, queued, [(10, 3)], max_batch_size=2)
    assert when == pytest.approx(5.0 + 9.0 + 4.5)


def test_prefill_counts_the_padded_rows() -> None:
    measured = rates(prefill=0.01, steps={2: 0.0})
    when = predicted_completion_s(measured, 0.0, [(50, 1)], [(100, 1)], max_batch_size=2)
    assert when == pytest.approx(0.01 * 100 * 2)


def test_fitting_max_tokens_is_the_most_that_finishes_in_time() -> None:
    measured = rates(prefill=0.0, steps={1: 0.25})
    assert fitting_max_tokens(measured, 0.0, [], 10, 256, 8, 60.0) == 240
    assert fitting_max_tokens(measured, 0.0, [], 10, 100, 8, 60.0) == 100  # capped
    assert fitting_max_tokens(measured, 59.0, [], 10, 256, 8, 60.0) == 4  # a batch runs
    assert fitting_max_tokens(measured, 61.0, [], 10, 256, 8, 60.0) == 0


def test_kv_bytes_per_token_at_phi3_minis_real_shape() -> None:
    # 32 layers x 32 KV heads x 96 x (K and V) x fp32 = 768 KiB per token.
    assert kv_bytes_per_token(MINI) == 32 * 32 * 96 * 2 * 4 == 786_432
    # The case: 8 rows x (1,000-token prompts + 512 new tokens) is ~9.5 GB.
    eight = batch_kv_bytes(786_432, [(1000, 512)] * 8)
    assert eight == 786_432 * 8 * 1512
    assert 9.5 < eight / 1e9 < 9.52


def test_a_batch_is_sized_by_its_longest_prompt_and_most_new_tokens() -> None:
    assert batch_kv_bytes(10, [(5, 100), (50, 1), (20, 20)]) == 10 * 3 * (50 + 100)


def test_the_default_budget_is_the_full_batch_capped_by_a_share_of_memory() -> None:
    per_token = 786_432
    full = per_token * 4096 * 8  # 24 GiB
    assert default_kv_budget(MINI, 4096, 8, None) == full
    assert default_kv_budget(MINI, 4096, 8, 24 * 2**30) == 6 * 2**30  # a quarter
    # Never less than one row at full context.
    assert default_kv_budget(MINI, 4096, 8, 2**30) == per_token * 4096


def test_batches_split_by_the_prefill_slice_are_predicted_as_the_batcher_runs_them() -> None:
    measured = rates(prefill=0.01, steps={1: 0.1, 2: 0.15})
    queued = [(100, 10)] * 4
    # One batch of 5: prefill 0.01 x 100 x 5, then 10 steps at 5 rows (0.15 x 5 / 2 each).
    alone = predicted_completion_s(measured, 0.0, queued, [(100, 10)], max_batch_size=8)
    assert alone == pytest.approx(5.0 + 10 * 0.375)
    # A 2 s prefill slice lets two such rows share a batch: [2, 2, 1].
    sliced = predicted_completion_s(
        measured, 0.0, queued, [(100, 10)], max_batch_size=8, prefill_slice_s=2.0
    )
    assert sliced == pytest.approx(5.0 + 10 * 0.15 * 2 + 10 * 0.1)
    # A row longer than the slice still runs (alone).
    assert predicted_completion_s(
        measured, 0.0, [], [(1000, 1)], max_batch_size=8, prefill_slice_s=2.0
    ) == pytest.approx(10.0 + 0.1)
