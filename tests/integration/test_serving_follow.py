"""`phi3ops serve` on an alias follows it: a moved ``@champion`` is loaded beside the version
serving and takes over without a failed request; a version that cannot load changes nothing.
Serving ``@champion``, it follows the model's traffic plan too: ``@candidate`` takes a canary
share of the requests or answers shadow copies of them.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from phi3ops.names import ARM_TAG, MODEL_VERSION_TAG, SHADOW_TAG
from phi3ops.serving.server import start_server, stop_server, wait_until_ready

NAME = "phi3-follow"
POLL_S = 1.0
CHAT = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, tiny_phi3) -> Iterator[dict[str, str]]:
    """Versions of NAME in one store: 'old' and 'new' (the same ONNX package registered twice)
    and 'broken' (an MLmodel without a loadable flavor); @champion on 'old'.
    """
    import mlflow
    from mlflow import MlflowClient

    from offline.local_hub import LocalHub
    from phi3ops.settings import get_settings
    from phi3ops.sources import ONNX_REPO_ID, Flavor, Variant
    from phi3ops.tracking import configure_tracking
    from tasks.hub import fetch_snapshot
    from tasks.packaging import log_model
    from tasks.registry import register_version

    data_dir = tmp_path_factory.mktemp("follow-data")
    broken = tmp_path_factory.mktemp("broken-model")
    (broken / "MLmodel").write_text("artifact_path: model\nflavors: {}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", str(data_dir))
        get_settings.cache_clear()
        with LocalHub() as hub:
            hub.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir)
            fetched = fetch_snapshot(ONNX_REPO_ID, variant=Variant.ONNX_CPU_INT4, endpoint=hub.url)
            old = register_version(log_model(fetched, flavor=Flavor.ONNX), fetched, model_name=NAME)
        new = mlflow.register_model(old.source, NAME).version
        configure_tracking()
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(broken), "model")
        client = MlflowClient()
        bad = client.create_model_version(
            NAME, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
        ).version
        client.set_registered_model_alias(NAME, "champion", old.version)
        yield {"old": old.version, "new": str(new), "broken": str(bad), "data_dir": str(data_dir)}
    get_settings.cache_clear()


@dataclass
class Answer:
    sent: float  # time.monotonic() when the request was sent
    latency_s: float
    status: int
    model: str | None


class Traffic:
    """A steady stream of chat completions from ``clients`` threads, until `stop` (all sent
    as ``user``, when given).
    """

    def __init__(self, url: str, clients: int = 2, *, user: str | None = None) -> None:
        self.url = url
        self.body = CHAT if user is None else {**CHAT, "user": user}
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post(f"{self.url}/v1/chat/completions", json=self.body)
                    status = response.status_code
                    model = response.json().get("model") if status == 200 else response.text
                except httpx.HTTPError as exc:
                    status, model = -1, repr(exc)
                self.answers.append(Answer(sent, time.monotonic() - sent, status, model))

    def wait_for(self, model: str, *, timeout: float) -> float:
        """Seconds until the first answer naming ``model``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            named = [a for a in list(self.answers) if a.status == 200 and a.model == model]
            if named:
                return named[0].sent + named[0].latency_s - start
            time.sleep(0.1)
        raise AssertionError(f"no answer named {model} within {timeout} s")

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return self.answers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _recorded_versions(data_dir: str) -> dict[str, int]:
    """How many inference records each version of NAME has in the store."""
    counts: dict[str, int] = {}
    for (version, _, _), n in _recorded_arms(data_dir).items():
        counts[version] = counts.get(version, 0) + n
    return counts


def _wait_for_line(log_path: Path, text: str, *, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if text in line:
                return line
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the server log:\n{log_path.read_text()[-3000:]}")


@pytest.mark.slow
def test_the_server_follows_champion_without_failing_a_request(versions, tmp_path) -> None:
    from mlflow import MlflowClient

    from phi3ops.settings import get_settings

    log_path = tmp_path / "server.log"
    port, url = _free_port(), ""
    with log_path.open("w") as log, pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", versions["data_dir"])
        get_settings.cache_clear()
        process = start_server(
            f"models:/{NAME}@champion",
            port=port,
            poll_s=POLL_S,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(process, url, timeout=240)
            traffic = Traffic(url)
            time.sleep(3)  # the latency before any switch
            moved = time.monotonic()
            MlflowClient().set_registered_model_alias(NAME, "champion", versions["new"])
            switch_s = traffic.wait_for(f"{NAME}/{versions['new']}", timeout=60)
            time.sleep(2)  # the latency after it
            assert (
                httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == f"{NAME}/{versions['new']}"
            )

            MlflowClient().set_registered_model_alias(NAME, "champion", versions["broken"])
            why = _wait_for_line(log_path, f"Cannot serve version {versions['broken']}", timeout=30)
            time.sleep(3 * POLL_S)  # more looks at the alias: the broken version is not retried
            answers = traffic.stop()
        finally:
            stop_server(process)
            get_settings.cache_clear()

    log_text = log_path.read_text()
    assert [a for a in answers if a.status != 200] == []  # not one request failed
    before = [a for a in answers if a.sent + a.latency_s < moved]
    across = [a for a in answers if moved <= a.sent + a.latency_s <= moved + switch_s + 1]
    assert before and across
    assert switch_s < 15 * POLL_S, f"the switch took {switch_s:.1f} s"
    # Every request after the broken version's failure is still answered by the new version.
    assert answers[-1].model == f"{NAME}/{versions['new']}"
    assert "WARNING" in why and "python_function" in why  # the version, and why it failed
    assert f"Still serving version {versions['new']}" in why
    assert log_text.count(f"Cannot serve version {versions['broken']}") == 1
    print(  # the switch pause, for the record (pytest -s)
        f"switch {switch_s:.2f} s; longest latency before {max(a.latency_s for a in before):.3f} "
        f"s, across the switch {max(a.latency_s for a in across):.3f} s; {len(answers)} answers"
    )
    recorded = _recorded_versions(versions["data_dir"])
    served = {a.model for a in answers}
    assert served == {f"{NAME}/{versions['old']}", f"{NAME}/{versions['new']}"}
    assert recorded.get(versions["old"], 0) > 0 and recorded.get(versions["new"], 0) > 0
    assert sum(recorded.values()) == len(answers)  # each request recorded, by who answered it
    assert not process.download_dir.exists()


def _recorded_arms(data_dir: str) -> dict[tuple[str, str, str], int]:
    """How many inference records each (version, arm, shadow) of NAME has in the store."""
    import mlflow

    from phi3ops.settings import get_settings
    from phi3ops.tracking import configure_tracking

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", data_dir)
        get_settings.cache_clear()
        try:
            experiment_id = configure_tracking(get_settings().inference_experiment_name)
            traces = mlflow.search_traces(locations=[experiment_id], return_type="list")
        finally:
            get_settings.cache_clear()
    counts: dict[tuple[str, str, str], int] = {}
    for trace in traces:
        tags = trace.info.tags
        key = (tags.get(MODEL_VERSION_TAG), tags.get(ARM_TAG), tags.get(SHADOW_TAG))
        counts[key] = counts.get(key, 0) + 1
    return counts


def _chat(
    client: httpx.Client,
    url: str,
    content: str,
    *,
    user: str | None = None,
    model: str | None = None,
) -> dict:
    body: dict = {"messages": [{"role": "user", "content": content}], "max_tokens": 6}
    if user is not None:
        body["user"] = user
    if model is not None:
        body["model"] = model
    response = client.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_until(check, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout} s")


@pytest.mark.slow
def test_canary_and_shadow_follow_the_traffic_plan(versions, tmp_path) -> None:
    """A candidate that gets a traffic plan mid-traffic joins without a failed request; a
    canary splits users as the plan says and sticks per user; no answer names the arm, and
    the id /v1/models listed before the plan is served by either arm; @candidate moving to
    another version mid-canary changes nothing (the plan pinned its version); shadow copies
    never reach the client.
    """
    from mlflow import MlflowClient

    from phi3ops.settings import get_settings
    from phi3ops.traffic import Arm, TrafficPlan, clear_plan, write_plan

    old = f"{NAME}/{versions['old']}"
    log_path = tmp_path / "server.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    share = 0.3
    late: list[str] = []  # users answered under the canary while it was ending
    plan = TrafficPlan.start("canary", share=share, candidate_version=versions["new"])
    # The background user is one the plan keeps on the champion: answers are named by the plan
    # as soon as it is read, before its candidate has loaded, so a steady user drawn for the
    # candidate would count requests the champion answered while the candidate was loading.
    steady = next(u for u in (f"steady-{i}" for i in range(100)) if plan.arm_for(u) is Arm.CHAMPION)
    with log_path.open("w") as log, pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", versions["data_dir"])
        get_settings.cache_clear()
        registry = MlflowClient()
        registry.set_registered_model_alias(NAME, "champion", versions["old"])
        clear_plan(NAME)
        process = start_server(
            f"models:/{NAME}@champion",
            port=port,
            poll_s=POLL_S,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_ready(process, url, timeout=240)
            before = _recorded_arms(versions["data_dir"])
            with httpx.Client(timeout=60) as client:
                listed_before = client.get(f"{url}/v1/models").json()["data"][0]["id"]
            assert listed_before == old
            # Canary, mid-traffic: the pinned candidate takes 30% of the users.
            traffic = Traffic(url, user=steady)
            time.sleep(2)
            registry.set_registered_model_alias(NAME, "candidate", versions["new"])
            write_plan(NAME, plan)
            joined = f"Version {versions['new']} of {NAME} (the plan's candidate) now takes"
            _wait_for_line(log_path, joined, timeout=60)
            time.sleep(3 * POLL_S)
            during = traffic.stop()
            assert [a for a in during if a.status != 200] == []  # not one request failed
            assert {a.model for a in during} <= {old, NAME}

            with httpx.Client(timeout=60) as client:
                assert client.get(f"{url}/v1/models").json()["data"][0]["id"] == NAME
                # @candidate moves to a never-gated version: the pinned one keeps serving.
                registry.set_registered_model_alias(NAME, "candidate", versions["broken"])
                _wait_for_line(log_path, f"moved to version {versions['broken']}", timeout=30)
                # Many users, each naming the id listed before the plan: all served (no 404
                # on the candidate's users), every answer naming the registered model only.
                n = 160
                users = [f"user-{i}" for i in range(n)] + ["user-1", "user-2", "user-3"] * 4
                answers = [_chat(client, url, "Hi", user=u, model=old) for u in users]
                assert {a["model"] for a in answers} == {NAME}
                invocation = client.post(f"{url}/invocations", json=CHAT)
                assert invocation.status_code == 200, invocation.text
                predictions = invocation.json()
                if isinstance(predictions, dict):
                    predictions = predictions["predictions"]
                assert {p["model"] for p in predictions} == {NAME}  # no arm, no path

                # Shadow: the champion answers everything, exactly as without a shadow.
                clear_plan(NAME)

                def canary_over() -> bool:
                    answered = {
                        f"user-{i}": _chat(client, url, "Hi", user=f"user-{i}")["model"]
                        for i in range(20)
                    }
                    late.extend(user for user, model in answered.items() if model == NAME)
                    return set(answered.values()) == {old}

                _wait_until(canary_over, timeout=30, what="the canary ending")
                prompts = [f"Tell me about {topic}" for topic in ("cats", "rain", "tea")]
                alone = [_chat(client, url, p)["choices"][0]["message"] for p in prompts]
                write_plan(NAME, TrafficPlan.start("shadow", candidate_version=versions["new"]))
                _wait_until(
                    lambda: _chat(client, url, "Hi")["model"] == NAME,
                    timeout=30,
                    what="the shadow starting",
                )
                shadowed = []
                for prompt in prompts * 3:
                    answer = _chat(client, url, prompt)
                    assert answer["model"] == NAME  # the client only ever sees the champion
                    shadowed.append(answer["choices"][0]["message"])
                    time.sleep(0.5)  # idle moments: the shadow copies run
                assert shadowed == alone * 3  # shadow copies never alter the champion's answers
                clear_plan(NAME)
        finally:
            stop_server(process)
            get_settings.cache_clear()

    after = _recorded_arms(versions["data_dir"])
    added = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    # Each user's requests went to the arm the plan gives it, and only the pinned version
    # answered as the candidate; the split is about the share.
    under_plan = sum(1 for a in during if a.model == NAME)  # the rest came before it
    routed = [plan.arm_for(u) for u in users + late] + [plan.arm_for(steady)] * under_plan
    by_candidate = routed.count(Arm.CANDIDATE)
    served = added.get((versions["new"], "candidate", "false"), 0)
    assert by_candidate <= served <= by_candidate + 1  # +1: the /invocations call drew its arm
    first = routed[:n]
    observed = first.count(Arm.CANDIDATE) / n
    assert abs(observed - share) < 4 * (share * (1 - share) / n) ** 0.5, observed
    assert added.get((versions["new"], "candidate", "true"), 0) >= 1  # shadow copies recorded
    assert added.get((versions["old"], "candidate", "true"), 0) == 0
    assert not any(version == versions["broken"] for version, _, _ in added)
    assert not any(arm == "champion" and shadow == "true" for _, arm, shadow in added)
    assert "still serving version " + versions["new"] in log_path.read_text()
