"""Benchmark 2b: the plugin's overhead in CPU instructions, which machine noise does not move.

Wall time on a shared 2-core VM moves by 10-20 % from one minute to the next, which is larger
than the effect being measured (a few percent of a ~1.5 ms call). This stage counts the CPU
instructions a call executes instead, with Valgrind's ``callgrind`` tool: the count does not
depend on what else the machine is doing.

Each mode runs in its own process under callgrind, twice: ``N_LO`` and ``N_HI`` calls of
``bench_e2e``'s ``litellm.acompletion(..., mock_response="ok")`` after the same warm-up; the
per-call count is the difference divided by ``N_HI - N_LO`` (start-up, imports and first-call
work cancel out). ``PYTHONHASHSEED`` is fixed. Modes:

* ``no callback``: LiteLLM alone;
* ``CustomLogger overriding nothing``: what LiteLLM spends on any registered callback, whatever it
  overrides (registration checks, hook loops, logging per callback on every call);
* ``do-nothing CustomLogger``: a ``CustomLogger`` subclass that overrides the same hooks as
  ``HiveLimiter`` with empty bodies: what LiteLLM itself spends on a callback registered with
  these hooks (the floor for any plugin built on them);
* ``HiveLimiter``: ``bench_e2e``'s 6-level configuration, status snapshots off (work done once a
  second is charged to ~50x fewer calls under callgrind's slowdown than natively);
* ``HiveLimiter, 2 levels``: the specification's example limits (global and model);
* ``HiveLimiter's code alone``: the plugin's guard and hooks called the way LiteLLM calls
  them, with a LiteLLM response object but without LiteLLM's call around them (and no LiteLLM
  call in that process at all, so none of LiteLLM's background threads run).

Instructions are not time: cache misses and branch mispredictions are not counted, and the
plugin's few small objects are cheaper per instruction than LiteLLM's pipeline. They are a
stable proxy for CPU work and show which part of the overhead is whose.

``--inline`` runs LiteLLM's executor work (``loop.run_in_executor``: the success handler it hands
to a thread) inline on the event loop's thread, still one loop turn later. The thread hand-off
makes the logging thread's and the loop's work move with wall time (+-20k instructions per call
between identical runs); inline, counts repeat within a few thousand, which makes A/B
comparisons of whole calls meaningful. The work done is the same, in another thread.

Needs ``valgrind`` (Debian: ``apt-get install valgrind``); without it the stage reports itself
skipped. Run alone: ``python benchmarks/bench_instructions.py [--quick] [--inline]
[--modes none,noop,hive,hive2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

HERE = Path(__file__).resolve()
MODES = {
    "none": "no callback",
    "empty": "CustomLogger overriding nothing",
    "noop": "do-nothing CustomLogger (same hooks)",
    "hive": "HiveLimiter, 6 levels",
    "hive2": "HiveLimiter, 2 levels (the specification's example limits)",
    "hooks": "HiveLimiter's code alone (guard + hooks, no LiteLLM call)",
    "hooks2": "HiveLimiter's code alone, 2 levels",
}


# ----------------------------------------------------------------------------- child process
def _noop_logger() -> Any:
    from litellm.integrations.custom_logger import CustomLogger

    class NoopHooks(CustomLogger):  # every hook HiveLimiter overrides, doing nothing
        async def async_pre_call_deployment_hook(self, kwargs: Any, call_type: Any) -> None:
            return None

        async def async_post_call_success_deployment_hook(self, request_data: Any, response: Any,
                                                          call_type: Any) -> Any:
            return response

        async def async_post_call_streaming_deployment_hook(self, request_data: Any, response_chunk: Any,
                                                            call_type: Any) -> Any:
            return response_chunk

        async def async_logging_hook(self, kwargs: Any, result: Any, call_type: Any) -> Any:
            return kwargs, result

        async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any,
                                          end_time: Any) -> None:
            return None

        def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
            return None

        def logging_hook(self, kwargs: Any, result: Any, call_type: Any) -> Any:
            return kwargs, result

        def log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
            return None

    return NoopHooks()


def _config(levels: int = 6) -> dict[str, Any]:
    try:
        from . import bench_e2e
    except ImportError:
        import bench_e2e  # type: ignore[no-redef]
    cfg = bench_e2e.six_level_config() if levels == 6 else bench_e2e.two_level_config()
    # The status snapshot written once a second: under callgrind a second holds ~50x fewer calls
    # than natively, so per-second work would be charged to each call ~50x over.
    cfg["status"] = {"enabled": False}
    return cfg


def _run_executor_work_inline() -> None:
    """``loop.run_in_executor(executor, fn, *args)`` runs ``fn`` at once on the loop's thread and
    returns a finished future (its awaiter resumes one loop turn later, as after a hand-off)."""

    def inline(self: asyncio.AbstractEventLoop, executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:
        fut = self.create_future()
        try:
            fut.set_result(func(*args))
        except BaseException as exc:  # (delivered to the awaiter, as from a thread)
            fut.set_exception(exc)
        return fut

    asyncio.BaseEventLoop.run_in_executor = inline  # type: ignore[assignment,method-assign]


def _child(mode: str, n: int) -> None:
    try:
        from . import bench_e2e
    except ImportError:
        import bench_e2e  # type: ignore[no-redef]
    if os.environ.get("HIVE_BENCH_INLINE") == "1":
        _run_executor_work_inline()
    litellm = common.quiet_litellm()
    from hive_ratelimit_plugin import HiveLimiter
    from hive_ratelimit_plugin import plugin as plugin_mod

    plugin_mod.install_sync_guard()  # installed in every mode; it passes calls through without a limiter
    warm = 30
    if mode in ("hooks", "hooks2"):
        # A response like the mock call's, built without a LiteLLM call: LiteLLM's background
        # threads would otherwise keep working during this mode, in proportion to its wall time.
        response = litellm.ModelResponse(
            model="gpt-4o-mini",
            choices=[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
            usage=litellm.Usage(prompt_tokens=10, completion_tokens=1, total_tokens=11),
        )
        lim = HiveLimiter(config=_config(6 if mode == "hooks" else 2))
        litellm.callbacks[:] = [lim]

        async def inner(**kwargs: Any) -> Any:
            # What LiteLLM calls on a non-streaming async call, in its order.
            await lim.async_pre_call_deployment_hook(kwargs, "acompletion")
            lim.log_pre_api_call(kwargs["model"], kwargs["messages"], kwargs)
            await lim.async_post_call_success_deployment_hook(kwargs, response, "acompletion")
            await lim.async_logging_hook(kwargs, response, "acompletion")
            return response

        call = plugin_mod._wrap_async("acompletion", inner)
    else:
        if mode == "noop":
            litellm.callbacks[:] = [_noop_logger()]
        elif mode == "empty":
            from litellm.integrations.custom_logger import CustomLogger

            class Empty(CustomLogger):
                pass

            litellm.callbacks[:] = [Empty()]
        elif mode in ("hive", "hive2"):
            litellm.callbacks[:] = [HiveLimiter(config=_config(6 if mode == "hive" else 2))]
        call = litellm.acompletion

    async def run(k: int) -> None:
        for _ in range(k):
            await call(**bench_e2e._kwargs())

    asyncio.run(run(warm + n))


# ----------------------------------------------------------------------------- driver
def _count(mode: str, n: int) -> tuple[int, int]:
    return common.callgrind_threads(HERE, "--child", mode, str(n))


def run(quick: bool = False, inline: bool = False, modes: list[str] | None = None) -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind is not installed (apt-get install valgrind)"}
    from importlib.metadata import version

    modes = list(modes) if modes else list(MODES)
    if "none" not in modes:
        modes.insert(0, "none")  # (the baseline every figure is relative to)
    if inline:
        os.environ["HIVE_BENCH_INLINE"] = "1"  # (callgrind_threads passes the environment on)
    lo, hi = (50, 150) if quick else (50, 350)
    jobs = [(mode, n) for mode in modes for n in (lo, hi)]
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        counts = dict(zip(jobs, pool.map(lambda j: _count(*j), jobs), strict=True))
    per_call = {mode: (counts[(mode, hi)][1] - counts[(mode, lo)][1]) / (hi - lo) for mode in modes}
    per_call_main = {mode: (counts[(mode, hi)][0] - counts[(mode, lo)][0]) / (hi - lo) for mode in modes}
    base = per_call["none"]
    pct: dict[str, float] = {}
    for mode in ("empty", "hive", "noop", "hive2"):
        if mode in per_call:
            pct[f"{mode}_vs_none"] = 100.0 * (per_call[mode] / base - 1.0)
    if "hive" in per_call and "noop" in per_call:
        pct["hive_vs_noop"] = 100.0 * (per_call["hive"] / per_call["noop"] - 1.0)
    if "hooks" in per_call:
        pct["hooks_vs_none"] = 100.0 * per_call["hooks"] / base
    return {
        "calls": [lo, hi],
        "litellm": version("litellm"),
        "inline_executor": inline,
        "per_call": per_call,
        "per_call_main": per_call_main,
        "labels": {mode: MODES[mode] for mode in modes},
        "overhead_pct": pct,
    }


def summary(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"skipped: {res['skipped']}"
    lines = [f"{label:58s} {res['per_call'][mode]:>14,.0f} instructions per call "
             f"({res['per_call_main'][mode]:,.0f} on the caller's thread)" for mode, label in res["labels"].items()]
    lines += [f"{name:20s} {pct:+.2f} %" for name, pct in res["overhead_pct"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--inline", action="store_true",
                        help="run LiteLLM's executor work on the loop's thread (steadier counts; see above)")
    parser.add_argument("--modes", help=f"a comma-separated subset of {','.join(MODES)} (default: all)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="PATH", help="also write the result there (for run.py --reuse)")
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else None
    unknown = sorted(set(modes or ()) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(unknown)}")
    res = run(args.quick, inline=args.inline, modes=modes)
    print(summary(res))
    if args.json:
        common.write_result_json(args.json, "benchmarks/bench_instructions.py", res)


if __name__ == "__main__":
    main()
