"""Structured outputs, tools and seed through clients no one here wrote: the official ``openai``
client and LangChain (``langchain-openai``) against a real ``phi3ops serve`` of the tiny Phi-3,
and the transformers flavor refusing what it cannot do with the same clear 400.

The tiny Phi-3 is random: enums and booleans keep a constrained answer short, and a named
function with ``parallel_tool_calls: false`` makes a call the one possible answer.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from pydantic import BaseModel

from phi3ops.serving.server import start_server, stop_server, wait_until_ready

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    """What the model must answer."""

    city: Literal["Paris", "Rome"]
    sunny: bool


def get_weather(city: Literal["Paris", "Rome"]) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The servers' data dir: their registry and the records of what they answered."""
    return tmp_path_factory.mktemp("structured-data")


@pytest.fixture(scope="module")
def servers(tiny_phi3, data_dir: Path, tmp_path_factory) -> Iterator[dict[str, str]]:
    """Both flavors of the tiny Phi-3, registered and served: {flavor: base URL}."""
    from offline.packaged import register_both_flavors
    from phi3ops.settings import get_settings

    processes: list[subprocess.Popen] = []
    urls: dict[str, str] = {}
    log = (tmp_path_factory.mktemp("structured-serve") / "server.log").open("w")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", str(data_dir))
        get_settings.cache_clear()
        try:
            registered = register_both_flavors(tiny_phi3, model_name_prefix="phi3")
            for flavor, version in registered.items():
                port = _free_port()
                process = start_server(
                    version.candidate_uri, port=port, stdout=log, stderr=subprocess.STDOUT
                )
                processes.append(process)
                urls[flavor] = f"http://127.0.0.1:{port}"
            for process, url in zip(processes, urls.values(), strict=True):
                wait_until_ready(process, url, timeout=240)
            yield urls
        finally:
            for process in processes:
                stop_server(process)
            log.close()
            get_settings.cache_clear()


def _client(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _model(client: Any) -> str:
    return client.models.list().data[0].id


# --- the official openai client --------------------------------------------------------------


def test_parse_returns_a_parsed_object_and_a_stream_of_json_parses(servers) -> None:
    client = _client(servers["onnx"])
    model = _model(client)
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    completion = parse(model=model, messages=HELLO, response_format=Weather, max_tokens=60)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Weather)
    assert completion.choices[0].finish_reason == "stop"

    strict = {**Weather.model_json_schema(), "additionalProperties": False}
    schema = {"type": "json_schema", "json_schema": {"name": "weather", "schema": strict}}
    stream = client.chat.completions.create(
        model=model, messages=HELLO, response_format=schema, max_tokens=60, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert Weather.model_validate(json.loads(text))


def test_a_seed_repeats_a_sampled_answer_and_logprobs_come_back(servers) -> None:
    client = _client(servers["onnx"])
    model = _model(client)

    def sampled(seed: int) -> str:
        answer = client.chat.completions.create(
            model=model, messages=HELLO, temperature=1.0, seed=seed, max_tokens=12
        )
        return answer.choices[0].message.content

    assert sampled(7) == sampled(7)
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "developer", "content": "Be brief."}, *HELLO],
        max_tokens=4,
        logprobs=True,
        top_logprobs=5,
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 5 for entry in content)


def test_bad_requests_name_their_param(servers) -> None:
    import openai

    client = _client(servers["onnx"])
    model = _model(client)
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"if": {}}}}}}}, "response_format"),
        ({"top_logprobs": 9, "logprobs": True}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
    ]  # fmt: skip
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=model, messages=HELLO, **fields)
        assert refused.value.param == param, refused.value.body
    broken = httpx.post(f"{servers['onnx']}/v1/chat/completions", json=[HELLO], timeout=30)
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "body"


# --- LangChain -------------------------------------------------------------------------------


def _chat_model(url: str, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    model = _model(_client(url))
    return ChatOpenAI(model=model, base_url=f"{url}/v1", api_key="unused", max_retries=0, **kwargs)


def test_langchain_structured_output_with_a_json_schema(servers) -> None:
    llm = _chat_model(servers["onnx"], max_tokens=60)
    answer = llm.with_structured_output(Weather, method="json_schema").invoke(
        "What is the weather in Paris?"
    )
    assert isinstance(answer, Weather)


def test_langchain_bind_tools_and_a_tool_round_trip(
    servers, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    started = time.time()
    llm = _chat_model(servers["onnx"], max_tokens=80)
    # strict: no properties beyond the function's (random weights would add them to the end)
    calling = llm.bind_tools(
        [get_weather], tool_choice="get_weather", parallel_tool_calls=False, strict=True
    )
    question = HumanMessage("What is the weather in Paris?")
    asked = calling.invoke([question])
    (call,) = asked.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in {"Paris", "Rome"}
    assert asked.response_metadata["finish_reason"] == "tool_calls"
    chunks = list(calling.stream([question]))  # the call as OpenAI's tool_calls deltas
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    (streamed,) = merged.tool_calls
    assert streamed["name"] == "get_weather" and streamed["args"] == call["args"]  # greedy
    result = ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])
    answering = _chat_model(servers["onnx"], max_tokens=8).bind_tools(
        [get_weather], tool_choice="none"
    )
    answer = answering.invoke([question, asked, result])
    assert isinstance(answer.content, str) and answer.content and not answer.tool_calls

    # The server's records of the two calls (whole, then streamed) are answers, not blanks:
    # the monitor and the canary verdict read a call like any other answer.
    from phi3ops.settings import get_settings
    from tasks.live_records import load_records

    monkeypatch.setenv("PHI3OPS_DATA_DIR", str(data_dir))
    get_settings.cache_clear()
    calls, deadline = [], time.monotonic() + 30
    while len(calls) < 2 and time.monotonic() < deadline:  # the server's writer stores them
        records = load_records("phi3-onnx", "1", start=started, end=time.time() + 1)
        calls = [r for r in records if r.finish_reason == "tool_calls"]
        time.sleep(0.5)
    get_settings.cache_clear()
    assert [(bool(r.stream), r.blank_response) for r in calls] == [(False, False), (True, False)]
    assert all(r.response_chars and r.response_chars > len("get_weather") for r in calls)


# --- the transformers flavor refuses what it cannot do -----------------------------------------


def test_the_transformers_flavor_refuses_features_with_the_same_clear_400(servers) -> None:
    import openai

    url = servers["transformers"]
    client = _client(url)
    model = _model(client)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    for fields, param in [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [tool]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"seed": 3, "temperature": 0.9}, "seed"),
    ]:
        with pytest.raises(openai.BadRequestError, match="not supported by the model") as refused:
            client.chat.completions.create(model=model, messages=HELLO, max_tokens=4, **fields)
        assert refused.value.param == param
    # What asks nothing of it passes: a greedy seed, developer as system.
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "developer", "content": "Be brief."}, *HELLO],
        max_tokens=4,
        seed=3,
        temperature=0,
    )
    assert isinstance(answer.choices[0].message.content, str)
    invocation = httpx.post(
        f"{url}/invocations", json={"messages": HELLO, "tools": [tool]}, timeout=60
    )
    assert invocation.status_code == 400
    assert invocation.json()["message"].startswith("tools is not supported")
