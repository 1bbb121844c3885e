"""The ``phi3ops`` command line: each command runs one flow (or the whole job) on this machine."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import typer

from phi3ops.errors import Phi3OpsError
from phi3ops.settings import get_settings
from phi3ops.sources import Variant

T = TypeVar("T")

app = typer.Typer(
    help="Phi-3 from the Hugging Face hub to a governed, evaluated model in the MLflow registry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _prepare_prefect() -> None:
    # Prefect's temporary local server needs 13-18 s to start here, close to its 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Its telemetry write races the first migration of a fresh SQLite db ("database is locked")
    # and cannot leave an offline machine anyway.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class FlavorOption(StrEnum):
    """``tasks.packaging.Flavor``, mirrored so the CLI starts without importing Prefect
    (a unit test keeps the two equal)."""

    ONNX = "onnx"
    TRANSFORMERS = "transformers"


# Options shared by several commands.
MODEL_NAME_OPTION = typer.Option(
    None, help="Registered model name (default: PHI3OPS_REGISTERED_MODEL_NAME)."
)
EVAL_SET_OPTION = typer.Option(
    None, help="Eval set name in evals/ or path of a .jsonl file (default: phi3-default)."
)
GATE_OPTION = typer.Option(
    [], help="Override a gate for this run, e.g. --gate min_pass_rate=0.7 (repeatable)."
)
EVALUATE_CHAMPION_OPTION = typer.Option(
    True, help="Evaluate the champion on the eval set first when it has no evaluation."
)


def _run(job: Callable[..., T], /, **kwargs: object) -> T:
    """Run a job; a phi3ops error becomes its message and exit code 2, not a traceback."""
    _prepare_prefect()
    try:
        return job(**kwargs)
    except Phi3OpsError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc


@app.command()
def fetch(
    repo_id: str = typer.Option(
        None, help="Hub repository; defaults to the variant's Microsoft repo."
    ),
    revision: str = typer.Option("main", help="Branch, tag or commit sha."),
    variant: Variant = typer.Option(Variant.ONNX_CPU_INT4, help="Which files to fetch."),
    target_dir: Path | None = typer.Option(None, help="Snapshot root (default: data dir)."),
    build_onnx: bool = typer.Option(False, help="Build ONNX int4 from fetched PyTorch weights."),
) -> None:
    """Fetch a pinned, verified snapshot (the fetch flow)."""
    from phi3ops import jobs

    _run(
        jobs.fetch_job,
        repo_id=repo_id or variant.default_repo_id,
        revision=revision,
        variant=variant,
        target_dir=target_dir,
        build_onnx=build_onnx,
    )


@app.command()
def package(
    flavor: FlavorOption = typer.Option(
        FlavorOption.ONNX, help="onnx (onnxruntime-genai pyfunc) or transformers (llm/v1/chat)."
    ),
    repo_id: str = typer.Option(
        None, help="Hub repository; defaults to the variant's Microsoft repo."
    ),
    revision: str = typer.Option("main", help="Branch, tag or commit sha."),
    variant: Variant | None = typer.Option(
        None,
        help="What to fetch; defaults to onnx-cpu-int4 for onnx (pytorch is built to ONNX "
        "int4), pytorch for transformers.",
    ),
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Fetch, package and register a model version, aliased @candidate (the package flow)."""
    from phi3ops import jobs

    registered = _run(
        jobs.package_job,
        flavor=flavor.value,
        repo_id=repo_id,
        revision=revision,
        variant=variant,
        model_name=model_name,
    )
    state = "reused" if registered.reused else "registered"
    typer.echo(f"{state} {registered.model_uri} ({registered.flavor.value})")


@app.command()
def evaluate(
    model_uri: str | None = typer.Option(
        None,
        help="models:/<name>@<alias> or models:/<name>/<version> "
        "(default: models:/<PHI3OPS_REGISTERED_MODEL_NAME>@candidate).",
    ),
    eval_set: str | None = EVAL_SET_OPTION,
    compare_to: str = typer.Option("champion", help="Alias whose evaluation to compare with."),
    force: bool = typer.Option(
        False, "--force", help="Evaluate again even if this version has an evaluation on the set."
    ),
) -> None:
    """Evaluate a registered version on an eval set, compared with @champion (evaluate flow)."""
    from phi3ops import jobs

    summary = _run(
        jobs.evaluate_job,
        model_uri=model_uri,
        eval_set=eval_set,
        compare_to_alias=compare_to,
        force=force,
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


@app.command()
def promote(
    model_name: str | None = MODEL_NAME_OPTION,
    candidate: str = typer.Option("candidate", help="Version number or alias to promote."),
    eval_set: str | None = typer.Option(None, help="Eval set both evaluations must share."),
    gate: list[str] = GATE_OPTION,
    evaluate_champion: bool = EVALUATE_CHAMPION_OPTION,
) -> None:
    """Promote a version to @champion if its gates pass (old champion -> @previous)."""
    from phi3ops import jobs

    decision = _run(
        jobs.promote_job,
        model_name=model_name,
        candidate=candidate,
        eval_set=eval_set,
        gates=gate,
        evaluate_champion=evaluate_champion,
    )
    typer.echo(
        f"{'promoted' if decision.promote else 'rejected'}: {decision.model_name} "
        f"v{decision.version}"
    )
    for reason in decision.reasons:
        typer.echo(f"  {reason}")


@app.command()
def rollback(
    model_name: str | None = MODEL_NAME_OPTION,
    to_version: str | None = typer.Option(None, help="Version to restore instead of @previous."),
    smoke_eval_set: str = typer.Option("smoke", help="Eval set for the smoke evaluation."),
    smoke: bool = typer.Option(True, help="Smoke-evaluate the restored champion."),
) -> None:
    """@champion <- @previous (or --to-version), then a smoke evaluation of it."""
    from phi3ops import jobs

    state = _run(
        jobs.rollback_job,
        model_name=model_name,
        to_version=to_version,
        smoke_eval_set=smoke_eval_set if smoke else None,
    )
    typer.echo(f"{state.model_name}: champion is now version {state.champion}")


@app.command()
def serve(
    model_name: str | None = MODEL_NAME_OPTION,
    alias: str | None = typer.Option(None, help="Alias to serve (default: champion)."),
    version: str | None = typer.Option(None, help="Version to serve instead of an alias."),
    model_uri: str | None = typer.Option(None, help="Any MLflow model URI instead of the above."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(5001, help="Port to listen on."),
    workers: int = typer.Option(1, help="Server worker processes (each loads the model)."),
) -> None:
    """Serve a registered model over HTTP (MLflow's scoring server, POST /invocations)."""
    from phi3ops.serving import server

    def serve_forever() -> None:
        uri = model_uri or server.model_uri_for(
            model_name or get_settings().registered_model_name,
            alias=None if version else (alias or "champion"),
            version=version,
        )
        # SIGTERM (a supervisor, `kill`) must stop the server too, not orphan it.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        process = server.start_server(uri, host=host, port=port, workers=workers)
        typer.echo(f"Serving {uri} on http://{host}:{port}/invocations (Ctrl-C stops)")
        try:
            process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop_server(process)

    _run(serve_forever)


@app.command()
def run(
    repo_id: str | None = typer.Option(
        None, help="Hub repository; defaults to the variant's Microsoft repo."
    ),
    revision: str = typer.Option("main", help="Branch, tag or commit sha."),
    flavor: FlavorOption = typer.Option(
        FlavorOption.ONNX, help="onnx (onnxruntime-genai pyfunc) or transformers (llm/v1/chat)."
    ),
    variant: Variant | None = typer.Option(
        None, help="What to fetch; defaults to onnx-cpu-int4 for onnx, pytorch for transformers."
    ),
    model_name: str | None = MODEL_NAME_OPTION,
    eval_set: str | None = EVAL_SET_OPTION,
    gate: list[str] = GATE_OPTION,
    evaluate_champion: bool = EVALUATE_CHAMPION_OPTION,
) -> None:
    """The main job: the lifecycle (fetch, package, register, evaluate, promote) on the real
    Phi-3 ONNX int4 from the Hugging Face hub (`make run`)."""
    from phi3ops import jobs

    def main() -> object:
        return jobs.main_job(
            repo_id=repo_id,
            revision=revision,
            flavor=flavor.value,
            variant=variant,
            model_name=model_name,
            eval_set=eval_set,
            gates=jobs.parse_gate_overrides(gate),
            evaluate_champion=evaluate_champion,
        )

    _run(main)


@app.command()
def demo(eval_set: str | None = EVAL_SET_OPTION) -> None:
    """The main job fully offline, on a tiny random Phi-3 served from a local hub (`make demo`);
    its quality gates are relaxed because the tiny model's weights are random."""
    from phi3ops import jobs

    _run(jobs.demo_job, eval_set=eval_set)


@app.command()
def monitor(
    model_name: str | None = MODEL_NAME_OPTION,
    alias: str = typer.Option("champion", help="Alias (or version) whose records to check."),
    window_minutes: int | None = typer.Option(
        None, help="How far back to read (default: PHI3OPS_MONITOR_WINDOW_MINUTES)."
    ),
    baseline_eval_set: str | None = typer.Option(
        None, help="Eval set whose evaluation of the version is the drift baseline."
    ),
    threshold: list[str] = typer.Option(
        [], help="Override a threshold, e.g. --threshold max_error_rate=0.01 (repeatable)."
    ),
) -> None:
    """Check a version's recent inference records against the expectation suite (exit 2 when
    it fails, 3 when there are too few records to judge)."""
    from phi3ops import jobs

    report = _run(
        jobs.monitor_job,
        model_name=model_name,
        alias=alias,
        window_minutes=window_minutes,
        baseline_eval_set=baseline_eval_set,
        thresholds=threshold,
    )
    if report.outcome == "insufficient_data":
        raise typer.Exit(code=3)


automations_app = typer.Typer(
    help="The pipeline's Prefect automations (deployments/automations.py).",
    no_args_is_help=True,
)
app.add_typer(automations_app, name="automations")


@automations_app.command("apply")
def automations_apply(
    rollback: bool | None = typer.Option(
        None,
        "--rollback/--no-rollback",
        help="Also run the rollback deployment when monitoring fails "
        "(default: PHI3OPS_MONITOR_ROLLBACK_ON_FAILURE).",
    ),
    notification_block: str | None = typer.Option(
        None, help="Notification block to notify through (default: PHI3OPS_NOTIFICATION_BLOCK)."
    ),
    create_webhook_block: str | None = typer.Option(
        None,
        "--create-webhook-block",
        metavar="URL",
        help="First save a custom-webhook notification block under that name, POSTing JSON "
        "{subject, body} to URL (replaces a block of that name).",
    ),
) -> None:
    """Create or update (by name) the automations on the Prefect server at PREFECT_API_URL:
    promoted -> run the monitor deployment; monitoring failed -> notify (and roll back)."""
    from deployments import automations

    def apply() -> list[automations.AppliedAutomation]:
        if create_webhook_block:
            block_id = automations.create_webhook_block(
                create_webhook_block, name=notification_block
            )
            typer.echo(f"notification block {block_id} -> {create_webhook_block}")
        return automations.apply_automations(
            rollback_on_failure=rollback, notification_block=notification_block
        )

    for applied in _run(apply):
        typer.echo(f"{applied.action} automation {applied.name} ({applied.id})")


if __name__ == "__main__":
    app()
