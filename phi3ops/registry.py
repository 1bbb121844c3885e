"""Every lookup in the MLflow model registry, in one place: which name, which version an alias
or a ``models:/`` URI means, which version holds a package. Writes (register, move aliases,
tag decisions) live with the task that makes them; they find what they change through here.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from phi3ops.errors import InvalidInputError
from phi3ops.names import LineageTag
from phi3ops.settings import get_settings
from phi3ops.tracking import use_tracking_store

# Letters, digits, '.', '_' and '-': safe inside models:/<name>@<alias> and models:/<name>/<v>
# URIs and in Unity Catalog three-level names (catalog.schema.model).
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$")
# models:/<name>@<alias> or models:/<name>/<version>
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")
_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class ModelTarget(BaseModel):
    """A registry version, resolved from the ``models:/`` URI the caller gave."""

    model_name: str
    version: str
    model_uri: str  # as given (may name an alias)
    flavor: str
    model_id: str | None = None  # the logged model behind the version (MLflow 3)

    @property
    def version_uri(self) -> str:
        """``models:/<name>/<version>``: what is loaded, whatever the alias points at later."""
        return f"models:/{self.model_name}/{self.version}"


def client() -> Any:
    """An MLflow client on the project's tracking and registry store."""
    from mlflow import MlflowClient

    use_tracking_store()
    return MlflowClient()


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


def alias_version(model_name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND_CODES:
            return None
        raise


def resolve_version(model_name: str, version_or_alias: str) -> str:
    """A version number for ``version_or_alias`` ('3' or 'candidate'); a clear error if none.

    Raises:
        InvalidInputError: No such version or alias.
    """
    from mlflow.exceptions import MlflowException

    registry = client()
    try:
        if version_or_alias.isdigit():
            return str(registry.get_model_version(model_name, version_or_alias).version)
        return str(registry.get_model_version_by_alias(model_name, version_or_alias).version)
    except MlflowException as exc:
        raise InvalidInputError(
            f"models:/{model_name}@{version_or_alias} does not exist ({exc.message}). "
            f"Package a model first (`phi3ops package`) or name an existing version or alias."
        ) from exc


def get_version(model_name: str, version: str | int) -> Any | None:
    """The registry's ``ModelVersion`` (with tags and aliases), or None when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version(model_name, str(version))
    except MlflowException:
        return None


def resolve_model(model_uri: str) -> ModelTarget:
    """The registry version a ``models:/`` URI names, checked to exist.

    Args:
        model_uri: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.

    Returns:
        The version, its flavor and its logged model.

    Raises:
        InvalidInputError: The URI is malformed, or names a model, alias or version the registry
            does not have (the message lists what exists).
    """
    from mlflow.exceptions import MlflowException

    match = _REGISTRY_URI.match(model_uri.strip()) if isinstance(model_uri, str) else None
    if match is None:
        raise InvalidInputError(
            f"Model URI {model_uri!r} is not a registry URI: use models:/<name>@<alias> (e.g. "
            f"models:/phi3-mini@candidate) or models:/<name>/<version> (e.g. "
            f"models:/phi3-mini/3). An evaluation is recorded on a registry version."
        )
    name = resolve_model_name(match["name"])
    alias, version = match["alias"], match["version"]
    if version is not None and not version.isdigit():
        raise InvalidInputError(
            f"Model URI {model_uri!r}: version {version!r} is not a number. Name a version "
            f"(models:/{name}/3) or an alias (models:/{name}@candidate)."
        )
    registry = client()
    try:
        mv = (
            registry.get_model_version_by_alias(name, alias)
            if alias is not None
            else registry.get_model_version(name, version)
        )
    except MlflowException as exc:
        raise InvalidInputError(
            f"Model URI {model_uri!r}: {_registry_problem(registry, name, alias, version)}"
        ) from exc
    flavor = (mv.tags or {}).get(LineageTag.FLAVOR.value) or _flavor_from_metadata(
        f"models:/{name}/{mv.version}"
    )
    source = str(mv.source or "")
    model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
    return ModelTarget(
        model_name=name,
        version=str(mv.version),
        model_uri=model_uri.strip(),
        flavor=flavor,
        model_id=model_id,
    )


def find_by_package_key(model_name: str, package_key: str) -> Any | None:
    """The oldest live version of ``model_name`` tagged with ``package_key``, or None.

    The SQL store (MLflow 3.17) filters model versions by tag; a store that cannot is searched
    by name and filtered here.
    """
    from mlflow.exceptions import MlflowException

    registry = client()
    tag = LineageTag.PACKAGE_KEY.value
    try:
        found = search_versions(f"name = '{model_name}' AND tags.`{tag}` = '{package_key}'")
    except MlflowException:
        found = [
            v for v in search_versions(f"name = '{model_name}'") if v.tags.get(tag) == package_key
        ]
    found = [v for v in found if v.status != "FAILED_REGISTRATION"]
    if not found:
        return None
    oldest = min(found, key=lambda v: int(v.version))
    # Search results carry no aliases: read the version itself.
    return registry.get_model_version(model_name, oldest.version)


def search_versions(filter_string: str) -> list[Any]:
    """Every model version matching ``filter_string``, across result pages."""
    registry = client()
    versions: list[Any] = []
    token = None
    while True:
        page = registry.search_model_versions(filter_string, max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def _registry_problem(registry: Any, name: str, alias: str | None, version: str | None) -> str:
    from mlflow.exceptions import MlflowException

    try:
        registered = registry.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in registry.search_registered_models(max_results=100))
        known = ", ".join(names) if names else "none yet"
        return (
            f"there is no registered model {name!r} (registered: {known}). Package one first "
            f"(`phi3ops package`) or fix the name."
        )
    if alias is not None:
        aliases = registered.aliases or {}
        known = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
        return (
            f"{name!r} has no alias {alias!r} (aliases: {known}). Use one of those, or a "
            f"version: models:/{name}/<version>."
        )
    versions = sorted(int(v.version) for v in search_versions(f"name = '{name}'"))
    known = ", ".join(map(str, versions)) or "none"
    return f"{name!r} has no version {version} (versions: {known})."


def _flavor_from_metadata(uri: str) -> str:
    import mlflow

    try:
        flavors = mlflow.models.get_model_info(uri).flavors
    except Exception:  # a missing MLmodel shows up, clearly, when the model is loaded
        return "unknown"
    return "transformers" if "transformers" in flavors else "pyfunc"
