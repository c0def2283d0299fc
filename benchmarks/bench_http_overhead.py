"""The plugin's overhead on a call that goes over HTTP (context for section 2's mock call).

Section 2 measures ``litellm.acompletion(..., mock_response="ok")``: LiteLLM's pipeline without
a request, the issue's yardstick. A real call also opens (or reuses) a connection, sends the
request, waits for the answer and parses it. This stage measures the same call sent to the
fake OpenAI-compatible provider (``hive_ratelimit_plugin.fake_provider``) running in a separate
process on 127.0.0.1 with no added latency (the fastest provider there can be: loopback, an
answer built at once), without a callback and with the 6-level ``HiveLimiter`` of section 2,
in alternating blocks (``bench_e2e._ab``). The provider answers with usage, so the plugin
settles real token counts as it would in production.

    python benchmarks/bench_http_overhead.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

try:
    from . import _common as common
    from . import bench_e2e, bench_instructions
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common  # type: ignore[no-redef]
    import bench_e2e  # type: ignore[no-redef]
    import bench_instructions  # type: ignore[no-redef]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_provider() -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hive_ratelimit_plugin.fake_provider", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the fake provider did not start")


def run(quick: bool = False) -> dict[str, Any]:
    litellm = common.quiet_litellm()
    from hive_ratelimit_plugin.plugin import HiveLimiter, unregister

    blocks, per_block = (6, 50) if quick else (30, 100)
    proc, url = _start_provider()
    saved = list(litellm.callbacks)
    litellm.callbacks[:] = []
    limiter = HiveLimiter(bench_e2e.six_level_config())
    noop = bench_instructions._noop_logger()  # the hooks HiveLimiter overrides, doing nothing
    loop = asyncio.new_event_loop()
    pc = time.perf_counter_ns

    def kwargs() -> dict[str, Any]:
        kw = bench_e2e._kwargs()
        del kw["mock_response"]
        kw.update(api_base=url, api_key="sk-bench-not-a-key")
        return kw

    async def calls(n: int, **extra: Any) -> list[int]:
        out = []
        for _ in range(n):
            kw = kwargs()
            kw.update(extra)
            t0 = pc()
            r = await litellm.acompletion(**kw)
            out.append(pc() - t0)
            assert r.usage.prompt_tokens > 0
        await asyncio.sleep(0.02)  # LiteLLM's background logging (untimed)
        return out

    def mode(plugin: bool) -> Any:
        def go(n: int) -> list[int]:
            if plugin:
                if limiter not in litellm.callbacks:
                    litellm.callbacks.append(limiter)
            else:
                unregister(limiter)
            before = limiter._engine.admitted_total
            s = loop.run_until_complete(calls(n))
            if limiter._engine.admitted_total - before != (n if plugin else 0):
                raise AssertionError(f"plugin={plugin}: not every call was counted exactly once")
            return s

        return go

    def noop_mode(n: int) -> list[int]:
        unregister(limiter)
        litellm.callbacks.append(noop)
        try:
            return loop.run_until_complete(calls(n))
        finally:
            unregister(noop)

    def no_sdk_retries_mode(n: int) -> list[int]:
        unregister(limiter)
        return loop.run_until_complete(calls(n, max_retries=0))

    try:
        mode(False)(50)  # warm up: connections, LiteLLM's client cache
        mode(True)(50)
        res = bench_e2e._ab("no_callback", mode(False), "hive_limiter", mode(True), blocks, per_block,
                            extra={"noop_custom_logger": noop_mode, "max_retries_0": no_sdk_retries_mode})
        stats = limiter.get_usage_stats()
        res["tokens_settled_per_call"] = stats["tokens_today"] / max(stats["requests_today"], 1)
        res["blocks"], res["per_block"] = blocks, per_block
        from importlib.metadata import version

        res["litellm"] = version("litellm")
        return res
    finally:
        unregister(limiter)
        litellm.callbacks[:] = saved
        common.close_loop(loop)
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------ instructions (callgrind)
INSTRUCTION_MODES = {
    "none": "no callback",
    "noop": "do-nothing CustomLogger (same hooks)",
    "hive": "HiveLimiter, 6 levels",
    "hive2": "HiveLimiter, 2 levels (the specification's example limits)",
}


def _child(mode: str, n: int, url: str) -> None:
    """One mode's calls, run under callgrind by :func:`run_instructions` (the provider runs
    outside it, in its own process)."""
    litellm = common.quiet_litellm()
    from hive_ratelimit_plugin import HiveLimiter
    from hive_ratelimit_plugin import plugin as plugin_mod

    plugin_mod.install_sync_guard()
    if mode == "noop":
        litellm.callbacks[:] = [bench_instructions._noop_logger()]
    elif mode in ("hive", "hive2"):
        litellm.callbacks[:] = [HiveLimiter(config=bench_instructions._config(6 if mode == "hive" else 2))]

    async def go(k: int) -> None:
        for _ in range(k):
            kw = bench_e2e._kwargs()
            del kw["mock_response"]
            kw.update(api_base=url, api_key="sk-bench-not-a-key")
            await litellm.acompletion(**kw)

    asyncio.run(go(30 + n))


def run_instructions(lo: int = 30, hi: int = 130) -> dict[str, Any]:
    """CPU instructions per call over HTTP, per mode: (count after ``hi`` calls - count after
    ``lo``) / (hi - lo), each run in its own process under callgrind (see bench_instructions)."""
    from concurrent.futures import ThreadPoolExecutor
    from importlib.metadata import version

    proc, url = _start_provider()
    try:
        jobs = [(m, n) for m in INSTRUCTION_MODES for n in (lo, hi)]
        with ThreadPoolExecutor(max_workers=2) as pool:
            counts = dict(zip(jobs, pool.map(
                lambda j: common.callgrind_threads(__file__, "--child", j[0], str(j[1]), url), jobs), strict=True))
    finally:
        proc.terminate()
        proc.wait(10)
    per_call = {m: (counts[(m, hi)][1] - counts[(m, lo)][1]) / (hi - lo) for m in INSTRUCTION_MODES}
    per_call_main = {m: (counts[(m, hi)][0] - counts[(m, lo)][0]) / (hi - lo) for m in INSTRUCTION_MODES}
    return {"calls": [lo, hi], "litellm": version("litellm"), "per_call": per_call, "per_call_main_thread": per_call_main}


def instructions_summary(res: dict[str, Any]) -> str:
    base, base_main = res["per_call"]["none"], res["per_call_main_thread"]["none"]
    lines = [f"instructions per acompletion over HTTP (LiteLLM {res['litellm']}; calls {res['calls'][0]}.."
             f"{res['calls'][1]}):"]
    for m, label in INSTRUCTION_MODES.items():
        v, vm = res["per_call"][m], res["per_call_main_thread"][m]
        lines.append(f"  {label:<58} {v:12,.0f} ({100.0 * (v / base - 1.0):+.2f} %)   caller's thread {vm:12,.0f} "
                     f"({vm - base_main:+,.0f})")
    return "\n".join(lines)


def summary(res: dict[str, Any]) -> str:
    m = res["modes"]
    a, b = m["no_callback"], m["hive_limiter"]
    others = "".join(f"  {name:<18} median {m[name]['median_us']:8.1f} us  "
                     f"({100.0 * (m[name]['median_us'] / a['median_us'] - 1.0):+.2f} %)\n"
                     for name in ("noop_custom_logger", "max_retries_0") if name in m)
    return others + (f"acompletion over HTTP to a local fake provider (LiteLLM {res['litellm']}; {res['blocks']} alternating "
            f"blocks x {res['per_block']} calls):\n"
            f"  no callback        median {a['median_us']:8.1f} us  p99 {a['p99_us']:8.1f} us\n"
            f"  HiveLimiter, 6 lv  median {b['median_us']:8.1f} us  p99 {b['p99_us']:8.1f} us\n"
            f"  added: {res['overhead_us']:+.1f} us per call, {res['overhead_pct_pooled_median']:+.2f} % (pooled medians), "
            f"{res['overhead_pct_median_of_block_pairs']:+.2f} % (median of block pairs; pairs "
            f"{res['block_pair_overhead_pct_min_max'][0]:+.1f} % to {res['block_pair_overhead_pct_min_max'][1]:+.1f} %); "
            f"CPU per call {res['cpu_overhead_pct_median_of_block_pairs']:+.2f} %")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--instructions", action="store_true",
                   help="count CPU instructions per call under valgrind's callgrind instead of timing")
    p.add_argument("--child", nargs=3, metavar=("MODE", "N", "URL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    if args.child:
        _child(args.child[0], int(args.child[1]), args.child[2])
        return
    if args.instructions:
        res = run_instructions()
        print(instructions_summary(res))
    else:
        res = run(args.quick)
        print(summary(res))
    if args.json:
        common.write_result_json(args.json, __file__, res)


if __name__ == "__main__":
    main()
