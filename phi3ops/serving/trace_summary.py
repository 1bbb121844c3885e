"""What a served request asked for and what came of it, without a word of its text: the trace's
inputs and outputs, and the one-line previews MLflow's trace list shows, when prompts are not
recorded (``PHI3OPS_RECORD_PROMPTS`` off, the default).

MLflow 3.17 fills a trace's ``request_preview`` / ``response_preview`` (the Request and Response
columns of the trace list) from its root span's inputs and outputs unless the trace info
carries its own: a chat request shows its last user message there, anything else its JSON. A
record without text would show ``{"recorded": false}`` and ``null`` for every request, so the
records carry a summary instead (`request_summary`, `response_summary`) and previews of their
own (`request_preview`, `response_preview`): roles, message count, characters and generation
parameters; outcome, finish reason, token usage, arm and version.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

#: Roles listed in order in a request summary; a longer conversation lists its first ones.
MAX_ROLES = 32
#: The generation parameters a summary shows (the stop sequences as their count).
GENERATION_PARAMETERS = ("max_tokens", "temperature", "top_p", "stop", "stream")
#: Roles a summary names as they are; any other is "other" (it is text the client wrote).
KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
#: Where MLflow's scoring payloads hold their rows.
_ROW_LISTS = ("inputs", "dataframe_records", "instances")


def request_summary(row: Any, *, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request row as counts and parameters, never its text.

    Args:
        row: One request row: a chat request (``messages``), a prompt-shaped one, or whatever
            the client sent (a malformed body).
        params: The payload's ``params`` (MLflow's ``/invocations``), under the row's own.

    Returns:
        ``recorded`` (False), ``message_count``, ``roles`` (in order), ``chars`` (of all the
        text; ``prompt_chars`` for a prompt-shaped row), and ``max_tokens``, ``temperature``,
        ``top_p``, ``stop`` (how many sequences), ``stream`` (None where the request left one
        to the default) and, when set, ``response_format`` (its type only). A whole payload
        recorded as one (refused for its size) gives ``rows``; a row that is no request at
        all, ``request`` (``not read``, or what it is).
    """
    summary: dict[str, Any] = {"recorded": False}
    if not isinstance(row, dict):
        # None: no body was read (a client that left while sending it); else not JSON rows.
        summary["request"] = "not read" if row is None else f"not a request row ({_kind(row)})"
        return summary
    rows = next((row[k] for k in _ROW_LISTS if isinstance(row.get(k), list)), None)
    if "messages" not in row and "prompt" not in row and rows is not None:
        summary["rows"] = len(rows)  # a whole payload, recorded once (e.g. refused: too many)
        return summary
    messages = row.get("messages")
    if isinstance(messages, list):
        roles = [_role(m.get("role")) if isinstance(m, dict) else "?" for m in messages]
        summary |= {
            "message_count": len(messages),
            "roles": roles[:MAX_ROLES],
            "chars": sum(_chars(m.get("content")) for m in messages if isinstance(m, dict)),
        }
    elif isinstance(row.get("prompt"), str):
        summary |= {"message_count": 0, "prompt_chars": len(row["prompt"])}
    given = {**(params if isinstance(params, dict) else {}), **row}
    for name in GENERATION_PARAMETERS:
        value = given.get(name)
        summary[name] = _stop_count(value) if name == "stop" else _scalar(value)
    response_format = given.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type"):
        summary["response_format"] = str(response_format["type"])
    return summary


def _role(value: Any) -> str:
    """A message's role as the summary names it: a role a chat request may have, else "other"
    (a refused request's role is the client's text, which a summary never holds).
    """
    return value if value in KNOWN_ROLES else "other"


def request_preview(summary: Any) -> str | None:
    """`request_summary` in one line for the trace list, e.g. ``3 messages (1 system, 2 user),
    412 chars; max_tokens=64 temperature=0.7 stop=1 stream=true``; None for anything else (a
    recorded request keeps MLflow's preview: its last user message).
    """
    if not isinstance(summary, dict) or summary.get("recorded") is not False or len(summary) < 2:
        return None  # recorded text, or an entry spooled before summaries existed
    if "request" in summary:
        return f"request {summary['request']}"
    if "rows" in summary:
        return f"a request of {summary['rows']} rows"
    if "prompt_chars" in summary:
        head = f"prompt, {summary['prompt_chars']} chars"
    elif "message_count" in summary:
        count = summary["message_count"]
        roles = Counter(summary.get("roles") or [])
        by_role = ", ".join(f"{n} {role}" for role, n in roles.items())
        head = f"{count} message{'' if count == 1 else 's'}"
        head += f" ({by_role})" if by_role else ""
        head += f", {summary.get('chars', 0)} chars"
    else:
        head = "no messages"
    shown = [
        f"{name}={_text(summary[name])}"
        for name in (*GENERATION_PARAMETERS, "response_format")
        if summary.get(name) is not None and not (name == "stop" and summary[name] == 0)
    ]
    return f"{head}; {' '.join(shown)}" if shown else head


def response_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What came of a request row (a stored record's fields), never the answer's text:
    ``outcome``, ``status_code``, ``finish_reason``, ``usage``, ``response_chars``, ``error``
    (as recorded: without quotes of the request), ``arm``, ``model_version``, ``shadow``.
    """
    prompt, completion = record.get("prompt_tokens"), record.get("completion_tokens")
    usage = None
    if prompt is not None or completion is not None:
        usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return {
        "recorded": False,
        "outcome": record.get("outcome", "served"),
        "status_code": record.get("status_code"),
        "finish_reason": record.get("finish_reason"),
        "usage": usage,
        "response_chars": record.get("response_chars"),
        "error": record.get("error"),
        "arm": record.get("arm", "champion"),
        "model_version": record.get("model_version"),
        "shadow": bool(record.get("shadow")),
    }


def response_preview(record: dict[str, Any]) -> str:
    """`response_summary` in one line for the trace list, e.g. ``served 200, finish stop,
    5 -> 3 tokens, 21 chars; champion v7`` or ``refused 400: HTTP 400 BAD_REQUEST: ...``.
    """
    summary = response_summary(record)
    parts = [f"{summary['outcome']} {summary['status_code']}"]
    if summary["finish_reason"]:
        parts.append(f"finish {summary['finish_reason']}")
    usage = summary["usage"]
    if usage is not None:
        parts.append(
            f"{_text(usage['prompt_tokens'])} -> {_text(usage['completion_tokens'])} tokens"
        )
    if summary["response_chars"] is not None:
        parts.append(f"{summary['response_chars']} chars")
    head = ", ".join(parts)
    if summary["error"]:
        head += f": {summary['error']}"
    who = f"{summary['arm']} v{summary['model_version']}"
    return f"{head}; {who}{' (shadow)' if summary['shadow'] else ''}"


def _chars(content: Any) -> int:
    """Characters of a message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _stop_count(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return 1
    return len(value) if isinstance(value, list) else 1


def _scalar(value: Any) -> Any:
    """A parameter as given when it is a number or a flag; anything else only as its kind."""
    if value is None or isinstance(value, bool | int | float):
        return value
    return _kind(value)


def _kind(value: Any) -> str:
    return type(value).__name__


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "?" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
