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
    assert set(deployments) == {"lifecycle", "nightly-eval", "monitor", "rollback", "fetch"}
    for name, deployment in deployments.items():
        assert deployment["work_pool"]["name"] == "phi3ops-process", name
        assert deployment["description"].strip(), name
        assert "phi3ops" in deployment["tags"], name


@pytest.mark.parametrize("name", ["lifecycle", "nightly-eval", "monitor", "rollback", "fetch"])
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
        "rollback": [],
        "fetch": [],
    }
    nightly = deployments["nightly-eval"]
    assert nightly["entrypoint"] == "flows/reevaluate.py:reevaluate_flow"  # from scratch
    assert nightly["parameters"]["alias"] == "champion"
    for name in ("lifecycle", "rollback"):  # alias moves of one model must not race
        assert deployments[name]["concurrency_limit"]["limit"] == 1, name


def test_flows_run_from_the_clone_prefect_deploy_ran_in() -> None:
    config = _config()
    (build,) = config["build"]
    assert build["prefect.deployments.steps.run_shell_script"]["script"] == "pwd"
    assert config["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ clone.stdout }}"}}
    ]
