"""Stage 4 — promote: gates on the candidate's evaluation (vs the champion's, same eval set),
then ``champion`` <- candidate and ``previous`` <- old champion, or a recorded rejection.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.evaluate import evaluate_flow
from phi3ops.evalset import open_eval_set
from phi3ops.names import (
    CANDIDATE_ALIAS,
    CHAMPION_ALIAS,
    PROMOTED_EVENT,
    REJECTED_EVENT,
    artifact_key,
)
from phi3ops.policies import GateOverrides
from phi3ops.registry import alias_version, resolve_model_name, resolve_version
from phi3ops.settings import get_settings
from tasks.evaluation import find_evaluation_task
from tasks.events import default_trigger, emit
from tasks.promotion import (
    Decision,
    apply_decision_task,
    decision_markdown,
    evaluate_gates,
    record_decision_task,
)


@flow(name="promote", log_prints=True)
def promote_flow(
    model_name: str | None = None,
    candidate: str = CANDIDATE_ALIAS,
    eval_set: str | None = None,
    evaluate_champion: bool = True,
    gates: GateOverrides | None = None,
    triggered_by: str | None = None,
) -> Decision:
    """Promote ``candidate`` (a version or an alias) to champion if every gate passes.

    Args:
        model_name: Registered model; defaults to ``PHI3OPS_REGISTERED_MODEL_NAME``.
        candidate: Version number or alias of the version to promote.
        eval_set: Eval set (name or path) both evaluations must share; default set if None.
        evaluate_champion: Evaluate the champion on that set first when it has no such
            evaluation (otherwise the comparison gate fails).
        gates: Overrides of the gates in settings (``PHI3OPS_GATE_*``), e.g.
            ``{"min_pass_rate": 0.7}``.
        triggered_by: Recorded with the decision; defaults to the deployment / flow run.

    Returns:
        The decision (``promote`` says whether the aliases moved).
    """
    name = resolve_model_name(model_name)
    policy = get_settings().gates.with_overrides(gates)
    who = triggered_by or default_trigger()
    version = resolve_version(name, candidate)
    eval_hash = open_eval_set(eval_set).content_hash

    candidate_eval = find_evaluation_task(name, version, eval_hash)
    champion_version = alias_version(name, CHAMPION_ALIAS)
    champion_eval = None
    if champion_version is not None and champion_version != version:
        champion_eval = find_evaluation_task(name, champion_version, eval_hash)
        if champion_eval is None and evaluate_champion:
            champion_eval = evaluate_flow(
                model_uri=f"models:/{name}/{champion_version}", eval_set=eval_set
            )

    decision = evaluate_gates(
        name,
        version,
        candidate_eval,
        champion_eval,
        champion_version=champion_version,
        policy=policy,
    )
    state = apply_decision_task(decision, triggered_by=who)
    if state.action == "unchanged":
        print(f"{name} v{version} is already the champion: nothing to do.")
        return decision

    record_decision_task(decision, state, triggered_by=who)
    markdown = decision_markdown(decision, state, triggered_by=who)
    create_markdown_artifact(
        markdown=markdown, key=artifact_key("promotion", name), description="Promotion decision"
    )
    emit(
        PROMOTED_EVENT if state.action == "promoted" else REJECTED_EVENT,
        model_name=name,
        version=version,
        payload={
            "reasons": decision.reasons,
            "champion": state.champion,
            "previous": state.previous,
            "eval_set_hash": eval_hash,
            "triggered_by": who,
        },
    )
    print(markdown)
    return decision
