"""What each CLI command runs: one pipeline, on the real source (`make run`) or offline (`demo`).

Every job checks first that its source can be fetched at all, so an offline machine or a typo
fails in seconds instead of after the orchestration layer has started.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from phi3ops.settings import get_settings
from phi3ops.sources import ONNX_REPO_ID, PYTORCH_REPO_ID, Variant

if TYPE_CHECKING:
    from tasks.evaluation import EvalSummary
    from tasks.hub import FetchResult
    from tasks.packaging import Flavor
    from tasks.registry import RegisteredVersion


def _check_source(repo_id: str, *, revision: str, variant: Variant, target_dir: Path | None = None):
    from tasks.hub import check_fetchable, resolve_hf_token

    check_fetchable(
        repo_id,
        revision=revision,
        variant=variant,
        target_root=target_dir,
        token=resolve_hf_token(),
    )


def fetch_job(
    repo_id: str,
    *,
    revision: str = "main",
    variant: Variant = Variant.ONNX_CPU_INT4,
    target_dir: Path | None = None,
    build_onnx: bool = False,
) -> FetchResult:
    """Check the source, then run the fetch flow."""
    _check_source(repo_id, revision=revision, variant=variant, target_dir=target_dir)
    from flows.fetch import fetch_flow

    return fetch_flow(
        repo_id=repo_id,
        revision=revision,
        variant=variant,
        target_dir=target_dir,
        build_onnx=build_onnx,
    )


def package_job(
    *,
    flavor: Flavor | str,
    repo_id: str | None = None,
    revision: str = "main",
    variant: Variant | None = None,
    model_name: str | None = None,
) -> RegisteredVersion:
    """Check the inputs and the source, then run the package flow (fetch -> log -> register)."""
    from flows.package import package_flow, source_variant
    from tasks.packaging import Flavor
    from tasks.registry import resolve_model_name

    chosen = Flavor(flavor)
    resolve_model_name(model_name)
    fetch_variant, _ = source_variant(chosen, variant)
    repo_id = repo_id or fetch_variant.default_repo_id
    _check_source(repo_id, revision=revision, variant=fetch_variant)
    return package_flow(
        flavor=chosen, repo_id=repo_id, revision=revision, variant=variant, model_name=model_name
    )


def evaluate_job(
    *,
    model_uri: str | None = None,
    eval_set: str | None = None,
    compare_to_alias: str = "champion",
    force: bool = False,
) -> EvalSummary:
    """Check the model URI and the eval set, then run the evaluate flow.

    Args:
        model_uri: The version to evaluate; defaults to ``models:/<registered model>@candidate``.
        eval_set: Eval set name or path; the default set when None.
        compare_to_alias: Whose evaluation on the same eval set to compare with.
        force: Generate and score again even when the version has an evaluation on this set.
    """
    from flows.evaluate import evaluate_flow
    from phi3ops.evalset import load_eval_set, resolve_eval_set
    from tasks.evaluation import resolve_model
    from tasks.registry import CANDIDATE_ALIAS

    uri = model_uri or f"models:/{get_settings().registered_model_name}@{CANDIDATE_ALIAS}"
    resolve_model(uri)  # an unknown model, alias or version fails before Prefect starts
    load_eval_set(resolve_eval_set(eval_set))  # so does a missing or invalid eval set
    return evaluate_flow(
        model_uri=uri, eval_set=eval_set, compare_to_alias=compare_to_alias, reuse=not force
    )


def promote_job(
    *,
    model_name: str | None = None,
    candidate: str = "candidate",
    eval_set: str | None = None,
    gates: list[str] | None = None,
    evaluate_champion: bool = True,
):
    """Parse ``key=value`` gate overrides, check them, then run the promote flow."""
    from phi3ops.errors import InvalidInputError
    from tasks.promotion import GatePolicy

    overrides: dict[str, float] = {}
    for item in gates or []:
        key, sep, value = item.partition("=")
        try:
            overrides[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise InvalidInputError(
                f"--gate {item!r} is not key=number, e.g. --gate min_pass_rate=0.7."
            )
    GatePolicy.from_settings(**overrides)  # unknown gates fail before Prefect starts
    from flows.promote import promote_flow

    return promote_flow(
        model_name=model_name,
        candidate=candidate,
        eval_set=eval_set,
        evaluate_champion=evaluate_champion,
        gates=overrides,
    )


def rollback_job(
    *, model_name: str | None = None, to_version: str | None = None, smoke_eval_set: str | None
):
    """Run the rollback flow (champion <- previous, then a smoke evaluation)."""
    from flows.rollback import rollback_flow

    return rollback_flow(
        model_name=model_name, to_version=to_version, smoke_eval_set=smoke_eval_set
    )


def main_job() -> RegisteredVersion:
    """The pipeline on the real Phi-3 ONNX int4 repository (later stages extend this)."""
    registered = package_job(flavor="onnx", repo_id=ONNX_REPO_ID)
    _print_next_steps(registered)
    return registered


def demo_job() -> RegisteredVersion:
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
        hub.add_repo(PYTORCH_REPO_ID, repos.pytorch_dir)
        os.environ["PHI3OPS_HF_ENDPOINT"] = hub.url
        get_settings.cache_clear()
        print(f"Local hub serving the tiny Phi-3 at {hub.url}")
        return main_job()


def _print_next_steps(registered: RegisteredVersion) -> None:
    from phi3ops.tracking import tracking_uri

    settings = get_settings()
    state = "Reused" if registered.reused else "Registered"
    print(
        f"\n{state} {registered.model_name} version {registered.version} "
        f"({registered.flavor.value}), aliases: {', '.join(registered.aliases) or '-'}\n"
        f"  tracking store: {tracking_uri()}\n"
        f"  look at it:     mlflow ui --backend-store-uri {tracking_uri()}\n"
        f"  serve it:       PHI3OPS_DATA_DIR={settings.data_dir} phi3ops serve "
        f"--model-name {registered.model_name} --alias candidate"
    )
