"""A call made inside another call's pre-call hook (an LLM judge), registered before or after the
limiter; streams collected unclosed; a learned token limit under another spelling of its model.
Memory backend, real LiteLLM calls against the fake provider."""
from __future__ import annotations

import asyncio
import gc
from typing import Any

import litellm
import pytest
from litellm.integrations.custom_logger import CustomLogger

from hive_ratelimit_plugin import HiveLimiter, plugin
from hive_ratelimit_plugin.fake_provider import Scripted
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs, wait_until
from .test_exit_paths import g, make, small


def _with_judge(judge_first: bool, provider: FakeProvider, clock: FakeClock,
                config: dict[str, Any]) -> HiveLimiter:
    """A limiter and an LLM judge (a callback whose pre-call hook makes a LiteLLM call of its own),
    the judge registered before or after the limiter."""
    class Judge(CustomLogger):
        async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> None:
            if not (kwargs.get("metadata") or {}).get("judge"):
                await litellm.acompletion(**small(provider, metadata={"judge": True}))
            return None

    judge = Judge()
    if judge_first:
        litellm.callbacks.append(judge)
    limiter = make(clock, config)
    if not judge_first:
        litellm.callbacks.append(judge)
    return limiter


@pytest.mark.parametrize("judge_first", [False, True], ids=["limiter-first", "judge-first"])
async def test_outer_call_refused_with_500_counts_nothing(judge_first: bool, provider: FakeProvider,
                                                          clock: FakeClock) -> None:
    """The outer call is refused by the provider (500): $0, as without a judge, whichever of the
    two is registered first."""
    limiter = _with_judge(judge_first, provider, clock, {})
    provider.state.push(Scripted(status=200), Scripted(status=500))
    with pytest.raises(litellm.InternalServerError):
        await litellm.acompletion(**small(provider))
    assert [r.status for r in provider.state.log] == [200, 500]
    assert limiter.get_usage_stats()["cost_today"] == 8  # the judge's call only


@pytest.mark.parametrize("judge_first", [False, True], ids=["limiter-first", "judge-first"])
async def test_outer_stream_dropped_unclosed_with_a_judge(judge_first: bool, provider: FakeProvider,
                                                         clock: FakeClock) -> None:
    """An outer stream dropped unclosed gives its slot back once collected, whichever is registered
    first (a first version keyed the stream's leases to the judge's settled id when the judge's hook
    ran last, and the outer stream's slot stayed held)."""
    limiter = _with_judge(judge_first, provider, clock,
                          {"global": {"concurrent_requests": 2}, "queue": {"max_wait_seconds": 0}})
    provider.state.completion_tokens = 20

    async def read_one_chunk() -> None:
        async for _ in await litellm.acompletion(**chat_kwargs(provider, stream=True, max_tokens=30)):
            break

    await read_one_chunk()
    gc.collect()
    # (freed by the hive-ratelimit-streams thread: a bounded wait, not a fixed sleep)
    await wait_until(lambda: g(limiter)["in_flight"] == 0)


async def test_a_collected_stream_frees_a_later_call_under_the_same_id(provider: FakeProvider, clock: FakeClock,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Stream 1 under the caller's id 'trace-1' is read to its end and kept referenced; two minutes
    later (the id reuse window, shortened here) call 2 reuses 'trace-1'. Stream 1's collection must
    not free call 2's slot while call 2 is on the wire (a first version did)."""
    monkeypatch.setattr(plugin, "_ID_REUSE_SECONDS", 0.0)  # (= two minutes have passed)
    limiter = make(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0}})
    s1 = await litellm.acompletion(**small(provider, stream=True, litellm_call_id="trace-1"))
    async for _ in s1:
        pass
    await asyncio.sleep(0.1)
    assert g(limiter)["in_flight"] == 0
    provider.state.latency = 0.5
    second = asyncio.ensure_future(litellm.acompletion(**small(provider, litellm_call_id="trace-1")))
    await wait_until(lambda: provider.state.in_flight == 1)
    assert g(limiter)["in_flight"] == 1
    del s1
    gc.collect()
    try:
        assert g(limiter)["in_flight"] == 1, "stream 1's finalizer freed call 2's slot"
    finally:
        await second


@pytest.mark.parametrize("judge_first", [False, True], ids=["limiter-first", "judge-first"])
async def test_outer_stream_read_past_its_lease_keeps_its_slot(judge_first: bool, provider: FakeProvider,
                                                              clock: FakeClock) -> None:
    """A stream read slowly keeps its slot by renewing its lease per chunk, whichever is registered
    first (a first version renewed the judge's settled id instead: the stream's lease ran out
    while it was being read)."""
    limiter = _with_judge(judge_first, provider, clock,
                          {"global": {"concurrent_requests": 2}, "estimation": {"lease_seconds": 30}})
    provider.state.completion_tokens = 20
    stream = await litellm.acompletion(**chat_kwargs(provider, stream=True, max_tokens=30))
    it = stream.__aiter__()
    for _ in range(4):
        await it.__anext__()
        clock.advance(20)  # a slow reader: 20 s between chunks, lease 30 s
        limiter._engine.dispatch()
    assert g(limiter)["in_flight"] == 1, "the stream being read lost its slot"
    await stream.aclose()


async def test_a_learned_token_limit_estimates_the_models_other_spelling(provider: FakeProvider, clock: FakeClock,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit learned from an 'openai/gpt-4o-mini' answer lives on the scope
    model:openai/gpt-4o-mini, which 'gpt-4o-mini' shares: those calls are estimated too (a first
    version keyed on the call's model string, and admitted them at 0 tokens)."""
    from .helpers import make_limiter
    limiter = make_limiter(clock, {})  # (no budget: only token limits make calls estimated)
    provider.state.push(Scripted(status=200, headers={"x-ratelimit-limit-tokens": "100",
                                                      "x-ratelimit-remaining-tokens": "90"}))
    await litellm.acompletion(**small(provider, model="openai/gpt-4o-mini"))
    assert limiter.get_usage_stats()["providers"]["model:openai/gpt-4o-mini"]["learned_tokens_per_minute"] == 100
    counted: list[Any] = []
    real = plugin.count_messages
    monkeypatch.setattr(plugin, "count_messages", lambda *a, **k: counted.append(a[0]) or real(*a, **k))
    limiter2_budgetless = litellm.acompletion(**small(provider, model="gpt-4o-mini", custom_llm_provider="openai"))
    await limiter2_budgetless
    assert counted, "a call under the learned 100-token limit was admitted at 0 tokens"
