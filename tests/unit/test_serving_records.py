"""The serving layer's promises, without a model: every request row is recorded exactly once
(served, refused, cancelled), through a spool that survives a store outage and a killed
process; no text is stored unless prompts are recorded; bodies and row counts are bounded;
a client that leaves stops its generation.

The middleware is driven over ASGI by a scripted client, in front of a stand-in for MLflow's
scoring app and a stand-in model whose stream never ends on its own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phi3ops.serving.app import ServingMiddleware
from phi3ops.serving.follow import LoadedModel, ModelSwitcher
from phi3ops.serving.openai_routes import ServedModel
from phi3ops.serving.records import InferenceRecorder, trace_id_of, write_entries
from phi3ops.serving.spool import RecordSpool

CHAT = {"messages": [{"role": "user", "content": "SECRET-PROMPT"}], "max_tokens": 4}
ANSWER = {
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "SECRET-ANSWER <|end|>"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3},
}


class Store:
    """Stands in for the tracking store: keeps what the spool writes; can be down."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self.down = False
        self.calls = 0

    def write(self, entries: list[dict]) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("the tracking store is down")
        self.entries.extend(entries)

    @property
    def records(self) -> list[dict]:
        return [entry["record"] for entry in self.entries]


class EndlessStreamModel:
    """``predict_stream`` yields a chunk every few milliseconds until it is closed."""

    def __init__(self) -> None:
        self.produced = 0
        self.closed = threading.Event()

    def predict_stream(self, request: dict) -> Iterator[dict]:
        try:
            while True:
                time.sleep(0.005)
                self.produced += 1
                yield {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}],
                }
        finally:
            self.closed.set()


async def scoring_app(scope: dict, receive: Any, send: Any) -> None:
    """Stands in for MLflow's scoring app: answers ANSWER per row, or a 400 that quotes the
    request (as MLflow's own messages may) when a row has no 'messages'.
    """
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payload = json.loads(body)
    rows = payload.get("inputs", [payload])
    if any("messages" not in row for row in rows):
        status, answer = 400, {"error_code": "BAD_REQUEST", "message": f"bad input: {body!r}"}
    else:
        status, answer = 200, {"predictions": [ANSWER] * len(rows)}
    data = json.dumps(answer).encode()
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": data})


class Client:
    """An HTTP client over ASGI: sends the body in chunks, keeps what comes back, and may leave
    while sending (``leave_while_sending``) or after some answer events (``leave_after``).
    """

    def __init__(
        self,
        chunks: list[bytes],
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        leave_while_sending: bool = False,
        leave_after: int | None = None,
    ) -> None:
        self.pending = list(chunks)
        self.headers = headers or []
        self.leave_while_sending = leave_while_sending
        self.leave_after = leave_after
        self.messages: list[dict] = []
        self.reads = 0
        self.on_complete: Any = None
        self._left: asyncio.Event | None = None

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.messages if m["type"] == "http.response.start")

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"].endswith("body"))

    async def receive(self) -> dict:
        self.reads += 1
        if self.pending:
            chunk = self.pending.pop(0)
            more = bool(self.pending) or self.leave_while_sending
            return {"type": "http.request", "body": chunk, "more_body": more}
        if not self.leave_while_sending:
            await self._left_event().wait()  # the body is complete: wait for the end
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.messages.append(message)
        if message["type"] != "http.response.body":
            return
        events = sum(m["type"] == "http.response.body" for m in self.messages)
        if not message.get("more_body"):
            if self.on_complete:
                self.on_complete()
            self._left_event().set()
        elif self.leave_after is not None and events >= self.leave_after:
            self._left_event().set()  # the client goes away mid-answer

    def _left_event(self) -> asyncio.Event:
        if self._left is None:
            self._left = asyncio.Event()
        return self._left

    def call(self, app: Any) -> None:
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/invocations",
            "headers": [(b"content-type", b"application/json"), *self.headers],
        }
        asyncio.run(app(scope, self.receive, self.send))


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def spool(tmp_path: Path, store: Store) -> Iterator[RecordSpool]:
    spool = RecordSpool(tmp_path / "spool", store.write).start()
    yield spool
    spool.close(timeout=5)


def _recorder(spool: RecordSpool, *, record_prompts: bool = False) -> InferenceRecorder:
    return InferenceRecorder(
        model_name="m",
        model_version="7",
        experiment_id="1",
        record_prompts=record_prompts,
        context_tokens=4096,
        spool=spool,
    )


def _middleware(
    recorder: InferenceRecorder, model: Any = None, app: Any = scoring_app, **limits: int
) -> Any:
    served = ServedModel.of(name="m", version="7", uri=None)
    loaded = LoadedModel(app=app, model=model, served=served, version="7", recorder=recorder)
    return ServingMiddleware(ModelSwitcher(loaded), **limits)


def _body(payload: Any) -> list[bytes]:
    return [json.dumps(payload).encode()]


def test_a_stream_whose_client_leaves_stops_generating_and_is_recorded_cancelled(
    spool, store
) -> None:
    recorder, model = _recorder(spool), EndlessStreamModel()
    client = Client(_body({**CHAT, "stream": True}), leave_after=5)
    client.call(_middleware(recorder, model))
    assert model.closed.wait(5), "generation went on after the client left"
    produced = model.produced
    time.sleep(0.1)
    assert model.produced == produced  # no token after the close
    assert recorder.flush(5)
    (record,) = store.records
    assert (record["status_code"], record["outcome"]) == (499, "cancelled")
    assert "client" in record["error"] and record["response"] is None


def test_an_upload_the_client_abandons_is_recorded_cancelled_and_never_routed(spool, store) -> None:
    routed = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        routed.append(scope)

    recorder = _recorder(spool)
    client = Client([b'{"messages": [{"role": "us'], leave_while_sending=True)
    client.call(_middleware(recorder, app=app))
    assert recorder.flush(5)
    assert not routed and not client.messages
    (record,) = store.records
    assert (record["status_code"], record["outcome"]) == (499, "cancelled")


def test_a_body_over_the_limit_is_refused_413_before_it_is_read(spool, store) -> None:
    recorder = _recorder(spool)
    declared = Client(_body(CHAT), headers=[(b"content-length", b"50000000")])
    declared.call(_middleware(recorder, max_body_bytes=4096))
    assert declared.status == 413 and declared.reads == 0  # refused on its declared length
    assert b"4096" in declared.body

    chunked = Client([b"x" * 3000] * 10)  # no content-length: refused as it grows
    chunked.call(_middleware(recorder, max_body_bytes=4096))
    assert chunked.status == 413 and chunked.reads == 2
    assert recorder.flush(5)
    assert [(r["status_code"], r["outcome"]) for r in store.records] == [(413, "refused")] * 2
    assert all("PHI3OPS_SERVE_MAX_BODY_BYTES" in r["error"] for r in store.records)


def test_a_request_of_too_many_rows_is_refused_413_and_recorded_once(spool, store) -> None:
    recorder = _recorder(spool)
    client = Client(_body({"inputs": [CHAT] * 500}))
    client.call(_middleware(recorder, max_rows=64))
    assert client.status == 413
    assert b"500 rows" in client.body and b"PHI3OPS_SERVE_MAX_ROWS" in client.body
    assert recorder.flush(5)
    (record,) = store.records
    assert record["outcome"] == "refused" and "at most 64" in record["error"]


def test_every_row_is_recorded_exactly_once_before_the_client_has_its_answer(spool, store) -> None:
    recorder = _recorder(spool)
    store.down = True  # the spool file keeps what it took until the store is back
    spooled_at_completion = []
    client = Client(_body({"inputs": [CHAT, CHAT, {"prompt": "x"}]}))
    client.on_complete = lambda: spooled_at_completion.append(spool.path.read_bytes().count(b"\n"))
    client.call(_middleware(recorder))
    assert client.status == 400
    ok = Client(_body({"inputs": [CHAT, CHAT]}))
    ok.on_complete = lambda: spooled_at_completion.append(spool.path.read_bytes().count(b"\n"))
    ok.call(_middleware(recorder))
    assert spooled_at_completion == [3, 5]  # each call's rows were in the spool file first
    store.down = False
    assert recorder.flush(10)
    assert len(store.records) == 5
    assert [r["outcome"] for r in store.records] == ["refused"] * 3 + ["served"] * 2
    assert len({entry["id"] for entry in store.entries}) == 5


@pytest.mark.parametrize("record_prompts", [False, True])
def test_no_prompt_answer_or_quoted_request_is_stored_unless_prompts_are_recorded(
    tmp_path, store, record_prompts
) -> None:
    store.down = True  # the spool file itself must not hold the text either
    spool = RecordSpool(tmp_path / "spool", store.write).start()
    recorder = _recorder(spool, record_prompts=record_prompts)
    Client(_body(CHAT)).call(_middleware(recorder))
    Client(_body({"inputs": [{"prompt": "SECRET-PROMPT"}]})).call(_middleware(recorder))
    spooled = spool.path.read_text()
    store.down = False
    assert recorder.flush(10)
    spool.close(timeout=5)
    served, refused = store.records
    stored = json.dumps(store.entries)
    assert ("SECRET" in spooled) is record_prompts
    assert ("SECRET" in stored) is record_prompts
    assert served["response_chars"] == len("SECRET-ANSWER <|end|>")
    assert served["template_tokens"] == 1 and served["blank_response"] is False
    assert refused["error"].startswith("HTTP 400 BAD_REQUEST")
    if record_prompts:
        assert served["response"] == "SECRET-ANSWER <|end|>"
        assert "SECRET-PROMPT" in refused["error"]  # MLflow's own words, quoting the request


def test_the_spool_keeps_records_through_a_store_outage_and_stores_each_once(
    tmp_path, store
) -> None:
    store.down = True
    first = RecordSpool(tmp_path / "spool", store.write, max_backoff_s=0.05).start()
    first.append([{"id": f"{i:032x}", "n": i} for i in range(5)])
    assert not first.flush(timeout=0.3)
    assert not first.close(timeout=0.3)  # the store is down: the file stays for the next one
    leftovers = sorted((tmp_path / "spool").glob("*.jsonl"))
    assert len(leftovers) == 1
    store.down = False
    second = RecordSpool(tmp_path / "spool", store.write).start()
    second.append([{"id": f"{5:032x}", "n": 5}])
    assert second.flush(timeout=10)
    assert sorted(entry["n"] for entry in store.entries) == list(range(6))
    assert second.close(timeout=5)
    assert not list((tmp_path / "spool").iterdir())  # nothing left behind


def test_the_spool_of_a_live_process_is_left_to_it(tmp_path, store) -> None:
    slow = Store()
    slow.down = True
    owner = RecordSpool(tmp_path / "spool", slow.write, max_backoff_s=0.05).start()
    owner.append([{"id": "a" * 32}])
    other = RecordSpool(tmp_path / "spool", store.write).start()
    assert other.flush(timeout=5)
    assert store.entries == []  # its owner is alive: the file is its own
    slow.down = False
    assert owner.close(timeout=5) and other.close(timeout=5)
    assert [entry["id"] for entry in slow.entries] == ["a" * 32]


KILLED_WRITER = """
import os, signal, sys, time
from pathlib import Path
from phi3ops.serving.spool import RecordSpool

def stuck(entries):  # a store that never answers
    time.sleep(3600)

spool = RecordSpool(Path(sys.argv[1]), stuck).start()
for i in range(int(sys.argv[2])):
    spool.append([{"id": f"{i:032x}", "n": i}])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_records_a_killed_process_spooled_are_stored_once_by_the_next_one(tmp_path, store) -> None:
    directory = tmp_path / "spool"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(directory), "40"],
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL
    # Its writer had stored the first 10 but died before committing the offset past them.
    (leftover,) = directory.glob("*.jsonl")
    first_ten = sum(len(line) for line in leftover.read_bytes().splitlines(keepends=True)[:10])
    leftover.with_suffix(".offset").write_text(str(first_ten))
    next_one = RecordSpool(directory, store.write, batch_size=7).start()
    assert next_one.flush(timeout=10)
    assert [entry["n"] for entry in store.entries] == list(range(10, 40))
    assert next_one.close(timeout=5)
    assert not list(directory.iterdir())


def test_an_entry_stored_twice_is_one_trace(tmp_path) -> None:
    """After a crash between the store taking a batch and the offset being committed, the
    batch is written again: it must not double the records.
    """
    import mlflow

    from phi3ops.tracking import configure_tracking
    from tasks.monitoring import load_records

    experiment_id = configure_tracking("phi3ops-inference")
    recorder = InferenceRecorder(
        model_name="m", model_version="7", experiment_id=experiment_id, model_id="m-123abc"
    )
    started = time.time()
    pairs = recorder.records_for(
        {"inputs": [CHAT, CHAT]},
        status_code=200,
        body={"predictions": [ANSWER, ANSWER]},
        started=started,
        latency_s=0.5,
        arm="candidate",
        shadow=True,
    )
    entries = [recorder.entry(record, request=row) for record, row in pairs]
    write_entries(entries, tracking_uri=mlflow.get_tracking_uri())
    write_entries(entries, tracking_uri=mlflow.get_tracking_uri())
    records = load_records("m", "7", start=started - 1, end=started + 1)
    assert len(records) == 2
    assert records[0].completion_tokens == 3 and records[0].response is None
    trace = mlflow.get_trace(trace_id_of(entries[0]))
    assert trace.info.tags["phi3ops.model_version"] == "7"
    # MLflow's own fields: the trace view shows the tokens and links the logged model.
    assert trace.info.trace_metadata["mlflow.modelId"] == "m-123abc"
    assert trace.info.token_usage == {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}
    assert (trace.info.tags["phi3ops.arm"], trace.info.tags["phi3ops.shadow"]) == (
        "candidate",
        "true",
    )
    assert (records[0].arm, records[0].shadow) == ("candidate", True)


def test_lifespan_shutdown_stores_every_spooled_record_first(tmp_path, store) -> None:
    def slow_write(entries: list[dict]) -> None:
        time.sleep(0.2)
        store.write(entries)

    spool = RecordSpool(tmp_path / "spool", slow_write, batch_size=1).start()
    app = _middleware(_recorder(spool))
    for _ in range(4):
        Client(_body(CHAT)).call(app)
    sent: list[str] = []

    async def lifespan() -> None:
        queue = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

        async def receive() -> dict:
            return queue.pop(0)

        async def send(message: dict) -> None:
            sent.append(f"{message['type']} after {len(store.entries)} stored")

        await app({"type": "lifespan"}, receive, send)

    asyncio.run(lifespan())
    assert sent[-1] == "lifespan.shutdown.complete after 4 stored"
    assert not list((tmp_path / "spool").glob("*.jsonl"))


def test_writer_keeps_going_after_a_record_it_cannot_parse(tmp_path, store) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "1-dead.jsonl").write_bytes(
        b'{"id": "1"}\nnot json\n{"id": "2"}\n{"id": "3", "cut'
    )
    spool = RecordSpool(directory, store.write).start()
    assert spool.flush(timeout=5)
    assert [entry["id"] for entry in store.entries] == ["1", "2"]  # the cut line was in flight
    assert spool.close(timeout=5)


def test_a_range_that_ends_on_a_batch_boundary_loses_nothing_after_it(tmp_path, store) -> None:
    spool = RecordSpool(tmp_path / "spool", store.write, batch_size=2).start()
    assert spool.flush(timeout=5)
    spool.append([{"id": f"{i:032x}", "n": i} for i in range(4)])  # two full batches
    assert spool.flush(timeout=5)
    spool.append([{"id": f"{4:032x}", "n": 4}])
    spool.append([{"id": f"{5:032x}", "n": 5}])
    assert spool.flush(timeout=5)
    assert [entry["n"] for entry in store.entries] == list(range(6))
    assert spool.close(timeout=5)
