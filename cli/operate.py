"""Commands that run the served model and watch it: serve, monitor, automations.

Heavy modules (MLflow, Prefect, great-expectations) are imported inside each command, so
``phi3ops --help`` stays instant.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from cli.options import ModelNameOption, ThresholdOption, run_job
from phi3ops.names import CHAMPION_ALIAS
from phi3ops.settings import get_settings


def serve(
    model_name: ModelNameOption = None,
    alias: Annotated[str | None, typer.Option(help="Alias to serve (default: champion).")] = None,
    version: Annotated[
        str | None, typer.Option(help="Version to serve instead of an alias.")
    ] = None,
    model_uri: Annotated[
        str | None, typer.Option(help="Any MLflow model URI instead of the above.")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0 for all).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5001,
    workers: Annotated[
        int, typer.Option(help="Server worker processes (each loads the model).")
    ] = 1,
    timeout: Annotated[
        int | None,
        typer.Option(
            help="Seconds a request may take before it is cancelled with a 504; SIGTERM drains "
            "requests in flight for as long (default: MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, "
            "60).",
        ),
    ] = None,
    max_batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="ONNX flavor: most requests generated together (default 8)."),
    ] = None,
    max_queue: Annotated[
        int | None,
        typer.Option(
            min=1, help="ONNX flavor: requests that may wait; one more gets a 429 (default 64)."
        ),
    ] = None,
    batch_wait_ms: Annotated[
        float | None,
        typer.Option(
            min=0, help="ONNX flavor: how long a request waits for others to join (default 5)."
        ),
    ] = None,
    poll_interval: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds between looks at the alias served; when it moves, the new version is "
            "loaded beside the old one and takes over new requests (0: never look; default: "
            "PHI3OPS_SERVE_POLL_S, 30).",
        ),
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="Require 'Authorization: Bearer <key>' on every route but the probes and "
            "/metrics (PHI3OPS_SERVE_OPEN_PATHS), the key read from the environment variable "
            "NAME (default: the Prefect Secret block PHI3OPS_SERVE_API_KEY_SECRET, if set; "
            "else no key).",
        ),
    ] = None,
) -> None:
    """Serve a registered model over HTTP: MLflow's POST /invocations and OpenAI's
    POST /v1/chat/completions and GET /v1/models.
    """
    from phi3ops.serving import server  # lazy: MLflow
    from phi3ops.serving.auth import API_KEY_ENV, resolve_api_key
    from phi3ops.serving.metrics import MULTIPROC_DIR_ENV

    def serve_forever() -> int:
        # The key reaches the workers in their environment, never on a command line.
        key = resolve_api_key(
            env_name=api_key_env, secret_block=get_settings().serve_api_key_secret
        )
        extra_env = {API_KEY_ENV: key} if key else {}
        uri = model_uri or server.model_uri_for(
            model_name or get_settings().registered_model_name,
            alias=None if version else (alias or CHAMPION_ALIAS),
            version=version,
        )
        # SIGTERM (a supervisor, `kill`) must stop the server too, not orphan it; a `kill -9`
        # of this process stops it as well (start_server arms the parent-death signal).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        batching = {
            key: value
            for key, value in zip(
                server.BATCHING_KEYS, (max_batch_size, max_queue, batch_wait_ms), strict=True
            )
            if value is not None
        }
        metrics_dir = None
        if workers > 1:  # every worker's counters, added up by whichever answers /metrics
            parent = get_settings().data_dir / "serving"
            parent.mkdir(parents=True, exist_ok=True)
            metrics_dir = Path(tempfile.mkdtemp(prefix="metrics-", dir=parent))
            extra_env[MULTIPROC_DIR_ENV] = str(metrics_dir)
        try:
            process = server.start_server(
                uri,
                host=host,
                port=port,
                workers=workers,
                timeout_s=timeout,
                batching=batching,
                poll_s=poll_interval,
                extra_env=extra_env,
            )
            typer.echo(
                f"Serving {uri} on http://{host}:{port}/invocations and "
                f"http://{host}:{port}/v1/chat/completions"
                f"{' (API key required)' if key else ''} (Ctrl-C stops)"
            )
            try:
                return process.wait()
            except KeyboardInterrupt:
                return 0
            finally:
                server.stop_server(process)
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    code = run_job(serve_forever)
    if code:  # the server stopped on its own: it could not start (its output says why) or died
        typer.secho(f"error: the model server exited with code {code}", fg="red", err=True)
        raise typer.Exit(code=code if code > 0 else 1)


def monitor(
    model_name: ModelNameOption = None,
    alias: Annotated[
        str, typer.Option(help="Alias (or version) whose records to check.")
    ] = CHAMPION_ALIAS,
    window_minutes: Annotated[
        int | None,
        typer.Option(help="How far back to read (default: PHI3OPS_MONITOR_WINDOW_MINUTES)."),
    ] = None,
    baseline_eval_set: Annotated[
        str | None,
        typer.Option(help="Eval set whose evaluation of the version is the drift baseline."),
    ] = None,
    threshold: ThresholdOption = None,
) -> None:
    """Check a version's recent inference records against the expectation suite (exit 2 when
    it fails, 3 when there are too few records to judge).
    """
    from cli import jobs  # lazy: Prefect, great-expectations

    report = run_job(
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


@automations_app.command("apply")
def automations_apply(
    rollback: Annotated[
        bool | None,
        typer.Option(
            "--rollback/--no-rollback",
            help="Also run the rollback deployment when monitoring fails "
            "(default: PHI3OPS_MONITOR_ROLLBACK_ON_FAILURE).",
        ),
    ] = None,
    notification_block: Annotated[
        str | None,
        typer.Option(
            help="Notification block to notify through (default: PHI3OPS_NOTIFICATION_BLOCK)."
        ),
    ] = None,
    create_webhook_block: Annotated[
        str | None,
        typer.Option(
            "--create-webhook-block",
            metavar="URL",
            help="First save a custom-webhook notification block under that name, POSTing "
            "JSON {subject, body} to URL (replaces a block of that name).",
        ),
    ] = None,
) -> None:
    """Create or update (by name) the automations on the Prefect server at PREFECT_API_URL:
    promoted -> run the monitor deployment; monitoring failed -> notify (and roll back).
    """
    from deployments import automations  # lazy: Prefect

    def apply() -> list[automations.AppliedAutomation]:
        if create_webhook_block:
            block_id = automations.create_webhook_block(
                create_webhook_block, name=notification_block
            )
            typer.echo(f"notification block {block_id} -> {create_webhook_block}")
        return automations.apply_automations(
            rollback_on_failure=rollback, notification_block=notification_block
        )

    for applied in run_job(apply):
        typer.echo(f"{applied.action} automation {applied.name} ({applied.id})")
