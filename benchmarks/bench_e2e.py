"""Benchmark 2: what the plugin adds to a whole LiteLLM call, and what its token estimate costs.

A/B: ``litellm.acompletion(model="openai/gpt-4o-mini", messages=[{"role": "user", "content":
"hi"}], mock_response="ok")`` (no network: LiteLLM builds the response itself, but runs its
whole pipeline, callbacks included), per call, without any callback vs. with a ``HiveLimiter``
registered whose configuration limits 6 levels (global, provider ``openai``, model
``gpt-4o-mini``, agent, user, team; each with requests, tokens and concurrency limits high
enough to always admit). The call carries ``metadata={"agent_id", "team_id"}`` and ``user=`` in
both modes. The modes run in alternating blocks (the order flips every pair) so that machine
noise falls on both alike. Same for sync ``litellm.completion``, where the baseline is LiteLLM's
own function, and a third mode shows the sync guard installed with no limiter registered.

Before measuring it checks that ``mock_response`` calls really pass through the plugin
(``admitted_total`` grows by one per call in plugin blocks and not at all otherwise).

It also times the plugin's own methods per call (an instrumented subclass) and the token
estimate ``_tokens.count_messages``: first call (tokenizer run, cache miss) vs. cached, for
repeated vs. fresh message contents.

Run alone: ``python benchmarks/bench_e2e.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict
from typing import Any

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

MODEL = "openai/gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "hi"}]
IDENTITY = {"metadata": {"agent_id": "researcher", "team_id": "growth"}, "user": "u-42"}


def six_level_config() -> dict[str, Any]:
    from hive_ratelimit_plugin.config import RateLimitingConfig

    big = {"requests_per_minute": 10**9, "tokens_per_minute": common.HUGE, "concurrent_requests": 10**9}
    cfg: dict[str, Any] = {
        "global": dict(big),
        "providers": {"openai": {**big, "gpt-4o-mini": dict(big)}},
        "agents": {"researcher": dict(big)},
        "users": {"u-42": dict(big)},
        "teams": {"growth": dict(big)},
        "queue": {"max_wait_seconds": 60},
    }
    if "runaway" in RateLimitingConfig.model_fields:
        # The loop detector would (rightly) stop a benchmark that repeats one request thousands
        # of times; its per-call cost is still paid (the check runs before the breaker matters).
        cfg["runaway"] = {"enabled": False}
    return cfg


def two_level_config() -> dict[str, Any]:
    """The rate limits of the specification's example, at benchmark scale: global (requests/min,
    tokens/min, concurrency) and the model (requests/min, tokens/min); no budget."""
    cfg = six_level_config()
    big = cfg["global"]
    cfg["providers"] = {"openai": {"gpt-4o-mini": {"requests_per_minute": big["requests_per_minute"],
                                                   "tokens_per_minute": big["tokens_per_minute"]}}}
    for level in ("agents", "users", "teams"):
        cfg[level] = {}
    return cfg


def runaway_enabled_by_default() -> bool | None:
    from hive_ratelimit_plugin.config import RateLimitingConfig

    if "runaway" not in RateLimitingConfig.model_fields:
        return None
    return bool(RateLimitingConfig().runaway.enabled)


def _kwargs() -> dict[str, Any]:
    # A fresh metadata dict per call: LiteLLM adds keys to it.
    return {
        "model": MODEL,
        "messages": MESSAGES,
        "mock_response": "ok",
        "metadata": dict(IDENTITY["metadata"]),
        "user": IDENTITY["user"],
    }


def _ab(
    name_a: str, run_a: Any, name_b: str, run_b: Any, blocks: int, per_block: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Alternate blocks of modes; ``run_x(n)`` returns n per-call durations (ns)."""
    modes = {name_a: run_a, name_b: run_b, **(extra or {})}
    names = list(modes)
    samples: dict[str, list[int]] = {n: [] for n in names}
    block_medians: dict[str, list[float]] = {n: [] for n in names}
    cpu_us: dict[str, list[float]] = {n: [] for n in names}
    for b in range(blocks):
        order = names if b % 2 == 0 else names[::-1]  # A B (C..) then (..C) B A: no fixed position
        for n in order:
            c0 = time.process_time_ns()
            s = modes[n](per_block)
            cpu_us[n].append((time.process_time_ns() - c0) / per_block / 1000.0)
            samples[n].extend(s)
            block_medians[n].append(statistics.median(s) / 1000.0)
    stats = {n: common.summarize_ns(samples[n]) for n in names}
    for n in names:
        stats[n]["cpu_us_per_call_median_of_blocks"] = statistics.median(cpu_us[n])
    # Paired estimate: blocks b of A and B ran back to back.
    pair = [bm / am - 1.0 for am, bm in zip(block_medians[name_a], block_medians[name_b], strict=True)]
    cpu_pair = [bc / ac - 1.0 for ac, bc in zip(cpu_us[name_a], cpu_us[name_b], strict=True)]
    return {
        "modes": stats,
        "cpu_overhead_pct_median_of_block_pairs": 100.0 * statistics.median(cpu_pair),
        "overhead_pct_pooled_median": 100.0 * (stats[name_b]["median_us"] / stats[name_a]["median_us"] - 1.0),
        "overhead_pct_median_of_block_pairs": 100.0 * statistics.median(pair),
        "overhead_us": stats[name_b]["median_us"] - stats[name_a]["median_us"],
        "block_pair_overhead_pct_min_max": (100.0 * min(pair), 100.0 * max(pair)),
    }


def _instrumented_class() -> Any:
    """A HiveLimiter subclass timing its own entry points (inclusive per method, and outermost)."""
    import threading

    from hive_ratelimit_plugin.plugin import HiveLimiter

    samples: dict[str, list[int]] = defaultdict(list)
    depth = threading.local()
    pc = time.perf_counter_ns

    class Instrumented(HiveLimiter):
        pass

    def enter() -> bool:
        d = getattr(depth, "d", 0)
        depth.d = d + 1
        return d == 0

    def leave(name: str, t0: int, top: bool) -> None:
        dt = pc() - t0
        depth.d -= 1
        samples[name if top else name + " (nested)"].append(dt)

    def wrap_sync(name: str) -> None:
        orig = getattr(HiveLimiter, name)

        def w(self: Any, *a: Any, **k: Any) -> Any:
            top = enter()
            t0 = pc()
            try:
                return orig(self, *a, **k)
            finally:
                leave(name, t0, top)

        setattr(Instrumented, name, w)

    def wrap_async(name: str) -> None:
        orig = getattr(HiveLimiter, name)

        async def w(self: Any, *a: Any, **k: Any) -> Any:
            # No await happens inside while the call is admitted at once, so the depth
            # counter is not interleaved with other tasks.
            top = enter()
            t0 = pc()
            try:
                return await orig(self, *a, **k)
            finally:
                leave(name, t0, top)

        setattr(Instrumented, name, w)

    for n in (
        "async_pre_call_deployment_hook",
        "async_post_call_success_deployment_hook",
        "async_logging_hook",
        "async_log_failure_event",
    ):
        wrap_async(n)
    for n in ("log_pre_api_call", "logging_hook", "log_failure_event", "_guard_sync", "_finish"):
        wrap_sync(n)
    return Instrumented, samples


def _token_bench(quick: bool) -> dict[str, Any]:
    from hive_ratelimit_plugin import _tokens

    pc = time.perf_counter_ns
    n = 300 if quick else 1500
    system = (
        "You are a careful research agent. Cite sources, think step by step, and keep answers "
        "short unless asked otherwise. "
    ) * 20  # ~2,300 characters, ~450 tokens
    turn = "The previous tool call returned a JSON document with twelve fields describing the order. " * 5

    def convo(tag: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": tag + system}]
        for i in range(10):
            msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"{tag}{i} {turn}"})
        msgs.append({"role": "user", "content": tag + "What should we do next?"})
        return msgs

    first_ever = None
    if not _tokens._cached.cache_info().currsize:
        t0 = pc()
        _tokens.count_messages(MODEL, [{"role": "user", "content": "warm the tokenizer"}])
        first_ever = (pc() - t0) / 1000.0
    else:
        _tokens.count_messages(MODEL, [{"role": "user", "content": "warm the tokenizer"}])

    def timed(lists: list[Any]) -> list[int]:
        out = []
        for msgs in lists:
            t0 = pc()
            _tokens.count_messages(MODEL, msgs)
            out.append(pc() - t0)
        return out

    res: dict[str, Any] = {"first_call_ever_us (tokenizer load)": first_ever}
    run_id = time.perf_counter_ns()
    # 1 short message
    fresh_short = [[{"role": "user", "content": f"hi {run_id} {i}"}] for i in range(n)]
    cached_short = [[{"role": "user", "content": "hi"}]] * n
    _tokens.count_messages(MODEL, cached_short[0])
    # an agent turn: system prompt + 10 history messages + a new question (~1,600 tokens)
    fresh_convo = [convo(f"[{run_id}-{i}] ") for i in range(n // 5)]
    same = convo("")
    cached_convo = [same] * n
    _tokens.count_messages(MODEL, same)
    # same contents, but new str objects each call (as after JSON decoding): hash recomputed
    copied_convo = [[{"role": m["role"], "content": "".join(list(m["content"]))} for m in same] for _ in range(n // 5)]
    # a typical agent turn: history seen before, one new message at the end
    typical = []
    for i in range(n // 5):
        msgs = [*same[:-1], {"role": "user", "content": f"new question {run_id} {i}"}]
        typical.append(msgs)
    with common.GcPaused():
        cases = {
            "1 message, fresh content (tokenizer)": timed(fresh_short),
            "1 message, repeated content (cache hit)": timed(cached_short),
            "12 messages, all fresh (tokenizer)": timed(fresh_convo),
            "12 messages, repeated (cache hit, same str objects)": timed(cached_convo),
            "12 messages, repeated (cache hit, equal new str objects)": timed(copied_convo),
            "12 messages, 11 repeated + 1 new (typical agent turn)": timed(typical),
        }
    res["cases"] = {k: common.summarize_ns(v) for k, v in cases.items()}
    res["tokens_in_convo"] = _tokens.count_messages(MODEL, same)
    return res


def run(quick: bool = False, blocks: int | None = None) -> dict[str, Any]:
    litellm = common.quiet_litellm()
    from hive_ratelimit_plugin.plugin import HiveLimiter, install_sync_guard, unregister

    default_blocks, per_block = (6, 100) if quick else (40, 100)
    blocks = blocks or default_blocks
    pc = time.perf_counter_ns
    saved_callbacks = list(litellm.callbacks)
    litellm.callbacks[:] = []
    install_sync_guard()
    guarded = litellm.completion
    raw = getattr(guarded, "__wrapped__", guarded)  # LiteLLM's own completion()
    limiter = HiveLimiter(six_level_config())
    small = HiveLimiter(two_level_config())
    results: dict[str, Any] = {
        "blocks": blocks,
        "per_block": per_block,
        "runaway_default": runaway_enabled_by_default(),
    }

    from litellm.integrations.custom_logger import CustomLogger

    noop = CustomLogger()  # LiteLLM's own cost of having one (do-nothing) callback

    def noop_mode(fn: Any, is_async: bool) -> Any:
        def go(n: int) -> list[int]:
            off()
            litellm.callbacks.append(noop)
            try:
                if is_async:
                    return loop.run_until_complete(_acalls(n))
                out = []
                for _ in range(n):
                    kw = _kwargs()
                    t0 = pc()
                    fn(**kw)
                    out.append(pc() - t0)
                time.sleep(0.02)
                return out
            finally:
                unregister(noop)

        return go

    def small_mode(n: int) -> list[int]:
        off()
        litellm.callbacks.append(small)
        try:
            before = small._engine.admitted_total
            s = loop.run_until_complete(_acalls(n))
            if small._engine.admitted_total - before != n:
                raise AssertionError("2-level limiter: not every call was admitted")
            return s
        finally:
            unregister(small)

    def on() -> None:
        if limiter not in litellm.callbacks:
            litellm.callbacks.append(limiter)

    def off() -> None:
        unregister(limiter)

    loop = asyncio.new_event_loop()

    async def _acalls(n: int) -> list[int]:
        out = []
        acompletion = litellm.acompletion
        for _ in range(n):
            kw = _kwargs()
            t0 = pc()
            r = await acompletion(**kw)
            out.append(pc() - t0)
            assert r.choices[0].message.content == "ok"
        await asyncio.sleep(0.02)  # let LiteLLM's background logging tasks finish (untimed)
        return out

    def async_mode(plugin: bool) -> Any:
        def go(n: int) -> list[int]:
            (on if plugin else off)()
            before = limiter._engine.admitted_total
            s = loop.run_until_complete(_acalls(n))
            admitted = limiter._engine.admitted_total - before
            if admitted != (n if plugin else 0):
                raise AssertionError(f"plugin={plugin}: {admitted} admissions for {n} calls")
            return s

        return go

    def sync_mode(fn: Any, plugin: bool) -> Any:
        def go(n: int) -> list[int]:
            (on if plugin else off)()
            before = limiter._engine.admitted_total
            out = []
            for _ in range(n):
                kw = _kwargs()
                t0 = pc()
                r = fn(**kw)
                out.append(pc() - t0)
                assert r.choices[0].message.content == "ok"
            time.sleep(0.02)  # LiteLLM's logging thread pool (untimed)
            admitted = limiter._engine.admitted_total - before
            if admitted != (n if plugin else 0):
                raise AssertionError(f"sync plugin={plugin}: {admitted} admissions for {n} calls")
            return out

        return go

    try:
        # 0. Do mock_response calls go through the hooks? (and warm everything up)
        on()
        before = limiter._engine.admitted_total
        loop.run_until_complete(_acalls(20))
        async_seen = limiter._engine.admitted_total - before
        before = limiter._engine.admitted_total
        sync_mode(guarded, True)(20)
        sync_seen = limiter._engine.admitted_total - before
        stats = limiter.get_usage_stats()
        results["hook_check"] = {
            "async_calls": 20,
            "async_admitted": async_seen,
            "sync_calls": 20,
            "sync_admitted": sync_seen,
            "levels_seen": sorted(stats["levels"]),
            "in_flight_after": sum(e["in_flight"] for lv in stats["levels"].values() for e in lv.values()),
        }
        off()
        loop.run_until_complete(_acalls(50))
        sync_mode(raw, False)(50)

        # 1. async A/B
        results["async"] = _ab(
            "no_callback",
            async_mode(False),
            "hive_limiter",
            async_mode(True),
            blocks,
            per_block,
            extra={"noop_custom_logger": noop_mode(None, True), "hive_limiter_2_levels": small_mode},
        )
        # 2. sync A/B (+ the guard alone, no limiter registered)
        results["sync"] = _ab(
            "no_callback",
            sync_mode(raw, False),
            "hive_limiter",
            sync_mode(guarded, True),
            blocks,
            per_block,
            extra={
                "guard_installed_no_limiter": sync_mode(guarded, False),
                "noop_custom_logger": noop_mode(raw, False),
            },
        )

        # 3. Time spent inside the plugin's own methods per call (inclusive per method;
        #    the per-call total counts outermost entries only, so nothing is counted twice).
        off()
        instrumented_cls, samples = _instrumented_class()
        inst = instrumented_cls(six_level_config())
        litellm.callbacks.append(inst)
        n_inst = 300 if quick else 1000

        def digest() -> dict[str, Any]:
            per = {
                k: {
                    "median_us": statistics.median(v) / 1000.0,
                    "mean_us": statistics.fmean(v) / 1000.0,
                    "per_call": len(v) / n_inst,
                }
                for k, v in sorted(samples.items())
            }
            # Outermost entries only, so nested _finish calls are not counted twice.
            total = sum(e["median_us"] * e["per_call"] for k, e in per.items() if not k.endswith("(nested)"))
            samples.clear()
            return {"methods": per, "us_per_call_from_medians": total}

        loop.run_until_complete(_acalls(50))
        for _ in range(50):
            litellm.completion(**_kwargs())
        time.sleep(0.1)
        samples.clear()
        loop.run_until_complete(_acalls(n_inst))
        time.sleep(0.1)
        async_digest = digest()
        for _ in range(n_inst):
            litellm.completion(**_kwargs())
        time.sleep(0.1)
        sync_digest = digest()
        unregister(inst)
        results["inside_plugin"] = {"calls": n_inst, "async": async_digest, "sync": sync_digest}

        # 4. Token estimate
        results["tokens"] = _token_bench(quick)
    finally:
        unregister(limiter)
        unregister(small)
        common.close_loop(loop)
        litellm.callbacks[:] = saved_callbacks
    return results


def summary(res: dict[str, Any]) -> str:
    hc = res["hook_check"]
    lines = [
        f"Hook check: async {hc['async_admitted']}/{hc['async_calls']} admitted, sync "
        f"{hc['sync_admitted']}/{hc['sync_calls']} admitted; levels {hc['levels_seen']}; "
        f"in flight after: {hc['in_flight_after']}"
    ]
    for kind in ("async", "sync"):
        r = res[kind]
        lines.append(f"{kind} mock_response call ({res['blocks']} alternating blocks x {res['per_block']} calls):")
        for m, s in r["modes"].items():
            lines.append(
                f"  {m:28s} median {common.fmt_us(s['median_us']):>9s}  p99 {common.fmt_us(s['p99_us']):>9s}"
                f"  CPU/call {common.fmt_us(s['cpu_us_per_call_median_of_blocks']):>9s}"
            )
        lo, hi = r["block_pair_overhead_pct_min_max"]
        lines.append(
            f"  overhead: {r['overhead_us']:+.1f} µs/call = {r['overhead_pct_pooled_median']:+.2f} % (pooled "
            f"medians), {r['overhead_pct_median_of_block_pairs']:+.2f} % (median of block pairs; "
            f"pairs range {lo:+.1f} .. {hi:+.1f} %); CPU {r['cpu_overhead_pct_median_of_block_pairs']:+.2f} %"
        )
    ip = res["inside_plugin"]
    lines.append(
        f"Time inside the plugin's methods per call (sum of medians of outermost entries): "
        f"async {ip['async']['us_per_call_from_medians']:.1f} µs, "
        f"sync {ip['sync']['us_per_call_from_medians']:.1f} µs"
    )
    for kind in ("async", "sync"):
        for k, e in ip[kind]["methods"].items():
            lines.append(
                f"  {kind:5s} {k:52s} median {e['median_us']:6.1f} µs  mean {e['mean_us']:6.1f} µs"
                f"  x{e['per_call']:.2f}/call"
            )
    tk = res["tokens"]
    lines.append(f"Token estimate (count_messages); conversation = {tk['tokens_in_convo']} tokens")
    if tk["first_call_ever_us (tokenizer load)"] is not None:
        lines.append(
            f"  first call in the process (loads the tokenizer): "
            f"{common.fmt_us(tk['first_call_ever_us (tokenizer load)'])}"
        )
    for k, s in tk["cases"].items():
        lines.append(f"  {k:58s} median {common.fmt_us(s['median_us']):>9s}  p99 {common.fmt_us(s['p99_us']):>9s}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer blocks")
    args = p.parse_args()
    print(summary(run(quick=args.quick)))


if __name__ == "__main__":
    main()
