"""Helpers for testing code that uses hive-ratelimit: a fake clock and the fake provider.

Example::

    from hive_ratelimit_plugin import HiveLimiter
    from hive_ratelimit_plugin.testing import FakeClock

    clock = FakeClock()
    limiter = HiveLimiter({"global": {"requests_per_minute": 2}}, clock=clock)
    clock.attach(limiter)
    ...
    clock.advance(60)   # the window slides; waiting calls are re-examined at once
"""

from __future__ import annotations

import threading
from typing import Any

from .fake_provider import FakeProvider, ProviderState, Scripted

__all__ = ["FakeClock", "FakeProvider", "ProviderState", "Scripted"]


class FakeClock:
    """A manually advanced monotonic clock. Thread-safe; callable like ``time.monotonic``."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._limiters: list[Any] = []

    def __call__(self) -> float:
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock({self._now:.3f})"

    def attach(self, limiter: Any) -> None:
        """Re-examine ``limiter``'s waiting calls whenever the clock moves."""
        self._limiters.append(limiter)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every waiting call of attached limiters to re-check."""
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back")
        with self._lock:
            self._now += seconds
        for lim in self._limiters:
            engine = getattr(lim, "_engine", lim)
            engine.dispatch()
            engine.wake_all()
