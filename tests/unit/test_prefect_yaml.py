"""prefect.yaml agrees with the flows it deploys (no server needed; the e2e test deploys it)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow

REPO_ROOT = Path(__file__).resolve().parents[2]


def _config() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())


def _deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in _config()["deployments"]}


def _flow(entrypoint: str) -> Flow:
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    assert isinstance(flow, Flow), entrypoint
    return flow


def test_every_stage_is_deployed_to_the_process_pool() -> None:
    deployments = _deployments()
    assert set(deployments) == {
        "lifecycle",
        "nightly-eval",
        "monitor",
        "canary",
        "rollback",
        "fetch",
        "eval-shard",
    }
    for name, deployment in deployments.items():
        assert deployment["work_pool"]["name"] == "phi3ops-process", name
        assert deployment["description"].strip(), name
        assert "phi3ops" in deployment["tags"], name


@pytest.mark.parametrize(
    "name", ["lifecycle", "nightly-eval", "monitor", "canary", "rollback", "fetch"]
)
def test_parameter_defaults_are_valid_for_the_flow(name: str) -> None:
    deployment = _deployments()[name]
    flow = _flow(deployment["entrypoint"])
    # What the worker does with the deployment's parameters before the run starts.
    flow.validate_parameters(deployment.get("parameters") or {})


def test_schedules_and_concurrency() -> None:
    deployments = _deployments()
    crons = {name: [s["cron"] for s in d.get("schedules") or []] for name, d in deployments.items()}
    assert crons == {
        "lifecycle": [],
        "nightly-eval": ["0 2 * * *"],
        "monitor": ["*/30 * * * *"],
        "canary": ["*/10 * * * *"],
        "rollback": [],
        "fetch": [],
        "eval-shard": [],  # started by the evaluate flow, one run per shard
    }
    nightly = deployments["nightly-eval"]
    assert nightly["entrypoint"] == "flows/reevaluate.py:reevaluate_flow"  # from scratch
    assert nightly["parameters"]["alias"] == "champion"
    # Rollbacks queue; lifecycle runs run side by side on any workers: their alias moves are
    # serialised per model by a Prefect global concurrency limit (tasks.alias_lock), not here.
    assert deployments["rollback"]["concurrency_limit"]["limit"] == 1
    assert "concurrency_limit" not in deployments["lifecycle"]
    # A verdict still running makes the next scheduled one redundant: cancelled, not queued.
    assert deployments["canary"]["concurrency_limit"] == {
        "limit": 1,
        "collision_strategy": "CANCEL_NEW",
    }


def test_workers_clone_the_code_from_prefect_variables() -> None:
    config = _config()
    assert not config.get("build")  # nothing records the deploying clone's path any more
    (step,) = config["pull"]
    clone = step["prefect.deployments.steps.git_clone"]
    # Resolved on the worker when a run starts: one `prefect variable set` moves every worker.
    assert clone["repository"] == "{{ prefect.variables.phi3ops_repository }}"
    assert clone["branch"] == "{{ prefect.variables.phi3ops_branch }}"
    assert all("pull" not in d for d in config["deployments"])  # every deployment uses it


def test_the_pull_step_names_variables_that_phi3ops_setup_sets() -> None:
    from deployments.setup import BRANCH_VARIABLE, POOL, REPOSITORY_VARIABLE

    clone = _config()["pull"][0]["prefect.deployments.steps.git_clone"]
    assert REPOSITORY_VARIABLE in clone["repository"]
    assert BRANCH_VARIABLE in clone["branch"]
    assert {d["work_pool"]["name"] for d in _config()["deployments"]} == {POOL}


def test_the_git_clone_step_exists_with_these_arguments() -> None:
    import inspect

    from prefect.deployments.steps import git_clone

    clone = _config()["pull"][0]["prefect.deployments.steps.git_clone"]
    parameters = inspect.signature(git_clone).parameters
    assert set(clone) - {"id"} <= set(parameters)
