"""LiteLLM's SDK fallbacks (``completion(..., fallbacks=[...])``, no Router), the cases
tests/test_sdk_fallbacks.py leaves out: what the caller hears when the limiter refuses the tries,
the ``num_retries`` the caller asked for, a ``scope()`` identity on a thread that runs an event loop,
and an async stream that breaks off mid-way. Through real LiteLLM calls to the fake provider.

Was (f88b3e4): a refusal of the last try (RateLimitQueueTimeout, BudgetExceededError) reached the
caller as LiteLLM's bare ``Exception`` (sync: ``APIConnectionError``); the caller's ``num_retries``
was dropped (LiteLLM retries each try, the guard had set it to 0 and retried nothing); a sync call
made on a thread running an event loop lost its ``scope()`` identity (LiteLLM makes the tries on a
thread of its own); a try's stream cut off mid-way (LiteLLM 1.110: ``MidStreamFallbackError``) kept
its reservation until its lease ran out, unpaid."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import BudgetExceededError, RateLimitQueueTimeout
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import chat_kwargs, global_usage, make_limiter
from .test_sdk_fallbacks import BIG, PRICES, SMALL, fallbacks_kwargs, limiter_for, requests, sent, settled


async def call(sync: bool, **kwargs: Any) -> Any:
    """``completion`` (on a thread without an event loop) or ``acompletion``."""
    if sync:
        return await asyncio.to_thread(litellm.completion, **kwargs)
    return await litellm.acompletion(**kwargs)


# ------------------------------------------------------------------ the limiter's own refusals
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize("first", ["refused", "500"])
async def test_a_refused_last_try_raises_the_limiters_refusal(provider: FakeProvider, clock: FakeClock,
                                                              sync: bool, first: str) -> None:
    """The fallback model's limit used up (and the first model's, or the first model failing): the
    caller gets RateLimitQueueTimeout, as without fallbacks, not LiteLLM's bare ``Exception``
    with its text. Nothing is held afterwards; each request sent is counted once."""
    limiter = limiter_for(clock, small=1 if first == "refused" else 5, big=1)
    if first == "refused":
        await litellm.acompletion(**chat_kwargs(provider, model=f"openai/{SMALL}", max_tokens=5))
    else:
        provider.state.push_for(SMALL, Scripted(status=500))
    await litellm.acompletion(**chat_kwargs(provider, model=f"openai/{BIG}", max_tokens=5))
    await settled(limiter)
    with pytest.raises(RateLimitQueueTimeout) as info:
        await call(sync, **fallbacks_kwargs(provider))
    assert f"model:openai/{BIG}" in str(info.value)  # the last try's
    await settled(limiter)
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}
    assert global_usage(limiter)["in_flight"] == 0


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_fallbacks_over_budget_raise_budget_exceeded(provider: FakeProvider, clock: FakeClock,
                                                           sync: bool) -> None:
    """A budget that covers neither model: BudgetExceededError, as without fallbacks."""
    limiter = make_limiter(clock, {"pricing": PRICES, "state_path": ":memory:", "budget": {"max_daily_spend": 20},
                                   "global": {"requests_per_minute": 100}})
    await litellm.acompletion(**chat_kwargs(provider, model=f"openai/{SMALL}", max_tokens=5))  # 8 of 20 spent
    await settled(limiter)
    with pytest.raises(BudgetExceededError):
        await call(sync, **fallbacks_kwargs(provider))
    await settled(limiter)
    assert sent(provider) == [(SMALL, 200)]
    assert limiter.get_usage_stats()["cost_today"] == 8


# ------------------------------------------------------------------------------ num_retries
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_num_retries_retry_each_try_before_the_next_model(provider: FakeProvider, clock: FakeClock,
                                                                sync: bool) -> None:
    """``num_retries=1``: LiteLLM alone retries a try that fails with a 5xx once before going to the
    next model (1.83.4, 1.110.2); the guard takes those retries over, each one admitted and counted."""
    limiter = make_limiter(clock, {
        "pricing": PRICES, "state_path": ":memory:", "retry": {"base_delay": 0.001},
        "global": {"requests_per_minute": 100, "concurrent_requests": 1},
        "providers": {"openai": {SMALL: {"requests_per_minute": 5}, BIG: {"requests_per_minute": 5}}},
        "queue": {"max_wait_seconds": 0},
    })
    provider.state.push_for(SMALL, Scripted(status=500), Scripted(status=500))
    resp = await call(sync, **fallbacks_kwargs(provider), num_retries=1)
    assert resp.choices[0].message.content
    await settled(limiter)
    assert sent(provider) == [(SMALL, 500), (SMALL, 500), (BIG, 200)]
    assert requests(limiter) == {"global": 3, SMALL: 2, BIG: 1}
    assert limiter.get_usage_stats()["cost_today"] == 80


# --------------------------------------------------------------------------- scope() identity
async def test_sync_fallbacks_on_a_thread_running_a_loop_keep_the_scope(provider: FakeProvider,
                                                                        clock: FakeClock) -> None:
    """A sync call made where an event loop runs (a sync tool of an async agent, a notebook):
    LiteLLM makes the tries on a thread of its own; they still count against the ``scope()`` agent
    (its limits held nothing back: the call around the tries is not admitted)."""
    limiter = make_limiter(clock, {"pricing": PRICES, "state_path": ":memory:",
                                   "global": {"requests_per_minute": 100},
                                   "agents": {"*": {"requests_per_minute": 100}}})
    provider.state.push_for(SMALL, Scripted(status=500))
    with limiter.scope(agent_id="a1"):
        litellm.completion(**fallbacks_kwargs(provider))  # (this thread runs the test's loop)
    await settled(limiter)
    assert sent(provider) == [(SMALL, 500), (BIG, 200)]
    agents = limiter.get_usage_stats()["levels"].get("agent", {})
    assert agents.get("agent:a1", {}).get("requests_per_minute", {}).get("used") == 2
    assert limiter.get_usage_stats()["cost_today"] == 80


# ------------------------------------------------------------------------ a stream cut off
async def test_an_async_streamed_try_cut_off_is_settled_as_without_fallbacks(provider: FakeProvider,
                                                                             clock: FakeClock) -> None:
    """The provider closes a try's stream after two chunks: settled (its reservation given back,
    paid as the same stream without fallbacks is), not left to its lease. (LiteLLM 1.110.2 raises
    ``MidStreamFallbackError`` to the reader, whose failure event names the call, not the try;
    1.83.4 ends the stream quietly.)"""
    limiter = limiter_for(clock, small=5, big=5)
    paid = []
    for kwargs in (chat_kwargs(provider, model=f"openai/{SMALL}", max_tokens=5), fallbacks_kwargs(provider)):
        provider.state.push_for(SMALL, Scripted(status=200, cut_after=2))
        stream = await litellm.acompletion(**kwargs, stream=True)
        with contextlib.suppress(litellm.exceptions.MidStreamFallbackError):
            async for _ in stream:
                pass
        await settled(limiter)
        paid.append(limiter.get_usage_stats()["cost_today"] - sum(paid))
    assert sent(provider) == [(SMALL, 200), (SMALL, 200)]
    assert paid[1] == paid[0] > 0
    assert requests(limiter) == {"global": 2, SMALL: 2, BIG: 0}
