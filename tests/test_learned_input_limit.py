"""The input-token limit learned from Anthropic's headers (``learned_input_tokens_per_minute``)
where the window appears while calls are in flight, and after a quiet spell. Both backends.
(The end-to-end cases are in test_provider_429.py.) Found by helper-55."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin._engine import Scope, Ticket
from hive_ratelimit_plugin._retry import RateSignals
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import wait_until
from .test_provider_429 import _anthropic_headers, make

pytestmark = pytest.mark.usefixtures("contract_backend")


class Woken:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def anthropic_signals(**limits: int) -> RateSignals:
    """What Anthropic's headers give (its "tokens" headers are no limit to learn), with ``limits``."""
    sig = RateSignals(**limits)
    sig.learn_tokens = False
    return sig


def _itpm(n: int) -> RateSignals:
    return anthropic_signals(limit_input_tokens=n)


def test_a_call_in_flight_when_the_window_appears_does_not_touch_it(clock: FakeClock, make_engine: Any) -> None:
    """A call admitted before the learned input window existed never charged it: its settlement
    must not move it. (Redis settled it against the window anyway, taking back an estimate it
    never reserved: another call's charge vanished, and the window let more in than the limit.)"""
    eng = make_engine(clock)
    m = Scope("model", "model:anthropic/x", LimitSet())
    assert eng.acquire(Ticket("a", [m], input_tokens=100), Woken()) is None
    assert eng.acquire(Ticket("b", [m], input_tokens=5000), Woken()) is None  # in flight, estimated
    eng.release("a", input_tokens=100, output_tokens=0, signals=_itpm(10_000))  # learns: window appears
    assert eng.acquire(Ticket("c", [m], input_tokens=3000), Woken()) is None  # charged 3,000 there
    eng.release("b", input_tokens=5000, output_tokens=0, cached_input=4900)  # mostly read from the cache
    used = eng.snapshot()["model:anthropic/x"]["learned_input_tokens_per_minute"]["used"]
    assert used == 3000


def _caller(provider: FakeProvider) -> Callable[[int], Awaitable[Any]]:
    """Calls of a ~1,250-token prompt (as the fake provider counts it) to an Anthropic model."""
    kw = {"model": "anthropic/claude-sonnet-4-5", "api_base": provider.root, "api_key": "sk-ant-test-SECRET",
          "max_tokens": 10}
    prompt = "word " * 1000

    async def call(i: int) -> Any:
        return await litellm.acompletion(messages=[{"role": "user", "content": prompt + str(i)}], **kw)

    return call


async def _learn_then_idle(limiter: HiveLimiter, provider: FakeProvider, clock: FakeClock,
                           call: Callable[[int], Awaitable[Any]]) -> None:
    """One answer teaches 3,000 input tokens a minute; then two quiet minutes and an eviction pass."""
    provider.state.push(Scripted(status=200, headers=_anthropic_headers(3000)))
    await call(0)
    clock.advance(120)
    limiter._engine.sweep()


async def test_the_learned_input_window_outlives_an_idle_minute(provider: FakeProvider, clock: FakeClock) -> None:
    """Memory keeps the window of a model whose limit it learned (learned_itpm: never idle). Redis
    kept only a local window with nothing in it: evicted after a quiet minute, so a burst after
    it went uncounted against the learned limit until an answer came back."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 120}})
    await _learn_then_idle(limiter, provider, clock, _caller(provider))
    assert any(w.name == "learned_input_tokens_per_minute"
               for st in limiter._engine._states.values() for w in st.windows()), "window dropped"


async def test_a_burst_after_an_idle_minute_is_held_to_the_learned_input_limit(provider: FakeProvider,
                                                                              clock: FakeClock) -> None:
    """After a quiet spell the learned limit still holds a burst (sent before any answer comes
    back to teach it again): the third ~1,250-token prompt waits under 3,000."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 120}})
    call = _caller(provider)
    await _learn_then_idle(limiter, provider, clock, call)
    provider.state.latency = 1.0  # (real seconds: every call of the burst is admitted before an answer)
    for _ in range(3):
        provider.state.push(Scripted(status=200, headers=_anthropic_headers(3000)))
    burst = [asyncio.ensure_future(call(i)) for i in range(1, 4)]
    # every call of the burst answered or waiting (the log records a call once it is answered)
    await wait_until(lambda: limiter.get_usage_stats()["queued"] + provider.state.count() >= 4)
    assert provider.state.count() == 3, "a third ~1,250-token prompt went past 3,000 learned input tokens"
    clock.advance(61)
    await asyncio.wait_for(asyncio.gather(*burst), 20)
