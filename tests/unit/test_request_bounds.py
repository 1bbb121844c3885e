"""Request bodies that used to crash the middleware, cost seconds of CPU or slip through as
"missing": bounded before parsing (depth, values), refused ``NaN`` / ``Infinity``, and a cap on
the messages and characters a row may hold, checked before any template or token.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from phi3_chat.validate import MAX_CHARS, MAX_MESSAGES, _rows, validated_params, validated_row
from phi3ops.serving.json_bounds import (
    MAX_DEPTH,
    MAX_VALUES,
    BodyRefused,
    check_json_bounds,
    parse_request_json,
)
from tests.unit import test_openai_routes as routes

middleware = routes.middleware
recorder, store = routes.recorder, routes.store  # the fixtures, shared

HELLO = [{"role": "user", "content": "hello"}]


def call_raw(app: Any, path: str, data: bytes) -> tuple[int, Any]:
    """One POST of raw bytes over ASGI: (status, parsed answer)."""
    sent: list[dict] = []

    async def run() -> None:
        pending = [{"type": "http.request", "body": data, "more_body": False}]

        async def receive() -> dict:
            if pending:
                return pending.pop(0)
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def _message(answer: Any, openai: bool) -> str:
    return answer["error"]["message"] if openai else answer["message"]


DEEP = b"[" * 5000 + b"]" * 5000
WIDE = json.dumps({"messages": [{"role": "user", "content": "x"}] * 60_000}).encode()
NAN = json.dumps({"messages": HELLO, "temperature": math.nan}).encode()  # json writes NaN
INF = b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}'


@pytest.mark.parametrize("openai", [True, False], ids=["openai", "invocations"])
@pytest.mark.parametrize(
    ("data", "words"),
    [
        (DEEP, f"more than {MAX_DEPTH} levels deep"),
        (WIDE, f"more than {MAX_VALUES} JSON values"),
        (NAN, "NaN, which is not JSON"),
        (INF, "-Infinity, which is not JSON"),
    ],
    ids=["deep", "wide", "nan", "infinity"],
)
def test_a_body_too_deep_too_wide_or_with_nan_is_a_recorded_400_in_the_routes_shape(
    data: bytes, words: str, openai: bool, recorder, store
) -> None:
    path = "/v1/chat/completions" if openai else "/invocations"
    started = time.process_time()
    status, answer = call_raw(middleware(recorder), path, data)
    spent = time.process_time() - started
    assert status == 400, answer
    assert words in _message(answer, openai)
    if openai:
        assert answer["error"]["type"] == "invalid_request_error"
    else:
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert recorder.flush(5)
    assert [r["outcome"] for r in store.records] == ["refused"]
    assert spent < 5  # 60,000 messages used to cost 7 s of CPU before their 400


def test_the_scan_skips_brackets_inside_strings_and_passes_real_requests() -> None:
    text = "[[[{{{" * 1000 + ', "a", ' * 1000
    body = {"messages": [{"role": "user", "content": text}] * 100, "stop": ["]", "}"]}
    assert parse_request_json(json.dumps(body).encode())[0] == body
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}] * MAX_MESSAGES
    check_json_bounds(json.dumps({"inputs": [{"messages": parts}]}).encode())
    assert parse_request_json(b"not json")[0] is None  # still MLflow's to answer
    with pytest.raises(BodyRefused, match="deep"):
        check_json_bounds(b'{"a": ' * (MAX_DEPTH + 1))


def test_too_many_messages_or_characters_are_refused_naming_the_field_before_tokenising() -> None:
    with pytest.raises(MlflowException, match=rf"^messages holds {MAX_MESSAGES + 1} messages"):
        validated_row({"messages": HELLO * (MAX_MESSAGES + 1)})
    huge = [{"role": "user", "content": "x" * (MAX_CHARS // 2 + 1)}] * 2
    with pytest.raises(MlflowException, match=r"^request\[1\]\.messages holds more than"):
        validated_row({"messages": huge}, "request[1].")
    with pytest.raises(MlflowException, match=r"^prompt holds more than"):
        validated_row({"prompt": "x" * (MAX_CHARS + 1)})
    assert validated_row({"messages": HELLO * MAX_MESSAGES})[1] is not None


@pytest.mark.parametrize("name", ["temperature", "top_p", "max_tokens", "top_k"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_clients_nan_or_infinity_is_refused_naming_the_field_never_missing(
    name: str, value: float
) -> None:
    with pytest.raises(MlflowException, match=rf"^{name} must be"):
        validated_row({"messages": HELLO, name: value})
    with pytest.raises(MlflowException, match=rf"^params\['{name}'\] must be"):
        validated_params({name: value})
    with pytest.raises(MlflowException, match=rf"^{name} must be"):
        validated_row(_rows([{"messages": HELLO, name: value}])[0])


def test_pandas_nan_for_a_column_a_row_did_not_set_stays_missing() -> None:
    frame = pd.DataFrame([{"messages": HELLO, "temperature": 0.5}, {"messages": HELLO}])
    rows = _rows(frame)
    assert "temperature" not in rows[1]
    assert validated_row(rows[1])[0] == {}
    assert validated_row(rows[0])[0] == {"temperature": 0.5}
    assert validated_params({"temperature": None, "stop": []}) == {}
