"""Shared helpers for the benchmarks: environment, statistics, machine information.

Importing this module sets ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (so ``import litellm`` never
reaches for the network) and puts the repository root on ``sys.path`` (so the benchmarks run
from a checkout without installing the package).
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Benchmarks set their own configuration; never pick up a developer's environment.
for _name in list(os.environ):
    if _name.startswith("HIVE_RATELIMIT_"):
        del os.environ[_name]

ROOT = Path(__file__).resolve().parent.parent
# HIVE_BENCH_PACKAGE_ROOT=<dir> benchmarks the package found in <dir> (e.g. an exported commit)
# instead of this checkout's working tree.
PACKAGE_ROOT = Path(os.environ.get("HIVE_BENCH_PACKAGE_ROOT") or ROOT).resolve()
if str(PACKAGE_ROOT) not in sys.path:
    sys.path.insert(0, str(PACKAGE_ROOT))

# A limit so high it never binds: every call is admitted at once.
HUGE = 10**12


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank method."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return float(s[k])


def summarize_ns(samples_ns: Sequence[int], timer_overhead_ns: float = 0.0) -> dict[str, float]:
    """Median / p99 / mean / min in microseconds, after subtracting the timer's own cost."""
    us = [max(s - timer_overhead_ns, 0.0) / 1000.0 for s in samples_ns]
    return {
        "n": len(us),
        "median_us": statistics.median(us),
        "p99_us": percentile(us, 0.99),
        "mean_us": statistics.fmean(us),
        "min_us": min(us),
    }


def timer_overhead_ns(reps: int = 200_000) -> float:
    """Median cost of an empty ``perf_counter_ns()`` pair (subtracted from per-call timings)."""
    pc = time.perf_counter_ns
    samples = []
    for _ in range(reps):
        t0 = pc()
        t1 = pc()
        samples.append(t1 - t0)
    return float(statistics.median(samples))


def versions() -> dict[str, str]:
    out = {}
    for name in ("litellm", "limits", "aiolimiter", "pyrate-limiter"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        import hive_ratelimit_plugin

        out["hive-ratelimit"] = hive_ratelimit_plugin.__version__
    except Exception:  # pragma: no cover - the checkout is broken
        out["hive-ratelimit"] = "?"
    return out


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            load = " ".join(f.read().split()[:3])
    except OSError:
        load = "?"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": sys.version.split()[0] + f" ({platform.python_implementation()})",
        "platform": platform.platform(),
        "loadavg_at_start": load,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def quiet_litellm() -> Any:
    """Import LiteLLM with telemetry and debug chatter off."""
    import logging

    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    logging.getLogger("LiteLLM").setLevel(logging.ERROR)
    return litellm


def close_loop(loop: Any) -> None:
    """Cancel what is left on ``loop`` (LiteLLM's logging worker, cancelled calls), then close it."""
    import asyncio

    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


class GcPaused:
    """Collect once, then disable the cyclic GC for a timed section (re-enabled afterwards)."""

    def __enter__(self) -> None:
        gc.collect()
        self._was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._was:
            gc.enable()


def run_interleaved(
    subjects: dict[str, Callable[[int], list[int]]], rounds: int, per_round: int, warmup: int
) -> dict[str, list[int]]:
    """Run every subject ``rounds`` times in rotating order, ``per_round`` timed calls each.

    Each subject is a function ``f(n) -> list of n per-call durations (ns)``. Rotating the order
    every round spreads machine noise (other tenants, CPU frequency) evenly over the subjects.
    """
    names = list(subjects)
    for name in names:
        subjects[name](warmup)
    out: dict[str, list[int]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].extend(subjects[name](per_round))
    return out


def fmt_us(v: float) -> str:
    if v != v:  # nan
        return "n/a"
    if v >= 1000:
        return f"{v / 1000:.2f} ms"
    if v >= 100:
        return f"{v:.0f} µs"
    if v >= 10:
        return f"{v:.1f} µs"
    return f"{v:.2f} µs"


def callgrind_threads(script: str | Path, *args: str) -> tuple[int, int]:
    """CPU instructions a run of ``python script args...`` executes under Valgrind's callgrind
    (``PYTHONHASHSEED=0``, no price-map download), counted per thread (``--separate-threads=yes``):
    those of the main thread (the caller's) and of all threads together. Work in other threads
    (LiteLLM's background logging) depends on wall time, so the main thread's count is the
    steadier of the two."""
    import re
    import subprocess
    import tempfile

    env = dict(os.environ, PYTHONHASHSEED="0", LITELLM_LOCAL_MODEL_COST_MAP="True")
    with tempfile.TemporaryDirectory(prefix="callgrind") as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={tmp}/cg",
             sys.executable, str(script), *args],
            capture_output=True, text=True, env=env, check=False,
        )
        m = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
        if out.returncode != 0 or m is None:
            raise RuntimeError(f"callgrind run of {' '.join(args)} failed (exit {out.returncode}): {out.stderr[-2000:]}")
        main = None
        for f in Path(tmp).glob("cg-*"):  # one file per thread: cg-01 is the main thread
            text = f.read_text(encoding="utf-8", errors="replace")
            if re.search(r"^thread: 1$", text, re.M):
                found = re.search(r"^summary: (\d+)$", text, re.M)
                main = int(found.group(1)) if found else None
        if main is None:
            raise RuntimeError(f"callgrind run of {' '.join(args)} wrote no count for the main thread")
    return main, int(m.group(1))


def write_result_json(path: str, script: str, result: dict[str, Any]) -> None:
    """Write a stage's result with the command that produced it (what ``run.py --reuse`` reads)."""
    import json
    import shlex
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True,
                          text=True, check=False).stdout.strip()
    Path(path).write_text(json.dumps({
        "command": "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]]),
        "when": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "package": str(PACKAGE_ROOT),
        "commit": head or None,  # (the package's checkout; it may hold uncommitted changes)
        "result": result,
    }, indent=1), encoding="utf-8")
