"""One model served by more than one endpoint (a Router's deployments of one model in two regions,
or under two accounts' keys): what a provider says is about the endpoint that said it.

Real LiteLLM calls against two fake providers; time is a FakeClock, moved only where a test says so.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter, RateLimitQueueTimeout
from hive_ratelimit_plugin.errors import CircuitOpenError
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import Ticker, chat_kwargs, wait_until, with_backend

# Contract: every test here runs against the in-memory and the Redis backend.
pytestmark = pytest.mark.usefixtures("contract_backend")

MODEL = "model:openai/gpt-4o-mini"


def make(clock: FakeClock, config: dict[str, Any] | None = None) -> HiveLimiter:
    limiter = HiveLimiter(with_backend(config or {}), clock=clock)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    return limiter


def call(p: FakeProvider, **extra: Any) -> Any:
    kw = chat_kwargs(p, **extra)
    kw.pop("max_retries", None)  # 429s are the limiter's to retry
    return litellm.acompletion(**kw)


def endpoint_of(limiter: HiveLimiter, p: FakeProvider) -> str:
    """The scope that holds the provider's signals for calls to ``p``."""
    port = p.url.split(":")[2].split("/")[0]
    prefix = f"key:openai/gpt-4o-mini@127.0.0.1:{port}#"
    found = [k for k in limiter.get_usage_stats()["providers"] if k.startswith(prefix)]
    assert len(found) == 1, limiter.get_usage_stats()["providers"]
    return found[0]


@pytest.mark.parametrize("refusing_first", [False, True], ids=["healthy-first", "refusing-first"])
async def test_a_429_from_one_endpoint_does_not_hold_the_models_other_endpoint(
        refusing_first: bool, provider: FakeProvider, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """A 429 (retry after 30 s) from one endpoint of a model cools that endpoint only: a call to
    the model's other endpoint goes at once, while the refused call waits out its 30 s. (Before,
    the cooldown was the model's, and held every call to it, whichever endpoint it went to.)
    refusing-first: the refusing endpoint is the first the model was seen at, so its 429 cools
    the model's scope; the call to the second endpoint moves that cooldown to the first, and the
    refused call, waiting in the queue, waits for its own endpoint from then on."""
    caplog.set_level(logging.DEBUG, logger="hive_ratelimit_plugin")
    limiter = make(clock)
    start = clock()
    with FakeProvider() as other:
        if not refusing_first:
            await call(provider)
        other.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        refused = asyncio.create_task(call(other))
        await wait_until(lambda: other.state.count(429) == 1 and limiter._engine.queue_length == 1)
        await asyncio.wait_for(call(provider), 20)  # (no fake time passes: it must not wait)
        assert provider.state.count() == (1 if refusing_first else 2) and not refused.done()
        signals = limiter.get_usage_stats()["providers"]
        cooling = {k for k, v in signals.items() if "cooldown_seconds" in v}
        assert cooling == {endpoint_of(limiter, other)}
        assert signals[endpoint_of(limiter, other)]["cooldown_seconds"] == pytest.approx(30, abs=0.5)
        with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0):
            await asyncio.wait_for(refused, 30)
        assert other.state.count() == 2 and clock() - start >= 30.0  # (its retry waited the 30 s)
    text = repr(limiter.get_usage_stats()) + " ".join(r.getMessage() for r in caplog.records)
    assert "sk-test-SECRET" not in text  # (an endpoint is named by a digest of its key, never the key)


async def test_one_endpoints_failures_open_its_breaker_only(provider: FakeProvider, clock: FakeClock) -> None:
    """Consecutive 5xx from one endpoint open that endpoint's circuit breaker: its calls fail fast
    while the model's other endpoint goes on."""
    limiter = make(clock, {"circuit_breaker": {"failure_threshold": 2, "cooldown_seconds": 30},
                           "queue": {"max_wait_seconds": 5}})
    with FakeProvider() as other:
        await call(provider)
        other.state.push(Scripted(status=500), Scripted(status=500))
        for _ in range(2):
            with pytest.raises(litellm.InternalServerError):
                await call(other)
        with pytest.raises(CircuitOpenError):
            await call(other)
        assert other.state.count() == 2  # nothing sent while open
        await call(provider)
        signals = limiter.get_usage_stats()["providers"]
        assert signals[endpoint_of(limiter, other)]["circuit"] == "open"
        assert signals[MODEL]["circuit"] == "closed"
        assert signals[endpoint_of(limiter, provider)]["circuit"] == "closed"


async def test_what_the_model_learned_moves_to_the_endpoint_it_came_from(
        provider: FakeProvider, clock: FakeClock) -> None:
    """While a model's calls all go to one endpoint, its limits are learned on the model's scope;
    once a call goes to another endpoint, what was learned holds for the first endpoint only:
    the second is not held to the first one's limit, the first still is."""
    limiter = make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.requests_per_window = 2  # the first endpoint allows 2 a minute, and says so
    with FakeProvider() as other:
        await call(provider)
        assert limiter.get_usage_stats()["providers"][MODEL]["learned_requests_per_minute"] == 2
        for _ in range(4):  # the other endpoint: not held to the first one's 2 a minute
            await call(other)
        signals = limiter.get_usage_stats()["providers"]
        assert "learned_requests_per_minute" not in signals[MODEL]
        assert signals[endpoint_of(limiter, provider)]["learned_requests_per_minute"] == 2
        await call(provider)
        with pytest.raises(RateLimitQueueTimeout) as info:  # the first endpoint is still held to it
            await call(provider)
        assert info.value.scope == endpoint_of(limiter, provider)
        assert provider.state.count(429) == 0 and other.state.count() == 4


async def test_a_routers_deployments_of_one_model_keep_their_own_cooldowns(
        provider: FakeProvider, clock: FakeClock) -> None:
    """Through a Router whose two deployments serve one model: while one deployment's 429 is waited
    out, the Router's calls that go to the other deployment are sent at once."""
    limiter = make(clock)
    with FakeProvider() as other:
        router = litellm.Router(model_list=[
            {"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": p.url,
                                                     "api_key": f"sk-test-{i}"}}
            for i, p in enumerate((provider, other))], num_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        other.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        start = clock()
        first: list[asyncio.Task[Any]] = []
        while other.state.count(429) == 0:  # until the Router has sent one to the refusing deployment
            first.append(asyncio.create_task(router.acompletion(model="gpt", messages=messages)))
            await asyncio.wait({first[-1]}, timeout=1.0)
            assert len(first) < 40
        await wait_until(lambda: limiter._engine.queue_length >= 1)
        sent = provider.state.count()
        later = [asyncio.create_task(router.acompletion(model="gpt", messages=messages)) for _ in range(12)]
        await wait_until(lambda: provider.state.count() > sent, timeout=20)  # (no fake time passes)
        assert clock() == start
        with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0):
            await asyncio.wait_for(asyncio.gather(*first, *later), 60)
        assert other.state.count(429) == 1
