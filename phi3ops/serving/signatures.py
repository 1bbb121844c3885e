"""The MLflow signature, input examples and requirements logged with the ONNX chat model.

One logged model takes both request shapes of the served model (:mod:`phi3_chat.model`), so the
input schema is the ``llm/v1/chat`` columns that model supports (taken from MLflow's own
``CHAT_MODEL_INPUT_SCHEMA``, types unchanged) with ``messages`` made optional, plus an optional
``prompt`` string. The model itself requires exactly one of ``messages`` and ``prompt`` per row
and says so when a row has both or neither. There is no output schema: a chat row answers with a
``chat.completion`` dict, a prompt row with a string.

The generation fields are also declared as params, so ``predict(..., params=...)`` works and
the scoring server's unified LLM format (``{"messages": [...], "temperature": 0.2}`` posted
as is) routes them there; a row's own values win. MLflow fills params a caller leaves out
with their defaults, so those defaults mean "not set" (``None``, and ``[]`` for ``stop``).

What MLflow 3.17.2's schema enforcement does with this signature (measured on a loaded pyfunc):

* a chat row, a prompt row, a list of rows with the same keys, and ``params`` all pass;
* wrong types fail in MLflow before the model runs, as ``MlflowException``
  ``INVALID_PARAMETER_VALUE`` naming the column (``temperature`` given a string,
  ``max_tokens`` a fraction, ``stop`` a string, ``role`` not a string, ``content`` a list);
* in a multi-row call, pandas fills a key some rows leave out with NaN, and MLflow refuses NaN
  in an optional ``long`` column (``max_tokens``, ``n``, ``top_k``: "Can not safely convert
  float64 to int64") or an ``Array`` column (``stop``, ``messages``: "Expected data to be list
  or numpy array, got float"). So the rows of one call must all set a ``long`` key or all leave
  it out, and a row without an ``Array`` key must send it as ``None`` (prompt rows mixed with
  chat rows send ``"messages": None``). ``double`` and ``string`` columns (``temperature``,
  ``top_p``, ``prompt``) may be left out by some rows;
* a bare list of strings (what MLflow's gateway ``mlflow`` provider posts as ``inputs``) maps
  to no column and is refused by the model ("no request fields").

What is logged as the model's code: the `phi3_chat` package (``code_paths``) and its
models-from-code entry file (``python_model``); its digest is the ONNX flavor's wrapper version.

Nothing here imports onnxruntime-genai or touches disk at import time.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.models import ModelSignature
from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA
from mlflow.types.schema import (
    AnyType,
    Array,
    ColSpec,
    DataType,
    Object,
    ParamSchema,
    ParamSpec,
    Schema,
    TensorSpec,
)

import phi3_chat

__all__ = [
    "CHAT_COLUMNS",
    "CHAT_INPUT_EXAMPLE",
    "FEATURE_COLUMNS",
    "MODEL_DIR_ARTIFACT",
    "MODEL_ENTRY_FILE",
    "MODEL_PACKAGE_DIR",
    "ONNX_CHAT_PARAMS",
    "ONNX_CHAT_SIGNATURE",
    "PROMPT_INPUT_EXAMPLE",
    "REQUIREMENT_DISTRIBUTIONS",
    "log_kwargs",
    "model_package_digest",
    "pip_requirements",
]

#: The served model's package, logged with it as ``code_paths`` (``code/phi3_chat/`` inside).
MODEL_PACKAGE_DIR = Path(phi3_chat.__file__).parent
#: Its models-from-code entry file, passed as ``python_model`` (a path: MLflow runs it, we don't).
MODEL_ENTRY_FILE = MODEL_PACKAGE_DIR / "models_from_code.py"
#: Artifact key of the ONNX folder; the same name as in `phi3_chat.model`, kept here so that
#: nothing here imports onnxruntime-genai.
MODEL_DIR_ARTIFACT = "model_dir"
#: The ``llm/v1/chat`` columns the model supports, in MLflow's order.
CHAT_COLUMNS = ("messages", "temperature", "max_tokens", "stop", "n", "stream", "top_p", "top_k")
# Message fields kept from the chat schema (`name` is ignored; tool calls and results feed the
# tools template, `phi3_chat.tools`).
_MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")
#: Request fields beyond the chat columns (structured outputs, tools, seed, logprobs): any JSON,
#: checked by the model's own validator (`phi3_chat.validate.FEATURE_FIELDS`).
FEATURE_COLUMNS = (
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "seed",
    "logprobs",
    "top_logprobs",
)
#: Distributions the served model imports (og needs onnxruntime); pinned at logging time.
REQUIREMENT_DISTRIBUTIONS = ("mlflow", "onnxruntime-genai", "onnxruntime", "numpy", "pandas")


def _chat_column(name: str) -> ColSpec:
    spec = next(column for column in CHAT_MODEL_INPUT_SCHEMA.inputs if column.name == name)
    if not isinstance(spec, ColSpec):
        raise TypeError(f"MLflow's chat input schema has a tensor column {name!r}: {spec!r}")
    column_type = spec.type
    if name == "messages":
        if not isinstance(column_type, Array) or not isinstance(column_type.dtype, Object):
            raise TypeError(f"MLflow's chat 'messages' column is not an array of objects: {spec!r}")
        message = column_type.dtype
        column_type = Array(
            Object([prop for prop in message.properties if prop.name in _MESSAGE_FIELDS])
        )
    return ColSpec(column_type, name, required=False)


def _input_schema() -> Schema:
    columns: list[ColSpec | TensorSpec] = [_chat_column(name) for name in CHAT_COLUMNS]
    columns.insert(1, ColSpec(DataType.string, "prompt", required=False))
    columns.extend(ColSpec(AnyType(), name, required=False) for name in FEATURE_COLUMNS)
    return Schema(columns)


#: Generation fields accepted as ``params`` too, and the call's ``timeout_s``; the defaults
#: mean "not set".
ONNX_CHAT_PARAMS = ParamSchema(
    [
        ParamSpec("temperature", DataType.double, None),
        ParamSpec("max_tokens", DataType.long, None),
        ParamSpec("top_p", DataType.double, None),
        ParamSpec("top_k", DataType.long, None),
        ParamSpec("stop", DataType.string, [], shape=(-1,)),
        # Not a generation field: how long the call may take (the model's batcher cancels it
        # after that); None means the model's own request_timeout_s.
        ParamSpec("timeout_s", DataType.double, None),
    ]
)

#: Input schema for both shapes, params for the generation fields, no output schema.
ONNX_CHAT_SIGNATURE = ModelSignature(inputs=_input_schema(), params=ONNX_CHAT_PARAMS)

#: A chat request (``llm/v1/chat``); logged as the model's input example.
CHAT_INPUT_EXAMPLE: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "temperature": 0.0,
    "max_tokens": 16,
}
#: A plain prompt, as the original Phi-3 MLflow sample took it.
PROMPT_INPUT_EXAMPLE: dict[str, Any] = {
    "prompt": "What is the capital of France?",
    "max_tokens": 16,
}


def model_package_digest(package_dir: Path = MODEL_PACKAGE_DIR) -> str:
    """sha256 over the package's ``.py`` files: a ``sha256sum``-style line (file digest, two
    spaces, ``/``-separated path relative to ``package_dir``) per file, in path order.

    Any change to any module changes it, and the copy inside a logged model (``code/phi3_chat``)
    has the digest of the source it was logged from (MLflow copies the folder, less
    ``__pycache__``).
    """
    files = sorted(
        (path.relative_to(package_dir).as_posix(), path) for path in package_dir.rglob("*.py")
    )
    lines = [f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {name}\n" for name, path in files]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def pip_requirements() -> list[str]:
    """Exact pins of what the served model imports, from the versions installed here.

    Returns:
        ``name==version`` for each of :data:`REQUIREMENT_DISTRIBUTIONS`.
    """
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENT_DISTRIBUTIONS]


def log_kwargs(
    model_dir: str | Path, *, model_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything ``mlflow.pyfunc.log_model`` needs for this model, except ``name``.

    Logging runs the input example through the loaded model once (MLflow validates that the
    example can be served), so it costs one model load.

    Args:
        model_dir: The ONNX folder (holding ``genai_config.json``); copied into the model.
        model_config: Optional defaults for the model (``max_tokens``, ``temperature``,
            ``top_p``, ``top_k``, ``model_name``, ``prompt_format``) and its batcher
            (``max_batch_size``, ``max_queue``, ``batch_wait_ms``, ``request_timeout_s``).

    Returns:
        Keyword arguments: ``python_model``, ``code_paths``, ``artifacts``, ``signature``,
        ``input_example``, ``pip_requirements`` and, when given, ``model_config``.
    """
    kwargs: dict[str, Any] = {
        "python_model": str(MODEL_ENTRY_FILE),
        "code_paths": [str(MODEL_PACKAGE_DIR)],
        "artifacts": {MODEL_DIR_ARTIFACT: str(model_dir)},
        "signature": ONNX_CHAT_SIGNATURE,
        "input_example": CHAT_INPUT_EXAMPLE,
        "pip_requirements": pip_requirements(),
    }
    if model_config:
        kwargs["model_config"] = dict(model_config)
    return kwargs
