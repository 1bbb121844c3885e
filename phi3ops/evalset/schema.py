"""The eval-set schema: what one JSONL line (an :class:`EvalItem`) may hold, and a set's hash.

An eval set is a JSONL file: one JSON object (an :class:`EvalItem`) per line. The schema is
documented in ``evals/README.md``.

A set is identified by its :attr:`EvalSet.content_hash`, a sha256 over the items as parsed, so
two evaluations are comparable exactly when their hashes are equal.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from phi3ops.errors import InvalidInputError
from phi3ops.evalset.checks import EXPECTATION_KINDS, ErrorLike, Verdict, check, compile_regex

DEFAULT_EVAL_SET = "phi3-default"
EVAL_SET_SUFFIX = ".jsonl"
# Bumped when the meaning of a field or check changes, so old and new results never compare equal.
SCHEMA_VERSION = 1
MAX_TOKENS_LIMIT = 4096

#: What an item id, a tag, or a bare set name may be: letters, digits, ``.``, ``_`` and ``-``.
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


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
            compile_regex(value)  # raises ValueError naming the pattern and the position
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
        if not NAME_RE.fullmatch(value):
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
        bad = [tag for tag in value if not NAME_RE.fullmatch(tag)]
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
