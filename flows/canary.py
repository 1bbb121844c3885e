"""The online verdict: ``@candidate`` against ``@champion`` on the live traffic of a canary or
shadow run, then the verdict carried out.

Find the traffic plan and the two versions (none: ``no-canary``) → read each arm's records since
the plan started → test and validate them → the verdict:

* ``wait``: nothing moves; the run says how many more records each arm needs;
* ``promote``: the promotion flow, with its gates, audit and ``phi3ops.model.promoted``; then
  the plan is cleared and ``phi3ops.canary.promoted`` emitted. Gates that reject it: as abort;
* ``abort``: the plan is cleared (``@champion`` answers everything again), the candidate
  version tagged with the verdict and why, ``phi3ops.canary.aborted`` emitted.

Either way the candidate's promotion decision (``phi3ops.promotion.decision`` and reasons) and
its registry description are rewritten with the canary's outcome.

Every verdict is an MLflow run (``phi3ops.run_type`` = ``canary``) and a Prefect markdown
artifact.
"""

from __future__ import annotations

import shutil

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from flows.promote import promote_flow
from phi3ops.names import CANARY_ABORTED_EVENT, CANARY_PROMOTED_EVENT, artifact_key
from phi3ops.policies import CanaryOverrides, GateOverrides, ThresholdOverrides
from phi3ops.registry import resolve_model_name
from phi3ops.settings import get_settings
from tasks.canary import (
    end_plan_task,
    find_target_task,
    judge_task,
    record_verdict_task,
    tag_outcome_task,
    verdict_markdown,
)
from tasks.events import default_trigger, emit

_EVENTS = {"promoted": CANARY_PROMOTED_EVENT, "aborted": CANARY_ABORTED_EVENT}


@flow(name="canary", log_prints=True)
def canary_flow(
    model_name: str | None = None,
    window_minutes: int | None = None,
    thresholds: CanaryOverrides | None = None,
    suite_thresholds: ThresholdOverrides | None = None,
    eval_set: str | None = None,
    gates: GateOverrides | None = None,
    triggered_by: str | None = None,
):
    """Judge the model's canary (or shadow) run on its live traffic and carry the verdict out.

    Args:
        model_name: Registered model; defaults to ``PHI3OPS_REGISTERED_MODEL_NAME``.
        window_minutes: Read at most this far back (never before the plan started); empty:
            everything since the plan started.
        thresholds: Overrides of the verdict's thresholds (``PHI3OPS_CANARY_*``), e.g.
            ``{"min_samples": 200, "alpha": 0.005}``.
        suite_thresholds: Overrides of the expectation suite's bounds run on each arm
            (``PHI3OPS_MONITOR_*``), e.g. ``{"max_error_rate": 0.01}``.
        eval_set: Eval set the promotion gates compare the evaluations on; the default set
            when empty.
        gates: Overrides of the promotion gates (``PHI3OPS_GATE_*``) for a ``promote`` verdict.
        triggered_by: Recorded with the verdict and the promotion; defaults to the deployment /
            flow run.

    Returns:
        The report. ``wait`` and ``no-canary`` end the run in a Completed state named
        ``Waiting`` / ``NoCanary`` (calling the flow still returns the report).
    """
    name = resolve_model_name(model_name)
    settings = get_settings()
    policy = settings.canary.with_overrides(thresholds)
    limits = settings.monitor.with_overrides(suite_thresholds)
    who = triggered_by or default_trigger()

    target = find_target_task(name)
    report, artifacts = judge_task(
        target, policy=policy, thresholds=limits, window_minutes=window_minutes
    )
    if report.outcome == "no-canary":
        print(report.summary())
        return Completed(name="NoCanary", message=report.summary(), data=report)

    if report.verdict == "promote":
        decision = promote_flow(
            model_name=name,
            candidate=str(report.candidate_version),
            eval_set=eval_set,
            gates=gates,
            triggered_by=f"canary verdict ({who})",
        )
        if not decision.promote:  # live traffic says yes, the offline gates say no: abort
            report.outcome = "aborted"
            report.reasons = [
                "no worse on live traffic, but the promotion gates rejected it: "
                + "; ".join(decision.reasons),
                *report.reasons,
            ]
    if report.outcome in _EVENTS:
        # Out of traffic before anything else: a candidate judged worse must not take more.
        end_plan_task(report)
    try:
        record_verdict_task(report, artifacts, triggered_by=who)
    finally:
        for _, docs_dir in artifacts.values():
            shutil.rmtree(docs_dir, ignore_errors=True)
    # The version's promotion decision, reasons and description now say how the canary ended.
    tag_outcome_task(report, triggered_by=who)

    markdown = verdict_markdown(report)
    create_markdown_artifact(
        markdown=markdown,
        key=artifact_key("canary", name),
        description=f"Canary verdict on {name} v{report.candidate_version}: {report.outcome}",
    )
    if report.outcome in _EVENTS:
        emit(
            _EVENTS[report.outcome],
            model_name=name,
            version=report.candidate_version or "",
            payload={**report.payload(), "mlflow_run_id": report.run_id, "triggered_by": who},
        )
    print(markdown)
    if report.outcome == "wait":
        return Completed(name="Waiting", message=report.summary(), data=report)
    return report
