"""The Responses API (``litellm.responses`` / ``litellm.aresponses``) through the limiter, against the
fake provider's ``/v1/responses`` (JSON and server-sent events): held, counted, queued, settled to
the provider's usage, retried on a 429, and a stream keeps its slot while it is read."""

from __future__ import annotations

from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import RateLimitQueueTimeout, RequestTooLargeError
from hive_ratelimit_plugin._tokens import count_messages, count_response_input
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

SECRET = "sk-test-SECRET-0123456789"
PROMPT = "summarise the quarterly report in three bullet points " * 20


def responses_kwargs(provider: FakeProvider, **extra: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"model": "openai/gpt-4o-mini", "input": PROMPT, "api_base": provider.url,
                          "api_key": SECRET}
    kw.update(extra)
    return kw


async def _call(mode: str, **kw: Any) -> Any:
    """One Responses API call through ``mode``; a stream is read to its end. Returns the usage."""
    if mode == "sync":
        return litellm.responses(**kw).usage
    if mode == "async":
        return (await litellm.aresponses(**kw)).usage
    if mode == "sync-stream":
        events = list(litellm.responses(**kw, stream=True))
    else:
        events = [e async for e in await litellm.aresponses(**kw, stream=True)]
    assert events[-1].type == "response.completed"
    return events[-1].response.usage


MODES = ["sync", "async", "sync-stream", "async-stream"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_responses_call_is_counted_and_settled_to_the_providers_usage(
        mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """Admitted with its prompt counted from ``input`` plus ``max_output_tokens`` reserved, then
    settled to the usage the provider reported (``input_tokens`` / ``output_tokens``)."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100, "tokens_per_minute": 100000,
                                              "input_tokens_per_minute": 100000,
                                              "output_tokens_per_minute": 100000, "concurrent_requests": 1}})
    provider.state.completion_tokens = 7
    usage = await _call(mode, **responses_kwargs(provider, max_output_tokens=3000))
    assert (usage.input_tokens, usage.output_tokens) == (provider.state.log[0].prompt_tokens, 7)
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
    await wait_until(lambda: global_usage(limiter)["tokens_per_minute"]["used"] < 3000)  # not the estimate
    stats = global_usage(limiter)
    assert stats["tokens_per_minute"]["used"] == usage.input_tokens + usage.output_tokens
    assert stats["input_tokens_per_minute"]["used"] == usage.input_tokens
    assert stats["output_tokens_per_minute"]["used"] == usage.output_tokens
    assert stats["requests_per_minute"]["used"] == 1
    assert provider.state.count() == 1


@pytest.mark.parametrize("mode", MODES)
async def test_a_responses_prompt_too_large_for_the_limit_is_refused_unsent(
        mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """The prompt is estimated from ``input``: one larger than the input-token limit can never fit."""
    make_limiter(clock, {"global": {"input_tokens_per_minute": 100}})
    with pytest.raises(RequestTooLargeError, match="input_tokens_per_minute"):
        await _call(mode, **responses_kwargs(provider))
    assert provider.state.count() == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_responses_call_that_cannot_get_a_slot_times_out_unsent(
        mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """With the only slot held by an open stream, the next call waits and then gets
    ``RateLimitQueueTimeout`` itself (not wrapped in another error), and nothing is sent."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0}})
    stream = litellm.responses(**responses_kwargs(provider), stream=True)
    assert global_usage(limiter)["in_flight"] == 1
    with pytest.raises(RateLimitQueueTimeout):
        if mode == "sync":
            litellm.responses(**responses_kwargs(provider))
        else:
            await litellm.aresponses(**responses_kwargs(provider))
    assert provider.state.count() == 1
    for _ in stream:
        pass
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
    await _call(mode, **responses_kwargs(provider))


@pytest.mark.parametrize("mode", MODES)
async def test_a_responses_429_is_retried_and_each_attempt_counted(
        mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """A provider 429 is retried after its ``retry-after``; both requests are admitted and counted."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100}})
    provider.state.push(Scripted(status=429, headers={"retry-after-ms": "1"}))
    with Ticker(clock, step=0.01, when=lambda: limiter._engine.queue_length > 0):
        await _call(mode, **responses_kwargs(provider))
    assert provider.state.count() == 2
    assert [r.status for r in provider.state.log] == [429, 200]
    stats = limiter.get_usage_stats()
    assert stats["admitted_total"] == 2
    assert stats["levels"]["global"]["global"]["requests_per_minute"]["used"] == 2
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)


@pytest.mark.parametrize("mode", ["sync-stream", "async-stream"])
async def test_a_responses_stream_still_being_read_keeps_its_slot_past_the_lease(
        mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """The stream renews its lease as it is read: 80 s of reading with a 30 s lease keeps the
    slot; the stream settles at its end and the slot comes back."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1, "tokens_per_minute": 100000},
                                   "queue": {"max_wait_seconds": 0}, "estimation": {"lease_seconds": 30}})
    provider.state.completion_tokens = 20
    if mode == "sync-stream":
        read = chunk_reader(litellm.responses(**responses_kwargs(provider), stream=True), sync=True)
    else:
        read = chunk_reader(await litellm.aresponses(**responses_kwargs(provider), stream=True), sync=False)
    await assert_a_stream_being_read_keeps_its_slot(limiter, provider, clock, read)
    await litellm.aresponses(**responses_kwargs(provider))  # the slot is back


async def test_cancelling_an_aresponses_call_in_flight_frees_its_slot(provider: FakeProvider,
                                                                      clock: FakeClock) -> None:
    """A task cancelled while its request is in flight gives its slot back at once, not after a lease."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0}})
    await assert_cancelling_in_flight_frees_the_slot(
        limiter, provider, lambda: litellm.aresponses(**responses_kwargs(provider)))


def test_the_prompt_estimate_counts_every_kind_of_input_item() -> None:
    """``input`` as a string or as items (messages with text parts, tool calls and their outputs),
    plus ``instructions`` and tools: each adds to the estimate."""
    model = "gpt-4o-mini"
    text = "what is the weather in Paris today?"
    as_string = count_response_input(model, text)
    assert as_string == count_messages(model, [{"role": "user", "content": text}])
    parts = [{"role": "user", "content": [{"type": "input_text", "text": text}]}]
    assert count_response_input(model, parts) == as_string
    call = {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Paris"}'}
    output = {"type": "function_call_output", "call_id": "c1", "output": "18 C and sunny " * 20}
    with_tools = count_response_input(model, [*parts, call, output])
    assert with_tools > as_string + 60  # the tool output's text is counted, not just its envelope
    assert count_response_input(model, text, instructions="Answer in French. " * 10) > as_string + 30
    tools = [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]
    assert count_response_input(model, text, tools=tools) > as_string
    assert count_response_input(model, None) == count_messages(model, [])


async def test_positional_arguments_are_seen_by_the_limiter(provider: FakeProvider, clock: FakeClock) -> None:
    """``aresponses(input, model)`` and ``acompletion(model, messages)`` called positionally are
    estimated and scoped like keyword calls (the deployment hook sees keyword arguments only)."""
    limiter = make_limiter(clock, {"global": {"input_tokens_per_minute": 100},
                                   "providers": {"openai": {"gpt-4o-mini": {"requests_per_minute": 100}}}})
    with pytest.raises(RequestTooLargeError, match="input_tokens_per_minute"):
        await litellm.aresponses(PROMPT, "openai/gpt-4o-mini", api_base=provider.url, api_key=SECRET)
    with pytest.raises(RequestTooLargeError, match="input_tokens_per_minute"):
        await litellm.acompletion("openai/gpt-4o-mini", [{"role": "user", "content": PROMPT}],
                                  api_base=provider.url, api_key=SECRET)
    with pytest.raises(RequestTooLargeError, match="input_tokens_per_minute"):  # past the first two
        await litellm.acompletion("openai/gpt-4o-mini", [{"role": "user", "content": PROMPT}], None,
                                  api_base=provider.url, api_key=SECRET)
    with pytest.raises(TypeError, match="multiple values"):  # as without the limiter
        await litellm.acompletion("openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                  model="openai/gpt-4o", api_base=provider.url, api_key=SECRET)
    assert provider.state.count() == 0
    await litellm.aresponses("hi", "openai/gpt-4o-mini", api_base=provider.url, api_key=SECRET)
    levels = limiter.get_usage_stats()["levels"]
    assert levels["model"]["model:openai/gpt-4o-mini"]["requests_per_minute"]["used"] == 1


async def test_a_conversation_chained_by_previous_response_id_is_not_a_loop(provider: FakeProvider,
                                                                            clock: FakeClock) -> None:
    """The same short ``input`` ("continue") after a different previous response each time is a
    conversation going on, not an agent repeating itself: the runaway detector must not trip."""
    make_limiter(clock, {"runaway": {"max_identical_requests": 3}})
    previous = None
    for _ in range(6):
        resp = await litellm.aresponses(**responses_kwargs(provider, input="continue",
                                                           previous_response_id=previous,
                                                           metadata={"agent_id": "writer"}))
        previous = f"{resp.id}-{provider.state.count()}"
    assert provider.state.count() == 6


async def _turn(mode: str, **kw: Any) -> str:
    """One Responses API call through ``mode``; returns the id LiteLLM hands back."""
    if mode == "sync":
        return str(litellm.responses(**kw).id)
    if mode == "async":
        return str((await litellm.aresponses(**kw)).id)
    if mode == "sync-stream":
        events = list(litellm.responses(**kw, stream=True))
    else:
        events = [e async for e in await litellm.aresponses(**kw, stream=True)]
    return str(events[-1].response.id)


@pytest.mark.parametrize("mode", MODES)
async def test_a_turn_continuing_a_conversation_is_estimated_with_it(mode: str, provider: FakeProvider,
                                                                   clock: FakeClock) -> None:
    """With ``previous_response_id`` the provider bills the stored conversation as input: a turn's
    estimate includes the last turn's input and output, so a conversation grown past the limit is
    refused unsent, not sent on the estimate of its two new words."""
    limiter = make_limiter(clock, {"global": {"input_tokens_per_minute": 500}})
    provider.state.completion_tokens = 150
    r1 = await _turn(mode, **responses_kwargs(provider))  # ~270 tokens in, 150 out
    # (LiteLLM 1.83 settles an async stream a moment after its last event; a turn sent before that
    # is estimated without the one it continues.)
    first_billed = provider.state.log[0].prompt_tokens
    await wait_until(lambda: global_usage(limiter)["input_tokens_per_minute"]["used"] == first_billed)
    clock.advance(61)
    r2 = await _turn(mode, **responses_kwargs(provider, input="go on", previous_response_id=r1))
    billed = provider.state.log[-1].prompt_tokens
    assert billed > 400  # the provider billed the conversation so far ...
    await wait_until(lambda: global_usage(limiter)["input_tokens_per_minute"]["used"] == billed)  # ... settled
    clock.advance(61)
    with pytest.raises(RequestTooLargeError, match="input_tokens_per_minute"):  # ~570 tokens now
        await _turn(mode, **responses_kwargs(provider, input="go on", previous_response_id=r2))
    assert provider.state.count() == 2
    await _turn(mode, **responses_kwargs(provider, input="go on"))  # a new conversation fits
    assert provider.state.count() == 3


def test_a_routers_sync_responses_call_gets_the_retries_it_was_configured_with(
        provider: FakeProvider, clock: FakeClock) -> None:
    """LiteLLM 1.83.4's Router leaves a sync ``responses`` call's retries to LiteLLM's own loop,
    which the guard turns off: the guard makes them instead, each admitted. (1.110's Router
    retries no sync ``responses`` call, with or without the limiter.)"""
    from importlib.metadata import version

    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100}, "retry": {"base_delay": 0.001}})
    router = litellm.Router(model_list=[{"model_name": "m", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": provider.url, "api_key": SECRET}}], num_retries=2, retry_after=0)
    provider.state.push(Scripted(status=500), Scripted(status=500))
    retried = tuple(int(p) for p in version("litellm").split(".")[:2]) < (1, 100)
    with Ticker(clock, step=0.01, when=lambda: limiter._engine.queue_length > 0):
        if retried:
            router.responses(model="m", input="hi")
        else:
            with pytest.raises(litellm.InternalServerError):
                router.responses(model="m", input="hi")
    assert [r.status for r in provider.state.log] == ([500, 500, 200] if retried else [500])
    assert limiter.get_usage_stats()["admitted_total"] == provider.state.count()
