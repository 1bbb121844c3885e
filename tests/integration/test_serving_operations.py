"""Operating `phi3ops serve` of the tiny ONNX Phi-3: ``/metrics`` moves with traffic, API keys
as OpenAI's clients send them, ``/health`` vs ``/ready`` while draining.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from phi3ops.serving.server import start_server, stop_server, wait_until_ready

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Say hello"}]
KEY = "sk-test-0f9c2b7d41e6a8"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def onnx_uri(tmp_path_factory: pytest.TempPathFactory, tiny_phi3) -> Iterator[tuple[str, str]]:
    """The tiny Phi-3's ONNX flavor registered as ``phi3-onnx`` version 1: (URI, data dir)."""
    from offline.local_hub import LocalHub
    from phi3ops.settings import get_settings
    from phi3ops.sources import ONNX_REPO_ID, Flavor, Variant
    from tasks.hub import fetch_snapshot
    from tasks.packaging import log_model
    from tasks.registry import register_version

    data_dir = tmp_path_factory.mktemp("ops-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", str(data_dir))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        get_settings.cache_clear()
        with LocalHub() as hub:
            hub.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir)
            fetched = fetch_snapshot(ONNX_REPO_ID, variant=Variant.ONNX_CPU_INT4, endpoint=hub.url)
            logged = log_model(fetched, flavor=Flavor.ONNX)
            register_version(logged, fetched, model_name="phi3-onnx")
        yield "models:/phi3-onnx/1", str(data_dir)
    get_settings.cache_clear()


def _start(
    onnx_uri: tuple[str, str], log: Path, *, workers: int = 1, **env: str
) -> tuple[subprocess.Popen, str]:
    from phi3ops.settings import get_settings

    uri, data_dir = onnx_uri
    port = _free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", data_dir)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        get_settings.cache_clear()
        with log.open("w") as out:
            process = start_server(
                uri,
                port=port,
                workers=workers,
                extra_env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
    get_settings.cache_clear()
    return process, f"http://127.0.0.1:{port}"


def _openai(url: str, key: str = "unused") -> Any:
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _samples(url: str, headers: dict[str, str] | None = None) -> dict[tuple, float]:
    """Every sample of ``/metrics``, parsed by prometheus_client: {(name, labels...): value}."""
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return out


def _value(samples: dict[tuple, float], name: str, **labels: str) -> float:
    return samples.get((name, *sorted(labels.items())), 0.0)


@pytest.fixture(scope="module")
def served(onnx_uri, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("ops-serve") / "server.log"
    process, url = _start(onnx_uri, log)
    try:
        wait_until_ready(process, url, timeout=240)
        yield url
    finally:
        stop_server(process)


def test_metrics_parse_and_count_requests_tokens_and_stream_latency(served) -> None:
    url = served
    client = _openai(url)
    before = _samples(url)
    chat = {"route": "/v1/chat/completions", "arm": "champion", "version": "1", "shadow": "false"}
    served_200 = {**chat, "status": "200", "outcome": "served"}
    tokens = {"arm": "champion", "version": "1"}

    completion = client.chat.completions.create(
        model="phi3-onnx/1", messages=HELLO, max_tokens=8, temperature=0
    )
    after = _samples(url)
    name = "phi3ops_requests_total"
    assert _value(after, name, **served_200) == _value(before, name, **served_200) + 1
    usage = completion.usage
    for kind, used in (("prompt", usage.prompt_tokens), ("completion", usage.completion_tokens)):
        moved = _value(after, f"phi3ops_{kind}_tokens_total", **tokens) - _value(
            before, f"phi3ops_{kind}_tokens_total", **tokens
        )
        assert moved == used > 0
    # The batcher's gauges, from the served OnnxChatModel's load_stats().
    assert _value(after, "phi3ops_last_batch_size", **tokens) >= 1
    assert ("phi3ops_queue_depth", *sorted(tokens.items())) in after
    assert ("phi3ops_running_rows", *sorted(tokens.items())) in after
    assert _value(after, "phi3ops_kv_budget_bytes", **tokens) > 0
    assert _value(after, "phi3ops_kv_reserved_bytes", **tokens) == 0  # released with its batch

    chunks = client.chat.completions.create(
        model="phi3-onnx/1", messages=HELLO, max_tokens=8, temperature=0, stream=True
    )
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    streamed = _samples(url)
    assert _value(streamed, name, **served_200) == _value(after, name, **served_200) + 1
    ttft = "phi3ops_time_to_first_token_seconds_count"
    assert _value(streamed, ttft, **tokens) == _value(after, ttft, **tokens) + 1
    gaps = "phi3ops_inter_token_latency_seconds_count"
    assert _value(streamed, gaps, **tokens) - _value(after, gaps, **tokens) == len(pieces) - 1

    refused = httpx.post(
        f"{url}/v1/chat/completions", json={"messages": [{"role": "user"}]}, timeout=30
    )
    assert refused.status_code == 400
    last = _samples(url)
    bad = {**chat, "status": "400", "outcome": "refused"}
    assert _value(last, name, **bad) == _value(streamed, name, **bad) + 1
    assert _value(last, "phi3ops_ready") == 1
    assert _value(last, "phi3ops_http_requests_total", route="/metrics", status="200") >= 3
    assert ("phi3ops_records_waiting",) in last  # the spool's backlog, as /health says it


def test_health_is_alive_and_ready_says_the_model_is_served(served) -> None:
    health = httpx.get(f"{served}/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["state"] == "ready"
    assert "records_waiting" in health.json()
    ready = httpx.get(f"{served}/ready", timeout=10)
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert httpx.get(f"{served}/ping", timeout=10).status_code == 200  # MLflow's, unchanged


def test_an_api_key_from_the_cli_is_required_and_never_shown(onnx_uri, tmp_path) -> None:
    import openai

    uri, data_dir = onnx_uri
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PHI3OPS_DATA_DIR": data_dir, "MY_SERVE_KEY": KEY}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "cli.app", "serve", "--model-uri", uri, "--port", str(port)]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        cli = subprocess.Popen(
            [*command, "--api-key-env", "MY_SERVE_KEY"], env=env, stdout=out, stderr=out
        )
    try:
        wait_until_ready(cli, url, timeout=240)  # /ping stays open by default
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}):
            response = httpx.post(
                f"{url}/v1/chat/completions",
                json={"messages": HELLO, "max_tokens": 4},
                headers=headers,
                timeout=30,
            )
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert (error["type"], error["param"], error["code"]) == (
                "invalid_request_error",
                None,
                "invalid_api_key",
            )
            assert KEY not in response.text
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert httpx.post(f"{url}/invocations", json={"messages": HELLO}).status_code == 401
        for open_path in ("/health", "/ready", "/metrics", "/ping"):
            assert httpx.get(f"{url}{open_path}", timeout=10).status_code == 200, open_path

        with pytest.raises(openai.AuthenticationError) as refused:
            _openai(url, "sk-wrong").chat.completions.create(
                model="phi3-onnx/1", messages=HELLO, max_tokens=4
            )
        assert refused.value.code == "invalid_api_key"
        client = _openai(url, KEY)
        completion = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=HELLO, max_tokens=4
        )
        assert completion.object == "chat.completion"
        metrics = _samples(url)
        unauthorized = {"route": "/v1/chat/completions", "status": "401"}
        assert _value(metrics, "phi3ops_http_requests_total", **unauthorized) == 4

        # The key is on no process's command line (the CLI's and uvicorn's).
        for pid in _session(cli.pid):
            assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=90) == 0
    assert KEY not in log.read_text()  # nor in what the server logged
    stored = [Path(data_dir) / "mlflow.db", *Path(data_dir).glob("serving/spool/**/*")]
    for path in (p for p in stored if p.is_file()):
        assert KEY.encode() not in path.read_bytes(), path  # nor in the records it stored


def _session(pid: int) -> list[int]:
    """``pid`` and the processes in the session its children started (uvicorn's)."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent = int(fields[1])
        if parent == pid:
            found.extend(_session(int(entry.name)))
    return found


def test_two_workers_add_up_their_metrics_and_drain_together(onnx_uri, tmp_path) -> None:
    env = {"PHI3OPS_SERVE_DRAIN_DELAY_S": "300", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    process, url = _start(onnx_uri, tmp_path / "drain.log", workers=2, **env)
    try:
        wait_until_ready(process, url, timeout=240)
        served = {
            "route": "/v1/chat/completions",
            "status": "200",
            "outcome": "served",
            "arm": "champion",
            "version": "1",
            "shadow": "false",
        }
        for _ in range(4):  # new connections: either worker may answer each
            assert _chat(url).object == "chat.completion"
        # Whichever worker answers the scrape, it counts both workers' requests.
        assert _value(_samples(url), "phi3ops_requests_total", **served) == 4

        os.killpg(process.pid, signal.SIGTERM)  # as stop_server (or a pod deletion) does
        # Both workers got it (and uvicorn's supervisor passed it on again): both drain.
        deadline = time.monotonic() + 30
        while _value(_samples(url), "phi3ops_ready") > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _value(_samples(url), "phi3ops_ready") == 0
        for _ in range(4):
            ready = httpx.get(f"{url}/ready", timeout=10)
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            health = httpx.get(f"{url}/health", timeout=10)
            assert health.status_code == 200 and health.json()["state"] == "draining"
        # Still serving during the delay: the load balancer has time to notice.
        assert _chat(url).object == "chat.completion"
        assert _value(_samples(url), "phi3ops_requests_total", **served) == 5
        os.killpg(process.pid, signal.SIGINT)  # stop waiting
        assert process.wait(timeout=120) is not None
    finally:
        stop_server(process, timeout=60)


def _chat(url: str) -> Any:
    return _openai(url).chat.completions.create(model="phi3-onnx/1", messages=HELLO, max_tokens=4)


def test_a_key_variable_that_is_not_set_stops_serve_with_one_line(tmp_path) -> None:
    env = {**os.environ, "PHI3OPS_DATA_DIR": str(tmp_path / "data")}
    env.pop("MY_UNSET_KEY", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "cli", "serve", "--model-uri", "models:/phi3-onnx/1"]
    result = subprocess.run(
        [*command, "--port", str(_free_port()), "--api-key-env", "MY_UNSET_KEY"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "MY_UNSET_KEY is not set" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "serving").exists()  # nothing was downloaded
