"""Benchmark 5: the specification's Scenario 2, a spike of 10,000 requests.

200 asyncio tasks send 10,000 ``litellm.acompletion`` calls in all against the fake provider,
which enforces an exact sliding log of N requests per 60 s (like an RPM limit) and answers 429
with ``retry-after`` beyond it. Three subjects, one after the other in the same run:

* **plugin**: a ``HiveLimiter`` with the provider's limit (``requests_per_minute: N``) and a queue
  that waits as long as needed; LiteLLM and the openai SDK left at their defaults (the plugin
  takes over the SDK's hidden retries);
* **plain LiteLLM**: no plugin, LiteLLM and the openai SDK at their defaults (the SDK retries a 429
  twice, honouring ``retry-after`` up to its own cap);
* **plain LiteLLM, num_retries=3**: what a user adds by hand.

Reported: success rate, 429s that reached the caller, 429s the provider sent, throughput as a
share of the provider's limit over the run, and the client-side latency p50/p99 (queue wait +
call). Run alone: ``python benchmarks/bench_scenario2.py [--requests 10000] [--rpm 5000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from typing import Any

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

TASKS = 200


async def _drive(litellm: Any, url: str, requests: int, extra: dict[str, Any]) -> dict[str, Any]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    ok = 0

    async def worker() -> None:
        nonlocal ok
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.monotonic()
            try:
                await litellm.acompletion(model="openai/gpt-4o-mini", api_base=url, api_key="sk-bench",
                                          messages=[{"role": "user", "content": f"request {i}"}],
                                          max_tokens=5, **extra)
                ok += 1
                latencies.append(time.monotonic() - t0)
            except Exception as exc:  # counted by type
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return {"ok": ok, "errors": errors, "latencies": latencies, "duration": time.monotonic() - start}


def run(requests: int = 10_000, rpm: int = 5_000, with_num_retries: bool = False) -> dict[str, Any]:
    litellm = common.quiet_litellm()
    from hive_ratelimit_plugin import HiveLimiter
    from hive_ratelimit_plugin.plugin import unregister
    from hive_ratelimit_plugin.testing import FakeProvider, ProviderState

    results: dict[str, Any] = {"requests": requests, "tasks": TASKS, "provider_rpm": rpm}
    subjects: list[tuple[str, dict[str, Any], bool]] = [
        ("plugin", {}, True),
        ("plain LiteLLM", {}, False),
    ]
    if with_num_retries:
        subjects.append(("plain LiteLLM, num_retries=3", {"num_retries": 3}, False))
    for name, extra, with_plugin in subjects:
        state = ProviderState(requests_per_window=rpm, window_seconds=60.0, latency=0.01)
        with FakeProvider(state) as provider:
            limiter = None
            if with_plugin:
                limiter = HiveLimiter({"global": {"requests_per_minute": rpm},
                                       "queue": {"max_wait_seconds": 600, "max_size": 100_000},
                                       "runaway": {"enabled": False}, "state_path": ":memory:"})
                litellm.callbacks.append(limiter)
            loop = asyncio.new_event_loop()
            try:
                r = loop.run_until_complete(_drive(litellm, provider.url, requests, extra))
            finally:
                common.close_loop(loop)
                if limiter is not None:
                    unregister(limiter)
            lat = sorted(r.pop("latencies"))
            sent = state.count()
            rate_limited_at_provider = state.count(429)
            duration = r["duration"]
            # The least time the provider's limit allows for all requests: N per 60 s sliding window.
            ideal = 60.0 * (math.ceil(requests / rpm) - 1)
            results[name] = {
                **r,
                "sent_to_provider": sent,
                "provider_429s": rate_limited_at_provider,
                "caller_429s": r["errors"].get("RateLimitError", 0),
                "success_rate": r["ok"] / requests,
                "ideal_seconds": ideal,
                "time_efficiency": (ideal / duration) if duration and ideal else None,
                "p50_latency": common.percentile(lat, 0.5) if lat else None,
                "p99_latency": common.percentile(lat, 0.99) if lat else None,
            }
            print(f"{name:<30} ok {r['ok']}/{requests} in {duration:.1f}s, caller 429s "
                  f"{results[name]['caller_429s']}, provider 429s {rate_limited_at_provider}, sent {sent}, "
                  f"ideal {ideal:.0f}s, "
                  f"p50 {results[name]['p50_latency'] or 0:.2f}s p99 {results[name]['p99_latency'] or 0:.2f}s "
                  f"errors {r['errors']}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rpm", type=int, default=5_000)
    parser.add_argument("--with-num-retries", action="store_true")
    args = parser.parse_args()
    run(args.requests, args.rpm, args.with_num_retries)


def summary(r: dict[str, Any]) -> str:
    out = []
    for name in ("plugin", "plain LiteLLM", "plain LiteLLM, num_retries=3"):
        if name in r:
            x = r[name]
            out.append(f"{name}: {x['ok']}/{r['requests']} ok in {x['duration']:.1f}s, caller 429s {x['caller_429s']}, "
                       f"provider 429s {x['provider_429s']}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
