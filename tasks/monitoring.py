"""Monitoring: the champion's recent inference records against a great-expectations suite.

`phi3ops serve` records every request row as an MLflow trace (`phi3ops.serving.records`). The
monitor reads one version's records in a time window, validates them with a great-expectations
1.x suite (ephemeral context, pandas), and records the outcome:

* too few records in the window is its own outcome (``insufficient_data``), never a pass;
* validation results (JSON) and Data Docs (HTML) go to an MLflow run linked to the version, each
  expectation's result to a Prefect table artifact, and ``phi3ops.monitoring.passed`` /
  ``failed`` (or ``insufficient-data``) to Prefect's event stream, where automations react.

Drift is measured against the version's evaluation on the baseline eval set (`Baseline`): the
medians within a ratio (``PHI3OPS_MONITOR_MAX_DRIFT_RATIO``), and the whole distributions by PSI
and two-sample KS against its per-item sample (`tasks.drift`; ``PHI3OPS_MONITOR_MAX_PSI``,
``PHI3OPS_MONITOR_MIN_KS_PVALUE``).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE

from phi3ops import registry
from phi3ops.errors import InvalidInputError
from phi3ops.evalset import open_eval_set
from phi3ops.names import MONITOR_TAG_PREFIX, RUN_TYPE_TAG, TABLE_ARTIFACT
from phi3ops.policies import MonitorThresholds
from phi3ops.serving.records import CLIENT_OUTCOMES, InferenceRecord
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking
from tasks.drift import (
    SAMPLE_COLUMNS,
    Statistic,
    drift_statistics,
    statistic_expectations,
    window_sample,
    with_statistics,
)
from tasks.evaluation import EvalSummary, find_evaluation
from tasks.live_records import load_records  # its home since arms; callers import it here too

if TYPE_CHECKING:
    import pandas as pd

SUITE_NAME = "phi3ops-inference-monitor"
RESULTS_ARTIFACT = "validation_result.json"
DOCS_ARTIFACT_DIR = "data_docs"

Outcome = Literal["passed", "failed", "insufficient_data"]


@dataclass(frozen=True)
class Baseline:
    """What the version did in its evaluation, the reference for drift."""

    eval_run_id: str
    eval_set: str
    eval_set_hash: str
    items: int
    median_completion_tokens: float | None
    median_seconds_per_token: float | None
    # The answered items' values per column (`tasks.drift.SAMPLE_COLUMNS`), for PSI and KS.
    samples: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Check:
    """One expectation's result, as the Prefect table and the flow's message show it."""

    name: str
    guards_against: str
    expectation: str
    success: bool | None  # None: not run (its reason is in ``observed``)
    observed: str


@dataclass
class MonitorReport:
    """The outcome of one monitoring run of one model version."""

    model_name: str
    version: str
    window_start: str
    window_end: str
    records: int
    outcome: Outcome
    checks: list[Check] = field(default_factory=list)
    baseline: Baseline | None = None
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def broken(self) -> list[Check]:
        """The expectations that failed (not those that did not run)."""
        return [check for check in self.checks if check.success is False]

    def summary(self) -> str:
        """One line for the log, the CLI and the flow run's failure message."""
        head = f"{self.model_name} v{self.version}, {self.records} records in the window"
        if self.outcome == "insufficient_data":
            return f"{head}: too few to judge. {' '.join(self.notes)}"
        if self.outcome == "failed":
            names = "; ".join(f"{c.name} ({c.observed})" for c in self.broken)
            return f"{head}: monitoring FAILED, broken expectations: {names}"
        return f"{head}: every expectation passed."


# --- reading records ------------------------------------------------------------------------


def window_bounds(window_minutes: int | None, *, end: float | None = None) -> tuple[float, float]:
    """(start, end) in epoch seconds: the last ``window_minutes`` (default from settings)."""
    minutes = (
        window_minutes if window_minutes is not None else get_settings().monitor_window_minutes
    )
    if minutes <= 0:
        raise InvalidInputError(f"window_minutes={minutes}: use a positive number of minutes.")
    end = time.time() if end is None else end
    return end - minutes * 60, end


def records_frame(records: list[InferenceRecord]) -> pd.DataFrame:
    """One row per record, with the derived columns the suite reads."""
    import numpy as np
    import pandas as pd

    columns = list(InferenceRecord.__dataclass_fields__)  # an empty window keeps its columns
    frame = pd.DataFrame([asdict(record) for record in records], columns=columns)
    numeric = ("latency_s", "prompt_tokens", "completion_tokens", "context_tokens", "ttft_s")
    for column in (*numeric, "response_chars", "template_tokens"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in ("response", "error", "finish_reason", "blank_response"):
        frame[column] = frame[column].astype("object").where(frame[column].notna(), None)
    # A refused input or a client that left is not a failure of the server: it must not count
    # against the error budget, or anonymous clients could break it (and roll the champion back).
    frame["error"] = frame["error"].where(~frame["outcome"].isin(CLIENT_OUTCOMES), None)
    tokens = frame["completion_tokens"].where(frame["completion_tokens"] > 0)
    frame["seconds_per_token"] = (frame["latency_s"] / tokens).replace([np.inf], np.nan)
    return frame


# --- the baseline -----------------------------------------------------------------------------


def baseline_from_evaluation(summary: EvalSummary) -> Baseline:
    """Medians and samples of the evaluation's per-item table (answered items only).

    A batched item's latency is its batch's wall time, an upper bound of what one request of
    that length takes alone, so seconds per token is checked only upwards.
    """
    import mlflow

    configure_tracking()
    table = mlflow.load_table(TABLE_ARTIFACT, run_ids=[summary.run_id])
    answered = table[table["error"].isna()] if "error" in table else table
    tokens = answered["completion_tokens"].astype("float64")
    per_token = (answered["latency_s"].astype("float64") / tokens.where(tokens > 0)).dropna()
    columns = {"completion_tokens": tokens, "seconds_per_token": per_token}
    if "prompt_tokens" in answered:  # evaluations logged before it was recorded lack it
        columns["prompt_tokens"] = answered["prompt_tokens"].astype("float64")
    return Baseline(
        eval_run_id=summary.run_id,
        eval_set=summary.eval_set,
        eval_set_hash=summary.eval_set_hash,
        items=len(answered),
        median_completion_tokens=_median(tokens.dropna()),
        median_seconds_per_token=_median(per_token),
        samples={
            c: [float(v) for v in columns[c].dropna()] for c in SAMPLE_COLUMNS if c in columns
        },
    )


def find_baseline(model_name: str, version: str, eval_set: str | None) -> Baseline | None:
    """The version's evaluation on ``eval_set`` (default set) as a baseline; None if never run."""
    content_hash = open_eval_set(eval_set).content_hash
    summary = find_evaluation(model_name, version, content_hash)
    return baseline_from_evaluation(summary) if summary is not None else None


# --- the suite --------------------------------------------------------------------------------


def build_expectations(
    thresholds: MonitorThresholds, baseline: Baseline | None
) -> tuple[list, list[Check]]:
    """The suite's expectations, and a `Check` for each drift check that cannot run.

    Each expectation carries ``meta`` {check, guards_against}; that text is also its comment.
    """
    import great_expectations.expectations as gxe

    t = thresholds
    expectations = []

    def expect(cls: Any, name: str, guards_against: str, **kwargs: Any) -> None:
        meta = {"check": name, "guards_against": guards_against}
        expectations.append(cls(**kwargs, meta=meta, description=f"{name}: {guards_against}"))

    # The answer checks read what the records keep of each answer's text (its length, whether
    # it is blank, its template markers), so they work when the text itself is not recorded.
    # Guards against a model (or a decoding bug) answering nothing at all.
    expect(
        gxe.ExpectColumnValuesToBeInSet,
        "responses-not-empty",
        "empty or whitespace-only answers",
        column="blank_response",
        value_set=[False],
    )
    # Guards against a broken chat template or stop-token handling leaking markers to users.
    expect(
        gxe.ExpectColumnValuesToBeBetween,
        "no-template-tokens",
        "chat-template tokens (<|end|>, <|assistant|>...) leaking into answers",
        column="template_tokens",
        max_value=0,
    )
    # Guards against truncated stubs and runaway generations alike.
    expect(
        gxe.ExpectColumnValuesToBeBetween,
        "response-length",
        f"answers shorter than {t.min_response_chars} or longer than {t.max_response_chars} chars",
        column="response_chars",
        min_value=t.min_response_chars,
        max_value=t.max_response_chars,
    )
    # Guards against answers routinely cut off by max_tokens (too small a budget, or a model
    # that no longer emits its end token).
    expect(
        gxe.ExpectColumnValuesToNotBeInSet,
        "length-finish-rate",
        f"more than {t.max_length_finish_rate:.0%} of answers cut off by max_tokens",
        column="finish_reason",
        value_set=["length"],
        mostly=1 - t.max_length_finish_rate,
    )
    # Guards against breaking a latency SLO the user set: at least 95% of calls within it is
    # p95 <= SLO (calls without the value, e.g. TTFT of unstreamed ones, are skipped). None by
    # default, as for the gates: the model's speed is checked against its own evaluation below.
    for name, column, bound, what in (
        ("ttft-p95-slo", "ttft_s", t.max_ttft_p95_s, "time to first token"),
        ("s-per-token-p95-slo", "seconds_per_token", t.max_s_per_token_p95, "seconds per token"),
        ("latency-p95-slo", "latency_s", t.max_latency_p95_s, "latency"),
    ):
        if bound is not None:
            expect(
                gxe.ExpectColumnValuesToBeBetween,
                name,
                f"p95 {what} above the {bound:g} s SLO",
                column=column,
                max_value=bound,
                mostly=0.95,
            )
    # Guards against failing requests (server errors, shed load) above the error budget.
    expect(
        gxe.ExpectColumnValuesToBeNull,
        "error-rate",
        f"more than {t.max_error_rate:.0%} of requests failing",
        column="error",
        mostly=1 - t.max_error_rate,
    )
    # Guards against prompts the model silently truncates or overruns: the serving guard must
    # refuse any prompt that does not fit the context.
    expect(
        gxe.ExpectColumnPairValuesAToBeGreaterThanB,
        "prompt-within-context",
        "prompts reaching or exceeding the model's context window",
        column_A="context_tokens",
        column_B="prompt_tokens",
        ignore_row_if="either_value_is_missing",
    )
    skipped: list[Check] = []
    r = t.max_drift_ratio
    if baseline is None or baseline.median_completion_tokens is None:
        skipped.append(_not_run("drift-completion-tokens", baseline))
    else:
        b = baseline.median_completion_tokens
        # Guards against answer lengths drifting from what the version did when evaluated
        # (a prompt mix or a model change the evaluation no longer describes).
        expect(
            gxe.ExpectColumnMedianToBeBetween,
            "drift-completion-tokens",
            f"median answer length leaving [{b / r:.1f}, {b * r:.1f}] tokens (evaluation "
            f"median {b:g}, ratio {r:g})",
            column="completion_tokens",
            min_value=b / r,
            max_value=b * r,
        )
    if baseline is None or baseline.median_seconds_per_token is None:
        skipped.append(_not_run("drift-seconds-per-token", baseline))
    else:
        b = baseline.median_seconds_per_token
        # Guards against the model getting slower per generated token than it was when
        # evaluated (a slower host, contention, a regression in the runtime).
        expect(
            gxe.ExpectColumnMedianToBeBetween,
            "drift-seconds-per-token",
            f"median seconds per token above {b * r:.4f} (evaluation median {b:.4f}, ratio {r:g})",
            column="seconds_per_token",
            max_value=b * r,
        )
    return expectations, skipped


def _not_run(name: str, baseline: Baseline | None) -> Check:
    why = (
        "not run: the version has no evaluation on the baseline eval set"
        if baseline is None
        else "not run: the baseline evaluation has no answered items with token counts"
    )
    return Check(
        name=name,
        guards_against="drift from the evaluation baseline",
        expectation="expect_column_median_to_be_between",
        success=None,
        observed=why,
    )


def _statistic_not_run(statistic: Statistic) -> Check:
    return Check(
        name=statistic.check,
        guards_against=statistic.guards_against,
        expectation=statistic.expectation,
        success=None,
        observed=statistic.reason,
    )


def validate(
    frame: pd.DataFrame, expectations: list, *, docs_dir: Path
) -> tuple[list[Check], dict[str, Any]]:
    """Run the suite on ``frame``; Data Docs are written under ``docs_dir``.

    Returns:
        One `Check` per expectation, and the validation result as JSON-ready data.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.add_data_docs_site(
        site_name="phi3ops",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = context.data_sources.add_or_update_pandas("inference-records")
    batch = source.add_dataframe_asset("window").add_batch_definition_whole_dataframe("all")
    suite = context.suites.add_or_update(
        gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)
    )
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name="window", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name="monitor",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data-docs", site_names=["phi3ops"])],
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    (validation,) = result.run_results.values()
    checks = [_check(one) for one in validation.results]
    return checks, validation.to_json_dict()


def _check(result: Any) -> Check:
    config = result.expectation_config
    meta = config.meta or {}
    return Check(
        name=meta.get("check", config.type),
        guards_against=meta.get("guards_against", ""),
        expectation=config.type,
        success=bool(result.success),
        observed=_observed(result.result or {}),
    )


def _observed(result: dict[str, Any]) -> str:
    if "observed_value" in result and result["observed_value"] is not None:
        value = result["observed_value"]
        return f"observed {value:.4g}" if isinstance(value, float) else f"observed {value}"
    if "unexpected_count" in result:
        examples = [str(v)[:40] for v in (result.get("partial_unexpected_list") or [])[:3]]
        text = (
            f"{result['unexpected_count']} of {result.get('element_count', '?')} unexpected "
            f"({result.get('unexpected_percent') or 0:.1f}%)"
        )
        return f"{text}, e.g. {examples}" if examples and result["unexpected_count"] else text
    return "no observation"


# --- the whole check --------------------------------------------------------------------------


def run_monitor(
    model_name: str,
    version: str,
    *,
    start: float,
    end: float,
    thresholds: MonitorThresholds,
    baseline: Baseline | None,
) -> tuple[MonitorReport, dict[str, Any] | None, Path | None]:
    """Read the window and validate it; (report, validation JSON, Data Docs folder)."""
    records = load_records(model_name, version, start=start, end=end)
    report = MonitorReport(
        model_name=model_name,
        version=str(version),
        window_start=_iso(start),
        window_end=_iso(end),
        records=len(records),
        outcome="insufficient_data",
        baseline=baseline,
    )
    if len(records) < thresholds.min_records:
        report.notes.append(
            f"{len(records)} inference record(s) between {report.window_start} and "
            f"{report.window_end}; the suite needs at least {thresholds.min_records} "
            f"(PHI3OPS_MONITOR_MIN_RECORDS). Serve the version with `phi3ops serve` so its "
            f"requests are recorded, or widen the window."
        )
        return report, None, None
    expectations, skipped = build_expectations(thresholds, baseline)
    frame = records_frame(records)
    samples = baseline.samples if baseline is not None else None
    statistics = drift_statistics(samples, window_sample(frame), thresholds)
    expectations += statistic_expectations(statistics)
    skipped += [_statistic_not_run(s) for s in statistics if s.value is None]
    docs_dir = Path(tempfile.mkdtemp(prefix="phi3ops-data-docs-"))
    frame = with_statistics(frame, statistics)
    checks, validation = validate(frame, expectations, docs_dir=docs_dir)
    report.checks = checks + skipped
    report.notes += [f"{check.name}: {check.observed}" for check in skipped]
    report.outcome = "failed" if report.broken else "passed"
    return report, validation, docs_dir


def record_outcome(
    report: MonitorReport, validation: dict[str, Any] | None, docs_dir: Path | None
) -> str:
    """An MLflow run with the results and Data Docs, linked to the version; returns its id."""
    import mlflow

    configure_tracking()
    with mlflow.start_run(run_name=f"monitor {report.model_name} v{report.version}") as run:
        mlflow.set_tags(
            {
                f"{MONITOR_TAG_PREFIX}model_name": report.model_name,
                f"{MONITOR_TAG_PREFIX}version": report.version,
                f"{MONITOR_TAG_PREFIX}outcome": report.outcome,
                RUN_TYPE_TAG: "monitor",
            }
        )
        mlflow.log_params(
            {
                "window_start": report.window_start,
                "window_end": report.window_end,
                "baseline_eval_run_id": getattr(report.baseline, "eval_run_id", None),
            }
        )
        mlflow.log_metric("records", report.records)
        mlflow.log_metric("broken_expectations", len(report.broken))
        mlflow.log_dict(_report_dict(report), "monitor_report.json")
        if validation is not None:
            mlflow.log_dict(validation, RESULTS_ARTIFACT)
        if docs_dir is not None:
            mlflow.log_artifacts(str(docs_dir), DOCS_ARTIFACT_DIR)
        run_id = run.info.run_id
    client = registry.client()
    for key, value in (("last_run_id", run_id), ("last_outcome", report.outcome)):
        client.set_model_version_tag(
            report.model_name, report.version, f"{MONITOR_TAG_PREFIX}{key}", value
        )
    report.run_id = run_id
    return run_id


def checks_table(report: MonitorReport) -> list[dict[str, Any]]:
    """Rows of the Prefect table artifact: one per expectation."""
    verdict = {True: "pass", False: "FAIL", None: "not run"}
    return [
        {
            "expectation": check.name,
            "result": verdict[check.success],
            "observed": check.observed,
            "guards against": check.guards_against,
        }
        for check in report.checks
    ]


def _report_dict(report: MonitorReport) -> dict[str, Any]:
    data = asdict(report)
    data["broken"] = [check.name for check in report.broken]
    return data


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _median(values: Any) -> float | None:
    return float(values.median()) if len(values) else None


# --- Prefect tasks ----------------------------------------------------------------------------


@task(name="find-baseline", cache_policy=NO_CACHE)
def find_baseline_task(model_name: str, version: str, eval_set: str | None) -> Baseline | None:
    """Prefect wrapper of `find_baseline`."""
    return find_baseline(model_name, version, eval_set)


@task(name="validate-window", cache_policy=NO_CACHE)
def run_monitor_task(
    model_name: str,
    version: str,
    *,
    start: float,
    end: float,
    thresholds: MonitorThresholds,
    baseline: Baseline | None,
) -> tuple[MonitorReport, dict[str, Any] | None, Path | None]:
    """Prefect wrapper of `run_monitor`."""
    return run_monitor(
        model_name, version, start=start, end=end, thresholds=thresholds, baseline=baseline
    )


@task(name="record-monitoring", cache_policy=NO_CACHE)
def record_outcome_task(
    report: MonitorReport, validation: dict[str, Any] | None, docs_dir: Path | None
) -> str:
    """Prefect wrapper of `record_outcome`. Not retried: MLflow's client retries what is
    transient, and a task retry after a half-written outcome would log a second run.
    """
    return record_outcome(report, validation, docs_dir)
