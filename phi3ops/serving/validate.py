"""One validator for the chat requests of both flavors, before any model runs.

The ONNX pyfunc (the `phi3_chat` package) validates each request row itself, with
messages that name the field and what it must be. MLflow's transformers flavor does not: it
answers some malformed chat requests with a 500 (an empty ``messages`` list) or generates
from requests the ONNX flavor refuses. So the serving layer runs the ONNX pyfunc's own row
and params validators (`validated_row`, `validated_params`, imported from
`phi3_chat.validate`, which imports no model) on every chat row of either flavor before routing
it: a request the ONNX flavor refuses is refused the same way, with the same 400 and message,
whichever flavor is served.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow.exceptions import MlflowException

from phi3_chat.validate import validated_params, validated_row


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
        params = payload.get("params") if isinstance(payload, Mapping) else None
        validated_params(params if isinstance(params, Mapping) else None)
        where_prefix = len(rows) > 1
        for index, row in enumerate(rows):
            if isinstance(row, Mapping) and "messages" in row:
                validated_row(row, f"request[{index}]." if where_prefix else "")
    except MlflowException as exc:
        return exc.message
    return None


def quiet_reason(message: str) -> str:
    """``message`` without what it quotes of the request (the validators end with
    ``, got <value>``), fit to be recorded when prompts are not.
    """
    return message.split(", got ", 1)[0]
