"""Register logged models in the MLflow model registry, with lineage tags and the alias
``candidate`` on every new version.

Each version carries the tags in `LineageTag` (all prefixed ``phi3ops.``): where the weights
came from (repository, commit sha, manifest digest, variant), how they were packaged (flavor,
quantization, wrapper code version, pip requirements digest) and the *package key* over all of
that. The key makes packaging idempotent: `find_registered_version` looks it up before anything
is logged, so packaging the same source again returns the existing version and copies no
weights. `register_version` checks again right before creating a version (two packagings racing
each other can still both log; the second then reuses the first's version).

Registering is two writes: the version (created with a ``phi3ops.registration = pending`` tag, in
one transaction) and the ``candidate`` alias, after which the tag is removed. A process that dies
between them leaves the tag; whoever finds that version next (a re-run of the packaging) sets
the alias and removes the tag, so a re-run never reports a version as done that never got
``@candidate``. When registering fails in-process, the new version and the logged model are
removed: a failed package leaves neither behind.

Nothing secret is tagged: the Hugging Face token never reaches this stage.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from phi3ops import registry
from phi3ops.crash import crash_point
from phi3ops.errors import RegistryError
from phi3ops.names import CANDIDATE_ALIAS, REGISTRATION_TAG, LineageTag
from phi3ops.sources import Flavor
from tasks.alias_lock import promotion_lock
from tasks.hub import FetchResult
from tasks.packaging import LoggedModelInfo, PackagePlan, lineage_tags
from tasks.recovery import discard_logged_model
from tasks.status import refresh_description

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

__all__ = [
    "RegisteredVersion",
    "find_registered_version",
    "find_registered_version_task",
    "register_version",
    "register_version_task",
]

logger = logging.getLogger(__name__)


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


def find_registered_version(
    plan: PackagePlan, *, model_name: str | None = None
) -> RegisteredVersion | None:
    """The registered version already holding this package (same package key), if any.

    Args:
        plan: The package about to be logged (`tasks.packaging.plan_package`).
        model_name: Registered model; defaults to ``PHI3OPS_REGISTERED_MODEL_NAME``.

    Returns:
        The oldest version with the plan's package key, marked ``reused`` (its registration
        finished first when a crashed run left it pending); None when there is none (or the
        registered model does not exist yet).
    """
    name = registry.resolve_model_name(model_name)
    version = registry.find_by_package_key(name, plan.package_key)
    return None if version is None else _to_registered(_finish_registration(version), reused=True)


def register_version(
    logged: LoggedModelInfo, fetched: FetchResult, *, model_name: str | None = None
) -> RegisteredVersion:
    """Register a logged model as a new version tagged with its lineage, aliased ``candidate``.

    When a version with the same package key exists already, that version is returned instead
    (``reused=True``) and no alias moves (unless its own registration was left pending).

    Args:
        logged: The logged model (`tasks.packaging.log_onnx_model` / `log_transformers_model`).
        fetched: The snapshot it was packaged from.
        model_name: Registered model; defaults to ``PHI3OPS_REGISTERED_MODEL_NAME``.

    Returns:
        The registered version.

    Raises:
        InvalidInputError: ``model_name`` is not a valid registered model name.
        RegistryError: The registry refused to register or alias the version; the version
            and the logged model are removed.
    """
    name = registry.resolve_model_name(model_name)
    import mlflow

    client = registry.client()
    existing = registry.find_by_package_key(name, logged.plan.package_key)
    if existing is not None:
        logger.warning(
            "%s version %s already holds package %s; not registering %s again",
            name,
            existing.version,
            logged.plan.package_key[:12],
            logged.model_uri,
        )
        return _to_registered(_finish_registration(existing), reused=True)

    tags = lineage_tags(fetched, logged.plan) | {REGISTRATION_TAG: "pending"}
    created = None
    try:
        created = mlflow.register_model(logged.model_uri, name, tags=tags)
        crash_point("register.after-version")
        version = _finish_registration(client.get_model_version(name, created.version))
    except Exception as exc:
        _undo_registration(name, created, logged)
        raise RegistryError(
            f"The MLflow registry could not register {logged.model_uri} as {name!r} "
            f"({type(exc).__name__}: {exc}). Check that the registry at the tracking URI is "
            f"reachable and writable."
        ) from exc
    logger.info("Registered %s version %s (@%s)", name, version.version, CANDIDATE_ALIAS)
    refresh_description(name, version.version)  # source, flavor, quantization
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


def _finish_registration(version: ModelVersion) -> ModelVersion:
    """A version still tagged ``pending`` gets ``@candidate``, then loses the tag: the one place
    a registration is completed, fresh or left by a crashed run.
    """
    if REGISTRATION_TAG not in (version.tags or {}):
        return version
    client = registry.client()
    name, number = version.name, str(version.version)
    # An alias move like any other: two registrations at once on two workers would otherwise
    # both insert @candidate, which a PostgreSQL-backed registry refuses for one of them.
    with promotion_lock(name) as fence:
        fence.check(f"move @{CANDIDATE_ALIAS} to version {number}")
        client.set_registered_model_alias(name, CANDIDATE_ALIAS, number)
    client.delete_model_version_tag(name, number, REGISTRATION_TAG)
    return client.get_model_version(name, number)


def _undo_registration(name: str, created: ModelVersion | None, logged: LoggedModelInfo) -> None:
    """After a failed registration: delete the version it created and discard the logged
    model; best effort (a version left behind keeps its ``pending`` tag: a re-run finishes it).
    """
    if created is not None:
        try:
            registry.client().delete_model_version(name, str(created.version))
        except Exception:
            logger.warning("Could not delete %s version %s", name, created.version, exc_info=True)
            return
    discard_logged_model(logged.model_id)


def _to_registered(version: ModelVersion, *, reused: bool) -> RegisteredVersion:
    tags = dict(version.tags or {})
    flavor = tags.get(LineageTag.FLAVOR.value)
    if flavor is None:  # lineage_tags always sets it, but registry tags can be edited
        raise ValueError(
            f"{version.name} version {version.version} has no {LineageTag.FLAVOR.value} tag"
        )
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
