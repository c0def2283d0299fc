"""Benchmark 4: throughput and 429s against the fake provider, with and without the plugin.

The fake provider (``hive_ratelimit_plugin.testing.FakeProvider``) enforces an exact sliding
log of N requests per W seconds and answers 429 beyond it. Many asyncio tasks (50) call
``litellm.acompletion(model="openai/gpt-4o-mini", api_base=provider.url, api_key="sk-x",
messages=..., max_retries=0)`` in a closed loop for D seconds:

* with a ``HiveLimiter`` whose global limit is the same N per W (``requests_per_second`` for
  W = 1 s, ``requests_per_minute`` for W = 60 s; the configuration has no per-W field for other
  windows), and a queue that never times out (``max_wait_seconds: 600``);
* without the plugin (plain LiteLLM, ``max_retries=0``): every 429 comes straight back and the
  task sends its next request at once.

Counted at the provider, over [t0, t0 + D): requests received, 200s, 429s. Achieved rate =
200s / (N x D / W). The provider's own ceiling for a closed interval is N x ceil(D / W) (a full
window at the start plus every later window), also shown; the "steady" rate leaves out the
first window (the initial burst). Client side: queue wait per admitted call (the value the
plugin's waiting driver returns, 0 for a call admitted at once), p50/p99.

To explain any 429 under the plugin, every request carries a sequence number; the benchmark
records, per request, the time the engine admitted it (its reservation was committed, on the
engine's clock, ``time.monotonic``), the time the calling task resumed after admission, the time
LiteLLM called the plugin's ``log_pre_api_call`` (just before the SDK sends), and the time the
provider stamped its arrival (the provider's own ``time.monotonic()``, the clock it enforces the
window with; same process, same clock). So admission-to-arrival skew, the largest number of
admissions in any window and the largest number of arrivals in any window can be compared. (The
benchmark wraps the plugin's ``queue_async``, the engine's ``admit_now``, ``_commit`` and ``_admit_fast``, the limiter's
``log_pre_api_call`` and two fake-provider functions to record these; it does not change what
they do.)

Run alone: ``python benchmarks/bench_throughput.py [--quick] [--no-minute]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import itertools
import math
import statistics
import threading
import time
from typing import Any

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

CONCURRENCY = 50
LATENCY = 0.01  # seconds the provider takes per successful request

_seq_var: contextvars.ContextVar[int | None] = contextvars.ContextVar("bench_seq", default=None)


def _max_in_window(times: list[float], period: float) -> int:
    """Largest number of events in any half-open interval (t - period, t]."""
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while times[j] <= t - period:
            j += 1
        best = max(best, i - j + 1)
    return best


class _Probe:
    """Records admission and arrival times per request sequence number."""

    def __init__(self) -> None:
        self.admitted: dict[int, float] = {}  # seq -> engine commit time (filled in by finish())
        self.resumed: dict[int, float] = {}  # seq -> the caller's task resumed after admission
        self.pre_api: dict[int, float] = {}  # seq -> LiteLLM called log_pre_api_call
        self.seq_of: dict[str, int] = {}  # litellm_call_id -> seq
        self.commit_at: dict[str, float] = {}  # litellm_call_id -> engine commit time
        self.pre_api_at: dict[str, float] = {}
        self.waits: list[float] = []
        self.arrivals: dict[int, tuple[float, bool]] = {}
        self.lock = threading.Lock()
        self._local = threading.local()
        self._undo: list[Any] = []

    def install(self, provider: Any) -> None:
        from hive_ratelimit_plugin import fake_provider as fp
        from hive_ratelimit_plugin import plugin as pl

        probe = self
        # A call the engine admits at once (Engine.admit_now, see install_limiter) never reaches
        # the waiting driver; one it turns down waits in queue_async.
        orig_queue = pl.queue_async

        async def queue_async(engine: Any, ticket: Any, max_wait: float) -> float:
            seq = _seq_var.get()
            if seq is not None:
                probe.seq_of[ticket.call_id] = seq
            waited = await orig_queue(engine, ticket, max_wait)
            if seq is not None:
                probe.resumed[seq] = time.monotonic()
                probe.waits.append(waited)
            return waited

        pl.queue_async = queue_async
        self._undo.append(lambda: setattr(pl, "queue_async", orig_queue))

        orig_rough = fp._rough_tokens

        def rough(body: dict[str, Any]) -> int:
            seq = None
            try:
                content = body["messages"][0]["content"]
                if isinstance(content, str) and content.startswith("req "):
                    seq = int(content.split()[1])
            except (KeyError, IndexError, TypeError, ValueError):
                pass
            probe._local.seq = seq
            return orig_rough(body)

        fp._rough_tokens = rough
        self._undo.append(lambda: setattr(fp, "_rough_tokens", orig_rough))

        state = provider.state
        orig_admit = state._admit  # bound method

        def admit(now: float, tokens: int) -> Any:
            out = orig_admit(now, tokens)
            seq = getattr(probe._local, "seq", None)
            if seq is not None:
                probe.arrivals[seq] = (now, bool(out[0]))  # called under state.lock
            return out

        state._admit = admit
        self._undo.append(lambda: state.__dict__.pop("_admit", None))

    def install_limiter(self, limiter: Any) -> None:
        """Record the engine's own admission time and LiteLLM's pre-API-call time per call."""
        probe = self
        engine = limiter._engine
        orig_commit = engine._commit

        def commit(*a: Any, **k: Any) -> Any:
            out = orig_commit(*a, **k)
            ticket = a[0] if a else k.get("ticket")
            probe.commit_at[ticket.call_id] = engine.clock()
            return out

        engine._commit = commit
        orig_fast = engine._admit_fast  # the one-pass admission of the common case

        def admit_fast(ticket: Any, states: Any, now: float) -> bool:
            admitted = bool(orig_fast(ticket, states, now))
            if admitted:
                probe.commit_at[ticket.call_id] = engine.clock()
            return admitted

        engine._admit_fast = admit_fast
        orig_admit_now = engine.admit_now  # the hot path: admitted at once, or handed to queue_async

        def admit_now(ticket: Any) -> bool:
            admitted = bool(orig_admit_now(ticket))
            seq = _seq_var.get()
            if admitted and seq is not None:
                probe.seq_of[ticket.call_id] = seq
                probe.resumed[seq] = time.monotonic()
                probe.waits.append(0.0)
            return admitted

        engine.admit_now = admit_now
        orig_pre = limiter.log_pre_api_call

        def log_pre_api_call(model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
            cid = kwargs.get("litellm_call_id")
            if cid:
                probe.pre_api_at[cid] = time.monotonic()
            return orig_pre(model, messages, kwargs)

        limiter.log_pre_api_call = log_pre_api_call

    def finish(self) -> None:
        for cid, seq in self.seq_of.items():
            if cid in self.commit_at:
                self.admitted[seq] = self.commit_at[cid]
            if cid in self.pre_api_at:
                self.pre_api[seq] = self.pre_api_at[cid]

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


async def _drive(litellm: Any, url: str, duration: float, seqs: Any, results: dict[str, int]) -> None:
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            seq = next(seqs)
            _seq_var.set(seq)
            try:
                await litellm.acompletion(
                    model="openai/gpt-4o-mini",
                    api_base=url,
                    api_key="sk-x",
                    messages=[{"role": "user", "content": f"req {seq}"}],
                    max_retries=0,
                )
                results["ok"] += 1
            except asyncio.CancelledError:
                raise
            except litellm.RateLimitError:
                results["429"] += 1
            except Exception as exc:  # anything else is worth seeing
                results["other"] += 1
                results.setdefault("other_examples", [])  # type: ignore[arg-type]
                if len(results["other_examples"]) < 3:  # type: ignore[arg-type]
                    results["other_examples"].append(f"{type(exc).__name__}: {str(exc)[:120]}")  # type: ignore[union-attr]

    tasks = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
    await asyncio.sleep(duration)
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.2)  # let LiteLLM's logging tasks settle


class _Margin:
    """EXPERIMENT, not the package's behaviour: count each request in the plugin's windows for
    ``margin`` seconds longer than the window (monkeypatches the engine's SlidingWindow class for
    the duration of one scenario), to test whether a margin covering admission-to-arrival skew
    removes the 429s, and at what cost in throughput."""

    def __init__(self, margin: float) -> None:
        self.margin = margin

    def __enter__(self) -> None:
        if not self.margin:
            return
        import hive_ratelimit_plugin._engine as eng

        base = eng.SlidingWindow
        margin = self.margin

        class MarginWindow(base):  # type: ignore[misc, valid-type]
            __slots__ = ()

            def __init__(self, limit: float, period: float, name: str = "") -> None:
                super().__init__(limit, period, name)
                self.period = period + margin  # bucket width stays period / BUCKETS

        self._eng, self._base = eng, base
        eng.SlidingWindow = MarginWindow

    def __exit__(self, *exc: object) -> None:
        if self.margin:
            self._eng.SlidingWindow = self._base


def scenario(n: int, window: float, duration: float, with_plugin: bool, margin: float = 0.0) -> dict[str, Any]:
    """One run: N requests per ``window`` at the provider (and in the plugin, if on)."""
    with _Margin(margin):
        out = _scenario(n, window, duration, with_plugin)
    out["experiment_margin_s"] = margin
    return out


def _scenario(n: int, window: float, duration: float, with_plugin: bool) -> dict[str, Any]:
    litellm = common.quiet_litellm()
    from hive_ratelimit_plugin.plugin import HiveLimiter, unregister
    from hive_ratelimit_plugin.testing import FakeProvider, ProviderState

    field = {1.0: "requests_per_second", 60.0: "requests_per_minute"}[window]
    state = ProviderState(requests_per_window=None, window_seconds=window, latency=LATENCY)
    saved = list(litellm.callbacks)
    litellm.callbacks[:] = []
    limiter = None
    probe = _Probe()
    loop = asyncio.new_event_loop()
    with FakeProvider(state) as provider:
        try:
            # Warm up connections and LiteLLM's client cache with the provider unlimited.
            async def warm() -> None:
                await asyncio.gather(
                    *(
                        litellm.acompletion(
                            model="openai/gpt-4o-mini",
                            api_base=provider.url,
                            api_key="sk-x",
                            messages=[{"role": "user", "content": "warm"}],
                            max_retries=0,
                        )
                        for _ in range(10)
                    )
                )

            loop.run_until_complete(warm())
            if with_plugin:
                limiter = HiveLimiter({"global": {field: n}, "queue": {"max_wait_seconds": 600, "max_size": 10_000}})
                litellm.callbacks.append(limiter)
                probe.install_limiter(limiter)
            probe.install(provider)
            state.reset()
            state.requests_per_window = n
            results: dict[str, Any] = {"ok": 0, "429": 0, "other": 0}
            t0 = time.monotonic()
            cpu0 = time.process_time()
            loop.run_until_complete(_drive(litellm, provider.url, duration, itertools.count(), results))
            cpu = time.process_time() - cpu0
            t_end = t0 + duration
            log = list(state.log)
            probe.finish()
        finally:
            probe.uninstall()
            if limiter is not None:
                unregister(limiter)
            litellm.callbacks[:] = saved
            common.close_loop(loop)
    in_run = [r for r in log if t0 <= r.time < t_end]
    ok_t = sorted(r.time for r in in_run if r.status == 200)
    ok = len(ok_t)
    n429 = sum(1 for r in in_run if r.status == 429)
    steady_ok = sum(1 for t in ok_t if t >= t0 + window)
    ceiling = n * math.ceil(duration / window)
    out: dict[str, Any] = {
        "plugin": with_plugin,
        "limit": f"{n} per {window:g} s",
        "n": n,
        "window_s": window,
        "duration_s": duration,
        "concurrency": CONCURRENCY,
        "provider_latency_s": LATENCY,
        "received": len(in_run),
        "ok": ok,
        "429": n429,
        "other_status": len(in_run) - ok - n429,
        "success_rate_pct": 100.0 * ok / len(in_run) if in_run else float("nan"),
        "achieved_pct_of_N": 100.0 * ok / (n * duration / window),
        "provider_ceiling": ceiling,
        "achieved_pct_of_ceiling": 100.0 * ok / ceiling,
        # Only meaningful over many windows (a per-minute run is one burst per window).
        "steady_pct_of_N": (100.0 * steady_ok / (n * (duration - window) / window)) if duration >= 5 * window else None,
        "max_ok_in_any_window": _max_in_window(ok_t, window),
        "client": {k: v for k, v in results.items()},
        "process_cpu_s": cpu,
    }
    if with_plugin and probe.waits:
        w = probe.waits
        out["wait_p50_s"] = statistics.median(w)
        out["wait_p99_s"] = common.percentile(w, 0.99)
        out["admitted"] = len(probe.admitted)
        out["admitted_in_run"] = sum(1 for t in probe.admitted.values() if t0 <= t < t_end)
        skews = []
        skew_429 = []
        for seq, (arr, ok_flag) in probe.arrivals.items():
            adm = probe.admitted.get(seq)
            if adm is None:
                continue
            skews.append(arr - adm)
            if not ok_flag:
                skew_429.append(arr - adm)
        if skews:
            out["skew_ms"] = {
                "p50": 1000 * statistics.median(skews),
                "p99": 1000 * common.percentile(skews, 0.99),
                "max": 1000 * max(skews),
                "min": 1000 * min(skews),
            }
        pre = [probe.arrivals[q][0] - t for q, t in probe.pre_api.items() if q in probe.arrivals]
        if pre:
            out["pre_api_to_arrival_ms"] = {
                "p50": 1000 * statistics.median(pre),
                "p99": 1000 * common.percentile(pre, 0.99),
                "min": 1000 * min(pre),
                "max": 1000 * max(pre),
            }
        res_d = [probe.resumed[q] - t for q, t in probe.admitted.items() if q in probe.resumed]
        if res_d:
            out["admission_to_resume_ms"] = {
                "p50": 1000 * statistics.median(res_d),
                "p99": 1000 * common.percentile(res_d, 0.99),
                "max": 1000 * max(res_d),
            }
        if skew_429:
            out["skew_ms_of_429s"] = {"median": 1000 * statistics.median(skew_429), "max": 1000 * max(skew_429)}
        # Admissions come in batches (a window bucket frees, the engine grants every waiter that
        # fits at once); the event loop then runs each granted call's LiteLLM pipeline in turn.
        batches: list[list[int]] = []
        last = None
        for seq, t in sorted(probe.admitted.items(), key=lambda kv: kv[1]):
            if last is None or t - last > 0.002:
                batches.append([])
            batches[-1].append(seq)
            last = t
        by_pos: dict[int, list[float]] = {}
        for b in batches:
            for pos, seq in enumerate(b):
                if seq in probe.arrivals:
                    by_pos.setdefault(pos, []).append(1000 * (probe.arrivals[seq][0] - probe.admitted[seq]))
        out["grant_batches"] = {
            "count": len(batches),
            "median_size": statistics.median(len(b) for b in batches),
            "max_size": max(len(b) for b in batches),
        }
        out["skew_ms_by_position_in_batch"] = {
            pos: statistics.median(v) for pos, v in sorted(by_pos.items()) if pos in (0, 1, 2, 5, 10, 15, 19, 25)
        }
        adm_times = [t for t in probe.admitted.values()]
        arr_times = [a for a, okf in probe.arrivals.values()]
        out["max_admitted_in_any_window"] = _max_in_window(adm_times, window)
        out["max_arrived_in_any_window"] = _max_in_window(arr_times, window)
        out["bucket_width_ms"] = 1000 * window / 60
        if n429:
            out["analysis_429"] = _analyse_429(probe, window, n)
    return out


def _analyse_429(probe: _Probe, window: float, n: int) -> list[dict[str, Any]]:
    """For (up to 5) rejected requests: what the provider and the plugin each saw."""
    arrivals_ok = sorted((a, s) for s, (a, okf) in probe.arrivals.items() if okf)
    rows = []
    for seq, (arr, okf) in sorted(probe.arrivals.items(), key=lambda kv: kv[1][0]):
        if okf:
            continue
        adm = probe.admitted.get(seq)
        in_prov = [(a, s) for a, s in arrivals_ok if arr - window < a <= arr]
        oldest_a, oldest_s = in_prov[0] if in_prov else (None, None)
        oldest_adm = probe.admitted.get(oldest_s) if oldest_s is not None else None
        admitted_in_window = sum(1 for t in probe.admitted.values() if adm is not None and adm - window < t <= adm)
        rows.append(
            {
                "seq": seq,
                "admitted_at": adm,
                "arrived_at": arr,
                "skew_ms": None if adm is None else 1000 * (arr - adm),
                "provider_window_count": len(in_prov),
                "oldest_in_provider_window_skew_ms": None if oldest_adm is None else 1000 * (oldest_a - oldest_adm),
                "gap_between_admissions_ms": None if adm is None or oldest_adm is None else 1000 * (adm - oldest_adm),
                "gap_between_arrivals_ms": None if oldest_a is None else 1000 * (arr - oldest_a),
                "plugin_admissions_in_window_ending_at_admission": admitted_in_window,
            }
        )
        if len(rows) >= 5:
            break
    return rows


EXPERIMENT_MARGIN = 0.1


def run(quick: bool = False, minute: bool = True) -> dict[str, Any]:
    d_sec = 10.0 if quick else 30.0
    res: dict[str, Any] = {
        "per_second_plugin": scenario(20, 1.0, d_sec, True),
        "per_second_no_plugin": scenario(20, 1.0, d_sec if not quick else 5.0, False),
    }
    if res["per_second_plugin"]["429"]:
        res["per_second_plugin_margin_experiment"] = scenario(20, 1.0, d_sec, True, margin=EXPERIMENT_MARGIN)
    if minute:
        res["per_minute_plugin"] = scenario(300, 60.0, 70.0 if not quick else 65.0, True)
    return res


def _fmt(r: dict[str, Any]) -> str:
    who = "plugin" if r["plugin"] else "no plugin"
    if r.get("experiment_margin_s"):
        who = f"plugin+{r['experiment_margin_s'] * 1000:.0f}ms margin (experiment)"
    head = (
        f"  {who:9s} {r['limit']:>14s} x {r['duration_s']:.0f} s: "
        f"received {r['received']}, 200 {r['ok']}, 429 {r['429']}, success {r['success_rate_pct']:.1f} %, "
        f"achieved {r['achieved_pct_of_N']:.1f} % of N ({r['achieved_pct_of_ceiling']:.1f} % of the provider's "
        f"ceiling {r['provider_ceiling']})"
    )
    if r.get("steady_pct_of_N") is not None:
        head += f", steady {r['steady_pct_of_N']:.1f} % of N"
    lines = [head]
    if "wait_p50_s" in r:
        lines.append(
            f"      queue wait p50 {r['wait_p50_s'] * 1000:.0f} ms, p99 {r['wait_p99_s'] * 1000:.0f} ms; "
            f"max admitted in any window {r['max_admitted_in_any_window']}, max arrived "
            f"{r['max_arrived_in_any_window']}"
        )
    if "skew_ms" in r:
        s = r["skew_ms"]
        lines.append(
            f"      admission->arrival skew: p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, "
            f"min {s['min']:.1f} ms, max {s['max']:.1f} ms (bucket width {r['bucket_width_ms']:.1f} ms)"
        )
    if "pre_api_to_arrival_ms" in r:
        s = r["pre_api_to_arrival_ms"]
        q = r.get("admission_to_resume_ms", {})
        nan = float("nan")
        lines.append(
            f"      log_pre_api_call->arrival: p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, "
            f"max {s['max']:.1f} ms; admission->task resumed: p50 {q.get('p50', nan):.1f} ms, "
            f"max {q.get('max', nan):.1f} ms"
        )
    if "grant_batches" in r:
        g = r["grant_batches"]
        pos = ", ".join(f"#{k}: {v:.0f}" for k, v in r["skew_ms_by_position_in_batch"].items())
        lines.append(
            f"      grants came in {g['count']} batches (median size {g['median_size']}, "
            f"max {g['max_size']}); median skew (ms) by position in batch: {pos}"
        )
    if r.get("analysis_429"):
        for a in r["analysis_429"]:
            lines.append(
                f"      429 #{a['seq']}: skew {a['skew_ms']:.1f} ms, provider window held "
                f"{a['provider_window_count']}, admissions apart {a['gap_between_admissions_ms']:.1f} ms "
                f"vs arrivals apart {a['gap_between_arrivals_ms']:.1f} ms"
            )
    if r["client"].get("other"):
        lines.append(f"      other client errors: {r['client']['other']} {r['client'].get('other_examples')}")
    return "\n".join(lines)


def summary(res: dict[str, Any]) -> str:
    lines = [f"Throughput against the fake provider ({CONCURRENCY} tasks, provider latency {LATENCY * 1000:.0f} ms)"]
    for r in res.values():
        lines.append(_fmt(r))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter runs")
    p.add_argument("--no-minute", action="store_true", help="skip the per-minute scenario (70 s)")
    args = p.parse_args()
    print(summary(run(quick=args.quick, minute=not args.no_minute)))


if __name__ == "__main__":
    main()
