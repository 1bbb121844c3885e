"""A killed server's model copy is reclaimed at the next start, never a live server's: each copy
names its owner processes (pid and start time), and only copies whose owners are all gone go.
Real processes, killed with SIGKILL as a server would be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from phi3ops.serving.model_copies import (
    COPY_PREFIX,
    OWNER_FILE,
    claim,
    is_alive,
    process_started,
    reclaim_orphans,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def copy(parent: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=COPY_PREFIX, dir=parent))
    (folder / "model.onnx.data").write_bytes(b"weights")
    return folder


def killed_owner(folder: Path) -> int:
    """A process that claims ``folder`` itself, then is killed with SIGKILL."""
    code = (
        "import sys, time; from pathlib import Path; "
        "from phi3ops.serving.model_copies import claim; "
        "claim(Path(sys.argv[1])); print('claimed', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "claimed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    return child.pid


def test_a_killed_servers_copy_goes_and_a_live_ones_stays(tmp_path: Path) -> None:
    orphan, live = copy(tmp_path), copy(tmp_path)
    dead = killed_owner(orphan)
    claim(live)  # this process: alive
    spool = tmp_path / "spool"
    spool.mkdir()
    assert not is_alive(dead, None)
    assert reclaim_orphans(tmp_path) == [orphan]
    assert not orphan.exists()
    assert (live / "model.onnx.data").exists() and spool.exists()
    owners = json.loads((live / OWNER_FILE).read_text())
    assert owners == [{"pid": os.getpid(), "started": process_started(os.getpid())}]


def test_a_copy_stays_while_any_owner_lives(tmp_path: Path) -> None:
    folder = copy(tmp_path)
    killed_owner(folder)  # the server died...
    claim(folder)  # ...but the process that started it still runs
    assert reclaim_orphans(tmp_path) == []
    assert folder.exists()


def test_a_reused_pid_is_not_its_owner(tmp_path: Path) -> None:
    folder = copy(tmp_path)
    # This pid, but a start time it never had: the recorded owner is gone.
    (folder / OWNER_FILE).write_text(json.dumps([{"pid": os.getpid(), "started": "1"}]))
    assert not is_alive(os.getpid(), "1")
    assert reclaim_orphans(tmp_path) == [folder]


def test_a_copy_without_readable_owners_is_never_touched(tmp_path: Path) -> None:
    unclaimed, garbled = copy(tmp_path), copy(tmp_path)  # being claimed now, or an old server's
    (garbled / OWNER_FILE).write_text("{not json")
    assert reclaim_orphans(tmp_path) == []
    assert unclaimed.exists() and garbled.exists()
    assert reclaim_orphans(tmp_path / "missing") == []
