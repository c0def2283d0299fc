"""Benchmark: one model served by two endpoints, one of which answers a 429.

A ``litellm.Router`` with two deployments of ``openai/gpt-4o-mini``, each on its own fake provider
(``api_base``) and key, ``num_retries=0``. After two warm-up calls, one deployment answers its next
request with 429 ``retry-after: 3``; 20 Router calls start one every 50 ms. Reported: wall time,
per-call latency (median, and how many finished within 0.5 s) and the requests each deployment got.

What a provider says is about the endpoint that said it: the calls the Router sends to the healthy
deployment should not wait for the other one's 3 s. Compare two versions of the package:
``HIVE_BENCH_PACKAGE_ROOT=<exported commit> python benchmarks/bench_endpoints.py``.
"""

from __future__ import annotations

import asyncio
import statistics
import time

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

CALLS = 20
EVERY = 0.05
RETRY_AFTER = "3"


async def _run() -> dict[str, float]:
    import litellm

    from hive_ratelimit_plugin import HiveLimiter
    from hive_ratelimit_plugin.testing import FakeProvider, Scripted

    litellm.suppress_debug_info = True
    with FakeProvider() as a, FakeProvider() as b:
        litellm.callbacks = [HiveLimiter({})]
        router = litellm.Router(model_list=[
            {"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": p.url,
                                                     "api_key": f"sk-bench-{i}"}}
            for i, p in enumerate((a, b))], num_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        for _ in range(2):
            await router.acompletion(model="gpt", messages=messages)
        b.state.push(Scripted(status=429, headers={"retry-after": RETRY_AFTER}))
        latencies: list[float] = []

        async def one() -> None:
            t0 = time.perf_counter()
            await router.acompletion(model="gpt", messages=messages)
            latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        tasks = []
        for _ in range(CALLS):
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(EVERY)
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        litellm.callbacks = []
        return {"wall_s": wall, "median_s": statistics.median(latencies),
                "within_0_5s": sum(1 for t in latencies if t < 0.5), "healthy_requests": a.state.count(),
                "refusing_requests": b.state.count(), "provider_429s": b.state.count(429)}


def main() -> None:
    print(f"package: {common.PACKAGE_ROOT}")
    for _ in range(3):
        r = asyncio.run(_run())
        print(f"{CALLS} calls in {r['wall_s']:.2f} s; median {r['median_s']:.2f} s; {r['within_0_5s']} within 0.5 s; "
              f"requests healthy/refusing {r['healthy_requests']}/{r['refusing_requests']}, "
              f"429s {r['provider_429s']}")


if __name__ == "__main__":
    main()
