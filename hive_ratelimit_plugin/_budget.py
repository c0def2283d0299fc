"""Money budgets: calendar windows and spend counters. Pure: wall time is passed in.

Budget windows follow the calendar in the configured time zone (an hour is a clock hour, a day
a calendar day, a month a calendar month), so "today" means what the user means. Per-run caps
use the ``run`` window, which never rolls over.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from dataclasses import dataclass
from zoneinfo import ZoneInfo

KINDS = ("hour", "day", "month")
RUN = "run"

#: LimitSet field -> budget window
COST_FIELDS = {"max_cost_per_hour": "hour", "max_cost_per_day": "day", "max_cost_per_month": "month"}
WINDOW_ADJECTIVE = {"hour": "hourly", "day": "daily", "month": "monthly", "run": "per-run"}


HUGE_MONEY = 1e15  # from here a float has no cents to show (and ``1e300`` took 400 characters)


def money_text(amount: float, decimals: int = 2) -> str:
    """An amount of money with ``decimals`` decimals, more below one unit of the last one (two
    significant digits, at most 8 decimals), so that a small budget never reads as a misleading
    0.00; from :data:`HUGE_MONEY` on (a budget meant as "no limit"), in scientific notation with
    every digit the float has: ``1e+300``, ``1.2345678901234567e+17``."""
    size = abs(amount)
    if HUGE_MONEY <= size < float("inf"):
        import decimal

        return f"{decimal.Decimal(repr(float(amount))).normalize():e}"
    if size >= 10.0 ** -decimals or size == 0 or size != size or size == float("inf"):
        return f"{amount:,.{decimals}f}"
    while size < 0.1 ** (decimals - 1) and decimals < 8:
        decimals += 1
    return f"{amount:,.{decimals}f}"


def money(amount: float, currency: str) -> str:
    """``$1.25`` in US dollars, ``1.25 EUR`` otherwise (see :func:`money_text`)."""
    text = money_text(amount)
    return f"${text}" if currency == "USD" else f"{text} {currency}"


class Calendar:
    """Start and end of the current hour, day and month in a time zone, cached until the hour ends."""

    def __init__(self, timezone: str = "UTC") -> None:
        self.tz = ZoneInfo(timezone)
        self._valid_until = -1.0
        self._valid_from = float("inf")  # (the hour's start once computed: an earlier time computes again)
        self._starts: dict[str, float] = {}
        self._ends: dict[str, float] = {}

    def _compute(self, now: float) -> None:
        local = dt.datetime.fromtimestamp(now, self.tz)
        hour = local.replace(minute=0, second=0, microsecond=0)
        day = hour.replace(hour=0)
        month = day.replace(day=1)
        next_hour = dt.datetime.fromtimestamp(hour.timestamp() + 3600, self.tz)
        next_day = (day + dt.timedelta(days=1)).replace(tzinfo=self.tz)
        next_day = dt.datetime(next_day.year, next_day.month, next_day.day, tzinfo=self.tz)
        year, mon = (month.year + 1, 1) if month.month == 12 else (month.year, month.month + 1)
        next_month = dt.datetime(year, mon, 1, tzinfo=self.tz)
        self._starts = {"hour": hour.timestamp(), "day": day.timestamp(), "month": month.timestamp(), RUN: 0.0}
        self._ends = {"hour": next_hour.timestamp(), "day": next_day.timestamp(), "month": next_month.timestamp(),
                      RUN: float("inf")}
        self._valid_until = self._ends["hour"]
        self._valid_from = self._starts["hour"]

    def starts(self, now: float) -> dict[str, float]:
        """``{"hour": start, "day": start, "month": start, "run": 0.0}`` as epoch seconds."""
        if now >= self._valid_until or now < self._valid_from:
            self._compute(now)
        return self._starts

    def end(self, kind: str, now: float) -> float:
        """When the current ``kind`` window rolls over (``inf`` for runs)."""
        self.starts(now)
        return self._ends[kind]

    def label(self, kind: str, now: float) -> str:
        """A human name of the current window, e.g. ``2026-11-28`` for a day."""
        if kind == RUN:
            return "this run"
        start = dt.datetime.fromtimestamp(self.starts(now)[kind], self.tz)
        fmt = {"hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d", "month": "%Y-%m"}[kind]
        return f"{start.strftime(fmt)} {self.tz.key}"


class Counter:
    """Spend of one scope in one window."""

    __slots__ = ("cost", "requests", "start", "tokens")

    def __init__(self, start: float) -> None:
        self.start = start
        self.cost = 0.0
        self.requests = 0
        self.tokens = 0

    def __repr__(self) -> str:
        return f"Counter(cost={self.cost:.6f}, requests={self.requests}, tokens={self.tokens})"


class BudgetBook:
    """Settled spend per (scope key, window kind), rolling over with the calendar.

    Spend is added on every settled call, so :meth:`add` runs on the hot path. It only tallies
    the call on a per-key-list tab; the tab goes into the counters before anything reads them
    (any other method) and when the calendar moves on (a new ``starts``).
    """

    _TAB_SIZE = 64  # distinct key lists tallied before the tab goes into the counters

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str], Counter] = {}
        # id(keys) -> [keys, cost, requests, tokens], all tallied under _tab_starts
        self._tab: dict[int, list] = {}  # type: ignore[type-arg]
        self._tab_starts: dict[str, float] | None = None
        # id(keys) -> (keys, [(key, window kind), ...]): the counters a key list's spend goes to
        self._pairs: dict[int, tuple[list[str], list[tuple[str, str]]]] = {}

    def _flush(self) -> None:
        tab = self._tab
        if tab:
            starts = self._tab_starts
            assert starts is not None
            self._tab = {}
            for keys, cost, requests, tokens in tab.values():
                self._add(keys, starts, cost, requests, tokens, None)

    def get(self, key: str, kind: str, start: float) -> Counter | None:
        if self._tab:
            self._flush()
        c = self._counters.get((key, kind))
        if c is None or c.start < start:
            return None
        return c  # (a newer window than ``start``'s: the wall clock stepped back; see _add)

    def counter(self, key: str, kind: str, start: float) -> Counter:
        """The live counter of ``key`` for the window starting at ``start`` (rolled over if needed)."""
        if self._tab:
            self._flush()
        c = self._counters.get((key, kind))
        if c is None or c.start < start:
            c = self._counters[(key, kind)] = Counter(start)
        return c

    def add(self, keys: list[str], starts: dict[str, float], cost: float, requests: int, tokens: int,
            since: float | None = None) -> None:
        """Add spend under every key; with ``since``, only to windows that started at or before it.

        ``starts`` is :meth:`Calendar.starts`' dict, which stays the same object until the
        calendar moves on: a call with the same ``keys`` list and the same ``starts`` only adds
        to the tab.
        """
        if since is None:
            if starts is self._tab_starts:
                entry = self._tab.get(id(keys))
                if entry is not None and entry[0] is keys:
                    entry[1] += cost
                    entry[2] += requests
                    entry[3] += tokens
                    return
                if entry is None and len(self._tab) < self._TAB_SIZE:
                    self._tab[id(keys)] = [keys, cost, requests, tokens]  # (the tab holds keys: its id stays unique)
                    return
            self._flush()
            self._tab_starts = starts
            self._tab[id(keys)] = [keys, cost, requests, tokens]
            return
        self._flush()
        self._add(keys, starts, cost, requests, tokens, since)

    def add_now(self, keys: list[str], starts: dict[str, float], cost: float, requests: int, tokens: int) -> None:
        """:meth:`add` straight into the counters, for spend that is read at once (budget checks)."""
        if self._tab:
            self._flush()
        self._add(keys, starts, cost, requests, tokens, None)

    def _add(self, keys: list[str], starts: dict[str, float], cost: float, requests: int, tokens: int,
             since: float | None) -> None:
        counters = self._counters
        pairs = self._pairs.get(id(keys))
        if pairs is None or pairs[0] is not keys:
            if len(self._pairs) > 4096:
                self._pairs.clear()
            pairs = self._pairs[id(keys)] = (keys, [(key, kind) for key in keys
                                                    for kind in ((RUN,) if key.startswith("run:") else KINDS)])
        for pair in pairs[1]:
            kind = pair[1]
            start = starts[kind]
            if since is not None and kind != RUN and since < start:
                continue
            c = counters.get(pair)
            # Only a newer window replaces a counter. A wall clock stepped back (NTP, a resumed VM)
            # keeps counting in the newest window rather than wiping it (as on Redis).
            if c is None or c.start < start:
                c = counters[pair] = Counter(start)
            c.cost += cost
            c.requests += requests
            c.tokens += tokens

    def set(self, key: str, kind: str, start: float, cost: float, requests: int, tokens: int) -> None:
        self._flush()
        c = self._counters[(key, kind)] = Counter(start)
        c.cost, c.requests, c.tokens = cost, requests, tokens

    def merge(self, key: str, kind: str, start: float, cost: float, requests: int, tokens: int) -> None:
        """Add spend read from elsewhere (the state file) to the counter of ``key``'s window that
        started at ``start``: the counter of a later window keeps its own; an earlier one's is replaced."""
        self._flush()
        c = self._counters.get((key, kind))
        if c is None or c.start < start:
            self.set(key, kind, start, cost, requests, tokens)
        elif c.start == start:
            c.cost += cost
            c.requests += requests
            c.tokens += tokens

    def clear(self, key: str) -> None:
        self._flush()
        for kind in (*KINDS, RUN):
            self._counters.pop((key, kind), None)

    def sweep(self, starts: dict[str, float]) -> None:
        """Drop counters of windows that have rolled over."""
        self._flush()
        stale = [k for k, c in self._counters.items() if k[1] != RUN and c.start < starts[k[1]]]
        for k in stale:
            del self._counters[k]

    def items(self) -> list[tuple[tuple[str, str], Counter]]:
        self._flush()
        return list(self._counters.items())

    def __len__(self) -> int:
        self._flush()
        return len(self._counters)


@dataclass(slots=True)
class SpendRow:
    """One settled call, as written to the ledger."""

    ts: float
    call_id: str
    provider: str | None
    model: str | None
    agent: str | None
    user: str | None
    team: str | None
    run: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    cost: float


def run_key(agent: str, run_id: str) -> str:
    """The scope key of an agent's run. A ``/`` in the agent id is escaped (``%2F``), so that agent
    ``team/a`` in run ``r1`` and agent ``team`` in run ``a/r1`` do not share one run."""
    if "/" in agent or "%" in agent:
        agent = agent.replace("%", "%25").replace("/", "%2F")
    return f"run:{agent}/{run_id}"


def dim_keys(provider: str | None, model: str | None, agent: str | None, user: str | None,
             team: str | None, run: str | None) -> list[str]:
    """The scope keys a call's spend is counted under (the same keys rate scopes use)."""
    keys = ["global"]
    if provider:
        keys.append(f"provider:{provider}")
        if model:
            keys.append(f"model:{provider}/{model}")
    if agent:
        keys.append(f"agent:{agent}")
    if user:
        keys.append(f"user:{user}")
    if team:
        keys.append(f"team:{team}")
    if agent and run:
        keys.append(run_key(agent, run))
    return keys


class RunawayDetector:
    """Trips an agent's breaker when it sends the same request more than ``max_identical`` times
    within ``window`` seconds (an agent stuck in a loop). Pure: ``now`` is passed in.

    Memory is bounded: per agent, a count and a start time for each of its ``MAX_FINGERPRINTS``
    most recent distinct requests (a loop keeps its own entry fresh), for at most ``MAX_AGENTS``
    recently active agents.
    """

    MAX_AGENTS = 2000
    MAX_FINGERPRINTS = 32

    def __init__(self, max_identical: int, window: float, cooldown: float) -> None:
        self.max_identical = max_identical
        self.window = window
        self.cooldown = cooldown
        # agent -> fingerprint -> [first seen, count] (a fixed window per fingerprint)
        self._seen: OrderedDict[str, OrderedDict[int, list[float]]] = OrderedDict()
        self.tripped: dict[str, tuple[float, int]] = {}  # agent -> (until, count seen)

    def check(self, agent: str, fingerprint: int, now: float) -> tuple[float, int, bool] | None:
        """Record a request; if the agent's breaker is open, return ``(until, count, just_tripped)``."""
        trip = self.tripped.get(agent)
        if trip is not None:
            if now < trip[0]:
                return (trip[0], trip[1], False)
            del self.tripped[agent]
        per_agent = self._seen.get(agent)
        if per_agent is None:
            per_agent = self._seen[agent] = OrderedDict()
            if len(self._seen) > self.MAX_AGENTS:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(agent)
        entry = per_agent.get(fingerprint)
        if entry is None or now - entry[0] > self.window:
            entry = per_agent[fingerprint] = [now, 0.0]
            if len(per_agent) > self.MAX_FINGERPRINTS:
                per_agent.popitem(last=False)
        else:
            per_agent.move_to_end(fingerprint)
        entry[1] += 1
        if entry[1] > self.max_identical:
            count = int(entry[1])
            if len(self.tripped) >= self.MAX_AGENTS:
                # Breakers whose cooldown is over are dropped by their agent's next call: an agent
                # that never calls again (one id per job) would otherwise stay here for good.
                for a, t in list(self.tripped.items()):
                    if t[0] <= now:
                        self.tripped.pop(a, None)
            self.tripped[agent] = (now + self.cooldown, count)
            del per_agent[fingerprint]
            return (now + self.cooldown, count, True)
        return None

    def uncount(self, agent: str, fingerprint: int) -> None:
        """Take back a request :meth:`check` counted that was then refused before being sent (by a
        limit, a budget, an open breaker): an agent retrying a refused call sends nothing, and is
        not a runaway loop for it."""
        per_agent = self._seen.get(agent)
        entry = per_agent.get(fingerprint) if per_agent is not None else None
        if entry is not None and entry[1] > 0:
            entry[1] -= 1

    def reset(self, agent: str) -> None:
        self.tripped.pop(agent, None)
        self._seen.pop(agent, None)
