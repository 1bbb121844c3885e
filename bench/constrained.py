"""Constrained decoding (``--only constrained``): what a grammar costs, and what batching keeps.

On the packaged ONNX model, loaded once in this process (its pyfunc's python model, so MLflow's
schema check is not timed):

* one request at a time: free text vs a JSON schema answer (a string field the random weights
  fill until ``max_tokens``, so both run the same number of steps): tokens/s and their ratio,
  the cost of llguidance's mask per token;
* eight rows in one call: free greedy rows (one batch) vs eight rows with sampling and a seed
  each (still one batch: rows sample on their own), eight rows under one schema (one batch),
  and eight rows under two schemas, four each (two batches: og takes one grammar per batch).

Contenders alternate, round by round (A-B, B-A), in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: One answer: a string the weights fill (both runs take ``max_tokens`` steps).
_FILL = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
_OTHER = {
    "type": "object",
    "properties": {"note": {"type": "string"}, "ok": {"type": "boolean"}},
    "required": ["note", "ok"],
    "additionalProperties": False,
}

Row = tuple[str, str, float, str]


def _format(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def _rows_of(kind: str, prompts: list[str], max_tokens: int) -> list[dict[str, Any]]:
    rows = []
    for n in range(8):
        row: dict[str, Any] = {
            "messages": [{"role": "user", "content": prompts[n % len(prompts)]}],
            "max_tokens": max_tokens,
        }
        if kind == "seeded":
            row |= {"temperature": 0.5 + 0.1 * n, "top_p": 0.9, "seed": n}
        elif kind == "one schema":
            row["response_format"] = _format(_FILL, "fill")
        elif kind == "two schemas":
            row["response_format"] = _format(_FILL, "fill") if n % 2 else _format(_OTHER, "other")
        rows.append(row)
    return rows


def _timed(model: Any, rows: list[dict[str, Any]]) -> tuple[int, float]:
    started = time.perf_counter()
    answers = model.predict(None, rows)
    seconds = time.perf_counter() - started
    return sum(int(a["usage"]["completion_tokens"]) for a in answers), seconds


def _alternating(
    contenders: dict[str, Callable[[], tuple[int, float]]], rounds: int
) -> dict[str, float]:
    """tokens/s of each contender, over ``rounds`` rounds run A-B, B-A..."""
    tokens = dict.fromkeys(contenders, 0)
    seconds = dict.fromkeys(contenders, 0.0)
    names = list(contenders)
    for number in range(rounds):
        for name in names if number % 2 == 0 else names[::-1]:
            count, spent = contenders[name]()
            tokens[name] += count
            seconds[name] += spent
    return {name: tokens[name] / seconds[name] for name in names}


def constrained_section(
    packaged: dict[str, Any], args: Any, prompts: list[str], section: Callable[..., str]
) -> str:
    """The report section: measures, then formats with ``section(key, setup, rows)``."""
    import mlflow

    model = mlflow.pyfunc.load_model(str(packaged["onnx"])).unwrap_python_model()
    tokens, rounds = args.max_tokens, max(2, args.rounds)
    single = [{"messages": [{"role": "user", "content": prompts[0]}], "max_tokens": tokens}]
    constrained = [{**single[0], "response_format": _format(_FILL, "fill")}]
    model.predict(None, constrained)  # the grammar's first compile is not timed
    one = _alternating(
        {
            "free": lambda: _timed(model, single),
            "json schema": lambda: _timed(model, constrained),
        },
        rounds * 2,
    )
    kinds = ("greedy", "seeded", "one schema", "two schemas")
    batches = {kind: _rows_of(kind, prompts, tokens) for kind in kinds}
    for batch in batches.values():
        model.predict(None, batch)  # warm: grammars compiled, rates measured

    def timed(kind: str) -> Callable[[], tuple[int, float]]:
        return lambda: _timed(model, batches[kind])

    eight = _alternating({kind: timed(kind) for kind in kinds}, rounds)
    rows: list[Row] = [
        (
            "1 request: JSON schema vs free text (tokens/s)",
            f"{one['json schema']:.0f} vs {one['free']:.0f}",
            one["json schema"] / one["free"],
            ">= 0.5 (a constrained token costs at most 2x)",
        ),
        (
            "8 rows, each its own sampling and seed vs 8 greedy rows (tokens/s)",
            f"{eight['seeded']:.0f} vs {eight['greedy']:.0f}",
            eight["seeded"] / eight["greedy"],
            "close to 1 (one batch either way)",
        ),
        (
            "8 rows, one JSON schema vs 8 free rows (tokens/s)",
            f"{eight['one schema']:.0f} vs {eight['greedy']:.0f}",
            eight["one schema"] / eight["greedy"],
            ">= 0.5 (one batch)",
        ),
        (
            "8 rows, two JSON schemas (4 + 4) vs 8 free rows (tokens/s)",
            f"{eight['two schemas']:.0f} vs {eight['greedy']:.0f}",
            eight["two schemas"] / eight["greedy"],
            "report (two batches: one grammar per og batch)",
        ),
    ]
    params = getattr(packaged.get("recipe"), "num_parameters", 0)
    setup = (
        f"preset `{args.preset}`, {params:,} parameters; max_tokens={tokens}; {rounds} rounds "
        f"(single requests: {rounds * 2}), contenders alternating; compact JSON grammars "
        "(llguidance in onnxruntime-genai)."
    )
    return section("constrained", setup, rows)
