"""Stage 4 — promote: gates on the candidate's evaluation (vs the champion's, same eval set),
then ``champion`` <- candidate and ``previous`` <- old champion, or a recorded rejection.

Reads like the pipeline: the candidate's evaluation → the champion's on the same set (evaluated
first when missing) → the gates → carried out under the model's lock. If the champion changed in
between (another promotion won the race), the decision is stale and taken again against the new
champion. A re-run after a crash finishes the interrupted promotion (`tasks.promotion`).
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.evaluate import evaluate_flow
from phi3ops.errors import RegistryError
from phi3ops.evalset import open_eval_set
from phi3ops.names import CANDIDATE_ALIAS, CHAMPION_ALIAS, artifact_key
from phi3ops.policies import GateOverrides
from phi3ops.registry import alias_version, resolve_model_name, resolve_version
from phi3ops.settings import get_settings
from phi3ops.traffic import CanaryShare, TrafficMode
from tasks.canary import start_plan_task
from tasks.evaluation import EvalSummary, find_evaluation_task
from tasks.events import default_trigger
from tasks.promotion import (
    AliasState,
    Decision,
    apply_decision_task,
    decision_markdown,
    evaluate_gates,
)

#: How many times one promotion decides again when the champion keeps moving under it.
MAX_DECISIONS = 3


@flow(name="promote", log_prints=True)
def promote_flow(
    model_name: str | None = None,
    candidate: str = CANDIDATE_ALIAS,
    eval_set: str | None = None,
    evaluate_champion: bool = True,
    gates: GateOverrides | None = None,
    triggered_by: str | None = None,
    live_traffic: TrafficMode | None = None,
    canary_share: CanaryShare | None = None,
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
        live_traffic: Empty: promote at once. 'canary' or 'shadow': a version that passes
            every gate (and is @candidate, with a champion to compare with) first takes live
            traffic beside @champion; the canary deployment's verdict promotes it.
        canary_share: With live_traffic 'canary': the share of requests @candidate answers
            (between 0 and 1; empty: 0.1).

    Returns:
        The decision (``promote`` says whether the gates passed; ``live_traffic`` is set when
        the version went to live traffic instead of moving the aliases).

    Raises:
        RegistryError: The champion changed every time a decision was about to be applied.
    """
    name = resolve_model_name(model_name)
    policy = get_settings().gates.with_overrides(gates)
    who = triggered_by or default_trigger()
    version = resolve_version(name, candidate)
    eval_hash = open_eval_set(eval_set).content_hash

    candidate_eval = find_evaluation_task(name, version, eval_hash)
    for _ in range(MAX_DECISIONS):
        champion_version = alias_version(name, CHAMPION_ALIAS)
        decision = evaluate_gates(
            name,
            version,
            candidate_eval,
            _champion_evaluation(
                name,
                champion_version,
                candidate=version,
                eval_set=eval_set,
                eval_hash=eval_hash,
                evaluate=evaluate_champion,
            ),
            champion_version=champion_version,
            policy=policy,
        )
        if live_traffic is not None and decision.promote and champion_version is not None:
            return _go_live(decision, live_traffic, share=canary_share, triggered_by=who)
        state = apply_decision_task(decision, triggered_by=who)
        if state.action != "stale":
            break
        print(
            f"The champion of {name} moved from version {champion_version or '-'} to "
            f"{state.champion} before v{version} was decided: deciding again against it."
        )
    else:
        raise RegistryError(
            f"The champion of {name} changed {MAX_DECISIONS} times while version {version} was "
            f"being decided: run the promotion again once the other promotions are done."
        )

    if state.action == "unchanged":
        print(f"{name} v{version} is already the champion: nothing to do.")
        return decision
    if state.resumed:
        print(f"Finished the promotion of {name} v{version} that an interrupted run started.")
    markdown = decision_markdown(decision, state, triggered_by=who)
    create_markdown_artifact(
        markdown=markdown, key=artifact_key("promotion", name), description="Promotion decision"
    )
    print(markdown)
    return decision


def _go_live(
    decision: Decision, mode: TrafficMode, *, share: float | None, triggered_by: str
) -> Decision:
    """Puts a version that passed every gate on live traffic instead of promoting it."""
    name, version = decision.model_name, decision.version
    plan, _, champion = start_plan_task(
        name, mode=mode, share=share, version=version, decision=decision
    )
    decision = decision.model_copy(update={"live_traffic": plan.mode.value})
    state = AliasState(
        model_name=name, champion=champion, previous=None, changed=False, action="live-traffic"
    )
    markdown = decision_markdown(decision, state, triggered_by=triggered_by)
    create_markdown_artifact(
        markdown=markdown, key=artifact_key("promotion", name), description="Promotion decision"
    )
    print(markdown)
    return decision


def _champion_evaluation(
    name: str,
    champion: str | None,
    *,
    candidate: str,
    eval_set: str | None,
    eval_hash: str,
    evaluate: bool,
) -> EvalSummary | None:
    """The champion's evaluation on the eval set (evaluating it first when allowed and
    missing); None when there is no other champion to compare with.
    """
    if champion is None or champion == candidate:
        return None
    found = find_evaluation_task(name, champion, eval_hash)
    if found is None and evaluate:
        found = evaluate_flow(model_uri=f"models:/{name}/{champion}", eval_set=eval_set)
    return found
