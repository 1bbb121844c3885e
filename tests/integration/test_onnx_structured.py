"""Structured outputs, tools, seed and logprobs on the tiny Phi-3 through `phi3_chat.model`.

The model is loaded straight from `phi3_chat.model` (``load_context`` with a plain context);
``og.Generator`` is wrapped to record each batch's size. The tiny Phi-3 is random: a grammar is
what makes its answers parse, and enums keep them short.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
from mlflow.exceptions import MlflowException

from phi3_chat import model as served
from phi3ops.serving.signatures import MODEL_DIR_ARTIFACT

pytestmark = pytest.mark.slow

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Ouagadougou in Burkina Faso"]},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "sunny"],
    "additionalProperties": False,
}
SIZE = {
    "type": "object",
    "properties": {"size": {"type": "string", "enum": ["S", "M", "L"]}},
    "required": ["size"],
    "additionalProperties": False,
}
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
PROMPTS = ("Where is it sunny?", "Tell me about Rome.", "A city, please.", "Weather?")


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **fields}


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def choice_of(answer: dict[str, Any]) -> dict[str, Any]:
    return answer["choices"][0]


class CountingGenerators:
    """Stands in for ``og.Generator``: records each batch's size, passes everything on. A
    grammar's compile check (a one-token generator, ``max_length`` 2) is counted apart.
    """

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.sizes: list[int] = []
        self.compiled = 0

    def __call__(self, og_model: Any, params: Any) -> Any:
        options = params.get_search_options()
        if int(options["max_length"]) == 2:
            self.compiled += 1
        else:
            self.sizes.append(int(options["batch_size"]))
        return self.real(og_model, params)


@pytest.fixture
def generators(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingGenerators]:
    counting = CountingGenerators(served.og.Generator)
    monkeypatch.setattr(served.og, "Generator", counting)
    return counting


@pytest.fixture
def load(tiny_phi3, generators) -> Callable[..., Any]:
    def load(**config: Any) -> Any:
        model = served.OnnxChatModel()
        context = types.SimpleNamespace(
            artifacts={MODEL_DIR_ARTIFACT: str(tiny_phi3.onnx_model_dir)}, model_config=config
        )
        model.load_context(context)
        del generators.sizes[:]
        generators.compiled = 0
        return model

    return load


# --- structured outputs ------------------------------------------------------------------


def test_json_schema_answers_validate_and_rows_finishing_apart_share_a_batch(
    load, generators
) -> None:
    model = load()
    rows = [
        chat(PROMPTS[0], response_format=schema_format(CITY), max_tokens=60),
        chat(PROMPTS[1], response_format=schema_format(CITY), max_tokens=60, temperature=1.0),
        *[
            chat(PROMPTS[2], response_format=schema_format(CITY), max_tokens=60, temperature=1.5,
                 seed=seed)
            for seed in range(6)
        ],
    ]  # fmt: skip
    answers = model.predict(None, rows)
    assert generators.sizes == [8]  # one grammar: one batch, whatever the sampling
    assert generators.compiled == 1  # compiled once for the eight rows
    values = [json.loads(choice_of(a)["message"]["content"]) for a in answers]
    for value, answer in zip(values, answers, strict=True):
        jsonschema.validate(value, CITY)
        assert choice_of(answer)["finish_reason"] == "stop"
    # Sampled rows picked cities of different lengths: they finished at different steps.
    assert len({len(answer["choices"][0]["message"]["content"]) for answer in answers}) > 1
    assert answers[0]["choices"] == model.predict(None, rows[0])[0]["choices"]  # greedy: alone
    again = model.predict(None, rows[5])[0]
    assert choice_of(again)["message"] == choice_of(answers[5])["message"]  # seeded: repeats


def test_rows_with_different_grammars_run_in_batches_of_their_grammar(load, generators) -> None:
    model = load(batch_wait_ms=0)
    rows = [
        chat(PROMPTS[0], response_format=schema_format(CITY), max_tokens=40),
        chat(PROMPTS[1], response_format=schema_format(SIZE), max_tokens=40),
        chat(PROMPTS[2], max_tokens=5),
        chat(PROMPTS[3], response_format=schema_format(SIZE), max_tokens=40),
        chat(PROMPTS[0], max_tokens=5, temperature=0.8),
    ]
    answers = model.predict(None, rows)
    assert sorted(generators.sizes) == [1, 2, 2]  # CITY; SIZE x2; the two free rows
    jsonschema.validate(json.loads(choice_of(answers[1])["message"]["content"]), SIZE)
    jsonschema.validate(json.loads(choice_of(answers[3])["message"]["content"]), SIZE)
    assert choice_of(answers[2])["finish_reason"] == "length"


def test_json_object_and_a_short_max_tokens_and_a_stream(load) -> None:
    model = load()
    (anything,) = model.predict(None, chat(PROMPTS[0], response_format={"type": "json_object"}))
    assert isinstance(json.loads(choice_of(anything)["message"]["content"]), dict)
    (cut,) = model.predict(
        None, chat(PROMPTS[0], response_format=schema_format(CITY), max_tokens=3)
    )
    assert choice_of(cut)["finish_reason"] == "length"
    assert choice_of(cut)["message"]["content"].startswith("{")
    chunks = list(model.predict_stream(None, chat(PROMPTS[1], response_format=schema_format(CITY))))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    jsonschema.validate(json.loads(text), CITY)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_schema_llguidance_cannot_build_is_the_requests_400(load, generators) -> None:
    model = load()
    broken = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}
    with pytest.raises(MlflowException) as caught:
        model.predict(None, chat(PROMPTS[0], response_format=schema_format(broken)))
    assert caught.value.message.startswith("response_format: the grammar cannot be built")
    assert (generators.sizes, generators.compiled) == ([], 1)  # nothing was generated


# --- tools ---------------------------------------------------------------------------------


def test_a_named_tool_is_called_with_arguments_matching_its_parameters(load, generators) -> None:
    model = load()
    named = {"type": "function", "function": {"name": "get_weather"}}
    rows = [
        chat(prompt, tools=[WEATHER], tool_choice=named, parallel_tool_calls=False, max_tokens=80)
        for prompt in PROMPTS
    ]
    answers = model.predict(None, rows)
    assert generators.sizes == [4]  # one call each, its end seen in the text: one batch
    for answer in answers:
        choice = choice_of(answer)
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        params = WEATHER["function"]["parameters"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), params)
    chunks = list(model.predict_stream(None, rows[0]))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not any(d.get("content") for d in deltas)  # held back: it was a call
    (streamed,) = [call for d in deltas for call in d.get("tool_calls", [])]
    assert streamed["index"] == 0 and streamed["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_tool_round_trip_renders_the_result_and_answers_in_text(load) -> None:
    model = load()
    history = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    (answer,) = model.predict(
        None, {"messages": history, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 6}
    )
    assert choice_of(answer)["finish_reason"] == "length"
    assert isinstance(choice_of(answer)["message"]["content"], str)
    rendered = model._tokenizer.decode(
        model._requests({"messages": history, "tools": [WEATHER]}, None)[0].input_ids
    )
    assert '<tool_response>{"tool_call_id": "call_1", "name": "get_weather"' in rendered
    assert "You can call these functions." in rendered and "Answer briefly." in rendered


# --- seed, logprobs ------------------------------------------------------------------------


def test_logprobs_list_each_token_with_its_likeliest_alternatives(load) -> None:
    model = load()
    (answer,) = model.predict(None, chat(PROMPTS[0], max_tokens=5, logprobs=True, top_logprobs=3))
    content = choice_of(answer)["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 5
    for entry in content:
        assert len(entry["top_logprobs"]) == 3 and entry["logprob"] <= 0
        values = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        assert entry["logprob"] == values[0]  # greedy: the likeliest token was picked
    chunks = list(model.predict_stream(None, chat(PROMPTS[0], max_tokens=5, logprobs=True)))
    streamed = [
        e for c in chunks for e in (c["choices"][0].get("logprobs") or {}).get("content", [])
    ]
    assert [e["logprob"] for e in streamed] == [e["logprob"] for e in content]


# --- the engine check at load --------------------------------------------------------------


def test_a_build_without_guidance_fails_at_load_unless_structured_outputs_are_off(
    load, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = served.og.GeneratorParams

    class WithoutGuidance:
        """og's GeneratorParams as a build without llguidance has it."""

        def __init__(self, og_model: Any) -> None:
            self._params = real(og_model)

        def set_search_options(self, **options: Any) -> None:
            self._params.set_search_options(**options)

        def set_guidance(self, kind: str, data: str) -> None:
            raise RuntimeError("guidance is not enabled in this build of onnxruntime-genai")

    with monkeypatch.context() as patched:
        patched.setattr(served.og, "GeneratorParams", WithoutGuidance)
        with pytest.raises(MlflowException, match="does not constrain decoding"):
            load()
    model = load(structured_outputs=False)
    with pytest.raises(MlflowException, match=r"^response_format is not supported"):
        model.predict(None, chat(PROMPTS[0], response_format={"type": "json_object"}))
    assert "response_format" not in model.chat_features and "seed" in model.chat_features
