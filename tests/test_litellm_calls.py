"""Every LiteLLM entry point, through LiteLLM's real transports, against the fake provider."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import litellm
import litellm.main
import pytest

from hive_ratelimit_plugin import RateLimitQueueTimeout, RequestTooLargeError
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import (
    Ticker,
    assert_a_stream_being_read_keeps_its_slot,
    chat_kwargs,
    chunk_reader,
    global_usage,
    make_limiter,
    wait_until,
)

# Contract: every test here runs against the in-memory and the Redis backend.
pytestmark = pytest.mark.usefixtures("contract_backend")

SECRET = "sk-test-SECRET-0123456789"


def _consume_sync(resp: Any) -> Any:
    if isinstance(resp, litellm.CustomStreamWrapper):
        for _ in resp:
            pass
    return resp


async def _consume_async(resp: Any) -> Any:
    if isinstance(resp, litellm.CustomStreamWrapper):
        async for _ in resp:
            pass
    return resp


def _router(p: FakeProvider) -> litellm.Router:
    return litellm.Router(
        model_list=[{"model_name": "fast", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": p.url, "api_key": SECRET}}],
        num_retries=0,
    )


SYNC_CALLS: dict[str, Callable[[FakeProvider], Any]] = {
    "completion": lambda p: litellm.completion(**chat_kwargs(p)),
    "completion-stream": lambda p: _consume_sync(litellm.completion(**chat_kwargs(p), stream=True)),
    "embedding": lambda p: litellm.embedding(
        model="openai/text-embedding-3-small", api_base=p.url, api_key=SECRET, input=["a b c"], max_retries=0),
    "text_completion": lambda p: litellm.text_completion(
        model="openai/gpt-3.5-turbo-instruct", api_base=p.url, api_key=SECRET, prompt="say ok", max_retries=0),
    "router.completion": lambda p: _router(p).completion(
        model="fast", messages=[{"role": "user", "content": "hi"}]),
}

ASYNC_CALLS: dict[str, Callable[[FakeProvider], Awaitable[Any]]] = {
    "acompletion": lambda p: litellm.acompletion(**chat_kwargs(p)),
    "acompletion-stream": lambda p: _stream_async(p),
    "aembedding": lambda p: litellm.aembedding(
        model="openai/text-embedding-3-small", api_base=p.url, api_key=SECRET, input=["a b c"], max_retries=0),
    "atext_completion": lambda p: litellm.atext_completion(
        model="openai/gpt-3.5-turbo-instruct", api_base=p.url, api_key=SECRET, prompt="say ok", max_retries=0),
    "router.acompletion": lambda p: _router(p).acompletion(
        model="fast", messages=[{"role": "user", "content": "hi"}]),
}


async def _stream_async(p: FakeProvider) -> Any:
    resp = await litellm.acompletion(**chat_kwargs(p), stream=True, stream_options={"include_usage": True})
    return await _consume_async(resp)


ONE_PER_MINUTE = {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 0}}


@pytest.mark.parametrize("name", sorted(SYNC_CALLS))
def test_sync_entry_point_is_held(name: str, provider: FakeProvider, clock: FakeClock) -> None:
    """Sync entry points: the second call over the limit raises and sends no request."""
    make_limiter(clock, ONE_PER_MINUTE)
    call = SYNC_CALLS[name]
    call(provider)
    assert provider.state.count() == 1
    with pytest.raises(RateLimitQueueTimeout) as info:
        call(provider)
    assert provider.state.count() == 1, "a held call must not reach the provider"
    assert info.value.scope == "global" and info.value.limit == "requests_per_minute"
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 61
    # 62, not 61: a sync stream settles from LiteLLM's background success event, which may land
    # after this advance; it then counts the request from its send + margin (1 s later).
    clock.advance(62)
    call(provider)
    assert provider.state.count() == 2


@pytest.mark.parametrize("name", sorted(ASYNC_CALLS))
async def test_async_entry_point_is_held(name: str, provider: FakeProvider, clock: FakeClock) -> None:
    """Async entry points: the second call over the limit raises and sends no request."""
    make_limiter(clock, ONE_PER_MINUTE)
    call = ASYNC_CALLS[name]
    await call(provider)
    assert provider.state.count() == 1
    with pytest.raises(RateLimitQueueTimeout):
        await call(provider)
    assert provider.state.count() == 1
    clock.advance(61)
    await call(provider)
    assert provider.state.count() == 2


@pytest.mark.parametrize("name", sorted(SYNC_CALLS))
def test_sync_calls_release_concurrency(name: str, provider: FakeProvider, clock: FakeClock) -> None:
    """After each kind of sync call finishes, no concurrency slot stays held."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 5}})
    SYNC_CALLS[name](provider)
    SYNC_CALLS[name](provider)
    _wait_for(lambda: limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 0)


@pytest.mark.parametrize("name", sorted(ASYNC_CALLS))
async def test_async_calls_release_concurrency(name: str, provider: FakeProvider, clock: FakeClock) -> None:
    """After each kind of async call finishes, no concurrency slot stays held."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 5}})
    await ASYNC_CALLS[name](provider)
    await ASYNC_CALLS[name](provider)
    assert limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_limiter_that_replaces_another_still_hears_when_a_stream_ends(
        mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """``litellm.callbacks = [HiveLimiter()]`` run a second time (a reload, a notebook cell):
    LiteLLM keeps the first limiter in its own success lists and told two limiters apart by their
    public attributes only, so it left the second one out and the second never heard that a
    stream had ended: its slot stayed held until the lease ran out."""
    make_limiter(clock, {"global": {"concurrent_requests": 5}})
    litellm.completion(**chat_kwargs(provider))
    litellm.callbacks[:] = []  # replaced the plain way, without unregister()
    second = make_limiter(clock, {"global": {"concurrent_requests": 1, "tokens_per_minute": 100000},
                                  "queue": {"max_wait_seconds": 0}})
    if mode == "sync":
        for _ in litellm.completion(**chat_kwargs(provider, max_tokens=2000), stream=True):
            pass
    else:
        async for _ in await litellm.acompletion(**chat_kwargs(provider, max_tokens=2000), stream=True):
            pass
    await wait_until(lambda: global_usage(second)["in_flight"] == 0)
    await wait_until(lambda: global_usage(second)["tokens_per_minute"]["used"] < 2000)  # settled, not the estimate


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    # Sync streams settle from LiteLLM's logging thread; give it a moment (bounded).
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached")


async def test_queued_async_call_runs_when_window_slides(provider: FakeProvider, clock: FakeClock) -> None:
    """An async call over the limit waits (without blocking the loop) and runs when room frees."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 120}})
    await litellm.acompletion(**chat_kwargs(provider))
    task = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider)))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not task.done() and limiter.get_usage_stats()["queued"] == 1
    clock.advance(30)
    await asyncio.sleep(0.05)
    assert not task.done()
    clock.advance(31)
    await asyncio.wait_for(task, 5)
    assert provider.state.count() == 2


def test_queued_sync_call_blocks_only_its_thread(provider: FakeProvider, clock: FakeClock) -> None:
    """A sync call over the limit blocks its own thread until the window slides."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 120}})
    litellm.completion(**chat_kwargs(provider))
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            litellm.completion(**chat_kwargs(provider))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    _wait_for(lambda: limiter.get_usage_stats()["queued"] == 1)
    assert provider.state.count() == 1
    clock.advance(61)
    t.join(5)
    assert not t.is_alive() and not errors
    assert provider.state.count() == 2


async def test_queue_timeout_after_max_wait(provider: FakeProvider, clock: FakeClock) -> None:
    """Past max_wait_seconds the waiting call raises RateLimitQueueTimeout; nothing was sent."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 10}})
    await litellm.acompletion(**chat_kwargs(provider))
    task = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)  # (its deadline counts from here)
    clock.advance(10.5)
    with pytest.raises(RateLimitQueueTimeout) as info:
        await asyncio.wait_for(task, 5)
    assert "no request was sent" in str(info.value)
    assert provider.state.count() == 1


@pytest.mark.parametrize("timeout", [5, 5.0, "5", httpx.Timeout(5.0)])
async def test_a_call_waits_in_the_queue_no_longer_than_its_own_timeout(timeout: Any, provider: FakeProvider,
                                                                       clock: FakeClock) -> None:
    """A caller who passes ``timeout=5`` gives up after 5 s: held for max_wait_seconds (60) in
    the queue, the call outlived its own timeout twelvefold before anything was sent."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 60}})
    await litellm.acompletion(**chat_kwargs(provider))
    task = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider), timeout=timeout))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)  # (its deadline counts from here)
    clock.advance(5.5)
    with pytest.raises(RateLimitQueueTimeout, match="after waiting 5") as info:
        await asyncio.wait_for(task, 5)
    assert "no request was sent" in str(info.value)
    assert provider.state.count() == 1


@pytest.mark.parametrize("timeout", [120, 0, -1, "soon", float("nan"), httpx.Timeout(None)])
async def test_a_timeout_that_bounds_nothing_leaves_the_queue_wait_as_configured(
        timeout: Any, provider: FakeProvider, clock: FakeClock) -> None:
    """Longer than max_wait_seconds, unbounded, or not a usable number: max_wait_seconds holds."""
    limiter = make_limiter(clock, {"global": {"requests_per_hour": 1}, "queue": {"max_wait_seconds": 60}})
    await litellm.acompletion(**chat_kwargs(provider))
    task = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider), timeout=timeout))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)  # (its deadline counts from here)
    clock.advance(30)
    await asyncio.sleep(0.01)
    assert not task.done() and limiter.get_usage_stats()["queued"] == 1
    clock.advance(31)
    with pytest.raises(RateLimitQueueTimeout, match="after waiting 6"):
        await asyncio.wait_for(task, 5)
    assert provider.state.count() == 1


def test_a_sync_call_waits_in_the_queue_no_longer_than_its_own_timeout(provider: FakeProvider,
                                                                      clock: FakeClock) -> None:
    """The same for a sync call (blocked in its own thread)."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 60}})
    litellm.completion(**chat_kwargs(provider))
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            litellm.completion(**chat_kwargs(provider), timeout=5)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    _wait_for(lambda: limiter.get_usage_stats()["queued"] == 1)
    clock.advance(5.5)
    t.join(5)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], RateLimitQueueTimeout)
    assert provider.state.count() == 1


async def test_full_queue_rejects_at_once(provider: FakeProvider, clock: FakeClock,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """With the queue full, a new call fails at once instead of waiting (and the log says so,
    not that it timed out)."""
    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_size": 1}})
    await litellm.acompletion(**chat_kwargs(provider))
    waiting = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)  # the queue's only place is taken
    with pytest.raises(RateLimitQueueTimeout, match="queue is full") as info:
        await litellm.acompletion(**chat_kwargs(provider))
    assert (info.value.scope, info.value.limit, info.value.remaining) == ("queue", "max_size", 0.0)
    logged = [r.getMessage() for r in caplog.records]
    assert any("the queue is full" in m for m in logged) and not any("timed out" in m for m in logged)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert limiter.get_usage_stats()["queued"] == 0


async def test_cancelled_waiter_leaves_no_reservation(provider: FakeProvider, clock: FakeClock) -> None:
    """Cancelling a queued call removes it; later calls are not held behind it."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 400}, "queue": {"max_wait_seconds": 60}})
    provider.state.completion_tokens = 300
    await litellm.acompletion(**chat_kwargs(provider, max_tokens=300))  # really uses ~310 tokens
    big = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider, max_tokens=350)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    assert limiter.get_usage_stats()["queued"] == 1
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    assert limiter.get_usage_stats()["queued"] == 0
    await litellm.acompletion(**chat_kwargs(provider, max_tokens=20))  # fits now that the line is clear
    assert provider.state.count() == 2


async def test_usage_is_settled_to_actual_tokens(provider: FakeProvider, clock: FakeClock) -> None:
    """The reservation (prompt + max_tokens) is replaced by the provider's reported usage."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100000}})
    resp = await litellm.acompletion(**chat_kwargs(provider, max_tokens=1000))
    used = limiter.get_usage_stats()["levels"]["global"]["global"]["tokens_per_minute"]["used"]
    assert used == resp.usage.total_tokens
    resp2 = litellm.completion(**chat_kwargs(provider, max_tokens=1000))
    used = limiter.get_usage_stats()["levels"]["global"]["global"]["tokens_per_minute"]["used"]
    assert used == resp.usage.total_tokens + resp2.usage.total_tokens


async def test_stream_usage_settles_exactly(provider: FakeProvider, clock: FakeClock) -> None:
    """A stream with include_usage settles to the provider's exact usage."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100000, "concurrent_requests": 2}})
    resp = await litellm.acompletion(**chat_kwargs(provider, max_tokens=2000), stream=True,
                                     stream_options={"include_usage": True})
    async for _ in resp:
        pass
    sent = provider.state.log[-1]

    def used() -> float:
        return float(limiter.get_usage_stats()["levels"]["global"]["global"]["tokens_per_minute"]["used"])

    # The slot is free as soon as the stream ends; exact usage arrives with LiteLLM's success
    # event, a task LiteLLM schedules on this loop right after the last chunk.
    assert limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 0
    for _ in range(200):
        if used() < 2000:
            break
        await asyncio.sleep(0.005)
    assert used() == sent.prompt_tokens + sent.completion_tokens


async def test_abandoned_stream_is_reclaimed_after_lease(provider: FakeProvider, clock: FakeClock) -> None:
    """A stream the caller walks away from gives back its slot when the lease expires."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0},
                                   "estimation": {"lease_seconds": 30}})
    resp = await litellm.acompletion(**chat_kwargs(provider), stream=True)
    await resp.__anext__()  # read one chunk, then abandon it
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**chat_kwargs(provider))
    clock.advance(31)
    await litellm.acompletion(**chat_kwargs(provider))
    assert limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 0


async def _open_stream(entry: str, provider: FakeProvider) -> tuple[Any, Callable[[], Awaitable[Any]]]:
    """Start a stream through ``entry``; returns it and a coroutine function that reads one chunk."""
    text = {"model": "openai/gpt-3.5-turbo-instruct", "api_base": provider.url, "api_key": SECRET,
            "prompt": "say ok", "stream": True, "max_retries": 0}
    if entry == "completion":
        resp = litellm.completion(**chat_kwargs(provider), stream=True)
    elif entry == "text_completion":
        resp = litellm.text_completion(**text)
    elif entry == "acompletion":
        resp = await litellm.acompletion(**chat_kwargs(provider), stream=True)
    elif entry == "atext_completion":
        resp = await litellm.atext_completion(**text)
    else:
        resp = await _router(provider).acompletion(model="fast", messages=[{"role": "user", "content": "hi"}],
                                                   stream=True)
    return resp, chunk_reader(resp, sync=entry in ("completion", "text_completion"))


@pytest.mark.parametrize("entry", ["completion", "text_completion", "acompletion", "atext_completion",
                                   "router.acompletion"])
async def test_a_stream_still_being_read_keeps_its_slot_past_the_lease(entry: str, provider: FakeProvider,
                                                                        clock: FakeClock) -> None:
    """LiteLLM runs no hook per chunk: the stream itself renews its lease as it is read, so a stream
    that lasts longer than ``lease_seconds`` keeps its concurrency slot (and settles at the end)."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1, "tokens_per_minute": 100000},
                                   "queue": {"max_wait_seconds": 0}, "estimation": {"lease_seconds": 30}})
    provider.state.completion_tokens = 20
    resp, read = await _open_stream(entry, provider)
    if entry in ("completion", "acompletion"):
        assert isinstance(resp, litellm.CustomStreamWrapper)  # still LiteLLM's stream to its reader
    await assert_a_stream_being_read_keeps_its_slot(limiter, provider, clock, read)
    await wait_until(lambda: global_usage(limiter)["tokens_per_minute"]["used"] < 2000)  # settled, not the estimate
    await litellm.acompletion(**chat_kwargs(provider))  # the slot is back


async def test_an_abandoned_stream_is_reclaimed_one_lease_after_its_last_chunk(provider: FakeProvider,
                                                                               clock: FakeClock) -> None:
    """Renewal happens only on reads: a stream read for a while and then dropped still gives its
    slot back one lease after the last chunk it delivered."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0},
                                   "estimation": {"lease_seconds": 30}})
    provider.state.completion_tokens = 20
    _, read = await _open_stream("acompletion", provider)
    await read()
    clock.advance(25)
    await read()  # renewed at +25 s: held until +55 s
    clock.advance(25)
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**chat_kwargs(provider))
    clock.advance(6)
    await litellm.acompletion(**chat_kwargs(provider))
    assert global_usage(limiter)["in_flight"] == 0


async def test_a_failing_lease_renewal_does_not_break_the_stream(provider: FakeProvider, clock: FakeClock,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A renewal that raises (a backend outage) is logged; the caller's stream reads on."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 2}})
    provider.state.completion_tokens = 5

    def broken(call_id: str) -> None:
        raise ConnectionError("backend down")

    limiter._engine.renew = broken  # type: ignore[method-assign]
    resp = await litellm.acompletion(**chat_kwargs(provider), stream=True)
    with caplog.at_level(logging.WARNING, logger="hive_ratelimit_plugin"):
        chunks = [c async for c in resp]
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    assert any("could not renew the lease" in r.getMessage() for r in caplog.records)
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_provider_failure_releases_slot(mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """A provider error frees the concurrency slot and refunds the output estimate."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1, "tokens_per_minute": 10000},
                                   "queue": {"max_wait_seconds": 0}})
    provider.state.push(Scripted(status=500))
    with pytest.raises(litellm.InternalServerError):
        if mode == "sync":
            litellm.completion(**chat_kwargs(provider, max_tokens=500))
        else:
            await litellm.acompletion(**chat_kwargs(provider, max_tokens=500))
    stats = limiter.get_usage_stats()["levels"]["global"]["global"]
    assert stats["in_flight"] == 0
    assert stats["tokens_per_minute"]["used"] < 500  # prompt kept, output estimate refunded
    await litellm.acompletion(**chat_kwargs(provider))


@pytest.mark.parametrize(("cap", "default", "fits"), [
    ({"max_tokens": 900}, 256, False),
    ({"max_tokens": 100}, 256, True),
    ({"max_completion_tokens": 900}, 256, False),
    ({"max_completion_tokens": 100, "max_tokens": 5000}, 256, True),  # the completion cap wins
    ({}, 900, False),  # no cap: the configured default output estimate
    ({}, 100, True),
])
async def test_output_estimate_is_the_requested_cap_or_the_configured_default(
        cap: dict[str, int], default: int, fits: bool, provider: FakeProvider, clock: FakeClock) -> None:
    """A call reserves its prompt plus ``max_completion_tokens`` / ``max_tokens``, or
    ``estimation.default_output_tokens`` without a cap: against 500 tokens per minute, a call that
    may produce 900 can never fit (no request is sent), one capped at 100 is admitted."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 500},
                                   "estimation": {"default_output_tokens": default}})
    if fits:
        await litellm.acompletion(**chat_kwargs(provider, **cap))
        assert provider.state.count() == 1
        await wait_until(lambda: global_usage(limiter)["tokens_per_minute"]["used"] < 100)  # settled to the usage
    else:
        with pytest.raises(RequestTooLargeError, match="tokens_per_minute"):
            await litellm.acompletion(**chat_kwargs(provider, **cap))
        assert provider.state.count() == 0


def test_request_larger_than_limit_fails_fast(provider: FakeProvider, clock: FakeClock) -> None:
    """A call that can never fit raises RequestTooLargeError at once, with no request sent."""
    make_limiter(clock, {"global": {"tokens_per_minute": 1000}})
    with pytest.raises(RequestTooLargeError, match="tokens_per_minute"):
        litellm.completion(**chat_kwargs(provider, max_tokens=5000))
    assert provider.state.count() == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_router_does_not_retry_a_request_that_can_never_fit(mode: str, provider: FakeProvider,
                                                                   clock: FakeClock,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a Router with ``num_retries``, a call that can never fit raises at once too: the
    Router retried it (no status code), after its backoff, seconds later, refused each time."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 1000}})
    engine = limiter._engine
    tries: list[object] = []

    def acquire(ticket: Any, notify: Any = None) -> Any:
        tries.append(ticket)
        return type(engine).acquire(engine, ticket, notify)

    monkeypatch.setattr(engine, "acquire", acquire)
    router = litellm.Router(model_list=[{"model_name": "fast", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": provider.url, "api_key": SECRET}}], num_retries=2)
    call = {"model": "fast", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5000}
    with pytest.raises(RequestTooLargeError) as info:
        if mode == "sync":
            router.completion(**call)
        else:
            await router.acompletion(**call)
    assert len(tries) == 1  # refused once: not retried
    assert provider.state.count() == 0
    assert not litellm._should_retry(info.value.status_code)


def test_retries_without_readmission_are_counted(provider: FakeProvider, clock: FakeClock) -> None:
    """A caller's ``max_retries`` on a 429: the openai SDK would retry inside one attempt, unseen;
    the guard retries instead, and the provider's two requests are two admitted requests."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100}})
    provider.state.push(Scripted(status=429, headers={"retry-after-ms": "1"}))
    with Ticker(clock, step=0.01, when=lambda: limiter._engine.queue_length > 0):
        litellm.completion(**chat_kwargs(provider, max_retries=1))
    assert provider.state.count() == 2
    stats = limiter.get_usage_stats()
    assert stats["levels"]["global"]["global"]["requests_per_minute"]["used"] == 2
    assert stats["admitted_total"] == 2


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("asked", "script", "sent", "ok"), [
    ({"num_retries": 2}, [500, 500], 3, True),
    ({"max_retries": 2}, [503, 429, 500], 4, True),  # a 429 follows the limiter's retry policy
    ({"max_retries": 1}, [503, 500], 2, False),  # one retry asked: the second failure is final
    ({"num_retries": 1}, [500, 500], 2, False),
    ({}, [500], 1, False),  # none asked: none made
])
async def test_the_retries_a_caller_asked_for_are_each_admitted_and_counted(
        mode: str, asked: dict[str, int], script: list[int], sent: int, ok: bool, provider: FakeProvider,
        clock: FakeClock) -> None:
    """``num_retries`` / ``max_retries``: LiteLLM hands them to the openai SDK, which would resend
    5xx and 429s inside one attempt, never admitted and never counted. The guard turns the SDK's
    retries off and makes the retries the caller asked for itself: each one admitted, counted,
    and visible to the limits, after a jittered backoff for a 5xx."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100}, "retry": {"base_delay": 0.001}})
    for status in script:
        provider.state.push(Scripted(status=status, headers={"retry-after-ms": "1"} if status == 429 else {}))
    kw = chat_kwargs(provider)
    kw.pop("max_retries")
    kw.update(asked)
    with Ticker(clock, step=0.01, when=lambda: limiter._engine.queue_length > 0):
        try:
            if mode == "sync":
                litellm.completion(**kw)
            else:
                await litellm.acompletion(**kw)
            succeeded = True
        except (litellm.InternalServerError, litellm.ServiceUnavailableError, litellm.RateLimitError):
            succeeded = False
    assert succeeded is ok
    assert provider.state.count() == sent
    stats = limiter.get_usage_stats()
    assert stats["levels"]["global"]["global"]["requests_per_minute"]["used"] == sent
    assert stats["admitted_total"] == sent
    assert stats["levels"]["global"]["global"]["in_flight"] == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_module_wide_num_retries_are_made_by_the_guard_and_counted(
        mode: str, provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """``litellm.num_retries`` set for the whole program: async, LiteLLM's own retry loop (or the
    SDK) would resend unseen, so the guard makes those retries itself, each admitted and counted.
    Sync, LiteLLM's retry loop reads the setting whatever the call says and needs ``tenacity``:
    the guard leaves the SDK's retries alone so the call still succeeds (its retries unseen)."""
    monkeypatch.setattr(litellm, "num_retries", 2)
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100}, "retry": {"base_delay": 0.001}})
    for _ in range(2):
        provider.state.push(Scripted(status=500))
    kw = chat_kwargs(provider)
    kw.pop("max_retries")
    with Ticker(clock, step=0.01, when=lambda: limiter._engine.queue_length > 0):
        if mode == "sync":
            litellm.completion(**kw)
        else:
            await litellm.acompletion(**kw)
    assert provider.state.count() == 3
    assert limiter.get_usage_stats()["admitted_total"] == (1 if mode == "sync" else 3)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_router_deployments_num_retries_never_reach_the_sdk_unseen(
        mode: str, provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteLLM 1.83 hands a deployment's ``num_retries`` to the openai SDK even under a Router;
    every request the provider sees must be one the limiter admitted."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100}})
    router = litellm.Router(model_list=[{"model_name": "fast", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": provider.url, "api_key": SECRET, "num_retries": 2}}],
        num_retries=0, retry_after=0)
    # No backoff between the Router's retries (1.83.4 asks the Router; 1.110's compiled core has its own)
    monkeypatch.setattr(router, "_time_to_sleep_before_retry", lambda *args, **kwargs: 0.0, raising=False)
    core = sys.modules.get("litellm.router_rust.core")
    if core is not None and hasattr(core, "_sleep_seconds"):
        monkeypatch.setattr(core, "_sleep_seconds", lambda step: 0)
    for _ in range(2):
        provider.state.push(Scripted(status=500))
    messages = [{"role": "user", "content": "hi"}]
    with Ticker(clock, step=0.01, when=lambda: limiter._engine.queue_length > 0):
        if mode == "sync":
            response = router.completion(model="fast", messages=messages)
        else:
            response = await router.acompletion(model="fast", messages=messages)
    # The deployment's retries are the Router's, as without the limiter: two 500s, then the answer.
    assert response.choices[0].message.content
    assert provider.state.count() == 3
    assert limiter.get_usage_stats()["admitted_total"] == provider.state.count()


def test_disabled_limiter_does_nothing(provider: FakeProvider, clock: FakeClock) -> None:
    """enabled: false lets every call through uncounted."""
    make_limiter(clock, {"enabled": False, "global": {"requests_per_minute": 1}})
    for _ in range(3):
        litellm.completion(**chat_kwargs(provider))
    assert provider.state.count() == 3


async def test_api_key_never_in_errors_or_logs(
    provider: FakeProvider, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """No error message, log record or stats entry contains the API key."""
    caplog.set_level(logging.DEBUG, logger="hive_ratelimit_plugin")
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 0}})
    await litellm.acompletion(**chat_kwargs(provider))
    errors: list[BaseException] = []
    for call in (lambda: litellm.acompletion(**chat_kwargs(provider)),):
        try:
            await call()
        except Exception as exc:
            errors.append(exc)
    try:
        litellm.completion(**chat_kwargs(provider))
    except Exception as exc:
        errors.append(exc)
    assert len(errors) == 2
    for exc in errors:
        assert SECRET not in str(exc) and SECRET not in repr(exc.__dict__)
    for record in caplog.records:
        assert SECRET not in record.getMessage()
    assert SECRET not in repr(limiter.get_usage_stats()) and SECRET not in repr(limiter)


@pytest.mark.parametrize("cls_path", ["hive_ratelimit_plugin.plugin.HiveLimiter",
                                      "hive_ratelimit_plugin.proxy.ProxyLimiter"])
def test_the_sync_success_event_is_never_overridden_without_the_async_one(cls_path: str) -> None:
    """LiteLLM (1.110) runs its whole sync success handler in a worker thread for every *async*
    call when a callback overrides ``log_success_event`` but not ``async_log_success_event``
    (~13 % more CPU per call, measured with callgrind). And it delivers either event only after
    copying the call's details for the callback (~50k instructions per call): the limiter settles
    from the logging hooks, which LiteLLM runs for every callback, and overrides neither event."""
    import importlib

    from litellm.integrations.custom_logger import CustomLogger

    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert cls.log_success_event is CustomLogger.log_success_event
    assert cls.async_log_success_event is CustomLogger.async_log_success_event
    assert cls.logging_hook is not CustomLogger.logging_hook
    assert cls.async_logging_hook is not CustomLogger.async_logging_hook


# ------------------------------------------------------------------ settlement safety nets
# Calls LiteLLM finishes without running the success deployment hook are settled by the success
# event. These tests fail if HiveLimiter stops overriding the success events (a review of such a
# change on 2026-11-29 found each of these leaking a slot until the lease expired).

def _settled(limiter: Any, sent: Any, usage: bool) -> Callable[[], bool]:
    """Whether the last call's tokens are settled: to the provider's usage when the stream carried
    it, else to LiteLLM's estimate (far below the 2,000 ``max_tokens`` reserved)."""
    def check() -> bool:
        used = global_usage(limiter)["tokens_per_minute"]["used"]
        return bool(used == sent.prompt_tokens + sent.completion_tokens if usage else used < 100)
    return check


async def test_async_cache_hit_is_settled(provider: FakeProvider, clock: FakeClock) -> None:
    """A cached answer comes back after the pre-call hook but without the success deployment hook:
    it still gives its slot back, and gives back its estimate (nothing was sent: see
    test_litellm_cache.py)."""
    from litellm.caching.caching import Cache

    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100000, "concurrent_requests": 5}})
    litellm.cache = Cache(type="local")
    try:
        kw = chat_kwargs(provider, messages=[{"role": "user", "content": "cache me"}], max_tokens=2000)
        first = await litellm.acompletion(**kw, caching=True)
        await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
        # LiteLLM writes the cache from its background logging work
        await wait_until(lambda: bool(litellm.cache.cache.cache_dict))  # type: ignore[union-attr]
        await litellm.acompletion(**kw, caching=True)
        assert provider.state.count() == 1, "the second call must be a cache hit"
        await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
        await wait_until(lambda: global_usage(limiter)["tokens_per_minute"]["used"] < 2000)
        assert global_usage(limiter)["tokens_per_minute"]["used"] == first.usage.total_tokens
    finally:
        litellm.cache = None


async def test_a_callback_ahead_of_the_limiter_does_not_stop_its_settlement(provider: FakeProvider,
                                                                             clock: FakeClock) -> None:
    """LiteLLM 1.83.4 stops running success deployment hooks at the first callback that returns the
    response (every ``CustomGuardrail`` does): a call still settles when one is registered first."""
    from litellm.integrations.custom_guardrail import CustomGuardrail

    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100000, "concurrent_requests": 5}})
    litellm.callbacks.insert(0, CustomGuardrail())
    resp = await litellm.acompletion(**chat_kwargs(provider, max_tokens=2000))
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
    await wait_until(lambda: global_usage(limiter)["tokens_per_minute"]["used"] == resp.usage.total_tokens)


async def test_a_failing_settlement_never_reaches_litellms_success_handler(
        provider: FakeProvider, clock: FakeClock, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteLLM 1.83.4 does not catch exceptions from the logging hooks the limiter settles from: a
    settlement that fails is logged, and the stream is read to its end (its lease settles it later)."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 2}})

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("settlement broke")

    monkeypatch.setattr(limiter, "_finish", broken)
    with caplog.at_level(logging.ERROR, logger="hive_ratelimit_plugin"):
        stream = await litellm.acompletion(**chat_kwargs(provider), stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text
        await wait_until(lambda: any("settling a finished call failed" in r.getMessage() for r in caplog.records))


@pytest.mark.parametrize("usage", [True, False], ids=["with-usage", "without-usage"])
@pytest.mark.parametrize("entry", ["acompletion", "router.acompletion"])
async def test_async_stream_settles_after_it_is_read(entry: str, usage: bool, provider: FakeProvider,
                                                     clock: FakeClock) -> None:
    """A finished async stream settles: exactly with include_usage, else to LiteLLM's estimate."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100000, "concurrent_requests": 2}})
    provider.state.completion_tokens = 20
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
    if entry == "acompletion":
        resp = await litellm.acompletion(**chat_kwargs(provider, max_tokens=2000), stream=True, **extra)
    else:
        resp = await _router(provider).acompletion(model="fast", messages=[{"role": "user", "content": "hello there"}],
                                                   max_tokens=2000, stream=True, **extra)
    assert global_usage(limiter)["tokens_per_minute"]["used"] > 2000  # prompt + max_tokens reserved
    async for _ in resp:
        pass
    sent = provider.state.log[-1]
    await wait_until(_settled(limiter, sent, usage))
    assert global_usage(limiter)["in_flight"] == 0


@pytest.mark.parametrize("usage", [True, False], ids=["with-usage", "without-usage"])
def test_sync_stream_settles_after_it_is_read(usage: bool, provider: FakeProvider, clock: FakeClock) -> None:
    """A finished sync stream settles (from LiteLLM's logging thread) and frees its slot."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100000, "concurrent_requests": 2}})
    provider.state.completion_tokens = 20
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
    for _ in litellm.completion(**chat_kwargs(provider, max_tokens=2000), stream=True, **extra):
        pass
    sent = provider.state.log[-1]
    _wait_for(_settled(limiter, sent, usage))
    _wait_for(lambda: global_usage(limiter)["in_flight"] == 0)


@pytest.mark.parametrize("usage", [True, False], ids=["with-usage", "without-usage"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_text_completion_stream_settles_after_it_is_read(mode: str, usage: bool, provider: FakeProvider,
                                                               clock: FakeClock) -> None:
    """A text-completion stream (server-sent events) settles once read: exactly with include_usage."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100000, "concurrent_requests": 2}})
    provider.state.completion_tokens = 12
    kw: dict[str, Any] = {"model": "openai/gpt-3.5-turbo-instruct", "api_base": provider.url, "api_key": SECRET,
                          "prompt": "say ok", "max_tokens": 2000, "stream": True, "max_retries": 0}
    if usage:
        kw["stream_options"] = {"include_usage": True}
    if mode == "sync":
        for _ in litellm.text_completion(**kw):
            pass
    else:
        async for _ in await litellm.atext_completion(**kw):
            pass
    sent = provider.state.log[-1]
    assert sent.stream and sent.path.endswith("/completions")
    await wait_until(_settled(limiter, sent, usage))
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)


async def test_the_sync_success_handler_leaves_async_calls_to_the_async_one(provider: FakeProvider,
                                                                             clock: FakeClock) -> None:
    """LiteLLM 1.83 also runs its sync success handler, in a worker thread, for async streams: a
    late one must not settle whatever call holds that id by then (a caller reusing its call id)."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 2}})
    stream = await litellm.acompletion(**chat_kwargs(provider, litellm_call_id="reused-id"), stream=True)
    assert limiter._engine.holds("reused-id")
    done = litellm.ModelResponse(usage=litellm.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))
    kwargs = {"litellm_call_id": "reused-id", "stream": False}
    assert limiter.logging_hook(kwargs, done, "acompletion") == (kwargs, done)
    assert limiter._engine.holds("reused-id")  # left to the async handler
    limiter.logging_hook(kwargs, done, "completion")
    assert not limiter._engine.holds("reused-id")  # a sync call's handler does settle it
    async for _ in stream:
        pass


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_stream_closed_by_its_caller_gives_its_slot_back(mode: str, provider: FakeProvider,
                                                                 clock: FakeClock) -> None:
    """``aclose()`` / ``close()`` on a stream read part-way: its concurrency slot comes back at once
    (it used to wait for the lease, 300 s, with every other caller queued behind it)."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}})
    provider.state.completion_tokens = 20
    if mode == "async":
        stream = await litellm.acompletion(**chat_kwargs(provider, stream=True))
        async for _ in stream:
            break
        await stream.aclose()
    else:
        stream = litellm.completion(**chat_kwargs(provider, stream=True))
        for _ in stream:
            break
        if not hasattr(stream, "close"):
            pytest.skip("this LiteLLM's sync stream has no close()")
        stream.close()
    assert global_usage(limiter)["in_flight"] == 0
    await litellm.acompletion(**chat_kwargs(provider))  # not queued behind the closed stream
    assert provider.state.count() == 2


@pytest.mark.parametrize("timeout", ["number", "text", "httpx"])
async def test_a_slow_call_given_a_timeout_keeps_its_slot_past_the_lease(timeout: str, provider: FakeProvider,
                                                                         clock: FakeClock) -> None:
    """A healthy call that is not streamed, slower than ``estimation.lease_seconds``, lost its
    concurrency slot while still running (only streams renew their lease): a second call went out
    beside it. A call given ``timeout=`` now holds its lease that long (plus a margin)."""
    make_limiter(clock, {"global": {"concurrent_requests": 1}, "estimation": {"lease_seconds": 2},
                         "queue": {"max_wait_seconds": 0}})
    provider.state.push(Scripted(status=200, delay=0.5))
    import httpx

    given = {"number": 10, "text": "10", "httpx": httpx.Timeout(10.0)}[timeout]
    slow = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider, timeout=given)))
    await wait_until(lambda: provider.state.in_flight == 1)
    clock.advance(5)  # past the 2 s lease, within the call's 10 s
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**chat_kwargs(provider))
    await slow
    assert provider.state.count() == 1 and provider.state.max_in_flight == 1


def test_a_call_lease_is_capped() -> None:
    """A timeout gives a call at most an hour of lease (a process that dies holds its slots in
    Redis that long: ``timeout=9_999_000`` held them for 116 days)."""
    import decimal

    import httpx

    from hive_ratelimit_plugin.plugin import _call_lease

    assert _call_lease({"timeout": 9_999_000}, 300) == 3600
    for unbounded in (1e9, "1e9", float("inf"), httpx.Timeout(5.0, read=None), httpx.Timeout(None)):
        assert _call_lease({"timeout": unbounded}, 300) == 3600, unbounded
    assert _call_lease({"timeout": decimal.Decimal("120")}, 2) == 150
    assert _call_lease({"timeout": True}, 2) == _call_lease({"timeout": float("nan")}, 2) == 0
    assert _call_lease({"timeout": 6000}, 7200) == 0  # (0: the configured lease, longer, applies)
    assert _call_lease({"timeout": 100}, 300) == 0 and _call_lease({"timeout": "soon"}, 2) == 0


@pytest.mark.parametrize(("style", "stream"), [("anthropic", False), ("anthropic", True), ("openai", False)])
async def test_prompt_cache_reads_leave_room_under_an_input_token_limit(style: str, stream: bool,
                                                                       provider: FakeProvider,
                                                                       clock: FakeClock) -> None:
    """Anthropic's input-tokens-per-minute limit does not count the tokens a call reads from the
    prompt cache; ``input_tokens_per_minute`` does not either. An agent whose prompt is mostly
    read from the cache runs back to back under an input limit smaller than two prompts (it was
    held: each call counted its whole prompt). A token limit still counts them all (OpenAI counts
    cache reads in its TPM)."""
    limiter = make_limiter(clock, {"global": {"input_tokens_per_minute": 1200, "tokens_per_minute": 100_000},
                                   "queue": {"max_wait_seconds": 0}})
    provider.state.cached_prompt_tokens = 600  # of a prompt of ~750 tokens
    kwargs = chat_kwargs(provider, messages=[{"role": "user", "content": " ".join(["word"] * 600)}], max_tokens=5)
    if style == "anthropic":
        kwargs.update(model="anthropic/claude-sonnet-4-5-20250929", api_base=provider.root)
    for _ in range(3):
        await _consume_async(await litellm.acompletion(**kwargs, stream=stream))
        await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
    sent = provider.state.log
    assert len(sent) == 3 and all(r.prompt_tokens > 600 for r in sent)
    await wait_until(lambda: global_usage(limiter)["tokens_per_minute"]["used"]  # (a stream: settled after its end)
                     == sum(r.prompt_tokens + r.completion_tokens for r in sent))
    assert global_usage(limiter)["input_tokens_per_minute"]["used"] == sum(r.prompt_tokens - 600 for r in sent)


async def test_the_specifications_model_key_holds_the_calls_to_its_snapshots(provider: FakeProvider,
                                                                           clock: FakeClock) -> None:
    """The specification's ``anthropic: {claude-sonnet-4: ...}`` holds a real call to
    ``anthropic/claude-sonnet-4-20250514`` (it matched nothing, silently)."""
    make_limiter(clock, {"providers": {"anthropic": {"claude-sonnet-4": {"requests_per_minute": 1}}},
                         "queue": {"max_wait_seconds": 0}})
    kwargs = chat_kwargs(provider, model="anthropic/claude-sonnet-4-20250514", api_base=provider.root, max_tokens=5)
    await litellm.acompletion(**kwargs)
    with pytest.raises(RateLimitQueueTimeout) as info:
        await litellm.acompletion(**kwargs)
    assert info.value.limit == "requests_per_minute"
    assert info.value.scope == "model:anthropic/claude-sonnet-4-20250514"
    assert provider.state.count() == 1


async def test_a_prompt_larger_than_an_input_limit_is_refused_with_what_to_do(provider: FakeProvider,
                                                                              clock: FakeClock) -> None:
    """The whole prompt is reserved before the call (how much the provider will read from its
    cache is known only from the answer): a prompt larger than ``input_tokens_per_minute`` can
    never be admitted, however much of it is cached, and the error says so and what to do (it
    said "lower max_tokens", which changes nothing here)."""
    make_limiter(clock, {"global": {"input_tokens_per_minute": 500}})
    provider.state.cached_prompt_tokens = 600
    with pytest.raises(RequestTooLargeError, match=r"shorten the prompt or raise the limit.*prompt cache"):
        await litellm.acompletion(**chat_kwargs(provider, messages=[{"role": "user", "content": "word " * 600}]))
    assert provider.state.count() == 0


@pytest.mark.parametrize("marked", [True, False], ids=["cache_control", "no-marks"])
async def test_a_turn_whose_prefix_is_cached_reserves_only_the_rest_under_an_input_limit(
        marked: bool, provider: FakeProvider, clock: FakeClock) -> None:
    """An agent's turns share their prefix: after a turn that left 600 tokens in Anthropic's
    prompt cache, the next turn that asks for caching reserves only the rest of its prompt under
    ``input_tokens_per_minute`` (Anthropic does not count cache reads there), so three ~750-token
    turns run back to back under a limit of 1,100. Without ``cache_control`` nothing is read from
    the cache: the second turn waits. Each settles at what its answer reports."""
    limiter = make_limiter(clock, {"global": {"input_tokens_per_minute": 1100}, "queue": {"max_wait_seconds": 0}})
    block: dict[str, Any] = {"type": "text", "text": " ".join(["word"] * 600)}
    if marked:
        block["cache_control"] = {"type": "ephemeral"}
    kwargs = chat_kwargs(provider, model="anthropic/claude-sonnet-4-5-20250929", api_base=provider.root,
                         max_tokens=5, messages=[{"role": "user", "content": [block]}])
    provider.state.cache_written_tokens = 600  # the first turn writes the prefix
    await litellm.acompletion(**kwargs)
    provider.state.cache_written_tokens, provider.state.cached_prompt_tokens = 0, 600  # later turns read it
    if not marked:
        with pytest.raises(RateLimitQueueTimeout):
            await litellm.acompletion(**kwargs)
        assert provider.state.count() == 1
        return
    for _ in range(2):
        await litellm.acompletion(**kwargs)
    sent = provider.state.log
    assert len(sent) == 3
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
    # the first turn's whole prompt (a cache write counts), the others' uncached rest
    used = global_usage(limiter)["input_tokens_per_minute"]["used"]
    assert used == sent[0].prompt_tokens + sum(r.prompt_tokens - 600 for r in sent[1:])


def _cached_turn(provider: FakeProvider, text: str) -> dict[str, Any]:
    block = {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}
    return chat_kwargs(provider, model="anthropic/claude-sonnet-4-5-20250929", api_base=provider.root,
                       max_tokens=5, messages=[{"role": "user", "content": [block]}])


async def test_another_prompt_of_the_same_caller_expects_no_cache_read(provider: FakeProvider,
                                                                       clock: FakeClock) -> None:
    """The expected cache read holds only for a prompt that begins with the one that left it:
    four other prompts of the same caller at once (another task, a changed system prompt) miss
    the cache, and Anthropic counts all of them. Reserved whole, they stay within the limit as
    the provider counts it (with the guess keyed by caller alone, all four went, 3.4 times the
    limit). Found by helper-50."""
    limit = 1100
    limiter = make_limiter(clock, {"global": {"input_tokens_per_minute": limit}, "queue": {"max_wait_seconds": 0}})
    provider.state.cache_written_tokens = 600
    await litellm.acompletion(**_cached_turn(provider, " ".join(["word"] * 600)))
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
    provider.state.cache_written_tokens, provider.state.cached_prompt_tokens = 610, 0
    provider.state.latency = 0.3
    await asyncio.gather(*(litellm.acompletion(**_cached_turn(provider, " ".join(["word"] * 600) + f" task{i}"))
                           for i in range(4)), return_exceptions=True)
    assert sum(r.prompt_tokens for r in provider.state.log) <= limit
    assert not limiter._cache_prompts  # (the prompts of the calls refused are not kept)


async def test_the_next_turn_of_a_conversation_expects_its_prefix_from_the_cache(provider: FakeProvider,
                                                                               clock: FakeClock) -> None:
    """A next turn extends the conversation (its cache mark moved to its new last message): it
    is reserved without the prefix the last turn left in the cache, and fits a limit its whole
    prompt would not after the first turn's."""
    limiter = make_limiter(clock, {"global": {"input_tokens_per_minute": 1100}, "queue": {"max_wait_seconds": 0}})
    first = _cached_turn(provider, " ".join(["word"] * 600))
    provider.state.cache_written_tokens = 600
    await litellm.acompletion(**first)
    provider.state.cache_written_tokens, provider.state.cached_prompt_tokens = 0, 600
    earlier = {"role": "user", "content": [{"type": "text", "text": " ".join(["word"] * 600)}]}  # (mark moved)
    nxt = _cached_turn(provider, "and now this")
    nxt["messages"] = [earlier, {"role": "assistant", "content": "ok"}, *nxt["messages"]]
    await litellm.acompletion(**nxt)
    assert provider.state.count() == 2
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)


def test_a_prompt_that_cannot_be_fingerprinted_expects_no_cache_read() -> None:
    """The fingerprint of a prompt (for the expected cache read) never raises into a call: a
    structure nested past the recursion limit, or an object whose repr fails, gives no guess."""
    from hive_ratelimit_plugin.plugin import _prompt_print

    deep: dict[str, Any] = {}
    cur = deep
    for _ in range(5000):
        cur["x"] = {}
        cur = cur["x"]

    class Weird:
        def __repr__(self) -> str:
            raise ValueError("no repr")

    assert _prompt_print({"messages": [{"role": "user", "content": deep}]}) is None
    assert _prompt_print({"messages": [{"role": "user", "content": [Weird()]}]}) is None
    plain = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}]}
    unmarked = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert _prompt_print(plain) == _prompt_print(unmarked) is not None  # (marks move from turn to turn)


ONE_A_MINUTE = {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 0}}


@pytest.mark.parametrize("how", ["litellm.main.completion", "LiteLLM client"])
def test_sync_completion_reached_through_litellm_main_is_limited(how: str, provider: FakeProvider,
                                                                 clock: FakeClock) -> None:
    """``from litellm.main import completion`` and LiteLLM's own OpenAI-style client
    (``litellm.LiteLLM().chat.completions.create``, which calls ``litellm.main.completion``) were
    neither limited nor counted: three calls under a 1-a-minute limit all reached the provider.
    Found by helper-61."""
    make_limiter(clock, ONE_A_MINUTE)
    kw = chat_kwargs(provider)

    def call() -> None:
        if how == "litellm.main.completion":
            litellm.main.completion(**kw)
        else:
            litellm.LiteLLM(api_key=kw["api_key"]).chat.completions.create(**kw)

    call()
    with pytest.raises(RateLimitQueueTimeout):
        call()
    with pytest.raises(RateLimitQueueTimeout):  # and it was counted: the usual entry point is full too
        litellm.completion(**kw)
    assert provider.state.count() == 1


async def test_a_subclass_that_logs_success_events_gets_litellms_redaction(provider: FakeProvider,
                                                                         clock: FakeClock) -> None:
    """HiveLimiter skips LiteLLM's per-callback redaction of the success events' payload (it reads
    no success event, and LiteLLM 1.83 runs the redaction for every CustomLogger on every call); a
    subclass that does read them, with message logging turned off, still sees the messages
    redacted."""
    from hive_ratelimit_plugin import HiveLimiter

    from .helpers import with_backend

    class Logged(HiveLimiter):
        async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any,
                                          end_time: Any) -> None:
            seen.append(str(kwargs.get("standard_logging_object")))

    seen: list[str] = []
    details = {"standard_logging_object": {"messages": [{"role": "user", "content": "private words"}]}}
    plain = HiveLimiter(with_backend({}), clock=clock)
    plain.turn_off_message_logging = True
    assert plain.redact_standard_logging_payload_from_model_call_details(details) is details  # (nothing reads it)
    logged = Logged(with_backend({"global": {"requests_per_minute": 100}}), clock=clock)
    logged.turn_off_message_logging = True
    litellm.callbacks.append(logged)
    await litellm.acompletion(**chat_kwargs(provider, messages=[{"role": "user", "content": "private words"}]))
    await wait_until(lambda: bool(seen))
    assert "private words" not in seen[0] and "redacted" in seen[0]
    assert global_usage(logged)["requests_per_minute"]["used"] == 1 and global_usage(logged)["in_flight"] == 0
