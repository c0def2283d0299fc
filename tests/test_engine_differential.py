"""Differential fuzzing: the in-memory engine and the Redis engine, driven by one seeded random
sequence of operations on one fake clock, must give the same answers.

Every operation is applied to both engines: admissions (admit_now, acquire without waiting, queued
acquire; API keys to choose from; budgets with reserved costs; deadlines), settle, release with each outcome
(usage above and below the estimate or unknown, a 429's wait, rate-limit headers), forget,
free_slot, note_attempt, renew, cancel, clock steps from 10 ms to minutes (leases run out), reads.
Every observable result is compared: admitted or not, why not (scope, limit, when it frees, every
scope it is blocked on), the API key picked, which waiting calls are granted, the usage of every
window, calls in flight, held_for, provider_state (cooldowns, circuits, learned and adaptive
limits), budgets and spend. Invariants are checked on the way: an admission never takes a request
or concurrency limit past its limit, in-flight counts match the calls open, and once every call
has ended nothing is in flight or queued anywhere.

Left out of the comparison: the line across processes (a place lives 1.5 s of Redis' real time,
which a fake clock does not move) is disabled; see Pair.

The default run (collected by CI) uses a few fixed seeds. More, on demand::

    DIFF_SEEDS=200 DIFF_OPS=600 python -m pytest -q tests/test_engine_differential.py

Environment: ``DIFF_SEEDS`` (seeds, default 6), ``DIFF_SEED0`` (first seed, 0), ``DIFF_OPS``
(operations per seed, 300), ``DIFF_DEADLINES`` (the share of calls with a deadline, 0.25; a waiter
is cancelled once its deadline passes, as the plugin's waiting does). A failure prints the seed
and the operations that led to it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from hive_ratelimit_plugin import _lua
from hive_ratelimit_plugin._engine import NEVER, Engine, Scope, Ticket
from hive_ratelimit_plugin._redis import RedisEngine
from hive_ratelimit_plugin._retry import RateSignals
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.errors import HiveRateLimitError
from hive_ratelimit_plugin.testing import FakeClock

from .conftest import REDIS_URL, redis_client

N_SEEDS = int(os.environ.get("DIFF_SEEDS", "6"))
SEED0 = int(os.environ.get("DIFF_SEED0", "0"))
N_OPS = int(os.environ.get("DIFF_OPS", "300"))
DEADLINES = float(os.environ.get("DIFF_DEADLINES", "0.25"))  # the share of calls with a deadline
EPS = 1e-6


# ----------------------------------------------------------------- a random world of scopes
def _limits(rng: random.Random, level: str) -> LimitSet:
    """Random, mostly small limits (so that calls are refused often)."""
    kw: dict[str, Any] = {}
    tight = rng.random() < 0.3  # (some scopes refuse often, most let calls in)
    if rng.random() < 0.5:
        name = rng.choices(["requests_per_minute", "requests_per_second", "requests_per_hour"], [5, 3, 1])[0]
        kw[name] = rng.randint(2, 8) if tight else rng.randint(10, 60 if name == "requests_per_hour" else 30)
    if rng.random() < 0.4:
        kw[rng.choices(["tokens_per_minute", "tokens_per_hour"], [3, 1])[0]] = rng.randint(800, 6000) if tight \
            else rng.randint(8000, 40000)
    if rng.random() < 0.2:
        kw["input_tokens_per_minute"] = rng.randint(500, 4000) if tight else rng.randint(5000, 20000)
    if rng.random() < 0.2:
        kw["output_tokens_per_minute"] = rng.randint(300, 3000) if tight else rng.randint(3000, 10000)
    if rng.random() < 0.4:
        kw["concurrent_requests"] = rng.randint(1, 3) if tight else rng.randint(3, 8)
    return LimitSet(**kw)


@dataclass
class World:
    """The scopes of one run, and the plans (lists of scopes) calls are made with."""

    rng: random.Random
    budgets: bool
    plans: list[list[Scope]] = field(default_factory=list)
    choices: list[list[Scope] | None] = field(default_factory=list)  # per plan: API keys to pick from

    @classmethod
    def build(cls, rng: random.Random, budgets: bool) -> World:
        w = cls(rng, budgets)

        def lim(level: str) -> LimitSet:
            limits = _limits(rng, level)
            if budgets and rng.random() < 0.5:
                name = rng.choice(["max_cost_per_hour", "max_cost_per_day"])
                limits = limits.model_copy(update={name: rng.choice([5.0, 20.0, 60.0])})
            return limits

        glob = Scope("global", "global", lim("global"))
        provs = [Scope("provider", f"provider:p{i}", lim("provider")) for i in range(2)]
        models = [Scope("model", f"model:p{i}/m{j}", lim("model")) for i in range(2) for j in range(2)]
        agents = [Scope("agent", f"agent:a{i}", lim("agent")) for i in range(3)]
        users = [Scope("user", f"user:u{i}", lim("user")) for i in range(2)]
        keys = [[Scope("key", f"key:p{i}/k{j}", _limits(rng, "key")) for j in range(2)] for i in range(2)]
        for _ in range(6):
            m = rng.choice(models)
            p = provs[int(m.key.split(":p")[1][0])]
            w.choices.append(keys[int(p.key[-1])] if rng.random() < 0.3 else None)
            plan = [glob, p, m]
            if rng.random() < 0.8:
                plan.append(rng.choice(agents))
            if rng.random() < 0.4:
                plan.append(rng.choice(users))
            w.plans.append(plan)
        return w


# ----------------------------------------------------------------- the two engines side by side
def _blocked(b: Any, shared: bool) -> tuple[str, str, float | None, tuple[str, ...]]:
    """A refusal as both backends can tell it: scope, limit, when the window frees the room
    (Redis' own ``retry_at`` may be an earlier poll time: its ``frees_at`` is the window's), and
    every scope it is blocked on."""
    frees = b.frees_at if shared else b.retry_at
    return (b.scope, b.limit, frees, tuple(sorted(b.keys)))


class Pair:
    """A memory engine and a Redis engine, and a log of what was done to them."""

    def __init__(self, clock: FakeClock, prefix: str, **kwargs: Any) -> None:
        self.clock = clock
        wall: Callable[[], float] = lambda: 1_750_000_000.0 + clock()  # noqa: E731
        self.mem = Engine(clock, wall_clock=wall, **kwargs)
        self.red = RedisEngine(clock, url=REDIS_URL, prefix=prefix, server_time=False, wall_clock=wall, **kwargs)
        # The line across processes (ahead_in_line in _lua) orders the waiting calls of different
        # processes; a place in it lives 1.5 s of Redis' real time, which a fake clock does not move.
        # With one process the engine's own queue is the whole order: compared without it.
        line = "if redis.call('EXISTS', P .. ':qa:' .. head[1]) == 1 then return true end"
        assert line in _lua.ADMIT
        self.red._admit = self.red.r.register_script(_lua.ADMIT.replace(line, ""))
        self.log: list[str] = []
        # each engine gets its own list object per plan (as the plugin's plan cache does)
        self._lists: dict[tuple[int, int], list[Scope]] = {}

    def scopes(self, which: int, plan_no: int, plan: list[Scope]) -> list[Scope]:
        k = (which, plan_no)
        if k not in self._lists:
            self._lists[k] = list(plan)
        return self._lists[k]

    def fail(self, what: str) -> None:
        tail = "\n".join(self.log[-60:])
        pytest.fail(f"{what}\n--- last operations ({len(self.log)} in all):\n{tail}", pytrace=False)


def _error(exc: HiveRateLimitError) -> tuple[str, Any, Any]:
    return (type(exc).__name__, getattr(exc, "scope", None), getattr(exc, "limit", None))


def _admit(eng: Engine, t: Ticket, fast: bool) -> tuple[str, Any]:
    try:
        if fast and eng.admit_now(t):
            return ("admitted", None)
        w = eng.acquire(t, None)
    except HiveRateLimitError as exc:
        return ("error", _error(exc))
    if w is None:
        return ("admitted", None)
    assert w.blocked is not None
    return ("blocked", _blocked(w.blocked, isinstance(eng, RedisEngine)))


def _same_blocked(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[:2] != b[:2] or (a[3] != b[3] and a[1] != "queue"):
        # (behind whom in the line: the scopes the waiters ahead hold it at, which may differ when
        # those waiters were last looked at at different times; Redis keeps a refusal until its
        # retry time, see RedisEngine._try)
        return False
    if (a[2] is None) != (b[2] is None):
        return False
    return a[2] is None or b[2] is None or abs(a[2] - b[2]) < 1e-3


def _stats(eng: Engine) -> dict[str, dict[str, Any]]:
    return eng.snapshot()


def _compare_snapshots(pair: Pair, open_calls: dict[str, list[Scope]]) -> None:
    ms, rs = _stats(pair.mem), _stats(pair.red)
    for key in sorted(set(ms) & set(rs)):
        m, r = ms[key], rs[key]
        names = {n for n in (*m, *r) if isinstance(m.get(n, r.get(n)), dict)}
        for n in sorted(names):
            if n not in m or n not in r:
                pair.fail(f"{key}: {n} only in {'memory' if n in m else 'redis'}: memory {m} redis {r}")
            if abs(m[n]["used"] - r[n]["used"]) > EPS or m[n]["limit"] != r[n]["limit"]:
                pair.fail(f"{key} {n}: memory {m[n]} redis {r[n]}")
        if m["in_flight"] != r["in_flight"]:
            pair.fail(f"{key} in_flight: memory {m['in_flight']} redis {r['in_flight']}")
    # the reference: every open call holds one in-flight count in each of its scopes
    expect: dict[str, int] = {}
    for scopes in open_calls.values():
        for s in scopes:
            expect[s.key] = expect.get(s.key, 0) + 1
    for key, m in ms.items():
        if m["in_flight"] != expect.get(key, 0):
            pair.fail(f"{key}: memory in_flight {m['in_flight']}, {expect.get(key, 0)} calls open there")
        conc = m.get("concurrent_requests")
        if conc is not None and conc["used"] > conc["limit"]:
            pair.fail(f"{key}: memory has {conc['used']} in flight over concurrent_requests={conc['limit']}")
    for key, r in rs.items():
        conc = r.get("concurrent_requests")
        if conc is not None and conc["used"] > conc["limit"]:
            pair.fail(f"{key}: redis has {conc['used']} in flight over concurrent_requests={conc['limit']}")


def _compare_signals(pair: Pair, keys: list[str]) -> None:
    mh, rh = pair.mem.held_for(keys), pair.red.held_for(keys)
    if set(mh) != set(rh) or any(abs(mh[k] - rh[k]) > 1e-3 for k in mh):
        pair.fail(f"held_for: memory {mh} redis {rh}")
    mp, rp = pair.mem.provider_state(), pair.red.provider_state()
    for key in sorted(set(mp) & set(rp)):
        a, b = mp[key], rp[key]
        if set(a) != set(b) or any(
                (abs(a[f] - b[f]) > 1e-3 if isinstance(a[f], float) else a[f] != b[f]) for f in a):
            pair.fail(f"provider_state {key}: memory {a} redis {b}")


# ----------------------------------------------------------------- one run
def _signals(rng: random.Random) -> RateSignals:
    """Rate-limit headers as a provider may send them."""
    sig = RateSignals()
    if rng.random() < 0.7:
        sig.limit_requests = rng.choice([3, 10, 60])
        sig.remaining_requests = rng.choice([0, 1, 5])
        sig.reset_requests = rng.choice([None, 1.0, 20.0])
    if rng.random() < 0.5:
        sig.limit_tokens = rng.choice([2000, 10_000])
        sig.remaining_tokens = rng.choice([0, 500])
        sig.reset_tokens = rng.choice([None, 6.0])
        if rng.random() < 0.2:  # (Anthropic's: no token limit to hold calls to, see read_signals)
            sig.limit_tokens, sig.learn_tokens = None, False
    if rng.random() < 0.15:
        sig.limit_input_tokens = rng.choice([1500, 8000])
    if rng.random() < 0.15:
        sig.limit_output_tokens = rng.choice([500, 4000])
    return sig


class Run:
    """One seeded sequence of operations on a :class:`Pair`, with its reference bookkeeping."""

    def __init__(self, seed: int, prefix: str, budgets: bool) -> None:
        self.rng = rng = random.Random(seed)
        self.deadlines = random.Random(seed + 1_000_003)  # (apart: the other draws stay those of the seed)
        self.clock = FakeClock(1000.0 + rng.random() * 100)
        self.world = World.build(rng, budgets)
        self.pair = Pair(self.clock, prefix)
        self.pair.log.append(f"seed {seed}; plans: " + "; ".join(
            "[" + ", ".join(f"{s.key} {s.limits.model_dump(exclude_none=True)}" for s in p) + "]"
            for p in self.world.plans))
        self.open: dict[str, list[Scope]] = {}  # call id -> its scopes (both engines admitted it)
        self.freed: set[str] = set()  # open calls whose slots were freed (free_slot)
        self.waiting: dict[str, tuple[Any, Any]] = {}  # call id -> (memory's waiter, Redis')
        self.plan_of: dict[str, int] = {}  # waiting call id -> its plan
        self.n = 0
        self.provider_keys = sorted({s.key for p in self.world.plans for s in p if s.level in ("model", "key")}
                                    | {s.key for c in self.world.choices for s in c or ()})

    def note(self, text: str) -> None:
        self.pair.log.append(f"t={self.clock():.3f} {text}")

    # -- operations
    def admit(self) -> None:
        rng, pair = self.rng, self.pair
        self.n += 1
        cid = f"c{self.n}"
        plan_no = rng.randrange(len(self.world.plans))
        plan = self.world.plans[plan_no]
        tin = rng.choice([0, 10, 100, 400, 1000, 3000])
        tout = rng.choice([0, 5, 50, 300, 800])
        cached = rng.choice([0, 0, 0, tin // 2])
        prio = rng.choice([0, 0, 0, 10])
        cost = rng.choice([0.0, 0.5, 2.0, 7.0]) if self.world.budgets else 0.0
        how = rng.choice(["fast", "try", "try", "queue"])
        deadline = NEVER
        if self.deadlines.random() < DEADLINES:  # (an open circuit or a cooldown past it refuses the call)
            deadline = self.clock() + self.deadlines.choice([0.5, 3.0, 20.0, 100.0])
        self.note(f"admit {cid} plan={plan_no} in={tin} out={tout} cached={cached} prio={prio} cost={cost} {how}"
                  + (f" deadline={deadline:.3f}" if deadline != NEVER else ""))
        got = []
        waiters = []
        before = pair.mem.snapshot()
        tickets = []
        choices = self.world.choices[plan_no]
        for which, eng in enumerate((pair.mem, pair.red)):
            scopes = pair.scopes(which, plan_no, plan)
            keys = ["global", *(s.key for s in scopes if s.budgeted and s.key != "global")]
            t = Ticket(cid, scopes, input_tokens=tin, output_tokens=tout, priority=prio, cached_input=cached,
                       cost=cost, spend_keys=keys, choices=list(choices) if choices else None, deadline=deadline)
            tickets.append(t)
            if how == "queue":
                try:
                    w = eng.acquire(t, lambda: None)
                except HiveRateLimitError as exc:
                    got.append(("error", _error(exc)))
                    continue
                waiters.append(w)
                got.append(("admitted", None) if w is None else
                           ("blocked", _blocked(w.blocked, isinstance(eng, RedisEngine))))
            else:
                got.append(_admit(eng, t, how == "fast"))
        (ka, va), (kb, vb) = got
        self.note(f"  -> {ka}" + (f" {va[1]}" if ka == "blocked" else ""))
        if ka != kb or (ka == "blocked" and not _same_blocked(va, vb)) or (ka == "error" and va != vb):
            pair.fail(f"admission of {cid}: memory {got[0]} redis {got[1]}")
        if ka == "admitted":
            if tickets[0].chosen != tickets[1].chosen:
                pair.fail(f"admission of {cid}: memory chose {tickets[0].chosen}, redis {tickets[1].chosen}")
            self.admitted(cid, self._charged(plan_no, tickets[0].chosen), before)
        elif waiters:
            self.waiting[cid] = (waiters[0], waiters[1])
            self.plan_of[cid] = plan_no

    def _charged(self, plan_no: int, chosen: str | None) -> list[Scope]:
        """The scopes a call of plan ``plan_no`` counts in: the plan's, and the API key it was given."""
        plan = list(self.world.plans[plan_no])
        return plan + [k for k in self.world.choices[plan_no] or () if k.key == chosen]

    def admitted(self, cid: str, plan: list[Scope], before: dict[str, dict[str, Any]]) -> None:
        self.open[cid] = list(plan)
        # an admission never takes a request or concurrency window past its limit (retries, counted
        # as requests without admission, may: see Engine.note_attempt)
        for key, entry in self.pair.mem.snapshot().items():
            for name, v in entry.items():
                if isinstance(v, dict) and (name.startswith("requests_per") or name == "concurrent_requests") \
                        and v["used"] > v["limit"] and v["used"] > before.get(key, {}).get(name, {}).get("used", 0):
                    self.pair.fail(f"admitting {cid} took {key} {name} to {v['used']} > {v['limit']}")

    def check_waiters(self, before: dict[str, dict[str, Any]]) -> None:
        """The same waiting calls are granted (or fail) on both sides."""
        for cid, (wm, wr) in sorted(self.waiting.items()):
            a = ("granted" if wm.granted else "error" if wm.error is not None else "waiting",
                 type(wm.error).__name__ if wm.error is not None else None)
            b = ("granted" if wr.granted else "error" if wr.error is not None else "waiting",
                 type(wr.error).__name__ if wr.error is not None else None)
            if a != b:
                self.pair.fail(f"waiter {cid}: memory {a} redis {b}")
            if a[0] == "granted":
                self.note(f"  {cid} granted")
                del self.waiting[cid]
                if wm.ticket.chosen != wr.ticket.chosen:
                    self.pair.fail(f"waiter {cid}: memory chose {wm.ticket.chosen}, redis {wr.ticket.chosen}")
                self.admitted(cid, self._charged(self.plan_of.pop(cid), wm.ticket.chosen), before)
            elif a[0] == "error":
                del self.waiting[cid]

    def cancel(self) -> None:
        cid = self.rng.choice(sorted(self.waiting))
        wm, wr = self.waiting.pop(cid)
        self.note(f"cancel {cid}")
        a, b = self.pair.mem.cancel(wm), self.pair.red.cancel(wr)
        if a != b:
            self.pair.fail(f"cancel {cid}: memory {a} redis {b}")

    def end(self, cid: str, outcome: str, **kw: Any) -> None:
        self.note(f"release {cid} outcome={outcome} {kw}")
        a = self.pair.mem.release(cid, outcome=outcome, **kw)
        b = self.pair.red.release(cid, outcome=outcome, **kw)
        if a != b:
            self.pair.fail(f"release {cid}: memory {a} redis {b}")
        self.open.pop(cid, None)
        self.freed.discard(cid)

    def release(self) -> None:
        rng = self.rng
        cid = rng.choice(sorted(self.open))
        outcome = rng.choices(["success", "rate_limited", "failure", "error", "void"], [6, 2, 1, 1, 1])[0]
        kw: dict[str, Any] = {}
        if outcome != "void":
            if rng.random() < 0.7:
                kw["input_tokens"] = rng.choice([0, 50, 200, 1500, 5000])
            if rng.random() < 0.7:
                kw["output_tokens"] = rng.choice([0, 3, 100, 900])
            if self.world.budgets and rng.random() < 0.7:
                kw["cost"] = rng.choice([0.0, 0.3, 1.0, 9.0])
        else:
            kw["input_tokens"] = kw["output_tokens"] = 0
        if outcome == "rate_limited" and rng.random() < 0.6:
            kw["wait"] = rng.choice([0.5, 2.0, 20.0])
        if outcome in ("success", "rate_limited") and rng.random() < 0.3:
            kw["signals"] = _signals(rng)
        self.end(cid, outcome, **kw)

    def settle(self) -> None:
        rng = self.rng
        cid = rng.choice(sorted(self.open))
        tin = rng.choice([None, 0, 80, 2000])
        tout = rng.choice([None, 0, 40, 700])
        self.note(f"settle {cid} in={tin} out={tout}")
        a, b = self.pair.mem.settle(cid, tin, tout), self.pair.red.settle(cid, tin, tout)
        if a != b:
            self.pair.fail(f"settle {cid}: memory {a} redis {b}")

    def forget(self) -> None:
        cid = self.rng.choice(sorted(self.open))
        self.note(f"forget {cid}")
        self.pair.mem.forget(cid)
        self.pair.red.forget(cid)
        self.open.pop(cid)
        self.freed.discard(cid)

    def free_slot(self) -> None:
        cid = self.rng.choice(sorted(self.open))
        self.note(f"free_slot {cid}")
        self.pair.mem.free_slot(cid)
        self.pair.red.free_slot(cid)
        self.freed.add(cid)

    def attempt(self) -> None:
        cid = self.rng.choice(sorted(self.open))
        self.note(f"note_attempt {cid}")
        self.pair.mem.note_attempt(cid)
        self.pair.red.note_attempt(cid)

    def renew(self) -> None:
        cid = self.rng.choice(sorted(self.open))
        self.note(f"renew {cid}")
        self.pair.mem.renew(cid)
        self.pair.red.renew(cid)

    def advance(self) -> None:
        dt = self.rng.choice([0.01, 0.1, 0.4, 1.0, 1.7, 5.0, 15.0, 61.0, 200.0])
        self.clock.advance(dt)
        self.note(f"advance {dt}")
        for cid in sorted(self.waiting):  # (the caller gives up at its deadline: see _waiting)
            if self.waiting[cid][0].ticket.deadline <= self.clock():
                self.cancel_id(cid)
        for eng in (self.pair.mem, self.pair.red):
            # Leases that ran out are settled at their estimates. (The engine does it at most once a
            # second, Redis at the exact time: here both at each step of the clock.)
            eng._next_sweep = 0.0
            eng.sweep()
            eng.dispatch()
        for cid in sorted(self.open):
            a, b = self.pair.mem.holds(cid), self.pair.red.holds(cid)
            if a != b:
                self.pair.fail(f"holds({cid}): memory {a} redis {b}")
            if not a:
                self.note(f"  lease of {cid} ran out")
                del self.open[cid]
                self.freed.discard(cid)

    def read(self) -> None:
        self.note("read")
        open_slots = {cid: sc for cid, sc in self.open.items() if cid not in self.freed}
        _compare_snapshots(self.pair, open_slots)
        _compare_signals(self.pair, self.provider_keys)
        if self.world.budgets:
            _compare_budgets(self.pair)

    def step(self) -> None:
        before = self.pair.mem.snapshot() if self.waiting else {}
        op = self.rng.random()
        if op < 0.36:
            self.admit()
        elif op < 0.54 and self.open:
            self.release()
        elif op < 0.57 and self.open:
            self.settle()
        elif op < 0.58 and self.open:
            self.forget()
        elif op < 0.60 and self.open:
            self.free_slot()
        elif op < 0.63 and self.open:
            self.attempt()
        elif op < 0.64 and self.open:
            self.renew()
        elif op < 0.68 and self.waiting:
            self.cancel()
        elif op < 0.89:
            self.advance()
        else:
            self.read()
        self.check_waiters(before)

    def finish(self) -> None:
        """Every call ends: nothing is left in flight anywhere."""
        for cid in sorted(self.waiting):
            self.cancel_id(cid)
        for cid in sorted(self.open):
            self.end(cid, "success")
        self.read()
        for name, snap in (("memory", self.pair.mem.snapshot()), ("redis", self.pair.red.snapshot())):
            for key, entry in snap.items():
                if entry["in_flight"] or entry["queued"]:
                    self.pair.fail(f"{name}: {key} has {entry['in_flight']} in flight, {entry['queued']} queued "
                                   "after every call ended")

    def cancel_id(self, cid: str) -> None:
        wm, wr = self.waiting.pop(cid)
        self.note(f"cancel {cid}")
        a, b = self.pair.mem.cancel(wm), self.pair.red.cancel(wr)
        if a != b:
            self.pair.fail(f"cancel {cid}: memory {a} redis {b}")
        if a:  # granted meanwhile: the caller owns it
            self.end(cid, "void", input_tokens=0, output_tokens=0)


def _compare_budgets(pair: Pair) -> None:
    mb, rb = pair.mem.budget_snapshot(), pair.red.budget_snapshot()
    for key in sorted(set(mb) & set(rb)):
        for name in sorted(set(mb[key]) | set(rb[key])):
            a, b = mb[key].get(name), rb[key].get(name)
            if a is None or b is None or any(
                    (abs(a[f] - b[f]) > 1e-6 if isinstance(a[f], float) else a[f] != b[f]) for f in a):
                pair.fail(f"budget {key} {name}: memory {a} redis {b}")
    ms, rs = pair.mem.spend_snapshot(), pair.red.spend_snapshot()
    for key in sorted(set(ms) & set(rs)):
        for kind in sorted(set(ms[key]) | set(rs[key])):
            a, b = ms[key].get(kind, (0.0, 0, 0)), rs[key].get(kind, (0.0, 0, 0))  # (none: nothing spent)
            if any(abs(x - y) > 1e-6 for x, y in zip(a, b, strict=True)):
                pair.fail(f"spend {key} {kind}: memory {a} redis {b}")


def run(seed: int, prefix: str, n_ops: int, budgets: bool = False) -> None:
    r = Run(seed, prefix, budgets)
    for _ in range(n_ops):
        r.step()
    r.finish()


@pytest.mark.parametrize("seed", range(SEED0, SEED0 + N_SEEDS))
def test_memory_and_redis_engines_agree(seed: int, redis_prefix: str) -> None:
    run(seed, redis_prefix, N_OPS)


@pytest.mark.parametrize("seed", range(SEED0, SEED0 + N_SEEDS))
def test_memory_and_redis_engines_agree_on_budgets(seed: int, redis_prefix: str) -> None:
    run(seed, redis_prefix, N_OPS, budgets=True)


# ----------------------------------------------------------------- what the fuzzing found, minimized
# (each ran differently on the two backends, or broke an invariant of the memory engine; run on both)
def _t(cid: str, *scopes: Scope, tin: int = 0, tout: int = 0, cost: float = 0.0) -> Ticket:
    return Ticket(cid, list(scopes), input_tokens=tin, output_tokens=tout, cost=cost,
                  spend_keys=["global", *(s.key for s in scopes if s.budgeted and s.key != "global")])


def test_settle_keeps_the_call_open_until_its_release(clock: FakeClock, make_engine: Any) -> None:
    """settle() books the usage; the slot stays taken and the release's outcome still counts
    (Redis freed the slot at settle(), dropped the 429's cooldown and counted spend twice)."""
    eng = make_engine(clock)
    m = Scope("model", "model:x", LimitSet(tokens_per_minute=10_000, concurrent_requests=1))
    assert eng.acquire(_t("1", m, tin=100, tout=100), None) is None
    assert eng.settle("1", 50, 10)
    assert not eng.settle("1", 50, 10)
    used = eng.snapshot()["model:x"]
    assert used["tokens_per_minute"]["used"] == 60 and used["in_flight"] == 1
    w = eng.acquire(_t("2", m), None)
    assert w is not None and w.blocked.limit == "concurrent_requests"
    assert eng.release("1", input_tokens=500, outcome="rate_limited", wait=5.0)
    assert eng.snapshot()["model:x"]["tokens_per_minute"]["used"] == 60  # (settled once)
    assert eng.snapshot()["model:x"]["in_flight"] == 0
    assert eng.held_for(["model:x"]) == {"model:x": pytest.approx(5.0)}
    assert eng.spend_snapshot()["global"]["hour"][1:] == (1, 60)


def test_settled_call_is_in_flight_in_the_stats(clock: FakeClock, make_engine: Any) -> None:
    """A scope without a concurrency limit still shows a settled, unreleased call in flight."""
    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(requests_per_minute=10))
    assert eng.acquire(_t("1", g), None) is None
    eng.settle("1", 0, 0)
    assert eng.snapshot()["global"]["in_flight"] == 1
    eng.release("1")
    assert eng.snapshot()["global"]["in_flight"] == 0


def test_forget_gives_the_slot_back_and_wakes_the_line(clock: FakeClock, make_engine: Any) -> None:
    """forget() frees the slot (Redis kept it until the lease ran out) and lets a waiter in
    (neither engine looked at the queue)."""
    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(concurrent_requests=1))
    assert eng.acquire(_t("1", g), None) is None
    w = eng.acquire(_t("2", g), lambda: None)
    assert w is not None and not w.granted
    eng.forget("1")
    assert w.granted
    assert eng.snapshot()["global"]["in_flight"] == 1


def test_forget_after_settle_keeps_other_reservations(clock: FakeClock, make_engine: Any) -> None:
    """A settled call's budget reservation was given back at settle(): forget() must not give it
    back again (the memory engine zeroed another call's reservation)."""
    eng = make_engine(clock)
    a = Scope("agent", "agent:a", LimitSet(max_cost_per_hour=20.0))
    assert eng.acquire(_t("1", a, cost=7.0), None) is None
    assert eng.acquire(_t("2", a, cost=2.0), None) is None
    eng.settle("2", 0, 0, 1.0)
    eng.forget("2")
    assert eng.budget_snapshot()["agent:a"]["max_cost_per_hour"]["reserved"] == pytest.approx(7.0)


def test_a_refused_try_holds_no_place_in_line(clock: FakeClock, make_engine: Any) -> None:
    """acquire(ticket, None) queues nothing: not in the line across processes either (Redis kept
    the refused call there, ahead of later callers, while its place lived)."""
    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(concurrent_requests=1))
    assert eng.acquire(_t("1", g), None) is None
    w = eng.acquire(_t("2", g), None)
    assert w is not None and w.blocked.limit == "concurrent_requests"
    eng.release("1")
    clock.advance(0.01)
    assert eng.acquire(_t("3", g), None) is None


def test_a_late_request_counts_from_its_arrival(clock: FakeClock, make_engine: Any) -> None:
    """A call answered after its admission's bucket left a 1 s window: its request counts from
    when it reached the provider (Redis dropped it instead)."""
    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(requests_per_second=2))
    clock.advance(0.0005)
    assert eng.acquire(_t("1", g), None) is None
    clock.advance(1.1)
    eng.release("1")
    assert eng.snapshot()["global"]["requests_per_second"]["used"] == 1


def test_more_tokens_than_an_estimate_of_zero_leave_the_window_in_time(clock: FakeClock, make_engine: Any) -> None:
    """A call estimated at 0 input tokens that used some: counted in its admission's bucket, and
    gone with it (Redis kept them a minute longer: the bucket was older than the window's oldest)."""
    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(input_tokens_per_minute=600))
    assert eng.acquire(_t("1", g, tout=10), None) is None
    clock.advance(16.0)
    assert eng.acquire(_t("2", g, tin=100), None) is None
    eng.release("1", input_tokens=5000)
    assert eng.snapshot()["global"]["input_tokens_per_minute"]["used"] == 5100
    clock.advance(45.5)  # the first call's bucket has left the window, the second's not
    assert eng.snapshot()["global"]["input_tokens_per_minute"]["used"] == 100
    assert eng.acquire(_t("3", g, tin=400), None) is None


def test_a_waiter_stops_holding_a_scope_that_eases_first(clock: FakeClock, make_engine: Any) -> None:
    """Blocked on two scopes, one freeing in a minute and one in an hour: after the minute it no
    longer holds the line at the first (Redis kept it there until the hour was over)."""
    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(requests_per_minute=1))
    m = Scope("model", "model:x", LimitSet(requests_per_hour=1))
    other = Scope("model", "model:y", LimitSet())
    assert eng.acquire(_t("1", g, m), None) is None
    eng.release("1")
    w = eng.acquire(_t("2", g, m), lambda: None)
    assert w is not None and not w.granted
    clock.advance(62.0)
    eng.dispatch()
    assert not w.granted
    assert eng.acquire(_t("3", g, other), None) is None


def test_a_budget_refuses_a_call_queued_behind_others(clock: FakeClock, make_engine: Any) -> None:
    """A call behind the line that a spent budget refuses fails at once (with Redis it waited
    in the queue, to fail once at the front)."""
    from hive_ratelimit_plugin.errors import BudgetExceededError

    eng = make_engine(clock, wall_clock=lambda: 1_750_000_000.0 + clock())
    g = Scope("global", "global", LimitSet(concurrent_requests=1))
    a = Scope("agent", "agent:a", LimitSet(max_cost_per_hour=5.0))
    assert eng.acquire(_t("1", g, a, cost=1.0), None) is None
    eng.release("1", cost=5.0)
    assert eng.acquire(_t("2", g), None) is None
    w = eng.acquire(_t("3", g), lambda: None)
    assert w is not None and not w.granted
    with pytest.raises(BudgetExceededError):
        eng.acquire(_t("4", g, a, cost=1.0), lambda: None)


def test_a_scope_is_kept_while_a_call_with_a_freed_slot_is_open(clock: FakeClock, make_engine: Any) -> None:
    """free_slot() then a release after the scope went quiet: the release lands on the scope's
    live state (the memory engine evicted it, and the 429 and usage went to a dropped copy)."""
    eng = make_engine(clock)
    m = Scope("model", "model:x", LimitSet(tokens_per_minute=10_000))
    assert eng.acquire(_t("1", m, tin=100), None) is None
    eng.free_slot("1")
    clock.advance(70.0)
    eng.sweep()
    eng.release("1", input_tokens=100, outcome="rate_limited", wait=30.0)
    assert eng.held_for(["model:x"]) == {"model:x": pytest.approx(30.0)}


def test_failures_toward_the_breaker_outlive_a_quiet_minute(clock: FakeClock, make_engine: Any) -> None:
    """Consecutive provider failures count on across an idle spell (the memory engine evicted the
    model's state, and with it the count, after a minute; Redis keeps it a day)."""
    eng = make_engine(clock)
    m = Scope("model", "model:x", LimitSet())
    for i in range(2):
        assert eng.acquire(_t(str(i), m), None) is None
        eng.release(str(i), outcome="failure")
    clock.advance(70.0)
    eng.sweep()
    assert eng.acquire(_t("x", m), None) is None  # (the sweep runs with an admission too)
    assert eng.provider_state()["model:x"].get("consecutive_failures") == 2


def test_an_attempt_noted_after_settlement_is_not_counted_again(clock: FakeClock, make_engine: Any) -> None:
    """A send reported after the call was settled does not move its request to now (Redis did)."""
    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(requests_per_minute=5))
    assert eng.acquire(_t("1", g), None) is None
    clock.advance(30.0)
    eng.settle("1", 0, 0)
    eng.note_attempt("1")
    eng.release("1")
    clock.advance(33.0)  # (counted from shortly after its admission, as a long call: gone by now)
    assert eng.snapshot()["global"]["requests_per_minute"]["used"] == 0


def test_a_paced_call_goes_when_pacing_ends(clock: FakeClock, make_engine: Any) -> None:
    """Paced after a 429 at a slow rate: the call waiting for the next slot goes when pacing ends,
    not at the slot long after it (the memory engine waited for the slot)."""
    eng = make_engine(clock)
    m = Scope("model", "model:x", LimitSet(requests_per_day=100))  # (a slot every 864 s)
    assert eng.acquire(_t("1", m), None) is None
    eng.release("1", outcome="rate_limited", wait=2.0)  # paced until 2 + 4 s from now
    clock.advance(2.0)
    assert eng.acquire(_t("2", m), lambda: None) is None
    w = eng.acquire(_t("3", m), lambda: None)
    assert w is not None and w.blocked.limit == "pacing"
    clock.advance(4.1)
    eng.dispatch()
    assert w.granted


def test_a_settled_call_whose_lease_runs_out_frees_its_slot(clock: FakeClock, make_engine: Any) -> None:
    """settle() then nothing: when its lease runs out its slot comes back (and nothing is charged
    again)."""
    eng = make_engine(clock, lease_seconds=10.0)
    m = Scope("model", "model:x", LimitSet(tokens_per_minute=10_000, concurrent_requests=1))
    assert eng.acquire(_t("1", m, tin=100), None) is None
    eng.settle("1", 40, 0)
    clock.advance(11.0)
    eng.sweep()
    assert not eng.holds("1")
    assert eng.acquire(_t("2", m, tin=100), None) is None
    assert eng.snapshot()["model:x"]["tokens_per_minute"]["used"] == 140


def test_a_spent_budget_is_spent_whatever_the_rounding(clock: FakeClock, make_engine: Any) -> None:
    """Spend summing to the limit but for float rounding (0.7 + 0.1 + 0.1 < 0.9) trips the budget
    (the memory engine admitted a free call past it; Redis' sums rounded to the limit)."""
    from hive_ratelimit_plugin.errors import BudgetExceededError

    eng = make_engine(clock, wall_clock=lambda: 1_750_000_000.0 + clock())
    a = Scope("agent", "agent:a", LimitSet(max_cost_per_hour=0.9))
    for i, cost in enumerate((0.7, 0.1, 0.1)):
        assert eng.acquire(_t(str(i), a, cost=0.1), None) is None
        eng.release(str(i), cost=cost)
    assert eng.budget_snapshot()["agent:a"]["max_cost_per_hour"]["tripped"]
    with pytest.raises(BudgetExceededError):
        eng.acquire(_t("x", a, cost=0.0), None)


def test_a_burst_cut_by_429s_is_paced_at_its_own_rate(clock: FakeClock, make_engine: Any) -> None:
    """Two 429s within a minute cut the model's rate to 0.7 x the pace it was sent at, measured
    from its oldest request (Redis measured from the window's low edge: a burst 30 s old was taken
    for a minute's traffic, and cut twice as hard)."""
    eng = make_engine(clock)
    m = Scope("model", "model:x", LimitSet())
    assert eng.acquire(_t("old", m), None) is None
    eng.release("old")
    clock.advance(65.0)  # (gone from the window)
    for i in range(20):
        assert eng.acquire(_t(str(i), m), None) is None
        eng.release(str(i))
    clock.advance(29.5)  # the first request 29.5 s ago: 20 in 30 s, 40 a minute
    for i in ("a", "b"):
        assert eng.acquire(_t(i, m), None) is None
    eng.release("a", outcome="rate_limited", wait=0.5)
    eng.release("b", outcome="rate_limited", wait=0.5)
    rate = eng.provider_state()["model:x"]["adaptive_requests_per_minute"]
    assert rate == pytest.approx(22 * 60 / 29.5 * 0.7, rel=0.05)


def test_a_settled_lease_reads_as_open_to_earlier_releases(clock: FakeClock, redis_prefix: str) -> None:
    """A call settle()d whose process then dies is reclaimed by whichever process admits next,
    in a rolling upgrade one of the release before settle() kept calls open. Its reclaim skips a
    lease record with any ``done`` state: the dead call's circuit probe stayed, holding the model
    half-open for a day. The record must read to it as an open call with nothing left to charge."""
    r: Any = redis_client()
    eng = RedisEngine(clock, url=REDIS_URL, prefix=redis_prefix, server_time=False)
    m = Scope("model", "model:x", LimitSet(requests_per_minute=100))
    a = Scope("agent", "agent:a", LimitSet(max_cost_per_hour=5.0))
    r.hset(f"{eng.prefix}:s:model:x", "circuit", "half_open")
    assert eng.acquire(_t("1", m, a, tin=10, tout=10, cost=1.0), None) is None
    assert eng.settle("1", 10, 10, 0.5)
    rec = r.hgetall(f"{eng.prefix}:l:1")
    assert b"done" not in rec  # (a release before this one leaves such a record, and its probe, alone)
    assert rec[b"bs"] == b"" and rec[b"sp"] == b""  # (nothing for its reclaim to give back or charge)
    # its process is gone; another one reclaims it once its lease has run out
    clock.advance(eng.lease_seconds * 3)
    other = RedisEngine(clock, url=REDIS_URL, prefix=redis_prefix, server_time=False)
    assert other.acquire(_t("2", Scope("agent", "agent:b", LimitSet(requests_per_minute=10))), None) is None
    assert r.hget(f"{eng.prefix}:s:model:x", "probe") is None
    assert other.spend("agent:a", "hour")[:2] == (pytest.approx(0.5), 1)  # (charged once)


def test_a_429_after_settling_a_reclaimed_lease_still_counts(clock: FakeClock, redis_prefix: str) -> None:
    """settle() of a call whose Redis lease another process reclaimed deleted its record, so the
    release after it found none and dropped its 429 (no cooldown)."""
    r: Any = redis_client()
    eng = RedisEngine(clock, url=REDIS_URL, prefix=redis_prefix, server_time=False)
    m = Scope("model", "model:x", LimitSet(requests_per_minute=100, concurrent_requests=5))
    assert eng.acquire(_t("1", m, tin=10, tout=10), None) is None
    clock.advance(eng.lease_seconds + 1)
    other = RedisEngine(clock, url=REDIS_URL, prefix=redis_prefix, server_time=False)
    assert other.acquire(_t("2", Scope("agent", "agent:b", LimitSet(requests_per_minute=10))), None) is None
    assert eng.settle("1", 10, 10)
    assert eng.release("1", outcome="rate_limited", wait=30.0)
    assert r.hget(f"{eng.prefix}:s:model:x", "cooldown_until") is not None


def _open_circuit(eng: Any, scopes: list[Scope], choices: list[Scope] | None = None) -> str | None:
    """Two failures in a row open the circuit of the model (or the API key chosen): reopens in 30 s."""
    eng.circuit_threshold = 2
    chosen = None
    for i in range(2):
        t = _t(f"f{i}", *scopes)
        t.choices = list(choices) if choices else None
        assert eng.acquire(t, None) is None
        chosen = chosen or t.chosen
        eng.release(f"f{i}", outcome="failure")
    return chosen


def test_an_open_circuit_is_one_block_among_the_others(clock: FakeClock, make_engine: Any) -> None:
    """With a circuit open, every scope is still checked: the refusal names the first scope's
    reason, every scope it is blocked on, and the time the last of them frees (Redis stopped at
    the open circuit and named it alone)."""
    from hive_ratelimit_plugin.errors import CircuitOpenError

    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(concurrent_requests=1))
    m = Scope("model", "model:x", LimitSet())
    _open_circuit(eng, [g, m])
    opens = clock() + 30.0
    assert eng.acquire(_t("1", g), None) is None
    w = eng.acquire(_t("2", g, m), None)
    assert w is not None and w.blocked.limit == "concurrent_requests" and w.blocked.scope == "global"
    assert w.blocked.keys == {"global", "model:x"}
    frees = w.blocked.frees_at if isinstance(eng, RedisEngine) else w.blocked.retry_at
    assert frees == pytest.approx(opens)
    t = _t("3", m)
    t.deadline = opens - 1.0  # (it would not reopen within the caller's wait)
    with pytest.raises(CircuitOpenError):
        eng.acquire(t, None)


def test_an_api_key_whose_circuit_reopens_first_is_waited_for(clock: FakeClock, make_engine: Any) -> None:
    """Of the API keys to choose from, one has its circuit open and the other is out of requests
    for longer: the call is told to come back when the circuit reopens (Redis left the open key
    out and named the other's later time), or when the other frees if it cannot wait that long."""
    eng = make_engine(clock)
    m = Scope("model", "model:x", LimitSet())
    k0 = Scope("key", "key:k0", LimitSet())
    k1 = Scope("key", "key:k1", LimitSet(requests_per_hour=1))
    assert _open_circuit(eng, [m], [k0]) == "key:k0"
    opens = clock() + 30.0
    t = _t("1", m)
    t.choices = [k1]
    assert eng.acquire(t, None) is None and t.chosen == "key:k1"
    eng.release("1")
    t = _t("2", m)
    t.choices = [k0, k1]
    w = eng.acquire(t, None)
    assert w is not None and w.blocked.limit == "circuit_open" and w.blocked.scope == "key:k0"
    assert w.blocked.keys == {"key:k0", "key:k1"}
    frees = w.blocked.frees_at if isinstance(eng, RedisEngine) else w.blocked.retry_at
    assert frees == pytest.approx(opens)
    t = _t("3", m)
    t.choices = [k0, k1]
    t.deadline = opens - 1.0  # (k0 would not reopen in time: k1 it is)
    w = eng.acquire(t, None)
    assert w is not None and w.blocked.limit == "requests_per_hour" and w.blocked.scope == "key:k1"
    frees = w.blocked.frees_at if isinstance(eng, RedisEngine) else w.blocked.retry_at
    assert frees == pytest.approx(clock() + 3600.0, abs=61.0)


def test_a_cooldown_past_the_deadline_refuses_whatever_else_blocks(clock: FakeClock, make_engine: Any) -> None:
    """A call that cannot wait out a provider's cooldown fails at once, whichever scope blocks it
    first; one that can is told to wait, however long its other scopes hold it (Redis judged the
    time the last scope frees, and only when the cooldown came first)."""
    from hive_ratelimit_plugin.errors import RateLimitQueueTimeout

    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(requests_per_minute=1))
    m = Scope("model", "model:x", LimitSet())
    assert eng.acquire(_t("1", g, m), None) is None
    eng.release("1", outcome="rate_limited", wait=5.0)
    t = _t("2", m, g)
    t.deadline = clock() + 10.0  # (the cooldown ends in time; the minute's window later)
    w = eng.acquire(t, None)
    assert w is not None and w.blocked.limit == "provider_cooldown" and w.blocked.keys == {"global", "model:x"}
    clock.advance(1.0)
    t = _t("3", g, m)
    t.deadline = clock() + 2.0  # (the cooldown ends after it)
    with pytest.raises(RateLimitQueueTimeout):
        eng.acquire(t, None)


def test_a_circuit_whose_time_is_over_reads_half_open(clock: FakeClock, make_engine: Any) -> None:
    """An open circuit past its reopening time reads half-open, whether or not an admission looked
    at it since (the memory engine's check of a call queued behind others turned it half-open;
    in Redis it stayed open until an admission reached it)."""
    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(concurrent_requests=1))
    m = Scope("model", "model:x", LimitSet())
    _open_circuit(eng, [m])
    assert eng.provider_state()["model:x"]["circuit"] == "open"
    assert eng.acquire(_t("1", g), None) is None
    w = eng.acquire(_t("2", g), lambda: None)
    assert w is not None and not w.granted
    clock.advance(31.0)
    w3 = eng.acquire(_t("3", g, m), lambda: None)  # (behind "2")
    assert w3 is not None and w3.blocked.limit == "queue"
    assert eng.provider_state()["model:x"]["circuit"] == "half_open"


def test_a_call_behind_the_line_that_cannot_wait_out_a_signal_fails_at_once(clock: FakeClock,
                                                                            make_engine: Any) -> None:
    """Queued behind another caller, a call whose deadline comes before a cooldown ends (or an open
    circuit reopens) fails at once, as one at the front does (Redis queued it: it checked only the
    budgets of a call behind the line)."""
    from hive_ratelimit_plugin.errors import CircuitOpenError, RateLimitQueueTimeout

    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(concurrent_requests=1))
    m = Scope("model", "model:x", LimitSet())
    m2 = Scope("model", "model:y", LimitSet())
    _open_circuit(eng, [m2])
    assert eng.acquire(_t("1", m), None) is None
    eng.release("1", outcome="rate_limited", wait=20.0)
    assert eng.acquire(_t("2", g), None) is None
    w = eng.acquire(_t("3", g), lambda: None)
    assert w is not None and not w.granted
    for cid, plan, error in (("4", m, RateLimitQueueTimeout), ("5", m2, CircuitOpenError)):
        t = _t(cid, g, plan)
        t.deadline = clock() + 10.0
        with pytest.raises(error):
            eng.acquire(t, lambda: None)
    t = _t("6", g, m)
    t.deadline = clock() + 40.0  # (both in time: it waits in line)
    w6 = eng.acquire(t, lambda: None)
    assert w6 is not None and w6.blocked.limit == "queue"


def test_a_burst_is_paced_from_its_oldest_request_not_one_taken_back(clock: FakeClock, make_engine: Any) -> None:
    """The pace two 429s cut is measured from the oldest request still counted: a request taken
    back (never sent) leaves an empty bucket, which is not it (the memory engine measured from
    that bucket, and cut harder than Redis)."""
    eng = make_engine(clock)
    m = Scope("model", "model:x", LimitSet())
    assert eng.acquire(_t("void", m), None) is None
    eng.release("void", outcome="void", input_tokens=0, output_tokens=0)
    clock.advance(10.0)
    for i in range(20):
        assert eng.acquire(_t(str(i), m), None) is None
        eng.release(str(i))
    clock.advance(19.5)  # the first request sent 19.5 s ago
    for i in ("a", "b"):
        assert eng.acquire(_t(i, m), None) is None
    eng.release("a", outcome="rate_limited", wait=0.5)
    eng.release("b", outcome="rate_limited", wait=0.5)
    rate = eng.provider_state()["model:x"]["adaptive_requests_per_minute"]
    assert rate == pytest.approx(22 * 60 / 19.5 * 0.7, rel=0.06)
