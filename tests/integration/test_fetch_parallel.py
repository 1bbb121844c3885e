"""A fetch downloads files side by side (``PHI3OPS_HUB_MAX_WORKERS``) against the local hub,
with the same per-file verification, staging and manifest as one file at a time, and the same
error when one file fails.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

import tasks.hub.fetch
from phi3ops.errors import HubTimeoutError, IntegrityError, TransientHubError
from phi3ops.settings import get_settings
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER
from tasks.hub import MANIFEST_NAME, fetch_snapshot
from tasks.hub.fetch import _in_parallel

REPO = "acme/phi-mini-onnx"
MODEL = ONNX_CPU_INT4_SUBFOLDER
CONFIG = f"{MODEL}/genai_config.json"
WEIGHTS = f"{MODEL}/model.onnx.data"
TOKENIZER = f"{MODEL}/tokenizer.json"
GENAI = {"model": {"decoder": {"filename": "model.onnx"}, "type": "phi3"}}


def _repo(folder: Path) -> Path:
    files = {
        "README.md": b"# card\n",
        "LICENSE": b"MIT\n",
        CONFIG: json.dumps(GENAI).encode(),
        f"{MODEL}/model.onnx": b"graph" * 100,
        WEIGHTS: bytes(range(256)) * 9000,  # ~2.3 MB: an LFS file
        TOKENIZER: b'{"model": {}}',
        f"{MODEL}/tokenizer.model": b"sentencepiece",
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


@pytest.fixture
def hub(local_hub, tmp_path: Path):
    local_hub.add_repo(REPO, _repo(tmp_path / "src"))
    return local_hub


@pytest.fixture(autouse=True)
def _instant_backoff(no_backoff_sleep) -> None:
    """huggingface_hub's own retry waits are recorded, not slept."""


def _workers(monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    monkeypatch.setenv("PHI3OPS_HUB_MAX_WORKERS", str(workers))
    get_settings.cache_clear()


def _snapshot_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_files_download_side_by_side_with_the_same_result(
    hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = tasks.hub.fetch.download_verified
    lock = threading.Lock()
    calls: list[str] = []
    state = {"in_flight": 0, "peak": 0, "config_done_before_others": True}
    # Four downloads must be under way together: one at a time, the first would wait here
    # for the others until the barrier timed out.
    together = threading.Barrier(4, timeout=20)

    def watched(remote, **kwargs):
        with lock:
            calls.append(remote.path)
            gate = remote.path != CONFIG and len(calls) <= 5  # the config, then 4 others
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
            if remote.path != CONFIG and CONFIG in calls and state["in_flight"] > 1:
                state["config_done_before_others"] &= calls[0] == CONFIG
        try:
            if gate:
                together.wait()
            return real(remote, **kwargs)
        finally:
            with lock:
                state["in_flight"] -= 1

    _workers(monkeypatch, 4)
    monkeypatch.setattr(tasks.hub.fetch, "download_verified", watched)
    caplog.set_level(logging.INFO, logger="tasks.hub.fetch")
    parallel = fetch_snapshot(REPO, endpoint=hub.url, target_root=tmp_path / "parallel")

    assert state["peak"] == 4
    assert calls[0] == CONFIG  # the genai_config.json lands (and is checked) first, alone
    assert state["config_done_before_others"]
    # Per-file progress in the logs (and so in the Prefect run's logs).
    lines = [r.getMessage() for r in caplog.records if "file " in r.getMessage()]
    assert len(lines) == 7 and lines[0].startswith(f"Fetched {CONFIG} ")
    assert {line.rsplit(": ", 1)[1] for line in lines} == {f"file {n} of 7" for n in range(1, 8)}

    # One at a time gives the very same snapshot and manifest.
    monkeypatch.setattr(tasks.hub.fetch, "download_verified", real)
    _workers(monkeypatch, 1)
    serial = fetch_snapshot(REPO, endpoint=hub.url, target_root=tmp_path / "serial")
    assert parallel.manifest_digest == serial.manifest_digest
    assert parallel.downloaded_bytes == serial.downloaded_bytes == serial.total_bytes
    assert _snapshot_files(parallel.local_dir) == _snapshot_files(serial.local_dir)
    for rel in _snapshot_files(serial.local_dir) - {MANIFEST_NAME}:
        assert (parallel.local_dir / rel).read_bytes() == (serial.local_dir / rel).read_bytes()
    assert list((tmp_path / "parallel" / ".staging").iterdir()) == []


def _failed_fetch(hub, root: Path, monkeypatch: pytest.MonkeyPatch, workers: int, **fault):
    _workers(monkeypatch, workers)
    hub.clear_faults()
    hub.inject(**fault)
    with pytest.raises(Exception) as info:  # noqa: PT011 - the callers check the type
        fetch_snapshot(REPO, endpoint=hub.url, target_root=root)
    snapshot = next((root / REPO.replace("/", "--")).iterdir())
    assert not (snapshot / MANIFEST_NAME).exists()  # no manifest: the snapshot is incomplete
    assert list((root / ".staging").iterdir()) == []  # staging removed after every download
    return info.value, _snapshot_files(snapshot)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"fault": "corrupt", "count": 100, "path": WEIGHTS}, IntegrityError),
        ({"fault": "server_error", "count": 100, "path": WEIGHTS}, TransientHubError),
    ],
    ids=["corrupt", "server-error"],
)
def test_one_failing_file_fails_the_fetch_with_the_same_error(
    hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: dict, error: type
) -> None:
    serial, _ = _failed_fetch(hub, tmp_path / "one", monkeypatch, 1, **fault)
    parallel, kept = _failed_fetch(hub, tmp_path / "eight", monkeypatch, 8, **fault)
    assert type(parallel) is type(serial) is error
    assert str(parallel) == str(serial)
    assert WEIGHTS in str(parallel) or error is TransientHubError  # a 5xx names the commit
    assert WEIGHTS not in kept  # the bad file never left staging; the verified ones stay
    # A clean fetch then completes, downloading only what is missing.
    hub.clear_faults()
    hub.clear_requests()
    result = fetch_snapshot(REPO, endpoint=hub.url, target_root=tmp_path / "eight")
    downloaded = {r.file for r in hub.requests if r.method == "GET" and r.endpoint == "resolve"}
    assert downloaded == {WEIGHTS}
    assert (result.local_dir / MANIFEST_NAME).exists()


def test_a_stalled_file_does_not_hold_up_the_others(
    hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub sends the weights' first bytes and then nothing: the other files land meanwhile,
    and the fetch fails with the same bounded-wait error as one file at a time.
    """
    monkeypatch.setenv("PHI3OPS_HUB_TIMEOUT_S", "1")
    stall = {"fault": "silent", "count": 100, "path": WEIGHTS, "after_bytes": 1000}
    started = time.monotonic()
    serial, serial_kept = _failed_fetch(hub, tmp_path / "one", monkeypatch, 1, **stall)
    parallel, parallel_kept = _failed_fetch(hub, tmp_path / "eight", monkeypatch, 8, **stall)
    assert time.monotonic() - started < 20
    assert type(parallel) is type(serial) is HubTimeoutError
    assert str(parallel) == str(serial)
    # One at a time, the tokenizer (after the weights by path) never started; side by side it
    # was downloaded and verified while the weights stalled.
    assert TOKENIZER not in serial_kept
    assert {TOKENIZER, f"{MODEL}/tokenizer.model", "README.md", "LICENSE"} <= parallel_kept
    assert WEIGHTS not in parallel_kept


def test_in_parallel_keeps_order_and_stops_at_the_first_failure() -> None:
    seen: list[int] = []

    def square(n: int) -> int:
        time.sleep(0.01 * (n % 3))
        return n * n

    assert _in_parallel(square, range(10), workers=4, on_result=seen.append) == [
        n * n for n in range(10)
    ]
    assert sorted(seen) == [n * n for n in range(10)]

    started: list[int] = []
    release = threading.Event()

    def fail_second(n: int) -> int:
        started.append(n)
        if n == 1:
            raise ValueError("item 1 is bad")
        if n == 0:
            release.wait(5)  # still running when item 1 fails: waited for, not abandoned
        return n

    threading.Timer(0.2, release.set).start()
    with pytest.raises(ValueError, match="item 1 is bad"):
        _in_parallel(fail_second, range(50), workers=2, on_result=lambda _: None)
    assert len(started) < 50  # what had not started was dropped
