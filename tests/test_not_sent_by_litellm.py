"""Calls LiteLLM answers or refuses without sending anything to the provider count no request,
no tokens and no money, and give their slot back:

* an answer from LiteLLM's own response cache (``litellm.cache`` and ``caching=True``). A partial
  hit (an embedding of some inputs not in the cache) sent the rest: it counts;
* a refusal by LiteLLM's own budget (``litellm.max_budget``), raised after the limiter admitted
  the call and before LiteLLM sends it.

Was: a cache hit was settled as a request sent, with its tokens and its cost (LiteLLM logs it as
a success like any other): an agent that re-asked a cached question used up its requests per
minute and its budget while the provider saw nothing. LiteLLM's budget refusal counted as a
request refused by the provider.

The limiter admits a call before LiteLLM looks in its cache, so a cache hit still needs room to be
admitted (and may wait for it); what it took is given back when it is answered."""

from __future__ import annotations

import asyncio
import collections.abc
import time
from typing import Any

import litellm
import pytest
from litellm.caching.caching import Cache

from hive_ratelimit_plugin import HiveLimiter, RateLimitQueueTimeout
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs, global_usage, make_limiter, wait_until

pytestmark = pytest.mark.usefixtures("contract_backend")

MODEL = "gpt-4o-mini"
# One unit of money per token: a call of chat_kwargs costs its total tokens.
PRICES = {MODEL: {"input_per_million": 1_000_000, "output_per_million": 1_000_000},
          "text-embedding-3-small": {"input_per_million": 1_000_000, "output_per_million": 0}}


def limiter_for(clock: FakeClock, rpm: int = 100) -> HiveLimiter:
    return make_limiter(clock, {
        "pricing": PRICES, "state_path": ":memory:", "budget": {"max_daily_spend": 100_000},
        "global": {"requests_per_minute": rpm, "tokens_per_minute": 100_000, "concurrent_requests": 1},
        "queue": {"max_wait_seconds": 0},
    })


def counted(limiter: HiveLimiter) -> tuple[float, float, float, int]:
    """Requests and tokens counted this minute, money spent today, calls in flight."""
    usage = global_usage(limiter)
    return (usage["requests_per_minute"]["used"], usage["tokens_per_minute"]["used"],
            limiter.get_usage_stats()["cost_today"], usage["in_flight"])


def stored(cache: Cache) -> int:
    """How many answers LiteLLM's cache holds (it writes them from its background logging)."""
    return len(cache.cache.cache_dict)  # type: ignore[attr-defined]


async def settled(limiter: HiveLimiter) -> None:
    await wait_until(lambda: not limiter._engine._leases and global_usage(limiter)["in_flight"] == 0)


def wait_sync(predicate: collections.abc.Callable[[], bool]) -> None:
    end = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


async def ask_async(provider: FakeProvider, stream: bool, content: str = "cache me") -> Any:
    kw = chat_kwargs(provider, messages=[{"role": "user", "content": content}], max_tokens=50, caching=True)
    if not stream:
        return await litellm.acompletion(**kw)
    response = await litellm.acompletion(**kw, stream=True, stream_options={"include_usage": True})
    async for _ in response:
        pass
    return response


def ask_sync(provider: FakeProvider, stream: bool, content: str = "cache me") -> Any:
    kw = chat_kwargs(provider, messages=[{"role": "user", "content": content}], max_tokens=50, caching=True)
    if not stream:
        return litellm.completion(**kw)
    response = litellm.completion(**kw, stream=True, stream_options={"include_usage": True})
    for _ in response:
        pass
    return response


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_async_cache_hit_counts_nothing(provider: FakeProvider, clock: FakeClock, litellm_cache: Cache,
                                              stream: bool) -> None:
    limiter = limiter_for(clock)
    await ask_async(provider, stream)
    await settled(limiter)
    await wait_until(lambda: stored(litellm_cache) > 0)
    first = counted(limiter)
    assert first[0] == 1 and first[1] > 0 and first[2] == first[1]

    again = await ask_async(provider, stream)
    await settled(limiter)
    assert provider.state.count() == 1, "the second call must be a cache hit"
    if not stream:
        assert again._hidden_params["cache_hit"] is True
    assert counted(limiter) == first


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_sync_cache_hit_counts_nothing(provider: FakeProvider, clock: FakeClock, litellm_cache: Cache,
                                       stream: bool) -> None:
    limiter = limiter_for(clock)
    ask_sync(provider, stream)
    wait_sync(lambda: stored(litellm_cache) > 0 and not limiter._engine._leases)
    first = counted(limiter)
    assert first[0] == 1 and first[1] > 0 and first[2] == first[1]

    ask_sync(provider, stream)
    wait_sync(lambda: not limiter._engine._leases)
    assert provider.state.count() == 1, "the second call must be a cache hit"
    assert counted(limiter) == first


async def test_a_cache_hit_leaves_its_request_to_the_next_call(provider: FakeProvider, clock: FakeClock,
                                                               litellm_cache: Cache) -> None:
    """Two requests a minute: a question, the same question (cached), a new question. The new one
    is admitted at once; it was refused when the cache hit counted as a request."""
    limiter = limiter_for(clock, rpm=2)
    await ask_async(provider, stream=False)
    await settled(limiter)
    await wait_until(lambda: stored(litellm_cache) > 0)
    await ask_async(provider, stream=False)
    await settled(limiter)
    await ask_async(provider, stream=False, content="something new")
    await settled(limiter)
    assert provider.state.count() == 2
    assert counted(limiter)[0] == 2
    with pytest.raises(RateLimitQueueTimeout):  # the limit itself still holds
        await ask_async(provider, stream=False, content="one more")


async def embed(provider: FakeProvider, inputs: list[str]) -> Any:
    return await litellm.aembedding(model="openai/text-embedding-3-small", api_base=provider.url,
                                    api_key="sk-test-SECRET-0123456789", input=inputs, caching=True)


async def test_embedding_cache_hits_whole_and_partial(provider: FakeProvider, clock: FakeClock,
                                                       litellm_cache: Cache) -> None:
    limiter = limiter_for(clock)
    await embed(provider, ["a", "b"])
    await settled(limiter)
    await wait_until(lambda: stored(litellm_cache) >= 2)
    first = counted(limiter)
    assert first[0] == 1

    await embed(provider, ["a", "b"])  # every input cached: nothing sent
    await settled(limiter)
    assert provider.state.count() == 1
    assert counted(limiter) == first

    await embed(provider, ["a", "b", "c"])  # "c" is not cached: LiteLLM sends it, and that counts
    await settled(limiter)
    assert provider.state.count() == 2
    assert counted(limiter)[0] == 2


async def test_concurrent_cache_hits_give_every_slot_back(provider: FakeProvider, clock: FakeClock,
                                                          litellm_cache: Cache) -> None:
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100, "concurrent_requests": 2},
                                   "queue": {"max_wait_seconds": 30}})
    await ask_async(provider, stream=False)
    await settled(limiter)
    await wait_until(lambda: stored(litellm_cache) > 0)
    await asyncio.gather(*(ask_async(provider, stream=False) for _ in range(10)))
    await settled(limiter)
    assert provider.state.count() == 1
    assert global_usage(limiter)["requests_per_minute"]["used"] == 1


@pytest.fixture
def litellm_budget_spent() -> collections.abc.Iterator[None]:
    """LiteLLM's own module-wide budget, already spent."""
    saved = litellm.max_budget, litellm._current_cost
    litellm.max_budget, litellm._current_cost = 0.001, 1.0
    try:
        yield
    finally:
        litellm.max_budget, litellm._current_cost = saved


@pytest.mark.usefixtures("litellm_budget_spent")
async def test_litellm_budget_refusal_counts_nothing(provider: FakeProvider, clock: FakeClock) -> None:
    limiter = limiter_for(clock, rpm=1)
    for _ in range(3):  # with one request a minute: each refusal gives its request back
        with pytest.raises(litellm.BudgetExceededError, match="Budget has been exceeded"):
            await litellm.acompletion(**chat_kwargs(provider))
    await settled(limiter)
    assert provider.state.count() == 0
    assert counted(limiter) == (0, 0, 0, 0)


@pytest.mark.usefixtures("litellm_budget_spent")
def test_sync_litellm_budget_refusal_counts_nothing(provider: FakeProvider, clock: FakeClock) -> None:
    limiter = limiter_for(clock, rpm=1)
    for _ in range(3):
        with pytest.raises(litellm.BudgetExceededError, match="Budget has been exceeded"):
            litellm.completion(**chat_kwargs(provider))
    wait_sync(lambda: not limiter._engine._leases)
    assert provider.state.count() == 0
    assert counted(limiter) == (0, 0, 0, 0)
