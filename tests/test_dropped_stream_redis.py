"""A dropped stream's finalizer runs inside the garbage collector, at any allocation of any
thread. A first version freed the slot there: on the Redis engine a collection while that thread
held RedisEngine._replay_lock (a non-reentrant lock: replaying the settlements kept during an
outage) made the finalizer's free_slot -> _call -> _replay wait on that same lock forever. GC is
forced at that point here (it can occur there)."""
from __future__ import annotations

import gc
import threading
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs
from .test_exit_paths import g, make


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_a_stream_collected_during_replay_does_not_deadlock(provider: FakeProvider, clock: FakeClock,
                                                                 backend: dict) -> None:
    limiter = make(clock, {"global": {"concurrent_requests": 2}}, backend)
    eng = limiter._engine
    provider.state.completion_tokens = 20
    stream = await litellm.acompletion(**chat_kwargs(provider, stream=True, max_tokens=30))
    async for _ in stream:
        break
    stream.__dict__["_cycle"] = stream  # (dropped in a reference cycle: only the collector frees it)
    del stream
    assert g(limiter)["in_flight"] == 1
    gc.disable()  # (so that the collection happens where forced below)
    eng._down_since, eng._next_try = eng.clock() - 5.0, 0.0  # Redis has just come back after an outage
    real = eng._replay_locked

    def replay_with_a_collection() -> Any:
        gc.collect()  # an allocation in here may start a collection at any time
        return real()

    eng._replay_locked = replay_with_a_collection
    t = threading.Thread(target=limiter.get_usage_stats, daemon=True)  # any call reaching _call
    try:
        t.start()
        t.join(5)
    finally:
        gc.enable()
    if t.is_alive():
        import sys
        import traceback
        print("".join(traceback.format_stack(sys._current_frames()[t.ident])[-12:]))
    assert not t.is_alive(), "deadlocked: the stream's finalizer waits for _replay_lock its own thread holds"
