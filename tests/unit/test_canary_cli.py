"""`phi3ops canary start|status|stop|verdict` against a SQLite registry of weightless versions:
checked inputs, one-line errors, the plan written and cleared, exit codes of the verdict.
"""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from cli.app import app
from phi3ops.traffic import TrafficMode, read_plan
from tasks.canary import CanaryReport

NAME = "phi3-cli-canary"


@pytest.fixture
def registry(isolated_settings):
    """Versions 1 and 2 of NAME, without aliases."""
    from mlflow import MlflowClient

    from phi3ops.tracking import configure_tracking

    configure_tracking()
    client = MlflowClient()
    client.create_registered_model(NAME)
    for _ in range(2):
        client.create_model_version(NAME, source=str(isolated_settings / "weights"))
    return client


EVAL_HASH = "ab12cd34ef56" + "0" * 52


def _gate(client, version: str = "2", *, champion: str = "1", **tags: str) -> None:
    """Tags ``version`` as `promote --live-traffic` does once it passed every gate against
    ``champion`` on EVAL_HASH, and ``champion`` with its evaluation on that eval set.
    """
    values = {
        "phi3ops.promotion.decision": "live-traffic",
        "phi3ops.promotion.champion_before": champion,
        "phi3ops.promotion.eval_set_hash": EVAL_HASH,
        "phi3ops.promotion.at": "2026-01-01T00:00:00+00:00",
        **tags,
    }
    for key, value in values.items():
        client.set_model_version_tag(NAME, version, key, value)
    client.set_model_version_tag(NAME, champion, f"phi3ops.eval.{EVAL_HASH[:12]}", "run-1")


def _canary(*args: str):
    return CliRunner().invoke(app, ["canary", *args, "--model-name", NAME])


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    # A fresh store logs its creation (MLflow's own INFO lines); the rest is one line.
    lines = [line for line in result.output.splitlines() if line.strip() and "INFO" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_start_needs_a_champion_and_a_different_candidate(registry) -> None:
    assert "has no @champion" in _one_line_error(_canary("start"))
    registry.set_registered_model_alias(NAME, "champion", "1")
    assert "no @candidate other than @champion" in _one_line_error(_canary("start"))
    registry.set_registered_model_alias(NAME, "candidate", "1")
    assert "no @candidate other than @champion (v1)" in _one_line_error(_canary("start"))
    assert read_plan(NAME) is None


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--share", "1.5"], "between 0 and 1"),
        (["--mode", "shadow", "--share", "0.2"], "canary mode only"),
    ],
)
def test_start_refuses_a_share_that_does_not_fit(registry, args, words) -> None:
    registry.set_registered_model_alias(NAME, "champion", "1")
    registry.set_registered_model_alias(NAME, "candidate", "2")
    assert words in _one_line_error(_canary("start", *args))
    assert read_plan(NAME) is None


def test_start_status_stop(registry) -> None:
    import mlflow

    from phi3ops.serving.records import InferenceRecord, InferenceRecorder, write_entries
    from phi3ops.settings import get_settings
    from phi3ops.tracking import configure_tracking

    registry.set_registered_model_alias(NAME, "champion", "1")
    registry.set_registered_model_alias(NAME, "candidate", "2")
    _gate(registry)
    assert "No canary on" in _canary("status").output

    started = _canary("start", "--share", "0.25")
    assert started.exit_code == 0, started.output
    assert "Canary started: @candidate (v2) now answers 25% of" in started.output
    assert "v2 is pinned" in started.output and "WARNING" not in started.output
    plan = read_plan(NAME)
    assert (plan.mode, plan.share, plan.candidate_version) == (TrafficMode.CANARY, 0.25, "2")
    assert (plan.champion_version, plan.eval_set_hash) == ("1", EVAL_HASH)

    experiment_id = configure_tracking(get_settings().inference_experiment_name)
    entries = []
    for version, arm, outcome in [("2", "candidate", "served"), ("2", "candidate", "cancelled")]:
        recorder = InferenceRecorder(
            model_name=NAME, model_version=version, experiment_id=experiment_id
        )
        record = InferenceRecord(
            timestamp=time.time(),
            model_name=NAME,
            model_version=version,
            latency_s=0.5,
            response="hi",
            outcome=outcome,
            arm=arm,
        )
        entries.append(recorder.entry(record))
    write_entries(entries, tracking_uri=mlflow.get_tracking_uri())

    status = _canary("status")
    assert status.exit_code == 0, status.output
    assert f"Canary on {NAME} since" in status.output and "share 25%" in status.output
    assert "candidate v2: 1 records judged" in status.output and "1 cancelled" in status.output
    assert "champion v1: 0 records judged" in status.output
    assert "no verdict on v2 yet" in status.output

    shadow = _canary("start", "--mode", "shadow")
    assert shadow.exit_code == 0, shadow.output
    assert shadow.output.startswith("Replaced the canary started")
    assert "gets a copy in the background" in shadow.output

    stopped = _canary("stop")
    assert stopped.exit_code == 0 and "Stopped the shadow" in stopped.output
    assert read_plan(NAME) is None
    again = _canary("stop")
    assert again.exit_code == 0 and "nothing to stop" in again.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--threshold", "min_samples"], "key=number"),
        (["--threshold", "min_sample=10"], "min_sample"),
        (["--threshold", "alpha=0.9"], "alpha"),
        (["--gate", "min_pass_rate=2"], "min_pass_rate"),
        (["--eval-set", "no-such-set"], "no-such-set"),
    ],
)
def test_verdict_bad_options_exit_2_before_the_flow_runs(args, words, monkeypatch) -> None:
    import flows.canary

    monkeypatch.setattr(flows.canary, "canary_flow", lambda **_: pytest.fail("flow ran"))
    assert words in _one_line_error(_canary("verdict", *args))


@pytest.mark.parametrize(
    ("outcome", "code"), [("promoted", 0), ("no-canary", 0), ("wait", 3), ("aborted", 4)]
)
def test_verdict_outcome_sets_the_exit_code(outcome, code, monkeypatch) -> None:
    import flows.canary

    seen = {}
    real = flows.canary.canary_flow

    def fake_flow(**kwargs):
        real.validate_parameters(kwargs)  # the real flow accepts them
        seen.update(kwargs)
        return CanaryReport(model_name=NAME, outcome=outcome)

    monkeypatch.setattr(flows.canary, "canary_flow", fake_flow)
    result = _canary("verdict", "--threshold", "min_samples=50")
    assert result.exit_code == code, result.output
    assert seen["thresholds"].min_samples == 50 and seen["model_name"] == NAME


def test_start_refuses_a_candidate_that_never_passed_the_gates(registry) -> None:
    """A hand-registered, never-evaluated version takes no live traffic; nor does one gated
    against another champion, on an eval set the champion has no evaluation on, or aborted
    by a canary verdict since.
    """
    registry.set_registered_model_alias(NAME, "champion", "1")
    registry.set_registered_model_alias(NAME, "candidate", "2")
    error = _one_line_error(_canary("start"))
    assert "v2 of phi3-cli-canary cannot take live traffic" in error
    assert "never gated" in error
    assert f"phi3ops evaluate --model-uri models:/{NAME}/2" in error
    assert "phi3ops promote --candidate 2 --live-traffic canary" in error
    registry.set_model_version_tag(NAME, "2", "phi3ops.promotion.decision", "rejected")
    assert "'rejected', not a pass of every gate" in _one_line_error(_canary("start"))
    _gate(registry)
    registry.set_model_version_tag(NAME, "2", "phi3ops.promotion.champion_before", "3")
    assert "compared it with v3, not with v1" in _one_line_error(_canary("start"))
    _gate(registry)
    registry.delete_model_version_tag(NAME, "1", f"phi3ops.eval.{EVAL_HASH[:12]}")
    assert "@champion has no evaluation on" in _one_line_error(_canary("start"))
    _gate(registry)
    registry.set_model_version_tag(NAME, "2", "phi3ops.canary.verdict", "aborted")
    registry.set_model_version_tag(NAME, "2", "phi3ops.canary.at", "2026-02-01T00:00:00+00:00")
    assert "canary verdict aborted it" in _one_line_error(_canary("start", "--mode", "shadow"))
    assert read_plan(NAME) is None
    _gate(registry, **{"phi3ops.promotion.at": "2026-03-01T00:00:00+00:00"})  # gated again
    assert _canary("start").exit_code == 0 and read_plan(NAME).candidate_version == "2"


def test_a_plan_pins_its_candidate_and_says_when_streams_stay_with_the_champion(
    registry,
) -> None:
    registry.set_registered_model_alias(NAME, "champion", "1")
    registry.set_registered_model_alias(NAME, "candidate", "2")
    registry.set_model_version_tag(NAME, "1", "phi3ops.flavor", "onnx")
    registry.set_model_version_tag(NAME, "2", "phi3ops.flavor", "transformers")
    _gate(registry)
    started = _canary("start", "--share", "0.5")
    assert started.exit_code == 0, started.output
    assert "WARNING: v2 cannot stream (transformers flavor)" in started.output
    assert read_plan(NAME).streams_to_champion
    registry.create_model_version(NAME, source="nowhere")  # v3: registered, never gated
    registry.set_registered_model_alias(NAME, "candidate", "3")
    status = _canary("status")
    assert "v2 (pinned) beside @champion v1" in status.output
    assert "@candidate is v3 now; v3 takes no traffic" in status.output
    assert "streamed requests stay with @champion" in status.output
    assert read_plan(NAME).candidate_version == "2"
