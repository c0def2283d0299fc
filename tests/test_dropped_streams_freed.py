"""Streams collected unclosed give back their slots from a thread of their own (never from the
garbage collector itself): at once to a call waiting for them, and also when the call was admitted
by the outage engine during a Redis outage."""
from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import litellm

from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs, wait_until
from .test_exit_paths import g, make, small


async def test_a_queued_call_gets_the_slot_of_a_stream_collected_unclosed(provider: FakeProvider,
                                                                          clock: FakeClock) -> None:
    """Concurrency 1: stream 1 is read one chunk and dropped while call 2 already waits in the
    queue: call 2 is admitted once stream 1 is collected (a first version only noted the stream
    for the next call or look at the stats: the waiter waited for the lease, 300 s)."""
    make(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 60},
                "status": {"enabled": False}})
    provider.state.completion_tokens = 20
    s1 = await litellm.acompletion(**chat_kwargs(provider, stream=True, max_tokens=30))
    async for _ in s1:
        break
    second = asyncio.ensure_future(litellm.acompletion(**small(provider)))
    await asyncio.sleep(0.2)
    assert len(provider.state.log) == 1  # call 2 is queued
    del s1
    gc.collect()
    await asyncio.wait_for(second, 5)  # (the clock stands still: only the freed slot lets it go)
    assert len(provider.state.log) == 2


async def test_a_stream_admitted_during_a_redis_outage_is_freed_when_collected(provider: FakeProvider,
                                                                               clock: FakeClock) -> None:
    """Redis down (here: nothing listens): the call is admitted by the outage engine, whose
    reservation is the one to free when the stream is collected (a first version looked for it in
    the Redis engine only, and held the slot for its lease)."""
    limiter = make(clock, {"global": {"concurrent_requests": 2}, "status": {"enabled": False}, "budget": {}},
                   {"backend": "redis://127.0.0.1:1/9", "redis": {"key_prefix": "outage-stream"}})
    eng = limiter._engine
    provider.state.completion_tokens = 20
    s1 = await litellm.acompletion(**chat_kwargs(provider, stream=True, max_tokens=30))
    async for _ in s1:
        break
    assert eng.fallback._leases, "not admitted by the outage engine"
    del s1
    gc.collect()
    await wait_until(lambda: g(limiter)["in_flight"] == 0)


def test_a_queued_call_gets_the_slot_of_a_sync_stream_collected_unclosed(provider: FakeProvider,
                                                                         clock: FakeClock) -> None:
    """The same with a sync stream (``for chunk in stream: break``), which LiteLLM 1.83 kept alive
    through ``litellm.error_logs`` (the locals of its last logged call): never collected, its slot
    came back only after its lease, so the call waiting for it waited the whole lease."""
    make(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 60},
                 "status": {"enabled": False}})
    provider.state.completion_tokens = 20
    s1 = litellm.completion(**chat_kwargs(provider, stream=True, max_tokens=30))
    for _ in s1:
        break
    done: list[object] = []
    second = threading.Thread(target=lambda: done.append(litellm.completion(**small(provider))), daemon=True)
    second.start()
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline and len(provider.state.log) < 2:
        time.sleep(0.01)
    assert len(provider.state.log) == 1  # call 2 is queued
    gone = weakref.ref(s1)
    del s1
    deadline = time.monotonic() + 5  # (the clock stands still: only the freed slot lets call 2 go)
    while (gone() is not None or second.is_alive()) and time.monotonic() < deadline:
        gc.collect()
        second.join(0.05)
    assert gone() is None, "the dropped stream is still referenced"
    assert not second.is_alive() and done and len(provider.state.log) == 2
