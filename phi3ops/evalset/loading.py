"""Finding, reading and validating eval sets, with one report of every problem in a file.

Blank lines are skipped; nothing else is (JSON has no comments, and a ``//`` line would make the
file unreadable to every other JSONL tool). A bare set name resolves in :func:`evals_dir`.
"""

from __future__ import annotations

import json
from difflib import get_close_matches
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from phi3ops.errors import EvalSetError, EvalSetNotFoundError
from phi3ops.evalset.checks import EXPECTATION_KINDS, json_type
from phi3ops.evalset.schema import (
    DEFAULT_EVAL_SET,
    EVAL_SET_SUFFIX,
    NAME_RE,
    ChatMessage,
    EvalItem,
    EvalSet,
    Expectations,
    hash_items,
)
from phi3ops.settings import get_settings

MAX_REPORTED_PROBLEMS = 20


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


def open_eval_set(name_or_path: str | Path | None = None) -> EvalSet:
    """The eval set a name or path means, resolved, read and validated.

    Parsed once per file content in a process: a lifecycle run that hands the same set to
    evaluation, promotion and the champion's evaluation reads it once (the key holds the file's
    size and modification time, so an edited file is read again).

    Args:
        name_or_path: As :func:`resolve_eval_set` takes it; ``None`` for the default set.

    Returns:
        The validated set (the same object for every call while the file is unchanged).

    Raises:
        EvalSetNotFoundError: No such set or file.
        EvalSetError: The file is invalid (every problem listed).
    """
    file = resolve_eval_set(name_or_path)
    stat = file.stat()
    return _load_cached(file, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=32)
def _load_cached(file: Path, _mtime_ns: int, _size: int) -> EvalSet:
    return load_eval_set(file)


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
        return None, f"expected a JSON object {{...}}, got {json_type(obj)}"
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


def evals_dir() -> Path:
    """The folder bare set names resolve in: ``PHI3OPS_EVALS_DIR``, else the project's evals/."""
    configured = get_settings().evals_dir
    if configured is not None:
        return configured.expanduser().resolve()
    # installed editable from a checkout: <repo>/phi3ops/evalset/loading.py -> <repo>/evals
    return Path(__file__).resolve().parents[2] / "evals"


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
    if isinstance(target, str) and NAME_RE.fullmatch(target):
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
