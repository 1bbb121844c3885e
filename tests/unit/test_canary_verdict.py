"""The online verdict's pieces, without a store: samples, statistics (against scipy), the
verdict's wait / promote / abort logic, and the thresholds' bounds.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from scipy import stats

from phi3ops.errors import InvalidInputError
from phi3ops.policies import CanaryOverrides, CanaryPolicy
from phi3ops.serving.records import InferenceRecord
from tasks.canary import (
    arm_sample,
    cmh_worse_pvalue,
    compare_arms,
    decide,
    is_format_failure,
    is_length_finish,
    matched_records,
    proportion_worse_pvalue,
    rank_pvalue,
    stratified_rank_pvalue,
    stratum_of,
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
        ({"finish_reason": "length"}, False),  # a cut-off: judged per max_tokens, apart
        ({"outcome": "error", "finish_reason": "length"}, False),  # no answer: an error instead
        # Blank because the client's own stop sequence came first: the client's choice.
        ({"blank_response": True, "stop_given": True}, False),
        ({"blank_response": True, "stop_given": True, "finish_reason": "length"}, True),
    ],
)
def test_format_failure_is_blank_or_template_tokens_never_the_clients_stop(changes, failure):
    assert is_format_failure(_record(**changes)) is failure


def test_a_length_finish_is_a_served_answer_cut_off() -> None:
    assert is_length_finish(_record(finish_reason="length"))
    assert not is_length_finish(_record())
    assert not is_length_finish(_failed("error", 500))


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
    assert sample.error_rate == 0.5 and sample.format_failure_rate == 0.0
    assert sample.length_finishes == 1
    assert sample.seconds_per_token == [1.0 / 20, 1.0 / 20]
    assert sample.completion_tokens == [20.0, 20.0]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"messages": [], "max_tokens": 1, "stop": ["\n"], "stream": True}, (1, True, True)),
        ({"messages": [], "stop": []}, (None, False, None)),
        ({"inputs": [{"prompt": "hi"}], "params": {"max_tokens": 8}}, (8, None, None)),
    ],
)
def test_each_record_carries_the_requests_own_choices(payload, expected) -> None:
    from phi3ops.serving.records import InferenceRecorder

    recorder = InferenceRecorder(model_name="m", model_version="1", experiment_id="0")
    ((record, _),) = recorder.records_for(
        payload, status_code=400, body={}, started=1.0, latency_s=0.1
    )
    assert (record.max_tokens, record.stop_given, record.stream) == expected
    assert stratum_of(record) == expected


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


def test_cmh_with_one_stratum_is_the_z_test_with_the_hypergeometric_variance() -> None:
    x1, n1, x2, n2 = 30, 400, 20, 380
    chi2, _, _, _ = stats.chi2_contingency([[x1, n1 - x1], [x2, n2 - x2]], correction=False)
    n = n1 + n2
    p = cmh_worse_pvalue([(x1, n1, x2, n2)])
    assert stats.norm.isf(p) ** 2 == pytest.approx(chi2 * (n - 1) / n, rel=1e-9)
    assert cmh_worse_pvalue([(x2, n2, x1, n1)]) == pytest.approx(1 - p, rel=1e-9)


def test_cmh_compares_within_strata_only() -> None:
    # Simpson's trap: the candidate got most of the max_tokens=1 requests, which are all cut
    # off on either arm. Pooled, it looks far worse; within each stratum it is the same.
    short, normal = (90, 100, 9, 10), (5, 100, 50, 1000)
    pooled = proportion_worse_pvalue(95, 200, 59, 1010)
    assert pooled is not None and pooled < 1e-6
    p = cmh_worse_pvalue([short, normal])
    assert p is not None and p > 0.3
    assert cmh_worse_pvalue([(30, 100, 5, 100), short]) < 0.001  # worse within one: found
    assert cmh_worse_pvalue([(90, 100, 0, 0), (5, 100, 0, 0)]) is None  # nothing comparable
    assert cmh_worse_pvalue([(10, 10, 10, 10)]) == 1.0


def test_stratified_rank_test_matches_scipy_in_one_stratum_and_ignores_the_mix() -> None:
    slow = [1.2 + 0.1 * (i % 9) for i in range(30)]
    fast = [1.0 + 0.1 * (i % 9) for i in range(40)]
    expected = stats.mannwhitneyu(
        slow, fast, alternative="greater", method="asymptotic", use_continuity=False
    ).pvalue
    assert stratified_rank_pvalue([(slow, fast)], alternative="greater") == pytest.approx(
        expected, rel=1e-9
    )
    two = stats.mannwhitneyu(
        slow, fast, alternative="two-sided", method="asymptotic", use_continuity=False
    ).pvalue
    assert stratified_rank_pvalue([(slow, fast)], alternative="two-sided") == pytest.approx(two)
    # One stratum takes ten times longer per token; the candidate has most of its records there.
    same = [0.1 + 0.01 * (i % 7) for i in range(50)]
    costly = [1.0 + 0.1 * (i % 7) for i in range(50)]
    p = stratified_rank_pvalue([(costly, costly[:5]), (same[:5], same)], alternative="greater")
    assert p is not None and p > 0.3
    assert stratified_rank_pvalue([(costly, [])], alternative="greater") is None
    assert stratified_rank_pvalue([([1.0, 1.0], [1.0, 1.0])], alternative="greater") == 1.0


def test_matched_records_give_both_arms_one_mix_of_strata() -> None:
    candidate = [_record(arm="candidate", max_tokens=1) for _ in range(30)]
    candidate += [_record(arm="candidate", max_tokens=64) for _ in range(10)]
    candidate += [_failed("refused", 400)]  # the client's: never matched
    champion = [_record(max_tokens=1) for _ in range(3)] + [_record(max_tokens=64)] * 50
    champion += [_record(max_tokens=8)] * 5  # a stratum the candidate lacks
    cand, champ = matched_records(candidate, champion)
    assert sorted(r.max_tokens for r in cand) == sorted(r.max_tokens for r in champ)
    assert [r.max_tokens for r in cand].count(1) == 3 and len(cand) == 13


# --- the red-team replay: a client steering its arm ------------------------------------------


def _traffic(
    arm: str,
    *,
    seed: int,
    normal: int,
    short: int,
    errors: float = 0.005,
    slow: float = 1.0,
    blank: float = 0.0,
) -> list[InferenceRecord]:
    """What one model does with ``normal`` requests (max_tokens=64) and ``short`` ones
    (max_tokens=1, each cut off, a third of them a lone whitespace token); ``errors``, ``slow``
    and ``blank`` make it worse on every request.
    """
    rng = random.Random(seed)
    records = []
    for max_tokens, n in ((64, normal), (1, short)):
        for _ in range(n):
            if rng.random() < errors:
                failed = _failed("error", 500)
                records.append(
                    dataclasses.replace(failed, arm=arm, max_tokens=max_tokens, stream=False)
                )
                continue
            if max_tokens == 1:
                tokens, finish, is_blank = 1, "length", rng.random() < 0.3 + blank
            else:
                tokens = rng.randint(10, 40)
                finish = "length" if rng.random() < 0.05 else "stop"
                is_blank = rng.random() < 0.01 + blank
            latency = slow * (0.25 + 0.04 * tokens) * rng.uniform(0.9, 1.1)
            records.append(
                _record(
                    arm=arm,
                    max_tokens=max_tokens,
                    stream=False,
                    latency_s=latency,
                    completion_tokens=tokens,
                    finish_reason=finish,
                    blank_response=is_blank,
                )
            )
    return records


def _verdict(candidate: list[InferenceRecord], champion: list[InferenceRecord]):
    cand = arm_sample(candidate, arm="candidate", version="2")
    champ = arm_sample(champion, arm="champion", version="1")
    tests = compare_arms(cand, champ, policy=POLICY)
    verdict, reasons = decide(cand, champ, tests, {}, policy=POLICY)
    return verdict, reasons, tests, cand, champ


def test_an_identical_candidate_whose_users_send_max_tokens_1_is_not_aborted() -> None:
    # The attack measured on main: a client probed which users land on the candidate, then
    # sent max_tokens=1 requests as those users; the champion's users send normal requests.
    candidate = _traffic("candidate", seed=1, normal=100, short=300)
    champion = _traffic("champion", seed=2, normal=400, short=20)
    verdict, reasons, tests, cand, champ = _verdict(candidate, champion)
    # Pooled as before, the client's choice reads as a broken, slow candidate.
    pooled = proportion_worse_pvalue(
        cand.length_finishes + cand.format_failures, cand.served,
        champ.length_finishes + champ.format_failures, champ.served,
    )  # fmt: skip
    assert pooled is not None and pooled < 1e-10
    assert rank_pvalue(cand.seconds_per_token, champ.seconds_per_token, alternative="greater") < (
        1e-10
    )
    assert verdict == "promote", reasons
    assert not any(t.worse for t in tests)
    # Compared where both arms have requests: the normal ones, and the champion's 20 short ones
    # against as many of the candidate's.
    (length,) = [t for t in tests if t.name == "length-finish-rate"]
    assert length.p_value is not None and length.p_value > POLICY.alpha


@pytest.mark.parametrize(
    ("normal", "short", "found"),
    [
        # the champion's own mix of requests: every way it is worse is found
        (400, 20, {"error-rate", "seconds-per-token", "format-failure-rate"}),
        # and under the steering attack, on the 100 normal requests left to compare
        (100, 300, {"error-rate", "seconds-per-token"}),
    ],
)
def test_a_truly_worse_candidate_is_aborted_on_the_same_requests(normal, short, found) -> None:
    # More server errors (5% vs 0.5%), 30% slower per token and 8 points more blank answers.
    candidate = _traffic(
        "candidate", seed=1, normal=normal, short=short, errors=0.05, slow=1.3, blank=0.08
    )
    champion = _traffic("champion", seed=2, normal=400, short=20)
    verdict, reasons, tests, _, _ = _verdict(candidate, champion)
    assert verdict == "abort"
    assert {t.name for t in tests if t.worse} >= found, reasons


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
