"""What a Prefect server needs before the pipeline's deployments can run on it, set up by name
and idempotently (``phi3ops setup``):

* the work pool ``phi3ops-process`` (type process) that prefect.yaml deploys to, optionally
  with environment defaults for every flow run of the pool (``--env KEY=VALUE``: the pool's
  base job template, so a team sets ``MLFLOW_TRACKING_URI`` once on the server instead of on
  each worker host);
* one strict global concurrency limit per registered model, ``phi3ops-aliases-<model>``, one
  slot: every alias move of that model waits for it (`tasks.alias_lock`);
* the Prefect variables prefect.yaml's ``git_clone`` pull step reads at run time:
  ``phi3ops_repository`` (the URL or path workers clone) and ``phi3ops_branch``.

Running it again changes nothing that is already right. A variable given explicitly is set; one
not given keeps its value on the server, or, when the server has none, takes the clone this
runs in (its path, its current branch): the single-machine default.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from deployments.automations import server_client
from phi3ops.errors import InvalidInputError, OrchestrationError
from phi3ops.names import alias_limit_name

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

__all__ = [
    "BRANCH_VARIABLE",
    "POOL",
    "REPOSITORY_VARIABLE",
    "SetupStep",
    "bounded_prefect_api",
    "check_prefect_api",
    "clone_defaults",
    "ensure_alias_limits",
    "ensure_code_variables",
    "ensure_work_pool",
    "setup_server",
]

#: The work pool of every deployment in prefect.yaml (``definitions.work_pools.process``).
POOL = "phi3ops-process"
#: Prefect variables read by prefect.yaml's pull step at run time, on the worker.
REPOSITORY_VARIABLE = "phi3ops_repository"
BRANCH_VARIABLE = "phi3ops_branch"

Action = Literal["created", "updated", "kept"]


@dataclass(frozen=True)
class SetupStep:
    """One object on the server, and what setting it up did to it."""

    kind: Literal["work pool", "concurrency limit", "variable"]
    name: str
    action: Action
    detail: str = ""

    def __str__(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.action} {self.kind} {self.name}{detail}"


def setup_server(
    *,
    model_names: Iterable[str],
    pool: str = POOL,
    pool_env: Mapping[str, str] | None = None,
    repository: str | None = None,
    branch: str | None = None,
    clone: Path | None = None,
) -> list[SetupStep]:
    """Set up the work pool, the alias limits and the code variables on the configured server.

    Args:
        model_names: Registered models whose aliases the pipeline moves.
        pool: Work pool name.
        pool_env: Environment defaults for the pool's flow runs (merged into the base job
            template's ``env``; a deployment's or a run's ``job_variables`` still win).
        repository: Git URL or path workers clone; None keeps the server's value, else the clone.
        branch: Branch workers clone; None keeps the server's value, else the clone's branch.
        clone: The git clone whose path and branch are the defaults; the current directory's.

    Returns:
        What was created, updated or kept, in order.

    Raises:
        OrchestrationError: No Prefect server is configured or reachable.
        InvalidInputError: A default was needed and ``clone`` is not a git clone on a branch.
    """
    with bounded_prefect_api(), server_client() as client:
        steps = [ensure_work_pool(client, name=pool, env=pool_env)]
        steps += ensure_alias_limits(client, model_names=model_names)
        steps += ensure_code_variables(client, repository=repository, branch=branch, clone=clone)
    return steps


def _api_timeout() -> tuple[str | None, float]:
    """The configured Prefect API URL (None: Prefect's temporary local server) and Prefect's
    own per-request timeout (``PREFECT_API_REQUEST_TIMEOUT``, 60 s by default).
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return settings.api.url, float(settings.api.request_timeout)


def _no_answer(url: str, timeout: float) -> OrchestrationError:
    return OrchestrationError(
        f"The Prefect API at {url} did not answer within {timeout:g} s "
        "(PREFECT_API_REQUEST_TIMEOUT): check that the server is up and not overloaded, or fix "
        "PREFECT_API_URL."
    )


def check_prefect_api() -> None:
    """Fails at once, naming the URL, when the configured Prefect API does not answer its
    health check within ``PREFECT_API_REQUEST_TIMEOUT`` (one try, no retries); Prefect's own
    client retries a timeout five times, so a server that accepts and never answers would
    otherwise hang a command for minutes. Nothing to check for Prefect's temporary server.

    Raises:
        OrchestrationError: The API did not answer in time, or cannot be reached.
    """
    import httpx

    url, timeout = _api_timeout()
    if not url:
        return
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except httpx.TimeoutException as exc:
        raise _no_answer(url, timeout) from exc
    except httpx.HTTPError as exc:
        raise OrchestrationError(
            f"Cannot reach the Prefect API at {url} ({exc}): start the server "
            "(`prefect server start`) or fix PREFECT_API_URL."
        ) from exc


@contextmanager
def bounded_prefect_api() -> Iterator[None]:
    """Bounds the Prefect API calls made inside: the API must answer its health check first
    (`check_prefect_api`), and each call then takes at most ``PREFECT_API_REQUEST_TIMEOUT``
    seconds without retries, so the whole block fails naming the URL instead of hanging.

    Raises:
        OrchestrationError: A call timed out (or the API is not reachable).
    """
    import httpx
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    check_prefect_api()
    url, timeout = _api_timeout()
    try:
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
            yield
    except httpx.TimeoutException as exc:
        raise _no_answer(url or "(temporary server)", timeout) from exc


def ensure_work_pool(
    client: SyncPrefectClient, *, name: str = POOL, env: Mapping[str, str] | None = None
) -> SetupStep:
    """The process work pool, created with Prefect's default process job template when missing;
    ``env`` is merged into that template's default environment.
    """
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        existing = client.read_work_pool(name)
    except ObjectNotFound:
        existing = None
    if existing is not None and existing.type != "process":
        raise OrchestrationError(
            f"Work pool {name} is of type {existing.type}, not process: prefect.yaml's pull step "
            "clones the code into a process worker's directory. Use another pool name."
        )
    template = (
        existing.base_job_template
        if existing is not None
        else ProcessWorker.get_default_base_job_template()
    )
    changed = _merge_env(template, env or {})
    if existing is None:
        client.create_work_pool(
            WorkPoolCreate(name=name, type="process", base_job_template=template)
        )
        return SetupStep("work pool", name, "created", _env_detail(env))
    if changed:
        client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
        return SetupStep("work pool", name, "updated", _env_detail(env))
    return SetupStep("work pool", name, "kept")


def ensure_alias_limits(
    client: SyncPrefectClient, *, model_names: Iterable[str]
) -> list[SetupStep]:
    """One active global concurrency limit with one slot per model; a limit of that name with
    more slots, or inactive, is corrected (it would let two alias moves run at once).
    """
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    steps = []
    for model_name in dict.fromkeys(model_names):  # once each, in order
        name = alias_limit_name(model_name)
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
            )
            steps.append(SetupStep("concurrency limit", name, "created", "1 slot"))
            continue
        if limit.limit == 1 and limit.active:
            steps.append(SetupStep("concurrency limit", name, "kept", "1 slot"))
            continue
        client.update_global_concurrency_limit(
            name, GlobalConcurrencyLimitUpdate(limit=1, active=True)
        )
        steps.append(
            SetupStep("concurrency limit", name, "updated", f"{limit.limit} slot(s) -> 1 slot")
        )
    return steps


def ensure_code_variables(
    client: SyncPrefectClient,
    *,
    repository: str | None = None,
    branch: str | None = None,
    clone: Path | None = None,
) -> list[SetupStep]:
    """``phi3ops_repository`` and ``phi3ops_branch``: set when given, kept when on the server,
    else taken from ``clone`` (see `clone_defaults`).
    """
    current = {
        name: variable.value if variable is not None else None
        for name in (REPOSITORY_VARIABLE, BRANCH_VARIABLE)
        for variable in [client.read_variable_by_name(name)]
    }
    wanted: dict[str, str | None] = {REPOSITORY_VARIABLE: repository, BRANCH_VARIABLE: branch}
    defaults: dict[str, str] = {}
    if any(wanted[name] is None and current[name] is None for name in wanted):
        defaults = clone_defaults(clone or Path.cwd())
    steps = []
    for name, value in wanted.items():
        steps.append(_set_variable(client, name, value, current[name], defaults.get(name)))
    if defaults.get("dirty") and any(s.action != "kept" for s in steps):
        steps[0] = SetupStep(
            steps[0].kind,
            steps[0].name,
            steps[0].action,
            f"{steps[0].detail} (uncommitted changes there are not what workers run: commit "
            "them, or push them to the branch)",
        )
    return steps


def clone_defaults(clone: Path) -> dict[str, str]:
    """The single-machine defaults: the clone's absolute path and its current branch (and
    ``dirty`` when it has uncommitted changes, which a ``git clone`` of it leaves out).

    Raises:
        InvalidInputError: ``clone`` is not in a git clone, or is not on a branch.
    """
    try:
        root = _git(clone, "rev-parse", "--show-toplevel")
        branch = _git(clone, "rev-parse", "--abbrev-ref", "HEAD")
        dirty = _git(clone, "status", "--porcelain")
    except (OSError, subprocess.CalledProcessError) as exc:
        raise InvalidInputError(
            f"{clone} is not in a git clone, so the workers' code cannot default to it: pass "
            "--repository URL --branch NAME."
        ) from exc
    if branch == "HEAD":
        raise InvalidInputError(
            f"The clone at {root} is not on a branch (detached HEAD): pass --branch NAME."
        )
    return {REPOSITORY_VARIABLE: root, BRANCH_VARIABLE: branch, "dirty": "1" if dirty else ""}


def _set_variable(
    client: SyncPrefectClient,
    name: str,
    given: str | None,
    current: Any,
    default: str | None,
) -> SetupStep:
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate

    value = given if given is not None else (current if current is not None else default)
    if current is not None and value == current:
        return SetupStep("variable", name, "kept", str(current))
    if current is None:
        client.create_variable(VariableCreate(name=name, value=value))
        return SetupStep("variable", name, "created", str(value))
    client.update_variable(VariableUpdate(name=name, value=value))
    return SetupStep("variable", name, "updated", f"{current} -> {value}")


def _merge_env(template: dict[str, Any], env: Mapping[str, str]) -> bool:
    """Merge ``env`` into the template's default ``env`` variable; whether anything changed."""
    if not env:
        return False
    properties = template.setdefault("variables", {}).setdefault("properties", {})
    env_property = properties.setdefault("env", {"type": "object", "title": "Environment"})
    defaults = dict(env_property.get("default") or {})
    merged = {**defaults, **env}
    env_property["default"] = merged
    return merged != defaults


def _env_detail(env: Mapping[str, str] | None) -> str:
    # Names only: values may be credentials, and this is printed.
    return f"env defaults {', '.join(sorted(env))}" if env else ""


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()
