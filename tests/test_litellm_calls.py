"""Every LiteLLM entry point, through LiteLLM's real transports, against the fake provider."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import RateLimitQueueTimeout, RequestTooLargeError
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import chat_kwargs, make_limiter

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
    clock.advance(61)
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


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    # Failure events come from LiteLLM's logging thread; give them a moment (bounded).
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
    make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 10}})
    await litellm.acompletion(**chat_kwargs(provider))
    task = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider)))
    await asyncio.sleep(0.01)
    clock.advance(10.5)
    with pytest.raises(RateLimitQueueTimeout) as info:
        await asyncio.wait_for(task, 5)
    assert "no request was sent" in str(info.value)
    assert provider.state.count() == 1


async def test_full_queue_rejects_at_once(provider: FakeProvider, clock: FakeClock) -> None:
    """With the queue full, a new call fails at once instead of waiting."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_size": 1}})
    await litellm.acompletion(**chat_kwargs(provider))
    waiting = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider)))
    await asyncio.sleep(0.01)
    with pytest.raises(RateLimitQueueTimeout, match="queue is full"):
        await litellm.acompletion(**chat_kwargs(provider))
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
    await asyncio.sleep(0.01)
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

    # The slot is free and the exact usage counted as soon as the last chunk has been read.
    assert limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 0
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


def test_request_larger_than_limit_fails_fast(provider: FakeProvider, clock: FakeClock) -> None:
    """A call that can never fit raises RequestTooLargeError at once, with no request sent."""
    make_limiter(clock, {"global": {"tokens_per_minute": 1000}})
    with pytest.raises(RequestTooLargeError, match="tokens_per_minute"):
        litellm.completion(**chat_kwargs(provider, max_tokens=5000))
    assert provider.state.count() == 0


def test_retries_without_readmission_are_counted(provider: FakeProvider, clock: FakeClock) -> None:
    """Retries LiteLLM sends itself (the openai SDK on a 429) still count as requests."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100}})
    provider.state.push(Scripted(status=429, headers={"retry-after-ms": "1"}))
    litellm.completion(**chat_kwargs(provider, max_retries=1))
    assert provider.state.count() == 2
    used = limiter.get_usage_stats()["levels"]["global"]["global"]["requests_per_minute"]["used"]
    assert used >= 1


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
def test_no_success_event_is_overridden(cls_path: str) -> None:
    """LiteLLM schedules success-logging work on every call for a callback that overrides
    ``async_log_success_event`` (~57k CPU instructions per call on 1.110, callgrind), and runs its
    whole sync success handler in a worker thread for every *async* call when a callback overrides
    only ``log_success_event`` (~13 %). Calls settle inline and streams settle themselves instead
    (``_settle_when_exhausted``), so neither is overridden."""
    import importlib

    from litellm.integrations.custom_logger import CustomLogger

    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert cls.log_success_event is CustomLogger.log_success_event
    assert cls.async_log_success_event is CustomLogger.async_log_success_event


def _tokens_used(limiter: Any) -> float:
    return float(limiter.get_usage_stats()["levels"]["global"]["global"]["tokens_per_minute"]["used"])


def _estimate(n_chunks: int) -> int:
    """What a stream without usage settles to: its prompt estimate plus its output text's tokens."""
    from hive_ratelimit_plugin._tokens import count_messages, count_text

    model = "openai/gpt-4o-mini"
    return count_messages(model, [{"role": "user", "content": "hello there"}]) + count_text(model, "ok " * n_chunks)


@pytest.mark.parametrize("usage", [True, False], ids=["with-usage", "without-usage"])
def test_sync_stream_settles_when_read_to_the_end(usage: bool, provider: FakeProvider, clock: FakeClock) -> None:
    """A sync stream keeps its reservation while it is read and settles, on the caller's thread, as
    soon as it is exhausted: to the provider's usage, or else to its prompt plus the streamed text."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100000, "concurrent_requests": 2}})
    provider.state.completion_tokens = 20
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
    resp = litellm.completion(**chat_kwargs(provider, max_tokens=2000), stream=True, **extra)
    assert isinstance(resp, litellm.CustomStreamWrapper) and type(resp).__name__ == "CustomStreamWrapper"
    assert _tokens_used(limiter) > 2000  # prompt + max_tokens reserved while the stream is open
    for _ in resp:
        pass
    sent = provider.state.log[-1]
    expected = sent.prompt_tokens + sent.completion_tokens if usage else _estimate(20)
    assert _tokens_used(limiter) == expected
    assert limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 0


async def _router_stream(p: FakeProvider, **extra: Any) -> Any:
    return await _router(p).acompletion(model="fast", messages=[{"role": "user", "content": "hello there"}],
                                        max_tokens=2000, stream=True, **extra)


async def _plain_stream(p: FakeProvider, **extra: Any) -> Any:
    return await litellm.acompletion(**chat_kwargs(p, max_tokens=2000), stream=True, **extra)


@pytest.mark.parametrize("usage", [True, False], ids=["with-usage", "without-usage"])
@pytest.mark.parametrize("entry", ["acompletion", "router.acompletion"])
async def test_async_stream_settles_when_read_to_the_end(entry: str, usage: bool, provider: FakeProvider,
                                                         clock: FakeClock) -> None:
    """An async stream settles the moment its last chunk has been read (no success event needed)."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100000, "concurrent_requests": 2}})
    provider.state.completion_tokens = 20
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
    resp = await (_plain_stream if entry == "acompletion" else _router_stream)(provider, **extra)
    assert isinstance(resp, litellm.CustomStreamWrapper)
    assert _tokens_used(limiter) > 2000
    async for _ in resp:
        pass
    sent = provider.state.log[-1]
    expected = sent.prompt_tokens + sent.completion_tokens if usage else _estimate(20)
    assert _tokens_used(limiter) == expected
    assert limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 0


async def test_partly_read_stream_keeps_its_reservation(provider: FakeProvider, clock: FakeClock) -> None:
    """Reading part of a stream settles nothing: the rest may still come (or the lease reclaims it)."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100000}})
    provider.state.completion_tokens = 20
    resp = await _plain_stream(provider)
    for _ in range(3):
        await resp.__anext__()
    assert _tokens_used(limiter) > 2000


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_text_completion_stream_settles_to_its_text(mode: str, provider: FakeProvider,
                                                          clock: FakeClock) -> None:
    """A text-completion stream without usage settles to its prompt plus the streamed text."""
    from hive_ratelimit_plugin._tokens import count_input, count_text

    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100000}})
    provider.state.completion_tokens = 12
    kw: dict[str, Any] = {"model": "openai/gpt-3.5-turbo-instruct", "api_base": provider.url, "api_key": SECRET,
                          "prompt": "say ok", "max_tokens": 2000, "stream": True, "max_retries": 0}
    if mode == "sync":
        for _ in litellm.text_completion(**kw):
            pass
    else:
        async for _ in await litellm.atext_completion(**kw):
            pass
    model = "openai/gpt-3.5-turbo-instruct"
    assert _tokens_used(limiter) == count_input(model, "say ok") + count_text(model, "ok " * 12)
