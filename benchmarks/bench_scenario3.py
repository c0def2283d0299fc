"""Benchmark 8: the specification's Scenario 3, two models and priorities.

"Agent uses GPT-4 for complex tasks, GPT-3.5 for simple ones. Without rate limiting: GPT-4 quota
exhausted quickly. With rate limiting: intelligent allocation, GPT-4 reserved for high-value
tasks."

Two fake providers stand for the two models' quotas: ``openai/gpt-4`` limited to ``GPT4_RPM``
requests per minute and ``openai/gpt-3.5-turbo`` to ``GPT35_RPM`` (exact sliding 60 s logs, 429
with ``retry-after`` beyond them). For ``DURATION`` seconds:

* **bulk work saturates both models**: ``BULK_TASKS`` asyncio tasks in closed loops on gpt-4 and as
  many on gpt-3.5 (``metadata={"priority": "low"}``);
* **high-value tasks** arrive on a fixed schedule, ``VIP_RPS`` per second, on gpt-4
  (``metadata={"priority": "high"}``); each must finish within ``VIP_DEADLINE`` seconds to count.

``VIP_DEADLINE`` seconds after the last high-value task was issued, everything still waiting or in
flight is cancelled (bulk work is background work; a run lasts DURATION + VIP_DEADLINE seconds,
shorter than the providers' window, so each provider allows at most its limit per run).

Subjects: **plain LiteLLM** (defaults: the openai SDK retries a 429 twice), and **the plugin** with
the providers' limits per model, ``queue.high_priority_reserve: 0.2`` (a fifth of every limit only
for high priority) and a queue that waits as long as needed. Reported per class: calls, successes within
the deadline, 429s reaching the caller, latency p50/p99; per model: 429s the provider sent and
throughput as a share of its limit. Run alone: ``python benchmarks/bench_scenario3.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

GPT4_RPM = 300
GPT35_RPM = 1200
BULK_TASKS = 30  # per model
VIP_RPS = 1.0  # 10 high-value calls in a run: within the 20 % reserve of gpt-4 (60 per minute)
VIP_DEADLINE = 5.0
DURATION = 10.0
LATENCY = 0.05


async def _drive(litellm: Any, urls: dict[str, str]) -> dict[str, Any]:
    stats: dict[str, dict[str, Any]] = {
        k: {"calls": 0, "ok": 0, "late": 0, "cancelled": 0, "caller_429s": 0, "errors": {}, "latencies": []}
        for k in ("vip gpt-4", "bulk gpt-4", "bulk gpt-3.5")
    }
    stop_at = time.monotonic() + DURATION

    async def call(kind: str, model: str, priority: str, i: int) -> None:
        s = stats[kind]
        s["calls"] += 1
        t0 = time.monotonic()
        try:
            await litellm.acompletion(model=model, api_base=urls[model], api_key="sk-bench",
                                      messages=[{"role": "user", "content": f"{kind} task {i}"}], max_tokens=5,
                                      metadata={"priority": priority, "agent_id": kind.split()[0]})
        except asyncio.CancelledError:
            s["cancelled"] += 1
            raise
        except Exception as exc:
            name = type(exc).__name__
            s["errors"][name] = s["errors"].get(name, 0) + 1
            if name == "RateLimitError":
                s["caller_429s"] += 1
            return
        took = time.monotonic() - t0
        s["latencies"].append(took)
        if kind.startswith("vip") and took > VIP_DEADLINE:
            s["late"] += 1
        else:
            s["ok"] += 1

    async def bulk(kind: str, model: str, w: int) -> None:
        i = 0
        while time.monotonic() < stop_at:
            await call(kind, model, "low", w * 100_000 + i)
            i += 1

    async def vip() -> None:
        tasks: list[asyncio.Task[None]] = []
        n = int(DURATION * VIP_RPS)
        start = time.monotonic()
        for i in range(n):
            delay = start + i / VIP_RPS - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(call("vip gpt-4", "openai/gpt-4", "high", i)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    start = time.monotonic()
    tasks = [asyncio.create_task(vip())]
    tasks += [asyncio.create_task(bulk("bulk gpt-4", "openai/gpt-4", w)) for w in range(BULK_TASKS)]
    tasks += [asyncio.create_task(bulk("bulk gpt-3.5", "openai/gpt-3.5-turbo", w)) for w in range(BULK_TASKS)]
    await asyncio.wait(tasks, timeout=DURATION + VIP_DEADLINE)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - start
    out: dict[str, Any] = {"elapsed": elapsed}
    for kind, s in stats.items():
        lat = sorted(s.pop("latencies"))
        out[kind] = {**s, "success_rate": s["ok"] / s["calls"] if s["calls"] else None,
                     "p50_latency": common.percentile(lat, 0.5) if lat else None,
                     "p99_latency": common.percentile(lat, 0.99) if lat else None}
    return out


def run() -> dict[str, Any]:
    litellm = common.quiet_litellm()
    from hive_ratelimit_plugin import HiveLimiter
    from hive_ratelimit_plugin.plugin import unregister
    from hive_ratelimit_plugin.testing import FakeProvider, ProviderState

    results: dict[str, Any] = {"gpt4_rpm": GPT4_RPM, "gpt35_rpm": GPT35_RPM, "bulk_tasks": BULK_TASKS,
                               "vip_rps": VIP_RPS, "vip_deadline": VIP_DEADLINE, "duration": DURATION,
                               "latency": LATENCY}
    for name, with_plugin in (("plain LiteLLM", False), ("plugin", True)):
        s4 = ProviderState(requests_per_window=GPT4_RPM, window_seconds=60.0, latency=LATENCY)
        s35 = ProviderState(requests_per_window=GPT35_RPM, window_seconds=60.0, latency=LATENCY)
        with FakeProvider(s4) as p4, FakeProvider(s35) as p35:
            limiter = None
            if with_plugin:
                limiter = HiveLimiter({
                    "providers": {"openai": {"gpt-4": {"requests_per_minute": GPT4_RPM},
                                             "gpt-3.5-turbo": {"requests_per_minute": GPT35_RPM}}},
                    "queue": {"high_priority_reserve": 0.2, "max_wait_seconds": 3600, "max_size": 100_000},
                    "runaway": {"enabled": False}, "state_path": ":memory:",
                })
                litellm.callbacks.append(limiter)
            loop = asyncio.new_event_loop()
            try:
                r = loop.run_until_complete(_drive(litellm, {"openai/gpt-4": p4.url,
                                                             "openai/gpt-3.5-turbo": p35.url}))
            finally:
                common.close_loop(loop)
                if limiter is not None:
                    unregister(limiter)
            for model, st, rpm in (("gpt-4", s4, GPT4_RPM), ("gpt-3.5", s35, GPT35_RPM)):
                # A run is shorter than the window: the provider allows at most its limit in it.
                r[f"provider {model}"] = {"received": st.count(), "ok": st.count(200), "429": st.count(429),
                                          "share_of_limit": st.count(200) / rpm}
            results[name] = r
            v = r["vip gpt-4"]
            print(f"{name:<14} elapsed {r['elapsed']:.1f}s vip ok {v['ok']}/{v['calls']} (p50 {v['p50_latency'] or 0:.2f}s p99 "
                  f"{v['p99_latency'] or 0:.2f}s, errors {v['errors']}); bulk gpt-4 ok {r['bulk gpt-4']['ok']}, "
                  f"bulk gpt-3.5 ok {r['bulk gpt-3.5']['ok']}; provider 429s gpt-4 {r['provider gpt-4']['429']}, "
                  f"gpt-3.5 {r['provider gpt-3.5']['429']}", flush=True)
    return results


def summary(r: dict[str, Any]) -> str:
    out = []
    for name in ("plain LiteLLM", "plugin"):
        v = r[name]["vip gpt-4"]
        out.append(f"{name}: high-priority gpt-4 calls ok {v['ok']}/{v['calls']}, p99 {v['p99_latency'] or 0:.2f}s")
    return "\n".join(out)


if __name__ == "__main__":
    run()
