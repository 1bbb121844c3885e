"""Stage 5: real inference traces of the tiny Phi-3 (both flavors) through the served app, then
the monitor flow: healthy traffic passes, each kind of bad traffic breaks its expectation.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phi3ops.errors import MonitoringFailedError
from tests.artifacts import latest_artifact_data

NAME = "phi3-monitored"
SMOKE = "smoke"
# The tiny Phi-3 has random weights: it never emits its end token, so every answer is cut off
# by max_tokens. Healthy traffic for it allows that; one test keeps the real default.
TINY_THRESHOLDS = {"max_length_finish_rate": 1.0, "min_records": 6, "max_latency_p95_s": 30}
# PSI and KS of the window against the evaluation's per-item sample; the smoke set's 6 items
# are fewer than their default minimum sample, so they run only where a test lowers it.
STATISTICS = {
    "drift-psi-prompt-tokens",
    "drift-psi-completion-tokens",
    "drift-ks-prompt-tokens",
    "drift-ks-completion-tokens",
    "drift-ks-seconds-per-token",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_phi3) -> Iterator[dict]:
    """Both flavors registered as versions of NAME (1: ONNX, 2: transformers), each evaluated
    on the smoke set (the drift baseline), ONNX as @champion; plus an app per flavor.
    """
    from mlflow import MlflowClient
    from starlette.testclient import TestClient

    from offline.packaged import register_both_flavors
    from phi3ops.serving.app import build_app, recorder_for
    from phi3ops.serving.server import download_model
    from phi3ops.settings import get_settings
    from tasks.evaluation import evaluate_model

    data_dir = tmp_path_factory.mktemp("monitoring-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", str(data_dir))
        mp.setenv("PHI3OPS_EVAL_TTFT_SAMPLES", "0")
        get_settings.cache_clear()
        registered = register_both_flavors(tiny_phi3, model_name=NAME)
        versions = {flavor: r.version for flavor, r in registered.items()}
        for version in versions.values():
            evaluate_model(f"models:/{NAME}/{version}", SMOKE)
        MlflowClient().set_registered_model_alias(NAME, "champion", versions["onnx"])
        clients, recorders = {}, {}
        for flavor, version in versions.items():
            path = download_model(f"models:/{NAME}/{version}", data_dir / f"served-{flavor}")
            recorders[flavor] = recorder_for(path, model_name=NAME, model_version=version)
            clients[flavor] = TestClient(build_app(path, recorder=recorders[flavor]))
        _STORE["recorders"] = recorders
        yield {
            "data_dir": data_dir,
            "versions": versions,
            "clients": clients,
            "recorders": recorders,
        }
        for recorder in recorders.values():
            recorder.close()
    get_settings.cache_clear()


@pytest.fixture
def monitored(store, monkeypatch) -> Iterator[dict]:
    """The module's store, with no inference records yet; emitted events are collected."""
    import mlflow

    import flows.monitor
    from phi3ops.settings import get_settings
    from phi3ops.tracking import configure_tracking

    monkeypatch.setenv("PHI3OPS_DATA_DIR", str(store["data_dir"]))
    get_settings.cache_clear()
    experiment_id = configure_tracking(get_settings().inference_experiment_name)
    mlflow.MlflowClient().delete_traces(experiment_id, max_timestamp_millis=int(time.time() * 1e3))
    events: list[tuple[str, str, dict]] = []
    monkeypatch.setattr(
        flows.monitor,
        "emit",
        lambda e, *, model_name, version, payload: events.append((e, version, payload)),
    )
    return {**store, "events": events, "experiment_id": experiment_id}


def _smoke_requests() -> list[dict]:
    from phi3ops.evalset import load_eval_set, resolve_eval_set

    requests = []
    for item in load_eval_set(resolve_eval_set(SMOKE)).items:
        messages = (
            [m.model_dump() for m in item.messages]
            if item.messages
            else [{"role": "user", "content": item.prompt}]
        )
        requests.append({"messages": messages, "max_tokens": item.max_tokens or 128})
    return requests


def _send(client, bodies: list[dict], *, expect: int = 200) -> list:
    responses = [client.post("/invocations", json=body) for body in bodies]
    for response in responses:
        assert response.status_code == expect, response.text
    _stored()
    return responses


def _stored() -> None:
    """Wait until the apps' spools have stored every record (the monitor reads the store)."""
    for recorder in _STORE["recorders"].values():
        assert recorder.flush(timeout=30)


_STORE: dict = {}


def _monitor(version: str, **thresholds):
    from flows.monitor import monitor_flow

    return monitor_flow(
        model_name=NAME,
        alias=version,
        window_minutes=10,
        baseline_eval_set=SMOKE,
        thresholds={**TINY_THRESHOLDS, **thresholds},
    )


def _records(version: str):
    from tasks.monitoring import load_records

    now = time.time()
    return load_records(NAME, version, start=now - 600, end=now + 1)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("flavor", ["onnx", "transformers"])
def test_healthy_traffic_passes_and_is_recorded(monitored, flavor) -> None:
    import mlflow

    client, version = monitored["clients"][flavor], monitored["versions"][flavor]
    _send(client, _smoke_requests() * 2)
    records = _records(version)
    assert len(records) == 12
    record = records[0]
    assert (record.model_name, record.model_version, record.status_code) == (NAME, version, 200)
    assert record.response_chars > 0 and record.finish_reason == "length"
    assert record.prompt_tokens > 0 and record.completion_tokens > 0
    assert record.context_tokens and record.latency_s > 0
    # Neither prompts nor answers are stored unless PHI3OPS_RECORD_PROMPTS is on.
    assert record.prompt is None and record.response is None

    report = _monitor(version)
    assert report.outcome == "passed", report.summary()
    assert {c.name for c in report.checks} >= {
        "responses-not-empty",
        "no-template-tokens",
        "response-length",
        "length-finish-rate",
        "latency-p95-slo",
        "error-rate",
        "prompt-within-context",
        "drift-completion-tokens",
        "drift-seconds-per-token",
        *STATISTICS,
    }
    assert all(check.success for check in report.checks if check.name not in STATISTICS)
    statistics = [check for check in report.checks if check.name in STATISTICS]
    assert all(c.success is None and "too few" in c.observed for c in statistics)
    run = mlflow.get_run(report.run_id)
    assert run.data.tags["phi3ops.monitor.outcome"] == "passed"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(report.run_id)}
    assert {"validation_result.json", "data_docs", "monitor_report.json"} <= artifacts
    docs = Path(
        mlflow.artifacts.download_artifacts(run_id=report.run_id, artifact_path="data_docs")
    )
    assert (docs / "index.html").is_file()
    validation = mlflow.artifacts.load_dict(f"runs:/{report.run_id}/validation_result.json")
    assert validation["success"] is True and len(validation["results"]) == 9
    tags = mlflow.MlflowClient().get_model_version(NAME, version).tags
    assert tags["phi3ops.monitor.last_run_id"] == report.run_id
    assert monitored["events"] == [
        ("phi3ops.monitoring.passed", version, monitored["events"][0][2])
    ]
    assert monitored["events"][0][2]["records"] == 12
    table = json.loads(latest_artifact_data("monitor-phi3-monitored"))
    assert [row["result"] for row in table] == ["pass"] * 9 + ["not run"] * 5
    assert {row["expectation"] for row in table} == {c.name for c in report.checks}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_too_few_records_is_its_own_outcome(monitored) -> None:
    from flows.monitor import monitor_flow

    version = monitored["versions"]["onnx"]
    _send(monitored["clients"]["onnx"], _smoke_requests()[:2])
    state = monitor_flow(
        model_name=NAME, window_minutes=10, thresholds=TINY_THRESHOLDS, return_state=True
    )
    assert state.is_completed() and state.name == "InsufficientData"
    report = state.result()
    assert report.outcome == "insufficient_data" and report.records == 2
    assert "at least 6" in report.summary()
    assert [e[0] for e in monitored["events"]] == ["phi3ops.monitoring.insufficient-data"]
    assert version == monitored["events"][0][1]  # the champion's version


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_answers_cut_off_by_max_tokens_break_the_default_bound(monitored) -> None:
    version = monitored["versions"]["onnx"]
    _send(monitored["clients"]["onnx"], _smoke_requests())
    with pytest.raises(MonitoringFailedError, match="length-finish-rate"):
        _monitor(version, max_length_finish_rate=0.2)
    assert [e[0] for e in monitored["events"]] == ["phi3ops.monitoring.failed"]
    assert monitored["events"][0][2]["broken"] == ["length-finish-rate"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_server_errors_break_the_error_rate_refused_inputs_do_not(monitored) -> None:
    client, version = monitored["clients"]["onnx"], monitored["versions"]["onnx"]
    _send(client, _smoke_requests())
    bad = {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 8}
    _send(client, [bad] * 3, expect=400)
    refused = [r for r in _records(version) if r.error is not None]
    assert [r.outcome for r in refused] == ["refused"] * 3
    # Anyone can send bad input: it must not break the error budget (nor roll back).
    assert _monitor(version).outcome == "passed"
    for record in refused:  # a server that fails these requests instead
        monitored["recorders"]["onnx"].record(
            dataclasses.replace(record, status_code=500, outcome="error", error="HTTP 500")
        )
    _stored()
    with pytest.raises(MonitoringFailedError, match="error-rate") as failure:
        _monitor(version)
    assert "length" not in str(failure.value)
    assert monitored["events"][-1][2]["broken"] == ["error-rate"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_shorter_answers_than_the_evaluation_are_drift(monitored) -> None:
    client, version = monitored["clients"]["onnx"], monitored["versions"]["onnx"]
    _send(client, [{**body, "max_tokens": 2} for body in _smoke_requests()])
    with pytest.raises(MonitoringFailedError, match="drift-completion-tokens"):
        _monitor(version)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_shorter_answers_shift_the_distribution_psi_and_ks_drift(monitored) -> None:
    client, version = monitored["clients"]["onnx"], monitored["versions"]["onnx"]
    _send(client, [{**body, "max_tokens": 2} for body in _smoke_requests()])
    with pytest.raises(MonitoringFailedError, match="drift-psi-completion-tokens"):
        _monitor(version, min_drift_samples=6)
    broken = set(monitored["events"][0][2]["broken"])
    assert {"drift-psi-completion-tokens", "drift-ks-completion-tokens"} <= broken
    # The same prompts as the evaluation's: their lengths did not drift.
    assert not broken & {"drift-psi-prompt-tokens", "drift-ks-prompt-tokens"}


def _bad_record(record, kind: str):
    changes = {
        "empty": {"response": "  "},
        "template-tokens": {"response": "Paris.<|end|><|assistant|>"},
        "slow": {"latency_s": 120.0},
        "over-context": {"prompt_tokens": (record.context_tokens or 0) + 5},
    }[kind]
    return dataclasses.replace(record, **changes)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    ("kind", "broken"),
    [
        ("empty", ["responses-not-empty"]),
        ("template-tokens", ["no-template-tokens"]),
        # 120 s for the same answers is also far more seconds per token than when evaluated.
        ("slow", ["latency-p95-slo", "drift-seconds-per-token"]),
        ("over-context", ["prompt-within-context"]),
    ],
)
def test_injected_bad_answers_break_their_expectation(monitored, kind, broken) -> None:
    """Answers a healthy tiny model cannot produce, written through the serving recorder."""
    client, version = monitored["clients"]["onnx"], monitored["versions"]["onnx"]
    _send(client, _smoke_requests())
    for record in _records(version):
        monitored["recorders"]["onnx"].record(_bad_record(record, kind))
    _stored()
    with pytest.raises(MonitoringFailedError, match=broken[0]):
        _monitor(version)
    assert monitored["events"][0][2]["broken"] == broken


@pytest.mark.slow
def test_streamed_answers_are_server_sent_events_recorded_with_time_to_first_token(
    monitored,
) -> None:
    body = {**_smoke_requests()[0], "stream": True}
    response = monitored["clients"]["onnx"].post("/invocations", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)

    refused = monitored["clients"]["transformers"].post("/invocations", json=body)
    assert refused.status_code == 400 and "cannot stream" in refused.json()["message"]

    _stored()
    (record,) = _records(monitored["versions"]["onnx"])
    assert (
        record.response_chars == len(text)
        and record.finish_reason == chunks[-1]["choices"][0]["finish_reason"]
    )
    assert record.completion_tokens == chunks[-1]["usage"]["completion_tokens"]
    assert 0 < record.ttft_s <= record.latency_s
    (refusal,) = _records(monitored["versions"]["transformers"])
    assert refusal.status_code == 400 and "cannot stream" in refusal.error
    bad = {"messages": [{"role": "wizard", "content": "hi"}], "stream": True}
    invalid = monitored["clients"]["onnx"].post("/invocations", json=bad)
    assert invalid.status_code == 400 and "wizard" in invalid.json()["message"]
