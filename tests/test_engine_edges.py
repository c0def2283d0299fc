"""Engine edges: a margin of 0 counts requests from admission; a call over a learned limit goes
alone under the high-priority reserve too. Both backends."""
from __future__ import annotations

from typing import Any

import pytest

from hive_ratelimit_plugin._engine import Scope, Ticket
from hive_ratelimit_plugin._retry import RateSignals
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.testing import FakeClock


def scope(key="global", level="global", **limits):
    return Scope(level, key, LimitSet(**limits))


def ticket(n, *scopes, tin=0, tout=0, prio=0):
    return Ticket(call_id=str(n), scopes=list(scopes), input_tokens=tin, output_tokens=tout, priority=prio)


class Woken:
    def __init__(self): self.count = 0
    def __call__(self): self.count += 1


def test_sweep_then_waiter_granted(clock: FakeClock, make_engine: Any) -> None:
    eng = make_engine(clock, lease_seconds=5.0)
    g = scope(concurrent_requests=1)
    assert eng.acquire(ticket(1, g), Woken()) is None
    w = eng.acquire(ticket(2, g), Woken())
    assert w is not None
    clock.advance(6.0)
    eng.sweep()
    eng.dispatch()
    assert w.granted


def test_margin_zero_counts_from_admission(clock: FakeClock, make_engine: Any) -> None:
    """docs: arrival_margin_seconds 0 counts from admission."""
    eng = make_engine(clock)
    eng.arrival_margin = 0.0
    g = scope(requests_per_second=1)
    assert eng.acquire(ticket(1, g), Woken()) is None
    clock.advance(0.9)
    eng.note_attempt("1")
    clock.advance(0.2)  # 1.1 s after admission
    w = eng.acquire(ticket(2, g), Woken())
    assert w is None


def _learn_tokens(eng, m, n):
    sig = RateSignals()
    sig.limit_tokens = n
    assert eng.acquire(ticket("learn", m), Woken()) is None
    eng.release("learn", signals=sig)


def test_big_call_over_learned_limit_goes_alone_with_reserve(clock: FakeClock, make_engine: Any) -> None:
    """queue.high_priority_reserve 0.2: a normal call larger than a learned limit, the window
    empty, is never admitted (it waited max_wait_seconds for nothing; before 6e6844f it was
    refused at once)."""
    eng = make_engine(clock)
    eng.low_priority_share = 0.8
    m = scope("model:openai/x", "model")
    _learn_tokens(eng, m, 100)
    clock.advance(61)  # the window is empty
    w = eng.acquire(ticket("big", m, tin=300, tout=10), Woken())
    for _ in range(10):
        if w is None or w.granted:
            break
        clock.advance(1.0)
        eng.dispatch()
    assert w is None or w.granted

@pytest.mark.parametrize("settle_after", [0.05, 0.5, 3.0])
def test_recount_then_settle_counts_once(clock: FakeClock, make_engine: Any, settle_after: float) -> None:
    eng = make_engine(clock)
    g = scope(requests_per_second=5, requests_per_minute=100)
    assert eng.acquire(ticket("a", g), Woken()) is None
    clock.advance(0.9)
    eng.note_attempt("a")  # late: recounted from here
    clock.advance(settle_after)
    eng.release("a")
    snap = eng.snapshot()["global"]
    print(snap)
    assert snap["requests_per_minute"]["used"] == 1
    clock.advance(0.3)
    snap = eng.snapshot()["global"]
    assert snap["requests_per_minute"]["used"] == 1
