"""A durable spool between the server and the tracking store: no inference record is dropped.

Each server process appends every request's records to a JSONL file of its own under
``<data dir>/serving/spool`` (one ``write`` per request, done before the answer's last byte is
sent), and one writer thread per process drains that file into the tracking store in batches,
synchronously, committing how far it got to an ``.offset`` file beside it. A store that is
slow or down only makes the file longer: nothing waits in memory and nothing is discarded.

- Exactly once: the writer commits an offset only after the store took the batch; an entry
  written again after a crash between the two is the same trace (its id is the entry's), so
  it is not written twice.
- Graceful shutdown (`RecordSpool.close`, called on the app's lifespan shutdown and at exit)
  drains the file before the process ends and removes it.
- A killed process leaves its file behind. Each file is ``flock``-ed by its process for as long
  as it lives, so the next server to start on the same data dir knows the file has no owner,
  drains it from its committed offset and removes it: after ``kill -9`` only the requests that
  were still in flight go unrecorded.
- A line the store will never take (not JSON; the sink raises `RefusedEntry`, e.g. an unknown
  or missing experiment) never stalls the rest: a refused batch is written again line by line,
  and each line refused on its own goes to ``dead-letter.ndjson`` beside the spool files, with
  a WARNING.
- The backlog (records waiting, when the oldest was spooled) is in ``<file>.backlog.json``,
  which the writer rewrites after each batch; `read_backlog` sums every file of a data dir,
  dead servers' files included, for an operator and for the canary verdict, which waits while
  records of its window are not stored.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_log = logging.getLogger(__name__)

Entry = dict[str, Any]
#: Writes a batch of entries to the store; raises when it could not (the batch is retried).
Sink = Callable[[list[Entry]], None]

SPOOL_SUFFIX = ".jsonl"
OFFSET_SUFFIX = ".offset"
BACKLOG_SUFFIX = ".backlog.json"
#: Lines the store refused, each with why, beside the spool files (never adopted as a spool).
DEAD_LETTER_NAME = "dead-letter.ndjson"
#: A batch the store refused this many times in a row is tried line by line.
_ISOLATE_AFTER = 3


class RefusedEntry(ValueError):
    """Raised by a sink for an entry the store will never take (trying again cannot help): the
    spool writes the batch line by line and moves the refused line to its dead-letter file.
    """


@dataclass(frozen=True)
class Backlog:
    """Records spooled and not yet stored, over one or more spool files."""

    waiting: int = 0
    oldest_at: float | None = None  # when the oldest of them was spooled (seconds since epoch)
    files: int = 0  # spool files with records waiting

    def oldest_age_s(self, now: float | None = None) -> float | None:
        """Seconds the oldest waiting record has waited."""
        if self.oldest_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.oldest_at)


class RecordSpool:
    """One process's spool file and the thread that drains it (and orphaned ones) into a sink.

    Args:
        directory: Where the spool files of every server process on this data dir live.
        sink: Writes a batch of entries to the tracking store; raises if it did not.
        batch_size: Most entries written in one sink call.
        max_backoff_s: Longest wait between two tries of a batch the sink refused.
    """

    def __init__(
        self,
        directory: Path,
        sink: Sink,
        *,
        batch_size: int = 200,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.directory = directory
        self.sink = sink
        self.batch_size = batch_size
        self.max_backoff_s = max_backoff_s
        self._cond = threading.Condition()
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._closed = False
        self._adopted = False  # the files of dead processes found at start are stored
        # Byte counts since start: appended, written to the store, and appended before the file
        # was last emptied (so a file offset is a count minus ``_base``).
        self._appended = 0
        self._written = 0
        self._base = 0
        # Appends not yet stored: (byte count after it, when, entries), and record counts.
        self._pending: deque[tuple[int, float, int]] = deque()
        self._records_appended = 0
        self._records_stored = 0
        self._orphans_waiting = 0  # lines of dead servers' files still to store
        self._orphans_since: float | None = None
        self.dead_lettered = 0

    @property
    def path(self) -> Path | None:
        """This process's spool file, once started."""
        return self._path

    def start(self) -> RecordSpool:
        """Create and lock this process's file and start the writer (first, it adopts orphans).

        Returns:
            This spool.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("This record spool is closed.")
            if self._thread is not None:
                return self
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{os.getpid()}-{uuid.uuid4().hex[:12]}{SPOOL_SUFFIX}"
            handle = path.open("ab")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # alive while we are
            self._file, self._path = handle, path
            self._thread = threading.Thread(target=self._run, name="phi3ops-records", daemon=True)
            self._thread.start()
        atexit.register(self.close, 10.0)
        return self

    def append(self, entries: Sequence[Entry]) -> None:
        """Write ``entries`` to the spool file (one ``write``), then wake the writer.

        Once this returns the entries survive the process being killed; the writer stores them.
        """
        if not entries:
            return
        data = b"".join(_line(entry) for entry in entries)
        if self._thread is None:
            self.start()
        with self._cond:
            if self._closed or self._file is None:
                raise RuntimeError("This record spool is closed; records can no longer be taken.")
            self._file.write(data)
            self._file.flush()  # in the OS's hands: a killed process loses nothing written
            self._appended += len(data)
            self._pending.append((self._appended, time.time(), len(entries)))
            self._records_appended += len(entries)
            self._cond.notify_all()

    def backlog(self) -> Backlog:
        """This process's records not yet stored (its own and the dead servers' it adopts)."""
        with self._cond:
            waiting = self._records_appended - self._records_stored + self._orphans_waiting
            times = [self._pending[0][1]] if self._pending else []
            if self._orphans_since is not None and self._orphans_waiting:
                times.append(self._orphans_since)
            return Backlog(
                waiting=waiting, oldest_at=min(times, default=None), files=int(waiting > 0)
            )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything appended so far, and every file adopted at start, is stored.

        Returns:
            Whether it all was, within ``timeout`` seconds (None: wait as long as it takes).
        """
        if self._thread is None:
            self.start()
        with self._cond:
            target = self._appended
            return self._cond.wait_for(
                lambda: self._adopted and self._written >= target, timeout=timeout
            )

    def close(self, timeout: float | None = 15.0) -> bool:
        """Drain the spool into the store, stop the writer and remove the file when empty.

        Returns:
            Whether everything was stored; if not (the store is down), the file stays and the
            next server on this data dir stores it.
        """
        with self._cond:
            if self._closed:
                return self._written >= self._appended
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        left = self.backlog()
        with self._cond:
            drained = self._written >= self._appended and not (thread and thread.is_alive())
            self._closed = True
            if self._file is not None and self._path is not None:
                if drained:
                    _remove(self._path)
                self._file.close()  # releases the lock: a next server may adopt the file
                self._file = None
        if not drained:
            _log.warning(
                "%d inference records were not stored within %s s of the stop; they wait in %s "
                "and the next server started on this data dir stores them.",
                left.waiting,
                "unlimited" if timeout is None else f"{timeout:g}",
                self._path,
            )
        return drained

    # --- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        for orphan in sorted(self.directory.glob(f"*{SPOOL_SUFFIX}")):
            if orphan != self._path:
                try:
                    self._adopt(orphan)
                except Exception:
                    _log.exception("Could not store the inference records left in %s", orphan)
        with self._cond:
            self._adopted = True
            self._cond.notify_all()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._written < self._appended or self._closing)
                if self._written >= self._appended:
                    return  # closing, and everything is stored
                self._write_backlog()
                start = self._written - self._base
                end = self._appended - self._base
            assert self._path is not None
            try:
                # Once `close` gave up waiting, the file is the next server's to store.
                if not self._store(self._path, start, end, self._commit_own, lambda: self._closed):
                    return
            except Exception:  # e.g. the disk; the records stay in the file: try again
                _log.exception("Could not read the inference records in %s", self._path)
                time.sleep(1.0)

    def _commit_own(self, offset: int) -> None:
        """Record that the own file is stored up to ``offset``; empty the file when all is."""
        assert self._path is not None
        with self._cond:
            self._written = self._base + offset
            while self._pending and self._pending[0][0] <= self._written:
                self._records_stored += self._pending.popleft()[2]
            if self._written == self._appended and self._file is not None:
                # The offset first: dying between the two re-stores entries (same trace ids),
                # where the other order could skip new ones.
                _write_offset(self._path, 0)
                self._file.truncate(0)
                self._base = self._appended
            else:
                _write_offset(self._path, offset)
            self._write_backlog()
            self._cond.notify_all()

    def _write_backlog(self) -> None:
        """Rewrite this process's backlog file (`read_backlog`); never fails the writer."""
        if self._path is None:
            return
        backlog = self.backlog()
        try:
            _write_json(
                self._path.with_suffix(BACKLOG_SUFFIX),
                {
                    "pid": os.getpid(),
                    "waiting": backlog.waiting,
                    "oldest_at": backlog.oldest_at,
                    "stored": self._records_stored,
                    "dead_lettered": self.dead_lettered,
                    "updated_at": time.time(),
                },
            )
        except OSError:
            _log.debug("Could not write the backlog of %s", self._path, exc_info=True)

    def _adopt(self, path: Path) -> None:
        """Store and remove a spool file whose process is gone (its lock is free)."""
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return  # another server adopted it meanwhile
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # its process is alive
            if os.fstat(handle.fileno()).st_nlink == 0:
                return  # adopted and removed by another server while we waited
            size = os.fstat(handle.fileno()).st_size
            start = _read_offset(path)
            if start > size:  # emptied after this offset was written: store it all again
                start = 0
            _log.info("Storing %d bytes of inference records left by %s", size - start, path.name)
            with self._cond:
                self._orphans_waiting = _count_lines(path, start, size)
                self._orphans_since = os.fstat(handle.fileno()).st_mtime
            self._write_backlog()

            def commit(offset: int) -> None:
                _write_offset(path, offset)
                with self._cond:
                    self._orphans_waiting = _count_lines(path, offset, size)
                self._write_backlog()

            try:
                if self._store(path, start, size, commit, lambda: self._closing):
                    _remove(path)
            finally:
                with self._cond:
                    self._orphans_waiting, self._orphans_since = 0, None

    def _store(
        self,
        path: Path,
        start: int,
        end: int,
        commit: Callable[[int], None],
        give_up: Callable[[], bool],
    ) -> bool:
        """Write the entries of ``path`` in [start, end) to the sink, a batch at a time, calling
        ``commit(offset)`` after each; a refused batch is tried again until it is taken, or
        until ``give_up()`` says to leave the rest in the file.

        Returns:
            Whether every batch was stored.
        """
        for lines, damaged, offset in _batches(path, start, end, self.batch_size):
            batch = [entry for entry, _ in lines]
            delay, failures = 0.1, 0
            while batch:
                try:
                    self.sink(batch)
                    break
                except Exception as exc:
                    failures += 1
                    if (isinstance(exc, RefusedEntry) or failures % _ISOLATE_AFTER == 0) and (
                        self._one_by_one(path, lines)
                    ):
                        break  # each line is stored or dead-lettered
                    _log.warning(
                        "Could not store %d inference records (%s); trying again in %.1f s. "
                        "They wait in %s.",
                        len(batch),
                        exc,
                        delay,
                        path,
                    )
                    if give_up():
                        return False
                    time.sleep(delay)
                    delay = min(delay * 2, self.max_backoff_s)
                    if give_up():  # decided while it waited
                        return False
            for line in damaged:
                self._dead_letter(path, line, "not a JSON line")
            commit(offset)
        return True

    def _one_by_one(self, path: Path, lines: list[tuple[Entry, bytes]]) -> bool:
        """Write a refused batch line by line; dead-letter each line the store refuses while it
        takes others (or refuses for what the line is: `RefusedEntry`).

        Returns:
            Whether every line was stored or dead-lettered; False when the store looks down
            (the first two lines failed, neither refused for itself): the batch waits.
        """
        failed: list[tuple[bytes, Exception]] = []
        stored = 0
        for entry, raw in lines:
            try:
                self.sink([entry])
                stored += 1
            except Exception as exc:
                failed.append((raw, exc))
                transient = [e for _, e in failed if not isinstance(e, RefusedEntry)]
                if not stored and len(transient) >= 2:
                    return False
        if not stored and any(not isinstance(e, RefusedEntry) for _, e in failed):
            return False  # nothing taken: the store, not these lines, is what fails
        for raw, refusal in failed:
            self._dead_letter(path, raw, str(refusal))
        return True

    def _dead_letter(self, path: Path, line: bytes, reason: str) -> None:
        """Append ``line`` and why to the dead-letter file, with a WARNING."""
        target = self.directory / DEAD_LETTER_NAME
        record = {
            "at": time.time(),
            "spool": path.name,
            "reason": reason[:1000],
            "line": line.decode("utf-8", "replace").rstrip("\n"),
        }
        with target.open("ab") as handle:
            handle.write(json.dumps(record).encode() + b"\n")
        with self._cond:
            self.dead_lettered += 1
        _log.warning(
            "An inference record in %s cannot be stored (%s): moved to %s; the rest go on.",
            path.name,
            reason[:300],
            target,
        )


def _batches(
    path: Path, start: int, end: int, size: int
) -> Iterator[tuple[list[tuple[Entry, bytes]], list[bytes], int]]:
    """(entries with their lines, damaged lines, offset after them) of the complete lines of
    ``path`` in [start, end). A damaged line is one that is not a JSON object.
    """
    batch: list[tuple[Entry, bytes]] = []
    damaged: list[bytes] = []
    offset = yielded = start
    with path.open("rb") as handle:
        handle.seek(start)
        while offset < end:
            line = handle.readline()
            if not line.endswith(b"\n"):
                break  # an incomplete last line is an append a crash cut short
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                batch.append((entry, line))
            else:
                damaged.append(line)
            offset += len(line)
            if len(batch) + len(damaged) >= size:
                yield batch, damaged, offset
                batch, damaged, yielded = [], [], offset
    if batch or offset > yielded:  # the rest, or damaged lines to step over
        yield batch, damaged, offset


def read_backlog(directory: Path, *, now: float | None = None) -> Backlog:
    """The records spooled under ``directory`` and not yet stored, over every server process
    of that data dir: a live server's from its backlog file, a dead one's from its file past
    the committed offset (the next server started there stores them).
    """
    waiting, files, oldest = 0, 0, []
    for path in sorted(directory.glob(f"*{SPOOL_SUFFIX}")) if directory.is_dir() else []:
        state = _read_json(path.with_suffix(BACKLOG_SUFFIX))
        if state and _alive(state.get("pid")):
            count, since = int(state.get("waiting") or 0), state.get("oldest_at")
        else:
            try:
                size, since = path.stat().st_size, path.stat().st_mtime
            except FileNotFoundError:
                continue  # stored and removed meanwhile
            start = _read_offset(path)
            count = _count_lines(path, 0 if start > size else start, size)
        if count:
            waiting, files = waiting + count, files + 1
            if isinstance(since, int | float):
                oldest.append(float(since))
    return Backlog(waiting=waiting, oldest_at=min(oldest, default=None), files=files)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _count_lines(path: Path, start: int, end: int) -> int:
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            return handle.read(max(0, end - start)).count(b"\n")
    except FileNotFoundError:
        return 0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    temporary = path.with_name(f"{path.name}.tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)


def _line(entry: Entry) -> bytes:
    return json.dumps(entry, separators=(",", ":"), default=str).encode() + b"\n"


def _offset_path(path: Path) -> Path:
    return path.with_suffix(OFFSET_SUFFIX)


def _read_offset(path: Path) -> int:
    try:
        return int(_offset_path(path).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _write_offset(path: Path, offset: int) -> None:
    """Atomically replace the offset file of ``path`` (a crash leaves the old or the new one)."""
    target = _offset_path(path)
    temporary = target.with_name(f"{target.name}.tmp")
    temporary.write_text(str(offset))
    os.replace(temporary, target)


def _remove(path: Path) -> None:
    for leftover in (_offset_path(path), path.with_suffix(BACKLOG_SUFFIX), path):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
