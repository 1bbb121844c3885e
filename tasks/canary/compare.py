"""Comparing the two arms: what each arm did, the tests, and the verdict they give
(`tasks.canary`'s docstring says what is counted where and why).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from scipy import stats

from phi3ops.policies import CanaryPolicy
from phi3ops.serving.records import CLIENT_OUTCOMES, InferenceRecord
from phi3ops.traffic import Arm
from tasks.monitoring import Check

Verdict = Literal["promote", "abort", "wait"]
#: What a verdict run ended with: no plan to judge, wait, or the verdict carried out.
Outcome = Literal["no-canary", "wait", "promoted", "aborted"]
#: The outcome of each verdict once carried out (a rejected promotion turns ``promote`` into
#: ``aborted``; the flow says so).
OUTCOME_OF: dict[Verdict, Outcome] = {"wait": "wait", "promote": "promoted", "abort": "aborted"}

#: Outcomes that are the server failing a request (`phi3ops.serving.records.OUTCOMES`).
SERVER_FAILURES = frozenset({"error", "shed"})


# --- one arm's sample -------------------------------------------------------------------------


def is_format_failure(record: InferenceRecord) -> bool:
    """Whether a served answer is unusable as an answer: blank, leaking chat-template tokens
    (``<|end|>``...), or cut off by ``max_tokens`` (finish reason ``length``).

    The one definition of a format failure; records without an answer are never one.
    """
    if record.outcome != "served":
        return False
    return bool(
        record.blank_response
        or (record.template_tokens or 0) > 0
        or record.finish_reason == "length"
    )


@dataclass(frozen=True)
class ArmSample:
    """What one arm did in the window: counts, and the values the rank tests compare."""

    arm: str
    version: str
    records: int  # every record in the window
    judged: int  # records that judge the server (not client outcomes, not shed shadow copies)
    errors: int  # server failures among the judged
    served: int
    format_failures: int  # among the served
    refused: int = 0  # the client's: counted apart
    cancelled: int = 0
    shed_shadow: int = 0
    seconds_per_token: list[float] = field(default_factory=list)
    completion_tokens: list[float] = field(default_factory=list)

    @property
    def error_rate(self) -> float | None:
        """Server failures per judged record; None without any."""
        return self.errors / self.judged if self.judged else None

    @property
    def format_failure_rate(self) -> float | None:
        """Format failures per served answer; None without any."""
        return self.format_failures / self.served if self.served else None


def arm_sample(records: Sequence[InferenceRecord], *, arm: str, version: str) -> ArmSample:
    """One arm's counts and samples (see the module docstring for what counts where)."""
    client = [r for r in records if r.outcome in CLIENT_OUTCOMES]
    shed_shadow = [r for r in records if r.shadow and r.outcome == "shed"]
    judged = [
        r
        for r in records
        if r.outcome not in CLIENT_OUTCOMES and not (r.shadow and r.outcome == "shed")
    ]
    served = [r for r in judged if r.outcome == "served"]
    timed = [r for r in served if (r.completion_tokens or 0) > 0]
    return ArmSample(
        arm=arm,
        version=str(version),
        records=len(records),
        judged=len(judged),
        errors=sum(r.outcome in SERVER_FAILURES for r in judged),
        served=len(served),
        format_failures=sum(is_format_failure(r) for r in served),
        refused=sum(r.outcome == "refused" for r in client),
        cancelled=sum(r.outcome == "cancelled" for r in client),
        shed_shadow=len(shed_shadow),
        seconds_per_token=[r.latency_s / (r.completion_tokens or 1) for r in timed],
        completion_tokens=[
            float(r.completion_tokens) for r in served if r.completion_tokens is not None
        ],
    )


# --- the statistics ---------------------------------------------------------------------------


def proportion_worse_pvalue(
    failures: int, total: int, base_failures: int, base_total: int
) -> float | None:
    """One-sided two-proportion z-test (pooled variance): the p-value of "the first rate is
    higher than the second" under "they are equal". None when either side has no records.
    """
    if not total or not base_total:
        return None
    pooled = (failures + base_failures) / (total + base_total)
    variance = pooled * (1 - pooled) * (1 / total + 1 / base_total)
    if variance == 0:  # both sides all failures or none: no difference to test
        return 1.0
    z = (failures / total - base_failures / base_total) / math.sqrt(variance)
    return float(stats.norm.sf(z))


def rank_pvalue(
    values: Sequence[float],
    base: Sequence[float],
    *,
    alternative: Literal["greater", "two-sided"],
) -> float | None:
    """Mann-Whitney U p-value of ``values`` against ``base`` ("greater": ``values`` tend to be
    larger); None with fewer than 2 values on either side.
    """
    if len(values) < 2 or len(base) < 2:
        return None
    p = float(stats.mannwhitneyu(values, base, alternative=alternative).pvalue)
    return 1.0 if math.isnan(p) else p  # all values tied: no evidence either way


@dataclass(frozen=True)
class Comparison:
    """One comparison of the arms."""

    name: str
    test: str
    candidate: float | None
    champion: float | None
    p_value: float | None  # None: not run (too few values)
    worse: bool  # significant at the policy's alpha, in the direction that is worse

    def line(self) -> str:
        """One line for reasons and the markdown."""
        p = "not run" if self.p_value is None else f"p={self.p_value:.2g}"
        return (
            f"{self.name}: candidate {fmt_value(self.candidate)} vs champion "
            f"{fmt_value(self.champion)} ({self.test}, {p})"
        )


def compare_arms(
    candidate: ArmSample, champion: ArmSample, *, policy: CanaryPolicy
) -> list[Comparison]:
    """The four tests of the candidate against the champion (module docstring)."""

    def result(
        name: str, test: str, cand: float | None, champ: float | None, p: float | None
    ) -> Comparison:
        # The one-sided tests only flag a candidate that is worse; the two-sided one flags a
        # change either way.
        return Comparison(name, test, cand, champ, p, worse=p is not None and p < policy.alpha)

    z_test = "two-proportion z-test, one-sided"
    return [
        result(
            "error-rate",
            z_test,
            candidate.error_rate,
            champion.error_rate,
            proportion_worse_pvalue(
                candidate.errors, candidate.judged, champion.errors, champion.judged
            ),
        ),
        result(
            "format-failure-rate",
            z_test,
            candidate.format_failure_rate,
            champion.format_failure_rate,
            proportion_worse_pvalue(
                candidate.format_failures,
                candidate.served,
                champion.format_failures,
                champion.served,
            ),
        ),
        result(
            "seconds-per-token",
            "Mann-Whitney U, one-sided (median shown)",
            _median(candidate.seconds_per_token),
            _median(champion.seconds_per_token),
            rank_pvalue(
                candidate.seconds_per_token, champion.seconds_per_token, alternative="greater"
            ),
        ),
        result(
            "completion-tokens",
            "Mann-Whitney U, two-sided (median shown)",
            _median(candidate.completion_tokens),
            _median(champion.completion_tokens),
            rank_pvalue(
                candidate.completion_tokens, champion.completion_tokens, alternative="two-sided"
            ),
        ),
    ]


def needed_samples(
    candidate: ArmSample, champion: ArmSample, *, policy: CanaryPolicy
) -> dict[str, int]:
    """How many more judged records each arm needs before a verdict (0: enough)."""
    return {
        sample.arm: max(0, policy.min_samples - sample.judged) for sample in (candidate, champion)
    }


def decide(
    candidate: ArmSample,
    champion: ArmSample,
    tests: Sequence[Comparison],
    suites: dict[str, list[Check]],
    *,
    policy: CanaryPolicy,
) -> tuple[Verdict, list[str]]:
    """The verdict and its reasons (module docstring).

    Args:
        candidate: The candidate arm.
        champion: The champion arm.
        tests: `compare_arms`' results.
        suites: Each arm's expectation results (``candidate``, ``champion``); may be empty
            while waiting.
        policy: The thresholds.
    """
    needed = needed_samples(candidate, champion, policy=policy)
    if any(needed.values()):
        more = ", ".join(f"{n} more {arm} record(s)" for arm, n in needed.items() if n)
        return "wait", [
            f"too few records to judge: candidate {candidate.judged}, champion {champion.judged} "
            f"(each needs {policy.min_samples}, PHI3OPS_CANARY_MIN_SAMPLES); waiting for {more}"
        ]
    reasons = [f"worse on live traffic: {t.line()}" for t in tests if t.worse]
    champion_broken = {c.name for c in suites.get(Arm.CHAMPION, []) if c.success is False}
    for check in suites.get(Arm.CANDIDATE, []):
        if check.success is False and check.name not in champion_broken:
            reasons.append(
                f"expectation {check.name} broken by the candidate only ({check.observed}): "
                f"{check.guards_against}"
            )
    if reasons:
        return "abort", reasons
    held = [f"no worse: {t.line()}" for t in tests]
    both = sorted(
        champion_broken & {c.name for c in suites.get(Arm.CANDIDATE, []) if c.success is False}
    )
    if both:
        held.append(
            f"both arms break {', '.join(both)} (the monitor's concern, not the candidate's)"
        )
    return "promote", held


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def fmt_value(value: float | None) -> str:
    """A value for tables and reasons, ``-`` for none."""
    return "-" if value is None else f"{value:.4g}"
