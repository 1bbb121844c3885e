"""Where MLflow records runs, models and artifacts: one function every stage calls first.

The first use of a store in a process also makes it ready, within bounded time: a fresh SQLite
store gets its tables under a file lock (two processes creating them at once crash one of them),
and a tracking server must answer within ``PHI3OPS_TRACKING_TIMEOUT_S`` (MLflow's own retries
would take about four minutes to give up on one that is down).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

import httpx
from filelock import FileLock

from phi3ops.errors import TrackingUnreachableError
from phi3ops.settings import get_settings


def tracking_uri() -> str:
    """``PHI3OPS_MLFLOW_TRACKING_URI``, else ``MLFLOW_TRACKING_URI``, else SQLite in the data dir.

    MLflow 3.17 refuses the old ``./mlruns`` file store unless forced, so the embedded default
    is a SQLite database; production points this at a tracking server.
    """
    settings = get_settings()
    explicit = settings.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        return explicit
    return f"sqlite:///{settings.data_dir / 'mlflow.db'}"


def ui_url(page: str) -> str | None:
    """The MLflow UI's address of ``page`` (a route of its hash router, e.g. ``runs/<id>``)
    when the tracking store is an http(s) server, which serves that UI; None for a local store,
    whose UI (``mlflow ui``) has no address known here.
    """
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/{page.lstrip('/')}"


def run_url(run_id: str) -> str | None:
    """The MLflow UI page of a run (its direct route finds the experiment), or None."""
    return ui_url(f"runs/{run_id}")


def version_url(model_name: str, version: str | int) -> str | None:
    """The MLflow UI page of a registered model version, or None."""
    return ui_url(f"models/{model_name}/versions/{version}")


def configure_tracking(experiment_name: str | None = None) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id.

    With the embedded SQLite store, artifacts go to ``<data dir>/mlartifacts`` rather than a
    folder relative to whatever the current directory happens to be.
    """
    import mlflow

    settings = get_settings()
    uri = use_tracking_store()
    name = experiment_name or settings.experiment_name
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            artifact_location = (settings.data_dir / "mlartifacts").as_uri()
        try:
            experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException:
            # Another process (a second server worker, a parallel flow run) created it first.
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def use_tracking_store() -> str:
    """Point MLflow's tracking and registry URIs at the project's store (no experiment change).

    Returns:
        The tracking URI.
    """
    import mlflow

    uri = tracking_uri()
    _set_uris_without_exporting(mlflow, uri)
    _make_ready(uri)
    return uri


@functools.cache  # once per store and process; a failure is not cached, so it is tried again
def _make_ready(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        _create_sqlite_tables(uri)
    elif uri.startswith(("http://", "https://")):
        _check_server_answers(uri)


def _create_sqlite_tables(uri: str) -> None:
    """Create a SQLite store's tables, one process at a time.

    MLflow creates them on first use without a lock; two processes doing so at once race on the
    same migrations and one fails ("duplicate column name").
    """
    from mlflow import MlflowClient

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.init.lock"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # the tracking store's tables
        client.search_registered_models(max_results=1)  # the registry's


def _check_server_answers(uri: str) -> None:
    """Fail fast, in one line, when the tracking server does not answer; bound MLflow's retries.

    Raises:
        TrackingUnreachableError: No answer from ``uri`` within the configured timeout.
    """
    settings = get_settings()
    # Later calls go through MLflow's HTTP client; its default retries wait minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.tracking_max_retries))
    timeout = settings.tracking_timeout_s
    try:
        # Any HTTP answer means a server is there; whether it is MLflow's, its API will say.
        httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise TrackingUnreachableError(
            f"The MLflow tracking server {uri} did not answer ({type(exc).__name__}: {exc}; "
            f"waited at most {timeout:g} s). Start it, or point MLFLOW_TRACKING_URI (or "
            f"PHI3OPS_MLFLOW_TRACKING_URI) at one that runs; PHI3OPS_TRACKING_TIMEOUT_S sets "
            f"how long to wait."
        ) from exc


_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _set_uris_without_exporting(mlflow: ModuleType, uri: str) -> None:
    """``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``: undo that.

    Otherwise the first store a process used would pose as the user's explicit choice in
    `tracking_uri` and win over a later ``PHI3OPS_DATA_DIR``.
    """
    saved = {name: os.environ.get(name) for name in _URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
