"""Measure what ``hive_ratelimit_autoload.pth`` costs at interpreter start (docs/zero-code.md).

Usage (against a THROWAWAY environment: the end-to-end part renames the installed .pth for a
moment to time interpreters without it)::

    python3 -m venv /tmp/zc && /tmp/zc/bin/pip install .
    python scripts/measure_autoload_startup.py /tmp/zc/bin/python [--runs 200]

Prints:

1. ``site.addpackage`` on the installed .pth with the autoload disabled, timed inside the target
   interpreter: the exact work ``site`` does for it at every start (open, read, exec the line).
2. End to end: the median wall time of ``python -c pass`` without the .pth, with it (disabled)
   and with it enabled (the hook installed; LiteLLM is not imported), the runs interleaved so
   that drift hits all three alike.

For the enabled import alone: ``HIVE_RATELIMIT_ENABLED=1 python -X importtime -c pass``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

PTH = "hive_ratelimit_autoload.pth"

IN_PROCESS = r"""
import os, site, time
sitedir = next(d for d in site.getsitepackages() if os.path.exists(os.path.join(d, %(pth)r)))
def once():
    t0 = time.perf_counter()
    site.addpackage(sitedir, %(pth)r, set())
    return time.perf_counter() - t0
once()
samples = sorted(once() for _ in range(2000))
print("%%.1f" %% (samples[len(samples) // 2] * 1e6))
"""


def _site_packages(python: str) -> str:
    code = ("import os, site; "
            f"print(next(d for d in site.getsitepackages() if os.path.exists(os.path.join(d, {PTH!r}))))")
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def _env(enabled: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_RATELIMIT_")}
    if enabled:
        env["HIVE_RATELIMIT_ENABLED"] = "1"
    return env


def _time_pass(python: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([python, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("python", help="the interpreter of a throwaway environment with hive-ratelimit installed")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    python = args.python
    out = subprocess.run([python, "-c", IN_PROCESS % {"pth": PTH}], env=_env(False), check=True,
                         capture_output=True, text=True).stdout.strip()
    print(f"site.addpackage({PTH}), disabled: median {out} us")
    sp = _site_packages(python)
    pth, off = os.path.join(sp, PTH), os.path.join(sp, PTH + ".off")
    with_pth: list[float] = []
    without: list[float] = []
    enabled_runs: list[float] = []
    try:
        for _ in range(5):  # warm the file cache
            _time_pass(python, _env(False))
        for _ in range(args.runs):
            with_pth.append(_time_pass(python, _env(False)))
            enabled_runs.append(_time_pass(python, _env(True)))
            os.rename(pth, off)
            try:
                without.append(_time_pass(python, _env(False)))
            finally:
                os.rename(off, pth)
    finally:
        if os.path.exists(off) and not os.path.exists(pth):
            os.rename(off, pth)
    m_without, m_with, m_enabled = (statistics.median(x) * 1e3 for x in (without, with_pth, enabled_runs))
    print(f"python -c pass, {args.runs} interleaved runs each (median):")
    print(f"  without the .pth:            {m_without:.2f} ms")
    print(f"  with the .pth, disabled:     {m_with:.2f} ms  ({(m_with - m_without) * 1e3:+.0f} us)")
    print(f"  with the .pth, enabled:      {m_enabled:.2f} ms  ({(m_enabled - m_without) * 1e3:+.0f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
