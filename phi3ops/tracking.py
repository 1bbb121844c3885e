"""Where MLflow records runs, models and artifacts: one function every stage calls first."""

from __future__ import annotations

import os
from types import ModuleType

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
    return uri


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
