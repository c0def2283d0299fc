"""Hostile pass: trying to break the core (reloads under load, huge queues, cancellation storms,
abandoned streams, weird inputs, secrets, duplicate call ids).

Tests marked ``xfail(strict=True)`` document a bug found here; their reasons say what is wrong.
Time-dependent behaviour always runs on the FakeClock; real time is only used for bounded polling
and, in the queue-size test, to measure CPU cost.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import (
    ConfigError,
    HiveLimiter,
    HiveRateLimitError,
    RateLimitQueueTimeout,
    RequestTooLargeError,
)
from hive_ratelimit_plugin._engine import Engine, Scope, Ticket, Waiter
from hive_ratelimit_plugin._waiting import acquire_async
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import Recorder, chat_kwargs, global_usage, make_limiter, max_in_any_window, wait_until

SECRET = "sk-test-SECRET-0123456789"


def assert_nothing_left(limiter: HiveLimiter) -> None:
    usage = limiter.get_usage_stats()
    assert usage["queued"] == 0
    for level, scopes in usage["levels"].items():
        for key, entry in scopes.items():
            assert entry["in_flight"] == 0, (level, key, entry)
            assert entry["queued"] == 0, (level, key, entry)


def wait_until_sync(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        pause.wait(0.005)


async def settle_loop(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class IdRecorder(Recorder):
    """Records (fake time, litellm_call_id) of every HTTP attempt, right before it is sent."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.ids: list[str] = []

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
        super().log_pre_api_call(model, messages, kwargs)
        with self.lock:
            self.ids.append(str(kwargs.get("litellm_call_id")))


@pytest.fixture(autouse=True)
def _provider_defaults(provider: FakeProvider) -> Any:
    yield
    # A request cancelled by a test may still be sleeping in the provider: let it finish so it
    # cannot land in the next test's log.
    wait_until_sync(lambda: provider.state.in_flight == 0)
    provider.state.latency = 0.0
    provider.state.completion_tokens = 5


# ============================================================================ reload under load
async def test_reload_keeps_usage_already_counted(provider: FakeProvider, clock: FakeClock) -> None:
    """Reloading the same limits does not forget the requests already sent in the window."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 3}, "queue": {"max_wait_seconds": 0}})
    for _ in range(3):
        await litellm.acompletion(**chat_kwargs(provider))
    limiter.reload({"global": {"requests_per_minute": 3}, "queue": {"max_wait_seconds": 0}})
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**chat_kwargs(provider))
    assert provider.state.count() == 3


async def test_a_reload_that_fails_changes_nothing(provider: FakeProvider, clock: FakeClock,
                                                   tmp_path: Any) -> None:
    """A reload whose state file cannot be opened raises ConfigError and leaves the old
    configuration wholly in force (it once applied the new limits and budgets first, unaudited)."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 3}, "queue": {"max_wait_seconds": 0}})
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="state_path"):
        limiter.reload({"global": {"requests_per_minute": 1}, "budget": {"max_daily_spend": 0.5},
                        "state_path": str(blocker / "sub" / "state.sqlite"), "queue": {"max_wait_seconds": 0}})
    assert limiter.config.global_.requests_per_minute == 3 and not limiter.config.has_budgets()
    for _ in range(3):
        await litellm.acompletion(**chat_kwargs(provider))
    assert provider.state.count() == 3


async def test_reload_with_no_argument_reads_the_limiters_file_again(provider: FakeProvider, clock: FakeClock,
                                                                    tmp_path: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``reload()`` after editing the limits file the limiter was built from read only the
    environment instead: every limit of the file was dropped and calls went unlimited, in silence.
    It now reads the file again (the last one given, after ``reload(path)``)."""
    monkeypatch.delenv("HIVE_RATELIMIT_CONFIG", raising=False)
    first, second = tmp_path / "limits.yaml", tmp_path / "other.yaml"
    first.write_text("rate_limiting:\n  global: {requests_per_minute: 1}\n  queue: {max_wait_seconds: 0}\n")
    limiter = HiveLimiter(str(first), clock=clock)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    await litellm.acompletion(**chat_kwargs(provider))
    first.write_text("rate_limiting:\n  global: {requests_per_minute: 2}\n  queue: {max_wait_seconds: 0}\n")
    limiter.reload()
    assert limiter.config.global_.requests_per_minute == 2
    await litellm.acompletion(**chat_kwargs(provider))
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**chat_kwargs(provider))
    second.write_text("rate_limiting:\n  global: {requests_per_minute: 4}\n  queue: {max_wait_seconds: 0}\n")
    limiter.reload(str(second))
    second.write_text("rate_limiting:\n  global: {requests_per_minute: 3}\n  queue: {max_wait_seconds: 0}\n")
    limiter.reload()
    assert limiter.config.global_.requests_per_minute == 3
    first.write_text("rate_limiting:\n  global: {requests_per_minute: -1}\n")
    second.write_text("rate_limiting:\n  global: {requests_per_minute: -1}\n")
    with pytest.raises(ConfigError, match="requests_per_minute"):
        limiter.reload()
    assert limiter.config.global_.requests_per_minute == 3  # (a bad edit leaves the old limits in force)
    await litellm.acompletion(**chat_kwargs(provider))
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**chat_kwargs(provider))
    assert provider.state.count() == 3


@pytest.mark.parametrize("change", ["backend", "state_path", "budget.timezone"])
def test_a_reload_cannot_switch_backend_or_state_file(change: str, clock: FakeClock, tmp_path: Any) -> None:
    """The backend, an open state file and the budgets' time zone are fixed for a limiter's life:
    a reload changing them is refused, not accepted and ignored (Redis sharing silently never
    starting) nor applied to spend counted in the old zone's windows (a new zone's "today" found
    none of it: the day's spend read 0 and the budget was spent again)."""
    base = {"global": {"requests_per_minute": 3}, "state_path": str(tmp_path / "a.sqlite"),
            "budget": {"max_daily_spend": 100}}
    limiter = make_limiter(clock, base)
    new = dict(base, **{"backend": {"backend": "redis://127.0.0.1:6379/15"},
                        "state_path": {"state_path": str(tmp_path / "b.sqlite")},
                        "budget.timezone": {"budget": {"max_daily_spend": 100, "timezone": "Asia/Tokyo"}},
                        }[change])
    with pytest.raises(ConfigError, match=f"rate_limiting.{change}: cannot change on reload"):
        limiter.reload(new)
    assert limiter.config.backend == "memory" and limiter.config.state_path == base["state_path"]
    assert limiter.config.budget.timezone == "UTC" and limiter._engine.calendar.tz.key == "UTC"
    limiter.reload(dict(base, **{"global": {"requests_per_minute": 5}}))  # the rest still reloads
    assert limiter.config.global_.requests_per_minute == 5
    limiter.reload(dict(base, redis={"key_prefix": "other"}))  # (the redis block: unused in memory)


async def test_reload_applies_to_scope_with_call_in_flight(provider: FakeProvider, clock: FakeClock) -> None:
    """A lowered limit applies at once even to a scope that has a call in flight during the reload."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100}, "queue": {"max_wait_seconds": 0}})
    stream = await litellm.acompletion(**chat_kwargs(provider), stream=True)
    await stream.__anext__()  # in flight
    limiter.reload({"global": {"requests_per_minute": 2}, "queue": {"max_wait_seconds": 0}})
    await litellm.acompletion(**chat_kwargs(provider))
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**chat_kwargs(provider))
    assert global_usage(limiter)["requests_per_minute"]["limit"] == 2
    async for _ in stream:
        pass


async def test_lowered_limit_applies_to_calls_already_waiting(provider: FakeProvider, clock: FakeClock) -> None:
    """Limits lowered by reload() while calls wait also bind those waiting calls."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 3}, "queue": {"max_wait_seconds": 1000}})
    recorder = Recorder(clock)
    litellm.callbacks.append(recorder)
    for _ in range(3):
        await litellm.acompletion(**chat_kwargs(provider))
    tasks = [asyncio.create_task(litellm.acompletion(**chat_kwargs(provider))) for _ in range(4)]
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 4)
    limiter.reload({"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 1000}})
    try:
        clock.advance(61)
        await wait_until(lambda: provider.state.count() >= 4)
        await settle_loop()
        await asyncio.sleep(0.05)
        assert provider.state.count() == 4, "rpm is 1 now: one waiting call per minute"
        assert global_usage(limiter)["requests_per_minute"]["limit"] == 1
        assert max_in_any_window([t for t, _ in recorder.sent if t > 1000.0], 60.0) <= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_raised_limit_admits_calls_already_waiting(provider: FakeProvider, clock: FakeClock) -> None:
    """Limits raised by reload() let waiting calls through at their next re-check."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 1000}})
    await litellm.acompletion(**chat_kwargs(provider))
    tasks = [asyncio.create_task(litellm.acompletion(**chat_kwargs(provider))) for _ in range(2)]
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 2)
    limiter.reload({"global": {"requests_per_minute": 3}, "queue": {"max_wait_seconds": 1000}})
    try:
        clock.advance(1)  # a re-check, well inside the same minute
        await asyncio.wait_for(asyncio.gather(*tasks), 10)  # (the clock stands still: only the raise admits them)
        assert provider.state.count() == 3, "1 sent + 2 waiting fit the raised limit of 3"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_limit_lowered_below_a_waiting_call_fails_it(provider: FakeProvider, clock: FakeClock) -> None:
    """A waiting call that no longer fits a lowered limit fails with RequestTooLargeError, unsent."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1, "tokens_per_minute": 2000},
                                   "queue": {"max_wait_seconds": 1000}})
    await litellm.acompletion(**chat_kwargs(provider))
    big = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider, max_tokens=1500)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    limiter.reload({"global": {"requests_per_minute": 1, "tokens_per_minute": 1000},
                    "queue": {"max_wait_seconds": 1000}})
    clock.advance(61)
    try:
        done, _ = await asyncio.wait({big}, timeout=5)
        assert done, "the waiting call neither ran nor failed"
        assert isinstance(big.exception(), RequestTooLargeError), big.exception()
        assert provider.state.count() == 1
    finally:
        big.cancel()
        await asyncio.gather(big, return_exceptions=True)


# ============================================================================ max_wait_seconds = 0
async def test_max_wait_zero_fails_fast_and_sends_nothing(provider: FakeProvider, clock: FakeClock) -> None:
    """With max_wait_seconds=0 every call that cannot start now fails at once, sync and async."""
    provider.state.latency = 0.5  # far longer than it takes to start all five calls
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0}})
    results = await asyncio.gather(*(litellm.acompletion(**chat_kwargs(provider)) for _ in range(5)),
                                   return_exceptions=True)
    kinds = sorted(type(r).__name__ for r in results)
    assert kinds == ["ModelResponse"] + ["RateLimitQueueTimeout"] * 4
    for r in results:
        if isinstance(r, RateLimitQueueTimeout):
            assert r.limit == "concurrent_requests" and r.scope == "global"
    assert provider.state.count() == 1
    assert_nothing_left(limiter)
    # Sync: a thread holds the only slot; the main thread's call fails without blocking.
    provider.state.latency = 1.0
    holder = threading.Thread(target=lambda: litellm.completion(**chat_kwargs(provider)))
    holder.start()
    await wait_until(lambda: provider.state.in_flight == 1)
    with pytest.raises(RateLimitQueueTimeout):
        litellm.completion(**chat_kwargs(provider))
    assert provider.state.in_flight == 1  # refused while the slot's request was still out: it did not wait
    await asyncio.to_thread(holder.join, 5)
    assert provider.state.count() == 2
    assert_nothing_left(limiter)


@pytest.mark.parametrize("max_wait", [1e10, float("inf")])
def test_sync_call_with_unbounded_max_wait_waits_for_its_slot(
    max_wait: float, provider: FakeProvider, clock: FakeClock
) -> None:
    """A sync call with a huge or infinite max_wait_seconds waits for a slot instead of crashing."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": max_wait},
                                   "estimation": {"lease_seconds": 30}})
    stream = litellm.completion(**chat_kwargs(provider), stream=True)  # holds the only slot
    outcome: list[Any] = []

    def worker() -> None:
        try:
            litellm.completion(**chat_kwargs(provider))
            outcome.append("ok")
        except Exception as exc:
            outcome.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    wait_until_sync(lambda: bool(outcome) or limiter.get_usage_stats()["queued"] == 1)
    clock.advance(31)  # the unread stream's lease expires: the slot comes back
    t.join(10)
    assert outcome == ["ok"], outcome
    del stream


# ============================================================================ huge queues
N_WAITERS = 5000
STORM_BUDGET = 2.0  # seconds of CPU for one clock jump that wakes every waiter


def _empty_queue(eng: Engine) -> None:
    """Take every waiter out, the last in line first (so that nobody behind a leaver is tried)."""
    with eng._lock:
        for w in sorted(eng._waiters, key=Waiter.order, reverse=True):
            eng.cancel(w)


@pytest.fixture
def frozen_heap() -> Any:
    """Objects that exist now (LiteLLM's, pytest's: some 400,000) are left out of the garbage
    collector's full passes for the test: the 5000 exceptions of a timeout storm trigger two,
    which would otherwise walk that heap for ~0.5 s each, whatever the queue does."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("frozen_heap")
async def test_5000_waiters_clock_jump_is_not_quadratic(clock: FakeClock) -> None:
    """A clock jump over 5000 queued calls (rpm=1) grants and times out waiters in reasonable CPU time."""
    eng = Engine(clock, max_queue=10_000)
    clock.attach(eng)
    g = Scope("global", "global", LimitSet(requests_per_minute=1))
    assert await acquire_async(eng, Ticket("first", [g]), 90) == 0.0
    tasks = [asyncio.create_task(acquire_async(eng, Ticket(str(i), [g]), 90)) for i in range(N_WAITERS)]
    await wait_until(lambda: eng.queue_length == N_WAITERS, timeout=30)

    cut = threading.Event()
    finished = threading.Event()

    def watchdog() -> None:
        # If the wake-up storm overruns its budget, empty the queue so the rest of it is cheap
        # (the assertion below then fails instead of the test running for minutes).
        if not finished.wait(STORM_BUDGET * 15):  # (wall time: generous on a loaded machine)
            _empty_queue(eng)
            cut.set()

    try:
        # 1. The window slides: one waiter is granted, the other 4999 wake, re-check and re-park.
        dog = threading.Thread(target=watchdog, daemon=True)
        dog.start()
        t0 = time.process_time()  # (CPU time: a loaded machine stretches wall time, not this)
        clock.advance(61)
        await wait_until(lambda: eng.admitted_total == 2, timeout=60)
        await settle_loop(5)
        grant_storm = time.process_time() - t0
        finished.set()
        dog.join()
        assert not cut.is_set() and grant_storm < STORM_BUDGET, f"clock jump took {grant_storm:.1f}s"
        assert eng.queue_length == N_WAITERS - 1

        # 2. The deadline passes for all of them at once: 4999 RateLimitQueueTimeout.
        finished.clear()
        dog = threading.Thread(target=watchdog, daemon=True)
        dog.start()
        t0 = time.process_time()
        clock.advance(30)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        timeout_storm = time.process_time() - t0
        finished.set()
        dog.join()
        assert not cut.is_set() and timeout_storm < STORM_BUDGET, f"timeout storm took {timeout_storm:.1f}s"
        assert sum(isinstance(r, RateLimitQueueTimeout) for r in results) == N_WAITERS - 1
        assert eng.queue_length == 0
    finally:
        finished.set()
        _empty_queue(eng)  # cheap clean-up whatever happened above
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_cancel_half_of_500_queued_calls_leaks_nothing(provider: FakeProvider, clock: FakeClock) -> None:
    """Cancelling 250 of 500 queued calls (some just granted) leaks no slot, queue entry or request."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 50, "concurrent_requests": 3},
                                   "queue": {"max_wait_seconds": 10**6}})
    recorder = IdRecorder(clock)
    litellm.callbacks.append(recorder)
    tasks = {
        f"storm-{i}": asyncio.create_task(litellm.acompletion(**chat_kwargs(provider, litellm_call_id=f"storm-{i}")))
        for i in range(500)
    }
    await wait_until(lambda: provider.state.count() == 50 and limiter.get_usage_stats()["queued"] == 450
                     and global_usage(limiter)["in_flight"] == 0, 30)

    sent = set(recorder.ids)
    pending = [cid for cid in tasks if cid not in sent]
    cancelled = set(pending[::2])  # 225 waiting calls
    for cid in cancelled:
        tasks[cid].cancel()
    await settle_loop()
    assert limiter.get_usage_stats()["queued"] == 450 - len(cancelled)

    # Cancel calls at the moment they are granted (before they can resume and send).
    clock.advance(61)
    granted_now = [cid for cid in list(limiter._engine._leases) if cid.startswith("storm-")]
    assert granted_now, "the clock jump granted nobody"
    for cid in granted_now:
        tasks[cid].cancel()
    cancelled |= set(granted_now)

    loop = asyncio.get_running_loop()
    give_up = loop.time() + 30
    while not all(t.done() for t in tasks.values()) and loop.time() < give_up:
        clock.advance(61)
        await asyncio.sleep(0.01)
    assert all(t.done() for t in tasks.values())
    for cid, t in tasks.items():
        if cid in cancelled:
            assert t.cancelled(), cid
        else:
            assert t.exception() is None, (cid, t.exception())
    assert not cancelled & set(recorder.ids), "a cancelled call reached the provider"
    assert provider.state.count() == len(recorder.ids) == 500 - len(cancelled)
    assert max_in_any_window([t for t, _ in recorder.sent], 60.0) <= 50
    assert provider.state.max_in_flight <= 3
    assert_nothing_left(limiter)
    assert not limiter._engine._leases


async def test_cancelling_an_async_call_in_flight_frees_its_slot(provider: FakeProvider, clock: FakeClock) -> None:
    """A task cancelled while its request is in flight gives its concurrency slot back at once."""
    provider.state.latency = 0.3
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0}})
    task = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider)))
    await wait_until(lambda: provider.state.in_flight == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle_loop()
    await asyncio.sleep(0.05)  # bounded grace for any callback LiteLLM schedules
    assert global_usage(limiter)["in_flight"] == 0
    provider.state.latency = 0.0
    await litellm.acompletion(**chat_kwargs(provider))  # would raise: the only slot is still taken


# ============================================================================ streams
def test_sync_stream_never_consumed_returns_slot_at_lease_expiry(provider: FakeProvider, clock: FakeClock) -> None:
    """A sync stream nobody reads keeps its slot until the lease expires, then gives it back."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0},
                                   "estimation": {"lease_seconds": 30}})
    stream = litellm.completion(**chat_kwargs(provider), stream=True)
    assert global_usage(limiter)["in_flight"] == 1
    with pytest.raises(RateLimitQueueTimeout):
        litellm.completion(**chat_kwargs(provider))
    clock.advance(29)
    with pytest.raises(RateLimitQueueTimeout):
        litellm.completion(**chat_kwargs(provider))
    clock.advance(2)
    litellm.completion(**chat_kwargs(provider))
    assert provider.state.count() == 2
    assert_nothing_left(limiter)
    del stream


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_exception_between_chunks_returns_slot_at_lease_expiry(
    mode: str, provider: FakeProvider, clock: FakeClock
) -> None:
    """User code raising mid-stream propagates unchanged; the abandoned slot comes back at lease expiry."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1, "tokens_per_minute": 10_000},
                                   "queue": {"max_wait_seconds": 0}, "estimation": {"lease_seconds": 30}})
    provider.state.completion_tokens = 8

    class BoomError(Exception):
        pass

    seen = 0
    with pytest.raises(BoomError):
        if mode == "sync":
            for _ in litellm.completion(**chat_kwargs(provider, max_tokens=100), stream=True):
                seen += 1
                if seen == 2:
                    raise BoomError
        else:
            stream = await litellm.acompletion(**chat_kwargs(provider, max_tokens=100), stream=True)
            async for _ in stream:
                seen += 1
                if seen == 2:
                    raise BoomError
    assert seen == 2
    assert global_usage(limiter)["in_flight"] == 1
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**chat_kwargs(provider))
    clock.advance(31)
    await litellm.acompletion(**chat_kwargs(provider))
    assert_nothing_left(limiter)
    # The abandoned call's estimate (prompt + 100) stays counted: the conservative choice.
    assert global_usage(limiter)["tokens_per_minute"]["used"] >= 100


def test_abandoned_stream_leaves_no_bookkeeping_behind(provider: FakeProvider, clock: FakeClock) -> None:
    """After an abandoned stream's lease expires, the plugin keeps no per-call state for it."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0},
                                   "estimation": {"lease_seconds": 30}})
    streams = []
    for _ in range(3):
        streams.append(litellm.completion(**chat_kwargs(provider), stream=True))
        clock.advance(31)
    litellm.completion(**chat_kwargs(provider))
    assert_nothing_left(limiter)
    assert not limiter._engine._leases


# ============================================================================ weird inputs
IMAGE_MESSAGES = [{"role": "user", "content": [
    {"type": "text", "text": "what is in this picture?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
]}]
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "look something up",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]

WEIRD: dict[str, dict[str, Any]] = {
    "messages=None": {"messages": None},
    "messages=str": {"messages": "hello"},
    "messages=[]": {"messages": []},
    "message not a dict": {"messages": ["hello", 3]},
    "content=None": {"messages": [{"role": "user", "content": None}]},
    "content=dict": {"messages": [{"role": "user", "content": {"odd": [1, 2]}}]},
    "content parts with image": {"messages": IMAGE_MESSAGES},
    "tools": {"tools": TOOLS, "tool_choice": "auto"},
    "max_tokens=0": {"max_tokens": 0},
    "max_tokens=-5": {"max_tokens": -5},
    "max_tokens='12'": {"max_tokens": "12"},
    "max_tokens=True": {"max_tokens": True},
    "max_completion_tokens=1e9": {"max_completion_tokens": 10**9},
}


def _outcome(fn: Callable[[], Any]) -> type | str:
    try:
        fn()
    except Exception as exc:
        return type(exc)
    return "ok"


async def _aoutcome(coro_fn: Callable[[], Any]) -> type | str:
    try:
        await coro_fn()
    except Exception as exc:
        return type(exc)
    return "ok"


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("case", sorted(WEIRD))
async def test_weird_inputs_behave_as_without_the_limiter(
    case: str, mode: str, provider: FakeProvider, clock: FakeClock
) -> None:
    """Odd call arguments give the same outcome with the limiter as without, and leak no slot."""
    kw = chat_kwargs(provider, **WEIRD[case])

    async def run() -> type | str:
        if mode == "sync":
            return _outcome(lambda: litellm.completion(**kw))
        return await _aoutcome(lambda: litellm.acompletion(**kw))

    without = await run()
    sent_without = provider.state.count()
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 10_000, "tokens_per_minute": 10**10,
                                              "concurrent_requests": 1},
                                   "queue": {"max_wait_seconds": 0}})
    with_limiter = await run()
    assert with_limiter == without
    assert not (isinstance(with_limiter, type) and issubclass(with_limiter, HiveRateLimitError))
    assert provider.state.count() == 2 * sent_without
    assert_nothing_left(limiter)
    await litellm.acompletion(**chat_kwargs(provider))  # the only slot is free


@pytest.mark.parametrize(
    "priority", ["HIGH", " low ", "42", "urgent", 10**30, -(10**30), 3.7, None, [], {"a": 1}, True])
async def test_weird_priorities_are_accepted(priority: Any, provider: FakeProvider, clock: FakeClock) -> None:
    """Any metadata priority value is accepted (unknown ones count as normal) and the call goes through."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 10}, "queue": {"max_wait_seconds": 0}})
    await litellm.acompletion(**chat_kwargs(provider, metadata={"priority": priority}))
    litellm.completion(**chat_kwargs(provider, metadata={"priority": priority}))
    assert provider.state.count() == 2
    assert_nothing_left(limiter)


async def test_negative_reported_usage_cannot_erase_other_calls(provider: FakeProvider, clock: FakeClock) -> None:
    """A response reporting negative tokens cannot refund usage that other calls recorded."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 100_000}})
    provider.state.completion_tokens = 200
    first = await litellm.acompletion(**chat_kwargs(provider, max_tokens=200))
    before = global_usage(limiter)["tokens_per_minute"]["used"]
    assert before == first.usage.total_tokens
    await litellm.acompletion(**chat_kwargs(provider, max_tokens=-1000))
    assert provider.state.log[-1].completion_tokens == -1000
    assert global_usage(limiter)["tokens_per_minute"]["used"] >= before


def test_image_part_is_estimated_at_about_1k_tokens(provider: FakeProvider, clock: FakeClock) -> None:
    """A one-image call is estimated at ~1k tokens, so tokens_per_minute=900 can never fit it."""
    make_limiter(clock, {"global": {"tokens_per_minute": 900}})
    try:
        litellm.completion(**chat_kwargs(provider, messages=IMAGE_MESSAGES, max_tokens=1))
    except RequestTooLargeError:
        pass
    assert provider.state.count() == 0, "the image call was admitted under a 900-token estimate"


def test_huge_prompt_over_token_limit_fails_fast(provider: FakeProvider, clock: FakeClock) -> None:
    """A 1 MB prompt against tokens_per_minute=10000 raises RequestTooLargeError at once, unsent."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 10_000}, "queue": {"max_wait_seconds": 10**6}})
    huge = "lorem ipsum dolor sit amet " * 40_000
    with pytest.raises(RequestTooLargeError) as info:
        litellm.completion(**chat_kwargs(provider, messages=[{"role": "user", "content": huge}], max_tokens=10))
    assert info.value.limit == "tokens_per_minute" and info.value.scope == "global"
    assert provider.state.count() == 0
    assert_nothing_left(limiter)


async def test_huge_prompt_within_limits_is_settled(provider: FakeProvider, clock: FakeClock) -> None:
    """A 400 kB prompt inside the limits goes through and settles to the reported usage."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 10**7, "concurrent_requests": 1}})
    huge = "lorem ipsum dolor sit amet " * 15_000
    resp = await litellm.acompletion(**chat_kwargs(provider, messages=[{"role": "user", "content": huge}]))
    assert global_usage(limiter)["tokens_per_minute"]["used"] == resp.usage.total_tokens
    assert_nothing_left(limiter)


@pytest.mark.parametrize("model", ["totally-unknown-model-xyz", "nonexistentprovider/some-model", ""])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_unresolvable_model_fails_in_litellm_and_leaks_nothing(
    model: str, mode: str, provider: FakeProvider, clock: FakeClock
) -> None:
    """A model LiteLLM cannot resolve raises LiteLLM's error; no slot or queue entry is left behind."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1, "tokens_per_minute": 100_000},
                                   "queue": {"max_wait_seconds": 0}})
    with pytest.raises(litellm.BadRequestError):
        if mode == "sync":
            litellm.completion(**chat_kwargs(provider, model=model))
        else:
            await litellm.acompletion(**chat_kwargs(provider, model=model))
    assert provider.state.count() == 0
    usage = limiter.get_usage_stats()
    assert usage["queued"] == 0
    assert all(e["in_flight"] == 0 for scopes in usage["levels"].values() for e in scopes.values())
    await litellm.acompletion(**chat_kwargs(provider))  # the only slot is free


# ============================================================================ secrets
def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


async def test_api_key_never_in_plugin_errors_logs_or_stats(
    provider: FakeProvider, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """No plugin error on any path (timeout after waiting, full queue, too large), log record or stat holds the key."""
    caplog.set_level(logging.DEBUG, logger="hive_ratelimit_plugin")
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1, "tokens_per_minute": 5000},
                                   "agents": {"*": {"requests_per_minute": 5}},
                                   "queue": {"max_wait_seconds": 5, "max_size": 1}})
    md = {"agent_id": "agent-x", "user_id": "user-x"}
    errors: list[BaseException] = []
    await litellm.acompletion(**chat_kwargs(provider, metadata=md))
    waiting = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider, metadata=md)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    for attempt in (lambda: litellm.completion(**chat_kwargs(provider, metadata=md)),
                    lambda: litellm.completion(**chat_kwargs(provider, max_tokens=100_000))):
        try:
            attempt()
        except Exception as exc:
            errors.append(exc)
    for coro in (lambda: litellm.acompletion(**chat_kwargs(provider, metadata=md)),
                 lambda: litellm.acompletion(**chat_kwargs(provider, max_tokens=100_000))):
        try:
            await coro()
        except Exception as exc:
            errors.append(exc)
    clock.advance(6)
    try:
        await asyncio.wait_for(waiting, 5)
    except Exception as exc:
        errors.append(exc)
    assert sorted(type(e).__name__ for e in errors) == [
        "RateLimitQueueTimeout", "RateLimitQueueTimeout", "RateLimitQueueTimeout",
        "RequestTooLargeError", "RequestTooLargeError"]
    for exc in errors:
        for link in _chain(exc):
            assert SECRET not in str(link) and SECRET not in repr(link) and SECRET not in repr(vars(link))
    for record in caplog.records:
        if record.name.startswith("hive_ratelimit_plugin"):
            assert SECRET not in record.getMessage()
            assert SECRET not in repr(record.args)
    assert SECRET not in repr(limiter.get_usage_stats())
    assert SECRET not in repr(limiter) and SECRET not in repr(limiter._engine)


@pytest.mark.parametrize("config", [
    {"providers": {"openai": {"api_key": SECRET}}},
    {"api_key": SECRET},
], ids=["providers.openai.api_key", "api_key"])
def test_config_error_does_not_echo_an_api_key(config: dict[str, Any]) -> None:
    """A ConfigError about a misplaced api_key names the key path but not the secret."""
    with pytest.raises(ConfigError) as info:
        HiveLimiter(config)
    assert "api_key" in str(info.value)
    assert SECRET not in str(info.value)
    assert all(SECRET not in line for line in info.value.errors)


# ============================================================================ call ids / registration
def test_sync_calls_sharing_a_litellm_call_id_leak_no_slot(provider: FakeProvider, clock: FakeClock) -> None:
    """Two overlapping sync calls that reuse one litellm_call_id give both slots back."""
    provider.state.latency = 1.0  # the two calls surely overlap
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 2}, "queue": {"max_wait_seconds": 5},
                                   "estimation": {"lease_seconds": 30}})
    threads = [threading.Thread(target=lambda: litellm.completion(**chat_kwargs(provider, litellm_call_id="same-id")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert provider.state.count() == 2
    clock.advance(31)  # even lease expiry must have nothing left to reclaim
    assert global_usage(limiter)["in_flight"] == 0


async def test_async_calls_sharing_a_litellm_call_id_respect_concurrency(
    provider: FakeProvider, clock: FakeClock
) -> None:
    """Two concurrent async calls that reuse one litellm_call_id still run one at a time."""
    provider.state.latency = 1.0  # the two calls surely overlap
    make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 5}})
    await asyncio.gather(*(litellm.acompletion(**chat_kwargs(provider, litellm_call_id="same-async-id"))
                           for _ in range(2)))
    assert provider.state.count() == 2
    assert provider.state.max_in_flight == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_limiter_registered_twice_counts_each_call_once(mode: str, provider: FakeProvider,
                                                              clock: FakeClock) -> None:
    """Registering the same limiter twice neither double-counts a call nor leaks its slot."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 100, "concurrent_requests": 2},
                                   "queue": {"max_wait_seconds": 0}})
    litellm.callbacks.append(limiter)
    if mode == "sync":
        litellm.completion(**chat_kwargs(provider))
    else:
        await litellm.acompletion(**chat_kwargs(provider))
    assert provider.state.count() == 1
    assert global_usage(limiter)["requests_per_minute"]["used"] == 1
    assert global_usage(limiter)["in_flight"] == 0


async def test_provider_errors_mid_storm_release_every_slot(provider: FakeProvider, clock: FakeClock) -> None:
    """Scripted 500s, 429s and dropped connections among 30 concurrent calls leave nothing held."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 3, "tokens_per_minute": 100_000},
                                   "queue": {"max_wait_seconds": 10**6}})
    ok = Scripted(status=200)  # a normal answer: keeps failures from running 5 in a row
    provider.state.push(*[Scripted(status=500), ok, Scripted(drop=True), ok,
                          Scripted(status=429, headers={"retry-after": "1"}), ok] * 3)
    stop = asyncio.Event()

    async def drive() -> None:  # any wait measured on the fake clock (e.g. after a 429) runs out
        while not stop.is_set():
            await asyncio.sleep(0.01)
            clock.advance(2)

    driver = asyncio.create_task(drive())
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(litellm.acompletion(**chat_kwargs(provider)) for _ in range(30)),
                           return_exceptions=True), 60)
    finally:
        stop.set()
        await driver
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) <= 9
    assert all(isinstance(f, Exception) and not isinstance(f, HiveRateLimitError) for f in failures), failures
    assert provider.state.count() >= 30
    assert provider.state.max_in_flight <= 3
    assert_nothing_left(limiter)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_turning_the_limiter_off_by_reload_releases_the_calls_waiting(sync: bool, provider: FakeProvider,
                                                                           clock: FakeClock) -> None:
    """``reload(enabled: false)`` (the kill switch in an incident) let new calls through at once,
    but the calls already waiting stayed in the queue until their wait ran out and failed."""
    base = {"queue": {"max_wait_seconds": 600}, "global": {"requests_per_minute": 1}}
    limiter = make_limiter(clock, base)
    litellm.completion(**chat_kwargs(provider))
    if sync:
        waiting = asyncio.ensure_future(asyncio.to_thread(litellm.completion, **chat_kwargs(provider)))
    else:
        waiting = asyncio.ensure_future(litellm.acompletion(**chat_kwargs(provider)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    limiter.reload({**base, "enabled": False})
    await asyncio.wait_for(waiting, 10)  # (the clock stands still: only the reload lets it go)
    assert provider.state.count() == 2
    assert limiter.get_usage_stats()["queued"] == 0
