"""Phi-3 (ONNX int4) chat model on onnxruntime-genai, as an MLflow *models-from-code* file.

MLflow copies this file into every logged model and runs it wherever the model is loaded, so
it imports only the standard library, numpy, pandas, mlflow and ``onnxruntime_genai``: never
Prefect, never phi3ops. A logged model then loads anywhere its pip requirements install.

Log it with::

    mlflow.pyfunc.log_model(
        name="model",
        python_model="<path of this file>",
        artifacts={"model_dir": "<folder holding genai_config.json>"},
        model_config={"model_name": "microsoft/Phi-3-mini-4k-instruct-onnx"},  # optional
        signature=..., input_example=..., pip_requirements=[...],
    )

Each input row is one request, in one of two shapes:

* chat, as in MLflow's ``llm/v1/chat``: ``messages`` (a list of ``{role, content}``) with
  optional ``temperature``, ``max_tokens``, ``top_p``, ``top_k``, ``stop``, ``n`` (only 1) and
  ``stream`` (ignored by ``predict``). The answer is a ``chat.completion`` dict.
* prompt, as in the original Phi-3 MLflow sample (``{"prompt": "..."}``), with the same
  optional generation fields. The answer is the generated string. A prompt that already holds
  the model's chat markers (that sample's callers wrote ``<|user|>...<|end|><|assistant|>``
  themselves) is used verbatim; any other prompt becomes a single user message
  (``model_config["prompt_format"]``: ``auto``, the default, or always ``chat`` / ``raw``).

Generation fields may also come through MLflow ``params``; a row's own values win over them,
and they win over the ``model_config`` defaults (``max_tokens``, ``temperature``, ``top_p``,
``top_k``). Every request is validated before any token is generated; a bad one raises
``MlflowException`` with ``INVALID_PARAMETER_VALUE`` (HTTP 400 from the scoring server).

The model folder is data, never code: ``load_context`` refuses a folder holding anything but
model files (`MODEL_FILE_SUFFIXES`) or a ``genai_config.json`` that loads a library
(``custom_ops_library``), names an execution provider other than the CPU, or sets a session
option off `ALLOWED_SESSION_OPTIONS`, before onnxruntime-genai reads it. The fetch and package
tasks run the same check (`model_file_problems`) on the files they take in.
"""

import json
import math
import numbers
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
import onnxruntime_genai as og
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext  # mypy sees mlflow.pyfunc as a LazyLoader

__all__ = [
    "ALLOWED_PROVIDERS",
    "ALLOWED_ROLES",
    "ALLOWED_SESSION_OPTIONS",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_TOKENS",
    "GENAI_CONFIG",
    "MODEL_DIR_ARTIFACT",
    "MODEL_FILE_NAMES",
    "MODEL_FILE_SUFFIXES",
    "OnnxChatModel",
    "model_file_problems",
    "model_folder_problems",
]

#: Name of the artifact holding the ONNX folder (the one with ``genai_config.json``).
MODEL_DIR_ARTIFACT = "model_dir"
#: Roles the Phi-3 chat template renders; any other role would be dropped silently by it.
ALLOWED_ROLES = ("system", "user", "assistant")
#: New tokens per request when neither the request nor ``model_config`` says otherwise.
DEFAULT_MAX_TOKENS = 256
#: Rows generated together at most: the KV cache grows with batch size x sequence length.
DEFAULT_MAX_BATCH_SIZE = 8
_PROMPT_FORMATS = ("auto", "chat", "raw")
_GENERATION_FIELDS = ("temperature", "max_tokens", "top_p", "top_k", "stop")
# Rendered through the chat template to find the markers that open a user turn.
_SENTINEL = "\x00phi3ops-sentinel\x00"
_REPLACEMENT_CHAR = "\ufffd"


# --- the model folder is data: what it may hold -------------------------------------------------
#
# phi3ops fetches, packages and loads a model folder as data, never as code. These checks run
# at all three points (the fetch and packaging tasks import them from here, since this file may
# import nothing of phi3ops), so a folder altered after it was fetched, or inside a logged model,
# is still refused before onnxruntime-genai reads it.

#: The onnxruntime-genai configuration, read at load time.
GENAI_CONFIG = "genai_config.json"
#: File types (ends of lower-case names) a Phi-3 model folder holds: the ONNX graph and its
#: external weights, safetensors weights, JSON configs and tokenizer files, the SentencePiece
#: tokenizer (``tokenizer.model``), chat templates (``.jinja``, rendered sandboxed by
#: transformers), and text (``merges.txt``, model cards, notices).
MODEL_FILE_SUFFIXES = (
    ".onnx",
    ".onnx.data",
    ".onnx_data",
    ".safetensors",
    ".json",
    ".model",
    ".jinja",
    ".txt",
    ".md",
)
#: Whole file names allowed besides those types (licence files without an extension).
MODEL_FILE_NAMES = ("LICENSE", "LICENCE", "NOTICE")
#: Execution providers a ``genai_config.json`` may name in ``provider_options``.
ALLOWED_PROVIDERS = ("cpu",)
#: ``session_options`` keys a ``genai_config.json`` may set: logging, threads, memory and
#: graph optimisation, and the options the onnxruntime-genai 0.18 builder writes. Everything
#: else is refused: ``custom_ops_library`` loads a shared library, ``enable_profiling`` and the
#: ``ep.context_*`` options write files, unknown keys may do either in a later release.
ALLOWED_SESSION_OPTIONS = (
    "log_id",
    "log_severity_level",
    "log_verbosity_level",
    "intra_op_num_threads",
    "inter_op_num_threads",
    "enable_cpu_mem_arena",
    "enable_mem_pattern",
    "graph_optimization_level",
    "disable_cpu_ep_fallback",
    "disable_quant_qdq",
    "enable_quant_qdq_cleanup",
    "use_env_allocators",
    "provider_options",
    "optimization.disable_specified_optimizers",
    "session.use_device_allocator_for_initializers",
)
# Keys that load code wherever they appear in a genai_config.json.
_CODE_KEYS = ("custom_ops_library",)
_CODE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd", ".exe", ".py", ".sh", ".bat", ".ps1")


def model_file_problems(files: Mapping[str, str | None]) -> list[str]:
    """Why these files must not be loaded, one line per problem naming the file (and the key).

    Args:
        files: Each file's ``/``-separated path in the folder (or repository), mapped to where
            its bytes are on disk, or to None to check the name only. A ``genai_config.json``
            with bytes on disk is read and its settings checked.

    Returns:
        The problems, empty when every file is model data.
    """
    problems = []
    for path, location in sorted(files.items()):
        name = path.rsplit("/", 1)[-1]
        if name not in MODEL_FILE_NAMES and not name.lower().endswith(MODEL_FILE_SUFFIXES):
            if name.lower().endswith(_CODE_SUFFIXES) or ".so." in name.lower():
                problems.append(f"{path}: code (a shared library, executable or script)")
            else:
                problems.append(f"{path}: not a model file type")
        elif name == GENAI_CONFIG and location is not None:
            problems.extend(_genai_config_problems(path, location))
    return problems


def model_folder_problems(folder: str) -> list[str]:
    """`model_file_problems` of every file under ``folder``; links and special files count too.

    Args:
        folder: The model folder (or snapshot).

    Returns:
        The problems, each naming a path relative to ``folder``.
    """
    problems = []
    files: dict[str, str | None] = {}
    for directory, subdirectories, names in os.walk(folder):
        for name in sorted(subdirectories) + sorted(names):
            location = os.path.join(directory, name)
            path = os.path.relpath(location, folder).replace(os.sep, "/")
            if os.path.islink(location):
                problems.append(f"{path}: a symbolic link (a model folder holds plain files only)")
            elif name in names and not os.path.isfile(location):
                problems.append(f"{path}: not a plain file")
            elif name in names:
                files[path] = location
    return problems + model_file_problems(files)


def _genai_config_problems(path: str, location: str) -> list[str]:
    try:
        with open(location, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        return [f"{path}: not readable JSON ({exc})"]
    return [f"{path}: {problem}" for problem in _settings_problems(config, "")]


def _settings_problems(node: Any, where: str) -> Iterator[str]:
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _settings_problems(item, f"{where}[{index}]")
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        key_path = f"{where}.{key}" if where else str(key)
        if str(key).lower() in _CODE_KEYS:
            yield f"{key_path} loads a shared library (remove the key)"
        elif key == "provider_options":
            yield from _provider_problems(value, key_path)
        elif str(key).endswith("filename") and not _inside_folder(value):
            yield f"{key_path}={value!r} is not a file inside the model folder"
        else:
            if key == "session_options" and isinstance(value, dict):
                for option in value:
                    if option not in ALLOWED_SESSION_OPTIONS and option not in _CODE_KEYS:
                        yield (
                            f"{key_path}.{option} is not an allowed session option (allowed: "
                            f"{', '.join(ALLOWED_SESSION_OPTIONS)})"
                        )
            yield from _settings_problems(value, key_path)


def _provider_problems(value: Any, key_path: str) -> Iterator[str]:
    if not isinstance(value, list):
        yield f"{key_path} must be a list of {{provider: options}} objects"
        return
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            yield f"{key_path}[{index}] must be a {{provider: options}} object"
            continue
        for provider in entry:
            if str(provider).lower() not in ALLOWED_PROVIDERS:
                yield (
                    f"{key_path}[{index}] names execution provider {provider!r}; allowed: "
                    f"{', '.join(ALLOWED_PROVIDERS)}"
                )


def _inside_folder(value: Any) -> bool:
    if not isinstance(value, str) or not value or "\\" in value or "\x00" in value:
        return False
    return not os.path.isabs(value) and ".." not in value.split("/")


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _is_missing(value: Any) -> bool:
    # DataFrame rows carry NaN (or None/NA) in the columns a request did not set.
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


# --- validation of single fields ------------------------------------------------------------


def _as_int(value: Any, name: str, *, minimum: int) -> int:
    # Whole floats pass: pandas turns an int column with a missing value into float64.
    whole = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()
    )
    if isinstance(value, bool) or not whole:
        raise _invalid(f"{name} must be an integer >= {minimum}, got {value!r}")
    number = int(value)
    if number < minimum:
        raise _invalid(f"{name} must be an integer >= {minimum}, got {number}")
    return number


def _as_temperature(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _invalid(f"{name} must be a number >= 0 (0 means greedy), got {value!r}")
    if value < 0:
        raise _invalid(f"{name} must be a number >= 0 (0 means greedy), got {value!r}")
    return float(value)


def _as_top_p(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0  # numbers.Real declares only < and <=: this is `not 0 < value <= 1`
        or not value <= 1
    ):
        raise _invalid(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _as_stop(value: Any, name: str) -> tuple[str, ...]:
    # MLflow hands Array(string) cells over as lists or numpy arrays.
    if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray):
        raise _invalid(f"{name} must be a list of strings, got {value!r}")
    stops = list(value)
    if not all(isinstance(stop, str) and stop for stop in stops):
        raise _invalid(f"{name} must be a list of non-empty strings, got {stops!r}")
    return tuple(stops)


def _validated_setting(name: str, value: Any, label: str) -> Any:
    if name == "temperature":
        return _as_temperature(value, label)
    if name == "max_tokens":
        return _as_int(value, label, minimum=1)
    if name == "top_p":
        return _as_top_p(value, label)
    if name == "top_k":
        return _as_int(value, label, minimum=0)
    return _as_stop(value, label)


def _validated_messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str | Mapping) or not isinstance(value, Sequence | np.ndarray):
        raise _invalid(f"{where}messages must be a list of {{role, content}} objects")
    if len(value) == 0:
        raise _invalid(f"{where}messages is empty: send at least one message")
    messages = []
    for position, message in enumerate(value):
        label = f"{where}messages[{position}]"
        if not isinstance(message, Mapping):
            raise _invalid(f"{label} must be an object with role and content, got {message!r}")
        role, content = message.get("role"), message.get("content")
        if role not in ALLOWED_ROLES:
            raise _invalid(f"{label}.role must be one of {', '.join(ALLOWED_ROLES)}, got {role!r}")
        if _is_missing(content) or not isinstance(content, str):
            raise _invalid(f"{label}.content must be a string, got {content!r}")
        if not content.strip():
            raise _invalid(f"{label}.content is empty: send the text of the message")
        messages.append({"role": role, "content": content})
    return messages


# --- requests and their generation state ------------------------------------------------------


@dataclass(frozen=True)
class _Sampling:
    """How the next token is picked; rows with equal sampling can share one generator."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int

    def search_options(self) -> dict[str, Any]:
        if not self.do_sample:
            return {"do_sample": False}
        # top_k 0 turns the top-k filter off; without it genai_config's default would apply.
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }


@dataclass(frozen=True)
class _Request:
    """One validated row, ready to generate."""

    index: int
    shape: str  # "chat" or "prompt"
    input_ids: np.ndarray
    max_tokens: int
    stop: tuple[str, ...]
    sampling: _Sampling


class _IncrementalDecoder:
    """Turns generated tokens into text as they come, in pieces that join into the answer.

    Why not ``tokenizer.decode`` on everything, or ``og.TokenizerStream``: in og 0.18 a
    decode stops at the first bytes that are not valid UTF-8 and returns one U+FFFD for all
    the rest (one broken byte, or a character cut by ``max_tokens``, would lose the remainder
    of the answer), and the stream drops characters around such bytes. So this decodes a
    small window: the tokens not emitted yet plus the previous piece's tokens as context (a
    SentencePiece decode strips the leading space of its first token; the context absorbs
    that, as in TGI). A window holding U+FFFD waits for the rest of a multi-byte character
    (at most 4 tokens); past that, its longest clean prefix is emitted, or its first token
    becomes one U+FFFD. On valid
    UTF-8 the pieces join into exactly ``tokenizer.decode(all tokens)``.
    """

    _MAX_CHARACTER_TOKENS = 4  # a UTF-8 character has at most 4 bytes, each token at least 1

    def __init__(self, tokenizer: og.Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._prefix = 0  # start of the context window: tokens already emitted
        self._read = 0  # tokens before this index have been emitted

    def push(self, token: int) -> str:
        """Adds one token; returns the text it completes (often all of it, maybe "")."""
        self._tokens.append(token)
        return self._drain(final=False)

    def flush(self) -> str:
        """Returns whatever is still held back: no more tokens will come."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> str:
        pieces = []
        while self._read < len(self._tokens):
            piece = self._piece(len(self._tokens))
            if piece is not None:
                pieces.append(piece)
                self._prefix, self._read = self._read, len(self._tokens)
                break
            if not final and len(self._tokens) - self._read < self._MAX_CHARACTER_TOKENS:
                break  # maybe the middle of a character: wait for the rest
            for end in range(len(self._tokens) - 1, self._read, -1):
                piece = self._piece(end)
                if piece is not None:
                    pieces.append(piece)
                    self._prefix, self._read = self._read, end
                    break
            else:
                pieces.append(_REPLACEMENT_CHAR)  # bytes that never form a character
                self._prefix = self._read = self._read + 1
        return "".join(pieces)

    def _piece(self, end: int) -> str | None:
        """Text of tokens [read, end), or None while it is not valid UTF-8."""
        text = self._decode(self._prefix, end)
        if _REPLACEMENT_CHAR in text:
            return None
        return text[len(self._decode(self._prefix, self._read)) :]

    def _decode(self, start: int, end: int) -> str:
        if start == end:
            return ""
        return self._tokenizer.decode(np.asarray(self._tokens[start:end], dtype=np.int32))


@dataclass
class _RowState:
    """Tokens and text of one request while its generator runs (owned by that call only)."""

    request: _Request
    decoder: _IncrementalDecoder
    eos_token_ids: frozenset[int]
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    streamed: int = 0  # characters of text already handed to a stream
    _longest_stop: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._longest_stop = max((len(stop) for stop in self.request.stop), default=0)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> None:
        self.completion_tokens += 1
        if token in self.eos_token_ids:
            self._finish("stop")
        else:
            self._append(self.decoder.push(token))
            if self.completion_tokens >= self.request.max_tokens:
                self._finish("length")

    def end(self) -> None:
        """The generator stopped on its own (max_length): nothing more will come."""
        self._finish("length")

    def _finish(self, reason: str) -> None:
        if not self.done:
            self._append(self.decoder.flush())
        if not self.done:  # the held-back text may have completed a stop string
            self.finish_reason = reason

    def _append(self, piece: str) -> None:
        if not piece or self.request.stop == ():
            self.text += piece
            return
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        cuts = [self.text.find(stop, start) for stop in self.request.stop]
        cuts = [cut for cut in cuts if cut >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.finish_reason = "stop"

    def take_stream_text(self) -> str:
        """Text not streamed yet, holding back a tail that may still become a stop string."""
        end = len(self.text)
        if not self.done:
            end -= self._stop_prefix_length()
        piece = self.text[self.streamed : end]
        self.streamed = max(self.streamed, end)
        return piece

    def _stop_prefix_length(self) -> int:
        longest = 0
        for stop in self.request.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


# --- the model ----------------------------------------------------------------------------------


class OnnxChatModel(PythonModel):
    """Phi-3 chat on onnxruntime-genai: ``llm/v1/chat`` requests and plain prompts.

    ``load_context`` loads the ONNX model and its tokenizer once. ``predict`` keeps all of its
    state in local variables, one ``og.Generator`` per batch of requests, so concurrent calls
    from threads share only the read-only model and tokenizer.
    """

    def load_context(self, context: PythonModelContext) -> None:
        """Loads the ONNX model, tokenizer and generation defaults.

        Args:
            context: MLflow context; ``artifacts["model_dir"]`` is the ONNX folder and
                ``model_config`` may set ``max_tokens``, ``temperature``, ``top_p``,
                ``top_k``, ``model_name``, ``max_batch_size`` and ``prompt_format``
                (``auto``, ``chat`` or ``raw``).

        Raises:
            MlflowException: The artifact is missing, holds a file or ``genai_config.json``
                setting that is not model data (see `model_folder_problems`), or
                ``model_config`` holds a bad value.
        """
        model_dir = (context.artifacts or {}).get(MODEL_DIR_ARTIFACT)
        config_path = os.path.join(model_dir or "", "genai_config.json")
        if not model_dir or not os.path.isfile(config_path):
            raise MlflowException(
                f"artifact {MODEL_DIR_ARTIFACT!r} must be an onnxruntime-genai model folder "
                f"(with genai_config.json); got {model_dir!r}. Log the model with "
                f"artifacts={{{MODEL_DIR_ARTIFACT!r}: '<ONNX folder>'}}."
            )
        problems = model_folder_problems(model_dir)
        if problems:
            raise MlflowException(
                f"Refusing to load the model in {model_dir}: {'; '.join(problems)}. The folder "
                f"was altered after packaging, or packaged from an untrusted source; package a "
                f"freshly fetched snapshot again."
            )
        with open(config_path, encoding="utf-8") as handle:
            genai_config = json.load(handle)["model"]

        self._model = og.Model(model_dir)
        self._tokenizer = og.Tokenizer(self._model)
        self.context_length = usable_context(genai_config)
        eos = genai_config["eos_token_id"]
        self.eos_token_ids = frozenset(int(t) for t in (eos if isinstance(eos, list) else [eos]))
        self._pad_token_id = int(genai_config.get("pad_token_id", min(self.eos_token_ids)))

        config = dict(context.model_config or {})
        defaults: dict[str, Any] = {"temperature": 0.0, "max_tokens": DEFAULT_MAX_TOKENS}
        for name in _GENERATION_FIELDS:
            if not _is_missing(config.get(name)):
                defaults[name] = _validated_setting(name, config[name], f"model_config[{name!r}]")
        self._defaults = defaults
        self.model_name = str(config.get("model_name") or genai_config.get("type", "phi3"))
        self._max_batch_size = _as_int(
            config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE),
            "model_config['max_batch_size']",
            minimum=1,
        )
        self._prompt_format = config.get("prompt_format", "auto")
        if self._prompt_format not in _PROMPT_FORMATS:
            raise _invalid(
                f"model_config['prompt_format'] must be one of {', '.join(_PROMPT_FORMATS)}, "
                f"got {self._prompt_format!r}"
            )
        # What opens a user turn in this model's own template (e.g. "<|user|>"): a prompt that
        # already holds it was formatted by the caller.
        rendered = self._render([{"role": "user", "content": _SENTINEL}])
        self._user_marker = rendered.split(_SENTINEL, 1)[0].strip()

    # --- public API ---------------------------------------------------------------------------

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[dict[str, Any] | str]:
        """Answers every row: a ``chat.completion`` dict for chat rows, a string for prompts.

        Args:
            context: Unused (everything was loaded in ``load_context``).
            model_input: One request per row: a DataFrame (what pyfunc passes), a dict, or a
                list of dicts. The hint is exactly ``pd.DataFrame`` so that MLflow validates
                against the logged signature instead of inferring one from the hint.
            params: Generation fields for rows that do not set them.

        Returns:
            One answer per row, in row order.

        Raises:
            MlflowException: A request is invalid (``INVALID_PARAMETER_VALUE``); nothing was
                generated.
        """
        requests = self._requests(model_input, params)
        states = self._generate_all(requests)
        return [self._answer(state) for state in states]

    def predict_stream(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> Iterator[dict[str, Any] | str]:
        """Streams one request: ``chat.completion.chunk`` dicts, or string pieces for prompts.

        The request is validated before this returns; the last chat chunk carries
        ``finish_reason`` and ``usage``.

        Args:
            context: Unused.
            model_input: Exactly one request (DataFrame row, dict, or one-element list).
            params: Generation fields the request does not set.

        Returns:
            An iterator of chunks whose contents join into what ``predict`` returns.

        Raises:
            MlflowException: The request is invalid, or more than one was sent.
        """
        requests = self._requests(model_input, params)
        if len(requests) != 1:
            raise _invalid(f"predict_stream takes exactly one request, got {len(requests)}")
        return self._stream(requests[0])

    # --- input -> requests ----------------------------------------------------------------------

    def _requests(self, model_input: Any, params: dict[str, Any] | None) -> list[_Request]:
        rows = _rows(model_input)
        shared = {}
        for name, value in (params or {}).items():
            # MLflow fills params the caller left out with their defaults (None, [] for stop).
            if name in _GENERATION_FIELDS and not _is_missing(value):
                if name == "stop" and len(value) == 0:
                    continue
                shared[name] = _validated_setting(name, value, f"params[{name!r}]")
        where_prefix = len(rows) > 1
        return [
            self._request(index, row, shared, f"request[{index}]." if where_prefix else "")
            for index, row in enumerate(rows)
        ]

    def _request(
        self, index: int, row: dict[str, Any], shared: dict[str, Any], where: str
    ) -> _Request:
        has_messages, has_prompt = "messages" in row, "prompt" in row
        if has_messages == has_prompt:
            problem = "both" if has_messages else "neither"
            raise _invalid(
                f"{where}messages/prompt: got {problem}; send exactly one of messages "
                "(a chat request) or prompt (a text prompt)"
            )
        if "n" in row and _as_int(row["n"], f"{where}n", minimum=1) != 1:
            raise _invalid(f"{where}n={row['n']} is not supported: one choice per request")
        if "stream" in row and not isinstance(row["stream"], bool | np.bool_):
            raise _invalid(f"{where}stream must be true or false, got {row['stream']!r}")

        settings = dict(self._defaults)
        settings.update(shared)
        for name in _GENERATION_FIELDS:
            if name in row:
                settings[name] = _validated_setting(name, row[name], f"{where}{name}")

        if has_messages:
            shape, field_name = "chat", "messages"
            text = self._render(_validated_messages(row["messages"], where))
        else:
            shape, field_name = "prompt", "prompt"
            prompt = row["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise _invalid(f"{where}prompt must be a non-empty string, got {prompt!r}")
            text = self._prompt_text(prompt)

        input_ids = np.asarray(self._tokenizer.encode(text), dtype=np.int32)
        used, context_length = len(input_ids), self.context_length
        if used >= context_length:
            raise _invalid(
                f"{where}{field_name} is too long: the prompt uses {used} tokens and the "
                f"context holds {context_length}, leaving no room to answer"
            )
        max_tokens = settings["max_tokens"]
        if used + max_tokens > context_length:
            if "max_tokens" in row or "max_tokens" in shared:
                raise _invalid(
                    f"{where}max_tokens={max_tokens} does not fit: prompt uses {used} of "
                    f"{context_length} tokens (at most {context_length - used} new tokens)"
                )
            # Only the deployment's default asked for more: answer as much as fits.
            max_tokens = context_length - used

        temperature = settings["temperature"]
        sampling = _Sampling(
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 0.0,
            top_p=settings.get("top_p", 1.0) if temperature > 0 else 1.0,
            top_k=settings.get("top_k", 0) if temperature > 0 else 0,
        )
        return _Request(
            index=index,
            shape=shape,
            input_ids=input_ids,
            max_tokens=max_tokens,
            stop=settings.get("stop", ()),
            sampling=sampling,
        )

    def _render(self, messages: list[dict[str, str]]) -> str:
        # The model's own chat template (tokenizer_config.json), never a hand-written one.
        return self._tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def _prompt_text(self, prompt: str) -> str:
        if self._prompt_format == "raw":
            return prompt
        if self._prompt_format == "auto" and self._user_marker and self._user_marker in prompt:
            return prompt
        return self._render([{"role": "user", "content": prompt}])

    # --- generation -------------------------------------------------------------------------

    def _generate_all(self, requests: list[_Request]) -> list[_RowState]:
        groups: dict[_Sampling, list[_Request]] = {}
        for request in requests:
            groups.setdefault(request.sampling, []).append(request)
        states: list[_RowState | None] = [None] * len(requests)
        for group in groups.values():
            for start in range(0, len(group), self._max_batch_size):
                for batch in self._fitting_batches(group[start : start + self._max_batch_size]):
                    for state in self._run(batch):
                        states[state.request.index] = state
        return [state for state in states if state is not None]

    def _fitting_batches(self, batch: list[_Request]) -> list[list[_Request]]:
        # Padded rows share one max_length: the longest prompt plus the most new tokens.
        width = max(len(request.input_ids) for request in batch)
        if width + max(request.max_tokens for request in batch) <= self.context_length:
            return [batch]
        return [[request] for request in batch]

    def _run(self, batch: list[_Request]) -> list[_RowState]:
        states: list[_RowState] = []
        for states in self._steps(batch):  # noqa: B007 - the last step holds the answers
            pass
        return states

    def _steps(self, batch: list[_Request]) -> Iterator[list[_RowState]]:
        """Generates a batch of requests with equal sampling; yields the rows after each token."""
        width = max(len(request.input_ids) for request in batch)
        # og 0.18 pads on the right with pad_token_id and masks those positions itself
        # (left padding changes the answers); batch_size must equal the number of rows.
        input_ids = np.full((len(batch), width), self._pad_token_id, dtype=np.int32)
        for row, request in enumerate(batch):
            input_ids[row, : len(request.input_ids)] = request.input_ids
        params = og.GeneratorParams(self._model)
        params.set_search_options(
            batch_size=len(batch),
            max_length=width + max(request.max_tokens for request in batch),
            **batch[0].sampling.search_options(),
        )
        generator = og.Generator(self._model, params)
        generator.append_tokens(input_ids)
        states = [
            _RowState(request, _IncrementalDecoder(self._tokenizer), self.eos_token_ids)
            for request in batch
        ]
        while not generator.is_done() and not all(state.done for state in states):
            generator.generate_next_token()
            for state, token in zip(states, generator.get_next_tokens(), strict=True):
                if not state.done:
                    state.add(int(token))
            yield states
        for state in states:
            state.end()
        yield states

    # --- output -----------------------------------------------------------------------------

    def _answer(self, state: _RowState) -> dict[str, Any] | str:
        if state.request.shape == "prompt":
            return state.text
        prompt_tokens = len(state.request.input_ids)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": state.text},
                    "finish_reason": state.finish_reason,
                }
            ],
            "usage": _usage(prompt_tokens, state.completion_tokens),
        }

    def _stream(self, request: _Request) -> Iterator[dict[str, Any] | str]:
        chat = request.shape == "chat"
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
            return {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }

        if chat:
            yield chunk({"role": "assistant", "content": ""})
        state = None
        for (state,) in self._steps([request]):
            piece = state.take_stream_text()
            if piece:
                yield chunk({"content": piece}) if chat else piece
        if chat and state is not None:
            last = chunk({}, state.finish_reason)
            last["usage"] = _usage(len(request.input_ids), state.completion_tokens)
            yield last


def usable_context(genai_config: dict[str, Any]) -> int:
    """Tokens a sequence may hold (prompt plus answer) on onnxruntime-genai 0.18.

    ``context_length`` normally. But when the decoder declares a sliding window whose KV cache
    does not slide (what the 0.18 builder writes for Phi-3-mini-4k, whose config.json has
    ``sliding_window: 2047``), og caps the KV cache near the window: measured with window 2047
    and context 4096, a sequence of 2065 tokens fails inside GroupQueryAttention ("The output
    OrtValue provided for output 'present.0.key' ... has shape {1,4,2063,16}"). The window
    plus the current token is what such a model attends to anyway, so that is the limit here.
    """
    context_length = int(genai_config["context_length"])
    window = genai_config.get("decoder", {}).get("sliding_window") or {}
    if window.get("window_size") and not window.get("slide_key_value_cache"):
        return min(context_length, int(window["window_size"]) + 1)
    return context_length


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """One dict per request, without the fields a row left empty."""
    if isinstance(model_input, pd.DataFrame):
        if len(model_input.columns) == 0:
            # What schema enforcement leaves of input it cannot map to columns (a bare list
            # of strings, as MLflow's gateway "mlflow" provider sends).
            raise _invalid(
                "model input has no request fields: send one object per request with "
                "messages (a chat request) or prompt (a text prompt)"
            )
        records = model_input.to_dict(orient="records")
    elif isinstance(model_input, Mapping):
        records = [dict(model_input)]
    elif isinstance(model_input, list | tuple) and all(
        isinstance(row, Mapping) for row in model_input
    ):
        records = [dict(row) for row in model_input]
    else:
        raise _invalid(
            "model input must be a DataFrame, a dict or a list of dicts (one request each), "
            f"got {type(model_input).__name__}"
        )
    if not records:
        raise _invalid("model input is empty: send at least one request")
    return [
        {str(key): value for key, value in record.items() if not _is_missing(value)}
        for record in records
    ]


mlflow.models.set_model(OnnxChatModel())
