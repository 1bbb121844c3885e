"""The logged model's copy of the weights: its size, and sharing it with the snapshot.

MLflow's pyfunc ``artifacts=`` copies the ONNX folder into the artifact store (its
``_copy_file_or_tree``, then the store's ``log_artifacts``); it offers no copy function to pass.
So after it logs, `share_logged_weights` replaces each copied file whose bytes equal the
snapshot's (already re-hashed against its manifest before packaging) by a hard link to it,
under the same name, when the artifact store is local and on the snapshot's filesystem
(`phi3ops.weights_links`). Remote stores and other filesystems keep MLflow's copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from phi3ops.serving.signatures import MODEL_DIR_ARTIFACT
from phi3ops.weights_links import SharedFiles, local_artifact_dir, share_identical_files

__all__ = ["artifact_bytes", "share_logged_weights"]

logger = logging.getLogger(__name__)


def artifact_bytes(artifact_uri: str) -> int:
    """Total size of every file under an artifact URI (any artifact store MLflow supports)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(artifact_uri)
    total = 0
    pending: list[str | None] = [None]  # None: the root
    while pending:
        for entry in repo.list_artifacts(pending.pop()):
            if entry.is_dir:
                pending.append(entry.path)
            else:
                total += entry.file_size or 0
    return total


def share_logged_weights(artifact_location: str, weights_dir: Path) -> SharedFiles | None:
    """Hard-link the logged pyfunc's ``model_dir`` artifact files to ``weights_dir``'s.

    Returns:
        What was linked, or None when there is nothing to share: a remote artifact store, or a
        logged model without a ``model_dir`` artifact (the transformers flavor re-serialises
        its weights, so no file equals the snapshot's).
    """
    model_dir = local_artifact_dir(artifact_location)
    if model_dir is None or not (model_dir / "MLmodel").is_file():
        return None
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8"))
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts") or {}
    relative = (artifacts.get(MODEL_DIR_ARTIFACT) or {}).get("path")
    if not relative or not (model_dir / relative).is_dir():
        return None
    shared = share_identical_files(weights_dir, model_dir / relative)
    logger.info(
        "The logged model shares %d files (%d bytes) with %s; %d files (%d bytes) are copies",
        shared.linked_files,
        shared.linked_bytes,
        weights_dir,
        shared.copied_files,
        shared.copied_bytes,
    )
    return shared
