"""The process's KV budget: reservations within the total, a release wakes the batchers
watching it, and models loaded with the same budget share one object.
"""

from __future__ import annotations

import gc
import threading

import pytest

from phi3_chat.admission import KVBudget, shared_kv_budget


def test_reservations_stay_within_the_total() -> None:
    budget = KVBudget(100)
    assert budget.try_reserve(60) and budget.reserved == 60 and budget.available() == 40
    assert not budget.try_reserve(41)  # 101 > 100: refused, nothing taken
    assert budget.reserved == 60
    assert budget.try_reserve(40) and budget.available() == 0
    budget.release(60)
    budget.release(40)
    assert budget.reserved == 0
    budget.release(10)  # more than held never goes below zero
    assert budget.reserved == 0
    with pytest.raises(ValueError, match="positive"):
        KVBudget(0)


def test_a_release_wakes_the_watching_batchers() -> None:
    budget = KVBudget(100)
    condition = threading.Condition()
    budget.watch(condition)
    assert budget.try_reserve(100)
    woken = threading.Event()

    def waiter() -> None:
        with condition:
            ready.set()
            if condition.wait(30):  # only a notify ends this wait early
                woken.set()

    ready = threading.Event()
    thread = threading.Thread(target=waiter)
    thread.start()
    assert ready.wait(5)
    with condition:  # the waiter is inside wait() once it has let go of the lock
        pass
    budget.release(100)
    thread.join(30)
    assert woken.is_set()


def test_the_same_bytes_are_one_budget_while_a_model_holds_it() -> None:
    first = shared_kv_budget(12345)
    assert shared_kv_budget(12345) is first
    assert shared_kv_budget(12346) is not first
    first.try_reserve(5)
    assert shared_kv_budget(12345).reserved == 5
    del first
    gc.collect()
    assert shared_kv_budget(12345).reserved == 0  # nobody held the old one: a new, empty one
