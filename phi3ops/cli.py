"""The ``phi3ops`` command line: each command runs one flow (or the whole job) on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from phi3ops.errors import Phi3OpsError
from phi3ops.sources import Variant

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


def _fail(exc: Phi3OpsError) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


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
    from phi3ops.jobs import fetch_job

    _prepare_prefect()
    try:
        fetch_job(
            repo_id or variant.default_repo_id,
            revision=revision,
            variant=variant,
            target_dir=target_dir,
            build_onnx=build_onnx,
        )
    except Phi3OpsError as exc:
        raise _fail(exc) from exc


@app.command()
def run() -> None:
    """The main job on the real Phi-3 from the Hugging Face hub (`make run`)."""
    from phi3ops.jobs import main_job

    _prepare_prefect()
    try:
        main_job()
    except Phi3OpsError as exc:
        raise _fail(exc) from exc


@app.command()
def demo() -> None:
    """The main job fully offline, on a tiny random Phi-3 served from a local hub (`make demo`)."""
    from phi3ops.jobs import demo_job

    _prepare_prefect()
    try:
        demo_job()
    except Phi3OpsError as exc:
        raise _fail(exc) from exc


if __name__ == "__main__":
    app()
