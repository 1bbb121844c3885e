"""Judging one traffic plan: find it, read both arms since it started, run the tests and each
arm's expectation suite, and end the plan once a verdict is carried out.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from phi3ops import registry
from phi3ops.names import CANDIDATE_ALIAS, CHAMPION_ALIAS
from phi3ops.policies import CanaryPolicy, MonitorThresholds
from phi3ops.serving.records import InferenceRecord
from phi3ops.traffic import Arm, TrafficPlan, read_plan
from tasks.canary.compare import (
    OUTCOME_OF,
    ArmSample,
    Comparison,
    Outcome,
    Verdict,
    arm_sample,
    compare_arms,
    decide,
    matched_records,
    needed_samples,
)
from tasks.canary.start import stop_plan
from tasks.live_records import load_records, unstored_records
from tasks.monitoring import Check, build_expectations, records_frame, validate
from tasks.status import reasons_of, write_decision_tags


def suite_checks(
    records: Sequence[InferenceRecord], thresholds: MonitorThresholds
) -> tuple[list[Check], dict[str, Any], Path]:
    """The monitoring suite on one arm's records (no drift baseline: the other arm is the
    reference); (checks, validation JSON, Data Docs folder).
    """
    expectations, _ = build_expectations(thresholds, None)
    docs_dir = Path(tempfile.mkdtemp(prefix="phi3ops-canary-docs-"))
    checks, validation = validate(records_frame(list(records)), expectations, docs_dir=docs_dir)
    return checks, validation, docs_dir


# --- the whole judgement ----------------------------------------------------------------------


@dataclass
class CanaryReport:
    """One verdict run on one model's traffic plan."""

    model_name: str
    outcome: Outcome
    verdict: Verdict | None = None  # None: no canary to judge
    reasons: list[str] = field(default_factory=list)
    mode: str | None = None
    plan_id: str | None = None
    since: str | None = None
    window_start: str | None = None
    window_end: str | None = None
    champion_version: str | None = None
    candidate_version: str | None = None
    candidate: ArmSample | None = None
    champion: ArmSample | None = None
    tests: list[Comparison] = field(default_factory=list)
    suites: dict[str, list[Check]] = field(default_factory=dict)
    needed: dict[str, int] = field(default_factory=dict)
    run_id: str | None = None

    def summary(self) -> str:
        """One line for the log and the CLI."""
        if self.outcome == "no-canary":
            return f"{self.model_name}: no canary to judge ({'; '.join(self.reasons)})."
        head = (
            f"{self.model_name} {self.mode} v{self.candidate_version} (candidate, "
            f"{_judged(self.candidate)} records) vs v{self.champion_version} (champion, "
            f"{_judged(self.champion)} records)"
        )
        what = {"wait": "WAIT", "promoted": "PROMOTED", "aborted": "ABORTED"}[self.outcome]
        return f"{head}: {what}. {'; '.join(self.reasons)}"

    def payload(self) -> dict[str, Any]:
        """The event payload and the MLflow run's JSON: everything but the raw samples."""
        data = asdict(self)
        for arm in ("candidate", "champion"):
            if data[arm] is not None:
                for raw in ("seconds_per_token", "completion_tokens", "timings", "lengths"):
                    data[arm].pop(raw)
                sample = getattr(self, arm)
                data[arm] |= {
                    "error_rate": sample.error_rate,
                    "format_failure_rate": sample.format_failure_rate,
                    # JSON keys: "max_tokens/stop_given/stream"
                    "strata": {
                        "/".join(map(str, stratum)): asdict(counts)
                        for stratum, counts in sample.strata.items()
                    },
                }
        data["suites"] = {
            arm: [c.name for c in checks if c.success is False]
            for arm, checks in self.suites.items()
        }
        return data


@dataclass(frozen=True)
class CanaryTarget:
    """The plan being judged and the versions behind the two aliases; ``missing`` says why
    there is nothing to judge.
    """

    model_name: str
    plan: TrafficPlan | None
    champion: str | None
    candidate: str | None

    @property
    def missing(self) -> str | None:
        """Why there is no canary to judge, or None."""
        if self.plan is None:
            return "no traffic plan (start one with `phi3ops canary start`)"
        if self.champion is None:
            return f"no @{CHAMPION_ALIAS}: nothing to compare the candidate with"
        if self.candidate is None:
            return (
                "the plan names no candidate version (start it again with `phi3ops canary start`)"
            )
        if self.candidate == self.champion:
            return f"the plan's candidate is the champion (v{self.champion}): nothing to judge"
        return None


def find_target(model_name: str) -> CanaryTarget:
    """The model's traffic plan, the champion its alias names now, and the candidate the plan
    pinned (the version that passed the gates, which is what the servers send traffic to),
    whatever ``@candidate`` names since.
    """
    plan = read_plan(model_name, registry=registry.client())
    return CanaryTarget(
        model_name=model_name,
        plan=plan,
        champion=registry.alias_version(model_name, CHAMPION_ALIAS),
        candidate=plan.candidate_version if plan is not None else None,
    )


def judge(
    target: CanaryTarget,
    *,
    policy: CanaryPolicy,
    thresholds: MonitorThresholds,
    window_minutes: int | None = None,
    now: float | None = None,
) -> tuple[CanaryReport, dict[str, tuple[dict[str, Any], Path]]]:
    """Read both arms since the plan started (at most ``window_minutes`` back), test, decide.

    Returns:
        The report (outcome ``no-canary``, ``wait``, or the verdict ``promote`` / ``abort``
        still to carry out, outcome ``promoted`` / ``aborted``), and per arm the suite's
        validation JSON and Data Docs folder (empty while waiting).
    """
    report = CanaryReport(model_name=target.model_name, outcome="no-canary")
    if target.missing is not None or target.plan is None:
        report.reasons = [target.missing or "no traffic plan"]
        return report, {}
    assert target.candidate is not None and target.champion is not None  # `missing` says so
    plan, end = target.plan, time.time() if now is None else now
    start = plan.since if window_minutes is None else max(plan.since, end - window_minutes * 60)
    arms: dict[str, list[InferenceRecord]] = {
        Arm.CANDIDATE.value: load_records(
            target.model_name, target.candidate, start=start, end=end, arm=Arm.CANDIDATE
        ),
        Arm.CHAMPION.value: load_records(
            target.model_name, target.champion, start=start, end=end, arm=Arm.CHAMPION, shadow=False
        ),
    }
    report.mode, report.plan_id = plan.mode.value, plan.id
    report.since, report.window_start, report.window_end = _iso(plan.since), _iso(start), _iso(end)
    report.candidate_version, report.champion_version = target.candidate, target.champion
    report.candidate = arm_sample(
        arms[Arm.CANDIDATE.value], arm=Arm.CANDIDATE.value, version=target.candidate
    )
    report.champion = arm_sample(
        arms[Arm.CHAMPION.value], arm=Arm.CHAMPION.value, version=target.champion
    )
    report.needed = needed_samples(report.candidate, report.champion, policy=policy)
    artifacts: dict[str, tuple[dict[str, Any], Path]] = {}
    if not any(report.needed.values()):
        report.tests = compare_arms(report.candidate, report.champion, policy=policy)
        # The suites read each arm as one sample: give both the same mix of requests.
        matched = matched_records(arms[Arm.CANDIDATE.value], arms[Arm.CHAMPION.value])
        for arm, records in zip((Arm.CANDIDATE.value, Arm.CHAMPION.value), matched, strict=True):
            checks, validation, docs_dir = suite_checks(records, thresholds)
            report.suites[arm] = checks
            artifacts[arm] = (validation, docs_dir)
    verdict, report.reasons = decide(
        report.candidate, report.champion, report.tests, report.suites, policy=policy
    )
    if (unstored := unstored_records(end)) is not None:  # never decide on part of the window
        verdict, report.reasons = "wait", [unstored, *report.reasons]
    report.verdict = verdict
    report.outcome = OUTCOME_OF[verdict]
    moved = registry.alias_version(target.model_name, CANDIDATE_ALIAS)
    if moved != target.candidate:
        report.reasons.append(
            f"note: @{CANDIDATE_ALIAS} is now "
            f"{f'v{moved}' if moved else 'on no version'}; the plan's v{target.candidate}, "
            f"which took the traffic, is what was judged"
        )
    return report, artifacts


# --- carrying it out and recording it ---------------------------------------------------------


def end_plan(report: CanaryReport) -> bool:
    """Clear the traffic plan judged (``@champion`` answers everything again); a plan started
    since (another id) is left alone. Whether the judged plan was cleared.
    """
    return stop_plan(report.model_name, plan_id=report.plan_id) is not None


def tag_outcome(report: CanaryReport, *, triggered_by: str) -> bool:
    """Make the candidate's promotion decision say how its canary ended: the decision tag
    (``phi3ops.promotion.decision``: ``promoted`` / ``aborted``), its reasons (the verdict's,
    after the gates' own on a promotion), when and by whom; then its registry description,
    which `phi3ops status` and the MLflow UI show. An older offline decision ("live-traffic",
    "rejected") with its reasons must not outlive the live verdict. Whether anything was written
    (only a verdict carried out writes).
    """
    if report.outcome not in ("promoted", "aborted") or not report.candidate_version:
        return False
    name, version = report.model_name, report.candidate_version
    reasons = [
        f"{report.mode or 'canary'} verdict on live traffic: {report.outcome} "
        f"(run {report.run_id or '-'}, plan {report.plan_id or '-'})",
        *report.reasons,
    ]
    if report.outcome == "promoted":  # the promotion flow just tagged its gates' reasons
        reasons += reasons_of(registry.client().get_model_version(name, version).tags)
    write_decision_tags(
        name,
        version,
        {
            "decision": report.outcome,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "triggered_by": triggered_by,
            "reasons": json.dumps(reasons),
        },
    )
    return True


def _judged(sample: ArmSample | None) -> int:
    return sample.judged if sample is not None else 0


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


# --- Prefect tasks: no retries (a verdict is taken again on the next schedule), no cache ------


@task(name="find-canary", cache_policy=NO_CACHE)
def find_target_task(model_name: str) -> CanaryTarget:
    """Prefect wrapper of `find_target`."""
    return find_target(model_name)


@task(name="judge-canary", cache_policy=NO_CACHE)
def judge_task(
    target: CanaryTarget,
    *,
    policy: CanaryPolicy,
    thresholds: MonitorThresholds,
    window_minutes: int | None = None,
) -> tuple[CanaryReport, dict[str, tuple[dict[str, Any], Path]]]:
    """Prefect wrapper of `judge`."""
    return judge(target, policy=policy, thresholds=thresholds, window_minutes=window_minutes)


@task(name="end-traffic-plan", cache_policy=NO_CACHE)
def end_plan_task(report: CanaryReport) -> bool:
    """Prefect wrapper of `end_plan`."""
    return end_plan(report)


@task(name="tag-canary-outcome", cache_policy=NO_CACHE)
def tag_outcome_task(report: CanaryReport, *, triggered_by: str) -> bool:
    """Prefect wrapper of `tag_outcome`."""
    return tag_outcome(report, triggered_by=triggered_by)
