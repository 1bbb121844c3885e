"""Stage 2 — package + register: a fetched snapshot becomes registry version N, alias @candidate.

Reads like the pipeline: (fetch, when no snapshot is given) → plan → reuse the registered
version with the same package key, or log → register (lineage tags, alias ``candidate``).
"""

from __future__ import annotations

from prefect import flow

from flows.fetch import fetch_flow
from phi3ops.errors import InvalidInputError
from phi3ops.names import CANDIDATE_ALIAS
from phi3ops.registry import resolve_model_name
from phi3ops.sources import Flavor, Variant, source_variant
from tasks.hub import FetchResult
from tasks.packaging import log_onnx_model_task, log_transformers_model_task, plan_package_task
from tasks.registry import RegisteredVersion, find_registered_version_task, register_version_task


@flow(name="package", log_prints=True)
def package_flow(
    fetched: FetchResult | None = None,
    *,
    flavor: Flavor = Flavor.ONNX,
    repo_id: str | None = None,
    revision: str = "main",
    variant: Variant | None = None,
    model_name: str | None = None,
) -> RegisteredVersion:
    """Package a snapshot as an MLflow model and register it (reusing an identical version).

    Args:
        fetched: A snapshot from the fetch flow; when None, it is fetched first from
            ``repo_id@revision``.
        flavor: ``onnx`` (onnxruntime-genai pyfunc) or ``transformers`` (``llm/v1/chat``).
        repo_id: Hub repository to fetch; defaults to the variant's Microsoft repository.
        revision: Branch, tag or commit sha to fetch.
        variant: What to fetch; defaults to ``onnx-cpu-int4`` for the onnx flavor (``pytorch``
            is built to ONNX int4 first) and ``pytorch`` for the transformers flavor, which
            needs it.
        model_name: Registered model; defaults to ``PHI3OPS_REGISTERED_MODEL_NAME``.

    Returns:
        The registered version (``reused`` when the same package was registered before).
    """
    flavor = Flavor(flavor)
    model_name = resolve_model_name(model_name)  # fail before fetching anything
    if fetched is None:
        variant, build_onnx = source_variant(flavor, variant)
        fetched = fetch_flow(
            repo_id=repo_id or variant.default_repo_id,
            revision=revision,
            variant=variant,
            build_onnx=build_onnx,
        )
    elif repo_id is not None or variant is not None:
        raise InvalidInputError(
            "Pass either a fetched snapshot or repo_id/variant to fetch, not both."
        )

    plan = plan_package_task(fetched, flavor)
    registered = find_registered_version_task(plan, model_name=model_name)
    if registered is not None:
        print(
            f"{fetched.repo_id}@{fetched.commit_sha[:12]} ({flavor.value}) is already "
            f"{registered.model_uri}: reused, nothing logged."
        )
        return registered

    log_task = log_transformers_model_task if flavor is Flavor.TRANSFORMERS else log_onnx_model_task
    logged = log_task(fetched)
    registered = register_version_task(logged, fetched, model_name=model_name)
    print(
        f"Packaged {fetched.repo_id}@{fetched.commit_sha[:12]} ({flavor.value}, "
        f"{logged.artifact_bytes:,} artifact bytes) as {registered.model_uri} "
        f"(@{CANDIDATE_ALIAS}: {CANDIDATE_ALIAS in registered.aliases})"
    )
    return registered
