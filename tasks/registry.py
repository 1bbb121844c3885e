"""Register logged models in the MLflow model registry, with lineage tags and the alias
``candidate`` on every new version.

Each version carries the tags in `LineageTag` (all prefixed ``phi3ops.``): where the weights
came from (repository, commit sha, manifest digest, variant), how they were packaged (flavor,
quantization, wrapper code version, pip requirements digest) and the *package key* over all of
that. The key makes packaging idempotent: `find_registered_version` looks it up before anything
is logged, so packaging the same source again returns the existing version and copies no
weights. `register_version` checks again right before creating a version (two packagings racing
each other can still both log; the second then reuses the first's version).

Nothing secret is tagged: the Hugging Face token never reaches this stage.
"""

from __future__ import annotations

import logging
import re
from enum import StrEnum

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from phi3ops.errors import InvalidInputError, RegistryError
from phi3ops.settings import get_settings
from phi3ops.sources import Variant
from phi3ops.tracking import configure_tracking
from tasks.hub import FetchResult
from tasks.packaging import Flavor, LoggedModelInfo, PackagePlan

__all__ = [
    "CANDIDATE_ALIAS",
    "CHAMPION_ALIAS",
    "TAG_PREFIX",
    "LineageTag",
    "RegisteredVersion",
    "find_registered_version",
    "find_registered_version_task",
    "lineage_tags",
    "register_version",
    "register_version_task",
    "resolve_model_name",
]

logger = logging.getLogger(__name__)

#: Every tag phi3ops writes starts with this.
TAG_PREFIX = "phi3ops."

#: The alias every newly registered version gets; evaluation and promotion start from it.
CANDIDATE_ALIAS = "candidate"
#: The version in production; promotion moves it, evaluation compares against it.
CHAMPION_ALIAS = "champion"

# Letters, digits, '.', '_' and '-': safe inside models:/<name>@<alias> and models:/<name>/<v>
# URIs and in Unity Catalog three-level names (catalog.schema.model).
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$")


class LineageTag(StrEnum):
    """Tag keys on packaging runs, logged models and registered versions."""

    SOURCE_REPO = f"{TAG_PREFIX}source_repo"
    SOURCE_REVISION = f"{TAG_PREFIX}source_revision"
    COMMIT_SHA = f"{TAG_PREFIX}commit_sha"
    MANIFEST_DIGEST = f"{TAG_PREFIX}manifest_digest"
    VARIANT = f"{TAG_PREFIX}variant"
    FLAVOR = f"{TAG_PREFIX}flavor"
    QUANTIZATION = f"{TAG_PREFIX}quantization"
    WRAPPER_VERSION = f"{TAG_PREFIX}wrapper_version"
    PIP_REQUIREMENTS_DIGEST = f"{TAG_PREFIX}pip_requirements_digest"
    PACKAGE_KEY = f"{TAG_PREFIX}package_key"


class RegisteredVersion(BaseModel):
    """A version of a registered model, and whether this packaging created it or reused it."""

    model_name: str
    version: str
    model_uri: str
    source: str
    run_id: str | None
    flavor: Flavor
    aliases: list[str]
    reused: bool
    tags: dict[str, str]

    @property
    def candidate_uri(self) -> str:
        """``models:/<name>@candidate``."""
        return f"models:/{self.model_name}@{CANDIDATE_ALIAS}"


# --- public API -----------------------------------------------------------------------------


def resolve_model_name(model_name: str | None = None) -> str:
    """The registered model name to use: ``model_name``, else ``PHI3OPS_REGISTERED_MODEL_NAME``.

    Raises:
        InvalidInputError: The name cannot be used in ``models:/`` URIs.
    """
    name = model_name if model_name is not None else get_settings().registered_model_name
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise InvalidInputError(
            f"Registered model name {name!r} is not valid: use 1-256 letters, digits, '.', '_' "
            f"or '-', starting with a letter or digit (e.g. 'phi3-mini'), so that "
            f"models:/<name>@<alias> URIs work. Set it with --model-name or "
            f"PHI3OPS_REGISTERED_MODEL_NAME."
        )
    return name


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


def find_registered_version(
    plan: PackagePlan, *, model_name: str | None = None
) -> RegisteredVersion | None:
    """The registered version already holding this package (same package key), if any.

    Args:
        plan: The package about to be logged (`tasks.packaging.plan_package`).
        model_name: Registered model; defaults to ``PHI3OPS_REGISTERED_MODEL_NAME``.

    Returns:
        The oldest version with the plan's package key, marked ``reused``; None when there is
        none (or the registered model does not exist yet).
    """
    name = resolve_model_name(model_name)
    configure_tracking()
    version = _find_by_package_key(_client(), name, plan.package_key)
    return None if version is None else _to_registered(version, reused=True)


def register_version(
    logged: LoggedModelInfo, fetched: FetchResult, *, model_name: str | None = None
) -> RegisteredVersion:
    """Register a logged model as a new version tagged with its lineage, aliased ``candidate``.

    When a version with the same package key exists already, that version is returned instead
    (``reused=True``) and no alias moves.

    Args:
        logged: The logged model (`tasks.packaging.log_onnx_model` / `log_transformers_model`).
        fetched: The snapshot it was packaged from.
        model_name: Registered model; defaults to ``PHI3OPS_REGISTERED_MODEL_NAME``.

    Returns:
        The registered version.

    Raises:
        InvalidInputError: ``model_name`` is not a valid registered model name.
        RegistryError: The registry refused to register or alias the version.
    """
    name = resolve_model_name(model_name)
    import mlflow

    configure_tracking()
    client = _client()
    existing = _find_by_package_key(client, name, logged.plan.package_key)
    if existing is not None:
        logger.warning(
            "%s version %s already holds package %s; not registering %s again",
            name,
            existing.version,
            logged.plan.package_key[:12],
            logged.model_uri,
        )
        return _to_registered(existing, reused=True)

    tags = lineage_tags(fetched, logged.plan)
    try:
        version = mlflow.register_model(logged.model_uri, name, tags=tags)
        client.set_registered_model_alias(name, CANDIDATE_ALIAS, version.version)
        version = client.get_model_version(name, version.version)
    except Exception as exc:
        raise RegistryError(
            f"The MLflow registry could not register {logged.model_uri} as {name!r} "
            f"({type(exc).__name__}: {exc}). Check that the registry at the tracking URI is "
            f"reachable and writable."
        ) from exc
    logger.info("Registered %s version %s (@%s)", name, version.version, CANDIDATE_ALIAS)
    return _to_registered(version, reused=False)


# --- Prefect tasks: no retries (registry errors here are not transient), no caching ---------


@task(name="find-registered-version", cache_policy=NO_CACHE)
def find_registered_version_task(
    plan: PackagePlan, *, model_name: str | None = None
) -> RegisteredVersion | None:
    """Prefect wrapper of `find_registered_version`."""
    return find_registered_version(plan, model_name=model_name)


@task(name="register-version", cache_policy=NO_CACHE)
def register_version_task(
    logged: LoggedModelInfo, fetched: FetchResult, *, model_name: str | None = None
) -> RegisteredVersion:
    """Prefect wrapper of `register_version`."""
    return register_version(logged, fetched, model_name=model_name)


# --- helpers ----------------------------------------------------------------------------------


def _client():
    from mlflow import MlflowClient

    return MlflowClient()  # configure_tracking() has set the tracking and registry URIs


def _find_by_package_key(client, name: str, key: str):
    """The oldest live version of ``name`` tagged with package ``key``, or None.

    The SQL store (MLflow 3.17) filters model versions by tag; a store that cannot is searched
    by name and filtered here.
    """
    from mlflow.exceptions import MlflowException

    tag = LineageTag.PACKAGE_KEY.value
    try:
        found = _search_all(client, f"name = '{name}' AND tags.`{tag}` = '{key}'")
    except MlflowException:
        found = [v for v in _search_all(client, f"name = '{name}'") if v.tags.get(tag) == key]
    found = [v for v in found if v.status != "FAILED_REGISTRATION"]
    if not found:
        return None
    oldest = min(found, key=lambda v: int(v.version))
    # Search results carry no aliases: read the version itself.
    return client.get_model_version(name, oldest.version)


def _search_all(client, filter_string: str) -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(filter_string, max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def _to_registered(version, *, reused: bool) -> RegisteredVersion:
    tags = dict(version.tags or {})
    flavor = tags.get(LineageTag.FLAVOR.value)
    return RegisteredVersion(
        model_name=version.name,
        version=str(version.version),
        model_uri=f"models:/{version.name}/{version.version}",
        source=version.source,
        run_id=version.run_id or None,
        flavor=Flavor(flavor),
        aliases=sorted(version.aliases or []),
        reused=reused,
        tags=tags,
    )


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from ``parts`` (lowercase letters, digits and dashes only)."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
