"""Promote versions through registry aliases: ``candidate`` -> ``champion``, old champion ->
``previous``; every decision is recorded, and ``champion`` can be rolled back.

The gates decide (`tasks.gates`, re-exported here); this module carries decisions out. Every
alias change (a promotion, a rejection, a rollback) runs under the model's lock (`tasks.alias_lock`:
a Prefect global concurrency limit across hosts, or a file lock on one machine), in this order:

1. A change that a dead process left half-done is finished first (see below).
2. The aliases are re-read. A decision taken against a champion that is no longer the champion
   is *stale*: nothing moves, and the promote flow decides again against the new champion.
3. The change is written down as an *intent* before anything moves: the registered model's
   ``phi3ops.intent`` tag names it (id, operation, version), that version's tag holds the plan.
4. Its steps run, each safe to repeat: the aliases; the version's tags; for a decision, its
   MLflow run (one per intent, found again by the intent id) and its Prefect event (whose id is
   the intent's, so Prefect's triggers see a repeat once). Then the intent is cleared.

Each write step of 3-4 first checks the lock's fence (`tasks.alias_lock.AliasFence`): a holder
paused past its lease, whose lock another process took meanwhile, stops with
`AliasLockLostError` before its next write instead of undoing the other holder's change.

A process killed anywhere in 3-4 leaves the intent; the next promotion or rollback of the model
finishes it under the lock (so never beside the live process that wrote it), and a re-run of the
same command reports that finished change (``resumed``) instead of making a new one. Two
promotions racing leave ``champion`` on one of them; the other finds its decision stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ValidationError

from phi3ops import registry
from phi3ops.crash import crash_point, owner
from phi3ops.errors import RegistryError
from phi3ops.names import (
    CHAMPION_ALIAS,
    INTENT_ID_TAG,
    INTENT_TAG,
    OWNER_TAG,
    PREVIOUS_ALIAS,
    PROMOTED_EVENT,
    REJECTED_EVENT,
    RESTORED_BY_ROLLBACK_TAG,
    ROLLED_BACK_AT_TAG,
    ROLLED_BACK_EVENT,
    RUN_TYPE_TAG,
    TAG_PREFIX,
)
from phi3ops.tracking import configure_tracking, version_url
from tasks.alias_lock import AliasFence, promotion_lock
from tasks.events import emit, prefect_is_listening
from tasks.gates import Decision, Evaluation, GateResult, check_regression, evaluate_gates
from tasks.status import write_decision_tags

__all__ = [
    "AliasState",
    "Decision",
    "Evaluation",
    "GateResult",
    "Intent",
    "apply_decision",
    "apply_decision_task",
    "check_regression",
    "decision_markdown",
    "evaluate_gates",
    "pending_intent",
    "promotion_lock",
    "record_decision",
    "rollback",
    "rollback_task",
    "tag_decision",
]

logger = logging.getLogger(__name__)


class AliasState(BaseModel):
    """Where ``champion`` and ``previous`` point after an alias change, and what happened."""

    model_name: str
    champion: str | None
    previous: str | None
    changed: bool
    action: Literal["promoted", "rejected", "unchanged", "stale", "rolled-back", "live-traffic"]
    #: This finished a change that an interrupted run of the same command had started.
    resumed: bool = False
    #: The MLflow run recording the decision (promotions and rejections).
    run_id: str | None = None


class Intent(BaseModel):
    """An alias change, written down before any of it happens so that any later run can finish
    it exactly as planned.
    """

    id: str
    op: Literal["promote", "rollback"]
    model_name: str
    version: str  # the candidate (promote) or the version restored (rollback)
    action: Literal["promoted", "rejected", "rolled-back"]
    champion_before: str | None
    previous_before: str | None
    triggered_by: str
    at: str
    decision: Decision | None = None  # promote only

    def state(self, *, resumed: bool, run_id: str | None = None) -> AliasState:
        """Where the aliases point once the change is done."""
        champion: str | None
        previous: str | None
        if self.action == "promoted":
            champion, previous = self.version, self.champion_before or self.previous_before
        elif self.action == "rejected":
            champion, previous = self.champion_before, self.previous_before
        else:
            champion, previous = self.version, None
        return AliasState(
            model_name=self.model_name,
            champion=champion,
            previous=previous,
            changed=self.action != "rejected",
            action=self.action,
            resumed=resumed,
            run_id=run_id,
        )


# --- the two operations -------------------------------------------------------------------------


def apply_decision(decision: Decision, *, triggered_by: str) -> AliasState:
    """Carry out a decision: move the aliases if it promotes, and record it either way (version
    tags, a decision run, a Prefect event).

    Returns:
        ``unchanged`` when the version is the champion already (nothing recorded); ``stale``
        when the champion is not the one the decision compared with (nothing moved or recorded:
        decide again); else ``promoted`` or ``rejected``, with the decision run. When a
        crashed run of this same promotion was finished instead, its outcome, ``resumed``.
    """
    name, version = decision.model_name, decision.version
    with promotion_lock(name) as fence:
        resumed = _finish_pending(name, op="promote", version=version, fence=fence)
        if resumed is not None:
            return resumed
        champion = registry.alias_version(name, CHAMPION_ALIAS)
        previous = registry.alias_version(name, PREVIOUS_ALIAS)
        if champion == version:
            # Already the champion: nothing to move, and a "rejected" tag (stricter gates now)
            # would contradict the alias it keeps.
            return AliasState(
                model_name=name,
                champion=champion,
                previous=previous,
                changed=False,
                action="unchanged",
            )
        if champion != decision.champion_version:
            logger.warning(
                "%s: the champion is version %s, not %s as when version %s was decided: stale",
                name,
                champion,
                decision.champion_version,
                version,
            )
            return AliasState(
                model_name=name, champion=champion, previous=previous, changed=False, action="stale"
            )
        intent = _intent(
            "promote",
            decision.model_name,
            version,
            "promoted" if decision.promote else "rejected",
            champion=champion,
            previous=previous,
            triggered_by=triggered_by,
            decision=decision,
        )
        _write_intent(intent, fence=fence)
        crash_point("promote.after-intent")
        return _carry_out(intent, resumed=False, fence=fence)


def rollback(model_name: str, *, to_version: str | None = None, triggered_by: str) -> AliasState:
    """``champion`` <- ``previous`` (or ``to_version``); ``previous`` is cleared; the rolled-back
    and the restored versions are tagged, and a Prefect event announces it.

    Returns:
        Where the aliases point now; ``resumed`` when a crashed rollback was finished instead.

    Raises:
        RegistryError: there is no champion, or nothing to roll back to; nothing changed.
    """
    with promotion_lock(model_name) as fence:
        resumed = _finish_pending(model_name, op="rollback", version=to_version, fence=fence)
        if resumed is not None:
            return resumed
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
        intent = _intent(
            "rollback",
            model_name,
            target,
            "rolled-back",
            champion=champion,
            previous=previous,
            triggered_by=triggered_by,
        )
        _write_intent(intent, fence=fence)
        crash_point("rollback.after-intent")
        return _carry_out(intent, resumed=False, fence=fence)


# --- intents: written first, carried out step by step, finished by whoever finds one ------------


def pending_intent(model_name: str) -> Intent | None:
    """The alias change of ``model_name`` that was written down and not finished, if any.

    Read-only, so safe outside the lock; a change in progress elsewhere shows here too.
    """
    return _read_intent(model_name)[1]


def _read_intent(model_name: str) -> tuple[bool, Intent | None]:
    """(whether the pointer exists, the plan it points at); a plan that is missing, unreadable
    or another intent's reads as None.
    """
    from mlflow.exceptions import MlflowException

    try:
        tags = registry.client().get_registered_model(model_name).tags or {}
    except MlflowException:
        return False, None
    pointer = tags.get(INTENT_TAG)
    if not pointer:
        return False, None
    intent = None
    with contextlib.suppress(ValueError, KeyError, TypeError, ValidationError):
        head = json.loads(pointer)
        version = registry.get_version(model_name, head["version"])
        plan = (version.tags or {}).get(INTENT_TAG) if version is not None else None
        intent = Intent.model_validate_json(plan) if plan else None
        if intent is not None and intent.id != head["id"]:
            intent = None
    return True, intent


def _intent(
    op: Literal["promote", "rollback"],
    model_name: str,
    version: str,
    action: Literal["promoted", "rejected", "rolled-back"],
    *,
    champion: str | None,
    previous: str | None,
    triggered_by: str,
    decision: Decision | None = None,
) -> Intent:
    return Intent(
        id=str(uuid.uuid4()),
        op=op,
        model_name=model_name,
        version=version,
        action=action,
        champion_before=champion,
        previous_before=previous,
        triggered_by=triggered_by,
        at=_now(),
        decision=decision,
    )


def _write_intent(intent: Intent, *, fence: AliasFence) -> None:
    """The pointer first, then the plan (a version tag: no length limit that matters)."""
    client = registry.client()
    head = {"id": intent.id, "op": intent.op, "version": intent.version}
    fence.check(f"write down its {intent.op} of version {intent.version}")
    client.set_registered_model_tag(intent.model_name, INTENT_TAG, json.dumps(head))
    client.set_model_version_tag(
        intent.model_name, intent.version, INTENT_TAG, intent.model_dump_json()
    )


def _clear_intent(intent: Intent, *, fence: AliasFence) -> None:
    """The plan first, then the pointer (a pointer without a plan is dropped when found)."""
    client = registry.client()
    fence.check(f"clear the finished {intent.op} of version {intent.version}")
    client.delete_model_version_tag(intent.model_name, intent.version, INTENT_TAG)
    client.delete_registered_model_tag(intent.model_name, INTENT_TAG)


def _finish_pending(
    model_name: str,
    *,
    op: Literal["promote", "rollback"],
    version: str | None,
    fence: AliasFence,
) -> AliasState | None:
    """Finish the change a dead process left, if any (the caller holds the model's lock).

    Returns:
        Its outcome when it was the caller's own change (same operation, and same version
        unless ``version`` is None): a re-run finishing it; else None.
    """
    pointer, intent = _read_intent(model_name)
    if intent is None:
        if pointer:  # its process died before writing the plan, or after clearing it
            fence.check("drop a dangling intent pointer")
            registry.client().delete_registered_model_tag(model_name, INTENT_TAG)
        return None
    logger.warning(
        "%s: finishing the %s of version %s that an interrupted run (%s, %s) started",
        model_name,
        intent.op,
        intent.version,
        intent.triggered_by,
        intent.at,
    )
    state = _carry_out(intent, resumed=True, fence=fence)
    return state if intent.op == op and version in (None, intent.version) else None


def _carry_out(intent: Intent, *, resumed: bool, fence: AliasFence) -> AliasState:
    """Every step of the change, each one safe to repeat; the one path for fresh and resumed.
    Each write step checks the lock's fence first.
    """
    if intent.op == "rollback":
        return _carry_out_rollback(intent, resumed=resumed, fence=fence)
    return _carry_out_decision(intent, resumed=resumed, fence=fence)


def _carry_out_decision(intent: Intent, *, resumed: bool, fence: AliasFence) -> AliasState:
    client = registry.client()
    name, version, decision = intent.model_name, intent.version, intent.decision
    if decision is None:
        raise RegistryError(f"The promotion intent {intent.id} of {name} holds no decision.")
    if intent.action == "promoted":
        fence.check(f"move @{CHAMPION_ALIAS} to version {version}")
        if intent.champion_before is not None:
            client.set_registered_model_alias(name, PREVIOUS_ALIAS, intent.champion_before)
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
        crash_point("promote.after-aliases")
    state = intent.state(resumed=resumed)
    fence.check(f"tag the decision on version {version}")
    tag_decision(decision, state, triggered_by=intent.triggered_by, at=intent.at)
    crash_point("promote.after-tags")
    fence.check(f"record the decision run of version {version}")
    run_id = _decision_run(intent, decision, state)
    crash_point("promote.after-run")
    fence.check(f"announce the decision on version {version}")
    _announce(
        PROMOTED_EVENT if intent.action == "promoted" else REJECTED_EVENT,
        intent=intent,
        payload={
            "reasons": decision.reasons,
            "champion": state.champion,
            "previous": state.previous,
            "eval_set_hash": decision.eval_set_hash,
            "triggered_by": intent.triggered_by,
            "decision_run_id": run_id,
        },
    )
    crash_point("promote.after-event")
    _clear_intent(intent, fence=fence)
    return state.model_copy(update={"run_id": run_id})


def _carry_out_rollback(intent: Intent, *, resumed: bool, fence: AliasFence) -> AliasState:
    client = registry.client()
    name, target, before = intent.model_name, intent.version, intent.champion_before
    fence.check(f"move @{CHAMPION_ALIAS} back to version {target}")
    client.set_registered_model_alias(name, CHAMPION_ALIAS, target)
    crash_point("rollback.after-champion")
    fence.check(f"clear @{PREVIOUS_ALIAS}")
    client.delete_registered_model_alias(name, PREVIOUS_ALIAS)  # a no-op when there is none
    crash_point("rollback.after-previous")
    fence.check(f"tag the rollback to version {target}")
    if before is not None:
        client.set_model_version_tag(name, before, ROLLED_BACK_AT_TAG, intent.at)
    client.set_model_version_tag(
        name, target, RESTORED_BY_ROLLBACK_TAG, f"{intent.at} by {intent.triggered_by}"
    )
    crash_point("rollback.after-tags")
    fence.check(f"announce the rollback to version {target}")
    _announce(
        ROLLED_BACK_EVENT,
        intent=intent,
        payload={"triggered_by": intent.triggered_by, "rolled_back": before},
    )
    _clear_intent(intent, fence=fence)
    return intent.state(resumed=resumed)


def _announce(event: str, *, intent: Intent, payload: dict[str, Any]) -> None:
    """The change's Prefect event, its id the intent's: announcing it again (a re-run finishing
    a crash) is the same event, which Prefect's triggers act on once. Skipped outside Prefect.
    """
    if prefect_is_listening():
        emit(
            event,
            model_name=intent.model_name,
            version=intent.version,
            payload=payload,
            event_id=uuid.UUID(intent.id),
        )


def _decision_run(intent: Intent, decision: Decision, state: AliasState) -> str:
    """The intent's decision run: the finished one if it exists, else a new one. A RUNNING one
    was left by the dead process that held the lock before: it is ended as FAILED.
    """
    experiment_id = configure_tracking()
    client = registry.client()
    for run in client.search_runs(
        [experiment_id], filter_string=f"tags.`{INTENT_ID_TAG}` = '{intent.id}'"
    ):
        if run.info.status == "FINISHED":
            return str(run.info.run_id)
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")
    return record_decision(decision, state, triggered_by=intent.triggered_by, intent_id=intent.id)


# --- the records ------------------------------------------------------------------------------


def decision_markdown(decision: Decision, state: AliasState, *, triggered_by: str) -> str:
    """A reviewer's summary of a promotion decision."""
    verdict = {
        "promoted": "PROMOTED to @champion",
        "unchanged": "already @champion (no change)",
        "rejected": "REJECTED (aliases untouched)",
        "live-traffic": f"passed every gate: now on live traffic ({decision.live_traffic}); "
        "the canary verdict promotes it",
    }.get(state.action, state.action)
    url = version_url(decision.model_name, decision.version)  # None for a local store
    lines = [
        f"# {decision.model_name} v{decision.version}: {verdict}",
        "",
        f"- triggered by: {triggered_by}",
        f"- eval set hash: `{decision.eval_set_hash or '-'}`",
        f"- champion before: {decision.champion_version or '(none: first model)'}",
        f"- champion now: {state.champion or '-'}, previous: {state.previous or '-'}",
        *(["- finished after an interrupted run of the same promotion"] if state.resumed else []),
        *([f"- MLflow: [{decision.model_name} v{decision.version}]({url})"] if url else []),
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


def record_decision(
    decision: Decision, state: AliasState, *, triggered_by: str, intent_id: str | None = None
) -> str:
    """Log the decision as an MLflow run (params, gate metrics, decision.json, markdown).

    `apply_decision` records every decision it carries out; call this only for a decision that
    did not go through it.

    Args:
        decision: The decision.
        state: Where the aliases point after it.
        triggered_by: Who or what asked for it.
        intent_id: The intent the decision carries out (tagged, so a re-run finds the run).

    Returns:
        The run id.
    """
    from mlflow.entities import Metric, Param

    experiment_id = configure_tracking()
    client = registry.client()
    tags = {
        RUN_TYPE_TAG: "promotion",
        f"{TAG_PREFIX}model_name": decision.model_name,
        f"{TAG_PREFIX}model_version": decision.version,
        f"{TAG_PREFIX}decision": state.action,
        f"{TAG_PREFIX}triggered_by": triggered_by,
        OWNER_TAG: owner(),
    }
    if intent_id is not None:
        tags[INTENT_ID_TAG] = intent_id
    run_name = f"promote-{decision.model_name}-v{decision.version}"
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    try:
        params = {
            "eval_set_hash": decision.eval_set_hash or "",
            "champion_before": decision.champion_version or "",
            "candidate_eval_run_id": decision.candidate_run_id or "",
            "champion_eval_run_id": decision.champion_run_id or "",
        }
        now = int(datetime.now(UTC).timestamp() * 1000)
        metrics = {
            "promoted": float(state.action == "promoted"),
            "gates_failed": float(sum(not g.passed for g in decision.gates)),
        }
        client.log_batch(
            run_id,
            metrics=[Metric(key, value, now, 0) for key, value in metrics.items()],
            params=[Param(key, value) for key, value in params.items()],
        )
        crash_point("promote.during-run")
        client.log_dict(
            run_id,
            {"decision": decision.model_dump(), "aliases": state.model_dump()},
            "decision.json",
        )
        client.log_text(
            run_id, decision_markdown(decision, state, triggered_by=triggered_by), "decision.md"
        )
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return str(run_id)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def tag_decision(decision: Decision, state: AliasState, *, triggered_by: str, at: str) -> None:
    """Tag the version with the decision taken on it (and rewrite its description)."""
    fields = {
        "decision": state.action,
        "at": at,
        "triggered_by": triggered_by,
        "eval_set_hash": decision.eval_set_hash or "",
        "eval_run_id": decision.candidate_run_id or "",
        "champion_before": decision.champion_version or "",
        "reasons": json.dumps(decision.reasons),
    }
    write_decision_tags(decision.model_name, decision.version, fields)  # tags, then description


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- Prefect tasks: no retries (the next run finishes a change instead), no cache -------------


@task(name="apply-promotion-decision", cache_policy=NO_CACHE)
def apply_decision_task(decision: Decision, *, triggered_by: str) -> AliasState:
    """Prefect wrapper of `apply_decision`."""
    return apply_decision(decision, triggered_by=triggered_by)


@task(name="rollback-champion", cache_policy=NO_CACHE)
def rollback_task(model_name: str, *, to_version: str | None, triggered_by: str) -> AliasState:
    """Prefect wrapper of `rollback`."""
    return rollback(model_name, to_version=to_version, triggered_by=triggered_by)
