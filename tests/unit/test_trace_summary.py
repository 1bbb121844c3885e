"""What MLflow's trace list and trace view show of a served request when prompts are not
recorded: a summary (roles, counts, generation parameters; outcome, finish reason, usage, arm,
version), never a word of the text; with prompts recorded, MLflow's own previews of the text.
"""

from __future__ import annotations

import json
import time

import pytest

from phi3ops.serving.records import InferenceRecorder, trace_id_of, write_entries
from phi3ops.serving.trace_summary import (
    request_preview,
    request_summary,
    response_preview,
    response_summary,
)

SYSTEM = {"role": "system", "content": "SECRET-SYSTEM"}  # 13 characters each
USER = {"role": "user", "content": "SECRET-PROMPT"}
CHAT = {
    "messages": [SYSTEM, USER, {"role": "assistant", "content": "SECRET-EARLIER"}, USER],
    "max_tokens": 64,
    "temperature": 0.7,
    "stop": ["\n\n", "END"],
    "stream": True,
}
ANSWER = {
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "SECRET-ANSWER"},
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 31, "completion_tokens": 64},
}


def test_a_chat_request_is_summarised_without_its_text() -> None:
    summary = request_summary(CHAT)
    assert summary == {
        "recorded": False,
        "message_count": 4,
        "roles": ["system", "user", "assistant", "user"],
        "chars": 13 + 13 + 14 + 13,
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": None,
        "stop": 2,
        "stream": True,
    }
    assert request_preview(summary) == (
        "4 messages (1 system, 2 user, 1 assistant), 53 chars; "
        "max_tokens=64 temperature=0.7 stop=2 stream=true"
    )
    assert "SECRET" not in json.dumps(summary)


def test_a_role_the_client_made_up_is_other_not_its_text() -> None:
    made_up = {"messages": [{"role": "SECRET-ROLE", "content": "x"}, {"role": 7, "content": "y"}]}
    summary = request_summary(made_up)
    assert summary["roles"] == ["other", "other"]
    assert "SECRET" not in json.dumps(summary) and "SECRET" not in str(request_preview(summary))


def test_parameters_from_the_payload_parts_and_odd_rows_are_summarised_too() -> None:
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "SECRET"}]}]}
    summary = request_summary(
        row | {"temperature": "hot", "response_format": {"type": "json_schema", "x": "SECRET"}},
        params={"top_p": 0.9, "max_tokens": 8},
    )
    assert (summary["chars"], summary["top_p"], summary["max_tokens"]) == (6, 0.9, 8)
    assert summary["temperature"] == "str"  # a string could be text: only its kind is kept
    assert summary["response_format"] == "json_schema" and "SECRET" not in json.dumps(summary)
    assert request_preview(summary) == (
        "1 message (1 user), 6 chars; max_tokens=8 temperature=str top_p=0.9 "
        "response_format=json_schema"
    )
    prompt = request_summary({"prompt": "SECRET-PROMPT"})
    assert request_preview(prompt) == "prompt, 13 chars"
    assert request_preview(request_summary(None)) == "request not read"
    assert request_preview(request_summary(["SECRET"])) == "request not a request row (list)"
    assert request_preview(request_summary({"inputs": [CHAT] * 500})) == ("a request of 500 rows")
    assert request_preview(CHAT) is None  # recorded text keeps MLflow's own preview
    assert request_preview({"recorded": False}) is None  # spooled before summaries existed


def _record(**fields) -> dict:
    return {
        "outcome": "served",
        "status_code": 200,
        "finish_reason": "stop",
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "response_chars": 21,
        "error": None,
        "arm": "champion",
        "model_version": "7",
        "shadow": False,
    } | fields


def test_what_came_of_a_request_is_summarised() -> None:
    assert response_preview(_record()) == (
        "served 200, finish stop, 5 -> 3 tokens, 21 chars; champion v7"
    )
    refused = _record(
        outcome="refused",
        status_code=400,
        finish_reason=None,
        prompt_tokens=None,
        completion_tokens=None,
        response_chars=None,
        error="HTTP 400 BAD_REQUEST: messages must not be empty",
        arm="candidate",
        model_version="8",
        shadow=True,
    )
    assert response_preview(refused) == (
        "refused 400: HTTP 400 BAD_REQUEST: messages must not be empty; candidate v8 (shadow)"
    )
    assert response_summary(refused)["usage"] is None
    assert response_summary(_record())["usage"] == {"prompt_tokens": 5, "completion_tokens": 3}


@pytest.mark.parametrize("record_prompts", [False, True])
def test_the_trace_list_shows_a_summary_unless_prompts_are_recorded(record_prompts) -> None:
    """Through a real (SQLite) store, as the MLflow UI's trace list and trace view read it."""
    import mlflow

    from phi3ops.tracking import configure_tracking

    experiment_id = configure_tracking("phi3ops-inference")
    recorder = InferenceRecorder(
        model_name="m",
        model_version="7",
        experiment_id=experiment_id,
        record_prompts=record_prompts,
        model_id=None,  # a trace without a logged model gets its previews all the same
    )
    started = time.time()
    payload = {"inputs": [CHAT, {"messages": []}], "params": {"top_p": 0.5}}
    pairs = recorder.records_for(
        payload,
        status_code=200,
        body={"predictions": [ANSWER, None]},
        started=started,
        latency_s=0.5,
    )
    entries = [
        recorder.entry(record, request=row, params=payload["params"]) for record, row in pairs
    ]
    write_entries(entries, tracking_uri=mlflow.get_tracking_uri())
    served = mlflow.get_trace(trace_id_of(entries[0]))
    failed = mlflow.get_trace(trace_id_of(entries[1]))
    listed = {
        t.info.trace_id: t.info
        for t in mlflow.search_traces(locations=[experiment_id], return_type="list")
    }
    assert listed[served.info.trace_id].request_preview == served.info.request_preview
    if record_prompts:  # MLflow's own previews: the last user message, the answer
        assert served.info.request_preview == "SECRET-PROMPT"
        assert served.info.response_preview == '"SECRET-ANSWER"'  # MLflow's: JSON of the text
        assert served.data.spans[0].outputs == "SECRET-ANSWER"
        return
    assert served.info.request_preview == (
        "4 messages (1 system, 2 user, 1 assistant), 53 chars; "
        "max_tokens=64 temperature=0.7 top_p=0.5 stop=2 stream=true"
    )
    assert served.info.response_preview == (
        "served 200, finish length, 31 -> 64 tokens, 13 chars; champion v7"
    )
    root = served.data.spans[0]
    assert root.inputs["roles"] == ["system", "user", "assistant", "user"]
    assert root.outputs["finish_reason"] == "length" and root.outputs["usage"] == {
        "prompt_tokens": 31,
        "completion_tokens": 64,
    }
    assert failed.info.request_preview == "0 messages, 0 chars; top_p=0.5"
    assert failed.info.response_preview.startswith("error 200: the server answered without")
    assert failed.info.state.value == "ERROR"
    for trace in (served, failed):
        assert "SECRET" not in trace.to_json()
