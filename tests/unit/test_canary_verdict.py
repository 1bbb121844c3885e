"""The online verdict's pieces, without a store: samples, statistics (against scipy), the
verdict's wait / promote / abort logic, and the thresholds' bounds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from scipy import stats

from phi3ops.errors import InvalidInputError
from phi3ops.policies import CanaryOverrides, CanaryPolicy
from phi3ops.serving.records import InferenceRecord
from tasks.canary import (
    arm_sample,
    compare_arms,
    decide,
    is_format_failure,
    proportion_worse_pvalue,
    rank_pvalue,
)
from tasks.monitoring import Check

POLICY = CanaryPolicy(min_samples=20, alpha=0.01)


def _record(**changes) -> InferenceRecord:
    base = InferenceRecord(
        timestamp=1.0,
        model_name="m",
        model_version="1",
        latency_s=1.0,
        response=None,
        finish_reason="stop",
        prompt_tokens=10,
        completion_tokens=20,
        response_chars=80,
        blank_response=False,
        template_tokens=0,
    )
    return dataclasses.replace(base, **changes)


def _failed(outcome: str, status: int) -> InferenceRecord:
    return _record(
        outcome=outcome,
        status_code=status,
        error=f"HTTP {status}",
        finish_reason=None,
        completion_tokens=None,
        response_chars=None,
        blank_response=None,
    )


def _arm(arm: str, *, n: int, errors: int = 0, latency: float = 1.0, tokens: int = 20):
    records = [
        _record(arm=arm, latency_s=latency + 0.01 * (i % 7), completion_tokens=tokens + i % 5)
        for i in range(n - errors)
    ]
    records += [dataclasses.replace(_failed("error", 500), arm=arm) for _ in range(errors)]
    return arm_sample(records, arm=arm, version="2" if arm == "candidate" else "1")


def _check(name: str, success: bool) -> Check:
    return Check(name, "a problem", "expect_x", success, "observed 1")


# --- what counts where ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "failure"),
    [
        ({}, False),
        ({"blank_response": True}, True),
        ({"template_tokens": 2}, True),
        ({"finish_reason": "length"}, True),
        ({"outcome": "error", "finish_reason": "length"}, False),  # no answer: an error instead
    ],
)
def test_format_failure_is_blank_template_tokens_or_cut_off(changes, failure) -> None:
    assert is_format_failure(_record(**changes)) is failure


def test_client_outcomes_and_shed_shadow_copies_judge_nobody() -> None:
    records = [
        _record(arm="candidate"),
        _record(arm="candidate", finish_reason="length"),
        _failed("error", 500),
        _failed("shed", 429),  # the server turned a client away: a server failure
        _failed("refused", 400),
        _failed("cancelled", 499),
        dataclasses.replace(_failed("shed", 503), shadow=True),  # protecting the champion
    ]
    sample = arm_sample(records, arm="candidate", version="2")
    assert (sample.records, sample.judged, sample.errors, sample.served) == (7, 4, 2, 2)
    assert (sample.refused, sample.cancelled, sample.shed_shadow) == (1, 1, 1)
    assert sample.error_rate == 0.5 and sample.format_failure_rate == 0.5
    assert sample.seconds_per_token == [1.0 / 20, 1.0 / 20]
    assert sample.completion_tokens == [20.0, 20.0]


# --- the statistics against scipy -------------------------------------------------------------


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), [(12, 100, 3, 100), (30, 400, 20, 380)])
def test_two_proportion_z_test_matches_scipy_chi_square(x1, n1, x2, n2) -> None:
    # Without continuity correction the 2x2 chi-square is the square of the pooled z, and its
    # two-sided p-value is twice the one-sided one when the first rate is the higher.
    chi2, p_two, _, _ = stats.chi2_contingency([[x1, n1 - x1], [x2, n2 - x2]], correction=False)
    p = proportion_worse_pvalue(x1, n1, x2, n2)
    assert p == pytest.approx(p_two / 2, rel=1e-9)
    assert stats.norm.isf(p) ** 2 == pytest.approx(chi2, rel=1e-9)
    # The other way round it is the other tail: no evidence that the lower rate is worse.
    assert proportion_worse_pvalue(x2, n2, x1, n1) == pytest.approx(1 - p, rel=1e-9)


def test_two_proportion_edge_cases() -> None:
    assert proportion_worse_pvalue(0, 50, 0, 50) == 1.0  # nobody failed: nothing to test
    assert proportion_worse_pvalue(50, 50, 50, 50) == 1.0
    assert proportion_worse_pvalue(3, 0, 1, 10) is None  # an empty arm cannot be judged


def test_rank_test_matches_scipy_and_points_the_right_way() -> None:
    slow = [1.5 + 0.1 * i for i in range(30)]
    fast = [0.5 + 0.1 * i for i in range(30)]
    expected = stats.mannwhitneyu(slow, fast, alternative="greater").pvalue
    assert rank_pvalue(slow, fast, alternative="greater") == pytest.approx(expected)
    assert rank_pvalue(slow, fast, alternative="greater") < 0.01
    assert rank_pvalue(fast, slow, alternative="greater") > 0.5  # faster is never "worse"
    assert rank_pvalue([1.0, 1.0], [1.0, 1.0], alternative="two-sided") == 1.0
    assert rank_pvalue([1.0], fast, alternative="greater") is None


def test_compare_arms_flags_only_what_is_significant() -> None:
    champion = _arm("champion", n=400, errors=4)
    worse = compare_arms(_arm("candidate", n=400, errors=40), champion, policy=POLICY)
    assert [t.name for t in worse if t.worse] == ["error-rate"]
    same = compare_arms(_arm("candidate", n=400, errors=6), champion, policy=POLICY)
    assert not any(t.worse for t in same)
    (error,) = [t for t in same if t.name == "error-rate"]
    assert error.candidate == 6 / 400 and error.champion == 4 / 400 and error.p_value > 0.01
    slower = compare_arms(_arm("candidate", n=400, latency=1.5), champion, policy=POLICY)
    assert [t.name for t in slower if t.worse] == ["seconds-per-token"]
    longer = compare_arms(_arm("candidate", n=400, tokens=40), champion, policy=POLICY)
    # Twice the tokens in the same time is faster per token, but a different behaviour.
    assert [t.name for t in longer if t.worse] == ["completion-tokens"]


# --- the verdict ------------------------------------------------------------------------------


def test_too_few_records_on_either_arm_is_wait_with_the_numbers_needed() -> None:
    candidate, champion = _arm("candidate", n=5), _arm("champion", n=400)
    verdict, reasons = decide(candidate, champion, [], {}, policy=POLICY)
    assert verdict == "wait"
    assert "15 more candidate record(s)" in reasons[0] and "champion record" not in reasons[0]


def test_no_worse_candidate_is_promoted() -> None:
    candidate, champion = _arm("candidate", n=100), _arm("champion", n=100)
    tests = compare_arms(candidate, champion, policy=POLICY)
    suites = {"candidate": [_check("error-rate", True)], "champion": [_check("error-rate", True)]}
    verdict, reasons = decide(candidate, champion, tests, suites, policy=POLICY)
    assert verdict == "promote" and all(r.startswith("no worse") for r in reasons)


def test_a_significantly_worse_candidate_is_aborted() -> None:
    candidate, champion = _arm("candidate", n=100, errors=30), _arm("champion", n=100)
    tests = compare_arms(candidate, champion, policy=POLICY)
    verdict, reasons = decide(candidate, champion, tests, {}, policy=POLICY)
    assert verdict == "abort"
    assert reasons[0].startswith("worse on live traffic: error-rate: candidate 0.3 vs champion 0")


def test_the_suite_aborts_only_on_what_the_champion_passes() -> None:
    candidate, champion = _arm("candidate", n=100), _arm("champion", n=100)
    tests = compare_arms(candidate, champion, policy=POLICY)
    suites = {
        "candidate": [_check("no-template-tokens", False), _check("length-finish-rate", False)],
        "champion": [_check("no-template-tokens", True), _check("length-finish-rate", False)],
    }
    verdict, reasons = decide(candidate, champion, tests, suites, policy=POLICY)
    assert verdict == "abort"
    assert [r.split(" broken")[0] for r in reasons] == ["expectation no-template-tokens"]
    # Both arms breaking one expectation is the monitor's concern: no verdict on the candidate.
    suites["champion"][0] = _check("no-template-tokens", False)
    verdict, reasons = decide(candidate, champion, tests, suites, policy=POLICY)
    assert verdict == "promote"
    assert "both arms break length-finish-rate, no-template-tokens" in reasons[-1]


# --- the thresholds ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [{"min_samples": 1}, {"alpha": 0}, {"alpha": 0.5}, {"alpha": math.nan}, {"min_sample": 3}],
)
def test_thresholds_out_of_bounds_or_unknown_are_refused(values) -> None:
    with pytest.raises(InvalidInputError, match=next(iter(values))):
        CanaryPolicy().with_overrides(values)


def test_thresholds_come_from_settings_and_runs_override_them(monkeypatch) -> None:
    from phi3ops.settings import get_settings

    assert get_settings().canary == CanaryPolicy(min_samples=100, alpha=0.01)
    monkeypatch.setenv("PHI3OPS_CANARY_MIN_SAMPLES", "250")
    get_settings.cache_clear()
    assert get_settings().canary.min_samples == 250
    overrides = CanaryOverrides(alpha=0.005)
    assert get_settings().canary.with_overrides(overrides) == CanaryPolicy(
        min_samples=250, alpha=0.005
    )
    assert "repeated" not in (CanaryPolicy.model_fields["alpha"].description or "")
    assert "re-checked on a schedule" in (CanaryPolicy.model_fields["alpha"].description or "")
