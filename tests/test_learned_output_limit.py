"""The output-token limit learned from Anthropic's headers (``learned_output_tokens_per_minute``)
where the window appears while calls are in flight, after a quiet spell, and at a model's split
between endpoints. Both backends. (The end-to-end cases are in test_provider_429.py.)"""
from __future__ import annotations

from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import RateLimitQueueTimeout
from hive_ratelimit_plugin._engine import Scope, Ticket
from hive_ratelimit_plugin._retry import RateSignals
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .test_provider_429 import _anthropic_output_headers, make

pytestmark = pytest.mark.usefixtures("contract_backend")

MODEL = "model:anthropic/claude-sonnet-4-5"


class Woken:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _otpm(n: int) -> RateSignals:
    sig = RateSignals()
    sig.learn_tokens = False
    sig.limit_output_tokens = n
    return sig


def test_a_call_in_flight_when_the_window_appears_does_not_touch_it(clock: FakeClock, make_engine: Any) -> None:
    """A call admitted before the learned output window existed never charged it: its settlement
    (4,000 asked, 10 used) must not take back what it never reserved from another call's charge."""
    eng = make_engine(clock)
    m = Scope("model", "model:anthropic/x", LimitSet())
    assert eng.acquire(Ticket("a", [m], output_tokens=100), Woken()) is None
    assert eng.acquire(Ticket("b", [m], output_tokens=4000), Woken()) is None  # in flight, estimated
    eng.release("a", input_tokens=0, output_tokens=100, signals=_otpm(10_000))  # learns: window appears
    assert eng.acquire(Ticket("c", [m], output_tokens=3000), Woken()) is None  # charged 3,000 there
    eng.release("b", input_tokens=0, output_tokens=10)
    snap = eng.snapshot()["model:anthropic/x"]["learned_output_tokens_per_minute"]
    assert snap == {"used": 3000, "limit": 10_000}
    assert eng.provider_state()["model:anthropic/x"]["learned_output_tokens_per_minute"] == 10_000
    # the limit holds: 3,000 in flight, 7,000 left
    w = eng.acquire(Ticket("d", [m], output_tokens=7001), Woken())
    assert w is not None and w.blocked is not None and w.blocked.limit == "learned_output_tokens_per_minute"


def _kw(p: FakeProvider, max_tokens: int) -> dict[str, Any]:
    return {"model": "anthropic/claude-sonnet-4-5", "api_base": p.root, "api_key": "sk-ant-test-SECRET",
            "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}


async def test_the_learned_output_window_outlives_an_idle_minute(provider: FakeProvider, clock: FakeClock) -> None:
    """A model whose output-token limit was learned keeps its window through a quiet spell: the
    next burst is held to the limit before any answer teaches it again."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.push(Scripted(status=200, headers=_anthropic_output_headers(10_000)))
    await litellm.acompletion(**_kw(provider, 10))
    clock.advance(120)
    limiter._engine.sweep()
    assert any(w.name == "learned_output_tokens_per_minute"
               for st in limiter._engine._states.values() for w in st.windows()), "window dropped"
    provider.state.completion_tokens = 6000
    await litellm.acompletion(**_kw(provider, 6000))  # uses them all
    with pytest.raises(RateLimitQueueTimeout) as info:
        await litellm.acompletion(**_kw(provider, 6000))  # 12,000 > 10,000 within the minute
    assert info.value.limit == "learned_output_tokens_per_minute"
    assert provider.state.count() == 2 and provider.state.count(429) == 0


async def test_the_learned_output_limit_moves_to_the_endpoint_it_came_from(provider: FakeProvider,
                                                                           clock: FakeClock) -> None:
    """Learned on the model while its calls all went to one endpoint; once a call goes to
    another, the limit, and the output tokens counted toward it, hold for the first endpoint
    only: it is still held to them, the other is not."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.completion_tokens = 3000
    for _ in range(3):  # learns 10,000 a minute; the 2nd and 3rd count 6,000
        provider.state.push(Scripted(status=200, headers=_anthropic_output_headers(10_000)))
        await litellm.acompletion(**_kw(provider, 3000))
    assert limiter.get_usage_stats()["providers"][MODEL]["learned_output_tokens_per_minute"] == 10_000
    with FakeProvider() as other:
        other.state.completion_tokens = 10
        await litellm.acompletion(**_kw(other, 5000))  # the split
        signals = limiter.get_usage_stats()["providers"]
        assert "learned_output_tokens_per_minute" not in signals[MODEL]
        port = provider.url.split(":")[2].split("/")[0]
        [endpoint] = [k for k in signals if k.startswith(f"key:anthropic/claude-sonnet-4-5@127.0.0.1:{port}#")]
        assert signals[endpoint]["learned_output_tokens_per_minute"] == 10_000
        await litellm.acompletion(**_kw(other, 5000))  # not held to the first endpoint's limit
        with pytest.raises(RateLimitQueueTimeout) as info:  # 6,000 + 5,000 > 10,000 there
            await litellm.acompletion(**_kw(provider, 5000))
        assert info.value.scope == endpoint
        assert provider.state.count() == 3 and other.state.count() == 2
