"""Try a configuration against a load before production: ``hive-ratelimit simulate``.

The simulation drives the real admission engine (:mod:`._engine`, the code ``HiveLimiter`` runs),
with scopes from the real :class:`~._scopes.ScopeResolver` and prices from the real
:class:`~._pricing.PriceBook`, on a **virtual clock**: nothing sleeps, so an hour of traffic is
simulated in seconds. It is a discrete-event simulation: calls arrive (Poisson or evenly spaced,
``rate`` per second across ``agents``), each asks for admission; a queued call waits until the
engine grants it, until its retry time (then the engine is asked to dispatch, as the real waiting
drivers do) or until ``queue.max_wait_seconds`` (then it times out, and would not have been sent).
An admitted call reaches a simulated provider at once and completes ``latency`` seconds later,
when its usage and cost are settled exactly like a real response's.

The simulated provider (optional: ``provider_rpm`` / ``provider_tpm``) enforces its own limits per
model with the same sliding log or token bucket as the test suite's fake provider; its 429s go
through the plugin's policy (cooldown for everyone on that model, learned limits, retries with
re-admission up to ``retry.max_attempts`` / ``retry.max_wait_seconds``). The same arrivals are
also sent straight to it, without any limiter, to show the 429s the configuration spares you.

What is not simulated: the runaway-loop detector (simulated calls are all different), token
counting by the tokenizer (input sizes are given), streams, and persistence (no state file is
read or written).
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from ._budget import money_text
from ._engine import Engine, QueueFull, Scope, Ticket, Waiter
from ._pricing import PriceBook
from ._retry import RateSignals
from ._scopes import Identity, ScopeResolver, parse_priority, split_model
from .config import RateLimitingConfig
from .errors import HiveRateLimitError
from .fake_provider import ALGORITHMS, SLIDING_WINDOW, make_algorithm

__all__ = ["SimulationError", "Workload", "ProviderModel", "build_engine", "parse_rate", "parse_duration",
           "simulate", "format_report"]

DEFAULT_START = "2026-01-05T09:00"  # a Monday 09:00 in the budget time zone: fresh hourly and daily windows
MAX_CALLS = 5_000_000
MAX_ROWS_PER_LEVEL = 10  # in the text report; --json lists every scope
MAX_DURATION = 31 * 86400.0

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0,
          "hour": 3600.0, "d": 86400.0, "day": 86400.0}


class SimulationError(ValueError):
    """Bad simulation input; the message says what to change."""


def parse_rate(text: str | float) -> float:
    """Requests per second from ``50``, ``50/s``, ``3000/m``, ``3000/min`` or ``100/h``."""
    if isinstance(text, (int, float)):
        value, per = float(text), 1.0
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*([a-zA-Z]+))?\s*", text)
        if m is None:
            raise SimulationError(f"--rate {text!r}: expected requests per second such as 50, 50/s, 3000/m or 100/h")
        value = float(m.group(1))
        unit = (m.group(2) or "s").lower().rstrip("s") or "s"
        unit = {"": "s", "se": "s"}.get(unit, unit)
        per = _UNITS.get(unit) or _UNITS.get(unit + "s", 0.0)
        if not per:
            raise SimulationError(f"--rate {text!r}: unknown unit {m.group(2)!r}; use /s, /m or /h")
    rate = value / per
    if not math.isfinite(rate) or rate <= 0:
        raise SimulationError(f"--rate {text!r}: must be more than 0 requests per second")
    return rate


def parse_duration(text: str | float) -> float:
    """Seconds from ``600``, ``90s``, ``10m``, ``1h`` or ``2d``."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if m is None:
            raise SimulationError(f"--duration {text!r}: expected seconds such as 600, 90s, 10m, 1h or 2d")
        unit = m.group(2).lower()
        per = _UNITS.get(unit) or _UNITS.get(unit.rstrip("s"), 0.0) if unit else 1.0
        if not per:
            raise SimulationError(f"--duration {text!r}: unknown unit {m.group(2)!r}; use s, m, h or d")
        seconds = float(m.group(1)) * per
    if not math.isfinite(seconds) or seconds <= 0:
        raise SimulationError(f"--duration {text!r}: must be more than 0 seconds")
    if seconds > MAX_DURATION:
        raise SimulationError(f"--duration {text!r}: at most 31 days can be simulated")
    return seconds


@dataclass
class Workload:
    """The load to simulate."""

    rate: float  # requests per second, all agents together
    duration: float  # seconds
    agents: list[str] = field(default_factory=lambda: ["agent-1"])
    models: list[str] = field(default_factory=lambda: ["openai/gpt-4o-mini"])
    input_tokens: int = 1000  # mean prompt tokens per call
    output_tokens: int = 200  # mean completion tokens per call
    max_tokens: int | None = None  # sent with each call (the admission estimate); None: the config's default
    token_spread: float = 0.5  # sizes drawn uniformly within +-spread of the mean
    latency: float = 1.0  # mean seconds a call takes at the provider (drawn within +-spread as well)
    arrivals: str = "poisson"  # or "uniform" (evenly spaced)
    priorities: dict[str, Any] = field(default_factory=dict)  # agent -> high/normal/low/int
    seed: int = 0
    start: str | float = DEFAULT_START  # ISO local time in the budget time zone, or epoch seconds

    def validate(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise SimulationError("rate must be more than 0 requests per second")
        if not (0 < self.duration <= MAX_DURATION):
            raise SimulationError("duration must be more than 0 and at most 31 days")
        if self.rate * self.duration > MAX_CALLS:
            raise SimulationError(
                f"{self.rate:g}/s for {self.duration:g}s is {self.rate * self.duration:,.0f} calls; at most "
                f"{MAX_CALLS:,} can be simulated in one run (shorten --duration or lower --rate)")
        if not self.agents:
            raise SimulationError("at least one agent is needed (--agents 1 or more)")
        if not self.models:
            raise SimulationError("at least one model is needed (--model)")
        for model in self.models:
            if not isinstance(model, str) or not model.strip():
                raise SimulationError(f"--model {model!r}: give a model such as openai/gpt-4o-mini")
        if self.input_tokens < 0 or self.output_tokens < 0:
            raise SimulationError("token sizes cannot be negative")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SimulationError("--max-tokens must be at least 1")
        if not 0 <= self.token_spread < 1:
            raise SimulationError("--spread must be at least 0 and below 1")
        if self.latency < 0 or not math.isfinite(self.latency):
            raise SimulationError("--latency cannot be negative")
        if self.latency > MAX_DURATION:  # (calls ending centuries later overflowed the budget calendar)
            raise SimulationError("--latency: at most 31 days")
        if self.arrivals not in ("poisson", "uniform"):
            raise SimulationError(f"--arrivals {self.arrivals!r}: choose poisson or uniform")
        unknown = set(self.priorities) - set(self.agents)
        if unknown:
            raise SimulationError(f"--priority names agent(s) not simulated: {', '.join(sorted(unknown))}")


@dataclass
class ProviderModel:
    """The simulated provider's own limits, per model (``None``: no provider limits, no 429s)."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    algorithm: str = SLIDING_WINDOW

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise SimulationError(f"--provider-algorithm {self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        for name, v in (("--provider-rpm", self.requests_per_minute), ("--provider-tpm", self.tokens_per_minute)):
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise SimulationError(f"{name} must be more than 0")

    @property
    def active(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


class VirtualClock:
    """The simulation's monotonic clock: moved by the event loop, never by real time."""

    __slots__ = ("now",)

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def build_engine(cfg: RateLimitingConfig, clock: Callable[[], float], wall_clock: Callable[[], float],
                 on_event: Callable[[list[dict[str, Any]]], None] | None = None) -> Engine:
    """An :class:`Engine` set up from ``cfg`` exactly as ``HiveLimiter`` sets up its own (no ledger)."""
    eng = Engine(
        clock,
        lease_seconds=cfg.estimation.lease_seconds,
        max_queue=cfg.queue.max_size,
        wall_clock=wall_clock,
        timezone=cfg.budget.timezone,
        currency=cfg.budget.currency,
        warning_thresholds=cfg.budget.warning_thresholds,
        on_spend=None,
        on_event=on_event,
    )
    eng.record_spend = False
    eng.configure(cfg)  # as HiveLimiter does
    return eng


def _start_epoch(start: str | float, tz: str) -> float:
    if isinstance(start, (int, float)):
        return float(start)
    try:
        when = dt.datetime.fromisoformat(start)
    except ValueError:
        raise SimulationError(f"--start {start!r}: expected an ISO time such as {DEFAULT_START}") from None
    if not 1970 <= when.year <= 9000:  # (near year 9999 the budget windows overflowed datetime)
        raise SimulationError(f"--start {start!r}: the year must be between 1970 and 9000")
    if when.tzinfo is None:
        when = when.replace(tzinfo=ZoneInfo(tz))
    return when.timestamp()


def _percentiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    s = sorted(values)
    n = len(s)

    def pct(p: float) -> float:
        return s[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))]

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": s[-1], "mean": sum(s) / n}


class _Call:
    __slots__ = ("admitted_at", "agent", "arrival", "attempt", "call_id", "cost_full", "deadline", "done",
                 "first_blocked", "input", "latency", "max_out", "model", "output", "priority", "provider",
                 "retry_deadline", "waiter", "wake_at")

    def __init__(self, call_id: str, arrival: float, agent: str, model: str, provider: str, input_tokens: int,
                 output_tokens: int, max_out: int | None, latency: float, cost_full: float, priority: int) -> None:
        self.call_id = call_id
        self.arrival = arrival
        self.agent = agent
        self.model = model
        self.provider = provider
        self.input = input_tokens
        self.output = output_tokens
        self.max_out = max_out
        self.latency = latency
        self.cost_full = cost_full
        self.priority = priority
        self.waiter: Waiter | None = None
        self.wake_at: float | None = None
        self.done = False
        self.attempt = 0
        self.first_blocked: tuple[str, str] | None = None
        self.admitted_at = 0.0
        self.retry_deadline = math.inf
        self.deadline = math.inf


_FINISH, _WAKE, _ARRIVE = 0, 1, 2


class _Simulation:
    def __init__(self, cfg: RateLimitingConfig, work: Workload, provider: ProviderModel) -> None:
        import litellm  # provider resolution and prices, as in the plugin

        self.litellm = litellm
        self.cfg = cfg
        self.work = work
        self.prov = provider
        self.clock = VirtualClock(0.0)
        self.epoch = _start_epoch(work.start, cfg.budget.timezone)
        self.events: list[dict[str, Any]] = []
        self.engine = build_engine(cfg, self.clock, lambda: self.epoch + self.clock.now, self.events.extend)
        self.resolver = ScopeResolver(cfg)
        self.prices = PriceBook(cfg)
        self.rng = random.Random(work.seed)
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = itertools.count()
        self.notified: deque[_Call] = deque()
        self.providers: dict[str, str] = {}
        self.enforcers: dict[str, Any] = {}
        self.baseline: dict[str, Any] = {}
        # results
        self.offered = 0
        self.offered_cost = 0.0
        self.admitted_at_once = 0
        self.queued = 0
        self.completed = 0
        self.rejected: dict[str, int] = {}
        self.rejected_at: dict[tuple[str, str], int] = {}
        self.queued_at: dict[tuple[str, str], int] = {}
        self.counted_at: dict[str, int] = {}
        self.levels: dict[str, str] = {}
        self.waits: list[float] = []
        self.by_priority: dict[int, dict[str, Any]] = {}
        self.sent = 0
        self.provider_429 = 0
        self.baseline_429 = 0
        self.retries = 0
        self.spend = 0.0
        self.spend_timeline: list[tuple[float, float]] = []
        self.peak_queue = 0
        self.peak_in_flight = 0
        self.in_flight = 0
        self.first_refusal: dict[tuple[str, str], float] = {}
        self.admitted_per_minute: dict[int, int] = {}
        self.last_admission = 0.0  # (the rates divide by the time calls were admitted in)
        self.last_activity = 0.0  # an arrival, admission, completion or rejection (not a stale timer)

    # ------------------------------------------------------------ helpers
    def push(self, t: float, kind: int, obj: Any) -> None:
        heapq.heappush(self.heap, (t, kind, next(self.seq), obj))

    def provider_of(self, model: str) -> str:
        found = self.providers.get(model)
        if found is None:
            try:
                _, found, _, _ = self.litellm.get_llm_provider(model=model)
            except Exception:
                found = model.split("/", 1)[0] if "/" in model else "unknown"
            found = self.providers[model] = str(found)
        return found

    def draw(self, mean: float) -> float:
        s = self.work.token_spread
        return mean if s == 0 else mean * (1 - s + 2 * s * self.rng.random())

    def new_call(self, t: float, i: int) -> _Call:
        w = self.work
        rng = self.rng
        agent = w.agents[rng.randrange(len(w.agents))] if len(w.agents) > 1 else w.agents[0]
        model = w.models[rng.randrange(len(w.models))] if len(w.models) > 1 else w.models[0]
        provider = self.provider_of(model)
        tin = max(0, round(self.draw(w.input_tokens)))
        out = max(0, round(self.draw(w.output_tokens)))
        if w.max_tokens is not None:
            out = min(out, w.max_tokens)
        latency = self.draw(w.latency)
        cost = self.prices.price(provider, model).cost(tin, out)
        prio = parse_priority(w.priorities.get(agent))
        return _Call(f"sim-{i}", t, agent, model, provider, tin, out, w.max_tokens, latency, cost, prio)

    def ticket(self, c: _Call) -> Ticket:
        cfg = self.cfg
        prio = c.priority
        ident = Identity(agent_id=c.agent, priority=prio)
        scopes: list[Scope] = self.resolver.scopes(c.provider, c.model, ident) if cfg.enabled else []
        bare = split_model(c.model, c.provider)
        dims = (c.provider, bare, c.agent, None, None, None)
        budgeted = any(s.budgeted for s in scopes)
        tin = tout = 0
        if budgeted or any(s.counts_tokens for s in scopes):
            tin = c.input
            tout = c.max_out if c.max_out is not None else cfg.estimation.default_output_tokens
        cost = 0.0
        if budgeted:
            price = self.prices.price(c.provider, c.model)
            if not price.known and cfg.unknown_price == "block":
                raise _Refused("unknown_price", "model:" + f"{c.provider}/{bare}", "unknown_price")
            cost = price.cost(tin, tout)
        keys = ["global"] + [s.key for s in scopes if s.budgeted and s.key != "global"]
        c.attempt += 1
        t = Ticket(
            call_id=f"{c.call_id}#{c.attempt}", scopes=scopes, input_tokens=tin, output_tokens=tout, priority=prio,
            info={"provider": c.provider, "model": c.model, "agent_id": c.agent, "run_id": None}, cost=cost,
            dims=dims, spend_keys=keys,
            choices=self.resolver.choices(c.provider) if cfg.enabled else None,
        )
        for s in scopes:
            self.levels[s.key] = s.level
        return t

    def prio_entry(self, c: _Call) -> dict[str, Any]:
        e = self.by_priority.get(c.priority)
        if e is None:
            e = self.by_priority[c.priority] = {"waits": [], "rejected": 0}
        return e

    @staticmethod
    def reason(c: _Call, exc: HiveRateLimitError) -> str:
        """Why a call is refused; a retry that cannot be admitted in time hands its caller the 429."""
        r = _reason(exc)
        return "provider_429" if c.attempt > 1 and r == "queue_timeout" else r

    def reject(self, c: _Call, reason: str, scope: str | None, limit: str | None) -> None:
        c.done = True
        c.waiter = None
        self.last_activity = self.clock.now
        self.prio_entry(c)["rejected"] += 1
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        key = (scope or "-", limit or reason)
        self.rejected_at[key] = self.rejected_at.get(key, 0) + 1
        if reason == "budget":
            self.first_refusal.setdefault(key, self.clock.now)

    # ----------------------------------------------------------- the loop
    def acquire(self, c: _Call) -> None:
        """Ask for admission (a first attempt, or a retry after a 429)."""
        now = self.clock.now
        try:
            ticket = self.ticket(c)
        except _Refused as r:
            self.reject(c, r.reason, r.scope, r.limit)
            return
        max_wait = self.cfg.queue.max_wait_seconds
        if c.attempt > 1:
            max_wait = max(min(max_wait, c.retry_deadline - now), 0.0)
        c.deadline = now + max_wait
        ticket.deadline = c.deadline

        def notify(c: _Call = c) -> None:
            self.notified.append(c)

        try:
            waiter = self.engine.acquire(ticket, notify)
        except QueueFull:
            self.reject(c, "queue_full" if c.attempt == 1 else "provider_429", None, "queue.max_size")
            return
        except HiveRateLimitError as exc:
            self.reject(c, self.reason(c, exc), exc.scope, exc.limit)
            return
        if waiter is None:
            if c.attempt == 1:
                self.admitted_at_once += 1
            self.admitted(c, ticket)
            return
        if c.attempt == 1:
            self.queued += 1
            b = waiter.blocked
            if b is not None:
                c.first_blocked = (b.scope, b.limit)
                self.queued_at[c.first_blocked] = self.queued_at.get(c.first_blocked, 0) + 1
        c.waiter = waiter
        self.peak_queue = max(self.peak_queue, self.engine.queue_length)
        self.arm(c)

    def arm(self, c: _Call) -> None:
        w = c.waiter
        assert w is not None
        retry_at = w.retry_at
        at = c.deadline if retry_at is None else min(c.deadline, retry_at)
        at = max(at, self.clock.now)
        if c.wake_at is None or at < c.wake_at or c.wake_at < self.clock.now:
            c.wake_at = at
            self.push(at, _WAKE, c)

    def wake(self, c: _Call, t: float) -> None:
        if c.done or c.waiter is None or c.wake_at != t:
            return  # stale
        c.wake_at = None
        w = c.waiter
        eng = self.engine
        if not w.granted and w.error is None and self.clock.now < c.deadline:
            eng.dispatch()
        if w.granted or w.error is not None:
            self.notified.append(c)
            return
        if self.clock.now >= c.deadline:
            if eng.cancel(w):
                self.notified.append(c)
                return
            b = w.blocked
            self.reject(c, "queue_timeout" if c.attempt == 1 else "provider_429", b.scope if b else None,
                        b.limit if b else None)
            return
        self.arm(c)

    def settle_notified(self) -> None:
        while self.notified:
            c = self.notified.popleft()
            w = c.waiter
            if c.done or w is None:
                continue
            if w.granted:
                c.waiter = None
                self.admitted(c, w.ticket)
            elif w.error is not None:
                exc = w.error
                self.reject(c, self.reason(c, exc), exc.scope, exc.limit)
            else:
                self.arm(c)

    def admitted(self, c: _Call, ticket: Ticket) -> None:
        now = self.clock.now
        c.admitted_at = now
        self.last_admission = self.last_activity = now
        for s in ticket.scopes:
            self.counted_at[s.key] = self.counted_at.get(s.key, 0) + 1
        if ticket.chosen is not None:
            self.counted_at[ticket.chosen] = self.counted_at.get(ticket.chosen, 0) + 1
            self.levels[ticket.chosen] = "key"
        minute = int(now // 60)
        self.admitted_per_minute[minute] = self.admitted_per_minute.get(minute, 0) + 1
        self.sent += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        if self.prov.active:
            enf = self.enforcers.get(c.model)
            if enf is None:
                enf = self.enforcers[c.model] = make_algorithm(self.prov.algorithm)
            d = enf.admit(now, c.input + c.output, self.prov.requests_per_minute, self.prov.tokens_per_minute, 60.0)
            sig = RateSignals(
                retry_after=None if d.ok else d.retry_after,
                limit_requests=_int(self.prov.requests_per_minute),
                remaining_requests=max(d.remaining_requests, 0) if self.prov.requests_per_minute else None,
                reset_requests=d.full_reset if self.prov.requests_per_minute else None,
                limit_tokens=_int(self.prov.tokens_per_minute),
                remaining_tokens=max(d.remaining_tokens, 0) if self.prov.tokens_per_minute else None,
                reset_tokens=d.full_reset if self.prov.tokens_per_minute else None,
            )
            if not d.ok:
                self.provider_429 += 1
                self.in_flight -= 1
                self.engine.release(ticket.call_id, output_tokens=0, cost=0.0, outcome="rate_limited",
                                    wait=d.retry_after, signals=sig)
                self.after_429(c, d.retry_after)
                return
            self.push(now + c.latency, _FINISH, (c, ticket.call_id, sig))
        else:
            self.push(now + c.latency, _FINISH, (c, ticket.call_id, None))

    def after_429(self, c: _Call, wait: float) -> None:
        r = self.cfg.retry
        now = self.clock.now
        if c.attempt == 1:
            c.retry_deadline = now + r.max_wait_seconds
        if (not r.enabled or c.attempt >= r.max_attempts or wait > r.max_delay
                or now + wait > c.retry_deadline):
            self.reject(c, "provider_429", f"model:{c.provider}/{split_model(c.model, c.provider)}", "429")
            return
        self.retries += 1
        self.acquire(c)

    def finish(self, c: _Call, call_id: str, sig: RateSignals | None) -> None:
        price = self.prices.price(c.provider, c.model)
        cost = price.cost(c.input, c.output)
        self.in_flight -= 1
        self.engine.release(call_id, input_tokens=c.input, output_tokens=c.output, cost=cost, signals=sig)
        c.done = True
        self.completed += 1
        self.waits.append(c.admitted_at - c.arrival)
        self.prio_entry(c)["waits"].append(c.admitted_at - c.arrival)
        self.spend += cost
        self.spend_timeline.append((self.clock.now, self.spend))
        self.last_activity = self.clock.now

    def run(self) -> dict[str, Any]:
        w = self.work
        real0 = time.perf_counter()
        arrivals = self.rng  # one stream: call attributes are drawn in arrival order
        t = 0.0 if w.arrivals == "uniform" else arrivals.expovariate(w.rate)
        i = 0
        if t < w.duration:
            self.push(t, _ARRIVE, i)
        n_events = 0
        while self.heap:
            t, kind, _, obj = heapq.heappop(self.heap)
            self.clock.now = t
            n_events += 1
            if kind == _ARRIVE:
                self.last_activity = t
                c = self.new_call(t, obj)
                self.offered += 1
                self.offered_cost += c.cost_full
                self.baseline_send(c)
                nxt = t + (1.0 / w.rate if w.arrivals == "uniform" else arrivals.expovariate(w.rate))
                if nxt < w.duration:
                    self.push(nxt, _ARRIVE, obj + 1)
                self.acquire(c)
            elif kind == _WAKE:
                self.wake(obj, t)
            else:
                self.finish(*obj)
            self.settle_notified()
        return self.report(time.perf_counter() - real0, n_events)

    def baseline_send(self, c: _Call) -> None:
        if not self.prov.active:
            return
        enf = self.baseline.get(c.model)
        if enf is None:
            enf = self.baseline[c.model] = make_algorithm(self.prov.algorithm)
        d = enf.admit(self.clock.now, c.input + c.output, self.prov.requests_per_minute,
                      self.prov.tokens_per_minute, 60.0)
        if not d.ok:
            self.baseline_429 += 1

    # ------------------------------------------------------------ report
    def report(self, real_seconds: float, n_events: int) -> dict[str, Any]:
        cfg, w = self.cfg, self.work
        tz = ZoneInfo(cfg.budget.timezone)

        def at(seconds: float) -> dict[str, Any]:
            when = dt.datetime.fromtimestamp(self.epoch + seconds, tz)
            return {"after_seconds": round(seconds, 3), "at": when.isoformat(timespec="seconds")}

        scopes: dict[str, dict[str, Any]] = {}
        keys = set(self.counted_at) | {k for k, _ in self.queued_at} | {k for k, _ in self.rejected_at}
        for key in sorted(keys, key=lambda k: (_LEVEL_ORDER.get(self.levels.get(k, ""), 9), k)):
            if key == "-":
                continue
            scopes[key] = {
                "level": self.levels.get(key, key.split(":", 1)[0]),
                "admitted": self.counted_at.get(key, 0),
                "queued": sum(n for (k, _), n in self.queued_at.items() if k == key),
                "queued_by": {lim: n for (k, lim), n in sorted(self.queued_at.items()) if k == key},
                "rejected": sum(n for (k, _), n in self.rejected_at.items() if k == key),
                "rejected_by": {lim: n for (k, lim), n in sorted(self.rejected_at.items()) if k == key},
            }
        levels: dict[str, dict[str, int]] = {}
        for entry in scopes.values():
            lv = levels.setdefault(entry["level"], {"scopes": 0, "admitted": 0, "queued": 0, "rejected": 0})
            lv["scopes"] += 1
            for f in ("admitted", "queued", "rejected"):
                lv[f] += entry[f]
        budgets: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        for ev in self.events:
            if ev.get("type") not in ("budget_warning", "budget_exceeded"):
                continue
            k = (ev["scope"], ev["budget"])
            if k not in seen:
                seen.add(k)
                budgets.append({"scope": ev["scope"], "budget": ev["budget"], "window": ev["window"],
                                "limit": ev["limit"], "warnings": [], "tripped": None, "refused_calls": 0,
                                "first_refusal": None})
        by_key = {(b["scope"], b["budget"]): b for b in budgets}
        for ev in self.events:
            if ev.get("type") not in ("budget_warning", "budget_exceeded"):
                continue
            b = by_key[(ev["scope"], ev["budget"])]
            when = at(ev["time"] - self.epoch)
            if ev["type"] == "budget_warning":
                b["warnings"].append({"threshold": ev["threshold"], **when, "spent": round(ev["spent"], 6)})
            elif b["tripped"] is None:
                b["tripped"] = {**when, "spent": round(ev["spent"], 6)}
        for (scope, limit), first in self.first_refusal.items():
            found = by_key.get((scope, limit))
            if found is None:
                found = by_key[(scope, limit)] = {"scope": scope, "budget": limit, "window": None, "limit": None,
                                              "warnings": [], "tripped": None, "refused_calls": 0,
                                              "first_refusal": None}
                budgets.append(found)
            found["first_refusal"] = at(first)
            found["refused_calls"] = self.rejected_at.get((scope, limit), 0)
        configured = []
        for key, entry in self.engine.budget_snapshot().items():
            for name, v in entry.items():
                configured.append({"scope": key, "budget": name, "window": v["window"], "limit": v["limit"],
                                   "spent_in_current_window": round(v["spent"], 6)})
        waits = self.waits
        queued_waits = [x for x in waits if x > 0]
        offered_rate = self.offered / w.duration
        # The run goes on after the last arrival, for queued calls to be admitted or time out and
        # calls in flight to finish; it ends with the last of these (a queued call's timer, left
        # behind once the call was admitted, is no end: it stretched the run by up to max_wait_seconds).
        end = max(w.duration, self.last_activity)
        # Admitted calls per second and spend per hour: over the time calls were admitted in (the
        # arrivals, and the drain while queued calls were still admitted), not the whole run (its
        # last calls' latency, the timeouts of calls never admitted) nor the arrivals alone (a
        # queue admitting at its limit after them).
        rate_seconds = max(w.duration, self.last_admission)
        return {
            "config": {"enabled": cfg.enabled, "max_wait_seconds": cfg.queue.max_wait_seconds,
                       "max_queue": cfg.queue.max_size, "currency": cfg.budget.currency,
                       "timezone": cfg.budget.timezone},
            "workload": {"rate_per_second": w.rate, "duration_seconds": w.duration, "agents": len(w.agents),
                         "models": w.models, "input_tokens": w.input_tokens, "output_tokens": w.output_tokens,
                         "max_tokens": w.max_tokens, "latency_seconds": w.latency, "arrivals": w.arrivals,
                         "seed": w.seed, "start": at(0.0)["at"]},
            "provider": {"requests_per_minute": self.prov.requests_per_minute,
                         "tokens_per_minute": self.prov.tokens_per_minute, "algorithm": self.prov.algorithm}
            if self.prov.active else None,
            "calls": {
                "offered": self.offered,
                "offered_per_second": round(offered_rate, 4),
                "admitted": self.completed,
                "admitted_at_once": self.admitted_at_once,
                "queued": self.queued,
                "queued_then_admitted": len(queued_waits),
                "rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(sorted(self.rejected.items())),
                "still_waiting_or_in_flight_at_end": self.offered - self.completed - sum(self.rejected.values()),
                "admitted_per_second": round(self.completed / rate_seconds, 4),
                "peak_queue_length": self.peak_queue,
                "peak_in_flight": self.peak_in_flight,
            },
            "wait_seconds": {"all_admitted": _percentiles(waits), "queued_only": _percentiles(queued_waits)},
            "by_priority": {
                _PRIORITY_NAMES.get(p, str(p)): {"admitted": len(e["waits"]), "rejected": e["rejected"],
                                                 "wait_seconds": _percentiles(e["waits"])}
                for p, e in sorted(self.by_priority.items(), reverse=True)
            },
            "levels": levels,
            "scopes": scopes,
            "provider_429s": {"with_limiter": self.provider_429, "retried": self.retries,
                              "reaching_callers": self.rejected.get("provider_429", 0),
                              "without_limiter": self.baseline_429, "requests_sent": self.sent}
            if self.prov.active else None,
            "spend": {"total": round(self.spend, 6), "offered_load_would_cost": round(self.offered_cost, 6),
                      "currency": cfg.budget.currency,
                      "per_hour": round(self.spend / rate_seconds * 3600, 6)},
            "budgets": budgets,
            "budgets_configured": configured,
            "simulated_seconds": round(end, 3),  # the whole run: the arrivals, then the queue's drain
            "arrival_seconds": w.duration,
            "rates_over_seconds": round(rate_seconds, 3),  # admitted_per_second, spend.per_hour
            "real_seconds": round(real_seconds, 3),
            "events": n_events,
        }


class _Refused(Exception):
    def __init__(self, reason: str, scope: str, limit: str) -> None:
        super().__init__(reason)
        self.reason, self.scope, self.limit = reason, scope, limit


_PRIORITY_NAMES = {10: "high", 0: "normal", -10: "low"}
_LEVEL_ORDER = {"global": 0, "provider": 1, "model": 2, "key": 3, "agent": 4, "user": 5, "team": 6, "run": 7}


def _int(v: float | None) -> int | None:
    return None if v is None else int(v)


def _reason(exc: HiveRateLimitError) -> str:
    name = type(exc).__name__
    return {
        "RateLimitQueueTimeout": "queue_timeout",
        "RequestTooLargeError": "request_too_large",
        "BudgetExceededError": "budget",
        "CircuitOpenError": "circuit_open",
    }.get(name, name)


def simulate(config: RateLimitingConfig | str | Mapping[str, Any], workload: Workload,
             provider: ProviderModel | None = None) -> dict[str, Any]:
    """Run ``workload`` against ``config`` on a virtual clock; returns the report as a dict.

    Raises:
        SimulationError: the workload or provider model is invalid.
        ConfigError: the configuration is invalid.
    """
    from .config import load_config

    cfg = config if isinstance(config, RateLimitingConfig) else load_config(
        dict(config) if isinstance(config, Mapping) else config)
    provider = provider or ProviderModel()
    workload.validate()
    provider.validate()
    _start_epoch(workload.start, cfg.budget.timezone)  # validate early
    return _Simulation(cfg, workload, provider).run()


# ---------------------------------------------------------------- text report
def _secs(x: float) -> str:
    if x < 1:
        return f"{x * 1000:.0f} ms"
    if x < 120:
        return f"{x:.1f} s"
    if x < 7200:
        return f"{x / 60:.1f} min"
    return f"{x / 3600:.2f} h"


def format_report(r: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    w, c = r["workload"], r["calls"]
    cur = r["spend"]["currency"]
    arrivals, run, rates = (r.get("arrival_seconds", w["duration_seconds"]), r["simulated_seconds"],
                            r.get("rates_over_seconds", r["simulated_seconds"]))
    lines = [
        f"simulated {_secs(arrivals)} of arrivals in {r['real_seconds']:.1f} s "
        f"(virtual clock from {w['start']} {r['config']['timezone']}; seed {w['seed']})",
    ]
    if _secs(run) != _secs(arrivals):
        lines.append(f"  the run continued to {_secs(run)} for queued and in-flight calls to finish or time out")
    # (what the rates below divide by)
    over = (f"the {_secs(arrivals)} of arrivals" if _secs(rates) == _secs(arrivals)
            else f"the {_secs(rates)} until the last admission")
    lines += [
        f"load: {w['rate_per_second']:g} calls/s ({w['arrivals']}) from {w['agents']} agent(s) to "
        f"{', '.join(w['models'])}; ~{w['input_tokens']} prompt + ~{w['output_tokens']} completion tokens, "
        f"~{_secs(w['latency_seconds'])} per call",
    ]
    if not r["config"]["enabled"]:
        lines.append("note: rate_limiting.enabled is false in this configuration: every call is admitted")
    if r["provider"]:
        p = r["provider"]
        lim = ", ".join(x for x in (
            f"{p['requests_per_minute']:g} requests/min" if p["requests_per_minute"] else "",
            f"{p['tokens_per_minute']:g} tokens/min" if p["tokens_per_minute"] else "") if x)
        lines.append(f"provider: {lim} per model ({p['algorithm'].replace('_', ' ')})")
    a = r["wait_seconds"]["all_admitted"]
    if c["rejected"] == 0 and not c["still_waiting_or_in_flight_at_end"]:
        verdict = "holds: every call admitted" + (f" (p99 queue wait {_secs(a['p99'])})" if a else "")
    else:
        failed = c["rejected"]
        reasons = ", ".join(f"{k} {v:,}" for k, v in c["rejected_by_reason"].items())
        verdict = (f"does not hold: {failed:,} of {c['offered']:,} calls ({100 * failed / max(c['offered'], 1):.1f} %) "
                   f"would fail ({reasons})" if failed else "holds, but calls were still waiting at the end")
    lines += [
        "",
        f"verdict: {verdict}",
        "",
        f"calls offered      {c['offered']:>10,}",
        f"  admitted at once {c['admitted_at_once']:>10,}",
        f"  queued           {c['queued']:>10,}   (then admitted: {c['queued_then_admitted']:,})",
        f"  rejected         {c['rejected']:>10,}   "
        + (", ".join(f"{k} {v:,}" for k, v in c["rejected_by_reason"].items()) or ""),
        f"  completed        {c['admitted']:>10,}   ({c['admitted_per_second']:g}/s over {over}; peak queue "
        f"{c['peak_queue_length']:,}, peak in flight {c['peak_in_flight']:,})",
    ]
    if c["still_waiting_or_in_flight_at_end"]:
        lines.append(f"  unfinished       {c['still_waiting_or_in_flight_at_end']:>10,}   "
                     "(waiting or in flight at the end)")
    q = r["wait_seconds"]["queued_only"]
    if a:
        lines.append("")
        lines.append(f"queue wait, all admitted calls: p50 {_secs(a['p50'])}, p90 {_secs(a['p90'])}, "
                     f"p99 {_secs(a['p99'])}, max {_secs(a['max'])}")
    if q:
        lines.append(f"queue wait, calls that waited:  p50 {_secs(q['p50'])}, p90 {_secs(q['p90'])}, "
                     f"p99 {_secs(q['p99'])}, max {_secs(q['max'])}")
    if len(r["by_priority"]) > 1:
        for name, e in r["by_priority"].items():
            ws = e["wait_seconds"]
            waits = f"wait p50 {_secs(ws['p50'])}, p99 {_secs(ws['p99'])}" if ws else "none admitted"
            lines.append(f"  priority {name:<7} admitted {e['admitted']:,}, rejected {e['rejected']:,}; {waits}")
    if r["scopes"]:
        lines += ["", f"{'level':<9} {'scope':<36} {'admitted':>9} {'queued':>8} {'rejected':>9}  held/refused by"]
        shown: dict[str, int] = {}
        rest: dict[str, list[int]] = {}
        busiest = sorted(r["scopes"].items(), key=lambda kv: -(kv[1]["queued"] + kv[1]["rejected"]))
        keep = set()
        for key, e in busiest:
            if shown.get(e["level"], 0) < MAX_ROWS_PER_LEVEL:
                shown[e["level"]] = shown.get(e["level"], 0) + 1
                keep.add(key)
        for key, e in r["scopes"].items():
            if key not in keep:
                t = rest.setdefault(e["level"], [0, 0, 0, 0])
                t[0] += 1
                t[1] += e["admitted"]
                t[2] += e["queued"]
                t[3] += e["rejected"]
                continue
            by = {**{f"queued:{k}": v for k, v in e["queued_by"].items()},
                  **{f"refused:{k}": v for k, v in e["rejected_by"].items()}}
            lines.append(f"{e['level']:<9} {key[:36]:<36} {e['admitted']:>9,} {e['queued']:>8,} {e['rejected']:>9,}  "
                         + ", ".join(f"{k} {v:,}" for k, v in by.items()))
        for level, (n, adm, q, rej) in rest.items():
            lines.append(f"{level:<9} {f'... {n:,} more (--json lists all)':<36} {adm:>9,} {q:>8,} {rej:>9,}")
        lines.append("(queued:queue = waiting behind earlier or higher-priority calls at that scope)")
    p429 = r["provider_429s"]
    if p429:
        lines += ["", f"provider 429s: {p429['with_limiter']:,} with this configuration "
                      f"({p429['retried']:,} retried by the plugin, {p429['reaching_callers']:,} reached callers); "
                      f"{p429['without_limiter']:,} for the same calls without any limiter"]
    s = r["spend"]
    lines += ["", f"spend: {cur} {money_text(s['total'])} settled ({cur} {money_text(s['per_hour'])}/h over {over}); "
                  f"the offered load would cost {cur} {money_text(s['offered_load_would_cost'])}"]
    for b in r["budgets"]:
        parts = []
        for wv in b["warnings"]:
            parts.append(f"{wv['threshold']:.0%} after {_secs(wv['after_seconds'])} ({wv['at']})")
        if b["tripped"]:
            parts.append(f"spent after {_secs(b['tripped']['after_seconds'])} ({b['tripped']['at']})")
        if b["first_refusal"]:
            parts.append(f"first call refused after {_secs(b['first_refusal']['after_seconds'])}; "
                         f"{b['refused_calls']:,} refused")
        money = b["limit"] is not None and b["budget"] != "max_requests_per_run"
        limit = f" {cur} {money_text(b['limit'])}" if money else ""
        lines.append(f"  budget {b['budget']}{limit} of {b['scope']}: " + "; ".join(parts))
    if not r["budgets"]:
        lines.append("  no budget warning or trip" + ("" if r["budgets_configured"] else " (no budgets configured)"))
    lines += ["", "not simulated: the runaway-loop detector, tokenizer counts, streams, persistence."]
    return "\n".join(lines)


# ------------------------------------------------------------------ the CLI
def add_arguments(p: Any) -> None:
    """The ``simulate`` subcommand's options (an ``argparse`` parser)."""
    p.add_argument("--config", required=True, metavar="FILE", help="the limits YAML (rate_limiting: root)")
    p.add_argument("--rate", required=True, help="calls per second from all agents together: 50, 50/s, 3000/m")
    p.add_argument("--duration", required=True,
                   help="how long calls arrive: 600, 90s, 10m, 1h, 2d (the run then goes on until queued "
                        "calls are admitted or time out, and calls in flight finish)")
    p.add_argument("--agents", default="1",
                   help="how many agents (agent-1 ... agent-N), or their names: researcher,writer (default 1)")
    p.add_argument("--model", action="append", metavar="MODEL",
                   help="model the agents call (repeatable: calls pick one at random; default openai/gpt-4o-mini)")
    p.add_argument("--input-tokens", type=int, default=1000, help="mean prompt tokens per call (default 1000)")
    p.add_argument("--output-tokens", type=int, default=200, help="mean completion tokens per call (default 200)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="max_tokens sent with each call (the admission estimate; default: the "
                        "configuration's estimation.default_output_tokens)")
    p.add_argument("--spread", type=float, default=0.5,
                   help="token sizes and latency vary uniformly within +-spread of their mean (default 0.5; 0: fixed)")
    p.add_argument("--latency", type=float, default=1.0, help="mean seconds a call takes at the provider (default 1)")
    p.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson",
                   help="random (Poisson, default) or evenly spaced arrivals")
    p.add_argument("--priority", action="append", default=[], metavar="AGENT=LEVEL",
                   help="priority of an agent: high, normal, low or an int (repeatable)")
    p.add_argument("--provider-rpm", type=float, default=None, help="the provider's requests per minute per model")
    p.add_argument("--provider-tpm", type=float, default=None, help="the provider's tokens per minute per model")
    p.add_argument("--provider-algorithm", choices=list(ALGORITHMS), default=SLIDING_WINDOW,
                   help="how the simulated provider enforces its limits (default sliding_window)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result; default 0)")
    p.add_argument("--start", default=DEFAULT_START,
                   help=f"virtual start time in the budget time zone (default {DEFAULT_START}, a Monday morning)")
    p.add_argument("--no-env", action="store_true", help="ignore HIVE_RATELIMIT_* environment overrides")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _agents(value: str) -> list[str]:
    value = value.strip()
    if value.isdigit():
        n = int(value)
        if n < 1:
            raise SimulationError("--agents must be at least 1")
        if n > 100_000:
            raise SimulationError("--agents: at most 100,000 agents can be simulated")
        return [f"agent-{i}" for i in range(1, n + 1)]
    names = [x.strip() for x in value.split(",") if x.strip()]
    if not names or value.lstrip().startswith("-"):
        raise SimulationError(f"--agents {value!r}: give a number (10) or names (researcher,writer)")
    return names


def simulate_from_args(args: Any) -> tuple[dict[str, Any], str]:
    """Run ``hive-ratelimit simulate`` from parsed arguments: (report, text)."""
    import os

    from .config import load_config

    if not os.path.exists(args.config):
        raise SimulationError(f"--config {args.config}: no such file")
    cfg = load_config(args.config, use_env=not args.no_env)
    priorities: dict[str, Any] = {}
    for item in args.priority:
        name, sep, level = item.partition("=")
        if not sep or not name.strip() or not level.strip():
            raise SimulationError(f"--priority {item!r}: expected AGENT=LEVEL, e.g. researcher=high")
        lv = level.strip()
        if lv.lower() not in ("high", "normal", "low") and not re.fullmatch(r"-?[0-9]+", lv):
            raise SimulationError(f"--priority {item!r}: the level must be high, normal, low or an integer")
        priorities[name.strip()] = lv
    work = Workload(
        rate=parse_rate(args.rate), duration=parse_duration(args.duration), agents=_agents(args.agents),
        models=args.model or ["openai/gpt-4o-mini"], input_tokens=args.input_tokens,
        output_tokens=args.output_tokens, max_tokens=args.max_tokens, token_spread=args.spread,
        latency=args.latency, arrivals=args.arrivals, priorities=priorities, seed=args.seed, start=args.start,
    )
    prov = ProviderModel(args.provider_rpm, args.provider_tpm, args.provider_algorithm)
    report = simulate(cfg, work, prov)
    return report, format_report(report)
