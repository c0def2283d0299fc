"""Benchmark 1: the cost of one admission decision, ours against `limits`, `pyrate_limiter`, `aiolimiter`.

Ours: ``Engine.acquire`` (+ ``Engine.release``) of a ticket that counts against 6 levels
(global, provider, model, agent, user, team), each with ``requests_per_minute``,
``tokens_per_minute`` and ``concurrent_requests`` set so high that it always admits. Also the
same engine with a single level and a single limit (``requests_per_minute``), the like-for-like
comparison with the other libraries, which check one limit of one key.

Theirs (one key, one limit of 1,000,000 per minute, always room):

* ``limits``: ``MovingWindowRateLimiter(MemoryStorage()).hit(parse("1000000/minute"), "key")``.
  Its moving window keeps one entry per hit in a list and inserts at the front, so its cost
  grows with the hits held in the window: the storage is reset before every round so the window
  holds at most ``per_round`` entries; a separate figure shows it with 50,000 entries.
* ``pyrate_limiter``: ``Limiter(InMemoryBucket([Rate(1_000_000, Duration.MINUTE)])).try_acquire("key")``.
* ``aiolimiter``: ``await AsyncLimiter(10**9, 60).acquire()`` (timed inside one event loop).

Every subject is timed call by call with ``time.perf_counter_ns`` (the median cost of an empty
timer pair is subtracted), after a warm-up, in rounds whose order rotates so machine noise hits
all subjects alike, with the cyclic GC paused during each round.

Run alone: ``python benchmarks/bench_engine.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from typing import Any

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

from hive_ratelimit_plugin._engine import Engine, Scope, Ticket
from hive_ratelimit_plugin.config import LimitSet

LEVELS = ("global", "provider", "model", "agent", "user", "team")
KEYS = {
    "global": "global",
    "provider": "provider:openai",
    "model": "model:openai/gpt-4o-mini",
    "agent": "agent:researcher",
    "user": "user:u-42",
    "team": "team:growth",
}


def six_level_scopes() -> list[Scope]:
    limits = LimitSet(requests_per_minute=10**9, tokens_per_minute=common.HUGE, concurrent_requests=10**9)
    return [Scope(level, KEYS[level], limits) for level in LEVELS]


def one_level_scopes() -> list[Scope]:
    return [Scope("global", "global", LimitSet(requests_per_minute=1_000_000))]


def _engine_subjects(scopes: list[Scope], max_batch: int) -> tuple[Any, Any, Engine]:
    engine = Engine(time.monotonic)
    pc = time.perf_counter_ns
    acquire, release = engine.acquire, engine.release
    # The plugin estimates tokens per call; give the ticket a realistic estimate.
    single = Ticket("call-0", scopes, input_tokens=12, output_tokens=256)
    batch = [Ticket(f"call-{i + 1}", scopes, input_tokens=12, output_tokens=256) for i in range(max_batch)]

    def acquire_release(n: int) -> list[int]:
        out = [0] * n
        t = single
        cid = t.call_id
        with common.GcPaused():
            for i in range(n):
                t0 = pc()
                r = acquire(t)
                release(cid)
                out[i] = pc() - t0
                if r is not None:
                    raise AssertionError("the engine did not admit")
        return out

    def acquire_only(n: int) -> list[int]:
        out = [0] * n
        tickets = batch[:n]
        with common.GcPaused():
            for i, t in enumerate(tickets):
                t0 = pc()
                r = acquire(t)
                out[i] = pc() - t0
                if r is not None:
                    raise AssertionError("the engine did not admit")
        for t in tickets:  # untimed: keep the number of open reservations bounded
            release(t.call_id)
        return out

    return acquire_release, acquire_only, engine


def _limits_subject(grow_to: int = 0) -> Any:
    from limits import parse, storage, strategies

    store = storage.MemoryStorage()
    limiter = strategies.MovingWindowRateLimiter(store)
    item = parse("1000000/minute")
    pc = time.perf_counter_ns
    hit = limiter.hit

    def run(n: int) -> list[int]:
        store.reset()
        for _ in range(grow_to):
            hit(item, "key")
        out = [0] * n
        with common.GcPaused():
            for i in range(n):
                t0 = pc()
                ok = hit(item, "key")
                out[i] = pc() - t0
                if not ok:
                    raise AssertionError("limits refused")
        return out

    return run


def _pyrate_subject() -> Any:
    from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate

    bucket = InMemoryBucket([Rate(1_000_000, Duration.MINUTE)])
    limiter = Limiter(bucket)
    pc = time.perf_counter_ns
    try_acquire = limiter.try_acquire

    def run(n: int) -> list[int]:
        bucket.flush()  # keep it well under its limit whatever the number of rounds
        out = [0] * n
        with common.GcPaused():
            for i in range(n):
                t0 = pc()
                ok = try_acquire("key")
                out[i] = pc() - t0
                if not ok:
                    raise AssertionError("pyrate_limiter refused")
        return out

    return run, limiter


def _aiolimiter_subject(loop: asyncio.AbstractEventLoop) -> Any:
    from aiolimiter import AsyncLimiter

    async def make() -> AsyncLimiter:
        return AsyncLimiter(10**9, 60)

    limiter = loop.run_until_complete(make())
    pc = time.perf_counter_ns

    async def timed(n: int) -> list[int]:
        acquire = limiter.acquire
        out = [0] * n
        for i in range(n):
            t0 = pc()
            await acquire()
            out[i] = pc() - t0
        return out

    def run(n: int) -> list[int]:
        with common.GcPaused():
            return loop.run_until_complete(timed(n))

    return run


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns ``{"subjects": {name: stats}, "ratios": {...}, ...}``."""
    rounds, per_round, warmup = (10, 1000, 2000) if quick else (40, 2500, 5000)
    overhead = common.timer_overhead_ns()
    six_ar, six_a, six_engine = _engine_subjects(six_level_scopes(), per_round)
    one_ar, one_a, _ = _engine_subjects(one_level_scopes(), per_round)
    pyrate_run, pyrate_limiter = _pyrate_subject()
    loop = asyncio.new_event_loop()
    try:
        subjects = {
            "ours_6x3_acquire_release": six_ar,
            "ours_6x3_acquire": six_a,
            "ours_1x1_acquire_release": one_ar,
            "ours_1x1_acquire": one_a,
            "limits_moving_window_hit": _limits_subject(),
            "pyrate_limiter_try_acquire": pyrate_run,
            "aiolimiter_acquire": _aiolimiter_subject(loop),
        }
        samples = common.run_interleaved(subjects, rounds, per_round, warmup)
        # The moving window's cost with many entries held (an O(n) list insert per hit).
        grown = _limits_subject(grow_to=50_000)
        grown(200)
        grown_samples: list[int] = []
        for _ in range(3 if quick else 5):
            grown_samples.extend(grown(1000))
    finally:
        common.close_loop(loop)
        try:
            pyrate_limiter.close()
        except Exception:
            pass
    gc.collect()
    stats = {name: common.summarize_ns(s, overhead) for name, s in samples.items()}
    stats["limits_moving_window_hit_50k_entries"] = common.summarize_ns(grown_samples, overhead)
    theirs = ("limits_moving_window_hit", "pyrate_limiter_try_acquire", "aiolimiter_acquire")
    ratios = {}
    for ours in ("ours_6x3_acquire_release", "ours_6x3_acquire", "ours_1x1_acquire_release", "ours_1x1_acquire"):
        for other in theirs:
            ratios[f"{ours}/{other}"] = stats[ours]["median_us"] / stats[other]["median_us"]
    return {
        "subjects": stats,
        "ratios": ratios,
        "timer_overhead_ns": overhead,
        "rounds": rounds,
        "per_round": per_round,
        "warmup": warmup,
        "target_median_us": 20.0,
        "engine_after": repr(six_engine),
    }


def summary(res: dict[str, Any]) -> str:
    lines = [
        f"Engine decision cost ({res['rounds']} rounds x {res['per_round']} calls, "
        f"timer overhead {res['timer_overhead_ns']:.0f} ns subtracted)"
    ]
    for name, s in res["subjects"].items():
        lines.append(f"  {name:42s} median {common.fmt_us(s['median_us']):>9s}   p99 {common.fmt_us(s['p99_us']):>9s}")
    lines.append("  ratios (median ours / median theirs):")
    for k, v in res["ratios"].items():
        lines.append(f"    {k:70s} {v:6.2f}x")
    med = res["subjects"]["ours_6x3_acquire_release"]["median_us"]
    lines.append(
        f"  target: 6x3 acquire+release median <= {res['target_median_us']:.0f} µs -> "
        f"{'MET' if med <= res['target_median_us'] else 'MISSED'} ({common.fmt_us(med)})"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = p.parse_args()
    print(summary(run(quick=args.quick)))


if __name__ == "__main__":
    main()
