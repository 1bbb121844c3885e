"""Starting and stopping live traffic for ``@candidate``: the one check and write behind
``phi3ops canary start`` / ``stop`` and the promotion flow's canary mode.

A plan is read and written under the model's alias lock (`tasks.alias_lock`), like every alias
move: the check that ``@candidate`` differs from ``@champion`` and the plan written stay true
together, and a verdict ending one plan never clears another started meanwhile.
"""

from __future__ import annotations

from prefect import task

from phi3ops.errors import InvalidInputError
from phi3ops.names import CANDIDATE_ALIAS, CHAMPION_ALIAS
from phi3ops.registry import alias_version
from phi3ops.traffic import TrafficMode, TrafficPlan, clear_plan, read_plan, write_plan
from tasks.alias_lock import promotion_lock


def start_plan(
    model_name: str,
    *,
    mode: TrafficMode | str,
    share: float | None = None,
    version: str | None = None,
) -> tuple[TrafficPlan, TrafficPlan | None, str]:
    """Puts ``@candidate`` on live traffic beside ``@champion`` (replacing any other plan).

    Args:
        model_name: The registered model.
        mode: ``canary`` or ``shadow``.
        share: Canary only: the share of requests ``@candidate`` answers (default 0.1).
        version: The version meant to take part; it must be ``@candidate`` (servers follow
            the alias). None: whatever ``@candidate`` names.

    Returns:
        (the plan started, the plan it replaced or None, the champion's version).

    Raises:
        InvalidInputError: No champion, no candidate other than the champion, a ``version``
            that is not the candidate, or a mode / share that does not fit.
    """
    TrafficPlan.start(mode, share=share)  # a mode or share that cannot work fails first
    with promotion_lock(model_name):
        return _start_plan(model_name, mode=mode, share=share, version=version)


def _start_plan(
    model_name: str, *, mode: TrafficMode | str, share: float | None, version: str | None
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
            f"v{version} of {model_name} is not @{CANDIDATE_ALIAS} (v{candidate}): servers "
            f"put @{CANDIDATE_ALIAS} on live traffic, so move the alias to v{version} first."
        )
    plan = TrafficPlan.start(mode, share=share, candidate_version=candidate)
    before = read_plan(model_name)
    write_plan(model_name, plan)
    return plan, before, champion


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
    model_name: str, *, mode: TrafficMode, share: float | None = None, version: str | None = None
) -> tuple[TrafficPlan, TrafficPlan | None, str]:
    """`start_plan`, as a task."""
    return start_plan(model_name, mode=mode, share=share, version=version)
