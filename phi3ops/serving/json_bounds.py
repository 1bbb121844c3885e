"""The request body's JSON, bounded before it is parsed and parsed without non-JSON constants.

Python's ``json`` recurses once per nesting level (a body of 5,000 ``[`` raises
``RecursionError``, not ``ValueError``) and builds every value of the body before anything can
look at it, and it takes ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON. So the
serving layer reads each request body through `parse_request_json`: a cheap scan of the raw
bytes first (nesting depth and the number of values, outside strings, stopping as soon as a
limit is passed), then ``json.loads`` refusing those constants. A body it refuses raises
`BodyRefused`, which the serving layer answers with a 400 in the route's shape and records as
a refused request.

The limits are far above any chat request: a chat body nests at most about eight levels
(``{"inputs": [{"messages": [{"content": [{"type": ...}]}]}]}``), and a conversation at the
validator's message cap (`phi3_chat.validate.MAX_MESSAGES`, 2,048) with content parts has
about 12,000 values, which fits `MAX_VALUES`.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Deepest nesting of arrays and objects a request body may have.
MAX_DEPTH = 64
#: Most values (each array or object, and each value after a comma) a request body may hold.
MAX_VALUES = 20_000

# A structural character, or a whole JSON string (skipped: brackets inside it are text).
_TOKENS = re.compile(rb'[\[\]{},]|"[^"\\]*(?:\\.[^"\\]*)*"')


class BodyRefused(ValueError):
    """A request body the server refuses to parse (too deep, too many values, or holding a
    constant that is not JSON); its message says what and how to fix it.
    """


def check_json_bounds(
    data: bytes, *, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES
) -> None:
    """Refuses ``data`` when its JSON nests deeper than ``max_depth`` or holds more than
    ``max_values`` values, counted on the raw bytes without parsing them. The scan stops at
    the first limit passed, so its cost is bounded by the limits, not by the body.

    Raises:
        BodyRefused: Naming the limit passed.
    """
    depth = values = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            values += 1
            if depth > max_depth:
                raise BodyRefused(
                    f"the request body nests JSON more than {max_depth} levels deep; a chat "
                    "request needs fewer than 10: send a flatter body"
                )
        elif token in (b"]", b"}"):
            depth -= 1
        elif token == b",":
            values += 1
        if values > max_values:
            raise BodyRefused(
                f"the request body holds more than {max_values} JSON values; the server "
                "takes at most that many per request: split it into smaller requests"
            )


def _refuse_constant(name: str) -> Any:
    raise BodyRefused(
        f"the request body holds {name}, which is not JSON: send a finite number, or leave "
        "the field out"
    )


def parse_request_json(data: bytes) -> tuple[Any, str | None]:
    """``(value, None)`` for a JSON request body, ``(None, why)`` for one that is not JSON;
    empty data is ``(None, None)``.

    Raises:
        BodyRefused: The body is too deep or too large (`check_json_bounds`), or holds
            ``NaN`` / ``Infinity`` / ``-Infinity``.
    """
    if not data:
        return None, None
    check_json_bounds(data)
    try:
        return json.loads(data, parse_constant=_refuse_constant), None
    except BodyRefused:
        raise
    except ValueError as exc:  # UnicodeDecodeError included
        return None, str(exc)
