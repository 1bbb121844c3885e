"""One validator for the chat requests of both flavors, before any model runs.

The ONNX pyfunc (`phi3ops.serving.onnx_chat_model`) validates each request row itself, with
messages that name the field and what it must be. MLflow's transformers flavor does not: it
answers some malformed chat requests with a 500 (an empty ``messages`` list) or generates
from requests the ONNX flavor refuses. So the serving layer applies the ONNX pyfunc's own
field validators, imported from it (that file must stay importable on its own: it is the
models-from-code file), to every chat row of either flavor before routing it, in the order
the pyfunc does: a request the ONNX flavor refuses is refused the same way, with the same
400 and message, whichever flavor is served.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException

from phi3ops.serving.onnx_chat_model import (
    _GENERATION_FIELDS,
    _as_int,
    _invalid,
    _is_missing,
    _validated_messages,
    _validated_setting,
)


def chat_problem(payload: Any, rows: list[Any]) -> str | None:
    """Why the ONNX pyfunc would refuse the chat rows of a request, or None.

    Only chat rows (those with ``messages``) are checked; other rows are left to the model and
    MLflow's schema check. Generation fields in MLflow ``params`` are checked as the pyfunc
    checks them.

    Args:
        payload: The parsed request body (for its ``params``).
        rows: Its request rows (`phi3ops.serving.records.request_rows`).

    Returns:
        The pyfunc's own message for the first problem, or None.
    """
    try:
        _check_params(payload.get("params") if isinstance(payload, Mapping) else None)
        where_prefix = len(rows) > 1
        for index, row in enumerate(rows):
            if isinstance(row, Mapping) and "messages" in row:
                _check_row(row, f"request[{index}]." if where_prefix else "")
    except MlflowException as exc:
        return exc.message
    return None


def _check_params(params: Any) -> None:
    if not isinstance(params, Mapping):
        return
    for name, value in params.items():
        # As the pyfunc: MLflow fills params left out with None, or [] for stop.
        if name in _GENERATION_FIELDS and not _is_missing(value):
            if name == "stop" and isinstance(value, list) and len(value) == 0:
                continue
            _validated_setting(name, value, f"params[{name!r}]")


def _check_row(raw: Mapping[str, Any], where: str) -> None:
    """Raises the pyfunc's ``MlflowException`` for ``raw``, checking in the pyfunc's order."""
    row = {str(key): value for key, value in raw.items() if not _is_missing(value)}
    if ("messages" in row) == ("prompt" in row):
        problem = "both" if "messages" in row else "neither"
        raise _invalid(
            f"{where}messages/prompt: got {problem}; send exactly one of messages "
            "(a chat request) or prompt (a text prompt)"
        )
    if "n" in row and _as_int(row["n"], f"{where}n", minimum=1) != 1:
        raise _invalid(f"{where}n={row['n']} is not supported: one choice per request")
    if "stream" in row and not isinstance(row["stream"], bool | np.bool_):
        raise _invalid(f"{where}stream must be true or false, got {row['stream']!r}")
    for name in _GENERATION_FIELDS:
        if name in row:
            _validated_setting(name, row[name], f"{where}{name}")
    _validated_messages(row["messages"], where)


def quiet_reason(message: str) -> str:
    """``message`` without what it quotes of the request (the validators end with
    ``, got <value>``), fit to be recorded when prompts are not.
    """
    return message.split(", got ", 1)[0]
