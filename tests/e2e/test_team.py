"""End to end, the team setup (docs/operations.md, "Team setup"), on loopback with real processes:

PostgreSQL 15 (run as the ``postgres`` user in a temp dir) under an ``mlflow server`` whose
artifacts go to moto's S3 server, and under ``prefect server start``; ``phi3ops setup`` and
``prefect deploy --all`` from one clone; two process workers whose working directories are two
other clones, each flow run pulling the code with prefect.yaml's ``git_clone`` step from a
local bare repository (a snapshot of this working tree). Then:

* two lifecycle runs of two different sources start at once, one on each worker: one
  ``@champion`` after, ``@previous`` right, both decisions audited, and no alias ever seen on a
  version without an evaluation;
* a worker killed (SIGKILL, with its flow run) in the middle of a lifecycle run leaves the
  registry consistent, and running the deployment again completes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.stack import (
    BIN,
    Processes,
    clean_env,
    kill_group,
    marked_pids,
    pids_with_env,
    postgres,
    postgres_unavailable,
    prefect_client,
    signal_pid,
    snapshot_repository,
    start_prefect_server,
    wait_for,
    wait_healthy,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]

MODEL = "phi3-mini"
EVAL_SET = "smoke"  # 6 items
BUCKET = "phi3ops-artifacts"
# Two more hub repos with the tiny ONNX weights: different sources, so different versions.
FINE_TUNE = "phi3ops-team/phi3-mini-finetune-onnx"
THIRD = "phi3ops-team/phi3-mini-third-onnx"
WORKERS = ("team-a", "team-b")


def _skip_reason() -> str | None:
    for module in ("psycopg2", "moto", "boto3"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[test]')"
    return postgres_unavailable()


@dataclass
class Team:
    processes: Processes
    api_url: str
    mlflow_url: str
    clones: dict[str, Path]
    worker_env: dict[str, dict[str, str]]
    timings: dict[str, float] = field(default_factory=dict)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}:\n{self.processes.log(name, chars)}"
            for name, chars in ((WORKERS[0], 5000), (WORKERS[1], 5000), ("server", 2000))
        )

    def mlflow(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_url, registry_uri=self.mlflow_url)

    def start_worker(self, name: str) -> None:
        # --limit 1: a worker takes one flow run at a time, so two runs go to two workers.
        self.workers[name] = self.processes.start(
            name,
            [
                *(str(BIN / "prefect"), "worker", "start", "--pool", "phi3ops-process"),
                *("--name", name, "--limit", "1"),
            ],
            self.worker_env[name],
            cwd=self.clones[name],
        )

    def run_lifecycle(self, repo_id: str) -> uuid.UUID:
        with prefect_client(self.api_url) as client:
            deployment = client.read_deployment_by_name("lifecycle/lifecycle")
            run = client.create_flow_run_from_deployment(
                deployment.id,
                parameters={"source": {"repo_id": repo_id}, "eval_set": EVAL_SET},
            )
        return run.id

    def wait_final(self, run_ids: list[uuid.UUID], *, timeout: float) -> list[Any]:
        with prefect_client(self.api_url) as client:

            def all_final() -> list[Any] | None:
                runs = [client.read_flow_run(i) for i in run_ids]
                return runs if all(r.state and r.state.is_final() for r in runs) else None

            return wait_for("the lifecycle runs", all_final, timeout=timeout, logs=self.logs)

    def worker_of(self, repo_id: str) -> str | None:
        """The worker whose host fetched ``repo_id``: its data dir holds the snapshot. (Worker
        logs cannot tell: both workers log a run they raced for, the loser its abort.)
        """
        folder = repo_id.replace("/", "--")
        found = [
            w
            for w in WORKERS
            if (Path(self.worker_env[w]["PHI3OPS_DATA_DIR"]) / "snapshots" / folder).is_dir()
        ]
        return found[0] if len(found) == 1 else None


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, tiny_phi3) -> Iterator[Team]:
    """PostgreSQL, moto S3, MLflow and Prefect servers, setup + deploy, two workers."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    import boto3
    from moto.server import ThreadedMotoServer

    from offline.local_hub import LocalHub
    from phi3ops.sources import ONNX_REPO_ID
    from tests.e2e.stack import free_port

    tmp = tmp_path_factory.mktemp("team")
    marker = uuid.uuid4().hex
    processes = Processes(tmp, marker)
    env = clean_env(marker)
    hub = LocalHub()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    t0 = time.monotonic()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    try:
        for repo_id in (ONNX_REPO_ID, FINE_TUNE, THIRD):
            hub.add_repo(repo_id, tiny_phi3.onnx_dir)
        with postgres(processes, env) as pg:
            pg.create_databases("mlflow", "prefect")
            s3.start()
            s3_url = f"http://127.0.0.1:{s3._port}"
            credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
            boto3.client(
                "s3",
                endpoint_url=s3_url,
                region_name="us-east-1",
                aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
            ).create_bucket(Bucket=BUCKET)

            # MLflow proxies the artifacts: only its server holds the S3 endpoint and keys.
            mlflow_port, prefect_port = free_port(), free_port()
            mlflow_url = f"http://127.0.0.1:{mlflow_port}"
            mlflow = processes.start(
                "mlflow",
                [
                    *(str(BIN / "mlflow"), "server", "--host", "127.0.0.1"),
                    *("--port", str(mlflow_port), "--workers", "1"),
                    *("--backend-store-uri", pg.url("mlflow", driver="psycopg2")),
                    *("--artifacts-destination", f"s3://{BUCKET}/mlflow"),
                ],
                {**env, **credentials, "MLFLOW_S3_ENDPOINT_URL": s3_url},
            )
            api_url = f"http://127.0.0.1:{prefect_port}/api"
            server_env = {
                **env,
                "PREFECT_HOME": str(tmp / "prefect-server-home"),
                "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", driver="asyncpg"),
            }
            start_prefect_server(processes, server_env, port=prefect_port)
            wait_healthy("mlflow", mlflow_url, mlflow, processes, timeout=180)
            timings = {"servers": time.monotonic() - t0}

            # The code: a bare repository; one clone deploys, two clones are the workers' dirs.
            bare = snapshot_repository(tmp / "git")
            clones = {name: tmp / "clones" / name for name in ("deployer", *WORKERS)}
            for path in clones.values():
                processes.run(["git", "clone", "-q", str(bare), str(path)], env)

            t = time.monotonic()
            cli_env = {**env, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp / "cli-home")}
            deployer = clones["deployer"]
            out = processes.run(
                [
                    *(str(BIN / "phi3ops"), "setup"),
                    *("--repository", bare.as_uri(), "--branch", "main"),
                    *("--env", f"MLFLOW_TRACKING_URI={mlflow_url}"),
                    *("--env", "PHI3OPS_GATE_MIN_PASS_RATE=0"),
                    *("--env", "PHI3OPS_GATE_MIN_TOKENS_PER_S=0"),
                ],
                cli_env,
                cwd=deployer,
            )
            assert "created concurrency limit phi3ops-aliases-phi3-mini" in out, out
            processes.run(
                [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
                cli_env,
                cwd=deployer,
                timeout=300,
            )
            with prefect_client(api_url) as client:
                # The pull step is stored as written: its variables resolve on each worker.
                (step,) = client.read_deployment_by_name("lifecycle/lifecycle").pull_steps
                assert step["prefect.deployments.steps.git_clone"]["repository"] == (
                    "{{ prefect.variables.phi3ops_repository }}"
                )
                # No scheduled run takes a worker's only slot (a canary verdict on the next
                # 10-minute mark would send both lifecycle runs to the other worker).
                for name in ("reevaluate/nightly-eval", "monitor/monitor", "canary/canary"):
                    client.pause_deployment(client.read_deployment_by_name(name).id)
            timings["setup + deploy"] = time.monotonic() - t

            worker_env = {
                name: {
                    **cli_env,
                    "PREFECT_HOME": str(tmp / f"{name}-home"),
                    # Host-local state: each "host" has its own data dir and hub cache. The
                    # tracking URI and the gates come from the pool (`phi3ops setup --env`).
                    "PHI3OPS_DATA_DIR": str(tmp / f"{name}-data"),
                    "PHI3OPS_HF_ENDPOINT": hub.url,
                    "HF_HOME": str(tmp / f"{name}-hf"),
                }
                for name in WORKERS
            }
            team = Team(processes, api_url, mlflow_url, clones, worker_env, timings)
            for name in WORKERS:
                team.start_worker(name)
            yield team
    finally:
        processes.stop_all()
        s3.stop()
        hub.close()
        assert not marked_pids(marker), "a process started by the team e2e test outlived it"


class AliasWatcher:
    """Polls the registered model's aliases; remembers every (alias, version) it saw."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.seen: set[tuple[str, str]] = set()
        self.polls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        from mlflow.exceptions import RestException

        while not self._stop.is_set():
            try:
                aliases = self.client.get_registered_model(MODEL).aliases or {}
            except RestException as exc:
                # Before the first registration the model does not exist: nothing to see yet.
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    self.failures.append(repr(exc))
                aliases = {}
            except Exception as exc:
                self.failures.append(repr(exc))
                aliases = {}
            else:
                self.polls += 1
            self.seen |= {(a, str(v)) for a, v in aliases.items()}
            self._stop.wait(0.3)

    def __enter__(self) -> AliasWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        # A poll that failed saw nothing: the check of what it saw would pass untested.
        assert not self.failures, self.failures[:5]
        assert self.polls > 0, "the watcher never read the registered model"


def _check_registry(client: Any, seen: set[tuple[str, str]] = frozenset()) -> dict[str, Any]:
    """What must hold whatever ran: no unfinished alias change, and every champion and previous
    (now, and each one seen while watching) evaluated on the eval set.
    """
    from phi3ops.evalset import load_eval_set, resolve_eval_set
    from phi3ops.names import EVALUATION_TAG_PREFIX, INTENT_TAG

    eval_tag = EVALUATION_TAG_PREFIX + load_eval_set(resolve_eval_set(EVAL_SET)).content_hash[:12]
    model = client.get_registered_model(MODEL)
    assert INTENT_TAG not in (model.tags or {}), model.tags
    aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
    for alias, version in set(seen) | set(aliases.items()):
        if alias in ("champion", "previous"):
            tags = client.get_model_version(MODEL, version).tags
            assert eval_tag in tags, f"@{alias} was on v{version}, which has no evaluation: {tags}"
    return aliases


def test_two_lifecycles_at_once_leave_one_champion(team: Team) -> None:
    from phi3ops.names import MODEL_VERSION_TAG, PROMOTION_TAG_PREFIX, RUN_TYPE_TAG, LineageTag
    from phi3ops.sources import ONNX_REPO_ID

    t = time.monotonic()
    client = team.mlflow()
    with AliasWatcher(client) as watcher:
        run_ids = [team.run_lifecycle(repo) for repo in (ONNX_REPO_ID, FINE_TUNE)]
        runs = team.wait_final(run_ids, timeout=900)
    team.timings["two lifecycles at once"] = time.monotonic() - t
    for run in runs:
        assert run.state.is_completed(), f"{run.name}: {run.state}\n{team.logs()}"
    # One run on each worker, each from a clone its pull step made.
    assert {team.worker_of(r) for r in (ONNX_REPO_ID, FINE_TUNE)} == set(WORKERS), team.logs()
    for name in WORKERS:
        assert "git_clone" in team.processes.log(name, 10**7), team.processes.log(name)

    aliases = _check_registry(client, watcher.seen)
    versions = {
        v.tags[LineageTag.SOURCE_REPO.value]: str(v.version)
        for v in client.search_model_versions(f"name = '{MODEL}'")
    }
    assert set(versions) == {ONNX_REPO_ID, FINE_TUNE}
    decided = {
        v: client.get_model_version(MODEL, v).tags[PROMOTION_TAG_PREFIX + "decision"]
        for v in versions.values()
    }
    before = {
        v: client.get_model_version(MODEL, v).tags[PROMOTION_TAG_PREFIX + "champion_before"]
        for v in versions.values()
    }
    # Serialised: the first decision found no champion, the second was taken against the first.
    (first,) = [v for v, b in before.items() if b == ""]
    (second,) = [v for v in versions.values() if v != first]
    assert decided[first] == "promoted"
    assert before[second] == first
    if decided[second] == "promoted":
        assert (aliases["champion"], aliases.get("previous")) == (second, first)
    else:
        assert decided[second] == "rejected"
        assert aliases["champion"] == first and "previous" not in aliases
    # Both decisions audited: one finished decision run each.
    experiment = client.get_experiment_by_name("phi3ops")
    audits = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_TYPE_TAG}` = 'promotion'"
    )
    assert sorted(r.data.tags[MODEL_VERSION_TAG] for r in audits) == sorted(versions.values())
    assert all(r.info.status == "FINISHED" for r in audits)
    # The alias moves ran under the Prefect limit: the workers' lock is `auto`, and the
    # server is configured (each run's log says which lock it held).
    for name in WORKERS:
        log = team.processes.log(name, 10**7)
        assert "Holding the Prefect global concurrency limit phi3ops-aliases-phi3-mini" in log


def test_a_sharded_evaluation_across_both_workers_equals_the_unsharded_one(
    team: Team, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.evaluate import evaluate_flow
    from phi3ops.evalset import open_eval_set
    from phi3ops.names import EVALUATION_TAG_PREFIX, TABLE_ARTIFACT
    from phi3ops.settings import get_settings

    client = team.mlflow()
    champion = client.get_model_version_by_alias(MODEL, "champion")
    eval_tag = EVALUATION_TAG_PREFIX + open_eval_set(EVAL_SET).content_hash[:12]
    unsharded = champion.tags[eval_tag]  # the lifecycle's evaluation, in one process

    t = time.monotonic()
    # This process runs the evaluate flow on the team's servers; its shards run on the pool.
    monkeypatch.setenv("PHI3OPS_MLFLOW_TRACKING_URI", team.mlflow_url)
    get_settings.cache_clear()
    with temporary_settings({PREFECT_API_URL: team.api_url}):
        sharded = evaluate_flow(
            model_uri=f"models:/{MODEL}/{champion.version}",
            eval_set=EVAL_SET,
            shards=2,
            reuse=False,
        )
        # Its run logs go to the team's server: send them while it is up, or this process
        # would spend its exit retrying a server that is gone.
        APILogWorker.drain_all(timeout=120)
    team.timings["sharded evaluation"] = time.monotonic() - t

    # One shard on each worker (each worker's log has its shard's line).
    shard_logs = {w for w in WORKERS if "Shard " in team.processes.log(w, 10**7)}
    assert shard_logs == set(WORKERS), team.logs()

    def table(run_id: str) -> Any:
        columns = ["id", "output", "error", "passed", "batch_size", "completion_tokens"]
        frame = mlflow.load_table(TABLE_ARTIFACT, run_ids=[run_id])
        return json.loads(frame[columns].to_json(orient="records"))  # NaN (no error): null

    assert sharded.run_id != unsharded
    assert table(sharded.run_id) == table(unsharded)
    before = client.get_run(unsharded).data.metrics
    for name in ("pass_rate", "error_rate", "n_items", "completion_tokens"):
        assert sharded.metrics[name] == before[name], name
    assert sharded.tag_pass_rates == {
        k.removeprefix("pass_rate."): v for k, v in before.items() if k.startswith("pass_rate.")
    }
    assert any("2 shards" in note for note in sharded.notes)
    # Logged as the version's one evaluation on the set.
    assert client.get_model_version(MODEL, champion.version).tags[eval_tag] == sharded.run_id


def test_a_worker_killed_mid_run_leaves_the_registry_consistent(team: Team) -> None:
    from phi3ops.names import REGISTRATION_TAG, LineageTag

    client = team.mlflow()
    aliases_before = _check_registry(client)
    t = time.monotonic()
    run_id = team.run_lifecycle(THIRD)

    def registered() -> str | None:
        # Packaged and registered (@candidate set, the pending tag gone: a kill between the two
        # steps leaves a pending version the next run finishes, which is a different check):
        # the run is evaluating now, halfway through.
        for version in client.search_model_versions(f"name = '{MODEL}'"):
            tags = version.tags
            if tags.get(LineageTag.SOURCE_REPO.value) == THIRD and REGISTRATION_TAG not in tags:
                return str(version.version)
        return None

    wait_for("the third version", registered, timeout=600, logs=team.logs)
    worker = wait_for("the run's worker", lambda: team.worker_of(THIRD), timeout=30)
    # The host dies: its worker and the flow run it started (in a session of its own).
    process = team.workers[worker]
    kill_group(process, signal.SIGKILL)
    for pid in pids_with_env(f"PREFECT__FLOW_RUN_ID={run_id}"):
        signal_pid(pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert not pids_with_env(f"PREFECT__FLOW_RUN_ID={run_id}")

    assert _check_registry(client) == {**aliases_before, "candidate": registered()}

    # Run the deployment again: the other worker takes it and finishes the job.
    again = team.run_lifecycle(THIRD)
    (run,) = team.wait_final([again], timeout=600)
    team.timings["killed + re-run"] = time.monotonic() - t
    assert run.state.is_completed(), f"{run.state}\n{team.logs()}"
    aliases = _check_registry(client)
    third = registered()
    assert aliases["candidate"] == third
    decision = client.get_model_version(MODEL, third).tags["phi3ops.promotion.decision"]
    if decision == "promoted":
        assert (aliases["champion"], aliases["previous"]) == (third, aliases_before["champion"])
    else:
        assert aliases["champion"] == aliases_before["champion"]
    print({k: round(v, 1) for k, v in team.timings.items()})
