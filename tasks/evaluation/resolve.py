"""Resolving what an evaluation runs on (the eval set, the model) and finding recorded
evaluations: a version's own on an eval set, and the champion's to compare with.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from phi3ops import registry
from phi3ops.errors import EvaluationError
from phi3ops.evalset import EvalSet, open_eval_set
from phi3ops.names import CHAMPION_ALIAS, EVALUATION_TAG_PREFIX, EvalTag
from phi3ops.registry import ModelTarget, resolve_model
from phi3ops.tracking import configure_tracking
from tasks.evaluation.values import HASH_PREFIX_LENGTH, ChampionLookup, EvalSummary
from tasks.loaded_models import forget_models_from_code, settle

# --- the model --------------------------------------------------------------------------------


def load_model(target: ModelTarget, *, batch_size: int | None = None) -> Any:
    """The version's pyfunc, loaded once (its flavor's own loader), alone in memory.

    Models that earlier stages released (`tasks.loaded_models`) are freed first, and MLflow's
    reference to what it loaded is dropped after: the caller holds the only one.

    Args:
        target: The version.
        batch_size: Rows the model's batcher may run as one batch (its ``max_batch_size``),
            for a model whose logged ``model_config`` has that key (the ONNX pyfunc): an eval
            call's rows then run as one onnxruntime-genai batch, within the model's KV budget
            (and with no ``prefill_slice_s`` bound, `_batch_overrides`). None: as logged.

    Raises:
        EvaluationError: MLflow could not load it.
    """
    import mlflow

    configure_tracking()
    settle()
    try:
        overrides = _batch_overrides(target.version_uri, batch_size)
        return mlflow.pyfunc.load_model(target.version_uri, model_config=overrides)
    except Exception as exc:
        raise EvaluationError(
            f"Could not load {target.version_uri} ({target.flavor} flavor) for evaluation "
            f"({type(exc).__name__}: {exc}). Check that its pip requirements are installed here."
        ) from exc
    finally:
        forget_models_from_code()


def _batch_overrides(model_uri: str, batch_size: int | None) -> dict[str, Any] | None:
    """What evaluation changes in a logged ``model_config`` that has the keys (MLflow lets a
    load override only those): ``max_batch_size`` = ``batch_size``, and ``prefill_slice_s`` 0,
    as evaluation has no event loop a long prefill could starve (a bound would split batches).
    """
    from mlflow.models import Model

    flavor = Model.load(model_uri).flavors.get("python_function", {})
    config = flavor.get("config") or {}  # where MLmodel keeps a pyfunc's model_config
    wanted: dict[str, Any] = {"prefill_slice_s": 0}
    if batch_size is not None:
        wanted["max_batch_size"] = batch_size
    return {key: value for key, value in wanted.items() if key in config} or None


# --- finding evaluations ----------------------------------------------------------------------


def summary_from_run(run: Any, *, reused: bool = False) -> EvalSummary:
    """The evaluation an evaluation run recorded (its tags and metrics)."""
    tags = run.data.tags
    metrics = {key: float(value) for key, value in run.data.metrics.items()}
    prefix = "pass_rate."
    notes = json.loads(tags[EvalTag.NOTES.value]) if EvalTag.NOTES.value in tags else []
    return EvalSummary(
        run_id=run.info.run_id,
        model_name=tags[EvalTag.MODEL_NAME.value],
        version=tags[EvalTag.MODEL_VERSION.value],
        model_uri=tags[EvalTag.MODEL_URI.value],
        flavor=tags.get(EvalTag.FLAVOR.value, "unknown"),
        eval_set=tags[EvalTag.EVAL_SET.value],
        eval_set_hash=tags[EvalTag.EVAL_SET_HASH.value],
        metrics=metrics,
        tag_pass_rates={
            k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)
        },
        notes=notes,
        reused=reused,
    )


def evaluation_tag_key(eval_set_hash: str) -> str:
    """The model version tag that points at the version's evaluation on that eval set."""
    return f"{EVALUATION_TAG_PREFIX}{eval_set_hash[:HASH_PREFIX_LENGTH]}"


def find_evaluation(model_name: str, version: str | int, eval_set_hash: str) -> EvalSummary | None:
    """The evaluation of a version on an eval set (by content hash), if one finished.

    The version's ``phi3ops.eval.<hash[:12]>`` tag names the run; failing that (the tag was
    removed, or its run deleted), the newest finished run tagged with the version and the full
    hash is used.

    Returns:
        The evaluation, marked ``reused``; None when the version has none on that set (or the
        version does not exist).
    """
    from mlflow.exceptions import MlflowException

    configure_tracking()
    client = registry.client()
    version = str(version)
    try:
        mv = client.get_model_version(model_name, version)
    except MlflowException:
        return None
    run_id = (mv.tags or {}).get(evaluation_tag_key(eval_set_hash))
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None
        if run is not None and _is_evaluation_of(run, model_name, version, eval_set_hash):
            return summary_from_run(run, reused=True)
    experiments = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    if not experiments:
        return None
    runs = client.search_runs(
        experiment_ids=experiments,
        filter_string=(
            f"tags.`{EvalTag.MODEL_NAME.value}` = '{model_name}' AND "
            f"tags.`{EvalTag.MODEL_VERSION.value}` = '{version}' AND "
            f"tags.`{EvalTag.EVAL_SET_HASH.value}` = '{eval_set_hash}' AND "
            "attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return summary_from_run(runs[0], reused=True) if runs else None


def _is_evaluation_of(run: Any, model_name: str, version: str, eval_set_hash: str) -> bool:
    tags = run.data.tags
    return (
        run.info.lifecycle_stage == "active"
        and run.info.status == "FINISHED"
        and tags.get(EvalTag.MODEL_NAME.value) == model_name
        and tags.get(EvalTag.MODEL_VERSION.value) == version
        and tags.get(EvalTag.EVAL_SET_HASH.value) == eval_set_hash
    )


def find_champion_evaluation(
    model_name: str,
    eval_set_hash: str,
    *,
    alias: str = CHAMPION_ALIAS,
    candidate_version: str | None = None,
) -> ChampionLookup:
    """The evaluation of the version aliased ``alias`` on the same eval set, or why there is none.

    Returns:
        The lookup: ``summary`` set when there is a comparable evaluation, else ``reason``.
    """
    from mlflow.exceptions import MlflowException

    configure_tracking()
    client = registry.client()
    try:
        mv = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return ChampionLookup(
            alias=alias, reason=f"{model_name!r} has no version aliased @{alias} yet."
        )
    version = str(mv.version)
    if candidate_version is not None and version == str(candidate_version):
        return ChampionLookup(
            alias=alias,
            version=version,
            reason=f"version {version} is itself @{alias}: there is nothing else to compare with.",
        )
    summary = find_evaluation(model_name, version, eval_set_hash)
    if summary is not None:
        return ChampionLookup(alias=alias, version=version, summary=summary)
    others = sorted(
        key.removeprefix(EVALUATION_TAG_PREFIX)
        for key in (mv.tags or {})
        if key.startswith(EVALUATION_TAG_PREFIX)
    )
    evaluated = (
        f"it was evaluated only on other eval sets (hashes {', '.join(others)})"
        if others
        else "it has never been evaluated"
    )
    return ChampionLookup(
        alias=alias,
        version=version,
        reason=(
            f"@{alias} (version {version}) has no evaluation on this eval set (hash "
            f"{eval_set_hash[:HASH_PREFIX_LENGTH]}): {evaluated}. Results are compared only on "
            f"the same eval set; evaluate it with `phi3ops evaluate --model-uri "
            f"models:/{model_name}/{version} --eval-set <this set>`."
        ),
    )


# --- Prefect tasks: no retries (nothing here is transient), no caching (stores and models) ----


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model_task(model_uri: str) -> ModelTarget:
    """Prefect wrapper of `resolve_model`."""
    return resolve_model(model_uri)


@task(name="load-eval-set", cache_policy=NO_CACHE)
def load_eval_set_task(eval_set: str | None = None) -> EvalSet:
    """Resolve an eval set name or path (None: the default set) and load it."""
    return open_eval_set(eval_set)


@task(name="find-evaluation", cache_policy=NO_CACHE)
def find_evaluation_task(
    model_name: str, version: str | int, eval_set_hash: str
) -> EvalSummary | None:
    """Prefect wrapper of `find_evaluation`."""
    return find_evaluation(model_name, version, eval_set_hash)


@task(name="find-champion-evaluation", cache_policy=NO_CACHE)
def find_champion_evaluation_task(
    model_name: str, eval_set_hash: str, alias: str, candidate_version: str
) -> ChampionLookup:
    """Prefect wrapper of `find_champion_evaluation`."""
    return find_champion_evaluation(
        model_name, eval_set_hash, alias=alias, candidate_version=candidate_version
    )
