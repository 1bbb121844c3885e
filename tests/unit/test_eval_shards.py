"""Sharded evaluation pieces (tasks/evaluation/shards.py): the plan keeps every predict batch
whole, so the merged answers equal an unsharded run's; the merge restores eval-set order and
refuses gaps and doubles.
"""

from __future__ import annotations

from typing import Any

import pytest

from phi3ops.errors import EvaluationError, InvalidInputError
from phi3ops.evalset import EvalItem, EvalSet
from tasks.evaluation import generate_outputs, plan_batches
from tasks.evaluation.shards import merge_generations, plan_shards, shard_of


def _set(n: int, *, long_every: int = 3) -> EvalSet:
    items = [
        EvalItem.model_validate(
            {
                "id": f"i{k}",
                "prompt": f"prompt {k}",
                "expectations": {"contains": "x"},
                "tags": ["t"],
                # Two generation settings, interleaved: batches are per setting.
                **({"max_tokens": 8} if k % long_every == 0 else {}),
            }
        )
        for k in range(n)
    ]
    return EvalSet(name="fake", path="/tmp/fake.jsonl", items=items, content_hash="h" * 64)


class BatchEcho:
    """Answers with the prompt and the batch it came in: equal answers mean equal batches."""

    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [row["messages"][-1]["content"] for row in rows]
        return [
            {
                "choices": [{"message": {"role": "assistant", "content": f"{p} | {prompts}"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            }
            for p in prompts
        ]


@pytest.mark.parametrize(("n", "shards", "batch_size"), [(13, 2, 4), (13, 3, 2), (5, 8, 2)])
def test_shards_are_whole_batches_of_the_unsharded_plan(n: int, shards: int, batch_size: int):
    eval_set = _set(n)
    plan = plan_shards(eval_set, shards=shards, batch_size=batch_size, default_max_tokens=64)
    batches = plan_batches(eval_set.items, default_max_tokens=64, batch_size=batch_size)

    assert len(plan) == min(shards, len(batches))
    assert sorted(i for ids in plan for i in ids) == sorted(item.id for item in eval_set.items)
    ids = [item.id for item in eval_set.items]
    unsharded = sorted(tuple(ids[i] for i in batch) for batch in batches)
    resharded = sorted(
        tuple(part.items[i].id for i in batch)
        for part in (shard_of(eval_set, item_ids) for item_ids in plan)
        for batch in plan_batches(part.items, default_max_tokens=64, batch_size=batch_size)
    )
    assert resharded == unsharded


def test_merged_shards_answer_exactly_as_one_unsharded_run() -> None:
    eval_set = _set(11)
    options = {"batch_size": 3, "default_max_tokens": 64, "ttft_samples": 0}
    whole = generate_outputs(BatchEcho(), eval_set, **options)
    plan = plan_shards(eval_set, shards=3, batch_size=3, default_max_tokens=64)
    parts = [generate_outputs(BatchEcho(), shard_of(eval_set, ids), **options) for ids in plan]

    merged = merge_generations(eval_set, list(reversed(parts)))  # any order of arrival

    fields = ("id", "content", "batch_size", "completion_tokens")
    assert [[getattr(r, f) for f in fields] for r in merged.items] == [
        [getattr(r, f) for f in fields] for r in whole.items
    ]
    assert merged.wall_s == max(part.wall_s for part in parts)
    assert any("3 shards" in note for note in merged.notes)


def test_merge_refuses_missing_and_doubled_items() -> None:
    eval_set = _set(4)
    options = {"batch_size": 2, "default_max_tokens": 64, "ttft_samples": 0}
    first = generate_outputs(BatchEcho(), shard_of(eval_set, ["i0", "i1"]), **options)
    with pytest.raises(EvaluationError, match=r"No shard answered eval items \['i2', 'i3'\]"):
        merge_generations(eval_set, [first])
    with pytest.raises(EvaluationError, match="answered by two shards"):
        merge_generations(eval_set, [first, first])


def test_bad_shard_requests_fail_before_any_work() -> None:
    with pytest.raises(InvalidInputError, match="shards must be an integer >= 1"):
        plan_shards(_set(3), shards=0)
    with pytest.raises(InvalidInputError, match=r"no items \['nope'\]"):
        shard_of(_set(3), ["i0", "nope"])
