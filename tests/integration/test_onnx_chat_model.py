"""The onnxruntime-genai chat model (the `phi3_chat` package), logged as MLflow models-from-code
with its package as ``code_paths``, and loaded as a pyfunc.

The model is logged once and loaded once per module (logging runs it once too). The tiny
Phi-3 is random: it never emits an end-of-sequence token and often emits bytes that are not
valid UTF-8, so answers are compared token for token with a bare onnxruntime-genai loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from phi3ops.serving.signatures import (
    CHAT_INPUT_EXAMPLE,
    MODEL_DIR_ARTIFACT,
    MODEL_ENTRY_FILE,
    MODEL_PACKAGE_DIR,
    ONNX_CHAT_SIGNATURE,
    PROMPT_INPUT_EXAMPLE,
    log_kwargs,
    model_package_digest,
    pip_requirements,
)

pytestmark = pytest.mark.slow

MODEL_NAME = "tiny-phi3-onnx"
# The tiny Phi-3 says context_length 4096 with a 2047-token sliding window: og 0.18 holds 2048.
CONTEXT = 2048
QUESTIONS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How many days are there in a week?",
    "Explain why the sky is blue in one sentence.",
)


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **fields}


def content_of(answer: dict[str, Any]) -> str:
    return answer["choices"][0]["message"]["content"]


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(tiny_phi3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Logs the model into a fresh SQLite store once, loads it once; yields (info, pyfunc)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    root = tmp_path_factory.mktemp("onnx-chat-mlflow")
    previous_uri = tracking_utils._tracking_uri
    with pytest.MonkeyPatch.context() as env:
        # setenv first: a delenv of an unset variable records nothing to restore, and
        # set_tracking_uri exports the URI, which would then leak into later modules.
        env.setenv("MLFLOW_TRACKING_URI", "")
        env.delenv("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        experiment_id = mlflow.create_experiment(
            "onnx-chat", artifact_location=(root / "artifacts").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                **log_kwargs(tiny_phi3.onnx_model_dir, model_config={"model_name": MODEL_NAME}),
            )
        loaded = mlflow.pyfunc.load_model(info.model_uri)
        yield info, loaded
        mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(scope="module")
def pyfunc(logged):
    return logged[1]


@pytest.fixture(scope="module")
def model(pyfunc):
    """The loaded ``OnnxChatModel`` itself: calls to it skip MLflow's schema enforcement."""
    return pyfunc.unwrap_python_model()


@pytest.fixture(scope="module")
def served(model) -> types.SimpleNamespace:
    """The names of ``phi3_chat.model`` as the loaded model sees them: the copy logged with it,
    which need not be the one ``sys.modules`` names (see `phi3_chat.models_from_code`).
    """
    names = dict(type(model).load_context.__globals__)
    # The request module's names too (the decoder), from the same logged copy.
    return types.SimpleNamespace(**{**names["_RowState"].add.__globals__, **names})


@pytest.fixture(scope="module")
def bare(tiny_phi3):
    """An independent onnxruntime-genai model and tokenizer for reference answers."""
    import onnxruntime_genai as og

    og_model = og.Model(str(tiny_phi3.onnx_model_dir))
    return og_model, og.Tokenizer(og_model)


def render(bare, content: str) -> str:
    _, tokenizer = bare
    messages = json.dumps([{"role": "user", "content": content}])
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def bare_greedy(bare, content: str, max_new: int) -> tuple[list[int], list[int]]:
    """The plain og 0.18 greedy loop; returns (prompt ids, new ids)."""
    import onnxruntime_genai as og

    og_model, tokenizer = bare
    ids = tokenizer.encode(render(bare, content))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in ids], [int(t) for t in generator.get_sequence(0)[len(ids) :]]


def decode(served, bare, ids: list[int]) -> str:
    decoder = served._IncrementalDecoder(bare[1])
    return "".join(decoder.push(token) for token in ids) + decoder.flush()


@pytest.fixture
def generators(monkeypatch: pytest.MonkeyPatch, served) -> list[int]:
    """Records the batch size of every og.Generator the model creates."""
    real = served.og.Generator
    sizes: list[int] = []

    def counting(og_model, params):
        sizes.append(int(params.get_search_options()["batch_size"]))
        return real(og_model, params)

    monkeypatch.setattr(served.og, "Generator", counting)
    return sizes


# --- logging, metadata, the served file --------------------------------------------------


def test_logged_model_metadata_signature_and_requirements(logged, tiny_phi3) -> None:
    info, loaded = logged
    assert loaded.metadata.signature == ONNX_CHAT_SIGNATURE
    inputs = loaded.metadata.get_input_schema()
    assert inputs.input_names() == [
        "messages",
        "prompt",
        "temperature",
        "max_tokens",
        "stop",
        "n",
        "stream",
        "top_p",
        "top_k",
        "response_format",  # structured outputs, tools, seed and logprobs: any JSON
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "seed",
        "logprobs",
        "top_logprobs",
    ]
    assert not any(column.required for column in inputs.inputs)
    assert loaded.metadata.get_output_schema() is None
    assert [p.name for p in loaded.metadata.get_params_schema().params] == [
        "temperature",
        "max_tokens",
        "top_p",
        "top_k",
        "stop",
        "timeout_s",
    ]

    import mlflow

    pyfunc_conf = loaded.metadata.flavors["python_function"]
    assert Path(pyfunc_conf["model_code_path"]).name == MODEL_ENTRY_FILE.name
    assert pyfunc_conf["code"] == "code"  # the phi3_chat package, logged as code_paths
    assert pyfunc_conf["streamable"] is True  # predict_stream is there
    assert pyfunc_conf["config"] == {"model_name": MODEL_NAME}

    root = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    model_dir = root / pyfunc_conf["artifacts"][MODEL_DIR_ARTIFACT]["path"]
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        p.name for p in tiny_phi3.onnx_model_dir.iterdir()
    )
    assert (root / "requirements.txt").read_text().split() == pip_requirements()
    example = json.loads((root / "input_example.json").read_text())
    assert example["messages"] == CHAT_INPUT_EXAMPLE["messages"]


def test_usable_context_is_the_sliding_window_when_its_cache_does_not_slide(
    model, tiny_phi3
) -> None:
    config = json.loads((tiny_phi3.onnx_model_dir / "genai_config.json").read_text())["model"]
    window = config["decoder"]["sliding_window"]
    assert (config["context_length"], window["window_size"]) == (4096, 2047)
    assert window["slide_key_value_cache"] is False
    assert model.context_length == CONTEXT == window["window_size"] + 1


# Run in a fresh interpreter where the project is not importable (no repository on sys.path, the
# editable install's finder removed): what loads must be the package logged with the model.
_LOAD_ANYWHERE_PROBE = """
import json, sys
sys.meta_path[:] = [
    f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
]
try:
    import phi3_chat
    reachable = True
except ImportError:
    reachable = False
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
answer = model.predict({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})[0]
import phi3_chat
print(json.dumps({
    "reachable": reachable,
    "package": phi3_chat.__file__,
    "object": answer["object"],
    "loaded": sorted({name.split(".")[0] for name in sys.modules}),
}))
"""


def test_a_logged_model_carries_its_package_and_loads_it_anywhere(logged, tmp_path: Path) -> None:
    import mlflow

    info, _ = logged
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    logged_package = local / "code" / "phi3_chat"
    assert sorted(p.name for p in logged_package.glob("*.py")) == sorted(
        p.name for p in MODEL_PACKAGE_DIR.glob("*.py")
    )
    assert model_package_digest(logged_package) == model_package_digest()
    assert (local / MODEL_ENTRY_FILE.name).read_bytes() == MODEL_ENTRY_FILE.read_bytes()

    result = subprocess.run(
        [sys.executable, "-I", "-c", _LOAD_ANYWHERE_PROBE, str(local)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["reachable"] is False  # nothing but the logged copy could be imported
    assert Path(report["package"]).resolve().parent == logged_package.resolve()
    assert report["object"] == "chat.completion"
    assert not {"prefect", "phi3ops", "flows", "tasks"} & set(report["loaded"])


def test_a_process_with_its_own_copy_of_the_package_serves_the_logged_one(model) -> None:
    # This process imported the repository's phi3_chat before it loaded the model (phi3ops'
    # server and evaluation do too): the model runs the copy logged with it all the same, and
    # the process keeps its own under the name.
    served_file = Path(type(model).load_context.__globals__["__file__"]).resolve()
    assert served_file.parts[-3:] == ("code", "phi3_chat", "model.py")
    assert not served_file.is_relative_to(MODEL_PACKAGE_DIR.resolve())
    assert Path(sys.modules["phi3_chat"].__file__).resolve().parent == MODEL_PACKAGE_DIR.resolve()
    assert type(model).__module__ == "phi3_chat.model"


def test_artifact_name_agrees_with_the_served_file(served) -> None:
    assert served.MODEL_DIR_ARTIFACT == MODEL_DIR_ARTIFACT


# --- the chat shape -----------------------------------------------------------------------


def test_chat_request_returns_a_chat_completion_with_real_usage(pyfunc, bare) -> None:
    answer = pyfunc.predict(chat(QUESTIONS[0], max_tokens=12))

    assert isinstance(answer, list) and len(answer) == 1
    completion = answer[0]
    assert completion["object"] == "chat.completion"
    assert completion["id"].startswith("chatcmpl-")
    assert isinstance(completion["created"], int)
    assert completion["model"] == MODEL_NAME
    (choice,) = completion["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] == "length"

    prompt_tokens = len(bare[1].encode(render(bare, QUESTIONS[0])))
    assert completion["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
    }


def test_small_max_tokens_finishes_with_length(pyfunc) -> None:
    (completion,) = pyfunc.predict(chat(QUESTIONS[1], max_tokens=2))
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"]["completion_tokens"] == 2


def test_greedy_is_deterministic_and_equals_a_bare_onnxruntime_genai_loop(
    pyfunc, served, bare
) -> None:
    request = chat(QUESTIONS[2], temperature=0.0, max_tokens=24)
    first, second = pyfunc.predict(request)[0], pyfunc.predict(request)[0]
    assert content_of(first) == content_of(second)

    prompt_ids, new_ids = bare_greedy(bare, QUESTIONS[2], 24)
    assert len(new_ids) == 24
    assert content_of(first) == decode(served, bare, new_ids)
    assert first["usage"]["prompt_tokens"] == len(prompt_ids)
    # Without temperature at all (model default 0.0), the answer is the same greedy one.
    assert content_of(pyfunc.predict(chat(QUESTIONS[2], max_tokens=24))[0]) == content_of(first)


def test_temperature_above_zero_samples(pyfunc) -> None:
    request = chat(QUESTIONS[0], temperature=1.0, top_p=0.95, top_k=0, max_tokens=16)
    answers = {content_of(pyfunc.predict(request)[0]) for _ in range(4)}
    assert len(answers) > 1  # a random 1k-token model: four equal samples would be a fluke


# --- the prompt shape ---------------------------------------------------------------------


def test_prompt_request_returns_the_string_of_the_same_chat_turn(pyfunc) -> None:
    answer = pyfunc.predict({"prompt": QUESTIONS[0], "max_tokens": 12})
    assert isinstance(answer, list) and len(answer) == 1
    assert isinstance(answer[0], str) and answer[0]
    # The prompt went through the model's chat template as a single user message.
    assert answer[0] == content_of(pyfunc.predict(chat(QUESTIONS[0], max_tokens=12))[0])


def test_a_prompt_already_in_chat_format_is_used_verbatim(pyfunc, bare) -> None:
    # The original Phi-3 MLflow sample's callers wrote the chat markers themselves.
    formatted = render(bare, QUESTIONS[3])
    assert formatted.startswith("<|user|>")
    verbatim = pyfunc.predict({"prompt": formatted, "max_tokens": 10})[0]
    assert verbatim == content_of(pyfunc.predict(chat(QUESTIONS[3], max_tokens=10))[0])


def test_the_prompt_input_example_is_answered(pyfunc) -> None:
    (answer,) = pyfunc.predict(PROMPT_INPUT_EXAMPLE)
    assert isinstance(answer, str)


# --- several rows, threads ----------------------------------------------------------------


def test_rows_of_one_call_are_batched_and_equal_one_row_answers(pyfunc, generators) -> None:
    rows = [
        chat(question, max_tokens=tokens)
        for question, tokens in zip(QUESTIONS[:3], (6, 14, 9), strict=True)
    ]
    batched = pyfunc.predict(rows)
    assert generators == [3]  # one generator for all three greedy rows

    singles = [pyfunc.predict(row)[0] for row in rows]
    assert [content_of(a) for a in batched] == [content_of(a) for a in singles]
    assert [a["usage"] for a in batched] == [a["usage"] for a in singles]
    assert [a["usage"]["completion_tokens"] for a in batched] == [6, 14, 9]


def test_rows_with_different_sampling_share_one_generator(pyfunc, generators) -> None:
    rows = [
        chat(QUESTIONS[0], temperature=0.0, max_tokens=8),
        chat(QUESTIONS[1], temperature=0.8, max_tokens=8),
        chat(QUESTIONS[2], temperature=0.0, max_tokens=8),
    ]
    answers = pyfunc.predict(rows)
    assert generators == [3]  # each row samples on its own: one greedy generator
    assert len(answers) == 3
    assert content_of(answers[0]) == content_of(pyfunc.predict(rows[0])[0])
    assert content_of(answers[2]) == content_of(pyfunc.predict(rows[2])[0])


def test_chat_and_prompt_rows_mix_when_prompt_rows_send_messages_none(pyfunc) -> None:
    rows = [
        chat(QUESTIONS[0], max_tokens=6),
        {"messages": None, "prompt": QUESTIONS[1], "max_tokens": 6},
    ]
    chat_answer, prompt_answer = pyfunc.predict(rows)
    assert content_of(chat_answer) == content_of(pyfunc.predict(rows[0])[0])
    assert prompt_answer == pyfunc.predict({"prompt": QUESTIONS[1], "max_tokens": 6})[0]


def test_max_batch_size_splits_large_calls(served, generators, tiny_phi3) -> None:
    small = served.OnnxChatModel()
    small.load_context(
        types.SimpleNamespace(
            artifacts={MODEL_DIR_ARTIFACT: str(tiny_phi3.onnx_model_dir)},
            model_config={"max_batch_size": 2},
        )
    )
    assert generators == [1, 1]  # the warm-up (the model's rates), the guidance check
    del generators[:]
    answers = small.predict(None, [chat(q, max_tokens=4) for q in QUESTIONS[:3]])
    assert generators == [2, 1]
    assert len(answers) == 3


def test_concurrent_predict_calls_from_threads(pyfunc) -> None:
    requests = [chat(question, max_tokens=20) for question in QUESTIONS]
    sequential = [content_of(pyfunc.predict(request)[0]) for request in requests]
    results: dict[tuple[int, int], str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(requests))

    def work(worker: int) -> None:
        try:
            start.wait()
            for attempt in range(3):
                request = requests[(worker + attempt) % len(requests)]
                results[worker, attempt] = content_of(pyfunc.predict(request)[0])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not errors
    assert len(results) == 12
    for (worker, attempt), content in results.items():
        assert content == sequential[(worker + attempt) % len(requests)]


# --- generation settings ------------------------------------------------------------------


def test_stop_strings_cut_the_answer(pyfunc) -> None:
    full = content_of(pyfunc.predict(chat(QUESTIONS[0], max_tokens=40))[0])
    words = [word for word in full.split() if word.isascii() and len(word) > 2]
    assert len(words) > 2, full
    stop = words[len(words) // 2]
    cut = full.index(stop)

    (answer,) = pyfunc.predict(chat(QUESTIONS[0], max_tokens=40, stop=[stop, "never-seen"]))
    assert content_of(answer) == full[:cut]
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] < 40


def test_params_fill_in_what_rows_leave_out_and_rows_win(pyfunc) -> None:
    (from_params,) = pyfunc.predict(chat(QUESTIONS[1]), params={"max_tokens": 5})
    assert from_params["usage"]["completion_tokens"] == 5
    (row_wins,) = pyfunc.predict(chat(QUESTIONS[1], max_tokens=3), params={"max_tokens": 5})
    assert row_wins["usage"]["completion_tokens"] == 3
    (prompt,) = pyfunc.predict({"prompt": QUESTIONS[1]}, params={"max_tokens": 3})
    assert prompt == content_of(row_wins)


def test_default_max_tokens_is_clamped_to_the_context(model, bare) -> None:
    long_text = "the quick brown fox jumps over the lazy dog " * 124
    prompt_tokens = len(bare[1].encode(render(bare, long_text)))
    room = CONTEXT - prompt_tokens
    assert 0 < room < 256, prompt_tokens  # the model default (256) does not fit

    (answer,) = model.predict(None, chat(long_text))
    assert answer["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": room,
        "total_tokens": CONTEXT,
    }
    assert answer["choices"][0]["finish_reason"] == "length"

    # Asked for explicitly, the same max_tokens is an error; exactly the room left is fine.
    assert model.predict(None, chat(long_text, max_tokens=room))[0]["usage"]["total_tokens"] == (
        CONTEXT
    )
    with pytest.raises(Exception, match=r"max_tokens") as excinfo:
        model.predict(None, chat(long_text, max_tokens=room + 1))
    assert str(excinfo.value) == (
        f"max_tokens={room + 1} does not fit: prompt uses {prompt_tokens} of {CONTEXT} tokens "
        f"(at most {room} new tokens)"
    )


# --- streaming ----------------------------------------------------------------------------


def test_predict_stream_chunks_join_into_the_predict_answer(pyfunc) -> None:
    request = chat(QUESTIONS[3], max_tokens=30)
    (expected,) = pyfunc.predict(request)
    chunks = list(pyfunc.predict_stream(request))

    assert len(chunks) > 3
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"] == expected["usage"]
    joined = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert joined == content_of(expected)


def test_predict_stream_holds_back_a_stop_string(pyfunc) -> None:
    full = content_of(pyfunc.predict(chat(QUESTIONS[0], max_tokens=40))[0])
    stop = [word for word in full.split() if word.isascii() and len(word) > 2][-1]
    request = chat(QUESTIONS[0], max_tokens=40, stop=[stop])

    chunks = list(pyfunc.predict_stream(request))
    joined = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert joined == content_of(pyfunc.predict(request)[0]) == full[: full.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_predict_stream_of_a_prompt_yields_strings(pyfunc) -> None:
    pieces = list(pyfunc.predict_stream({"prompt": QUESTIONS[2], "max_tokens": 15}))
    assert pieces and all(isinstance(piece, str) for piece in pieces)
    assert "".join(pieces) == pyfunc.predict({"prompt": QUESTIONS[2], "max_tokens": 15})[0]


# --- decoding -----------------------------------------------------------------------------


def test_incremental_decoding_equals_a_whole_decode_on_valid_text(served, bare) -> None:
    tokenizer = bare[1]
    text = "Byte-level BPE round-trips anything: café, 東京, emoji 🙂, tabs\tand\nnewlines."
    ids = [int(t) for t in tokenizer.encode(text)]
    decoder = served._IncrementalDecoder(tokenizer)
    out = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert "".join(out) == tokenizer.decode(np.asarray(ids, dtype=np.int32)) == text
    assert all("\ufffd" not in piece for piece in out)  # never half a character


def test_invalid_bytes_cost_one_character_not_the_whole_answer(served, bare) -> None:
    _, new_ids = bare_greedy(bare, QUESTIONS[0], 40)
    whole = bare[1].decode(np.asarray(new_ids, dtype=np.int32))
    # What og 0.18 does with invalid UTF-8 in a decode: one U+FFFD for all that follows.
    assert whole.endswith("\ufffd")
    text = decode(served, bare, new_ids)
    assert text.startswith(whole)
    assert sum(ch.isascii() and ch.isalpha() for ch in text[len(whole) :]) > 10


# --- validation ---------------------------------------------------------------------------

BAD_REQUESTS = [
    pytest.param(chat("hi", temperature="hot"), "temperature", id="temperature-string"),
    pytest.param(chat("hi", temperature=-0.5), "temperature", id="temperature-negative"),
    pytest.param(chat("hi", max_tokens=0), "max_tokens", id="max_tokens-zero"),
    pytest.param(chat("hi", max_tokens=2.5), "max_tokens", id="max_tokens-fraction"),
    pytest.param(chat("hi", max_tokens="3"), "max_tokens", id="max_tokens-string"),
    pytest.param(chat("hi", max_tokens=True), "max_tokens", id="max_tokens-bool"),
    pytest.param(chat("hi", max_tokens=5000), "max_tokens=5000 does not fit", id="max_tokens-fit"),
    pytest.param(chat("hi", top_p=0.0), "top_p", id="top_p-zero"),
    pytest.param(chat("hi", top_p=1.5), "top_p", id="top_p-above-one"),
    pytest.param(chat("hi", top_k=-1), "top_k", id="top_k-negative"),
    pytest.param(chat("hi", stop="END"), "stop", id="stop-string"),
    pytest.param(chat("hi", stop=["ok", 3]), "stop", id="stop-not-strings"),
    pytest.param(chat("hi", n=2), "n=2", id="n-two"),
    pytest.param(chat("hi", stream="yes"), "stream", id="stream-string"),
    pytest.param({"messages": []}, "messages is empty", id="messages-empty"),
    pytest.param({"messages": "hi"}, "messages", id="messages-string"),
    pytest.param(
        {"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", id="role-unknown"
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": ""}]}, "messages[0].content", id="content-empty"
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", id="content-int"
    ),
    pytest.param({"messages": [{"role": "user"}]}, "messages[0].content", id="content-missing"),
    pytest.param(
        {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"},
        "messages/prompt: got both",
        id="both-shapes",
    ),
    pytest.param({"max_tokens": 4}, "messages/prompt: got neither", id="neither-shape"),
    pytest.param({"prompt": ""}, "prompt", id="prompt-empty"),
    pytest.param({"prompt": ["a", "b"]}, "prompt", id="prompt-list"),
    pytest.param(
        chat("the quick brown fox " * 2000), "messages is too long", id="prompt-over-context"
    ),
    pytest.param([], "empty", id="no-rows"),
    pytest.param(
        [chat("hi"), {"messages": [{"role": "robot", "content": "x"}]}],
        "request[1].messages[0].role",
        id="second-row",
    ),
]


@pytest.mark.parametrize(("request_", "field"), BAD_REQUESTS)
def test_bad_requests_are_refused_before_generating(model, generators, request_, field) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    with pytest.raises(MlflowException) as excinfo:
        model.predict(None, request_)
    assert field in excinfo.value.message
    assert excinfo.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
    assert excinfo.value.get_http_status_code() == 400
    assert generators == []  # validated before any generation


def test_the_timeout_param_reaches_the_model_through_the_pyfunc(pyfunc) -> None:
    from mlflow.exceptions import MlflowException

    (answer,) = pyfunc.predict(chat(QUESTIONS[0], max_tokens=3), params={"timeout_s": 30.0})
    assert answer["usage"]["completion_tokens"] == 3
    with pytest.raises(MlflowException, match=r"params\['timeout_s'\]"):
        pyfunc.predict(chat(QUESTIONS[0], max_tokens=3), params={"timeout_s": -1.0})


def test_bad_params_are_refused_naming_the_param(model) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"params\['temperature'\]"):
        model.predict(None, chat("hi"), params={"temperature": "hot"})
    with pytest.raises(MlflowException, match=r"params\['stop'\]"):
        model.predict(None, chat("hi"), params={"stop": "END"})


def test_predict_stream_refuses_more_than_one_request(model) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="exactly one request"):
        model.predict_stream(None, [chat("a"), chat("b")])
    with pytest.raises(MlflowException, match="messages"):
        model.predict_stream(None, {"messages": []})  # raised before any chunk is asked for


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"max_tokens": 0}, "model_config['max_tokens']"),
        ({"temperature": "warm"}, "model_config['temperature']"),
        ({"max_batch_size": 0}, "model_config['max_batch_size']"),
        ({"prompt_format": "jinja"}, "model_config['prompt_format']"),
        ({"max_queue": 0}, "model_config['max_queue']"),
        ({"batch_wait_ms": -1}, "model_config['batch_wait_ms']"),
        ({"request_timeout_s": 0}, "model_config['request_timeout_s']"),
    ],
)
def test_bad_model_config_fails_at_load(served, tiny_phi3, config, field) -> None:
    from mlflow.exceptions import MlflowException

    context = types.SimpleNamespace(
        artifacts={MODEL_DIR_ARTIFACT: str(tiny_phi3.onnx_model_dir)}, model_config=config
    )
    with pytest.raises(MlflowException) as excinfo:
        served.OnnxChatModel().load_context(context)
    assert field in excinfo.value.message


def test_a_missing_model_dir_artifact_fails_at_load(served, tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException

    context = types.SimpleNamespace(artifacts={"model_dir": str(tmp_path)}, model_config={})
    with pytest.raises(MlflowException, match=r"genai_config\.json"):
        served.OnnxChatModel().load_context(context)


def test_a_logged_model_whose_genai_config_was_altered_is_refused_at_load(
    logged, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    info, _ = logged
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    config_path = next(local.rglob("genai_config.json"))
    config = json.loads(config_path.read_text())
    library = config_path.parent / "libcustom_ops.so"
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = str(library)
    config_path.write_text(json.dumps(config))
    with pytest.raises(MlflowException) as excinfo:
        mlflow.pyfunc.load_model(str(local))
    assert "Refusing to load" in excinfo.value.message
    assert "genai_config.json: model.decoder.session_options.custom_ops_library" in (
        excinfo.value.message
    )


def _altered_copy(tiny_phi3, tmp_path: Path, change: str) -> Path:
    import shutil

    folder = Path(shutil.copytree(tiny_phi3.onnx_model_dir, tmp_path / "model"))
    config_path = folder / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"]["session_options"]
    if change == "provider":
        options["provider_options"] = [{"cuda": {"enable_cuda_graph": "0"}}]
    elif change == "library file":
        (folder / "libonnxruntime_extensions.so").write_bytes(b"\x7fELF")
    elif change == "symlink":
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer.json").symlink_to(tiny_phi3.onnx_model_dir / "tokenizer.json")
    elif change == "filename":
        config["model"]["decoder"]["filename"] = "../../elsewhere/model.onnx"
    config_path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("provider", "provider_options[0] names execution provider 'cuda'"),
        ("library file", "libonnxruntime_extensions.so: code"),
        ("symlink", "tokenizer.json: a symbolic link"),
        ("filename", "model.decoder.filename='../../elsewhere/model.onnx'"),
    ],
)
def test_a_model_folder_that_is_not_data_is_refused_at_load(
    served, tiny_phi3, tmp_path: Path, change: str, named: str
) -> None:
    from mlflow.exceptions import MlflowException

    folder = _altered_copy(tiny_phi3, tmp_path, change)
    context = types.SimpleNamespace(artifacts={MODEL_DIR_ARTIFACT: str(folder)}, model_config={})
    with pytest.raises(MlflowException) as excinfo:
        served.OnnxChatModel().load_context(context)
    assert named in excinfo.value.message


# --- MLflow's own schema enforcement on the logged signature ----------------------------------


@pytest.mark.parametrize(
    ("request_", "column"),
    [
        (chat("hi", temperature="hot"), "temperature"),
        (chat("hi", max_tokens=2.5), "max_tokens"),
        ({"messages": [{"role": 3, "content": "hi"}]}, "role"),
    ],
)
def test_schema_enforcement_refuses_wrong_types(pyfunc, generators, request_, column) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as excinfo:
        pyfunc.predict(request_)
    reason = excinfo.value.message.split("Error:")[-1]
    assert column in reason
    assert excinfo.value.get_http_status_code() == 400
    assert generators == []


def test_schema_enforcement_refuses_rows_that_disagree_on_long_or_array_keys(pyfunc) -> None:
    """The documented limit of one signature for both shapes: pandas fills missing keys with NaN."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="max_tokens"):
        pyfunc.predict([chat("a"), chat("b", max_tokens=3)])
    with pytest.raises(MlflowException, match="Expected data to be list"):
        pyfunc.predict([chat("a"), {"prompt": "b"}])
    with pytest.raises(MlflowException, match="Expected data to be list"):
        pyfunc.predict([chat("a"), chat("b", stop=["x"])])
    # A bare list of strings maps to no column of the signature.
    with pytest.raises(MlflowException, match="no request fields"):
        pyfunc.predict(["What is the capital of France?"])
    # An Array key sent as None, and double keys left out, are fine.
    assert len(pyfunc.predict([chat("a", stop=None), chat("b", stop=["x"], top_p=0.5)])) == 2


def test_the_scoring_server_answers_both_shapes_and_400_for_bad_input(pyfunc) -> None:
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    client = TestClient(scoring_server.init(pyfunc))

    # The unified LLM format: the request body as is; generation fields go to params.
    response = client.post("/invocations", json=chat(QUESTIONS[0], max_tokens=4, temperature=0))
    assert response.status_code == 200, response.text
    assert response.json()[0]["usage"]["completion_tokens"] == 4

    response = client.post("/invocations", json={"prompt": QUESTIONS[0], "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert isinstance(response.json()[0], str)

    body = {"inputs": [chat(q, max_tokens=3) for q in QUESTIONS[:2]], "params": {"top_p": 0.9}}
    response = client.post("/invocations", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 2

    response = client.post("/invocations", json={"messages": [{"role": "robot", "content": "x"}]})
    assert response.status_code == 400
    assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "messages[0].role" in response.json()["message"]
