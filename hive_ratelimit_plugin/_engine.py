"""The decision core: admit, or say how long to wait. Synchronous, no IO, time passed in.

One :class:`Engine` holds the state of every scope (global, provider, model, agent, user, team),
the open reservations of calls in flight, and the queue of waiting calls. The waiting itself
(threads, asyncio) lives in :mod:`._waiting`; the engine only decides and hands out grants.

Fairness: waiting calls are served by priority, then in arrival order. A waiting call "holds the
line" on the scopes it is blocked on, so a later call of the same or lower priority cannot take
capacity there first; calls to unrelated scopes are not held up (no head-of-line blocking across
models). When capacity frees, :meth:`Engine.dispatch` grants waiting calls in order, reserving on
their behalf, and wakes them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ._budget import COST_FIELDS, RUN, WINDOW_ADJECTIVE, BudgetBook, Calendar, SpendRow
from ._windows import SlidingWindow
from .config import PERIODS, LimitSet
from .errors import HiveRateLimitError, RequestTooLargeError

NEVER = float("inf")
_NO_PRIORITY = -(10**9)


@dataclass(frozen=True, slots=True)
class Scope:
    """One level a call counts against: ``Scope("model", "model:openai/gpt-4", limits)``."""

    level: str
    key: str
    limits: LimitSet


class ScopeState:
    """Live counters of one scope."""

    __slots__ = (
        "budgets", "concurrency", "in_flight", "input", "key", "last_used", "level", "limits", "output",
        "requests", "reserved_cost", "reserved_requests", "tokens",
    )

    def __init__(self, scope: Scope) -> None:
        self.key = scope.key
        self.level = scope.level
        self.requests: list[SlidingWindow] = []
        self.tokens: list[SlidingWindow] = []
        self.input: list[SlidingWindow] = []
        self.output: list[SlidingWindow] = []
        self.budgets: list[tuple[str, str, float]] = []  # (limit field, window kind, value)
        self.concurrency: int | None = None
        self.in_flight = 0
        self.reserved_cost = 0.0
        self.reserved_requests = 0
        self.last_used = 0.0
        self.limits = scope.limits
        self.apply(scope.limits)

    def apply(self, lim: LimitSet) -> None:
        """(Re)build the limits from ``lim``, keeping the usage of windows that stay."""
        old = {w.name: w for w in self.windows()}

        def window(limit: float, seconds: float, name: str) -> SlidingWindow:
            w = old.get(name)
            if w is None:
                return SlidingWindow(limit, seconds, name)
            w.limit = limit
            return w

        self.requests, self.tokens, self.input, self.output = [], [], [], []
        for unit, seconds in PERIODS.items():
            r = getattr(lim, f"requests_per_{unit}")
            if r is not None:
                self.requests.append(window(r, seconds, f"requests_per_{unit}"))
            t = getattr(lim, f"tokens_per_{unit}")
            if t is not None:
                self.tokens.append(window(t, seconds, f"tokens_per_{unit}"))
        if lim.input_tokens_per_minute is not None:
            self.input.append(window(lim.input_tokens_per_minute, 60.0, "input_tokens_per_minute"))
        if lim.output_tokens_per_minute is not None:
            self.output.append(window(lim.output_tokens_per_minute, 60.0, "output_tokens_per_minute"))
        self.concurrency = lim.concurrent_requests
        budgets = []
        for name, kind in COST_FIELDS.items():
            v = getattr(lim, name, None)
            if v is not None:
                budgets.append((name, kind, float(v)))
        v = getattr(lim, "max_cost_per_run", None)
        if v is not None and self.level == "run":
            budgets.append(("max_cost_per_run", RUN, float(v)))
        v = getattr(lim, "max_requests_per_run", None)
        if v is not None and self.level == "run":
            budgets.append(("max_requests_per_run", RUN, float(v)))
        self.budgets = budgets
        self.limits = lim

    def windows(self) -> Iterable[SlidingWindow]:
        yield from self.requests
        yield from self.tokens
        yield from self.input
        yield from self.output

    def is_idle(self, now: float) -> bool:
        if self.in_flight or self.reserved_requests:
            return False
        for w in self.windows():
            w.expire(now)
            if not w.is_idle():
                return False
        return True

    def __repr__(self) -> str:
        parts = [repr(w) for w in self.windows()]
        if self.concurrency is not None:
            parts.append(f"in_flight={self.in_flight}/{self.concurrency}")
        return f"ScopeState({self.key!r}, {', '.join(parts)})"


@dataclass(slots=True)
class Ticket:
    """What one call asks for."""

    call_id: str
    scopes: list[Scope]
    input_tokens: int = 0
    output_tokens: int = 0
    priority: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    cost: float = 0.0  # worst-case cost reserved against budgets
    # (provider, model, agent, user, team, run) for spend accounting
    dims: tuple[str | None, ...] = (None, None, None, None, None, None)
    spend_keys: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Blocked:
    """Why a call cannot be admitted now."""

    scope: str
    limit: str
    remaining: float
    retry_at: float | None  # None: wait for a release (concurrency) or for the line ahead
    keys: frozenset[str] = frozenset()  # every scope key it is blocked on


@dataclass(slots=True)
class _Reservation:
    ticket: Ticket
    states: list[ScopeState]
    # (window, bucket index, amount) per recorded usage, grouped by metric
    charges: list[tuple[str, SlidingWindow, int, float]]
    expires_at: float
    settled: bool = False
    slot_freed: bool = False


class Waiter:
    """A queued call. The driver sets :attr:`notify`; the engine sets :attr:`granted`."""

    __slots__ = ("blocked", "error", "granted", "keys", "notify", "seq", "ticket")

    def __init__(self, ticket: Ticket, seq: int, notify: Callable[[], None]) -> None:
        self.ticket = ticket
        self.seq = seq
        self.notify = notify
        self.granted = False
        self.error: HiveRateLimitError | None = None  # set when it can no longer be admitted
        self.blocked: Blocked | None = None
        self.keys = frozenset(s.key for s in ticket.scopes)

    @property
    def retry_at(self) -> float | None:
        return self.blocked.retry_at if self.blocked else None

    def order(self) -> tuple[int, int]:
        return (-self.ticket.priority, self.seq)


class QueueFull(Exception):
    """Internal: the queue has ``max_size`` waiters."""


class Engine:
    """Thread-safe admission engine over in-memory state.

    Args:
        clock: monotonic time source in seconds; injected so tests use a fake clock.
        lease_seconds: how long a reservation lives without settlement before it is reclaimed
            (an abandoned stream produces no callback at all).
        max_queue: most calls that may wait at once.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        lease_seconds: float = 300.0,
        max_queue: int = 10_000,
        wall_clock: Callable[[], float] | None = None,
        timezone: str = "UTC",
        currency: str = "USD",
        warning_thresholds: Iterable[float] = (0.8,),
        on_spend: Callable[[list[SpendRow]], None] | None = None,
        on_event: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        import time as _time

        self.clock = clock
        self.wall = wall_clock or _time.time
        self.lease_seconds = lease_seconds
        self.max_queue = max_queue
        self.calendar = Calendar(timezone)
        self.currency = currency
        self.thresholds = tuple(sorted(warning_thresholds))
        self.book = BudgetBook()
        self.on_spend = on_spend
        self.on_event = on_event
        self._fired: set[tuple[str, str, float, float]] = set()
        self._out_rows: list[SpendRow] = []
        self._out_events: list[dict[str, Any]] = []
        self.rejected: dict[str, int] = {}
        self._lock = threading.RLock()
        self._states: OrderedDict[str, ScopeState] = OrderedDict()
        self._leases: dict[str, _Reservation] = {}
        self._waiters: list[Waiter] = []  # kept sorted by Waiter.order()
        self._holders: dict[str, int] = {}  # scope key -> highest priority waiting there
        self._seq = 0
        self._next_sweep = 0.0
        self._next_budget_sweep = 0.0
        self._max_period = max(PERIODS.values())
        self.admitted_total = 0
        self.queued_total = 0

    # ------------------------------------------------------------------ state
    def _state(self, scope: Scope, now: float) -> ScopeState:
        states = self._states
        st = states.get(scope.key)
        if st is None:
            st = states[scope.key] = ScopeState(scope)
        else:
            states.move_to_end(scope.key)
            if st.limits is not scope.limits:
                st.apply(scope.limits)  # the configuration changed: new limits, same usage
        st.last_used = now
        return st

    def reconfigure(self) -> None:
        """Forget scope state whose limits came from an older configuration."""
        with self._lock:
            for key, st in list(self._states.items()):
                if not st.in_flight:
                    del self._states[key]

    # -------------------------------------------------------------- admission
    def _evaluate(self, ticket: Ticket, now: float) -> tuple[list[ScopeState], Blocked | None]:
        states = [self._state(s, now) for s in ticket.scopes]
        tin, tout = ticket.input_tokens, ticket.output_tokens
        tall = tin + tout
        first: Blocked | None = None
        retry: float | None = None
        concurrency_blocked = False
        failing: set[str] = set()
        starts: dict[str, float] | None = None
        for st in states:
            if st.budgets:
                if starts is None:
                    starts = self.calendar.starts(self.wall())
                if self._budget_blocked(st, ticket, starts):
                    concurrency_blocked = True  # waits for in-flight reservations to settle
                    failing.add(st.key)
                    if first is None:
                        first = Blocked(st.key, "budget_reservations", 0.0, None)
            for metric, amount in ((st.requests, 1), (st.tokens, tall), (st.input, tin), (st.output, tout)):
                for w in metric:
                    w.expire(now)
                    if w.total + amount > w.limit:
                        at = w.retry_at(now, amount)
                        if at == NEVER:
                            raise RequestTooLargeError(
                                f"this call needs {amount:g} against {w.name}={w.limit:g} of {st.key}: "
                                "it can never fit; lower max_tokens or raise the limit",
                                scope=st.key, limit=w.name, remaining=w.limit - w.total,
                            )
                        retry = at if retry is None else max(retry, at)
                        failing.add(st.key)
                        if first is None:
                            first = Blocked(st.key, w.name, max(w.limit - w.total, 0.0), None)
            if st.concurrency is not None and st.in_flight >= st.concurrency:
                concurrency_blocked = True
                failing.add(st.key)
                if first is None:
                    first = Blocked(st.key, "concurrent_requests", 0.0, None)
        if first is None:
            return states, None
        first.retry_at = None if concurrency_blocked and retry is None else retry
        first.keys = frozenset(failing)
        return states, first

    def _budget_blocked(self, st: ScopeState, ticket: Ticket, starts: dict[str, float]) -> bool:
        """Raise if a budget of ``st`` is spent or cannot fit this call's worst case; return True
        if it fits only once calls in flight settle (then the call waits)."""
        wait = False
        for name, kind, limit in st.budgets:
            c = self.book.get(st.key, kind, starts[kind])
            if name == "max_requests_per_run":
                spent, reserved, amount = float(c.requests if c else 0), float(st.reserved_requests), 1.0
            else:
                spent, reserved, amount = (c.cost if c else 0.0), st.reserved_cost, ticket.cost
            if spent >= limit or spent + amount > limit:
                raise self._budget_error(st, name, kind, limit, spent, amount, starts)
            if spent + reserved + amount > limit:
                wait = True
        return wait

    def _budget_error(self, st: ScopeState, name: str, kind: str, limit: float, spent: float, amount: float,
                      starts: dict[str, float]) -> HiveRateLimitError:
        from ._budget_errors import BudgetExceededError

        wall = self.wall()
        end = self.calendar.end(kind, wall)
        retry_after = None if end == NEVER else max(end - wall, 0.0)
        who = st.key.replace(":", " ", 1)
        label = self.calendar.label(kind, wall)
        self.rejected[name] = self.rejected.get(name, 0) + 1
        if name == "max_requests_per_run":
            msg = (f"{who} reached its cap of {limit:g} requests per run ({spent:g} made); "
                   "the call was stopped and not sent. Start a new run or raise max_requests_per_run.")
        elif spent >= limit:
            msg = (f"{WINDOW_ADJECTIVE[kind]} budget of {who} is spent: {self.currency} {spent:.2f} of "
                   f"{self.currency} {limit:.2f} ({label}); calls in this scope are stopped until "
                   + ("the run ends" if kind == RUN else "the window rolls over")
                   + " or the budget is raised or reset. The call was not sent.")
        else:
            msg = (f"{WINDOW_ADJECTIVE[kind]} budget of {who} cannot cover this call: {self.currency} "
                   f"{limit - spent:.4f} left of {self.currency} {limit:.2f} ({label}), and the call may cost "
                   f"up to {self.currency} {amount:.4f} (prompt plus max_tokens). Lower max_tokens or raise the "
                   "budget. The call was not sent.")
        trip = (st.key, kind, starts[kind], 1.0)
        if spent >= limit and trip not in self._fired:
            self._fired.add(trip)
            self._out_events.append({"type": "budget_exceeded", "scope": st.key, "budget": name, "window": kind,
                                     "spent": spent, "limit": limit, "currency": self.currency, "time": wall})
        return BudgetExceededError(msg, scope=st.key, limit=name, spent=spent, budget=limit, window=kind,
                                   retry_after=retry_after)

    def _commit(self, ticket: Ticket, states: list[ScopeState], now: float) -> None:
        tin, tout = ticket.input_tokens, ticket.output_tokens
        tall = tin + tout
        charges: list[tuple[str, SlidingWindow, int, float]] = []
        for st in states:
            for w in st.requests:
                w.add(now, 1)
            for w in st.tokens:
                charges.append(("all", w, w.add(now, tall), tall))
            for w in st.input:
                charges.append(("in", w, w.add(now, tin), tin))
            for w in st.output:
                charges.append(("out", w, w.add(now, tout), tout))
            st.in_flight += 1
            if st.budgets:
                st.reserved_cost += ticket.cost
                st.reserved_requests += 1
        self._leases[ticket.call_id] = _Reservation(ticket, states, charges, now + self.lease_seconds)
        self.admitted_total += 1

    def _line_blocked(self, ticket: Ticket) -> Blocked | None:
        holders = self._holders
        if not holders:
            return None
        prio = ticket.priority
        keys = frozenset(s.key for s in ticket.scopes if holders.get(s.key, _NO_PRIORITY) >= prio)
        if keys:
            return Blocked(next(iter(keys)), "queue", 0.0, None, keys)
        return None

    def acquire(self, ticket: Ticket, notify: Callable[[], None] | None = None) -> Waiter | None:
        """Admit ``ticket`` now, or queue it.

        Returns:
            ``None`` when admitted (a reservation is open under ``ticket.call_id``); otherwise
            the queued :class:`Waiter`, whose ``notify`` is called when it is granted or when
            its earliest retry time moves. If ``notify`` is ``None`` nothing is queued and a
            waiter with ``granted=False`` describing the block is returned.

        Raises:
            RequestTooLargeError: the call can never fit a limit.
            QueueFull: the queue already holds ``max_queue`` waiters.
        """
        try:
            with self._lock:
                return self._acquire(ticket, notify)
        finally:
            self._drain()

    def _acquire(self, ticket: Ticket, notify: Callable[[], None] | None) -> Waiter | None:
        now = self.clock()
        self._maintain(now)
        blocked = self._line_blocked(ticket)
        if blocked is None:
            states, blocked = self._evaluate(ticket, now)
            if blocked is None:
                self._commit(ticket, states, now)
                return None
        else:
            # Still validate that the call could ever fit, so it fails fast if not.
            self._evaluate(ticket, now)
        self._seq += 1
        waiter = Waiter(ticket, self._seq, notify or (lambda: None))
        waiter.blocked = blocked
        if notify is None:
            return waiter
        if len(self._waiters) >= self.max_queue:
            raise QueueFull
        self._insert(waiter)
        self.queued_total += 1
        return waiter

    def _insert(self, waiter: Waiter) -> None:
        waiters = self._waiters
        order = waiter.order()
        # Appending is the common case (same priority, newest); fall back to a scan.
        i = len(waiters)
        while i > 0 and waiters[i - 1].order() > order:
            i -= 1
        waiters.insert(i, waiter)
        holders = self._holders
        prio = waiter.ticket.priority
        assert waiter.blocked is not None
        for k in waiter.blocked.keys:
            if holders.get(k, _NO_PRIORITY) < prio:
                holders[k] = prio

    def dispatch(self) -> int:
        """Grant waiting calls that fit now, in priority-then-arrival order.

        Returns:
            How many calls were granted.
        """
        with self._lock:
            if not self._waiters:
                return 0
            now = self.clock()
            self._maintain(now)
            granted = self._dispatch(now)
        self._drain()
        return granted

    def _dispatch(self, now: float) -> int:
        granted = 0
        blocked_keys: set[str] = set()
        holders: dict[str, int] = {}
        remaining: list[Waiter] = []
        for waiter in self._waiters:
            prio = waiter.ticket.priority
            if blocked_keys and not blocked_keys.isdisjoint(waiter.keys):
                conflict = frozenset(blocked_keys & waiter.keys)
                waiter.blocked = Blocked(next(iter(conflict)), "queue", 0.0, None, conflict)
                remaining.append(waiter)
                for k in conflict:
                    if holders.get(k, _NO_PRIORITY) < prio:
                        holders[k] = prio
                continue
            try:
                states, blocked = self._evaluate(waiter.ticket, now)
            except HiveRateLimitError as exc:  # a budget ran out, or limits were lowered, while it waited
                waiter.error = exc
                waiter.notify()
                continue
            if blocked is None:
                self._commit(waiter.ticket, states, now)
                waiter.granted = True
                waiter.blocked = None
                granted += 1
                waiter.notify()
                continue
            previous = waiter.retry_at
            waiter.blocked = blocked
            remaining.append(waiter)
            blocked_keys |= blocked.keys
            for k in blocked.keys:
                if holders.get(k, _NO_PRIORITY) < prio:
                    holders[k] = prio
            if blocked.retry_at is not None and (previous is None or blocked.retry_at < previous):
                waiter.notify()  # let it re-arm its timer for the earlier time
        self._waiters = remaining
        self._holders = holders
        return granted

    def cancel(self, waiter: Waiter) -> bool:
        """Take a waiter out of the queue (timeout, cancellation).

        Returns:
            ``True`` if it had already been granted: the caller owns the reservation and must
            use it or :meth:`release` it.
        """
        with self._lock:
            if waiter.granted:
                return True
            try:
                self._waiters.remove(waiter)
            except ValueError:
                return False
            # Its place in line may have held others back.
            self._dispatch(self.clock())
            return False

    # ------------------------------------------------------------- settlement
    def settle(self, call_id: str, input_tokens: int | None, output_tokens: int | None,
               cost: float | None = None) -> bool:
        """Replace a call's estimated usage with its actual usage. Idempotent.

        Returns:
            ``True`` if a reservation was found and settled now.
        """
        with self._lock:
            res = self._leases.get(call_id)
            if res is None or res.settled:
                return False
            now = self.clock()
            self._settle(res, input_tokens, output_tokens, cost, now)
            if self._waiters:
                self._dispatch(now)
        self._drain()
        return True

    def _settle(self, res: _Reservation, input_tokens: int | None, output_tokens: int | None,
                cost: float | None, now: float) -> None:
        res.settled = True
        t = res.ticket
        actual_in = t.input_tokens if input_tokens is None else input_tokens
        actual_out = t.output_tokens if output_tokens is None else output_tokens
        for metric, window, index, amount in res.charges:
            actual = actual_in + actual_out if metric == "all" else actual_in if metric == "in" else actual_out
            window.adjust(now, index, actual - amount)
        actual_cost = t.cost if cost is None else cost  # unknown: keep the worst case
        for st in res.states:
            if st.budgets:
                st.reserved_cost = max(st.reserved_cost - t.cost, 0.0)
                st.reserved_requests = max(st.reserved_requests - 1, 0)
        wall = self.wall()
        starts = self.calendar.starts(wall)
        self.book.add(t.spend_keys, starts, actual_cost, 1, actual_in + actual_out)
        provider, model, agent, user, team, run = t.dims
        self._out_rows.append(SpendRow(wall, t.call_id, provider, model, agent, user, team, run, 1,
                                       actual_in, actual_out, actual_cost))
        for st in res.states:
            if st.budgets:
                self._check_thresholds(st, starts, wall)

    def _check_thresholds(self, st: ScopeState, starts: dict[str, float], wall: float) -> None:
        for name, kind, limit in st.budgets:
            c = self.book.get(st.key, kind, starts[kind])
            if c is None:
                continue
            spent = float(c.requests) if name == "max_requests_per_run" else c.cost
            for thr in (*self.thresholds, 1.0):
                if spent < thr * limit:
                    break
                mark = (st.key, kind, starts[kind], thr)
                if mark in self._fired:
                    continue
                self._fired.add(mark)
                self._out_events.append({
                    "type": "budget_exceeded" if thr >= 1.0 else "budget_warning",
                    "scope": st.key, "budget": name, "window": kind, "threshold": thr,
                    "spent": spent, "limit": limit, "currency": self.currency, "time": wall,
                    "window_label": self.calendar.label(kind, wall),
                })

    def release(self, call_id: str, *, input_tokens: int | None = None, output_tokens: int | None = None,
                cost: float | None = None) -> bool:
        """End a call: settle it (with the given usage, if not settled yet) and free its slots.

        Args:
            call_id: the call.
            input_tokens: actual prompt tokens, or ``None`` to keep the estimate.
            output_tokens: actual output tokens, or ``None`` to keep the estimate.
            cost: actual cost, or ``None`` to keep the worst-case estimate.

        Returns:
            ``True`` if the call held a reservation.
        """
        with self._lock:
            res = self._leases.pop(call_id, None)
            if res is None:
                return False
            now = self.clock()
            if not res.settled:
                self._settle(res, input_tokens, output_tokens, cost, now)
            if not res.slot_freed:
                for st in res.states:
                    st.in_flight -= 1
            if self._waiters:
                self._dispatch(now)
        self._drain()
        return True

    def _drain(self) -> None:
        """Hand spend rows and events to their consumers, outside the lock."""
        if not self._out_rows and not self._out_events:
            return
        with self._lock:
            rows, self._out_rows = self._out_rows, []
            events, self._out_events = self._out_events, []
        if rows and self.on_spend is not None:
            self.on_spend(rows)
        if events and self.on_event is not None:
            self.on_event(events)

    # ---------------------------------------------------------------- budgets
    def load_spend(self, totals: Iterable[tuple[str, str, float, float, int, int]]) -> None:
        """Seed budget counters (from the ledger at start-up)."""
        with self._lock:
            for key, kind, start, cost, requests, tokens in totals:
                self.book.set(key, kind, start, cost, requests, tokens)

    def apply_external(self, rows: Iterable[SpendRow]) -> None:
        """Add spend that other processes settled (tailed from the shared ledger)."""
        from ._budget import dim_keys

        with self._lock:
            wall = self.wall()
            starts = self.calendar.starts(wall)
            for r in rows:
                keys = dim_keys(r.provider, r.model, r.agent, r.user, r.team, r.run)
                self.book.add(keys, starts, r.cost, r.requests, r.input_tokens + r.output_tokens, since=r.ts)
            for st in self._states.values():
                if st.budgets:
                    self._check_thresholds(st, starts, wall)
            if self._waiters:
                self._dispatch(self.clock())
        self._drain()

    def reset_spend(self, key: str) -> None:
        """Forget the settled spend of ``key`` (an operator reset its budget)."""
        with self._lock:
            self.book.clear(key)
            self._fired = {m for m in self._fired if m[0] != key}
            if self._waiters:
                self._dispatch(self.clock())
        self._drain()

    def spend(self, key: str, kind: str) -> tuple[float, int, int]:
        """Settled (cost, requests, tokens) of ``key`` in the current ``kind`` window."""
        with self._lock:
            starts = self.calendar.starts(self.wall())
            c = self.book.get(key, kind, starts[kind])
            return (c.cost, c.requests, c.tokens) if c else (0.0, 0, 0)

    def budget_snapshot(self) -> dict[str, dict[str, Any]]:
        """Budgets of live scopes: spent, reserved, limit, remaining per window."""
        with self._lock:
            wall = self.wall()
            starts = self.calendar.starts(wall)
            out: dict[str, dict[str, Any]] = {}
            for key, st in self._states.items():
                if not st.budgets:
                    continue
                entry: dict[str, Any] = {}
                for name, kind, limit in st.budgets:
                    c = self.book.get(key, kind, starts[kind])
                    if name == "max_requests_per_run":
                        spent = float(c.requests if c else 0)
                        reserved = float(st.reserved_requests)
                    else:
                        spent = c.cost if c else 0.0
                        reserved = st.reserved_cost
                    entry[name] = {
                        "window": kind, "window_label": self.calendar.label(kind, wall), "spent": spent,
                        "reserved": reserved, "limit": limit, "remaining": max(limit - spent, 0.0),
                        "tripped": spent >= limit,
                    }
                out[key] = entry
            return out

    def spend_snapshot(self) -> dict[str, dict[str, tuple[float, int, int]]]:
        """Settled spend per scope key and window kind (current windows only)."""
        with self._lock:
            starts = self.calendar.starts(self.wall())
            self.book.sweep(starts)
            out: dict[str, dict[str, tuple[float, int, int]]] = {}
            for (key, kind), c in self.book.items():
                if c.start == starts[kind]:
                    out.setdefault(key, {})[kind] = (c.cost, c.requests, c.tokens)
            return out

    def free_slot(self, call_id: str) -> None:
        """Give back a call's concurrency slots before its usage is known (a stream ended and
        its usage arrives in a later event). The reservation stays open until :meth:`release`."""
        with self._lock:
            res = self._leases.get(call_id)
            if res is None or res.slot_freed:
                return
            res.slot_freed = True
            for st in res.states:
                st.in_flight -= 1
            if self._waiters:
                self._dispatch(self.clock())

    def charge_extra_request(self, call_id: str) -> None:
        """Count one more request for an open call (a retry LiteLLM sent without re-admission)."""
        with self._lock:
            res = self._leases.get(call_id)
            if res is None:
                return
            now = self.clock()
            for st in res.states:
                for w in st.requests:
                    w.expire(now)
                    w.add(now, 1)

    def ticket_info(self, call_id: str) -> tuple[str, str, int] | None:
        """(provider, model, estimated input tokens) of an open call, for pricing its settlement."""
        res = self._leases.get(call_id)
        if res is None:
            return None
        t = res.ticket
        return (str(t.info.get("provider", "")), str(t.info.get("model", "")), t.input_tokens)

    def holds(self, call_id: str) -> bool:
        """Whether ``call_id`` has an open reservation."""
        return call_id in self._leases

    def renew(self, call_id: str) -> None:
        """Extend a call's lease (a stream is still delivering chunks)."""
        res = self._leases.get(call_id)
        if res is not None:
            res.expires_at = self.clock() + self.lease_seconds

    # ------------------------------------------------------------ maintenance
    def _maintain(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        expired = [cid for cid, r in self._leases.items() if r.expires_at <= now]
        for cid in expired:
            res = self._leases.pop(cid)
            if not res.settled:
                self._settle(res, None, None, None, now)  # keep the estimates: conservative
            if not res.slot_freed:
                for st in res.states:
                    st.in_flight -= 1
        # Evict idle scopes, least recently used first; a scope whose windows are all empty
        # carries no information, so dropping it changes no decision.
        states = self._states
        horizon = now - self._max_period - 1.0
        for _ in range(len(states)):
            key, st = next(iter(states.items()))
            if st.last_used > horizon:
                break
            if st.is_idle(now):
                del states[key]
            else:
                states.move_to_end(key)
        if now >= self._next_budget_sweep:
            self._next_budget_sweep = now + 60.0
            starts = self.calendar.starts(self.wall())
            self.book.sweep(starts)
            self._fired = {m for m in self._fired if m[1] == RUN or m[2] == starts[m[1]]}
        if expired and self._waiters:
            self._dispatch(now)

    def evict_idle(self) -> int:
        """Drop every scope whose windows are empty and which has no call in flight."""
        with self._lock:
            now = self.clock()
            idle = [k for k, st in self._states.items() if st.is_idle(now)]
            for k in idle:
                del self._states[k]
            return len(idle)

    # ------------------------------------------------------------------ stats
    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Current usage per scope key: window counts, in-flight, queued."""
        with self._lock:
            now = self.clock()
            queued: dict[str, int] = {}
            for waiter in self._waiters:
                for k in waiter.keys:
                    queued[k] = queued.get(k, 0) + 1
            out: dict[str, dict[str, Any]] = {}
            for key, st in self._states.items():
                entry: dict[str, Any] = {"level": st.level}
                for w in st.windows():
                    w.expire(now)
                    entry[w.name] = {"used": w.total, "limit": w.limit}
                entry["in_flight"] = st.in_flight
                if st.concurrency is not None:
                    entry["concurrent_requests"] = {"used": st.in_flight, "limit": st.concurrency}
                entry["queued"] = queued.get(key, 0)
                out[key] = entry
            return out

    def wake_all(self) -> None:
        """Ask every waiting call to re-check the clock (used after a fake clock moves)."""
        with self._lock:
            waiters = list(self._waiters)
        for w in waiters:
            w.notify()

    @property
    def queue_length(self) -> int:
        return len(self._waiters)

    @property
    def scope_count(self) -> int:
        return len(self._states)

    def __repr__(self) -> str:
        return f"Engine(scopes={len(self._states)}, in_flight={len(self._leases)}, queued={len(self._waiters)})"
