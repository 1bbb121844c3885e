"""Stage 3, scheduled — re-evaluate: generate the champion's answers again and check that it
has not regressed (the ``nightly-eval`` deployment).

Resolve the version behind the alias → keep its earlier evaluation on the eval set → evaluate
it again from scratch → gates: the absolute ones, and "not worse than the earlier run by more
than a margin" → a Prefect artifact and ``phi3ops.model.re-evaluated`` / ``regressed``; a
regression fails the flow run. The same model on an unchanged eval set can only regress through
its runtime, its host or its dependencies: exactly what a nightly run is for.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.evaluate import evaluate_flow
from phi3ops.errors import RegressionError
from phi3ops.evalset import open_eval_set
from phi3ops.names import CHAMPION_ALIAS, REEVALUATED_EVENT, REGRESSED_EVENT, artifact_key
from phi3ops.policies import GateOverrides
from phi3ops.registry import resolve_model_name, resolve_version
from phi3ops.settings import get_settings
from tasks.evaluation import find_evaluation_task
from tasks.events import emit
from tasks.promotion import check_regression


@flow(name="reevaluate", log_prints=True)
def reevaluate_flow(
    model_name: str | None = None,
    alias: str = CHAMPION_ALIAS,
    eval_set: str | None = None,
    gates: GateOverrides | None = None,
):
    """Evaluate the version behind ``alias`` again and compare it with its earlier evaluation.

    Args:
        model_name: Registered model; defaults to ``PHI3OPS_REGISTERED_MODEL_NAME``.
        alias: Alias (or version number) of the version to re-evaluate.
        eval_set: Eval set name or path; the default set when None.
        gates: Overrides of the gate policy in settings, e.g. ``{"max_pass_rate_drop": 0.05}``.

    Returns:
        The gate decision (``promote`` means "no regression"); a regression raises
        `RegressionError` after the event is emitted.
    """
    name = resolve_model_name(model_name)
    policy = get_settings().gates.with_overrides(gates)  # bad overrides fail before any work
    version = resolve_version(name, alias)
    eval_hash = open_eval_set(eval_set).content_hash

    earlier = find_evaluation_task(name, version, eval_hash)  # before the fresh run replaces it
    fresh = evaluate_flow(model_uri=f"models:/{name}/{version}", eval_set=eval_set, reuse=False)
    decision = check_regression(name, version, fresh, earlier, policy=policy)

    verdict = "no regression" if decision.promote else "REGRESSED"
    baseline = f"run {earlier.run_id}" if earlier else "none (first evaluation on this set)"
    markdown = "\n".join(
        [
            f"# {name} v{version} (@{alias}) re-evaluated: {verdict}",
            "",
            f"Eval set {eval_hash[:12]}; fresh run {fresh.run_id}; earlier: {baseline}.",
            "",
            "| gate | result |",
            "|---|---|",
            *(
                f"| {g.gate} | {'pass' if g.passed else 'FAIL'}: {g.detail} |"
                for g in decision.gates
            ),
        ]
    )
    create_markdown_artifact(
        markdown=markdown, key=artifact_key("reevaluation", name), description=verdict
    )
    emit(
        REEVALUATED_EVENT if decision.promote else REGRESSED_EVENT,
        model_name=name,
        version=version,
        payload={
            "alias": alias,
            "reasons": decision.reasons,
            "eval_set_hash": eval_hash,
            "fresh_run_id": fresh.run_id,
            "earlier_run_id": getattr(earlier, "run_id", None),
        },
    )
    print(markdown)
    if not decision.promote:
        raise RegressionError(
            f"{name} v{version} (@{alias}) regressed on eval set {eval_hash[:12]}: "
            + "; ".join(decision.reasons)
        )
    return decision
