"""End to end, the way a user deploys: a real `prefect server start`, `prefect deploy --all`
from prefect.yaml, `phi3ops automations apply`, a process worker, and the lifecycle deployment
run on the tiny Phi-3 from a local hub; then the registry, the schedules, the automations and
what they trigger are checked.

Every process started here (server, worker, the worker's flow-run processes) carries a marker
in its environment and is stopped at the end, on failure too.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.e2e.stack import (
    BIN,
    MARKER,
    Processes,
    flow_run_id,
    free_port,
    healthy,
    marked_pids,
    snapshot_repository,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EVAL_SET = "smoke"  # 6 items: the tiny model answers them in seconds
#: A second commit of the ONNX repo: the version that goes through a canary.
CANARY_BRANCH = "canary"
#: The same weights twice: only noise tells the versions apart, so no comparison gate may trip.
NOISE_PROOF_GATES = {
    "max_ttft_increase": 100.0,
    "max_s_per_token_increase": 100.0,
    "max_tokens_per_s_drop": 1.0,
}
#: The deployments prefect.yaml schedules; the stack pauses them (see `stack`).
SCHEDULED_DEPLOYMENTS = ("canary/canary", "monitor/monitor", "reevaluate/nightly-eval")

T = TypeVar("T")


class WebhookReceiver:
    """Collects the JSON bodies POSTed to it (what the custom-webhook block sends)."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- the stack -----------------------------------------------------------------------------


@dataclass
class Stack:
    api_url: str
    env: dict[str, str]
    data_dir: Path
    processes: Processes
    webhook: WebhookReceiver
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def client(self) -> Iterator[Any]:
        """A Prefect client of this stack's server (not of the test session's harness)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with (
            temporary_settings({PREFECT_API_URL: self.api_url}),
            get_client(sync_client=True) as client,
        ):
            yield client

    def prefect(self, *args: str, timeout: float = 120) -> str:
        return self.processes.run([str(BIN / "prefect"), *args], self.env, timeout=timeout)

    def wait(self, what: str, probe: Callable[[], T | None], *, timeout: float) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = probe()
            if value is not None:
                return value
            time.sleep(1)
        spent = {k: round(v, 1) for k, v in self.timings.items()}  # where the time went
        pytest.fail(
            f"timed out after {timeout}s waiting for {what} (so far: {spent})\n--- worker log:\n"
            f"{self.processes.log('worker')}\n--- server log:\n{self.processes.log('server')}"
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_phi3) -> Iterator[Stack]:
    """Server + work pool + `prefect deploy --all` + automations + worker, all torn down after."""
    from offline.local_hub import LocalHub
    from phi3ops.sources import ONNX_REPO_ID, PYTORCH_REPO_ID

    tmp = tmp_path_factory.mktemp("e2e")
    marker = uuid.uuid4().hex
    processes = Processes(tmp, marker)
    hub = LocalHub()
    webhook = WebhookReceiver()
    try:
        hub.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir)
        hub.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir, branch=CANARY_BRANCH)  # a 2nd version
        hub.add_repo(PYTORCH_REPO_ID, tiny_phi3.pytorch_dir)
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "PHI3OPS_", "MLFLOW_"))
        }
        env.update(
            {
                MARKER: marker,
                "PREFECT_HOME": str(tmp / "prefect-home"),
                "PREFECT_API_URL": api_url,
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp}/prefect.db",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_CLI_PROMPT": "false",
                "PREFECT_WORKER_QUERY_SECONDS": "2",
                "PREFECT_LOGGING_TO_API_ENABLED": "false",
                # What the worker's flow runs see: the tiny model on the local hub, a data dir
                # of their own, and gates the random weights can pass.
                "PHI3OPS_DATA_DIR": str(tmp / "data"),
                "PHI3OPS_HF_ENDPOINT": hub.url,
                "PHI3OPS_GATE_MIN_PASS_RATE": "0",
                "PHI3OPS_GATE_MIN_TOKENS_PER_S": "0",
                # The monitor a promotion triggers runs one window later: the shortest one.
                "PHI3OPS_MONITOR_WINDOW_MINUTES": "1",
                "HF_TOKEN": "",
                "HF_HOME": str(tmp / "hf-home"),
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "GX_ANALYTICS_ENABLED": "false",
            }
        )
        stack = Stack(api_url, env, tmp / "data", processes, webhook)
        t0 = time.monotonic()

        server = processes.start(
            "server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env,
        )
        deadline = time.monotonic() + 120
        while not healthy(api_url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start:\n{processes.log('server')}")
            time.sleep(0.5)
        stack.timings["server"] = time.monotonic() - t0

        t = time.monotonic()
        # The workers clone the code (prefect.yaml's git_clone pull step): this working tree.
        repository = snapshot_repository(tmp)
        processes.run(
            [str(BIN / "phi3ops"), "setup", "--repository", str(repository), "--branch", "main"],
            env,
        )
        stack.prefect("--no-prompt", "deploy", "--all", timeout=300)
        with stack.client() as client:
            # The tests run these deployments by hand with their own parameters. A scheduled
            # run in between races them: a canary verdict on the next 10-minute mark took the
            # deployment's one slot, and the test's own run was cancelled (CANCEL_NEW). Pausing
            # stops the schedules and keeps them as declared; manual and automation runs go on.
            for name in SCHEDULED_DEPLOYMENTS:
                client.pause_deployment(client.read_deployment_by_name(name).id)
        stack.timings["deploy"] = time.monotonic() - t

        t = time.monotonic()
        out = processes.run(
            [
                str(BIN / "phi3ops"),
                "automations",
                "apply",
                "--rollback",
                "--create-webhook-block",
                webhook.url,
            ],
            env,
        )
        assert out.count("created automation") == 5, out
        stack.timings["automations"] = time.monotonic() - t

        processes.start(
            "worker",
            [str(BIN / "prefect"), "worker", "start", "--pool", "phi3ops-process", "-n", "e2e"],
            env,
        )
        yield stack
    finally:
        processes.stop_all()
        webhook.close()
        hub.close()
        assert not marked_pids(marker), "a process started by the e2e test outlived it"


@pytest.fixture(scope="module")
def lifecycle_run(stack: Stack):
    """The lifecycle deployment run the documented way, waited for until it ends."""
    t = time.monotonic()
    out = stack.prefect(
        "deployment", "run", "lifecycle/lifecycle", "--param", f"eval_set={EVAL_SET}"
    )
    run_id = flow_run_id(out)
    with stack.client() as client:

        def final():
            run = client.read_flow_run(run_id)
            return run if run.state and run.state.is_final() else None

        run = stack.wait("the lifecycle flow run", final, timeout=300)
    stack.timings["lifecycle run"] = time.monotonic() - t
    return run


# --- the checks ------------------------------------------------------------------------------


def test_deployments_are_as_declared_in_prefect_yaml(stack: Stack) -> None:
    with stack.client() as client:
        deployments = {
            name: client.read_deployment_by_name(name)
            for name in (
                "lifecycle/lifecycle",
                "reevaluate/nightly-eval",
                "monitor/monitor",
                "rollback/rollback",
                "fetch/fetch",
                "canary/canary",
            )
        }
    for name, deployment in deployments.items():
        assert deployment.work_pool_name == "phi3ops-process", name
        assert "phi3ops" in deployment.tags, name
        assert deployment.description, name
        # Workers clone the code; the repository and branch are read at run time.
        assert deployment.pull_steps == [
            {
                "prefect.deployments.steps.git_clone": {
                    "id": "clone-code",
                    "repository": "{{ prefect.variables.phi3ops_repository }}",
                    "branch": "{{ prefect.variables.phi3ops_branch }}",
                }
            }
        ], name

    crons = {
        name: [(s.schedule.cron, s.active) for s in d.schedules] for name, d in deployments.items()
    }
    assert crons["reevaluate/nightly-eval"] == [("0 2 * * *", True)]
    assert crons["monitor/monitor"] == [("*/30 * * * *", True)]
    assert crons["canary/canary"] == [("*/10 * * * *", True)]
    assert crons["lifecycle/lifecycle"] == crons["rollback/rollback"] == []
    # Declared active; only this test stack pauses them.
    assert {name for name, d in deployments.items() if d.paused} == set(SCHEDULED_DEPLOYMENTS)

    assert deployments["reevaluate/nightly-eval"].parameters["alias"] == "champion"

    schema = deployments["lifecycle/lifecycle"].parameter_openapi_schema
    from flows.lifecycle import lifecycle_flow

    # The form the UI renders is the flow's own parameters, each a typed field.
    assert set(schema["properties"]) == set(inspect.signature(lifecycle_flow.fn).parameters)
    assert {"Source", "GateOverrides"} <= set(schema["definitions"])
    assert deployments["lifecycle/lifecycle"].enforce_parameter_schema

    # Rollbacks queue one at a time; lifecycle runs go side by side, and each alias move
    # waits for the model's global concurrency limit that `phi3ops setup` created.
    limit = deployments["rollback/rollback"].global_concurrency_limit
    assert limit is not None and limit.limit == 1
    assert deployments["lifecycle/lifecycle"].global_concurrency_limit is None
    with stack.client() as client:
        aliases = client.read_global_concurrency_limit_by_name("phi3ops-aliases-phi3-mini")
    assert aliases.limit == 1 and aliases.active


def test_automations_are_registered(stack: Stack) -> None:
    from deployments.automations import (
        MONITOR_AFTER_PROMOTION,
        ON_MONITORING_FAILED,
        ON_REGRESSION,
    )

    with stack.client() as client:
        monitor_id = client.read_deployment_by_name("monitor/monitor").id
        rollback_id = client.read_deployment_by_name("rollback/rollback").id
        (promoted,) = client.read_automations_by_name(MONITOR_AFTER_PROMOTION)
        (failed,) = client.read_automations_by_name(ON_MONITORING_FAILED)
        (regressed,) = client.read_automations_by_name(ON_REGRESSION)

    assert promoted.enabled and failed.enabled and regressed.enabled
    assert regressed.trigger.expect == {"phi3ops.model.regressed"}
    assert [a.type for a in regressed.actions] == ["send-notification"]
    assert promoted.trigger.expect == {"phi3ops.model.promoted"}
    assert [a.deployment_id for a in promoted.actions] == [monitor_id]
    assert failed.trigger.expect == {"phi3ops.monitoring.failed"}
    assert [a.type for a in failed.actions] == ["send-notification", "run-deployment"]
    assert failed.actions[1].deployment_id == rollback_id

    # Applying again updates them in place.
    out = stack.processes.run(
        [str(BIN / "phi3ops"), "automations", "apply", "--rollback"], stack.env
    )
    assert out.count("updated automation") == 5, out
    with stack.client() as client:
        assert len(client.read_automations()) == 5


def test_lifecycle_deployment_promotes_the_tiny_phi3(
    stack: Stack, lifecycle_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert lifecycle_run.state.is_completed(), (
        f"{lifecycle_run.state}\n{stack.processes.log('worker')}"
    )
    assert lifecycle_run.parameters["eval_set"] == EVAL_SET

    from mlflow import MlflowClient

    from phi3ops.evalset import load_eval_set, resolve_eval_set
    from phi3ops.settings import get_settings
    from phi3ops.tracking import configure_tracking

    monkeypatch.setenv("PHI3OPS_DATA_DIR", str(stack.data_dir))  # the worker's MLflow store
    get_settings.cache_clear()
    configure_tracking()
    champion = MlflowClient().get_model_version_by_alias("phi3-mini", "champion")

    assert str(champion.version) == "1"
    tags = champion.tags
    assert tags["phi3ops.source_repo"] == "microsoft/Phi-3-mini-4k-instruct-onnx"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["phi3ops.commit_sha"])
    assert tags["phi3ops.flavor"] == "onnx"
    assert tags["phi3ops.promotion.decision"] == "promoted"
    assert tags["phi3ops.promotion.triggered_by"].startswith("deployment lifecycle")
    eval_hash = load_eval_set(resolve_eval_set(EVAL_SET)).content_hash
    assert f"phi3ops.eval.{eval_hash[:12]}" in tags


def test_promotion_triggers_a_monitor_run(stack: Stack, lifecycle_run) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    assert lifecycle_run.state.is_completed()
    with stack.client() as client:
        monitor_id = client.read_deployment_by_name("monitor/monitor").id

        def triggered_run():
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[monitor_id]))
            )
            # The automation passes the model name from the event (scheduled runs do not).
            runs = [r for r in runs if r.parameters.get("model_name") == "phi3-mini"]
            return runs[0] if runs else None

        run = stack.wait("the monitor run the promotion triggers", triggered_run, timeout=60)
        assert run.parameters["alias"] == "champion"
        assert run.parameters["window_minutes"] == 1
        # Scheduled one window after the promotion, so that its window is full.
        assert run.expected_start_time is not None
        assert run.expected_start_time >= lifecycle_run.start_time + timedelta(minutes=1)

        def ended():
            current = client.read_flow_run(run.id)
            return current if current.state and current.state.is_final() else None

        run = stack.wait("the monitor run to end", ended, timeout=240)
    # No inference traffic yet: the monitor ends "insufficient data", which is not a failure.
    assert run.state.is_completed(), f"{run.state}\n{stack.processes.log('worker')}"


def _run_deployment(stack: Stack, name: str, params: dict[str, Any], *, timeout: float) -> Any:
    """Runs a deployment the documented way (`prefect deployment run`) and waits for its end."""
    out = stack.prefect("deployment", "run", name, "--params", json.dumps(params))
    run_id = flow_run_id(out)
    with stack.client() as client:

        def final():
            run = client.read_flow_run(run_id)
            return run if run.state and run.state.is_final() else None

        return stack.wait(f"the {name} run", final, timeout=timeout)


def test_a_canary_earns_promotion_on_live_traffic(
    stack: Stack, lifecycle_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lifecycle (live_traffic=canary) -> `phi3ops serve` splits traffic -> the canary
    deployment's verdict promotes the candidate -> the server serves it, without a restart.
    """
    from mlflow import MlflowClient

    from phi3ops.settings import get_settings
    from phi3ops.tracking import configure_tracking
    from phi3ops.traffic import read_plan

    assert lifecycle_run.state.is_completed()
    run = _run_deployment(
        stack,
        "lifecycle/lifecycle",
        {
            "source": {"revision": CANARY_BRANCH},
            "eval_set": EVAL_SET,
            "gates": NOISE_PROOF_GATES,
            "live_traffic": "canary",
            "canary_share": 0.5,
        },
        timeout=300,
    )
    assert run.state.is_completed(), f"{run.state}\n{stack.processes.log('worker')}"
    monkeypatch.setenv("PHI3OPS_DATA_DIR", str(stack.data_dir))  # the worker's MLflow store
    get_settings.cache_clear()
    configure_tracking()
    registry = MlflowClient()
    champion = str(registry.get_model_version_by_alias("phi3-mini", "champion").version)
    candidate = str(registry.get_model_version_by_alias("phi3-mini", "candidate").version)
    assert candidate != champion
    plan = read_plan("phi3-mini")
    assert plan is not None and plan.mode.value == "canary" and plan.share == 0.5

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack.processes.start(
        "serve",
        [str(BIN / "phi3ops"), "serve", "--port", str(port), "--poll-interval", "1"],
        {**stack.env, "PHI3OPS_DATA_DIR": str(stack.data_dir)},
    )
    stack.wait("phi3ops serve", lambda: healthy(url) or None, timeout=180)
    # Answers cannot tell the arms apart: wait for the candidate's arm, as its log says.
    stack.wait(
        "the candidate to take live traffic",
        lambda: (
            "(the plan's candidate) now takes live traffic" in stack.processes.log("serve", 10**7)
            or None
        ),
        timeout=180,
    )
    answered: dict[str, int] = {}
    with httpx.Client(timeout=60) as http:

        def chat(user: str) -> str:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "user": user}
            response = http.post(f"{url}/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["model"]

        for i in range(120):
            model = chat(f"user-{i}")
            answered[model] = answered.get(model, 0) + 1
        # No answer tells a client its arm: both arms answer as the registered model.
        assert set(answered) == {"phi3-mini"}, answered

        verdict = _run_deployment(
            stack,
            "canary/canary",
            {"thresholds": {"min_samples": 20}, "eval_set": EVAL_SET, "gates": NOISE_PROOF_GATES},
            timeout=300,
        )
        assert verdict.state.is_completed(), f"{verdict.state}\n{stack.processes.log('worker')}"
        promoted = registry.get_model_version("phi3-mini", candidate)
        assert promoted.tags["phi3ops.canary.verdict"] == "promoted", promoted.tags
        assert str(registry.get_model_version_by_alias("phi3-mini", "champion").version) == (
            candidate
        )
        assert read_plan("phi3-mini") is None  # the canary is over
        # phi3ops.canary.promoted reached its automation, which notified.
        note = stack.wait(
            "the canary notification",
            lambda: next(
                (n for n in stack.webhook.received if "promoted on live traffic" in n["subject"]),
                None,
            ),
            timeout=60,
        )
        assert f"v{candidate}" in note["subject"] + note["body"]

        # The server follows: every user now gets the new champion, no restart.
        stack.wait(
            "the server serving the promoted version",
            lambda: all(chat(f"user-{i}") == f"phi3-mini/{candidate}" for i in range(10)) or None,
            timeout=60,
        )


def test_monitoring_failure_notifies_and_starts_a_rollback(stack: Stack) -> None:
    stack.prefect(
        "event",
        "emit",
        "phi3ops.monitoring.failed",
        "--resource",  # as tasks.promotion.emit labels it
        json.dumps(
            {
                "prefect.resource.id": "phi3ops.model.phi3-mini.1",
                "prefect.resource.name": "phi3-mini v1",
                "phi3ops.model_name": "phi3-mini",
                "phi3ops.model_version": "1",
            }
        ),
        "--payload",
        json.dumps({"outcome": "failed", "broken": ["latency_p95_s"]}),
    )

    def monitoring_notes() -> list[dict[str, Any]] | None:
        notes = [
            n for n in stack.webhook.received if n["subject"].startswith("phi3ops: monitoring")
        ]
        return notes or None

    (note,) = stack.wait("the webhook notification", monitoring_notes, timeout=60)
    assert note["subject"] == "phi3ops: monitoring failed for phi3-mini v1"
    assert "latency_p95_s" in note["body"]
    assert "rollback/rollback was started" in note["body"]

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with stack.client() as client:
        rollback_id = client.read_deployment_by_name("rollback/rollback").id
        run = stack.wait(
            "the rollback run",
            lambda: next(
                iter(
                    client.read_flow_runs(
                        deployment_filter=DeploymentFilter(
                            id=DeploymentFilterId(any_=[rollback_id])
                        )
                    )
                ),
                None,
            ),
            timeout=60,
        )
    assert run.parameters["model_name"] == "phi3-mini"
    assert run.parameters["triggered_by"].startswith("automation phi3ops-on-monitoring-failed")
