"""Stage 5 — monitor: the champion's recent inference traces against the expectation suite.

Resolve the version the alias points at → read its records in the window → validate them
(too few records is its own outcome) → record (MLflow run + Data Docs, Prefect table) → emit
``phi3ops.monitoring.passed`` / ``failed`` / ``insufficient-data`` → fail the flow run, naming
the broken expectations, when the suite failed.
"""

from __future__ import annotations

import shutil
from typing import Annotated

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.states import Completed
from pydantic import Field

from phi3ops.errors import MonitoringFailedError
from phi3ops.names import (
    CHAMPION_ALIAS,
    MONITORING_FAILED_EVENT,
    MONITORING_INSUFFICIENT_DATA_EVENT,
    MONITORING_PASSED_EVENT,
    artifact_key,
)
from phi3ops.policies import ThresholdOverrides
from phi3ops.registry import resolve_model_name, resolve_version
from phi3ops.settings import get_settings
from tasks.events import emit
from tasks.monitoring import (
    checks_table,
    find_baseline_task,
    record_outcome_task,
    run_monitor_task,
    window_bounds,
)

_EVENTS = {
    "passed": MONITORING_PASSED_EVENT,
    "failed": MONITORING_FAILED_EVENT,
    "insufficient_data": MONITORING_INSUFFICIENT_DATA_EVENT,
}


@flow(name="monitor", log_prints=True)
def monitor_flow(
    model_name: str | None = None,
    alias: str = CHAMPION_ALIAS,
    window_minutes: Annotated[int | None, Field(ge=1)] = None,
    baseline_eval_set: str | None = None,
    thresholds: ThresholdOverrides | None = None,
):
    """Check the version behind ``alias`` on its inference records of the last window.

    Args:
        model_name: Registered model; defaults to ``PHI3OPS_REGISTERED_MODEL_NAME``.
        alias: Alias (or version number) of the version to check.
        window_minutes: How far back to read; defaults to ``PHI3OPS_MONITOR_WINDOW_MINUTES``.
        baseline_eval_set: Eval set whose evaluation of the version is the drift baseline;
            the default set when None.
        thresholds: Overrides of ``PHI3OPS_MONITOR_*``, e.g. ``{"max_error_rate": 0.01}``.

    Returns:
        The report; a failed suite fails the flow run (`MonitoringFailedError`), and too few
        records ends it in a Completed state named ``InsufficientData`` (calling the flow still
        returns the report: Prefect hands back a returned state's data).
    """
    name = resolve_model_name(model_name)
    limits = get_settings().monitor.with_overrides(thresholds)
    start, end = window_bounds(window_minutes)
    version = resolve_version(name, alias)

    baseline = find_baseline_task(name, version, baseline_eval_set)
    report, validation, docs_dir = run_monitor_task(
        name, version, start=start, end=end, thresholds=limits, baseline=baseline
    )
    try:
        record_outcome_task(report, validation, docs_dir)
    finally:
        if docs_dir is not None:
            shutil.rmtree(docs_dir, ignore_errors=True)
    if report.checks:
        create_table_artifact(
            table=checks_table(report),
            key=artifact_key("monitor", name),
            description=f"Monitoring of {name} v{version}: {report.outcome}",
        )
    emit(
        _EVENTS[report.outcome],
        model_name=name,
        version=version,
        payload={
            "alias": alias,
            "outcome": report.outcome,
            "records": report.records,
            "broken": [check.name for check in report.broken],
            "window_start": report.window_start,
            "window_end": report.window_end,
            "mlflow_run_id": report.run_id,
        },
    )
    print(report.summary())
    if report.outcome == "failed":
        raise MonitoringFailedError(report.summary())
    if report.outcome == "insufficient_data":
        return Completed(name="InsufficientData", message=report.summary(), data=report)
    return report
