"""Stage 3 — evaluate: a registry version on a versioned eval set, compared with @champion.

Reads like the pipeline: resolve the version and load the eval set (bad input fails here,
before any work) → reuse the version's evaluation on the same eval set, or generate (batched)
and score + record (an MLflow run linked to the version) → look up @champion's evaluation on
the same eval set → publish the side-by-side comparison (Prefect artifact + the run).
"""

from __future__ import annotations

from prefect import flow

from phi3ops.names import CHAMPION_ALIAS
from phi3ops.registry import resolve_model
from tasks.evaluation import (
    EvalSummary,
    find_champion_evaluation_task,
    find_evaluation_task,
    generate_task,
    load_eval_set_task,
    publish_comparison_task,
    score_task,
)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    model_uri: str,
    eval_set: str | None = None,
    compare_to_alias: str = CHAMPION_ALIAS,
    reuse: bool = True,
) -> EvalSummary:
    """Evaluate a registered model version on an eval set and compare it with the champion.

    Args:
        model_uri: ``models:/<name>@<alias>`` (e.g. ``models:/phi3-mini@candidate``) or
            ``models:/<name>/<version>``.
        eval_set: Eval set name (in ``evals/``) or path of a ``.jsonl`` file; the default set
            (``phi3-default``) when None.
        compare_to_alias: The alias whose evaluation on the same eval set this one is compared
            with.
        reuse: Return the version's existing evaluation on the same eval set (same content
            hash) instead of generating again.

    Returns:
        The evaluation (``reused`` when nothing was generated).
    """
    target = resolve_model(model_uri)  # a bad URI or unknown alias fails before any work
    loaded = load_eval_set_task(eval_set)

    summary = (
        find_evaluation_task(target.model_name, target.version, loaded.content_hash)
        if reuse
        else None
    )
    if summary is not None:
        print(
            f"{target.version_uri} was evaluated on {loaded.name} "
            f"({loaded.content_hash[:12]}) before: reusing run {summary.run_id}."
        )
    else:
        generation = generate_task(target, loaded)
        summary = score_task(target, loaded, generation)

    champion = find_champion_evaluation_task(
        target.model_name, loaded.content_hash, compare_to_alias, target.version
    )
    publish_comparison_task(summary, champion)
    print(
        f"{target.version_uri} ({target.flavor}) on {loaded.name}: pass rate "
        f"{summary.metrics.get('pass_rate', 0.0):.3f}, run {summary.run_id}"
    )
    return summary
