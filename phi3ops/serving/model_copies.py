"""The model copies `phi3ops serve` downloads, and reclaiming those whose server is gone.

`start_server` downloads each served model into a folder of its own under
``<data dir>/serving`` (``model-*``) and removes it when the server stops. A server killed
with ``SIGKILL`` (or whose starter was) never gets there, and its copy of the weights (2.2 GB
at Phi-3-mini's size) stays. So each copy names its owners in `OWNER_FILE`: the process that
downloaded it and the server process, each with its start time (a pid is reused; a pid and its
start time are not). `reclaim_orphans`, called by the next `start_server`, removes only copies
all of whose owners are gone; a copy with a live owner, or whose owners cannot be read (being
written right now, or left by a version that wrote none), is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

_log = logging.getLogger(__name__)

#: The file in a model copy that names the processes it belongs to.
OWNER_FILE = ".phi3ops-owners.json"
#: The prefix of the copies `start_server` makes (``tempfile.mkdtemp(prefix=...)``).
COPY_PREFIX = "model-"


def process_started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), or None where
    that cannot be read (no such process, or not Linux).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime), counted after the command name, which may hold spaces: ")".
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def is_alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``started`` (when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    if started is None:
        return True
    now = process_started(pid)
    return now is None or now == started  # another start time: the pid was reused


def claim(copy: Path, pid: int | None = None) -> None:
    """Adds process ``pid`` (default: this one) to the owners of ``copy``."""
    pid = os.getpid() if pid is None else pid
    owners = _owners(copy) or []
    owners.append({"pid": pid, "started": process_started(pid)})
    path = copy / OWNER_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(owners))
    os.replace(temporary, path)  # never half-written for a reader


def _owners(copy: Path) -> list[dict] | None:
    try:
        owners = json.loads((copy / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(owners, list) or not owners:
        return None
    if not all(isinstance(o, dict) and isinstance(o.get("pid"), int) for o in owners):
        return None
    return owners


def reclaim_orphans(parent: Path) -> list[Path]:
    """Removes the model copies under ``parent`` whose owners have all exited; returns them."""
    removed = []
    for copy in sorted(parent.glob(f"{COPY_PREFIX}*")) if parent.is_dir() else []:
        owners = _owners(copy)
        if not copy.is_dir() or owners is None:
            continue
        if any(is_alive(owner["pid"], owner.get("started")) for owner in owners):
            continue
        _log.info("Removing %s: the server that downloaded it is gone.", copy)
        shutil.rmtree(copy, ignore_errors=True)
        removed.append(copy)
    return removed
