"""Package a fetched Phi-3 snapshot as an MLflow model, in one of two flavors.

* ``onnx``: a *models-from-code* pyfunc over onnxruntime-genai, the `phi3_chat` package logged
  as ``code_paths`` beside its entry file; the ONNX int4 folder is its ``model_dir`` artifact.
* ``transformers``: MLflow's own transformers flavor, task ``llm/v1/chat``, from the PyTorch
  weights.

Either way the weights are written to the artifact store exactly once per logged model: pyfunc
``artifacts=`` copies the ONNX folder once, and the transformers flavor writes the pipeline's
weights once with ``save_pretrained`` (``save_pretrained=False`` would not help: MLflow ignores
it for a pipeline loaded from a local folder, and logging a local checkpoint *path* instead is
broken in MLflow 3.17 with transformers 5). With a local artifact store the ONNX copy is then
replaced by hard links to the snapshot's identical files (`tasks.weights_copy`).

What a package will be is decided before anything is logged (`plan_package`): the flavor, the
quantization, the wrapper code version, the exact pip requirements and a *package key* over all
of them and the source's lineage. The registry stage looks that key up first, so packaging the
same source again reuses the registered version instead of copying the weights again.

Temperature 0 on the transformers flavor: transformers 5 rejects ``temperature=0.0`` whenever
it samples, and its text-generation pipeline samples by default (``do_sample=True``,
``temperature=0.7``). The logged ``model_config`` therefore sets ``do_sample=False``: MLflow's
``llm/v1/chat`` wrapper merges request fields over ``model_config``, so a request with
``"temperature": 0.0`` decodes greedily instead of crashing. The flip side: this flavor always
decodes greedily and ignores ``temperature``/``top_p``/``top_k`` (transformers only warns).
Sampling is the ONNX flavor's business, which maps temperature 0 to greedy itself.

Resources while logging (MLflow saves to a temporary folder, uploads it, then loads the saved
model to predict the input example): disk peaks at two copies of the weights besides the
snapshot, the temporary one removed afterwards. The transformers flavor also holds the loaded
pipeline while MLflow loads its own copy to validate the example, so memory peaks at twice the
weights in their dtype (about 15 GB for Phi-3-mini in bfloat16); MLflow offers no switch to skip
that validation for an in-memory pipeline.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from phi3_chat.admission import DEFAULT_PREFILL_SLICE_S
from phi3_chat.batcher import DEFAULT_BATCH_WAIT_MS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE
from phi3ops.crash import crash_point
from phi3ops.errors import InvalidInputError, PackagingError
from phi3ops.names import LineageTag, logged_model_name
from phi3ops.serving.signatures import (
    CHAT_INPUT_EXAMPLE,
    MODEL_DIR_ARTIFACT,
    MODEL_ENTRY_FILE,
    MODEL_PACKAGE_DIR,
    ONNX_CHAT_SIGNATURE,
    REQUIREMENT_DISTRIBUTIONS,
    model_package_digest,
)
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER, Flavor, Variant
from phi3ops.tracking import configure_tracking
from tasks.hub import FetchResult, check_before_packaging
from tasks.loaded_models import releasing_models_from_code
from tasks.onnx_build import build_onnx_int4, check_pytorch_phi3_dir, find_onnx_build
from tasks.recovery import discard_run_models, owner_tags, reusable_logged_model
from tasks.transformers_pipeline import (
    checkpoint_dtype,
    load_text_generation_pipeline,
    local_model_card,
)
from tasks.weights_copy import artifact_bytes, share_logged_weights

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "PUBLISHED_ONNX_QUANTIZATION",
    "LoggedModelInfo",
    "PackagePlan",
    "artifact_bytes",
    "lineage_tags",
    "log_model",
    "log_model_task",
    "log_onnx_model",
    "log_onnx_model_task",
    "log_transformers_model",
    "log_transformers_model_task",
    "package_key",
    "pinned_requirements",
    "plan_package",
    "plan_package_task",
    "quantization_of",
    "requirements_digest",
    "served_model_package",
    "wrapper_version",
]

logger = logging.getLogger(__name__)

#: Default cap on generated tokens per request (requests override it with ``max_tokens``).
DEFAULT_MAX_NEW_TOKENS = 256

#: What the published ONNX int4 CPU build is: its folder name says how it was quantized.
PUBLISHED_ONNX_QUANTIZATION = ONNX_CPU_INT4_SUBFOLDER.rsplit("/", 1)[-1].removeprefix("cpu-")

# The packages the transformers flavor's served model imports, pinned to the versions installed
# here (the ONNX flavor's list lives next to its signature, in phi3ops.serving.signatures).
_TRANSFORMERS_PACKAGES = (
    "mlflow",
    "transformers",
    "torch",
    "tokenizers",
    "safetensors",
    "numpy",
    "pandas",
)

_CHAT_EXAMPLE_FOR_TRANSFORMERS: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 8,
    # Exercised on purpose: MLflow validates the example by predicting it while logging.
    "temperature": 0.0,
}


class PackagePlan(BaseModel):
    """Everything about a package that is known before logging it; its key identifies it."""

    flavor: Flavor
    weights_dir: Path
    quantization: str
    wrapper_version: str
    pip_requirements: list[str]
    requirements_digest: str
    inference_config: dict[str, Any]
    package_key: str


class LoggedModelInfo(BaseModel):
    """A model logged to MLflow (not registered yet)."""

    model_uri: str
    model_id: str
    run_id: str
    flavor: Flavor
    artifact_bytes: int
    plan: PackagePlan


# --- the plan -------------------------------------------------------------------------------


def plan_package(
    fetched: FetchResult,
    flavor: Flavor | str,
    *,
    model_name_for_response: str | None = None,
) -> PackagePlan:
    """Decide what packaging ``fetched`` as ``flavor`` produces, without logging anything.

    Args:
        fetched: A verified snapshot (from the fetch flow).
        flavor: ``onnx`` or ``transformers``.
        model_name_for_response: ONNX flavor only: the ``model`` field of chat responses;
            defaults to the source repository id.

    Returns:
        The plan, with its package key.

    Raises:
        InvalidInputError: The snapshot does not hold what the flavor needs (the transformers
            flavor needs PyTorch weights, the ONNX flavor an ONNX int4 build).
    """
    flavor = Flavor(flavor)
    weights_dir = _weights_dir(fetched, flavor)
    if flavor is Flavor.ONNX:
        model_config: dict[str, Any] = {
            "max_tokens": DEFAULT_MAX_NEW_TOKENS,
            "temperature": 0.0,  # greedy unless a request asks to sample, as in transformers
            "model_name": model_name_for_response or fetched.repo_id,
            # Logged so that `phi3ops serve` can change them at load time (MLflow's
            # SERVING_MODEL_CONFIG overrides only keys the logged config has).
            "max_batch_size": DEFAULT_MAX_BATCH_SIZE,
            "max_queue": DEFAULT_MAX_QUEUE,
            "batch_wait_ms": DEFAULT_BATCH_WAIT_MS,
            # and so that evaluation, with no event loop to keep turning, can lift it
            "prefill_slice_s": DEFAULT_PREFILL_SLICE_S,
        }
    else:
        if model_name_for_response is not None:
            raise InvalidInputError(
                "model_name_for_response applies to the onnx flavor only: the transformers "
                "flavor's responses name the model MLflow recorded."
            )
        # do_sample=False: greedy by default, and what makes temperature=0.0 requests work.
        model_config = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False}
    requirements = pinned_requirements(flavor)
    quantization = quantization_of(fetched, flavor)
    version = wrapper_version(flavor)
    req_digest = requirements_digest(requirements)
    return PackagePlan(
        flavor=flavor,
        weights_dir=weights_dir,
        quantization=quantization,
        wrapper_version=version,
        pip_requirements=requirements,
        requirements_digest=req_digest,
        inference_config=model_config,
        package_key=package_key(
            fetched,
            flavor=flavor,
            quantization=quantization,
            wrapper_version=version,
            requirements_digest=req_digest,
            model_config=model_config,
        ),
    )


def pinned_requirements(flavor: Flavor | str) -> list[str]:
    """``name==version`` for every package the flavor's served model needs, as installed here.

    Local version labels are dropped (``torch==2.13.0``, not ``2.13.0+cpu``): PyPI has no
    ``+cpu`` builds, and ``==2.13.0`` still matches the local CPU build.

    Raises:
        PackagingError: A needed package is not installed.
    """
    if Flavor(flavor) is Flavor.TRANSFORMERS:
        packages: tuple[str, ...] = _TRANSFORMERS_PACKAGES
    else:
        packages = REQUIREMENT_DISTRIBUTIONS
    pins = []
    for name in packages:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError as exc:
            raise PackagingError(
                f"{name} is not installed, but the {Flavor(flavor).value} flavor's served model "
                f"needs it. Install phi3ops with its constraints (`make install`)."
            ) from exc
        pins.append(f"{name}=={version.split('+', 1)[0]}")
    return sorted(pins)


def requirements_digest(requirements: list[str] | tuple[str, ...]) -> str:
    """sha256 over the requirements, sorted and normalised (order and case do not matter)."""
    normalised = sorted({r.strip().lower() for r in requirements if r.strip()})
    return hashlib.sha256("\n".join(normalised).encode()).hexdigest()


def wrapper_version(flavor: Flavor | str) -> str:
    """What serves the model: the sha256 of the `phi3_chat` package's source (every module,
    `model_package_digest`), or for the transformers flavor (MLflow's own wrapper) the MLflow
    and transformers versions.
    """
    if Flavor(flavor) is Flavor.TRANSFORMERS:
        return (
            f"mlflow=={metadata.version('mlflow')};transformers=={metadata.version('transformers')}"
        )
    return "sha256:" + model_package_digest(served_model_package())


def quantization_of(fetched: FetchResult, flavor: Flavor | str) -> str:
    """How the packaged weights are quantized: the published int4 recipe, the int4 recipe
    phi3ops builds with, or (transformers) the torch dtype of the checkpoint.
    """
    if Flavor(flavor) is Flavor.ONNX:
        if fetched.variant is Variant.ONNX_CPU_INT4:
            return PUBLISHED_ONNX_QUANTIZATION
        defaults = inspect.signature(build_onnx_int4).parameters
        block, level = defaults["block_size"].default, defaults["accuracy_level"].default
        return f"int4-default-block-{block}-acc-level-{level}"
    return checkpoint_dtype(_weights_dir(fetched, Flavor.TRANSFORMERS))


def package_key(
    fetched: FetchResult,
    *,
    flavor: Flavor | str,
    quantization: str,
    wrapper_version: str,
    requirements_digest: str,
    model_config: dict[str, Any],
) -> str:
    """sha256 identifying a package: same key, same served model (so it is not logged twice).

    It covers the source (repo, commit sha, manifest digest, variant) and everything the
    packaging adds (flavor, quantization, wrapper code, pinned requirements, model config).
    """
    payload = {
        "repo_id": fetched.repo_id,
        "commit_sha": fetched.commit_sha,
        "manifest_digest": fetched.manifest_digest,
        "variant": Variant(fetched.variant).value,
        "flavor": Flavor(flavor).value,
        "quantization": quantization,
        "wrapper_version": wrapper_version,
        "requirements_digest": requirements_digest,
        "model_config": model_config,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def served_model_package() -> Path:
    """The `phi3_chat` folder logged with the ONNX flavor as ``code_paths``, after checking that
    it holds `MODEL_ENTRY_FILE`, the models-from-code file logged as ``python_model``.
    """
    if not MODEL_ENTRY_FILE.is_file():
        raise PackagingError(
            f"{MODEL_ENTRY_FILE} is missing: the ONNX flavor serves its chat model from the "
            f"{MODEL_PACKAGE_DIR} package through that file. Reinstall phi3ops (`make install`)."
        )
    return MODEL_PACKAGE_DIR


# --- logging ----------------------------------------------------------------------------------


def log_onnx_model(
    fetched: FetchResult, *, model_name_for_response: str | None = None
) -> LoggedModelInfo:
    """Log the ONNX int4 build of ``fetched`` as a models-from-code pyfunc, in its own run.

    The ONNX folder is the ``model_dir`` artifact: copied into the artifact store once. The run
    and the logged model are tagged with the source's lineage.

    Args:
        fetched: A snapshot of the ``onnx-cpu-int4`` variant, or of ``pytorch`` built to ONNX.
        model_name_for_response: The ``model`` field of chat responses; defaults to the repo id.

    Returns:
        The logged model.

    Raises:
        InvalidInputError: ``fetched`` holds no ONNX build.
        PackagingError: A runtime package or the chat model's code is missing, or MLflow
            failed.
    """
    plan = plan_package(fetched, Flavor.ONNX, model_name_for_response=model_name_for_response)
    package = served_model_package()

    def log(mlflow: Any, tags: dict[str, str]) -> Any:
        return mlflow.pyfunc.log_model(
            name=logged_model_name(fetched.repo_id, plan.flavor, plan.quantization),
            python_model=str(MODEL_ENTRY_FILE),
            code_paths=[str(package)],  # code/phi3_chat/ in the model, imported by the entry
            artifacts={MODEL_DIR_ARTIFACT: str(plan.weights_dir)},
            signature=ONNX_CHAT_SIGNATURE,
            input_example=CHAT_INPUT_EXAMPLE,
            pip_requirements=plan.pip_requirements,
            model_config=plan.inference_config,
            tags=tags,
        )

    return _log_in_run(fetched, plan, log)


def log_transformers_model(fetched: FetchResult) -> LoggedModelInfo:
    """Log the PyTorch weights of ``fetched`` with MLflow's transformers flavor (``llm/v1/chat``).

    The text-generation pipeline is loaded in the checkpoint's own dtype and written to the
    artifact store once. Requests with ``temperature`` 0 decode greedily (see the module doc).

    Args:
        fetched: A snapshot of the ``pytorch`` variant.

    Returns:
        The logged model.

    Raises:
        InvalidInputError: ``fetched`` holds no PyTorch Phi-3 checkpoint.
        PackagingError: A runtime package is missing, or loading or logging failed.
    """
    plan = plan_package(fetched, Flavor.TRANSFORMERS)
    pipeline = load_text_generation_pipeline(plan.weights_dir, dtype=plan.quantization)
    model_card = local_model_card(plan.weights_dir)

    def log(mlflow: Any, tags: dict[str, str]) -> Any:
        return mlflow.transformers.log_model(
            transformers_model=pipeline,
            name=logged_model_name(fetched.repo_id, plan.flavor),
            task="llm/v1/chat",
            model_config=plan.inference_config,
            pip_requirements=plan.pip_requirements,
            input_example=_CHAT_EXAMPLE_FOR_TRANSFORMERS,
            # The snapshot's own card (and its declared license): MLflow would otherwise look
            # the card up on the hub under the pipeline's name, here a local path.
            model_card=model_card,
            tags=tags,
        )

    return _log_in_run(fetched, plan, log)


def log_model(fetched: FetchResult, *, flavor: Flavor | str) -> LoggedModelInfo:
    """`log_onnx_model` or `log_transformers_model`, by flavor."""
    if Flavor(flavor) is Flavor.TRANSFORMERS:
        return log_transformers_model(fetched)
    return log_onnx_model(fetched)


# --- Prefect tasks: no retries (nothing here is transient), no caching (paths and stores) -----


@task(name="plan-package", cache_policy=NO_CACHE)
def plan_package_task(fetched: FetchResult, flavor: Flavor) -> PackagePlan:
    """Prefect wrapper of `plan_package`, the package flow's first step; before anything is
    copied it checks (`tasks.hub.check_before_packaging`) that the snapshot still matches its
    manifest (re-hashed), holds model data only, and fits on disk once more.

    Raises:
        IntegrityError, UnsafeModelError, InsufficientDiskSpaceError: It does not.
    """
    plan = plan_package(fetched, flavor)
    check_before_packaging(fetched, plan.weights_dir)
    return plan


@task(name="log-onnx-model", cache_policy=NO_CACHE)
def log_onnx_model_task(fetched: FetchResult) -> LoggedModelInfo:
    """Prefect wrapper of `log_onnx_model`."""
    return log_onnx_model(fetched)


@task(name="log-transformers-model", cache_policy=NO_CACHE)
def log_transformers_model_task(fetched: FetchResult) -> LoggedModelInfo:
    """Prefect wrapper of `log_transformers_model`."""
    return log_transformers_model(fetched)


@task(name="log-model", cache_policy=NO_CACHE)
def log_model_task(fetched: FetchResult, flavor: Flavor) -> LoggedModelInfo:
    """Prefect wrapper of `log_model`."""
    return log_model(fetched, flavor=flavor)


# --- helpers ----------------------------------------------------------------------------------


def _weights_dir(fetched: FetchResult, flavor: Flavor) -> Path:
    """The folder the flavor packages, after checking it holds what that flavor needs."""
    variant = Variant(fetched.variant)
    where = f"{fetched.repo_id}@{fetched.commit_sha[:12]} ({variant.value})"
    if flavor is Flavor.TRANSFORMERS:
        if variant is not Variant.PYTORCH:
            raise InvalidInputError(
                f"The transformers flavor needs PyTorch weights, but {where} is the ONNX int4 "
                f"variant. Fetch variant 'pytorch' (e.g. {Variant.PYTORCH.default_repo_id}), or "
                f"package this snapshot with flavor 'onnx'."
            )
        # The snapshot root holds the PyTorch files even when model_dir is an ONNX build of them.
        weights_dir = Path(fetched.local_dir) / variant.subfolder
        check_pytorch_phi3_dir(weights_dir)
        return weights_dir
    if find_onnx_build(Path(fetched.model_dir)) is None:
        hint = (
            "fetch it with build_onnx=True (`phi3ops fetch --variant pytorch --build-onnx`)"
            if variant is Variant.PYTORCH
            else "fetch it again: the snapshot is incomplete"
        )
        raise InvalidInputError(
            f"The onnx flavor needs an ONNX int4 build, but {fetched.model_dir} (from {where}) "
            f"holds none (no genai_config.json naming an existing model file): {hint}, or "
            f"package PyTorch weights with flavor 'transformers'."
        )
    return Path(fetched.model_dir)


def lineage_tags(fetched: FetchResult, plan: PackagePlan) -> dict[str, str]:
    """The lineage tags of a package: source, packaging, and the package key."""
    return {
        LineageTag.SOURCE_REPO.value: fetched.repo_id,
        LineageTag.SOURCE_REVISION.value: fetched.revision,
        LineageTag.COMMIT_SHA.value: fetched.commit_sha,
        LineageTag.MANIFEST_DIGEST.value: fetched.manifest_digest,
        LineageTag.VARIANT.value: Variant(fetched.variant).value,
        LineageTag.FLAVOR.value: Flavor(plan.flavor).value,
        LineageTag.QUANTIZATION.value: plan.quantization,
        LineageTag.WRAPPER_VERSION.value: plan.wrapper_version,
        LineageTag.PIP_REQUIREMENTS_DIGEST.value: plan.requirements_digest,
        LineageTag.PACKAGE_KEY.value: plan.package_key,
    }


def _log_in_run(fetched: FetchResult, plan: PackagePlan, log: Any) -> LoggedModelInfo:
    """Run ``log(mlflow, tags)`` inside a fresh run tagged with the lineage; measure the result.

    A finished logged model of the same package key that a crashed packaging never registered is
    returned instead (no second copy of the weights); orphan runs of that key are ended first.
    When logging fails, its logged model is discarded (`tasks.recovery`) and the run FAILED.
    The model MLflow loads to validate the input example is released (`tasks.loaded_models`):
    the next stage's model does not load beside it.
    """
    import mlflow

    experiment_id = configure_tracking()
    found = reusable_logged_model(experiment_id, plan.package_key)
    if found is not None:
        logger.warning("Reusing %s, logged by a packaging that stopped early", found.model_id)
        return LoggedModelInfo(
            model_uri=f"models:/{found.model_id}",
            model_id=found.model_id,
            run_id=found.source_run_id,
            flavor=plan.flavor,
            artifact_bytes=artifact_bytes(found.artifact_location),
            plan=plan,
        )
    tags = lineage_tags(fetched, plan)
    run_name = f"package-{plan.flavor.value}-{fetched.commit_sha[:12]}"
    with mlflow.start_run(run_name=run_name, tags=tags | owner_tags()) as run:
        try:
            with releasing_models_from_code():  # what MLflow loaded to predict the example
                info = log(mlflow, tags)
            crash_point("package.after-log-model")
            location = mlflow.get_logged_model(info.model_id).artifact_location
            share_logged_weights(location, plan.weights_dir)  # links, not a 2nd copy, if local
            size = artifact_bytes(location)
            mlflow.log_metric("artifact_bytes", size)
        except Exception as exc:
            discard_run_models(experiment_id, run.info.run_id)  # no orphan copy of the weights
            if isinstance(exc, InvalidInputError | PackagingError):
                raise
            raise PackagingError(
                f"MLflow could not log {fetched.repo_id}@{fetched.commit_sha[:12]} as the "
                f"{plan.flavor.value} flavor ({type(exc).__name__}: {exc})."
            ) from exc
    crash_point("package.after-log")
    logger.info(
        "Logged %s as %s (%s flavor, %d artifact bytes, run %s)",
        fetched.repo_id,
        info.model_uri,
        plan.flavor.value,
        size,
        run.info.run_id,
    )
    return LoggedModelInfo(
        model_uri=info.model_uri,
        model_id=info.model_id,
        run_id=run.info.run_id,
        flavor=plan.flavor,
        artifact_bytes=size,
        plan=plan,
    )
