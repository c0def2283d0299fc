"""Benchmark: admitted calls per second from one process against a local Redis, and round trips.

Subjects, all against the same Redis server (``HIVE_BENCH_REDIS``, default
``redis://127.0.0.1:6379/14``), one thread, limits so high that every call is admitted:

* ours, 1 level: ``RedisEngine.acquire`` + ``release`` of a call counted against one scope with
  one limit (``requests_per_minute``): the like-for-like comparison. A call is admitted *and*
  settled: two round trips (the ADMIT and SETTLE scripts).
* ours, 6 levels: global, provider, model, agent, user, team, each with requests per minute,
  tokens per minute and a concurrency limit, plus a daily budget at the agent level: what a real
  call costs, still two round trips.
* ``limits``: ``MovingWindowRateLimiter(RedisStorage(url)).hit(parse("1000000/minute"), key)``,
  the ``limits`` library's Redis moving window (one Lua script per hit; it admits, it does not
  settle, count tokens or hold a concurrency slot).

Round trips are counted on the client (every command a ``redis.Redis`` connection sends).
Rounds rotate the order of the subjects so machine noise hits them alike; the median round is
reported.

Run alone: ``python benchmarks/bench_redis.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from typing import Any

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

import redis

from hive_ratelimit_plugin._engine import Scope, Ticket
from hive_ratelimit_plugin._redis import RedisEngine
from hive_ratelimit_plugin.config import LimitSet

URL = os.environ.get("HIVE_BENCH_REDIS", "redis://127.0.0.1:6379/14")
LEVELS = {"global": "global", "provider": "provider:openai", "model": "model:openai/gpt-4o-mini",
          "agent": "agent:researcher", "user": "user:u-42", "team": "team:growth"}

_sent = [0]
_orig = redis.Redis.execute_command


def _counting(self: Any, *args: Any, **kwargs: Any) -> Any:
    _sent[0] += 1
    return _orig(self, *args, **kwargs)


redis.Redis.execute_command = _counting  # type: ignore[method-assign]
ENGINES: dict[int, RedisEngine] = {}


def _ours(levels: int) -> tuple[Any, Any]:
    prefix = "bench-" + uuid.uuid4().hex[:8]
    engine = ENGINES[levels] = RedisEngine(time.monotonic, url=URL, prefix=prefix)
    if levels == 1:
        scopes = [Scope("global", "global", LimitSet(requests_per_minute=10**9))]
    else:
        lim = LimitSet(requests_per_minute=10**9, tokens_per_minute=common.HUGE, concurrent_requests=10**9)
        scopes = [Scope(level, key, lim if level != "agent" else lim.model_copy(update={"max_cost_per_day": 1e12}))
                  for level, key in LEVELS.items()]
    spend = list(LEVELS.values()) if levels > 1 else ["global"]
    counter = [0]

    def call() -> None:
        counter[0] += 1
        cid = str(counter[0])
        t = Ticket(cid, scopes, input_tokens=100, output_tokens=50, cost=0.001, spend_keys=spend)
        assert engine.acquire(t, None) is None
        engine.release(cid, input_tokens=90, output_tokens=40, cost=0.0009)

    def cleanup() -> None:
        keys = list(engine.r.scan_iter(match="{" + prefix + "}*", count=1000))
        if keys:
            engine.r.delete(*keys)

    return call, cleanup


def _limits() -> tuple[Any, Any]:
    from limits import parse
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter

    storage = RedisStorage(URL)
    limiter = MovingWindowRateLimiter(storage)
    item = parse("1000000/minute")
    key = "bench-limits-" + uuid.uuid4().hex[:8]

    def call() -> None:
        assert limiter.hit(item, key)

    def cleanup() -> None:
        storage.reset()

    return call, cleanup


def run(quick: bool = False) -> dict[str, Any]:
    redis.Redis.from_url(URL).ping()
    per_round = 300 if quick else 1500
    rounds = 3 if quick else 7
    subjects = {"ours, 1 level (admit + settle)": _ours(1), "ours, 6 levels + budget (admit + settle)": _ours(6),
                "limits MovingWindow on Redis (hit)": _limits()}
    rates: dict[str, list[float]] = {name: [] for name in subjects}
    trips: dict[str, float] = {}
    for call, _ in subjects.values():  # warm-up: scripts loaded, connections open
        for _ in range(50):
            call()
    names = list(subjects)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            call = subjects[name][0]
            before = _sent[0]
            t0 = time.perf_counter()
            for _ in range(per_round):
                call()
            dt = time.perf_counter() - t0
            rates[name].append(per_round / dt)
            trips[name] = (_sent[0] - before) / per_round
    memory = ENGINES[6].redis_memory()  # after rounds x per_round calls through 6 levels
    for _, cleanup in subjects.values():
        cleanup()
    results = {name: {"calls_per_second": statistics.median(v), "round_trips_per_call": trips[name],
                      "us_per_call": 1e6 / statistics.median(v)} for name, v in rates.items()}
    base = results["limits MovingWindow on Redis (hit)"]["calls_per_second"]
    for v in results.values():
        v["ratio_to_limits"] = v["calls_per_second"] / base
    info = redis.Redis.from_url(URL).info("server")
    return {"results": results, "memory_bytes": memory, "per_round": per_round, "rounds": rounds, "redis_version": info.get("redis_version"),
            "url": URL}


def summary(out: dict[str, Any]) -> str:
    parts = [f"{name}: {v['calls_per_second']:,.0f}/s ({v['round_trips_per_call']:.0f} round trips)"
             for name, v in out["results"].items()]
    return "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    out = run(p.parse_args().quick)
    print(f"Redis {out['redis_version']} at {out['url']}, {out['rounds']} rounds x {out['per_round']} calls")
    print(f"{'subject':45} {'calls/s':>9} {'us/call':>8} {'round trips':>12} {'vs limits':>9}")
    for name, v in out["results"].items():
        print(f"{name:45} {v['calls_per_second']:9.0f} {v['us_per_call']:8.1f} {v['round_trips_per_call']:12.2f} "
              f"{v['ratio_to_limits']:9.2f}")
    print("Redis memory per scope after the 6-level run (bytes):",
          ", ".join(f"{k} {v}" for k, v in sorted(out["memory_bytes"].items())))


if __name__ == "__main__":
    main()
