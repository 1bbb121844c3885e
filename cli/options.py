"""What every command shares: the options written once (``Annotated``), and `run_job`, which
turns a phi3ops error into its one-line message and exit code 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from phi3ops.errors import Phi3OpsError
from phi3ops.sources import Flavor, Variant

T = TypeVar("T")

ModelNameOption = Annotated[
    str | None,
    typer.Option(help="Registered model name (default: PHI3OPS_REGISTERED_MODEL_NAME)."),
]
EvalSetOption = Annotated[
    str | None,
    typer.Option(help="Eval set name in evals/ or path of a .jsonl file (default: phi3-default)."),
]
GateOption = Annotated[
    list[str] | None,
    typer.Option(
        help="Override a gate for this run, e.g. --gate min_pass_rate=0.7 (repeatable).",
    ),
]
ThresholdOption = Annotated[
    list[str] | None,
    typer.Option(
        help="Override a threshold, e.g. --threshold max_error_rate=0.01 (repeatable).",
    ),
]
EvaluateChampionOption = Annotated[
    bool,
    typer.Option(help="Evaluate the champion on the eval set first when it has no evaluation."),
]
RepoIdOption = Annotated[
    str | None,
    typer.Option(help="Hub repository; defaults to the variant's Microsoft repo."),
]
RevisionOption = Annotated[str, typer.Option(help="Branch, tag or commit sha.")]
FlavorOption = Annotated[
    Flavor,
    typer.Option(help="onnx (onnxruntime-genai pyfunc) or transformers (llm/v1/chat)."),
]
VariantOption = Annotated[
    Variant | None,
    typer.Option(
        help="What to fetch; defaults to onnx-cpu-int4 for onnx (pytorch is built to ONNX "
        "int4), pytorch for transformers."
    ),
]


def prepare_prefect() -> None:
    """Environment defaults for Prefect and MLflow on a small, offline machine."""
    # Prefect's temporary local server needs 13-18 s to start here, close to its 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Its telemetry write races the first migration of a fresh SQLite db ("database is locked")
    # and cannot leave an offline machine anyway.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def run_job(job: Callable[..., T], /, **kwargs: object) -> T:
    """Run a job; a phi3ops error becomes its message and exit code 2, not a traceback."""
    prepare_prefect()
    try:
        return job(**kwargs)
    except Phi3OpsError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc
