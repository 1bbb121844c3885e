"""What `make bench-mini` measures on disk and in memory: a process tree's resident memory
(sampled), a folder's disk use, and how many copies of the weight bytes a folder holds.

Only the standard library and ``/proc``: the lifecycle child and the bench process both use it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

#: Files with these endings are the weights (the int4 ``.onnx.data``, the ``.onnx`` graph, and
#: safetensors shards where a folder has them).
WEIGHT_SUFFIXES = (".onnx.data", ".onnx", ".safetensors")


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return out


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (``/proc/<pid>/task/*/children``)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _rss(current)
        todo += _children(current)
    return total


def session_rss(session_id: int) -> int:
    """Resident bytes of every process of a session (a server started in its own session:
    uvicorn, its workers and anything they start).
    """
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[3]) == session_id:  # stat[3]: the session id
                total += _rss(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return total


class PeakSampler(threading.Thread):
    """Samples ``measure()`` every ``interval_s`` in the background; `take` returns the peak
    since the last `take` (or the start) and starts a new window.
    """

    def __init__(self, measure: Callable[[], int], *, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True, name="bench-mini-rss")
        self._measure, self._interval = measure, interval_s
        self._lock = threading.Lock()
        self._peak = 0
        self._stop = threading.Event()

    def run(self) -> None:  # noqa: D102 (threading.Thread.run)
        while not self._stop.is_set():
            value = self._measure()
            with self._lock:
                self._peak = max(self._peak, value)
            self._stop.wait(self._interval)

    def take(self) -> int:
        """The peak since the last call; starts a new window."""
        value = self._measure()
        with self._lock:
            peak, self._peak = max(self._peak, value), 0
        return peak

    def stop(self) -> None:
        """Stops sampling."""
        self._stop.set()


def disk_used(root: Path) -> int:
    """Bytes ``root`` takes on disk (``du``: allocated blocks, each inode counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            key = (info.st_dev, info.st_ino)
            if key not in seen:
                seen.add(key)
                total += info.st_blocks * 512
    return total


def weight_copies(*roots: Path) -> dict[str, dict[str, int]]:
    """The weight files under ``roots``: how many paths name them, how many distinct inodes
    (copies of the bytes on disk) they are, and those copies' bytes, per file name.
    """
    names: dict[str, list[tuple[int, int, int]]] = {}
    for root in roots:
        for folder, _dirs, files in os.walk(root):
            for name in files:
                if not name.endswith(WEIGHT_SUFFIXES):
                    continue
                try:
                    info = os.lstat(os.path.join(folder, name))
                except OSError:
                    continue
                names.setdefault(name, []).append((info.st_dev, info.st_ino, info.st_size))
    per_name = {}
    for name, entries in sorted(names.items()):
        inodes = {(dev, ino): size for dev, ino, size in entries}
        per_name[name] = {
            "paths": len(entries),
            "copies": len(inodes),
            "bytes_on_disk": sum(inodes.values()),
        }
    return per_name
