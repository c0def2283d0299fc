"""Provider 429s: retries, shared cooldowns, pacing, adaptive limits, circuit breaker, API keys.

Real LiteLLM calls against the fake provider; time is a FakeClock moved by a Ticker, so a
provider's "retry after 2 s" takes milliseconds of real time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, ClassVar

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter, RateLimitQueueTimeout
from hive_ratelimit_plugin.errors import CircuitOpenError, ConfigError, HiveRateLimitError
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import Recorder, Ticker, chat_kwargs, max_in_any_window, wait_until, with_backend

# Contract: every test here runs against the in-memory and the Redis backend.
pytestmark = pytest.mark.usefixtures("contract_backend")


async def _until_cooling(limiter: HiveLimiter) -> None:
    for _ in range(2000):
        if any("cooldown_seconds" in p for p in limiter.get_usage_stats()["providers"].values()):
            return
        await asyncio.sleep(0.001)
    raise AssertionError("no cooldown registered")


def make(clock: FakeClock, config: dict[str, Any] | None = None) -> tuple[HiveLimiter, Recorder]:
    limiter = HiveLimiter(with_backend(config or {}), clock=clock)
    clock.attach(limiter)
    recorder = Recorder(clock)
    litellm.callbacks.extend([limiter, recorder])
    return limiter, recorder


def no_sdk_retries(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.pop("max_retries", None)  # leave it to the limiter, as a user would
    return kwargs


def too_many(after: str = "2") -> Scripted:
    return Scripted(status=429, headers={"retry-after": after})


async def test_async_429_is_retried_after_retry_after(provider: FakeProvider, clock: FakeClock) -> None:
    """Two 429s then success: the caller gets the answer; retries honour Retry-After."""
    limiter, rec = make(clock)
    provider.state.push(too_many("2"), too_many("2"))
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        resp = await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider)))
    assert resp.choices[0].message.content
    assert provider.state.count() == 3 and provider.state.count(429) == 2
    times = [t for t, _ in rec.sent]
    assert times[1] - times[0] >= 2.0 and times[2] - times[1] >= 2.0
    assert limiter.get_usage_stats()["retried_total"] == 2
    assert limiter.get_usage_stats()["levels"]["model"]["model:openai/gpt-4o-mini"]["in_flight"] == 0


_CLOSED_LOOP_SCRIPT = """
import asyncio, json, sys
import litellm
from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.testing import FakeProvider, Scripted
litellm.suppress_debug_info = True
config = json.loads(sys.argv[1])
with FakeProvider() as p:
    kw = dict(model="openai/gpt-4o-mini", api_base=p.url, api_key="sk-x", messages=[{"role": "user", "content": "hi"}])
    first = HiveLimiter({})
    litellm.callbacks.append(first)
    asyncio.run(litellm.acompletion(**kw))  # an earlier event loop, now closed
    litellm.callbacks.remove(first)
    limiter = HiveLimiter(config)
    litellm.callbacks.append(limiter)
    p.state.push(Scripted(status=429, headers={"retry-after": "0.2"}))
    async def three():
        return await asyncio.gather(*(litellm.acompletion(**kw) for _ in range(3)), return_exceptions=True)
    results = asyncio.run(three())
    stats = limiter.get_usage_stats()
    print(json.dumps({"results": [type(r).__name__ for r in results],
                      "in_flight": stats["levels"]["global"]["global"]["in_flight"]}))
"""


def test_429_frees_its_slot_even_without_litellm_failure_event(tmp_path: Any) -> None:
    """After an earlier event loop made calls and closed, LiteLLM delivers a failed attempt's
    failure event late or never; the retry loop settles the attempt itself, so the slot of a
    429'd attempt is free at once for its own retry and for the calls waiting behind it.
    (In a subprocess: a closed loop leaves LiteLLM's logging worker in a state that would leak
    into the tests after this one.)"""
    import json
    import os
    import subprocess
    import sys

    config = with_backend({"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 20},
                           "state_path": str(tmp_path / "s.sqlite")})
    out = subprocess.run([sys.executable, "-c", _CLOSED_LOOP_SCRIPT, json.dumps(config)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"results": ["ModelResponse"] * 3, "in_flight": 0}


def test_sync_429_is_retried(provider: FakeProvider, clock: FakeClock) -> None:
    """The same for sync calls: the calling thread waits out the cooldown and retries."""
    limiter, rec = make(clock)
    provider.state.push(too_many("3"))
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        litellm.completion(**no_sdk_retries(chat_kwargs(provider)))
    assert provider.state.count() == 2
    assert rec.sent[1][0] - rec.sent[0][0] >= 3.0


def _embedding_kwargs(provider: FakeProvider) -> dict[str, Any]:
    # No max_retries: left to the limiter, as a user would.
    return {"model": "openai/text-embedding-3-small", "api_base": provider.url,
            "api_key": "sk-test-SECRET-0123456789", "input": ["a b c"]}


def _assert_embedding_429_retried_by_the_limiter(limiter: HiveLimiter, rec: Recorder, provider: FakeProvider,
                                                 resp: Any) -> None:
    assert resp.data and resp.data[0]["embedding"]
    # One 429, one retry, both sent by the limiter: the second attempt waited out Retry-After on
    # the limiter's (fake) clock and was admitted like any call. The SDK's own retry would have
    # slept 3 real seconds, unseen: admitted_total 1, retried_total 0, one pre-call record.
    assert provider.state.count() == 2 and provider.state.count(429) == 1
    stats = limiter.get_usage_stats()
    assert stats["admitted_total"] == 2 and stats["retried_total"] == 1
    assert len(rec.sent) == 2 and rec.sent[1][0] - rec.sent[0][0] >= 3.0
    assert stats["levels"]["model"]["model:openai/text-embedding-3-small"]["in_flight"] == 0


def test_sync_embedding_429_is_retried_by_the_limiter_not_the_sdk(provider: FakeProvider, clock: FakeClock) -> None:
    """LiteLLM's OpenAI embedding handler reads ``max_retries or 2``: a plain ``max_retries=0``
    would become two hidden SDK retries. The guard's 0 survives it."""
    limiter, rec = make(clock)
    provider.state.push(too_many("3"))
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        resp = litellm.embedding(**_embedding_kwargs(provider))
    _assert_embedding_429_retried_by_the_limiter(limiter, rec, provider, resp)


async def test_async_embedding_429_is_retried_by_the_limiter_not_the_sdk(provider: FakeProvider,
                                                                         clock: FakeClock) -> None:
    limiter, rec = make(clock)
    provider.state.push(too_many("3"))
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        resp = await litellm.aembedding(**_embedding_kwargs(provider))
    _assert_embedding_429_retried_by_the_limiter(limiter, rec, provider, resp)


def test_the_embedding_zero_is_zero() -> None:
    """The truthy 0 handed to embeddings is 0 wherever it is used as a number or written out."""
    import json

    from hive_ratelimit_plugin import plugin

    zero = plugin._EMBEDDING_NO_RETRIES

    assert zero == 0 and zero + 2 == 2 and int(zero) == 0 and list(range(zero)) == []
    assert (zero or 2) == 0  # what LiteLLM's embedding handler computes
    assert json.dumps({"max_retries": zero}) == '{"max_retries": 0}' and repr(zero) == "0"


async def test_stream_429_before_first_chunk_is_retried(provider: FakeProvider, clock: FakeClock) -> None:
    """A stream refused with 429 is retried, then streams normally."""
    limiter, _ = make(clock)
    provider.state.push(too_many("1"))
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        resp = await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider)), stream=True)
        chunks = [c async for c in resp]
    assert chunks and provider.state.count() == 2


async def test_anthropic_429_and_529_are_retried(provider: FakeProvider, clock: FakeClock) -> None:
    """Anthropic-style provider: a 429 and a 529 "overloaded" both cool down and retry."""
    limiter, _ = make(clock)
    provider.state.push(too_many("1"), Scripted(status=529, body={
        "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        resp = await litellm.acompletion(model="anthropic/claude-3-5-haiku-20241022", api_base=provider.root,
                                         api_key="sk-ant-test", max_tokens=5,
                                         messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "ok"
    assert provider.state.count() == 3


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_retries_exhausted_raise_rate_limit_error(mode: str, provider: FakeProvider,
                                                         clock: FakeClock) -> None:
    """After max_attempts the caller gets litellm.RateLimitError with retry_after; nothing more is sent."""
    limiter, _ = make(clock, {"retry": {"max_attempts": 3}})
    provider.state.push(*[too_many("1")] * 10)
    with (Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0),
          pytest.raises(litellm.RateLimitError) as info):
        if mode == "sync":
            litellm.completion(**no_sdk_retries(chat_kwargs(provider)))
        else:
            await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider)))
    assert provider.state.count() == 3  # exactly max_attempts: no hidden SDK retries
    assert info.value.retry_after == 1.0  # type: ignore[attr-defined]


async def test_retry_after_beyond_max_wait_fails_at_once(provider: FakeProvider, clock: FakeClock) -> None:
    """A Retry-After longer than retry.max_wait_seconds is not waited for."""
    make(clock, {"retry": {"max_wait_seconds": 30}})
    provider.state.push(too_many("100"))
    with pytest.raises(litellm.RateLimitError) as info:
        await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider)))
    assert info.value.retry_after == 100  # type: ignore[attr-defined]
    assert provider.state.count() == 1


async def test_cooldown_holds_every_caller_then_releases_them_paced(provider: FakeProvider,
                                                                    clock: FakeClock) -> None:
    """After a 429, new callers of that model wait for the cooldown, then go out paced, not as a herd."""
    limiter, rec = make(clock)
    provider.state.push(too_many("10"))
    first = asyncio.create_task(litellm.acompletion(**no_sdk_retries(chat_kwargs(provider))))
    await _until_cooling(limiter)
    t0 = clock()
    others = [asyncio.create_task(litellm.acompletion(**no_sdk_retries(chat_kwargs(provider))))
              for _ in range(5)]
    # (The clock stands still until the others are on their way, and then moves only while a call
    # waits: a stalled event loop cannot carry it past the cooldown before they arrive.)
    with Ticker(clock, step=0.02, when=lambda: limiter._engine.queue_length > 0):
        await asyncio.gather(first, *others)
    sent_after = sorted(t for t, _ in rec.sent[1:])
    assert len(sent_after) == 6
    assert min(sent_after) >= t0 + 9.9  # nobody jumped the cooldown
    # Paced (one every 0.1 s by default), not all at once: 6 calls span at least 5 intervals.
    assert sent_after[-1] - sent_after[0] >= 0.45


async def test_other_models_are_not_cooled(provider: FakeProvider, clock: FakeClock) -> None:
    """A 429 on one model does not hold calls to another model."""
    make(clock)
    provider.state.push(too_many("60"))
    task = asyncio.create_task(litellm.acompletion(**no_sdk_retries(chat_kwargs(provider))))
    while provider.state.count() < 1:
        await asyncio.sleep(0.001)
    await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider, model="openai/gpt-4o")))
    assert provider.state.count() == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_learned_limit_from_headers_is_enforced(provider: FakeProvider, clock: FakeClock) -> None:
    """x-ratelimit-limit-requests teaches the limiter the provider's real limit, shown in stats."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.requests_per_window = 3  # the provider enforces 3 per minute and says so
    for _ in range(3):
        await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider)))
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider)))
    assert provider.state.count(429) == 0  # held here, not refused there
    stats = limiter.get_usage_stats()
    assert stats["providers"]["model:openai/gpt-4o-mini"]["learned_requests_per_minute"] == 3
    assert stats["levels"]["model"]["model:openai/gpt-4o-mini"]["learned_requests_per_minute"]["limit"] == 3


async def test_remaining_zero_waits_for_reset_instead_of_a_429(provider: FakeProvider, clock: FakeClock) -> None:
    """x-ratelimit-remaining-requests: 0 with a reset time makes the next call wait for the reset."""
    limiter, rec = make(clock)
    provider.state.push(Scripted(status=200, headers={"x-ratelimit-remaining-requests": "0",
                                                      "x-ratelimit-reset-requests": "5s"}))
    await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider)))
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider)))
    assert rec.sent[1][0] - rec.sent[0][0] >= 5.0
    assert provider.state.count(429) == 0


async def test_aimd_lowers_the_rate_after_429s_and_recovers(provider: FakeProvider, clock: FakeClock) -> None:
    """Repeated 429s lower the learned rate (multiplicative decrease); successes raise it again."""
    limiter, _ = make(clock)
    with Ticker(clock, step=0.1, when=lambda: limiter._engine.queue_length > 0):
        for i in range(12):
            await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider, messages=[
                {"role": "user", "content": f"m{i}"}])))
        provider.state.push(too_many("1"), too_many("1"))  # two 429s within a minute
        await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider)))
    learned = limiter.get_usage_stats()["providers"]["model:openai/gpt-4o-mini"]
    lowered = learned["adaptive_requests_per_minute"]
    # Decreased: 70 % of the pace the 14 requests were sent at (then one success added ~0.1);
    # they span at least a second of the test's clock.
    assert lowered <= 14 * 60 * 0.7 + 0.2
    with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0):
        for i in range(40):
            await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider, messages=[
                {"role": "user", "content": f"n{i}"}])))
    after = limiter.get_usage_stats()["providers"]["model:openai/gpt-4o-mini"]
    assert after.get("adaptive_requests_per_minute", float("inf")) > lowered


async def test_circuit_breaker_opens_probes_and_closes(provider: FakeProvider, clock: FakeClock) -> None:
    """N consecutive 5xx open the circuit; calls then fail fast; after the cooldown one probe
    goes through and its success closes the circuit."""
    limiter, _ = make(clock, {"circuit_breaker": {"failure_threshold": 3, "cooldown_seconds": 30},
                              "queue": {"max_wait_seconds": 5}})
    events: list[dict[str, Any]] = []
    limiter.on_event(events.append)
    provider.state.push(*[Scripted(status=500)] * 3)
    for _ in range(3):
        with pytest.raises(litellm.InternalServerError):
            await litellm.acompletion(**chat_kwargs(provider))
    with pytest.raises(CircuitOpenError) as info:
        await litellm.acompletion(**chat_kwargs(provider))
    assert info.value.retry_after == pytest.approx(30, abs=0.01)
    assert provider.state.count() == 3  # nothing sent while open
    assert limiter.get_usage_stats()["providers"]["model:openai/gpt-4o-mini"]["circuit"] == "open"
    clock.advance(30)
    await litellm.acompletion(**chat_kwargs(provider))  # the probe
    assert limiter.get_usage_stats()["providers"]["model:openai/gpt-4o-mini"]["circuit"] == "closed"
    assert [e["type"] for e in events if e["type"].startswith("circuit")] == ["circuit_opened", "circuit_closed"]


async def test_an_open_circuit_tells_the_failures_that_opened_it(provider: FakeProvider, clock: FakeClock) -> None:
    """A call sent before the circuit opened, answered after it, does not reset the failure count
    the open circuit's error gives: it read "open after 0 consecutive provider failures"."""
    limiter, _ = make(clock, {"circuit_breaker": {"failure_threshold": 2, "cooldown_seconds": 30},
                              "queue": {"max_wait_seconds": 5}})
    provider.state.push(Scripted(status=200, delay=0.5), Scripted(status=500), Scripted(status=500))
    slow = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider)))
    await wait_until(lambda: len(provider.state.script) == 2)  # (the slow one is being answered)
    for _ in range(2):
        with pytest.raises(litellm.InternalServerError):
            await litellm.acompletion(**chat_kwargs(provider))
    await slow  # its success lands while the circuit is open
    with pytest.raises(CircuitOpenError, match="open after 2 consecutive provider failures"):
        await litellm.acompletion(**chat_kwargs(provider))
    assert limiter.get_usage_stats()["providers"]["model:openai/gpt-4o-mini"]["circuit"] == "open"
    clock.advance(30)
    await litellm.acompletion(**chat_kwargs(provider))  # the probe closes it
    assert limiter.get_usage_stats()["providers"]["model:openai/gpt-4o-mini"] == {"circuit": "closed"}


async def test_half_open_circuit_sends_one_probe_at_a_time(provider: FakeProvider, clock: FakeClock) -> None:
    """After the cooldown one probe goes; calls arriving while it is in flight wait for its
    outcome instead of going as more probes to a provider that may still be failing, and go
    once its success has closed the circuit."""
    limiter, _ = make(clock, {"circuit_breaker": {"failure_threshold": 2, "cooldown_seconds": 10},
                              "queue": {"max_wait_seconds": 30}})
    provider.state.push(*[Scripted(status=503)] * 2)
    for _ in range(2):
        with pytest.raises(litellm.ServiceUnavailableError):
            await litellm.acompletion(**chat_kwargs(provider))
    clock.advance(10)
    provider.state.push(Scripted(status=200, delay=0.5))  # the probe: a slow success
    probe = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider)))
    await wait_until(lambda: limiter.get_usage_stats()["levels"]["model"]["model:openai/gpt-4o-mini"]["in_flight"] == 1)
    others = [asyncio.create_task(litellm.acompletion(**chat_kwargs(provider))) for _ in range(3)]
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 3)
    assert limiter.get_usage_stats()["providers"]["model:openai/gpt-4o-mini"]["circuit"] == "half_open"
    await asyncio.wait_for(asyncio.gather(probe, *others), 10)
    assert provider.state.count() == 2 + 4
    assert limiter.get_usage_stats()["providers"]["model:openai/gpt-4o-mini"]["circuit"] == "closed"


async def test_failed_probe_reopens_for_longer(provider: FakeProvider, clock: FakeClock) -> None:
    """A failed probe opens the circuit again, for twice as long."""
    make(clock, {"circuit_breaker": {"failure_threshold": 2, "cooldown_seconds": 10},
                 "queue": {"max_wait_seconds": 1}})
    provider.state.push(*[Scripted(status=503)] * 3)
    for _ in range(2):
        with pytest.raises(litellm.ServiceUnavailableError):
            await litellm.acompletion(**chat_kwargs(provider))
    clock.advance(10)
    with pytest.raises(litellm.ServiceUnavailableError):
        await litellm.acompletion(**chat_kwargs(provider))  # probe fails
    with pytest.raises(CircuitOpenError) as info:
        await litellm.acompletion(**chat_kwargs(provider))
    assert info.value.retry_after == pytest.approx(20, abs=0.01)


async def test_open_circuit_within_max_wait_waits(provider: FakeProvider, clock: FakeClock) -> None:
    """If the circuit reopens for a probe within the caller's max wait, the caller waits instead of failing."""
    limiter, _ = make(clock, {"circuit_breaker": {"failure_threshold": 1, "cooldown_seconds": 2},
                              "queue": {"max_wait_seconds": 60}})
    provider.state.push(Scripted(status=500))
    with pytest.raises(litellm.InternalServerError):
        await litellm.acompletion(**chat_kwargs(provider))
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        await litellm.acompletion(**chat_kwargs(provider))
    assert provider.state.count() == 2


@pytest.mark.parametrize("reopens_after", [2.0, 3.0])
async def test_a_call_due_by_its_deadline_goes_when_it_wakes_late(reopens_after: float, provider: FakeProvider,
                                                                  clock: FakeClock) -> None:
    """A waiting call whose breaker reopens before or at its deadline (with the defaults, a
    failed probe's 60 s is the 60 s wait), but which wakes just after it (a busy event loop, a
    late timer), is still given its chance: it goes as the probe instead of timing out with
    "retry in 0.0s"."""
    limiter, _ = make(clock, {"circuit_breaker": {"failure_threshold": 1, "cooldown_seconds": reopens_after},
                              "queue": {"max_wait_seconds": 3}})
    provider.state.push(Scripted(status=500))
    with pytest.raises(litellm.InternalServerError):
        await litellm.acompletion(**chat_kwargs(provider))
    task = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider)))
    await wait_until(lambda: limiter._engine.queue_length == 1)
    with clock._lock:  # time passes the reopening and the deadline before the waiter runs again
        clock._now += 3.5
    limiter._engine.wake_all()
    resp = await asyncio.wait_for(task, 10)
    assert resp.choices[0].message.content
    assert provider.state.count() == 2


def _keys_env(monkeypatch: pytest.MonkeyPatch, provider: FakeProvider) -> None:
    monkeypatch.setenv("HIVE_TEST_KEY_A", "sk-key-AAAA-secret")
    monkeypatch.setenv("HIVE_TEST_KEY_B", "sk-key-BBBB-secret")
    monkeypatch.setattr(litellm, "api_base", provider.url)  # the provider's own endpoint, for these tests


def pooled(provider: FakeProvider, **extra: Any) -> dict[str, Any]:
    """A call to the provider's own endpoint (it names no ``api_base``), whose key the pool picks."""
    kw = chat_kwargs(provider, **extra)
    del kw["api_base"]
    return kw


async def test_api_keys_spread_load_and_429_cools_only_one_key(
    provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each call uses the key with most headroom; a 429 cools only that key; no key is ever shown."""
    caplog.set_level(logging.DEBUG, logger="hive_ratelimit_plugin")
    _keys_env(monkeypatch, provider)
    limiter, _ = make(clock, {"providers": {"openai": {"api_keys": [
        {"env": "HIVE_TEST_KEY_A", "requests_per_minute": 4},
        {"env": "HIVE_TEST_KEY_B", "requests_per_minute": 4}]}}, "queue": {"max_wait_seconds": 0}})
    for _ in range(4):
        await litellm.acompletion(**pooled(provider))
    used = [r.authorization for r in provider.state.log]
    assert used.count("Bearer sk-key-AAAA-secret") == 2 and used.count("Bearer sk-key-BBBB-secret") == 2
    # A 429 on the next call's key cools that key only: the retry goes out with the other key.
    provider.state.push(too_many("30"))
    await litellm.acompletion(**no_sdk_retries(pooled(provider)))
    last_two = [r.authorization for r in provider.state.log[-2:]]
    assert last_two[0] != last_two[1]
    stats = limiter.get_usage_stats()
    assert set(stats["levels"]["key"]) == {"key:openai/HIVE_TEST_KEY_A", "key:openai/HIVE_TEST_KEY_B"}
    text = repr(stats) + " ".join(r.getMessage() for r in caplog.records)
    assert "sk-key-" not in text


@pytest.mark.parametrize("router", [False, True], ids=["call", "router"])
async def test_a_call_to_its_own_api_base_keeps_its_own_api_key(router: bool, provider: FakeProvider,
                                                               clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The key pool is for the provider's own endpoint. A call (or a Router deployment) that names
    its own ``api_base``, here a self-hosted OpenAI-compatible server reached as ``openai/...``,
    keeps its own key: the pool's OpenAI key went to that server, and the call was billed to it.
    It says so once. A call to the provider's endpoint gets a pool key, its own key or not."""
    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    _keys_env(monkeypatch, provider)
    limiter, _ = make(clock, {"providers": {"openai": {"api_keys": [
        {"env": "HIVE_TEST_KEY_A", "requests_per_minute": 1}, {"env": "HIVE_TEST_KEY_B", "requests_per_minute": 1}]}},
        "queue": {"max_wait_seconds": 0}})
    own = "sk-self-hosted-token-0123456789"
    if router:
        r = litellm.Router(model_list=[{"model_name": "local", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": provider.url, "api_key": own}}], num_retries=0)
        for _ in range(3):
            await r.acompletion(model="local", messages=[{"role": "user", "content": "hi"}])
    else:
        for _ in range(3):
            await litellm.acompletion(**chat_kwargs(provider, api_key=own))
    assert [r.authorization for r in provider.state.log] == [f"Bearer {own}"] * 3
    told = [r.getMessage() for r in caplog.records if "keep their own api_key" in r.getMessage()]
    assert len(told) == 1 and "providers.openai.api_keys" in told[0] and own not in told[0]
    await litellm.acompletion(**pooled(provider, api_key=own))  # to the provider's endpoint: a pool key
    assert provider.state.log[-1].authorization == "Bearer sk-key-AAAA-secret"
    keys = limiter.get_usage_stats()["levels"]["key"]
    assert sum(v["requests_per_minute"]["used"] for v in keys.values()) == 1


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_base_url_names_an_endpoint_as_api_base_does(sync: bool, provider: FakeProvider, clock: FakeClock,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``base_url`` is LiteLLM's other name for ``api_base``: a call naming it keeps its own key
    (the pool's key went to that host). Found by helper-49."""
    _keys_env(monkeypatch, provider)
    monkeypatch.setattr(litellm, "api_base", None)  # only base_url names the host
    make(clock, {"providers": {"openai": {"api_keys": [{"env": "HIVE_TEST_KEY_A"}]}}})
    own = "sk-self-hosted-token-0123456789"
    kw = pooled(provider, api_key=own, base_url=provider.url)
    if sync:
        await asyncio.to_thread(litellm.completion, **kw)
    else:
        await litellm.acompletion(**kw)
    assert provider.state.log[-1].authorization == f"Bearer {own}"


async def test_a_reload_gives_no_pool_key_to_a_waiting_call_to_its_own_endpoint(
        provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload re-resolves the queued calls' scopes and key choices: a call that names its own
    ``api_base`` stays without a pool key. Found by helper-49."""
    _keys_env(monkeypatch, provider)
    key = {"env": "HIVE_TEST_KEY_A", "requests_per_minute": 100}
    cfg: dict[str, Any] = {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 600},
                           "providers": {"openai": {"api_keys": [key]}}}
    limiter, _ = make(clock, cfg)
    own = "sk-self-hosted-token-0123456789"
    await litellm.acompletion(**chat_kwargs(provider, api_key=own))
    waiting = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider, api_key=own)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    cfg["global"]["requests_per_minute"] = 2
    limiter.reload(with_backend(cfg))
    await asyncio.wait_for(waiting, 10)
    assert [r.authorization for r in provider.state.log] == [f"Bearer {own}"] * 2


async def test_limits_read_from_a_pool_keys_headers_are_that_keys_not_the_models(
        provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider's headers give the limits of the key a call used: two keys allowing 2 requests a
    minute each carry 4 a minute together. (Learned on the model too, one key's limit held the
    whole pool to 2.) Found by helper-55."""
    _keys_env(monkeypatch, provider)
    limiter, _ = make(clock, {"providers": {"openai": {"api_keys": [{"env": "HIVE_TEST_KEY_A"},
                                                                     {"env": "HIVE_TEST_KEY_B"}]}},
                              "queue": {"max_wait_seconds": 0}})
    headers = {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1"}
    for _ in range(4):
        provider.state.push(Scripted(status=200, headers=headers))
        await litellm.acompletion(**pooled(provider, max_tokens=5))
    assert sorted(r.authorization for r in provider.state.log) == ["Bearer sk-key-AAAA-secret"] * 2 + [
        "Bearer sk-key-BBBB-secret"] * 2
    learned = limiter.get_usage_stats()["providers"]
    assert "learned_requests_per_minute" not in learned.get("model:openai/gpt-4o-mini", {})
    assert learned["key:openai/HIVE_TEST_KEY_A"]["learned_requests_per_minute"] == 2
    with pytest.raises(RateLimitQueueTimeout):  # both keys have used their minute
        await litellm.acompletion(**pooled(provider, max_tokens=5))
    assert provider.state.count() == 4


async def test_a_reload_keeps_a_waiting_calls_expected_cache_read_under_a_keys_input_limit(
        provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload estimates queued calls again; one whose only input-token limit is its API key's
    keeps the cache read it expects (it lost it, and the same configuration reloaded failed it
    as too large). Found by helper-50."""
    _keys_env(monkeypatch, provider)

    def turn(words: int) -> dict[str, Any]:
        return {"role": "user", "content": [{"type": "text", "text": " ".join(["word"] * words),
                                             "cache_control": {"type": "ephemeral"}}]}

    config = {"global": {"requests_per_minute": 1, "tokens_per_minute": 1_000_000}, "queue": {"max_wait_seconds": 300},
              "providers": {"openai": {"api_keys": [{"env": "HIVE_TEST_KEY_A", "input_tokens_per_minute": 650}]}}}
    limiter, _ = make(clock, config)
    provider.state.cached_prompt_tokens = 600
    first = [turn(600)]
    await litellm.acompletion(**pooled(provider, max_tokens=5, messages=first))  # leaves 600 in the cache
    task = asyncio.ensure_future(litellm.acompletion(**pooled(  # the next turn: waits, 1 request a minute
        provider, max_tokens=5, messages=[*first, {"role": "assistant", "content": "ok"}, turn(100)])))
    await wait_until(lambda: limiter._engine.queue_length == 1)
    [waiter] = list(limiter._engine._waiters)
    before = waiter.ticket.cached_input
    limiter.reload(with_backend(config))  # the same configuration
    assert before > 0 and waiter.ticket.cached_input == before
    clock.advance(61)
    assert isinstance(await task, litellm.ModelResponse)


async def test_an_api_keys_token_limit_holds_calls_before_they_are_sent(provider: FakeProvider, clock: FakeClock,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A token limit set only on an API key is checked at admission: calls were estimated at no
    tokens (only the scopes' limits asked for an estimate), so the key's limit never held one
    before it was sent. Found by helper-50."""
    _keys_env(monkeypatch, provider)
    make(clock, {"providers": {"openai": {"api_keys": [{"env": "HIVE_TEST_KEY_A", "tokens_per_minute": 300}]}},
                 "queue": {"max_wait_seconds": 0}})
    await litellm.acompletion(**pooled(provider, max_tokens=5, messages=[{"role": "user", "content": "word " * 200}]))
    with pytest.raises(RateLimitQueueTimeout) as info:
        await litellm.acompletion(**pooled(provider, max_tokens=5,
                                           messages=[{"role": "user", "content": "word " * 200}]))
    assert info.value.limit == "tokens_per_minute" and info.value.scope == "key:openai/HIVE_TEST_KEY_A"
    assert provider.state.count() == 1


async def test_a_reload_raising_an_api_key_limit_lets_a_waiting_call_in(
    provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call waiting for an API key's room gets the key limits of a reload at once (its key
    choices are re-resolved with the new configuration, not only its scopes)."""
    _keys_env(monkeypatch, provider)
    key = {"env": "HIVE_TEST_KEY_A", "requests_per_minute": 1}
    cfg: dict[str, Any] = {"providers": {"openai": {"api_keys": [key]}}, "queue": {"max_wait_seconds": 600}}
    limiter, _ = make(clock, cfg)
    await litellm.acompletion(**pooled(provider))
    waiting = asyncio.create_task(litellm.acompletion(**pooled(provider)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    key["requests_per_minute"] = 2
    limiter.reload(with_backend(cfg))
    await asyncio.wait_for(waiting, 10)  # no clock move: only the raised limit can admit it
    assert provider.state.count() == 2
    assert [r.authorization for r in provider.state.log] == ["Bearer sk-key-AAAA-secret"] * 2


def test_api_key_env_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """A configured key variable that is not set is a ConfigError naming it (and no key value)."""
    monkeypatch.delenv("HIVE_TEST_KEY_MISSING", raising=False)
    with pytest.raises(ConfigError, match=r"'HIVE_TEST_KEY_MISSING' is not allowed.*no environment variable of this"):
        HiveLimiter({"providers": {"openai": {"api_keys": [{"env": "HIVE_TEST_KEY_MISSING"}]}}})


@pytest.mark.parametrize("key", ["gsk_4fKq9ZtX2bLm7NwRv8YcHd3PaJs6UeTg1QiMo5Vx0Wn",  # Groq's form
                                 "Zt8qLm3XvB9nRk2YwP6cHd4Js7UeTg1Q",  # 32 letters and digits
                                 "3f9a1c0e7b2d4f6a8c0e2b4d6f8a0c1e",  # 32 hex digits
                                 "AIzaSyD4fKq9ZtX2bLm7NwRv8YcHd3PaJs6Ue",  # Google's form
                                 "AKIAIOSFODNN7EXAMPLEKEY9",  # upper case and digits (AWS's form)
                                 "somelowercasesecretvalue"])  # no digits, no known form
def test_a_key_written_in_place_of_its_variable_is_never_shown(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key itself written into ``env`` (a common slip): refused, and neither the error (from a
    file, a dict or a HIVE_RATELIMIT_* variable) nor a log line repeats it."""
    from hive_ratelimit_plugin._observe import redact

    with pytest.raises(ConfigError, match=r"NAME of an environment variable|no environment variable of this") as info:
        HiveLimiter({"providers": {"groq": {"api_keys": [{"env": key, "requests_per_minute": 10}]}}})
    assert key not in str(info.value)
    monkeypatch.setenv("HIVE_RATELIMIT_PROVIDERS__GROQ__API_KEYS", f'[{{"env": "{key}"}}]')
    with pytest.raises(ConfigError) as info:
        HiveLimiter()
    assert key not in str(info.value)
    if key.startswith(("gsk_", "AIza", "AKIA")):  # the forms with a known prefix, in free text
        assert key not in redact(f"calling groq with {key} failed")


async def test_high_priority_reserve(provider: FakeProvider, clock: FakeClock) -> None:
    """A share of each limit is kept for high-priority calls: bulk work cannot exhaust it."""
    make(clock, {"providers": {"openai": {"gpt-4": {"requests_per_minute": 10}}},
                 "queue": {"max_wait_seconds": 0, "high_priority_reserve": 0.3}})
    kw = chat_kwargs(provider, model="openai/gpt-4")
    sent_low = 0
    for i in range(10):
        try:
            await litellm.acompletion(**{**kw, "messages": [{"role": "user", "content": f"bulk {i}"}],
                                         "metadata": {"priority": "low"}})
            sent_low += 1
        except RateLimitQueueTimeout:
            break
    assert sent_low == 7
    for i in range(3):
        await litellm.acompletion(**{**kw, "messages": [{"role": "user", "content": f"vip {i}"}],
                                     "metadata": {"priority": "high"}})
    assert provider.state.count() == 10


async def test_chaos_storm_leaves_accounting_consistent(provider: FakeProvider, clock: FakeClock) -> None:
    """429 storms, 500s, dropped connections, slow answers and malformed headers: no crash, no
    leaked slot, every call ends in a result or a clear error."""
    limiter, _ = make(clock, {"global": {"concurrent_requests": 4}, "queue": {"max_wait_seconds": 600},
                              "retry": {"max_attempts": 8, "max_wait_seconds": 3600},
                              "circuit_breaker": {"failure_threshold": 50}})
    provider.state.push(*[
        too_many("1"), Scripted(status=500), Scripted(drop=True), too_many("garbage"),
        Scripted(status=429, headers={"retry-after": "-4", "x-ratelimit-reset-requests": "??"}),
        Scripted(status=200, delay=0.05), Scripted(status=429, headers={"retry-after-ms": "1e400"}),
        Scripted(status=502), Scripted(status=200, headers={"x-ratelimit-limit-requests": "NaN"}),
    ] * 4)
    # The clock moves while calls wait and none is in flight (then only time can let one in: a
    # cooldown, pacing, a backoff), not while the four slots' calls are being answered.
    with Ticker(clock, step=1.0, when=lambda: limiter._engine.queue_length > 0 and not limiter._engine._leases):
        results = await asyncio.gather(*(litellm.acompletion(**no_sdk_retries(chat_kwargs(
            provider, messages=[{"role": "user", "content": f"c{i}"}]))) for i in range(30)),
            return_exceptions=True)
    for r in results:
        assert not isinstance(r, HiveRateLimitError) or isinstance(r, RateLimitQueueTimeout), r
        if isinstance(r, BaseException):
            assert isinstance(r, (litellm.InternalServerError, litellm.APIConnectionError,
                                  litellm.RateLimitError, litellm.ServiceUnavailableError,
                                  litellm.BadGatewayError)), repr(r)
    # 12 scripted answers are errors that are not retried (500, 502, dropped); every 429 is retried.
    assert sum(not isinstance(r, BaseException) for r in results) == 30 - 12
    assert not any(isinstance(r, litellm.RateLimitError) for r in results)
    stats = limiter.get_usage_stats()
    assert stats["queued"] == 0
    assert all(e["in_flight"] == 0 for lvl in stats["levels"].values() for e in lvl.values())
    assert provider.state.max_in_flight <= 4


def test_sync_threads_share_a_cooldown(provider: FakeProvider, clock: FakeClock) -> None:
    """Threads calling the same model all wait out one 429's cooldown."""
    limiter, rec = make(clock)
    provider.state.push(too_many("5"))
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            litellm.completion(**no_sdk_retries(chat_kwargs(provider, messages=[{"role": "user", "content": str(i)}])))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    threads[0].start()
    for _ in range(2000):
        if any("cooldown_seconds" in p for p in limiter.get_usage_stats()["providers"].values()):
            break
        threading.Event().wait(0.001)
    t0 = clock()
    for t in threads[1:]:
        t.start()
    # (The clock stands still until the others are started, and then moves only while a call waits.)
    with Ticker(clock, step=0.02, when=lambda: limiter._engine.queue_length > 0):
        for t in threads:
            t.join(20)
    assert not errors
    assert all(t >= t0 + 4.9 for t, _ in rec.sent[1:])


async def test_learned_token_limit_from_headers_is_enforced(provider: FakeProvider, clock: FakeClock) -> None:
    """x-ratelimit-limit-tokens teaches the limiter the provider's token limit: a call whose
    tokens no longer fit the provider's minute waits here instead of collecting a 429."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.tokens_per_window = 100  # the provider allows 100 tokens a minute and says so
    sent = 0
    with pytest.raises(RateLimitQueueTimeout) as info:
        for _ in range(20):
            await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider, max_tokens=5)))
            sent += 1
    assert 10 <= sent <= 12  # ~8 tokens a call (prompt + max_tokens) against 100
    assert provider.state.count(429) == 0  # held here, not refused there
    assert "model:openai/gpt-4o-mini" in str(info.value)
    stats = limiter.get_usage_stats()
    assert stats["providers"]["model:openai/gpt-4o-mini"]["learned_tokens_per_minute"] == 100


async def test_anthropics_token_headers_do_not_refuse_a_large_prompt(provider: FakeProvider,
                                                                    clock: FakeClock) -> None:
    """Anthropic's ``tokens-limit`` header is its most restrictive limit (8,000 output tokens a
    minute here), not a limit on input plus output: a 12,000-token prompt under its 40,000
    input-token limit is sent (it was refused as one that can never fit), and the request limit
    is still learned."""
    limiter, _ = make(clock)
    headers = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
               "anthropic-ratelimit-tokens-limit": "8000", "anthropic-ratelimit-tokens-remaining": "7990",
               "anthropic-ratelimit-input-tokens-limit": "40000",
               "anthropic-ratelimit-input-tokens-remaining": "39990",
               "anthropic-ratelimit-output-tokens-limit": "8000",
               "anthropic-ratelimit-output-tokens-remaining": "7990"}
    kw = {"model": "anthropic/claude-sonnet-4-5", "api_base": provider.root, "api_key": "sk-ant-test-SECRET",
          "max_tokens": 100}
    big = "word " * 12_000
    for i in range(3):
        provider.state.push(Scripted(status=200, headers=headers))
        await litellm.acompletion(messages=[{"role": "user", "content": big + str(i)}], **kw)
    assert provider.state.count() == 3
    learned = limiter.get_usage_stats()["providers"]["model:anthropic/claude-sonnet-4-5"]
    assert learned["learned_requests_per_minute"] == 50 and "learned_tokens_per_minute" not in learned


def _anthropic_headers(input_limit: int) -> dict[str, str]:
    return {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-tokens-limit": "8000", "anthropic-ratelimit-tokens-remaining": "7000",
            "anthropic-ratelimit-input-tokens-limit": str(input_limit),
            "anthropic-ratelimit-input-tokens-remaining": str(input_limit // 2),
            "anthropic-ratelimit-output-tokens-limit": "8000", "anthropic-ratelimit-output-tokens-remaining": "7990"}


async def test_an_input_token_limit_learned_from_anthropic_holds_prompts_to_it(provider: FakeProvider,
                                                                              clock: FakeClock) -> None:
    """Anthropic's ``input-tokens-limit`` header is its input-tokens-per-minute limit: once an
    answer gives it, the model's prompts are held to it (``learned_input_tokens_per_minute``,
    counted from that answer on), so a fourth ~1,250-token prompt within the minute waits under
    3,000 rather than collecting a 429, and goes once the window has room."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 120}})
    kw = {"model": "anthropic/claude-sonnet-4-5", "api_base": provider.root, "api_key": "sk-ant-test-SECRET",
          "max_tokens": 10}
    prompt = "word " * 1000

    async def call(i: int) -> Any:
        provider.state.push(Scripted(status=200, headers=_anthropic_headers(3000)))
        return await litellm.acompletion(messages=[{"role": "user", "content": prompt + str(i)}], **kw)

    await call(0)  # learns 3,000 input tokens a minute
    learned = limiter.get_usage_stats()["providers"]["model:anthropic/claude-sonnet-4-5"]
    assert learned["learned_input_tokens_per_minute"] == 3000
    await call(1)
    await call(2)  # ~2,500 input tokens counted (as the provider reported them)
    used = limiter.get_usage_stats()["levels"]["model"]["model:anthropic/claude-sonnet-4-5"]
    assert 2000 < used["learned_input_tokens_per_minute"]["used"] <= 3000
    assert used["learned_input_tokens_per_minute"]["limit"] == 3000
    fourth = asyncio.ensure_future(call(3))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    assert provider.state.count() == 3, "a prompt past the learned input-token limit was sent"
    clock.advance(61)  # the window slides: room again
    await asyncio.wait_for(fourth, 10)
    assert provider.state.count() == 4


async def test_prompt_cache_reads_leave_room_under_a_learned_input_token_limit(provider: FakeProvider,
                                                                                clock: FakeClock) -> None:
    """As under a configured ``input_tokens_per_minute``: a conversation's cached prefix is not
    counted against a learned input-token limit (Anthropic's leaves cache reads out), nor reserved
    for its next turn. Four turns of a ~1,500-token conversation go within one minute under 1,500;
    reserved whole, the third turn waited."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 120}})
    provider.state.cached_prompt_tokens = 1200

    def turn(words: int) -> dict[str, Any]:
        return {"role": "user", "content": [{"type": "text", "text": " ".join(["word"] * words),
                                             "cache_control": {"type": "ephemeral"}}]}

    kw = {"model": "anthropic/claude-sonnet-4-5", "api_base": provider.root, "api_key": "sk-ant-test-SECRET",
          "max_tokens": 10}
    history = [turn(1200)]
    for _ in range(4):
        provider.state.push(Scripted(status=200, headers=_anthropic_headers(1500)))
        await asyncio.wait_for(litellm.acompletion(messages=history, **kw), 10)
        history = [*history, {"role": "assistant", "content": "ok"}, turn(50)]
    assert provider.state.count() == 4
    used = limiter.get_usage_stats()["levels"]["model"]["model:anthropic/claude-sonnet-4-5"]
    assert 0 < used["learned_input_tokens_per_minute"]["used"] <= 1500


def _anthropic_output_headers(output_limit: int) -> dict[str, str]:
    return {**_anthropic_headers(40_000), "anthropic-ratelimit-output-tokens-limit": str(output_limit),
            "anthropic-ratelimit-output-tokens-remaining": str(output_limit // 2)}


async def test_an_output_token_limit_learned_from_anthropic_holds_calls_to_their_max_tokens(
        provider: FakeProvider, clock: FakeClock) -> None:
    """Anthropic's ``output-tokens-limit`` header is its output-tokens-per-minute limit: once an
    answer gives it, the model's calls are held to it (``learned_output_tokens_per_minute``,
    counted from that answer on), each reserving the ``max_tokens`` it asks for. Under 10,000,
    with 6,000 used, a call asking for 5,000 waits (it might use them all) rather than collect a
    429, though it would use 3,000, and goes once the window has room."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 120}})
    provider.state.completion_tokens = 3000
    kw = {"model": "anthropic/claude-sonnet-4-5", "api_base": provider.root, "api_key": "sk-ant-test-SECRET"}

    async def call(i: int, max_tokens: int) -> Any:
        provider.state.push(Scripted(status=200, headers=_anthropic_output_headers(10_000)))
        return await litellm.acompletion(messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=max_tokens,
                                         **kw)

    await call(0, 3000)  # learns 10,000 output tokens a minute
    learned = limiter.get_usage_stats()["providers"]["model:anthropic/claude-sonnet-4-5"]
    assert learned["learned_output_tokens_per_minute"] == 10_000
    await call(1, 3000)
    await call(2, 3000)  # 6,000 output tokens counted
    used = limiter.get_usage_stats()["levels"]["model"]["model:anthropic/claude-sonnet-4-5"]
    assert used["learned_output_tokens_per_minute"] == {"used": 6000, "limit": 10_000}
    fourth = asyncio.ensure_future(call(3, 5000))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    assert provider.state.count() == 3, "a call past the learned output-token limit was sent"
    assert provider.state.count(429) == 0
    clock.advance(61)  # the window slides: room again
    await asyncio.wait_for(fourth, 10)
    assert provider.state.count() == 4 and provider.state.count(429) == 0


async def test_a_learned_output_token_limit_is_settled_at_the_tokens_used(provider: FakeProvider,
                                                                          clock: FakeClock) -> None:
    """A call asking for ``max_tokens=4000`` that used 10 frees the rest of its reservation: under
    a learned 10,000 output tokens a minute, five such calls go within the minute one after the
    other (held at 4,000 each, the third would wait a minute), and the window holds what they used."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.completion_tokens = 10
    kw = {"model": "anthropic/claude-sonnet-4-5", "api_base": provider.root, "api_key": "sk-ant-test-SECRET",
          "max_tokens": 4000}
    for i in range(6):  # (the first learns the limit; the other five count)
        provider.state.push(Scripted(status=200, headers=_anthropic_output_headers(10_000)))
        await litellm.acompletion(messages=[{"role": "user", "content": f"hi {i}"}], **kw)
    assert provider.state.count() == 6
    used = limiter.get_usage_stats()["levels"]["model"]["model:anthropic/claude-sonnet-4-5"]
    assert used["learned_output_tokens_per_minute"] == {"used": 50, "limit": 10_000}


async def test_an_openai_answer_learns_no_input_token_limit(provider: FakeProvider, clock: FakeClock) -> None:
    """Without Anthropic's input-token header no input window is counted at all (it would cost
    every call of every other provider)."""
    limiter, _ = make(clock)
    provider.state.push(Scripted(status=200, headers={"x-ratelimit-limit-tokens": "100000",
                                                      "x-ratelimit-remaining-tokens": "99000"}))
    await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))
    await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))
    model = limiter.get_usage_stats()["levels"]["model"]["model:openai/gpt-4o-mini"]
    assert "learned_tokens_per_minute" in model and "learned_input_tokens_per_minute" not in model
    assert "learned_output_tokens_per_minute" not in model
    assert all(w.name not in ("learned_input_tokens_per_minute", "learned_output_tokens_per_minute")
               for st in limiter._engine._states.values() for w in st.windows())


async def test_a_call_larger_than_a_learned_token_limit_goes_alone(provider: FakeProvider,
                                                                   clock: FakeClock) -> None:
    """A limit read from a provider's headers may mean something other than we read: a call larger
    than it is not refused as one that can never fit, but waits for the window to be empty and
    goes alone (the provider judges it)."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 120}})
    provider.state.push(Scripted(status=200, headers={"x-ratelimit-limit-tokens": "100",
                                                      "x-ratelimit-remaining-tokens": "90"}))
    await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))  # learns 100 tokens a minute
    assert limiter.get_usage_stats()["providers"]["model:openai/gpt-4o-mini"]["learned_tokens_per_minute"] == 100
    big = asyncio.ensure_future(litellm.acompletion(**chat_kwargs(provider, max_tokens=500)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    clock.advance(55)
    await asyncio.sleep(0.05)
    assert not big.done() and provider.state.count() == 1, "sent before the first call left the window"
    clock.advance(15)  # 70 s: the first has left the window
    await asyncio.wait_for(big, 10)  # alone, once the first has left (the clock stands still now)
    assert provider.state.count() == 2


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_call_sent_late_is_counted_from_its_send(sync: bool, provider: FakeProvider, clock: FakeClock) -> None:
    """A call admitted but sent 1.3 s later (another callback's hook after the limiter's, a
    stalled event loop): in a one-second window, admission's count had left by then, and the
    provider saw 3 requests within a second against 2 (helper-34's real run: 6 against 4). Its
    request is counted again from its send."""
    from litellm.integrations.custom_logger import CustomLogger

    class SlowHook(CustomLogger):  # a guardrail, say, that takes 1.3 s on one call, after admission
        slowed: ClassVar[set[str]] = set()

        def _slow(self, kwargs: Any) -> None:
            if "slow" in str(kwargs.get("messages")) and kwargs.get("litellm_call_id") not in self.slowed:
                self.slowed.add(kwargs.get("litellm_call_id"))
                clock.advance(1.3)

        async def async_pre_call_deployment_hook(self, kwargs: Any, call_type: Any) -> None:
            self._slow(kwargs)

        def log_pre_api_call(self, model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
            self._slow(kwargs)  # (sync calls have no pre-call hook: a late send all the same)

    limiter, rec = make(clock, {"agents": {"a": {"requests_per_second": 2}}, "queue": {"max_wait_seconds": 30}})
    # (after the limiter's admission; for a sync call, which is admitted before any hook, before
    # the limiter hears of the send)
    litellm.callbacks[:] = [SlowHook(), limiter, rec] if sync else [limiter, SlowHook(), rec]

    async def call(text: str) -> None:
        kw = chat_kwargs(provider, messages=[{"role": "user", "content": text}], metadata={"agent_id": "a"})
        if sync:
            await asyncio.to_thread(litellm.completion, **kw)
        else:
            await litellm.acompletion(**kw)

    await call("fast-1")
    provider.state.push(Scripted(status=200, delay=0.3))  # (real time: the clock stands still meanwhile)
    slow = asyncio.create_task(call("slow"))  # admitted at 0, sent at 1.3
    await wait_until(lambda: len(rec.sent) == 2)
    # The next calls are admitted while it is in flight, before its settlement could move it.
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        await asyncio.gather(call("fast-2"), call("fast-3"), slow)
    times = sorted(t for t, _ in rec.sent)
    assert len(times) == 4
    assert max_in_any_window(times, 1.0) <= 2, times


async def test_a_refused_attempt_counts_no_tokens(provider: FakeProvider, clock: FakeClock) -> None:
    """A 429 (retried, then answered): the refused attempt is a request, but the provider neither
    billed nor counted its tokens: tokens_today and the spend tables hold the answered call's."""
    limiter, _ = make(clock, {"budget": {"max_daily_spend": 100}})
    provider.state.push(too_many("1"))
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        r = await litellm.acompletion(**no_sdk_retries(chat_kwargs(provider, max_tokens=10)))
    assert [x.status for x in provider.state.log] == [429, 200]
    stats = limiter.get_usage_stats()
    assert stats["tokens_today"] == r.usage.total_tokens
    assert stats["requests_today"] == 2  # (two requests were sent)
