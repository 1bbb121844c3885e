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

Concurrent calls share batches. ``predict`` and ``predict_stream`` calls from many threads
(MLflow's scoring server, phi3ops' server and evaluation all call from thread pools) queue their
validated rows with the model's batcher; one engine thread runs waiting rows with equal sampling
(greedy rows always match) as one onnxruntime-genai batch, waiting ``batch_wait_ms`` for
company, and hands every call its own answers or stream pieces; a greedy answer is token for
token the one the request gets alone. Overload is refused, not queued without end: with
``max_queue`` calls waiting, another gets ``RESOURCE_EXHAUSTED`` (HTTP 429) at once; a call
past its timeout (``params['timeout_s']``, else ``model_config['request_timeout_s']``) is
cancelled with ``DEADLINE_EXCEEDED`` (HTTP 504); a stream its consumer closes is cancelled too.
A cancelled row takes no more tokens.

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
import queue
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
import onnxruntime_genai as og
import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    DEADLINE_EXCEEDED,
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    RESOURCE_EXHAUSTED,
)
from mlflow.pyfunc import PythonModel, PythonModelContext  # mypy sees mlflow.pyfunc as a LazyLoader

__all__ = [
    "ALLOWED_PROVIDERS",
    "ALLOWED_ROLES",
    "ALLOWED_SESSION_OPTIONS",
    "DEFAULT_BATCH_WAIT_MS",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_QUEUE",
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
#: Requests (predict or predict_stream calls) that may wait for the engine; one more is refused.
DEFAULT_MAX_QUEUE = 64
#: How long the engine waits, after a request arrives, for others to join its batch.
DEFAULT_BATCH_WAIT_MS = 5.0
# The engine thread ends after this long with nothing to do (a new request starts another), so
# a model that is no longer used holds no thread.
_ENGINE_IDLE_S = 5.0
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


def _as_timeout(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _invalid(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _as_milliseconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _invalid(f"{name} must be a number of milliseconds >= 0, got {value!r}")
    if value < 0:
        raise _invalid(f"{name} must be a number of milliseconds >= 0, got {value!r}")
    return float(value)


def _generation_failed(error: BaseException) -> MlflowException:
    return MlflowException(
        f"generation failed inside onnxruntime-genai: {error}", error_code=INTERNAL_ERROR
    )


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

    def cancel(self) -> None:
        """Nobody waits for this row any more: it takes no more tokens and hands out nothing."""
        if not self.done:
            self.finish_reason = "cancelled"

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


# --- the batcher: concurrent calls share one onnxruntime-genai batch ----------------------------


def _deadline_exceeded(timeout_s: float) -> MlflowException:
    return MlflowException(
        f"the request was cancelled: it did not finish within its timeout of {timeout_s:g} s "
        "(the model is busy or the answer is long); retry later, ask for fewer max_tokens, or "
        "send a longer params['timeout_s']",
        error_code=DEADLINE_EXCEEDED,
    )


class _Ticket:
    """One predict or predict_stream call, from the caller's side, while the engine serves it.

    The engine puts ``("text", piece)`` (streams only), ``("row", position, state)`` once a row
    is finished, or ``("error", exception)`` on `events`; the caller takes them with `next`.
    """

    def __init__(self, requests: list[_Request], *, timeout_s: float, stream: bool) -> None:
        self.requests = requests
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.stream = stream
        self.unstarted = len(requests)  # rows still waiting in the queue
        self.cancelled = False
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    @property
    def started(self) -> bool:
        return self.unstarted < len(self.requests)

    def expired(self, now: float) -> bool:
        """Past its deadline: a stream's deadline covers only its wait for the engine."""
        return now > self.deadline and not (self.stream and self.started)

    def next(self) -> tuple[Any, ...]:
        """The next event; raises `_deadline_exceeded` once the deadline has passed."""
        while True:
            if self.stream and self.started:
                return self.events.get()
            try:
                return self.events.get(timeout=max(0.0, self.deadline - time.monotonic()))
            except queue.Empty:
                if not (self.stream and self.started):
                    raise _deadline_exceeded(self.timeout_s) from None


@dataclass(eq=False)
class _Job:
    """One row of a ticket in the engine's queue."""

    ticket: _Ticket
    position: int
    arrived: float

    @property
    def request(self) -> _Request:
        return self.ticket.requests[self.position]


class _Batcher:
    """The one owner of the state concurrent calls share: a bounded queue and an engine thread.

    Callers `submit` their validated rows and wait on the `_Ticket` they get. The engine thread
    takes the oldest waiting row and every waiting row with the same sampling (greedy rows
    always match), up to ``max_batch_size``, waiting up to ``wait_s`` (after the oldest arrived
    or the engine got free) for more to come, and runs them as one onnxruntime-genai batch to
    its end (static batching: rows that arrive meanwhile wait for the next batch). A row whose
    caller is gone (a closed stream, a passed deadline) is cancelled: it stops taking tokens
    and the batch ends as soon as no live row is left. The thread starts with the first
    request and ends after ``_ENGINE_IDLE_S`` with nothing to do.
    """

    def __init__(
        self,
        steps: Callable[[list[_Request]], Iterator[list[_RowState]]],
        fits: Callable[[list[_Request]], bool],
        *,
        max_batch_size: int,
        max_queue: int,
        wait_s: float,
    ) -> None:
        self._steps = steps
        self._fits = fits
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Job] = deque()
        self._queued = 0  # tickets with rows still waiting
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        """Requests waiting for the engine (not counting those it is generating)."""
        with self._lock:
            return self._queued

    def submit(self, requests: list[_Request], *, timeout_s: float, stream: bool) -> _Ticket:
        """Queues one call's rows; refuses at once when ``max_queue`` requests already wait.

        Raises:
            MlflowException: ``RESOURCE_EXHAUSTED`` (HTTP 429) when the queue is full.
        """
        ticket = _Ticket(requests, timeout_s=timeout_s, stream=stream)
        with self._lock:
            if self._queued >= self.max_queue:
                raise MlflowException(
                    f"the model's request queue is full ({self.max_queue} requests waiting "
                    "while it generates): retry later",
                    error_code=RESOURCE_EXHAUSTED,
                )
            now = time.monotonic()
            self._waiting.extend(_Job(ticket, position, now) for position in range(len(requests)))
            self._queued += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="onnx-chat-batcher", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        return ticket

    def cancel(self, ticket: _Ticket) -> None:
        """Gives up ``ticket``: its waiting rows leave the queue, its running rows stop."""
        with self._lock:
            ticket.cancelled = True
            if ticket.unstarted:
                self._waiting = deque(job for job in self._waiting if job.ticket is not ticket)
                ticket.unstarted = 0
                self._queued -= 1

    def _serve(self) -> None:
        try:
            while True:
                with self._lock:
                    jobs = self._next_jobs()
                    if jobs is None:  # under the lock: a request queued later starts a thread
                        self._thread = None
                        return
                self._run(jobs)
        except BaseException:  # unforeseen: let the next request start a new engine thread
            with self._lock:
                self._thread = None
            raise

    def _next_jobs(self) -> list[_Job] | None:
        """The next batch (holding the lock), or None after ``_ENGINE_IDLE_S`` with no work.

        The wait for company starts when the oldest row arrived or when the engine got free,
        whichever is later: the callers of the batch just finished come back with their next
        requests within a few milliseconds, and joining them keeps batches full (rows that
        waited through a whole batch would otherwise start alone, split from the rest).
        """
        free_since = time.monotonic()
        idle_until = free_since + _ENGINE_IDLE_S
        while True:
            now = time.monotonic()
            if not self._waiting:
                if now >= idle_until:
                    return None
                self._wake.wait(idle_until - now)
                continue
            first = self._waiting[0]
            jobs = [job for job in self._waiting if job.request.sampling == first.request.sampling]
            window = max(first.arrived, free_since) + self.wait_s - now
            if len(jobs) >= self.max_batch_size or window <= 0:
                break
            self._wake.wait(window)
        jobs = jobs[: self.max_batch_size]
        taken = set(map(id, jobs))
        self._waiting = deque(job for job in self._waiting if id(job) not in taken)
        for job in jobs:
            job.ticket.unstarted -= 1
            if job.ticket.unstarted == 0:
                self._queued -= 1
        return jobs

    def _run(self, jobs: list[_Job]) -> None:
        fits = self._fits([job.request for job in jobs])
        for group in [jobs] if fits else [[job] for job in jobs]:
            delivered: set[int] = set()
            try:
                for states in self._steps([job.request for job in group]):
                    now = time.monotonic()
                    for index, (job, state) in enumerate(zip(group, states, strict=True)):
                        if index in delivered:
                            continue
                        if job.ticket.cancelled or job.ticket.expired(now):
                            state.cancel()  # the batch ends early once every row is done
                            delivered.add(index)
                            continue
                        if job.ticket.stream:
                            piece = state.take_stream_text()
                            if piece:
                                job.ticket.events.put(("text", piece))
                        if state.done:
                            job.ticket.events.put(("row", job.position, state))
                            delivered.add(index)
            except Exception as exc:  # handed to every caller waiting on this batch
                for index, job in enumerate(group):
                    if index not in delivered:
                        job.ticket.events.put(("error", exc))


# --- the model ----------------------------------------------------------------------------------


class OnnxChatModel(PythonModel):
    """Phi-3 chat on onnxruntime-genai: ``llm/v1/chat`` requests and plain prompts.

    ``load_context`` loads the ONNX model and its tokenizer once and creates the `_Batcher`,
    the one owner of what concurrent calls share: ``predict`` and ``predict_stream`` calls from
    any number of threads (MLflow's scoring server, phi3ops' server, evaluation) validate their
    rows in their own thread, then queue them; one engine thread runs waiting rows with equal
    sampling as one onnxruntime-genai batch and hands each call its own rows or stream pieces.
    A greedy answer is token for token the one the request gets alone.
    """

    def load_context(self, context: PythonModelContext) -> None:
        """Loads the ONNX model, tokenizer and generation defaults.

        Args:
            context: MLflow context; ``artifacts["model_dir"]`` is the ONNX folder and
                ``model_config`` may set ``max_tokens``, ``temperature``, ``top_p``,
                ``top_k``, ``model_name``, ``prompt_format`` (``auto``, ``chat`` or ``raw``)
                and the batcher's ``max_batch_size`` (rows per batch, default 8),
                ``max_queue`` (requests that may wait, default 64; one more gets
                ``RESOURCE_EXHAUSTED``), ``batch_wait_ms`` (how long a request waits for others
                to join its batch, default 5) and ``request_timeout_s`` (default
                ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, 60).

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
        self._request_timeout_s = _as_timeout(
            config.get("request_timeout_s", MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()),
            "model_config['request_timeout_s']",
        )
        self._batcher = _Batcher(
            self._steps,
            self._fits,
            max_batch_size=_as_int(
                config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE),
                "model_config['max_batch_size']",
                minimum=1,
            ),
            max_queue=_as_int(
                config.get("max_queue", DEFAULT_MAX_QUEUE), "model_config['max_queue']", minimum=1
            ),
            wait_s=_as_milliseconds(
                config.get("batch_wait_ms", DEFAULT_BATCH_WAIT_MS), "model_config['batch_wait_ms']"
            )
            / 1000,
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
            params: Generation fields for rows that do not set them, and ``timeout_s``: how
                long this call may take (default ``model_config['request_timeout_s']``).

        Returns:
            One answer per row, in row order.

        Raises:
            MlflowException: A request is invalid (``INVALID_PARAMETER_VALUE``, HTTP 400);
                nothing was generated. Too many requests already wait (``RESOURCE_EXHAUSTED``,
                HTTP 429): retry later. The call ran past its timeout (``DEADLINE_EXCEEDED``,
                HTTP 504): its rows were cancelled.
        """
        requests = self._requests(model_input, params)
        ticket = self._batcher.submit(requests, timeout_s=self._timeout(params), stream=False)
        states: list[_RowState | None] = [None] * len(requests)
        left = len(requests)
        try:
            while left:
                event = ticket.next()
                if event[0] == "error":
                    raise _generation_failed(event[1]) from event[1]
                states[event[1]] = event[2]
                left -= 1
        finally:
            if left:
                self._batcher.cancel(ticket)
        return [self._answer(state) for state in states if state is not None]

    def predict_stream(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> Iterator[dict[str, Any] | str]:
        """Streams one request: ``chat.completion.chunk`` dicts, or string pieces for prompts.

        The request is validated and queued before this returns; the last chat chunk carries
        ``finish_reason`` and ``usage``. Closing the iterator early (or dropping it) cancels
        the request: its row stops generating and leaves its batch.

        Args:
            context: Unused.
            model_input: Exactly one request (DataFrame row, dict, or one-element list).
            params: Generation fields the request does not set, and ``timeout_s``: how long
                the request may wait for the engine before its first token (default
                ``model_config['request_timeout_s']``); once it streams, it runs to its end.

        Returns:
            An iterator of chunks whose contents join into what ``predict`` returns.

        Raises:
            MlflowException: The request is invalid, or more than one was sent (both
                ``INVALID_PARAMETER_VALUE``); too many requests already wait
                (``RESOURCE_EXHAUSTED``). Iterating raises ``DEADLINE_EXCEEDED`` when the
                request waited past its timeout.
        """
        requests = self._requests(model_input, params)
        if len(requests) != 1:
            raise _invalid(f"predict_stream takes exactly one request, got {len(requests)}")
        ticket = self._batcher.submit(requests, timeout_s=self._timeout(params), stream=True)
        stream = self._stream(requests[0], ticket)
        # A stream dropped unstarted never runs its finally: cancel it when it is collected.
        weakref.finalize(stream, self._batcher.cancel, ticket)
        return stream

    def _timeout(self, params: dict[str, Any] | None) -> float:
        value = (params or {}).get("timeout_s")
        if _is_missing(value):
            return self._request_timeout_s
        return _as_timeout(value, "params['timeout_s']")

    # --- input -> requests ----------------------------------------------------------------------

    def _requests(self, model_input: Any, params: dict[str, Any] | None) -> list[_Request]:
        rows = _rows(model_input)
        shared = validated_params(params)
        where_prefix = len(rows) > 1
        return [
            self._request(index, row, shared, f"request[{index}]." if where_prefix else "")
            for index, row in enumerate(rows)
        ]

    def _request(
        self, index: int, row: dict[str, Any], shared: dict[str, Any], where: str
    ) -> _Request:
        own, messages = validated_row(row, where)
        settings = {**self._defaults, **shared, **own}
        if messages is not None:
            shape, field_name = "chat", "messages"
            text = self._render(messages)
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

    def _fits(self, batch: list[_Request]) -> bool:
        """Whether these rows fit one batch (else they run one by one)."""
        # Padded rows share one max_length: the longest prompt plus the most new tokens.
        width = max(len(request.input_ids) for request in batch)
        return width + max(request.max_tokens for request in batch) <= self.context_length

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

    def _stream(self, request: _Request, ticket: _Ticket) -> Iterator[dict[str, Any] | str]:
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

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                event = ticket.next()
                if event[0] == "error":
                    raise _generation_failed(event[1]) from event[1]
                if event[0] == "row":
                    state = event[2]
                    break
                yield chunk({"content": event[1]}) if chat else event[1]
            if chat:
                last = chunk({}, state.finish_reason)
                last["usage"] = _usage(len(request.input_ids), state.completion_tokens)
                yield last
        finally:  # a consumer that stops early (GeneratorExit) frees the row's batch slot
            self._batcher.cancel(ticket)


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


def validated_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The generation settings in MLflow ``params`` (they apply to every row), checked.

    Also the serving layer's check of either flavor's requests: one validator for both.

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE`` naming the parameter.
    """
    shared = {}
    for name, value in (params or {}).items():
        # MLflow fills params the caller left out with their defaults (None, [] for stop).
        if name in _GENERATION_FIELDS and not _is_missing(value):
            if name == "stop" and isinstance(value, Sized) and len(value) == 0:
                continue
            shared[name] = _validated_setting(name, value, f"params[{name!r}]")
    return shared


def validated_row(
    row: Mapping[str, Any], where: str = ""
) -> tuple[dict[str, Any], list[dict[str, str]] | None]:
    """One request row's own generation settings and its messages (None for a prompt row),
    checked in this order: messages or prompt, ``n``, ``stream``, the settings, the messages.

    Also the serving layer's check of either flavor's requests: one validator for both.

    Args:
        row: The row; fields it left empty (None, NaN) count as absent.
        where: Prefix naming the row in messages (``request[2].``), empty for one row.

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE`` naming the field.
    """
    row = {str(key): value for key, value in row.items() if not _is_missing(value)}
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
    settings = {
        name: _validated_setting(name, row[name], f"{where}{name}")
        for name in _GENERATION_FIELDS
        if name in row
    }
    messages = _validated_messages(row["messages"], where) if has_messages else None
    return settings, messages


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
