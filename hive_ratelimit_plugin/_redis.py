"""The shared backend: one set of limits and budgets for many processes and hosts, in Redis.

:class:`RedisEngine` is the :class:`~._engine.Engine` with its counters moved into Redis. The
queue stays in the process (priority, FIFO, holding the line, the thread and asyncio drivers are
the same code); what the queue asks — "may this call go now, and if not, until when?" — is
answered by one atomic Lua script (:mod:`._lua`) in one round trip, and each finished call is
settled by another. Waiting callers sleep until the time Redis computed; a call waiting for
another process to release a slot or a reservation re-asks at a short, jittered interval, and
only the first waiter of each blocked scope asks (the others wait behind it in the local line),
so a queue of thousands does not hammer Redis.

When Redis does not answer, ``redis.on_backend_error`` decides:

* ``local`` (default): each process enforces ``redis.local_share`` of every limit and budget on
  its own, from the moment of the outage;
* ``closed``: calls fail with :class:`~.errors.BackendUnavailableError` (nothing is sent);
* ``open``: calls go through uncounted by limits.

Whatever the policy, the spend of calls settled during the outage is kept and written to Redis
once it answers again; nothing already settled is lost. The outage is logged once, and so is the
recovery. Redis is tried again every ``redis.retry_interval`` seconds.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import random
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import _lua
from ._budget import KINDS, RUN, SpendRow
from ._engine import (
    _ENDPOINT_OUTCOMES,
    CLOSED,
    HALF_OPEN,
    NEVER,
    NO_LAYOUT,
    OPEN,
    Blocked,
    Engine,
    Scope,
    ScopeState,
    Ticket,
    _due_at,
    _Reservation,
    budget_spent,
    header_scopes,
    settled_input,
    too_large_advice,
)
from ._windows import SlidingWindow
from .config import LimitSet
from .errors import BackendUnavailableError, ConfigError, HiveRateLimitError, RequestTooLargeError

logger = logging.getLogger("hive_ratelimit_plugin")

SEP = "\0"
POLL_MIN, POLL_MAX = 0.02, 0.1  # re-ask interval while waiting for another process' release
# Re-ask interval while waiting for a token window: another process' settlement may give tokens
# back (its estimate was above its usage) long before the window would free them.
REFUND_POLL_MIN, REFUND_POLL_MAX = 0.25, 0.5
_SPEND_TTL = {"hour": 2 * 3600, "day": 2 * 86400, "month": 40 * 86400, RUN: 14 * 86400}
_MAX_PENDING = 100_000
# Call id prefix of the outage engine's copies of this process' calls Redis admitted (see _hold_in_flight)
_HELD = "\0held:"
# Error codes of a Redis that refuses for now (it will run the script later): a write kept for it
# stays kept. (Their messages may name a script too: "BUSY Redis is busy running a script".)
_NOT_BACK_YET = frozenset({"BUSY", "OOM", "READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS"})


def _charged_scopes(t: Ticket) -> list[Any]:
    """The scopes an admitted call counts against: its own, and the API key it was given."""
    if t.chosen is None or not t.choices:
        return list(t.scopes)
    return [*t.scopes, *(c for c in t.choices if c.key == t.chosen)]


def safe_url(url: str) -> str:
    """A Redis URL without its password (for logs and errors)."""
    import re

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparseable redis url>"
    # redis-py also reads the password (and user name) from the query string
    query = re.sub(r"(?i)(^|&)(password|username)=[^&]*", r"\1\2=***", parts.query)
    if parts.password is None and not parts.username:
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
    host = parts.hostname or ""
    if port:
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, query, parts.fragment))


US = "\x1f"  # separates the packed arguments of a script call
_WIRE = str.maketrans({"%": "%25", SEP: "%00", US: "%1F",
                       **{chr(c): f"%u{c:04X}" for c in range(0xD800, 0xE000)}})  # (no UTF-8 for those)
_UNWIRE = {"25": "%", "00": SEP, "1F": US}


def _wire(key: str) -> str:
    """A scope key as the scripts get it: the two separators of their arguments (and ``%``, the
    escape) escaped, so that an agent id holding them can neither break nor merge with another;
    lone surrogates (a badly decoded id) escaped too, as UTF-8 cannot carry them."""
    return key.translate(_WIRE)


def _unwire(key: str) -> str:
    """A scope key as the scripts return it, back to the engine's."""
    if "%" not in key:
        return key
    return re.sub("%(25|00|1F|u[0-9A-F]{4})",
                  lambda m: chr(int(m.group(1)[1:], 16)) if m.group(1)[0] == "u" else _UNWIRE[m.group(1)], key)


def _num(x: float) -> str:
    return repr(float(x))


def _scaled(limits: LimitSet, share: float) -> LimitSet:
    """``limits`` with every rate and concurrency limit scaled by ``share`` (outage mode; budgets: see
    :meth:`RedisEngine._scale`)."""
    update: dict[str, Any] = {}
    for name, value in limits.__dict__.items():
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if name.startswith(("requests_per_", "tokens_per_", "input_tokens_", "output_tokens_")):
            update[name] = value * share
        elif name == "concurrent_requests":
            update[name] = max(1, int(value * share))
    return limits.model_copy(update=update)


#: A host clock this far from Redis' (seconds) is corrected to it for budget windows, and logged.
_CLOCK_SKEW_WARN = 60.0
#: Seconds between measurements of this host's clock against Redis'.
_CLOCK_RECHECK = 600.0
#: A host wall clock that moved this much more (or less) than its monotonic clock has stepped: measured again.
_CLOCK_STEP = 5.0


class RedisEngine(Engine):
    """An :class:`Engine` whose windows, reservations, budgets and provider signals live in Redis.

    Args:
        clock: the local monotonic clock (waiting, deadlines).
        url: the Redis URL.
        prefix: key prefix; every key is ``{prefix}:...`` (one Redis Cluster slot).
        on_error: ``local``, ``closed`` or ``open`` (see the module docstring).
        local_share: the share of each limit one process may use during an outage (``local``).
        server_time: take "now" from Redis (``TIME``) rather than from ``clock``. True in
            production: one clock for all hosts. Tests pass False to drive Redis with a fake clock.
        client: a ready ``redis.Redis`` (tests); built from ``url`` otherwise.
        **kwargs: as for :class:`Engine`.
    """

    # Other processes change the shared state unseen: every dispatch re-examines the first waiter
    # of each blocked scope (whose answer _try keeps until the local state or its retry time moves).
    _keyed_dispatch = False
    # The numbering of writes that may be sent twice (set by _new_numbering)
    _sid: str
    _wseq: int
    _wlow: int
    _unsure: dict[int, None]
    _seq_lock: threading.Lock

    def __init__(self, clock: Callable[[], float], *, url: str, prefix: str = "hive-rl", on_error: str = "local",
                 local_share: float = 0.5, server_time: bool = True, socket_timeout: float = 0.5,
                 retry_interval: float = 1.0, client: Any = None, **kwargs: Any) -> None:
        super().__init__(clock, **kwargs)
        # Budgets' calendar windows follow this host's wall clock, corrected by its measured offset
        # from Redis' clock when that is large (see _check_clock).
        self._host_wall = self.host_wall  # (as it is: a step is measured, see _check_clock)
        self._skew = 0.0
        self._next_clock_check = NEVER  # (due at once with server_time: see the end of __init__)
        self._wall_minus_mono = 0.0  # at the last measurement: a change says the host clock stepped
        self.wall = self._corrected_wall
        try:
            import redis
        except ImportError:  # pragma: no cover - exercised by the missing-extra test in a subprocess
            raise ConfigError(
                "backend is a Redis URL but the redis package is not installed: pip install 'hive-ratelimit[redis]'"
            ) from None
        self.url = safe_url(url)
        self.prefix = "{" + prefix + "}"
        # Every key shares the hash tag {prefix}: one Redis Cluster slot. Naming one key lets a
        # cluster-aware client route the scripts to the node that owns it.
        self._route = [self.prefix + ":route"]
        self.on_error = on_error
        self.local_share = local_share
        self.server_time = server_time
        self.retry_interval = retry_interval
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._refused: type[BaseException] = redis.ResponseError
        # Refusals of a Redis that is not back yet (redis-py strips their code from the message)
        self._not_back: tuple[type[BaseException], ...] = tuple(
            getattr(redis.exceptions, name) for name in ("OutOfMemoryError", "ReadOnlyError", "TryAgainError",
                                                         "ClusterDownError", "MasterDownError", "BusyLoadingError")
            if hasattr(redis.exceptions, name))
        if client is None:
            try:
                client = redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                              socket_connect_timeout=socket_timeout, health_check_interval=30)
            except ValueError as exc:  # (a bad query parameter: redis-py's own message names it, not the URL)
                raise ConfigError(f"rate_limiting.backend: {safe_url(url)} is not a usable Redis URL: {exc}") from None
        self.r = client
        self._admit = client.register_script(_lua.ADMIT)
        self._settle_script = client.register_script(_lua.SETTLE)
        self._hit = client.register_script(_lua.HIT)
        self._recount_script = client.register_script(_lua.RECOUNT)
        self._peek_s = client.register_script(_lua.PEEK)
        self._reset = client.register_script(_lua.RESET)
        self._renew = client.register_script(_lua.RENEW)
        self._leave = client.register_script(_lua.LEAVE)
        self._charge = client.register_script(_lua.CHARGE)
        self._move = client.register_script(_lua.MOVE)
        self._down_since: float | None = None
        self._next_try = 0.0
        self._pending_spend: list[list[str]] = []  # CHARGE args of spend settled while Redis was down
        self._pending_settle: list[list[str]] = []  # SETTLE args of calls that Redis admitted
        self._pending_moves: list[list[str]] = []  # MOVE args of models split while Redis was down
        # Model scopes ADMIT or SETTLE said another process split (see _lua.MOVE), for on_split (see _drain)
        self._heard_splits: list[str] = []
        self._voids: dict[str, str] = {}  # call id -> reserved cost, of admissions whose answer was lost
        # (time, windows) of the outage engine's admissions, for Redis once it answers (_replay_hits)
        self._pending_hits: collections.deque[tuple[float, list[tuple[str, str, float, float]]]] = \
            collections.deque(maxlen=_MAX_PENDING)
        self._replay_lock = threading.Lock()  # one thread replays; stats threads call Redis unlocked too
        self._new_numbering()
        self._last_block: dict[str, tuple[Blocked, int]] = {}
        self._peeked: dict[tuple[str, str, float], tuple[float, float, float, float]] | None = None  # (_budget_usage)
        self._renewed: dict[str, float] = {}
        self._spend_seen: dict[str, None] = {}  # spend keys seen (for stats), bounded
        self.round_trips = 0
        self.outages = 0
        # The in-process engine used while Redis is down (policy "local"): scaled limits.
        self.fallback = Engine(clock, lease_seconds=self.lease_seconds, max_queue=self.max_queue,
                               wall_clock=self.wall, timezone=self.calendar.tz.key, currency=self.currency,
                               warning_thresholds=self.thresholds, on_spend=self._fallback_spend,
                               on_event=self._fallback_events)
        self._scaled: dict[tuple[str, int, int, float], Any] = {}
        self._fb_keys: dict[str, list[str]] = {}  # spend keys of calls the outage engine admitted
        self._held: dict[str, str] = {}  # call id -> its copy in the outage engine (see _hold_in_flight)
        # waiting call id -> the scopes whose line across processes it may be in (see ahead_in_line in _lua)
        self._in_line: dict[str, list[str]] = {}
        self._based: set[tuple[str, str, float]] = set()  # outage budgets seeded from Redis' spend (see _scale)
        # Settled spend Redis last reported per (scope, window kind, window start): where the
        # outage engine's budgets start from (policy "local").
        self._known_spend: dict[tuple[str, str, str], tuple[float, float]] = {}
        self._fb_outage = -1  # the outage the outage engine's budgets were set up for
        if server_time:
            self._next_clock_check = 0.0
            self._check_clock()

    def _corrected_wall(self) -> float:
        return self._host_wall() - self._skew

    def _check_clock(self) -> None:
        """Measure this host's wall clock against Redis' (at start, then every ten minutes). Budgets'
        calendar windows begin at host times, and the newest window any host began is everyone's:
        a host a day ahead began "tomorrow" for the whole fleet, wiping a shared budget's spend. A
        host more than a minute off Redis' clock therefore reckons windows by Redis' clock (and
        says so); hosts a few seconds apart keep their own clocks (they share the newest window)."""
        try:
            sec, usec = self.r.time()
        except Exception:  # Redis not there: still due, measured before the next call that reaches it
            return
        mono = self.clock()
        self._next_clock_check = mono + _CLOCK_RECHECK
        self._wall_minus_mono = self._host_wall() - mono
        skew = self._host_wall() - (float(sec) + float(usec) / 1e6)
        if abs(skew) <= _CLOCK_SKEW_WARN:
            self._skew = 0.0
            return
        if abs(skew - self._skew) > _CLOCK_SKEW_WARN:
            logger.warning("hive-ratelimit: this host's clock is %.0fs %s Redis' clock (%s): budget windows here "
                           "follow Redis' clock; keep hosts on NTP", abs(skew), "ahead of" if skew > 0 else "behind",
                           self.url)
        self._skew = skew

    # ------------------------------------------------------------- plumbing
    def _now_arg(self) -> str:
        return "" if self.server_time else _num(self.clock())

    def _call(self, script: Any, args: list[str]) -> Any:
        """Run a script; raises :class:`_Down` (after logging once) when Redis does not answer."""
        mono = self.clock()
        if self._down_since is not None and mono < self._next_try:
            raise _Down
        if self.server_time and (mono >= self._next_clock_check
                                 or abs(self._host_wall() - mono - self._wall_minus_mono) > _CLOCK_STEP):
            self._check_clock()  # (due, never measured, or the host's clock stepped: a VM resumed, NTP)
        replayed = 0
        sent = False
        try:
            self.round_trips += 1
            if self._down_since is not None or self._kept():
                # First what was settled meanwhile: this call's decision must see it. (Kept writes
                # with Redis up: another thread's call, sent before the outage was noticed, came
                # back after it and found Redis back before the failed write was kept.)
                replayed = self._replay()
            sent = True
            out = script(keys=self._route, args=_pack(args))
        except self._errors as exc:
            if sent and script is self._admit and "connecting to" not in str(exc):  # it may have run
                self._voids[args[2]] = args[4]
            self._next_try = mono + self.retry_interval
            if self._down_since is None:
                self._down_since = mono
                self.outages += 1
                logger.error("redis backend %s is unreachable (%s: %s); on_backend_error=%s applies until it "
                             "answers again", self.url, type(exc).__name__, _clean(exc), self.on_error)
                self._out_events.append({"type": "backend_down", "backend": self.url, "policy": self.on_error,
                                         "time": self.wall()})
                self._outage_begins()
            raise _Down from None
        if self._down_since is not None:
            with self._replay_lock:
                since, self._down_since = self._down_since, None
            if since is None:  # another thread found it back first
                return out
            down = mono - since
            self._drop_held()
            logger.warning("redis backend %s answers again after %.1fs; wrote %d settlements made meanwhile",
                           self.url, down, replayed)
            self._out_events.append({"type": "backend_up", "backend": self.url, "down_seconds": down,
                                     "replayed": replayed, "time": self.wall()})
        return out

    def _number(self, args: list[str], once: bool = True) -> list[str]:
        """Append ``sid, seq, low`` to the arguments of a settlement or charge (see ``first_time`` in
        :mod:`._lua`): a write whose answer is lost is kept and sent again, and Redis, which may have
        run it, must apply it once. ``once=False`` (a settlement with a lease record, which makes a
        second write do nothing anyway) appends blanks."""
        if not once:
            args += ["", "", ""]
            return args
        with self._seq_lock:
            self._wseq += 1
            seq = self._wseq
            unsure = self._unsure
            unsure[seq] = None
            low = self._wlow
            while low not in unsure:  # (stops at seq at the latest; each number is passed once)
                low += 1
            self._wlow = low
        args += [self._sid, str(seq), str(low)]
        return args

    def _new_numbering(self) -> None:
        """Number writes that may be sent twice (see _number) as a new process: its id, the last
        number given (_wseq; the base class' _seq numbers waiters), those whose answer has not come
        back yet (_unsure), and a number at or below the oldest of those (_wlow)."""
        self._sid = secrets.token_hex(8)
        self._wseq = 0
        self._wlow = 1
        self._unsure = {}
        self._seq_lock = threading.Lock()

    def _after_fork_in_child(self) -> None:
        """In a forked child: a process of its own (see :mod:`._fork`). Its writes get a new
        process id (the parent's numbers would collide with the parent's and be skipped as
        replays), and what the parent kept for Redis stays the parent's to write (written by both,
        it would count twice). The parent's leases stay in Redis, the parent's to release."""
        super()._after_fork_in_child()
        self._new_numbering()
        self._replay_lock = threading.Lock()
        self._pending_settle = []
        self._pending_spend = []
        self._pending_hits = collections.deque(maxlen=_MAX_PENDING)
        self._voids = {}
        self._last_block = {}
        self._renewed = {}
        self._fb_keys = {}
        self._held = {}
        self._in_line = {}

    def _kept(self) -> bool:
        """Whether writes are kept for Redis: settlements, spend and window hits made while it was
        down, and admissions whose answer was lost (to give back)."""
        return bool(self._pending_settle or self._pending_spend or self._pending_hits or self._voids
                    or self._pending_moves)

    def _answered(self, args: list[str]) -> None:
        """The write ``args`` was applied (or dropped): this process will not send it again."""
        if args[-3]:
            with self._seq_lock:
                self._unsure.pop(int(args[-2]), None)

    def _replay(self) -> int:
        """Write the settlements and spend kept while Redis was down. Each is taken off the pending
        lists once written, so a new failure midway (raised) leaves only the rest for next time."""
        with self._replay_lock:
            return self._replay_locked()

    def _replay_one(self, script: Any, args: list[str]) -> Any:
        try:
            return script(keys=self._route, args=_pack(args))
        except self._refused as exc:
            text = str(exc)
            if isinstance(exc, self._not_back) or "user_script" not in text or text.split(" ", 1)[0] in _NOT_BACK_YET:
                raise  # (BUSY with another script, OOM, READONLY during a failover...: Redis is not back yet)
            # the script itself failed on this one: retrying it would fail at every recovery
            logger.error("redis backend %s refused a settlement kept during the outage; it is dropped (%s)",
                         self.url, _clean(exc))
            return []

    def _replay_locked(self) -> int:
        wall = self.wall()
        done_settles = done_spend = 0
        settles, spend = self._pending_settle, self._pending_spend
        # Admissions sent whose answer never came (a socket timeout): Redis may have admitted
        # them, but this process did not count them as admitted there. Give back what Redis may
        # hold for them (slots, reservation, probe), charging nothing: otherwise the slots stay
        # taken for a whole lease and the worst-case cost is charged when the lease is reclaimed.
        for call_id, cost in list(self._voids.items()):
            self._replay_one(self._settle_script, [
                self.prefix, "", call_id, "1", "0", "", "", cost, "0", "0", "0", "0", "void",
                "", "", "", "", "", "", "", "", "", "0", "0", "0", "0", "0", "0", "0", "0", "0", ""])
            # (after "void": its wait and the 8 signals, as _settle_args; then the engine's settings)
            del self._voids[call_id]
        moves = self._pending_moves
        while moves:  # (first: what the model held is the endpoint's before its calls settle there)
            self._replay_one(self._move, moves[0])
            del moves[0]
        try:
            for args in settles:
                out = self._replay_one(self._settle_script, args)
                done_settles += 1
                self._answered(args)
                for raw in out[2:]:  # warnings crossed now: their marks are set, so now or never
                    self._remote_event(_dec(raw), wall)
            for args in spend:
                self._replay_one(self._charge, args)
                done_spend += 1
                self._answered(args)
                self._note_charged(args)
        finally:
            del settles[:done_settles]
            del spend[:done_spend]
        self._replay_hits()
        return done_settles + done_spend

    def _replay_hits(self) -> None:
        """Charge the windows in Redis with what this process admitted during the outage (each
        window only with the calls still inside it), so that the processes do not admit a full
        window's worth on top of it once Redis answers again. Charged as of now: conservative."""
        hits = self._pending_hits
        if not hits:
            return
        now = self.clock()
        taken = len(hits)
        sums: dict[tuple[str, str, float], float] = {}
        for at, windows in list(hits)[:taken]:
            for key, name, period, amount in windows:
                if now - at < period:
                    sums[(key, name, period)] = sums.get((key, name, period), 0.0) + amount
        if sums:
            args = [self.prefix, self._now_arg(), str(len(sums))]
            for (key, name, period), amount in sums.items():
                args += [key, name, _num(period), _num(amount)]
            self._replay_one(self._hit, args)  # (raises if Redis is not back: kept for next time)
        for _ in range(taken):
            hits.popleft()

    def _owe_hits(self, ticket: Ticket, now: float) -> None:
        """An admission by the outage engine: the windows it charged there, for Redis later."""
        tin, tout = ticket.input_tokens, ticket.output_tokens
        windows = []
        for scope in _charged_scopes(ticket):
            st = self._state(scope, now)
            for ws, amount in ((st.requests, 1), (st.tokens, tin + tout), (st.input, tin - ticket.cached_input),
                               (st.output, tout)):
                for w in ws:
                    if amount and w.limit != NEVER and not w.name.startswith("learned"):
                        windows.append((_wire(scope.key), w.name, w.period, float(amount)))
        if windows:
            self._pending_hits.append((now, windows))

    @property
    def available(self) -> bool:
        """False while Redis is unreachable."""
        return self._down_since is None

    def watch(self, scope: Scope) -> None:
        super().watch(scope)
        with self._lock:  # (admissions add to _spend_seen under the lock; spend_snapshot copies it there)
            self._remember_spend_key(scope.key)

    def _remember_spend_key(self, key: str) -> None:
        seen = self._spend_seen
        if key not in seen:
            seen[key] = None
            if len(seen) > 10_000:
                del seen[next(iter(seen))]

    # ------------------------------------------------------------ admission
    def admit_now(self, ticket: Ticket) -> bool:
        return False  # every admission is decided by the shared backend (see _try)

    def _try(self, ticket: Ticket, now: float) -> Blocked | None:
        cached = self._last_block.get(ticket.call_id)
        if cached is not None:
            previous, version = cached
            due = _due_at(previous)
            if version == self._version and due is not None and due > now:
                return previous  # nothing here changed and Redis said to come back later (or one scope eases)
        blocked: Blocked | None
        try:
            try:
                blocked = self._remote_try(ticket, now)
            except _Down:
                blocked = self._outage_try(ticket, now)
        except BaseException:
            self._last_block.pop(ticket.call_id, None)
            self._leave_lines(ticket.call_id)  # (refused for good: it will not ask again)
            raise
        if blocked is None:
            self._last_block.pop(ticket.call_id, None)
        else:
            self._last_block[ticket.call_id] = (blocked, self._version)
        return blocked

    def _remote_try(self, ticket: Ticket, now: float) -> Blocked | None:
        wall = self.wall()
        starts = self.calendar.starts(wall)
        share = 1.0 if ticket.priority >= 10 else self.low_priority_share
        now_arg = self._now_arg()
        args = [self.prefix, now_arg, ticket.call_id, _num(self._lease_of(ticket)),
                _num(ticket.cost), _num(share), ""]
        states: dict[str, ScopeState] = {}
        n = 0
        for sc in ticket.scopes:
            st = states[sc.key] = self._state(sc, now)
            self._scope_args(args, st, ticket, False, starts)
            n += 1
        for sc in ticket.choices or ():
            st = states[sc.key] = self._state(sc, now)
            self._scope_args(args, st, ticket, True, starts)
            n += 1
        args[6] = str(n)
        for key in ticket.spend_keys:
            self._remember_spend_key(key)
        targets = self._spend_targets(ticket, starts)
        # (its deadline: in this clock when Redis is told the time, else as a wait from now; see ADMIT)
        deadline = "" if ticket.deadline == NEVER else _num(ticket.deadline) if now_arg else \
            _num(ticket.deadline - self.clock())
        args += [targets, str(int(ticket.priority)), deadline]
        out = self._call(self._admit, args)
        code = int(out[0])
        rnow = float(out[1])
        local = self.clock()

        def to_local(t: float) -> float:
            return t if not self.server_time else local + (t - rnow)

        if code == 1:
            self._in_line.pop(ticket.call_id, None)
            chosen = _unwire(_dec(out[2]))
            ticket.chosen = chosen or None
            res = self._leases[ticket.call_id] = _Reservation(ticket, NO_LAYOUT, local + self._lease_of(ticket), rnow,
                                                              remote=True, record=int(out[3]) == 1,
                                                              spend_targets=targets, local_at=local)
            res.boot = _dec(out[4])  # (the dataset its lease record is in: see boot_id in _lua)
            if out[5]:
                self._hear_splits(_dec(out[5]))
                res.after_split = frozenset(map(_unwire, _dec(out[5]).split(SEP)))
            res.learned_input = frozenset(k for k, st in states.items() if st.observed_input is not None)
            res.learned_output = frozenset(k for k, st in states.items() if st.observed_output is not None)
            self._version += 1
            self.admitted_total += 1
            for raw in out[6:]:
                self._note_spend(_dec(raw).split(SEP))
            return None
        text = [x.decode() if isinstance(x, bytes) else str(x) for x in out]
        text[2:3] = [_unwire(text[2])] if len(text) > 2 else []
        if code == 0 or code == 4:
            at = 7 if code == 0 else 5  # (splits)
            if len(text) > at and text[at]:
                self._hear_splits(text[at])
        if code == 0:
            scope, why, remaining, retry, release = text[2], text[3], float(text[4]), text[5], text[6] == "1"
            if release and ticket.call_id not in self._in_line:
                lines = [_wire(sc.key) for sc in ticket.scopes if states[sc.key].concurrency is not None]
                if ticket.choices and any(states[c.key].concurrency is not None for c in ticket.choices):
                    lines.append(_wire(ticket.choices[0].key) + ":keys")  # (the keys' line: see _lua)
                if lines:
                    self._in_line[ticket.call_id] = lines
            retry_at = to_local(float(retry)) if retry else None
            frees_at = retry_at  # (what a caller told to come back later is told, whatever the polls)
            if release:  # waits for another call (maybe in another process) to finish: re-ask soon
                poll = local + random.uniform(POLL_MIN, POLL_MAX)
                retry_at = poll if retry_at is None else min(retry_at, poll)
            elif retry_at is not None and "tokens" in why:
                retry_at = min(retry_at, local + random.uniform(REFUND_POLL_MIN, REFUND_POLL_MAX))
            # (when one of its scopes may stop blocking: the queue looks at it again then, so that it
            # does not hold the line there until the last of them frees, see Engine._evaluate)
            eases = to_local(float(text[8])) if len(text) > 8 and text[8] else None
            if eases is not None and retry_at is not None and eases >= retry_at:
                eases = None
            return Blocked(scope, why, remaining, retry_at, frozenset(map(_unwire, text[9:])) or frozenset({scope}),
                           eases_at=eases, frees_at=frees_at)
        if code == 2:
            scope, name, kind = text[2], text[3], text[4]
            cap, spent, amount = float(text[5]), float(text[6]), float(text[7])
            raise self._budget_error(states[scope], name, kind, cap, spent, amount, starts)
        if code == 3:
            scope, name, cap, amount = text[2], text[3], float(text[4]), float(text[5])
            raise RequestTooLargeError(
                f"this call needs {amount:g} against {name}={cap:g} of {scope}: it can never fit; "
                f"{too_large_advice(name)}", scope=scope, limit=name, remaining=cap)
        if code == 4:  # (an open circuit that reopens within the call's deadline is a block: code 0)
            from .errors import CircuitOpenError

            scope, open_until, failures = text[2], to_local(float(text[3])), text[4]
            raise CircuitOpenError(
                f"circuit breaker for {scope} is open after {failures} consecutive provider failures; it lets "
                f"a probe through in {open_until - local:.1f}s. No request was sent.",
                scope=scope, limit="circuit_breaker", remaining=0.0, retry_after=max(open_until - local, 0.0))
        if code == 5:  # a cooldown that ends after the call's deadline
            scope, until = text[2], to_local(float(text[3]))
            raise self._timeout(states[scope], "the provider asked to wait", until - local)
        raise HiveRateLimitError(f"unexpected answer from the redis backend: {text[:3]}")

    def _evaluate(self, ticket: Ticket, now: float) -> tuple[list[ScopeState], Blocked | None]:
        """For a call queued behind others (Engine._acquire checks it can be admitted at all): its
        budgets as Redis holds them and, for a call with a deadline, the cooldowns and circuits of
        its models and API keys (one look), so that a call a budget refuses, or that cannot wait out
        a cooldown or an open circuit, fails now, as with the in-memory engine, rather than once it
        reaches the front. (Redis down: not checked here.)"""
        scoped = self._states_of(ticket.scopes, now)
        states = [st for st in scoped if st.budgets]
        signals: list[ScopeState] = []
        if ticket.deadline != NEVER:
            signals = [st for st in (*scoped, *(self._state(c, now) for c in ticket.choices or ()))
                       if st.observed_requests is not None]
        if not states and not signals:
            return super()._evaluate(ticket, now)
        starts = self.calendar.starts(self.wall())
        spend = [(st.key, kind, starts[kind]) for st in states for _, kind, _ in st.budgets]
        got = self._peek([], [], [st.key for st in signals], spend, [st.key for st in states])
        saved = [(st, st.cooldown_until, st.circuit, st.open_until, st.probe) for st in signals]
        if got is not None:  # (this process' copies of them hold none of it: Redis' for this look)
            # (Redis' times on this clock: with server time, offset by the two clocks' difference)
            shift = self.clock() - got[5] if self.server_time else 0.0
            for st, raw in zip(signals, got[2], strict=True):
                h = _hash_of(raw)
                st.cooldown_until = float(h.get("cooldown_until", 0.0)) + shift
                st.circuit = {"open": OPEN, "half_open": HALF_OPEN}.get(h.get("circuit", ""), CLOSED)
                st.open_until = float(h.get("open_until", 0.0)) + shift
                st.probe = h.get("probe")
        usage: dict[tuple[str, str, float], tuple[float, float, float, float]] = {}
        i = 0
        for j, st in enumerate(states if got is not None else []):
            assert got is not None
            rcost, rreq = (float(x) for x in _dec(got[4][j]).split(SEP))
            for _, kind, _ in st.budgets:
                c, r, _t = (float(x) for x in _dec(got[3][i]).split(SEP))
                i += 1
                usage[(st.key, kind, starts[kind])] = (c, r, max(rcost, 0.0), max(rreq, 0.0))
        self._peeked = usage
        try:
            return super()._evaluate(ticket, now)
        finally:
            self._peeked = None
            for st, cooldown_until, circuit, open_until, probe in reversed(saved):
                st.cooldown_until, st.circuit, st.open_until, st.probe = cooldown_until, circuit, open_until, probe

    def _budget_usage(self, st: ScopeState, kind: str, start: float) -> tuple[float, float, float, float]:
        peeked = self._peeked
        if peeked is not None and (st.key, kind, start) in peeked:
            return peeked[(st.key, kind, start)]
        return super()._budget_usage(st, kind, start)

    def _scope_args(self, args: list[str], st: ScopeState, ticket: Ticket, choice: bool,
                    starts: dict[str, float]) -> None:
        tin, tout = ticket.input_tokens, ticket.output_tokens
        wins: list[str] = []
        nwin = 0
        for ws, amount in ((st.requests, 1), (st.tokens, tin + tout), (st.input, tin - ticket.cached_input),
                           (st.output, tout)):
            for w in ws:
                limit = -1.0 if w.name.startswith("learned_") else w.limit
                wins += [w.name, _num(limit), _num(w.period), _num(amount)]
                nwin += 1
        # (provider 2: a model this process split already; of another's, ADMIT says so: see _hear_splits)
        provider = "0" if st.observed_requests is None else "2" if st.key in self._moved else "1"
        args += [_wire(st.key), "1" if choice else "0", provider,
                 str(st.concurrency) if st.concurrency is not None else "-1", str(nwin), *wins]
        args.append(str(len(st.budgets)))
        wall = self.wall() if st.budgets else 0.0
        for name, kind, limit in st.budgets:
            frees = self.calendar.end(kind, wall)  # (of several budgets that refuse, the one freeing last says so)
            args += [name, kind, f"{starts[kind]:.0f}", _num(limit), "1" if name == "max_requests_per_run" else "0",
                     "-1" if frees == NEVER else f"{frees:.0f}"]

    def _spend_targets(self, ticket: Ticket, starts: dict[str, float]) -> str:
        """Where a call's spend goes: scope, window, window start, TTL, ... ('\0'-joined)."""
        sp: list[str] = []
        for key in ticket.spend_keys:
            for kind in (RUN,) if key.startswith("run:") else KINDS:
                sp += [_wire(key), kind, f"{starts[kind]:.0f}", str(_SPEND_TTL[kind])]
        return SEP.join(sp)

    def _outage_try(self, ticket: Ticket, now: float) -> Blocked | None:
        if self.on_error == "closed":
            raise BackendUnavailableError(
                f"the shared rate-limit backend ({self.url}) does not answer and on_backend_error is 'closed', so "
                f"calls are refused rather than sent uncounted. No request was sent; retry in "
                f"{self.retry_interval:g}s.", scope="global", limit="on_backend_error", retry_after=self.retry_interval)
        if self.on_error == "open":
            self._leases[ticket.call_id] = _Reservation(ticket, NO_LAYOUT, now + self._lease_of(ticket), now)
            self.admitted_total += 1
            return None
        fb = self.fallback
        if self._fb_outage != self.outages:
            self._outage_begins()
        starts = self.calendar.starts(self.wall())
        scaled = Ticket(ticket.call_id, [self._scale(s, starts, now) for s in ticket.scopes], ticket.input_tokens,
                        ticket.output_tokens, ticket.priority, ticket.info, ticket.cost,
                        [self._scale(s, starts, now) for s in ticket.choices] if ticket.choices else None, None,
                        ticket.deadline, ticket.dims, ticket.spend_keys, ticket.lease, ticket.cached_input)
        fb.low_priority_share = self.low_priority_share
        with fb._lock:
            fb._maintain(now)  # leases of outage-time calls expire there too
            states, blocked = fb._evaluate(scaled, now)
            if blocked is None:
                fb._commit(scaled, states, now)
                self._fb_keys[ticket.call_id] = ticket.spend_keys
                ticket.chosen = scaled.chosen
                self.admitted_total += 1
        if blocked is None:
            self._owe_hits(ticket, now)
            self._in_line.pop(ticket.call_id, None)
        if blocked is not None and blocked.retry_at is None:
            blocked.retry_at = now + random.uniform(POLL_MIN, POLL_MAX)
        return blocked

    def _outage_begins(self) -> None:
        """A new outage (policy ``local``): the outage engine's budgets start afresh from the spend
        Redis last reported (see :meth:`_scale`), and it holds this process' calls in flight
        (see :meth:`_hold_in_flight`)."""
        if self.on_error != "local":
            return
        from ._budget import BudgetBook

        with self._lock:
            if self._fb_outage == self.outages:
                return
            self._fb_outage = self.outages
            fb = self.fallback
            with fb._lock:
                fb.book = BudgetBook()
            self._scaled.clear()
            self._based = set()
            try:
                self._hold_in_flight(self.clock())
            except Exception as exc:  # never let this turn an outage into a crash
                logger.error("redis backend %s: could not hold the calls in flight for the outage: %s", self.url, exc)

    def _drop_held(self) -> None:
        """Redis answers again: the outage engine's copies of the calls Redis admitted have done
        their part (a later outage holds the calls then in flight afresh)."""
        with self._lock:
            held, self._held = self._held, {}
        for copy_id in held.values():
            self.fallback.forget(copy_id)  # (not settled: the call's own settlement goes to Redis)

    def _hold_in_flight(self, now: float) -> None:
        """At the start of an outage, copy this process' calls in flight that Redis admitted into
        the outage engine: their concurrency slots, window usage and budget reservations count
        against this process' ``local_share`` as its own outage-time calls do, and their spend
        counts against its outage allowance when they settle. (Without this, a process starting an
        outage with calls in flight was allowed its whole share on top of them.) Their settlement
        still goes to Redis, replayed once it answers; the copies only hold room here."""
        fb = self.fallback
        starts = self.calendar.starts(self.wall())
        for cid, res in list(self._leases.items()):
            if not res.remote or res.settled or cid in self._held:
                continue
            t = res.ticket
            try:
                scaled = [self._scale(s, starts, now) for s in _charged_scopes(t)]
            except HiveRateLimitError:
                continue  # a budget this process cannot keep on its own: its next admission says so
            held = Ticket(_HELD + cid, scaled, t.input_tokens, t.output_tokens, t.priority, t.info, t.cost, None,
                          None, NEVER, t.dims, t.spend_keys, t.lease, t.cached_input)
            with fb._lock:
                fb._commit(held, [fb._state(s, now) for s in scaled], now)
            if res.slot_freed:
                fb.free_slot(held.call_id)
            self._held[cid] = held.call_id

    def _scale(self, scope: Any, starts: dict[str, float], now: float) -> Any:
        """``scope`` as the outage engine enforces it: ``local_share`` of every rate and concurrency
        limit, and of what was left of each budget when Redis last reported its spend."""
        from ._engine import Scope

        k = (scope.key, scope.generation, id(scope.limits), starts["hour"])
        found = self._scaled.get(k)
        if found is not None:
            return found
        if len(self._scaled) > 10_000:
            self._scaled.clear()
        update: dict[str, Any] = {}
        for name, kind, limit in self._state(scope, now).budgets:
            start = starts[kind]
            known = self._known_spend.get((scope.key, kind, f"{start:.0f}"))
            if known is None:
                raise BackendUnavailableError(
                    f"the shared rate-limit backend ({self.url}) does not answer, and this process has not seen "
                    f"the {kind} spend of {scope.key} yet, so it cannot keep that budget on its own; the call was "
                    f"not sent. Retry in {self.retry_interval:g}s.", scope=scope.key, limit=name,
                    retry_after=self.retry_interval)
            cost0, requests0 = known
            spent0 = requests0 if name == "max_requests_per_run" else cost0
            allowance = spent0 + self.local_share * max(limit - spent0, 0.0)
            update[name] = int(allowance) if name == "max_requests_per_run" else allowance
            fb = self.fallback
            with fb._lock:
                mark = (scope.key, kind, start)
                if mark not in self._based:  # on top of what this outage already counted there
                    self._based.add(mark)
                    c = fb.book.get(scope.key, kind, start)
                    fb.book.set(scope.key, kind, start, cost0 + (c.cost if c else 0.0),
                                int(requests0) + (c.requests if c else 0), c.tokens if c else 0)
        limits = _scaled(scope.limits, self.local_share)
        if update:
            limits = limits.model_copy(update=update)
        found = self._scaled[k] = Scope(scope.level, scope.key, limits, scope.generation)
        return found

    def acquire(self, ticket: Ticket, notify: Callable[[], None] | None = None) -> Any:
        waiter = super().acquire(ticket, notify)
        if notify is None and waiter is not None:
            # Nothing is queued (see Engine.acquire): not in the lines across processes either,
            # where it would hold later callers back while its place lives.
            self._last_block.pop(ticket.call_id, None)
            self._leave_lines(ticket.call_id)
        return waiter

    def cancel(self, waiter: Any) -> bool:
        call_id = waiter.ticket.call_id
        granted = super().cancel(waiter)
        # After it left the queue (under the lock): a pass tries a queued waiter until then, in
        # another thread too, and would store its answer again, left here for good.
        self._last_block.pop(call_id, None)
        if granted:
            self._in_line.pop(call_id, None)
        else:
            self._leave_lines(call_id)
        return granted

    def _leave_lines(self, call_id: str) -> None:
        """Out of the lines across processes at once, not when it has stopped asking for a while."""
        lines = self._in_line.pop(call_id, None)
        if lines:
            try:
                self._call(self._leave, [self.prefix, "", call_id, str(len(lines)), *lines])
            except Exception:  # (Redis gone: the place goes by itself)
                pass

    def next_reclaim(self) -> float | None:
        """Waiters here poll Redis (their retry time includes a poll), which also reclaims leases."""
        return None

    def dispatch(self) -> int:
        with self._lock:
            if not self._waiters:
                return 0
            now = self.clock()
            self._maintain(now)
            granted = self._dispatch(now)
        self._drain()
        return granted

    # ------------------------------------------------------------ settlement
    def holds(self, call_id: str) -> bool:
        return call_id in self._leases or call_id in self.fallback._leases

    def reservation(self, call_id: str) -> _Reservation | None:
        return super().reservation(call_id) or self.fallback.reservation(call_id)

    def ticket_of(self, call_id: str) -> Ticket | None:
        return super().ticket_of(call_id) or self.fallback.ticket_of(call_id)

    def _open_ids(self) -> list[str]:
        held = set(self._held.values())  # (copies of calls listed already: see _hold_in_flight)
        return super()._open_ids() + [cid for cid in self.fallback._open_ids() if cid not in held]

    def progress(self, call_id: str) -> int:
        return max(super().progress(call_id), self.fallback.progress(call_id))

    def attempted(self, call_id: str) -> bool:
        return super().attempted(call_id) or self.fallback.attempted(call_id)

    def note_answered(self, call_id: str) -> None:
        super().note_answered(call_id)
        self.fallback.note_answered(call_id)

    def release(self, call_id: str, *, input_tokens: int | None = None, output_tokens: int | None = None,
                cost: float | None = None, outcome: str = "success", wait: float | None = None,
                signals: Any = None, cached_input: int = 0) -> bool:
        if call_id in self.fallback._leases:
            self.fallback.release(call_id, input_tokens=input_tokens, output_tokens=output_tokens, cost=cost,
                                  outcome=outcome, wait=wait, signals=signals, cached_input=cached_input)
            with self._lock:
                self._version += 1
                if self._waiters:
                    self._dispatch(self.clock())
            self._drain()
            return True
        with self._lock:
            res = self._leases.pop(call_id, None)
            if res is None:
                return False
            self._renewed.pop(call_id, None)
            now = self.clock()
            self._remote_settle(res, input_tokens, output_tokens, cost, outcome, wait, signals, cached_input,
                                mode="3" if res.settled else "0")
            if signals is not None and (signals.limit_input_tokens or signals.limit_output_tokens):
                # Charge this model's (and key's) learned input- and output-token windows from now
                # on (Redis holds the limits). After the settlement: this call never charged them.
                for scope in header_scopes(_charged_scopes(res.ticket)):
                    st = self._state(scope, now)
                    if signals.limit_input_tokens:
                        self.observe_input(st)
                    if signals.limit_output_tokens:
                        self.observe_output(st)
            self._version += 1
            if self._waiters:
                self._dispatch(now)
        self._drain()
        return True

    def forget(self, call_id: str) -> None:
        """:meth:`Engine.forget`: its slots, budget reservation and probe in Redis come back too."""
        if call_id in self.fallback._leases:
            self.fallback.forget(call_id)
            return
        with self._lock:
            res = self._leases.pop(call_id, None)
            if res is None:
                return
            self._renewed.pop(call_id, None)
            held = self._held.pop(call_id, None)
            if held is not None:  # its copy in the outage engine: forgotten there too (no spend)
                self.fallback.forget(held)
            self._remote_settle(res, None, None, None, "error", None, None, mode="3")  # (no usage, no spend)
            self._version += 1
            if self._waiters:
                self._dispatch(self.clock())
        self._drain()

    def settle(self, call_id: str, input_tokens: int | None, output_tokens: int | None,
               cost: float | None = None, *, cached_input: int = 0) -> bool:
        """:meth:`Engine.settle`: the call's usage is settled in Redis at once; its slots, lease and
        outcome stay until :meth:`release`."""
        if call_id in self.fallback._leases:
            return self.fallback.settle(call_id, input_tokens, output_tokens, cost, cached_input=cached_input)
        with self._lock:
            res = self._leases.get(call_id)
            if res is None or res.settled:
                return False
            self._version += 1
            self._remote_settle(res, input_tokens, output_tokens, cost, "success", None, None, cached_input, mode="2")
            if self._waiters:
                self._dispatch(self.clock())
        self._drain()
        return True

    def _lease_ran_out(self, res: _Reservation, now: float) -> None:
        if res.remote and res.settled:  # settled (settle()), still open in Redis: ended there now
            self._renewed.pop(res.ticket.call_id, None)
            self._remote_settle(res, None, None, None, "error", None, None, mode="3")
            return
        super()._lease_ran_out(res, now)

    def _settle(self, res: _Reservation, input_tokens: int | None, output_tokens: int | None,
                cost: float | None, now: float, requests: int = 1, cached: int = 0) -> None:
        if res.remote or not res.states:  # an expired remote (or uncounted) lease
            self._renewed.pop(res.ticket.call_id, None)
            self._remote_settle(res, input_tokens, output_tokens, cost, "error" if requests else "void", None, None,
                                cached)
            return
        super()._settle(res, input_tokens, output_tokens, cost, now, requests, cached)

    def _remote_settle(self, res: _Reservation, input_tokens: int | None, output_tokens: int | None,
                       cost: float | None, outcome: str, wait: float | None, signals: Any,
                       cached: int = 0, mode: str = "0") -> None:
        """Settle a call in Redis. ``mode`` (see SETTLE in :mod:`._lua`): ``"0"`` settle and end it,
        ``"2"`` settle its usage only, the call staying open (:meth:`settle`), ``"3"`` end a call
        settled so already (its outcome; its usage is not counted again)."""
        ending = mode == "3"
        if ending and not res.remote:
            return  # (admitted uncounted: its spend was owed when it was settled)
        res.settled = True
        t = res.ticket
        held = self._held.get(t.call_id) if mode == "2" else self._held.pop(t.call_id, None)
        if held is not None:  # its copy in the outage engine (see _hold_in_flight): its spend counts there
            if mode == "2":
                self.fallback.settle(held, input_tokens, output_tokens, cost, cached_input=cached)
            else:
                self.fallback.release(held, input_tokens=input_tokens, output_tokens=output_tokens, cost=cost,
                                      cached_input=cached)
        tin = t.input_tokens if input_tokens is None else input_tokens
        tout = t.output_tokens if output_tokens is None else output_tokens
        # unknown, or not a number (Redis would refuse it, for good): keep the worst case
        actual_cost = t.cost if cost is None or not math.isfinite(cost) else cost
        wall = self.wall()
        starts = self.calendar.starts(wall)
        if self.record_spend and not ending and (outcome != "void" or actual_cost or tin or tout):  # (as Engine)
            provider, model, agent, user, team, run = t.dims
            self._out_rows.append(SpendRow(wall, t.call_id, provider, model, agent, user, team, run,
                                           0 if outcome == "void" else 1, tin, tout, actual_cost))
        if not res.remote:  # admitted uncounted (policy "open"): only its spend is owed
            if outcome != "void" or actual_cost or tin or tout:  # (never sent: no request is owed, as Engine)
                self._owe_spend(t, starts, actual_cost, tin + tout, 0 if outcome == "void" else 1)
            return
        args = self._settle_args(res, tin, tout, actual_cost, outcome, wait, signals, starts,
                                 settled_input(t, input_tokens, tin, cached))
        args[11] = mode
        args = self._number(args, once=not res.record)
        try:
            out = self._call(self._settle_script, args)
        except _Down:
            if self._fb_outage != self.outages:
                self._outage_begins()  # (another thread may have found Redis gone and not set it up yet)
            if self._fb_outage == self.outages and self.on_error == "local" and held is None and not ending:
                # Its spend counts against this outage's allowance now (a held copy's release
                # counts it otherwise); Redis gets it with the replay.
                fb = self.fallback
                with fb._lock:
                    fb.book.add_now(t.spend_keys, starts, actual_cost, 1, tin + tout)
            if self.server_time:
                args[1] = ""  # replayed later: Redis' time then
            if len(self._pending_settle) >= _MAX_PENDING:
                logger.error("redis backend %s: too many settlements pending; dropping the oldest", self.url)
                self._answered(self._pending_settle.pop(0))
            self._pending_settle.append(args)
            return
        self._answered(args)
        for raw in out[2:]:
            self._remote_event(raw.decode() if isinstance(raw, bytes) else str(raw), wall)

    def _settle_args(self, res: _Reservation, tin: int, tout: int, cost: float, outcome: str, wait: float | None,
                     signals: Any, starts: dict[str, float], tin_uncached: int | None = None,
                     freeing: bool = False) -> list[str]:
        def opt(x: Any) -> str:
            return "" if x is None else _num(x)

        s = signals
        t = res.ticket
        args = [self.prefix, self._now_arg(), t.call_id, "1" if res.record else "0", _num(res.admitted_at),
                opt(res.sent_at), self._spend_targets(t, starts), _num(t.cost), _num(cost), str(tin + tout),
                ("r" if res.recounted else "") + _num(self.arrival_margin), "0", outcome, opt(wait),
                # (a limit of 0 is learned as none, as Engine._learn does: Lua reads 0 as true)
                opt((s.limit_requests or None) if s else None),
                # (-1: the headers' token limit is not one to hold calls to: forget one learned before)
                opt((s.limit_tokens or None) if s and s.learn_tokens else (-1 if s else None)),
                opt(s.remaining_requests if s else None), opt(s.reset_requests if s else None),
                opt(s.remaining_tokens if s else None), opt(s.reset_tokens if s else None),
                opt((s.limit_input_tokens or None) if s else None), opt((s.limit_output_tokens or None) if s else None),
                _num(self.pace_default), str(self.circuit_threshold), _num(self.circuit_cooldown),
                _num(self.circuit_max_cooldown), "1" if self.adaptive else "0", _num(self.adaptive_decrease),
                "10", str(len(self.thresholds)), *(_num(x) for x in self.thresholds)]
        scopes = _charged_scopes(t)
        now = self.clock()
        # A call admitted before its model's signals moved to the endpoint it went to: its
        # outcome is that endpoint's (see Engine.move_signals).
        # (Not when only freeing its slot, which SETTLE does before reading any scope: _moved_keys
        # forgets the call, and its settlement, after, would land on the model.)
        moved = self._moved_keys(t.call_id, scopes) if self._moved_calls and not freeing else []
        extra = [self._moved[moved[0]]] if moved else []
        args.append(str(len(scopes) + len(extra)))
        # The provider limits per API key: a 429 cools that key only; the others carry on.
        learners = header_scopes([*scopes, *extra])
        keys_only = outcome in _ENDPOINT_OUTCOMES and any(s.level == "key" for s in (*scopes, *extra))
        for scope in scopes:
            st = self._state(scope, now)
            rates = [w.limit / w.period for w in st.requests if w.limit != NEVER and not w.name.startswith("learned")]
            provider = st.observed_requests is not None and (st.level == "key" or not keys_only) \
                and st.key not in moved
            # (2: signals apply, but its headers give another scope's limits: see header_scopes;
            # 3 and 4: 1 and 2 of a model this process split already, see _hear_splits)
            flag = ("1" if scope in learners else "2") if provider else "0"
            if provider and st.key in self._moved:
                flag = "3" if flag == "1" else "4"
            args += [_wire(st.key), flag, opt(min(rates) if rates else None)]
            wins: list[str] = []
            nwin = 0
            for ws, est, act, isreq in ((st.requests, 1, 1, "1"), (st.tokens, t.input_tokens + t.output_tokens,
                                                                  tin + tout, "0"),
                                        (st.input, t.input_tokens - t.cached_input,
                                         tin if tin_uncached is None else tin_uncached, "0"),
                                        (st.output, t.output_tokens, tout, "0")):
                for w in ws:
                    if w is st.observed_input and st.key not in res.learned_input:
                        continue  # added after its admission (see observe_input): it never charged it
                    if w is st.observed_output and st.key not in res.learned_output:
                        continue  # (the same: see observe_output)
                    wins += [w.name, _num(w.period), _num(est), _num(act), isreq]
                    nwin += 1
            args += [str(nwin), *wins, str(len(st.budgets))]
            for name, kind, limit in st.budgets:
                args += [name, kind, f"{starts[kind]:.0f}", _num(limit),
                         "1" if name == "max_requests_per_run" else "0", str(_SPEND_TTL[kind])]
        for scope in extra:  # (signals; and of its windows, the copies MOVE made of the model's learned ones)
            self._state(scope, now)
            copies: list[str] = []
            src = self._states.get(moved[0])
            if src is not None and moved[0] not in res.after_split:
                # Admitted before the split, its estimate was in the model's learned windows that MOVE
                # copied to the endpoint: settled there too (a call's max_tokens, in its output window).
                learned: tuple[tuple[SlidingWindow | None, int, int], ...] = (
                    (src.observed_tokens, t.input_tokens + t.output_tokens, tin + tout),
                    (src.observed_input if src.key in res.learned_input else None, t.input_tokens - t.cached_input,
                     tin if tin_uncached is None else tin_uncached),
                    (src.observed_output if src.key in res.learned_output else None, t.output_tokens, tout))
                for copy, est, act in learned:
                    if copy is not None:
                        copies += [copy.name, _num(copy.period), _num(est), _num(act), "0"]
            args += [_wire(scope.key), "1", "", str(len(copies) // 5), *copies, "0"]
        args.append(res.boot)
        return args

    def _note_spend(self, parts: list[str]) -> None:
        scope, kind, start, cost, requests = parts
        self._spent_is(_unwire(scope), kind, start, float(cost), float(requests))

    def _spent_is(self, key: str, kind: str, start: str, cost: float, requests: float) -> None:
        """What Redis reports a budget's spend to be: where an outage allowance starts (see :meth:`_scale`)."""
        known = self._known_spend
        if len(known) > 50_000:
            known.clear()
        known[(key, kind, start)] = (cost, requests)

    def _note_charged(self, args: list[str]) -> None:
        """A CHARGE Redis applied (see :meth:`_owe_spend`): the spend it last reported grows by it,
        so that an outage starting before Redis reports again does not start from less."""
        known = self._known_spend
        for i in range(int(args[2])):
            scope, kind, start, _ttl, cost, requests, _tokens = args[3 + 7 * i: 10 + 7 * i]
            k = (_unwire(scope), kind, start)
            if k in known:
                c, r = known[k]
                known[k] = (c + float(cost), r + float(requests))

    def _remote_event(self, raw: str, wall: float) -> None:
        parts = raw.split(SEP)
        kind = parts[0]
        if kind == "spent":
            self._note_spend(parts[1:])
        elif kind == "budget":
            _, scope, name, window, thr, spent, limit = parts
            scope = _unwire(scope)
            threshold = float(thr)
            if threshold >= 1.0:  # (the calls it now refuses do not announce it again: see _budget_error)
                self._fired[(scope, window, self.calendar.starts(wall)[window], 1.0)] = float(limit)
            self._out_events.append({
                "type": "budget_exceeded" if threshold >= 1.0 else "budget_warning", "scope": scope,
                "budget": name, "window": window, "threshold": threshold, "spent": float(spent),
                "limit": float(limit), "currency": self.currency, "time": wall,
                "window_label": self.calendar.label(window, wall)})
        elif kind == "circuit_opened":
            self._out_events.append({"type": "circuit_opened", "scope": _unwire(parts[1]), "seconds": float(parts[2]),
                                     "failures": int(parts[3]), "time": wall})
        elif kind == "circuit_closed":
            self._out_events.append({"type": "circuit_closed", "scope": _unwire(parts[1]), "time": wall})
        elif kind == "split":
            self._hear_splits(parts[1])

    def _owe_spend(self, t: Ticket, starts: dict[str, float], cost: float, tokens: int, requests: int = 1) -> None:
        cost = cost if math.isfinite(cost) else t.cost  # (Redis refuses what is not a number)
        args = [self.prefix, "", ""]
        n = 0
        for key in t.spend_keys:
            for kind in (RUN,) if key.startswith("run:") else KINDS:
                args += [_wire(key), kind, f"{starts[kind]:.0f}", str(_SPEND_TTL[kind]), _num(cost), str(requests),
                         str(tokens)]
                n += 1
        args[2] = str(n)
        self._number(args)
        try:
            self._call(self._charge, args)
            self._note_charged(args)
        except _Down:
            if len(self._pending_spend) >= _MAX_PENDING:
                logger.error("redis backend %s: too much spend pending; merging is not possible, dropping the "
                             "oldest row", self.url)
                self._answered(self._pending_spend.pop(0))
            self._pending_spend.append(args)
            return
        self._answered(args)

    def _fallback_spend(self, rows: list[SpendRow]) -> None:
        # Spend settled by the outage engine: keep it for Redis, and for the local ledger. (Not
        # that of the copies of calls Redis admitted: their own settlement records it.)
        rows = [r for r in rows if not r.call_id.startswith(_HELD)]
        for r in rows:
            res_ticket = Ticket(r.call_id, [], spend_keys=self._fb_keys.pop(r.call_id, ["global"]))
            self._owe_spend(res_ticket, self.calendar.starts(r.ts), r.cost, r.input_tokens + r.output_tokens,
                            r.requests)
        if self.on_spend is not None and self.record_spend and rows:
            self.on_spend(rows)

    def _fallback_events(self, events: list[dict[str, Any]]) -> None:
        if self.on_event is not None:
            self.on_event(events)

    def free_slot(self, call_id: str) -> None:
        if call_id in self.fallback._leases:
            self.fallback.free_slot(call_id)
            return
        with self._lock:
            res = self._leases.get(call_id)
            if res is None or res.slot_freed or not res.remote:
                return
            res.slot_freed = True
            held = self._held.get(call_id)
            if held is not None:
                self.fallback.free_slot(held)
            args = self._settle_args(res, 0, 0, 0.0, "success", None, None, self.calendar.starts(self.wall()),
                                     freeing=True)
            args[11] = "1"
            try:
                self._call(self._settle_script, args)
            except _Down:
                return  # the lease expires in Redis
            self._version += 1
            if self._waiters:
                self._dispatch(self.clock())

    def note_attempt(self, call_id: str) -> bool:
        with self._lock:
            res = self._leases.get(call_id)
            if res is None:
                return self.fallback.note_attempt(call_id)
            res.attempts += 1
            if not res.remote:  # admitted uncounted (policy "open"): noted only (progress, attempted)
                return True
            now = self.clock()
            if res.attempts <= 1:
                res.sent_at = res.admitted_at + (now - res.local_at)  # on the backend's clock
                if self._sent_late(now - res.local_at) and not res.settled:  # (as Engine._recount)
                    self._recount_remote(res, now)
                return True
            windows = self._request_windows(res, now)
            args = [self.prefix, self._now_arg(), str(len(windows))]
            for key, name, period in windows:
                args += [key, name, period, "1"]
            try:
                self._call(self._hit, args)
            except _Down:
                pass
        return True

    def _request_windows(self, res: _Reservation, now: float) -> list[tuple[str, str, str]]:
        """(scope, window, period) of every request window an open call counts in, for the scripts
        (the API key it was given counts too)."""
        return [(_wire(scope.key), w.name, _num(w.period))
                for scope in _charged_scopes(res.ticket) for w in self._state(scope, now).requests]

    def _recount_remote(self, res: _Reservation, now: float) -> None:
        """:meth:`Engine._recount` in Redis (one round trip, for calls sent late only)."""
        windows = self._request_windows(res, now)
        args = [self.prefix, self._now_arg(), _num(res.admitted_at), str(len(windows))]
        for window in windows:
            args += window
        try:
            out = self._call(self._recount_script, args)
        except _Down:
            return  # (counted from its admission, as before)
        try:
            res.sent_at = float(out.decode() if isinstance(out, bytes) else out)  # (Redis' "now" of the count)
        except (TypeError, ValueError):
            pass
        res.recounted = True

    def renew(self, call_id: str) -> None:
        res = self._leases.get(call_id)
        if res is None:
            self.fallback.renew(call_id)
            return
        now = self.clock()
        res.expires_at = now + self.lease_seconds
        if not res.remote:
            return
        held = self._held.get(call_id)
        if held is not None:  # a stream read through an outage: its copy there lives on too
            self.fallback.renew(held)
        # Redis keeps its own copy of the lease, which another process may reclaim. A RENEW sets
        # it to 1.25 leases and is sent at most once per quarter lease, so Redis never reclaims a
        # stream within one lease of its last chunk. The first read always sends one: admission
        # set a single lease.
        last = self._renewed.get(call_id)
        if last is not None and now - last <= self.lease_seconds / 4:
            return
        self._renewed[call_id] = now
        try:
            self._call(self._renew, [self.prefix, self._now_arg(), call_id, _num(self.lease_seconds * 1.25)])
        except _Down:
            pass

    def consecutive_failures(self, call_id: str) -> int:
        return 0 if call_id in self._leases else self.fallback.consecutive_failures(call_id)

    # --------------------------------------------------------------- budgets
    def load_spend(self, totals: Iterable[tuple[str, str, float, float, int, int]]) -> None:
        """Redis holds the spend; the local ledger is not the source in this mode."""

    def apply_external(self, rows: Iterable[SpendRow]) -> None:
        """Other processes' spend is already in Redis."""

    def reset_spend(self, key: str) -> None:
        try:
            starts = self.calendar.starts(self.wall())
            self._call(self._reset, [self.prefix, self._now_arg(), "1", _wire(key), str(len(KINDS) + 1),
                                     *(x for k in (*KINDS, RUN) for x in (k, f"{starts[k]:.0f}")),
                                     str(len(self.thresholds)), *(_num(x) for x in self.thresholds)])
        except _Down:
            logger.error("redis backend %s unreachable: the budget reset of %s applies to this process only",
                         self.url, key)
        self.fallback.reset_spend(key)
        super().reset_spend(key)

    def _hear_splits(self, raw: str) -> None:
        """Models (their scopes' keys, ``SEP``-joined as the scripts give them) that another process
        split (see ``_lua.MOVE``) and this one has not: for :attr:`on_split`, which :meth:`_drain`
        calls outside the lock. The reply to the admission or settlement of a call of the model says
        so (no round trip of its own): a process hears of a split with its first call of the model
        admitted after it, or with the answer of one it had in flight."""
        self._heard_splits.extend(map(_unwire, raw.split(SEP)))

    def _drain(self) -> None:
        super()._drain()
        if self._heard_splits:
            with self._lock:
                heard, self._heard_splits = self._heard_splits, []
            if heard and self.on_split is not None:
                try:
                    self.on_split(list(dict.fromkeys(heard)))
                except Exception:  # (never let it fail the call whose reply told it)
                    logger.exception("hive-ratelimit: could not split a model another process split")

    def move_signals(self, source: str, target: Scope) -> None:
        with self._lock:
            if not self._note_move(source, target):  # (their outcomes: see _settle_args)
                return
        args = [self.prefix, "", _wire(source), _wire(target.key)]
        try:
            self._call(self._move, args)
        except _Down:  # made once Redis answers again (see _replay)
            self._pending_moves.append(args)
        self.fallback.move_signals(source, target)
        with self._lock:
            src = self._states.get(source)
            dst = self._state(target, self.clock())  # (shown in stats from now on)
            if src is not None and src.observed_input is not None:  # (its input-token limit moved with it)
                self.observe_input(dst)
            if src is not None and src.observed_output is not None:  # (and its output-token limit)
                self.observe_output(dst)

    def _peek_args(self, windows: list[tuple[str, str, float]], conc: list[str], state: list[str],
                   spend: list[tuple[str, str, float]], reserved: list[str]) -> list[str]:
        args = [self.prefix, self._now_arg(), str(len(windows))]
        for key, name, period in windows:
            args += [_wire(key), name, _num(period)]
        args += [str(len(conc)), *map(_wire, conc), str(len(state)), *map(_wire, state), str(len(spend))]
        for key, kind, start in spend:
            args += [_wire(key), kind, f"{start:.0f}"]
        args += [str(len(reserved)), *map(_wire, reserved)]
        return args

    def _peek(self, windows: list[tuple[str, str, float]], conc: list[str], state: list[str],
              spend: list[tuple[str, str, float]], reserved: list[str]) -> list[Any] | None:
        try:
            out = self._call(self._peek_s, self._peek_args(windows, conc, state, spend, reserved))
        except _Down:
            return None
        return [out[1], out[2], out[3], out[4], out[5], float(_dec(out[0]))]

    def spend(self, key: str, kind: str) -> tuple[float, int, int]:
        start = self.calendar.starts(self.wall())[kind]
        got: list[Any] | None = self._peek([], [], [], [(key, kind, start)], [])
        if got is None:
            return self.fallback.spend(key, kind)
        c, r, t = _dec(got[3][0]).split(SEP)
        return float(c), int(float(r)), int(float(t))

    def spend_snapshot(self) -> dict[str, dict[str, tuple[float, int, int]]]:
        starts = self.calendar.starts(self.wall())
        with self._lock:  # admissions on other threads add keys to it (under the lock)
            seen = list(self._spend_seen)
        wanted = [(k, kind, starts[kind]) for k in seen for kind in ((RUN,) if k.startswith("run:") else KINDS)]
        got: list[Any] | None = self._peek([], [], [], wanted, []) if wanted else [[], [], [], [], [], 0.0]
        if got is None:
            return self.fallback.spend_snapshot()
        out: dict[str, dict[str, tuple[float, int, int]]] = {}
        for (key, kind, start), raw in zip(wanted, got[3], strict=True):
            c, r, t = _dec(raw).split(SEP)
            # (the status snapshot reads this once a second, scopes evicted as idle included: a
            # process idle since its last call would otherwise begin an outage from that call's
            # spend, and allow itself a share of what the others spent since)
            self._spent_is(key, kind, f"{start:.0f}", float(c), float(r))
            if float(c) or float(r):
                out.setdefault(key, {})[kind] = (float(c), int(float(r)), int(float(t)))
        return out

    def budget_snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            wall = self.wall()
            starts = self.calendar.starts(wall)
            budgeted = [(k, st) for k, st in self._states.items() if st.budgets]
        spend = [(k, kind, starts[kind]) for k, st in budgeted for _, kind, _ in st.budgets]
        got: list[Any] | None = (self._peek([], [], [], spend, [k for k, _ in budgeted]) if budgeted
                                 else [[], [], [], [], [], 0.0])
        if got is None:
            return self.fallback.budget_snapshot()
        out: dict[str, dict[str, Any]] = {}
        i = 0
        for j, (key, st) in enumerate(budgeted):
            rcost, rreq = (float(x) for x in _dec(got[4][j]).split(SEP))
            entry: dict[str, Any] = {}
            for name, kind, limit in st.budgets:
                c, r, _t = (float(x) for x in _dec(got[3][i]).split(SEP))
                i += 1
                spent, reserved = (r, rreq) if name == "max_requests_per_run" else (c, rcost)
                entry[name] = {"window": kind, "window_label": self.calendar.label(kind, wall), "spent": spent,
                               "reserved": max(reserved, 0.0), "limit": limit, "remaining": max(limit - spent, 0.0),
                               "tripped": budget_spent(spent, limit)}
            out[key] = entry
        return out

    def snapshot(self, chunk: int = 0) -> dict[str, dict[str, Any]]:
        with self._lock:
            queued: dict[str, int] = {}
            for waiter in self._waiters:
                for k in waiter.keys:
                    queued[k] = queued.get(k, 0) + 1
            # Redis keeps calls in flight only where a concurrency limit counts them; elsewhere
            # this process' own calls are what can be shown.
            mine: dict[str, int] = {}
            for res in self._leases.values():
                if not res.slot_freed:  # (settled or not: in flight until released, as Engine counts)
                    for sc in _charged_scopes(res.ticket):
                        mine[sc.key] = mine.get(sc.key, 0) + 1
            states = list(self._states.items())
        windows = [(k, w.name, w.period) for k, st in states for w in st.windows()]
        conc = [k for k, _ in states]
        provs = [k for k, st in states if st.observed_requests is not None]
        got: list[Any] | None = self._peek(windows, conc, provs, [], []) if states else [[], [], [], [], [], 0.0]
        if got is None:
            return self.fallback.snapshot()
        learned: dict[str, dict[str, float]] = {}
        for key, raw in zip(provs, got[2], strict=True):
            h = _hash_of(raw)
            rpm = [float(h[f]) for f in ("learned_rpm", "adaptive_rpm") if f in h]
            learned[key] = {"learned_requests_per_minute": min(rpm) if rpm else NEVER,
                            "learned_tokens_per_minute": float(h["learned_tpm"]) if "learned_tpm" in h else NEVER,
                            "learned_input_tokens_per_minute":
                                float(h["learned_itpm"]) if "learned_itpm" in h else NEVER,
                            "learned_output_tokens_per_minute":
                                float(h["learned_otpm"]) if "learned_otpm" in h else NEVER}
        out: dict[str, dict[str, Any]] = {}
        i = 0
        for j, (key, st) in enumerate(states):
            entry: dict[str, Any] = {"level": st.level}
            for w in st.windows():
                used = float(_dec(got[0][i]))
                i += 1
                limit = learned.get(key, {}).get(w.name, w.limit)
                if limit != NEVER:
                    entry[w.name] = {"used": used, "limit": limit}
            if st.concurrency is not None:
                in_flight = int(got[1][j])
                entry["in_flight"] = in_flight
                entry["concurrent_requests"] = {"used": in_flight, "limit": st.concurrency}
            else:
                entry["in_flight"] = mine.get(key, 0)
            entry["queued"] = queued.get(key, 0)
            out[key] = entry
        return out

    def held_for(self, keys: Iterable[str]) -> dict[str, float]:
        """:meth:`Engine.held_for`, as every process sharing this Redis sees it (one round trip)."""
        keys = list(keys)
        if not keys:
            return {}
        got = self._peek([], [], keys, [], [])
        if got is None:
            return self.fallback.held_for(keys)
        out: dict[str, float] = {}
        for key, raw in zip(keys, got[2], strict=True):
            h = _hash_of(raw)
            until = float(h.get("cooldown_until", 0.0))
            if h.get("circuit") == "open":
                until = max(until, float(h.get("open_until", 0.0)))
            if until > got[5]:
                out[key] = until - got[5]
        return out

    def provider_state(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            keys = [k for k, st in self._states.items() if st.observed_requests is not None]
        got: list[Any] | None = self._peek([], [], keys, [], []) if keys else [[], [], [], [], [], 0.0]
        if got is None:
            return self.fallback.provider_state()
        out: dict[str, dict[str, Any]] = {}
        for key, raw in zip(keys, got[2], strict=True):
            h = _hash_of(raw)
            entry: dict[str, Any] = {"circuit": h.get("circuit", "closed")}
            if entry["circuit"] == "open" and got[5] >= float(h.get("open_until", 0.0)):
                entry["circuit"] = "half_open"  # (its time is over, whether or not an admission looked at it yet)
            cooldown = float(h.get("cooldown_until", 0.0)) - got[5]
            if cooldown > 0:
                entry["cooldown_seconds"] = cooldown
            if "learned_rpm" in h:
                entry["learned_requests_per_minute"] = float(h["learned_rpm"])
            if "learned_tpm" in h:
                entry["learned_tokens_per_minute"] = float(h["learned_tpm"])
            if "learned_itpm" in h:
                entry["learned_input_tokens_per_minute"] = float(h["learned_itpm"])
            if "learned_otpm" in h:
                entry["learned_output_tokens_per_minute"] = float(h["learned_otpm"])
            if "adaptive_rpm" in h:
                entry["adaptive_requests_per_minute"] = round(float(h["adaptive_rpm"]), 2)
            if int(float(h.get("failures", 0))):
                entry["consecutive_failures"] = int(float(h["failures"]))
            out[key] = entry
        return out

    def _status_key(self) -> str:
        import socket

        return f"{self.prefix}:status:{socket.gethostname()}:{os.getpid()}"

    def publish_status(self, doc: str, ttl: float) -> None:
        """Publish this process' status snapshot (``hive-ratelimit status`` on any host reads it)."""
        if not self.available:
            return
        try:
            self.r.set(self._status_key(), doc, ex=max(int(ttl), 1))
        except self._errors:
            pass  # the next admission notices the outage

    def unpublish_status(self) -> None:
        """Remove this process' status snapshot (at exit; during an outage it expires on its own)."""
        if not self.available:
            return
        try:
            self.r.delete(self._status_key())
        except self._errors:
            pass

    def flush_pending(self) -> int:
        """At exit: write the settlements and spend kept during an outage now, if Redis answers,
        without waiting for ``retry_interval`` (the next call that would have written them never
        comes). Returns how many are still kept (not written)."""
        if not self._kept():
            return 0
        with self._lock:
            self._next_try = -NEVER  # (try now)
            self._peek([], [], [], [], [])  # replays first; a failure leaves them kept (and logged)
        return len(self._pending_settle) + len(self._pending_spend)

    def backend_info(self) -> dict[str, Any]:
        return {"type": "redis", "url": self.url, "key_prefix": self.prefix, "available": self.available,
                "on_backend_error": self.on_error, "round_trips": self.round_trips, "outages": self.outages,
                "pending_settlements": len(self._pending_settle) + len(self._pending_spend)}

    def redis_memory(self) -> dict[str, int]:
        """Bytes of Redis memory per scope key (``MEMORY USAGE`` summed over its keys)."""
        out: dict[str, int] = {}
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + ":*"  # the prefix may hold glob characters
        try:
            for raw in self.r.scan_iter(match=pattern, count=500):
                name = _dec(raw)
                kind, _, rest = name[len(self.prefix) + 1:].partition(":")  # (the prefix may hold ':')
                if kind == "w" or kind == "b":
                    scope = _unwire(rest.rsplit(":", 1)[0])
                elif kind in ("c", "rv", "s"):
                    scope = _unwire(rest)
                else:
                    names = {"l": "leases", "leases": "leases", "mark": "warnings", "once": "replays"}
                    scope = "(" + names.get(kind, kind) + ")"
                out[scope] = out.get(scope, 0) + int(self.r.memory_usage(raw) or 0)
        except self._errors as exc:
            logger.error("redis backend %s: could not measure memory (%s)", self.url, _clean(exc))
        return out

    def __repr__(self) -> str:
        return (f"RedisEngine({self.url}, prefix={self.prefix!r}, in_flight={len(self._leases)}, "
                f"queued={len(self._waiters)}, available={self.available})")


class _Down(Exception):
    """Internal: Redis did not answer (already logged)."""


def _pack(args: list[str]) -> list[str]:
    """``[prefix, now, rest...]`` as the three arguments the scripts take (see :mod:`._lua`)."""
    rest = args[2:]
    body = US.join(rest)
    if rest and body.count(US) != len(rest) - 1:  # a call id holding the separator (scope keys are wired)
        body = US.join(a.replace(US, "?") for a in rest)
    return [args[0], args[1], body]


def _dec(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _hash_of(raw: Any) -> dict[str, str]:
    """A Redis hash as PEEK returns it (its HGETALL, fields and values joined by SEP)."""
    flat = _dec(raw).split(SEP) if raw else []
    return dict(zip(flat[::2], flat[1::2], strict=False))


def _clean(exc: BaseException) -> str:
    """An exception's text without a password that a URL in it may carry."""
    import re

    text = re.sub(r"(redis|rediss|unix)://[^@\s]*@", r"\1://***@", str(exc))
    return re.sub(r"(?i)(password|username)=[^&\s]*", r"\1=***", text)[:300]
