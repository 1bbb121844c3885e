"""Stage 1 — fetch: a pinned, verified snapshot of Phi-3 from the hub (optionally built to ONNX)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from phi3ops.errors import InvalidInputError
from phi3ops.settings import get_settings
from phi3ops.sources import ONNX_REPO_ID, Variant
from tasks.hub import FetchResult, fetch_snapshot_task
from tasks.onnx_build import build_onnx_int4_task


@flow(name="fetch", log_prints=True)
def fetch_flow(
    repo_id: str = ONNX_REPO_ID,
    revision: str = "main",
    variant: Variant = Variant.ONNX_CPU_INT4,
    target_dir: Path | None = None,
    build_onnx: bool = False,
) -> FetchResult:
    """Fetch ``repo_id@revision`` pinned to its commit sha; optionally build ONNX int4 from it.

    Args:
        repo_id: Hub repository, ``org/name``.
        revision: Branch, tag or commit sha.
        variant: ``onnx-cpu-int4`` (published ONNX files) or ``pytorch`` (safetensors weights).
        target_dir: Snapshot root; defaults to ``<PHI3OPS_DATA_DIR>/snapshots``.
        build_onnx: With ``variant=pytorch``, also build ONNX int4 with the onnxruntime-genai
            builder (for fine-tuned models that have no published ONNX form).

    Returns:
        The fetched snapshot; with ``build_onnx``, ``model_dir`` points at the ONNX build.
    """
    if build_onnx and Variant(variant) is not Variant.PYTORCH:
        raise InvalidInputError(
            "build_onnx needs variant='pytorch': the onnx-cpu-int4 variant is built already."
        )
    snapshot = fetch_snapshot_task(
        repo_id, revision=revision, variant=variant, target_root=target_dir
    )
    if build_onnx:
        onnx_dir = get_settings().cache_dir / "onnx-int4" / snapshot.manifest_digest[:16]
        built = build_onnx_int4_task(snapshot.model_dir, onnx_dir)
        snapshot = snapshot.model_copy(update={"model_dir": built})
    print(
        f"Fetched {snapshot.repo_id}@{snapshot.commit_sha[:12]} ({snapshot.variant.value}): "
        f"{snapshot.file_count} files, {snapshot.total_bytes:,} bytes "
        f"({snapshot.downloaded_bytes:,} downloaded) -> {snapshot.model_dir}"
    )
    return snapshot
