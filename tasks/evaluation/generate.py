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
from tasks.evaluation.values import Generation, ItemGeneration
from tasks.progress import RunProgress, terminal_bar

logger = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 500


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
    progress_key: str | None = None,
) -> Generation:
    """Answers every item of ``eval_set`` with ``model``, in batches, and measures the speed.

    One untimed request (the first item, one token) warms the model up first. A batch whose
    ``predict`` raises is retried row by row; a row that still fails is recorded with its error
    and no output. Progress (items done / total, tokens/s) is drawn on the terminal
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
    items = eval_set.items
    requests = [item.request(default_max_tokens) for item in items]
    batches = plan_batches(items, default_max_tokens=default_max_tokens, batch_size=batch_size)

    if requests:
        _warm_up(model, requests[0])
    hwm_reset = _reset_peak_rss()
    records: list[ItemGeneration | None] = [None] * len(items)
    wall = 0.0
    progress = _Progress(len(items), eval_set.name, progress_key)
    try:
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
                    records[index], elapsed = _one_by_one(
                        model, items[index].id, requests[index], exc
                    )
                    wall += elapsed
                progress.advance([records[i] for i in batch], wall)
                continue
            elapsed = time.perf_counter() - started
            wall += elapsed
            for index, answer in zip(batch, answers, strict=True):
                records[index] = _record(items[index].id, answer, elapsed, len(batch))
            progress.advance([records[i] for i in batch], wall)
        progress.finish()
    finally:
        progress.close()
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
                usage = answer.get("usage")
                if not isinstance(usage, dict):
                    usage = {}
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


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


# --- Prefect task: no retries (nothing here is transient), no caching (models) ----------------


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(target: ModelTarget, eval_set: EvalSet) -> Generation:
    """Load the version and answer every item (`load_model` + `generate_outputs`), with a
    progress artifact (`generation_progress_key`) in this run.
    """
    return generate_outputs(
        load_model(target),
        eval_set,
        progress_key=generation_progress_key(target.model_name, target.version),
    )
