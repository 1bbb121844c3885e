"""Tools: the request's functions rendered into Phi-3's prompt, its answer constrained to text
or calls, and the calls read back as OpenAI's ``tool_calls``.

Phi-3 has no tool tokens, so tools travel as text through its own chat template:

* The functions go at the end of the system turn (one is added when the chat has none)::

      You can call these functions. To call one, answer with only
      <tool_call>{"name": <function name>, "arguments": <its arguments as a JSON object>}
      </tool_call>   (on the same line)
      [one tag per call, one after another, to call several]
      Functions:
      {"name": "get_weather", "description": "...", "parameters": {...}}

  followed by ``You must call one of them.`` (``tool_choice: "required"``) or ``You must call
  <name>.`` (a named function).
* An assistant turn that called tools is its text followed by its calls, each
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
* Tool results (``role: "tool"``) become one user turn, one line per result:
  ``<tool_response>{"tool_call_id": ..., "name": ..., "content": ...}</tool_response>``.

The answer follows a grammar (`phi3_chat.guidance`): with ``tool_choice`` ``auto``, text that
does not start with ``<`` or calls; ``required``, calls of any function; a named function, calls
of it; ``none``, free text (the functions are not offered). Each call is
``<tool_call>`` + a compact JSON object whose ``name`` is one of the functions and whose
``arguments`` match that function's ``parameters`` + ``</tool_call>``; with
``parallel_tool_calls: false``, exactly one. An answer that is calls becomes ``tool_calls`` with
``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from phi3_chat.guidance import Guidance, checked_schema, lark_json, tail_rule

__all__ = ["CALL_CLOSE", "CALL_OPEN", "MAX_TOOLS", "ToolSet", "validated_tool_fields"]

#: Most functions one request may offer (OpenAI's own limit).
MAX_TOOLS = 128
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_RESULT_OPEN, _RESULT_CLOSE = "<tool_response>", "</tool_response>"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_CHOICES = ("none", "auto", "required")


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


@dataclass(frozen=True)
class Function:
    """One function a request offers."""

    name: str
    description: str
    parameters: str  # its parameters' JSON schema, as compact JSON (hashable)

    def listing(self) -> str:
        entry: dict[str, Any] = {"name": self.name}
        if self.description:
            entry["description"] = self.description
        entry["parameters"] = json.loads(self.parameters)
        return json.dumps(entry, ensure_ascii=False)


@dataclass(frozen=True)
class ToolSet:
    """A request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, checked."""

    functions: tuple[Function, ...]
    choice: str  # none, auto, required, or the name of a function
    parallel: bool = True

    @property
    def calls_possible(self) -> bool:
        """Whether the answer may call a function (``tool_choice`` is not ``none``)."""
        return self.choice != "none"

    def offered(self) -> tuple[Function, ...]:
        """The functions the answer may call."""
        if self.choice in _CHOICES:
            return self.functions if self.calls_possible else ()
        return tuple(f for f in self.functions if f.name == self.choice)

    # --- the prompt ---------------------------------------------------------------------------

    def system_text(self) -> str:
        """What the system turn says about the functions (empty when none may be called)."""
        offered = self.offered()
        if not offered:
            return ""
        lines = [
            "You can call these functions. To call one, answer with only",
            f'{CALL_OPEN}{{"name": <function name>, "arguments": <its arguments as a JSON '
            f"object>}}{CALL_CLOSE}",
        ]
        if self.parallel:
            lines.append("one tag per call, one after another, to call several.")
        lines.append("Functions:")
        lines.extend(function.listing() for function in self.functions)
        if self.choice == "required":
            lines.append("You must call one of them.")
        elif self.choice not in _CHOICES:
            lines.append(f"You must call {self.choice}.")
        return "\n".join(lines)

    def render(self, messages: list[dict[str, Any]]) -> list[dict[str, str]]:
        """``messages`` as Phi-3's template takes them: the functions in the system turn,
        calls in their assistant turns, results as user turns (see the module docstring).
        """
        names = {}
        out: list[dict[str, str]] = []
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "assistant" and "tool_calls" in message:
                calls = []
                for call in message["tool_calls"]:
                    function = call["function"]
                    names[call["id"]] = function["name"]
                    arguments = json.loads(function["arguments"])
                    calls.append(
                        CALL_OPEN
                        + json.dumps({"name": function["name"], "arguments": arguments})
                        + CALL_CLOSE
                    )
                out.append({"role": "assistant", "content": content + "".join(calls)})
            elif role == "tool":
                result = {
                    "tool_call_id": message["tool_call_id"],
                    "name": names.get(message["tool_call_id"], ""),
                    "content": content,
                }
                line = _RESULT_OPEN + json.dumps(result, ensure_ascii=False) + _RESULT_CLOSE
                if out and out[-1].get("tool_results") == "yes":
                    out[-1]["content"] += "\n" + line
                else:
                    out.append({"role": "user", "content": line, "tool_results": "yes"})
            else:
                out.append({"role": role, "content": content})
        for message in out:
            message.pop("tool_results", None)
        text = self.system_text()
        if text:
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
            else:
                out.insert(0, {"role": "system", "content": text})
        return out

    def check_history(self, messages: list[dict[str, Any]], where: str) -> None:
        """Refuses assistant tool calls that are not OpenAI's shape and tool results that
        answer no earlier call.
        """
        calls: set[str] = set()
        for position, message in enumerate(messages):
            label = f"{where}messages[{position}]"
            if "tool_calls" in message:
                raw = message["tool_calls"]
                if isinstance(raw, str | Mapping) or not isinstance(raw, Sequence | np.ndarray):
                    raise _invalid(f"{label}.tool_calls must be a list of calls")
                for index, call in enumerate(raw):
                    calls.add(_checked_call(call, f"{label}.tool_calls[{index}]"))
            elif message["role"] == "tool" and message["tool_call_id"] not in calls:
                raise _invalid(
                    f"{label}.tool_call_id {message['tool_call_id']!r} answers no tool call of "
                    "an earlier assistant message"
                )

    # --- the answer ---------------------------------------------------------------------------

    def guidance(self) -> Guidance | None:
        """The grammar of the answer; None when it is free text (``tool_choice: "none"``)."""
        offered = self.offered()
        if not offered:
            return None
        variants = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": function.name},
                    "arguments": json.loads(function.parameters),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for function in offered
        ]
        schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
        call = f'call: "{CALL_OPEN}" {lark_json(schema)} "{CALL_CLOSE}"'
        calls = "call+" if self.parallel else "call"
        if self.choice == "auto":
            grammar = f"start: TEXT | {calls}\nTEXT: /[^<](.|\\n)*/\n{call}\n"
            return Guidance("lark_grammar", grammar, end="eos")
        if self.parallel:
            return Guidance("lark_grammar", f"start: {calls}\n{call}\n", end="eos")
        grammar = f"start: call TAIL\n{call}\n{tail_rule()}\n"
        return Guidance("lark_grammar", grammar, end=f"tag:{CALL_CLOSE}")

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """The answer's calls as OpenAI ``tool_calls``; None when it is text (or cut short)."""
        if not self.calls_possible or not text.startswith(CALL_OPEN):
            return None
        decoder, calls, at = json.JSONDecoder(), [], 0
        names = {function.name for function in self.offered()}
        while at < len(text):
            if not text.startswith(CALL_OPEN, at):
                return None
            try:
                value, end = decoder.raw_decode(text, at + len(CALL_OPEN))
            except ValueError:
                return None
            if not text.startswith(CALL_CLOSE, end) or not isinstance(value, dict):
                return None
            if value.get("name") not in names or not isinstance(value.get("arguments"), dict):
                return None
            calls.append(
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {
                        "name": value["name"],
                        "arguments": json.dumps(value["arguments"], ensure_ascii=False),
                    },
                }
            )
            at = end + len(CALL_CLOSE)
        return calls or None


def _checked_call(call: Any, label: str) -> str:
    function = call.get("function") if isinstance(call, Mapping) else None
    call_id = call.get("id") if isinstance(call, Mapping) else None
    if not isinstance(call_id, str) or not call_id or not isinstance(function, Mapping):
        raise _invalid(f"{label} must be an object with id, type function and function")
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise _invalid(f"{label}.function.name must be the called function's name")
    arguments = function.get("arguments")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise _invalid(f"{label}.function.arguments must be a JSON object, as a string")
    return call_id


def validated_tool_fields(row: Mapping[str, Any], where: str = "") -> ToolSet | None:
    """The row's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, checked; None when it
    offers no tools.

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE`` naming the field.
    """
    raw = row.get("tools")
    if _missing(raw) or (isinstance(raw, Sized) and not isinstance(raw, str) and len(raw) == 0):
        raw = None
    choice = row.get("tool_choice")
    parallel = row.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool | np.bool_):
        raise _invalid(f"{where}parallel_tool_calls must be true or false, got {parallel!r}")
    if raw is None:
        if not _missing(choice) and choice not in ("none", "auto"):
            raise _invalid(f"{where}tool_choice {_short(choice)} needs tools: send the functions")
        return None
    if isinstance(raw, str | Mapping) or not isinstance(raw, Sequence | np.ndarray):
        raise _invalid(f"{where}tools must be a list of {{type: function, function}} objects")
    if len(raw) > MAX_TOOLS:
        raise _invalid(f"{where}tools holds {len(raw)} functions; a request may offer {MAX_TOOLS}")
    functions: list[Function] = []
    for index, tool in enumerate(raw):
        label = f"{where}tools[{index}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise _invalid(f"{label} must be an object with type function (the only tool type)")
        spec = tool.get("function")
        if not isinstance(spec, Mapping):
            raise _invalid(f"{label}.function must be an object with name and parameters")
        name = spec.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 64 or not set(name) <= _NAME_CHARS:
            raise _invalid(
                f"{label}.function.name must be 1 to 64 letters, digits, _ or -, got {_short(name)}"
            )
        if any(function.name == name for function in functions):
            raise _invalid(f"{label}.function.name {name!r} is offered twice")
        description = spec.get("description", "")
        if _missing(description):
            description = ""
        if not isinstance(description, str):
            raise _invalid(f"{label}.function.description must be a string")
        parameters = spec.get("parameters")
        if _missing(parameters):
            parameters = {"type": "object", "properties": {}}
        checked = checked_schema(parameters, f"{label}.function.parameters")
        if checked.get("type", "object") != "object":
            raise _invalid(f"{label}.function.parameters must describe an object (type: object)")
        compact = json.dumps(checked, separators=(",", ":"), sort_keys=True)
        functions.append(Function(name, description, compact))
    return ToolSet(tuple(functions), _choice(choice, functions, where), bool(parallel))


def _choice(choice: Any, functions: list[Function], where: str) -> str:
    if _missing(choice):
        return "auto"
    if isinstance(choice, str):
        if choice not in _CHOICES:
            raise _invalid(
                f"{where}tool_choice must be none, auto, required or a named function, "
                f"got {_short(choice)}"
            )
        return choice
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(choice, Mapping) or choice.get("type") != "function" or name is None:
        raise _invalid(
            f'{where}tool_choice must be a string or {{"type": "function", "function": '
            f'{{"name": ...}}}}, got {_short(choice)}'
        )
    if not any(f.name == name for f in functions):
        raise _invalid(f"{where}tool_choice names {name!r}, which is not one of the tools")
    return str(name)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
