"""Stage 4 — rollback: ``champion`` <- ``previous`` (or a named version), then a smoke
evaluation of the restored champion.

The alias change, its tags and its ``rolled-back`` event are one crash-safe change
(`tasks.promotion.rollback`): a re-run after a crash finishes it rather than rolling back again.
"""

from __future__ import annotations

from prefect import flow

from flows.evaluate import evaluate_flow
from phi3ops.registry import resolve_model_name
from tasks.events import default_trigger
from tasks.promotion import AliasState, rollback_task

SMOKE_EVAL_SET = "smoke"


@flow(name="rollback", log_prints=True)
def rollback_flow(
    model_name: str | None = None,
    to_version: str | None = None,
    smoke_eval_set: str | None = SMOKE_EVAL_SET,
    triggered_by: str | None = None,
) -> AliasState:
    """Restore the previous champion (or ``to_version``) and smoke-test it.

    Args:
        model_name: Registered model; defaults to ``PHI3OPS_REGISTERED_MODEL_NAME``.
        to_version: Version to restore instead of ``previous``.
        smoke_eval_set: Eval set for the smoke evaluation of the restored champion; None skips.
        triggered_by: Recorded on the versions; defaults to the deployment / flow run.

    Returns:
        Where the aliases point now.
    """
    name = resolve_model_name(model_name)
    who = triggered_by or default_trigger()
    state = rollback_task(name, to_version=to_version, triggered_by=who)
    if state.resumed:
        print(f"{name}: finished the rollback that an interrupted run started.")
    if smoke_eval_set:
        smoke = evaluate_flow(model_uri=f"models:/{name}/{state.champion}", eval_set=smoke_eval_set)
        print(
            f"Smoke evaluation of version {state.champion}: pass rate "
            f"{smoke.metrics.get('pass_rate', 0.0):.3f} (run {smoke.run_id})"
        )
    print(f"{name}: champion is now version {state.champion} (rolled back by {who})")
    return state
