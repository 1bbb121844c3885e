"""Validation of requests before any token is generated: single fields, rows and ``params``.

Generation fields may also come through MLflow ``params``; a row's own values win over them,
and they win over the ``model_config`` defaults (``max_tokens``, ``temperature``, ``top_p``,
``top_k``). Every request is validated before any token is generated; a bad one raises
``MlflowException`` with ``INVALID_PARAMETER_VALUE`` (HTTP 400 from the scoring server).

`validated_row` and `validated_params` are also the serving layer's check of either flavor's
requests (`phi3ops.serving.validate`): one validator for both.
"""

import math
import numbers
from collections.abc import Mapping, Sequence, Sized
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from phi3_chat.guidance import response_format_guidance
from phi3_chat.tools import validated_tool_fields

__all__ = [
    "ALLOWED_ROLES",
    "FEATURE_FIELDS",
    "MAX_CHARS",
    "MAX_MESSAGES",
    "MAX_TOP_LOGPROBS",
    "validated_params",
    "validated_row",
]

#: Roles a request may send: the ones the Phi-3 chat template renders, ``developer`` (what
#: current OpenAI clients send for ``system``; taken as ``system``) and ``tool`` (a tool's
#: result, rendered into a user turn by `phi3_chat.tools`).
ALLOWED_ROLES = ("system", "developer", "user", "assistant", "tool")
_ROLE_AS = {"developer": "system"}
_GENERATION_FIELDS = ("temperature", "max_tokens", "top_p", "top_k", "stop")
#: Row fields beyond MLflow's chat columns: structured outputs, tools, seed, logprobs. A model
#: says which it honours (``OnnxChatModel.chat_features``); the serving layer refuses the rest.
FEATURE_FIELDS = (
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "seed",
    "logprobs",
    "top_logprobs",
)
#: Most alternatives per token ``top_logprobs`` may ask for.
MAX_TOP_LOGPROBS = 5
#: Most messages one request may hold, checked before any template is rendered or token made.
#: Each message takes at least four tokens of Phi-3's template (role marker, newline, content,
#: ``<|end|>``), so more than 1,024 cannot fit a 4k context; chats do not run to thousands of
#: turns. Without a cap, 60,000 tiny messages cost seconds of CPU before their 400.
MAX_MESSAGES = 2048
#: Most characters of text (all messages' content, or the prompt) one request may hold, checked
#: before tokenising: the longest Phi-3 context is 131,072 tokens, and text averages about four
#: characters a token, so a prompt of over a million characters cannot fit any Phi-3.
MAX_CHARS = 1_048_576


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _is_missing(value: Any) -> bool:
    # DataFrame rows carry NaN (or None/NA) in the columns a request did not set.
    if _is_absent(value):
        return True
    return isinstance(value, float) and math.isnan(value)


def _is_absent(value: Any) -> bool:
    # A client's own row (a dict, not a DataFrame row): only None (or NA) means "not set"; a NaN
    # there is the client's value, refused by the field's validator, never taken as missing.
    return value is None or value is pd.NA


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


def _validated_messages(value: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(value, str | Mapping) or not isinstance(value, Sequence | np.ndarray):
        raise _invalid(f"{where}messages must be a list of {{role, content}} objects")
    if len(value) == 0:
        raise _invalid(f"{where}messages is empty: send at least one message")
    if len(value) > MAX_MESSAGES:
        raise _invalid(
            f"{where}messages holds {len(value)} messages; a request may hold at most "
            f"{MAX_MESSAGES}: send the recent part of the conversation"
        )
    messages, chars = [], 0
    for position, message in enumerate(value):
        label = f"{where}messages[{position}]"
        if not isinstance(message, Mapping):
            raise _invalid(f"{label} must be an object with role and content, got {message!r}")
        role, content = message.get("role"), message.get("content")
        if role not in ALLOWED_ROLES:
            raise _invalid(f"{label}.role must be one of {', '.join(ALLOWED_ROLES)}, got {role!r}")
        calls = message.get("tool_calls")
        if _is_missing(calls) or (isinstance(calls, Sized) and len(calls) == 0):
            calls = None
        if role == "assistant" and calls is not None and _is_missing(content):
            content = ""  # an assistant turn that only called tools
        if _is_missing(content) or not isinstance(content, str):
            raise _invalid(f"{label}.content must be a string, got {content!r}")
        if not content.strip() and calls is None:
            raise _invalid(f"{label}.content is empty: send the text of the message")
        chars += len(content)
        if chars > MAX_CHARS:
            raise _invalid(_too_long(f"{where}messages"))
        kept: dict[str, Any] = {"role": _ROLE_AS.get(role, role), "content": content}
        if calls is not None:
            if role != "assistant":
                raise _invalid(f"{label}.tool_calls: only assistant messages carry tool calls")
            kept["tool_calls"] = calls
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _invalid(f"{label}.tool_call_id must name the call this result answers")
            kept["tool_call_id"] = call_id
        messages.append(kept)
    return messages


def _too_long(field: str) -> str:
    return (
        f"{field} holds more than {MAX_CHARS} characters of text, more than any Phi-3 context "
        "fits: shorten it"
    )


def validated_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The generation settings in MLflow ``params`` (they apply to every row), checked.

    Also the serving layer's check of either flavor's requests: one validator for both.

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE`` naming the parameter.
    """
    shared = {}
    for name, value in (params or {}).items():
        # MLflow fills params the caller left out with their defaults (None, [] for stop);
        # a NaN is the caller's own value, refused by the field's validator.
        if name in _GENERATION_FIELDS and not _is_absent(value):
            if name == "stop" and isinstance(value, Sized) and len(value) == 0:
                continue
            shared[name] = _validated_setting(name, value, f"params[{name!r}]")
    return shared


def validated_row(
    row: Mapping[str, Any], where: str = ""
) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """One request row's own generation settings and its messages (None for a prompt row),
    checked in this order: messages or prompt, ``n``, ``stream``, the settings, the features
    (`FEATURE_FIELDS`), the messages.

    The settings also hold what the features ask for: ``guidance`` (the grammar of
    ``response_format``, `phi3_chat.guidance`), ``seed``, ``logprobs`` (how many
    ``top_logprobs``, when ``logprobs`` is true) and ``tools`` (`phi3_chat.tools.ToolSet`).

    Also the serving layer's check of either flavor's requests: one validator for both.

    Args:
        row: The row, as the client sent it or as `_rows` left it; fields set to None count as
            absent, a NaN (or infinity) is refused naming the field.
        where: Prefix naming the row in messages (``request[2].``), empty for one row.

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE`` naming the field.
    """
    row = {str(key): value for key, value in row.items() if not _is_absent(value)}
    if "prompt" in row and isinstance(row["prompt"], str) and len(row["prompt"]) > MAX_CHARS:
        raise _invalid(_too_long(f"{where}prompt"))
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
    settings.update(_validated_features(row, where))
    messages = _validated_messages(row["messages"], where) if has_messages else None
    if messages is not None:
        tools = settings.get("tools")
        if tools is not None:
            tools.check_history(messages, where)
        elif any(message["role"] == "tool" or "tool_calls" in message for message in messages):
            raise _invalid(
                f"{where}messages hold tool calls or tool results, but the request has no tools: "
                "send the tools the conversation used"
            )
    elif any(name in settings for name in ("guidance", "tools")):
        raise _invalid(f"{where}prompt: response_format and tools need a chat request (messages)")
    return settings, messages


def _validated_features(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """What the row's `FEATURE_FIELDS` ask for (see `validated_row`)."""
    out: dict[str, Any] = {}
    if "seed" in row:
        seed = row["seed"]
        # Whole floats pass: pandas turns an int column with a missing value into float64.
        whole = not isinstance(seed, bool | np.bool_) and (
            isinstance(seed, numbers.Integral)
            or (isinstance(seed, numbers.Real) and math.isfinite(seed) and float(seed).is_integer())
        )
        if not whole or not -(2**63) <= int(seed) < 2**63:
            raise _invalid(f"{where}seed must be a 64-bit integer, got {seed!r}")
        out["seed"] = int(seed)
    wants = row.get("logprobs", False)
    if not isinstance(wants, bool | np.bool_):
        raise _invalid(f"{where}logprobs must be true or false, got {wants!r}")
    if "top_logprobs" in row:
        top = _as_int(row["top_logprobs"], f"{where}top_logprobs", minimum=0)
        if top > MAX_TOP_LOGPROBS:
            raise _invalid(
                f"{where}top_logprobs must be at most {MAX_TOP_LOGPROBS}, "
                f"got {row['top_logprobs']!r}"
            )
        if not wants:
            raise _invalid(f"{where}top_logprobs needs logprobs: true")
    if wants:
        out["logprobs"] = int(row.get("top_logprobs", 0))
    if "response_format" in row:
        guidance = response_format_guidance(row["response_format"], where)
        if guidance is not None:
            out["guidance"] = guidance
    tools = validated_tool_fields(row, where)
    if tools is not None:
        if "guidance" in out and tools.calls_possible:
            raise _invalid(
                f"{where}response_format: a JSON answer and tool calls exclude each other; send "
                'tool_choice: "none" or no response_format'
            )
        out["tools"] = tools
    return out


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """One dict per request, without the fields a row left empty: in a DataFrame, None or NaN
    (pandas fills the columns a request did not set with NaN); in a dict, only None (a NaN
    there is the caller's own value, which the field's validator refuses).
    """
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
    empty = _is_missing if isinstance(model_input, pd.DataFrame) else _is_absent
    return [
        {str(key): value for key, value in record.items() if not empty(value)} for record in records
    ]
