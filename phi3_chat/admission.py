"""Admission: what the model can finish in time, and what its KV cache may hold.

`_Rates` keeps moving averages of the model's own measured speed: seconds per prompt token
(prefill, padded rows x width) and seconds per generation step by batch size. Nothing is
assumed: until a rate has been measured (a tiny warm-up at load seeds batch 1), every request
is admitted. `predicted_completion_s` is the pure arithmetic the batcher admits requests with:
the running batch's remaining steps, then the batches the queue would run in up to the
request's own (their prefill and ``max_tokens`` steps). Those batches are planned with the
rules the batcher runs them by (`batch_members`, `batch_cut`): rows batch only with rows of
their grammar, and a batch is cut to its prefill slice and its KV budget.
`kv_bytes_per_token` and `default_kv_budget` size the KV cache a batch needs
(onnxruntime-genai's CPU buffer is fp32, sized for batch x (longest prompt + most new tokens)).

`KVBudget` is that memory as one process's budget: every batcher holding it reserves its
batch's KV bytes before the batch starts and gives them back when it ends, and a batch waits
while the others' batches leave too little. `shared_kv_budget` hands every model loaded in a
process with the same budget (in bytes) the same `KVBudget`, so the champion and a candidate
served beside it (`phi3ops.serving.follow`) admit rows against one budget: resident memory
stays within that budget plus both models' weights.

`refused` builds the ``RESOURCE_EXHAUSTED`` refusal with the predicted wait as a field of its
own (`RETRY_AFTER_FIELD`, whole seconds): MLflow's scoring server writes an exception's extra
fields into its JSON error body, so the serving layer reads the number there (or from the
exception of a stream) and sends it as ``Retry-After``, without parsing the message.
"""

import math
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_EXHAUSTED

#: Weight of a new measurement in the moving averages.
_ALPHA = 0.2
#: Share of the machine's physical memory the KV cache may take by default.
KV_MEMORY_SHARE = 0.25
#: Predicted seconds one native prefill call may hold the GIL by default (`prefill_chunks`):
#: long enough for a batch of 8 short chat prompts at Phi-3-mini's size on 2 cores (11.5 s
#: measured; at 10 s such batches were split and 8 clients lost batching), short of the ~30 s
#: a liveness probe with default settings tolerates.
DEFAULT_PREFILL_SLICE_S = 20.0
#: Fewest prompt tokens per prefill chunk: smaller chunks cost more than they give back.
MIN_PREFILL_CHUNK = 16
#: Bytes per KV value: onnxruntime-genai keeps the CPU KV cache in fp32.
_KV_VALUE_BYTES = 4
#: The field of a refusal (the exception's, and MLflow's JSON error body) with the seconds a
#: client should wait before it retries.
RETRY_AFTER_FIELD = "retry_after_s"


def refused(message: str, *, retry_after_s: float | None = None) -> MlflowException:
    """A ``RESOURCE_EXHAUSTED`` (HTTP 429) refusal; with ``retry_after_s``, the predicted wait
    rounded up to whole seconds (at least 1) rides along as `RETRY_AFTER_FIELD`.
    """
    if retry_after_s is None:
        return MlflowException(message, error_code=RESOURCE_EXHAUSTED)
    error = MlflowException(message, error_code=RESOURCE_EXHAUSTED)
    error.json_kwargs[RETRY_AFTER_FIELD] = max(1, math.ceil(retry_after_s))  # in its JSON body
    return error


def retry_after_of(error: Any) -> int | None:
    """The whole seconds a refusal (an `MlflowException`, or its JSON error body as a dict)
    asks a client to wait; None when it names none.
    """
    fields = getattr(error, "json_kwargs", error)
    value = fields.get(RETRY_AFTER_FIELD) if isinstance(fields, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return max(1, math.ceil(value))


class Row(NamedTuple):
    """One request row as batching sees it."""

    prompt: int  # prompt tokens
    new: int  # max_tokens
    group: Any = None  # what rows must share to run in one batch: their grammar (None: free)
    alone: bool = False  # its grammar ends only when the model stops: it runs in a batch alone


@dataclass(frozen=True)
class BatchLimits:
    """What bounds a batch: its rows, its predicted prefill (``prefill_slice_s``, None: no
    bound) and its KV cache (``kv_per_token`` x its tokens within ``kv_budget``, None: none).
    """

    max_batch_size: int
    prefill_slice_s: float | None = None
    kv_per_token: int = 0
    kv_budget: int | None = None


class _Rates:
    """Moving averages of the model's measured prefill and step times (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.prefill_s_per_token: float | None = None
        self._step_s: dict[int, float] = {}

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds < 0:
            return
        with self._lock:
            self.prefill_s_per_token = _average(self.prefill_s_per_token, seconds / tokens)

    def observe_step(self, batch_size: int, seconds: float) -> None:
        if batch_size <= 0 or seconds < 0:
            return
        with self._lock:
            self._step_s[batch_size] = _average(self._step_s.get(batch_size), seconds)

    def step_s(self, batch_size: int) -> float | None:
        """Seconds per step at this batch size: measured, else the nearest measured size
        scaled up (never down: a larger batch's step is not assumed faster).
        """
        with self._lock:
            if batch_size in self._step_s:
                return self._step_s[batch_size]
            smaller = [size for size in self._step_s if size < batch_size]
            if smaller:  # a step costs at most proportionally more rows
                size = max(smaller)
                return self._step_s[size] * batch_size / size
            larger = [size for size in self._step_s if size > batch_size]
            return self._step_s[min(larger)] if larger else None

    @property
    def known(self) -> bool:
        with self._lock:
            return self.prefill_s_per_token is not None and bool(self._step_s)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - _ALPHA) * old + _ALPHA * new


def batch_members(rows: Sequence[Row], max_batch_size: int) -> list[int]:
    """The indices of the rows that may share the first row's batch, in order: the first and
    each later row of its group, up to ``max_batch_size``; the first alone when it runs alone.
    """
    first = rows[0]
    if first.alone:
        return [0]
    return [i for i, row in enumerate(rows) if row.group == first.group][:max_batch_size]


def batch_cut(
    rows: Sequence[Row], rates: _Rates | None, limits: BatchLimits, kv_available: int | None
) -> int:
    """How many of a batch's ``rows`` (in order) run together: the most that fit in
    ``kv_available`` bytes of KV cache and whose predicted prefill stays within the slice (og
    holds the GIL through a prefill); always at least one.
    """
    n = len(rows)
    if kv_available is not None:
        while n > 1 and batch_kv_bytes(limits.kv_per_token, rows[:n]) > kv_available:
            n -= 1
    if limits.prefill_slice_s and rates is not None:
        while n > 1 and prefill_s(rates, rows[:n]) > limits.prefill_slice_s:
            n -= 1
    return n


def batch_s(rates: _Rates, rows: Sequence[Row]) -> float:
    """Predicted seconds for one batch of rows (padded)."""
    width = max(row.prompt for row in rows)
    steps = max(row.new for row in rows)
    return (rates.prefill_s_per_token or 0.0) * width * len(rows) + steps * (
        rates.step_s(len(rows)) or 0.0
    )


def predicted_completion_s(
    rates: _Rates,
    running_left_s: float,
    queued: Sequence[Row],
    new: Sequence[Row],
    limits: BatchLimits,
) -> float:
    """When the ``new`` rows would be done: the running batch's remaining time, then the
    batches the batcher would run the queued rows and ``new`` in (`planned_batches`), up to
    the last one holding a row of ``new`` (with no ``new`` rows: when the queue is empty).
    """
    rows = [*queued, *new]
    total = running_left_s
    left = len(new)
    for batch in planned_batches(rows, rates, limits):
        if new and left == 0:  # without new rows: until every queued row is done
            break
        total += batch_s(rates, [rows[i] for i in batch])
        left -= sum(1 for i in batch if i >= len(queued))
    return total


def planned_batches(rows: Sequence[Row], rates: _Rates, limits: BatchLimits) -> list[list[int]]:
    """The batches (indices into ``rows``, in queue order) the batcher would run ``rows`` in:
    the oldest row with the later rows of its group (`batch_members`), cut as the batcher cuts
    (`batch_cut`, with the whole KV budget free: the best case), and so on. Rows of other
    grammars do not share a batch, so mixed traffic runs in more, smaller batches than its
    count suggests.
    """
    batches: list[list[int]] = []
    left = list(range(len(rows)))
    while left:
        members = [left[i] for i in batch_members([rows[j] for j in left], limits.max_batch_size)]
        members = members[: batch_cut([rows[j] for j in members], rates, limits, limits.kv_budget)]
        batches.append(members)
        taken = set(members)
        left = [j for j in left if j not in taken]
    return batches


def fitting_max_tokens(
    rates: _Rates,
    running_left_s: float,
    queued: Sequence[Row],
    row: Row,
    limits: BatchLimits,
    deadline_s: float,
) -> int:
    """The most new tokens (at most ``row.new``) ``row`` may ask for and finish within
    ``deadline_s``; 0 when not even one fits.
    """
    low, high = 0, row.new
    while low < high:  # the completion grows with max_tokens: bisect
        middle = (low + high + 1) // 2
        when = predicted_completion_s(
            rates, running_left_s, queued, [row._replace(new=middle)], limits
        )
        if when <= deadline_s:
            low = middle
        else:
            high = middle - 1
    return low


def prefill_s(rates: _Rates, rows: Sequence[Row]) -> float:
    """Predicted seconds of one batch's prefill: rows x the longest prompt (padded)."""
    return (rates.prefill_s_per_token or 0.0) * max(row.prompt for row in rows) * len(rows)


def prefill_chunks(input_ids: Any, rates: _Rates, slice_s: float | None) -> list[Any]:
    """``input_ids`` (rows x width) in the pieces onnxruntime-genai's prefill takes them.

    onnxruntime-genai 0.18 holds the GIL through ``append_tokens`` (measured: a thread of
    the same process gets no turn while a batch's prompt is appended), so one long prefill
    starves the server's event loop (``/ping``, SIGTERM). One row's prompt is appended in
    chunks predicted to take about ``slice_s`` each (at least `MIN_PREFILL_CHUNK` tokens),
    giving other threads a turn between them; the answer is the same. A batch of several rows
    cannot be chunked (og appends only once at batch size > 1): the batcher keeps its
    predicted prefill within ``slice_s`` instead (`prefill_s`).
    """
    rows, width = input_ids.shape
    per_token = rates.prefill_s_per_token
    if rows != 1 or not slice_s or not per_token:
        return [input_ids]
    size = max(MIN_PREFILL_CHUNK, int(slice_s / per_token))
    return [input_ids[:, start : start + size] for start in range(0, width, size)]


def prefill_slice_setting(value: Any) -> float | None:
    """``model_config['prefill_slice_s']`` checked: seconds > 0, or 0 / None for no bound.

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE`` for anything else.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise MlflowException.invalid_parameter_value(
            f"model_config['prefill_slice_s'] must be a number of seconds >= 0 (0: no bound), "
            f"got {value!r}"
        )
    return float(value) if value and math.isfinite(value) else None


def kv_bytes_per_token(genai_config: dict[str, Any]) -> int:
    """KV cache bytes per token of one row: layers x KV heads x head size x 2 (K and V) x 4."""
    decoder = genai_config["decoder"]
    heads = int(decoder.get("num_key_value_heads") or decoder["num_attention_heads"])
    head_size = int(
        decoder.get("head_size") or int(decoder["hidden_size"]) // decoder["num_attention_heads"]
    )
    return int(decoder["num_hidden_layers"]) * heads * head_size * 2 * _KV_VALUE_BYTES


def batch_kv_bytes(per_token: int, rows: Sequence[Row]) -> int:
    """A batch's KV cache: rows x (longest prompt + most new tokens) tokens."""
    width = max(row.prompt for row in rows) + max(row.new for row in rows)
    return per_token * len(rows) * width


def machine_memory_bytes() -> int | None:
    """The machine's physical memory, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def default_kv_budget(
    genai_config: dict[str, Any],
    context_length: int,
    max_batch_size: int,
    memory_bytes: int | None,
) -> int:
    """The full batch at full context, capped by `KV_MEMORY_SHARE` of the machine's memory
    (but always room for one row at full context).
    """
    per_token = kv_bytes_per_token(genai_config)
    full = per_token * context_length * max_batch_size
    if memory_bytes is None:
        return full
    return max(min(full, int(memory_bytes * KV_MEMORY_SHARE)), per_token * context_length)


class KVBudget:
    """The KV cache bytes the batches of every model holding it may take together (thread-safe).

    A batcher reserves its next batch's bytes (`try_reserve`) and releases them when the batch
    ends (`release`); the batchers watching the budget (`watch`: their condition) are woken
    after each release, so a batch held back by another model's starts as soon as it fits.
    """

    def __init__(self, total: int) -> None:
        if total <= 0:
            raise ValueError(f"a KV budget needs a positive number of bytes, got {total}")
        self.total = total
        self._lock = threading.Lock()
        self._reserved = 0
        self._watchers: weakref.WeakSet[threading.Condition] = weakref.WeakSet()

    @property
    def reserved(self) -> int:
        """Bytes the batches running now hold."""
        with self._lock:
            return self._reserved

    def available(self) -> int:
        """Bytes a new batch may take now."""
        with self._lock:
            return self.total - self._reserved

    def try_reserve(self, nbytes: int) -> bool:
        """Takes ``nbytes`` if they fit what is left; whether it did."""
        with self._lock:
            if self._reserved + nbytes > self.total:
                return False
            self._reserved += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Gives back what `try_reserve` took, then wakes the watching batchers. Call it
        without holding a batcher's lock (waking one takes its lock).
        """
        with self._lock:
            self._reserved = max(0, self._reserved - nbytes)
            watchers = list(self._watchers)
        for condition in watchers:
            with condition:
                condition.notify_all()

    def watch(self, condition: threading.Condition) -> None:
        """Wakes ``condition`` after every release (held weakly: a dropped model stops)."""
        with self._lock:
            self._watchers.add(condition)


# One budget per byte count in this process, for as long as a loaded model holds it.
_SHARED_LOCK = threading.Lock()
_SHARED: weakref.WeakValueDictionary[int, KVBudget] = weakref.WeakValueDictionary()


def shared_kv_budget(total: int) -> KVBudget:
    """This process's `KVBudget` of ``total`` bytes: the same object for every model loaded
    with that budget (both arms of a server, whose budgets come from one setting or the same
    default), a new one when no loaded model holds it any more.
    """
    with _SHARED_LOCK:
        budget = _SHARED.get(total)
        if budget is None:
            budget = KVBudget(total)
            _SHARED[total] = budget
        return budget
