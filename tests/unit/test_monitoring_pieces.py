"""Inference records and the monitoring suite's pieces, without a model or a store."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from phi3ops.errors import InvalidInputError
from phi3ops.serving.records import (
    TEMPLATE_TOKEN_REGEX,
    InferenceRecord,
    InferenceRecorder,
    completion_from_events,
    request_rows,
    with_text_features,
)
from tasks.canary import is_format_failure
from tasks.drift import drift_statistics, statistic_expectations, window_sample, with_statistics
from tasks.monitoring import (
    Baseline,
    baseline_from_evaluation,
    build_expectations,
    records_frame,
    validate,
    window_bounds,
)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _recorder(record_prompts: bool = False) -> InferenceRecorder:
    return InferenceRecorder(
        model_name="m",
        model_version="3",
        experiment_id="1",
        record_prompts=record_prompts,
        context_tokens=4096,
    )


def _completion(text: str, finish: str = "stop") -> dict:
    return {
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


@pytest.mark.parametrize(
    ("payload", "rows"),
    [
        (CHAT, [CHAT]),
        ({"inputs": [CHAT, CHAT]}, [CHAT, CHAT]),
        ({"dataframe_records": [CHAT]}, [CHAT]),
        ({"inputs": {"prompt": ["a", "b"]}}, [{"prompt": "a"}, {"prompt": "b"}]),
        ({"inputs": CHAT}, [CHAT]),
        ("not json", []),
    ],
)
def test_request_rows_of_every_payload_form(payload, rows) -> None:
    assert request_rows(payload) == rows


def test_each_row_is_paired_with_its_answer() -> None:
    pairs = _recorder().records_for(
        {"inputs": [CHAT, {"prompt": "p"}]},
        status_code=200,
        body={"predictions": [_completion("Hello", "length"), "plain"]},
        started=100.0,
        latency_s=0.5,
    )
    (chat, _), (plain, _) = pairs
    assert (chat.response, chat.finish_reason, chat.prompt_tokens, chat.completion_tokens) == (
        "Hello",
        "length",
        7,
        3,
    )
    assert (chat.batch_size, chat.context_tokens, chat.model_version) == (2, 4096, "3")
    assert (plain.response, plain.finish_reason, plain.completion_tokens) == ("plain", None, None)
    assert chat.prompt is None  # not recorded by default


def test_a_refused_request_is_an_error_record_and_prompts_only_when_enabled() -> None:
    ((record, _),) = _recorder(record_prompts=True).records_for(
        CHAT,
        status_code=400,
        body={"error_code": "INVALID_PARAMETER_VALUE", "message": "max_tokens too big"},
        started=1.0,
        latency_s=0.01,
    )
    assert record.response is None and record.status_code == 400
    assert "max_tokens too big" in record.error
    assert record.prompt == "user: hi"
    assert record.outcome == "refused"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "served"),
        (400, "refused"),
        (413, "refused"),
        (429, "shed"),
        (503, "shed"),
        (499, "cancelled"),
        (500, "error"),
    ],
)
def test_each_status_has_its_outcome(status, outcome) -> None:
    body = _completion("x") if status == 200 else {"error_code": "X", "message": "m"}
    ((record, _),) = _recorder().records_for(
        CHAT, status_code=status, body=body, started=1.0, latency_s=0.1
    )
    assert record.outcome == outcome


def test_error_messages_are_redacted_unless_prompts_are_recorded() -> None:
    body = {"error_code": "INVALID_PARAMETER_VALUE", "message": "bad row {'content': 'my ssn'}"}
    ((hidden, _),) = _recorder().records_for(
        CHAT, status_code=400, body=body, started=1.0, latency_s=0.1, reason="why, in our words"
    )
    assert hidden.error == "HTTP 400 INVALID_PARAMETER_VALUE: why, in our words"
    ((shown, _),) = _recorder(record_prompts=True).records_for(
        CHAT, status_code=400, body=body, started=1.0, latency_s=0.1
    )
    assert "my ssn" in shown.error


def test_a_missing_prediction_is_an_error_not_a_silent_gap() -> None:
    pairs = _recorder().records_for(
        {"inputs": [CHAT, CHAT]},
        status_code=200,
        body={"predictions": [_completion("x")]},
        started=1.0,
        latency_s=0.1,
    )
    assert pairs[0][0].error is None
    assert "without a prediction" in pairs[1][0].error


def test_records_round_trip_through_the_span_attribute() -> None:
    record = InferenceRecord(
        timestamp=1.0,
        model_name="m",
        model_version="1",
        latency_s=2.0,
        response="r",
        completion_tokens=4,
    )
    stored = {**record.__dict__, "added_later": 1}
    assert InferenceRecord.from_attribute(stored) == record


def test_only_server_failures_count_as_errors() -> None:
    """Refused inputs and clients that left are anyone's to cause: not the server failing."""
    base = dict(timestamp=1.0, model_name="m", model_version="1", latency_s=1.0, response=None)
    frame = records_frame(
        [
            InferenceRecord(
                **base, error="HTTP 499: cancelled", status_code=499, outcome="cancelled"
            ),
            InferenceRecord(**base, error="HTTP 500", status_code=500, outcome="error"),
            InferenceRecord(**base, error="HTTP 400 X", status_code=400, outcome="refused"),
            InferenceRecord(**base, error="HTTP 503 X", status_code=503, outcome="shed"),
        ]
    )
    assert frame["error"].tolist() == [None, "HTTP 500", None, "HTTP 503 X"]


@pytest.mark.slow  # great-expectations takes seconds to import
def test_answer_checks_work_on_records_without_text(tmp_path) -> None:
    from phi3ops.settings import get_settings

    base = dict(timestamp=1.0, model_name="m", model_version="1", latency_s=1.0)
    answers = ["Paris is the capital."] * 8 + ["   ", "Paris.<|end|><|assistant|>"]
    records = [
        dataclasses.replace(with_text_features(InferenceRecord(**base, response=a)), response=None)
        for a in answers
    ]
    expectations, _ = build_expectations(get_settings().monitor, None)
    checks, _ = validate(records_frame(records), expectations, docs_dir=tmp_path)
    failed = {check.name for check in checks if not check.success}
    assert failed == {"responses-not-empty", "no-template-tokens"}
    assert all(record.response is None for record in records)


def test_frame_derives_seconds_per_token_only_where_tokens_were_generated() -> None:
    base = dict(timestamp=1.0, model_name="m", model_version="1", response="r")
    frame = records_frame(
        [
            InferenceRecord(**base, latency_s=2.0, completion_tokens=4),
            InferenceRecord(**base, latency_s=1.0, completion_tokens=0),
            InferenceRecord(**{**base, "response": None}, latency_s=1.0, error="HTTP 400"),
        ]
    )
    assert frame["seconds_per_token"].iloc[0] == 0.5
    assert math.isnan(frame["seconds_per_token"].iloc[1])
    assert math.isnan(frame["seconds_per_token"].iloc[2])
    assert frame["response"].iloc[2] is None


def test_thresholds_come_from_settings_and_reject_unknown_overrides(monkeypatch) -> None:
    from phi3ops.settings import get_settings

    monkeypatch.setenv("PHI3OPS_MONITOR_MAX_ERROR_RATE", "0.01")
    get_settings.cache_clear()
    thresholds = get_settings().monitor
    assert thresholds.max_error_rate == 0.01
    assert thresholds.with_overrides({"max_error_rate": 0.5}).max_error_rate == 0.5
    with pytest.raises(InvalidInputError, match="max_eror_rate"):
        thresholds.with_overrides({"max_eror_rate": 0.5})
    with pytest.raises(InvalidInputError, match="min_records"):
        thresholds.with_overrides({"min_records": 0})  # an empty window never passes
    with pytest.raises(InvalidInputError, match="positive"):
        window_bounds(0)
    start, end = window_bounds(30, end=10_000.0)
    assert end - start == 1800


def test_drift_checks_need_a_baseline_and_say_so() -> None:
    from phi3ops.settings import get_settings

    thresholds = get_settings().monitor
    expectations, skipped = build_expectations(thresholds, None)
    names = [e.meta["check"] for e in expectations]
    assert "drift-completion-tokens" not in names
    assert [c.name for c in skipped] == ["drift-completion-tokens", "drift-seconds-per-token"]
    assert all(c.success is None and "no evaluation" in c.observed for c in skipped)

    baseline = Baseline(
        "run", "smoke", "h", 6, median_completion_tokens=40.0, median_seconds_per_token=0.01
    )
    expectations, skipped = build_expectations(thresholds, baseline)
    by_name = {e.meta["check"]: e for e in expectations}
    assert not skipped and len(by_name) == 8  # no latency SLO unless one is set
    assert (
        by_name["drift-completion-tokens"].min_value,
        by_name["drift-completion-tokens"].max_value,
    ) == (20.0, 80.0)
    assert by_name["drift-seconds-per-token"].max_value == pytest.approx(0.02)
    assert all(e.meta["guards_against"] for e in expectations)


def test_latency_slos_are_checked_only_when_set_like_the_gates() -> None:
    from phi3ops.settings import get_settings

    thresholds = get_settings().monitor
    assert (
        thresholds.max_latency_p95_s,
        thresholds.max_ttft_p95_s,
        thresholds.max_s_per_token_p95,
    ) == (None, None, None)
    names = [e.meta["check"] for e in build_expectations(thresholds, None)[0]]
    assert not [name for name in names if name.endswith("-slo")]
    slos = thresholds.with_overrides(
        {"max_ttft_p95_s": 3, "max_s_per_token_p95": 0.5, "max_latency_p95_s": 120}
    )
    by_name = {e.meta["check"]: e for e in build_expectations(slos, None)[0]}
    assert {
        name: (by_name[name].column, by_name[name].max_value, by_name[name].mostly)
        for name in ("ttft-p95-slo", "s-per-token-p95-slo", "latency-p95-slo")
    } == {
        "ttft-p95-slo": ("ttft_s", 3, 0.95),
        "s-per-token-p95-slo": ("seconds_per_token", 0.5, 0.95),
        "latency-p95-slo": ("latency_s", 120, 0.95),
    }


@pytest.mark.parametrize("token", ["<|end|>", "<|assistant|>", "<|user|>", "<|endoftext|>"])
def test_template_token_pattern_catches_phi3_markers(token) -> None:
    assert re.search(TEMPLATE_TOKEN_REGEX, f"Paris.{token}")
    assert not re.search(TEMPLATE_TOKEN_REGEX, "a | b < c > d")


def test_streamed_events_add_up_to_a_completion_with_time_to_first_token() -> None:
    def event(delta: dict, finish=None, usage=None) -> bytes:
        chunk = {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n".encode()

    split = event({"content": "lo"})
    events = [
        (0.1, event({"role": "assistant"})),
        (0.2, event({"content": "Hel"})),
        (0.3, split[:10]),  # an event may arrive in pieces
        (0.4, split[10:]),
        (0.5, event({}, "stop", {"prompt_tokens": 3, "completion_tokens": 2})),
        (0.6, b"data: [DONE]\n\n"),
    ]
    completion, ttft = completion_from_events(events)
    assert ttft == 0.2
    ((record, _),) = _recorder().records_for(
        CHAT, status_code=200, body=completion, started=1.0, latency_s=0.6
    )
    assert (record.response, record.finish_reason, record.completion_tokens) == ("Hello", "stop", 2)
    assert completion_from_events([(0.1, b"not an event")]) == (None, None)

    # A streamed tool call has no text: its first token is the call's delta.
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
    tool_events = [
        (0.1, event({"role": "assistant"})),
        (0.7, event({"tool_calls": [call]})),
        (0.8, event({}, "tool_calls", {"prompt_tokens": 3, "completion_tokens": 9})),
    ]
    completion, ttft = completion_from_events(tool_events)
    assert ttft == 0.7
    assert completion["choices"][0]["finish_reason"] == "tool_calls"


def test_a_tool_call_answer_is_recorded_as_its_calls_streamed_or_not() -> None:
    """A tool-call answer has ``content: null``: its record shows the calls, so the monitor's
    responses-not-empty check and the canary's format-failure rate see an answer, not a blank.
    """
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    shown = json.dumps([c["function"] for c in calls])

    def event(delta: dict, finish=None) -> bytes:
        chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    first, second = calls
    streamed, _ = completion_from_events(
        [
            (0.1, event({"role": "assistant", "content": ""})),
            # OpenAI's way: a call's first delta names it, later ones add to its arguments.
            (0.2, event({"tool_calls": [{**first, "index": 0, "function": {"name": "f"}}]})),
            (0.3, event({"tool_calls": [{"index": 0, "function": {"arguments": '{"x": '}}]})),
            (0.4, event({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})),
            (0.5, event({"tool_calls": [{**second, "index": 1}]})),  # ours: whole calls
            (0.6, event({}, "tool_calls")),
        ]
    )
    assert streamed["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": calls,
    }
    whole = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "finish_reason": "tool_calls",
            }
        ]
    }
    for body in (streamed, whole):
        ((record, _),) = _recorder().records_for(
            CHAT, status_code=200, body=body, started=1.0, latency_s=0.6
        )
        assert (record.response, record.finish_reason) == (shown, "tool_calls")
        assert record.blank_response is False and record.response_chars == len(shown)
        assert not is_format_failure(record)


def test_the_baseline_keeps_the_evaluations_per_item_samples(monkeypatch) -> None:
    import mlflow
    import pandas as pd

    from tasks.evaluation import EvalSummary

    table = pd.DataFrame(
        {
            "error": [None, None, "HTTP 500"],
            "latency_s": [2.0, 3.0, 1.0],
            "prompt_tokens": pd.array([10, 12, 9], dtype="Int64"),
            "completion_tokens": pd.array([4, 0, None], dtype="Int64"),
        }
    )
    monkeypatch.setattr("tasks.monitoring.configure_tracking", lambda: "0")
    monkeypatch.setattr(mlflow, "load_table", lambda *a, **kw: table)
    summary = EvalSummary.model_construct(run_id="run", eval_set="smoke", eval_set_hash="h")
    baseline = baseline_from_evaluation(summary)
    assert baseline.samples == {
        "prompt_tokens": [10.0, 12.0],  # answered items only
        "completion_tokens": [4.0, 0.0],
        "seconds_per_token": [0.5],  # only where tokens were generated
    }
    assert baseline.median_completion_tokens == 2.0


@pytest.mark.slow  # great-expectations takes seconds to import
def test_drift_statistics_are_validated_by_the_suite_and_shown_in_its_docs(tmp_path) -> None:
    from phi3ops.settings import get_settings

    base = dict(timestamp=1.0, model_name="m", model_version="1", response="r")
    records = [
        InferenceRecord(**base, latency_s=1.0, prompt_tokens=20 + i % 5, completion_tokens=10)
        for i in range(30)
    ]
    frame = records_frame(records)
    same = Baseline(
        "run",
        "smoke",
        "h",
        30,
        median_completion_tokens=10.0,
        median_seconds_per_token=0.1,
        samples=window_sample(frame),
    )
    longer = dataclasses.replace(same, samples={**same.samples, "completion_tokens": [40.0] * 30})
    thresholds = get_settings().monitor
    results = {}
    for name, baseline in (("same", same), ("longer", longer)):
        statistics = drift_statistics(baseline.samples, window_sample(frame), thresholds)
        checks, validation = validate(
            with_statistics(frame, statistics),
            statistic_expectations(statistics),
            docs_dir=tmp_path / name,
        )
        json.dumps(validation)  # the results artifact must serialise
        results[name] = {check.name: check for check in checks}
    assert len(results["same"]) == 5 and all(c.success for c in results["same"].values())
    assert results["same"]["drift-psi-completion-tokens"].observed == "observed 0"
    broken = {name for name, check in results["longer"].items() if not check.success}
    assert broken == {"drift-psi-completion-tokens", "drift-ks-completion-tokens"}
    docs = "".join(p.read_text() for p in (tmp_path / "longer").rglob("*.html"))
    assert "drift-psi-completion-tokens" in docs
