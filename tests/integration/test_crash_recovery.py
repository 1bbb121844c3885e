"""Registry changes survive a crash: the real command is killed at a named point in a
subprocess (``PHI3OPS_CRASH_AT``, exit 137, no cleanup), then the same command runs again here
and the registry must hold exactly what one uninterrupted run leaves.

The subprocesses share this test's data dir (SQLite store) and Prefect test server. Each table
of crash points also states what the crash left behind, so the tests show the half-done state
that the re-run repairs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import pytest

from phi3ops.evalset import open_eval_set
from phi3ops.names import CHAMPION_ALIAS, PREVIOUS_ALIAS, EvalTag
from phi3ops.registry import alias_version
from phi3ops.settings import get_settings
from tasks.evaluation import evaluation_tag_key

pytestmark = pytest.mark.usefixtures("prefect_harness")

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "phi3-crash"
GOOD = {"pass_rate": 0.8, "latency_p95_s": 2.0, "tokens_per_s": 40.0, "error_rate": 0.0}


def _crash(point: str, *command: str) -> None:
    """Run ``phi3ops <command>`` in a subprocess that dies at ``point``."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PHI3OPS_CRASH_AT": point, "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run(
        [sys.executable, "-m", "cli", *command],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 137, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@dataclass
class Store:
    client: object
    events: list[tuple[str, str, UUID | None]] = field(default_factory=list)

    def aliases(self, name: str = NAME) -> tuple[str | None, str | None]:
        return alias_version(name, CHAMPION_ALIAS), alias_version(name, PREVIOUS_ALIAS)

    def runs(self) -> list:
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        return self.client.search_runs(experiments, max_results=1000)

    def intent_tags(self, version: str) -> list[str]:
        model = self.client.get_registered_model(NAME).tags
        mv = self.client.get_model_version(NAME, version).tags
        return [k for k in [*model, *mv] if k == "phi3ops.intent"]


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Store:
    """Versions 1-3 of NAME, each evaluated (good metrics) on the smoke set; events recorded."""
    from mlflow import MlflowClient

    import tasks.promotion
    from phi3ops.tracking import configure_tracking

    experiment = configure_tracking()
    client = MlflowClient()
    client.create_registered_model(NAME)
    eval_hash = open_eval_set("smoke").content_hash
    for version in ("1", "2", "3"):
        client.create_model_version(NAME, source=str(get_settings().data_dir / "weights"))
        tags = {
            EvalTag.MODEL_NAME.value: NAME,
            EvalTag.MODEL_VERSION.value: version,
            EvalTag.MODEL_URI.value: f"models:/{NAME}/{version}",
            EvalTag.EVAL_SET.value: "smoke",
            EvalTag.EVAL_SET_HASH.value: eval_hash,
        }
        run_id = client.create_run(experiment, tags=tags).info.run_id
        for key, value in GOOD.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id)
        client.set_model_version_tag(NAME, version, evaluation_tag_key(eval_hash), run_id)
    done = Store(client)

    def record(event, *, model_name, version, payload, event_id=None):
        done.events.append((event, version, event_id))

    monkeypatch.setattr(tasks.promotion, "emit", record)
    return done


def _promote_here(version: str):
    from flows.promote import promote_flow

    return promote_flow(model_name=NAME, candidate=version, eval_set="smoke")


# --- promotion: aliases, tags, decision run, event --------------------------------------------

# A subprocess costs ~6 s, so the points below are those whose repairs differ; the ones between
# them (promote.after-tags, promote.after-run, rollback.after-tags) take the same paths.
PROMOTE_POINTS = {
    # crash point: (champion, previous) right after the crash
    "promote.after-intent": ("1", None),  # nothing moved yet
    "promote.after-aliases": ("2", "1"),  # no tags, run or event
    "promote.during-run": ("2", "1"),  # the decision run left RUNNING
    "promote.after-event": ("2", "1"),  # only the intent left to clear
}


@pytest.mark.parametrize("point", PROMOTE_POINTS)
def test_a_crashed_promotion_is_finished_by_the_next_run(store: Store, point: str) -> None:
    _promote_here("1")
    _crash(point, "promote", "--model-name", NAME, "--candidate", "2", "--eval-set", "smoke")
    from tasks.promotion import pending_intent

    assert store.aliases() == PROMOTE_POINTS[point]
    intent = pending_intent(NAME)
    assert intent is not None and (intent.op, intent.version) == ("promote", "2")
    store.events.clear()

    decision = _promote_here("2")  # the same command again

    assert decision.promote
    assert store.aliases() == ("2", "1")
    tags = store.client.get_model_version(NAME, "2").tags
    assert tags["phi3ops.promotion.decision"] == "promoted"
    assert tags["phi3ops.promotion.champion_before"] == "1"
    assert tags["phi3ops.promotion.at"] == intent.at  # the crashed run's decision, finished
    runs = [r for r in store.runs() if r.data.tags.get("phi3ops.intent_id") == intent.id]
    assert sorted(r.info.status for r in runs) == (
        ["FAILED", "FINISHED"] if point == "promote.during-run" else ["FINISHED"]
    )
    assert [r for r in store.runs() if r.info.status == "RUNNING"] == []
    # Announced once more under the intent's id: Prefect's triggers act on one id once.
    assert store.events == [("phi3ops.model.promoted", "2", UUID(intent.id))]
    assert store.intent_tags("2") == []
    assert pending_intent(NAME) is None


# --- rollback: champion, previous, tags, event -------------------------------------------------

ROLLBACK_POINTS = {
    "rollback.after-intent": ("2", "1"),
    "rollback.after-champion": ("1", "1"),  # @previous == @champion
    "rollback.after-previous": ("1", None),  # no tags, no event
}


@pytest.mark.parametrize("point", ROLLBACK_POINTS)
def test_a_crashed_rollback_is_finished_by_the_next_run(store: Store, point: str) -> None:
    from flows.rollback import rollback_flow

    _promote_here("1")
    _promote_here("2")
    _crash(point, "rollback", "--model-name", NAME, "--no-smoke")
    from tasks.promotion import pending_intent

    assert store.aliases() == ROLLBACK_POINTS[point]
    intent = pending_intent(NAME)
    assert intent is not None and (intent.op, intent.version) == ("rollback", "1")
    store.events.clear()

    state = rollback_flow(model_name=NAME, smoke_eval_set=None)  # the same command again

    assert (state.champion, state.previous, state.resumed) == ("1", None, True)
    assert store.aliases() == ("1", None)
    assert store.client.get_model_version(NAME, "2").tags["phi3ops.rolled_back_at"] == intent.at
    restored = store.client.get_model_version(NAME, "1").tags["phi3ops.restored_by_rollback"]
    assert restored.startswith(intent.at)
    assert store.events == [("phi3ops.model.rolled-back", "1", UUID(intent.id))]
    assert store.intent_tags("1") == []
    assert pending_intent(NAME) is None


# --- packaging: log, register, @candidate ---------------------------------------------------

PACKAGE_POINTS = {
    # crash point: (@candidate, versions) right after the crash
    "package.after-log-model": ("1", ["1"]),  # inside the run: RUNNING, logged model orphaned
    "package.after-log": ("1", ["1"]),  # logged and finished, never registered
    "register.after-version": ("1", ["1", "2"]),  # version 2 exists without @candidate
}


@pytest.mark.slow
@pytest.mark.parametrize("point", PACKAGE_POINTS)
def test_a_crashed_packaging_is_finished_by_the_next_run(
    hub_with_tiny_phi3, tiny_phi3, isolated_settings: Path, point: str
) -> None:
    from mlflow import MlflowClient

    from flows.package import package_flow
    from phi3ops.sources import ONNX_REPO_ID
    from phi3ops.tracking import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    package_flow(model_name=NAME)  # version 1, @candidate
    hub_with_tiny_phi3.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir, branch="v2")
    _crash(point, "package", "--model-name", NAME, "--revision", "v2")

    def versions() -> list[str]:
        return sorted(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))

    candidate, existing = PACKAGE_POINTS[point]
    assert (alias_version(NAME, "candidate"), versions()) == (candidate, existing)
    experiments = [e.experiment_id for e in client.search_experiments()]
    crashed = {r.info.run_id: r.info.status for r in client.search_runs(experiments)}

    registered = package_flow(model_name=NAME, revision="v2")  # the same command again

    assert (registered.version, versions()) == ("2", ["1", "2"])
    assert registered.aliases == ["candidate"] and alias_version(NAME, "candidate") == "2"
    assert "phi3ops.registration" not in registered.tags
    runs = {r.info.run_id: r.info.status for r in client.search_runs(experiments)}
    assert "RUNNING" not in runs.values()
    if point == "package.after-log-model":  # the orphan run failed, its model discarded
        assert sorted(runs.values()) == ["FAILED", "FINISHED", "FINISHED"]
    else:  # the crashed run's logged model was registered: nothing logged again
        assert registered.run_id in crashed and len(runs) == 2
    models = client.search_logged_models(experiments)
    assert sorted(str(m.status) for m in models) == ["READY", "READY"]
    copies = list((isolated_settings / "mlartifacts").rglob("*.onnx"))
    assert len(copies) == 2, copies  # one copy of the weights per version, no orphan copy


@pytest.mark.slow
def test_a_lifecycle_killed_in_its_promotion_is_finished_by_the_next_run(
    hub_with_tiny_phi3, tiny_phi3
) -> None:
    """The aliases moved, then the process died: the re-run finds the version already champion,
    and finishes the promotion's audit instead of calling it "unchanged".
    """
    from cli.jobs import DEMO_GATES
    from flows.lifecycle import Source, lifecycle_flow
    from phi3ops.policies import GateOverrides
    from phi3ops.sources import ONNX_REPO_ID

    name, demo = "phi3-crash-lifecycle", GateOverrides(**DEMO_GATES)
    assert lifecycle_flow(model_name=name, eval_set="smoke", gates=demo).decision == "promoted"
    hub_with_tiny_phi3.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir, branch="v2")
    gates = [arg for key, value in DEMO_GATES.items() for arg in ("--gate", f"{key}={value}")]
    command = ["run", "--model-name", name, "--revision", "v2", "--eval-set", "smoke", *gates]
    _crash("promote.after-aliases", *command)
    from tasks.promotion import pending_intent

    assert (alias_version(name, CHAMPION_ALIAS), alias_version(name, PREVIOUS_ALIAS)) == ("2", "1")
    assert pending_intent(name) is not None

    result = lifecycle_flow(
        model_name=name, source=Source(revision="v2"), eval_set="smoke", gates=demo
    )

    assert (result.version, result.decision, result.champion) == ("2", "promoted", "2")
    assert result.package_reused and result.evaluation_reused
    assert pending_intent(name) is None
    from phi3ops.registry import client

    tags = client().get_model_version(name, "2").tags
    assert (tags["phi3ops.promotion.decision"], tags["phi3ops.promotion.champion_before"]) == (
        "promoted",
        "1",
    )
