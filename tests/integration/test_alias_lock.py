"""The alias lock across hosts (tasks/alias_lock.py) and what creates it (deployments/setup.py),
against the session's Prefect server: a missing limit is a clear error, an existing one
serialises alias moves; `phi3ops setup` is idempotent.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from deployments import setup
from phi3ops.errors import OrchestrationError
from phi3ops.names import alias_limit_name
from tasks.alias_lock import alias_lock_kind, check_alias_lock, promotion_lock

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def prefect_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    from phi3ops.settings import get_settings

    monkeypatch.setenv("PHI3OPS_ALIAS_LOCK", "auto")  # the harness is a server at a URL
    get_settings.cache_clear()
    assert alias_lock_kind() == "prefect"


def _model() -> str:
    return f"lock-test-{uuid.uuid4().hex[:8]}"


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _forget_code_variables(client) -> None:
    """The variables are server-wide: each test that reads them starts without them."""
    for name in (setup.REPOSITORY_VARIABLE, setup.BRANCH_VARIABLE):
        if client.read_variable_by_name(name) is not None:
            client.delete_variable_by_name(name)


@pytest.mark.usefixtures("prefect_lock")
def test_a_missing_limit_is_an_error_that_names_the_fix() -> None:
    model = _model()
    with (
        pytest.raises(OrchestrationError, match=r"phi3ops setup --model-name") as caught,
        promotion_lock(model, timeout=10),
    ):
        pytest.fail("an alias move ran without the lock")
    assert alias_limit_name(model) in str(caught.value)
    with pytest.raises(OrchestrationError, match=alias_limit_name(model)):
        check_alias_lock(model)  # what lifecycle checks before any work


@pytest.mark.usefixtures("prefect_lock")
def test_a_limit_with_several_slots_is_refused_by_the_preflight_and_fixed_by_setup() -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    model = _model()
    with _client() as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=alias_limit_name(model), limit=3)
        )
    with pytest.raises(OrchestrationError, match="one slot"):
        check_alias_lock(model)
    with _client() as client:
        (step,) = setup.ensure_alias_limits(client, model_names=[model])
    assert (step.action, step.detail) == ("updated", "3 slot(s) -> 1 slot")
    check_alias_lock(model)


@pytest.mark.usefixtures("prefect_lock")
def test_with_the_limit_alias_moves_are_serialised() -> None:
    model = _model()
    with _client() as client:
        setup.ensure_alias_limits(client, model_names=[model])
    held: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def move() -> None:
        try:
            start.wait()
            with promotion_lock(model, timeout=60):
                began = time.monotonic()
                time.sleep(0.8)
                held.append((began, time.monotonic()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=move) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(held) == 3
    spans = sorted(held)
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert next_start >= end, f"two holders at once: {spans}"


def test_setup_is_idempotent(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "init", "-q", "-b", "team", str(clone)], check=True)
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "one"], check=True)
    model = _model()
    with _client() as client:
        _forget_code_variables(client)
        pool = f"pool-{uuid.uuid4().hex[:6]}"
        first = [
            setup.ensure_work_pool(client, name=pool, env={"MLFLOW_TRACKING_URI": "http://m:5000"}),
            *setup.ensure_alias_limits(client, model_names=[model, model]),
            *setup.ensure_code_variables(client, clone=clone),
        ]
        again = [
            setup.ensure_work_pool(client, name=pool),
            *setup.ensure_alias_limits(client, model_names=[model]),
            *setup.ensure_code_variables(client, clone=clone),
        ]
        moved = setup.ensure_code_variables(client, repository="file:///srv/p.git", branch="main")
        template = client.read_work_pool(pool).base_job_template
        variables = {
            name: client.read_variable_by_name(name).value
            for name in (setup.REPOSITORY_VARIABLE, setup.BRANCH_VARIABLE)
        }

    assert [s.action for s in first] == ["created", "created", "created", "created"]
    assert first[2].detail == str(clone.resolve())
    assert first[3].detail == "team"
    assert [s.action for s in again] == ["kept"] * 4
    assert [s.action for s in moved] == ["updated", "updated"]
    assert variables == {"phi3ops_repository": "file:///srv/p.git", "phi3ops_branch": "main"}
    # Prefect's process template, with the pool-wide environment as the default of `env`.
    env = template["variables"]["properties"]["env"]
    assert env["default"] == {"MLFLOW_TRACKING_URI": "http://m:5000"}
    assert "{{ env }}" in str(template["job_configuration"]["env"])


def test_setup_without_a_clone_or_values_says_what_to_pass(tmp_path: Path) -> None:
    from phi3ops.errors import InvalidInputError

    with _client() as client:
        _forget_code_variables(client)
        with pytest.raises(InvalidInputError, match="--repository URL --branch NAME"):
            setup.ensure_code_variables(client, clone=tmp_path)
