"""The decision core: admit, or say how long to wait. Synchronous, no IO, time passed in.

One :class:`Engine` holds the state of every scope (global, provider, model, agent, user, team),
the open reservations of calls in flight, and the queue of waiting calls. The waiting itself
(threads, asyncio) lives in :mod:`._waiting`; the engine only decides and hands out grants.

Fairness: waiting calls are served by priority, then in arrival order. A waiting call "holds the
line" on the scopes it is blocked on, so a later call of the same or lower priority cannot take
capacity there first; calls to unrelated scopes are not held up (no head-of-line blocking across
models). When capacity frees, :meth:`Engine.dispatch` grants waiting calls in order, reserving on
their behalf, and wakes them. The queue is indexed by scope key (the first blocked call of each
scope, and the calls waiting behind it), so an event re-examines only the calls it may let in or
hold back: thousands of waiters cost per event what the few concerned cost (see "the queue").
"""

from __future__ import annotations

import heapq
import threading
import time as _time
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import _fork
from ._budget import COST_FIELDS, RUN, WINDOW_ADJECTIVE, BudgetBook, Calendar, SpendRow, money_text
from ._windows import NO_BUCKET, SlidingWindow
from .config import PERIODS, LimitSet
from .errors import HiveRateLimitError, RequestTooLargeError

NEVER = float("inf")
#: Money compared with a budget: a sum off by float rounding (0.04 + 0.01 = 0.05000000000000001) still fits.
MONEY_SLACK = 1e-9


def budget_spent(spent: float, limit: float) -> bool:
    """Whether ``spent`` has used up a budget of ``limit`` (up to float rounding: Redis' sums round
    otherwise, and 0.7 + 0.1 + 0.1 falls just short of 0.9)."""
    return spent + MONEY_SLACK >= limit

HIGH_PRIORITY = 10
EVICTIONS_PER_TICK = 2000
ADAPTIVE_MIN_RATE = 10  # requests per minute below which 429s say nothing about our rate
ADAPTIVE_STEP = 0.05  # learned rate added per successful call while recovering from 429s
#: A call sent more than this (or the arrival margin, if longer) after its admission has its
#: request counted again from the send (see Engine._recount).
LATE_SEND = 0.25
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
# What a window counts (see _charged): requests, all tokens, input tokens, output tokens.
REQ, ALL, IN, OUT = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Scope:
    """One level a call counts against: ``Scope("model", "model:openai/gpt-4", limits)``."""

    level: str
    key: str
    limits: LimitSet
    generation: int = 0  # configuration generation: newer limits win over a waiting call's older ones
    budgeted: bool = field(init=False, default=False)  # has a money budget or per-run cap
    counts_tokens: bool = field(init=False, default=False)  # has a token limit

    def __post_init__(self) -> None:
        d = self.limits.__dict__  # plain dict reads: pydantic's attribute fallback is slow
        object.__setattr__(self, "budgeted", any(d.get(n) is not None for n in _BUDGET_FIELDS))
        object.__setattr__(self, "counts_tokens", any(d.get(n) is not None for n in _TOKEN_FIELDS))


_BUDGET_FIELDS = ("max_cost_per_hour", "max_cost_per_day", "max_cost_per_month", "max_cost_per_run",
                  "max_requests_per_run")
_TOKEN_FIELDS = ("tokens_per_second", "tokens_per_minute", "tokens_per_hour", "tokens_per_day",
                 "input_tokens_per_minute", "output_tokens_per_minute")


class ScopeState:
    """Live counters of one scope."""

    __slots__ = (
        "adaptive_ceiling",
        "adaptive_cut_at",
        "adaptive_rpm",
        "budgets",
        "circuit",
        "concurrency",
        "consecutive_failures",
        "cooldown_until",
        "generation",
        "in_flight",
        "input",
        "key",
        "last_used",
        "learned_itpm",
        "learned_otpm",
        "learned_rpm",
        "learned_tpm",
        "level",
        "limits",
        "next_slot",
        "observed_input",
        "observed_output",
        "observed_requests",
        "observed_tokens",
        "open_count",
        "open_until",
        "output",
        "pace_interval",
        "pace_until",
        "probe",
        "rate_limited_at",
        "requests",
        "reserved_cost",
        "reserved_requests",
        "tokens",
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
        # Provider signals (model and API-key scopes): cooldown after a 429, paced release after it,
        # circuit breaker, and limits learned from headers or from 429s (AIMD).
        self.cooldown_until = 0.0
        self.pace_until = 0.0
        self.pace_interval = 0.0
        self.next_slot = 0.0
        self.circuit = CLOSED
        self.consecutive_failures = 0
        self.open_until = 0.0
        self.open_count = 0
        self.probe: str | None = None
        self.learned_rpm: float | None = None
        self.learned_tpm: float | None = None
        self.learned_itpm: float | None = None
        self.learned_otpm: float | None = None
        self.adaptive_rpm: float | None = None
        self.adaptive_ceiling = NEVER
        self.rate_limited_at = -NEVER
        self.adaptive_cut_at = -NEVER
        self.observed_requests: SlidingWindow | None = None
        self.observed_tokens: SlidingWindow | None = None
        # Counted only from the first answer that gives an input-token limit (Anthropic's): a
        # window on every model and key scope would cost every call of every other provider.
        self.observed_input: SlidingWindow | None = None
        # Likewise from the first answer that gives an output-token limit (Anthropic's).
        self.observed_output: SlidingWindow | None = None
        if scope.level in ("model", "key"):
            self.observed_requests = SlidingWindow(NEVER, 60.0, "learned_requests_per_minute")
            self.observed_tokens = SlidingWindow(NEVER, 60.0, "learned_tokens_per_minute")
        self.limits = scope.limits
        self.generation = scope.generation
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
        if self.observed_requests is not None and self.observed_tokens is not None:
            # Always counted; enforced only once a limit is learned (limit stays inf until then).
            self.requests.append(self.observed_requests)
            self.tokens.append(self.observed_tokens)
        if self.observed_input is not None:
            self.input.append(self.observed_input)
        if self.observed_output is not None:
            self.output.append(self.observed_output)
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

    def utilization(self) -> float:
        """The fullest of this scope's limits, as a fraction (for picking the key with most headroom)."""
        u = 0.0
        for w in self.windows():
            if w.limit != NEVER:
                u = max(u, w.total / w.limit)
        if self.concurrency:
            u = max(u, self.in_flight / self.concurrency)
        return u

    def windows(self) -> Iterable[SlidingWindow]:
        yield from self.requests
        yield from self.tokens
        yield from self.input
        yield from self.output

    def is_idle(self, now: float) -> bool:
        if self.in_flight or self.reserved_requests:
            return False
        # What a provider told us outlives empty windows: a long cooldown, a breaker, a learned
        # or 429-lowered rate. (Only model and API-key scopes carry these: a bounded set.)
        if self.cooldown_until > now or self.pace_until > now or self.circuit is not CLOSED \
                or self.consecutive_failures or self.learned_rpm is not None \
                or self.learned_tpm is not None or self.observed_input is not None or self.observed_output is not None \
                or self.adaptive_rpm is not None:
            # (observed_input, observed_output: an input- or output-token limit learned, here or,
            # with Redis, in Redis; consecutive_failures: the count toward the breaker goes on, as
            # it does in Redis, where a model's signals live a day)
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


#: A model or API-key scope's provider signals, and their values before any signal came (a new
#: state's: see ScopeState.__init__).
_SIGNALS = ("cooldown_until", "pace_until", "pace_interval", "next_slot", "circuit", "consecutive_failures",
            "open_until", "open_count", "probe", "learned_rpm", "learned_tpm", "learned_itpm", "learned_otpm",
            "adaptive_rpm", "adaptive_ceiling", "rate_limited_at", "adaptive_cut_at")
_fresh = ScopeState(Scope("model", "", LimitSet()))
_SIGNAL_DEFAULTS: dict[str, Any] = {name: getattr(_fresh, name) for name in _SIGNALS}
del _fresh
#: Outcomes that are about the API key or endpoint that answered, where a call went with one.
_ENDPOINT_OUTCOMES = ("rate_limited", "failure")


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
    choices: list[Scope] | None = None  # one of these is picked: the one with most headroom (API keys)
    chosen: str | None = None  # the key of the picked choice
    deadline: float = NEVER  # give up (fail fast) on waits that end after this (engine clock)
    # (provider, model, agent, user, team, run) for spend accounting
    dims: tuple[str | None, ...] = (None, None, None, None, None, None)
    spend_keys: list[str] = field(default_factory=list)
    lease: float = 0.0  # seconds its reservation lives unsettled (0: the engine's lease_seconds)
    # Of input_tokens, those expected to be read from the provider's prompt cache: not reserved
    # in input-token windows (Anthropic's ITPM does not count them), which settle at the actual.
    cached_input: int = 0


@dataclass(slots=True)
class Blocked:
    """Why a call cannot be admitted now."""

    scope: str
    limit: str
    remaining: float
    retry_at: float | None  # None: wait for a release (concurrency) or for the line ahead
    keys: frozenset[str] = frozenset()  # every scope key it is blocked on
    # The earliest time one of those keys may stop blocking (<= retry_at): the queue looks at the
    # call again then, so that it no longer holds the line where it would fit.
    eases_at: float | None = None
    # When retry_at is only when to ask a shared backend again: when the window itself frees the
    # room (what a caller told to come back later is told).
    frees_at: float | None = None


_NO_KEYS: frozenset[str] = frozenset()  # (shared: immutable)


class _Reservation:
    """An admitted call's hold: what it charged (its plan's :class:`_Layout`) and its progress."""

    __slots__ = (
        "admitted_at",
        "after_split",
        "answered",
        "attempts",
        "boot",
        "expires_at",
        "layout",
        "learned_input",
        "learned_output",
        "local_at",
        "moved_to",
        "record",
        "recounted",
        "remote",
        "sent_at",
        "settled",
        "slot_freed",
        "spend_targets",
        "ticket",
    )

    def __init__(self, ticket: Ticket, layout: _Layout, expires_at: float, admitted_at: float = 0.0, *,
                 remote: bool = False, record: bool = False, spend_targets: str = "",
                 local_at: float = 0.0) -> None:
        self.ticket = ticket
        self.layout = layout  # its scopes' states and every window it charged
        self.expires_at = expires_at
        self.admitted_at = admitted_at  # every window was charged in the bucket of this time
        self.sent_at: float | None = None  # when LiteLLM reported sending its first HTTP attempt (note_attempt)
        self.attempts = 0
        self.answered = False  # the provider has begun to answer (a stream was handed to the caller)
        self.settled = False
        self.slot_freed = False
        self.remote = remote  # admitted by a shared backend (see _redis.RedisEngine)
        self.record = record  # the shared backend keeps a lease record of it
        self.local_at = local_at  # the local clock at a shared backend's admission (admitted_at is its clock)
        self.spend_targets = spend_targets  # the shared backend's spend keys of it, when it keeps no record
        self.boot = ""  # the shared backend's dataset its lease record is in
        self.recounted = False  # sent late: its request was counted again from the send (note_attempt)
        # The scopes whose learned input-token window a shared backend's admission charged (a
        # window added after its admission is not settled by it: see _redis.RedisEngine._settle_args)
        self.learned_input: frozenset[str] = _NO_KEYS
        self.learned_output: frozenset[str] = _NO_KEYS  # (the same of the learned output-token window)
        # (kind, window) of an endpoint's learned windows that got a copy of this call's charge when
        # its model's moved there while it was in flight (see Engine.move_signals): settled there too.
        self.moved_to: list[tuple[int, SlidingWindow]] | None = None
        # The models a shared backend's admission said another process had split already: admitted
        # after that split, this call charged none of what it moved (see _redis.RedisEngine._settle_args).
        self.after_split: frozenset[str] = _NO_KEYS

    @property
    def states(self) -> list[ScopeState]:
        return self.layout.states

    @property
    def signal_states(self) -> list[ScopeState]:
        """Its model and API-key scopes."""
        return self.layout.signals


def _never_back(wall: Callable[[], float]) -> Callable[[], float]:
    """``wall``, held at the latest time it gave when it steps back (NTP, a VM resumed): budget
    windows, the spend rows of the state file and reset marks then never go back to a window
    already left (counted there, spend would be forgotten once the clock came back)."""
    latest = -NEVER

    def now() -> float:
        nonlocal latest
        t = wall()
        if t < latest:
            return latest
        latest = t
        return t

    return now


def _charged(states: list[ScopeState]) -> list[tuple[int, SlidingWindow]]:
    """Every window of ``states`` with what it counts (REQ, ALL, IN, OUT): what an admission
    charges, in the order it charges them (by kind, then by bucket width, so that each run of
    windows of one kind and width is contiguous: see :func:`_runs`)."""
    prog = [(code, w) for code, metric in ((REQ, "requests"), (ALL, "tokens"), (IN, "input"), (OUT, "output"))
            for st in states for w in getattr(st, metric)]
    widths: dict[float, int] = {}
    for _, w in prog:
        widths.setdefault(w.width, len(widths))
    return sorted(prog, key=lambda cw: (cw[0], widths[cw[1].width]))  # (stable: states keep their order)


def _runs(prog: list[tuple[int, SlidingWindow]]) -> tuple[tuple[int, float, list[SlidingWindow]], ...]:
    """``prog`` as runs of (kind, bucket width, windows), in its order: the hot loops work out a
    run's bucket index once rather than per window."""
    runs: list[tuple[int, float, list[SlidingWindow]]] = []
    for code, w in prog:
        if runs and runs[-1][0] == code and runs[-1][1] == w.width:
            runs[-1][2].append(w)
        else:
            runs.append((code, w.width, [w]))
    return tuple(runs)


_S = TypeVar("_S", "Scope", "ScopeState")


def header_scopes(scopes: list[_S]) -> list[_S]:
    """Of a call's scopes (or their states), those whose limits a provider's headers give: the API
    key's when the call went with a pool's key (learned on the model as well, one key's limit
    would hold the whole pool), else all of them."""
    keys = [s for s in scopes if s.level == "key"]
    return keys or scopes


def _signals_of(states: list[ScopeState]) -> list[ScopeState]:
    """Model and API-key scopes: the only ones a provider's signals (cooldown, pacing, breaker)
    are ever applied to (see Engine._provider_outcome)."""
    return [st for st in states if st.observed_requests is not None]


class _Layout:
    """What admitting a call of one plan (one list of scopes) needs, worked out once: the scopes'
    states, every window to charge, and which states have slots, budgets or provider signals."""

    __slots__ = ("budgeted", "fast", "prog", "runs", "scopes", "signals", "slots", "stamped", "states")

    def __init__(self, scopes: list[Scope], states: list[ScopeState], now: float = 0.0) -> None:
        self.scopes = scopes  # held, so that the id() it is cached under is never reused
        self.states = states
        self.stamped = now  # when its states' last_used were last set
        self.prog = _charged(states)
        # The same windows as runs of one kind and bucket width, for the hot loops.
        self.runs = _runs(self.prog)
        self.signals = _signals_of(states)
        self.slots = [st for st in states if st.concurrency is not None]
        self.budgeted = [st for st in states if st.budgets]
        # Admission's fast path undoes a failed pass by position, so it needs each window once.
        self.fast = len({id(w) for _, w in self.prog}) == len(self.prog)


#: The layout of a reservation that charged nothing in this process (a shared backend's).
NO_LAYOUT = _Layout([], [])


class Waiter:
    """A queued call. The driver sets :attr:`notify`; the engine sets :attr:`granted`."""

    __slots__ = ("blocked", "error", "granted", "keys", "notify", "parked_on", "rank", "seq", "state", "ticket")

    def __init__(self, ticket: Ticket, seq: int, notify: Callable[[], None]) -> None:
        self.ticket = ticket
        self.seq = seq
        self.notify = notify
        self.granted = False
        self.error: HiveRateLimitError | None = None  # set when it can no longer be admitted
        self.blocked: Blocked | None = None
        self.keys = frozenset(s.key for s in ticket.scopes)
        self.rank = _rank(ticket.priority, seq)  # queue order: smaller goes first
        self.state = _OUT  # _OUT (not queued), _HEAD, _PARKED or _NEW (see Engine: the queue)
        self.parked_on: str | None = None  # the scope key it is parked behind (state _PARKED)

    @property
    def retry_at(self) -> float | None:
        return self.blocked.retry_at if self.blocked else None

    def order(self) -> tuple[int, int]:
        return (-self.ticket.priority, self.seq)

    def __repr__(self) -> str:
        return f"Waiter({self.ticket.call_id!r}, priority={self.ticket.priority}, seq={self.seq}, {self.state})"


# Queue states of a waiter (see "the queue" in Engine).
_OUT = "out"  # not in the queue (granted, failed, cancelled, or never queued)
_HEAD = "head"  # tried and blocked: the first in line at the scopes of blocked.keys
_PARKED = "parked"  # waits behind the first blocked call of one of its scopes (parked_on)
_NEW = "new"  # to be examined afresh (the queue is being rebuilt)
_SEQ_SPAN = 1 << 48
_LAST = float("inf")


def _rank(priority: int, seq: int) -> int:
    """One integer ordering by priority (higher first), then arrival: as ``(-priority, seq)``."""
    return seq - priority * _SEQ_SPAN


_LOW_FROM = _rank(HIGH_PRIORITY - 1, 0)  # ranks from here on: calls without the high-priority share


class _Line:
    """Waiters in queue order (ascending rank): a sorted list, so the first one, the ones ranked
    after a given rank, adding and removing are cheap (bisection; removal moves pointers in C)."""

    __slots__ = ("items", "ranks")

    def __init__(self) -> None:
        self.ranks: list[int] = []
        self.items: list[Waiter] = []

    def __len__(self) -> int:
        return len(self.ranks)

    def add(self, w: Waiter) -> None:
        ranks, r = self.ranks, w.rank
        if not ranks or ranks[-1] < r:  # the common case: the newest of its priority
            ranks.append(r)
            self.items.append(w)
            return
        i = bisect_left(ranks, r)
        if i < len(ranks) and self.items[i] is w:
            return
        ranks.insert(i, r)
        self.items.insert(i, w)

    def remove(self, w: Waiter) -> None:
        i = bisect_left(self.ranks, w.rank)
        if i < len(self.ranks) and self.items[i] is w:
            del self.ranks[i]
            del self.items[i]

    def first(self) -> Waiter:
        return self.items[0]

    def pop_first(self) -> Waiter:
        del self.ranks[0]
        return self.items.pop(0)

    def after(self, rank: int) -> list[Waiter]:
        """The members ranked after ``rank``, in order."""
        return self.items[bisect_right(self.ranks, rank):]


class _Sizes:
    """Waiters sorted by how much of one size-dependent limit of a scope they need (tokens,
    prompt tokens, output tokens or cost), so the ones needing more than is left are a suffix."""

    __slots__ = ("items", "sizes")

    def __init__(self) -> None:
        self.sizes: list[tuple[float, int]] = []  # (amount, rank)
        self.items: list[Waiter] = []

    def add(self, w: Waiter, amount: float) -> None:
        k = (amount, w.rank)
        i = bisect_left(self.sizes, k)
        if i < len(self.sizes) and self.sizes[i] == k:
            return
        self.sizes.insert(i, k)
        self.items.insert(i, w)

    def remove(self, w: Waiter, amount: float) -> None:
        k = (amount, w.rank)
        i = bisect_left(self.sizes, k)
        if i < len(self.sizes) and self.sizes[i] == k:
            del self.sizes[i]
            del self.items[i]

    def above(self, room: float) -> list[Waiter]:
        """The members that need more than ``room``."""
        return self.items[bisect_right(self.sizes, (room, _LAST)):]


def _amount(t: Ticket, metric: str) -> float:
    if metric == "all":
        return t.input_tokens + t.output_tokens
    if metric == "in":
        return t.input_tokens - t.cached_input
    if metric == "out":
        return t.output_tokens
    return t.cost


def settled_input(t: Ticket, reported: int | None, actual_in: int, cached: int) -> int:
    """What a call counts in input-token limits once settled: its input tokens, less those read
    from the provider's prompt cache (Anthropic's ITPM, Groq's limits leave cache reads out), when
    its usage was reported (``reported`` not ``None``). Unreported, what it reserved stands."""
    if reported is None:
        return t.input_tokens - t.cached_input
    if cached <= 0:
        return actual_in
    return actual_in - cached if cached < actual_in else 0


def too_large_advice(limit: str) -> str:
    """What to do about a call larger than ``limit`` (a window's name)."""
    if limit.startswith("input_tokens"):
        # (a prompt mostly read from the provider's cache counts little there, but its size is
        # known only from its answer)
        return ("shorten the prompt or raise the limit (a prompt is reserved whole before the call, unless it "
                "extends its caller's last prompt, whose prefix is then expected from the prompt cache)")
    return "lower max_tokens or raise the limit"


class QueueFull(Exception):
    """Internal: the queue has ``max_size`` waiters."""


def _by_rank(w: Waiter) -> int:
    return w.rank


def _first_key(ticket: Ticket, keys: frozenset[str]) -> str:
    """The first of ``ticket``'s scopes (global, provider, model, ... in that order) among ``keys``:
    the one a call waiting behind others is reported (and parked) on. Not ``next(iter(keys))``,
    whose answer depends on the process's string hashing: the same simulation, or the same calls,
    would name another scope in every run."""
    for s in ticket.scopes:
        if s.key in keys:
            return s.key
    return min(keys)


def _due_at(b: Blocked) -> float | None:
    """When a head blocked as ``b`` is looked at again: its retry time, or earlier when one of
    the scopes it holds eases before the others."""
    at = b.retry_at
    if b.eases_at is not None and at is not None and b.eases_at < at:
        return b.eases_at
    return at


def _touched(res: _Reservation) -> list[str]:
    """The scope keys whose state a call's settlement or release changes: its scopes, the API key
    it was given, and the keys its spend counts against (budgets)."""
    t = res.ticket
    keys = [s.key for s in t.scopes]
    if t.chosen is not None:
        keys.append(t.chosen)
    keys += t.spend_keys
    return keys


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
        self.host_wall = wall_clock or _time.time
        self.wall = _never_back(self.host_wall)
        self.lease_seconds = lease_seconds
        self.max_queue = max_queue
        self.calendar = Calendar(timezone)
        self.currency = currency
        self.thresholds = tuple(sorted(warning_thresholds))
        self.book = BudgetBook()
        self.on_spend = on_spend
        self.on_event = on_event
        # (scope, window kind, window start, threshold) -> the limit it was announced for: a budget
        # raised or lowered since is a new budget, whose thresholds are announced again
        self._fired: dict[tuple[str, str, float, float], float] = {}
        self._out_rows: list[SpendRow] = []
        self._out_events: list[dict[str, Any]] = []
        self.rejected: dict[str, int] = {}
        self.low_priority_share = 1.0  # 1 - queue.high_priority_reserve
        self.record_spend = on_spend is not None  # write a SpendRow per settled call (the ledger)
        self.arrival_margin = 1.0
        self.circuit_threshold = 5
        self.circuit_cooldown = 30.0
        self.circuit_max_cooldown = 300.0
        self.adaptive = True
        self.adaptive_decrease = 0.7
        self.pace_default = 0.1
        self._lock = threading.RLock()
        self._states: OrderedDict[str, ScopeState] = OrderedDict()
        # The states of a list of scopes (a plan: every call of one identity to one model shares
        # its list object), so an admission does not look each scope up again. Cleared whenever
        # a state leaves ``_states``; entries hold their list, so an ``id`` is never reused.
        self._plan_states: dict[int, _Layout] = {}
        self._leases: dict[str, _Reservation] = {}
        # The queue (see _examine): every waiting call, and indexes by scope key.
        self._waiters: dict[Waiter, None] = {}  # every queued waiter
        self._waiting_ids: dict[str, int] = {}  # their call ids (how many wait under each), for waiting()
        self._heads: dict[Waiter, None] = {}  # the waiters in state _HEAD
        self._blocking: dict[str, _Line] = {}  # scope key -> heads blocked on it (in blocked.keys)
        self._front: dict[str, int] = {}  # scope key -> rank of its first blocked head: the line
        self._parked: dict[str, _Line] = {}  # scope key -> waiters parked behind its front
        self._by_scope: dict[str, _Line] = {}  # scope key -> heads that count against it (in keys)
        self._due: list[tuple[float, int, Waiter]] = []  # heap of the heads' retry times (lazy)
        self._pending: list[tuple[int, Waiter, str]] = []  # left by an exception inside a pass
        self._reconfigured: set[str] = set()  # keys given new limits by a call (API-key choices)
        # scope key -> size-dependent limit -> heads counting against it, by what they need there
        self._sized: dict[str, dict[str, _Sizes]] = {}
        self._committed: set[str] = set()  # keys where calls took room since the last dispatch
        self._seq = 0
        self._next_sweep = 0.0
        self._next_budget_sweep = 0.0
        self._version = 0  # bumped by every change that can let a waiting call in
        # model scope key -> the endpoint scope its provider signals moved to (move_signals): a
        # call admitted before the move went to that endpoint, and its outcome lands there
        self._moved: dict[str, Scope] = {}
        # the calls in flight at a move (only their outcome is the endpoint's: a call admitted
        # after it on the model's scope alone, as the proxy admits a request for a group before
        # the Router picks an endpoint, went to an endpoint not known)
        self._moved_calls: set[str] = set()
        # Called (outside the lock) with the keys of model scopes another process split, where the
        # backend is shared (see RedisEngine._hear_splits); this one is the only process on its
        # state, and never calls it.
        self.on_split: Callable[[list[str]], None] | None = None
        self._min_period = 60.0  # the shortest period after which a scope may be idle (per-second
        # windows are idle sooner, but checking them every tick costs more than it saves)
        self.admitted_total = 0
        self.queued_total = 0
        self.retried_total = 0
        _fork.track(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child (see :mod:`._fork`): a lock of its own, and nothing in flight or
        waiting. The parent's calls and waiters stay the parent's: their slots and budget
        reservations are zeroed here, not settled (the parent settles and records them), and what
        the parent had not yet handed to its ledger or event sinks stays the parent's to write.
        The windows keep what was charged before the fork (those requests were made)."""
        self._lock = threading.RLock()
        self._leases.clear()
        for st in self._states.values():
            st.in_flight = 0
            st.reserved_cost = 0.0
            st.reserved_requests = 0
            st.probe = None
        for line in (self._waiters, self._waiting_ids, self._heads, self._blocking, self._front, self._parked,
                     self._by_scope, self._sized):
            line.clear()
        self._due = []
        self._pending = []
        self._reconfigured = set()
        self._committed = set()
        self._out_rows = []
        self._out_events = []
        self._version += 1

    def configure(self, cfg: Any) -> None:
        """Take the engine-level settings of a :class:`~.config.RateLimitingConfig`: arrival margin,
        high-priority reserve, circuit breaker, adaptive limits."""
        self.arrival_margin = cfg.estimation.arrival_margin_seconds
        self.low_priority_share = 1.0 - cfg.queue.high_priority_reserve
        cb = cfg.circuit_breaker
        self.circuit_threshold = cb.failure_threshold if cb.enabled else 2**62
        self.circuit_cooldown = cb.cooldown_seconds
        self.circuit_max_cooldown = cb.max_cooldown_seconds
        self.adaptive = cfg.adaptive.enabled
        self.adaptive_decrease = cfg.adaptive.decrease_factor

    # ------------------------------------------------------------------ state
    def _state(self, scope: Scope, now: float) -> ScopeState:
        states = self._states
        st = states.get(scope.key)
        if st is None:
            st = states[scope.key] = ScopeState(scope)
        else:
            states.move_to_end(scope.key)
            if st.limits is not scope.limits and scope.generation >= st.generation:
                st.generation = scope.generation
                st.apply(scope.limits)  # the configuration changed: new limits, same usage
                self._forget_states()  # cached layouts list its old windows
                if self._waiters:
                    self._reconfigured.add(scope.key)  # who waits there is looked at again
        st.last_used = now
        return st

    def _states_of(self, scopes: list[Scope], now: float) -> list[ScopeState]:
        """The states of ``scopes`` (shared: callers must not modify the list)."""
        return self._layout(scopes, now).states

    def _layout(self, scopes: list[Scope], now: float) -> _Layout:
        """The :class:`_Layout` of ``scopes``, cached per list (a plan shares one list object)."""
        layout = self._plan_states.get(id(scopes))
        if layout is not None and layout.scopes is scopes and len(layout.states) == len(scopes):
            if now - layout.stamped > 1.0:  # last_used only needs to be about right (eviction's horizon)
                layout.stamped = now
                for st in layout.states:
                    st.last_used = now
            return layout
        states = [self._state(s, now) for s in scopes]
        if len(self._plan_states) >= 4096:
            self._plan_states.clear()
        layout = self._plan_states[id(scopes)] = _Layout(scopes, states, now)
        return layout

    def _forget_states(self) -> None:
        """A state left ``_states`` (eviction, reconfiguration): drop the per-plan cache."""
        self._plan_states.clear()

    def forget(self, call_id: str) -> None:
        """Drop a reservation without settling it (no spend, no events): its slots and budget
        reservation come back. For a copy of a call that is counted elsewhere."""
        with self._lock:
            res = self._leases.pop(call_id, None)
            if res is None:
                return
            if not res.slot_freed:
                for st in res.states:
                    st.in_flight = max(st.in_flight - 1, 0)
            cost = res.ticket.cost
            for st in () if res.settled else res.layout.budgeted:  # (settled: given back already)
                st.reserved_requests = max(st.reserved_requests - 1, 0)
                # (none left in flight: exactly 0, not a float's leftover of the sums)
                st.reserved_cost = max(st.reserved_cost - cost, 0.0) if st.reserved_requests else 0.0
            for st in res.states:
                if st.probe == call_id:
                    st.probe = None
            self._moved_calls.discard(call_id)
            self._version += 1
            if self._waiters:  # (its slots and reservation came back: who waits for them is looked at)
                self._dispatch(self.clock(), _touched(res))
        self._drain()

    def relimit(self, limits_for: Callable[[str, str], LimitSet | None], generation: int,
                levels: Collection[str]) -> None:
        """After a configuration change: give every scope of ``levels`` the limits it now has,
        used or not. (A scope a call no longer counts against, such as a budget removed, would
        otherwise keep showing its old limits in the stats, and a spent budget as tripped.) The
        new limits are worked out outside the lock: 100,000 agents must not stall admissions."""
        with self._lock:
            todo = [st for st in self._states.values() if st.generation < generation and st.level in levels]
        changes = []
        for st in todo:
            lim = limits_for(st.level, st.key)
            if lim is not None and lim != st.limits:
                changes.append((st, lim))
        if not changes:
            return
        with self._lock:
            for st, lim in changes:
                if st.generation < generation:  # (a call since has given it the new limits already)
                    st.generation = generation
                    st.apply(lim)
            self._forget_states()
            self._version += 1

    def rescope(self, resolve: Callable[[Ticket], list[Scope]]) -> None:
        """After a configuration change: re-resolve waiting calls' scopes and apply the new
        limits at once (a lowered limit holds them, a raised one lets them in, a call that can
        no longer ever fit fails)."""
        with self._lock:
            now = self.clock()
            for waiter in self._waiters:
                try:
                    waiter.ticket.scopes = resolve(waiter.ticket)
                except Exception:  # keep the old scopes rather than lose the call
                    continue
                waiter.keys = frozenset(s.key for s in waiter.ticket.scopes)
                for scope in waiter.ticket.scopes:
                    self._state(scope, now)
            self._version += 1
            if self._waiters:
                self._requeue(now)
        self._drain()

    def reconfigure(self) -> None:
        """Forget scope state whose limits came from an older configuration."""
        with self._lock:
            for key, st in list(self._states.items()):
                if not st.in_flight:
                    del self._states[key]
            self._forget_states()

    # -------------------------------------------------------------- admission
    def _admit_fast(self, ticket: Ticket, layout: _Layout, now: float) -> bool:
        """The common case in one pass: check each window and charge it as it fits (undoing the
        charges if a later one does not). Returns ``False``, having changed nothing, when any
        limit, slot, budget or provider signal (cooldown, pacing, breaker) needs a closer look:
        :meth:`_evaluate` then decides exactly and says why. Never admits what it would refuse."""
        share = 1.0 if ticket.priority >= HIGH_PRIORITY else self.low_priority_share
        for st in layout.signals:
            if st.cooldown_until > now or st.pace_until > now or st.circuit is not CLOSED:
                return False
        if share == 1.0:
            for st in layout.slots:
                if st.in_flight >= st.concurrency:  # type: ignore[operator]
                    return False
        else:
            for st in layout.slots:
                if st.in_flight >= max(st.concurrency * share, 1 if share >= 1 else 0):  # type: ignore[operator]
                    return False
        if layout.budgeted and self._budgets_blocked(layout.budgeted, ticket, self.calendar.starts(self.wall())):
            return False
        tin = ticket.input_tokens
        tout = ticket.output_tokens
        amounts = (1, tin + tout, tin - ticket.cached_input, tout)
        for code, width, windows in layout.runs:
            amount = amounts[code]
            index = int(now // width)
            for w in windows:  # expire, check and SlidingWindow.add() inlined: this runs ~10x per call
                if now >= w.next_expiry:
                    w.expire(now)
                total = w.total + amount
                if total > w.limit * share:
                    self._undo(layout, w, ticket, now)
                    return False
                if w.ci == index:  # the newest bucket: SlidingWindow.add()'s usual case
                    w.cur += amount
                    w.total = total
                else:
                    w.add(now, amount)
        self._open(ticket, layout, now)
        return True

    @staticmethod
    def _undo(layout: _Layout, failed: SlidingWindow, ticket: Ticket, now: float) -> None:
        """Take back what :meth:`_admit_fast` charged before ``failed`` (in ``layout.prog``'s order)."""
        tin, tout = ticket.input_tokens, ticket.output_tokens
        amounts = (1, tin + tout, tin - ticket.cached_input, tout)
        for code, w in layout.prog:
            if w is failed:
                return
            w.adjust(now, int(now // w.width), -amounts[code])

    def _evaluate(self, ticket: Ticket, now: float) -> tuple[list[ScopeState], Blocked | None]:
        states = list(self._states_of(ticket.scopes, now))
        budgeted = [st for st in states if st.budgets]
        if budgeted:  # (refused by the budget that frees last: see _budgets_blocked)
            self._budgets_blocked(budgeted, ticket, self.calendar.starts(self.wall()))
        share = 1.0 if ticket.priority >= HIGH_PRIORITY else self.low_priority_share
        first: Blocked | None = None
        retry: float | None = None
        release = False
        failing: set[str] = set()
        eases: float | None = None
        for st in states:
            r, rel, b = self._check(st, ticket, now, share)
            if b is not None:
                failing.add(st.key)
                first = first or b
                release = release or rel
                if r is not None:
                    retry = r if retry is None else max(retry, r)
                    eases = r if eases is None else min(eases, r)
        if ticket.choices:
            best: tuple[float, ScopeState] | None = None
            alt_retry: float | None = None
            alt_first: Blocked | None = None
            alt_error: HiveRateLimitError | None = None
            for alt in ticket.choices:
                st = self._state(alt, now)
                try:
                    r, rel, b = self._check(st, ticket, now, share)
                except HiveRateLimitError as exc:  # this key cannot serve the call; another may
                    alt_error = alt_error or exc
                    continue
                if b is None:
                    util = st.utilization()
                    if best is None or util < best[0]:
                        best = (util, st)
                else:
                    alt_first = alt_first or b
                    if r is not None:
                        alt_retry = r if alt_retry is None else min(alt_retry, r)
            if best is not None:
                states.append(best[1])
                ticket.chosen = best[1].key
            elif alt_error is not None and alt_first is None:
                raise alt_error
            else:
                failing.update(s.key for s in ticket.choices)
                first = first or alt_first
                if alt_retry is None:
                    release = True
                else:
                    retry = alt_retry if retry is None else max(retry, alt_retry)
                    eases = alt_retry if eases is None else min(eases, alt_retry)
        if first is None:
            return states, None
        first.retry_at = None if release and retry is None else retry
        first.keys = frozenset(failing)
        first.eases_at = eases
        return states, first

    def _check(self, st: ScopeState, ticket: Ticket, now: float,
               share: float) -> tuple[float | None, bool, Blocked | None]:
        """One scope: ``(retry_at, waits_for_a_release, first_block)``; ``first_block`` is None if it fits."""
        retry: float | None = None
        release = False
        first: Blocked | None = None
        # Provider signals first: they hold every caller of this model (or key) alike.
        if st.cooldown_until > now:
            retry = st.cooldown_until
            first = Blocked(st.key, "provider_cooldown", 0.0, None)
            if st.cooldown_until > ticket.deadline:
                raise self._timeout(st, "the provider asked to wait", st.cooldown_until - now)
        elif st.pace_until > now and st.next_slot > now:
            retry = min(st.next_slot, st.pace_until)  # (pacing ends at pace_until, whatever the next slot)
            first = Blocked(st.key, "pacing", 0.0, None)
        if st.circuit is not CLOSED:
            if st.circuit is OPEN and now >= st.open_until:
                st.circuit = HALF_OPEN
                st.probe = None
            if st.circuit is OPEN:
                if st.open_until > ticket.deadline:
                    raise self._circuit_error(st, now)
                retry = st.open_until if retry is None else max(retry, st.open_until)
                first = first or Blocked(st.key, "circuit_open", 0.0, None)
            elif st.probe is not None:  # half-open: one probe at a time
                release = True
                first = first or Blocked(st.key, "circuit_half_open", 0.0, None)
        if st.budgets:
            starts = self.calendar.starts(self.wall())
            if self._budget_blocked(st, ticket, starts):
                release = True  # waits for in-flight reservations to settle
                first = first or Blocked(st.key, "budget_reservations", 0.0, None)
        tin, tout = ticket.input_tokens, ticket.output_tokens
        tall = tin + tout
        amount: float
        for metric, amount in ((st.requests, 1), (st.tokens, tall), (st.input, tin - ticket.cached_input),
                               (st.output, tout)):
            for w in metric:
                w.expire(now)
                limit = w.limit * share
                if amount > limit and w.name.startswith("learned"):
                    # Larger than a limit read from the provider's headers (which may mean something
                    # else than we read): it goes alone, once the window is empty; the provider judges it.
                    amount = limit
                if w.total + amount > limit:
                    if amount > w.limit:
                        raise RequestTooLargeError(
                            f"this call needs {amount:g} against {w.name}={w.limit:g} of {st.key}: "
                            f"it can never fit; {too_large_advice(w.name)}",
                            scope=st.key, limit=w.name, remaining=w.limit - w.total,
                        )
                    at = w.retry_at(now, amount + w.limit - limit)
                    if at == NEVER:  # the high-priority reserve alone is larger than this call allows
                        release = True
                    else:
                        retry = at if retry is None else max(retry, at)
                    first = first or Blocked(st.key, w.name, max(limit - w.total, 0.0), None)
        if st.concurrency is not None and st.in_flight >= max(st.concurrency * share, 1 if share >= 1 else 0):
            release = True
            first = first or Blocked(st.key, "concurrent_requests", 0.0, None)
        return retry, release, first

    def _timeout(self, st: ScopeState, why: str, wait: float) -> HiveRateLimitError:
        from .errors import RateLimitQueueTimeout

        return RateLimitQueueTimeout(
            f"call held by {st.key}: {why} {wait:.1f}s, longer than this call may wait; no request was sent",
            scope=st.key, limit="provider_cooldown", remaining=0.0, retry_after=wait,
        )

    def _circuit_error(self, st: ScopeState, now: float) -> HiveRateLimitError:
        from .errors import CircuitOpenError

        return CircuitOpenError(
            f"circuit breaker for {st.key} is open after {st.consecutive_failures} consecutive provider failures; "
            f"it lets a probe through in {st.open_until - now:.1f}s. No request was sent.",
            scope=st.key, limit="circuit_breaker", remaining=0.0, retry_after=max(st.open_until - now, 0.0),
        )

    def _budget_blocked(self, st: ScopeState, ticket: Ticket, starts: dict[str, float]) -> bool:
        """:meth:`_budgets_blocked` for one scope."""
        return self._budgets_blocked((st,), ticket, starts)

    def _budgets_blocked(self, states: Iterable[ScopeState], ticket: Ticket, starts: dict[str, float]) -> bool:
        """Raise if a budget of ``states`` is spent or cannot fit this call's worst case; return
        True if it fits only once calls in flight settle (then the call waits).

        When several budgets refuse the call, the error is that of the one that frees last (a call
        that no budget window can ever hold, before any other): its ``retry_after`` is then the
        earliest time the call may go, not a time at which another budget refuses it again."""
        wait = False
        worst: tuple[float, ScopeState, str, str, float, float, float] | None = None
        for st in states:
            for name, kind, limit in st.budgets:
                cost, requests, reserved_cost, reserved_requests = self._budget_usage(st, kind, starts[kind])
                if name == "max_requests_per_run":
                    spent, reserved, amount = requests, reserved_requests, 1.0
                else:
                    spent, reserved, amount = cost, reserved_cost, ticket.cost
                room = limit + MONEY_SLACK  # (0.04 + 0.01 > 0.05 in floats: a call that just fits, fits)
                if budget_spent(spent, limit) or spent + amount > room:
                    frees = NEVER if amount > room else self.calendar.end(kind, self.wall())
                    if worst is None or frees > worst[0]:
                        worst = (frees, st, name, kind, limit, spent, amount)
                elif spent + reserved + amount > room:
                    wait = True
        if worst is not None:
            raise self._budget_error(*worst[1:], starts)
        return wait

    def _budget_usage(self, st: ScopeState, kind: str, start: float) -> tuple[float, float, float, float]:
        """A scope's settled spend in its ``kind`` window that began at ``start`` (cost, requests) and
        its reservations in flight (cost, requests)."""
        c = self.book.get(st.key, kind, start)
        return (c.cost if c else 0.0), float(c.requests if c else 0), st.reserved_cost, float(st.reserved_requests)

    def _budget_error(self, st: ScopeState, name: str, kind: str, limit: float, spent: float, amount: float,
                      starts: dict[str, float]) -> HiveRateLimitError:
        from ._budget_errors import BudgetExceededError

        wall = self.wall()
        end = NEVER if amount > limit + MONEY_SLACK else self.calendar.end(kind, wall)  # (too big for the budget)
        retry_after = None if end == NEVER else max(end - wall, 0.0)
        who = st.key.replace(":", " ", 1)
        label = self.calendar.label(kind, wall)
        self.rejected[name] = self.rejected.get(name, 0) + 1
        if name == "max_requests_per_run":
            msg = (f"{who} reached its cap of {limit:g} requests per run ({spent:g} made); "
                   "the call was stopped and not sent. Start a new run or raise max_requests_per_run.")
        elif budget_spent(spent, limit):
            msg = (f"{WINDOW_ADJECTIVE[kind]} budget of {who} is spent: {self.currency} {money_text(spent)} of "
                   f"{self.currency} {money_text(limit)} ({label}); calls in this scope are stopped until "
                   + ("the run ends" if kind == RUN else "the window rolls over")
                   + " or the budget is raised or reset. The call was not sent.")
        elif amount > limit + MONEY_SLACK:
            msg = (f"{WINDOW_ADJECTIVE[kind]} budget of {who} ({self.currency} {money_text(limit)}) is smaller than "
                   f"what this call may cost ({self.currency} {money_text(amount, 4)}: its prompt plus max_tokens, or "
                   "estimation.default_output_tokens without one; or the price of its images, audio or query): "
                   "it can never fit. Lower max_tokens (n, for images) or raise the budget. The call was not sent.")
        else:
            decimals = 4
            while money_text(limit - spent, decimals) == money_text(amount, decimals) and decimals < 10:
                decimals += 2  # ("0.0001 left ... may cost up to 0.0001" read as if it fitted)
            msg = (f"{WINDOW_ADJECTIVE[kind]} budget of {who} cannot cover this call: {self.currency} "
                   f"{money_text(limit - spent, decimals)} left of {self.currency} {money_text(limit)} ({label}), "
                   f"and the call may cost up to {self.currency} {money_text(amount, decimals)} (its prompt plus "
                   "max_tokens, or estimation.default_output_tokens without one; or the price of its images, audio "
                   "or query). Lower max_tokens or raise the budget. The call was not sent.")
        trip = (st.key, kind, starts[kind], 1.0)
        if budget_spent(spent, limit) and self._fired.get(trip) != limit:
            self._fired[trip] = limit
            self._out_events.append({"type": "budget_exceeded", "scope": st.key, "budget": name, "window": kind,
                                     "spent": spent, "limit": limit, "currency": self.currency, "time": wall})
        return BudgetExceededError(msg, scope=st.key, limit=name, spent=spent, budget=limit, window=kind,
                                   retry_after=retry_after)

    def _try(self, ticket: Ticket, now: float) -> Blocked | None:
        """Admit ``ticket`` now (reserving everything it needs) or say why not."""
        if not ticket.choices and self._try_fast(ticket, now):
            return None
        states, blocked = self._evaluate(ticket, now)
        if blocked is None:
            self._commit(ticket, states, now)
        return blocked

    def _try_fast(self, ticket: Ticket, now: float) -> bool:
        """Admit through :meth:`_admit_fast` if the plan's layout allows it (``False``: nothing changed)."""
        layout = self._layout(ticket.scopes, now)
        return layout.fast and self._admit_fast(ticket, layout, now)

    def _took_room_now(self, ticket: Ticket, now: float) -> None:
        """After an admission at once: the keyed queue learns which scopes lost room."""
        if self._heads and self._keyed_dispatch:
            self._took_room(ticket)
            if self._reconfigured:  # it brought new limits (API-key choices after a reload)
                self._dispatch(now, ())

    def _commit(self, ticket: Ticket, states: list[ScopeState], now: float) -> None:
        tin, tout = ticket.input_tokens, ticket.output_tokens
        amounts = (1, tin + tout, tin - ticket.cached_input, tout)
        layout = _Layout(ticket.scopes, states)  # (not cached: its states may include a chosen API key's)
        for code, w in layout.prog:
            w.add(now, amounts[code])
        self._open(ticket, layout, now)

    def _open(self, ticket: Ticket, layout: _Layout, now: float) -> None:
        """Open the reservation of an admitted call whose windows are charged: its slots, budget
        reservations, pacing slot and circuit probe."""
        for st in layout.states:
            st.in_flight += 1
        for st in layout.budgeted:
            st.reserved_cost += ticket.cost
            st.reserved_requests += 1
        for st in layout.signals:  # only these are ever paced or probing (see _Layout.signals)
            if st.pace_until > now:
                st.next_slot = max(st.next_slot, now) + st.pace_interval
            if st.circuit is HALF_OPEN and st.probe is None:
                st.probe = ticket.call_id
        self._version += 1
        # (_lease_of, inlined)
        self._leases[ticket.call_id] = _Reservation(ticket, layout, now + (ticket.lease or self.lease_seconds), now)
        self.admitted_total += 1

    def _lease_of(self, ticket: Ticket) -> float:
        """How long ``ticket``'s reservation lives unsettled: its own lease, else ``lease_seconds``."""
        return ticket.lease or self.lease_seconds

    def _line_blocked(self, ticket: Ticket) -> Blocked | None:
        front = self._front
        if not front:
            return None
        rank = _rank(ticket.priority, self._seq + 1)  # where it would queue
        keys = frozenset(s.key for s in ticket.scopes if front.get(s.key, _LAST) < rank)
        if keys:
            return Blocked(_first_key(ticket, keys), "queue", 0.0, None, keys)
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

    def admit_now(self, ticket: Ticket) -> bool:
        """Admit ``ticket`` if it fits at once with nothing else to do (no maintenance due, no
        line ahead of it, no API key to choose): the usual case, without :meth:`acquire`'s
        set-up. ``False`` changes nothing; :meth:`acquire` then decides."""
        if ticket.choices:
            return False
        try:
            with self._lock:
                now = self.clock()
                if now >= self._next_sweep or self._front:
                    return False
                layout = self._layout(ticket.scopes, now)  # (_try_fast, inlined)
                if not layout.fast or not self._admit_fast(ticket, layout, now):
                    return False
                if self._heads:
                    self._took_room_now(ticket, now)
            return True
        finally:  # (a budget breaker raises, with its event queued)
            if self._out_rows or self._out_events:
                self._drain()

    def _acquire(self, ticket: Ticket, notify: Callable[[], None] | None) -> Waiter | None:
        now = self.clock()
        if now >= self._next_sweep:
            self._maintain(now)
        blocked = self._line_blocked(ticket) if self._front else None
        behind = blocked is not None
        if blocked is None:
            blocked = self._try(ticket, now)
            if blocked is None:
                self._took_room_now(ticket, now)
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
        self._insert(waiter, now, behind)
        self.queued_total += 1
        if self._reconfigured and self._keyed_dispatch:
            self._dispatch(now, ())
        return waiter

    # -------------------------------------------------------------- the queue
    # Every queued waiter is in one of two states, the result of a pass over the whole queue in
    # order (priority, then arrival) that tries each waiter unless an earlier waiter tried in that
    # pass is blocked on one of its scopes:
    #
    # * _HEAD: tried and blocked; it holds the line on the scopes it is blocked on
    #   (``blocked.keys``): in _blocking[key], and the first of them is that key's _front.
    # * _PARKED: behind the front of one of its scopes (``parked_on``), so not tried; in
    #   _parked[key]. Every parked waiter ranks after the front of the key it is parked on.
    #
    # Instead of redoing that pass on every event (O(queue) each, O(queue^2) for a burst), the
    # engine keeps its result and re-examines only what can change it, in queue order (_run):
    #
    # * the heads blocked on a scope whose state changed (a release, settlement or freed slot:
    #   the call's keys) or got new limits, every head after a configuration or budget change;
    # * the heads whose retry time has come, or the time one of their blocks eases (_due);
    # * after calls took room at a scope (_committed): the heads there that may no longer fit it,
    #   so that they hold the line there too, as the full pass would find. Those are the first
    #   head of each share (other limits need the same of every call: where it fits, the later
    #   ones of its share fit too) and, for token and cost limits, the heads needing more than
    #   is left (_sized: each scope's heads sorted by need).
    # * as a consequence: the waiters parked on a key whose front left (one at a time: the next
    #   one only if the previous one did not block that key again), and the heads after a new
    #   front of one of their keys (they park behind it).
    #
    # A burst of n events on one scope thus costs O(n log n), and a release touches the few
    # waiters it can let in. The outcome is the full pass's, at the same moments.

    def _insert(self, waiter: Waiter, now: float, behind: bool) -> None:
        self._waiters[waiter] = None
        ids = self._waiting_ids
        ids[waiter.ticket.call_id] = ids.get(waiter.ticket.call_id, 0) + 1
        blocked = waiter.blocked
        assert blocked is not None
        if behind:  # waits behind the front of blocked.keys (see _line_blocked)
            self._park(waiter, _first_key(waiter.ticket, blocked.keys))
            return
        todo: list[tuple[int, Waiter, str]] = []
        self._head(waiter, blocked, todo)  # a higher priority may put it before others' fronts
        if todo:
            self._run(now, todo)

    def dispatch(self) -> int:
        """Grant waiting calls that fit now, in priority-then-arrival order.

        Re-examines the waiting calls whose retry time has come (and what that changes); every
        change of state that can let a call in (a release, a settlement, a configuration or
        budget change) dispatches by itself.

        Returns:
            How many calls were granted.
        """
        with self._lock:
            if not self._waiters:
                return 0
            now = self.clock()
            self._maintain(now)
            granted = self._dispatch(now, ())
        self._drain()
        return granted

    _keyed_dispatch = True  # False: every dispatch re-examines every head (see _redis.RedisEngine)

    def _dispatch(self, now: float, changed: Collection[str] | None = None,
                  todo: list[tuple[int, Waiter, str]] | None = None) -> int:
        """Re-examine the heads blocked on a key in ``changed`` (``None``: every head; the keys
        whose state a release, settlement or freed slot changed), those whose time has come and
        those that may no longer fit where calls took room, then whatever that changes down the
        line (and ``todo``)."""
        if todo is None:
            todo = []
        if self._pending:
            todo += self._pending
            self._pending = []
        if changed is None or not self._keyed_dispatch:
            todo += [(w.rank, w, "") for w in self._heads]
            self._reconfigured.clear()
            self._committed.clear()
        else:
            if self._reconfigured:
                for k in self._reconfigured:
                    self._resize(k)
                changed = [*changed, *self._reconfigured]
                self._reconfigured.clear()
            blocking = self._blocking
            for k in changed:
                line = blocking.get(k)
                if line is not None:
                    todo += [(w.rank, w, "") for w in line.items]
            if self._heads:
                self._committed.update(changed)
                self._refresh(self._committed, now, todo, -_LAST)
            self._committed.clear()
        due = self._due
        while due and due[0][0] <= now:
            at, rank, w = heapq.heappop(due)
            b = w.blocked
            if w.state is _HEAD and b is not None and _due_at(b) == at:
                todo.append((rank, w, ""))
        if len(due) > 64 and len(due) > 2 * len(self._heads):
            self._due = due = [(t, w.rank, w) for w in self._heads
                               if w.blocked is not None and (t := _due_at(w.blocked)) is not None]
            heapq.heapify(due)
        if not todo:
            return 0
        return self._run(now, todo)

    def _run(self, now: float, todo: list[tuple[int, Waiter, str]]) -> int:
        """Examine the waiters of ``todo`` (rank, waiter, key it was released from) in queue order,
        with those their outcome adds. Everything added ranks after what added it, so each waiter
        is examined at most once."""
        heapq.heapify(todo)
        granted = 0
        last: Waiter | None = None
        entry: tuple[int, Waiter, str] | None = None
        try:
            while todo:
                entry = heapq.heappop(todo)
                w = entry[1]
                if w is not last:  # (a waiter's entries pop one after the other: same rank)
                    last = w
                    if w.state is not _OUT:
                        granted += self._examine(w, now, todo)
                if entry[2]:
                    self._release_next(entry[2], todo)
                entry = None
        except BaseException:
            # (_try raised something else than a refusal.) Keep the rest for the next dispatch,
            # so that no waiter stays parked behind a front that left.
            if entry is not None:
                todo.append(entry)
            self._pending += todo
            raise
        return granted

    def _examine(self, w: Waiter, now: float, todo: list[tuple[int, Waiter, str]]) -> int:
        """Park ``w`` behind an earlier front of one of its scopes, or try it: grant it, fail it,
        or make it a head. Returns 1 if granted."""
        front = self._front
        rank = w.rank
        conflict = frozenset(k for k in w.keys if front.get(k, _LAST) < rank) if front else None
        if conflict:
            if w.state is _HEAD:
                self._unhead(w, todo)
            prev = w.blocked
            if prev is None or prev.limit != "queue" or not prev.keys <= conflict:
                prev = w.blocked = Blocked(_first_key(w.ticket, conflict), "queue", 0.0, None, conflict)
            self._park(w, _first_key(w.ticket, prev.keys))
            return 0
        try:
            blocked = self._try(w.ticket, now)
        except HiveRateLimitError as exc:  # a budget ran out, or limits were lowered, while it waited
            w.error = exc
            self._remove(w, todo)
            w.notify()
            return 0
        if blocked is None:
            w.granted = True
            self._remove(w, todo)
            w.blocked = None
            w.notify()
            if self._keyed_dispatch and self._heads:
                # It took room: heads after it may no longer fit there (those before it are
                # looked at in the next dispatch, as the full pass would at the next event).
                self._refresh(self._took_room(w.ticket), now, todo, rank)
            return 1
        previous = w.retry_at
        self._head(w, blocked, todo)
        if blocked.retry_at is not None and (previous is None or blocked.retry_at < previous):
            w.notify()  # let it re-arm its timer for the earlier time
        return 0

    def _head(self, w: Waiter, blocked: Blocked, todo: list[tuple[int, Waiter, str]]) -> None:
        """Make ``w`` a head blocked as ``blocked`` says (or update its block)."""
        if w.state is _HEAD:
            old = w.blocked
            assert old is not None
            w.blocked = blocked
            if old.keys != blocked.keys:
                for k in old.keys - blocked.keys:
                    self._unblock(k, w, todo)
                for k in blocked.keys - old.keys:
                    self._block(k, w, todo)
            if blocked is old:
                return  # (a cached answer: its time is queued already)
        else:
            self._unpark(w)
            w.state = _HEAD
            w.blocked = blocked
            self._heads[w] = None
            by_scope = self._by_scope
            for k in w.keys:
                line = by_scope.get(k)
                if line is None:
                    line = by_scope[k] = _Line()
                    if self._keyed_dispatch:
                        self._resize(k)
                line.add(w)
                sized = self._sized.get(k)
                if sized:
                    for metric, sizes in sized.items():
                        sizes.add(w, _amount(w.ticket, metric))
            for k in blocked.keys:
                self._block(k, w, todo)
        at = _due_at(blocked)
        if at is not None:
            heapq.heappush(self._due, (at, w.rank, w))

    def _unhead(self, w: Waiter, todo: list[tuple[int, Waiter, str]]) -> None:
        del self._heads[w]
        by_scope = self._by_scope
        for k in w.keys:
            line = by_scope[k]
            line.remove(w)
            if not line:
                del by_scope[k]
                self._sized.pop(k, None)
                continue
            sized = self._sized.get(k)
            if sized:
                for metric, sizes in sized.items():
                    sizes.remove(w, _amount(w.ticket, metric))
        assert w.blocked is not None
        for k in w.blocked.keys:
            self._unblock(k, w, todo)
        w.state = _NEW

    def _block(self, k: str, w: Waiter, todo: list[tuple[int, Waiter, str]]) -> None:
        """Head ``w`` is blocked on ``k``."""
        line = self._blocking.get(k)
        if line is None:
            line = self._blocking[k] = _Line()
        line.add(w)
        rank = w.rank
        f = self._front.get(k)
        if f is None or rank < f:
            self._front[k] = rank
            # A new front: heads after it that count against k wait behind it now.
            heads = self._by_scope.get(k)
            if heads is not None:
                for h in heads.after(rank):
                    heapq.heappush(todo, (h.rank, h, ""))

    def _unblock(self, k: str, w: Waiter, todo: list[tuple[int, Waiter, str]]) -> None:
        """Head ``w`` is no longer blocked on ``k`` (or no longer a head)."""
        line = self._blocking[k]
        line.remove(w)
        if self._front[k] == w.rank:
            if line:
                self._front[k] = line.first().rank
            else:
                del self._front[k]
                del self._blocking[k]
            self._release_next(k, todo)

    def _release_next(self, k: str, todo: list[tuple[int, Waiter, str]]) -> None:
        """Examine the first waiter parked on ``k`` if ``k``'s front no longer ranks before it
        (after it, the next one: see _run)."""
        parked = self._parked.get(k)
        if parked is None:
            return
        q = parked.first()
        if self._front.get(k, _LAST) > q.rank:
            parked.pop_first()
            if not parked:
                del self._parked[k]
            q.parked_on = None
            heapq.heappush(todo, (q.rank, q, k))

    def _park(self, w: Waiter, k: str) -> None:
        self._unpark(w)
        w.state = _PARKED
        w.parked_on = k
        line = self._parked.get(k)
        if line is None:
            line = self._parked[k] = _Line()
        line.add(w)

    def _unpark(self, w: Waiter) -> None:
        k = w.parked_on
        if k is not None:
            line = self._parked[k]
            line.remove(w)
            if not line:
                del self._parked[k]
            w.parked_on = None

    def _remove(self, w: Waiter, todo: list[tuple[int, Waiter, str]]) -> None:
        """Take ``w`` out of the queue."""
        if w.state is _HEAD:
            self._unhead(w, todo)
        else:
            self._unpark(w)
        del self._waiters[w]
        ids = self._waiting_ids
        left = ids.pop(w.ticket.call_id, 1) - 1
        if left > 0:
            ids[w.ticket.call_id] = left
        w.state = _OUT
        if not self._waiters:
            self._due.clear()  # (entries of waiters gone: nothing else would drop them)

    # The room a call takes at token and cost limits (see "the queue").
    def _took_room(self, t: Ticket) -> list[str]:
        keys = [s.key for s in t.scopes]
        if t.chosen is not None:
            keys.append(t.chosen)
        self._committed.update(keys)
        return keys

    def _resize(self, k: str) -> None:
        """(Re)build the by-size indexes of the heads counting against ``k``: one per token or
        cost limit of ``k``."""
        st = self._states.get(k)
        metrics: list[str] = []
        if st is not None:
            if st.tokens:
                metrics.append("all")
            if st.input:
                metrics.append("in")
            if st.output:
                metrics.append("out")
            if any(name != "max_requests_per_run" for name, _, _ in st.budgets):
                metrics.append("cost")
        heads = self._by_scope.get(k)
        if not metrics or heads is None:
            self._sized.pop(k, None)
            return
        sized = self._sized[k] = {m: _Sizes() for m in metrics}
        for w in heads.items:
            for m, sizes in sized.items():
                sizes.add(w, _amount(w.ticket, m))

    def _refresh(self, keys: Iterable[str], now: float, todo: list[tuple[int, Waiter, str]],
                 after: float) -> None:
        """After calls took room at ``keys``: queue for examination the heads ranked after
        ``after`` that count against one of them without being blocked there and may not fit
        there any more. Those are the first such head of each share (the first waiting call of
        the high-priority reserve, and of the rest: where it fits, the later ones of its share
        fit too, but for token and cost limits), and the heads that need more tokens or cost
        than is left there (with the smaller share: a superset)."""
        by_scope, all_sized = self._by_scope, self._sized
        share = min(1.0, self.low_priority_share)
        starts: dict[str, float] | None = None
        for k in keys:
            heads = by_scope.get(k)
            if heads is None:
                continue
            ranks = heads.ranks
            i = bisect_right(ranks, after)
            for j in (i, max(i, bisect_left(ranks, _LOW_FROM))):
                if j < len(ranks):
                    h = heads.items[j]
                    if h.blocked is not None and k not in h.blocked.keys:
                        heapq.heappush(todo, (h.rank, h, ""))
            sized = all_sized.get(k)
            if not sized:
                continue
            st = self._states.get(k)
            if st is None:
                continue
            for metric, sizes in sized.items():
                room = NEVER
                if metric == "cost":
                    if starts is None:
                        starts = self.calendar.starts(self.wall())
                    for name, kind, limit in st.budgets:
                        if name != "max_requests_per_run":
                            c = self.book.get(k, kind, starts[kind])
                            room = min(room, limit - (c.cost if c else 0.0) - st.reserved_cost)
                else:
                    for win in st.tokens if metric == "all" else st.input if metric == "in" else st.output:
                        win.expire(now)
                        room = min(room, win.limit * share - win.total)
                for h in sizes.above(room):
                    if h.rank > after and h.blocked is not None and k not in h.blocked.keys:
                        heapq.heappush(todo, (h.rank, h, ""))

    def _requeue(self, now: float) -> None:
        """Rebuild the queue's state from scratch: one pass over every waiter in order."""
        self._heads.clear()
        self._blocking.clear()
        self._front.clear()
        self._parked.clear()
        self._by_scope.clear()
        self._sized.clear()
        self._committed.clear()
        self._due.clear()
        self._pending.clear()
        for w in self._waiters:
            w.state = _NEW
            w.parked_on = None
        self._run(now, [(w.rank, w, "") for w in self._waiters])

    def cancel(self, waiter: Waiter) -> bool:
        """Take a waiter out of the queue (timeout, cancellation).

        Returns:
            ``True`` if it had already been granted: the caller owns the reservation and must
            use it or :meth:`release` it.
        """
        with self._lock:
            if waiter.granted:
                return True
            if waiter.state is _OUT:
                return False
            if waiter.state is not _HEAD:
                # Only waiting behind others, it frees nobody: a burst of timeouts costs
                # O(log n) each. (Its block names the scopes it is held on now, for the error.)
                front, rank = self._front, waiter.rank
                held = frozenset(k for k in waiter.keys if front.get(k, _LAST) < rank)
                prev = waiter.blocked
                if held and (prev is None or prev.limit != "queue" or not prev.keys <= held):
                    waiter.blocked = Blocked(_first_key(waiter.ticket, held), "queue", 0.0, None, held)
                self._remove(waiter, [])
                return False
            # It was first in line somewhere: the next in line there is examined.
            todo: list[tuple[int, Waiter, str]] = []
            self._remove(waiter, todo)
            self._version += 1
            self._dispatch(self.clock(), (), todo)
        self._drain()
        return False

    # ------------------------------------------------------------- settlement
    def settle(self, call_id: str, input_tokens: int | None, output_tokens: int | None,
               cost: float | None = None, *, cached_input: int = 0) -> bool:
        """Replace a call's estimated usage with its actual usage. Idempotent.

        ``cached_input``: of ``input_tokens``, those read from the provider's prompt cache (see
        :meth:`release`).

        Returns:
            ``True`` if a reservation was found and settled now.
        """
        with self._lock:
            res = self._leases.get(call_id)
            if res is None or res.settled:
                return False
            self._version += 1
            now = self.clock()
            self._settle(res, input_tokens, output_tokens, cost, now, cached=cached_input)
            if self._waiters:
                self._dispatch(now, _touched(res))
        self._drain()
        return True

    def _settle(self, res: _Reservation, input_tokens: int | None, output_tokens: int | None,
                cost: float | None, now: float, requests: int = 1, cached: int = 0) -> None:
        res.settled = True
        t = res.ticket
        actual_in = t.input_tokens if input_tokens is None else input_tokens
        actual_out = t.output_tokens if output_tokens is None else output_tokens
        margin = self.arrival_margin
        # From the send, when known: the wait between admission and the send (LiteLLM's own
        # work, a busy event loop) is then not mistaken for time on the wire.
        start = res.admitted_at if res.sent_at is None else res.sent_at
        elapsed = now - start
        reserved_in = t.input_tokens - t.cached_input
        # (settled_input(t, input_tokens, actual_in, cached), inlined)
        if input_tokens is None:
            settled_in = reserved_in
        elif cached <= 0:
            settled_in = actual_in
        else:
            settled_in = actual_in - cached if cached < actual_in else 0
        deltas = (0, actual_in + actual_out - t.input_tokens - t.output_tokens, settled_in - reserved_in,
                  actual_out - t.output_tokens)
        short = elapsed <= margin
        admitted = res.admitted_at
        layout = res.layout
        for code, width, windows in layout.runs:
            index = int(admitted // width)  # the bucket admission charged
            if code == REQ:
                if not requests:  # never sent ("void"): its request is taken back
                    for window in windows:
                        window.adjust(now, index, -1)
                    continue
                # Count the request from when it may have reached the provider, not from its
                # admission: the HTTP request goes out (and lands) some time after admission,
                # and a provider enforcing an exact window counts it from its arrival. It can
                # only move if it was admitted in an earlier bucket than now's (the time it
                # moves to lies between its admission and now).
                if res.recounted:  # counted from its send already (note_attempt): moved on from there
                    index = int(start // width)
                if not margin or int(now // width) == index:
                    continue
                for window in windows:
                    if short and elapsed <= window.period / 2:
                        # Done soon after the send: it had arrived by now, so count it from now.
                        # (A stalled event loop can hold a fast call's bytes for 100+ ms.)
                        window.move(now, index, 1, now)
                    else:  # a long call (generation time): it arrived early on
                        to = start + min(margin, window.period / 10)
                        if int(to // width) != index:
                            window.move(now, index, 1, to)
                continue
            delta = deltas[code]
            if not delta:
                continue
            for window in windows:
                if window.ci == index and now < window.next_expiry:
                    cur = window.cur  # SlidingWindow.adjust(), its usual case inlined
                    applied = delta if delta > -cur else -cur
                    window.cur = cur + applied
                    window.total += applied
                else:
                    window.adjust(now, index, delta)
        if res.moved_to:  # its charge, copied to an endpoint's learned windows at a split: settled there too
            for code, window in res.moved_to:
                if deltas[code]:
                    window.adjust(now, int(admitted // window.width), deltas[code])
            res.moved_to = None
        actual_cost = t.cost if cost is None else cost  # unknown: keep the worst case
        for st in layout.budgeted:
            st.reserved_requests = max(st.reserved_requests - 1, 0)
            st.reserved_cost = max(st.reserved_cost - t.cost, 0.0) if st.reserved_requests else 0.0  # (see forget)
        wall = self.wall()
        starts = self.calendar.starts(wall)
        if layout.budgeted:  # its budgets are checked right after: no tab
            self.book.add_now(t.spend_keys, starts, actual_cost, requests, actual_in + actual_out)
        else:
            self.book.add(t.spend_keys, starts, actual_cost, requests, actual_in + actual_out)
        if self.record_spend and (requests or actual_cost or actual_in or actual_out):
            provider, model, agent, user, team, run = t.dims
            self._out_rows.append(SpendRow(wall, t.call_id, provider, model, agent, user, team, run, requests,
                                           actual_in, actual_out, actual_cost))
        for st in layout.budgeted:
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
                if self._fired.get(mark) == limit:
                    continue
                self._fired[mark] = limit
                self._out_events.append({
                    "type": "budget_exceeded" if thr >= 1.0 else "budget_warning",
                    "scope": st.key, "budget": name, "window": kind, "threshold": thr,
                    "spent": spent, "limit": limit, "currency": self.currency, "time": wall,
                    "window_label": self.calendar.label(kind, wall),
                })

    def release(self, call_id: str, *, input_tokens: int | None = None, output_tokens: int | None = None,
                cost: float | None = None, outcome: str = "success", wait: float | None = None,
                signals: Any = None, cached_input: int = 0) -> bool:
        """End a call: settle it (with the given usage, if not settled yet) and free its slots.

        Args:
            call_id: the call.
            input_tokens: actual prompt tokens, or ``None`` to keep the estimate.
            cached_input: of ``input_tokens``, those read from the provider's prompt cache. They
                count in token limits (OpenAI counts them in its TPM) but not in input-token
                limits (``input_tokens_per_minute``: Anthropic's ITPM leaves cache reads out).
            output_tokens: actual output tokens, or ``None`` to keep the estimate.
            cost: actual cost, or ``None`` to keep the worst-case estimate.
            outcome: ``"success"``, ``"rate_limited"`` (a 429/529), ``"failure"`` (5xx, timeout: counts
                toward the circuit breaker), ``"error"`` (anything else) or ``"void"`` (never sent:
                no request is booked; give it no tokens and no cost).
            wait: for ``rate_limited``: how long the provider asked to wait (``None``: back off).
            signals: a :class:`~._retry.RateSignals` read from the response headers, if any.

        Returns:
            ``True`` if the call held a reservation.
        """
        with self._lock:
            res = self._leases.pop(call_id, None)
            if res is None:
                return False
            self._version += 1
            now = self.clock()
            if not res.settled:
                self._settle(res, input_tokens, output_tokens, cost, now, 0 if outcome == "void" else 1,
                             cached_input)
            layout = res.layout
            if not res.slot_freed:
                for st in layout.states:
                    st.in_flight -= 1
            provider_states = layout.signals
            if not provider_states:
                self._moved_calls.discard(call_id)
            else:
                moved = self._moved_keys(call_id, provider_states) if self._moved_calls else ()
                if moved:
                    provider_states = [self._state(self._moved[st.key], now) if st.key in moved else st
                                       for st in provider_states]
                if outcome in _ENDPOINT_OUTCOMES and any(st.level == "key" for st in provider_states):
                    # The provider limits (and fails) per API key or endpoint: cool that one only,
                    # count the failure toward its breaker only; the others carry on.
                    provider_states = [st for st in provider_states if st.level == "key"]
                self._provider_outcome(provider_states, call_id, outcome, wait, signals, now)
            if self._waiters:
                self._dispatch(now, _touched(res))
        self._drain()
        return True

    # ------------------------------------------------------ provider signals
    def _provider_outcome(self, states: list[ScopeState], call_id: str, outcome: str, wait: float | None,
                          signals: Any, now: float) -> None:
        learners = header_scopes(states) if signals is not None else []
        for st in states:
            if st in learners:
                self._learn(st, signals, now)
            if outcome == "success":
                # (While open, only the probe's success counts: a call sent before the circuit opened
                # says nothing of now, and reset the count its CircuitOpenError gives to 0.)
                if st.circuit is CLOSED:
                    st.consecutive_failures = 0
                elif st.probe == call_id:
                    st.circuit, st.probe, st.open_count, st.consecutive_failures = CLOSED, None, 0, 0
                    self._out_events.append({"type": "circuit_closed", "scope": st.key, "time": self.wall()})
                if st.adaptive_rpm is not None:
                    # Recovery: each success adds 1/20 (at least 1/rate), so a minute of traffic at
                    # the lowered rate raises it by ~5 % (at least 1): a rate cut by a few 429s
                    # is back within a few minutes, not (at +1 per minute) within hours.
                    st.adaptive_rpm += max(ADAPTIVE_STEP, 1.0 / max(st.adaptive_rpm, 1.0))
                    if st.adaptive_rpm >= st.adaptive_ceiling:
                        st.adaptive_rpm = None
                    self._apply_learned(st)
            elif outcome in ("rate_limited", "failure"):
                if outcome == "rate_limited":
                    self._cool_down(st, wait, now)
                st.consecutive_failures += 1
                probe_failed = st.circuit is HALF_OPEN and st.probe == call_id
                if probe_failed or (st.circuit is CLOSED and st.consecutive_failures >= self.circuit_threshold):
                    st.open_count += 1
                    length = min(self.circuit_cooldown * 2 ** (st.open_count - 1), self.circuit_max_cooldown)
                    st.circuit, st.probe, st.open_until = OPEN, None, now + length
                    self._out_events.append({"type": "circuit_opened", "scope": st.key, "seconds": length,
                                             "failures": st.consecutive_failures, "time": self.wall()})
            elif st.probe == call_id:
                st.probe = None  # the probe failed for a reason that says nothing about the provider

    def _cool_down(self, st: ScopeState, wait: float | None, now: float) -> None:
        """A 429: hold every caller of this scope until the provider's wait is over, then release
        them paced; and lower the scope's learned rate (multiplicative decrease)."""
        until = now + (wait if wait is not None else 1.0)
        if until > st.cooldown_until:
            st.cooldown_until = until
        rate = self._rate(st)
        st.pace_interval = 1.0 / rate if rate else self.pace_default
        st.pace_until = st.cooldown_until + max(2.0 * (until - now), 1.0)
        st.next_slot = st.cooldown_until
        previous, st.rate_limited_at = st.rate_limited_at, now
        # One 429 is handled by the cooldown alone; a second one within a minute means the
        # provider enforces less than we send: lower our rate (multiplicative decrease). Once a
        # minute at most: the 429s of the minute after a cut answer requests sent before it
        # (they cut a model from ~750 to ~300 a minute within 95 s in a soak with sporadic 429s).
        if self.adaptive and st.observed_requests is not None and now - previous < 60.0 \
                and now - st.adaptive_cut_at >= 60.0:
            w = st.observed_requests
            w.expire(now)
            seen = w.total
            if seen < ADAPTIVE_MIN_RATE and st.adaptive_rpm is None:
                return  # too few requests to learn a rate from; the cooldowns pace them
            # The pace it was sent at, per minute: what the last minute holds, or, when its first
            # request is more recent than that (a burst at start-up), that many over the time since
            # (at least a second). Counting a 0.2 s burst as a minute's traffic cut a model to a
            # handful of requests per minute after two brief 429s.
            # (its oldest request: a bucket whose requests were all taken back holds none)
            oldest = next((b[0] for b in w.buckets if b[1] > 0), w.ci if w.cur > 0 else NO_BUCKET)
            span = 60.0 if oldest == NO_BUCKET else min(max(now - oldest * w.width, 1.0), 60.0)
            rate = seen * 60.0 / span
            current = st.adaptive_rpm if st.adaptive_rpm is not None else rate
            if st.adaptive_rpm is None:
                st.adaptive_ceiling = max(rate, 1.0) * 2.0
            st.adaptive_rpm = max(float(ADAPTIVE_MIN_RATE) * self.adaptive_decrease,
                                  min(current, rate) * self.adaptive_decrease)
            st.adaptive_cut_at = now
            self._apply_learned(st)
            # Only down to the cut guessed from 429s: a limit the provider's headers gave is a real
            # one, and a window holding more than it must drain, counting every request it sent.
            if st.learned_rpm is None or w.total <= st.learned_rpm:
                w.shrink_to(w.limit)

    def _rate(self, st: ScopeState) -> float | None:
        """The strictest request rate (per second) this scope is known to allow."""
        rates = [w.limit / w.period for w in st.requests if w.limit != NEVER]
        return min(rates) if rates else None

    def _learn(self, st: ScopeState, sig: Any, now: float) -> None:
        if sig.limit_requests:
            st.learned_rpm = float(sig.limit_requests)
        if sig.limit_tokens:
            st.learned_tpm = float(sig.limit_tokens)
        elif not sig.learn_tokens:
            st.learned_tpm = None  # (not a limit to hold calls to: see read_signals)
        if sig.limit_input_tokens:
            st.learned_itpm = float(sig.limit_input_tokens)
            self.observe_input(st)
        if sig.limit_output_tokens:
            st.learned_otpm = float(sig.limit_output_tokens)
            self.observe_output(st)
        self._apply_learned(st)
        # Out of requests (or tokens): wait instead of collecting a 429. The reset headers give
        # the time until the limit is back to its full value; providers refill continuously, so
        # with the limit known the next request is possible after reset / limit.
        resets = [wait for _, _, wait in sig.exhausted()]
        if resets and now + max(resets) > st.cooldown_until:
            st.cooldown_until = now + max(resets)

    def _apply_learned(self, st: ScopeState) -> None:
        if st.observed_requests is not None:
            limits = [x for x in (st.learned_rpm, st.adaptive_rpm) if x is not None]
            st.observed_requests.limit = min(limits) if limits else NEVER
        if st.observed_tokens is not None:
            st.observed_tokens.limit = st.learned_tpm if st.learned_tpm is not None else NEVER
        if st.observed_input is not None:
            st.observed_input.limit = st.learned_itpm if st.learned_itpm is not None else NEVER
        if st.observed_output is not None:
            st.observed_output.limit = st.learned_otpm if st.learned_otpm is not None else NEVER

    def observe_input(self, st: ScopeState) -> None:
        """Count ``st``'s input tokens from now on (a provider gave its input-token limit; caller
        holds the lock). Calls admitted before are not in it: they settle the windows they charged."""
        if st.observed_input is None and st.observed_requests is not None:
            st.observed_input = SlidingWindow(NEVER, 60.0, "learned_input_tokens_per_minute")
            st.input.append(st.observed_input)
            self._forget_states()  # cached layouts list its windows without this one

    def observe_output(self, st: ScopeState) -> None:
        """Count ``st``'s output tokens from now on (a provider gave its output-token limit), as
        :meth:`observe_input` does its input tokens."""
        if st.observed_output is None and st.observed_requests is not None:
            st.observed_output = SlidingWindow(NEVER, 60.0, "learned_output_tokens_per_minute")
            st.output.append(st.observed_output)
            self._forget_states()  # cached layouts list its windows without this one

    def _note_move(self, source: str, target: Scope) -> bool:
        """Record that ``source``'s signals move to ``target`` (caller holds the lock), with the
        calls in flight on ``source``: they went to ``target``, and their outcomes land there (see
        release). ``False`` if they moved already (two threads splitting a model at once)."""
        if source in self._moved:
            return False
        self._moved[source] = target
        self._moved_calls.update(cid for cid, r in self._leases.items()
                                 if any(sc.key == source for sc in r.ticket.scopes))
        return True

    def _moved_keys(self, call_id: str, scopes: Iterable[Scope | ScopeState]) -> list[str]:
        """Of the scopes of a call settling now, those whose signals moved to an endpoint while it
        was in flight (see _note_move): it went to that endpoint, and its outcome is that one's."""
        if call_id not in self._moved_calls:
            return []
        self._moved_calls.discard(call_id)
        if any(s.level == "key" for s in scopes):  # (its own endpoint or key takes them)
            return []
        return [s.key for s in scopes if s.key in self._moved]

    def move_signals(self, source: str, target: Scope) -> None:
        """What the provider told about scope ``source`` (a model's: cooldown, pacing, circuit
        breaker, learned and adaptive limits) now holds for ``target`` only (an endpoint's: the
        model turned out to be served by more than one, see HiveLimiter._endpoint_scopes).
        Once per source: a second move (two threads splitting at once) changes nothing."""
        with self._lock:
            if not self._note_move(source, target):
                return
            src = self._states.get(source)
            if src is None or src.observed_requests is None:
                return
            dst = self._state(target, self.clock())
            if dst.observed_requests is None:
                return
            for name in _SIGNALS:
                setattr(dst, name, getattr(src, name))
                setattr(src, name, _SIGNAL_DEFAULTS[name])
            dst.probe = None  # (a probe in flight is the model's: its outcome lands there)
            if dst.learned_itpm is not None:
                self.observe_input(dst)
            if dst.learned_otpm is not None:
                self.observe_output(dst)
            # The requests and tokens counted toward the learned limits move too (as in Redis' MOVE).
            copied: list[tuple[int, SlidingWindow, SlidingWindow]] = []
            for code, a, b in ((REQ, src.observed_requests, dst.observed_requests),
                               (ALL, src.observed_tokens, dst.observed_tokens),
                               (IN, src.observed_input, dst.observed_input),
                               (OUT, src.observed_output, dst.observed_output)):
                if a is not None and b is not None and b.is_idle():
                    b.copy_usage(a)
                    if code != REQ:
                        copied.append((code, a, b))
            # The calls in flight that charged them hold their estimates in the copies too (an
            # output-token window, each call's max_tokens): their settlements correct them there too.
            if copied:
                for res in self._leases.values():
                    if res.settled:
                        continue
                    charged = {id(w) for _, w in res.layout.prog}
                    extra = [(code, b) for code, a, b in copied if id(a) in charged]
                    if extra:
                        res.moved_to = (res.moved_to or []) + extra
            self._apply_learned(src)
            self._apply_learned(dst)
            self._version += 1

    def held_for(self, keys: Iterable[str]) -> dict[str, float]:
        """Of these model or API-key scopes, those a provider's signal holds now (a 429's cooldown,
        an open circuit), with the seconds it still holds them."""
        out: dict[str, float] = {}
        with self._lock:
            now = self.clock()
            for key in keys:
                st = self._states.get(key)
                if st is None:
                    continue
                until = st.cooldown_until
                if st.circuit is OPEN and st.open_until > until:
                    until = st.open_until
                if until > now:
                    out[key] = until - now
        return out

    def provider_state(self) -> dict[str, dict[str, Any]]:
        """Cooldowns, circuits and learned limits of model and API-key scopes."""
        with self._lock:
            now = self.clock()
            out: dict[str, dict[str, Any]] = {}
            for key, st in self._states.items():
                if st.observed_requests is None:
                    continue
                # (an open circuit whose time is over is half-open, whether or not a call looked at it yet)
                entry: dict[str, Any] = {"circuit": HALF_OPEN if st.circuit is OPEN and now >= st.open_until
                                         else st.circuit}
                if st.cooldown_until > now:
                    entry["cooldown_seconds"] = st.cooldown_until - now
                if st.learned_rpm is not None:
                    entry["learned_requests_per_minute"] = st.learned_rpm
                if st.learned_tpm is not None:
                    entry["learned_tokens_per_minute"] = st.learned_tpm
                if st.learned_itpm is not None:
                    entry["learned_input_tokens_per_minute"] = st.learned_itpm
                if st.learned_otpm is not None:
                    entry["learned_output_tokens_per_minute"] = st.learned_otpm
                if st.adaptive_rpm is not None:
                    entry["adaptive_requests_per_minute"] = round(st.adaptive_rpm, 2)
                if st.consecutive_failures:
                    entry["consecutive_failures"] = st.consecutive_failures
                out[key] = entry
            return out

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
        """Add the ledger's spend to the budget counters (at start-up, or when a first budget
        opens the ledger: spend counted in memory until then is kept)."""
        with self._lock:
            for key, kind, start, cost, requests, tokens in totals:
                self.book.merge(key, kind, start, cost, requests, tokens)

    def replace_spend(self, totals: Iterable[tuple[str, str, float, float, int, int]]) -> None:
        """Forget every budget counter, then seed them from ``totals`` (see :meth:`load_spend`)."""
        with self._lock:
            self.book = BudgetBook()
            for key, kind, start, cost, requests, tokens in totals:
                self.book.set(key, kind, start, cost, requests, tokens)

    def apply_external(self, rows: Iterable[SpendRow]) -> None:
        """Add spend that other processes settled (tailed from the shared ledger)."""
        from ._budget import dim_keys

        with self._lock:
            self._version += 1
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
            self._version += 1
            self.book.clear(key)
            self._fired = {m: v for m, v in self._fired.items() if m[0] != key}
            if self._waiters:
                self._dispatch(self.clock())
        self._drain()

    def spend(self, key: str, kind: str) -> tuple[float, int, int]:
        """Settled (cost, requests, tokens) of ``key`` in the current ``kind`` window."""
        with self._lock:
            starts = self.calendar.starts(self.wall())
            c = self.book.get(key, kind, starts[kind])
            return (c.cost, c.requests, c.tokens) if c else (0.0, 0, 0)

    def watch(self, scope: Scope) -> None:
        """Keep ``scope`` in the stats though no call has counted against it yet (a process that
        has made no call still shows the global budget, and what other processes spent of it)."""
        with self._lock:
            if scope.key not in self._states:
                self._state(scope, self.clock())

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
                        "tripped": budget_spent(spent, limit),
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
                if c.start >= starts[kind]:  # (newer: the wall clock stepped back)
                    out.setdefault(key, {})[kind] = (c.cost, c.requests, c.tokens)
            return out

    def reservation(self, call_id: str) -> _Reservation | None:
        """The reservation ``call_id`` holds now (``None``: none)."""
        return self._leases.get(call_id)

    def free_slot_of(self, call_id: str, res: _Reservation | None) -> None:
        """:meth:`free_slot`, if ``call_id`` still holds ``res`` (not a later call reusing the id)."""
        with self._lock:
            if res is not None and self.reservation(call_id) is res:
                self.free_slot(call_id)

    def free_slot(self, call_id: str) -> None:
        """Give back a call's concurrency slots before its usage is known (a stream ended and
        its usage arrives in a later event). The reservation stays open until :meth:`release`."""
        with self._lock:
            res = self._leases.get(call_id)
            if res is None or res.slot_freed:
                return
            res.slot_freed = True
            self._version += 1
            for st in res.states:
                st.in_flight -= 1
            if self._waiters:
                self._dispatch(self.clock(), _touched(res))

    def note_attempt(self, call_id: str) -> bool:
        """An HTTP attempt of an open call is about to be sent; attempts after the first are
        retries LiteLLM sends without re-admission, and count as requests. False: no open call
        has this id."""
        res = self._leases.get(call_id)
        if res is None:
            return False
        if res.attempts == 0:
            # The first send (the usual case) changes only this call's own record: no lock. (A
            # call's attempts are sent one after another, never concurrently.)
            res.attempts = 1
            now = res.sent_at = self.clock()
            margin = self.arrival_margin  # (_sent_late, inlined)
            if margin and now - res.admitted_at > (LATE_SEND if margin < LATE_SEND else margin):
                self._recount(res, now)
            return True
        with self._lock:
            if self._leases.get(call_id) is not res:
                return True
            res.attempts += 1
            now = self.clock()
            for st in res.states:
                for w in st.requests:
                    w.expire(now)
                    w.add(now, 1)
        return True

    def _sent_late(self, delay: float) -> bool:
        """Whether a call sent ``delay`` seconds after its admission has its request counted again
        from its send (see :meth:`_recount`; a margin of 0 counts every request from its admission)."""
        return bool(self.arrival_margin) and delay > max(self.arrival_margin, LATE_SEND)

    def _recount(self, res: _Reservation, now: float) -> None:
        """A call sent later than admission + the arrival margin (another callback's hook, a
        stalled event loop or thread): its request reaches the provider later than its window
        here assumed, and, in a short window, after admission's count has left it (2 a second
        let 3 reach the provider within a second). Count its request from the send instead."""
        with self._lock:
            if self._leases.get(res.ticket.call_id) is not res or res.settled:
                return
            for code, width, windows in res.layout.runs:
                if code == REQ:
                    index = int(res.admitted_at // width)
                    for w in windows:
                        w.move(now, index, 1, now)
            res.recounted = True

    def _open_ids(self) -> list[str]:
        with self._lock:
            return list(self._leases)

    def settle_open(self) -> int:
        """Settle every call still open, at its estimates and worst-case cost, as an expired lease
        is (at exit: a stream abandoned unread, a call in a thread the exit cuts off). Returns how
        many there were."""
        ids = self._open_ids()
        for call_id in ids:
            self.release(call_id, outcome="error")
        return len(ids)

    def flush_pending(self) -> int:
        """Write what a shared backend kept while it did not answer (at exit). Nothing to do here."""
        return 0

    def progress(self, call_id: str) -> int:
        """How far an open call got: 0 not sent (or not open), 1 sent to the provider, 2 answered
        (its stream was handed to the caller). A call that ends in error after 1 or 2 may have
        been served, and billed."""
        res = self._leases.get(call_id)
        if res is None:
            return 0
        return 2 if res.answered else 1 if res.attempts else 0

    def attempted(self, call_id: str) -> bool:
        """Whether LiteLLM reported sending an HTTP attempt of this open call (:meth:`note_attempt`)."""
        res = self._leases.get(call_id)
        return res is not None and res.attempts > 0

    def note_answered(self, call_id: str) -> None:
        """The provider has begun to answer an open call (its stream is being read)."""
        res = self._leases.get(call_id)
        if res is not None:
            res.answered = True

    def ticket_of(self, call_id: str) -> Ticket | None:
        """The ticket of an open call (``None`` if ``call_id`` holds no reservation)."""
        res = self._leases.get(call_id)
        return None if res is None else res.ticket

    def note_retry(self) -> None:
        """Count a provider 429 that is being retried for its caller."""
        with self._lock:
            self.retried_total += 1

    def consecutive_failures(self, call_id: str) -> int:
        """Consecutive provider failures of the model/key scopes of an open call (for backoff)."""
        res = self._leases.get(call_id)
        if res is None:
            return 0
        return max((st.consecutive_failures for st in res.states if st.observed_requests is not None), default=0)

    def holds(self, call_id: str) -> bool:
        """Whether ``call_id`` has an open reservation."""
        return call_id in self._leases

    def waiting(self, call_id: str) -> bool:
        """Whether a call waits in the queue under ``call_id``."""
        with self._lock:
            return call_id in self._waiting_ids

    def next_reclaim(self) -> float | None:
        """When :meth:`dispatch` may next take back an expired lease (``None``: no lease is open).

        A call that waits for a concurrency slot has no retry time of its own: without this, the
        slot of an abandoned stream would come back only at the next release or admission."""
        with self._lock:
            if not self._leases:
                return None
            soonest = min(r.expires_at for r in self._leases.values())
            return max(soonest, self._next_sweep)

    def renew(self, call_id: str) -> None:
        """Extend a call's lease (a stream is still delivering chunks)."""
        res = self._leases.get(call_id)
        if res is not None:
            res.expires_at = self.clock() + self.lease_seconds

    # ------------------------------------------------------------ maintenance
    def sweep(self) -> None:
        """Settle the calls whose lease has run out (at most once a second). Admissions do it
        too; this is for a process gone quiet (a stream abandoned, then no call): its stats,
        state file and budgets see the call counted without waiting for another call."""
        with self._lock:
            self._maintain(self.clock())
        self._drain()

    def _maintain(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        expired = [cid for cid, r in self._leases.items() if r.expires_at <= now]
        if expired:
            self._version += 1
        for cid in expired:
            res = self._leases.pop(cid)
            self._lease_ran_out(res, now)
            if not res.slot_freed:
                for st in res.states:
                    st.in_flight -= 1
            for st in res.states:
                if st.probe == cid:
                    st.probe = None
            self._moved_calls.discard(cid)  # (its outcome never comes: release does not see it)
        # Evict idle scopes, oldest first, a bounded number per tick (so one call never pays for
        # a mass eviction). A scope whose windows are all empty carries no information, so
        # dropping it changes no decision. (Admissions only stamp ``last_used``; a recently
        # used scope met here goes to the back.)
        states = self._states
        horizon = now - self._min_period - 1.0
        evicted = False
        kept: set[int] | None = None
        for _ in range(min(len(states), EVICTIONS_PER_TICK)):
            key, st = next(iter(states.items()))
            if st.last_used <= horizon and st.is_idle(now):
                if kept is None:
                    kept = self._held_states()
                if id(st) in kept:
                    states.move_to_end(key)
                    continue
                del states[key]
                evicted = True
            else:
                states.move_to_end(key)
        if evicted:
            self._forget_states()
        if now >= self._next_budget_sweep:
            self._next_budget_sweep = now + 60.0
            starts = self.calendar.starts(self.wall())
            self.book.sweep(starts)
            self._fired = {m: v for m, v in self._fired.items() if m[1] == RUN or m[2] == starts[m[1]]}
        if expired and self._waiters:
            self._dispatch(now)

    def _held_states(self) -> set[int]:
        """The states (ids) of open calls whose slots were freed (free_slot): not in flight there, but
        their settlement and outcome go to those states, which must not be evicted meanwhile."""
        return {id(st) for res in self._leases.values() if res.slot_freed for st in res.states}

    def _lease_ran_out(self, res: _Reservation, now: float) -> None:
        """An open call's lease ran out (caller holds the lock): settled at its estimates, if it
        was not (conservative). Its slots are freed by the caller."""
        if not res.settled:
            self._settle(res, None, None, None, now)

    def evict_idle(self) -> int:
        """Drop every scope whose windows are empty and which has no call in flight."""
        with self._lock:
            now = self.clock()
            kept = self._held_states()
            idle = [k for k, st in self._states.items() if st.is_idle(now) and id(st) not in kept]
            for k in idle:
                del self._states[k]
            self._forget_states()
            return len(idle)

    # ------------------------------------------------------------------ stats
    def snapshot(self, chunk: int = 0) -> dict[str, dict[str, Any]]:
        """Current usage per scope key: window counts, in-flight, queued.

        Args:
            chunk: take the lock for at most this many scopes at a time (the status publisher
                does, so admissions never wait for a pass over thousands of scopes; the result
                is then not one atomic picture). 0: one pass under the lock.
        """
        with self._lock:
            queued: dict[str, int] = {}
            for waiter in self._waiters:
                for k in waiter.keys:
                    queued[k] = queued.get(k, 0) + 1
            if not chunk:
                now = self.clock()
                return {key: self._describe(st, now, queued) for key, st in self._states.items()}
            items = list(self._states.items())
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(items), chunk):
            if i:
                _time.sleep(0)  # let a thread waiting for the lock take it (locks are not fair)
            with self._lock:
                now = self.clock()
                for key, st in items[i:i + chunk]:
                    out[key] = self._describe(st, now, queued)
        return out

    @staticmethod
    def _describe(st: ScopeState, now: float, queued: dict[str, int]) -> dict[str, Any]:
        entry: dict[str, Any] = {"level": st.level}
        for w in st.windows():
            w.expire(now)
            if w.limit != NEVER:
                entry[w.name] = {"used": w.total, "limit": w.limit}
        entry["in_flight"] = st.in_flight
        if st.concurrency is not None:
            entry["concurrent_requests"] = {"used": st.in_flight, "limit": st.concurrency}
        entry["queued"] = queued.get(st.key, 0)
        return entry

    def backend_info(self) -> dict[str, Any]:
        """Which backend holds the counters, and its health."""
        return {"type": "memory"}

    def wake_all(self) -> None:
        """Ask every waiting call to re-check the clock (used after a fake clock moves)."""
        with self._lock:
            waiters = sorted(self._waiters, key=_by_rank)
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
