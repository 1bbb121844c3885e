"""Generation: every eval item answered by the model in batched ``predict`` calls, and the
speed of it (latency, tokens/s, time to first token, peak memory).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from phi3ops.errors import EvaluationError, InvalidInputError
from phi3ops.evalset import EvalItem, EvalSet
from phi3ops.names import artifact_key
from phi3ops.registry import ModelTarget
from phi3ops.settings import get_settings
from tasks.evaluation.resolve import load_model
from tasks.evaluation.values import (
    FAILED,
    FAILURES,
    REFUSED,
    TIMED_OUT,
    EvalSummary,
    Failure,
    Generation,
    ItemGeneration,
)
from tasks.loaded_models import release
from tasks.progress import RunProgress, terminal_bar

logger = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 500
#: New tokens of the warm-up request, which measures the model's speed for the deadline.
WARM_UP_TOKENS = 8
#: The deadline is this many times the work at the warm-up's speed (one row at a time).
DEADLINE_MARGIN = 2.0
#: The least deadline, whatever the measured speed (a tiny model measures milliseconds).
MIN_DEADLINE_S = 600.0
#: Seconds per token assumed when the warm-up could not measure (it failed).
UNMEASURED_S_PER_TOKEN = 2.0


def generation_progress_key(model_name: str, version: str) -> str:
    """The Prefect progress artifact key of a version's generation (``eval-progress-<m>-<v>``)."""
    return artifact_key("eval-progress", model_name, version)


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
    timeout_s: float | None = None,
    progress_key: str | None = None,
) -> Generation:
    """Answers every item of ``eval_set`` with ``model``, in batches, and measures the speed.

    One untimed request (the first item, a few tokens) warms the model up first and measures its
    speed, from which the evaluation's deadline is set (`evaluation_deadline_s`): evaluation is
    offline work, so no call is cut at a client's request timeout. Every predict call of a model
    that takes ``params['timeout_s']`` (the ONNX pyfunc) gets the time left to that deadline as
    its timeout, so its admission never refuses work the deadline covers. A call that fails is
    not retried row by row: a refused or failed call is split in halves (a refusal costs no
    work, and one bad row sinks only the calls that hold it), a call that timed out is not
    retried, and a row that still fails is recorded once, with its error, its `Failure` kind and
    no output. Progress (items done / total, tokens/s) is drawn on the terminal
    (`tasks.progress.terminal_bar`) and, inside a Prefect run, kept in a progress artifact.

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
        timeout_s: Seconds the whole generation may take; defaults to ``PHI3OPS_EVAL_TIMEOUT_S``,
            else computed from the work and the measured speed (`evaluation_deadline_s`).
        progress_key: Key of the Prefect progress artifact (0 to 100 % as items are answered;
            see `generation_progress_key`); None, or outside a Prefect run: none is written.

    Returns:
        One `ItemGeneration` per item, in eval-set order, and the speed measurements.
    """
    settings = get_settings()
    batch_size = settings.eval_batch_size if batch_size is None else batch_size
    default_max_tokens = (
        settings.eval_default_max_tokens if default_max_tokens is None else default_max_tokens
    )
    ttft_samples = settings.eval_ttft_samples if ttft_samples is None else ttft_samples
    timeout_s = settings.eval_timeout_s if timeout_s is None else timeout_s
    items = eval_set.items
    requests = [item.request(default_max_tokens) for item in items]
    batches = plan_batches(items, default_max_tokens=default_max_tokens, batch_size=batch_size)

    caller = _Caller(model)
    s_per_token = _warm_up(caller, requests[0]) if requests else None
    deadline_s = evaluation_deadline_s(requests, s_per_token, timeout_s=timeout_s)
    caller.deadline = time.monotonic() + deadline_s
    hwm_reset = _reset_peak_rss()
    records: list[ItemGeneration | None] = [None] * len(items)
    progress = _Progress(len(items), eval_set.name, progress_key)
    try:
        for batch in batches:
            for done in caller.answer(batch, requests, [item.id for item in items]):
                for index, record in done:
                    records[index] = record
                progress.advance([record for _, record in done], caller.wall)
        progress.finish()
    finally:
        progress.close()
    peak = _peak_rss_mb(hwm_reset)

    notes: list[str] = []
    ttft = _measure_ttft(caller, requests[: max(0, ttft_samples)], notes) if ttft_samples else []
    if not ttft_samples:
        notes.append("time to first token not measured: eval_ttft_samples is 0")
    generation = Generation(
        items=[record for record in records if record is not None],
        wall_s=caller.wall,
        ttft_s=ttft,
        peak_rss_mb=peak,
        deadline_s=deadline_s,
        notes=notes,
    )
    logger.info("%s", generation_line(eval_set.name, generation))
    return generation


def evaluation_deadline_s(
    requests: Sequence[dict[str, Any]], s_per_token: float | None, *, timeout_s: float | None
) -> float:
    """Seconds the evaluation's generation may take: ``timeout_s`` when set, else
    `DEADLINE_MARGIN` x every item's ``max_tokens`` at ``s_per_token`` (the warm-up's speed,
    one row at a time, so with no batching gain assumed), and at least `MIN_DEADLINE_S`.
    """
    if timeout_s is not None:
        return float(timeout_s)
    per_token = UNMEASURED_S_PER_TOKEN if s_per_token is None else s_per_token
    tokens = sum(int(request["max_tokens"]) for request in requests)
    return max(MIN_DEADLINE_S, DEADLINE_MARGIN * tokens * per_token)


def generation_line(name: str, generation: Generation) -> str:
    """One line for the logs: how long generation took, and what was refused or timed out."""
    items = generation.items
    tokens = sum(item.completion_tokens or 0 for item in items)
    rate = tokens / generation.wall_s if generation.wall_s > 0 else 0.0
    counts = {kind: sum(item.failure == kind for item in items) for kind in FAILURES}
    return (
        f"Generated {len(items)} items of {name} in {generation.wall_s:.1f} s ({tokens} tokens, "
        f"{rate:.2f} tokens/s; deadline {generation.deadline_s or 0:.0f} s): "
        f"{counts['refused']} refused, {counts['timed_out']} timed out, "
        f"{counts['failed']} failed"
    )


def evaluation_line(summary: EvalSummary, *, took_s: float | None = None) -> str:
    """One line for the logs: how long an evaluation took, and what was refused or timed out
    (zero expected: the deadline covers the work).
    """
    m = summary.metrics
    where = f"Evaluation of {summary.model_uri} on {summary.eval_set}"
    if summary.reused:
        return f"{where}: reused (run {summary.run_id}), nothing generated"
    took = f" took {took_s:.0f} s" if took_s is not None else ""
    return (
        f"{where}{took}: generation {m.get('generation_wall_s', 0.0):.0f} s for "
        f"{m.get('n_items', 0):.0f} items ({m.get('completion_tokens', 0.0):.0f} tokens, "
        f"{m.get('tokens_per_s', 0.0):.2f} tokens/s; deadline "
        f"{m.get('generation_deadline_s', 0.0):.0f} s); {m.get('n_refused', 0.0):.0f} refused, "
        f"{m.get('n_timed_out', 0.0):.0f} timed out, {m.get('n_errors', 0.0):.0f} errors in all"
    )


class _Caller:
    """Predict calls with the evaluation's deadline, and what a failed call becomes."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.takes_timeout = _takes_timeout(model)
        self.deadline = time.monotonic() + MIN_DEADLINE_S  # until the warm-up has measured
        self.wall = 0.0  # seconds spent in predict calls (warm-up excluded)

    def params(self, *, least_s: float = 0.0) -> dict[str, Any] | None:
        """``{"timeout_s": <time left>}`` for models that take it, else None."""
        if not self.takes_timeout:
            return None
        return {"timeout_s": max(least_s, self.deadline - time.monotonic(), 0.001)}

    def predict(self, rows: list[dict[str, Any]]) -> list[Any]:
        params = self.params()
        answers = self.model.predict(rows, params=params) if params else self.model.predict(rows)
        return _as_answers(answers, len(rows))

    def stream(self, request: dict[str, Any]) -> Iterator[Any]:
        """``predict_stream`` of one request: its first token is due within the time left (at
        least `MIN_DEADLINE_S`: time to first token is measured after the batches).
        """
        params = self.params(least_s=MIN_DEADLINE_S)
        if params:
            return self.model.predict_stream(request, params=params)
        return self.model.predict_stream(request)

    def answer(
        self, batch: list[int], requests: list[dict[str, Any]], ids: list[str]
    ) -> Iterator[list[tuple[int, ItemGeneration]]]:
        """Answers ``batch`` (item indices) in one call, splitting it in halves on a refusal
        or a failure; yields the records of each call as it finishes.
        """
        if time.monotonic() >= self.deadline:
            error = "TimeoutError: not sent: the evaluation's deadline had passed"
            yield [(i, _failed(ids[i], error, TIMED_OUT, 0.0, len(batch))) for i in batch]
            return
        started = time.perf_counter()
        try:
            answers = self.predict([requests[i] for i in batch])
        except Exception as exc:
            elapsed = time.perf_counter() - started
            self.wall += elapsed
            kind = failure_of(exc)
            if kind != TIMED_OUT and len(batch) > 1:
                half = (len(batch) + 1) // 2
                logger.warning(
                    "A call of %d eval items failed (%s); answering it in two halves",
                    len(batch),
                    _describe(exc),
                )
                yield from self.answer(batch[:half], requests, ids)
                yield from self.answer(batch[half:], requests, ids)
                return
            error = _describe(exc)
            yield [(i, _failed(ids[i], error, kind, elapsed, len(batch))) for i in batch]
            return
        elapsed = time.perf_counter() - started
        self.wall += elapsed
        yield [
            (i, _record(ids[i], answer, elapsed, len(batch)))
            for i, answer in zip(batch, answers, strict=True)
        ]


def failure_of(exc: BaseException) -> Failure:
    """What a failed call was: ``refused`` (the model said so before any work, HTTP 429),
    ``timed_out`` (past its timeout, HTTP 504) or ``failed`` (anything else).
    """
    code = getattr(exc, "error_code", None)
    if code == "RESOURCE_EXHAUSTED":
        return REFUSED
    if code == "DEADLINE_EXCEEDED" or isinstance(exc, TimeoutError):
        return TIMED_OUT
    return FAILED


def _takes_timeout(model: Any) -> bool:
    """Whether the model's signature takes ``params['timeout_s']`` (the ONNX pyfunc's does)."""
    metadata = getattr(model, "metadata", None)
    try:
        schema = metadata.get_params_schema() if metadata is not None else None
    except Exception:
        return False
    return schema is not None and any(param.name == "timeout_s" for param in schema.params)


def _failed(
    item_id: str, error: str, kind: Failure, latency: float, batch_size: int
) -> ItemGeneration:
    return ItemGeneration(
        id=item_id,
        content=None,
        error=error,
        failure=kind,
        latency_s=latency,
        batch_size=batch_size,
    )


class _Progress:
    """Generation progress: the terminal bar and the Prefect progress artifact, per batch."""

    def __init__(self, total: int, name: str, key: str | None) -> None:
        self.total, self.done, self.tokens = total, 0, 0
        self.bar = terminal_bar(total=total, desc=f"Evaluating on {name}", unit="item")
        self.artifact = RunProgress(key, self._text(0.0)).start() if key else None

    def advance(self, batch: Sequence[ItemGeneration | None], wall: float) -> None:
        self.done += len(batch)
        self.tokens += sum(r.completion_tokens or 0 for r in batch if r is not None)
        rate = self.tokens / wall if wall > 0 else 0.0
        self.bar.set_postfix_str(f"{rate:.1f} tokens/s", refresh=False)
        self.bar.update(len(batch))
        if self.artifact is not None:
            self.artifact.update(self.done, self.total, description=self._text(rate))

    def finish(self) -> None:
        if self.artifact is not None:
            self.artifact.update(self.done, self.total)  # 100 %: an empty set has no batch

    def close(self) -> None:
        self.bar.close()

    def _text(self, rate: float) -> str:
        return f"Generating answers: {self.done}/{self.total} items, {rate:.1f} tokens/s"


def _warm_up(caller: _Caller, request: dict[str, Any]) -> float | None:
    """One untimed request of a few tokens: seconds per token it took (prefill included, so
    an upper bound), or None when it failed.
    """
    rows = [{**request, "max_tokens": min(WARM_UP_TOKENS, int(request["max_tokens"]))}]
    started = time.perf_counter()
    try:
        (answer,) = caller.predict(rows)
        _, usage, _ = completion_text(answer)
    except Exception:  # the timed call of this item records whatever is wrong with it
        logger.debug("Warm-up request failed", exc_info=True)
        return None
    elapsed = time.perf_counter() - started
    tokens = _int_or_none(usage.get("completion_tokens")) or rows[0]["max_tokens"]
    return elapsed / max(1, tokens)


def _as_answers(answers: Any, rows: int) -> list[Any]:
    """What ``predict`` returned, as one answer per row, whatever shape the flavor returns."""
    if hasattr(answers, "to_dict") and hasattr(answers, "columns"):  # a DataFrame
        answers = answers.to_dict(orient="records")
    elif isinstance(answers, dict | str):
        answers = [answers]
    elif hasattr(answers, "tolist"):  # numpy / pandas Series
        answers = answers.tolist()
    answers = list(answers)
    if len(answers) != rows:
        raise EvaluationError(
            f"The model answered {len(answers)} times to {rows} requests in one predict "
            f"call: it must answer each row once."
        )
    return answers


def _record(item_id: str, answer: Any, latency: float, batch_size: int) -> ItemGeneration:
    try:
        content, usage, finish_reason = completion_text(answer)
    except ValueError as exc:
        return _failed(item_id, _describe(exc), FAILED, latency, batch_size)
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
                usage = answer.get("usage")
                if not isinstance(usage, dict):
                    usage = {}
                return content, usage, choices[0].get("finish_reason")
    raise ValueError(
        f"unrecognised answer (expected a chat.completion with choices[0].message.content, "
        f"or a string): {str(answer)[:200]}"
    )


def _measure_ttft(caller: _Caller, requests: list[dict[str, Any]], notes: list[str]) -> list[float]:
    """Seconds from ``predict_stream`` to its first chunk carrying text, per request."""
    ttft: list[float] = []
    for position, request in enumerate(requests):
        started = time.perf_counter()
        stream: Iterator[Any] | None = None
        try:
            stream = caller.stream(request)
            first = None
            for chunk in stream:
                if _chunk_text(chunk):
                    first = time.perf_counter() - started
                    break
            ttft.append(first if first is not None else time.perf_counter() - started)
        except Exception as exc:
            if _does_not_stream(exc):
                note = f"time to first token not measured: the model does not stream ({exc})"
                if "transformers" in str(getattr(caller.model, "loader_module", "")):
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


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def generate_for(
    target: ModelTarget,
    eval_set: EvalSet,
    *,
    batch_size: int | None = None,
    progress_key: str | None = None,
    **options: Any,
) -> Generation:
    """Load the version (`load_model`, batches of ``batch_size`` rows), answer every item
    (`generate_outputs`, with ``options``), then release the model (`tasks.loaded_models`), so
    the next stage's model does not load beside it.
    """
    batch_size = get_settings().eval_batch_size if batch_size is None else batch_size
    model = load_model(target, batch_size=batch_size)
    try:
        return generate_outputs(
            model, eval_set, batch_size=batch_size, progress_key=progress_key, **options
        )
    finally:
        release(model)


# --- Prefect task: no retries (nothing here is transient), no caching (models) ----------------


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(target: ModelTarget, eval_set: EvalSet) -> Generation:
    """Answer every item with the version (`generate_for`), with a progress artifact
    (`generation_progress_key`) in this run.
    """
    return generate_for(
        target,
        eval_set,
        progress_key=generation_progress_key(target.model_name, target.version),
    )
