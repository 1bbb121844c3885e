"""The promotion gates, a pure function of two evaluations: may a version become champion, and
does a fresh re-evaluation of a version still pass?

Evaluations are compared only when both ran the same eval set (same content hash). Nothing here
reads or writes the registry; `tasks.promotion` applies the decisions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pydantic import BaseModel

from phi3ops.names import (
    ERROR_RATE,
    LATENCY_P95,
    PASS_RATE,
    S_PER_TOKEN_P95,
    TAG_PASS_RATE_PREFIX,
    TOKENS_PER_S,
    TTFT_P95,
)
from phi3ops.policies import GatePolicy

__all__ = [
    "Decision",
    "Evaluation",
    "GateResult",
    "check_regression",
    "evaluate_gates",
    "gate_metric",
    "threshold_text",
]


class Evaluation(Protocol):
    """What the gates need of an evaluation (`tasks.evaluation.EvalSummary` has it)."""

    run_id: str
    version: str
    eval_set_hash: str
    metrics: dict[str, float]


class GateResult(BaseModel):
    """One gate's verdict, with the numbers it compared."""

    gate: str
    passed: bool
    detail: str
    candidate: float | None = None
    champion: float | None = None
    threshold: float | None = None


#: The gated metrics for which lower is better: their gates are upper bounds.
UPPER_BOUNDED = (TTFT_P95, S_PER_TOKEN_P95, LATENCY_P95, ERROR_RATE)
#: Between a metric and its baseline in a margin gate's name: ``latency_p95_s vs champion``.
VERSUS = " vs "


def gate_metric(gate: GateResult) -> str:
    """The metric a gate reads: ``latency_p95_s vs champion`` reads ``latency_p95_s``."""
    return gate.gate.split(VERSUS, 1)[0]


def threshold_text(gate: GateResult, *, fmt: Callable[[float], str] = "{:.4g}".format) -> str:
    """The gate's bound as a reader sees it: ``≥ 0.6``, ``≤ 2.5``; ``—`` when it has none."""
    if gate.threshold is None:
        return "—"
    sign = "≤" if gate_metric(gate) in UPPER_BOUNDED else "≥"
    return f"{sign} {fmt(gate.threshold)}"


class Decision(BaseModel):
    """The outcome of the gates for one candidate."""

    model_name: str
    version: str
    promote: bool
    gates: list[GateResult]
    eval_set_hash: str | None
    candidate_run_id: str | None
    champion_version: str | None
    champion_run_id: str | None
    #: Set when the version passed every gate and went to live traffic (``canary`` /
    #: ``shadow``) instead of being promoted: the canary verdict promotes it.
    live_traffic: str | None = None

    @property
    def reasons(self) -> list[str]:
        """The failed gates' details (all gates' when it passed)."""
        failed = [g.detail for g in self.gates if not g.passed]
        return failed or [g.detail for g in self.gates]


# --- the gates (pure) -------------------------------------------------------------------------


def evaluate_gates(
    model_name: str,
    version: str,
    candidate: Evaluation | None,
    champion: Evaluation | None,
    *,
    champion_version: str | None,
    policy: GatePolicy,
) -> Decision:
    """Decide whether ``version`` may become champion.

    Args:
        model_name: Registered model.
        version: The candidate version.
        candidate: Its evaluation on the required eval set, or None when it has none.
        champion: The current champion's evaluation on the same eval set, or None.
        champion_version: The current champion version; None for the first model ever.
        policy: Thresholds.

    Returns:
        The decision, with one `GateResult` per gate checked.
    """
    gates: list[GateResult] = []
    if candidate is None:
        gates.append(
            GateResult(
                gate="evaluation",
                passed=False,
                detail=f"version {version} has no evaluation on the required eval set: run "
                f"`phi3ops evaluate --model-uri models:/{model_name}/{version}` first",
            )
        )
        return _decision(model_name, version, gates, candidate, champion, champion_version)

    m = candidate.metrics
    gates += _absolute_gates(m, policy)

    if champion_version is not None and champion_version != version:
        if champion is None or champion.eval_set_hash != candidate.eval_set_hash:
            gates.append(
                GateResult(
                    gate="champion-comparison",
                    passed=False,
                    detail=f"champion version {champion_version} has no evaluation on eval set "
                    f"{candidate.eval_set_hash[:12]}, so the two cannot be compared: evaluate "
                    f"the champion on it (the promote flow does when evaluate_champion=True)",
                )
            )
        else:
            gates += _versus_baseline(m, champion.metrics, policy, against="champion")
    return _decision(model_name, version, gates, candidate, champion, champion_version)


def check_regression(
    model_name: str,
    version: str,
    fresh: Evaluation,
    earlier: Evaluation | None,
    *,
    policy: GatePolicy,
) -> Decision:
    """Whether a fresh re-evaluation of ``version`` still passes the gates: the absolute ones,
    and "not worse than its own earlier evaluation on the same eval set by more than a margin".

    ``promote`` of the result means "no regression"; nothing here moves an alias.
    """
    gates = _absolute_gates(fresh.metrics, policy)
    if earlier is not None and earlier.eval_set_hash == fresh.eval_set_hash:
        gates += _versus_baseline(fresh.metrics, earlier.metrics, policy, against="earlier run")
    return _decision(model_name, version, gates, fresh, earlier, champion_version=version)


def _absolute_gates(m: dict[str, float], policy: GatePolicy) -> list[GateResult]:
    gates = [_at_least(PASS_RATE, m.get(PASS_RATE), policy.min_pass_rate)]
    # Latency SLOs are the user's to set: checked only when set (the model's speed depends on
    # the machine; the margins against the champion judge it on the same one).
    for key, slo in (
        (TTFT_P95, policy.max_ttft_p95_s),
        (S_PER_TOKEN_P95, policy.max_s_per_token_p95),
        (LATENCY_P95, policy.max_latency_p95_s),
    ):
        if slo is not None:
            gates.append(_at_most(key, m.get(key), slo))
    gates += [
        _at_least(TOKENS_PER_S, m.get(TOKENS_PER_S), policy.min_tokens_per_s),
        _at_most(ERROR_RATE, m.get(ERROR_RATE), policy.max_error_rate),
    ]
    for tag, minimum in sorted(policy.min_tag_pass_rate.items()):
        gates.append(_at_least(f"pass_rate.{tag}", m.get(TAG_PASS_RATE_PREFIX + tag), minimum))
    return gates


def _versus_baseline(
    cand: dict[str, float], base: dict[str, float], policy: GatePolicy, *, against: str
) -> list[GateResult]:
    """The margin gates against a baseline evaluation (the champion's, or an earlier run's)."""
    gates = []
    for key in sorted(k for k in cand if k == PASS_RATE or k.startswith(TAG_PASS_RATE_PREFIX)):
        if key in base:
            floor = base[key] - policy.max_pass_rate_drop
            gates.append(_at_least(f"{key} vs {against}", cand[key], floor, base[key]))
    # Time to first token: only where both were measured (a flavor that cannot stream has
    # none; the candidate's notes say so). Whole-request latency: only when its margin is set.
    for key, margin, need_candidate in (
        (TTFT_P95, policy.max_ttft_increase, True),
        (S_PER_TOKEN_P95, policy.max_s_per_token_increase, False),
        (LATENCY_P95, policy.max_latency_increase, False),
    ):
        if margin is None or key not in base or (need_candidate and key not in cand):
            continue
        ceiling = base[key] * (1 + margin)
        gates.append(_at_most(f"{key}{VERSUS}{against}", cand.get(key), ceiling, base[key]))
    if TOKENS_PER_S in base:
        floor = base[TOKENS_PER_S] * (1 - policy.max_tokens_per_s_drop)
        gates.append(
            _at_least(
                f"tokens_per_s vs {against}", cand.get(TOKENS_PER_S), floor, base[TOKENS_PER_S]
            )
        )
    if ERROR_RATE in base:
        ceiling = base[ERROR_RATE] + policy.max_error_rate_increase
        gates.append(
            _at_most(f"error_rate vs {against}", cand.get(ERROR_RATE), ceiling, base[ERROR_RATE])
        )
    return gates


def _at_least(
    gate: str, value: float | None, threshold: float, champion: float | None = None
) -> GateResult:
    return _gate(gate, value, threshold, champion, higher_is_better=True)


def _at_most(
    gate: str, value: float | None, threshold: float, champion: float | None = None
) -> GateResult:
    return _gate(gate, value, threshold, champion, higher_is_better=False)


def _gate(
    gate: str,
    value: float | None,
    threshold: float,
    champion: float | None,
    *,
    higher_is_better: bool,
) -> GateResult:
    if value is None:
        return GateResult(
            gate=gate, passed=False, detail=f"{gate}: not measured", threshold=threshold
        )
    passed = value >= threshold if higher_is_better else value <= threshold
    sign = {(True, True): ">=", (True, False): "<", (False, True): "<=", (False, False): ">"}
    return GateResult(
        gate=gate,
        passed=passed,
        detail=f"{gate}: {value:.4g} {sign[higher_is_better, passed]} {threshold:.4g}",
        candidate=value,
        champion=champion,
        threshold=threshold,
    )


def _decision(
    model_name: str,
    version: str,
    gates: list[GateResult],
    candidate: Evaluation | None,
    champion: Evaluation | None,
    champion_version: str | None,
) -> Decision:
    return Decision(
        model_name=model_name,
        version=version,
        promote=all(g.passed for g in gates),
        gates=gates,
        eval_set_hash=candidate.eval_set_hash if candidate else None,
        candidate_run_id=candidate.run_id if candidate else None,
        champion_version=champion_version,
        champion_run_id=champion.run_id if champion else None,
    )
