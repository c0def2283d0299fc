"""A Router call refused by the limiter (its queue wait ran out, an open circuit) is not retried
by the Router in the same model group, and still falls back to another group.

Before, the Router retried ``RateLimitQueueTimeout`` like any error without a status code: with
its ``num_retries`` (2 by default) each retry waited ``max_wait_seconds`` again, and its caller
heard back after three waits plus the Router's backoff.

Real Routers against the fake provider; time is a FakeClock, moved by a Ticker only while a call
waits in the queue. Counts are asserted, never elapsed time.
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import CircuitOpenError, HiveLimiter, RateLimitQueueTimeout
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import Ticker, chat_kwargs, make_limiter

# Contract: every test here runs against the in-memory and the Redis backend.
pytestmark = pytest.mark.usefixtures("contract_backend")

MESSAGES = [{"role": "user", "content": "hello there"}]
KEY = "sk-test-SECRET-0123456789"


def deployment(group: str, model: str, p: FakeProvider, key: str = KEY) -> dict[str, Any]:
    return {"model_name": group, "litellm_params": {"model": model, "api_base": p.url, "api_key": key}}


def refusals(limiter: HiveLimiter, monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Every refusal of the limiter (a call it did not send), in order."""
    seen: list[BaseException] = []
    not_sent = limiter._not_sent

    def spy(kwargs: Any, exc: Any, agent: Any = None) -> None:
        seen.append(exc)
        not_sent(kwargs, exc, agent)

    monkeypatch.setattr(limiter, "_not_sent", spy)
    return seen


def cooldowns(router: litellm.Router) -> list[str]:
    """Deployments the Router has put in its cooldown, and those in it now (its own cache, read the
    same way on LiteLLM 1.83.4 and 1.110.2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (1.110: use Router.health())
        return [model_id for model_id, _ in router.cooldown_cache.get_active_cooldowns(router.get_model_ids(), None)]


def watch_cooldowns(router: litellm.Router) -> list[str]:
    added: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cache = router.cooldown_cache
    add = cache.add_deployment_to_cooldown

    def spy(*args: Any, **kwargs: Any) -> Any:
        added.append(kwargs.get("model_id", args[0] if args else None))
        return add(*args, **kwargs)

    cache.add_deployment_to_cooldown = spy
    return added


async def call(router: litellm.Router, mode: str, **kwargs: Any) -> Any:
    if mode == "sync":
        return await asyncio.to_thread(router.completion, messages=MESSAGES, **kwargs)
    return await router.acompletion(messages=MESSAGES, **kwargs)


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_router_does_not_retry_a_call_that_waited_out_the_queue(
        mode: str, provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """``num_retries=2``, two deployments: the call waits ``max_wait_seconds`` once, and its caller
    gets ``RateLimitQueueTimeout`` with ``retry_after``; no request is sent, and neither
    deployment is put in the Router's cooldown (the wait was the limiter's, not the provider's)."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 10}})
    with FakeProvider() as other:
        router = litellm.Router(model_list=[deployment("gpt", "openai/gpt-4o", provider),
                                            deployment("gpt", "openai/gpt-4o", other, "sk-test-OTHER-0123456789")],
                                num_retries=2, retry_after=0)
        added = watch_cooldowns(router)
        await call(router, mode, model="gpt")
        sent = provider.state.count() + other.state.count()
        assert sent == 1
        refused = refusals(limiter, monkeypatch)
        with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0), \
                pytest.raises(RateLimitQueueTimeout) as info:
            await asyncio.wait_for(call(router, mode, model="gpt"), 60)
        assert [type(e) for e in refused] == [RateLimitQueueTimeout]  # queued and timed out once
        assert "after waiting 10" in str(info.value)
        assert info.value.retry_after is not None and 0 < info.value.retry_after <= 61
        assert provider.state.count() + other.state.count() == sent  # nothing sent
        assert added == [] and cooldowns(router) == []


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_queue_timeout_still_falls_back_to_another_group(
        mode: str, provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """gpt-4o waits out its queue once; the Router then falls back to the cheaper group, which has
    room and is sent at once."""
    limiter = make_limiter(clock, {"providers": {"openai": {"gpt-4o": {"requests_per_minute": 1}}},
                                   "queue": {"max_wait_seconds": 10}})
    with FakeProvider() as cheap:
        router = litellm.Router(model_list=[deployment("gpt", "openai/gpt-4o", provider),
                                            deployment("cheap", "openai/gpt-4o-mini", cheap)],
                                num_retries=2, retry_after=0, fallbacks=[{"gpt": ["cheap"]}])
        added = watch_cooldowns(router)
        await call(router, mode, model="gpt")
        assert provider.state.count() == 1
        refused = refusals(limiter, monkeypatch)
        with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0):
            response = await asyncio.wait_for(call(router, mode, model="gpt"), 60)
        assert response.choices[0].message.content
        assert [type(e) for e in refused] == [RateLimitQueueTimeout]
        assert provider.state.count() == 1 and cheap.state.count() == 1  # the fallback was sent
        assert added == [] and cooldowns(router) == []


async def test_when_the_fallback_waits_out_its_queue_too_the_caller_gets_the_queue_timeout(
        provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both groups full: each waits once (the fallback gets its own wait), nothing is retried, and
    the caller gets ``RateLimitQueueTimeout`` with ``retry_after``."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 10}})
    router = litellm.Router(model_list=[deployment("gpt", "openai/gpt-4o", provider),
                                        deployment("cheap", "openai/gpt-4o-mini", provider)],
                            num_retries=2, retry_after=0, fallbacks=[{"gpt": ["cheap"]}])
    added = watch_cooldowns(router)
    await router.acompletion(model="gpt", messages=MESSAGES)
    refused = refusals(limiter, monkeypatch)
    with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0), \
            pytest.raises(RateLimitQueueTimeout) as info:
        await asyncio.wait_for(router.acompletion(model="gpt", messages=MESSAGES), 60)
    assert [type(e) for e in refused] == [RateLimitQueueTimeout] * 2  # gpt once, then cheap once
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 61
    assert provider.state.count() == 1
    assert added == [] and cooldowns(router) == []


@pytest.mark.parametrize("fallback", [True, False], ids=["fallback", "no-fallback"])
async def test_an_open_circuit_is_not_retried_in_its_group(
        fallback: bool, provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's circuit is open: the Router call is refused once (not again after the Router's
    backoff), and falls back to the other group when it has one."""
    limiter = make_limiter(clock, {"circuit_breaker": {"failure_threshold": 1, "cooldown_seconds": 30},
                                   "queue": {"max_wait_seconds": 5}})
    provider.state.push(Scripted(status=500))
    with pytest.raises(litellm.InternalServerError):
        await litellm.acompletion(**chat_kwargs(provider, model="openai/gpt-4o"))
    with FakeProvider() as cheap:
        router = litellm.Router(model_list=[deployment("gpt", "openai/gpt-4o", provider),
                                            deployment("cheap", "openai/gpt-4o-mini", cheap)],
                                num_retries=2, retry_after=0, fallbacks=[{"gpt": ["cheap"]}] if fallback else [])
        added = watch_cooldowns(router)
        refused = refusals(limiter, monkeypatch)
        if fallback:
            await router.acompletion(model="gpt", messages=MESSAGES)
            assert cheap.state.count() == 1
        else:
            with pytest.raises(CircuitOpenError) as info:
                await router.acompletion(model="gpt", messages=MESSAGES)
            assert info.value.retry_after == pytest.approx(30, abs=0.5)
        assert [type(e) for e in refused] == [CircuitOpenError]
        assert provider.state.count() == 1  # the 500 only
        assert added == [] and cooldowns(router) == []
