"""The pure checks of an eval item's expectations, one per expectation kind.

Every ``check_*`` function is pure and fast: the evaluation stage wraps each as an MLflow scorer.
A check of a missing output (a failed request) fails with the rationale ``"no output: <error>"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import regex

from phi3ops.errors import InvalidInputError

#: The expectation kinds, in the order an item's expectations are listed and checked.
EXPECTATION_KINDS: tuple[str, ...] = (
    "contains",
    "not_contains",
    "regex",
    "exact",
    "max_chars",
    "valid_json",
)

_JSON_FENCE_RE = re.compile(r"\A```[ \t]*(?:json)?[ \t]*\n(.*?)\n?[ \t]*```\Z", re.S | re.I)

ErrorLike = str | BaseException | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of one check on one output.

    Attributes:
        passed: Whether the expectation holds.
        rationale: Concretely why (``"missing 'Paris'"``, ``"412 chars > 300"``).
    """

    passed: bool
    rationale: str


def check_contains(
    output: str | None, expected: list[str] | str, *, error: ErrorLike = None
) -> Verdict:
    """Every expected substring occurs in the output (case-insensitive)."""
    if output is None:
        return _no_output(error)
    needles = _needles(expected, "contains")
    haystack = _text(output).casefold()
    missing = [needle for needle in needles if needle.casefold() not in haystack]
    if missing:
        return Verdict(False, f"missing {_quoted(missing)}")
    return Verdict(True, f"contains {_quoted(needles)}")


def check_not_contains(
    output: str | None, expected: list[str] | str, *, error: ErrorLike = None
) -> Verdict:
    """No forbidden substring occurs in the output (case-insensitive)."""
    if output is None:
        return _no_output(error)
    needles = _needles(expected, "not_contains")
    haystack = _text(output).casefold()
    found = [needle for needle in needles if needle.casefold() in haystack]
    if found:
        return Verdict(False, f"contains forbidden {_quoted(found)}")
    return Verdict(True, f"none of {_quoted(needles)}")


def check_regex(output: str | None, expected: str, *, error: ErrorLike = None) -> Verdict:
    """The pattern matches somewhere in the output (``re.search`` with ``re.DOTALL``)."""
    if output is None:
        return _no_output(error)
    if not isinstance(expected, str):
        raise InvalidInputError(f"regex expects a pattern string, got {expected!r}")
    try:
        pattern = compile_regex(expected)
    except ValueError as exc:
        raise InvalidInputError(f"{exc}: fix the pattern") from exc
    try:
        match = pattern.search(_text(output), timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        # A pattern that backtracks catastrophically on this answer would hang the evaluation.
        return Verdict(
            False,
            f"/{expected}/ did not finish within {REGEX_TIMEOUT_S:g} s on a "
            f"{len(output)}-character answer (catastrophic backtracking): simplify the pattern",
        )
    if match is None:
        return Verdict(False, f"no match for /{expected}/ in {_shorten(output)}")
    return Verdict(True, f"matched {_shorten(match.group(0))}")


def check_exact(output: str | None, expected: str, *, error: ErrorLike = None) -> Verdict:
    """The output equals the expected text once surrounding whitespace is stripped from both."""
    if output is None:
        return _no_output(error)
    if not isinstance(expected, str):
        raise InvalidInputError(f"exact expects a string, got {expected!r}")
    if _text(output).strip() == expected.strip():
        return Verdict(True, f"equals {expected.strip()!r}")
    return Verdict(False, f"expected {expected.strip()!r}, got {_shorten(output.strip())}")


def check_max_chars(output: str | None, expected: int, *, error: ErrorLike = None) -> Verdict:
    """The output, surrounding whitespace excluded, has at most ``expected`` characters."""
    if output is None:
        return _no_output(error)
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 1:
        raise InvalidInputError(f"max_chars expects an int >= 1, got {expected!r}")
    length = len(_text(output).strip())
    if length > expected:
        return Verdict(False, f"{length} chars > {expected}")
    return Verdict(True, f"{length} chars <= {expected}")


def check_valid_json(
    output: str | None, expected: bool = True, *, error: ErrorLike = None
) -> Verdict:
    """The output parses as JSON, after stripping surrounding whitespace and a code fence.

    The fence is a markdown block around the whole output: a line of three backticks (optionally
    tagged ``json``), the JSON, and a closing line of three backticks. Prose around it fails.
    """
    if output is None:
        return _no_output(error)
    if expected is not True:
        raise InvalidInputError(f"valid_json expects true, got {expected!r}")
    text = _text(output).strip()
    fenced = _JSON_FENCE_RE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text:
        return Verdict(False, "not JSON: the output is empty")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return Verdict(False, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    return Verdict(True, f"parses as JSON ({json_type(value)}{', fenced' if fenced else ''})")


_CHECKS: dict[str, Callable[..., Verdict]] = {
    "contains": check_contains,
    "not_contains": check_not_contains,
    "regex": check_regex,
    "exact": check_exact,
    "max_chars": check_max_chars,
    "valid_json": check_valid_json,
}


def check(kind: str, output: str | None, expected: Any, *, error: ErrorLike = None) -> Verdict:
    """Runs the check of one expectation kind.

    Args:
        kind: One of :data:`EXPECTATION_KINDS`.
        output: The model's answer, or ``None`` when the request failed (every check then fails
            with the rationale ``"no output: <error>"``).
        expected: The expectation's value from the item.
        error: Why there is no output; ignored when there is one.

    Returns:
        The verdict with its rationale.

    Raises:
        InvalidInputError: Unknown kind, or an expected value of the wrong type.
    """
    try:
        run = _CHECKS[kind]
    except KeyError:
        raise InvalidInputError(
            f"Unknown expectation kind {kind!r}: use one of {', '.join(EXPECTATION_KINDS)}"
        ) from None
    return run(output, expected, error=error)


#: How long one ``regex`` expectation may search one answer.
REGEX_TIMEOUT_S = 1.0


@lru_cache(maxsize=256)
def compile_regex(pattern: str) -> regex.Pattern[str]:
    """Compiles an expectation's pattern with ``re.DOTALL`` (cached: items reuse patterns).

    The ``regex`` package in its ``re``-compatible mode (V0), for its search timeout.

    Args:
        pattern: The ``regex`` expectation.

    Returns:
        The compiled pattern.

    Raises:
        ValueError: The pattern does not compile; the message names it and the position.
    """
    try:
        return regex.compile(pattern, regex.DOTALL | regex.V0)
    except regex.error as exc:
        raise ValueError(f"bad regex {pattern!r}: {exc}") from None


def json_type(value: Any) -> str:
    """The JSON type of a parsed value, as prose (``"an object"``, ``"null"``, ``"a number"``).

    Args:
        value: What ``json.loads`` returned.

    Returns:
        The type's name with its article.
    """
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _no_output(error: ErrorLike) -> Verdict:
    if isinstance(error, BaseException):
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    else:
        reason = error or "the request returned nothing (no error recorded)"
    return Verdict(False, f"no output: {reason}")


def _text(output: Any) -> str:
    if not isinstance(output, str):
        raise InvalidInputError(
            f"output must be a string (or None for a failed request), got {type(output).__name__}"
        )
    return output


def _needles(expected: list[str] | str, kind: str) -> list[str]:
    needles = [expected] if isinstance(expected, str) else list(expected)
    if not needles or not all(isinstance(n, str) and n for n in needles):
        raise InvalidInputError(f"{kind} expects non-empty strings, got {expected!r}")
    return needles


def _quoted(values: list[str]) -> str:
    return ", ".join(repr(value) for value in values)


def _shorten(text: str, limit: int = 80) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
