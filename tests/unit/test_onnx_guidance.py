"""Structured outputs, tools, seed and logprobs, checked without a model: what a request may ask
(`phi3_chat.guidance`, `phi3_chat.tools`, `phi3_chat.validate`), how a row samples on its own
(`phi3_chat.sampler`), and what the serving layer refuses for a model that cannot do it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from phi3_chat.guidance import (
    MAX_SCHEMA_CHARS,
    MAX_SCHEMA_DEPTH,
    EndTracker,
    json_object_end,
    response_format_guidance,
)
from phi3_chat.sampler import RowSampler, log_softmax, top_logprobs
from phi3_chat.steps import guidance_problem
from phi3_chat.tools import validated_tool_fields
from phi3_chat.validate import validated_row
from phi3ops.serving.openai_routes import error_body
from phi3ops.serving.validate import chat_problem, feature_problem, transformers_problem

HELLO = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def schema_format(schema: object) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def refusal(row: dict) -> str:
    with pytest.raises(MlflowException) as caught:
        validated_row(row)
    return caught.value.message


# --- response_format -------------------------------------------------------------------------


def test_json_modes_become_compact_grammars_and_text_none() -> None:
    assert response_format_guidance({"type": "text"}) is None
    any_object = response_format_guidance({"type": "json_object"})
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    shaped = response_format_guidance(schema_format(schema))
    for guidance in (any_object, shaped):
        assert guidance is not None and guidance.kind == "lark_grammar"
        assert '"whitespace_flexible":false' in guidance.data  # no free whitespace to fill
        assert guidance.end == "json" and not guidance.alone  # rows share batches
    assert shaped != any_object  # different grammars: different batches
    assert shaped == response_format_guidance(schema_format(schema))  # equal ones share


@pytest.mark.parametrize(
    ("response_format", "words"),
    [
        ("json", "response_format must be an object with a type"),
        ({"type": "xml"}, "response_format.type must be one of text, json_object, json_schema"),
        ({"type": "json_schema"}, "response_format.json_schema must be an object"),
        (
            {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
            "response_format.json_schema.name must be 1 to 64 letters",
        ),
        (schema_format({"type": "array"}), "must describe an object (type: object)"),
        (
            schema_format({"type": "object", "properties": {"a": {"if": {}}}}),
            "keyword 'if' at #/properties/a is not supported",
        ),
        (
            schema_format({"type": "object", "description": "x" * MAX_SCHEMA_CHARS}),
            f"a schema may have at most {MAX_SCHEMA_CHARS}",
        ),
    ],
    ids=["not-object", "type", "no-schema", "name", "array", "keyword", "size"],
)
def test_bad_response_formats_are_refused_naming_the_param(response_format, words) -> None:
    message = refusal({"messages": HELLO, "response_format": response_format})
    assert message.startswith("response_format") and words in message
    assert error_body(400, message)["error"]["param"] == "response_format"


def test_a_schema_nested_too_deep_is_refused_before_any_grammar() -> None:
    schema: dict = {"type": "object"}
    for _ in range(MAX_SCHEMA_DEPTH + 1):
        schema = {"type": "object", "properties": {"a": schema}}
    message = refusal({"messages": HELLO, "response_format": schema_format(schema)})
    assert f"nests schemas more than {MAX_SCHEMA_DEPTH} levels deep" in message


def test_the_end_of_a_json_value_is_found_outside_strings_piece_by_piece() -> None:
    assert json_object_end('{"a":"}{\\"","b":[1,{}]} tail') == 23
    assert json_object_end('{"a": "open') is None
    tracker = EndTracker("json")
    pieces = ['{"a', '":"}', '"', "}", "}"]
    ends = [tracker.feed(piece) for piece in pieces]
    assert ends == [None, None, None, 9, None]  # at the first close of the top level
    tag = EndTracker("tag:</tool_call>")
    assert [tag.feed(p) for p in ("<tool_call>{}</to", "ol_call>x")] == [None, 25]


# --- seed, logprobs, roles -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"seed": "7"}, "seed must be a 64-bit integer"),
        ({"seed": 2**64}, "seed must be a 64-bit integer"),
        ({"logprobs": "yes"}, "logprobs must be true or false"),
        ({"top_logprobs": 6, "logprobs": True}, "top_logprobs must be at most 5"),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ],
)
def test_seed_and_logprobs_are_checked(fields, words) -> None:
    message = refusal({"messages": HELLO, **fields})
    assert words in message
    assert error_body(400, message)["error"]["param"] == next(iter(fields))


def test_developer_is_system_and_the_features_reach_the_settings() -> None:
    settings, messages = validated_row(
        {
            "messages": [{"role": "developer", "content": "Be brief."}, *HELLO],
            "seed": 7.0,  # pandas' float for an int column with gaps
            "logprobs": True,
            "top_logprobs": 3,
        }
    )
    assert messages == [{"role": "system", "content": "Be brief."}, *HELLO]
    assert (settings["seed"], settings["logprobs"]) == (7, 3)


# --- tools -----------------------------------------------------------------------------------


def test_tools_render_into_the_system_turn_and_history_and_constrain_the_answer() -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    settings, messages = validated_row({"messages": history, "tools": [WEATHER]})
    tools = settings["tools"]
    assert (tools.choice, tools.parallel) == ("auto", True)
    rendered = tools.render(messages)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[0]["content"].startswith("Be brief.\n\nYou can call these functions.")
    assert '"name": "get_weather"' in rendered[0]["content"]
    assert rendered[2]["content"] == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    )
    assert json.loads(rendered[3]["content"].removeprefix("<tool_response>")[:-16]) == {
        "tool_call_id": "call_1",
        "name": "get_weather",
        "content": "sunny",
    }
    auto = tools.guidance()
    assert auto is not None and auto.alone  # text or calls end only when the model stops
    named, _ = validated_row(
        {
            "messages": HELLO,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
        }
    )
    one_call = named["tools"].guidance()
    assert one_call is not None and not one_call.alone and one_call.end == "tag:</tool_call>"
    assert named["tools"].system_text().endswith("You must call get_weather.")
    none, _ = validated_row({"messages": HELLO, "tools": [WEATHER], "tool_choice": "none"})
    assert none["tools"].guidance() is None and none["tools"].system_text() == ""


def test_an_answer_of_calls_becomes_tool_calls_and_anything_else_stays_text() -> None:
    tools = validated_tool_fields({"tools": [WEATHER], "tool_choice": "required"})
    assert tools is not None
    text = (
        '<tool_call>{"name":"get_weather","arguments":{"city":"Rome"}}</tool_call>'
        '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    )
    calls = tools.calls(text)
    assert calls is not None
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Rome"},
        {"city": "Paris"},
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert tools.calls(text[:-3]) is None  # cut short by max_tokens
    assert tools.calls("It is sunny.") is None
    assert tools.calls('<tool_call>{"name":"other","arguments":{}}</tool_call>') is None


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tools": "get_weather"}, "tools must be a list"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0] must be an object with type"),
        ({"tools": [WEATHER, WEATHER]}, "is offered twice"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice must be none, auto"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice names 'x', which is not one of the tools",
        ),
        ({"tool_choice": "required"}, "tool_choice 'required' needs tools"),
        ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls must be"),
        (
            {"tools": [WEATHER], "response_format": {"type": "json_object"}},
            "a JSON answer and tool calls exclude each other",
        ),
    ],
)
def test_bad_tool_fields_are_refused_naming_the_param(fields, words) -> None:
    message = refusal({"messages": HELLO, **fields})
    assert words in message
    assert error_body(400, message)["error"]["param"] in fields


def test_tool_history_must_answer_calls_and_carry_the_tools() -> None:
    result = {"role": "tool", "tool_call_id": "call_9", "content": "x"}
    assert "answers no tool call" in refusal({"messages": [*HELLO, result], "tools": [WEATHER]})
    assert "but the request has no tools" in refusal({"messages": [*HELLO, result]})


# --- sampling on its own ---------------------------------------------------------------------


def test_a_seeded_row_samples_the_same_tokens_and_filters_apply() -> None:
    logits = np.random.default_rng(0).normal(size=(1, 1, 50)).astype(np.float32)

    def picks(seed: int | None, **kw: float) -> list[int]:
        settings = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **kw}
        sampler = RowSampler.of(seed=seed, **settings)  # type: ignore[arg-type]
        return [int(np.argmax(sampler.noisy(logits))) for _ in range(30)]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)
    top3 = set(np.argsort(-logits.reshape(-1))[:3].tolist())
    assert set(picks(1, top_k=3)) <= top3
    assert set(picks(1, top_p=1e-6)) == {int(np.argmax(logits))}  # the nucleus of one token


def test_logprobs_are_the_models_log_softmax_and_top_ones_come_first() -> None:
    logits = np.array([[[2.0, 1.0, 0.0, -1.0]]], dtype=np.float32)
    lp = log_softmax(logits)
    assert np.isclose(np.exp(lp).sum(), 1.0)
    best = top_logprobs(lp, 2)
    assert [token for token, _ in best] == [0, 1] and best[0][1] == pytest.approx(lp[0])


def test_the_engine_check_fails_when_a_build_ignores_or_lacks_guidance() -> None:
    assert guidance_problem(lambda kind, data: "yes") is None

    def without_guidance(kind: str, data: str) -> str:
        raise RuntimeError("guidance is not enabled in this build")

    assert "set_guidance failed" in (guidance_problem(without_guidance) or "")
    ignored = guidance_problem(lambda kind, data: "Hello there")
    assert ignored is not None and "'Hello there'" in ignored


# --- the serving layer: what each flavor refuses ---------------------------------------------


def test_a_model_without_a_feature_refuses_it_unless_it_asks_nothing() -> None:
    every = frozenset({"response_format", "tools", "seed", "logprobs"})
    row = {"messages": HELLO, "response_format": {"type": "json_object"}}
    assert feature_problem(row, every) is None
    problem = feature_problem(row, frozenset())
    assert problem is not None and problem.startswith("response_format is not supported")
    harmless = {
        "messages": HELLO,
        "response_format": {"type": "text"},
        "tools": [],
        "logprobs": False,
        "seed": 3,  # greedy: a seed changes nothing
        "temperature": 0,
    }
    assert feature_problem(harmless, frozenset()) is None
    sampled = {"messages": HELLO, "seed": 3, "temperature": 0.7}
    assert (feature_problem(sampled, frozenset()) or "").startswith("seed is not supported")


def test_the_transformers_flavor_refuses_features_and_roles_its_template_drops() -> None:
    assert transformers_problem({"messages": HELLO}) is None
    assert (transformers_problem({"messages": HELLO, "tools": [WEATHER]}) or "").startswith(
        "tools is not supported"
    )
    developer = {"messages": [{"role": "developer", "content": "x"}, *HELLO]}
    assert "messages[0].role 'developer'" in (transformers_problem(developer) or "")
    # /invocations checks the same rows with the shared validator first
    assert chat_problem(developer, [developer]) is None


def test_every_400_names_a_param() -> None:
    assert error_body(400, "the body must be a JSON object")["error"]["param"] == "body"
    assert error_body(400, "request[1].seed must be")["error"]["param"] == "seed"
    assert error_body(429, "busy")["error"]["param"] is None
