"""Before/after: the plugin's per-call overhead at an older commit and now, in one process.

Exports ``hive_ratelimit_plugin`` as of ``--base`` (default ``HEAD``) under another package name,
installs both versions' guards, and times ``litellm.acompletion`` / ``litellm.completion`` with
``mock_response`` (the call of ``bench_e2e.py``) in interleaved blocks (rotating order) for four
modes: no callback, a do-nothing ``CustomLogger`` (LiteLLM's own cost of a callback: the floor),
the base version's ``HiveLimiter`` and the working tree's, each with ``bench_e2e``'s 6-level
configuration. Both guards stay installed in every mode (a guard without its limiter registered
passes calls straight through), so both plugin modes pay the other's pass-through alike.

Run: ``python benchmarks/bench_before_after.py --base 7f2a5f7 [--blocks 40 --per-block 50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from . import _common as common
    from . import bench_e2e
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]
    import bench_e2e  # type: ignore[no-redef]


def _import_base(rev: str) -> Any:
    """``hive_ratelimit_plugin`` as of ``rev``, imported as ``hive_base_<sha>`` (relative imports only)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=common.ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    dest = Path(tempfile.mkdtemp(prefix="hive-before-"))
    archive = subprocess.run(["git", "archive", rev, "hive_ratelimit_plugin"], cwd=common.ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    name = f"hive_base_{sha}"
    shutil.move(str(dest / "hive_ratelimit_plugin"), str(dest / name))
    sys.path.insert(0, str(dest))
    return importlib.import_module(f"{name}.plugin"), sha


def run(base: str, blocks: int, per_block: int) -> dict[str, Any]:
    litellm = common.quiet_litellm()
    from litellm.integrations.custom_logger import CustomLogger

    import hive_ratelimit_plugin.plugin as new_plugin

    old_plugin, sha = _import_base(base)
    saved = list(litellm.callbacks)
    litellm.callbacks[:] = []
    old_plugin.install_sync_guard()
    # install_sync_guard() skips an entry point that already carries a guard (any version's):
    # hide the older guards' marker so that the working tree's guards wrap them too.
    older = {name: getattr(litellm, name) for name in new_plugin._POSITIONAL}
    for fn in older.values():
        fn.__hive_ratelimit_guard__ = False
    try:
        new_plugin.install_sync_guard()
    finally:
        for fn in older.values():
            fn.__hive_ratelimit_guard__ = True
    for name, fn in older.items():
        if getattr(litellm, name) is fn:
            raise RuntimeError(f"the working tree's guard did not wrap litellm.{name}")
    guarded = litellm.completion
    raw = guarded
    while getattr(raw, "__hive_ratelimit_guard__", False):
        raw = raw.__wrapped__
    cfg = bench_e2e.six_level_config()
    subjects: dict[str, Any] = {
        "no callback": None,
        "do-nothing CustomLogger (floor)": CustomLogger(),
        f"HiveLimiter at {sha} (before)": old_plugin.HiveLimiter(cfg),
        "HiveLimiter, working tree (after)": new_plugin.HiveLimiter(cfg),
    }
    names = list(subjects)
    loop = asyncio.new_event_loop()
    pc = time.perf_counter_ns

    def admitted() -> tuple[int, int]:
        return tuple(s._engine.admitted_total for s in list(subjects.values())[2:])  # type: ignore[return-value]

    def select(name: str) -> None:
        for s in subjects.values():
            if s is not None:
                new_plugin.unregister(s)
        if subjects[name] is not None:
            litellm.callbacks.append(subjects[name])

    async def acalls(n: int) -> list[int]:
        out = []
        for _ in range(n):
            kw = bench_e2e._kwargs()
            t0 = pc()
            await litellm.acompletion(**kw)
            out.append(pc() - t0)
        await asyncio.sleep(0.02)  # LiteLLM's background logging tasks (untimed)
        return out

    def scalls(n: int, fn: Any) -> list[int]:
        out = []
        for _ in range(n):
            kw = bench_e2e._kwargs()
            t0 = pc()
            fn(**kw)
            out.append(pc() - t0)
        time.sleep(0.02)
        return out

    results: dict[str, Any] = {"base": sha, "blocks": blocks, "per_block": per_block}
    try:
        for kind in ("async", "sync"):

            def go(name: str, n: int, kind: str = kind) -> list[int]:
                select(name)
                before = admitted()
                if kind == "async":
                    out = loop.run_until_complete(acalls(n))
                else:
                    out = scalls(n, raw if name == "no callback" else guarded)
                # Each limiter must admit every call of its own blocks, and none of the others'.
                grew = [a - b for a, b in zip(admitted(), before, strict=True)]
                want = [n if subjects[name] is s else 0 for s in list(subjects.values())[2:]]
                if grew != want:
                    raise AssertionError(f"{kind} {name}: admissions {grew}, expected {want}")
                return out

            for name in names:
                go(name, 50)  # warm-up
            samples: dict[str, list[int]] = {n: [] for n in names}
            cpu: dict[str, list[float]] = {n: [] for n in names}
            for b in range(blocks):
                order = names[b % len(names):] + names[:b % len(names)]
                for name in order if b % 2 == 0 else order[::-1]:
                    c0 = time.process_time_ns()
                    samples[name].extend(go(name, per_block))
                    cpu[name].append((time.process_time_ns() - c0) / per_block / 1000.0)
            base_median = statistics.median(samples["no callback"]) / 1000.0
            base_cpu = statistics.median(cpu["no callback"])
            results[kind] = {
                name: {
                    "median_us": statistics.median(samples[name]) / 1000.0,
                    "added_us": statistics.median(samples[name]) / 1000.0 - base_median,
                    "added_pct": 100.0 * (statistics.median(samples[name]) / 1000.0 / base_median - 1.0),
                    "cpu_us_per_call": statistics.median(cpu[name]),
                    "added_cpu_us": statistics.median(cpu[name]) - base_cpu,
                }
                for name in names
            }
    finally:
        select("no callback")
        common.close_loop(loop)
        litellm.callbacks[:] = saved
    return results


def summary(res: dict[str, Any]) -> str:
    lines = [f"Before ({res['base']}) / after, {res['blocks']} interleaved blocks x {res['per_block']} calls"]
    for kind in ("async", "sync"):
        lines.append(f"{kind}:")
        for name, r in res[kind].items():
            lines.append(
                f"  {name:40s} median {r['median_us']:8.1f} µs  added {r['added_us']:+7.1f} µs ({r['added_pct']:+5.1f} %)"
                f"  CPU/call {r['cpu_us_per_call']:8.1f} µs (added {r['added_cpu_us']:+7.1f} µs)"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="HEAD", help="the commit to compare against (default HEAD)")
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--per-block", type=int, default=50)
    args = p.parse_args()
    print(summary(run(args.base, args.blocks, args.per_block)))


if __name__ == "__main__":
    main()
