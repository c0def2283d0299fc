"""Parallel sync calls sharing one caller-given litellm_call_id (a trace id reused for a batch)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import litellm

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.testing import FakeProvider

from .helpers import chat_kwargs


def test_parallel_calls_sharing_a_given_id_leak_no_slot(provider: FakeProvider) -> None:
    """Two threads claiming one id at once could both keep it: the second admission overwrote the
    first's reservation, whose slot was then held for good (in_flight stayed at 5-7 of 8)."""
    import sys

    rounds = 25
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (widens the window; it is there at the default too, just rarer)
    limiter = HiveLimiter({"global": {"concurrent_requests": 8}, "queue": {"max_wait_seconds": 5}})
    litellm.callbacks.append(limiter)
    barrier = threading.Barrier(8)

    def one(i: int, r: int) -> None:
        barrier.wait()
        kw = chat_kwargs(provider, max_tokens=5, litellm_call_id=f"trace-{r}")
        litellm.completion(**kw)

    try:
        with ThreadPoolExecutor(8) as pool:
            for r in range(rounds):
                list(pool.map(lambda i: one(i, r), range(8)))  # noqa: B023 (each round waits for its calls)
    finally:
        sys.setswitchinterval(old)
    stats = limiter.get_usage_stats()["levels"]["global"]["global"]
    assert stats["in_flight"] == 0, stats
    assert limiter._engine._leases == {}
