"""`phi3ops serve` = `mlflow models serve --env-manager local`, over HTTP, for both flavors."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from phi3ops.errors import InvalidInputError
from phi3ops.serving.server import (
    model_uri_for,
    serve_command,
    start_server,
    stop_server,
    wait_until_ready,
)

CHAT = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_model_uri_needs_exactly_one_of_alias_and_version() -> None:
    assert model_uri_for("phi3", alias="champion") == "models:/phi3@champion"
    assert model_uri_for("phi3", version="4") == "models:/phi3/4"
    for kwargs in ({}, {"alias": "champion", "version": "4"}):
        with pytest.raises(InvalidInputError, match="exactly one"):
            model_uri_for("phi3", **kwargs)


def test_serve_command_runs_the_guarded_scoring_app_and_checks_inputs(tmp_path) -> None:
    cmd = serve_command(tmp_path, host="127.0.0.1", port=5005, workers=2)
    assert cmd[1:5] == ["-m", "uvicorn", "--factory", "phi3ops.serving.app:create_app"]
    assert cmd[cmd.index("--port") + 1] == "5005"
    assert cmd[cmd.index("--workers") + 1] == "2"
    with pytest.raises(InvalidInputError, match="port"):
        serve_command(tmp_path, host="127.0.0.1", port=70000)
    with pytest.raises(InvalidInputError, match="workers"):
        serve_command(tmp_path, host="127.0.0.1", port=5005, workers=0)


def test_start_server_rejects_a_bad_uri_and_an_unknown_model(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="model URI"):
        start_server("phi3@champion", port=_free_port())
    with pytest.raises(InvalidInputError, match="models:/nope@champion"):
        start_server("models:/nope@champion", port=_free_port())


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory, tiny_phi3) -> Iterator[dict[str, str]]:
    """Both flavors of the tiny Phi-3 registered in one store: {flavor: models:/...@candidate}."""
    from offline.packaged import register_both_flavors
    from phi3ops.settings import get_settings

    data_dir = tmp_path_factory.mktemp("serving-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", str(data_dir))
        get_settings.cache_clear()
        registered = register_both_flavors(tiny_phi3, model_name_prefix="phi3")
        uris = {flavor: version.candidate_uri for flavor, version in registered.items()}
        uris["data_dir"] = str(data_dir)
        yield uris
    get_settings.cache_clear()


@pytest.fixture(scope="module", params=["onnx", "transformers"])
def server(request, packaged, tmp_path_factory) -> Iterator[tuple[str, str]]:
    flavor = request.param
    port = _free_port()
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w")
    from phi3ops.settings import get_settings

    with pytest.MonkeyPatch.context() as mp:  # models:/ URIs resolve against that store
        mp.setenv("PHI3OPS_DATA_DIR", packaged["data_dir"])
        get_settings.cache_clear()
        process = start_server(packaged[flavor], port=port, stdout=log, stderr=subprocess.STDOUT)
    get_settings.cache_clear()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, url, timeout=240)
        yield flavor, url
    finally:
        stop_server(process)
        log.close()
    assert process.poll() is not None
    assert not process.download_dir.exists()


def _post(url: str, body: object | None = None, *, raw: str | None = None) -> httpx.Response:
    content = raw if raw is not None else None
    return httpx.post(
        f"{url}/invocations",
        json=body if raw is None else None,
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=120,
    )


def _completion(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    return body[0] if isinstance(body, list) else body


@pytest.mark.slow
def test_chat_request_gets_a_chat_completion(server) -> None:
    _, url = server
    body = _completion(_post(url, CHAT))
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in {"stop", "length"}
    assert body["usage"]["completion_tokens"] <= 8


@pytest.mark.slow
def test_temperature_zero_is_greedy_over_http(server) -> None:
    _, url = server
    first = _completion(_post(url, {**CHAT, "temperature": 0.0}))
    second = _completion(_post(url, {**CHAT, "temperature": 0.0}))
    assert first["choices"] == second["choices"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "raw", "words"),
    [
        (None, '{"messages": [', ["json"]),
        ({"messages": [{"content": "no role"}]}, None, ["role"]),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
            None,
            ["max_tokens"],
        ),
        ({"messages": [{"role": "user", "content": "word " * 6000}]}, None, ["context"]),
    ],
    ids=["bad-json", "missing-role", "wrong-type", "too-long"],
)
def test_malformed_requests_get_4xx_and_server_keeps_serving(server, body, raw, words) -> None:
    flavor, url = server
    response = _post(url, body, raw=raw)
    assert 400 <= response.status_code < 500, (flavor, response.status_code, response.text[:500])
    message = response.text.lower()
    for word in words:
        assert word in message
    assert _post(url, CHAT).status_code == 200  # still answering good requests


@pytest.mark.slow
def test_every_request_row_is_recorded_as_a_trace_of_the_served_version(
    server, packaged, monkeypatch
) -> None:
    from phi3ops.settings import get_settings
    from tasks.monitoring import load_records

    flavor, url = server
    started = time.time()
    _completion(_post(url, CHAT))
    assert _post(url, {"messages": [{"role": "user"}]}).status_code == 400
    monkeypatch.setenv("PHI3OPS_DATA_DIR", packaged["data_dir"])  # the server's store
    get_settings.cache_clear()
    records, deadline = [], time.monotonic() + 30
    while len(records) < 2 and time.monotonic() < deadline:  # the server writes them async
        records = load_records(f"phi3-{flavor}", "1", start=started, end=time.time() + 1)
        time.sleep(0.5)
    answered, refused = records
    assert answered.status_code == 200 and answered.response and answered.error is None
    assert answered.completion_tokens <= 8 and answered.finish_reason in {"stop", "length"}
    assert refused.status_code == 400 and refused.response is None and "content" in refused.error


@pytest.mark.slow
def test_onnx_server_answers_plain_prompt_and_names_bad_fields(server) -> None:
    flavor, url = server
    if flavor != "onnx":
        pytest.skip("the plain {'prompt': ...} form is the ONNX wrapper's")
    response = _post(url, {"prompt": "Hello", "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert isinstance(response.json(), str | list)
    too_long = _post(url, {"messages": [{"role": "user", "content": "word " * 6000}]})
    assert "context" in too_long.text.lower()
    bad_type = _post(url, {**CHAT, "max_tokens": "many"})
    assert "max_tokens" in bad_type.text


@pytest.mark.slow
def test_cli_serve_answers_and_sigterm_stops_every_process(packaged) -> None:
    import os
    import signal
    import sys

    port = _free_port()
    env = {**os.environ, "PHI3OPS_DATA_DIR": packaged["data_dir"]}
    env.pop("MLFLOW_TRACKING_URI", None)  # the store is the one under PHI3OPS_DATA_DIR
    downloads = Path(packaged["data_dir"]) / "serving"
    before = set(downloads.iterdir()) if downloads.exists() else set()
    command = [sys.executable, "-m", "cli.app", "serve", "--model-uri", packaged["onnx"]]
    cli = subprocess.Popen(
        [*command, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(cli, url, timeout=240)
        assert _completion(_post(url, CHAT))["object"] == "chat.completion"
    finally:
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):  # uvicorn went down with it
        httpx.get(f"{url}/ping", timeout=2)
    assert set(downloads.iterdir()) == before  # its downloaded model was removed
