"""The batcher: concurrent calls share one onnxruntime-genai batch.

``predict`` and ``predict_stream`` calls from many threads (MLflow's scoring server, phi3ops'
server and evaluation all call from thread pools) queue their validated rows with the model's
batcher; one engine thread runs waiting rows with the same grammar (or none; sampling and seeds
may differ: each row samples on its own, `phi3_chat.sampler`) as one onnxruntime-genai batch,
waiting ``batch_wait_ms`` for company, and hands every call its own answers or stream pieces;
a greedy answer is token for token the one the request gets alone.
Overload is refused, not queued without end: with ``max_queue`` calls waiting, another gets
``RESOURCE_EXHAUSTED`` (HTTP 429) at once; a call past its timeout (``params['timeout_s']``,
else ``model_config['request_timeout_s']``) is cancelled with ``DEADLINE_EXCEEDED`` (HTTP 504);
a stream its consumer closes is cancelled too. A cancelled row takes no more tokens.

Admission knows the model's speed (`phi3_chat.admission`): a call whose predicted completion
(the running batch's rest, the batches queued ahead, its prefill and its ``max_tokens`` steps, at
the rates the model measured) falls past its timeout is refused at once with
``RESOURCE_EXHAUSTED`` naming when to retry and what would fit, instead of working until a 504;
a stream needs only its first token within its timeout. Rows whose ``max_tokens`` nobody set get
the most that fits. A batch's KV cache (rows x (longest prompt + most new tokens)) stays within
``kv_budget_bytes``: rows past it wait for the next batch; a row alone past it is refused. The
budget may be shared (`phi3_chat.admission.KVBudget`): each batch reserves its bytes before it
starts and gives them back when it ends, and waits while other models' batches hold too much.
"""

import dataclasses
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, TEMPORARILY_UNAVAILABLE

from phi3_chat.admission import (
    BatchLimits,
    KVBudget,
    Row,
    _Rates,
    batch_cut,
    batch_kv_bytes,
    batch_members,
    fitting_max_tokens,
    predicted_completion_s,
    refused,
)
from phi3_chat.request import _Request, _RowState

__all__ = ["DEFAULT_BATCH_WAIT_MS", "DEFAULT_MAX_BATCH_SIZE", "DEFAULT_MAX_QUEUE"]

#: Rows generated together at most: the KV cache grows with batch size x sequence length.
DEFAULT_MAX_BATCH_SIZE = 8
#: Requests (predict or predict_stream calls) that may wait for the engine; one more is refused.
DEFAULT_MAX_QUEUE = 64
#: How long the engine waits, after a request arrives, for others to join its batch.
DEFAULT_BATCH_WAIT_MS = 5.0
# The engine thread ends after this long with nothing to do (a new request starts another), so
# a model that is no longer used holds no thread.
_ENGINE_IDLE_S = 5.0
# A batch held back by another model's KV reservation is woken by its release; this is the
# backstop.
_KV_RECHECK_S = 1.0


def _deadline_exceeded(timeout_s: float) -> MlflowException:
    return MlflowException(
        f"the request was cancelled: it did not finish within its timeout of {timeout_s:g} s "
        "(the model is busy or the answer is long); retry later, ask for fewer max_tokens, or "
        "send a longer params['timeout_s']",
        error_code=DEADLINE_EXCEEDED,
    )


def _unloaded() -> MlflowException:
    return MlflowException(
        "the model was unloaded (the server is stopping, or serves another version now): "
        "retry, and the next request goes to the model serving then",
        error_code=TEMPORARILY_UNAVAILABLE,
    )


class _Ticket:
    """One predict or predict_stream call, from the caller's side, while the engine serves it.

    The engine puts ``("text", piece, state)`` (streams only), ``("row", position, state)``
    once a row is finished, or ``("error", exception)`` on `events`; the caller takes them with
    `next`.
    """

    def __init__(self, requests: list[_Request], *, timeout_s: float, stream: bool) -> None:
        self.requests = requests
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.stream = stream
        self.unstarted = len(requests)  # rows still waiting in the queue
        self.cancelled = False
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    @property
    def started(self) -> bool:
        return self.unstarted < len(self.requests)

    def expired(self, now: float) -> bool:
        """Past its deadline: a stream's deadline covers only its wait for the engine."""
        return now > self.deadline and not (self.stream and self.started)

    def next(self) -> tuple[Any, ...]:
        """The next event; raises `_deadline_exceeded` once the deadline has passed, and the
        batcher's `_unloaded` error once it was closed.
        """
        event = self._next()
        if event[0] == "closed":
            raise event[1]
        return event

    def _next(self) -> tuple[Any, ...]:
        while True:
            if self.stream and self.started:
                return self.events.get()
            try:
                return self.events.get(timeout=max(0.0, self.deadline - time.monotonic()))
            except queue.Empty:
                if not (self.stream and self.started):
                    raise _deadline_exceeded(self.timeout_s) from None


@dataclass(eq=False)
class _Job:
    """One row of a ticket in the engine's queue."""

    ticket: _Ticket
    position: int
    arrived: float

    @property
    def request(self) -> _Request:
        return self.ticket.requests[self.position]


class _Batcher:
    """The one owner of the state concurrent calls share: a bounded queue and an engine thread.

    Callers `submit` their validated rows and wait on the `_Ticket` they get. The engine thread
    takes the oldest waiting row and every waiting row with the same grammar (or none; a grammar
    that ends only when the model stops runs alone), up to ``max_batch_size``, waiting up to
    ``wait_s`` (after the oldest arrived or the engine got free) for more to come, and runs them
    as one onnxruntime-genai batch to its end (static batching: rows that arrive meanwhile wait
    for the next batch). A row whose caller is gone (a closed stream, a passed deadline) is
    cancelled: it stops taking tokens and the batch ends as soon as no live row is left. The
    thread starts with the first request and ends after ``_ENGINE_IDLE_S`` with nothing to do.
    """

    def __init__(
        self,
        steps: Callable[[list[_Request]], Iterator[list[_RowState]]],
        fits: Callable[[list[_Request]], bool],
        *,
        max_batch_size: int,
        max_queue: int,
        wait_s: float,
        rates: _Rates | None = None,
        kv_per_token: int = 0,
        kv_budget: int | KVBudget | None = None,
        prefill_slice_s: float | None = None,
    ) -> None:
        self._steps = steps
        self._fits = fits
        self.max_queue = max_queue
        self.wait_s = wait_s
        self.rates = rates  # None: no admission by speed
        # None: no KV budget; a KVBudget may be shared with other models' batchers
        self.kv_shared = KVBudget(kv_budget) if isinstance(kv_budget, int) else kv_budget
        self._kv_reserved = 0  # bytes the running batch holds of the budget
        # A batch's bounds (None prefill slice: unbounded), for the batches it runs and those
        # admission predicts.
        self.limits = BatchLimits(
            max_batch_size,
            prefill_slice_s,
            kv_per_token,
            None if self.kv_shared is None else self.kv_shared.total,
        )
        self._running: tuple[int, int] | None = None  # (rows, steps left) of the running batch
        self._last_batch_size = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        if self.kv_shared is not None:
            self.kv_shared.watch(self._wake)  # another batcher's release wakes this one
        self._waiting: deque[_Job] = deque()
        self._queued = 0  # tickets with rows still waiting
        self._thread: threading.Thread | None = None
        self._running_jobs: list[_Job] = []
        self._closed = False  # close(): every call ended, no new one taken

    @property
    def queued(self) -> int:
        """Requests waiting for the engine (not counting those it is generating)."""
        with self._lock:
            return self._queued

    def submit(
        self,
        requests: list[_Request],
        *,
        timeout_s: float,
        stream: bool,
        flexible: list[bool] | None = None,
    ) -> _Ticket:
        """Queues one call's rows; refuses at once what cannot be served in time.

        ``flexible`` marks rows whose ``max_tokens`` nobody set: they get the most that fits.

        Raises:
            MlflowException: ``RESOURCE_EXHAUSTED`` (HTTP 429) when the queue is full, when a
                row alone needs more KV cache than the budget, or when the call is predicted
                to finish (a stream: to start) past its timeout.
        """
        with self._lock:
            if self._closed:
                raise _unloaded()
            if self._queued >= self.max_queue:
                raise refused(
                    f"the model's request queue is full ({self.max_queue} requests waiting "
                    "while it generates): retry later",
                    retry_after_s=self._work_ahead_s(),
                )
            requests = self._admitted(requests, timeout_s, stream, flexible)
            ticket = _Ticket(requests, timeout_s=timeout_s, stream=stream)
            now = time.monotonic()
            self._waiting.extend(_Job(ticket, position, now) for position in range(len(requests)))
            self._queued += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="onnx-chat-batcher", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        return ticket

    def running_left_s(self) -> float:
        """Predicted seconds until the running batch is done (holding the lock)."""
        if self._running is None or self.rates is None:
            return 0.0
        rows, steps_left = self._running
        return steps_left * (self.rates.step_s(rows) or 0.0)

    def _work_ahead_s(self) -> float | None:
        """Predicted seconds of work ahead of a new request (holding the lock); None unmeasured."""
        if self.rates is None or not self.rates.known:
            return None
        queued = [_row(job.request) for job in self._waiting]
        return predicted_completion_s(self.rates, self.running_left_s(), queued, [], self.limits)

    def _admitted(
        self,
        requests: list[_Request],
        timeout_s: float,
        stream: bool,
        flexible: list[bool] | None,
    ) -> list[_Request]:
        """``requests`` as they will run (flexible ``max_tokens`` fitted), or a refusal."""
        for request in requests:
            alone = batch_kv_bytes(self.limits.kv_per_token, [_row(request)])
            budget = self.limits.kv_budget
            if budget is not None and alone > budget:
                raise refused(
                    f"the request needs {alone / 2**20:.0f} MiB of KV cache (prompt "
                    f"{len(request.input_ids)} + max_tokens {request.max_tokens} tokens), more "
                    f"than the model's budget of {budget / 2**20:.0f} MiB: ask for "
                    "fewer max_tokens or send a shorter prompt"
                )
        rates = self.rates
        if rates is None or not rates.known:
            return requests
        running = self.running_left_s()
        queued = [_row(job.request) for job in self._waiting]
        if flexible and any(flexible):
            fitted = []
            for request, fit in zip(requests, flexible, strict=True):
                if fit:
                    most = fitting_max_tokens(
                        rates, running, queued, _row(request), self.limits, timeout_s
                    )
                    request = dataclasses.replace(request, max_tokens=max(1, most))
                fitted.append(request)
                queued.append(_row(request))
            requests = fitted
            queued = queued[: len(queued) - len(requests)]
        rows = [_row(request) for request in requests]
        if stream:  # a stream must start in time; once it streams it runs to its end
            rows = [row._replace(new=1) for row in rows]
        when = predicted_completion_s(rates, running, queued, rows, self.limits)
        if when > timeout_s:
            ahead = predicted_completion_s(rates, running, queued, [], self.limits)
            idle = predicted_completion_s(rates, 0.0, [], rows, self.limits)
            what = "start streaming" if stream else "finish"
            hint = (
                f"retry in about {math.ceil(ahead)} s"
                if idle <= timeout_s
                else "ask for fewer max_tokens or send a longer params['timeout_s']"
            )
            raise refused(
                f"the model would {what} this request in about {when:.1f} s at its measured "
                f"speed ({ahead:.1f} s of work ahead of it), past its timeout of "
                f"{timeout_s:g} s: refused before any work; {hint}",
                retry_after_s=ahead if idle <= timeout_s else None,
            )
        return requests

    def cancel(self, ticket: _Ticket) -> None:
        """Gives up ``ticket``: its waiting rows leave the queue, its running rows stop."""
        with self._lock:
            ticket.cancelled = True
            if ticket.unstarted:
                self._waiting = deque(job for job in self._waiting if job.ticket is not ticket)
                ticket.unstarted = 0
                self._queued -= 1

    def close(self) -> None:
        """Ends every call now (the server stops after its drain, or the model is unloaded):
        waiting calls and those generating get ``TEMPORARILY_UNAVAILABLE`` (HTTP 503) at once,
        the running batch stops at its next step, the engine thread ends, and new calls are
        refused; so no thread waits on this model past the server's drain.
        """
        with self._lock:
            self._closed = True
            tickets = {id(job.ticket): job.ticket for job in [*self._waiting, *self._running_jobs]}
            for ticket in tickets.values():
                ticket.cancelled = True  # the engine stops its rows at the next step
                ticket.unstarted = 0  # out of the queue (a later cancel has nothing to take)
                ticket.events.put(("closed", _unloaded()))
            self._waiting.clear()
            self._queued = 0
            self._wake.notify_all()

    def _serve(self) -> None:
        try:
            while True:
                with self._lock:
                    jobs = self._next_jobs()
                    if jobs is None:  # under the lock: a request queued later starts a thread
                        self._thread = None
                        return
                try:
                    self._run(jobs)
                finally:
                    self._release_kv()
        except BaseException:  # unforeseen: let the next request start a new engine thread
            with self._lock:
                self._thread = None
            raise

    def _company(self) -> list[_Job]:
        """The waiting rows that may share the oldest one's batch (holding the lock): every
        row with its grammar (rows without one all match, whatever their sampling or seed: each
        samples on its own), up to ``max_batch_size``; a grammar that ends only when the model
        stops runs alone (`batch_members`, which admission's predictions use too).
        """
        jobs = list(self._waiting)
        members = batch_members([_row(job.request) for job in jobs], self.limits.max_batch_size)
        return [jobs[i] for i in members]

    def load_stats(self) -> dict[str, int]:
        """``queue_depth`` (requests waiting), ``running_rows`` (rows of the batch decoding
        now), ``last_batch_size`` (rows of the latest batch started) and, with a KV budget,
        ``kv_reserved_bytes`` (what the running batch holds of it) and ``kv_budget_bytes``
        (the budget, shared by every model of the process with the same one); cheap,
        thread-safe.
        """
        with self._lock:
            running = self._running[0] if self._running is not None else 0
            stats = {
                "queue_depth": self._queued,
                "running_rows": running,
                "last_batch_size": self._last_batch_size,
            }
            if self.limits.kv_budget is not None:
                stats |= {
                    "kv_reserved_bytes": self._kv_reserved,
                    "kv_budget_bytes": self.limits.kv_budget,
                }
            return stats

    def _next_jobs(self) -> list[_Job] | None:
        """The next batch (holding the lock), or None after ``_ENGINE_IDLE_S`` with no work.

        The wait for company starts when the oldest row arrived or when the engine got free,
        whichever is later: the callers of the batch just finished come back with their next
        requests within a few milliseconds, and joining them keeps batches full (rows that
        waited through a whole batch would otherwise start alone, split from the rest).
        """
        free_since = time.monotonic()
        idle_until = free_since + _ENGINE_IDLE_S
        while True:
            now = time.monotonic()
            if self._closed:
                return None
            if not self._waiting:
                if now >= idle_until:
                    return None
                self._wake.wait(idle_until - now)
                continue
            first = self._waiting[0]
            jobs = self._company()
            window = max(first.arrived, free_since) + self.wait_s - now
            if len(jobs) >= self.limits.max_batch_size or window <= 0:
                jobs = self._within_budgets(jobs)
                if jobs:
                    break
                self._wake.wait(_KV_RECHECK_S)  # other models' batches hold the KV budget
                continue
            self._wake.wait(window)
        taken = set(map(id, jobs))
        self._waiting = deque(job for job in self._waiting if id(job) not in taken)
        for job in jobs:
            job.ticket.unstarted -= 1
            if job.ticket.unstarted == 0:
                self._queued -= 1
        return jobs

    def _within_budgets(self, jobs: list[_Job]) -> list[_Job]:
        """``jobs`` cut to what the KV budget has left (rows past it wait for the next batch)
        and to the prefill slice, their KV reserved (holding the lock); empty while other
        models' batches leave too little of a shared budget for even the first row.
        """
        kv = self.kv_shared
        rows = [_row(job.request) for job in jobs]
        available = None if kv is None else kv.available()
        jobs = jobs[: batch_cut(rows, self.rates, self.limits, available)]
        if kv is not None:
            need = self._kv_bytes(jobs)
            if not kv.try_reserve(need):
                return []
            self._kv_reserved = need
        return jobs

    def _kv_bytes(self, jobs: list[_Job]) -> int:
        return batch_kv_bytes(self.limits.kv_per_token, [_row(job.request) for job in jobs])

    def _release_kv(self) -> None:
        """Gives the running batch's KV bytes back to the budget (not holding the lock)."""
        with self._lock:
            reserved, self._kv_reserved = self._kv_reserved, 0
        if reserved and self.kv_shared is not None:
            self.kv_shared.release(reserved)

    def _run(self, jobs: list[_Job]) -> None:
        fits = self._fits([job.request for job in jobs])
        for group in [jobs] if fits else [[job] for job in jobs]:
            delivered: set[int] = set()
            steps = max(job.request.max_tokens for job in group)
            with self._lock:
                self._running = (len(group), steps)
                self._running_jobs = group
                self._last_batch_size = len(group)
            try:
                for states in self._steps([job.request for job in group]):
                    steps -= 1
                    with self._lock:
                        self._running = (len(group), max(0, steps))
                    now = time.monotonic()
                    for index, (job, state) in enumerate(zip(group, states, strict=True)):
                        if index in delivered:
                            continue
                        if job.ticket.cancelled or job.ticket.expired(now):
                            state.cancel()  # the batch ends early once every row is done
                            delivered.add(index)
                            continue
                        if job.ticket.stream:
                            piece = state.take_stream_text()
                            if piece:
                                job.ticket.events.put(("text", piece, state))
                        if state.done:
                            job.ticket.events.put(("row", job.position, state))
                            delivered.add(index)
            except Exception as exc:  # handed to every caller waiting on this batch
                for index, job in enumerate(group):
                    if index not in delivered:
                        job.ticket.events.put(("error", exc))
            finally:
                with self._lock:
                    self._running = None
                    self._running_jobs = []


def _row(request: _Request) -> Row:
    group = request.group
    alone = group is not None and group.alone
    return Row(len(request.input_ids), request.max_tokens, group, alone)
