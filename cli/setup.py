"""``phi3ops setup``: what the configured Prefect server needs before the deployments run on it
(`deployments.setup`): the work pool, one alias limit per model, the variables of the code pull.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.options import run_job
from phi3ops.errors import InvalidInputError


def setup(
    model_name: Annotated[
        list[str] | None,
        typer.Option(
            help="Registered model whose aliases the pipeline moves (repeatable; default: "
            "PHI3OPS_REGISTERED_MODEL_NAME). Each gets the one-slot limit phi3ops-aliases-<name>."
        ),
    ] = None,
    pool: Annotated[str, typer.Option(help="Process work pool to create.")] = "phi3ops-process",
    env: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KEY=VALUE",
            help="Environment default for every flow run of the pool, e.g. "
            "--env MLFLOW_TRACKING_URI=http://mlflow:5000 (repeatable; merged into the pool's "
            "base job template).",
        ),
    ] = None,
    repository: Annotated[
        str | None,
        typer.Option(
            help="Git URL (or path) the workers clone the code from: the Prefect variable "
            "phi3ops_repository (default: kept; when missing, this clone's path)."
        ),
    ] = None,
    branch: Annotated[
        str | None,
        typer.Option(
            help="Branch the workers clone: the Prefect variable phi3ops_branch (default: "
            "kept; when missing, this clone's current branch)."
        ),
    ] = None,
    clone: Annotated[
        Path | None,
        typer.Option(help="Clone whose path and branch are the defaults (default: here)."),
    ] = None,
) -> None:
    """Create or update, by name, on the Prefect server at PREFECT_API_URL: the work pool, the
    alias concurrency limits and the variables prefect.yaml's git_clone pull step reads.
    """
    from deployments import setup as server_setup  # lazy: Prefect
    from phi3ops.settings import get_settings

    def apply() -> list[server_setup.SetupStep]:
        return server_setup.setup_server(
            model_names=model_name or [get_settings().registered_model_name],
            pool=pool,
            pool_env=_pairs(env or []),
            repository=repository,
            branch=branch,
            clone=clone,
        )

    for step in run_job(apply):
        typer.echo(str(step))


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--env {item!r}: expected KEY=VALUE.")
        pairs[key] = value
    return pairs
