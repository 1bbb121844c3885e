"""Shadow copies: requests ``@champion`` answered, answered again by ``@candidate`` unseen.

In shadow mode (`phi3ops.traffic`) every call the champion served is offered here once its
client has the answer; the candidate answers the copy in the background and only its record is
kept (``arm=candidate``, ``shadow=true``). The client never waits for a copy, and copies are the
first work shed: they run one at a time, only once no client call has been in flight for
``idle_s`` (a client that sends its next request as soon as it has an answer leaves no such
gap), and a client call that arrives meanwhile cuts the running copy off at its next token
(recorded as cancelled, which no error rate counts). Copies waiting beyond ``max_pending`` are
dropped, oldest first. So a busy server answers fewer copies; a client call that cuts one off
still waits for the candidate's step in progress (what that costs: ``make bench``, "arms").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

_log = logging.getLogger(__name__)

#: Copies that may wait for an idle moment; more are dropped, oldest first.
MAX_PENDING = 16
#: Seconds without a client call before a copy starts: a copy started in the instant between
#: one client's answer and its next request would only compete with that request.
IDLE_S = 0.05


@dataclass(frozen=True)
class ShadowCopy:
    """A served call to answer again: its ASGI scope and the body to send the candidate."""

    scope: dict[str, Any]
    body: bytes
    openai: bool


#: Answers one copy; the event is set when a client call needs the machine back.
RunCopy = Callable[[ShadowCopy, asyncio.Event], Awaitable[None]]


class ShadowCopies:
    """The queue of shadow copies and the one task that answers them; see the module docstring.

    Args:
        run: Answers one copy with the candidate, stopping when its event is set.
        max_pending: Copies that may wait; more are dropped, oldest first.
        idle_s: Seconds without a client call before a copy starts.
    """

    def __init__(
        self, run: RunCopy, *, max_pending: int = MAX_PENDING, idle_s: float = IDLE_S
    ) -> None:
        self._run = run
        self._pending: deque[ShadowCopy] = deque()
        self.max_pending = max_pending
        self.idle_s = idle_s
        self._busy = 0  # client calls in flight
        self._calls = 0  # client calls so far
        self._idle = asyncio.Event()
        self._idle.set()
        self._queued = asyncio.Event()
        self._preempt: asyncio.Event | None = None  # set to cut the running copy off
        self._worker: asyncio.Task | None = None
        self.dropped = 0  # copies shed before they started
        self.answered = 0  # copies that ran (cut off or not)

    @contextlib.contextmanager
    def client_call(self) -> Iterator[None]:
        """Marks a client call in flight: no copy starts meanwhile, the running one stops."""
        self._busy += 1
        self._calls += 1
        self._idle.clear()
        if self._preempt is not None:
            self._preempt.set()
        try:
            yield
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()

    def offer(self, copy: ShadowCopy) -> None:
        """Queues ``copy`` for the candidate (the oldest waiting one goes when full)."""
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(copy)
        self._queued.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    @property
    def pending(self) -> int:
        """Copies waiting to run."""
        return len(self._pending)

    async def _work(self) -> None:
        while True:
            await self._queued.wait()
            if not self._pending:
                self._queued.clear()
                continue
            await self._idle.wait()
            calls = self._calls
            await asyncio.sleep(self.idle_s)
            if not self._pending or self._busy or self._calls != calls:
                continue  # a client came meanwhile: wait for the next quiet moment
            copy = self._pending.popleft()
            preempt = self._preempt = asyncio.Event()
            try:
                await self._run(copy, preempt)
            except Exception:  # a copy must never take the server down
                _log.exception("A shadow copy failed")
            finally:
                self._preempt = None
                self.answered += 1

    async def close(self) -> None:
        """Drops what waits and stops the task (the copy running is cut off)."""
        self.dropped += len(self._pending)
        self._pending.clear()
        if self._preempt is not None:
            self._preempt.set()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
