"""Structured outputs: ``response_format`` checked and turned into an onnxruntime-genai grammar.

onnxruntime-genai 0.18 constrains decoding with llguidance (``GeneratorParams.set_guidance``),
one grammar per generator, so the rows of one batch share it: `Guidance` is what the batcher
groups rows by. Two facts of that engine shape the grammars made here:

* A row whose grammar has ended (its matcher consumed an end-of-sequence token) breaks the next
  step of every other row of its batch ("compute_mask() called after stop"). So a grammar whose
  end can be seen in the text (a JSON object closing, one ``</tool_call>``) never lets the model
  end it: the grammar goes on with `_TAIL`, which takes any text and completes only on two
  control bytes nobody sends. The model sees the row finish the moment its value closes
  (`EndTracker`) and feeds it a filler token from then on (the grammar allows it), so
  rows finishing at different steps share one batch. A grammar that ends only when the model
  stops (free text or a tool call, several calls) runs in a batch of its own (`Guidance.alone`).
* Random or weak weights fill the free whitespace a JSON grammar allows until ``max_tokens``;
  every JSON grammar here is compact (llguidance's ``whitespace_flexible: false``), as OpenAI's
  own answers are.

Schemas are untrusted input: `MAX_SCHEMA_CHARS` and `MAX_SCHEMA_DEPTH` bound them before any
grammar is compiled, and a keyword outside `SUPPORTED_KEYWORDS` is refused naming it and where
it is; the model then compiles the grammar once and refuses what llguidance cannot build.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

__all__ = [
    "MAX_SCHEMA_CHARS",
    "MAX_SCHEMA_DEPTH",
    "SUPPORTED_KEYWORDS",
    "EndTracker",
    "Guidance",
    "json_object_end",
    "response_format_guidance",
]

#: Most characters of one JSON schema (as compact JSON); a schema for a form or an extraction
#: is a few hundred to a few thousand.
MAX_SCHEMA_CHARS = 32_768
#: Deepest nesting of schemas inside a schema (properties, items, anyOf...).
MAX_SCHEMA_DEPTH = 16
#: JSON schema keywords the grammar honours (llguidance's JSON support, less what it refuses).
SUPPORTED_KEYWORDS = frozenset(
    {
        "$schema", "$id", "$ref", "$defs", "definitions", "$comment",
        "type", "enum", "const", "title", "description", "default", "examples",
        "properties", "required", "additionalProperties",
        "items", "prefixItems", "minItems", "maxItems",
        "anyOf", "oneOf", "allOf",
        "minLength", "maxLength", "pattern", "format",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "minProperties", "maxProperties",
    }
)  # fmt: skip
# Keywords whose value is a map of names to schemas, or a list of schemas, or one schema.
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties")
_COMPACT = {"whitespace_flexible": False}
# After a value the model sees end: any text, ending only on two bytes no answer holds.
_TAIL = "TAIL: /(.|\\n)*\\x02\\x03/"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class Guidance:
    """A grammar for onnxruntime-genai: rows with equal guidance can share one batch.

    Attributes:
        kind: ``set_guidance``'s type (``lark_grammar``).
        data: The grammar.
        end: How the model sees the constrained part end: ``json`` (the top-level JSON
            object closes), ``tag:<text>`` (the text ends with it), or ``eos`` (only when the
            model stops: the row runs alone).
    """

    kind: str
    data: str
    end: str = "json"

    @property
    def alone(self) -> bool:
        """Whether a row under this grammar must run in a batch of its own."""
        return self.end == "eos"

    def tracker(self) -> EndTracker:
        """A fresh watcher of one row's text for the end of its constrained value."""
        return EndTracker(self.end)


class EndTracker:
    """Watches a row's text, piece by piece, for the end of its constrained value (in time
    linear in the text): the first top-level JSON object closing, or a closing tag.
    """

    def __init__(self, end: str) -> None:
        self._end = end
        self._seen = 0  # characters fed so far
        self._depth, self._in_string, self._escaped, self._started = 0, False, False, False
        self._tail = ""  # the last characters, for a tag

    def feed(self, piece: str) -> int | None:
        """Adds ``piece``; returns where the value ends in all text fed (the index after its
        last character) once it has, else None.
        """
        start, self._seen = self._seen, self._seen + len(piece)
        if self._end.startswith("tag:"):
            tag = self._end[4:]
            self._tail = (self._tail + piece)[-(len(tag) + len(piece)) :]
            found = self._tail.find(tag)
            return None if found < 0 else self._seen - len(self._tail) + found + len(tag)
        if self._end != "json":
            return None
        for offset, char in enumerate(piece):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
                self._started = True
            elif char in "}]":
                self._depth -= 1
                if self._started and self._depth == 0:
                    return start + offset + 1
        return None


def json_object_end(text: str) -> int | None:
    """Where the first top-level JSON object of ``text`` ends (the index after its ``}``), or
    None while it is open. Counts braces and brackets outside strings.
    """
    return EndTracker("json").feed(text)


def compact(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` with llguidance's compact whitespace (no free whitespace in the JSON)."""
    return {**schema, "x-guidance": _COMPACT}


def lark_json(schema: Mapping[str, Any]) -> str:
    """A Lark rule body: one compact JSON value valid against ``schema``."""
    return "%json " + json.dumps(compact(schema), separators=(",", ":"))


def json_guidance(schema: Mapping[str, Any]) -> Guidance:
    """The grammar of one JSON object valid against ``schema``, shared by batches."""
    return Guidance("lark_grammar", f"start: value TAIL\nvalue: {lark_json(schema)}\n{_TAIL}\n")


def tail_rule() -> str:
    """The rule that follows a value whose end the model sees (see the module docstring)."""
    return _TAIL


def response_format_guidance(value: Any, where: str = "") -> Guidance | None:
    """The grammar ``response_format`` asks for; None for ``{"type": "text"}``.

    Args:
        value: The request's ``response_format``.
        where: Prefix naming the row in messages.

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE`` naming ``response_format`` and what in it
            is wrong (a schema too large, too deep, or with a keyword the grammar cannot honour).
    """
    field = f"{where}response_format"
    if not isinstance(value, Mapping):
        raise _invalid(f"{field} must be an object with a type, got {_short(value)}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_guidance({"type": "object"})
    if kind != "json_schema":
        raise _invalid(
            f"{field}.type must be one of text, json_object, json_schema, got {_short(kind)}"
        )
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise _invalid(f"{field}.json_schema must be an object with name and schema")
    name = spec.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 64 or not set(name) <= _NAME_CHARS:
        raise _invalid(
            f"{field}.json_schema.name must be 1 to 64 letters, digits, _ or -, got {_short(name)}"
        )
    if "strict" in spec and not isinstance(spec["strict"], bool):
        raise _invalid(f"{field}.json_schema.strict must be true or false")
    schema = spec.get("schema", {"type": "object"})
    checked_schema(schema, f"{field}.json_schema.schema")
    if schema.get("type", "object") != "object":
        raise _invalid(
            f"{field}.json_schema.schema must describe an object (type: object), as OpenAI's "
            f"structured outputs do, got type {_short(schema.get('type'))}"
        )
    return json_guidance(schema)


def checked_schema(schema: Any, field: str) -> dict[str, Any]:
    """``schema`` after the bounds and keyword checks.

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE`` starting with ``field``.
    """
    if not isinstance(schema, Mapping):
        raise _invalid(f"{field} must be a JSON schema object, got {_short(schema)}")
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_CHARS:
        raise _invalid(
            f"{field} is {size} characters of JSON; a schema may have at most "
            f"{MAX_SCHEMA_CHARS}: send a smaller one"
        )
    _check_keywords(schema, field, "#", 1)
    return dict(schema)


def _check_keywords(schema: Any, field: str, path: str, depth: int) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise _invalid(f"{field}: {path} must be a schema object, got {_short(schema)}")
    if depth > MAX_SCHEMA_DEPTH:
        raise _invalid(
            f"{field} nests schemas more than {MAX_SCHEMA_DEPTH} levels deep (at {path}): "
            "send a flatter schema"
        )
    for key, value in schema.items():
        if key not in SUPPORTED_KEYWORDS:
            raise _invalid(
                f"{field}: keyword {key!r} at {path} is not supported by the grammar; "
                f"supported: {', '.join(sorted(SUPPORTED_KEYWORDS))}"
            )
        if key in _SCHEMA_MAPS:
            if not isinstance(value, Mapping):
                raise _invalid(f"{field}: {path}/{key} must be an object of schemas")
            for name, inner in value.items():
                _check_keywords(inner, field, f"{path}/{key}/{name}", depth + 1)
        elif key in _SCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                raise _invalid(f"{field}: {path}/{key} must be a non-empty list of schemas")
            for position, inner in enumerate(value):
                _check_keywords(inner, field, f"{path}/{key}/{position}", depth + 1)
        elif key in _SCHEMA_VALUES:
            _check_keywords(value, field, f"{path}/{key}", depth + 1)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
