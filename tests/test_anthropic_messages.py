"""Anthropic's messages API (``litellm.anthropic.messages.acreate``) through the limiter, against the
fake provider's ``/v1/messages`` (JSON and server-sent events): counted with its system prompt,
settled to the provider's usage, retried on a 429, released on cancellation, and a stream keeps its
slot while it is read. (LiteLLM implements no sync path for this API.)"""

from __future__ import annotations

import asyncio
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import RequestTooLargeError
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import (
    Ticker,
    assert_a_stream_being_read_keeps_its_slot,
    assert_cancelling_in_flight_frees_the_slot,
    chunk_reader,
    global_usage,
    make_limiter,
    wait_until,
)

# Contract: every test here runs against the in-memory and the Redis backend.
pytestmark = pytest.mark.usefixtures("contract_backend")

SECRET = "sk-ant-test-SECRET-0123456789"
SYSTEM = "You are a meticulous analyst. Answer with numbered steps and cite every figure. " * 20


def messages_kwargs(provider: FakeProvider, **extra: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"model": "anthropic/claude-sonnet-4-5", "max_tokens": 3000,
                          "messages": [{"role": "user", "content": "summarise the report"}],
                          "api_base": provider.root, "api_key": SECRET}
    kw.update(extra)
    return kw


async def _call(stream: bool, **kw: Any) -> None:
    if not stream:
        await litellm.anthropic.messages.acreate(**kw)
        return
    chunks = [c async for c in await litellm.anthropic.messages.acreate(**kw, stream=True)]
    assert chunks


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_messages_call_is_counted_and_settled_to_the_providers_usage(
        stream: bool, provider: FakeProvider, clock: FakeClock) -> None:
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100, "input_tokens_per_minute": 100000,
                                              "output_tokens_per_minute": 100000, "concurrent_requests": 1}})
    provider.state.completion_tokens = 7
    await _call(stream, **messages_kwargs(provider, system=SYSTEM))
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
    await wait_until(lambda: global_usage(limiter)["output_tokens_per_minute"]["used"] < 3000)  # not the estimate
    stats = global_usage(limiter)
    sent = provider.state.log[0]
    assert stats["input_tokens_per_minute"]["used"] == sent.prompt_tokens
    assert stats["output_tokens_per_minute"]["used"] == 7
    assert stats["requests_per_minute"]["used"] == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_the_system_prompt_is_part_of_the_estimate(stream: bool, provider: FakeProvider,
                                                         clock: FakeClock) -> None:
    """``system`` is a parameter of its own in this API: a long one alone can exceed the limit."""
    make_limiter(clock, {"global": {"input_tokens_per_minute": 300}})
    await _call(stream, **messages_kwargs(provider))  # the short message alone fits
    with pytest.raises(RequestTooLargeError, match="input_tokens_per_minute"):
        await _call(stream, **messages_kwargs(provider, system=SYSTEM))
    assert provider.state.count() == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_messages_429_is_retried_and_each_attempt_counted(stream: bool, provider: FakeProvider,
                                                                  clock: FakeClock) -> None:
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100}})
    provider.state.push(Scripted(status=429, headers={"retry-after-ms": "1"}))
    with Ticker(clock, step=0.01, when=lambda: limiter._engine.queue_length > 0):
        await _call(stream, **messages_kwargs(provider))
    assert [r.status for r in provider.state.log] == [429, 200]
    stats = limiter.get_usage_stats()
    assert stats["admitted_total"] == 2
    assert stats["levels"]["global"]["global"]["requests_per_minute"]["used"] == 2


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_messages_429s_retry_after_is_waited_out(stream: bool, provider: FakeProvider,
                                                         clock: FakeClock) -> None:
    """The retry waits the ``retry-after`` the 429 gave. (LiteLLM 1.83 raises the messages API's
    provider error unmapped, with its headers on the error itself: they were missed, and the
    retry went after a short backoff into another 429.)"""
    limiter = make_limiter(clock, {"queue": {"max_wait_seconds": 120}})
    provider.state.push(Scripted(status=429, headers={"retry-after": "20"}))
    call = asyncio.ensure_future(_call(stream, **messages_kwargs(provider)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    clock.advance(10)  # (moving the clock grants what fits at once: a retry let through would leave the queue)
    assert limiter.get_usage_stats()["queued"] == 1, "retried before the provider's retry-after"
    clock.advance(11)
    await asyncio.wait_for(call, 10)
    assert [r.status for r in provider.state.log] == [429, 200]


async def test_a_messages_stream_still_being_read_keeps_its_slot_past_the_lease(
        provider: FakeProvider, clock: FakeClock) -> None:
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0},
                                   "estimation": {"lease_seconds": 30}})
    provider.state.completion_tokens = 20
    provider.state.chunk_delay = 0.005  # events apart, as a model generates them (not read in one piece)
    read = chunk_reader(await litellm.anthropic.messages.acreate(**messages_kwargs(provider), stream=True),
                        sync=False)
    await assert_a_stream_being_read_keeps_its_slot(limiter, provider, clock, read)
    await litellm.anthropic.messages.acreate(**messages_kwargs(provider))  # the slot is back


async def test_cancelling_a_messages_call_in_flight_frees_its_slot(provider: FakeProvider,
                                                                   clock: FakeClock) -> None:
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0}})
    await assert_cancelling_in_flight_frees_the_slot(
        limiter, provider, lambda: litellm.anthropic.messages.acreate(**messages_kwargs(provider)))


async def test_a_routers_messages_call_is_retried_on_a_429_and_counted(provider: FakeProvider,
                                                                       clock: FakeClock) -> None:
    """``Router.aanthropic_messages`` (what the proxy's /v1/messages runs) goes through the guard."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100, "concurrent_requests": 1}})
    router = litellm.Router(model_list=[{"model_name": "claude", "litellm_params": {
        "model": "anthropic/claude-sonnet-4-5", "api_base": provider.root, "api_key": SECRET}}], num_retries=0)
    provider.state.push(Scripted(status=429, headers={"retry-after-ms": "1"}))
    with Ticker(clock, step=0.01, when=lambda: limiter._engine.queue_length > 0):
        await router.aanthropic_messages(model="claude", max_tokens=100,
                                         messages=[{"role": "user", "content": "hi"}])
    assert [r.status for r in provider.state.log] == [429, 200]
    assert limiter.get_usage_stats()["admitted_total"] == 2
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_prompt_cache_reads_are_settled_as_prompt_tokens(stream: bool, provider: FakeProvider,
                                                              clock: FakeClock) -> None:
    """Anthropic's ``input_tokens`` leave out the tokens read from (or written to) the prompt
    cache; the prompt the call sent, and was estimated at, includes them: settled as such in
    token limits, like LiteLLM's ``prompt_tokens`` for the same call through ``acompletion``. An
    input-token limit (Anthropic's ITPM) leaves the cache reads out, as Anthropic does."""
    limiter = make_limiter(clock, {"global": {"input_tokens_per_minute": 100000, "tokens_per_minute": 100000}})
    provider.state.cached_prompt_tokens = 200
    await _call(stream, **messages_kwargs(provider, system=SYSTEM))
    sent = provider.state.log[0]
    assert sent.prompt_tokens > 200
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
    await wait_until(lambda: global_usage(limiter)["tokens_per_minute"]["used"]
                     == sent.prompt_tokens + sent.completion_tokens)
    assert global_usage(limiter)["input_tokens_per_minute"]["used"] == sent.prompt_tokens - 200


async def test_the_same_question_under_different_system_prompts_is_not_a_loop(provider: FakeProvider,
                                                                             clock: FakeClock) -> None:
    """The runaway detector's fingerprint includes ``system``, a parameter of its own in this API."""
    limiter = make_limiter(clock, {"runaway": {"max_identical_requests": 3}})
    with limiter.scope(agent_id="writer"):
        for n in range(6):
            await litellm.anthropic.messages.acreate(**messages_kwargs(provider, system=f"You are reviewer {n}."))
        assert provider.state.count() == 6
        from hive_ratelimit_plugin.errors import HiveRateLimitError

        with pytest.raises(HiveRateLimitError, match="loop"):  # the same system prompt each time is one
            for _ in range(4):
                await litellm.anthropic.messages.acreate(**messages_kwargs(provider, system="You are reviewer 0."))


ANTHROPIC_LIMITS = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
                    "anthropic-ratelimit-input-tokens-limit": "3000",
                    "anthropic-ratelimit-input-tokens-remaining": "2990",
                    "anthropic-ratelimit-output-tokens-limit": "8000",
                    "anthropic-ratelimit-output-tokens-remaining": "7990"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_the_limits_in_a_messages_answers_headers_are_learned_and_held(
        stream: bool, provider: FakeProvider, clock: FakeClock) -> None:
    """LiteLLM answers the messages API with a plain dict (a stream: an assembled response) that
    carries no headers: Anthropic's ``anthropic-ratelimit-*`` headers are read from LiteLLM's
    logging details instead. The model then holds to the limits they give: a second ~2,000-token
    prompt in the minute waits under the learned 3,000 input tokens instead of collecting a 429."""
    limiter = make_limiter(clock, {"queue": {"max_wait_seconds": 120}})
    model = "model:anthropic/claude-sonnet-4-5"

    def learned() -> dict[str, Any]:
        return dict(limiter.get_usage_stats()["providers"].get(model, {}))

    provider.state.push(Scripted(status=200, headers=ANTHROPIC_LIMITS))
    await _call(stream, **messages_kwargs(provider, max_tokens=10))
    await wait_until(lambda: "learned_input_tokens_per_minute" in learned())
    assert learned()["learned_input_tokens_per_minute"] == 3000
    assert learned()["learned_requests_per_minute"] == 50
    prompt = [{"role": "user", "content": "word " * 2000}]
    provider.state.push(Scripted(status=200, headers=ANTHROPIC_LIMITS))
    await _call(stream, **messages_kwargs(provider, max_tokens=10, messages=prompt))
    provider.state.push(Scripted(status=200, headers=ANTHROPIC_LIMITS))
    third = asyncio.ensure_future(_call(stream, **messages_kwargs(provider, max_tokens=10, messages=prompt)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    assert provider.state.count() == 2, "a prompt past the learned input-token limit was sent"
    clock.advance(61)  # the window slides: room again
    await asyncio.wait_for(third, 10)
    assert provider.state.count() == 3
