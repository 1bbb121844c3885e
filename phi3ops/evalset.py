"""Versioned eval sets: the JSONL schema, its loader, and the pure checks that scorers wrap.

An eval set is a JSONL file: one JSON object (an :class:`EvalItem`) per line. Blank lines are
skipped; nothing else is (JSON has no comments, and a ``//`` line would make the file unreadable
to every other JSONL tool). The schema is documented in ``evals/README.md``.

A set is identified by its :attr:`EvalSet.content_hash`, a sha256 over the items as parsed, so
two evaluations are comparable exactly when their hashes are equal.

The ``check_*`` functions are pure and fast: the evaluation stage wraps each as an MLflow scorer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from difflib import get_close_matches
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from phi3ops.errors import EvalSetError, EvalSetNotFoundError, InvalidInputError
from phi3ops.settings import get_settings

DEFAULT_EVAL_SET = "phi3-default"
EVAL_SET_SUFFIX = ".jsonl"
# Bumped when the meaning of a field or check changes, so old and new results never compare equal.
SCHEMA_VERSION = 1
MAX_REPORTED_PROBLEMS = 20
MAX_TOKENS_LIMIT = 4096

EXPECTATION_KINDS: tuple[str, ...] = (
    "contains",
    "not_contains",
    "regex",
    "exact",
    "max_chars",
    "valid_json",
)

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_JSON_FENCE_RE = re.compile(r"\A```[ \t]*(?:json)?[ \t]*\n(.*?)\n?[ \t]*```\Z", re.S | re.I)

ErrorLike = str | BaseException | None


# --- schema ------------------------------------------------------------------------------


class Expectations(BaseModel):
    """What a good answer to one item looks like; every expectation given must hold.

    Attributes:
        contains: Substrings that must all occur (case-insensitive). A single string is
            accepted as a one-element list.
        not_contains: Substrings none of which may occur (case-insensitive).
        regex: A pattern that must match somewhere (``re.search``, with ``re.DOTALL``).
        exact: The whole output, after stripping surrounding whitespace on both sides.
        max_chars: The most characters the output may have, surrounding whitespace excluded.
        valid_json: ``true``: the output, less a surrounding markdown code fence, is JSON.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    contains: list[str] = Field(default_factory=list)
    not_contains: list[str] = Field(default_factory=list)
    regex: str | None = None
    exact: str | None = None
    max_chars: int | None = Field(default=None, ge=1)
    valid_json: bool | None = None

    @field_validator("contains", "not_contains", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("contains", "not_contains")
    @classmethod
    def _no_blank_needles(cls, value: list[str]) -> list[str]:
        if any(not needle.strip() for needle in value):
            raise ValueError("a blank string matches (almost) every output: remove it")
        return value

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            _compile(value)  # raises ValueError naming the pattern and the position
        return value

    @field_validator("exact")
    @classmethod
    def _exact_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("blank: give the text the whole answer must equal")
        return value

    @field_validator("valid_json")
    @classmethod
    def _only_true(cls, value: bool | None) -> bool | None:
        if value is False:
            raise ValueError("false checks nothing: use true, or leave the field out")
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> Expectations:
        if not self.active():
            raise ValueError(f"no expectations: set at least one of {', '.join(EXPECTATION_KINDS)}")
        return self

    def active(self) -> list[tuple[str, Any]]:
        """The expectations that are set, as ``(kind, expected)`` in ``EXPECTATION_KINDS`` order."""
        pairs = [(kind, getattr(self, kind)) for kind in EXPECTATION_KINDS]
        return [(kind, expected) for kind, expected in pairs if expected not in (None, [])]

    def verdicts(self, output: str | None, *, error: ErrorLike = None) -> dict[str, Verdict]:
        """Runs every active expectation on one output.

        Args:
            output: The model's answer, or ``None`` when the request failed.
            error: Why there is no output (used only when ``output`` is ``None``).

        Returns:
            One verdict per active expectation kind; the item passes when all of them do.
        """
        return {
            kind: check(kind, output, expected, error=error) for kind, expected in self.active()
        }


class ChatMessage(BaseModel):
    """One chat turn of an item's conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty content: write the text of the message")
        return value


class EvalItem(BaseModel):
    """One prompt (or conversation) and what its answer must satisfy.

    Attributes:
        id: Unique within the set; letters, digits, ``.``, ``_`` and ``-``.
        messages: The conversation so far; it ends with a user message. Exclusive with ``prompt``.
        prompt: Shorthand for a single user message. Exclusive with ``messages``.
        expectations: What the answer must satisfy (at least one expectation).
        tags: Groups for per-tag metrics (``factual``, ``safety``...).
        max_tokens: Generation budget for this item (1..4096); else the evaluation's default.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    expectations: Expectations
    tags: list[str] = Field(default_factory=list)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid id: use letters, digits, '.', '_' and '-' only"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty prompt: write the user's question")
        return value

    @field_validator("messages")
    @classmethod
    def _a_conversation(cls, value: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("no messages: give at least one user message")
        if value[-1].role != "user":
            raise ValueError(
                f"the last message is from {value[-1].role!r}: end with the user message the "
                "model answers"
            )
        # Phi-3's chat template places a system prompt first; anywhere else it is ambiguous.
        late = [i for i, message in enumerate(value) if message.role == "system" and i > 0]
        if late:
            raise ValueError(f"system message at position {late[0]}: only the first may be one")
        return value

    @field_validator("tags")
    @classmethod
    def _tags_are_names(cls, value: list[str]) -> list[str]:
        bad = [tag for tag in value if not _NAME_RE.fullmatch(tag)]
        if bad:
            raise ValueError(f"bad tag {bad[0]!r}: use letters, digits, '.', '_' and '-' only")
        return list(dict.fromkeys(value))  # drop repeats, keep the author's order

    @model_validator(mode="after")
    def _messages_or_prompt(self) -> EvalItem:
        if self.messages is not None and self.prompt is not None:
            raise ValueError("both 'messages' and 'prompt' given: keep exactly one")
        if self.messages is None and self.prompt is None:
            raise ValueError("missing field 'messages' or 'prompt': give exactly one")
        return self

    @property
    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation as plain ``{"role", "content"}`` dicts (a prompt is one user turn)."""
        if self.prompt is not None:
            return [{"role": "user", "content": self.prompt}]
        return [message.model_dump() for message in self.messages or []]

    def request(self, default_max_tokens: int) -> dict[str, Any]:
        """The ``llm/v1/chat`` request body for this item, greedy (``temperature`` 0).

        Args:
            default_max_tokens: Generation budget when the item sets no ``max_tokens``.

        Returns:
            ``{"messages": [...], "max_tokens": n, "temperature": 0.0}``.

        Raises:
            InvalidInputError: ``default_max_tokens`` is not a positive integer.
        """
        if isinstance(default_max_tokens, bool) or not isinstance(default_max_tokens, int):
            raise InvalidInputError(
                f"default_max_tokens must be an int, got {default_max_tokens!r}: pass e.g. 128"
            )
        if default_max_tokens < 1:
            raise InvalidInputError(
                f"default_max_tokens must be >= 1, got {default_max_tokens}: pass e.g. 128"
            )
        return {
            "messages": self.chat_messages,
            "max_tokens": self.max_tokens or default_max_tokens,
            "temperature": 0.0,
        }

    def verdicts(self, output: str | None, *, error: ErrorLike = None) -> dict[str, Verdict]:
        """Runs this item's expectations on one output (see :meth:`Expectations.verdicts`)."""
        return self.expectations.verdicts(output, error=error)


class EvalSet(BaseModel):
    """A loaded, validated eval set.

    Attributes:
        name: The file stem (``phi3-default`` for ``evals/phi3-default.jsonl``).
        path: The file it was read from (absolute).
        items: The items, in file order.
        content_hash: sha256 (hex) of the canonical form of the items: see :func:`hash_items`.
    """

    name: str
    path: Path
    items: list[EvalItem]
    content_hash: str

    @model_validator(mode="after")
    def _unique_ids(self) -> EvalSet:
        ids = [item.id for item in self.items]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"duplicate item ids {dupes}: every id must be unique in a set")
        return self

    @property
    def tags(self) -> list[str]:
        """Every tag used by an item, sorted, once each."""
        return sorted({tag for item in self.items for tag in item.tags})

    @property
    def tag_counts(self) -> dict[str, int]:
        """How many items carry each tag, by tag name (sorted)."""
        return {tag: sum(tag in item.tags for item in self.items) for tag in self.tags}

    def __len__(self) -> int:
        return len(self.items)


def hash_items(items: Iterable[EvalItem]) -> str:
    """sha256 over a canonical JSON of the items, as :attr:`EvalSet.content_hash`.

    Canonical: items sorted by id, keys sorted, no whitespace, defaults left out (so adding an
    optional field to the schema later keeps old hashes), plus :data:`SCHEMA_VERSION`. Formatting,
    key order, line order and ``"contains": "x"`` versus ``["x"]`` do not change the hash; any
    change to an item's content, id, tags or budget does.

    Args:
        items: The parsed items.

    Returns:
        The hex digest.
    """
    canonical = {
        "schema": SCHEMA_VERSION,
        "items": [
            item.model_dump(mode="json", exclude_defaults=True)
            for item in sorted(items, key=lambda item: item.id)
        ],
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --- loading -----------------------------------------------------------------------------


def load_eval_set(path: Path | str) -> EvalSet:
    """Reads and validates a JSONL eval set, reporting every problem at once.

    Args:
        path: The ``.jsonl`` file (a set name is not accepted here: see
            :func:`resolve_eval_set`).

    Returns:
        The validated set with its content hash.

    Raises:
        EvalSetNotFoundError: The file does not exist.
        EvalSetError: The file cannot be read or is invalid; the message has one
            ``file:line: reason`` per problem (the first 20), and ``problems`` has all of them.
    """
    file = Path(path).expanduser().resolve()
    try:
        raw = file.read_bytes()
    except FileNotFoundError as exc:
        raise EvalSetNotFoundError(
            f"Eval set file {file} does not exist: check the path, or pass a set name "
            f"({_available_hint()}).",
            path=str(file),
        ) from exc
    except OSError as exc:
        raise EvalSetError(
            f"Cannot read eval set {file}: {exc}. Pass a readable .jsonl file.", path=str(file)
        ) from exc
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM from Windows editors
    except UnicodeDecodeError as exc:
        raise EvalSetError(
            f"Eval set {file} is not UTF-8 (bad byte at offset {exc.start}): save it as UTF-8.",
            path=str(file),
        ) from exc

    items: list[EvalItem] = []
    problems: list[tuple[int | None, str]] = []
    first_line_of: dict[str, int] = {}
    # split on "\n" only: JSON strings may hold U+2028, which str.splitlines would split on
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        obj, reason = _parse_line(line)
        if obj is None:
            problems.append((lineno, reason or "not a JSON object"))
            continue
        # ids are checked on the raw object, so a duplicate of an invalid item is reported too
        raw_id = obj.get("id")
        if isinstance(raw_id, str) and raw_id in first_line_of:
            problems.append(
                (lineno, f"duplicate id {raw_id!r} (first used on line {first_line_of[raw_id]})")
            )
        elif isinstance(raw_id, str):
            first_line_of[raw_id] = lineno
        try:
            item = EvalItem.model_validate(obj)
        except ValidationError as exc:
            problems.extend((lineno, _describe(error)) for error in exc.errors())
            continue
        items.append(item)

    if not items and not problems:
        problems.append(
            (None, "no items: the file is empty or only blank; write one JSON object per line")
        )
    if problems:
        raise EvalSetError(
            _problems_message(file, problems), path=str(file), problems=tuple(problems)
        )
    return EvalSet(name=_set_name(file), path=file, items=items, content_hash=hash_items(items))


def _set_name(file: Path) -> str:
    return file.name[: -len(EVAL_SET_SUFFIX)] if file.name.endswith(EVAL_SET_SUFFIX) else file.stem


def _parse_line(line: str) -> tuple[dict[str, Any] | None, str | None]:
    """One line as a JSON object, or the reason it is not one."""
    try:
        obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        return None, f"bad JSON at column {exc.colno}: {exc.msg}"
    except _DuplicateKeyError as exc:
        return None, f"bad JSON: key {exc.args[0]!r} appears twice in one object"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object {{...}}, got {_json_type(obj)}"
    return obj, None


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently: a typo would vanish from the item
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


_FIELDS_AT: dict[str, tuple[str, ...]] = {
    "item": tuple(EvalItem.model_fields),
    "expectations": tuple(Expectations.model_fields),
    "messages": tuple(ChatMessage.model_fields),
}


def _describe(error: ErrorDetails) -> str:
    """A pydantic error as one short reason naming the field (``messages[1].role: ...``)."""
    loc = error["loc"]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    where = where.lstrip(".")
    kind = error["type"]
    if kind == "missing":
        return f"missing field {where!r}"
    if kind == "extra_forbidden":
        return f"unknown field {where!r}{_suggest(loc)}"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    if kind != "value_error" and isinstance(got, str | int | float | bool):
        shown = repr(got)
        message += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    if not where or message.startswith(f"no {where}"):  # "no expectations: ..." names it
        return message
    return f"{where}: {message}"


def _suggest(loc: tuple[int | str, ...]) -> str:
    name = str(loc[-1])
    parent = "item" if len(loc) == 1 else ("messages" if loc[0] == "messages" else str(loc[0]))
    known = _FIELDS_AT.get(parent, ())
    if parent == "item" and name in EXPECTATION_KINDS:
        return f" (did you mean 'expectations.{name}'?)"
    match = get_close_matches(name, known, n=1, cutoff=0.6)
    if match:
        return f" (did you mean {match[0]!r}?)"
    return f" (allowed: {', '.join(known)})" if known else ""


def _problems_message(file: Path, problems: list[tuple[int | None, str]]) -> str:
    shown = problems[:MAX_REPORTED_PROBLEMS]
    lines = [
        f"  {file}:{lineno}: {reason}" if lineno else f"  {file}: {reason}"
        for lineno, reason in shown
    ]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return (
        f"Eval set {file} is invalid ({count}):\n"
        + "\n".join(lines)
        + "\nFix these lines; the schema is documented in evals/README.md."
    )


# --- finding sets ------------------------------------------------------------------------


def evals_dir() -> Path:
    """The folder bare set names resolve in: ``PHI3OPS_EVALS_DIR``, else the project's evals/."""
    configured = get_settings().evals_dir
    if configured is not None:
        return configured.expanduser().resolve()
    # installed editable from a checkout: <repo>/phi3ops/evalset.py -> <repo>/evals
    return Path(__file__).resolve().parents[1] / "evals"


def available_eval_sets() -> list[str]:
    """Names of the sets in :func:`evals_dir` (sorted; empty when the folder is missing)."""
    folder = evals_dir()
    if not folder.is_dir():
        return []
    return sorted(_set_name(p) for p in folder.glob(f"*{EVAL_SET_SUFFIX}") if p.is_file())


def resolve_eval_set(name_or_path: str | Path | None = None) -> Path:
    """Turns a set name or path into the file to load.

    Args:
        name_or_path: ``None`` for the default set (``phi3-default``); a bare name such as
            ``smoke`` for ``<evals dir>/smoke.jsonl``; or the path of a ``.jsonl`` file.

    Returns:
        The absolute path of an existing file.

    Raises:
        EvalSetNotFoundError: No set by that name and no such file; the message lists the sets
            that exist.
    """
    target = DEFAULT_EVAL_SET if name_or_path is None else name_or_path
    named = None
    if isinstance(target, str) and _NAME_RE.fullmatch(target):
        named = evals_dir() / f"{_set_name(Path(target))}{EVAL_SET_SUFFIX}"
        # "smoke" is a set name first; "smoke.jsonl" is a file here first, then a set name
        if not target.endswith(EVAL_SET_SUFFIX) and named.is_file():
            return named
    path = Path(target).expanduser()
    if path.is_file():
        return path.resolve()
    if named is not None and named.is_file():
        return named
    raise EvalSetNotFoundError(
        f"No eval set {str(target)!r}: it is neither a file nor a set name in {evals_dir()} "
        f"({_available_hint()}). Pass one of those names or the path of a .jsonl file, or point "
        "PHI3OPS_EVALS_DIR at the folder that holds your sets."
    )


def _available_hint() -> str:
    names = available_eval_sets()
    if names:
        return f"available: {', '.join(names)}"
    return f"no sets found: {evals_dir()} does not exist or holds no {EVAL_SET_SUFFIX} files"


# --- checks ------------------------------------------------------------------------------


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
        pattern = _compile(expected)
    except ValueError as exc:
        raise InvalidInputError(f"{exc}: fix the pattern") from exc
    match = pattern.search(_text(output))
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
    return Verdict(True, f"parses as JSON ({_json_type(value)}{', fenced' if fenced else ''})")


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


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ValueError(f"bad regex {pattern!r}: {exc}") from None
