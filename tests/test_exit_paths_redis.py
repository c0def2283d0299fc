"""The exit paths of tests/test_exit_paths.py that the shared backend handles apart, on both backends."""
from __future__ import annotations

import asyncio
import contextlib

import litellm

from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import wait_until
from .test_exit_paths import UNIT_PRICE, g, make, small


async def test_cancelled_as_granted_costs_nothing(provider: FakeProvider, clock: FakeClock, backend: dict) -> None:
    limiter = make(clock, {"global": {"requests_per_minute": 1}}, backend)
    await litellm.acompletion(**small(provider))  # 8
    late = asyncio.ensure_future(litellm.acompletion(**small(provider)))
    await wait_until(lambda: limiter._engine.queue_length == 1)
    clock.advance(61)
    limiter._engine.dispatch()
    late.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await late
    assert provider.state.count() == 1
    stats = limiter.get_usage_stats()
    assert g(limiter)["in_flight"] == 0
    assert stats["requests_today"] == 1
    assert stats["cost_today"] == 8


def test_sync_stream_finish_reason_frees_slot(provider: FakeProvider, clock: FakeClock, backend: dict) -> None:
    limiter = make(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0},
                           "estimation": {"lease_seconds": 30}}, backend)
    stream = litellm.completion(**small(provider, stream=True, stream_options={"include_usage": True}))
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            break
    assert g(limiter)["in_flight"] == 0
    litellm.completion(**small(provider))


async def test_abandoned_stream_settled_on_stats(provider: FakeProvider, clock: FakeClock, backend: dict) -> None:
    limiter = make(clock, {"estimation": {"lease_seconds": 30}}, backend)
    stream = await litellm.acompletion(**small(provider, stream=True))
    async for _ in stream:
        break
    assert g(limiter)["in_flight"] == 1
    clock.advance(60)
    await asyncio.sleep(0.1)
    stats = limiter.get_usage_stats()
    assert stats["levels"]["global"]["global"]["in_flight"] == 0
    assert stats["cost_today"] == 14


async def test_disable_releases_waiters(provider: FakeProvider, clock: FakeClock, backend: dict) -> None:
    limiter = make(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 30}}, backend)
    await litellm.acompletion(**small(provider))
    late = asyncio.ensure_future(litellm.acompletion(**small(provider)))
    await wait_until(lambda: limiter._engine.queue_length == 1)
    limiter.reload({"enabled": False, "pricing": UNIT_PRICE, "state_path": ":memory:",
                    "budget": {"max_daily_spend": 100_000}, "global": {"requests_per_minute": 1}, **backend})
    await asyncio.wait_for(late, 5)
    assert provider.state.count() == 2
