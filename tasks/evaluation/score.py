"""Scoring and recording: ``mlflow.genai.evaluate`` with one code scorer per expectation kind
over the generated answers, in one MLflow run holding the metrics, the per-item table and a
plot, linked to the version; and the whole evaluation in-process (`evaluate_model`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from phi3ops import registry
from phi3ops.errors import EvaluationError, InvalidInputError
from phi3ops.evalset import EXPECTATION_KINDS, EvalItem, EvalSet, check, open_eval_set
from phi3ops.names import (
    COMPARISON_ARTIFACT,
    ITEM_ID_TAG,
    ITEM_TAGS_TAG,
    PLOT_ARTIFACT,
    S_PER_TOKEN_P95,
    TABLE_ARTIFACT,
    TTFT_P95,
    EvalTag,
)
from phi3ops.registry import ModelTarget, resolve_model
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking
from tasks.evaluation.compare import comparison_markdown
from tasks.evaluation.generate import generate_for
from tasks.evaluation.resolve import (
    evaluation_tag_key,
    find_champion_evaluation,
    find_evaluation,
    summary_from_run,
)
from tasks.evaluation.values import REFUSED, TIMED_OUT, EvalSummary, Generation, ItemGeneration
from tasks.recovery import end_orphan_runs, owner_tags
from tasks.status import refresh_description

logger = logging.getLogger(__name__)

#: Expectation values go into the evaluation data as ``expected_<kind>``: distinct from the
#: scorer names (``<kind>``), so MLflow's assessments and result columns never mix the two.
_EXPECTED_PREFIX = "expected_"
_EVAL_WORKERS = 4

# --- scorers ----------------------------------------------------------------------------------


def expectation_scorers(kinds: Iterable[str] = EXPECTATION_KINDS) -> list[Any]:
    """One ``mlflow.genai`` code scorer per expectation kind, named after the kind.

    Each reads ``expectations["expected_<kind>"]`` and the ``outputs`` dict (``content``, or
    ``None`` and ``error``) and returns a ``Feedback`` (pass/fail with the check's rationale),
    or None for an item without that expectation: MLflow then records no verdict and leaves the
    item out of that scorer's ``<kind>/mean``.

    Raises:
        InvalidInputError: An unknown kind.
    """
    scorers = []
    for kind in kinds:
        if kind not in EXPECTATION_KINDS:
            raise InvalidInputError(
                f"Unknown expectation kind {kind!r}: use one of {', '.join(EXPECTATION_KINDS)}"
            )
        scorers.append(_expectation_scorer(kind))
    return scorers


def _expectation_scorer(kind: str) -> Any:
    from mlflow.entities import Feedback
    from mlflow.genai.scorers import scorer

    key = f"{_EXPECTED_PREFIX}{kind}"

    def run(outputs: Any, expectations: Any) -> Any:
        if not isinstance(expectations, dict) or key not in expectations:
            return None  # this item has no such expectation: no verdict
        answer = outputs if isinstance(outputs, dict) else {"content": outputs}
        verdict = check(kind, answer.get("content"), expectations[key], error=answer.get("error"))
        return Feedback(value=verdict.passed, rationale=verdict.rationale)

    run.__name__ = f"check_{kind}"
    return scorer(run, name=kind, description=f"phi3ops expectation check: {kind}")


def judge_scorers(endpoint: str | None = None) -> list[Any]:
    """mlflow.genai's built-in judges on ``endpoint``; none unless a judge is configured.

    Args:
        endpoint: A judge model URI (``gateway:/judge``, ``openai:/gpt-4o-mini``...); defaults to
            ``PHI3OPS_JUDGE_ENDPOINT``, unset by default, which means no judge at all.

    Returns:
        ``[RelevanceToQuery, Safety]`` on that model, or ``[]``. Constructing them calls nothing.
    """
    endpoint = endpoint if endpoint is not None else get_settings().judge_endpoint
    if not endpoint:
        return []
    from mlflow.genai.scorers import RelevanceToQuery, Safety

    return [RelevanceToQuery(model=endpoint), Safety(model=endpoint)]


# --- scoring and recording --------------------------------------------------------------------


def score_generation(
    target: ModelTarget,
    eval_set: EvalSet,
    generation: Generation,
    *,
    judge_endpoint: str | None = None,
    params: dict[str, Any] | None = None,
) -> EvalSummary:
    """Scores the answers with ``mlflow.genai.evaluate`` and records the evaluation run.

    The run (in the configured experiment) holds: tags linking it to the version and the eval
    set, params, metrics (see the `tasks.evaluation` doc), the per-item table, the plot; the
    version gets the tag ``phi3ops.eval.<hash[:12]>`` = run id, which `find_evaluation` reads.

    Args:
        target: The version the answers came from.
        eval_set: The items answered.
        generation: `generate_outputs` on that version and set.
        judge_endpoint: Judge model for `judge_scorers`; defaults to the settings (off).
        params: Extra run params (e.g. batch size, default max tokens).

    Returns:
        The recorded evaluation.

    Raises:
        EvaluationError: ``generation`` does not answer this set's items, or MLflow recorded no
            verdict for an item.
    """
    import mlflow

    answers = {record.id: record for record in generation.items}
    missing = [item.id for item in eval_set.items if item.id not in answers]
    if missing:
        raise EvaluationError(
            f"The generation holds no answer for {len(missing)} items of eval set "
            f"{eval_set.name!r} (e.g. {missing[0]!r}): generate on the same set."
        )
    kinds = [k for k in EXPECTATION_KINDS if any(_expected(i, k) for i in eval_set.items)]
    judges = judge_scorers(judge_endpoint)
    scorers = expectation_scorers(kinds) + judges
    data = [_evaluation_row(item, answers[item.id]) for item in eval_set.items]

    experiment_id = configure_tracking()
    tags = {
        EvalTag.MODEL_NAME.value: target.model_name,
        EvalTag.MODEL_VERSION.value: target.version,
        EvalTag.MODEL_URI.value: target.model_uri,
        EvalTag.EVAL_SET.value: eval_set.name,
        EvalTag.EVAL_SET_HASH.value: eval_set.content_hash,
        EvalTag.FLAVOR.value: target.flavor,
    }
    if generation.notes:
        tags[EvalTag.NOTES.value] = json.dumps(generation.notes)
    run_params = {
        "model_uri": target.model_uri,
        "model_version_uri": target.version_uri,
        "eval_set": eval_set.name,
        "eval_set_path": str(eval_set.path),
        "eval_set_items": len(eval_set.items),
        "scorers": ",".join(s.name for s in scorers),
        "judge": judges[0].model if judges else "off",
        **(params or {}),
    }
    run_name = f"evaluate-{target.model_name}-v{target.version}-{eval_set.name}"
    # An evaluation of the same version and set that a crash left RUNNING is ended as FAILED.
    same = (EvalTag.MODEL_NAME, EvalTag.MODEL_VERSION, EvalTag.EVAL_SET_HASH)
    end_orphan_runs(
        experiment_id, " AND ".join(f"tags.`{t.value}` = '{tags[t.value]}'" for t in same)
    )
    with mlflow.start_run(run_name=run_name, tags=tags | owner_tags()) as run:
        mlflow.log_params(run_params)
        dataset = log_eval_set_input(eval_set)
        # No predict_fn: the answers are in the data. The harness reuses the active run, makes
        # a trace per row and logs each verdict on it, and logs "<scorer>/mean" to this run.
        model_id = _logged(target)
        with _bounded_eval_workers():
            result = mlflow.genai.evaluate(
                data=as_eval_set_frame(data, dataset), scorers=scorers, model_id=model_id
            )
        verdicts = _verdicts(result.result_df, {s.name for s in scorers})
        table = _item_table(eval_set, answers, verdicts, kinds, [j.name for j in judges])
        metrics = _metrics(eval_set, generation, table)
        mlflow.log_metrics(metrics, model_id=model_id)  # on the logged model's page too
        mlflow.log_table(data=table, artifact_file=TABLE_ARTIFACT)
        figure = _plot(eval_set, table, metrics, title=f"{target.model_name} v{target.version}")
        mlflow.log_figure(figure, PLOT_ARTIFACT)
    registry.client().set_model_version_tag(
        target.model_name,
        target.version,
        evaluation_tag_key(eval_set.content_hash),
        run.info.run_id,
    )
    refresh_description(target.model_name, target.version)  # its page shows this run
    logger.info(
        "Evaluated %s on %s: pass rate %.3f (run %s)",
        target.version_uri,
        eval_set.name,
        metrics["pass_rate"],
        run.info.run_id,
    )
    return summary_from_run(mlflow.get_run(run.info.run_id))


#: MLflow stores a dataset digest in 36 characters at most; 32 hex digits of the content hash
#: (128 bits) fit and still name one eval set.
DATASET_DIGEST_LENGTH = 32


def log_eval_set_input(eval_set: EvalSet) -> Any:
    """Log the eval set as an MLflow dataset input of the active run (context ``evaluation``).

    Its name is the eval set's and its digest the start of its content hash, so the MLflow UI
    shows which set (and which content of it) each evaluation ran on, and runs on the same set
    share one dataset.

    Returns:
        The logged dataset (an MLflow ``PandasDataset``), for `as_eval_set_frame`.
    """
    import mlflow
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    rows = [
        {
            "id": item.id,
            # Nested fields as JSON text: one column type per column in the dataset's schema.
            "messages": json.dumps([m.model_dump() for m in item.messages or []]),
            "prompt": item.prompt or "",
            "expectations": item.expectations.model_dump_json(exclude_defaults=True),
            "tags": ",".join(item.tags),
            # A float column: an item without its own limit is NaN, not a made-up integer.
            "max_tokens": float(item.max_tokens) if item.max_tokens else None,
        }
        for item in eval_set.items
    ]
    with warnings.catch_warnings():
        # MLflow 3.17 registers its local-file source twice and says so on every local path.
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
        dataset = from_pandas(
            pd.DataFrame(rows),
            source=eval_set.path.resolve().as_uri(),
            name=eval_set.name,
            digest=eval_set.content_hash[:DATASET_DIGEST_LENGTH],
        )
    mlflow.log_input(dataset, context="evaluation")
    return dataset


def as_eval_set_frame(rows: list[dict[str, Any]], dataset: Any) -> Any:
    """The evaluation data as a DataFrame that ``mlflow.genai.evaluate`` logs as ``dataset``.

    ``mlflow.genai.evaluate`` logs its data as a dataset input of the run; data it cannot trace
    to a dataset becomes one named ``dataset`` (with no context), a second, unexplained entry
    beside the eval set in the run's Datasets. A DataFrame carrying MLflow's dataset identity
    (what ``EvaluationDataset.to_df`` attaches, checked against the records' hash) is logged as
    that dataset instead: the eval set's name and digest, which the store already holds as this
    run's input, so the run keeps one dataset.
    """
    import pandas as pd
    from mlflow.genai.datasets.evaluation_dataset import compute_records_sha256
    from mlflow.utils.mlflow_tags import MLFLOW_GENAI_EVALUATE_DATASET_IDENTITY

    frame = pd.DataFrame(rows)
    entity = dataset._to_mlflow_entity()
    frame.attrs[MLFLOW_GENAI_EVALUATE_DATASET_IDENTITY] = {
        "name": entity.name,
        "digest": entity.digest,
        "source_type": entity.source_type,
        "source": entity.source,
        "schema": entity.schema,
        "profile": entity.profile,
        "records_sha256": compute_records_sha256(frame),
    }
    return frame


@contextmanager
def _bounded_eval_workers() -> Iterator[None]:
    """At most `_EVAL_WORKERS` threads in mlflow.genai.evaluate, unless the user chose a number.

    Its default (10 to predict and 10 to score, each logging traces and assessments) exhausts
    the SQLAlchemy pool of a SQLite store (5 + 10 overflow) on a 50-item set: traces are then
    lost ("QueuePool limit ... reached"). Code scorers gain nothing from more threads anyway.
    """
    import os

    name = "MLFLOW_GENAI_EVAL_MAX_WORKERS"
    if os.environ.get(name):
        yield
        return
    os.environ[name] = str(_EVAL_WORKERS)
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _logged(target: ModelTarget) -> str | None:
    """The version's logged model id when this tracking store has it (to link the results)."""
    import mlflow

    if target.model_id is None:
        return None
    try:
        mlflow.get_logged_model(target.model_id)
    except Exception:  # e.g. a registry in another store than the tracking server
        return None
    return target.model_id


def _expected(item: EvalItem, kind: str) -> bool:
    return any(k == kind for k, _ in item.expectations.active())


def _evaluation_row(item: EvalItem, answer: ItemGeneration) -> dict[str, Any]:
    return {
        "inputs": {"messages": item.chat_messages},
        "outputs": {"content": answer.content, "error": answer.error},
        "expectations": {
            f"{_EXPECTED_PREFIX}{kind}": expected for kind, expected in item.expectations.active()
        },
        "tags": {ITEM_ID_TAG: item.id, ITEM_TAGS_TAG: ",".join(item.tags)},
    }


def _verdicts(result_df: Any, names: set[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{item id: {scorer name: {"value", "passed", "rationale"}}}`` from MLflow's result."""
    if result_df is None:
        raise EvaluationError(
            "mlflow.genai.evaluate returned no per-item results (its traces could not be read "
            "back from the tracking store). Check that the store is writable and re-run."
        )
    verdicts: dict[str, dict[str, dict[str, Any]]] = {}
    for _, row in result_df.iterrows():
        tags = row.get("tags") if isinstance(row.get("tags"), dict) else {}
        item_id = tags.get(ITEM_ID_TAG)
        if item_id is None:
            continue
        for assessment in row.get("assessments") or []:
            assessment = _as_dict(assessment)
            name = assessment.get("assessment_name") or assessment.get("name")
            feedback = assessment.get("feedback")
            if name not in names or not isinstance(feedback, dict):
                continue
            verdicts.setdefault(item_id, {})[name] = _verdict(feedback, assessment)
    return verdicts


def _as_dict(assessment: Any) -> dict[str, Any]:
    if isinstance(assessment, dict):
        return assessment
    to_dictionary = getattr(assessment, "to_dictionary", None)
    return to_dictionary() if to_dictionary is not None else {}


def _verdict(feedback: dict[str, Any], assessment: dict[str, Any]) -> dict[str, Any]:
    value, error = feedback.get("value"), feedback.get("error")
    rationale = assessment.get("rationale") or ""
    if error:
        message = error.get("error_message") if isinstance(error, dict) else str(error)
        return {"value": None, "passed": False, "rationale": f"scorer error: {message}"}
    if isinstance(value, bool):
        passed = value
    elif isinstance(value, str) and value.lower() in ("yes", "no"):
        passed = value.lower() == "yes"
    else:
        passed = None
    return {"value": value, "passed": passed, "rationale": rationale}


def _prompt_text(item: EvalItem) -> str:
    if item.prompt is not None:
        return item.prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in item.chat_messages)


def _item_table(
    eval_set: EvalSet,
    answers: dict[str, ItemGeneration],
    verdicts: dict[str, dict[str, dict[str, Any]]],
    kinds: list[str],
    judges: list[str],
) -> Any:
    import pandas as pd

    rows = []
    for item in eval_set.items:
        answer = answers[item.id]
        found = verdicts.get(item.id, {})
        row: dict[str, Any] = {
            "id": item.id,
            "tags": list(item.tags),
            "prompt": _prompt_text(item),
            "output": answer.content,
            "error": answer.error,
            "latency_s": answer.latency_s,
            "batch_size": answer.batch_size,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "finish_reason": answer.finish_reason,
        }
        checks = []
        for kind in kinds:
            if not _expected(item, kind):
                row[kind], row[f"{kind}_rationale"] = None, None
                continue
            if kind not in found:
                raise EvaluationError(
                    f"mlflow.genai.evaluate recorded no verdict of scorer {kind!r} for item "
                    f"{item.id!r}; its traces in the tracking store are incomplete. Re-run."
                )
            row[kind] = found[kind]["passed"]
            row[f"{kind}_rationale"] = found[kind]["rationale"]
            checks.append(found[kind]["passed"] is True)
        for judge in judges:
            verdict = found.get(judge, {})
            row[judge] = verdict.get("value")
            row[f"{judge}_rationale"] = verdict.get("rationale")
        row["passed"] = answer.error is None and bool(checks) and all(checks)
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in ("prompt_tokens", "completion_tokens"):
        table[column] = table[column].astype("Int64")
    return table


def seconds_per_token(items: list[ItemGeneration]) -> list[float]:
    """Each answered item's seconds per output token: its latency over its completion tokens.

    Time to first token is not subtracted: it is measured on separate streamed samples, not on
    the batched requests these latencies come from, so the figure includes the prompt's share
    (prefill) and, in a batch, the wait for the batch's longest answer. Items that failed or
    report no completion tokens have none.
    """
    return [
        item.latency_s / item.completion_tokens
        for item in items
        if item.error is None and item.completion_tokens
    ]


def _metrics(eval_set: EvalSet, generation: Generation, table: Any) -> dict[str, float]:
    n = len(table)
    passed = [bool(p) for p in table["passed"]]
    metrics: dict[str, float] = {
        "n_items": float(n),
        "pass_rate": _mean(passed),
    }
    for tag in eval_set.tags:
        with_tag = [p for p, tags in zip(passed, table["tags"], strict=True) if tag in tags]
        metrics[f"pass_rate.{tag}"] = _mean(with_tag)
    errors = sum(record.error is not None for record in generation.items)
    metrics["n_errors"] = float(errors)
    for kind in (REFUSED, TIMED_OUT):  # zero when the deadline covers the work
        metrics[f"n_{kind}"] = float(sum(r.failure == kind for r in generation.items))
    metrics["error_rate"] = errors / n if n else 0.0
    latencies = [record.latency_s for record in generation.items]
    if latencies:
        metrics["latency_p50_s"] = _percentile(latencies, 50)
        metrics["latency_p95_s"] = _percentile(latencies, 95)
        metrics["batch_size_mean"] = _mean([record.batch_size for record in generation.items])
    tokens = [r.completion_tokens for r in generation.items if r.completion_tokens is not None]
    metrics["generation_wall_s"] = generation.wall_s
    if generation.deadline_s is not None:
        metrics["generation_deadline_s"] = generation.deadline_s
    if tokens:
        metrics["completion_tokens"] = float(sum(tokens))
        if generation.wall_s > 0:
            metrics["tokens_per_s"] = sum(tokens) / generation.wall_s
    per_token = seconds_per_token(generation.items)
    if per_token:
        metrics["s_per_token_p50"] = _percentile(per_token, 50)
        metrics[S_PER_TOKEN_P95] = _percentile(per_token, 95)
    metrics["ttft_samples"] = float(len(generation.ttft_s))
    if generation.ttft_s:
        metrics["ttft_p50_s"] = _percentile(generation.ttft_s, 50)
        metrics[TTFT_P95] = _percentile(generation.ttft_s, 95)
    if generation.peak_rss_mb is not None:
        metrics["peak_rss_mb"] = generation.peak_rss_mb
    return metrics


def _plot(eval_set: EvalSet, table: Any, metrics: dict[str, float], *, title: str) -> Any:
    # A bare Figure (Agg canvas): no pyplot, no global backend state, safe in worker threads.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    latency_ax, pass_ax = figure.subplots(1, 2)
    latencies = [value for value in table["latency_s"] if value is not None]
    latency_ax.hist(latencies, bins=min(20, max(1, len(latencies))), color="#4c72b0")
    for key, style in (("latency_p50_s", "--"), ("latency_p95_s", ":")):
        if key in metrics:
            latency_ax.axvline(metrics[key], color="black", linestyle=style, label=key)
    latency_ax.set_xlabel("request latency (s; a batched row counts its batch's wall time)")
    latency_ax.set_ylabel("items")
    latency_ax.set_title("Latency")
    if latencies:
        latency_ax.legend()
    labels = ["all", *eval_set.tags]
    values = [metrics["pass_rate"], *(metrics[f"pass_rate.{tag}"] for tag in eval_set.tags)]
    pass_ax.barh(labels[::-1], values[::-1], color="#55a868")
    pass_ax.set_xlim(0, 1)
    pass_ax.set_xlabel("pass rate")
    pass_ax.set_title("Pass rate per tag")
    figure.suptitle(f"{title} on {eval_set.name} ({eval_set.content_hash[:12]})")
    return figure


def _mean(values: Sequence[float | bool]) -> float:
    return sum(float(v) for v in values) / len(values) if values else 0.0


def _percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


# --- the whole evaluation without Prefect -----------------------------------------------------


def run_evaluation_parameters() -> dict[str, Any]:
    """The generation settings an evaluation runs with, as run params."""
    settings = get_settings()
    return {
        "batch_size": settings.eval_batch_size,
        "default_max_tokens": settings.eval_default_max_tokens,
        "ttft_samples": settings.eval_ttft_samples,
    }


def evaluate_model(
    model_uri: str, eval_set: str | Path | None = None, *, reuse: bool = True
) -> EvalSummary:
    """Everything `flows.evaluate.evaluate_flow` does but the Prefect artifact, in-process.

    Args:
        model_uri: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
        eval_set: Eval set name or path; the default set when None.
        reuse: Return the version's existing evaluation on the same eval set, if any.

    Returns:
        The evaluation (``reused`` when nothing was generated).
    """
    target = resolve_model(model_uri)
    loaded = open_eval_set(eval_set)
    if reuse:
        existing = find_evaluation(target.model_name, target.version, loaded.content_hash)
        if existing is not None:
            return existing
    generation = generate_for(target, loaded)
    summary = score_generation(target, loaded, generation, params=run_evaluation_parameters())
    champion = find_champion_evaluation(
        target.model_name, loaded.content_hash, candidate_version=target.version
    )
    registry.client().log_text(
        summary.run_id, comparison_markdown(summary, champion), COMPARISON_ARTIFACT
    )
    return summary


# --- Prefect task: no retries (nothing here is transient), no caching (stores) ----------------


@task(name="score-and-record", cache_policy=NO_CACHE)
def score_task(target: ModelTarget, eval_set: EvalSet, generation: Generation) -> EvalSummary:
    """Prefect wrapper of `score_generation`, with the generation settings as params."""
    return score_generation(target, eval_set, generation, params=run_evaluation_parameters())
