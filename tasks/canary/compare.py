"""Comparing the two arms: what each arm did, the tests, and the verdict they give
(`tasks.canary`'s docstring says what is counted where and why).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
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

#: A request's own choices (`InferenceRecord`'s ``max_tokens``, ``stop_given``, ``stream``):
#: arms are compared only within a stratum, so what a client asks for cannot differ between
#: them. ``max_tokens`` is exact: a cut-off at 1 token compares only with cut-offs at 1 token.
Stratum = tuple[int | None, bool | None, bool | None]


def stratum_of(record: InferenceRecord) -> Stratum:
    """The stratum of a record: the request's ``max_tokens``, whether it gave ``stop``, stream."""
    return (record.max_tokens, record.stop_given, record.stream)


def prompt_size(record: InferenceRecord) -> int | None:
    """The prompt's size class (powers of two of its tokens): time per token is compared only
    between prompts of one class, since a long prompt costs time before the first token.
    """
    tokens = record.prompt_tokens
    return None if tokens is None else max(0, int(tokens)).bit_length()


def is_judged(record: InferenceRecord) -> bool:
    """Whether a record judges the server: not a client outcome (`CLIENT_OUTCOMES`: refused,
    cancelled) and not a shadow copy the server shed to protect the champion.
    """
    return record.outcome not in CLIENT_OUTCOMES and not (
        record.shadow and record.outcome == "shed"
    )


def is_format_failure(record: InferenceRecord) -> bool:
    """Whether a served answer is unusable as an answer: blank or leaking chat-template tokens
    (``<|end|>``...). A blank answer that ended on the client's own ``stop`` sequence is the
    client's choice, not the model's. (A cut-off is `is_length_finish`, judged per stratum.)

    The one definition of a format failure; records without an answer are never one.
    """
    if record.outcome != "served":
        return False
    blank = bool(record.blank_response) and not (
        record.stop_given and record.finish_reason == "stop"
    )
    return blank or (record.template_tokens or 0) > 0


def is_length_finish(record: InferenceRecord) -> bool:
    """Whether a served answer was cut off by ``max_tokens`` (finish reason ``length``): only
    evidence against a model next to answers of the same ``max_tokens``.
    """
    return record.outcome == "served" and record.finish_reason == "length"


@dataclass(frozen=True)
class StratumCounts:
    """What one arm did in one stratum."""

    judged: int = 0
    errors: int = 0
    served: int = 0
    format_failures: int = 0
    length_finishes: int = 0


@dataclass(frozen=True)
class ArmSample:
    """What one arm did in the window: counts, and the values the rank tests compare (each
    also per stratum, which is what the tests read).
    """

    arm: str
    version: str
    records: int  # every record in the window
    judged: int  # records that judge the server (not client outcomes, not shed shadow copies)
    errors: int  # server failures among the judged
    served: int
    format_failures: int  # among the served: blank or template tokens
    refused: int = 0  # the client's: counted apart
    cancelled: int = 0
    shed_shadow: int = 0
    length_finishes: int = 0  # among the served
    seconds_per_token: list[float] = field(default_factory=list)
    completion_tokens: list[float] = field(default_factory=list)
    strata: dict[Stratum, StratumCounts] = field(default_factory=dict)
    #: seconds per token by (stratum, prompt size); completion tokens by stratum
    timings: dict[tuple[Stratum, int | None], list[float]] = field(default_factory=dict)
    lengths: dict[Stratum, list[float]] = field(default_factory=dict)

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
    judged = [r for r in records if is_judged(r)]
    served = [r for r in judged if r.outcome == "served"]
    timed = [r for r in served if (r.completion_tokens or 0) > 0]
    strata: dict[Stratum, StratumCounts] = {}
    for r in judged:
        c = strata.get(stratum_of(r), StratumCounts())
        strata[stratum_of(r)] = StratumCounts(
            judged=c.judged + 1,
            errors=c.errors + (r.outcome in SERVER_FAILURES),
            served=c.served + (r.outcome == "served"),
            format_failures=c.format_failures + is_format_failure(r),
            length_finishes=c.length_finishes + is_length_finish(r),
        )
    timings: dict[tuple[Stratum, int | None], list[float]] = {}
    for r in timed:
        timings.setdefault((stratum_of(r), prompt_size(r)), []).append(
            r.latency_s / (r.completion_tokens or 1)
        )
    lengths: dict[Stratum, list[float]] = {}
    for r in served:
        if r.completion_tokens is not None:
            lengths.setdefault(stratum_of(r), []).append(float(r.completion_tokens))
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
        length_finishes=sum(is_length_finish(r) for r in served),
        seconds_per_token=[r.latency_s / (r.completion_tokens or 1) for r in timed],
        completion_tokens=[
            float(r.completion_tokens) for r in served if r.completion_tokens is not None
        ],
        strata=strata,
        timings=timings,
        lengths=lengths,
    )


def comparable_judged(candidate: ArmSample, champion: ArmSample) -> dict[str, int]:
    """Each arm's judged records in the strata both arms have: the records a verdict rests on."""
    shared = candidate.strata.keys() & champion.strata.keys()
    return {
        sample.arm: sum(sample.strata[s].judged for s in shared) for sample in (candidate, champion)
    }


def matched_records(
    candidate: Sequence[InferenceRecord], champion: Sequence[InferenceRecord]
) -> tuple[list[InferenceRecord], list[InferenceRecord]]:
    """Judged records of both arms with one mix of strata, for the expectation suites (which
    read each arm as one sample): in each stratum both arms have, as many records of each arm
    as the smaller side has, spread evenly over the window.
    """
    by_arm: list[dict[Stratum, list[InferenceRecord]]] = [{}, {}]
    for grouped, records in zip(by_arm, (candidate, champion), strict=True):
        for r in records:
            if is_judged(r):
                grouped.setdefault(stratum_of(r), []).append(r)
    out: tuple[list[InferenceRecord], list[InferenceRecord]] = ([], [])
    for stratum in sorted(by_arm[0].keys() & by_arm[1].keys(), key=repr):
        k = min(len(by_arm[0][stratum]), len(by_arm[1][stratum]))
        for matched, grouped in zip(out, by_arm, strict=True):
            rows = grouped[stratum]
            matched.extend(rows[i * len(rows) // k] for i in range(k))
    return out


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


def cmh_worse_pvalue(tables: Sequence[tuple[int, int, int, int]]) -> float | None:
    """One-sided Cochran-Mantel-Haenszel test over strata (no continuity correction): the
    p-value of "the first rate is higher than the second within strata" under "equal within
    each stratum". Each table is (failures, total, base failures, base total) of one stratum;
    a stratum one side lacks says nothing. None when no stratum has both sides.

    With one stratum it is the two-proportion z-test with the hypergeometric variance
    (``N - 1`` for ``N``).
    """
    excess, variance, shared = 0.0, 0.0, False
    for failures, total, base_failures, base_total in tables:
        n = total + base_total
        if not total or not base_total:
            continue
        shared = True
        failed = failures + base_failures
        excess += failures - total * failed / n
        if n > 1:
            variance += total * base_total * failed * (n - failed) / (n * n * (n - 1))
    if not shared:
        return None
    if variance == 0:  # all failures or none in every stratum: no difference to test
        return 1.0
    return float(stats.norm.sf(excess / math.sqrt(variance)))


def stratified_rank_pvalue(
    pairs: Sequence[tuple[Sequence[float], Sequence[float]]],
    *,
    alternative: Literal["greater", "two-sided"],
) -> float | None:
    """Van Elteren's stratified Wilcoxon-Mann-Whitney test: each stratum's rank sum of the
    first values against the second, weighted by ``1 / (n + 1)`` and combined (normal
    approximation, ties corrected, no continuity correction). "greater": the first values tend
    to be larger. Strata one side lacks say nothing; None with fewer than 2 values on either
    side in the strata both have.
    """
    statistic, variance, counts = 0.0, 0.0, [0, 0]
    for values, base in pairs:
        n1, n2 = len(values), len(base)
        if not n1 or not n2:
            continue
        counts[0], counts[1] = counts[0] + n1, counts[1] + n2
        n = n1 + n2
        ranks = stats.rankdata([*values, *base])
        _, ties = np.unique(ranks, return_counts=True)
        tie_term = float(np.sum(ties**3 - ties)) / (n * (n - 1)) if n > 1 else 0.0
        statistic += (float(np.sum(ranks[:n1])) - n1 * (n + 1) / 2) / (n + 1)
        variance += n1 * n2 * ((n + 1) - tie_term) / 12 / (n + 1) ** 2
    if min(counts) < 2:
        return None
    if variance == 0:  # all values tied: no evidence either way
        return 1.0
    z = statistic / math.sqrt(variance)
    return float(stats.norm.sf(z) if alternative == "greater" else 2 * stats.norm.sf(abs(z)))


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
    """The five tests of the candidate against the champion, each within the strata both arms
    have (module docstring); the values shown are each arm's over those strata.
    """

    def result(
        name: str, test: str, cand: float | None, champ: float | None, p: float | None
    ) -> Comparison:
        # The one-sided tests only flag a candidate that is worse; the two-sided one flags a
        # change either way.
        return Comparison(name, test, cand, champ, p, worse=p is not None and p < policy.alpha)

    shared = sorted(candidate.strata.keys() & champion.strata.keys(), key=repr)

    def rate(name: str, count: str, total: str) -> Comparison:
        tables = [
            (
                getattr(candidate.strata[s], count),
                getattr(candidate.strata[s], total),
                getattr(champion.strata[s], count),
                getattr(champion.strata[s], total),
            )
            for s in shared
        ]
        tables = [t for t in tables if t[1] and t[3]]
        champ_total = sum(t[3] for t in tables)
        # Shown: the champion's rate, and the candidate's in the champion's mix of strata.
        return result(
            name,
            "Cochran-Mantel-Haenszel over strata, one-sided; candidate in the champion's mix",
            sum(t[3] / champ_total * t[0] / t[1] for t in tables) if champ_total else None,
            sum(t[2] for t in tables) / champ_total if champ_total else None,
            cmh_worse_pvalue(tables),
        )

    timed = sorted(candidate.timings.keys() & champion.timings.keys(), key=repr)
    lengths = [s for s in shared if s in candidate.lengths and s in champion.lengths]
    ranks = "van Elteren (Mann-Whitney U per stratum, combined)"
    return [
        rate("error-rate", "errors", "judged"),
        rate("format-failure-rate", "format_failures", "served"),
        rate("length-finish-rate", "length_finishes", "served"),
        result(
            "seconds-per-token",
            f"{ranks}, one-sided (medians of matched values shown)",
            *_matched_medians(candidate.timings, champion.timings, timed),
            stratified_rank_pvalue(
                [(candidate.timings[k], champion.timings[k]) for k in timed],
                alternative="greater",
            ),
        ),
        result(
            "completion-tokens",
            f"{ranks}, two-sided (medians of matched values shown)",
            *_matched_medians(candidate.lengths, champion.lengths, lengths),
            stratified_rank_pvalue(
                [(candidate.lengths[k], champion.lengths[k]) for k in lengths],
                alternative="two-sided",
            ),
        ),
    ]


def needed_samples(
    candidate: ArmSample, champion: ArmSample, *, policy: CanaryPolicy
) -> dict[str, int]:
    """How many more comparable judged records (in strata both arms have) each arm needs
    before a verdict (0: enough).
    """
    have = comparable_judged(candidate, champion)
    return {arm: max(0, policy.min_samples - n) for arm, n in have.items()}


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
        have = comparable_judged(candidate, champion)
        return "wait", [
            f"too few comparable records to judge (requests of the same max_tokens, stop and "
            f"stream on both arms): candidate {have[candidate.arm]} of {candidate.judged}, "
            f"champion {have[champion.arm]} of {champion.judged} (each needs "
            f"{policy.min_samples}, PHI3OPS_CANARY_MIN_SAMPLES); waiting for {more}"
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


def _matched_medians(
    values: dict[Any, list[float]], base: dict[Any, list[float]], keys: Sequence[Any]
) -> tuple[float | None, float | None]:
    """Each side's median over the same number of values per stratum (spread evenly), so that
    neither median is the other's mix of strata.
    """
    picked: tuple[list[float], list[float]] = ([], [])
    for key in keys:
        k = min(len(values[key]), len(base[key]))
        for out, sample in zip(picked, (values[key], base[key]), strict=True):
            out.extend(sorted(sample)[i * len(sample) // k] for i in range(k))
    return _median(picked[0]), _median(picked[1])


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def fmt_value(value: float | None) -> str:
    """A value for tables and reasons, ``-`` for none."""
    return "-" if value is None else f"{value:.4g}"
