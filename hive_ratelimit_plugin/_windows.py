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

from bisect import bisect_left

BUCKETS = 60
#: ``SlidingWindow.ci`` when the window holds no bucket at all.
NO_BUCKET = -(1 << 62)


class SlidingWindow:
    """Usage over a sliding period, with a limit.

    The newest bucket is kept apart, as ``ci`` (its index) and ``cur`` (its amount), because
    nearly every charge and settlement lands in it: the engine's hot path updates it in place
    without touching the list of older buckets.
    """

    __slots__ = ("buckets", "ci", "cur", "limit", "name", "next_expiry", "period", "total", "width")

    def __init__(self, limit: float, period: float, name: str = "") -> None:
        self.name = name  # the config field, e.g. "tokens_per_minute"
        self.limit = limit
        self.period = period
        self.width = period / BUCKETS
        # [bucket_index, amount] for the buckets older than the newest one, oldest first. A plain
        # list: at most BUCKETS entries, and far smaller than a deque for the usual one or two.
        self.buckets: list[list[float]] = []
        self.ci = NO_BUCKET  # the newest bucket's index (NO_BUCKET: no bucket, and then no older one)
        self.cur = 0.0  # the newest bucket's amount
        self.next_expiry = float("inf")  # when the oldest bucket leaves the window
        self.total = 0.0

    def __repr__(self) -> str:
        return f"SlidingWindow(used={self.total:g}/{self.limit:g} per {self.period:g}s)"

    def bucket_of(self, now: float) -> int:
        """The index of the bucket that ``now`` falls in."""
        return int(now // self.width)

    def _expiry_of(self, index: float) -> float:
        # Bucket b covers [b*w, (b+1)*w); its usage counts until (b+1)*w + period. retry_at()
        # uses the same expression, so a waiter woken at that time always finds room.
        return (index + 1) * self.width + self.period

    def expire(self, now: float) -> None:
        """Drop buckets that have entirely left the window."""
        if now < self.next_expiry:
            return
        buckets = self.buckets
        n = 0
        for index, amount in buckets:
            if self._expiry_of(index) > now:
                break
            self.total -= amount
            n += 1
        if n:
            del buckets[:n]
        if buckets:
            self.next_expiry = self._expiry_of(buckets[0][0])
        elif self.ci != NO_BUCKET and self._expiry_of(self.ci) > now:
            self.next_expiry = self._expiry_of(self.ci)
        else:
            self.ci = NO_BUCKET
            self.cur = 0.0
            self.total = 0.0  # clear float drift
            self.next_expiry = float("inf")

    def shrink_to(self, total: float) -> None:
        """Scale every bucket down so that the window holds at most ``total`` (call :meth:`expire`
        first). For a limit cut below what the window holds (a learned rate lowered after 429s):
        calls then go on at the new pace as the scaled buckets leave the window, each admitting
        less than really left, instead of stopping until the old pace's minute has drained."""
        if self.total <= total or self.total <= 0:
            return
        f = max(total, 0.0) / self.total
        for bucket in self.buckets:
            bucket[1] *= f
        self.cur *= f
        self.total = sum(b[1] for b in self.buckets) + self.cur

    def copy_usage(self, other: SlidingWindow) -> None:
        """Hold what ``other`` (a window of the same period) holds, bucket by bucket."""
        self.buckets = [list(b) for b in other.buckets]
        self.ci, self.cur, self.total, self.next_expiry = other.ci, other.cur, other.total, other.next_expiry

    def fits(self, amount: float) -> bool:
        """Whether ``amount`` more fits now (call :meth:`expire` first)."""
        return self.total + amount <= self.limit

    def add(self, now: float, amount: float) -> int:
        """Record ``amount`` at ``now``; returns the bucket index (to adjust it later)."""
        index = int(now // self.width)  # bucket_of(), inlined: this runs for every window of every call
        ci = self.ci
        if index == ci:
            self.cur += amount
        elif index > ci:  # a new newest bucket
            if ci != NO_BUCKET:
                self.buckets.append([ci, self.cur])
            else:  # the window was empty
                self.next_expiry = self._expiry_of(index)
            self.ci = index
            self.cur = amount
        else:  # an earlier time than the newest bucket (a moved hit): keep the order
            buckets = self.buckets
            i = bisect_left(buckets, index, key=lambda b: int(b[0]))
            if i < len(buckets) and buckets[i][0] == index:
                buckets[i][1] += amount
            else:
                buckets.insert(i, [index, amount])
                if i == 0:
                    self.next_expiry = self._expiry_of(index)
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
        if index == self.ci and now < self.next_expiry:  # the usual case: the newest bucket, in the window
            cur = self.cur
            applied = delta if delta > -cur else -cur
            self.cur = cur + applied
            self.total += applied
            return
        self.expire(now)
        if index == self.ci:
            applied = max(delta, -self.cur)
            self.cur += applied
            self.total += applied
            return
        for bucket in reversed(self.buckets):  # settlements are usually for recent buckets
            if bucket[0] == index:
                applied = max(delta, -bucket[1])
                bucket[1] += applied
                self.total += applied
                return
            if bucket[0] < index:
                break
        if delta > 0:
            self.add(now, delta)

    def move(self, now: float, index: int, amount: float, to: float) -> int:
        """Move ``amount`` recorded in bucket ``index`` to time ``to`` (``to`` <= ``now``).

        Used to count a request from when it may have reached the provider rather than from
        when it was admitted. Returns the new bucket index.
        """
        new_index = int(to // self.width)
        if new_index == index:
            return index
        self.adjust(now, index, -amount)
        if self._expiry_of(new_index) > now:
            self.add(to, amount)
        return new_index

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
        for index, used in self.buckets:
            freed += used
            if freed >= excess:
                return self._expiry_of(index)
        if self.ci != NO_BUCKET:
            return self._expiry_of(self.ci)
        return now + self.period  # unreachable while total is consistent

    def is_idle(self) -> bool:
        """True when the window holds no usage (after :meth:`expire`)."""
        return self.ci == NO_BUCKET
