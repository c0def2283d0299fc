"""Session review (hostile pass) of: cache hits and LiteLLM's own refusals count nothing, SDK
fallbacks, batch identity, text-completion prompt batches, BackendUnavailableError not retried in
its group, and the micro-optimisations.

Bugs found (each test below fails without its fix):

* Redis backend, ``on_backend_error: open`` (calls admitted uncounted while Redis does not answer,
  their spend owed to Redis): a call that counts nothing (a LiteLLM cache hit, a refusal by
  LiteLLM's own ``max_budget``, a call cancelled before it was sent) still owed Redis one request,
  so each cache hit during an outage was a request in the spend Redis keeps (and in
  ``max_requests_per_run``). And LiteLLM's sends of such a call were noted nowhere
  (``RedisEngine.note_attempt`` passed them to the outage engine, which does not hold them):
  ``attempted()`` and ``progress()`` read 0 for a call that was sent (with the first fix alone, a
  call cancelled after its send would then owe nothing).
* A sync call with SDK fallbacks whose streamed try is cut off mid-way (LiteLLM raises
  ``MidStreamFallbackError`` to the reader, 1.83.4 and 1.110.2) kept the try's reservation, and its
  slot, until its lease ran out, unpaid till then: LiteLLM's failure event names the call around
  the try. (The session settled the async case only: ``settle_on_error`` read ``__anext__`` alone,
  and ``_fallbacks_sync`` did not set it.)
* A text completion of a chat model given a list of prompts (``prompt=["a", "b", "c"]``) is sent by
  LiteLLM as ONE chat request (one user message per prompt: one answer of up to ``max_tokens``);
  it reserved the output of every prompt, and a call that fits was refused as too large.
"""

from __future__ import annotations

import time
from typing import Any

import litellm
import pytest
from litellm.caching.caching import Cache

from hive_ratelimit_plugin import HiveLimiter, RequestTooLargeError
from hive_ratelimit_plugin._redis import RedisEngine
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .conftest import REDIS_URL
from .helpers import chat_kwargs, make_limiter, wait_until
from .test_redis_hostile import Switch, engine, nothing, sc, tk
from .test_sdk_fallbacks import SMALL, fallbacks_kwargs, limiter_for, sent

SECRET = "sk-test-SECRET-0123456789"
MODEL, EMBED = "gpt-4o-mini", "text-embedding-3-small"
# One unit of money per token.
PRICES = {MODEL: {"input_per_million": 1_000_000, "output_per_million": 1_000_000},
          EMBED: {"input_per_million": 1_000_000, "output_per_million": 0}}


# ------------------------------------------------- Redis, on_backend_error: open (engine level)
def test_a_void_call_admitted_uncounted_owes_redis_no_request(clock: FakeClock, redis_prefix: str) -> None:
    """Admitted uncounted while Redis does not answer, never sent (``outcome="void"``): Redis is
    owed nothing, as the in-memory engine books nothing. (Was: one request.)"""
    eng = engine(clock, redis_prefix, on_error="open")
    switch = Switch(eng)
    g = sc(requests_per_minute=100)
    switch.mode = "refuse"
    for n in range(3):
        assert eng.acquire(tk(n, g, cost=0.5, tin=10, tout=10), nothing) is None
        assert eng.release(str(n), input_tokens=0, output_tokens=0, cost=0.0, outcome="void")
    assert eng.acquire(tk("sent", g, cost=0.5, tin=10, tout=10), nothing) is None
    assert eng.release("sent", input_tokens=3, output_tokens=4, cost=0.25)
    switch.mode = None
    assert eng.flush_pending() == 0
    assert eng.spend("global", "day") == (pytest.approx(0.25), 1, 7)


def test_a_send_of_a_call_admitted_uncounted_is_noted(clock: FakeClock, redis_prefix: str) -> None:
    """LiteLLM reports sending a call admitted uncounted: ``attempted`` and ``progress`` say so (a
    failure of it may have been billed; a partial cache hit of it sent something)."""
    eng = engine(clock, redis_prefix, on_error="open")
    Switch(eng).mode = "refuse"
    assert eng.acquire(tk("a", sc(requests_per_minute=100)), nothing) is None
    assert not eng.attempted("a") and eng.progress("a") == 0
    eng.note_attempt("a")
    assert eng.attempted("a") and eng.progress("a") == 1


# ------------------------------------------ Redis, on_backend_error: open (through LiteLLM)
def open_limiter(clock: FakeClock, redis_prefix: str) -> tuple[HiveLimiter, Switch]:
    limiter = make_limiter(clock, {
        "pricing": PRICES, "state_path": ":memory:", "budget": {"max_daily_spend": 100_000},
        "global": {"requests_per_minute": 100, "tokens_per_minute": 100_000},
        "queue": {"max_wait_seconds": 0},
        "backend": REDIS_URL, "redis": {"key_prefix": redis_prefix, "on_backend_error": "open"},
    })
    assert isinstance(limiter._engine, RedisEngine)
    return limiter, Switch(limiter._engine)


def spent_today(limiter: HiveLimiter, clock: FakeClock) -> tuple[float, int, int]:
    """What Redis holds of today's spend (once it answers again: what was owed is written first)."""
    eng = limiter._engine
    assert isinstance(eng, RedisEngine)
    clock.advance(eng.retry_interval + 0.1)
    assert eng.flush_pending() == 0
    return eng.spend("global", "day")


async def test_cache_hits_while_redis_is_down_count_no_request(provider: FakeProvider, clock: FakeClock,
                                                               redis_prefix: str, litellm_cache: Cache) -> None:
    limiter, switch = open_limiter(clock, redis_prefix)
    kw = chat_kwargs(provider, messages=[{"role": "user", "content": "cache me"}], max_tokens=5, caching=True)
    await litellm.acompletion(**kw)
    await wait_until(lambda: not limiter._engine._leases and len(litellm_cache.cache.cache_dict) > 0)  # type: ignore[attr-defined]
    before = spent_today(limiter, clock)
    assert before[1] == 1
    switch.mode = "refuse"
    for _ in range(3):
        again = await litellm.acompletion(**kw)
        assert again._hidden_params.get("cache_hit") is True
    await wait_until(lambda: not limiter._engine._leases)
    switch.mode = None
    assert provider.state.count() == 1
    assert spent_today(limiter, clock) == before


# ------------------------------------------------ text completion of a chat model, prompt list
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_chat_models_text_completion_of_a_prompt_list_reserves_one_answer(
        mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """50 tokens a minute. LiteLLM sends ``text_completion(model="openai/gpt-4o-mini", prompt=[3
    prompts], max_tokens=20)`` as one chat request (three user messages, one answer of up to 20
    tokens): it fits, and is sent. (Was: refused as too large, 3 x 20 output tokens reserved.)
    Sent to a completions endpoint, the same prompts are three answers, and do not fit."""
    make_limiter(clock, {"state_path": ":memory:", "queue": {"max_wait_seconds": 0},
                         "global": {"requests_per_minute": 100, "tokens_per_minute": 50}})
    kw: dict[str, Any] = {"model": f"openai/{MODEL}", "prompt": ["first prompt", "second prompt", "third prompt"],
                          "max_tokens": 20, "api_base": provider.url, "api_key": SECRET, "max_retries": 0}
    if mode == "sync":
        litellm.text_completion(**kw)
    else:
        await litellm.atext_completion(**kw)
    assert provider.state.count() == 1
    # A provider LiteLLM sends text completions to a completions endpoint (the prompt list as it
    # is, each prompt answered): still every prompt's output, refused unsent.
    kw["model"] = "hosted_vllm/my-instruct-model"
    with pytest.raises(RequestTooLargeError):
        if mode == "sync":
            litellm.text_completion(**kw)
        else:
            await litellm.atext_completion(**kw)
    assert provider.state.count() == 1


# ------------------------------------------------------- sync SDK fallbacks, a stream cut off
def test_a_sync_streamed_try_cut_off_is_settled_as_without_fallbacks(provider: FakeProvider,
                                                                     clock: FakeClock) -> None:
    """The provider closes the stream after two chunks: with SDK fallbacks as without, the sync
    call's reservation is settled when the reader hears of it (paid as the same stream without
    fallbacks), not left to its lease."""
    limiter = limiter_for(clock, small=5, big=5)
    paid: list[float] = []
    for kwargs in (chat_kwargs(provider, model=f"openai/{SMALL}", max_tokens=5), fallbacks_kwargs(provider)):
        provider.state.push_for(SMALL, Scripted(status=200, cut_after=2))
        stream = litellm.completion(**kwargs, stream=True)
        with pytest.raises(litellm.exceptions.MidStreamFallbackError):
            for _ in stream:
                pass
        end = time.monotonic() + 5
        while limiter._engine._leases and time.monotonic() < end:
            time.sleep(0.005)
        assert not limiter._engine._leases
        paid.append(limiter.get_usage_stats()["cost_today"] - sum(paid))
    assert sent(provider) == [(SMALL, 200), (SMALL, 200)]
    assert paid[1] == paid[0] > 0
