"""Promote versions through registry aliases: ``candidate`` -> ``champion``, old champion ->
``previous``; gates decide, every decision is recorded, and ``champion`` can be rolled back.

The gates are a pure function of two evaluations (`evaluate_gates`), compared only when both ran
the same eval set (same content hash). Alias moves happen under a per-model lock and re-read the
registry inside it, so two promotions racing leave ``champion`` on one of them and ``previous``
on the one before it, and re-running a promotion that already happened changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from filelock import FileLock
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from phi3ops import registry
from phi3ops.errors import RegistryError
from phi3ops.names import (
    CHAMPION_ALIAS,
    ERROR_RATE,
    LATENCY_P95,
    PASS_RATE,
    PREVIOUS_ALIAS,
    PROMOTION_TAG_PREFIX,
    RESTORED_BY_ROLLBACK_TAG,
    ROLLED_BACK_AT_TAG,
    RUN_TYPE_TAG,
    TAG_PASS_RATE_PREFIX,
    TAG_PREFIX,
    TOKENS_PER_S,
)
from phi3ops.policies import GatePolicy
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking

logger = logging.getLogger(__name__)


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

    @property
    def reasons(self) -> list[str]:
        """The failed gates' details (all gates' when it passed)."""
        failed = [g.detail for g in self.gates if not g.passed]
        return failed or [g.detail for g in self.gates]


class AliasState(BaseModel):
    """Where ``champion`` and ``previous`` point after an alias move."""

    model_name: str
    champion: str | None
    previous: str | None
    changed: bool
    action: Literal["promoted", "rejected", "unchanged", "rolled-back"]


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
    gates = [
        _at_least("pass_rate", m.get(PASS_RATE), policy.min_pass_rate),
        _at_most("latency_p95_s", m.get(LATENCY_P95), policy.max_latency_p95_s),
        _at_least("tokens_per_s", m.get(TOKENS_PER_S), policy.min_tokens_per_s),
        _at_most("error_rate", m.get(ERROR_RATE), policy.max_error_rate),
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
    if LATENCY_P95 in base:
        ceiling = base[LATENCY_P95] * (1 + policy.max_latency_increase)
        gates.append(
            _at_most(
                f"latency_p95_s vs {against}", cand.get(LATENCY_P95), ceiling, base[LATENCY_P95]
            )
        )
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


# --- the registry side ------------------------------------------------------------------------


def apply_decision(decision: Decision, *, triggered_by: str) -> AliasState:
    """Move the aliases if the decision promotes, record it on the version either way.

    Under the model's lock: the champion is re-read, so a promotion that already happened (or
    that another run made meanwhile) is detected instead of shifting ``previous`` twice.
    """
    name, version = decision.model_name, decision.version
    with promotion_lock(name):
        client = registry.client()
        champion = registry.alias_version(name, CHAMPION_ALIAS)
        previous = registry.alias_version(name, PREVIOUS_ALIAS)
        if champion == version:
            # Already the champion: nothing to move, and a "rejected" tag (stricter gates now)
            # would contradict the alias it keeps.
            state = AliasState(
                model_name=name,
                champion=champion,
                previous=previous,
                changed=False,
                action="unchanged",
            )
        elif not decision.promote:
            state = AliasState(
                model_name=name,
                champion=champion,
                previous=previous,
                changed=False,
                action="rejected",
            )
        else:
            if champion is not None:
                client.set_registered_model_alias(name, PREVIOUS_ALIAS, champion)
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
            state = AliasState(
                model_name=name,
                champion=version,
                previous=champion or previous,
                changed=True,
                action="promoted",
            )
        if state.action != "unchanged":  # a re-run of a done promotion records nothing new
            _tag_decision(client, decision, state, triggered_by=triggered_by)
    return state


def rollback(model_name: str, *, to_version: str | None = None, triggered_by: str) -> AliasState:
    """``champion`` <- ``previous`` (or ``to_version``); ``previous`` is cleared.

    Raises:
        RegistryError: there is no champion, or nothing to roll back to; nothing changed.
    """
    with promotion_lock(model_name):
        client = registry.client()
        champion = registry.alias_version(model_name, CHAMPION_ALIAS)
        previous = registry.alias_version(model_name, PREVIOUS_ALIAS)
        target = registry.resolve_version(model_name, to_version) if to_version else previous
        if champion is None:
            raise RegistryError(
                f"{model_name} has no champion to roll back: promote a version first "
                f"(`phi3ops promote`)."
            )
        if target is None:
            raise RegistryError(
                f"{model_name} has no previous champion to roll back to (champion is version "
                f"{champion}). Name a version instead: `phi3ops rollback --to-version N`."
            )
        if target == champion:
            raise RegistryError(
                f"Version {target} is already the champion of {model_name}: nothing to roll back."
            )
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, target)
        if previous is not None:
            client.delete_registered_model_alias(model_name, PREVIOUS_ALIAS)
        now = _now()
        client.set_model_version_tag(model_name, champion, ROLLED_BACK_AT_TAG, now)
        client.set_model_version_tag(
            model_name, target, RESTORED_BY_ROLLBACK_TAG, f"{now} by {triggered_by}"
        )
    return AliasState(
        model_name=model_name, champion=target, previous=None, changed=True, action="rolled-back"
    )


@contextlib.contextmanager
def promotion_lock(model_name: str, *, timeout: float = 120.0) -> Iterator[None]:
    """One alias move at a time per registered model, across threads and processes.

    A file lock under the data dir: it serialises everything that shares this machine (and the
    embedded store). Runs on several machines against one tracking server should also share a
    Prefect concurrency limit on the promote deployment (see prefect.yaml).
    """
    locks = get_settings().data_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"promote-{model_name}.lock", timeout=timeout):
        configure_tracking()
        yield


def decision_markdown(decision: Decision, state: AliasState, *, triggered_by: str) -> str:
    """A reviewer's summary of a promotion decision."""
    verdict = {
        "promoted": "PROMOTED to @champion",
        "unchanged": "already @champion (no change)",
        "rejected": "REJECTED (aliases untouched)",
    }.get(state.action, state.action)
    lines = [
        f"# {decision.model_name} v{decision.version}: {verdict}",
        "",
        f"- triggered by: {triggered_by}",
        f"- eval set hash: `{decision.eval_set_hash or '-'}`",
        f"- champion before: {decision.champion_version or '(none: first model)'}",
        f"- champion now: {state.champion or '-'}, previous: {state.previous or '-'}",
        "",
        "| gate | result | candidate | champion | threshold |",
        "|---|---|---|---|---|",
    ]
    for g in decision.gates:
        lines.append(
            f"| {g.gate} | {'pass' if g.passed else 'FAIL'} | {_fmt(g.candidate)} | "
            f"{_fmt(g.champion)} | {_fmt(g.threshold)} |"
        )
    failed = [g.detail for g in decision.gates if not g.passed]
    if failed:
        lines += ["", "Failed gates:", *[f"- {d}" for d in failed]]
    return "\n".join(lines) + "\n"


def record_decision(decision: Decision, state: AliasState, *, triggered_by: str) -> str:
    """Log the decision as an MLflow run (params, gate metrics, decision.json, markdown).

    Returns:
        The run id.
    """
    import mlflow

    configure_tracking()
    tags = {
        RUN_TYPE_TAG: "promotion",
        f"{TAG_PREFIX}model_name": decision.model_name,
        f"{TAG_PREFIX}model_version": decision.version,
        f"{TAG_PREFIX}decision": state.action,
        f"{TAG_PREFIX}triggered_by": triggered_by,
    }
    run_name = f"promote-{decision.model_name}-v{decision.version}"
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params(
            {
                "eval_set_hash": decision.eval_set_hash or "",
                "champion_before": decision.champion_version or "",
                "candidate_eval_run_id": decision.candidate_run_id or "",
                "champion_eval_run_id": decision.champion_run_id or "",
            }
        )
        mlflow.log_metric("promoted", float(state.action == "promoted"))
        mlflow.log_metric("gates_failed", float(sum(not g.passed for g in decision.gates)))
        mlflow.log_dict(
            {"decision": decision.model_dump(), "aliases": state.model_dump()}, "decision.json"
        )
        mlflow.log_text(
            decision_markdown(decision, state, triggered_by=triggered_by), "decision.md"
        )
    return run.info.run_id


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _tag_decision(client: Any, decision: Decision, state: AliasState, *, triggered_by: str) -> None:
    name, version = decision.model_name, decision.version
    tags = {
        "decision": state.action,
        "at": _now(),
        "triggered_by": triggered_by,
        "eval_set_hash": decision.eval_set_hash or "",
        "eval_run_id": decision.candidate_run_id or "",
        "champion_before": decision.champion_version or "",
        # MLflow caps tag values at 5000 characters.
        "reasons": json.dumps(decision.reasons)[:4900],
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, PROMOTION_TAG_PREFIX + key, value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- Prefect tasks: no retries (a registry write is not blindly repeatable), no cache -----------


@task(name="apply-promotion-decision", cache_policy=NO_CACHE)
def apply_decision_task(decision: Decision, *, triggered_by: str) -> AliasState:
    """Prefect wrapper of `apply_decision`."""
    return apply_decision(decision, triggered_by=triggered_by)


@task(name="record-promotion-decision", cache_policy=NO_CACHE)
def record_decision_task(decision: Decision, state: AliasState, *, triggered_by: str) -> str:
    """Prefect wrapper of `record_decision`."""
    return record_decision(decision, state, triggered_by=triggered_by)


@task(name="rollback-champion", cache_policy=NO_CACHE)
def rollback_task(model_name: str, *, to_version: str | None, triggered_by: str) -> AliasState:
    """Prefect wrapper of `rollback`."""
    return rollback(model_name, to_version=to_version, triggered_by=triggered_by)
