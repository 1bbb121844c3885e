"""Starting and stopping live traffic for ``@candidate``: the one check and write behind
``phi3ops canary start`` / ``stop`` and the promotion flow's canary mode.

A plan is read and written under the model's alias lock (`tasks.alias_lock`), like every alias
move: the check that ``@candidate`` differs from ``@champion`` and the plan written stay true
together, and a verdict ending one plan never clears another started meanwhile.

Only a gated candidate takes traffic: the plan pins the version (servers serve that version,
whatever ``@candidate`` names later), and that version must hold a passing gate decision
against the current champion on an eval set the champion was evaluated on. The promotion flow
hands its decision in (and it is tagged on the version, ``phi3ops.promotion.decision`` =
``live-traffic``); ``phi3ops canary start`` reads those tags.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from prefect import task

from phi3ops.errors import InvalidInputError
from phi3ops.names import (
    CANARY_TAG_PREFIX,
    CANDIDATE_ALIAS,
    CHAMPION_ALIAS,
    PROMOTION_TAG_PREFIX,
    LineageTag,
)
from phi3ops.registry import alias_version, get_version
from phi3ops.sources import Flavor
from phi3ops.traffic import TrafficMode, TrafficPlan, clear_plan, read_plan, write_plan
from tasks.alias_lock import promotion_lock
from tasks.evaluation.resolve import evaluation_tag_key
from tasks.gates import Decision
from tasks.promotion import AliasState, tag_decision

_log = logging.getLogger(__name__)

#: The promotion decision a version holds once it passed every gate and went to live traffic.
LIVE_TRAFFIC_DECISION = "live-traffic"


def start_plan(
    model_name: str,
    *,
    mode: TrafficMode | str,
    share: float | None = None,
    version: str | None = None,
    decision: Decision | None = None,
) -> tuple[TrafficPlan, TrafficPlan | None, str]:
    """Puts ``@candidate`` on live traffic beside ``@champion`` (replacing any other plan).

    Args:
        model_name: The registered model.
        mode: ``canary`` or ``shadow``.
        share: Canary only: the share of requests ``@candidate`` answers (default 0.1).
        version: The version meant to take part; it must be ``@candidate``. None: whatever
            ``@candidate`` names. The plan pins it: servers serve it, not a later ``@candidate``.
        decision: The passing gate decision the promotion flow just took on it (tagged on the
            version here); None: the version's tags must hold one (`gate_problem`).

    Returns:
        (the plan started, the plan it replaced or None, the champion's version).

    Raises:
        InvalidInputError: No champion, no candidate other than the champion, a ``version``
            that is not the candidate, a candidate without a passing gate decision against
            this champion, or a mode / share that does not fit.
    """
    TrafficPlan.start(mode, share=share)  # a mode or share that cannot work fails first
    with promotion_lock(model_name):
        return _start_plan(model_name, mode=mode, share=share, version=version, decision=decision)


def _start_plan(
    model_name: str,
    *,
    mode: TrafficMode | str,
    share: float | None,
    version: str | None,
    decision: Decision | None,
) -> tuple[TrafficPlan, TrafficPlan | None, str]:
    champion = alias_version(model_name, CHAMPION_ALIAS)
    candidate = alias_version(model_name, CANDIDATE_ALIAS)
    if champion is None:
        raise InvalidInputError(
            f"{model_name} has no @{CHAMPION_ALIAS}: promote a version first (`phi3ops "
            "promote`), then put the next one on canary."
        )
    if candidate is None or candidate == champion:
        raise InvalidInputError(
            f"{model_name} has no @{CANDIDATE_ALIAS} other than @{CHAMPION_ALIAS} "
            f"(v{champion}): register a new version first (`phi3ops package`)."
        )
    if version is not None and version != candidate:
        raise InvalidInputError(
            f"v{version} of {model_name} is not @{CANDIDATE_ALIAS} (v{candidate}): a plan "
            f"starts with @{CANDIDATE_ALIAS}, so move the alias to v{version} first."
        )
    eval_hash: str | None
    if decision is not None:
        eval_hash = _check_decision(decision, candidate=candidate, champion=champion)
        state = AliasState(
            model_name=model_name,
            champion=champion,
            previous=None,
            changed=False,
            action=LIVE_TRAFFIC_DECISION,
        )
        at = datetime.now(UTC).isoformat(timespec="seconds")
        tag_decision(decision, state, triggered_by="live traffic", at=at)
    else:
        problem, eval_hash = gate_problem(model_name, candidate, champion=champion)
        if problem is not None:
            raise InvalidInputError(
                f"v{candidate} of {model_name} cannot take live traffic: {problem}. Only a "
                f"version that passed every gate against @{CHAMPION_ALIAS} (v{champion}) on its "
                f"eval set does: evaluate it (`phi3ops evaluate --model-uri "
                f"models:/{model_name}/{candidate}`), then `phi3ops promote --candidate "
                f"{candidate} --live-traffic {TrafficMode(mode).value}`."
            )
    plan = TrafficPlan.start(
        mode,
        share=share,
        candidate_version=candidate,
        champion_version=champion,
        eval_set_hash=eval_hash,
        streams_to_champion=_cannot_stream(model_name, candidate, champion=champion),
    )
    if plan.streams_to_champion:
        _log.warning(
            "v%s of %s cannot stream (transformers flavor) and @%s v%s can: streamed requests "
            "stay with @%s during this %s, and count for neither arm's verdict.",
            candidate,
            model_name,
            CHAMPION_ALIAS,
            champion,
            CHAMPION_ALIAS,
            plan.mode.value,
        )
    before = read_plan(model_name)
    write_plan(model_name, plan)
    return plan, before, champion


def _check_decision(decision: Decision, *, candidate: str, champion: str) -> str:
    """The eval set hash of ``decision``, once it is a passing one on ``candidate`` against
    ``champion``.
    """
    if not decision.promote or decision.version != candidate:
        raise InvalidInputError(
            f"v{decision.version} cannot take live traffic as @{CANDIDATE_ALIAS} (v{candidate}): "
            f"its decision {'is on another version' if decision.promote else 'rejected it'}."
        )
    if decision.champion_version != champion or not decision.eval_set_hash:
        raise InvalidInputError(
            f"v{candidate} was gated against v{decision.champion_version or '-'}, but "
            f"@{CHAMPION_ALIAS} is v{champion} now: decide again (`phi3ops promote`)."
        )
    return decision.eval_set_hash


def gate_problem(model_name: str, version: str, *, champion: str) -> tuple[str | None, str | None]:
    """Why ``version`` may not take live traffic beside ``champion`` (None: it may), and the
    eval set hash its gates passed on.

    It may when its promotion decision is ``live-traffic`` (it passed every gate and went to
    live traffic), taken against ``champion``, on an eval set ``champion`` has an evaluation
    on, and no canary verdict aborted it since.
    """
    tags = _tags(model_name, version)
    decision = tags.get(f"{PROMOTION_TAG_PREFIX}decision")
    if decision != LIVE_TRAFFIC_DECISION:
        return (
            f"its promotion decision is {decision!r}, not a pass of every gate"
            if decision
            else "it has no promotion decision (it was never gated)"
        ), None
    against = tags.get(f"{PROMOTION_TAG_PREFIX}champion_before") or None
    if against != champion:
        return f"its gates compared it with v{against or '-'}, not with v{champion}", None
    eval_hash = tags.get(f"{PROMOTION_TAG_PREFIX}eval_set_hash") or ""
    if not eval_hash or evaluation_tag_key(eval_hash) not in _tags(model_name, champion):
        return (
            f"its gates passed on an eval set (hash {eval_hash[:12] or '-'}) that "
            f"@{CHAMPION_ALIAS} has no evaluation on"
        ), None
    verdict_at = tags.get(f"{CANARY_TAG_PREFIX}at", "")
    if tags.get(f"{CANARY_TAG_PREFIX}verdict") == "aborted" and verdict_at >= tags.get(
        f"{PROMOTION_TAG_PREFIX}at", ""
    ):
        return f"the canary verdict aborted it at {verdict_at}", None
    return None, eval_hash


def _cannot_stream(model_name: str, candidate: str, *, champion: str) -> bool:
    """Whether ``candidate`` cannot answer the streamed requests ``champion`` answers (only
    the ONNX flavor streams).
    """

    def flavor(version: str) -> str | None:
        return _tags(model_name, version).get(LineageTag.FLAVOR.value)

    return flavor(candidate) == Flavor.TRANSFORMERS.value != flavor(champion)


def _tags(model_name: str, version: str) -> dict[str, str]:
    found = get_version(model_name, version)
    return dict((found.tags or {}) if found is not None else {})


def stop_plan(model_name: str, *, plan_id: str | None = None) -> TrafficPlan | None:
    """Ends the model's traffic plan (``@champion`` answers everything again).

    Args:
        model_name: The registered model.
        plan_id: End the plan only if it is still this one (a verdict ends the plan it
            judged, never one started since); None: whatever plan there is.

    Returns:
        The plan ended, or None when there was none (or another one).
    """
    with promotion_lock(model_name):
        current = read_plan(model_name)
        if current is None or (plan_id is not None and current.id != plan_id):
            return None
        clear_plan(model_name)
        return current


@task(name="start-live-traffic")
def start_plan_task(
    model_name: str,
    *,
    mode: TrafficMode,
    share: float | None = None,
    version: str | None = None,
    decision: Decision | None = None,
) -> tuple[TrafficPlan, TrafficPlan | None, str]:
    """`start_plan`, as a task."""
    return start_plan(model_name, mode=mode, share=share, version=version, decision=decision)
