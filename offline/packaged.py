"""Both flavors of a locally built Phi-3, fetched from a local hub and registered.

What tests of later stages and the benchmarks start from: the same plain task functions the
flows run (fetch -> log -> register), without the orchestration layer.
"""

from __future__ import annotations

from offline.local_hub import LocalHub
from offline.tiny_phi3 import TinyPhi3Repos
from phi3ops.sources import ONNX_REPO_ID, PYTORCH_REPO_ID, Flavor, Variant
from tasks.hub import fetch_snapshot
from tasks.packaging import log_model
from tasks.registry import RegisteredVersion, register_version


def register_both_flavors(
    repos: TinyPhi3Repos, *, model_name_prefix: str | None = None, model_name: str | None = None
) -> dict[str, RegisteredVersion]:
    """Register ``repos`` as ``<prefix>-onnx`` and ``<prefix>-transformers``, or both (ONNX
    first) as versions of one ``model_name``, in the store `configure_tracking` points at.

    Returns:
        The registered versions, keyed by flavor value (``"onnx"``, ``"transformers"``).
    """
    if (model_name_prefix is None) == (model_name is None):
        raise ValueError("give exactly one of model_name_prefix and model_name")
    registered = {}
    with LocalHub() as hub:
        hub.add_repo(ONNX_REPO_ID, repos.onnx_dir)
        hub.add_repo(PYTORCH_REPO_ID, repos.pytorch_dir)
        for flavor, repo_id, variant in [
            (Flavor.ONNX, ONNX_REPO_ID, Variant.ONNX_CPU_INT4),
            (Flavor.TRANSFORMERS, PYTORCH_REPO_ID, Variant.PYTORCH),
        ]:
            fetched = fetch_snapshot(repo_id, variant=variant, endpoint=hub.url)
            logged = log_model(fetched, flavor=flavor)
            name = model_name or f"{model_name_prefix}-{flavor.value}"
            registered[flavor.value] = register_version(logged, fetched, model_name=name)
    return registered
