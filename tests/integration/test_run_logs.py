"""The project's own loggers reach the Prefect run logs (the UI), not only the terminal."""

from __future__ import annotations

import time

import pytest

from tests.artifacts import run_logs


@pytest.mark.usefixtures("prefect_harness")
def test_project_info_lines_are_in_the_flow_runs_logs() -> None:
    import mlflow
    from prefect import flow, task
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    import flows  # noqa: F401 - what every flow entrypoint imports: it routes the loggers
    from phi3ops.tracking import configure_tracking
    from tasks.recovery import discard_logged_model

    configure_tracking()  # this test's store and experiment (an earlier test set another)
    model_id = mlflow.initialize_logged_model(name="routed").model_id

    @task
    def discard_in_a_task(model_id: str) -> None:
        discard_logged_model(model_id)

    @flow
    def discard(model_id: str) -> None:
        discard_in_a_task(model_id)  # INFO "Discarded the logged model ..." (tasks.recovery)
        discard_logged_model("m-no-such-model")  # WARNING from the flow itself

    # tests/conftest.py turns run logs off for the whole session; this test is about them.
    with temporary_settings({PREFECT_LOGGING_TO_API_ENABLED: True}):
        state = discard(model_id, return_state=True)
        flow_run_id = state.state_details.flow_run_id
        assert flow_run_id is not None
        deadline = time.monotonic() + 30
        while True:
            lines = run_logs(flow_run_id)
            if any("Could not discard" in line for line in lines) or time.monotonic() > deadline:
                break
            time.sleep(0.5)

    info = f"tasks.recovery INFO Discarded the logged model {model_id} and its artifacts"
    assert info in lines, lines
    assert any(
        line.startswith("tasks.recovery WARNING Could not discard the logged model m-no-such")
        for line in lines
    ), lines
