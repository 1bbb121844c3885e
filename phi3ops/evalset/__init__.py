"""Versioned eval sets: the JSONL schema, its loader, and the pure checks that scorers wrap.

An eval set is a JSONL file: one JSON object (an :class:`EvalItem`) per line, documented in
``evals/README.md``. A set is identified by its :attr:`EvalSet.content_hash`, a sha256 over the
items as parsed, so two evaluations are comparable exactly when their hashes are equal.

Modules, each importing only those above it: `checks` (`Verdict` and the pure ``check_*``
functions, one per expectation kind), `schema` (`EvalItem`, `EvalSet`, the constants and
`hash_items`), and `loading` (names and paths to files, reading and validating them with every
problem reported, and the cached `open_eval_set`).
"""

from phi3ops.evalset.checks import (
    EXPECTATION_KINDS,
    ErrorLike,
    Verdict,
    check,
    check_contains,
    check_exact,
    check_max_chars,
    check_not_contains,
    check_regex,
    check_valid_json,
)
from phi3ops.evalset.loading import (
    MAX_REPORTED_PROBLEMS,
    available_eval_sets,
    evals_dir,
    load_eval_set,
    open_eval_set,
    resolve_eval_set,
)
from phi3ops.evalset.schema import (
    DEFAULT_EVAL_SET,
    EVAL_SET_SUFFIX,
    MAX_TOKENS_LIMIT,
    SCHEMA_VERSION,
    ChatMessage,
    EvalItem,
    EvalSet,
    Expectations,
    hash_items,
)

__all__ = [
    "DEFAULT_EVAL_SET",
    "EVAL_SET_SUFFIX",
    "EXPECTATION_KINDS",
    "MAX_REPORTED_PROBLEMS",
    "MAX_TOKENS_LIMIT",
    "SCHEMA_VERSION",
    "ChatMessage",
    "ErrorLike",
    "EvalItem",
    "EvalSet",
    "Expectations",
    "Verdict",
    "available_eval_sets",
    "check",
    "check_contains",
    "check_exact",
    "check_max_chars",
    "check_not_contains",
    "check_regex",
    "check_valid_json",
    "evals_dir",
    "hash_items",
    "load_eval_set",
    "open_eval_set",
    "resolve_eval_set",
]
