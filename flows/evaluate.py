"""Stage 3 — evaluate: a registry version on a versioned eval set, compared with @champion.

Reads like the pipeline: resolve the version and load the eval set (bad input fails here,
before any work) → reuse the version's evaluation on the same eval set, or generate (batched)
and score + record (an MLflow run linked to the version) → look up @champion's evaluation on
the same eval set → publish the side-by-side comparison (Prefect artifact + the run).

With ``shards`` > 1 the generation fans out over the work pool: one ``evaluate-shard`` flow run
per shard (whole predict batches each, `tasks.evaluation.shards`), merged back in eval-set
order and scored and logged as one evaluation, the same as an unsharded one for greedy decoding.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from phi3ops.errors import EvaluationError
from phi3ops.evalset import resolve_eval_set
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
from tasks.evaluation.generate import evaluation_line
from tasks.evaluation.shards import generate_shard_task, plan_shards, run_shards_task


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    model_uri: str,
    eval_set: str | None = None,
    compare_to_alias: str = CHAMPION_ALIAS,
    reuse: bool = True,
    shards: int = 1,
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
        shards: Generate in this many flow runs of the ``evaluate-shard`` deployment, side by
            side on the work pool (needs a Prefect server and ``prefect deploy``); 1: here.

    Returns:
        The evaluation (``reused`` when nothing was generated).
    """
    target = resolve_model(model_uri)  # a bad URI or unknown alias fails before any work
    loaded = load_eval_set_task(eval_set)
    plan = plan_shards(loaded, shards=shards)  # shards < 1 fails before any work

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
        generation = (
            run_shards_task(target, loaded, eval_set_ref=_shared_ref(loaded.path), plan=plan)
            if len(plan) > 1
            else generate_task(target, loaded)
        )
        summary = score_task(target, loaded, generation)

    champion = find_champion_evaluation_task(
        target.model_name, loaded.content_hash, compare_to_alias, target.version
    )
    publish_comparison_task(summary, champion)
    print(
        f"{target.version_uri} ({target.flavor}) on {loaded.name}: pass rate "
        f"{summary.metrics.get('pass_rate', 0.0):.3f}, run {summary.run_id}"
    )
    print(evaluation_line(summary))
    return summary


@flow(name="evaluate-shard", log_prints=True)
def evaluate_shard_flow(
    model_uri: str,
    eval_set: str,
    eval_set_hash: str,
    item_ids: list[str],
    group: str,
    index: int,
    batch_size: int,
    default_max_tokens: int,
    ttft_samples: int = 0,
) -> str:
    """One shard of a sharded evaluation (started by `evaluate_flow`, not by hand): load the
    version once, answer the shard's items in the batches the plan gave them, record the
    answers in MLflow for the evaluation to merge.

    Args:
        model_uri: ``models:/<name>/<version>``.
        eval_set: Eval set name in this worker's ``evals/`` (or a path on this host).
        eval_set_hash: Its content hash as the evaluation read it: a worker whose copy differs
            fails instead of answering other items.
        item_ids: The shard's items.
        group: The evaluation's shard group (an id tagging every shard's record).
        index: This shard's number.
        batch_size: Rows per predict call, as the evaluation planned.
        default_max_tokens: For items without ``max_tokens``, as the evaluation planned.
        ttft_samples: Items streamed for time to first token (the first shard's only).

    Returns:
        The MLflow run that holds the shard's answers.
    """
    target = resolve_model(model_uri)
    loaded = load_eval_set_task(eval_set)
    if loaded.content_hash != eval_set_hash:
        raise EvaluationError(
            f"This worker's eval set {eval_set} has hash {loaded.content_hash[:12]}, the "
            f"evaluation's {eval_set_hash[:12]}: deploy the same code to every worker."
        )
    run_id = generate_shard_task(
        target,
        loaded,
        item_ids=item_ids,
        group=group,
        index=index,
        batch_size=batch_size,
        default_max_tokens=default_max_tokens,
        ttft_samples=ttft_samples,
    )
    print(f"Shard {index}: {len(item_ids)} items of {loaded.name} answered, run {run_id}.")
    return run_id


def _shared_ref(path: Path) -> str:
    """How a worker on another host finds the eval set: its name, when it is one of the
    project's sets (each worker's clone has them); else the path, which must exist there too.
    """
    try:
        if resolve_eval_set(path.stem) == path:
            return path.stem
    except (OSError, ValueError):
        pass
    return str(path)
