"""Sharded evaluation: an eval set's generation fanned out over the work pool, merged back into
the one `Generation` an unsharded evaluation would have produced, then scored and logged once.

1. **Plan** (`plan_shards`): the predict batches of an unsharded run (`plan_batches`) are dealt
   out, whole and in order, to at most N shards. Each shard re-plans its own items into exactly
   those batches, so every item is answered in the same batch as without sharding: for greedy
   decoding the answers, the per-item table and the pass rates are the same.
2. **Fan out** (`run_shards`): one flow run of the ``evaluate-shard`` deployment per shard
   (`run_deployment`), on any worker of the pool; each loads the model once, answers its items
   (`generate_shard`) and records its `Generation` in MLflow, the store every worker shares
   (a flow run's return value stays on its worker's host).
3. **Merge** (`merge_generations`): the items back in eval-set order; latency percentiles,
   pass rates and token counts are then computed by the scorer from all items, as usual.
   Speed is what the shards achieved together: ``wall_s`` is the slowest shard's (so
   ``tokens_per_s`` is the aggregate throughput), the peak RSS the largest shard's, and time to
   first token is measured by the first shard on the items an unsharded run measures.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from phi3ops import registry
from phi3ops.errors import EvaluationError, InvalidInputError
from phi3ops.evalset import EvalSet
from phi3ops.names import RUN_TYPE_TAG, TAG_PREFIX, EvalTag
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking
from tasks.evaluation.generate import generate_for, plan_batches
from tasks.evaluation.resolve import ModelTarget
from tasks.evaluation.values import Generation

__all__ = [
    "SHARD_DEPLOYMENT",
    "ShardPlan",
    "generate_shard",
    "generate_shard_task",
    "load_shards",
    "merge_generations",
    "plan_shards",
    "run_shards",
    "run_shards_task",
    "shard_of",
]

#: The deployment each shard runs as (prefect.yaml), as `run_deployment` names it.
SHARD_DEPLOYMENT = "evaluate-shard/eval-shard"
#: MLflow run tags of a shard's recorded generation.
SHARD_GROUP_TAG = f"{TAG_PREFIX}shard_group"
SHARD_INDEX_TAG = f"{TAG_PREFIX}shard_index"
GENERATION_ARTIFACT = "generation.json"
#: How often the fan-out looks at its shards' flow runs.
POLL_S = 2.0

ShardPlan = list[list[str]]  # item ids per shard, in eval-set order


def plan_shards(
    eval_set: EvalSet,
    *,
    shards: int,
    batch_size: int | None = None,
    default_max_tokens: int | None = None,
) -> ShardPlan:
    """Item ids per shard: whole predict batches of the unsharded plan, dealt out in order.

    Args:
        eval_set: The eval set.
        shards: How many shards at most (fewer when there are fewer batches).
        batch_size: Rows per predict call; ``PHI3OPS_EVAL_BATCH_SIZE`` when None.
        default_max_tokens: As in `generate_outputs`; ``PHI3OPS_EVAL_DEFAULT_MAX_TOKENS``.

    Raises:
        InvalidInputError: ``shards`` is below 1.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise InvalidInputError(f"shards must be an integer >= 1, got {shards!r}")
    settings = get_settings()
    batches = plan_batches(
        eval_set.items,
        default_max_tokens=(
            settings.eval_default_max_tokens if default_max_tokens is None else default_max_tokens
        ),
        batch_size=settings.eval_batch_size if batch_size is None else batch_size,
    )
    count = min(shards, len(batches))
    plan = []
    for k in range(count):
        chunk = batches[k * len(batches) // count : (k + 1) * len(batches) // count]
        indices = sorted(i for batch in chunk for i in batch)
        plan.append([eval_set.items[i].id for i in indices])
    return plan


def shard_of(eval_set: EvalSet, item_ids: Sequence[str]) -> EvalSet:
    """The eval set restricted to ``item_ids``, in eval-set order (hash and name kept: it is a
    part of that set, not a set of its own).

    Raises:
        InvalidInputError: An id is not in the set.
    """
    wanted = set(item_ids)
    missing = sorted(wanted - {item.id for item in eval_set.items})
    if missing:
        raise InvalidInputError(
            f"Eval set {eval_set.name} ({eval_set.content_hash[:12]}) has no items {missing}."
        )
    return eval_set.model_copy(
        update={"items": [item for item in eval_set.items if item.id in wanted]}
    )


def merge_generations(eval_set: EvalSet, parts: Sequence[Generation]) -> Generation:
    """The shards' generations as one: every item once, in eval-set order.

    Raises:
        EvaluationError: An item is missing, or answered by two shards.
    """
    answers = {}
    for part in parts:
        for item in part.items:
            if item.id in answers:
                raise EvaluationError(f"Eval item {item.id!r} was answered by two shards.")
            answers[item.id] = item
    missing = [item.id for item in eval_set.items if item.id not in answers]
    if missing:
        raise EvaluationError(f"No shard answered eval items {missing}: evaluate again.")
    notes = list(dict.fromkeys(note for part in parts for note in part.notes))
    notes.append(
        f"generated in {len(parts)} shards in parallel: tokens_per_s is their aggregate "
        "throughput (all completion tokens over the slowest shard's wall time), peak_rss_mb "
        "the largest shard's"
    )
    peaks = [part.peak_rss_mb for part in parts if part.peak_rss_mb is not None]
    return Generation(
        items=[answers[item.id] for item in eval_set.items],
        wall_s=max((part.wall_s for part in parts), default=0.0),
        ttft_s=[t for part in parts for t in part.ttft_s],
        peak_rss_mb=max(peaks) if peaks else None,
        notes=notes,
    )


# --- one shard, on a worker ---------------------------------------------------------------


def generate_shard(
    target: ModelTarget,
    eval_set: EvalSet,
    *,
    item_ids: Sequence[str],
    group: str,
    index: int,
    batch_size: int,
    default_max_tokens: int,
    ttft_samples: int,
) -> str:
    """Load the model once, answer the shard's items, and record the answers in MLflow.

    Returns:
        The MLflow run holding the shard's `Generation` (``generation.json``).
    """
    generation = generate_for(
        target,
        shard_of(eval_set, item_ids),
        batch_size=batch_size,
        default_max_tokens=default_max_tokens,
        ttft_samples=ttft_samples,
    )
    experiment_id = configure_tracking()
    client = registry.client()
    tags = {
        RUN_TYPE_TAG: "eval-shard",
        SHARD_GROUP_TAG: group,
        SHARD_INDEX_TAG: str(index),
        EvalTag.MODEL_NAME.value: target.model_name,
        EvalTag.MODEL_VERSION.value: target.version,
        EvalTag.EVAL_SET_HASH.value: eval_set.content_hash,
    }
    run = client.create_run(experiment_id, run_name=f"eval-shard-{index}", tags=tags)
    try:
        client.log_text(run.info.run_id, generation.model_dump_json(), GENERATION_ARTIFACT)
    except Exception:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return str(run.info.run_id)


# --- the fan-out, from the evaluate flow -------------------------------------------------


def run_shards(
    target: ModelTarget,
    eval_set: EvalSet,
    *,
    eval_set_ref: str,
    plan: ShardPlan,
    timeout_s: float = 3600.0,
) -> Generation:
    """Run every shard as a flow run of `SHARD_DEPLOYMENT`, wait for all, and merge them.

    Args:
        target: The version evaluated.
        eval_set: The eval set (its hash is checked by every shard).
        eval_set_ref: How a worker finds the eval set: a name in its clone's ``evals/`` (or a
            path that exists on every worker host).
        plan: Item ids per shard (`plan_shards`).
        timeout_s: Longest wait for all shards.

    Raises:
        EvaluationError: No Prefect server or no shard deployment; a shard did not complete,
            or did not record its answers.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise EvaluationError(
            "A sharded evaluation runs its shards on a work pool, which needs a Prefect server: "
            "set PREFECT_API_URL (docs/operations.md, 'Team setup'), or evaluate with shards=1."
        )
    group = str(uuid.uuid4())
    try:
        runs = _start_shards(target, eval_set, eval_set_ref=eval_set_ref, plan=plan, group=group)
    except ObjectNotFound as exc:
        raise EvaluationError(
            f"The deployment {SHARD_DEPLOYMENT} does not exist on {PREFECT_API_URL.value()}: "
            "run `prefect deploy --all` from the repository root."
        ) from exc
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            states = [client.read_flow_run(run.id).state for run in runs]
            if all(state is not None and state.is_final() for state in states):
                break
            if time.monotonic() > deadline:
                raise EvaluationError(
                    f"The {len(runs)} evaluation shards did not finish within {timeout_s:.0f} s "
                    f"(is a worker of the pool running?)."
                )
            time.sleep(POLL_S)
    failed = [
        f"{run.name} ({state.name if state else '?'})"
        for run, state in zip(runs, states, strict=True)
        if state is None or not state.is_completed()
    ]
    if failed:
        raise EvaluationError(f"Evaluation shards did not complete: {', '.join(failed)}.")
    return merge_generations(eval_set, load_shards(group, count=len(plan)))


def _start_shards(
    target: ModelTarget, eval_set: EvalSet, *, eval_set_ref: str, plan: ShardPlan, group: str
) -> list[Any]:
    """One flow run per shard, started and not awaited: the shards run side by side."""
    from prefect.deployments import run_deployment

    settings = get_settings()
    return [
        run_deployment(
            SHARD_DEPLOYMENT,
            parameters={
                "model_uri": target.version_uri,
                "eval_set": eval_set_ref,
                "eval_set_hash": eval_set.content_hash,
                "item_ids": item_ids,
                "group": group,
                "index": index,
                # The plan's batching, whatever the worker's own settings say.
                "batch_size": settings.eval_batch_size,
                "default_max_tokens": settings.eval_default_max_tokens,
                # As an unsharded run: the first items streamed, by the shard that has them.
                "ttft_samples": settings.eval_ttft_samples if index == 0 else 0,
            },
            timeout=0,
        )
        for index, item_ids in enumerate(plan)
    ]


def load_shards(group: str, *, count: int) -> list[Generation]:
    """The generations the shards of ``group`` recorded, in shard order.

    Raises:
        EvaluationError: One is missing.
    """
    import mlflow

    experiment_id = configure_tracking()
    found: dict[int, Any] = {}
    for run in registry.client().search_runs(
        [experiment_id],
        filter_string=f"tags.`{SHARD_GROUP_TAG}` = '{group}' and attributes.status = 'FINISHED'",
    ):
        found[int(run.data.tags[SHARD_INDEX_TAG])] = run.info.run_id
    missing = sorted(set(range(count)) - set(found))
    if missing:
        raise EvaluationError(f"Evaluation shards {missing} of {group} recorded no answers.")
    return [
        Generation.model_validate_json(
            mlflow.artifacts.load_text(f"runs:/{found[index]}/{GENERATION_ARTIFACT}")
        )
        for index in range(count)
    ]


# --- Prefect tasks: no retries (a shard is re-run by running the evaluation again) ----------


@task(name="generate-shard", cache_policy=NO_CACHE)
def generate_shard_task(
    target: ModelTarget,
    eval_set: EvalSet,
    *,
    item_ids: list[str],
    group: str,
    index: int,
    batch_size: int,
    default_max_tokens: int,
    ttft_samples: int,
) -> str:
    """Prefect wrapper of `generate_shard`."""
    return generate_shard(
        target,
        eval_set,
        item_ids=item_ids,
        group=group,
        index=index,
        batch_size=batch_size,
        default_max_tokens=default_max_tokens,
        ttft_samples=ttft_samples,
    )


@task(name="run-evaluation-shards", cache_policy=NO_CACHE)
def run_shards_task(
    target: ModelTarget, eval_set: EvalSet, *, eval_set_ref: str, plan: ShardPlan
) -> Generation:
    """Prefect wrapper of `run_shards`."""
    return run_shards(target, eval_set, eval_set_ref=eval_set_ref, plan=plan)
