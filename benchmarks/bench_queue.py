"""Benchmark: the cost of the waiting queue with thousands of waiters (CPU seconds, fake clock).

Each scenario queues ``n`` calls on an :class:`~hive_ratelimit_plugin._engine.Engine` driven by a
:class:`~hive_ratelimit_plugin.testing.FakeClock` (nothing sleeps) and times, with
``time.process_time``, the engine work of one burst of events:

* ``clock_jump``: ``n`` asyncio callers (the real driver, ``acquire_async``) wait on one scope
  allowing 1 request per minute; the clock jumps a minute (one is granted, every waiter wakes
  and re-checks), then past every deadline (``n - 1`` ``RateLimitQueueTimeout``). This is
  ``tests/test_hostile.py::test_5000_waiters_clock_jump_is_not_quadratic``.
* ``drain_concurrency``: ``n`` waiters on one scope with ``concurrent_requests: 1``; each release
  grants the next one, until the queue is empty (``n`` releases).
* ``many_scopes``: ``n`` waiters, each blocked on its own user scope (1 request per minute),
  all sharing the global scope; each of ``n`` releases concerns one user.
* ``cancel_storm``: ``n`` waiters on one scope, cancelled in random order.

Run alone: ``python benchmarks/bench_queue.py [--n 5000] [--only NAME]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from hive_ratelimit_plugin._engine import Engine, Scope, Ticket
from hive_ratelimit_plugin._waiting import acquire_async
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.errors import RateLimitQueueTimeout
from hive_ratelimit_plugin.testing import FakeClock


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def clock_jump(n: int) -> dict[str, float]:
    async def run() -> dict[str, float]:
        clock = FakeClock()
        eng = Engine(clock, max_queue=n + 10)
        clock.attach(eng)
        g = Scope("global", "global", LimitSet(requests_per_minute=1))
        assert await acquire_async(eng, Ticket("first", [g]), 90) == 0.0
        tasks = [asyncio.create_task(acquire_async(eng, Ticket(str(i), [g]), 90)) for i in range(n)]
        while eng.queue_length < n:
            await asyncio.sleep(0)
        t0 = time.process_time()
        clock.advance(61)
        while eng.admitted_total < 2:
            await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)
        jump = time.process_time() - t0
        t0 = time.process_time()
        clock.advance(30)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        storm = time.process_time() - t0
        assert sum(isinstance(r, RateLimitQueueTimeout) for r in results) == n - 1
        assert eng.queue_length == 0
        return {"clock_jump_s": jump, "timeout_storm_s": storm}

    return asyncio.run(run())


def drain_concurrency(n: int) -> dict[str, float]:
    clock = FakeClock()
    eng = Engine(clock, max_queue=n + 10)
    g = Scope("global", "global", LimitSet(concurrent_requests=1))
    assert eng.acquire(Ticket("c-1", [g]), lambda: None) is None
    waiters = [eng.acquire(Ticket(f"c{i}", [g]), lambda: None) for i in range(n)]

    def drain() -> None:
        eng.release("c-1")
        for i, w in enumerate(waiters):
            assert w is not None and w.granted
            eng.release(f"c{i}")

    took, _ = _timed(drain)
    assert eng.queue_length == 0
    return {"drain_s": took}


def many_scopes(n: int) -> dict[str, float]:
    clock = FakeClock()
    eng = Engine(clock, max_queue=2 * n + 10)
    g = Scope("global", "global", LimitSet(requests_per_minute=10**9))
    users = [Scope("user", f"user:{i}", LimitSet(concurrent_requests=1)) for i in range(n)]
    for i, u in enumerate(users):
        assert eng.acquire(Ticket(f"first{i}", [g, u]), lambda: None) is None
    waiters = [eng.acquire(Ticket(f"second{i}", [g, u]), lambda: None) for i, u in enumerate(users)]

    def releases() -> None:
        for i in range(n):
            eng.release(f"first{i}")
            assert waiters[i] is not None and waiters[i].granted  # type: ignore[union-attr]

    took, _ = _timed(releases)
    assert eng.queue_length == 0
    return {"releases_s": took}


def cancel_storm(n: int) -> dict[str, float]:
    clock = FakeClock()
    eng = Engine(clock, max_queue=n + 10)
    g = Scope("global", "global", LimitSet(requests_per_minute=1))
    assert eng.acquire(Ticket("first", [g]), lambda: None) is None
    waiters = [eng.acquire(Ticket(str(i), [g]), lambda: None) for i in range(n)]
    random.Random(1).shuffle(waiters)

    def cancel_all() -> None:
        for w in waiters:
            assert w is not None
            eng.cancel(w)

    took, _ = _timed(cancel_all)
    assert eng.queue_length == 0
    return {"cancel_s": took}


SCENARIOS: dict[str, Callable[[int], dict[str, float]]] = {
    "clock_jump": clock_jump,
    "drain_concurrency": drain_concurrency,
    "many_scopes": many_scopes,
    "cancel_storm": cancel_storm,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="waiting calls per scenario (default 5000)")
    p.add_argument("--only", choices=list(SCENARIOS), action="append", help="run only this scenario")
    args = p.parse_args()
    for name in args.only or SCENARIOS:
        out = SCENARIOS[name](args.n)
        figures = ", ".join(f"{k} {v:.3f}" for k, v in out.items())
        print(f"{name} (n={args.n}): {figures} (CPU seconds)")


if __name__ == "__main__":
    main()
