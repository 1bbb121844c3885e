"""``phi3ops canary start|status|stop|verdict``: put ``@candidate`` on live traffic, watch it,
take it off, and judge it (`flows/canary.py`).

The traffic plan is a registered-model tag (`phi3ops.traffic`) that every server looks at as
often as at its aliases, so these commands act without restarting anything. Heavy modules
(MLflow, Prefect) are imported inside each command, so ``--help`` stays instant.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from cli.options import EvalSetOption, GateOption, ModelNameOption, run_job
from phi3ops.traffic import TrafficMode

canary_app = typer.Typer(
    help="Canary and shadow runs of @candidate beside @champion on live traffic, and their "
    "online verdict.",
    no_args_is_help=True,
)

#: Exit codes of `verdict` besides 0 (promoted, or nothing to judge) and 2 (an error).
WAIT_EXIT_CODE = 3
ABORTED_EXIT_CODE = 4


@canary_app.command("start")
def start(
    mode: Annotated[
        TrafficMode,
        typer.Option(
            help="canary: @candidate answers a share of requests; shadow: it gets a copy of "
            "every request, whose answer no client sees."
        ),
    ] = TrafficMode.CANARY,
    share: Annotated[
        float | None,
        typer.Option(help="Canary only: the share @candidate answers, e.g. 0.1 (the default)."),
    ] = None,
    model_name: ModelNameOption = None,
) -> None:
    """Start a canary (or shadow) run of @candidate beside @champion; replaces any other.
    @candidate must have passed every gate against @champion (`phi3ops promote --live-traffic`).
    """
    typer.echo(run_job(start_job, model_name=model_name, mode=mode, share=share))


@canary_app.command("status")
def status(model_name: ModelNameOption = None) -> None:
    """The traffic plan, each arm's records since it started, and the last verdict."""
    typer.echo(run_job(status_job, model_name=model_name))


@canary_app.command("stop")
def stop(model_name: ModelNameOption = None) -> None:
    """Take @candidate out of traffic: @champion answers every request again."""
    typer.echo(run_job(stop_job, model_name=model_name))


@canary_app.command("verdict")
def verdict(
    model_name: ModelNameOption = None,
    window_minutes: Annotated[
        int | None,
        typer.Option(min=1, help="Read at most this far back (default: since the plan started)."),
    ] = None,
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            help="Override a verdict threshold, e.g. --threshold min_samples=200 (repeatable)."
        ),
    ] = None,
    gate: GateOption = None,
    eval_set: EvalSetOption = None,
) -> None:
    """Judge the canary once, here, and carry the verdict out: promote through the gates, or
    abort (exit 3 when there are too few records to judge yet, 4 when it was aborted).
    """
    report = run_job(
        verdict_job,
        model_name=model_name,
        window_minutes=window_minutes,
        thresholds=threshold,
        gates=gate,
        eval_set=eval_set,
    )
    if report.outcome == "wait":
        raise typer.Exit(code=WAIT_EXIT_CODE)
    if report.outcome == "aborted":
        raise typer.Exit(code=ABORTED_EXIT_CODE)


# --- the jobs ---------------------------------------------------------------------------------


def start_job(*, model_name: str | None, mode: TrafficMode | str, share: float | None) -> str:
    """Check that @champion and @candidate exist and differ, and that @candidate passed every
    gate against @champion on its eval set; then write the plan, pinned to that version.

    Returns:
        One line saying what now happens.

    Raises:
        InvalidInputError: A bad model name, mode or share, aliases that cannot take part, or
            a candidate without a passing gate decision against the champion.
    """
    from phi3ops.names import CANDIDATE_ALIAS, CHAMPION_ALIAS
    from tasks.canary import start_plan

    name = _model(model_name)
    plan, before, champion = start_plan(name, mode=mode, share=share)
    candidate = plan.candidate_version
    replaced = f"Replaced the {before.mode.value} started {_iso(before.since)}. " if before else ""
    if plan.mode is TrafficMode.CANARY:
        what = (
            f"@{CANDIDATE_ALIAS} (v{candidate}) now answers {plan.share:.0%} of {name}'s "
            f"requests (a user stays on one arm), @{CHAMPION_ALIAS} (v{champion}) the rest"
        )
    else:
        what = (
            f"@{CHAMPION_ALIAS} (v{champion}) answers every request of {name}; @{CANDIDATE_ALIAS} "
            f"(v{candidate}) gets a copy in the background, its answers recorded, never sent"
        )
    return (
        f"{replaced}{plan.mode.value.capitalize()} started: {what}, as soon as each server "
        f"looks (PHI3OPS_SERVE_POLL_S). v{candidate} is pinned: servers keep serving it if "
        f"@{CANDIDATE_ALIAS} moves. {_streams_note(plan)}Judge it with `phi3ops canary "
        "verdict` (the canary deployment does every 10 minutes); end it with `phi3ops canary "
        "stop`."
    )


def _streams_note(plan: Any) -> str:
    """The warning of a plan whose candidate cannot stream ('' when it can)."""
    if not plan.streams_to_champion:
        return ""
    return (
        f"WARNING: v{plan.candidate_version} cannot stream (transformers flavor): streamed "
        "requests stay with @champion and count for neither arm. "
    )


def status_job(*, model_name: str | None) -> str:
    """The plan, per-arm record counts since it started, and the candidate's last verdict."""
    import time

    from phi3ops.names import CANDIDATE_ALIAS, CHAMPION_ALIAS
    from phi3ops.registry import alias_version
    from phi3ops.traffic import read_plan
    from tasks.canary import arm_sample
    from tasks.live_records import load_records

    name = _model(model_name)
    plan = read_plan(name)
    champion = alias_version(name, CHAMPION_ALIAS)
    candidate = alias_version(name, CANDIDATE_ALIAS)
    if plan is None:
        serving = (
            f"@{CHAMPION_ALIAS} (v{champion}) answers every request"
            if champion
            else f"it has no @{CHAMPION_ALIAS} yet"
        )
        lines = [f"No canary on {name}: {serving}. Start one with `phi3ops canary start`."]
    else:
        share = f", share {plan.share:.0%}" if plan.mode is TrafficMode.CANARY else ""
        moved = candidate if candidate != plan.candidate_version else None
        candidate = plan.candidate_version  # the version served, whatever the alias says now
        lines = [
            f"{plan.mode.value.capitalize()} on {name} since {_iso(plan.since)} (plan {plan.id}"
            f"{share}): v{candidate or '-'} (pinned) beside @{CHAMPION_ALIAS} "
            f"v{champion or '-'}"
        ]
        if moved is not None:
            lines.append(
                f"  WARNING: @{CANDIDATE_ALIAS} is v{moved} now; v{moved} takes no traffic "
                f"until a plan of its own starts (`phi3ops promote --live-traffic`)"
            )
        if plan.streams_to_champion:
            lines.append(f"  {_streams_note(plan).strip()}")
        now = time.time()
        for arm, version, shadow in (("candidate", candidate, None), ("champion", champion, False)):
            if version is None:
                continue
            records = load_records(name, version, start=plan.since, end=now, arm=arm, shadow=shadow)
            s = arm_sample(records, arm=arm, version=version)
            lines.append(
                f"  {arm} v{version}: {s.judged} records judged ({s.errors} server errors, "
                f"{s.format_failures} format failures), {s.refused} refused, {s.cancelled} "
                f"cancelled, {s.shed_shadow} shadow copies shed"
            )
    lines += _last_verdict(name, candidate)
    return "\n".join(lines)


def stop_job(*, model_name: str | None) -> str:
    """Clear the plan; says so when there was none."""
    from phi3ops.names import CHAMPION_ALIAS
    from phi3ops.registry import alias_version
    from tasks.canary import stop_plan

    name = _model(model_name)
    plan = stop_plan(name)
    if plan is None:
        return f"No canary on {name}: nothing to stop."
    champion = alias_version(name, CHAMPION_ALIAS)
    return (
        f"Stopped the {plan.mode.value} on {name} started {_iso(plan.since)}: @{CHAMPION_ALIAS} "
        f"(v{champion or '-'}) answers every request again as soon as each server looks."
    )


def verdict_job(
    *,
    model_name: str | None = None,
    window_minutes: int | None = None,
    thresholds: list[str] | None = None,
    gates: list[str] | None = None,
    eval_set: str | None = None,
) -> Any:
    """Check the overrides and the eval set, then run the canary flow here once.

    Returns:
        The report (`tasks.canary.CanaryReport`).
    """
    from pydantic import ValidationError

    from cli.jobs import gate_overrides, parse_overrides
    from flows.canary import canary_flow
    from phi3ops.errors import InvalidInputError
    from phi3ops.evalset import open_eval_set
    from phi3ops.policies import CanaryOverrides, invalid_input
    from phi3ops.settings import get_settings

    values = parse_overrides(thresholds, option="--threshold", example="min_samples=200")
    unknown = sorted(set(values) - set(CanaryOverrides.model_fields))
    if unknown:
        raise InvalidInputError(
            f"--threshold: unknown name(s) {', '.join(unknown)}; use any of "
            f"{', '.join(CanaryOverrides.model_fields)}."
        )
    try:
        overrides = CanaryOverrides.model_validate(values)
    except ValidationError as exc:
        raise invalid_input(exc, what="thresholds") from exc
    get_settings().canary.with_overrides(overrides)
    checked_gates = gate_overrides(gates)
    get_settings().gates.with_overrides(checked_gates)
    loaded = open_eval_set(eval_set)
    name = _model(model_name)  # the store last: every input is checked in well under a second
    return canary_flow(
        model_name=name,
        window_minutes=window_minutes,
        thresholds=overrides,
        eval_set=str(loaded.path),
        gates=checked_gates,
    )


def _model(model_name: str | None) -> str:
    """The checked model name, once the tracking store answers."""
    from phi3ops.registry import resolve_model_name
    from phi3ops.tracking import use_tracking_store

    name = resolve_model_name(model_name)
    use_tracking_store()
    return name


def _last_verdict(model_name: str, version: str | None) -> list[str]:
    import json

    from phi3ops.names import CANARY_TAG_PREFIX
    from phi3ops.registry import get_version

    found = get_version(model_name, version) if version else None
    tags = {
        key.removeprefix(CANARY_TAG_PREFIX): value
        for key, value in ((found.tags or {}) if found else {}).items()
        if key.startswith(CANARY_TAG_PREFIX)
    }
    if "verdict" not in tags:
        return [f"  no verdict on v{version} yet" if version else "  no @candidate"]
    try:
        reasons = "; ".join(json.loads(tags.get("reason", "[]")))
    except ValueError:
        reasons = tags.get("reason", "")
    return [
        f"  last verdict on v{version}: {tags['verdict']} at {tags.get('at', '?')} "
        f"(run {tags.get('run_id', '-')}): {reasons}"
    ]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
