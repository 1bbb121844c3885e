"""Drift statistics: a window of inference records against the evaluation's per-item sample.

Two statistics, both comparing whole distributions rather than one median:

* PSI (population stability index): bins fixed at the baseline's quantiles, then
  ``sum((w - b) * ln(w / b))`` over the bins' shares ``b`` (baseline) and ``w`` (window).
  Rule of thumb: below 0.1 stable, 0.1-0.25 moderate shift, above 0.25 a major shift.
* Two-sample Kolmogorov-Smirnov test (scipy): the largest gap between the two empirical CDFs
  and its p-value; a small p-value says the two samples are unlikely to share a distribution.

`drift_statistics` computes each check's value for one window; the monitor puts each value in a
derived column of the frame it validates, so great-expectations evaluates the bound and its Data
Docs show the statistic beside the other checks (`statistic_expectations`, `with_statistics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import stats

from phi3ops.policies import MonitorThresholds

if TYPE_CHECKING:
    import pandas as pd

#: The baseline sample's columns, as the monitor's records frame names them.
SAMPLE_COLUMNS = ("prompt_tokens", "completion_tokens", "seconds_per_token")
PSI_BINS = 10
# An empty bin on either side would make ln(w / b) infinite; shares are floored at this.
_MIN_SHARE = 1e-4

Alternative = Literal["two-sided", "greater"]


@dataclass(frozen=True)
class Statistic:
    """One drift check's statistic for a window: its value and bound, or why it was not run."""

    check: str
    guards_against: str
    column: str  # the derived column that carries the value in the validated frame
    value: float | None  # None: not computed, see ``reason``
    reason: str = ""
    min_value: float | None = None  # the value must be at least this (a p-value)
    max_value: float | None = None  # the value must be at most this (PSI)

    @property
    def expectation(self) -> str:
        """The great-expectations expectation that checks the bound."""
        if self.max_value is not None:
            return "expect_column_max_to_be_between"
        return "expect_column_min_to_be_between"


def psi(baseline: Sequence[float], window: Sequence[float], *, bins: int = PSI_BINS) -> float:
    """Population stability index of ``window`` against ``baseline``.

    Bins are the baseline's quantiles (``bins`` equal-share bins; repeated edges merge), with
    open outer bins, so values beyond the baseline's range still count. A discrete baseline (at
    most ``bins`` distinct values, as short token counts are) gets one bin per value and one per
    gap around them instead: quantile edges cannot split a value from its neighbours. Empty
    bins' shares are floored at 1e-4 so the logarithm stays finite.

    Args:
        baseline: The reference sample.
        window: The sample to compare.
        bins: Number of quantile bins before merging repeated edges.

    Returns:
        0 for identical distributions; grows with the shift (0.25 and above is a major one).

    Raises:
        ValueError: Either sample is empty.
    """
    reference, sample = _array(baseline), _array(window)
    if not reference.size or not sample.size:
        raise ValueError("PSI needs at least one value on each side.")
    distinct = np.unique(reference)
    if distinct.size <= bins:
        expected, actual = _shares(reference, distinct, True), _shares(sample, distinct, True)
    else:
        edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
        expected, actual = _shares(reference, edges, False), _shares(sample, edges, False)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks_test(
    baseline: Sequence[float], window: Sequence[float], *, alternative: Alternative = "two-sided"
) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test of ``window`` against ``baseline``.

    Args:
        baseline: The reference sample.
        window: The sample to compare.
        alternative: ``"two-sided"``: any difference; ``"greater"``: only the window's values
            running larger than the baseline's (the baseline's CDF above the window's).

    Returns:
        (statistic, p-value).
    """
    result = stats.ks_2samp(_array(baseline), _array(window), alternative=alternative)
    return float(result.statistic), float(result.pvalue)


def drift_statistics(
    baseline: Mapping[str, Sequence[float]] | None,
    window: Mapping[str, Sequence[float]],
    thresholds: MonitorThresholds,
) -> list[Statistic]:
    """Every drift statistic of ``window`` against ``baseline``, each with its bound.

    Args:
        baseline: The evaluation's per-item sample per column (`SAMPLE_COLUMNS`); None when
            the version has no evaluation on the baseline eval set.
        window: The window's values per column (missing values already dropped).
        thresholds: ``max_psi``, ``min_ks_pvalue`` and ``min_drift_samples`` are read.

    Returns:
        One `Statistic` per check, in report order; a side with fewer than
        ``min_drift_samples`` values gives a check that is not run, with the reason.
    """
    t = thresholds
    found: list[Statistic] = []

    def psi_check(column: str, guards_against: str) -> None:
        name = f"drift-psi-{column.replace('_', '-')}"
        why = _too_few(baseline, window, column, t.min_drift_samples)
        value = None if why or baseline is None else psi(baseline[column], window[column])
        found.append(
            Statistic(name, guards_against, f"{name}-value", value, why, max_value=t.max_psi)
        )

    def ks_check(column: str, guards_against: str, alternative: Alternative) -> None:
        name = f"drift-ks-{column.replace('_', '-')}"
        why = _too_few(baseline, window, column, t.min_drift_samples)
        value = None
        if not why and baseline is not None:
            _, value = ks_test(baseline[column], window[column], alternative=alternative)
        found.append(
            Statistic(name, guards_against, f"{name}-pvalue", value, why, min_value=t.min_ks_pvalue)
        )

    # Guards against a shift in what users send (longer documents, another language, a new
    # client) that the evaluation set no longer represents.
    psi_check(
        "prompt_tokens", f"prompt lengths shifting from the evaluation's (PSI > {t.max_psi:g})"
    )
    # Guards against answer lengths shifting as a whole (a changed prompt mix, decoding
    # settings or model), which a median alone can miss.
    psi_check(
        "completion_tokens",
        f"answer lengths shifting from the evaluation's (PSI > {t.max_psi:g})",
    )
    # Guards against prompt lengths coming from another distribution than the evaluation's,
    # judged by significance (KS), which catches shifts in the tails PSI's bins blur.
    ks_check(
        "prompt_tokens",
        f"prompt lengths unlikely to share the evaluation's distribution "
        f"(KS p < {t.min_ks_pvalue:g})",
        "two-sided",
    )
    # Guards against answer lengths coming from another distribution than the evaluation's.
    ks_check(
        "completion_tokens",
        f"answer lengths unlikely to share the evaluation's distribution "
        f"(KS p < {t.min_ks_pvalue:g})",
        "two-sided",
    )
    # Guards against generation getting slower per token than when evaluated (host, contention,
    # runtime regression). One-sided: an evaluated item's latency is its batch's wall time, an
    # upper bound, so live traffic running faster is not drift.
    ks_check(
        "seconds_per_token",
        f"seconds per token running above the evaluation's (one-sided KS p < {t.min_ks_pvalue:g})",
        "greater",
    )
    return found


def statistic_expectations(statistics: Sequence[Statistic]) -> list[Any]:
    """A great-expectations expectation per computed statistic, bounding its derived column.

    Each carries ``meta`` {check, guards_against}, as the monitor's other expectations do.
    """
    import great_expectations.expectations as gxe

    expectations: list[Any] = []
    for statistic in statistics:
        if statistic.value is None:
            continue
        meta = {"check": statistic.check, "guards_against": statistic.guards_against}
        description = f"{statistic.check}: {statistic.guards_against}"
        if statistic.max_value is not None:
            expectations.append(
                gxe.ExpectColumnMaxToBeBetween(
                    column=statistic.column,
                    max_value=statistic.max_value,
                    meta=meta,
                    description=description,
                )
            )
        else:
            expectations.append(
                gxe.ExpectColumnMinToBeBetween(
                    column=statistic.column,
                    min_value=statistic.min_value,
                    meta=meta,
                    description=description,
                )
            )
    return expectations


def with_statistics(frame: pd.DataFrame, statistics: Sequence[Statistic]) -> pd.DataFrame:
    """``frame`` plus one column per computed statistic: the window's value on every row."""
    values = {s.column: s.value for s in statistics if s.value is not None}
    return frame.assign(**values)


def window_sample(frame: pd.DataFrame) -> dict[str, list[float]]:
    """The window's values per `SAMPLE_COLUMNS` column: served rows, missing values dropped."""
    served = frame[frame["outcome"] == "served"] if "outcome" in frame else frame
    return {
        column: [float(v) for v in served[column].dropna()]
        for column in SAMPLE_COLUMNS
        if column in served
    }


def _too_few(
    baseline: Mapping[str, Sequence[float]] | None,
    window: Mapping[str, Sequence[float]],
    column: str,
    minimum: int,
) -> str:
    if baseline is None:
        return "not run: the version has no evaluation on the baseline eval set"
    sides = {
        "the evaluation": len(baseline.get(column, ())),
        "the window": len(window.get(column, ())),
    }
    short = [f"{side} has {n}" for side, n in sides.items() if n < minimum]
    if not short:
        return ""
    return (
        f"not run: too few {column.replace('_', ' ')} values ({', '.join(short)}; "
        f"the statistic needs at least {minimum} per side, PHI3OPS_MONITOR_MIN_DRIFT_SAMPLES)"
    )


def _array(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype="float64")


def _shares(values: np.ndarray, edges: np.ndarray, discrete: bool) -> np.ndarray:
    if discrete:
        # Bin 2i+1 holds the values equal to edge i; the even bins the gaps below, between and
        # above them.
        index = np.searchsorted(edges, values, "left") + np.searchsorted(edges, values, "right")
        size = 2 * edges.size + 1
    else:
        # Bins (-inf, e1), [e1, e2), ..., [ek, inf).
        index = np.searchsorted(edges, values, "right")
        size = edges.size + 1
    return np.maximum(np.bincount(index, minlength=size) / values.size, _MIN_SHARE)
