"""Drift statistics (tasks/drift.py) on known distributions, and their checks' bounds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phi3ops.policies import MonitorThresholds
from tasks.drift import (
    drift_statistics,
    ks_test,
    psi,
    window_sample,
    with_statistics,
)

RNG = np.random.default_rng(7)
NORMAL = RNG.normal(100, 10, 500).tolist()
SAME = RNG.normal(100, 10, 500).tolist()  # another draw of the same distribution
SHIFTED = RNG.normal(130, 10, 500).tolist()


def test_identical_samples_have_no_drift() -> None:
    assert psi(NORMAL, NORMAL) == pytest.approx(0.0, abs=1e-12)
    statistic, pvalue = ks_test(NORMAL, NORMAL)
    assert statistic == 0.0 and pvalue == pytest.approx(1.0)


def test_another_draw_of_the_same_distribution_stays_below_the_bounds() -> None:
    assert psi(NORMAL, SAME) < 0.1
    assert ks_test(NORMAL, SAME)[1] > 0.01


def test_a_shifted_distribution_is_drift() -> None:
    assert psi(NORMAL, SHIFTED) > 1.0
    statistic, pvalue = ks_test(NORMAL, SHIFTED)
    assert statistic > 0.7 and pvalue < 1e-10


def test_psi_of_a_discrete_baseline_bins_each_value_and_each_gap() -> None:
    # The tiny model always answers max_tokens: a constant baseline must still see a window
    # of shorter, longer or in-between answers.
    assert psi([5.0] * 30, [5.0] * 30) == pytest.approx(0.0, abs=1e-12)
    assert psi([5.0] * 30, [50.0] * 30) > 5.0
    assert psi([5.0] * 30, [2.0] * 30) > 5.0
    assert psi([4.0] * 15 + [8.0] * 15, [6.0] * 30) > 5.0
    assert psi([4.0] * 15 + [8.0] * 15, [4.0] * 14 + [8.0] * 16) < 0.01
    with pytest.raises(ValueError, match="at least one value"):
        psi([], [1.0])


def test_psi_of_a_continuous_baseline_counts_values_beyond_its_range() -> None:
    assert psi(NORMAL, [v + 1000 for v in NORMAL]) > 5.0
    assert psi(NORMAL, [v - 1000 for v in NORMAL]) > 5.0


def test_one_sided_ks_flags_only_a_slower_window() -> None:
    _, slower = ks_test(NORMAL, SHIFTED, alternative="greater")
    _, faster = ks_test(SHIFTED, NORMAL, alternative="greater")
    assert slower < 1e-10 and faster > 0.5


def _columns(values: list[float]) -> dict[str, list[float]]:
    return {c: values for c in ("prompt_tokens", "completion_tokens", "seconds_per_token")}


def test_every_statistic_is_a_bounded_check_with_what_it_guards_against() -> None:
    thresholds = MonitorThresholds(max_psi=0.2, min_ks_pvalue=0.05)
    found = drift_statistics(_columns(NORMAL), _columns(SHIFTED), thresholds)
    assert [s.check for s in found] == [
        "drift-psi-prompt-tokens",
        "drift-psi-completion-tokens",
        "drift-ks-prompt-tokens",
        "drift-ks-completion-tokens",
        "drift-ks-seconds-per-token",
    ]
    assert all(s.guards_against and not s.reason for s in found)
    psis, kss = found[:2], found[2:]
    assert all(s.max_value == 0.2 and s.value > 1.0 for s in psis)
    assert all(s.min_value == 0.05 and s.value < 1e-10 for s in kss)
    assert {s.expectation for s in psis} == {"expect_column_max_to_be_between"}
    assert {s.expectation for s in kss} == {"expect_column_min_to_be_between"}


def test_too_few_values_or_no_baseline_means_not_run_with_the_reason() -> None:
    thresholds = MonitorThresholds(min_drift_samples=20)
    few = drift_statistics(_columns(NORMAL[:19]), _columns(NORMAL), thresholds)
    assert all(s.value is None for s in few)
    assert "the evaluation has 19" in few[0].reason and "at least 20" in few[0].reason
    missing = drift_statistics({"completion_tokens": NORMAL}, _columns(NORMAL), thresholds)
    assert missing[0].value is None and "prompt tokens" in missing[0].reason
    assert missing[1].value == pytest.approx(0.0, abs=1e-12)
    none = drift_statistics(None, _columns(NORMAL), thresholds)
    assert all("no evaluation" in s.reason for s in none)


def test_the_window_sample_keeps_served_rows_and_the_frame_carries_each_value() -> None:
    frame = pd.DataFrame(
        {
            "outcome": ["served", "served", "error"],
            "prompt_tokens": [3.0, np.nan, 9.0],
            "completion_tokens": [4.0, 5.0, np.nan],
            "seconds_per_token": [0.5, 0.25, np.nan],
        }
    )
    assert window_sample(frame) == {
        "prompt_tokens": [3.0],
        "completion_tokens": [4.0, 5.0],
        "seconds_per_token": [0.5, 0.25],
    }
    found = drift_statistics(_columns(NORMAL), _columns(SAME), MonitorThresholds())
    derived = with_statistics(frame, found)
    assert derived[found[0].column].tolist() == [found[0].value] * 3
