"""Records keep up with serving: bad spool lines are dead-lettered without stalling the rest,
a stop past its drain says what waits, and the backlog is visible to operators and the verdict.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import time
from pathlib import Path

import pytest

from phi3ops.serving.records import InferenceRecorder, write_entries
from phi3ops.serving.spool import DEAD_LETTER_NAME, RecordSpool, read_backlog

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ANSWER = {
    "object": "chat.completion",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3},
}


class DownStore:
    """A tracking store that is down until ``up`` is set."""

    def __init__(self) -> None:
        self.up = False
        self.entries: list[dict] = []

    def write(self, entries: list[dict]) -> None:
        if not self.up:
            raise ConnectionError("the tracking store is down")
        self.entries.extend(entries)


def _entries(recorder: InferenceRecorder, n: int) -> list[dict]:
    return [
        recorder.entry(record, request=row)
        for _ in range(n)
        for record, row in recorder.records_for(
            CHAT, status_code=200, body=ANSWER, started=time.time(), latency_s=0.1
        )
    ]


def test_lines_the_store_refuses_are_dead_lettered_and_the_rest_are_stored(tmp_path, caplog):
    import mlflow

    from phi3ops.tracking import configure_tracking
    from tasks.live_records import load_records

    experiment_id = configure_tracking("phi3ops-inference")
    recorder = InferenceRecorder(model_name="m", model_version="3", experiment_id=experiment_id)
    started = time.time()
    good = _entries(recorder, 6)
    unknown = {**_entries(recorder, 1)[0], "experiment_id": "987654"}
    missing = {k: v for k, v in _entries(recorder, 1)[0].items() if k != "experiment_id"}
    directory = tmp_path / "spool"
    directory.mkdir()
    # A dead server's file: good lines around the bad ones, and a line that is not JSON.
    lines = [good[0], unknown, good[1], missing, good[2]]
    text = b"".join(json.dumps(e).encode() + b"\n" for e in lines) + b"not json\n"
    (directory / "1-dead.jsonl").write_bytes(text)
    sink = functools.partial(write_entries, tracking_uri=mlflow.get_tracking_uri())
    spool = RecordSpool(directory, sink, max_backoff_s=0.05).start()
    spool.append(good[3:])  # this server's own records go on too
    with caplog.at_level(logging.WARNING, logger="phi3ops.serving.spool"):
        assert spool.flush(timeout=60)
    records = load_records("m", "3", start=started - 1, end=time.time() + 1)
    assert len(records) == 6
    dead = [json.loads(line) for line in (directory / DEAD_LETTER_NAME).read_text().splitlines()]
    assert sorted(d["line"][:8] for d in dead) == sorted(
        [json.dumps(unknown)[:8], json.dumps(missing)[:8], "not json"]
    )
    assert any("987654" in d["reason"] or "experiment" in d["reason"] for d in dead)
    assert sum("cannot be stored" in r.getMessage() for r in caplog.records) == 3
    assert spool.close(timeout=10)


def test_a_store_that_is_down_dead_letters_nothing(tmp_path) -> None:
    store = DownStore()
    spool = RecordSpool(tmp_path / "spool", store.write, max_backoff_s=0.02).start()
    spool.append([{"id": f"{i:032x}", "n": i} for i in range(5)])
    assert not spool.flush(timeout=1.0)  # several rounds of tries, line by line included
    store.up = True
    assert spool.flush(timeout=10)
    assert [e["n"] for e in store.entries] == list(range(5))
    assert not (tmp_path / "spool" / DEAD_LETTER_NAME).exists()
    assert spool.close(timeout=5)


def test_a_stop_past_its_drain_says_how_many_records_wait_and_who_stores_them(
    tmp_path, caplog
) -> None:
    spool = RecordSpool(tmp_path / "spool", DownStore().write, max_backoff_s=0.05).start()
    spool.append([{"id": f"{i:032x}"} for i in range(7)])
    with caplog.at_level(logging.WARNING, logger="phi3ops.serving.spool"):
        assert not spool.close(timeout=0.3)
    (warning,) = [r for r in caplog.records if "not stored within" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "7 inference records" in warning.getMessage()
    assert "next server started on this data dir stores them" in warning.getMessage()


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_the_backlog_counts_waiting_records_and_their_age_live_and_left_behind(tmp_path) -> None:
    directory = tmp_path / "spool"
    store = DownStore()
    spool = RecordSpool(directory, store.write, max_backoff_s=0.05).start()
    before = time.time()
    spool.append([{"id": f"{i:032x}"} for i in range(3)])
    spool.append([{"id": f"{3:032x}"}])
    assert spool.backlog().waiting == 4
    _wait_for(lambda: any(directory.glob("*.backlog.json")))
    _wait_for(lambda: read_backlog(directory).waiting == 4)  # the writer's file says so
    backlog = read_backlog(directory)
    assert backlog.files == 1 and before <= backlog.oldest_at <= time.time()
    assert backlog.oldest_age_s() >= 0
    assert not spool.close(timeout=0.2)  # left behind: counted from the file past its offset
    (state,) = directory.glob("*.backlog.json")
    state.write_text(json.dumps({"pid": 2**22 + 1, "waiting": 0}))  # a dead process's
    assert read_backlog(directory).waiting == 4
    store.up = True
    next_one = RecordSpool(directory, store.write).start()
    assert next_one.flush(timeout=10)
    assert read_backlog(directory).waiting == 0 and next_one.backlog().waiting == 0
    assert next_one.close(timeout=5)
    assert not list(directory.iterdir())


def test_the_verdict_waits_while_records_of_its_window_are_in_the_spool(
    monkeypatch: pytest.MonkeyPatch, isolated_settings: Path
) -> None:
    from phi3ops.policies import CanaryPolicy, MonitorThresholds
    from phi3ops.serving.records import InferenceRecord
    from phi3ops.traffic import TrafficMode, TrafficPlan

    judge_module = importlib.import_module(
        "tasks.canary.judge"
    )  # the package's `judge` is a function

    now = time.time()
    base = InferenceRecord(
        timestamp=now - 5,
        model_name="m",
        model_version="1",
        latency_s=1.0,
        response=None,
        finish_reason="stop",
        prompt_tokens=10,
        completion_tokens=20,
        response_chars=80,
        blank_response=False,
        template_tokens=0,
    )

    def load_records(name, version, *, start, end, arm=None, shadow=None):
        return [
            dataclasses.replace(
                base, arm=str(getattr(arm, "value", arm)), latency_s=1 + 0.01 * (i % 7)
            )
            for i in range(60)
        ]

    monkeypatch.setattr(judge_module, "load_records", load_records)
    monkeypatch.setattr(judge_module, "suite_checks", lambda records, thresholds: ([], {}, None))
    target = judge_module.CanaryTarget(
        model_name="m",
        plan=TrafficPlan(mode=TrafficMode.CANARY, share=0.5, since=now - 60),
        champion="1",
        candidate="2",
    )

    def verdict():
        report, _ = judge_module.judge(
            target, policy=CanaryPolicy(min_samples=20), thresholds=MonitorThresholds()
        )
        return report

    assert verdict().outcome == "promoted"  # the records are enough to decide on
    spool = RecordSpool(isolated_settings / "serving" / "spool", DownStore().write).start()
    spool.append([{"id": f"{i:032x}"} for i in range(9)])
    _wait_for(lambda: read_backlog(spool.directory).waiting == 9)
    report = verdict()
    assert report.outcome == "wait"
    assert "9 inference records are still in the servers' spool" in report.reasons[0]
    spool.close(timeout=0.1)
