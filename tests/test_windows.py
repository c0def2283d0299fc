"""Sliding-window arithmetic, with exact numbers and time passed in."""

from __future__ import annotations

import random

import pytest

from hive_ratelimit_plugin._windows import BUCKETS, SlidingWindow

from .helpers import max_in_any_window


def test_counts_until_bucket_leaves_window() -> None:
    """Usage counts for the whole period and is gone once its bucket has left the window."""
    w = SlidingWindow(limit=10, period=60.0)
    w.add(0.0, 3)
    w.expire(59.9)
    assert w.total == 3
    w.expire(61.0)  # bucket [0, 1) counts until 1 + 60
    assert w.total == 0
    assert w.is_idle()


def test_retry_at_is_when_enough_usage_expires() -> None:
    """retry_at names the first time the oldest buckets free enough room."""
    w = SlidingWindow(limit=5, period=60.0)
    w.add(0.0, 2)
    w.add(10.0, 3)
    assert w.retry_at(20.0, 1) == 61.0  # the first bucket frees 2
    assert w.retry_at(20.0, 3) == 71.0  # needs the second one too
    assert w.retry_at(20.0, 6) == float("inf")  # more than the limit: never


def test_no_boundary_burst() -> None:
    """A fixed window would let 2x through around a boundary; the sliding one does not."""
    w = SlidingWindow(limit=10, period=60.0)
    admitted = []
    t = 0.0
    while t < 300:
        w.expire(t)
        if w.fits(1):
            w.add(t, 1)
            admitted.append(t)
        t += 0.25
    assert max_in_any_window(admitted, 60.0) <= 10
    # And the throughput cost of bucketing is small: 10 per ~61 s.
    assert len(admitted) >= 10 * (300 // 61)


@pytest.mark.parametrize("seed", range(5))
def test_random_load_never_exceeds_limit_in_any_window(seed: int) -> None:
    """Random arrivals with random sizes never exceed the limit in any period."""
    rnd = random.Random(seed)
    w = SlidingWindow(limit=50, period=10.0)
    events: list[tuple[float, int]] = []
    t = 0.0
    for _ in range(5000):
        t += rnd.expovariate(20)
        amount = rnd.randint(1, 7)
        w.expire(t)
        if w.fits(amount):
            w.add(t, amount)
            events.append((t, amount))
    # Check the weighted sum over every window ending at an event.
    for i, (ti, _) in enumerate(events):
        inside = sum(a for tj, a in events[: i + 1] if tj > ti - 10.0)
        assert inside <= 50


def test_adjust_refunds_within_window_and_charges_late_usage() -> None:
    """Settlement refunds an overestimate and charges an underestimate, even after expiry."""
    w = SlidingWindow(limit=100, period=60.0)
    index = w.add(0.0, 40)
    w.adjust(5.0, index, -30)
    assert w.total == 10
    w.adjust(5.0, index, +5)
    assert w.total == 15
    w.adjust(200.0, index, +7)  # the bucket is gone: charge now
    assert w.total == 7
    w.adjust(200.0, index, -100)  # refund for an expired bucket: nothing to refund
    assert w.total == 7


def test_memory_is_bounded_by_bucket_count() -> None:
    """However many hits, a window keeps at most BUCKETS + 1 buckets."""
    w = SlidingWindow(limit=10**9, period=60.0)
    for i in range(100_000):
        t = i * 0.01
        w.expire(t)
        w.add(t, 1)
    assert len(w.buckets) <= BUCKETS + 1


def test_waking_at_retry_at_always_finds_room() -> None:
    """retry_at and expire agree exactly, so a woken waiter never spins."""
    for period in (1.0, 60.0, 3600.0, 86400.0):
        w = SlidingWindow(limit=1, period=period)
        w.add(123.456789, 1)
        at = w.retry_at(123.5, 1)
        w.expire(at)
        assert w.fits(1), period


def test_move_counts_a_hit_from_a_later_time() -> None:
    """A hit moved to a later time keeps counting until that time plus the period, in order."""
    w = SlidingWindow(limit=10, period=60.0)
    index = w.add(0.0, 1)
    w.add(5.0, 1)
    w.move(5.0, index, 1, to=2.0)  # it reached the provider at t=2 at the latest
    w.expire(61.5)
    assert w.total == 2  # the moved hit (bucket [2, 3)) still counts
    w.expire(63.0)
    assert w.total == 1
    w.expire(66.0)
    assert w.total == 0
