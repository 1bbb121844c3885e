"""The jobs behind `make run` and `make demo`: one pipeline, two sources.

Both check first that the source can be fetched at all, so an offline machine fails in seconds
instead of after the orchestration layer has started.
"""

from __future__ import annotations

import os
from pathlib import Path

from phi3ops.settings import get_settings
from phi3ops.sources import ONNX_REPO_ID, Variant


def fetch_job(
    repo_id: str,
    *,
    revision: str = "main",
    variant: Variant = Variant.ONNX_CPU_INT4,
    target_dir: Path | None = None,
    build_onnx: bool = False,
):
    """Check the source is reachable (or cached), then run the fetch flow."""
    from tasks.hub import check_fetchable, resolve_hf_token

    check_fetchable(
        repo_id,
        revision=revision,
        variant=variant,
        target_root=target_dir,
        token=resolve_hf_token(),
    )
    from flows.fetch import fetch_flow

    return fetch_flow(
        repo_id=repo_id,
        revision=revision,
        variant=variant,
        target_dir=target_dir,
        build_onnx=build_onnx,
    )


def main_job():
    """The pipeline on the real Phi-3 ONNX int4 repository (later stages extend this)."""
    return fetch_job(ONNX_REPO_ID, variant=Variant.ONNX_CPU_INT4)


def demo_job():
    """The same job, offline: a tiny random Phi-3 built locally and served from a local hub."""
    from phi3ops.offline.local_hub import LocalHub
    from phi3ops.offline.tiny_phi3 import ensure_tiny_phi3

    # A separate data dir, so the tiny model can never stand in for a cached real one.
    demo_dir = get_settings().data_dir / "demo"
    os.environ["PHI3OPS_DATA_DIR"] = str(demo_dir)
    get_settings.cache_clear()
    repos = ensure_tiny_phi3(get_settings().cache_dir / "tiny-phi3")
    with LocalHub() as hub:
        hub.add_repo(ONNX_REPO_ID, repos.onnx_dir)
        hub.add_repo(Variant.PYTORCH.default_repo_id, repos.pytorch_dir)
        os.environ["PHI3OPS_HF_ENDPOINT"] = hub.url
        get_settings.cache_clear()
        print(f"Local hub serving the tiny Phi-3 at {hub.url}")
        return main_job()
