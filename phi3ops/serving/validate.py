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

from phi3_chat.validate import FEATURE_FIELDS, validated_params, validated_row

__all__ = [
    "FEATURE_FIELDS",
    "chat_problem",
    "feature_problem",
    "model_features",
    "quiet_reason",
    "transformers_problem",
]

# A feature field sent with one of these values asks nothing of the model (or, for seed, asks
# nothing a greedy answer does not already give): any model takes it.
_HARMLESS: dict[str, tuple[Any, ...]] = {
    "response_format": ({"type": "text"},),
    "tools": ([], None),
    "tool_choice": ("none", "auto", None),
    "parallel_tool_calls": (True, False, None),
    "logprobs": (False, None),
    "top_logprobs": (0, None),
}


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


def model_features(model: Any) -> frozenset[str]:
    """The request fields beyond MLflow's chat columns that ``model`` (a loaded pyfunc)
    honours: its python model's ``chat_features`` (the ONNX flavor's `OnnxChatModel`); none
    for MLflow's transformers flavor or an ONNX model logged before them.
    """
    try:
        inner = model.unwrap_python_model()
    except Exception:  # not a custom python model (the transformers flavor)
        return frozenset()
    features = getattr(inner, "chat_features", None)
    if isinstance(features, set | frozenset | tuple | list):
        return frozenset(str(name) for name in features)
    return frozenset()


def feature_problem(row: Mapping[str, Any], features: frozenset[str]) -> str | None:
    """Why a model honouring only ``features`` must refuse ``row``, or None: a feature field
    (`FEATURE_FIELDS`) it does not honour, sent with a value that asks something of it. A
    ``seed`` asks something only of a sampled answer (``temperature`` above 0).

    Returns:
        A message starting with the field's name (the OpenAI error's ``param``).
    """
    for name in FEATURE_FIELDS:
        if name not in row or name in features:
            continue
        value = row[name]
        if name == "seed":
            temperature = row.get("temperature")
            if temperature is None or (isinstance(temperature, int | float) and temperature <= 0):
                continue
        elif value in _HARMLESS.get(name, ()):
            continue
        return (
            f"{name} is not supported by the model version served here (the transformers flavor, "
            "or an ONNX model packaged before structured outputs, tools, seed and logprobs): "
            "send the request without it, or serve a version packaged with the ONNX flavor now"
        )
    return None


def transformers_problem(row: Mapping[str, Any]) -> str | None:
    """Why MLflow's transformers flavor must refuse ``row`` (a chat row of either route), or
    None: a feature it cannot honour (`feature_problem`), or a role its chat template would
    drop without a word (``developer``: the OpenAI route sends it as ``system``; ``tool``).
    """
    problem = feature_problem(row, frozenset())
    if problem:
        return problem
    messages = row.get("messages")
    for position, message in enumerate(messages if isinstance(messages, list) else []):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role in ("developer", "tool") or (
            isinstance(message, Mapping) and message.get("tool_calls")
        ):
            return (
                f"messages[{position}].role {role!r} is not supported by the transformers "
                "flavor: send system for developer; tool calls and results need the ONNX flavor"
            )
    return None


def quiet_reason(message: str) -> str:
    """``message`` without what it quotes of the request (the validators end with
    ``, got <value>``), fit to be recorded when prompts are not.
    """
    return message.split(", got ", 1)[0]
