"""Evaluate a registered model version on a versioned eval set: quality, speed, and a comparison.

What one evaluation does, in order:

1. **Resolve** the model URI (``models:/<name>@<alias>`` or ``models:/<name>/<version>``) to a
   registry version, failing with `InvalidInputError` before any work when it does not exist.
2. **Generate** (`generate_outputs`): every item's ``llm/v1/chat`` request goes through the model
   loaded with ``mlflow.pyfunc.load_model`` (either flavor), several rows per ``predict`` call.
   Rows of one call share their generation fields (MLflow's transformers flavor applies the
   first row's ``max_tokens`` to every row), so batches are formed per ``max_tokens``. A batch
   that raises is retried row by row: one bad item costs its own row only, and its error is
   recorded. Speed is measured here: a row's latency is its call's wall time; output tokens/s
   is all completion tokens over the wall time of all calls; peak memory is the process's RSS
   high-water mark during generation; time to first token streams a few items one by one
   through ``predict_stream`` (the ONNX pyfunc streams; MLflow's transformers pyfunc does not,
   which is recorded as a note).
3. **Score** (`score_generation`): ``mlflow.genai.evaluate`` runs one code scorer per
   expectation kind (each wrapping `phi3ops.evalset.check`) over the precomputed outputs (no
   ``predict_fn``: generation, the slow part, stays batched here), inside an MLflow run this
   module starts, so everything lands in that one run: a trace per item with its verdicts and
   expectations as assessments, ``<kind>/mean`` metrics (each scorer's pass rate over the items
   that have that expectation), plus this module's metrics, params, tags, the per-item table,
   a plot, and the comparison. The version gets the tag ``phi3ops.eval.<hash[:12]>`` = run id.
4. **Compare** (`comparison_markdown`) with the evaluation of ``@champion`` on the *same* eval
   set (same content hash) and nothing else.

Optional LLM judges (mlflow.genai's ``RelevanceToQuery`` and ``Safety``) join the scorers only
when ``PHI3OPS_JUDGE_ENDPOINT`` names a judge model; by default nothing leaves the machine.

Metrics of a run (`EvalSummary.metrics`):

====================  ===============================================================
``pass_rate``         items whose every expectation passed / items (failed requests fail)
``pass_rate.<tag>``   the same over the items carrying the tag
``<kind>/mean``       scorer pass rate over the items having that expectation kind
``error_rate``        failed requests / items (with ``n_items``, ``n_errors``)
``latency_p50_s``     per-request latency percentiles (``latency_p95_s`` too); a batched
                      row's latency is its batch's wall time (``batch_size_mean``)
``ttft_p50_s``        time to first token through streaming (``ttft_samples`` measured)
``tokens_per_s``      completion tokens / generation wall time (``completion_tokens``,
                      ``generation_wall_s``)
``peak_rss_mb``       RSS high-water mark of the process during generation
====================  ===============================================================
"""

from __future__ import annotations

import json
import logging
import math
import re
import resource
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from phi3ops.errors import EvaluationError, InvalidInputError
from phi3ops.evalset import EXPECTATION_KINDS, EvalItem, EvalSet, check, load_eval_set
from phi3ops.evalset import resolve_eval_set as _resolve_eval_set_path
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking
from tasks.registry import CHAMPION_ALIAS, TAG_PREFIX, LineageTag, resolve_model_name
from tasks.registry import artifact_key as registry_artifact_key

__all__ = [
    "CHAMPION_ALIAS",
    "COMPARISON_ARTIFACT",
    "PLOT_ARTIFACT",
    "TABLE_ARTIFACT",
    "ChampionLookup",
    "ComparisonRow",
    "EvalSummary",
    "EvalTag",
    "Generation",
    "ItemGeneration",
    "ModelTarget",
    "artifact_key",
    "comparison_markdown",
    "comparison_rows",
    "completion_text",
    "evaluate_model",
    "evaluation_tag_key",
    "expectation_scorers",
    "find_champion_evaluation",
    "find_champion_evaluation_task",
    "find_evaluation",
    "find_evaluation_task",
    "generate_outputs",
    "generate_task",
    "judge_scorers",
    "load_eval_set_task",
    "load_model",
    "parity_report",
    "plan_batches",
    "publish_comparison",
    "publish_comparison_task",
    "resolve_model",
    "resolve_model_task",
    "run_evaluation_parameters",
    "score_generation",
    "score_task",
]

logger = logging.getLogger(__name__)

#: The alias of the version in production; candidates are compared with its evaluation.

#: Artifacts of an evaluation run.
TABLE_ARTIFACT = "eval_items.json"
PLOT_ARTIFACT = "eval_plot.png"
COMPARISON_ARTIFACT = "comparison.md"

#: Trace tag naming the eval item a trace scores (set through the evaluation data's ``tags``).
ITEM_ID_TAG = f"{TAG_PREFIX}item_id"
#: Model version tag prefix: ``phi3ops.eval.<first 12 of the eval set hash>`` = run id.
EVALUATION_TAG_PREFIX = f"{TAG_PREFIX}eval."
_HASH_PREFIX_LENGTH = 12
#: Expectation values go into the evaluation data as ``expected_<kind>``: distinct from the
#: scorer names (``<kind>``), so MLflow's assessments and result columns never mix the two.
_EXPECTED_PREFIX = "expected_"
_MAX_ERROR_CHARS = 500
_EVAL_WORKERS = 4

# models:/<name>@<alias> or models:/<name>/<version>
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")


class EvalTag(StrEnum):
    """Tags on evaluation runs."""

    MODEL_NAME = f"{TAG_PREFIX}model_name"
    MODEL_VERSION = f"{TAG_PREFIX}model_version"
    MODEL_URI = f"{TAG_PREFIX}model_uri"
    EVAL_SET = f"{TAG_PREFIX}eval_set"
    EVAL_SET_HASH = f"{TAG_PREFIX}eval_set_hash"
    FLAVOR = f"{TAG_PREFIX}flavor"
    NOTES = f"{TAG_PREFIX}eval_notes"


# --- values passed between tasks ----------------------------------------------------------------


class ModelTarget(BaseModel):
    """A registry version to evaluate, resolved from the URI the caller gave."""

    model_name: str
    version: str
    model_uri: str  # as given (may name an alias)
    flavor: str
    model_id: str | None = None  # the logged model behind the version (MLflow 3)

    @property
    def version_uri(self) -> str:
        """``models:/<name>/<version>``: what is loaded, whatever the alias points at later."""
        return f"models:/{self.model_name}/{self.version}"


class ItemGeneration(BaseModel):
    """What the model answered to one eval item, and what it cost."""

    id: str
    content: str | None  # None when the request failed
    error: str | None = None
    latency_s: float  # wall time of the predict call the row was part of
    batch_size: int  # rows in that call
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


class Generation(BaseModel):
    """Every item's answer, and the speed of producing them."""

    items: list[ItemGeneration]
    wall_s: float  # all predict calls, back to back
    ttft_s: list[float] = Field(default_factory=list)
    peak_rss_mb: float | None = None
    notes: list[str] = Field(default_factory=list)


class EvalSummary(BaseModel):
    """One recorded evaluation: a model version on an eval set (identified by its hash)."""

    run_id: str
    model_name: str
    version: str
    model_uri: str
    flavor: str
    eval_set: str
    eval_set_hash: str
    metrics: dict[str, float]
    tag_pass_rates: dict[str, float]
    notes: list[str] = Field(default_factory=list)
    reused: bool = False

    @property
    def pass_rate(self) -> float | None:
        """The overall pass rate."""
        return self.metrics.get("pass_rate")


class ChampionLookup(BaseModel):
    """The evaluation a candidate is compared with, or why there is none."""

    alias: str
    version: str | None = None
    summary: EvalSummary | None = None
    reason: str | None = None  # set when summary is None


class ComparisonRow(BaseModel):
    """One metric of two evaluations side by side."""

    metric: str
    candidate: float | None
    baseline: float | None
    delta: float | None  # candidate - baseline
    ratio: float | None  # candidate / baseline
    better: Literal["higher", "lower"]
    change: Literal["better", "worse", "same", "n/a"]


# --- resolving the model ------------------------------------------------------------------------


def resolve_model(model_uri: str) -> ModelTarget:
    """The registry version a ``models:/`` URI names, checked to exist.

    Args:
        model_uri: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.

    Returns:
        The version, its flavor and its logged model.

    Raises:
        InvalidInputError: The URI is malformed, or names a model, alias or version the registry
            does not have (the message lists what exists).
    """
    from mlflow.exceptions import MlflowException

    match = _REGISTRY_URI.match(model_uri.strip()) if isinstance(model_uri, str) else None
    if match is None:
        raise InvalidInputError(
            f"Model URI {model_uri!r} is not a registry URI: use models:/<name>@<alias> (e.g. "
            f"models:/phi3-mini@candidate) or models:/<name>/<version> (e.g. "
            f"models:/phi3-mini/3). An evaluation is recorded on a registry version."
        )
    name = resolve_model_name(match["name"])
    alias, version = match["alias"], match["version"]
    if version is not None and not version.isdigit():
        raise InvalidInputError(
            f"Model URI {model_uri!r}: version {version!r} is not a number. Name a version "
            f"(models:/{name}/3) or an alias (models:/{name}@candidate)."
        )
    configure_tracking()
    client = _client()
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias is not None
            else client.get_model_version(name, version)
        )
    except MlflowException as exc:
        raise InvalidInputError(
            f"Model URI {model_uri!r}: {_registry_problem(client, name, alias, version)}"
        ) from exc
    flavor = (mv.tags or {}).get(LineageTag.FLAVOR.value) or _flavor_from_metadata(
        f"models:/{name}/{mv.version}"
    )
    source = str(mv.source or "")
    model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
    return ModelTarget(
        model_name=name,
        version=str(mv.version),
        model_uri=model_uri.strip(),
        flavor=flavor,
        model_id=model_id,
    )


def _registry_problem(client: Any, name: str, alias: str | None, version: str | None) -> str:
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=100))
        known = ", ".join(names) if names else "none yet"
        return (
            f"there is no registered model {name!r} (registered: {known}). Package one first "
            f"(`phi3ops package`) or fix the name."
        )
    if alias is not None:
        aliases = registered.aliases or {}
        known = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
        return (
            f"{name!r} has no alias {alias!r} (aliases: {known}). Use one of those, or a "
            f"version: models:/{name}/<version>."
        )
    versions = sorted(
        int(v.version) for v in client.search_model_versions(f"name = '{name}'", max_results=1000)
    )
    known = ", ".join(map(str, versions)) or "none"
    return f"{name!r} has no version {version} (versions: {known})."


def _flavor_from_metadata(uri: str) -> str:
    import mlflow

    try:
        flavors = mlflow.models.get_model_info(uri).flavors
    except Exception:  # a missing MLmodel shows up, clearly, when the model is loaded
        return "unknown"
    return "transformers" if "transformers" in flavors else "pyfunc"


# --- generation -------------------------------------------------------------------------------


def plan_batches(
    items: Sequence[EvalItem], *, default_max_tokens: int, batch_size: int
) -> list[list[int]]:
    """Indices of the items, grouped into predict calls.

    Items with equal generation fields (``max_tokens``, ``temperature``) share calls of at most
    ``batch_size`` rows, in eval-set order: MLflow's transformers flavor applies the first row's
    fields to every row of a call, so mixing them would change answers.

    Raises:
        InvalidInputError: ``batch_size`` is below 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, item in enumerate(items):
        request = item.request(default_max_tokens)
        groups.setdefault((request["max_tokens"], request["temperature"]), []).append(index)
    return [
        indices[start : start + batch_size]
        for indices in groups.values()
        for start in range(0, len(indices), batch_size)
    ]


def generate_outputs(
    model: Any,
    eval_set: EvalSet,
    *,
    batch_size: int | None = None,
    default_max_tokens: int | None = None,
    ttft_samples: int | None = None,
) -> Generation:
    """Answers every item of ``eval_set`` with ``model``, in batches, and measures the speed.

    One untimed request (the first item, one token) warms the model up first. A batch whose
    ``predict`` raises is retried row by row; a row that still fails is recorded with its error
    and no output.

    Args:
        model: A loaded pyfunc (anything with ``predict``; ``predict_stream`` for time to first
            token): requests are ``llm/v1/chat`` dicts, answers ``chat.completion`` dicts (a
            dict or a list of them) or strings.
        eval_set: The items.
        batch_size: Rows per predict call; defaults to ``PHI3OPS_EVAL_BATCH_SIZE``.
        default_max_tokens: For items without ``max_tokens``; defaults to
            ``PHI3OPS_EVAL_DEFAULT_MAX_TOKENS``.
        ttft_samples: Items streamed one by one for time to first token (the first N);
            defaults to ``PHI3OPS_EVAL_TTFT_SAMPLES``; 0 skips.

    Returns:
        One `ItemGeneration` per item, in eval-set order, and the speed measurements.
    """
    settings = get_settings()
    batch_size = settings.eval_batch_size if batch_size is None else batch_size
    default_max_tokens = (
        settings.eval_default_max_tokens if default_max_tokens is None else default_max_tokens
    )
    ttft_samples = settings.eval_ttft_samples if ttft_samples is None else ttft_samples
    items = eval_set.items
    requests = [item.request(default_max_tokens) for item in items]
    batches = plan_batches(items, default_max_tokens=default_max_tokens, batch_size=batch_size)

    if requests:
        _warm_up(model, requests[0])
    hwm_reset = _reset_peak_rss()
    records: list[ItemGeneration | None] = [None] * len(items)
    wall = 0.0
    for batch in batches:
        rows = [requests[i] for i in batch]
        started = time.perf_counter()
        try:
            answers = _predict(model, rows)
        except Exception as exc:
            wall += time.perf_counter() - started
            if len(batch) > 1:
                logger.warning(
                    "A batch of %d eval items failed (%s); retrying them one by one",
                    len(batch),
                    _describe(exc),
                )
            for index in batch:
                records[index], elapsed = _one_by_one(model, items[index].id, requests[index], exc)
                wall += elapsed
            continue
        elapsed = time.perf_counter() - started
        wall += elapsed
        for index, answer in zip(batch, answers, strict=True):
            records[index] = _record(items[index].id, answer, elapsed, len(batch))
    peak = _peak_rss_mb(hwm_reset)

    notes: list[str] = []
    ttft = _measure_ttft(model, requests[: max(0, ttft_samples)], notes) if ttft_samples else []
    if not ttft_samples:
        notes.append("time to first token not measured: eval_ttft_samples is 0")
    return Generation(
        items=[record for record in records if record is not None],
        wall_s=wall,
        ttft_s=ttft,
        peak_rss_mb=peak,
        notes=notes,
    )


def _warm_up(model: Any, request: dict[str, Any]) -> None:
    try:
        model.predict([{**request, "max_tokens": 1}])
    except Exception:  # the timed call of this item records whatever is wrong with it
        logger.debug("Warm-up request failed", exc_info=True)


def _one_by_one(
    model: Any, item_id: str, request: dict[str, Any], batch_error: BaseException
) -> tuple[ItemGeneration, float]:
    started = time.perf_counter()
    try:
        (answer,) = _predict(model, [request])
    except Exception as exc:
        elapsed = time.perf_counter() - started
        return ItemGeneration(
            id=item_id, content=None, error=_describe(exc), latency_s=elapsed, batch_size=1
        ), elapsed
    elapsed = time.perf_counter() - started
    return _record(item_id, answer, elapsed, 1), elapsed


def _predict(model: Any, rows: list[dict[str, Any]]) -> list[Any]:
    """``model.predict(rows)`` as one answer per row, whatever shape the flavor returns."""
    answers = model.predict(rows)
    if hasattr(answers, "to_dict") and hasattr(answers, "columns"):  # a DataFrame
        answers = answers.to_dict(orient="records")
    elif isinstance(answers, dict | str):
        answers = [answers]
    elif hasattr(answers, "tolist"):  # numpy / pandas Series
        answers = answers.tolist()
    answers = list(answers)
    if len(answers) != len(rows):
        raise EvaluationError(
            f"The model answered {len(answers)} times to {len(rows)} requests in one predict "
            f"call: it must answer each row once."
        )
    return answers


def _record(item_id: str, answer: Any, latency: float, batch_size: int) -> ItemGeneration:
    try:
        content, usage, finish_reason = completion_text(answer)
    except ValueError as exc:
        return ItemGeneration(
            id=item_id,
            content=None,
            error=_describe(exc),
            latency_s=latency,
            batch_size=batch_size,
        )
    return ItemGeneration(
        id=item_id,
        content=content,
        latency_s=latency,
        batch_size=batch_size,
        prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
        completion_tokens=_int_or_none(usage.get("completion_tokens")),
        finish_reason=finish_reason,
    )


def completion_text(answer: Any) -> tuple[str, dict[str, Any], str | None]:
    """``(text, usage, finish_reason)`` of one answer: a ``chat.completion`` dict or a string.

    Raises:
        ValueError: The answer has no assistant text.
    """
    if isinstance(answer, str):
        return answer, {}, None
    if isinstance(answer, dict) and isinstance(answer.get("choices"), list | tuple):
        choices = answer["choices"]
        if choices and isinstance(choices[0], dict):
            message = choices[0].get("message") or {}
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
                return content, usage, choices[0].get("finish_reason")
    raise ValueError(
        f"unrecognised answer (expected a chat.completion with choices[0].message.content, "
        f"or a string): {str(answer)[:200]}"
    )


def _measure_ttft(model: Any, requests: list[dict[str, Any]], notes: list[str]) -> list[float]:
    """Seconds from ``predict_stream`` to its first chunk carrying text, per request."""
    ttft: list[float] = []
    for position, request in enumerate(requests):
        started = time.perf_counter()
        stream: Iterator[Any] | None = None
        try:
            stream = model.predict_stream(request)
            first = None
            for chunk in stream:
                if _chunk_text(chunk):
                    first = time.perf_counter() - started
                    break
            ttft.append(first if first is not None else time.perf_counter() - started)
        except Exception as exc:
            if _does_not_stream(exc):
                note = f"time to first token not measured: the model does not stream ({exc})"
                if "transformers" in str(getattr(model, "loader_module", "")):
                    note += "; MLflow's transformers flavor has no predict_stream"
                notes.append(note)
                return []
            notes.append(f"time to first token sample {position} failed: {_describe(exc)}")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
    return ttft


def _does_not_stream(exc: BaseException) -> bool:
    if isinstance(exc, AttributeError | NotImplementedError):
        return True
    return "does not support predict_stream" in str(exc)


def _chunk_text(chunk: Any) -> str:
    if isinstance(chunk, str):
        return chunk
    if isinstance(chunk, dict):
        choices = chunk.get("choices") or []
        if choices and isinstance(choices[0], dict):
            delta = choices[0].get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            return content if isinstance(content, str) else ""
    return ""


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_peak_rss() -> bool:
    """Resets the kernel's RSS high-water mark of this process (Linux); False where it can't."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(reset: bool) -> float | None:
    """The RSS high-water mark since `_reset_peak_rss` (else since the process started), MB."""
    if reset:
        try:
            for line in _STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        except (OSError, ValueError, IndexError):
            pass
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    import sys

    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024  # bytes / kB


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
    set, params, metrics (see the module doc), the per-item table, the plot; the version gets
    the tag ``phi3ops.eval.<hash[:12]>`` = run id, which `find_evaluation` reads.

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

    configure_tracking()
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
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params(run_params)
        # No predict_fn: the answers are in the data. The harness reuses the active run, makes
        # a trace per row and logs each verdict on it, and logs "<scorer>/mean" to this run.
        model_id = _logged(target)
        with _bounded_eval_workers():
            result = mlflow.genai.evaluate(data=data, scorers=scorers, model_id=model_id)
        verdicts = _verdicts(result.result_df, {s.name for s in scorers})
        table = _item_table(eval_set, answers, verdicts, kinds, [j.name for j in judges])
        metrics = _metrics(eval_set, generation, table)
        mlflow.log_metrics(metrics, model_id=model_id)  # on the logged model's page too
        mlflow.log_table(data=table, artifact_file=TABLE_ARTIFACT)
        figure = _plot(eval_set, table, metrics, title=f"{target.model_name} v{target.version}")
        mlflow.log_figure(figure, PLOT_ARTIFACT)
    _client().set_model_version_tag(
        target.model_name,
        target.version,
        evaluation_tag_key(eval_set.content_hash),
        run.info.run_id,
    )
    logger.info(
        "Evaluated %s on %s: pass rate %.3f (run %s)",
        target.version_uri,
        eval_set.name,
        metrics["pass_rate"],
        run.info.run_id,
    )
    return _summary_from_run(mlflow.get_run(run.info.run_id))


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
        "tags": {ITEM_ID_TAG: item.id, f"{TAG_PREFIX}item_tags": ",".join(item.tags)},
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
    table["completion_tokens"] = table["completion_tokens"].astype("Int64")
    return table


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
    metrics["error_rate"] = errors / n if n else 0.0
    latencies = [record.latency_s for record in generation.items]
    if latencies:
        metrics["latency_p50_s"] = _percentile(latencies, 50)
        metrics["latency_p95_s"] = _percentile(latencies, 95)
        metrics["batch_size_mean"] = _mean([record.batch_size for record in generation.items])
    tokens = [r.completion_tokens for r in generation.items if r.completion_tokens is not None]
    metrics["generation_wall_s"] = generation.wall_s
    if tokens:
        metrics["completion_tokens"] = float(sum(tokens))
        if generation.wall_s > 0:
            metrics["tokens_per_s"] = sum(tokens) / generation.wall_s
    metrics["ttft_samples"] = float(len(generation.ttft_s))
    if generation.ttft_s:
        metrics["ttft_p50_s"] = _percentile(generation.ttft_s, 50)
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


def _summary_from_run(run: Any, *, reused: bool = False) -> EvalSummary:
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


# --- finding evaluations ----------------------------------------------------------------------


def evaluation_tag_key(eval_set_hash: str) -> str:
    """The model version tag that points at the version's evaluation on that eval set."""
    return f"{EVALUATION_TAG_PREFIX}{eval_set_hash[:_HASH_PREFIX_LENGTH]}"


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
    client = _client()
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
            return _summary_from_run(run, reused=True)
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
    return _summary_from_run(runs[0], reused=True) if runs else None


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
    client = _client()
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
            f"{eval_set_hash[:_HASH_PREFIX_LENGTH]}): {evaluated}. Results are compared only on "
            f"the same eval set; evaluate it with `phi3ops evaluate --model-uri "
            f"models:/{model_name}/{version} --eval-set <this set>`."
        ),
    )


# --- comparing --------------------------------------------------------------------------------

_LOWER_IS_BETTER = ("latency_", "ttft_", "error_rate", "n_errors", "peak_rss_mb")
_SPEED_METRICS = (
    "latency_p50_s",
    "latency_p95_s",
    "ttft_p50_s",
    "tokens_per_s",
    "error_rate",
    "peak_rss_mb",
)


def comparison_rows(candidate: EvalSummary, baseline: EvalSummary) -> list[ComparisonRow]:
    """The quality and speed metrics of two evaluations side by side, with deltas.

    Order: ``pass_rate``, ``pass_rate.<tag>`` (every tag of either), each scorer's
    ``<kind>/mean``, then latency p50/p95, time to first token, tokens/s, error rate, memory.
    A metric only one of them has shows with the other side empty.
    """
    keys = ["pass_rate"]
    both = candidate.metrics.keys() | baseline.metrics.keys()
    keys += sorted(k for k in both if k.startswith("pass_rate."))
    keys += sorted(k for k in both if k.endswith("/mean"))
    keys += [k for k in _SPEED_METRICS if k in both]
    return [_row(key, candidate.metrics.get(key), baseline.metrics.get(key)) for key in keys]


def _row(metric: str, candidate: float | None, baseline: float | None) -> ComparisonRow:
    better: Literal["higher", "lower"] = (
        "lower" if metric.startswith(_LOWER_IS_BETTER) else "higher"
    )
    delta = ratio = None
    change: Literal["better", "worse", "same", "n/a"] = "n/a"
    if candidate is not None and baseline is not None:
        delta = candidate - baseline
        ratio = candidate / baseline if baseline else None
        if math.isclose(candidate, baseline, rel_tol=1e-9, abs_tol=1e-12):
            change = "same"
        elif (delta > 0) == (better == "higher"):
            change = "better"
        else:
            change = "worse"
    return ComparisonRow(
        metric=metric,
        candidate=candidate,
        baseline=baseline,
        delta=delta,
        ratio=ratio,
        better=better,
        change=change,
    )


def comparison_markdown(candidate: EvalSummary, champion: ChampionLookup) -> str:
    """The candidate's evaluation against the champion's, as markdown (a pure function).

    Side by side per metric and per tag with deltas when the champion has an evaluation on the
    same eval set (same content hash); otherwise the candidate's own results and why there is no
    comparison.
    """
    head = _heading(candidate)
    baseline = champion.summary
    if baseline is not None and baseline.eval_set_hash != candidate.eval_set_hash:
        reason = (
            f"@{champion.alias} (version {baseline.version}) was evaluated on eval set "
            f"{baseline.eval_set!r} (hash {baseline.eval_set_hash[:_HASH_PREFIX_LENGTH]}), not "
            f"on this one (hash {candidate.eval_set_hash[:_HASH_PREFIX_LENGTH]}): results are "
            f"compared only on the same eval set."
        )
        baseline = None
    else:
        reason = champion.reason or "no champion evaluation was given."
    if baseline is None:
        own = [_row(r.metric, r.candidate, None) for r in comparison_rows(candidate, candidate)]
        lines = [
            head,
            "",
            "## No comparable champion evaluation",
            "",
            reason,
            "",
            f"## Results of version {candidate.version}",
            "",
            "| metric | value |",
            "|---|---:|",
            *(f"| {r.metric} | {_fmt(r.candidate)} |" for r in own),
        ]
        return "\n".join([*lines, *_notes(candidate)]) + "\n"
    cand_col = f"candidate v{candidate.version} ({candidate.flavor})"
    base_col = f"@{champion.alias} v{baseline.version} ({baseline.flavor})"
    lines = [
        head,
        "",
        f"## Against @{champion.alias} (version {baseline.version}, run `{baseline.run_id}`)",
        "",
        f"| metric | {cand_col} | {base_col} | delta | |",
        "|---|---:|---:|---:|---|",
    ]
    for row in comparison_rows(candidate, baseline):
        lines.append(
            f"| {row.metric} | {_fmt(row.candidate)} | {_fmt(row.baseline)} | "
            f"{_fmt(row.delta, signed=True)} | {row.change} ({row.better} is better) |"
        )
    return "\n".join([*lines, *_notes(candidate)]) + "\n"


def _heading(summary: EvalSummary) -> str:
    items = summary.metrics.get("n_items")
    count = f", {int(items)} items" if items is not None else ""
    return (
        f"# Evaluation of {summary.model_name} version {summary.version} ({summary.flavor})\n\n"
        f"Eval set `{summary.eval_set}` (hash `{summary.eval_set_hash[:_HASH_PREFIX_LENGTH]}`"
        f"{count}); MLflow run `{summary.run_id}`."
    )


def _notes(summary: EvalSummary) -> list[str]:
    if not summary.notes:
        return []
    return ["", "Notes:", "", *(f"* {note}" for note in summary.notes)]


def _fmt(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "—"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:+.3g}" if signed else f"{value:.3g}"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def parity_report(summary_a: EvalSummary, summary_b: EvalSummary) -> str:
    """Two evaluations of one source through two flavors (e.g. ONNX and transformers), as
    markdown: pass rates per tag and per scorer with differences, and speed ratios (B / A).

    Raises:
        InvalidInputError: The two ran different eval sets (different content hashes).
    """
    if summary_a.eval_set_hash != summary_b.eval_set_hash:
        raise InvalidInputError(
            f"Cannot compare evaluations on different eval sets: {summary_a.eval_set!r} (hash "
            f"{summary_a.eval_set_hash[:_HASH_PREFIX_LENGTH]}) and {summary_b.eval_set!r} (hash "
            f"{summary_b.eval_set_hash[:_HASH_PREFIX_LENGTH]}). Evaluate both versions on the "
            f"same set."
        )
    a = f"A: {summary_a.flavor} (v{summary_a.version})"
    b = f"B: {summary_b.flavor} (v{summary_b.version})"
    rows = comparison_rows(summary_b, summary_a)  # candidate = B, baseline = A
    quality = [r for r in rows if r.metric not in _SPEED_METRICS]
    speed = [r for r in rows if r.metric in _SPEED_METRICS]
    lines = [
        f"# Parity: {summary_a.flavor} vs {summary_b.flavor}",
        "",
        f"{summary_a.model_name} v{summary_a.version} (run `{summary_a.run_id}`) and "
        f"{summary_b.model_name} v{summary_b.version} (run `{summary_b.run_id}`) on eval set "
        f"`{summary_a.eval_set}` (hash `{summary_a.eval_set_hash[:_HASH_PREFIX_LENGTH]}`).",
        "",
        "## Quality",
        "",
        f"| metric | {a} | {b} | B - A |",
        "|---|---:|---:|---:|",
        *(
            f"| {r.metric} | {_fmt(r.baseline)} | {_fmt(r.candidate)} | "
            f"{_fmt(r.delta, signed=True)} |"
            for r in quality
        ),
        "",
        "## Speed",
        "",
        f"| metric | {a} | {b} | B / A |",
        "|---|---:|---:|---:|",
        *(
            f"| {r.metric} | {_fmt(r.baseline)} | {_fmt(r.candidate)} | "
            f"{'—' if r.ratio is None else f'{r.ratio:.2f}x'} |"
            for r in speed
        ),
    ]
    notes = [f"* A: {n}" for n in summary_a.notes] + [f"* B: {n}" for n in summary_b.notes]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def artifact_key(model_name: str, version: str) -> str:
    """The Prefect artifact key of a version's evaluation: ``eval-<model>-<version>``."""
    return registry_artifact_key("eval", model_name, version)


def publish_comparison(summary: EvalSummary, markdown: str, *, log_to_run: bool = True) -> str:
    """Publishes the comparison as a Prefect markdown artifact (and in the MLflow run).

    Args:
        summary: The evaluation compared.
        markdown: `comparison_markdown` of it.
        log_to_run: Also write it to the run as ``comparison.md`` (off for a reused run, which
            keeps the comparison it was recorded with).

    Returns:
        The artifact key.
    """
    from prefect.artifacts import create_markdown_artifact

    key = artifact_key(summary.model_name, summary.version)
    create_markdown_artifact(
        markdown=markdown,
        key=key,
        description=(
            f"Evaluation of {summary.model_name} v{summary.version} on {summary.eval_set} "
            f"against @{CHAMPION_ALIAS}"
        ),
    )
    if log_to_run:
        configure_tracking()
        _client().log_text(summary.run_id, markdown, COMPARISON_ARTIFACT)
    return key


# --- the whole evaluation without Prefect -----------------------------------------------------


def load_model(target: ModelTarget) -> Any:
    """The version's pyfunc, loaded once (its flavor's own loader).

    Raises:
        EvaluationError: MLflow could not load it.
    """
    import mlflow

    configure_tracking()
    try:
        return mlflow.pyfunc.load_model(target.version_uri)
    except Exception as exc:
        raise EvaluationError(
            f"Could not load {target.version_uri} ({target.flavor} flavor) for evaluation "
            f"({type(exc).__name__}: {exc}). Check that its pip requirements are installed here."
        ) from exc


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
    loaded = load_eval_set(_resolve_eval_set_path(eval_set))
    if reuse:
        existing = find_evaluation(target.model_name, target.version, loaded.content_hash)
        if existing is not None:
            return existing
    generation = generate_outputs(load_model(target), loaded)
    summary = score_generation(target, loaded, generation, params=run_evaluation_parameters())
    champion = find_champion_evaluation(
        target.model_name, loaded.content_hash, candidate_version=target.version
    )
    _client().log_text(summary.run_id, comparison_markdown(summary, champion), COMPARISON_ARTIFACT)
    return summary


# --- Prefect tasks: no retries (nothing here is transient), no caching (stores and models) ----


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model_task(model_uri: str) -> ModelTarget:
    """Prefect wrapper of `resolve_model`."""
    return resolve_model(model_uri)


@task(name="load-eval-set", cache_policy=NO_CACHE)
def load_eval_set_task(eval_set: str | None = None) -> EvalSet:
    """Resolve an eval set name or path (None: the default set) and load it."""
    return load_eval_set(_resolve_eval_set_path(eval_set))


@task(name="find-evaluation", cache_policy=NO_CACHE)
def find_evaluation_task(
    model_name: str, version: str | int, eval_set_hash: str
) -> EvalSummary | None:
    """Prefect wrapper of `find_evaluation`."""
    return find_evaluation(model_name, version, eval_set_hash)


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(target: ModelTarget, eval_set: EvalSet) -> Generation:
    """Load the version and answer every item (`load_model` + `generate_outputs`)."""
    return generate_outputs(load_model(target), eval_set)


@task(name="score-and-record", cache_policy=NO_CACHE)
def score_task(target: ModelTarget, eval_set: EvalSet, generation: Generation) -> EvalSummary:
    """Prefect wrapper of `score_generation`, with the generation settings as params."""
    return score_generation(target, eval_set, generation, params=run_evaluation_parameters())


@task(name="find-champion-evaluation", cache_policy=NO_CACHE)
def find_champion_evaluation_task(
    model_name: str, eval_set_hash: str, alias: str, candidate_version: str
) -> ChampionLookup:
    """Prefect wrapper of `find_champion_evaluation`."""
    return find_champion_evaluation(
        model_name, eval_set_hash, alias=alias, candidate_version=candidate_version
    )


@task(name="publish-comparison", cache_policy=NO_CACHE)
def publish_comparison_task(summary: EvalSummary, champion: ChampionLookup) -> str:
    """`comparison_markdown` published by `publish_comparison`; returns the markdown."""
    markdown = comparison_markdown(summary, champion)
    publish_comparison(summary, markdown, log_to_run=not summary.reused)
    return markdown


# --- helpers ----------------------------------------------------------------------------------


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()  # configure_tracking() has set the tracking and registry URIs


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _mean(values: Sequence[float | bool]) -> float:
    return sum(float(v) for v in values) / len(values) if values else 0.0


def _percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))
