"""Benchmark 5: the specification's Scenario 2, a spike of 10,000 requests.

200 asyncio tasks send 10,000 ``litellm.acompletion`` calls in all against the fake provider,
which enforces an exact sliding log of N requests per 60 s (like an RPM limit) and answers 429
with ``retry-after`` beyond it. Three subjects, one after the other in the same run:

* **plugin**: a ``HiveLimiter`` with the provider's limit (``requests_per_minute: N``) and a queue
  that waits as long as needed; LiteLLM and the openai SDK left at their defaults (the plugin
  takes over the SDK's hidden retries);
* **plain LiteLLM**: no plugin, LiteLLM and the openai SDK at their defaults (the SDK retries a 429
  twice, honouring ``retry-after`` up to its own cap);
* **plain LiteLLM, num_retries=3**: what a user adds by hand.

And LiteLLM's Router, with the provider's limits set on its deployment (``rpm``, and ``tpm``), in
the ``usage-based-routing-v2`` strategy (the one that enforces them; the default
``simple-shuffle`` only uses them as weights), alone and with the plugin. Its subjects run at a
smaller scale (``ROUTER_REQUESTS`` against ``ROUTER_RPM`` per minute), each in its own process
(``start_router_subjects`` / ``collect_router_subjects``; ``benchmarks/run.py`` runs them while the
light Scenario 1 and 3 stages run: the Router waits out whole minutes between its retries).

Reported: success rate, 429s that reached the caller, 429s the provider sent, throughput as a
share of the provider's limit over the run, and the client-side latency p50/p99 (queue wait +
call). Run alone: ``python benchmarks/bench_scenario2.py [--requests 10000] [--rpm 5000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import time
from typing import Any

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

TASKS = 200
ROUTER_REQUESTS = 2_000
ROUTER_RPM = 1_000
ROUTER_TPM = 1_000_000
ROUTER_SUBJECTS = ("Router alone", "Router + plugin")


async def _drive(litellm: Any, url: str, requests: int, extra: dict[str, Any], call: Any = None) -> dict[str, Any]:
    call = call or (lambda **kw: litellm.acompletion(model="openai/gpt-4o-mini", api_base=url, api_key="sk-bench",
                                                     **kw))
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    ok = 0

    async def worker() -> None:
        nonlocal ok
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.monotonic()
            try:
                await call(messages=[{"role": "user", "content": f"request {i}"}], max_tokens=5, **extra)
                ok += 1
                latencies.append(time.monotonic() - t0)
            except Exception as exc:  # counted by type
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return {"ok": ok, "errors": errors, "latencies": latencies, "duration": time.monotonic() - start}


def _stats(r: dict[str, Any], state: Any, requests: int, rpm: int) -> dict[str, Any]:
    lat = sorted(r.pop("latencies"))
    duration = r["duration"]
    ideal = 60.0 * (math.ceil(requests / rpm) - 1)  # the least time N per 60 s allows for all requests
    return {
        **r,
        "sent_to_provider": state.count(),
        "provider_429s": state.count(429),
        "caller_429s": r["errors"].get("RateLimitError", 0),
        "success_rate": r["ok"] / requests,
        "ideal_seconds": ideal,
        "time_efficiency": (ideal / duration) if duration and ideal else None,
        "p50_latency": common.percentile(lat, 0.5) if lat else None,
        "p99_latency": common.percentile(lat, 0.99) if lat else None,
    }


def run_router(name: str, requests: int = ROUTER_REQUESTS, rpm: int = ROUTER_RPM) -> dict[str, Any]:
    """One Router subject (run it in a process of its own: it registers callbacks globally)."""
    litellm = common.quiet_litellm()
    from hive_ratelimit_plugin import HiveLimiter
    from hive_ratelimit_plugin.testing import FakeProvider, ProviderState

    state = ProviderState(requests_per_window=rpm, window_seconds=60.0, latency=0.01)
    with FakeProvider(state) as provider:
        router = litellm.Router(
            model_list=[{"model_name": "gpt", "litellm_params": {
                "model": "openai/gpt-4o-mini", "api_base": provider.url, "api_key": "sk-bench",
                "rpm": rpm, "tpm": ROUTER_TPM}}],
            routing_strategy="usage-based-routing-v2",
        )
        if name == "Router + plugin":
            litellm.callbacks.append(HiveLimiter({
                "providers": {"openai": {"gpt-4o-mini": {"requests_per_minute": rpm, "tokens_per_minute": ROUTER_TPM}}},
                "queue": {"max_wait_seconds": 600, "max_size": 100_000},
                "runaway": {"enabled": False}, "state_path": ":memory:"}))
        loop = asyncio.new_event_loop()
        try:
            r = loop.run_until_complete(_drive(litellm, provider.url, requests, {},
                                               call=lambda **kw: router.acompletion(model="gpt", **kw)))
        finally:
            common.close_loop(loop)
        out = _stats(r, state, requests, rpm)
    print(f"{name:<30} ok {out['ok']}/{requests} in {out['duration']:.1f}s, caller 429s {out['caller_429s']}, "
          f"provider 429s {out['provider_429s']}, errors {out['errors']}", flush=True)
    return out


def start_router_subjects() -> list[tuple[str, Any, str, Any]]:
    import subprocess
    import sys
    import tempfile

    started = []
    for name in ROUTER_SUBJECTS:
        fd, path = tempfile.mkstemp(prefix="hive-bench-router-", suffix=".json")
        os.close(fd)
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in _collect; a file, not a pipe: LiteLLM may log a line per refusal
        proc = subprocess.Popen([sys.executable, __file__, "--router-subject", name, "--json-out", path],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        started.append((name, proc, path, log))
    return started


def collect_router_subjects(started: list[tuple[str, Any, str, Any]], timeout: float = 420.0) -> dict[str, Any]:
    """Wait for the Router subjects (killing any still running after ``timeout`` seconds)."""
    import subprocess

    deadline = time.monotonic() + timeout
    out: dict[str, Any] = {"requests": ROUTER_REQUESTS, "provider_rpm": ROUTER_RPM, "tpm": ROUTER_TPM,
                           "strategy": "usage-based-routing-v2", "tasks": TASKS}
    for name, proc, path, log in started:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        text = log.read()
        log.close()
        print(text.strip().splitlines()[-1] if text.strip() else f"{name}: no output", flush=True)
        try:
            with open(path, encoding="utf-8") as f:
                out[name] = json.load(f)
        except (OSError, ValueError):
            out[name] = {"error": f"exit {proc.returncode}: {text[-500:]}"}
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return out


def run(requests: int = 10_000, rpm: int = 5_000, with_num_retries: bool = False,
        router: bool = False) -> dict[str, Any]:
    litellm = common.quiet_litellm()
    from hive_ratelimit_plugin import HiveLimiter
    from hive_ratelimit_plugin.plugin import unregister
    from hive_ratelimit_plugin.testing import FakeProvider, ProviderState

    results: dict[str, Any] = {"requests": requests, "tasks": TASKS, "provider_rpm": rpm}
    subjects: list[tuple[str, dict[str, Any], bool]] = [
        ("plugin", {}, True),
        ("plain LiteLLM", {}, False),
    ]
    if with_num_retries:
        subjects.append(("plain LiteLLM, num_retries=3", {"num_retries": 3}, False))
    for name, extra, with_plugin in subjects:
        state = ProviderState(requests_per_window=rpm, window_seconds=60.0, latency=0.01)
        with FakeProvider(state) as provider:
            limiter = None
            if with_plugin:
                limiter = HiveLimiter({"global": {"requests_per_minute": rpm},
                                       "queue": {"max_wait_seconds": 600, "max_size": 100_000},
                                       "runaway": {"enabled": False}, "state_path": ":memory:"})
                litellm.callbacks.append(limiter)
            loop = asyncio.new_event_loop()
            try:
                r = loop.run_until_complete(_drive(litellm, provider.url, requests, extra))
            finally:
                common.close_loop(loop)
                if limiter is not None:
                    unregister(limiter)
            results[name] = x = _stats(r, state, requests, rpm)
            print(f"{name:<30} ok {r['ok']}/{requests} in {x['duration']:.1f}s, caller 429s "
                  f"{x['caller_429s']}, provider 429s {x['provider_429s']}, sent {x['sent_to_provider']}, "
                  f"ideal {x['ideal_seconds']:.0f}s, "
                  f"p50 {results[name]['p50_latency'] or 0:.2f}s p99 {results[name]['p99_latency'] or 0:.2f}s "
                  f"errors {r['errors']}", flush=True)
    if router:
        results["router"] = collect_router_subjects(start_router_subjects())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rpm", type=int, default=5_000)
    parser.add_argument("--with-num-retries", action="store_true")
    parser.add_argument("--router", action="store_true", help="also run the Router subjects (after the others)")
    parser.add_argument("--router-subject", choices=ROUTER_SUBJECTS, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.router_subject:
        r = run_router(args.router_subject)
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as f:
                json.dump(r, f)
        return
    run(args.requests, args.rpm, args.with_num_retries, router=args.router)


def summary(r: dict[str, Any]) -> str:
    out = []
    for name in ("plugin", "plain LiteLLM", "plain LiteLLM, num_retries=3"):
        if name in r:
            x = r[name]
            out.append(f"{name}: {x['ok']}/{r['requests']} ok in {x['duration']:.1f}s, caller 429s {x['caller_429s']}, "
                       f"provider 429s {x['provider_429s']}")
    if "router" in r:
        out.append(router_summary(r["router"]))
    return "\n".join(out)


def router_summary(rt: dict[str, Any]) -> str:
    out = []
    for name in ROUTER_SUBJECTS:
        x = rt.get(name)
        if x and "ok" in x:
            out.append(f"{name}: {x['ok']}/{rt['requests']} ok in {x['duration']:.1f}s, caller 429s "
                       f"{x['caller_429s']}, provider 429s {x['provider_429s']}")
        elif x:
            out.append(f"{name}: {x.get('error')}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
