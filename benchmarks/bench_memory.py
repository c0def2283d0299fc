"""Benchmark 3: memory per active key, and eviction of idle keys.

Engine level: 100,000 distinct agent scopes (``agent:<i>``), each with ``requests_per_minute``
and ``tokens_per_minute``, each with one admitted (and released) call, on a ``FakeClock``.
Bytes per key = tracemalloc's net allocation / 100,000 (everything the engine retains: scope
state, windows, buckets, the key string, the index entry). Then the clock moves past the longest
configured window (60 s) and we look at ``Engine.scope_count``: after the engine's own
maintenance (it runs inside ``acquire`` at most once per clock second) and after
``Engine.evict_idle()``; and once more a day later, timing the ``acquire`` that runs the sweep.

Plugin level: the same 100,000 agents through ``HiveLimiter`` (config ``agents: {"*": ...}``),
one call each through the plugin's sync admission path (``_guard_sync`` + ``_finish``, i.e.
everything ``litellm.completion`` would run in the plugin, without LiteLLM itself), to see what
the plugin keeps besides the engine's scopes (caches, per-agent bookkeeping) and whether it goes
away with the scopes.

Run alone: ``python benchmarks/bench_memory.py [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from typing import Any

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

from hive_ratelimit_plugin._engine import Engine, Scope, Ticket
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.testing import FakeClock

AGENT_LIMITS = {"requests_per_minute": 100, "tokens_per_minute": 100_000}


def _deep_size(st: Any) -> dict[str, int]:
    """Approximate breakdown of one ScopeState with sys.getsizeof (best effort)."""
    out: dict[str, int] = {}
    try:
        out["ScopeState object"] = sys.getsizeof(st)
        out["key string"] = sys.getsizeof(st.key)
        lists = [getattr(st, n) for n in ("requests", "tokens", "input", "output", "budgets") if hasattr(st, n)]
        out[f"{len(lists)} window lists"] = sum(sys.getsizeof(x) for x in lists)
        windows = list(st.windows())
        out[f"{len(windows)} SlidingWindow objects"] = sum(sys.getsizeof(w) for w in windows)
        out[f"{len(windows)} bucket lists"] = sum(sys.getsizeof(w.buckets) for w in windows)
        out["buckets ([index, amount] lists + numbers)"] = sum(
            sys.getsizeof(b) + sys.getsizeof(b[0]) + sys.getsizeof(b[1]) for w in windows for b in w.buckets
        )
    except Exception as exc:  # internals changed
        out["error"] = 0
        out[repr(exc)[:60]] = 0
    return out


def _fill(engine: Engine, clock: FakeClock, limits: LimitSet, n: int, tag: str) -> None:
    for i in range(n):
        t = Ticket(f"{tag}-{i}", [Scope("agent", f"agent:{i}", limits)], input_tokens=12, output_tokens=256)
        if engine.acquire(t) is not None:
            raise AssertionError("not admitted")
        engine.release(t.call_id, input_tokens=12, output_tokens=5)
        if i % 1000 == 999:
            clock.advance(0.01)  # ~1 s of clock per 100,000 keys: maintenance runs as it would


def _trigger(engine: Engine, tag: str) -> float:
    """One admission on another scope (runs the engine's maintenance); returns its duration in ms."""
    t = Ticket(tag, [Scope("global", "global", LimitSet(requests_per_minute=10**9))])
    t0 = time.perf_counter_ns()
    engine.acquire(t)
    ms = (time.perf_counter_ns() - t0) / 1e6
    engine.release(tag)
    return ms


def engine_level(n: int) -> dict[str, Any]:
    limits = LimitSet(**AGENT_LIMITS)
    # 1. Memory, with tracemalloc on.
    clock = FakeClock()
    gc.collect()
    tracemalloc.start()
    engine = Engine(clock)
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    _fill(engine, clock, limits, n, "a")
    build_s = time.perf_counter() - t0
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    count_active = engine.scope_count
    breakdown = _deep_size(next(iter(engine._states.values()))) if getattr(engine, "_states", None) else {}
    clock.advance(61.0)  # past the longest configured window (60 s): every window is empty now
    _trigger(engine, "t1")
    count_after_maintenance_61s = engine.scope_count
    evicted = engine.evict_idle()
    count_after_evict_idle = engine.scope_count
    gc.collect()
    after_evict = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del engine

    # 2. Timings, without tracemalloc: evict_idle(), and the engine's own sweep a day later.
    clock = FakeClock()
    engine = Engine(clock)
    t0 = time.perf_counter()
    _fill(engine, clock, limits, n, "b")
    fill_s = time.perf_counter() - t0
    clock.advance(61.0)
    _trigger(engine, "t2")
    t1 = time.perf_counter_ns()
    engine.evict_idle()
    evict_ms = (time.perf_counter_ns() - t1) / 1e6
    _fill(engine, clock, limits, n, "c")
    rebuilt = engine.scope_count
    clock.advance(61.0)
    _trigger(engine, "t3")
    count_61s_again = engine.scope_count
    clock.advance(86_400.0)
    normal_ms = _trigger(engine, "t4")  # may sweep already if the horizon is shorter
    count_after_day = engine.scope_count
    clock.advance(2.0)
    sweep_ms = _trigger(engine, "t5")
    count_after_day2 = engine.scope_count
    return {
        "keys": n,
        "build_seconds_with_tracemalloc": build_s,
        "fill_us_per_key_without_tracemalloc": fill_s / n * 1e6,
        "net_bytes": after - base,
        "bytes_per_key": (after - base) / n,
        "scope_count_active": count_active,
        "scope_count_after_61s_maintenance": count_after_maintenance_61s,
        "evict_idle_returned": evicted,
        "evict_idle_ms": evict_ms,
        "scope_count_after_evict_idle": count_after_evict_idle,
        "net_bytes_after_evict_idle": after_evict - base,
        "scope_count_rebuilt": rebuilt,
        "scope_count_after_61s_maintenance_again": count_61s_again,
        "scope_count_after_1day_maintenance": min(count_after_day, count_after_day2),
        "sweep_acquire_ms_after_1day": max(normal_ms, sweep_ms),
        "one_scope_breakdown_bytes": breakdown,
    }


def plugin_level(n: int) -> dict[str, Any]:
    common.quiet_litellm()
    from hive_ratelimit_plugin.plugin import HiveLimiter

    cfg: dict[str, Any] = {"agents": {"*": dict(AGENT_LIMITS)}}
    from hive_ratelimit_plugin.config import RateLimitingConfig

    if "runaway" in RateLimitingConfig.model_fields:
        cfg["runaway"] = {"enabled": True}  # the default; one request per agent never trips it
    clock = FakeClock()
    gc.collect()
    tracemalloc.start()
    lim = HiveLimiter(cfg, clock=clock)
    response = {"usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}
    messages = [{"role": "user", "content": "hi"}]
    # One call first, so that what the first call loads once per process (LiteLLM's tokenizer:
    # tens of MB) is not charged to the agents.
    warm = {"model": "openai/gpt-4o-mini", "messages": messages, "metadata": {"agent_id": "warm-up"}}
    lim._finish(lim._guard_sync("completion", warm), response)
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    for i in range(n):
        kw = {"model": "openai/gpt-4o-mini", "messages": messages, "metadata": {"agent_id": f"a{i}"}}
        cid = lim._guard_sync("completion", kw)
        if cid is None:
            raise AssertionError("no ticket: the agent limits did not apply")
        lim._finish(cid, response)
        if i % 1000 == 999:
            clock.advance(0.01)
    build_s = time.perf_counter() - t0
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    engine = lim._engine
    count_active = engine.scope_count
    clock.advance(61.0)
    engine.evict_idle()
    count_after = engine.scope_count
    gc.collect()
    after_evict = tracemalloc.get_traced_memory()[0]
    # Where the rest lives (largest allocation sites of what survived eviction).
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*hive_ratelimit_plugin*")])
    top = []
    for stat in snap.statistics("lineno")[:6]:
        frame = stat.traceback[0]
        top.append(
            {"where": f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}", "bytes": stat.size, "blocks": stat.count}
        )
    tracemalloc.stop()
    return {
        "keys": n,
        "build_seconds_with_tracemalloc": build_s,
        "net_bytes": after - base,
        "bytes_per_key": (after - base) / n,
        "scope_count_active": count_active,
        "scope_count_after_evict_idle": count_after,
        "net_bytes_after_evict_idle": after_evict - base,
        "bytes_per_key_left_after_evict_idle": (after_evict - base) / n,
        "largest_survivors": top,
    }


def run(quick: bool = False) -> dict[str, Any]:
    n = 20_000 if quick else 100_000
    res: dict[str, Any] = {"engine": engine_level(n)}
    try:
        # 20,000 agents: the plugin path under tracemalloc is ~0.7 ms per new agent on this machine.
        res["plugin"] = plugin_level(min(n, 20_000))
        # A quarter as many agents: what stays after eviction is the same if it is bounded (caches
        # of at most a few thousand entries), four times less if it were kept per agent.
        res["plugin"]["quarter"] = plugin_level(min(n, 20_000) // 4)["net_bytes_after_evict_idle"]
    except Exception as exc:  # the plugin's internals changed: report rather than fail the suite
        res["plugin"] = {"error": f"{type(exc).__name__}: {exc}"}
    return res


def summary(res: dict[str, Any]) -> str:
    e = res["engine"]
    lines = [
        f"Engine: {e['keys']:,} agent scopes -> {e['net_bytes'] / 1e6:.1f} MB net = "
        f"{e['bytes_per_key']:.0f} bytes per active key (scope_count {e['scope_count_active']:,})",
        f"  clock +61 s, maintenance inside acquire: scope_count {e['scope_count_after_61s_maintenance']:,}",
        f"  evict_idle(): evicted {e['evict_idle_returned']:,} (takes {e['evict_idle_ms']:.0f} ms) -> scope_count "
        f"{e['scope_count_after_evict_idle']:,}; net memory left {e['net_bytes_after_evict_idle'] / 1e6:.2f} MB",
        f"  rebuilt {e['scope_count_rebuilt']:,}; +61 s maintenance: {e['scope_count_after_61s_maintenance_again']:,}; "
        f"+1 day maintenance: {e['scope_count_after_1day_maintenance']:,} (that acquire took "
        f"{e['sweep_acquire_ms_after_1day']:.0f} ms)",
        "  one scope, by sys.getsizeof: " + ", ".join(f"{k} {v}" for k, v in e["one_scope_breakdown_bytes"].items()),
    ]
    p = res["plugin"]
    if "error" in p:
        lines.append(f"Plugin level: not measured ({p['error']})")
    else:
        lines.append(
            f"Plugin: {p['keys']:,} agents -> {p['bytes_per_key']:.0f} bytes per key; after "
            f"evict_idle: scope_count {p['scope_count_after_evict_idle']:,}, "
            f"{p['net_bytes_after_evict_idle'] / 1e6:.1f} MB still held "
            f"({p['quarter'] / 1e6:.1f} MB after a quarter as many agents)"
        )
        for t in p["largest_survivors"]:
            lines.append(f"    {t['where']:28s} {t['bytes'] / 1e6:7.2f} MB in {t['blocks']:,} blocks")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20,000 keys instead of 100,000")
    args = p.parse_args()
    print(summary(run(quick=args.quick)))


if __name__ == "__main__":
    main()
