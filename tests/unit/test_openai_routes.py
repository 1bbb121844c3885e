"""The OpenAI-compatible routes and the shared validator, without a model: requests become the
chat row both flavors take, anything the ONNX pyfunc refuses is refused with its words, errors
come in OpenAI's shape with MLflow's status, overload and timeouts are answered at once, and
every row is recorded once.

The middleware is driven over ASGI in front of stand-ins for MLflow's scoring app and a model.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phi3ops.serving.app import ServingMiddleware
from phi3ops.serving.follow import LoadedModel, ModelSwitcher
from phi3ops.serving.openai_routes import RequestProblem, ServedModel, chat_row, error_body
from phi3ops.serving.records import InferenceRecorder, _span_dict
from phi3ops.serving.spool import RecordSpool
from phi3ops.serving.validate import chat_problem, quiet_reason

SERVED = ServedModel.of(name="phi3-mini", version="3", uri="models:/phi3-mini@champion")
HELLO = [{"role": "user", "content": "SECRET-PROMPT"}]
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "/home/packager/onnx/phi3",  # what the pyfunc was told at packaging
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


class Store:
    def __init__(self) -> None:
        self.entries: list[dict] = []

    def write(self, entries: list[dict]) -> None:
        self.entries.extend(entries)

    @property
    def records(self) -> list[dict]:
        return [entry["record"] for entry in self.entries]


class ScoringApp:
    """Stands in for MLflow's scoring app: answers ANSWER, or the MLflow error it is given."""

    def __init__(self, status: int = 200, error_code: str = "") -> None:
        self.status, self.error_code = status, error_code
        self.bodies: list[dict] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(json.loads(message["body"]))
        answer: Any = [ANSWER]
        if self.status != 200:
            why = f"Failed to predict data '{self.bodies[-1]}'. \nError: the queue is full"
            answer = {"error_code": self.error_code, "message": why}
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


class StreamModel:
    """``predict_stream`` yields ``pieces`` chunks (then usage), or never ends (``None``), one
    each ``delay`` seconds.
    """

    def __init__(self, pieces: int | None = 3, delay: float = 0.005) -> None:
        self.pieces, self.delay = pieces, delay
        self.closed = threading.Event()

    def predict_stream(self, row: dict) -> Iterator[dict]:
        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {
                "id": "chatcmpl-2",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "/home/packager/onnx/phi3",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        try:
            time.sleep(self.delay)
            yield chunk({"role": "assistant", "content": ""})
            i = 0
            while self.pieces is None or i < self.pieces:
                time.sleep(self.delay)
                i += 1
                yield chunk({"content": "tok "})
            last = chunk({}, "length")
            last["usage"] = {"prompt_tokens": 5, "completion_tokens": i, "total_tokens": 5 + i}
            yield last
        finally:
            self.closed.set()


def call(
    app: Any, path: str, body: Any = None, *, method: str = "POST", leave_after: int = 0
) -> tuple[int, dict, bytes]:
    """One request over ASGI: (status, headers, body); the client disconnects after
    ``leave_after`` answer events when that is set.
    """
    data = b"" if body is None else json.dumps(body).encode()
    sent: list[dict] = []
    done = asyncio.Event

    async def run() -> None:
        finished = done()
        pending = [{"type": "http.request", "body": data, "more_body": False}]

        async def receive() -> dict:
            if pending:
                return pending.pop(0)
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished.set()
            bodies = sum(m["type"] == "http.response.body" for m in sent)
            if leave_after and bodies >= leave_after:
                finished.set()  # the client goes away mid-answer

        scope = {"type": "http", "method": method, "path": path, "headers": []}
        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {bytes(k).decode().lower(): bytes(v).decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def events(body: bytes) -> list[Any]:
    out = []
    for event in body.decode().split("\n\n"):
        data = event.removeprefix("data: ").strip()
        if data:
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def recorder(tmp_path: Path, store: Store) -> Iterator[InferenceRecorder]:
    spool = RecordSpool(tmp_path / "spool", store.write).start()
    yield InferenceRecorder(
        model_name="phi3-mini", model_version="3", experiment_id="1", spool=spool
    )
    spool.close(timeout=5)


def middleware(recorder: InferenceRecorder, app: Any = None, **kwargs: Any) -> ServingMiddleware:
    loaded = LoadedModel(
        app=app or ScoringApp(),
        model=kwargs.pop("model", None),
        served=SERVED,
        version="3",
        recorder=recorder,
    )
    return ServingMiddleware(ModelSwitcher(loaded), **kwargs)


# --- the request -> the chat row -----------------------------------------------------------------


def test_a_chat_completion_request_becomes_the_row_both_flavors_take() -> None:
    row, stream, usage = chat_row(
        {
            "model": "phi3-mini@champion",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "a"}
            ],
            "max_completion_tokens": 7,
            "stop": "END",
            "seed": 3,
            "user": "u-1",
            "temperature": None,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        SERVED,
    )
    assert row == {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 7,
        "stop": ["END"],
        "stream": True,
        "seed": 3,  # the model's: it checks it and samples with it
    }
    assert (stream, usage) == (True, True)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"messages": HELLO, "model": "gpt-4o"}, 404, "serves 'phi3-mini/3'"),
        ({"model": "phi3-mini/3"}, 400, "messages is required"),
        ({"messages": HELLO, "functions": [{"name": "f"}]}, 400, "functions is not supported"),
        ({"messages": HELLO, "logit_bias": {"1": 2}}, 400, "logit_bias is not supported"),
        ({"messages": HELLO, "stream_options": {"include_usage": True}}, 400, "only allowed"),
        ({"messages": HELLO, "max_tokens": 4, "max_completion_tokens": 5}, 400, "differ"),
        ({"messages": HELLO, "user": 3}, 400, "user must be a string"),
        ([HELLO], 400, "JSON object"),
    ],
)
def test_requests_this_server_cannot_honour_are_refused(body, status, words) -> None:
    with pytest.raises(RequestProblem, match=words) as caught:
        chat_row(body, SERVED)
    assert caught.value.status == status


# --- one validator for both flavors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": []}, "messages is empty: send at least one message"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "user"}]}, "messages[0].content must be a string"),
        ({"messages": HELLO, "max_tokens": "many"}, "max_tokens must be an integer >= 1"),
        ({"messages": HELLO, "n": 2}, "n=2 is not supported: one choice per request"),
        ({"messages": HELLO, "stream": "yes"}, "stream must be true or false"),
        ({"messages": HELLO, "top_p": 0}, "top_p must be a number in (0, 1]"),
        ({"messages": HELLO, "stop": "x"}, "stop must be a list of strings"),
        ({"messages": HELLO, "prompt": "x"}, "messages/prompt: got both"),
    ],
)
def test_the_shared_validator_speaks_the_onnx_pyfuncs_words(row, message) -> None:
    problem = chat_problem(row, [row])
    assert problem is not None and problem.startswith(message)


def test_the_shared_validator_names_the_row_and_checks_params() -> None:
    rows = [{"messages": HELLO}, {"messages": []}]
    assert (
        chat_problem({"inputs": rows}, rows)
        == "request[1].messages is empty: send at least one message"
    )
    params = {"inputs": [rows[0]], "params": {"temperature": -1, "stop": []}}
    assert chat_problem(params, [rows[0]]).startswith("params['temperature'] must be a number")
    assert chat_problem({"messages": HELLO, "max_tokens": None}, [{"messages": HELLO}]) is None
    assert chat_problem({"prompt": "x"}, [{"prompt": "x"}]) is None  # the model's to judge
    assert quiet_reason("messages[0].role must be one of a, b, got 'SECRET'") == (
        "messages[0].role must be one of a, b"
    )


def test_errors_come_in_openais_shape() -> None:
    assert error_body(400, "max_tokens must be an integer", code="INVALID_PARAMETER_VALUE") == {
        "error": {
            "message": "max_tokens must be an integer",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "invalid_parameter_value",
        }
    }
    assert error_body(429, "full")["error"]["type"] == "rate_limit_error"
    assert error_body(504, "slow")["error"]["type"] == "timeout"


# --- the routes over ASGI --------------------------------------------------------------------


def test_a_completion_names_what_is_served_and_is_recorded_with_its_usage(recorder, store) -> None:
    app = ScoringApp()
    status, headers, body = call(
        middleware(recorder, app),
        "/v1/chat/completions",
        {"messages": HELLO, "max_completion_tokens": 4, "n": 1, "user": "u"},
    )
    answer = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json"
    assert answer["model"] == "phi3-mini/3" and answer["object"] == "chat.completion"
    assert answer["choices"] == ANSWER["choices"] and answer["usage"] == ANSWER["usage"]
    assert app.bodies == [{"messages": HELLO, "max_tokens": 4}]  # what MLflow's app was asked
    assert recorder.flush(5)
    (record,) = store.records
    assert (record["outcome"], record["prompt_tokens"], record["completion_tokens"]) == (
        "served",
        5,
        1,
    )
    span = _span_dict(store.entries[0])["attributes"]
    assert json.loads(span["mlflow.chat.tokenUsage"]) == {
        "input_tokens": 5,
        "output_tokens": 1,
        "total_tokens": 6,
    }


def test_a_refusal_is_a_400_in_openais_shape_recorded_without_the_request(recorder, store) -> None:
    app = ScoringApp()
    bad = {"messages": [{"role": "wizard", "content": "SECRET-PROMPT"}]}
    status, _, body = call(middleware(recorder, app), "/v1/chat/completions", bad)
    error = json.loads(body)["error"]
    assert status == 400 and not app.bodies  # no model saw it
    assert error["message"] == (
        "messages[0].role must be one of system, developer, user, assistant, tool, got 'wizard'"
    )
    assert (error["param"], error["code"]) == ("messages", "invalid_parameter_value")
    # /invocations refuses it the same way, in MLflow's shape
    status, _, body = call(middleware(recorder, app), "/invocations", bad)
    assert status == 400 and json.loads(body)["message"] == error["message"]
    assert recorder.flush(5)
    assert [r["outcome"] for r in store.records] == ["refused", "refused"]
    assert all(
        r["error"] == "HTTP 400 INVALID_PARAMETER_VALUE: messages[0].role must be one of system, "
        "developer, user, assistant, tool"
        for r in store.records
    )
    assert "SECRET" not in json.dumps(store.entries) and "wizard" not in json.dumps(store.entries)


@pytest.mark.parametrize(
    ("status", "code"), [(429, "RESOURCE_EXHAUSTED"), (503, "TEMPORARILY_UNAVAILABLE")]
)
def test_overload_is_answered_at_once_with_retry_after_and_recorded_shed(
    recorder, store, status, code
) -> None:
    app = ScoringApp(status, code)
    got, headers, body = call(
        middleware(recorder, app), "/v1/chat/completions", {"messages": HELLO}
    )
    error = json.loads(body)["error"]
    assert got == status and headers["retry-after"] == "1"
    assert error["message"] == "the queue is full"  # MLflow's quote of the request is cut
    assert error["code"] == code.lower()
    got, headers, _ = call(middleware(recorder, app), "/invocations", {"messages": HELLO})
    assert got == status and headers["retry-after"] == "1"
    assert recorder.flush(5)
    assert [r["outcome"] for r in store.records] == ["shed", "shed"]
    assert [r["error"] for r in store.records] == [f"HTTP {status} {code}"] * 2
    assert "SECRET" not in json.dumps(store.entries)  # MLflow's message quoted the request


def test_a_stream_is_openai_chunks_with_usage_last_and_done(recorder, store) -> None:
    app = middleware(recorder, model=StreamModel(3))
    body = {"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, data = call(app, "/v1/chat/completions", body)
    chunks = events(data)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert chunks[-1] == "[DONE]"
    *pieces, usage = chunks[:-1]
    assert all(
        c["object"] == "chat.completion.chunk" and c["model"] == "phi3-mini/3" for c in pieces
    )
    assert all(c["usage"] is None for c in pieces)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in pieces) == "tok tok tok "
    # without include_usage no chunk carries usage, and the record still has it
    _, _, data = call(app, "/v1/chat/completions", {"messages": HELLO, "stream": True})
    assert all("usage" not in c for c in events(data)[:-1])
    assert recorder.flush(5)
    assert [(r["outcome"], r["completion_tokens"]) for r in store.records] == [
        ("served", 3),
        ("served", 3),
    ]


def test_a_stream_whose_client_leaves_frees_its_generation_and_is_recorded_cancelled(
    recorder, store
) -> None:
    model = StreamModel(None)
    app = middleware(recorder, model=model)
    call(app, "/v1/chat/completions", {"messages": HELLO, "stream": True}, leave_after=4)
    assert model.closed.wait(5), "generation went on after the client left"
    assert recorder.flush(5)
    (record,) = store.records
    assert (record["status_code"], record["outcome"]) == (499, "cancelled")


def test_a_model_that_cannot_stream_says_so_with_a_400(recorder) -> None:
    from mlflow.exceptions import MlflowException

    class NoStream:
        def predict_stream(self, row: dict) -> Iterator[dict]:
            raise MlflowException("This model does not support predict_stream method.")

    body = {"messages": HELLO, "stream": True}
    status, _, data = call(middleware(recorder, model=NoStream()), "/v1/chat/completions", body)
    error = json.loads(data)["error"]
    assert (status, error["code"]) == (400, "bad_request")
    assert error["message"] == "this model cannot stream; send the request without stream"


def test_a_stream_past_the_timeout_is_cut_off_and_recorded_504(recorder, store) -> None:
    model = StreamModel(None, delay=0.02)
    app = middleware(recorder, model=model, timeout_s=0.3)
    started = time.perf_counter()
    status, _, data = call(app, "/v1/chat/completions", {"messages": HELLO, "stream": True})
    assert time.perf_counter() - started < 3
    chunks = events(data)
    assert status == 200 and chunks[-1] == "[DONE]"
    assert chunks[-2]["error"]["type"] == "timeout"
    assert model.closed.wait(5), "generation went on after the timeout"
    # A stream with no first token in time is a 504 before any event.
    slow = StreamModel(None, delay=2.0)
    status, _, data = call(
        middleware(recorder, model=slow, timeout_s=0.2),
        "/invocations",
        {"messages": HELLO, "stream": True},
    )
    assert status == 504 and json.loads(data)["error_code"] == "DEADLINE_EXCEEDED"
    assert recorder.flush(5)
    assert [(r["status_code"], r["outcome"]) for r in store.records] == [(504, "error")] * 2
    assert all(
        "request timeout of 0.3 s" in r["error"] or "0.2 s" in r["error"] for r in store.records
    )


def test_models_lists_what_is_served(recorder, store) -> None:
    app = middleware(recorder)
    status, _, body = call(app, "/v1/models", method="GET")
    listing = json.loads(body)
    assert status == 200 and listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["phi3-mini/3"]
    assert call(app, "/v1/models/phi3-mini@champion", method="GET")[0] == 200
    status, _, body = call(app, "/v1/models/gpt-4o", method="GET")
    assert status == 404 and json.loads(body)["error"]["code"] == "resource_does_not_exist"
    status, _, body = call(app, "/v1/completions", {"prompt": "x"})
    assert status == 404 and "/v1/chat/completions" in json.loads(body)["error"]["message"]
    assert recorder.flush(5) and not store.records  # no inference, nothing recorded


def test_a_body_over_the_limit_is_a_413_in_openais_shape(recorder, store) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    status, _, body = call(middleware(recorder, max_body_bytes=4096), "/v1/chat/completions", big)
    assert status == 413 and "PHI3OPS_SERVE_MAX_BODY_BYTES" in json.loads(body)["error"]["message"]
    assert recorder.flush(5)
    assert [r["outcome"] for r in store.records] == ["refused"]


# --- a traffic plan: no arm in any answer, no 404 for the listed id, no path -------------------


def test_an_invocations_answer_never_carries_a_path(recorder, store) -> None:
    """The transformers flavor's answers name the packaging machine's snapshot folder."""
    status, _, body = call(middleware(recorder), "/invocations", {"messages": HELLO})
    (answer,) = json.loads(body)
    assert status == 200 and answer["model"] == "phi3-mini"
    assert answer["choices"] == ANSWER["choices"]
    local = ServedModel.of(name=None, version=None, uri="/home/packager/model")
    assert local.id == "model" and local.listing()["data"][0]["id"] == "model"
    assert "/home/packager/model" in local.names  # still accepted when a request names it
    assert ServedModel.of(name=None, version=None, uri="s3://bucket/m").id == "s3://bucket/m"
    assert SERVED.answer_model("C:\\Users\\me\\phi3") == "phi3-mini"
    assert SERVED.answer_model("microsoft/Phi-3-mini-4k-instruct") != "phi3-mini"  # a repo id


def test_during_a_canary_the_listed_id_is_served_by_either_arm_which_no_answer_names(
    recorder, store, tmp_path
) -> None:
    """A client that names what /v1/models listed (before or during the plan) is served
    whichever arm its user falls on; every answer names the registered model; the records
    keep the version and arm. Streams a candidate cannot answer stay with the champion.
    """
    from mlflow.exceptions import MlflowException

    from phi3ops.traffic import Arm, TrafficPlan

    class NoStream:
        def predict_stream(self, row: dict) -> Iterator[dict]:
            raise MlflowException("This model does not support predict_stream method.")

    champion = LoadedModel(
        app=ScoringApp(), model=StreamModel(), served=SERVED, version="3", recorder=recorder
    )
    spool = RecordSpool(tmp_path / "spool-4", store.write).start()
    candidate = LoadedModel(
        app=ScoringApp(),
        model=NoStream(),
        served=ServedModel.of(name="phi3-mini", version="4", uri="models:/phi3-mini@champion"),
        version="4",
        recorder=InferenceRecorder(
            model_name="phi3-mini", model_version="4", experiment_id="1", spool=spool
        ),
        streams=False,
    )
    switcher = ModelSwitcher(champion)
    listed_before = json.loads(call(ServingMiddleware(switcher), "/v1/models", method="GET")[2])
    assert listed_before["data"][0]["id"] == "phi3-mini/3"
    switcher.switch(candidate, arm=Arm.CANDIDATE)
    plan = TrafficPlan.start("canary", share=0.5, candidate_version="4")
    switcher.set_plan(plan)
    app = ServingMiddleware(switcher)
    listed = json.loads(call(app, "/v1/models", method="GET")[2])
    assert [m["id"] for m in listed["data"]] == ["phi3-mini"]

    users = [f"user-{i}" for i in range(12)]
    expected = [plan.arm_for(user).value for user in users]
    assert set(expected) == {"champion", "candidate"}
    for user, model in zip(users, ["phi3-mini/3", "phi3-mini"] * 6, strict=True):
        body = {"messages": HELLO, "model": model, "user": user}
        status, _, data = call(app, "/v1/chat/completions", body)
        assert status == 200, data
        assert json.loads(data)["model"] == "phi3-mini"
        status, _, data = call(app, "/v1/chat/completions", {**body, "stream": True})
        assert status == 200, data  # never the candidate's "cannot stream" 400
        assert {e["model"] for e in events(data) if e != "[DONE]"} == {"phi3-mini"}
    assert recorder.flush(5) and candidate.recorder.flush(5)
    spool.close(timeout=5)
    records = store.records
    arms = {(r["arm"], r["model_version"]) for r in records}
    assert arms == {("champion", "3"), ("candidate", "4")}
    candidate_records = [r for r in records if r["arm"] == "candidate"]
    assert len(candidate_records) == expected.count("candidate")  # only the plain requests
    assert len(records) == 2 * len(users)


class HealthApp:
    """Stands in for MLflow's ``/ping`` and ``/health``: ``status`` and a bare newline."""

    def __init__(self, status: int) -> None:
        self.status = status

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"\n"})


@pytest.mark.parametrize(("status", "word"), [(200, "ok"), (404, "unhealthy")])
def test_health_keeps_mlflows_status_and_shows_the_records_waiting(recorder, status, word) -> None:
    app = middleware(recorder, HealthApp(status))
    code, _, body = call(app, "/health", method="GET")
    assert code == status
    assert json.loads(body) == {"status": word, "records_waiting": 0, "oldest_record_age_s": None}
    assert call(app, "/ping", method="GET")[::2] == (status, b"\n")  # untouched

    # A server that died on this data dir left 2 records its successor has not stored yet.
    assert recorder.spool is not None
    (recorder.spool.directory / "dead-server.jsonl").write_bytes(b'{"id": "a"}\n{"id": "b"}\n')
    code, _, body = call(app, "/health", method="GET")
    health = json.loads(body)
    assert code == status and health["records_waiting"] == 2
    assert 0 <= health["oldest_record_age_s"] < 60
