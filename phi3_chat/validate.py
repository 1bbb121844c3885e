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

__all__ = ["ALLOWED_ROLES", "validated_params", "validated_row"]

#: Roles the Phi-3 chat template renders; any other role would be dropped silently by it.
ALLOWED_ROLES = ("system", "user", "assistant")
_GENERATION_FIELDS = ("temperature", "max_tokens", "top_p", "top_k", "stop")


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
