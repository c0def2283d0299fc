"""What LiteLLM itself charges for the keyword arguments the plugin may add to a call.

The async guard adds ``max_retries=0`` to every call unless ``retry.take_over_sdk_retries`` is
off (the openai SDK would otherwise retry 429s unseen, outside admission). This counts, under
Valgrind's ``callgrind`` like ``bench_instructions.py``, the CPU instructions of
``litellm.acompletion(..., mock_response="ok")`` with a do-nothing ``CustomLogger`` registered,
with and without such an argument: the difference is LiteLLM's work, not the plugin's.

Run: ``python benchmarks/bench_litellm_kwargs.py`` (needs valgrind; ~4 minutes on 2 cores).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

HERE = Path(__file__).resolve()
VARIANTS = {
    "plain": "no extra argument",
    "max_retries": "max_retries=0 (what the guard adds by default)",
    "litellm_call_id": "litellm_call_id=<a fresh uuid> (what the guard passed before 2026-11-29)",
}


def _child(variant: str, n: int) -> None:
    try:
        from . import bench_e2e, bench_instructions
    except ImportError:
        import bench_e2e  # type: ignore[no-redef]
        import bench_instructions  # type: ignore[no-redef]
    litellm = common.quiet_litellm()
    from hive_ratelimit_plugin import plugin as plugin_mod

    plugin_mod.install_sync_guard()  # as in bench_instructions: it passes calls through without a limiter
    litellm.callbacks[:] = [bench_instructions._noop_logger()]

    def kwargs() -> dict[str, Any]:
        kw = bench_e2e._kwargs()
        if variant == "max_retries":
            kw["max_retries"] = 0
        elif variant == "litellm_call_id":
            kw["litellm_call_id"] = str(uuid.uuid4())
        return kw

    async def run(k: int) -> None:
        for _ in range(k):
            await litellm.acompletion(**kwargs())

    asyncio.run(run(30 + n))


def _count(variant: str, n: int) -> tuple[int, int]:
    return common.callgrind_threads(HERE, "--child", variant, str(n))


def run() -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind is not installed (apt-get install valgrind)"}
    from importlib.metadata import version

    lo, hi = 50, 250
    jobs = [(v, n) for v in VARIANTS for n in (lo, hi)]
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        counts = dict(zip(jobs, pool.map(lambda j: _count(*j), jobs), strict=True))
    per_call = {v: (counts[(v, hi)][1] - counts[(v, lo)][1]) / (hi - lo) for v in VARIANTS}
    main = {v: (counts[(v, hi)][0] - counts[(v, lo)][0]) / (hi - lo) for v in VARIANTS}
    return {"calls": [lo, hi], "litellm": version("litellm"), "per_call": per_call, "per_call_main": main,
            "added": {v: per_call[v] - per_call["plain"] for v in VARIANTS if v != "plain"},
            "added_main": {v: main[v] - main["plain"] for v in VARIANTS if v != "plain"}}


def summary(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"skipped: {res['skipped']}"
    lines = [f"LiteLLM {res['litellm']}, instructions per call ({res['calls'][1] - res['calls'][0]} calls):"]
    for v, label in VARIANTS.items():
        extra = "" if v == "plain" else \
            f"  {res['added'][v]:+,.0f} ({100.0 * res['added'][v] / res['per_call']['plain']:+.2f} %); " \
            f"caller's thread {res['added_main'][v]:+,.0f}"
        lines.append(f"  {label:70s} {res['per_call'][v]:>14,.0f}{extra}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
        return
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the result there (for run.py --reuse)")
    args = parser.parse_args()
    res = run()
    print(summary(res))
    if args.json:
        common.write_result_json(args.json, "benchmarks/bench_litellm_kwargs.py", res)


if __name__ == "__main__":
    main()
