"""Admission predicts the batches the batcher really runs: one set of rules (`batch_members`,
`batch_cut`) for both, checked on a real `_Batcher` given a queue of mixed grammars.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from phi3_chat.admission import _Rates, planned_batches
from phi3_chat.batcher import _Batcher, _row
from phi3_chat.guidance import Guidance
from phi3_chat.request import _Request, _Sampling

JSON = Guidance("lark_grammar", "start: %json {}", end="json")
OTHER_JSON = Guidance("lark_grammar", 'start: %json {"type": "object"}', end="json")
TOOLS = Guidance("lark_grammar", "start: TEXT | CALLS", end="eos")  # ends only when it stops


def request(prompt_tokens: int, max_tokens: int, guidance: Guidance | None = None) -> _Request:
    return _Request(
        index=0,
        shape="chat",
        input_ids=np.arange(prompt_tokens, dtype=np.int32),
        max_tokens=max_tokens,
        stop=(),
        sampling=_Sampling(do_sample=False, temperature=0.0, top_p=1.0, top_k=0),
        guidance=guidance,
    )


def test_the_batcher_runs_a_mixed_queue_in_the_batches_admission_plans() -> None:
    rates = _Rates()
    rates.observe_prefill(10, 0.1)  # 10 ms per prompt token
    rates.observe_step(1, 0.001)
    ran: list[list[_Request]] = []
    started, release = threading.Event(), threading.Event()
    every_batch_ran = threading.Event()
    queue = [
        request(10, 5),
        request(10, 5, JSON),
        request(10, 5, TOOLS),
        request(40, 5),  # its KV cache with any other row's would pass the budget
        request(10, 5, OTHER_JSON),
        request(10, 5, JSON),
        request(10, 5),
        request(10, 5, TOOLS),
        request(10, 5),
        request(10, 5, JSON),
        request(10, 5),
        request(10, 5),
    ]

    def steps(batch: list[_Request]) -> Iterator[Any]:
        ran.append(batch)
        if len(ran) == 1:
            started.set()
            release.wait(10)  # the first batch runs while the whole queue arrives
        if len(ran) == 1 + len(plan):
            every_batch_ran.set()
        return iter(())

    batcher = _Batcher(
        steps,
        lambda rows: True,
        max_batch_size=3,
        max_queue=len(queue) + 1,
        wait_s=0,
        rates=rates,
        prefill_slice_s=0.25,  # at most 25 padded prompt tokens per batch: two short rows
        kv_per_token=1,
        kv_budget=3 * (10 + 5),  # three short rows, or one long one
    )
    plan = planned_batches([_row(r) for r in queue], rates, batcher.limits)
    batcher.submit([request(10, 5)], timeout_s=60, stream=False)
    assert started.wait(10)
    for row in queue:
        batcher.submit([row], timeout_s=60, stream=False)
    release.set()
    position = {id(r): i for i, r in enumerate(queue)}
    assert every_batch_ran.wait(10), [[position.get(id(r)) for r in batch] for batch in ran]
    assert [[position[id(r)] for r in batch] for batch in ran[1:]] == plan
    # The rules at work: grammars batch apart, a tool grammar alone, the KV budget cuts the
    # first free-text batch to its first row, the prefill slice cuts three rows to two.
    assert plan == [[0], [1, 5], [2], [3], [4], [6, 8], [7], [9], [10, 11]]
