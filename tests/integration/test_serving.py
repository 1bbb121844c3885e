"""`phi3ops serve` = `mlflow models serve --env-manager local`, over HTTP, for both flavors."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from phi3ops.errors import InvalidInputError
from phi3ops.serving.server import (
    check_model_uri,
    model_uri_for,
    request_timeout,
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


def _cli_serve(packaged: dict[str, str], port: int) -> tuple[list[str], dict[str, str]]:
    """``phi3ops serve`` of the packaged ONNX model on ``port``: the command and its env."""
    import os
    import sys

    env = {**os.environ, "PHI3OPS_DATA_DIR": packaged["data_dir"]}
    env.pop("MLFLOW_TRACKING_URI", None)  # the store is the one under PHI3OPS_DATA_DIR
    command = [sys.executable, "-m", "cli.app", "serve", "--model-uri", packaged["onnx"]]
    return [*command, "--port", str(port)], env


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
    assert cmd[cmd.index("--timeout-graceful-shutdown") + 1] == "65"  # drains, then exits
    assert request_timeout(7) == 7
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "12")  # MLflow's own setting
        assert request_timeout() == 12
    with pytest.raises(InvalidInputError, match="timeout"):
        request_timeout(0)
    with pytest.raises(InvalidInputError, match="port"):
        serve_command(tmp_path, host="127.0.0.1", port=70000)
    with pytest.raises(InvalidInputError, match="workers"):
        serve_command(tmp_path, host="127.0.0.1", port=5005, workers=0)


def test_start_server_rejects_a_bad_uri_and_an_unknown_model(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="model URI"):
        start_server("phi3@champion", port=_free_port())
    with pytest.raises(InvalidInputError, match="models:/nope@champion"):
        start_server("models:/nope@champion", port=_free_port())


def test_only_mlflow_model_locations_are_served_nothing_else_is_copied(
    tmp_path, isolated_settings
) -> None:
    private = tmp_path / "home"
    (private / ".ssh").mkdir(parents=True)
    (private / ".ssh" / "id_rsa").write_text("KEY")
    for uri in (str(private), private.as_uri(), str(private / ".ssh" / "id_rsa")):
        with pytest.raises(InvalidInputError, match="MLmodel"):
            start_server(uri, port=_free_port())
    copied = [p for p in isolated_settings.rglob("*") if p.name in {"id_rsa", ".ssh"}]
    assert copied == []
    (private / "MLmodel").write_text("flavors: {}\n")
    check_model_uri(str(private))  # a local MLflow model folder is fine
    check_model_uri(private.as_uri())
    check_model_uri("runs:/0123/model")


def test_a_port_that_is_taken_fails_before_anything_is_downloaded(isolated_settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InvalidInputError, match=f"Cannot listen on 127.0.0.1:{port}"):
            start_server("models:/phi3@champion", port=port)
    assert not (isolated_settings / "serving").exists()


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
    while len(records) < 2 and time.monotonic() < deadline:  # the server's writer stores them
        records = load_records(f"phi3-{flavor}", "1", start=started, end=time.time() + 1)
        time.sleep(0.5)
    answered, refused = records
    assert answered.status_code == 200 and answered.outcome == "served" and answered.error is None
    assert answered.response is None and answered.response_chars  # no text unless recorded
    assert answered.completion_tokens <= 8 and answered.finish_reason in {"stop", "length"}
    assert (refused.status_code, refused.outcome, refused.response) == (400, "refused", None)
    assert refused.error.startswith("HTTP 400 INVALID_PARAMETER_VALUE")


@pytest.mark.slow
def test_a_stream_the_client_drops_stops_generating_and_is_recorded_cancelled(
    server, packaged
) -> None:
    flavor, url = server
    if flavor != "onnx":
        pytest.skip("only the ONNX flavor streams")
    started = time.time()
    body = {**CHAT, "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", f"{url}/invocations", json=body, timeout=60) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i >= 6:
                break  # the client goes away mid-answer
    dropped = time.time()
    records, deadline = [], time.monotonic() + 30
    while not records and time.monotonic() < deadline:
        records = _served_records(packaged, started)
        time.sleep(0.2)
    (record,) = records
    assert (record.status_code, record.outcome) == (499, "cancelled")
    assert record.response_chars is None and record.completion_tokens is None
    # Recorded when the generation stopped, not after the 1500 tokens it was asked for.
    assert record.latency_s < dropped - started + 2.0
    assert _post(url, CHAT).status_code == 200


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
    import signal

    port = _free_port()
    downloads = Path(packaged["data_dir"]) / "serving"
    before = set(downloads.iterdir()) if downloads.exists() else set()
    command, env = _cli_serve(packaged, port)
    cli = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def _rows_of(body: dict) -> int:
    return len(body["inputs"]) if "inputs" in body else 1


def _load(
    url: str,
    total: int,
    *,
    concurrency: int = 20,
    max_tokens: int = 4,
    answers: list[int] | None = None,
) -> tuple[int, int, int]:
    """Send ``total`` requests (chat, streamed chat, refused, three-row) ``concurrency`` at a
    time; (requests answered, rows answered, requests that got no answer). Each answer's
    rows are appended to ``answers`` as it comes.
    """
    from concurrent.futures import ThreadPoolExecutor

    bad = {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4}
    chat = {**CHAT, "max_tokens": max_tokens}
    kinds = [chat, {**chat, "stream": True}, bad, {"inputs": [chat] * 3}]
    limits = httpx.Limits(max_connections=concurrency)
    with httpx.Client(base_url=url, timeout=120, limits=limits) as client:

        def send(i: int) -> int:
            body = kinds[i % len(kinds)]
            try:
                client.post("/invocations", json=body).read()
            except httpx.TransportError:
                return -1
            if answers is not None:
                answers.append(_rows_of(body))
            return _rows_of(body)

        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(send, range(total)))
    answered = [r for r in results if r >= 0]
    return len(answered), sum(answered), len(results) - len(answered)


def _served_records(packaged: dict, started: float) -> list:
    return _records_of(packaged, "onnx", started)


def _start(
    packaged: dict, log_path: Path, *, workers: int = 1, **options: Any
) -> tuple[subprocess.Popen, str]:
    """The ONNX version served with ``options`` (`start_server`'s), once it is ready."""
    from phi3ops.settings import get_settings

    port = _free_port()
    log = log_path.open("w")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", packaged["data_dir"])
        get_settings.cache_clear()
        process = start_server(
            packaged["onnx"],
            port=port,
            workers=workers,
            stdout=log,
            stderr=subprocess.STDOUT,
            **options,
        )
    get_settings.cache_clear()
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, url, timeout=240)
    return process, url


@pytest.mark.slow
def test_every_row_under_load_is_one_trace_across_sigterm(packaged, tmp_path) -> None:
    """300 requests, 20 at a time, to two workers; SIGTERM as the last answers come in."""
    import threading

    spool_dir = Path(packaged["data_dir"]) / "serving" / "spool"
    spooled_before = set(spool_dir.glob("*.jsonl"))  # of servers that other tests run
    process, url = _start(packaged, tmp_path / "server.log", workers=2)
    started = time.time()
    try:
        requests, rows, unanswered = _load(url, 240)  # under load, no shutdown yet
        # Then SIGTERM with 20 longer requests in flight: the answered ones are all recorded.
        late: list[tuple[int, int, int]] = []
        answers: list[int] = []
        sender = threading.Thread(
            target=lambda: late.append(_load(url, 60, max_tokens=64, answers=answers))
        )
        sender.start()
        deadline = time.monotonic() + 60
        while not answers and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        answered_before_sigterm = len(answers)
        stop_server(process)
    sender.join(120)
    (late_requests, late_rows, late_unanswered) = late[0]
    records = _served_records(packaged, started)
    print(
        f"\nload: {requests} requests ({rows} rows) answered, {unanswered} not; then SIGTERM "
        f"with {60 - answered_before_sigterm} of 60 unanswered: {late_requests} ({late_rows} rows) "
        f"answered, {late_unanswered} refused at the door; {len(records)} records stored for "
        f"{rows + late_rows} rows answered"
    )
    assert process.returncode is not None
    assert unanswered == 0 and late_requests > answered_before_sigterm  # some after SIGTERM
    assert len(records) == rows + late_rows
    outcomes = {r.outcome for r in records}
    assert outcomes == {"served", "refused"}
    assert set(spool_dir.glob("*.jsonl")) <= spooled_before  # drained and removed at exit


@pytest.mark.slow
def test_after_kill_9_only_requests_in_flight_go_unrecorded(packaged, tmp_path) -> None:
    import functools
    import os
    import signal
    import threading

    from phi3ops.serving.records import write_entries
    from phi3ops.serving.spool import RecordSpool
    from phi3ops.settings import get_settings
    from phi3ops.tracking import tracking_uri

    process, url = _start(packaged, tmp_path / "server.log", workers=1)
    started = time.time()
    results: list[tuple[int, int, int]] = []
    answers: list[int] = []
    sender = threading.Thread(
        target=lambda: results.append(
            _load(url, 200, concurrency=8, max_tokens=32, answers=answers)
        )
    )
    sender.start()
    deadline = time.monotonic() + 120
    while len(answers) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # mid-load: no shutdown, no drain
    sender.join(120)
    process.wait(10)
    stop_server(process)
    requests, rows, unanswered = results[0]
    # The next server on this data dir stores what the killed one had spooled; its spool is
    # started the way the server's is.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", packaged["data_dir"])
        get_settings.cache_clear()
        spool = RecordSpool(
            Path(packaged["data_dir"]) / "serving" / "spool",
            functools.partial(write_entries, tracking_uri=tracking_uri()),
        ).start()
        assert spool.flush(timeout=60)
        spool.close()
    get_settings.cache_clear()
    records = _served_records(packaged, started)
    print(
        f"\nkill -9: {requests} requests ({rows} rows) answered, {unanswered} cut off; "
        f"{len(records)} records stored"
    )
    assert requests > 0 and unanswered > 0
    # Every answered row is recorded; of the requests cut off, at most the in-flight ones
    # (8 at a time, up to 3 rows each) may be.
    assert rows <= len(records) <= rows + 8 * 3


@pytest.mark.slow
def test_cli_serve_exits_non_zero_when_the_port_is_taken(packaged) -> None:

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        command, env = _cli_serve(packaged, int(port))
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0, done.stdout
    assert f"Cannot listen on 127.0.0.1:{port}" in done.stderr


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.slow
def test_a_killed_cli_takes_its_server_with_it(packaged) -> None:
    import os
    import signal

    port = _free_port()
    command, env = _cli_serve(packaged, port)
    cli = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    servers: list[int] = []
    try:
        wait_until_ready(cli, url, timeout=240)
        servers = _children(cli.pid)
        assert servers, "uvicorn should be a child of the CLI"
        cli.kill()  # kill -9: no handler of the CLI runs
        cli.wait(10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in servers):
            time.sleep(0.5)
        assert not any(Path(f"/proc/{p}").exists() for p in servers), "uvicorn outlived the CLI"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/ping", timeout=2)
    finally:
        for pid in servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


# --- the OpenAI-compatible routes, through the official client -------------------------------


def _openai(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.slow
def test_the_openai_client_gets_a_completion_a_stream_and_our_errors(server, packaged) -> None:
    import openai

    flavor, url = server
    client = _openai(url)
    started = time.time()
    (listed,) = client.models.list().data
    assert listed.id == f"phi3-{flavor}/1"  # the registered name and version, never a path
    hello = [{"role": "user", "content": "Say hello"}]
    completion = client.chat.completions.create(
        model=listed.id, messages=hello, max_completion_tokens=8, temperature=0, seed=1
    )
    assert completion.model == listed.id and completion.object == "chat.completion"
    assert isinstance(completion.choices[0].message.content, str)
    assert 0 < completion.usage.completion_tokens <= 8
    if flavor == "onnx":
        stream = client.chat.completions.create(
            model=listed.id,
            messages=hello,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == completion.choices[0].message.content  # greedy: the same answer
        assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
        assert {c.model for c in chunks} == {listed.id}
    else:
        with pytest.raises(openai.BadRequestError, match="cannot stream"):
            client.chat.completions.create(model=listed.id, messages=hello, stream=True)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=listed.id, messages=[])
    assert refused.value.status_code == 400
    assert refused.value.body["message"] == "messages is empty: send at least one message"
    assert refused.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError, match=listed.id):
        client.chat.completions.create(model="gpt-4o", messages=hello)
    # One record per call, the refusals too (the 404 never reached a model).
    records, deadline = [], time.monotonic() + 30
    while len(records) < 4 and time.monotonic() < deadline:
        records = _records_of(packaged, flavor, started)
        time.sleep(0.5)
    served_calls = 2 if flavor == "onnx" else 1  # the transformers flavor refused the stream
    outcomes = sorted(r.outcome for r in records)
    assert outcomes == ["refused"] * (4 - served_calls) + ["served"] * served_calls, outcomes
    served = [r for r in records if r.outcome == "served"]
    assert all(r.model_version == "1" and r.completion_tokens for r in served)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": []}, "messages is empty: send at least one message"),
        (
            {"messages": [{"role": "wizard", "content": "hi"}]},
            "messages[0].role must be one of system, developer, user, assistant, tool, "
            "got 'wizard'",
        ),
        ({**CHAT, "n": 2}, "n=2 is not supported: one choice per request"),
        ({**CHAT, "top_p": 1.5}, "top_p must be a number in (0, 1], got 1.5"),
        ({**CHAT, "max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
    ],
    ids=["empty", "role", "n", "top_p", "max_tokens"],
)
def test_both_flavors_refuse_what_the_onnx_pyfunc_refuses_with_its_words(
    server, row, message
) -> None:
    _, url = server
    response = _post(url, row)
    assert response.status_code == 400, response.text[:500]
    assert response.json()["message"] == message
    openai_response = httpx.post(f"{url}/v1/chat/completions", json=row, timeout=60)
    assert openai_response.status_code == 400
    assert openai_response.json()["error"]["message"] == message


@pytest.mark.slow
def test_sigterm_lets_a_stream_in_flight_finish_and_turns_new_requests_away(
    packaged, tmp_path
) -> None:
    import os
    import signal

    process, url = _start(packaged, tmp_path / "server.log", workers=1)
    events: list[str] = []
    try:
        body = {"messages": CHAT["messages"], "max_tokens": 1000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as answer:
            lines = answer.iter_lines()
            events.append(next(line for line in lines if line.startswith("data:")))
            os.killpg(process.pid, signal.SIGTERM)  # mid-answer
            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):  # no longer accepting
                httpx.get(f"{url}/ping", timeout=2)
            events.extend(line for line in lines if line.startswith("data:"))
        # Drained, then exited (uvicorn re-raises the SIGTERM it handled once it is done).
        assert process.wait(timeout=60) in {0, -signal.SIGTERM}
    finally:
        stop_server(process)
    assert events[-1] == "data: [DONE]"
    finish = json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
    assert finish in {"stop", "length"}  # answered to its end, not cut off


def _records_of(packaged: dict, flavor: str, started: float) -> list:
    from phi3ops.settings import get_settings
    from tasks.monitoring import load_records

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", packaged["data_dir"])
        get_settings.cache_clear()
        try:
            return load_records(f"phi3-{flavor}", "1", start=started, end=time.time() + 1)
        finally:
            get_settings.cache_clear()


@pytest.mark.slow
def test_a_full_queue_answers_429_with_retry_after_at_once_and_records_it_shed(
    packaged, tmp_path
) -> None:
    """One request generating, one waiting (serve's batching options), the rest turned away."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.time()
    batching = {"max_batch_size": 1, "max_queue": 1, "batch_wait_ms": 0}
    process, url = _start(packaged, tmp_path / "server.log", batching=batching)
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 2000}
    try:
        with ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(
                    lambda _: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=240),
                    range(8),
                )
            )
    finally:
        stop_server(process)
    shed = [r for r in responses if r.status_code == 429]
    assert shed and {r.status_code for r in responses} <= {200, 429}
    assert all(r.headers["retry-after"] for r in shed)
    assert "queue is full" in shed[0].json()["error"]["message"]
    # Turned away at once, not after waiting for the requests ahead of it (the one waiting is
    # answered after two whole generations).
    served = [r for r in responses if r.status_code == 200]
    assert max(r.elapsed for r in shed) < max(r.elapsed for r in served)
    outcomes = sorted(r.outcome for r in _served_records(packaged, started))
    assert outcomes == sorted(["shed"] * len(shed) + ["served"] * len(served))


def test_batching_options_are_checked_against_the_model(tmp_path) -> None:
    from phi3ops.serving.server import batching_env

    with pytest.raises(InvalidInputError, match="Unknown batching"):
        batching_env(tmp_path, {"max_batch": 2})
    (tmp_path / "MLmodel").write_text("flavors:\n  transformers: {}\n  python_function: {}\n")
    with pytest.raises(InvalidInputError, match="onnx flavor"):
        batching_env(tmp_path, {"max_queue": 2})
    (tmp_path / "MLmodel").write_text("flavors:\n  python_function:\n    config: {max_tokens: 8}\n")
    with pytest.raises(InvalidInputError, match="packaged before max_queue"):
        batching_env(tmp_path, {"max_queue": 2})
    assert batching_env(tmp_path, {}) == {}
