"""The pipeline's commands: one per stage (fetch, package, evaluate, promote, rollback) and the
whole job (run, demo). Each checks its inputs in a job of `cli.jobs`, then runs the flow.

`cli.jobs` imports the flows (and with them Prefect and MLflow, seconds of imports): every
command imports it inside, so ``phi3ops --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.options import (
    EvalSetOption,
    EvaluateChampionOption,
    FlavorOption,
    GateOption,
    ModelNameOption,
    RepoIdOption,
    RevisionOption,
    VariantOption,
    run_job,
)
from phi3ops.names import CANDIDATE_ALIAS, CHAMPION_ALIAS
from phi3ops.sources import Flavor, Variant
from phi3ops.traffic import TrafficMode


def fetch(
    repo_id: RepoIdOption = None,
    revision: RevisionOption = "main",
    variant: Annotated[Variant, typer.Option(help="Which files to fetch.")] = (
        Variant.ONNX_CPU_INT4
    ),
    target_dir: Annotated[
        Path | None, typer.Option(help="Snapshot root (default: data dir).")
    ] = None,
    build_onnx: Annotated[
        bool, typer.Option(help="Build ONNX int4 from fetched PyTorch weights.")
    ] = False,
) -> None:
    """Fetch a pinned, verified snapshot (the fetch flow)."""
    from cli import jobs  # lazy: Prefect

    run_job(
        jobs.fetch_job,
        repo_id=repo_id or variant.default_repo_id,
        revision=revision,
        variant=variant,
        target_dir=target_dir,
        build_onnx=build_onnx,
    )


def package(
    flavor: FlavorOption = Flavor.ONNX,
    repo_id: RepoIdOption = None,
    revision: RevisionOption = "main",
    variant: VariantOption = None,
    model_name: ModelNameOption = None,
) -> None:
    """Fetch, package and register a model version, aliased @candidate (the package flow)."""
    from cli import jobs  # lazy: Prefect

    registered = run_job(
        jobs.package_job,
        flavor=flavor,
        repo_id=repo_id,
        revision=revision,
        variant=variant,
        model_name=model_name,
    )
    state = "reused" if registered.reused else "registered"
    typer.echo(f"{state} {registered.model_uri} ({registered.flavor.value})")


def evaluate(
    model_uri: Annotated[
        str | None,
        typer.Option(
            help="models:/<name>@<alias> or models:/<name>/<version> "
            "(default: models:/<PHI3OPS_REGISTERED_MODEL_NAME>@candidate)."
        ),
    ] = None,
    eval_set: EvalSetOption = None,
    compare_to: Annotated[
        str, typer.Option(help="Alias whose evaluation to compare with.")
    ] = CHAMPION_ALIAS,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Evaluate again even if this version has an evaluation on the set."
        ),
    ] = False,
    shards: Annotated[
        int,
        typer.Option(
            min=1,
            help="Generate in this many flow runs of the eval-shard deployment, side by side "
            "on the work pool (needs PREFECT_API_URL and `prefect deploy --all`); merged into "
            "one evaluation.",
        ),
    ] = 1,
) -> None:
    """Evaluate a registered version on an eval set, compared with @champion (evaluate flow)."""
    from cli import jobs  # lazy: Prefect

    summary = run_job(
        jobs.evaluate_job,
        model_uri=model_uri,
        eval_set=eval_set,
        compare_to_alias=compare_to,
        force=force,
        shards=shards,
    )
    state = "reused" if summary.reused else "evaluated"
    typer.echo(
        f"{state} models:/{summary.model_name}/{summary.version} ({summary.flavor}) on "
        f"{summary.eval_set} ({summary.eval_set_hash[:12]}): run {summary.run_id}"
    )
    for key in sorted(summary.metrics):
        typer.echo(f"  {key:<28} {summary.metrics[key]:.4g}")
    for note in summary.notes:
        typer.echo(f"  note: {note}")


def promote(
    model_name: ModelNameOption = None,
    candidate: Annotated[
        str, typer.Option(help="Version number or alias to promote.")
    ] = CANDIDATE_ALIAS,
    eval_set: Annotated[
        str | None, typer.Option(help="Eval set both evaluations must share.")
    ] = None,
    gate: GateOption = None,
    evaluate_champion: EvaluateChampionOption = True,
    live_traffic: Annotated[
        TrafficMode | None,
        typer.Option(
            help="Instead of promoting a version that passes the gates, put it on live "
            "traffic first (canary: a share of requests; shadow: a copy of each); the canary "
            "verdict promotes it."
        ),
    ] = None,
    canary_share: Annotated[
        float | None, typer.Option(help="With --live-traffic canary: the share, e.g. 0.1.")
    ] = None,
) -> None:
    """Promote a version to @champion if its gates pass (old champion -> @previous)."""
    from cli import jobs  # lazy: Prefect

    decision = run_job(
        jobs.promote_job,
        model_name=model_name,
        candidate=candidate,
        eval_set=eval_set,
        gates=gate,
        evaluate_champion=evaluate_champion,
        live_traffic=live_traffic,
        canary_share=canary_share,
    )
    outcome = (
        f"on live traffic ({decision.live_traffic}; `phi3ops canary status`)"
        if decision.live_traffic
        else "promoted"
        if decision.promote
        else "rejected"
    )
    typer.echo(f"{outcome}: {decision.model_name} v{decision.version}")
    for reason in decision.reasons:
        typer.echo(f"  {reason}")


def rollback(
    model_name: ModelNameOption = None,
    to_version: Annotated[
        str | None, typer.Option(help="Version to restore instead of @previous.")
    ] = None,
    smoke_eval_set: Annotated[
        str, typer.Option(help="Eval set for the smoke evaluation.")
    ] = "smoke",
    smoke: Annotated[bool, typer.Option(help="Smoke-evaluate the restored champion.")] = True,
) -> None:
    """@champion <- @previous (or --to-version), then a smoke evaluation of it."""
    from cli import jobs  # lazy: Prefect

    state = run_job(
        jobs.rollback_job,
        model_name=model_name,
        to_version=to_version,
        smoke_eval_set=smoke_eval_set if smoke else None,
    )
    typer.echo(f"{state.model_name}: champion is now version {state.champion}")


def run(
    repo_id: RepoIdOption = None,
    revision: RevisionOption = "main",
    flavor: FlavorOption = Flavor.ONNX,
    variant: VariantOption = None,
    model_name: ModelNameOption = None,
    eval_set: EvalSetOption = None,
    gate: GateOption = None,
    evaluate_champion: EvaluateChampionOption = True,
) -> None:
    """The main job: the lifecycle (fetch, package, register, evaluate, promote) on the real
    Phi-3 ONNX int4 from the Hugging Face hub (`make run`).
    """
    from cli import jobs  # lazy: Prefect

    run_job(
        jobs.main_job,
        repo_id=repo_id,
        revision=revision,
        flavor=flavor,
        variant=variant,
        model_name=model_name,
        eval_set=eval_set,
        gates=gate,
        evaluate_champion=evaluate_champion,
    )


def demo(eval_set: EvalSetOption = None) -> None:
    """The main job fully offline, on a tiny random Phi-3 served from a local hub (`make demo`);
    its quality gates are relaxed because the tiny model's weights are random.
    """
    from cli import jobs  # lazy: Prefect, torch (the tiny model's build)

    run_job(jobs.demo_job, eval_set=eval_set)
