"""Recording a verdict: an MLflow run, the candidate version's tags, the reviewer's markdown."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from phi3ops import registry
from phi3ops.names import CANARY_TAG_PREFIX, RUN_TYPE_TAG
from phi3ops.tracking import configure_tracking
from tasks.canary.compare import fmt_value
from tasks.canary.judge import CanaryReport


def record_verdict(
    report: CanaryReport, artifacts: dict[str, tuple[dict[str, Any], Path]], *, triggered_by: str
) -> str:
    """An MLflow run of the verdict (tags, per-arm metrics, p-values, report, each arm's
    validation and Data Docs), and the verdict tags on the candidate version; returns the run id.
    """
    import mlflow

    configure_tracking()
    name, version = report.model_name, report.candidate_version or ""
    with mlflow.start_run(run_name=f"canary {name} v{version}") as run:
        mlflow.set_tags(
            {
                RUN_TYPE_TAG: "canary",
                f"{CANARY_TAG_PREFIX}model_name": name,
                f"{CANARY_TAG_PREFIX}candidate": version,
                f"{CANARY_TAG_PREFIX}champion": report.champion_version or "",
                f"{CANARY_TAG_PREFIX}verdict": report.outcome,
                f"{CANARY_TAG_PREFIX}mode": report.mode or "",
                f"{CANARY_TAG_PREFIX}plan_id": report.plan_id or "",
            }
        )
        mlflow.log_params(
            {
                "window_start": report.window_start,
                "window_end": report.window_end,
                "triggered_by": triggered_by,
            }
        )
        mlflow.log_metrics(verdict_metrics(report))
        mlflow.log_dict(report.payload(), "canary_report.json")
        mlflow.log_text(verdict_markdown(report), "canary.md")
        for arm, (validation, docs_dir) in artifacts.items():
            mlflow.log_dict(validation, f"validation_{arm}.json")
            mlflow.log_artifacts(str(docs_dir), f"data_docs/{arm}")
        run_id = run.info.run_id
    report.run_id = run_id
    tags = {
        "verdict": report.outcome,
        # MLflow caps tag values at 5000 characters.
        "reason": json.dumps(report.reasons)[:4900],
        "at": _iso(time.time()),
        "run_id": run_id,
        "plan_id": report.plan_id or "",
        "mode": report.mode or "",
        "champion": report.champion_version or "",
        "triggered_by": triggered_by[:4900],
    }
    client = registry.client()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, f"{CANARY_TAG_PREFIX}{key}", value)
    return str(run_id)


def verdict_metrics(report: CanaryReport) -> dict[str, float]:
    """Per-arm counts and rates, and each test's p-value (absent values left out)."""
    metrics: dict[str, float | None] = {}
    for sample in (report.candidate, report.champion):
        if sample is None:
            continue
        for key in (
            "records",
            "judged",
            "errors",
            "served",
            "format_failures",
            "refused",
            "cancelled",
            "shed_shadow",
        ):
            metrics[f"{sample.arm}_{key}"] = getattr(sample, key)
        metrics[f"{sample.arm}_error_rate"] = sample.error_rate
        metrics[f"{sample.arm}_format_failure_rate"] = sample.format_failure_rate
    for test in report.tests:
        metrics[f"p_{test.name.replace('-', '_')}"] = test.p_value
    return {key: float(value) for key, value in metrics.items() if value is not None}


def verdict_markdown(report: CanaryReport) -> str:
    """A reviewer's summary of the verdict (the Prefect artifact and the run's ``canary.md``)."""
    lines = [f"# {report.summary()}", ""]
    if report.outcome == "no-canary":
        return "\n".join(lines)
    lines += [
        f"- plan {report.plan_id} ({report.mode}), started {report.since}",
        f"- window {report.window_start} to {report.window_end}",
        "",
        "| arm | version | records | judged | server errors | refused | cancelled | shed shadow "
        "| format failures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in (report.candidate, report.champion):
        if s is not None:
            lines.append(
                f"| {s.arm} | {s.version} | {s.records} | {s.judged} | {s.errors} | {s.refused} "
                f"| {s.cancelled} | {s.shed_shadow} | {s.format_failures}/{s.served} |"
            )
    if report.tests:
        lines += ["", "| test | candidate | champion | p-value | worse |", "|---|---|---|---|---|"]
        for t in report.tests:
            p = "-" if t.p_value is None else f"{t.p_value:.3g}"
            worse = "YES" if t.worse else "no"
            lines.append(
                f"| {t.name} ({t.test}) | {fmt_value(t.candidate)} | {fmt_value(t.champion)} "
                f"| {p} | {worse} |"
            )
    for arm, checks in report.suites.items():
        broken = [c.name for c in checks if c.success is False]
        said = f"broken: {', '.join(broken)}" if broken else "every expectation passed"
        lines.append(f"\n- {arm} suite: {said}")
    lines += ["", "Reasons:", *[f"- {r}" for r in report.reasons]]
    return "\n".join(lines) + "\n"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


# --- Prefect task --------------------------------------------------------------------------------


@task(name="record-canary-verdict", cache_policy=NO_CACHE)
def record_verdict_task(
    report: CanaryReport, artifacts: dict[str, tuple[dict[str, Any], Path]], *, triggered_by: str
) -> str:
    """Prefect wrapper of `record_verdict`."""
    return record_verdict(report, artifacts, triggered_by=triggered_by)
