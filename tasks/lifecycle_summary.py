"""What one lifecycle run did, told on its own page: a Prefect markdown artifact
(``lifecycle-summary-<model>``) and a few headline lines for its run logs.

The story of a lifecycle run happens in its subflows (fetch, package, evaluate, promote); a
newcomer opening the lifecycle run itself should still see, in one place: where the weights
came from, which registry version they became, how the evaluation went, each gate and the
decision, and where to look in MLflow. Everything here is rendered from the values the
subflows returned; nothing is read or computed again.
"""

from __future__ import annotations

from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from phi3ops.names import (
    CHAMPION_ALIAS,
    ERROR_RATE,
    PASS_RATE,
    S_PER_TOKEN_P95,
    TOKENS_PER_S,
    TTFT_P95,
    artifact_key,
    evaluation_artifact_key,
    lifecycle_artifact_key,
)
from phi3ops.settings import get_settings
from phi3ops.tracking import run_url, tracking_uri, version_url
from tasks.evaluation.values import HASH_PREFIX_LENGTH, EvalSummary
from tasks.gates import Decision, GateResult, threshold_text
from tasks.hub import FetchResult
from tasks.registry import RegisteredVersion

__all__ = [
    "LifecycleReport",
    "lifecycle_headline",
    "lifecycle_markdown",
    "publish_lifecycle_summary",
    "publish_lifecycle_summary_task",
]

Outcome = Literal["promoted", "rejected", "unchanged", "live-traffic"]


class LifecycleReport(BaseModel):
    """The values a lifecycle run's subflows returned, as its summary tells them."""

    fetched: FetchResult
    built_onnx: bool = Field(default=False, description="ONNX int4 was built from the weights.")
    registered: RegisteredVersion
    evaluation: EvalSummary
    outcome: Outcome
    decision: Decision | None = Field(
        default=None, description="The gates and their verdict; None when nothing was decided."
    )
    champion: str | None = Field(description="The champion version after the run.")

    @property
    def champion_before(self) -> str | None:
        """The champion the decision was taken against (this version when unchanged)."""
        if self.decision is not None:
            return self.decision.champion_version
        return self.registered.version if self.outcome == "unchanged" else self.champion


# --- the headline: a few lines for the run logs ----------------------------------------------


def lifecycle_headline(report: LifecycleReport) -> list[str]:
    """The run in four lines: source and version, evaluation, gates, decision."""
    fetched, registered, evaluation = report.fetched, report.registered, report.evaluation
    lines = [
        f"Source {fetched.repo_id}@{fetched.commit_sha[:12]} ({_variant(report)}) -> "
        f"{registered.model_uri} ({registered.flavor.value}, "
        f"{'reused' if registered.reused else 'new'})",
        f"Evaluation on {evaluation.eval_set} ({'reused' if evaluation.reused else 'new'}, run "
        f"{evaluation.run_id}): {_headline_metrics(evaluation)}",
    ]
    if report.decision is None:
        lines.append(f"Gates: not checked ({_no_decision(report)})")
    else:
        gates = report.decision.gates
        failed = [g.detail for g in gates if not g.passed]
        lines.append(
            f"Gates: {len(gates) - len(failed)} of {len(gates)} pass"
            + (f"; failed: {'; '.join(failed)}" if failed else "")
        )
    lines.append(f"Decision: {_decision_sentence(report)}")
    return lines


def _headline_metrics(evaluation: EvalSummary) -> str:
    m = evaluation.metrics
    return (
        f"pass rate {_num(m.get(PASS_RATE))}, p95 time to first token "
        f"{_num(m.get(TTFT_P95))} s, p95 {_num(m.get(S_PER_TOKEN_P95))} s/token, "
        f"{_num(m.get(TOKENS_PER_S))} tokens/s"
    )


def _decision_sentence(report: LifecycleReport) -> str:
    return f"{report.outcome}: {_decision_detail(report)}"


def _decision_detail(report: LifecycleReport) -> str:
    version, before = report.registered.version, report.champion_before
    now = report.champion or "none"
    if report.outcome == "promoted":
        was = f" (was {before})" if before and before != version else " (the first champion)"
        return f"@{CHAMPION_ALIAS} is version {version}{was}"
    if report.outcome == "rejected":
        return f"aliases untouched, @{CHAMPION_ALIAS} stays {now}"
    if report.outcome == "live-traffic":
        mode = report.decision.live_traffic if report.decision else None
        return (
            f"passed every gate, now on live traffic ({mode or 'canary'}) beside "
            f"@{CHAMPION_ALIAS} {now}; the canary verdict promotes it or takes it out"
        )
    return f"version {version} is already @{CHAMPION_ALIAS}"


def _no_decision(report: LifecycleReport) -> str:
    return f"version {report.registered.version} is already @{CHAMPION_ALIAS}: nothing to promote"


# --- the page: a Prefect markdown artifact ---------------------------------------------------


def lifecycle_markdown(report: LifecycleReport) -> str:
    """The lifecycle run's summary page: source, version, evaluation, gates, decision, links."""
    fetched, registered, evaluation = report.fetched, report.registered, report.evaluation
    name, version = registered.model_name, registered.version
    m = evaluation.metrics
    items = m.get("n_items")
    lines = [
        f"# {name} v{version}: {_decision_sentence(report)}",
        "",
        "## Source",
        "",
        f"- `{fetched.repo_id}@{fetched.commit_sha}` (revision `{fetched.revision}`)",
        f"- variant {_variant(report)}; {fetched.file_count} files, {fetched.total_bytes:,} bytes",
        "",
        "## Registered version",
        "",
        f"- `{registered.model_uri}`, flavor **{registered.flavor.value}**: "
        + (
            "reused (this package was registered before; nothing was logged)"
            if registered.reused
            else "new, with alias @candidate"
        ),
        "",
        "## Evaluation",
        "",
        f"Eval set `{evaluation.eval_set}` (hash "
        f"`{evaluation.eval_set_hash[:HASH_PREFIX_LENGTH]}`"
        + (f", {int(items)} items" if items is not None else "")
        + ("; reused: this version was evaluated on it before)" if evaluation.reused else ")"),
        "",
        "| pass rate | p95 time to first token (s) | p95 s/token | tokens/s | error rate |",
        "|---:|---:|---:|---:|---:|",
        f"| {_num(m.get(PASS_RATE))} | {_num(m.get(TTFT_P95))} | "
        f"{_num(m.get(S_PER_TOKEN_P95))} | {_num(m.get(TOKENS_PER_S))} | "
        f"{_num(m.get(ERROR_RATE))} |",
        "",
        *_generation_line(m),
        f"Side by side with the champion, metric by metric: Prefect artifact "
        f"`{evaluation_artifact_key(name, version)}`.",
        "",
        *_gates_section(report),
        "",
        "## Decision",
        "",
        f"**{report.outcome}**: {_decision_detail(report)}.",
    ]
    if report.decision is not None:
        failed = [g.detail for g in report.decision.gates if not g.passed]
        lines += ["", *(f"- failed: {detail}" for detail in failed)] if failed else []
        lines += [
            "",
            f"The decision with who triggered it: Prefect artifact "
            f"`{artifact_key('promotion', name)}`.",
        ]
    lines += ["", *_links(report)]
    return "\n".join(lines) + "\n"


def _generation_line(metrics: dict[str, float]) -> list[str]:
    """How long generation took against its deadline, and what did not finish (zero expected)."""
    if "generation_wall_s" not in metrics:  # evaluations logged before these metrics existed
        return []
    return [
        f"Generation took {metrics['generation_wall_s']:.0f} s of its "
        f"{metrics.get('generation_deadline_s', 0.0):.0f} s deadline; "
        f"items refused: {metrics.get('n_refused', 0.0):.0f}, "
        f"timed out: {metrics.get('n_timed_out', 0.0):.0f}.",
        "",
    ]


def _gates_section(report: LifecycleReport) -> list[str]:
    if report.decision is None:
        return ["## Gates", "", f"Not checked: {_no_decision(report)}."]
    gates = report.decision.gates
    passed = sum(g.passed for g in gates)
    return [
        f"## Gates: {passed} of {len(gates)} pass",
        "",
        "| gate | value | champion | threshold | result |",
        "|---|---:|---:|---:|---|",
        *(
            f"| {g.gate} | {_num(g.candidate)} | {_num(g.champion)} | "
            f"{threshold_text(g, fmt=_num)} | {_result(g)} |"
            for g in gates
        ),
    ]


def _result(gate: GateResult) -> str:
    if gate.passed:
        return "pass"
    return "FAIL (not measured)" if gate.candidate is None and gate.threshold else "FAIL"


def _links(report: LifecycleReport) -> list[str]:
    """Where to look in MLflow: the UI's pages on a tracking server, else ids and `mlflow ui`."""
    registered, evaluation = report.registered, report.evaluation
    name, version = registered.model_name, registered.version
    run_page = run_url(evaluation.run_id)
    version_page = version_url(name, version)
    lines = ["## In MLflow", ""]
    if run_page is not None and version_page is not None:
        lines += [
            f"- evaluation run: [{evaluation.run_id}]({run_page})",
            f"- registered version: [{name} v{version}]({version_page})",
        ]
        if registered.run_id:
            package_page = run_url(registered.run_id)
            lines.append(f"- packaging run: [{registered.run_id}]({package_page})")
        return lines
    uri = tracking_uri()
    lines += [
        f"- evaluation run: `{evaluation.run_id}` (experiment `{get_settings().experiment_name}`)",
        f"- registered version: `{registered.model_uri}`"
        + (f" (packaging run `{registered.run_id}`)" if registered.run_id else ""),
        "",
        f"The tracking store `{uri}` has no web page of its own: `mlflow ui "
        f"--backend-store-uri {uri}` serves one (http://127.0.0.1:5000); there, the run is "
        f"under Experiments, the version under Models → {name} → Version {version}.",
    ]
    return lines


def _variant(report: LifecycleReport) -> str:
    variant = report.fetched.variant.value
    return f"{variant}, built to ONNX int4 here" if report.built_onnx else variant


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


# --- publishing ------------------------------------------------------------------------------


def publish_lifecycle_summary(report: LifecycleReport) -> str:
    """Publishes `lifecycle_markdown` as the Prefect artifact ``lifecycle-summary-<model>``.

    Returns:
        The artifact key.
    """
    from prefect.artifacts import create_markdown_artifact

    registered = report.registered
    key = lifecycle_artifact_key(registered.model_name)
    create_markdown_artifact(
        markdown=lifecycle_markdown(report),
        key=key,
        description=(
            f"Lifecycle of {report.fetched.repo_id}: {registered.model_name} "
            f"v{registered.version} {report.outcome}"
        ),
    )
    return key


@task(name="publish-lifecycle-summary", cache_policy=NO_CACHE)
def publish_lifecycle_summary_task(report: LifecycleReport) -> str:
    """`publish_lifecycle_summary` (no retries: nothing here is transient)."""
    return publish_lifecycle_summary(report)
