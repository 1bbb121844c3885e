"""Fetching a served model folder from any MLflow location: `check_model_uri` refuses anything
else before a byte is copied, and `download_model` resolves the URI once and copies (or, from a
local artifact store, hard-links) the model into a folder of the server's. `start_server` uses
them for the version it starts with, `phi3ops.serving.follow` for each version it switches to.
"""

from __future__ import annotations

import re
from pathlib import Path

from phi3ops.errors import InvalidInputError
from phi3ops.tracking import configure_tracking
from phi3ops.weights_links import link_local_model

#: MLflow model locations other than a local folder: the registry, a run, a remote store.
MODEL_URI = re.compile(r"^(models|runs):/.+|^[a-z][a-z0-9+.-]*://.+")


def check_model_uri(model_uri: str) -> None:
    """Refuse anything but an MLflow model location, before anything is copied.

    Accepted: ``models:/...``, ``runs:/...``, a remote store URI (``s3://``...), or a local
    folder (a path or ``file://``) holding an ``MLmodel`` file.

    Raises:
        InvalidInputError: ``model_uri`` is none of those.
    """
    local = _local_folder(model_uri)
    if local is None:
        if MODEL_URI.match(model_uri):
            return
        if "://" not in model_uri and ":/" not in model_uri:
            local = Path(model_uri).expanduser()
    if local is not None and (local / "MLmodel").is_file():
        return
    raise InvalidInputError(
        f"model_uri {model_uri!r} is not an MLflow model URI: use models:/<name>@<alias>, "
        f"models:/<name>/<version>, runs:/<run id>/<path>, a model store URI, or a local "
        f"folder that holds an MLmodel file."
    )


def download_model(model_uri: str, target: Path) -> Path:
    """Resolve ``model_uri`` once and copy (or hard-link) the model into ``target``; returns
    the model folder.

    Raises:
        InvalidInputError: ``model_uri`` is not an MLflow model location (`check_model_uri`),
            cannot be loaded, or what it points at has no MLmodel file.
    """
    check_model_uri(model_uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    configure_tracking()
    try:  # a local artifact store's files are hard-linked, not copied (phi3ops.weights_links)
        path = link_local_model(model_uri, target) or Path(
            mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(target))
        )
    except MlflowException as exc:
        raise InvalidInputError(
            f"Cannot load {model_uri}: {exc.message} Check the name and alias/version with "
            f"`mlflow ui` (or the registry of MLFLOW_TRACKING_URI)."
        ) from exc
    if not (path / "MLmodel").is_file():
        raise InvalidInputError(
            f"{model_uri} is not an MLflow model: what it points at has no MLmodel file."
        )
    return path


def _local_folder(model_uri: str) -> Path | None:
    """The folder of a ``file://`` URI, else None."""
    if model_uri.startswith("file://"):
        return Path(model_uri.removeprefix("file://")).expanduser()
    return None
