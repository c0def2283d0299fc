"""LiteLLM entry points and options off the main path, through LiteLLM's real transports against
the fake provider: every request the provider receives is counted once, at the usage it reports,
nothing is left in flight or leased, and the limits hold.

Bugs found by this hostile pass (each test below fails without its fix):

* ``litellm.batch_completion`` / ``batch_completion_models`` /
  ``batch_completion_models_all_responses`` make their calls on the threads of a pool of their
  own, which do not carry context variables: inside ``limiter.scope(agent_id=...)`` (or a Hive
  agent) the calls were counted against no agent, user, team or run, so their limits and budgets
  did not hold (an agent limited to one request a minute sent four).
* A text completion given a batch of prompts (``prompt=["a", "b", "c"]``, one request: the
  provider answers each prompt with ``n`` completions of up to ``max_tokens``) reserved the output
  of one prompt: a call that could use three times a token limit was sent.

* An async call answered from LiteLLM's cache (``caching=True``) gave back what it took only from
  LiteLLM's logging worker: under ``asyncio.run(...)`` (a loop closed at once) never, so the hit
  held its concurrency slot and its request until its lease ran out (``lease_seconds``, 300 s),
  and on a running loop still after it returned (the next call, under ``max_wait_seconds: 0``, was
  refused though the provider had seen one request; a Router's too).

Pinned, verified correct and covered nowhere else in tests/: a Router's
``abatch_completion_fastest_response`` (the call it cancels in flight is released at once and
charged its reservation) and a Router call cancelled while it waits in the queue
(``asyncio.wait_for``: it leaves the queue, sends and counts nothing).
"""

from __future__ import annotations

import asyncio
import collections.abc
import time
from typing import Any

import litellm
import pytest
from litellm.caching.caching import Cache

from hive_ratelimit_plugin import HiveLimiter, RateLimitQueueTimeout, RequestTooLargeError
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import chat_kwargs, global_usage, make_limiter, wait_until

pytestmark = pytest.mark.usefixtures("contract_backend")

SECRET = "sk-test-SECRET-0123456789"
SMALL, BIG, TEXT = "gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo-instruct"
# One unit of money per token: a call costs its total tokens.
PRICES = {m: {"input_per_million": 1_000_000, "output_per_million": 1_000_000} for m in (SMALL, BIG, TEXT)}


def limiter_for(clock: FakeClock, **extra: Any) -> HiveLimiter:
    config: dict[str, Any] = {
        "pricing": PRICES, "state_path": ":memory:", "budget": {"max_daily_spend": 100_000},
        "global": {"requests_per_minute": 100, "tokens_per_minute": 100_000, "concurrent_requests": 4},
        "queue": {"max_wait_seconds": 0},
    }
    config.update(extra)
    return make_limiter(clock, config)


def counted(limiter: HiveLimiter) -> tuple[float, float, float]:
    """Requests and tokens counted this minute (globally), money spent today."""
    usage = global_usage(limiter)
    return (usage["requests_per_minute"]["used"], usage["tokens_per_minute"]["used"],
            limiter.get_usage_stats()["cost_today"])


def agent_requests(limiter: HiveLimiter) -> dict[str, float]:
    agents = limiter.get_usage_stats()["levels"].get("agent", {})
    return {key: scope["requests_per_minute"]["used"] for key, scope in agents.items()}


def provider_usage(provider: FakeProvider) -> tuple[int, int]:
    """Requests the provider received, and the tokens it billed."""
    log = list(provider.state.log)
    return len(log), sum(r.prompt_tokens + r.completion_tokens for r in log if r.status == 200)


def idle(limiter: HiveLimiter) -> bool:
    return not limiter._engine._leases and global_usage(limiter)["in_flight"] == 0


def settled_sync(limiter: HiveLimiter) -> None:
    end = time.monotonic() + 10
    while not idle(limiter):
        assert time.monotonic() < end, "the limiter still holds a call"
        time.sleep(0.005)


def assert_books_match(limiter: HiveLimiter, provider: FakeProvider) -> None:
    """Every request the provider received counted once, at the tokens and cost it billed."""
    sent, tokens = provider_usage(provider)
    assert counted(limiter) == (sent, tokens, tokens)
    assert idle(limiter)
    assert limiter.get_usage_stats()["queued"] == 0


# ------------------------------------------------------------------ batch_completion + scope
def _batch(provider: FakeProvider) -> list[Any]:
    kw = chat_kwargs(provider, max_tokens=5)
    del kw["messages"]
    return litellm.batch_completion(messages=[[{"role": "user", "content": f"question {i}"}] for i in range(4)],
                                    **kw)


def _batch_models(provider: FakeProvider) -> list[Any]:
    kw = chat_kwargs(provider, max_tokens=5)
    del kw["model"]
    models = [f"openai/{SMALL}", f"openai/{BIG}", f"openai/{SMALL}", f"openai/{BIG}"]
    try:
        return [litellm.batch_completion_models(models=models, **kw)]
    except RateLimitQueueTimeout as exc:  # (it raises the first model's error)
        return [exc]


def _batch_all(provider: FakeProvider) -> list[Any]:
    kw = chat_kwargs(provider, max_tokens=5)
    del kw["model"]
    return list(litellm.batch_completion_models_all_responses(
        models=[f"openai/{SMALL}", f"openai/{BIG}", f"openai/{SMALL}", f"openai/{BIG}"], **kw))


BATCHES: dict[str, collections.abc.Callable[[FakeProvider], list[Any]]] = {
    "batch_completion": _batch, "batch_completion_models": _batch_models,
    "batch_completion_models_all_responses": _batch_all}


@pytest.mark.parametrize("entry", list(BATCHES))
def test_a_batch_made_inside_a_scope_counts_against_its_agent(entry: str, provider: FakeProvider,
                                                              clock: FakeClock) -> None:
    """An agent allowed one request a minute makes a batch of four calls inside
    ``limiter.scope(agent_id=...)``: one is sent, the others are refused unsent. (Was: all four
    sent, none counted against the agent: LiteLLM's pool threads do not carry the scope.)"""
    limiter = limiter_for(clock, agents={"researcher": {"requests_per_minute": 1}})
    with limiter.scope(agent_id="researcher"):
        BATCHES[entry](provider)
    settled_sync(limiter)
    assert provider.state.count() == 1
    assert agent_requests(limiter) == {"agent:researcher": 1}
    assert_books_match(limiter, provider)


def test_a_batch_keeps_the_identity_its_metadata_gives(provider: FakeProvider, clock: FakeClock) -> None:
    """Metadata wins over the scope, field by field, and the caller's dict is left as it was."""
    limiter = limiter_for(clock, agents={"*": {"requests_per_minute": 10}},
                          teams={"*": {"requests_per_minute": 10}})
    metadata = {"agent_id": "writer"}
    kw = chat_kwargs(provider, max_tokens=5, metadata=metadata)
    del kw["messages"]
    with limiter.scope(agent_id="researcher", team_id="growth"):
        results = litellm.batch_completion(messages=[[{"role": "user", "content": "a"}],
                                                     [{"role": "user", "content": "b"}]], **kw)
    assert all(isinstance(r, litellm.ModelResponse) for r in results)
    settled_sync(limiter)
    assert metadata == {"agent_id": "writer"}
    levels = limiter.get_usage_stats()["levels"]
    assert {k: v["requests_per_minute"]["used"] for k, v in levels["agent"].items()} == {"agent:writer": 2}
    assert {k: v["requests_per_minute"]["used"] for k, v in levels["team"].items()} == {"team:growth": 2}
    assert_books_match(limiter, provider)


# --------------------------------------------------------------- text completion, prompt batch
def _text(provider: FakeProvider, prompt: Any, **extra: Any) -> dict[str, Any]:
    return {"model": f"openai/{TEXT}", "prompt": prompt, "api_base": provider.url, "api_key": SECRET,
            "max_retries": 0, **extra}


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_batch_of_prompts_reserves_the_output_of_every_prompt(mode: str, provider: FakeProvider,
                                                                     clock: FakeClock) -> None:
    """50 tokens a minute. One prompt with ``max_tokens=20`` fits (about 25 tokens); three prompts in
    one request may produce 60 output tokens: it can never fit, and is refused unsent. (Was: it
    reserved one prompt's output and was sent.)"""
    limiter = limiter_for(clock, **{"global": {"requests_per_minute": 100, "tokens_per_minute": 50}})

    async def call(**kw: Any) -> Any:
        if mode == "sync":
            return litellm.text_completion(**kw)
        return await litellm.atext_completion(**kw)

    with pytest.raises(RequestTooLargeError):
        await call(**_text(provider, ["first prompt", "second prompt", "third prompt"], max_tokens=20))
    with pytest.raises(RequestTooLargeError):  # n=2 of two prompts: 80
        await call(**_text(provider, ["first prompt", "second prompt"], max_tokens=20, n=2))
    assert provider.state.count() == 0
    await call(**_text(provider, "first prompt", max_tokens=20))  # one prompt: fits
    await call(**_text(provider, [1, 2, 3, 4], max_tokens=20))  # token ids: one prompt too
    await wait_until(lambda: idle(limiter))
    assert provider.state.count() == 2
    assert_books_match(limiter, provider)


# ---------------------------------------------------------------------------- Router: pinned
def _router(provider: FakeProvider, **extra: Any) -> litellm.Router:
    return litellm.Router(model_list=[
        {"model_name": "small", "litellm_params": {"model": f"openai/{SMALL}", "api_base": provider.url,
                                                   "api_key": SECRET}},
        {"model_name": "big", "litellm_params": {"model": f"openai/{BIG}", "api_base": provider.url,
                                                 "api_key": SECRET}},
    ], num_retries=0, **extra)


async def test_a_routers_fastest_response_settles_the_calls_it_cancels(provider: FakeProvider,
                                                                      clock: FakeClock) -> None:
    """``abatch_completion_fastest_response`` sends to both groups and cancels the slower call once
    the first answers. The cancelled call was sent (the provider may bill it): it counts one
    request at its reservation, and gives its slot back at once."""
    limiter = limiter_for(clock, agents={"*": {"requests_per_minute": 10}})
    provider.state.push_for(BIG, Scripted(status=200, delay=1.0))
    router = _router(provider)
    response = await router.abatch_completion_fastest_response(
        model="small, big", messages=[{"role": "user", "content": "hello there"}], max_tokens=5,
        metadata={"agent_id": "racer"})
    assert response.model == SMALL
    await wait_until(lambda: idle(limiter))
    assert agent_requests(limiter) == {"agent:racer": 2}
    requests, tokens, cost = counted(limiter)
    await wait_until(lambda: provider.state.in_flight == 0)
    sent, billed = provider_usage(provider)
    # Both count: LiteLLM had begun sending the slower one when it was cancelled. (On a loaded
    # machine its request may not have reached the provider yet: counted all the same, to be safe.)
    assert requests == 2
    assert sent in (1, 2)
    assert tokens == cost > billed / 2  # the cancelled call at its reservation, not at 0


async def test_a_router_call_cancelled_while_it_waits_gives_back_its_place(provider: FakeProvider,
                                                                          clock: FakeClock) -> None:
    """One call at a time; a second Router call waits behind it and its caller gives up
    (``asyncio.wait_for``): it leaves the queue, sends nothing and counts nothing; the first call's
    slot then goes to the next caller."""
    limiter = limiter_for(clock, **{"global": {"requests_per_minute": 100, "tokens_per_minute": 100_000,
                                               "concurrent_requests": 1}, "queue": {"max_wait_seconds": 30}})
    router = _router(provider)
    messages = [{"role": "user", "content": "hello there"}]
    provider.state.latency = 0.5
    first = asyncio.create_task(router.acompletion(model="small", messages=messages, max_tokens=5))
    await wait_until(lambda: provider.state.in_flight == 1)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(router.acompletion(model="small", messages=messages, max_tokens=5,
                                                  metadata={"agent_id": "quitter"}), 0.1)
    assert limiter.get_usage_stats()["queued"] == 0
    await first
    provider.state.latency = 0.0
    await asyncio.wait_for(router.acompletion(model="small", messages=messages, max_tokens=5), 10)
    await wait_until(lambda: idle(limiter))
    assert provider.state.count() == 2
    assert agent_requests(limiter) == {}
    assert_books_match(limiter, provider)


async def test_a_routers_cache_hit_counts_nothing(provider: FakeProvider, clock: FakeClock,
                                                  litellm_cache: Cache) -> None:
    """Router calls with ``caching=True`` answered from LiteLLM's cache sent nothing: async and
    sync, they count no request, no tokens and no money, and hold nothing once they return (each
    needs room when it starts: three requests a minute, no waiting)."""
    limiter = limiter_for(clock, **{"global": {"requests_per_minute": 3, "tokens_per_minute": 100_000}})
    router = _router(provider)
    kw: dict[str, Any] = {"model": "small", "max_tokens": 5, "caching": True}
    first = [{"role": "user", "content": "cache me"}]
    second = [{"role": "user", "content": "and me"}]
    await router.acompletion(messages=first, **kw)
    router.completion(messages=second, **kw)
    await wait_until(lambda: idle(limiter) and len(litellm_cache.cache.cache_dict) >= 2)  # type: ignore[attr-defined]
    before = counted(limiter)
    for _ in range(3):
        again = await router.acompletion(messages=first, **kw)
        assert again._hidden_params.get("cache_hit") is True
        again = router.completion(messages=second, **kw)
        assert again._hidden_params.get("cache_hit") is True
    await wait_until(lambda: idle(limiter))
    assert counted(limiter) == before
    assert_books_match(limiter, provider)
    # the limit still holds: one request left this minute
    await router.acompletion(messages=[{"role": "user", "content": "new"}], **kw)
    with pytest.raises(RateLimitQueueTimeout):
        await router.acompletion(messages=[{"role": "user", "content": "newer"}], **kw)
    await wait_until(lambda: idle(limiter))
    assert provider.state.count() == 3

def test_an_async_cache_hit_under_asyncio_run_gives_its_slot_back(provider: FakeProvider, clock: FakeClock,
                                                                  litellm_cache: Cache) -> None:
    """One call at a time, no waiting: a question, the same question (a cache hit), a new question,
    each in ``asyncio.run``. The hit holds nothing once it returns. (Was: its slot and request were
    held until its lease ran out, and the new question was refused.)"""
    limiter = limiter_for(clock, **{"global": {"requests_per_minute": 2, "tokens_per_minute": 100_000,
                                               "concurrent_requests": 1}})
    kw = chat_kwargs(provider, messages=[{"role": "user", "content": "cache me"}], max_tokens=5, caching=True)
    asyncio.run(litellm.acompletion(**kw))
    settled_sync(limiter)
    assert len(litellm_cache.cache.cache_dict) == 1  # type: ignore[attr-defined]
    for _ in range(3):
        again = asyncio.run(litellm.acompletion(**kw))
        assert again._hidden_params.get("cache_hit") is True
        assert idle(limiter)
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    settled_sync(limiter)
    assert provider.state.count() == 2
    assert_books_match(limiter, provider)
