"""The waiting queue's structure (fake clock): per-scope lines, what each event re-examines, and
that the kept state is always what one pass over the whole queue in order would decide.

``check_queue`` is the invariant: every waiter is either a head (tried and blocked, holding the
line on the scopes it is blocked on) or parked behind an earlier head of one of its scopes,
exactly as a pass over the queue in priority-then-arrival order would put it; the indexes agree;
and no head could be admitted now (no grant was missed).
"""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import pytest

from hive_ratelimit_plugin._engine import _HEAD, _PARKED, Engine, Scope, Ticket, Waiter, _due_at
from hive_ratelimit_plugin._waiting import acquire_async
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.errors import RateLimitQueueTimeout
from hive_ratelimit_plugin.testing import FakeClock


def scope(key: str = "global", level: str = "global", **limits: int) -> Scope:
    return Scope(level, key, LimitSet(**limits))


def ticket(n: int | str, *scopes: Scope, tin: int = 0, tout: int = 0, prio: int = 0) -> Ticket:
    return Ticket(call_id=str(n), scopes=list(scopes), input_tokens=tin, output_tokens=tout, priority=prio)


def nop() -> None:
    pass


class TryCounter:
    """Counts the engine's admission attempts (each is a Redis round trip on that backend)."""

    def __init__(self, eng: Engine) -> None:
        self.calls: list[str] = []
        inner = eng._try

        def counted(t: Ticket, now: float) -> Any:
            self.calls.append(t.call_id)
            return inner(t, now)

        eng._try = counted  # type: ignore[method-assign]


def check_queue(eng: Engine, *, no_missed_grant: bool = True) -> None:
    """Assert the queue's invariants (see the module docstring)."""
    waiters = sorted(eng._waiters, key=lambda w: w.rank)
    assert not eng._pending
    # waiting() answers from an index of the waiting call ids: it agrees with the queue
    assert eng._waiting_ids == dict(collections.Counter(w.ticket.call_id for w in waiters))
    assert set(eng._heads) == {w for w in waiters if w.state is _HEAD}
    # One pass in order, each head's last answer standing for its try.
    held: set[str] = set()
    for w in waiters:
        assert not w.granted and w.error is None
        conflict = held & w.keys
        if conflict:
            assert w.state is _PARKED, (w, conflict)
            assert w.parked_on in conflict and w in eng._parked[w.parked_on].items
            # (blocked.keys: the scopes it was held on when parked; cancel() names the current ones)
            assert w.blocked is not None and w.blocked.limit == "queue" and w.parked_on in w.blocked.keys
            assert w.retry_at is None
        else:
            assert w.state is _HEAD, w
            assert w.blocked is not None and w.blocked.limit != "queue" and w.blocked.keys
            held |= w.blocked.keys
    # The indexes.
    assert set(eng._front) == set(eng._blocking)
    for k, line in eng._blocking.items():
        assert line.items and line.ranks == sorted(line.ranks) == [w.rank for w in line.items]
        assert all(w.state is _HEAD and k in w.blocked.keys for w in line.items)  # type: ignore[union-attr]
        assert eng._front[k] == line.items[0].rank
    for k, line in eng._parked.items():
        assert line.items and line.ranks == sorted(line.ranks) == [w.rank for w in line.items]
        assert all(w.state is _PARKED and w.parked_on == k and eng._front[k] < w.rank for w in line.items)
    for k, line in eng._by_scope.items():
        assert line.items and line.ranks == sorted(line.ranks)
        assert all(w.state is _HEAD and k in w.keys for w in line.items)
    for k, sized in eng._sized.items():
        assert k in eng._by_scope
        for sizes in sized.values():
            assert set(sizes.items) == set(eng._by_scope[k].items) and sizes.sizes == sorted(sizes.sizes)
    heads = [w for w in waiters if w.state is _HEAD]
    assert sum(len(x) for x in eng._by_scope.values()) == sum(len(w.keys) for w in heads)
    assert sum(len(x) for x in eng._blocking.values()) == sum(len(w.blocked.keys) for w in heads)  # type: ignore[union-attr]
    assert sum(len(x) for x in eng._parked.values()) == len(waiters) - len(heads)
    due = {(at, w) for at, _, w in eng._due}
    for w in heads:
        at = _due_at(w.blocked)  # type: ignore[arg-type]
        if at is not None:
            assert (at, w) in due, w
    if not waiters:
        assert not (eng._heads or eng._blocking or eng._front or eng._parked or eng._by_scope or eng._due)
    if no_missed_grant:
        now = eng.clock()
        for w in heads:  # none fits now, so trying them in order would commit nothing
            _, blocked = eng._evaluate(w.ticket, now)
            assert blocked is not None, f"{w} fits now but waits"
            # ... and none holds the line on a scope where it would fit now (calls that wait
            # behind it there would be held up for nothing)
            assert w.blocked.keys <= blocked.keys, (w, w.blocked, blocked)  # type: ignore[union-attr]
            if not eng._committed:
                # No call took room since the last dispatch: each holds the line exactly where it
                # is blocked (of its scopes; API-key choices hold no line).
                assert w.blocked.keys & w.keys == blocked.keys & w.keys, (w, w.blocked, blocked)  # type: ignore[union-attr]


# ---------------------------------------------------------------- order
def test_order_across_priorities_and_scopes(clock: FakeClock) -> None:
    """Per scope: higher priority first, then arrival; scopes do not hold each other up."""
    eng = Engine(clock)
    a = scope("model:p/a", "model", requests_per_minute=1)
    b = scope("model:p/b", "model", requests_per_minute=1)
    g = scope(requests_per_minute=1000)
    assert eng.acquire(ticket("a0", g, a), nop) is None
    assert eng.acquire(ticket("b0", g, b), nop) is None
    names = [("a-low", a, -10), ("b-low", b, -10), ("a-normal", a, 0), ("a-high", a, 10), ("b-normal", b, 0),
             ("a-high2", a, 10), ("b-high", b, 10), ("a-normal2", a, 0)]
    waiters = {n: eng.acquire(ticket(n, g, s, prio=p), nop) for n, s, p in names}
    check_queue(eng)
    order: list[str] = []
    for _ in range(6):
        clock.advance(61)
        eng.dispatch()
        check_queue(eng)
        order += sorted((n for n, w in waiters.items() if w is not None and w.granted and n not in order),
                        key=lambda n: n[0])
    assert [n for n in order if n[0] == "a"] == ["a-high", "a-high2", "a-normal", "a-normal2", "a-low"]
    assert [n for n in order if n[0] == "b"] == ["b-high", "b-normal", "b-low"]
    assert order[:2] == ["a-high", "b-high"]  # one per scope and minute, both scopes at once
    assert eng.queue_length == 0
    check_queue(eng)


def test_line_is_held_only_on_blocked_scopes(clock: FakeClock) -> None:
    """A waiter holds the line on the scope it is blocked on, not on its other scopes; a
    higher-priority newcomer blocked on a shared scope parks the lower ones behind it."""
    eng = Engine(clock)
    g = scope(concurrent_requests=3)
    u1 = scope("user:1", "user", concurrent_requests=1)
    u2 = scope("user:2", "user", concurrent_requests=1)
    assert eng.acquire(ticket("u1-first", g, u1), nop) is None
    w1 = eng.acquire(ticket("u1-second", g, u1), nop)  # blocked on user:1 only
    assert w1 is not None and w1.blocked is not None and w1.blocked.keys == {"user:1"}
    assert eng.acquire(ticket("u2-first", g, u2), nop) is None  # global is not held by w1
    w3 = eng.acquire(ticket("u1-third", g, u1), nop)  # parked behind w1 on user:1
    assert w3 is not None and w3.blocked is not None and w3.blocked.limit == "queue"
    assert eng.acquire(ticket("g-only", g), nop) is None  # global: 3 of 3 in flight now
    w4 = eng.acquire(ticket("u2-second", g, u2), nop)
    assert w4 is not None and w4.blocked is not None and w4.blocked.keys == {"global", "user:2"}
    high = eng.acquire(ticket("u1-high", g, u1, prio=10), nop)  # before w1 on user:1 and global
    assert high is not None and high.blocked is not None and high.blocked.keys == {"global", "user:1"}
    check_queue(eng)
    assert w1.state is _PARKED and w4.state is _PARKED  # both behind the high-priority head now
    eng.release("g-only")  # room on global: high still waits for user:1, w4 for user:2
    check_queue(eng)
    assert not any(w.granted for w in (w1, w3, w4, high))
    assert high.blocked.keys == {"user:1"} and w4.state is _HEAD and w4.blocked.keys == {"user:2"}
    eng.release("u2-first")
    assert w4.granted and not any(w.granted for w in (w1, w3, high))
    check_queue(eng)
    eng.release("u1-first")
    assert high.granted and not w1.granted and w1.state is _HEAD and w3.state is _PARKED
    check_queue(eng)
    eng.release("u1-high")
    assert w1.granted and not w3.granted and w3.state is _HEAD
    check_queue(eng)


def test_a_big_waiting_call_holds_the_token_room_it_no_longer_fits(clock: FakeClock) -> None:
    """A call waiting for its user's slot, once other calls took the global token room it needs,
    holds the line there too: a smaller later call does not take that room first."""
    eng = Engine(clock)
    g = scope(tokens_per_minute=1000)
    u = [scope(f"user:{i}", "user", concurrent_requests=1) for i in range(4)]
    assert eng.acquire(ticket("u1-first", g, u[1], tin=100), nop) is None
    big = eng.acquire(ticket("big", g, u[1], tin=600), nop)
    assert big is not None and big.blocked is not None and big.blocked.keys == {"user:1"}
    assert eng.acquire(ticket("other", g, u[2], tin=350), nop) is None  # 550 left: big no longer fits
    eng.dispatch()
    check_queue(eng)
    assert big.blocked.keys == {"user:1", "global"}
    small = eng.acquire(ticket("small", g, u[3], tin=100), nop)  # would fit, but big is first
    assert small is not None and small.blocked is not None and small.blocked.limit == "queue"
    eng.release("u1-first", input_tokens=100, output_tokens=0)
    assert not big.granted and not small.granted and big.blocked.keys == {"global"}
    check_queue(eng)
    eng.release("other", input_tokens=10, output_tokens=0)  # 340 tokens back
    assert big.granted and small.granted
    check_queue(eng)


def test_after_calls_take_room_only_waiters_that_may_not_fit_are_looked_at(clock: FakeClock) -> None:
    """50 small calls and one big one wait for their users' slots; another call takes global
    token room: the first of them and the big one are looked at again (the big one holds the
    line on global now), not all 51."""
    eng = Engine(clock)
    g = scope(tokens_per_minute=10_000)
    users = [scope(f"user:{i}", "user", concurrent_requests=1) for i in range(60)]
    for i in range(52):
        assert eng.acquire(ticket(f"first{i}", g, users[i], tin=10), nop) is None
    small = [eng.acquire(ticket(f"small{i}", g, users[i], tin=10), nop) for i in range(50)]
    big = eng.acquire(ticket("big", g, users[50], tin=5000), nop)
    assert big is not None and big.blocked is not None and big.blocked.keys == {"user:50"}
    assert eng.acquire(ticket("taker", g, users[55], tin=4500), nop) is None  # 4980 left
    counter = TryCounter(eng)
    eng.dispatch()
    assert sorted(counter.calls) == ["big", "small0"]
    assert big.blocked.keys == {"user:50", "global"}
    check_queue(eng)
    late = eng.acquire(ticket("late", g, users[56], tin=10), nop)  # fits, but behind big on global
    assert late is not None and late.blocked is not None and late.blocked.limit == "queue"
    assert not any(w.granted for w in small if w is not None)


def test_a_call_blocked_on_two_windows_stops_holding_the_one_that_clears_first(clock: FakeClock) -> None:
    """Blocked on the global window (free again at 1061) and its model's (at 1091): from 1061 on
    it holds only its model, and a call to another model waiting behind it on global goes."""
    eng = Engine(clock)
    g = scope(requests_per_minute=2)
    a = scope("model:p/a", "model", requests_per_minute=1)
    b = scope("model:p/b", "model", requests_per_minute=10)
    assert eng.acquire(ticket("c1", g), nop) is None
    clock.advance(30)
    assert eng.acquire(ticket("c2", g, a), nop) is None
    h = eng.acquire(ticket("h", g, a), nop)
    assert h is not None and h.blocked is not None and h.blocked.keys == {"global", "model:p/a"}
    assert h.retry_at == 1091.0 and h.blocked.eases_at == 1061.0
    x = eng.acquire(ticket("x", g, b), nop)
    assert x is not None and x.blocked is not None and x.blocked.limit == "queue"
    clock.advance(32)  # 1062
    eng.dispatch()
    check_queue(eng)
    assert x.granted and not h.granted and h.blocked.keys == {"model:p/a"}
    clock.advance(30)  # 1092
    eng.dispatch()
    assert h.granted


def test_new_api_key_limits_brought_by_a_call_reach_the_calls_waiting_there(clock: FakeClock) -> None:
    """After a reload, the first call carrying an API key's new limit applies it; the calls
    waiting for that key are looked at again at once."""
    eng = Engine(clock)
    g = scope(requests_per_minute=100)
    k1 = Scope("key", "key:p/1", LimitSet(requests_per_minute=1))
    first = ticket("first", g)
    first.choices = [k1]
    assert eng.acquire(first, nop) is None
    waiting = ticket("waiting", g)
    waiting.choices = [k1]
    w = eng.acquire(waiting, nop)
    assert w is not None and w.blocked is not None and w.blocked.keys == {"key:p/1"}
    eng.rescope(lambda t: [Scope("global", "global", g.limits, generation=1)])  # choices are not re-resolved
    assert not w.granted
    newer = ticket("newer", g)
    newer.choices = [Scope("key", "key:p/1", LimitSet(requests_per_minute=3), generation=1)]
    assert eng.acquire(newer, nop) is None
    assert w.granted
    check_queue(eng)


def test_a_release_re_examines_only_the_waiters_blocked_on_its_scopes(clock: FakeClock) -> None:
    """1000 users, each with one call in flight and one waiting: a release tries the waiter of
    its user (and the first waiter of the shared scope, which may not fit there any more)."""
    n = 1000
    eng = Engine(clock, max_queue=2 * n)
    g = scope(requests_per_minute=10**9)
    users = [scope(f"user:{i}", "user", concurrent_requests=1) for i in range(n)]
    for i, u in enumerate(users):
        assert eng.acquire(ticket(f"first{i}", g, u), nop) is None
    waiters = [eng.acquire(ticket(f"second{i}", g, u), nop) for i, u in enumerate(users)]
    counter = TryCounter(eng)
    for i in reversed(range(n)):
        eng.release(f"first{i}")
        assert f"second{i}" in counter.calls and len(counter.calls) <= 3
        counter.calls.clear()
        assert waiters[i] is not None and waiters[i].granted  # type: ignore[union-attr]
        if i % 100 == 0:
            check_queue(eng)
    assert eng.queue_length == 0
    check_queue(eng)


def test_draining_one_scope_tries_each_waiter_about_once(clock: FakeClock) -> None:
    """A queue of 1000 on one concurrency slot drains with one or two tries per release."""
    n = 1000
    eng = Engine(clock, max_queue=n)
    g = scope(concurrent_requests=1)
    assert eng.acquire(ticket("c-1", g), nop) is None
    waiters = [eng.acquire(ticket(f"c{i}", g), nop) for i in range(n)]
    counter = TryCounter(eng)
    eng.release("c-1")
    for i, w in enumerate(waiters):
        assert w is not None and w.granted
        assert all(not x.granted for x in waiters[i + 1:i + 3])  # type: ignore[union-attr]
        eng.release(f"c{i}")
    assert len(counter.calls) <= 2 * n
    assert counter.calls == sorted(counter.calls, key=lambda c: int(c[1:]))  # in arrival order
    check_queue(eng)


# ---------------------------------------------------------------- timeouts, cancellation
async def test_thousands_of_waiters_time_out_together(clock: FakeClock) -> None:
    """2000 asyncio waiters past their deadline at once: each gets RateLimitQueueTimeout with the
    scope and limit that held it, and the engine tries each at most about once."""
    n = 2000
    eng = Engine(clock, max_queue=n)
    clock.attach(eng)
    g = scope(requests_per_minute=1)
    assert await acquire_async(eng, ticket("first", g), 30) == 0.0
    tasks = [asyncio.create_task(acquire_async(eng, ticket(i, g), 30)) for i in range(n)]
    while eng.queue_length < n:
        await asyncio.sleep(0)
    check_queue(eng)
    counter = TryCounter(eng)
    clock.advance(31)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RateLimitQueueTimeout) for r in results)
    assert len(counter.calls) <= n + 1
    first = results[0]
    assert isinstance(first, RateLimitQueueTimeout)
    assert first.scope == "global" and first.limit == "requests_per_minute"
    assert first.retry_after == pytest.approx(1061.0 - clock(), abs=1.0)
    assert all(r.scope == "global" and r.limit in ("requests_per_minute", "queue") for r in results)  # type: ignore[union-attr]
    assert eng.queue_length == 0
    check_queue(eng)


def test_waiting_knows_each_queued_call_id_until_it_leaves_the_queue(clock: FakeClock) -> None:
    eng = Engine(clock)
    g = scope(requests_per_minute=1)
    assert eng.acquire(ticket("first", g), nop) is None
    waiters = [eng.acquire(ticket(f"w{i}", g), nop) for i in range(3)]
    assert [eng.waiting(f"w{i}") for i in range(3)] == [True, True, True]
    assert not eng.waiting("first") and not eng.waiting("nobody")
    assert waiters[1] is not None
    eng.cancel(waiters[1])
    assert not eng.waiting("w1") and eng.waiting("w0") and eng.waiting("w2")
    clock.advance(61)
    eng.dispatch()
    assert not eng.waiting("w0") and eng.waiting("w2")  # w0 admitted, w2 still behind it
    check_queue(eng)


def test_cancelling_leaks_nothing(clock: FakeClock) -> None:
    """Cancelling waiters in any order (heads, parked, granted ones) leaves a consistent queue,
    and nothing at all once it is empty."""
    eng = Engine(clock)
    g = scope(requests_per_minute=4)
    models = [scope(f"model:p/{m}", "model", requests_per_minute=1) for m in "abc"]
    for i, m in enumerate(models):
        assert eng.acquire(ticket(f"first{i}", g, m), nop) is None
    waiters = [eng.acquire(ticket(i, g, models[i % 3], prio=(i % 4 - 1) * 10), nop) for i in range(60)]
    rng = random.Random(7)
    rng.shuffle(waiters)
    for i, w in enumerate(waiters):
        assert w is not None
        if eng.cancel(w):
            eng.release(w.ticket.call_id)
        check_queue(eng)
        if i % 10 == 0:
            clock.advance(61)
            eng.dispatch()
            check_queue(eng)
    assert eng.queue_length == 0
    assert eng.cancel(waiters[0]) is False  # a second cancel is harmless


def test_an_error_inside_a_pass_leaves_no_waiter_stranded(clock: FakeClock) -> None:
    """If trying a waiter raises something unexpected, the rest of that pass is done at the
    next dispatch: nobody stays parked behind a head that is gone."""
    eng = Engine(clock)
    g = scope(concurrent_requests=1)
    assert eng.acquire(ticket("holder", g), nop) is None
    waiters = [eng.acquire(ticket(i, g), nop) for i in range(3)]
    inner = eng._try

    def flaky(t: Ticket, now: float) -> Any:
        if t.call_id == "0":
            raise RuntimeError("boom")
        return inner(t, now)

    eng._try = flaky  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        eng.release("holder")
    eng._try = inner  # type: ignore[method-assign]
    assert eng._pending
    eng.dispatch()
    check_queue(eng)
    assert waiters[0] is not None and waiters[0].granted


# ---------------------------------------------------------------- configuration, stats
def test_rescope_rebuilds_the_queue(clock: FakeClock) -> None:
    """After a configuration change the queue is one fresh pass: raised limits admit in order."""
    eng = Engine(clock)
    g = scope(requests_per_minute=1)
    assert eng.acquire(ticket("first", g), nop) is None
    waiters = [eng.acquire(ticket(i, g, prio=10 if i == 3 else 0), nop) for i in range(5)]
    check_queue(eng)
    raised = scope(requests_per_minute=3)
    eng.rescope(lambda t: [Scope("global", "global", raised.limits, generation=1)])
    check_queue(eng)
    assert [w.ticket.call_id for w in waiters if w is not None and w.granted] == ["0", "3"]
    assert eng.queue_length == 3


def test_queued_counts_per_scope(clock: FakeClock) -> None:
    """get_usage_stats' per-level "queued": every waiting call counts at each of its scopes."""
    eng = Engine(clock)
    g = scope(requests_per_minute=100)
    a = scope("agent:a", "agent", requests_per_minute=1)
    b = scope("agent:b", "agent", requests_per_minute=1)
    for s in (a, b):
        assert eng.acquire(ticket(f"first-{s.key}", g, s), nop) is None
    for i in range(3):
        eng.acquire(ticket(f"a{i}", g, a), nop)
    eng.acquire(ticket("b0", g, b), nop)
    snap = eng.snapshot()
    assert (snap["global"]["queued"], snap["agent:a"]["queued"], snap["agent:b"]["queued"]) == (4, 3, 1)
    assert eng.queue_length == 4


def test_wake_all_notifies_in_queue_order(clock: FakeClock) -> None:
    eng = Engine(clock)
    g = scope(requests_per_minute=1)
    assert eng.acquire(ticket("first", g), nop) is None
    woken: list[str] = []
    for n, p in (("low", -10), ("normal", 0), ("high", 10), ("normal2", 0)):
        eng.acquire(ticket(n, g, prio=p), lambda n=n: woken.append(n))  # type: ignore[misc]
    eng.wake_all()
    assert woken == ["high", "normal", "normal2", "low"]


# ---------------------------------------------------------------- random workloads
@pytest.mark.parametrize("seed", range(12))
def test_random_workload_keeps_the_invariants(clock: FakeClock, seed: int) -> None:
    """Random arrivals, releases, settlements, cancellations, clock moves and reloads over shared
    and separate scopes, API-key choices and three priorities: after every event the queue is
    what a full pass would make of it, and no waiter that fits is left waiting."""
    rng = random.Random(seed)
    eng = Engine(clock, max_queue=200)
    eng.low_priority_share = rng.choice([1.0, 0.8])
    gen = 0

    def limits() -> dict[str, Scope]:
        out = {"global": scope(requests_per_minute=rng.randint(4, 12), concurrent_requests=rng.randint(3, 8))}
        for m in "ab":
            out[m] = Scope("model", f"model:p/{m}", LimitSet(requests_per_minute=rng.randint(2, 6),
                                                                tokens_per_minute=rng.randint(400, 900)), gen)
        for u in range(4):
            out[f"u{u}"] = Scope("user", f"user:{u}", LimitSet(concurrent_requests=rng.randint(1, 2)), gen)
        for k in ("k1", "k2"):
            out[k] = Scope("key", f"key:p/{k}", LimitSet(requests_per_minute=rng.randint(2, 5),
                                                         concurrent_requests=rng.randint(1, 2)), gen)
        return out

    sc = limits()
    in_flight: list[str] = []
    queued: list[Waiter] = []
    done = granted_later = 0

    def collect() -> None:
        nonlocal done, granted_later
        for w in list(queued):
            if w.granted:
                queued.remove(w)
                in_flight.append(w.ticket.call_id)
                granted_later += 1
            elif w.error is not None:
                queued.remove(w)
                done += 1

    for step in range(400):
        op = rng.random()
        if op < 0.45:
            parts = [sc["global"], sc[rng.choice("ab")]]
            if rng.random() < 0.7:
                parts.append(sc[f"u{rng.randrange(4)}"])
            t = ticket(f"c{step}", *parts, tin=rng.randint(10, 150), tout=rng.randint(0, 50),
                       prio=rng.choice([-10, 0, 0, 10]))
            if rng.random() < 0.3:
                t.choices = [sc["k1"], sc["k2"]]
            w = eng.acquire(t, nop)
            if w is None:
                in_flight.append(t.call_id)
            else:
                queued.append(w)
        elif op < 0.65 and in_flight:
            cid = in_flight.pop(rng.randrange(len(in_flight)))
            eng.release(cid, input_tokens=rng.randint(0, 20), output_tokens=rng.randint(0, 20))
        elif op < 0.70 and in_flight:
            eng.settle(rng.choice(in_flight), rng.randint(0, 10), 0)
        elif op < 0.73 and in_flight:
            eng.free_slot(rng.choice(in_flight))
        elif op < 0.83 and queued:
            w = queued.pop(rng.randrange(len(queued)))
            if eng.cancel(w):
                in_flight.append(w.ticket.call_id)
        elif op < 0.98:
            clock.advance(rng.choice([0.5, 3.0, 11.0, 31.0]))
            eng.dispatch()
        else:
            gen += 1
            sc = limits()
            eng.rescope(lambda t, sc=sc: [sc["global"]] + [sc[k] for k in sc for s in t.scopes  # type: ignore[misc]
                                                           if s.key == sc[k].key and k != "global"])
        collect()
        check_queue(eng)
        assert eng.queue_length == len(queued)
    assert granted_later > 10  # (the workload did queue calls, and granted them later)


def test_a_call_waiting_for_a_slot_wakes_when_an_abandoned_lease_can_be_reclaimed(clock: FakeClock) -> None:
    """A stream nobody reads gives no callback: its slot comes back when its lease expires. A call
    waiting for that slot has no retry time of its own, so it must still wake then (not sleep
    until its deadline and time out), and the dispatch it runs on waking must grant it."""
    from hive_ratelimit_plugin._waiting import _sleep_for

    eng = Engine(clock, lease_seconds=30)
    g = scope(concurrent_requests=1)
    assert eng.acquire(ticket("abandoned", g), nop) is None
    clock.advance(2)  # past the engine's once-a-second sweep of expired leases
    waiter = eng.acquire(ticket("next", g), nop)
    assert waiter is not None and waiter.retry_at is None  # waits for a release
    assert _sleep_for(eng, waiter, deadline=clock() + 60) == pytest.approx(28)
    clock._now += 28  # (no advance(): it would dispatch by itself)
    eng.dispatch()
    assert waiter.granted
    assert not eng.holds("abandoned")
