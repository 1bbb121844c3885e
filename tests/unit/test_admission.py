"""The admission arithmetic: predicted completion from measured rates, and the KV budget."""

from __future__ import annotations

import pytest

from phi3_chat.admission import (
    BatchLimits,
    Row,
    _Rates,
    batch_kv_bytes,
    batch_members,
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
    when = predicted_completion_s(measured, 0.0, [], [Row(100, 256)], BatchLimits(8))
    assert when == pytest.approx(1.0 + 256 / 3.7)  # ~70 s: past a 60 s timeout


def test_the_queue_ahead_and_the_running_batch_add_their_work() -> None:
    measured = rates(prefill=0.0, steps={1: 1.0, 2: 1.5})
    queued = [Row(10, 4), Row(10, 6), Row(10, 2)]
    # max_batch_size 2: [(10,4),(10,6)] = 6 steps x 1.5; [(10,2), new (10,3)] = 3 x 1.5
    when = predicted_completion_s(measured, 5.0, queued, [Row(10, 3)], BatchLimits(2))
    assert when == pytest.approx(5.0 + 9.0 + 4.5)


def test_prefill_counts_the_padded_rows() -> None:
    measured = rates(prefill=0.01, steps={2: 0.0})
    when = predicted_completion_s(measured, 0.0, [Row(50, 1)], [Row(100, 1)], BatchLimits(2))
    assert when == pytest.approx(0.01 * 100 * 2)


def test_fitting_max_tokens_is_the_most_that_finishes_in_time() -> None:
    measured = rates(prefill=0.0, steps={1: 0.25})
    assert fitting_max_tokens(measured, 0.0, [], Row(10, 256), BatchLimits(8), 60.0) == 240
    assert (
        fitting_max_tokens(measured, 0.0, [], Row(10, 100), BatchLimits(8), 60.0) == 100
    )  # capped
    assert (
        fitting_max_tokens(measured, 59.0, [], Row(10, 256), BatchLimits(8), 60.0) == 4
    )  # a batch runs
    assert fitting_max_tokens(measured, 61.0, [], Row(10, 256), BatchLimits(8), 60.0) == 0


def test_kv_bytes_per_token_at_phi3_minis_real_shape() -> None:
    # 32 layers x 32 KV heads x 96 x (K and V) x fp32 = 768 KiB per token.
    assert kv_bytes_per_token(MINI) == 32 * 32 * 96 * 2 * 4 == 786_432
    # The case: 8 rows x (1,000-token prompts + 512 new tokens) is ~9.5 GB.
    eight = batch_kv_bytes(786_432, [Row(1000, 512)] * 8)
    assert eight == 786_432 * 8 * 1512
    assert 9.5 < eight / 1e9 < 9.52


def test_a_batch_is_sized_by_its_longest_prompt_and_most_new_tokens() -> None:
    assert batch_kv_bytes(10, [Row(5, 100), Row(50, 1), Row(20, 20)]) == 10 * 3 * (50 + 100)


def test_the_default_budget_is_the_full_batch_capped_by_a_share_of_memory() -> None:
    per_token = 786_432
    full = per_token * 4096 * 8  # 24 GiB
    assert default_kv_budget(MINI, 4096, 8, None) == full
    assert default_kv_budget(MINI, 4096, 8, 24 * 2**30) == 6 * 2**30  # a quarter
    # Never less than one row at full context.
    assert default_kv_budget(MINI, 4096, 8, 2**30) == per_token * 4096


def test_batches_split_by_the_prefill_slice_are_predicted_as_the_batcher_runs_them() -> None:
    measured = rates(prefill=0.01, steps={1: 0.1, 2: 0.15})
    queued = [Row(100, 10)] * 4
    # One batch of 5: prefill 0.01 x 100 x 5, then 10 steps at 5 rows (0.15 x 5 / 2 each).
    alone = predicted_completion_s(measured, 0.0, queued, [Row(100, 10)], BatchLimits(8))
    assert alone == pytest.approx(5.0 + 10 * 0.375)
    # A 2 s prefill slice lets two such rows share a batch: [2, 2, 1].
    sliced = predicted_completion_s(measured, 0.0, queued, [Row(100, 10)], BatchLimits(8, 2.0))
    assert sliced == pytest.approx(5.0 + 10 * 0.15 * 2 + 10 * 0.1)
    # A row longer than the slice still runs (alone).
    assert predicted_completion_s(
        measured, 0.0, [], [Row(1000, 1)], BatchLimits(8, 2.0)
    ) == pytest.approx(10.0 + 0.1)


def test_rows_batch_with_their_grammar_and_a_lone_grammar_runs_alone() -> None:
    free, json_a, json_b = None, "json-a", "json-b"
    rows = [Row(1, 1, json_a), Row(1, 1, free), Row(1, 1, json_a), Row(1, 1, json_b)]
    assert batch_members(rows, 8) == [0, 2]
    assert batch_members(rows[1:], 8) == [0]
    assert batch_members([Row(1, 1, free)] * 5, 3) == [0, 1, 2]
    tool = Row(1, 1, "tools", alone=True)
    assert batch_members([tool, tool, Row(1, 1)], 8) == [0]


def test_a_mixed_queue_is_predicted_in_the_batches_the_batcher_runs() -> None:
    measured = rates(prefill=0.0, steps={1: 1.0, 2: 1.5, 4: 2.0})
    # Three tool-call rows that each run alone, then a free-text row: four batches of one,
    # not one of four (16 s, where counting rows alone said 4 steps x 2.0 = 8 s).
    tools = Row(10, 4, "tools", alone=True)
    assert predicted_completion_s(
        measured, 0.0, [tools] * 3, [Row(10, 4)], BatchLimits(8)
    ) == pytest.approx(4 * 4 * 1.0)
    # A free-text row joins the oldest free-text rows' batch, ahead of a JSON row queued
    # before it: done after one batch of three (8 steps at 1.5 x 3 / 2 s).
    queued = [Row(10, 8), Row(10, 2, "json"), Row(10, 8)]
    assert predicted_completion_s(
        measured, 0.0, queued, [Row(10, 8)], BatchLimits(8)
    ) == pytest.approx(8 * 2.25)
    # A JSON row waits for the free-text batch, then runs with the other JSON row.
    assert predicted_completion_s(
        measured, 0.0, queued, [Row(10, 2, "json")], BatchLimits(8)
    ) == pytest.approx(8 * 1.5 + 2 * 1.5)
    # With nothing new, the work ahead is every queued batch.
    assert predicted_completion_s(measured, 0.0, queued, [], BatchLimits(8)) == pytest.approx(
        8 * 1.5 + 2 * 1.0
    )


def test_a_batch_is_predicted_cut_to_the_kv_budget_as_the_batcher_cuts_it() -> None:
    measured = rates(prefill=0.0, steps={1: 1.0, 2: 1.5, 4: 2.0})
    rows = [Row(10, 4)] * 3
    # One batch of four without a budget; a budget of two rows' cache makes it two batches.
    assert predicted_completion_s(measured, 0.0, rows, [Row(10, 4)], BatchLimits(8)) == (
        pytest.approx(4 * 2.0)
    )
    two_rows = BatchLimits(8, kv_per_token=1, kv_budget=2 * (10 + 4))
    assert predicted_completion_s(measured, 0.0, rows, [Row(10, 4)], two_rows) == (
        pytest.approx(2 * 4 * 1.5)
    )
