"""`phi3ops monitor`: bad options fail before Prefect starts, outcomes map to exit codes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.app import app
from tasks.monitoring import MonitorReport


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--threshold", "max_error_rate"], "key=number"),
        (["--threshold", "max_eror_rate=0.1"], "max_eror_rate"),
        (["--window-minutes", "0"], "positive"),
        (["--baseline-eval-set", "no-such-set"], "no-such-set"),
    ],
)
def test_bad_options_exit_2_before_any_flow_runs(args, words, monkeypatch) -> None:
    from cli import jobs

    monkeypatch.setattr(jobs, "monitor_flow", lambda **_: pytest.fail("flow ran"))
    result = CliRunner().invoke(app, ["monitor", *args])
    assert result.exit_code == 2, result.output
    assert words in result.output


@pytest.mark.parametrize(("outcome", "code"), [("passed", 0), ("insufficient_data", 3)])
def test_outcome_sets_the_exit_code(outcome, code, monkeypatch) -> None:
    import flows.monitor
    from cli import jobs

    seen = {}

    def fake_flow(**kwargs):
        flows.monitor.monitor_flow.validate_parameters(kwargs)  # the real flow accepts them
        seen.update(kwargs)
        return MonitorReport("m", "1", "a", "b", records=0, outcome=outcome)

    monkeypatch.setattr(jobs, "monitor_flow", fake_flow)
    result = CliRunner().invoke(app, ["monitor", "--threshold", "min_records=5"])
    assert result.exit_code == code, result.output
    # The job hands the flow the checked overrides, typed like the deployment's parameter.
    assert seen["thresholds"].min_records == 5 and seen["alias"] == "champion"
