"""Counters for monitoring, and the log filter that summarises repeated lines and hides secrets.

Nothing here runs on the admission fast path: counters are bumped only where a call is rejected,
had to wait, was answered 429, or (when metrics are on) when settled spend rows are handed out
by the engine's outbox.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import _fork

#: Upper bounds (seconds) of the queue-wait histogram.
WAIT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                                   120.0, 300.0)


def rejection_reason(exc: BaseException) -> tuple[str, str]:
    """``(level, reason)`` of an error that stopped a call before it was sent."""
    scope = getattr(exc, "scope", None)
    level = str(scope).split(":", 1)[0] if scope else "none"
    name = type(exc).__name__
    limit = getattr(exc, "limit", None)
    if name == "RateLimitQueueTimeout":
        if scope == "queue" and limit == "max_size":  # (see _waiting._queue_full)
            return "queue", "queue_full"
        return level, "provider_cooldown" if limit == "provider_cooldown" else "queue_timeout"
    if name == "RunawayDetectedError":
        return level, "runaway"
    if name == "BudgetExceededError":
        return level, "unknown_price" if limit == "unknown_price" else "budget_exceeded"
    if name == "RequestTooLargeError":
        return level, "request_too_large"
    if name == "CircuitOpenError":
        return level, "circuit_open"
    if name == "BackendUnavailableError":
        return level, "backend_unavailable"
    return level, "other"


class Observations:
    """Per-limiter monitoring counters (read by ``hive_ratelimit_plugin.metrics`` and the status
    snapshots). Thread-safe; every method is off the admission fast path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _fork.track(self)
        self.rejections: dict[tuple[str, str], int] = {}
        self.wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)  # the last one is +Inf
        self.wait_sum = 0.0
        self.waited = 0  # calls admitted after a wait > 0
        self.provider_429s: dict[tuple[str, str], int] = {}
        # (provider, model) -> [requests, input tokens, output tokens, cost]; filled only while a
        # consumer (metrics) asked for settled rows.
        self.settled: dict[tuple[str, str], list[float]] = {}
        self.events: dict[str, int] = {}
        self.wants_rows = False

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # (see _fork)

    def rejected(self, exc: BaseException) -> None:
        key = rejection_reason(exc)
        with self._lock:
            self.rejections[key] = self.rejections.get(key, 0) + 1

    def queue_wait(self, seconds: float) -> None:
        """A call was admitted after waiting ``seconds`` (> 0)."""
        i = bisect.bisect_left(WAIT_BUCKETS, seconds)
        with self._lock:
            self.wait_buckets[i] += 1
            self.wait_sum += seconds
            self.waited += 1

    def rate_limited(self, provider: str, model: str) -> None:
        with self._lock:
            key = (provider, model)
            self.provider_429s[key] = self.provider_429s.get(key, 0) + 1

    def settle_rows(self, rows: Iterable[Any]) -> None:
        with self._lock:
            for r in rows:
                acc = self.settled.get((r.provider or "", r.model or ""))
                if acc is None:
                    acc = self.settled[(r.provider or "", r.model or "")] = [0, 0, 0, 0.0]
                acc[0] += r.requests
                acc[1] += r.input_tokens
                acc[2] += r.output_tokens
                acc[3] += r.cost

    def event(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type"))
        with self._lock:
            self.events[kind] = self.events.get(kind, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (for status snapshots)."""
        with self._lock:
            return {
                "rejections": {f"{lvl}/{why}": n for (lvl, why), n in sorted(self.rejections.items())},
                "provider_429s": sum(self.provider_429s.values()),
                "queue_waits": {"count": self.waited, "sum_seconds": self.wait_sum},
                "events": dict(self.events),
            }


# --------------------------------------------------------------------- logging
_SECRET = re.compile(
    r"(?i)(sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9._\-]{8,}|"
    r"\b(?:gsk_|xai-|hf_|pplx-|r8_|sk_)[A-Za-z0-9_\-]{16,}|\bAIza[A-Za-z0-9_\-]{20,}|\bAKIA[A-Z0-9]{16}|"
    r"(?:api[_-]?key|x-api-key|authorization)[\"']?\s*[:=]\s*[\"']?(?:Bearer\s+)?[^\s\"',}]{4,})"
)


_FORMATTER = logging.Formatter()


def redact(text: str) -> str:
    """Hide anything that looks like an API key or bearer token."""
    return _SECRET.sub("<redacted>", text)


class RepeatSummary(logging.Filter):
    """A filter for the ``hive_ratelimit_plugin`` logger: a line repeated within ``window``
    seconds is logged once, and the repeats are reported as
    ``"<last line> ... repeated 57 times in the last 10s"`` when the window is over (on the next
    such line, or on :meth:`flush`, which the status publisher calls about once a second).

    Lines are "the same" when they share ``extra={"hive_repeat_key": ...}`` (a 429 from the same
    model, whatever wait it named; such a line passes once per window) or else the same text
    (which passes ``burst`` times per window). Every line passing through is also
    stripped of anything that looks like an API key.
    """

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.monotonic, burst: int = 3) -> None:
        super().__init__("hive_ratelimit_plugin")
        self.window = window
        self.burst = burst
        self.clock = clock
        self._lock = threading.Lock()
        # key -> [window start, lines passed, lines suppressed, last suppressed record]
        self._seen: dict[Any, list[Any]] = {}
        _fork.track(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # (see _fork)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "hive_summary", False):
            return True
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Format the traceback now, redacted; handlers use this text instead of formatting it.
            with contextlib.suppress(Exception):
                record.exc_text = redact(_FORMATTER.formatException(record.exc_info))
        if record.levelno < logging.WARNING:
            return True
        given = getattr(record, "hive_repeat_key", None)
        # A keyed line (a storm-prone one) passes once per window; any other identical line
        # passes `burst` times per window before it is summarised.
        burst = 1 if given is not None else self.burst
        key = (record.levelno, given if given is not None else clean)
        now = self.clock()
        due: list[tuple[logging.LogRecord, int, float]] = []
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] >= self.window:
                if entry[2]:
                    due.append((entry[3], entry[2], now - entry[0]))
                entry = None
            if entry is None:
                entry = self._seen[key] = [now, 0, 0, None]
            passes = bool(entry[1] < burst)
            if passes:
                entry[1] += 1
            else:
                entry[2] += 1
                entry[3] = record
            if len(self._seen) > 256:
                self._expire(now, due)
        for last, count, elapsed in due:
            self._emit_summary(last, count, elapsed)
        return passes

    def _expire(self, now: float, due: list[tuple[logging.LogRecord, int, float]], force: bool = False) -> None:
        for k, (start, _passed, count, last) in list(self._seen.items()):
            if force or now - start >= self.window:
                if count:
                    due.append((last, count, now - start))
                del self._seen[k]

    def reset(self) -> None:
        """Forget every line seen, without reporting repeats (tests start from a clean slate)."""
        with self._lock:
            self._seen.clear()

    def flush(self, force: bool = False) -> None:
        """Report repeats whose window is over (every pending one with ``force``, at exit)."""
        now = self.clock()
        due: list[tuple[logging.LogRecord, int, float]] = []
        with self._lock:
            self._expire(now, due, force)
        for last, count, elapsed in due:
            self._emit_summary(last, count, elapsed)

    def _emit_summary(self, last: logging.LogRecord, count: int, elapsed: float) -> None:
        log = logging.getLogger(last.name)
        times = "once more" if count == 1 else f"{count} times"
        # (within a second: "in the last 0s" read as if nothing had happened)
        span = f"{elapsed:.0f}s" if elapsed >= 1.0 else "second"
        record = log.makeRecord(
            last.name, last.levelno, last.pathname, last.lineno,
            "%s ... repeated %s in the last %s", (redact(last.getMessage()), times, span),
            None, last.funcName, extra={"hive_summary": True},
        )
        log.handle(record)


SUMMARY = RepeatSummary()


def install(logger: logging.Logger) -> None:
    """Attach the process-wide :data:`SUMMARY` filter to ``logger`` once (pending repeats are
    reported at exit)."""
    if SUMMARY not in logger.filters:
        logger.addFilter(SUMMARY)
        atexit.register(SUMMARY.flush, True)
