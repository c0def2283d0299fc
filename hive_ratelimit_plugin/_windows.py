"""Pure sliding-window arithmetic. No IO, no clock reads: ``now`` is always passed in.

A :class:`SlidingWindow` counts usage (requests or tokens) over the last ``period`` seconds in
``BUCKETS`` sub-buckets. It is *conservative*: usage recorded in a bucket keeps counting until the
whole bucket has left the window, so the count it reports is never below the exact sliding-window
count. That is what makes it safe against providers that enforce exact sliding windows: it can
never admit more than ``limit`` in any interval of ``period`` seconds, and it costs at most
``1/BUCKETS`` of throughput (about 1.6 %). Memory is bounded by ``BUCKETS`` whatever the rate,
unlike a log of timestamps.
"""

from __future__ import annotations

from collections import deque

BUCKETS = 60


class SlidingWindow:
    """Usage over a sliding period, with a limit."""

    __slots__ = ("_buckets", "limit", "name", "period", "total", "width")

    def __init__(self, limit: float, period: float, name: str = "") -> None:
        self.name = name  # the config field, e.g. "tokens_per_minute"
        self.limit = limit
        self.period = period
        self.width = period / BUCKETS
        # [bucket_index, amount] for non-empty buckets, oldest first.
        self._buckets: deque[list[float]] = deque()
        self.total = 0.0

    def __repr__(self) -> str:
        return f"SlidingWindow(used={self.total:g}/{self.limit:g} per {self.period:g}s)"

    def bucket_of(self, now: float) -> int:
        """The index of the bucket that ``now`` falls in."""
        return int(now // self.width)

    def expire(self, now: float) -> None:
        """Drop buckets that have entirely left the window."""
        buckets = self._buckets
        if not buckets:
            return
        # Bucket b covers [b*w, (b+1)*w); its usage counts until (b+1)*w + period. The same
        # expression is used in retry_at(), so a waiter woken at that time always finds room.
        width, period = self.width, self.period
        while buckets and (buckets[0][0] + 1) * width + period <= now:
            self.total -= buckets.popleft()[1]
        if not buckets:
            self.total = 0.0  # clear float drift

    def fits(self, amount: float) -> bool:
        """Whether ``amount`` more fits now (call :meth:`expire` first)."""
        return self.total + amount <= self.limit

    def add(self, now: float, amount: float) -> int:
        """Record ``amount`` at ``now``; returns the bucket index (to adjust it later)."""
        index = self.bucket_of(now)
        buckets = self._buckets
        if buckets and buckets[-1][0] == index:
            buckets[-1][1] += amount
        else:
            buckets.append([index, amount])
        self.total += amount
        return index

    def adjust(self, now: float, index: int, delta: float) -> None:
        """Correct an earlier :meth:`add` made in bucket ``index`` by ``delta`` (settlement).

        A negative delta is a refund and only applies while the bucket is still in the window.
        A positive delta whose bucket has left the window is charged to the current bucket:
        the usage really happened, later than estimated.
        """
        if delta == 0:
            return
        self.expire(now)
        for bucket in self._buckets:
            if bucket[0] == index:
                applied = max(delta, -bucket[1])
                bucket[1] += applied
                self.total += applied
                return
        if delta > 0:
            self.add(now, delta)

    def retry_at(self, now: float, amount: float) -> float:
        """The earliest time at which ``amount`` fits, assuming no new usage.

        Returns ``now`` if it fits already and ``inf`` if it can never fit (``amount > limit``).
        """
        if amount > self.limit:
            return float("inf")
        excess = self.total + amount - self.limit
        if excess <= 0:
            return now
        freed = 0.0
        for index, used in self._buckets:
            freed += used
            if freed >= excess:
                return (index + 1) * self.width + self.period
        return now + self.period  # unreachable while total is consistent

    def is_idle(self) -> bool:
        """True when the window holds no usage (after :meth:`expire`)."""
        return not self._buckets
