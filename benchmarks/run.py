"""Run every benchmark and rewrite docs/benchmarks.md with the figures.

    python benchmarks/run.py                 # every stage, under 10 minutes on 2 cores
    python benchmarks/run.py --quick         # shorter runs, to check the scripts (figures are rough)
    python benchmarks/run.py --package-from-commit HEAD   # benchmark a commit, not the working tree
    python benchmarks/run.py --render-from benchmarks/last_run.json   # rewrite the page, run nothing

docs/benchmarks.md is now kept by hand (a summary, later measurements and a history this template
does not have): render to another file with ``--output`` and merge. Every run except
``--render-from`` also overwrites ``benchmarks/last_run.json``, ``--quick`` included.

Each benchmark also runs alone: ``python benchmarks/bench_engine.py`` (and ``bench_e2e.py``,
``bench_memory.py``, ``bench_throughput.py``, ``bench_budget.py``, ``bench_scenario1.py``,
``bench_scenario2.py``, ``bench_scenario3.py``). The raw results of the last run are written to
``benchmarks/last_run.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _git(*args: str, cwd: Path = REPO) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _export_commit(rev: str) -> Path:
    dest = Path(tempfile.mkdtemp(prefix="hive-bench-"))
    archive = subprocess.run(
        ["git", "archive", rev, "hive_ratelimit_plugin"], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _reused_code(stage: str, commit: str | None) -> str:
    """Which code a reused stage ran: this run's, or an older commit's (and which package files differ)."""
    if not commit:
        return "the same code"
    if not _git("rev-parse", "--verify", "--quiet", commit + "^{commit}"):
        return f"commit {commit}"
    changed = _git("diff", "--name-only", commit, "HEAD", "--", "hive_ratelimit_plugin").split()
    if not changed:
        return f"commit {commit}, whose package is the same as this run's"
    names = ", ".join(f"`{c.rsplit('/', 1)[-1]}`" for c in changed)
    redis_only = stage != "redis" and all(c.endswith(("/_redis.py", "/_lua.py")) for c in changed)
    return (f"commit {commit}; the package files changed since then ({names}) are the Redis backend's, which "
            "that stage does not run" if redis_only else f"commit {commit}; package files changed since: {names}")


def _code_state(package_root: Path, rev: str | None) -> dict[str, Any]:
    pkg = package_root / "hive_ratelimit_plugin"
    h = hashlib.sha256()
    for f in sorted(pkg.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    head = _git("rev-parse", "--short", "HEAD")
    if rev:
        return {
            "source": f"commit {_git('rev-parse', '--short', rev)} (exported; working tree not used)",
            "package_sha256": h.hexdigest()[:16],
        }
    dirty = [line[3:] for line in _git("status", "--porcelain", "--", "hive_ratelimit_plugin").splitlines()]
    src = f"working tree at commit {head}"
    if dirty:
        src += f", with uncommitted changes in {len(dirty)} package file(s): {', '.join(dirty)}"
    return {"source": src, "package_sha256": h.hexdigest()[:16]}


# --------------------------------------------------------------------------- markdown
def _us(v: float) -> str:
    from _common import fmt_us

    return fmt_us(v)


def _pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f} %"


def _share(rate: float) -> str:
    """A success rate as a percentage that reads 100 % only when it is (2 failures in 10,000 are
    99.98 %, not a rounded 100.0 %)."""
    pct = 100 * rate
    digits = 1
    while rate < 1.0 and digits < 4 and round(pct, digits) >= 100:
        digits += 1
    return f"{pct:.{digits}f} %"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _md_engine(r: dict[str, Any]) -> list[str]:
    s = r["subjects"]
    ours = s["ours_6x3_acquire_release"]["median_us"]
    rows = [
        (
            "ours_6x3_acquire_release",
            "hive `Engine.acquire` + `Engine.release`",
            "6 levels x (requests/min, tokens/min, concurrency)",
        ),
        ("ours_6x3_acquire", "hive `Engine.acquire` alone", "6 levels x 3 limits"),
        ("ours_1x1_acquire_release", "hive `Engine.acquire` + `Engine.release`", "1 level x requests/min"),
        ("ours_1x1_acquire", "hive `Engine.acquire` alone", "1 level x requests/min"),
        ("limits_moving_window_hit", "`limits` MovingWindowRateLimiter.hit, MemoryStorage", "1 key x 1,000,000/minute"),
        (
            "pyrate_limiter_try_acquire",
            "`pyrate_limiter` Limiter(InMemoryBucket).try_acquire",
            "1 key x 1,000,000/minute",
        ),
        ("aiolimiter_acquire", "`aiolimiter` AsyncLimiter.acquire (awaited)", "1 leaky bucket, 10^9/60 s"),
        (
            "limits_moving_window_hit_50k_entries",
            "`limits` hit with 50,000 hits already in the window",
            "1 key x 1,000,000/minute",
        ),
    ]
    out = [
        "## 1. Cost of one admission decision",
        "",
        f"`bench_engine.py`. Every call timed on its own with `time.perf_counter_ns()` (the median cost of an empty "
        f"timer pair, {r['timer_overhead_ns']:.0f} ns, is subtracted), {r['rounds']} rounds x {r['per_round']:,} calls "
        f"per subject after {r['warmup']:,} warm-up calls, subjects interleaved round by round (rotating order), "
        "cyclic GC paused inside a round. Limits are set so high that every call is admitted at once. The engine "
        "runs on `time.monotonic`, as in production.",
        "",
        "| subject | what is checked | median | p99 | ours 6x3 acquire+release / this |",
        "|---|---|---:|---:|---:|",
    ]
    for key, name, what in rows:
        if key not in s:
            continue
        v = s[key]
        ratio = ours / v["median_us"] if v["median_us"] else float("nan")
        out.append(f"| {name} | {what} | {_us(v['median_us'])} | {_us(v['p99_us'])} | {ratio:.2f}x |")
    one = s["ours_1x1_acquire_release"]["median_us"]
    out += [
        "",
        "Like for like (our engine limited to 1 level x 1 limit, acquire + release) against the others: "
        + ", ".join(
            f"{one / s[k]['median_us']:.2f}x `{k.split('_')[0]}`"
            for k in ("limits_moving_window_hit", "pyrate_limiter_try_acquire", "aiolimiter_acquire")
        )
        + ".",
        "",
        f"Target: 6 levels x 3 limits, acquire + release, median <= {r['target_median_us']:.0f} µs: "
        f"{_verdict(ours <= r['target_median_us'])} ({_us(ours)}).",
        "",
        "Read the ratios with care: one hive decision checks 6 levels x 3 limits (18 checks, plus the queue's "
        "line check and a reservation per level so that usage can be settled later), while each other library "
        "checks one limit of one key and keeps no reservation. `aiolimiter` is a single leaky-bucket counter "
        "with no key at all. `limits`' moving window stores one entry per hit and inserts at the front of a "
        "list, so its cost grows with the hits held in the window (the row with 50,000 entries); in the main "
        f"row its storage is reset each round, so it held at most {r['per_round']:,} entries.",
        "",
    ]
    return out


def _md_e2e(r: dict[str, Any]) -> list[str]:
    hc = r["hook_check"]
    out = [
        "## 2. Overhead on a whole LiteLLM call",
        "",
        '`bench_e2e.py`. `await litellm.acompletion(model="openai/gpt-4o-mini", messages=[{"role": "user", '
        '"content": "hi"}], mock_response="ok", metadata={"agent_id": ..., "team_id": ...}, user=...)` '
        "(LiteLLM runs its whole pipeline, callbacks included, but sends nothing). With the plugin: a "
        "`HiveLimiter` registered with 6 levels of limits (global; provider `openai`; model `gpt-4o-mini`; agent; "
        "user; team; each with requests/min, tokens/min and concurrency, high enough to always admit). "
        f"Modes run in {r['blocks']} alternating blocks of {r['per_block']} calls (order reversed every block); "
        "per-call wall time with `perf_counter_ns`, and process CPU time per call per block.",
        "",
        f"Check first: mock_response calls do pass through the plugin: {hc['async_admitted']}/{hc['async_calls']} "
        f"async and {hc['sync_admitted']}/{hc['sync_calls']} sync calls admitted, usage seen at levels "
        f"{', '.join(hc['levels_seen'])}, {hc['in_flight_after']} left in flight. Every measured block also asserts "
        "that `admitted_total` grew by exactly its number of calls with the plugin and by none without.",
        "",
    ]
    if r.get("runaway_default") is not None:
        out += [
            f"The configuration turns the runaway-loop detector off (`runaway: {{enabled: false}}`; it is "
            f"{'on' if r['runaway_default'] else 'off'} by default): the benchmark sends one identical request "
            "thousands of times, which it would rightly stop after 20.",
            "",
        ]
    for kind, title in (("async", "`litellm.acompletion`"), ("sync", "`litellm.completion`")):
        a = r[kind]
        base = a["modes"]["no_callback"]
        out += [
            f"**{title}, mock_response**",
            "",
            "| mode | median per call | p99 | CPU per call | vs no callback (median) |",
            "|---|---:|---:|---:|---:|",
        ]
        labels = {
            "no_callback": "no callback (LiteLLM's own function)" if kind == "sync" else "no callback",
            "hive_limiter": "HiveLimiter, 6 levels",
            "noop_custom_logger": "a do-nothing `CustomLogger` (LiteLLM's cost of any callback)",
            "guard_installed_no_limiter": "sync guard installed, no limiter registered",
            "hive_limiter_2_levels": "HiveLimiter, 2 levels (the specification's example limits: global + model)",
        }
        for m, st in a["modes"].items():
            d = 100.0 * (st["median_us"] / base["median_us"] - 1.0)
            rel = "" if m == "no_callback" else f"{d:+.1f} %"
            out.append(
                f"| {labels.get(m, m)} | {_us(st['median_us'])} | {_us(st['p99_us'])} | "
                f"{_us(st['cpu_us_per_call_median_of_blocks'])} | {rel} |"
            )
        lo, hi = a["block_pair_overhead_pct_min_max"]
        out += [
            "",
            f"Added by the plugin: **{a['overhead_us']:+.0f} µs per call, {a['overhead_pct_pooled_median']:+.1f} %** "
            f"(pooled medians); {a['overhead_pct_median_of_block_pairs']:+.1f} % as the median over block pairs "
            f"(pairs ranged {lo:+.0f} % to {hi:+.0f} %: the machine is noisy); CPU per call "
            f"{a['cpu_overhead_pct_median_of_block_pairs']:+.1f} %. Target <= 2 %: "
            f"{_verdict(a['overhead_pct_pooled_median'] <= 2.0)}.",
            "",
        ]
    ip = r["inside_plugin"]
    out += [
        "**Where the time goes: the plugin's own methods**, timed inside real calls (an instrumented subclass; "
        f"{ip['calls']:,} calls each; median per invocation; `(nested)` = called from another listed method):",
        "",
        "| path | method | median | mean | invocations per call |",
        "|---|---|---:|---:|---:|",
    ]
    for kind in ("async", "sync"):
        for k, e in ip[kind]["methods"].items():
            out.append(f"| {kind} | `{k}` | {_us(e['median_us'])} | {_us(e['mean_us'])} | {e['per_call']:.2f} |")
    noop_a = r["async"]["modes"].get("noop_custom_logger", {}).get("median_us")
    base_a = r["async"]["modes"]["no_callback"]["median_us"]
    out += [
        "",
        f"Sum over the outermost entries: async {_us(ip['async']['us_per_call_from_medians'])}, sync "
        f"{_us(ip['sync']['us_per_call_from_medians'])} per call, against an A/B difference of "
        f"{r['async']['overhead_us']:+.0f} µs (async) and {r['sync']['overhead_us']:+.0f} µs (sync)"
        + (f"; a do-nothing callback costs LiteLLM {noop_a - base_a:+.0f} µs per async call" if noop_a else "")
        + ". The same methods cost about a third of that in a tight loop outside LiteLLM (warm CPU caches, "
        "most likely), and wall-time differences this small move with the machine's load: section 2b counts "
        "instructions instead.",
        "",
    ]
    tk = r["tokens"]
    out += [
        f"**Token estimate** (`_tokens.count_messages`, `litellm.token_counter` per message, cached per "
        f"(model, role, text)); the 12-message conversation is {tk['tokens_in_convo']:,} tokens:",
        "",
        "| case | median | p99 |",
        "|---|---:|---:|",
    ]
    first = tk.get("first_call_ever_us (tokenizer load)")
    if first is not None:
        out.append(f"| first call in the process (loads the tokenizer) | {_us(first)} | |")
    for k, st in tk["cases"].items():
        out.append(f"| {k} | {_us(st['median_us'])} | {_us(st['p99_us'])} |")
    out.append("")
    return out


def _instruction_rows(r: dict[str, Any]) -> list[str]:
    pc, base = r["per_call"], r["per_call"]["none"]
    main = r.get("per_call_main")  # (runs before the per-thread count have none)
    out = [
        f"| mode (LiteLLM {r.get('litellm', '?')}) | instructions per call | vs no callback |"
        + (" on the caller's thread | added there |" if main else ""),
        "|---|---:|---:|" + ("---:|---:|" if main else ""),
    ]
    for mode, label in r["labels"].items():
        if mode not in pc:
            continue
        rel = "" if mode == "none" else (f"{100.0 * pc[mode] / base:.1f} % of it" if mode == "hooks"
                                         else f"{100.0 * (pc[mode] / base - 1.0):+.1f} %")
        row = f"| {label} | {pc[mode]:,.0f} | {rel} |"
        if main:
            added = "" if mode in ("none", "hooks") else f"{main[mode] - main['none']:+,.0f}"
            row += f" {main[mode]:,.0f} | {added} |"
        out.append(row)
    return out


def _main_thread_note(r: dict[str, Any]) -> str:
    """What the caller's-thread column says about the plugin's overhead (runs that counted it)."""
    main = r.get("per_call_main")
    if not main:
        return ""
    base = r["per_call"]["none"]
    six, two, noop = (main[m] - main["none"] for m in ("hive", "hive2", "noop"))
    return (
        f" Counted on the caller's thread alone (where the plugin runs, and {100.0 * main['none'] / base:.0f} % of "
        "LiteLLM's own call; the rest is LiteLLM's background logging, whose count moves with wall time), the "
        f"plugin adds {six:+,.0f} instructions with 6 levels and {two:+,.0f} with 2, that is "
        f"{100.0 * six / base:+.1f} % and {100.0 * two / base:+.1f} % of the whole call, of which {noop:+,.0f} "
        "is LiteLLM's handling of a callback with these hooks (the do-nothing row)."
    )


def _md_kwargs(kw: dict[str, Any] | None) -> list[str]:
    """LiteLLM's own cost of the keyword arguments the plugin may add (bench_litellm_kwargs.py)."""
    if not kw or "skipped" in kw:
        return []
    plain = kw["per_call"]["plain"]
    added = kw["added"]
    return [
        f"What LiteLLM {kw.get('litellm', '?')} itself charges for keyword arguments the plugin may add to a call "
        "(`bench_litellm_kwargs.py`: the same call with a do-nothing callback, with and without the argument): "
        f"`max_retries=0`, which the guard adds unless `retry.take_over_sdk_retries` is off (so that the openai SDK "
        f"does not retry 429s unseen), costs {added['max_retries']:+,.0f} instructions "
        f"({100.0 * added['max_retries'] / plain:+.2f} %) per call; a caller-supplied `litellm_call_id` "
        f"{added['litellm_call_id']:+,.0f} ({100.0 * added['litellm_call_id'] / plain:+.2f} %), which is why the "
        "guard no longer passes one"
        + (f" (on the caller's thread alone: {kw['added_main']['max_retries']:+,.0f} and "
           f"{kw['added_main']['litellm_call_id']:+,.0f})" if "added_main" in kw else "")
        + ". Both are inside the HiveLimiter rows above.",
        "",
    ]


def _md_instructions(r: dict[str, Any], old: dict[str, Any] | None = None,
                     kw: dict[str, Any] | None = None) -> list[str]:
    out = ["### 2b. The same overhead in CPU instructions (noise-free)", ""]
    if "skipped" in r:
        return [*out, f"Skipped in this run: {r['skipped']}.", ""]
    lo, hi = r["calls"]
    pc, ov = r["per_call"], r["overhead_pct"]
    out += [
        "`bench_instructions.py`. Each mode in its own process under Valgrind's `callgrind`, which counts the CPU "
        f"instructions executed whatever else the machine is doing; per call = (count after {hi} calls - count "
        f"after {lo} calls) / {hi - lo}, so start-up and first-call work cancel out (`PYTHONHASHSEED=0`). The call "
        "is the async one above, with the same 6-level configuration and the status snapshot off (work done once "
        "a second would be charged to ~50x fewer calls under callgrind's slowdown than natively). LiteLLM's "
        "background logging thread makes counts vary by about 1 % between identical runs"
        + ("; each thread is also counted on its own (`--separate-threads=yes`), and the caller's thread, which "
           "runs all of the plugin's code, varies far less." if "per_call_main" in r else "."),
        "",
        *_instruction_rows(r),
    ]
    out += [
        "",
        f"The plugin adds **{ov['hive_vs_none']:+.1f} %** instructions to the call with 6 levels and "
        f"**{ov['hive2_vs_none']:+.1f} %** with the specification's 2 levels (target <= 2 %: "
        f"{_verdict(ov['hive_vs_none'] <= 2.0)} with 6, {_verdict(ov['hive2_vs_none'] <= 2.0)} with 2); "
        f"{ov['noop_vs_none']:+.1f} % of it is LiteLLM's own work for a "
        f"callback with these hooks (the do-nothing row), and the plugin's code itself is "
        f"{ov['hooks_vs_none']:.1f} % of a call ({pc['hooks']:,.0f} instructions)."
        + (f" Merely registering a `CustomLogger` that overrides nothing costs LiteLLM {ov['empty_vs_none']:+.1f} %: "
           "that much of the 2 % is gone before any plugin code runs." if "empty_vs_none" in ov else "")
        + _main_thread_note(r),
        "",
    ]
    out += _md_kwargs(kw)
    if old and "skipped" not in old:
        ovo = old["overhead_pct"]
        out += [
            f"The same stage on LiteLLM {old.get('litellm', '?')} (the version Hive pins), from "
            "`bench_instructions.py` run with that version installed:",
            "",
            *_instruction_rows(old),
            "",
            f"There a call without a callback is {old['per_call']['none']:,.0f} instructions "
            f"({100.0 * old['per_call']['none'] / r['per_call']['none']:.0f} % of the one above), so the same plugin "
            f"code weighs more: {ovo['hive_vs_none']:+.1f} % with 6 levels, {ovo['hive2_vs_none']:+.1f} % with 2"
            + (f", of which {ovo['empty_vs_none']:+.1f} % is LiteLLM's cost of any registered callback"
               if "empty_vs_none" in ovo else "") + "." + _main_thread_note(old),
            "",
        ]
    return out


def _md_memory(r: dict[str, Any]) -> list[str]:
    e = r["engine"]
    out = [
        "## 3. Memory per key, and eviction",
        "",
        f"`bench_memory.py`. {e['keys']:,} distinct agent scopes (`agent:<i>`, each with requests_per_minute and "
        "tokens_per_minute), one admitted and released call each, straight on the `Engine` with a `FakeClock`; "
        "net allocation measured with `tracemalloc` (everything the engine retains for them).",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| net memory for {e['keys']:,} keys | {e['net_bytes'] / 1e6:.1f} MB |",
        f"| **bytes per active key** | **{e['bytes_per_key']:,.0f}** |",
        f"| `scope_count` while active | {e['scope_count_active']:,} |",
        f"| `scope_count` after the clock moves 61 s (past the 60 s window) and `acquire` runs maintenance | "
        f"{e['scope_count_after_61s_maintenance']:,} |",
        f"| `scope_count` after `Engine.evict_idle()` | {e['scope_count_after_evict_idle']:,} |",
        f"| memory still held after `evict_idle()` | {e['net_bytes_after_evict_idle'] / 1e6:.1f} MB |",
        f"| `evict_idle()` duration for {e['keys']:,} idle keys (no tracemalloc) | {e['evict_idle_ms']:.0f} ms |",
        f"| `scope_count` after the clock moves a further day and `acquire` runs maintenance | "
        f"{e['scope_count_after_1day_maintenance']:,} |",
        f"| duration of that one `acquire` (it runs the sweep inline) | {e['sweep_acquire_ms_after_1day']:.0f} ms |",
        f"| fill rate without tracemalloc | {e['fill_us_per_key_without_tracemalloc']:.1f} µs per new key |",
        "",
    ]
    bd = e.get("one_scope_breakdown_bytes") or {}
    if bd:
        out += [
            "One scope, by `sys.getsizeof` (shallow; excludes dict entry and allocator overhead): "
            + "; ".join(f"{k}: {v} B" for k, v in bd.items())
            + ".",
            "",
        ]
    after61 = e["scope_count_after_61s_maintenance"]
    if after61 >= e["keys"]:
        day = e["scope_count_after_1day_maintenance"]
        out += [
            "The engine's own maintenance did **not** evict the idle scopes once their 60 s windows had emptied "
            f"({after61:,} scopes still there); `evict_idle()` did"
            + (
                f", and the automatic sweep did only after a further day ({day:,} left), in one "
                f"{e['sweep_acquire_ms_after_1day']:.0f} ms `acquire`"
                if day < e["keys"]
                else f"; the automatic sweep had still not evicted them after a further day ({day:,} left)"
            )
            + " (see Observations).",
            "",
        ]
    p = r.get("plugin", {})
    if "error" in p:
        out += [f"Plugin level: not measured ({p['error']}).", ""]
    elif p:
        out += [
            f'Through the plugin (`HiveLimiter` with `agents: {{"*": ...}}`, {p["keys"]:,} agents, one call each '
            "through the plugin's sync admission path without LiteLLM):",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| bytes per agent | {p['bytes_per_key']:,.0f} |",
            f"| `scope_count` after `evict_idle()` | {p['scope_count_after_evict_idle']:,} |",
            f"| memory still held after `evict_idle()` | {p['net_bytes_after_evict_idle'] / 1e6:.1f} MB |",
            *([f"| the same after a quarter as many agents ({p['keys'] // 4:,}) | {p['quarter'] / 1e6:.1f} MB |"]
              if "quarter" in p else []),
            "",
            "Largest allocation sites still alive after eviction (package files only):",
            "",
            "| where | MB | blocks |",
            "|---|---:|---:|",
        ]
        out += [f"| `{t['where']}` | {t['bytes'] / 1e6:.2f} | {t['blocks']:,} |" for t in p["largest_survivors"]]
        out.append("")
    return out


def _md_throughput(r: dict[str, Any]) -> list[str]:
    from bench_throughput import CONCURRENCY, LATENCY

    out = [
        "## 4. Throughput and 429s against a rate-limited provider",
        "",
        f"`bench_throughput.py`. The fake provider enforces an exact sliding log of N requests per W and answers "
        f"429 beyond it (latency {LATENCY * 1000:.0f} ms per request). {CONCURRENCY} asyncio tasks call "
        '`litellm.acompletion(model="openai/gpt-4o-mini", api_base=provider.url, api_key="sk-x", '
        "max_retries=0, ...)` in a closed loop for the duration. With the plugin, its global limit is the same N "
        "per W (`requests_per_second` for W = 1 s, `requests_per_minute` for W = 60 s: the configuration has "
        "per-second/minute/hour/day fields only, so W = 10 s is not expressible) and the queue never times out. "
        "Counts are the provider's, over the run. Achieved = 200s / (N x duration / W); the provider's ceiling "
        "is N x ceil(duration / W) (a full window at the start plus each later one); steady leaves out the first "
        "window. Queue wait is what the plugin's waiting driver returns per admitted call. Skew = time the provider "
        "stamped the request minus the time the plugin admitted it (same process, same monotonic clock).",
        "",
        "Per second: N = 20/s for 30 s keeps the run short yet spans 30 windows; "
        + ("per minute: N = 300/min for "
           "70 s covers the initial window and one slide (a closed loop of 50 tasks drains a per-minute window "
           "in about a second, so the per-minute run is one burst per window; judge it against the provider's "
           "ceiling, not against N x duration / W, and its queue waits approach a minute by design)."
           if "per_minute_plugin" in r else
           "the per-minute run is left out by default to keep the whole run under 10 minutes (`--with-minute` "
           "adds it; Scenario 2 below drives a per-minute window)."),
        "",
        "| run | limit | duration | received | 200 | 429 | success | achieved (of N) | of ceiling | steady | "
        "wait p50 / p99 | skew p50 / p99 / max |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "per_second_plugin": "plugin",
        "per_second_no_plugin": "no plugin",
        "per_second_plugin_margin_experiment": "plugin + 100 ms margin (experiment, see below)",
        "per_minute_plugin": "plugin",
    }
    for key, x in r.items():
        wait = f"{x['wait_p50_s']:.2f} s / {x['wait_p99_s']:.2f} s" if "wait_p50_s" in x else "-"
        sk = x.get("skew_ms")
        skew = f"{sk['p50']:.0f} / {sk['p99']:.0f} / {sk['max']:.0f} ms" if sk else "-"
        out.append(
            f"| {names.get(key, key)} | {x['limit']} | {x['duration_s']:.0f} s | {x['received']:,} | {x['ok']:,} | "
            f"{x['429']:,} | {_pct(x['success_rate_pct'])} | {_pct(x['achieved_pct_of_N'])} | "
            f"{_pct(x['achieved_pct_of_ceiling'])} | {_pct(x.get('steady_pct_of_N'))} | {wait} | {skew} |"
        )
    ps = r["per_second_plugin"]
    pm = r.get("per_minute_plugin")
    out += [""]
    tgt = [
        f"per second: {ps['429']} 429s ({_verdict(ps['429'] == 0)} zero), "
        f"{ps['achieved_pct_of_N']:.1f} % of N ({_verdict(ps['achieved_pct_of_N'] >= 95.0)} >= 95 %)"
    ]
    if pm:
        tgt.append(
            f"per minute: {pm['429']} 429s ({_verdict(pm['429'] == 0)}), "
            f"{pm['achieved_pct_of_ceiling']:.1f} % of the provider's ceiling"
        )
    out += ["Targets, with the plugin: " + "; ".join(tgt) + ".", ""]
    if ps["429"]:
        g = ps.get("grant_batches", {})
        rows = ps.get("analysis_429", [])
        ex = next((x for x in rows if x.get("gap_between_admissions_ms") is not None), None)
        pre = ps.get("pre_api_to_arrival_ms")
        out += [
            "**Why the plugin still gets 429s with a 1-second window.** The engine never admitted more than "
            f"{ps['max_admitted_in_any_window']} calls in any 1 s interval of *admission* time (its invariant "
            f"holds), yet the provider saw up to {ps['max_arrived_in_any_window']} requests (200s and 429s) in 1 s "
            "of *arrival* time. The plugin admits in LiteLLM's pre-call hook; LiteLLM then still builds and sends "
            f"the request, so each request reached the provider {ps['skew_ms']['p50']:.0f} ms (median) after its "
            f"admission, anywhere from {ps['skew_ms']['min']:.0f} to {ps['skew_ms']['max']:.0f} ms in this run. "
            f"Grants come in batches ({g.get('count', '?')} batches, median size {g.get('median_size', '?')}, up to "
            f"{g.get('max_size', '?')}): when the oldest bucket of the window expires, every waiting call that fits "
            "is admitted at once, and the single event loop then runs their LiteLLM pipelines one after the other. "
            "A request counts in the plugin's window for W plus the rest of its bucket, between 0 and "
            f"{ps['bucket_width_ms']:.1f} ms for W = 1 s. Whenever a request admitted one window after another "
            "reaches the provider with a skew smaller by more than that, the provider still holds the earlier one "
            "and answers 429. Each 429 also used up a slot of the plugin's window, which is why achieved "
            "throughput drops with them.",
            "",
        ]
        if ex:
            out += [
                f"Example from this run: request #{ex['seq']} was admitted {ex['gap_between_admissions_ms']:.0f} ms "
                "after the oldest request the provider still held, but arrived only "
                f"{ex['gap_between_arrivals_ms']:.0f} ms after it (skews {ex['skew_ms']:.0f} ms and "
                f"{ex['oldest_in_provider_window_skew_ms']:.0f} ms), so the provider's window held "
                f"{ex['provider_window_count']} requests and refused it.",
                "",
            ]
        if pre:
            out += [
                "Even measured from LiteLLM's `log_pre_api_call` (the last callback before the SDK sends), "
                f"arrival follows by {pre['p50']:.0f} ms (median) to {pre['max']:.0f} ms (max): counting requests from "
                "that moment instead of from admission would narrow the spread, not close it.",
                "",
            ]
        exp = r.get("per_second_plugin_margin_experiment")
        if exp:
            esk = exp.get("skew_ms", {})
            verdict = (
                "removed them"
                if exp["429"] == 0
                else "did not remove them (one batch of requests was held up on its way out, its skew "
                f"reaching {esk.get('max', 0):.0f} ms, beyond the margin)"
            )
            out += [
                "Experiment (a benchmark-only monkeypatch, not the package's behaviour): counting each request "
                f"{exp['experiment_margin_s'] * 1000:.0f} ms longer than the window gave {exp['429']} 429s and "
                f"{exp['achieved_pct_of_N']:.1f} % of N (against {ps['429']} and {ps['achieved_pct_of_N']:.1f} % "
                f"without): the margin {verdict}. A margin costs about margin / W of throughput and protects only "
                "as far as it covers the worst skew.",
                "",
            ]
    if pm is not None:
        pex = next((x for x in pm.get("analysis_429", []) if x.get("gap_between_admissions_ms") is not None), None)
        if pm["429"] and pex:
            out += [
                f"**Per minute** (1 s buckets): {pm['429']} 429s. The slack a request gets is the rest of its bucket "
                "after its admission, anywhere between 0 and the bucket width, not a whole bucket. In the first "
                "window 50 tasks' pipelines run at once, so skews were large (up to "
                f"{pm['skew_ms']['max']:.0f} ms); a window later, request #{pex['seq']} was admitted "
                f"{pex['gap_between_admissions_ms'] / 1000:.3f} s after the oldest request the provider still held but "
                f"arrived {pex['gap_between_arrivals_ms'] / 1000:.3f} s after it (skews {pex['skew_ms']:.0f} ms and "
                f"{pex['oldest_in_provider_window_skew_ms']:.0f} ms).",
                "",
            ]
        elif "skew_ms" in pm:
            out += [
                f"**Per minute** (1 s buckets): {pm['429']} 429s; skews reached {pm['skew_ms']['max']:.0f} ms. "
                "Slack is the rest of a request's bucket after its admission (0 to 1 s), so this is not "
                "guaranteed either.",
                "",
            ]
    npl = r.get("per_second_no_plugin")
    if npl:
        cmp = (
            "higher than"
            if npl["achieved_pct_of_N"] > ps["achieved_pct_of_N"] + 1
            else "lower than"
            if npl["achieved_pct_of_N"] < ps["achieved_pct_of_N"] - 1
            else "about the same as"
        )
        out += [
            f"Without the plugin, the same load sent {npl['received']:,} requests in {npl['duration_s']:.0f} s, "
            f"{npl['429']:,} of them refused ({_pct(100 - npl['success_rate_pct'])} of requests failed). Every 429 "
            "comes straight back and the task tries again at once, so freed slots are refilled immediately: its "
            f"200s reached {_pct(npl['achieved_pct_of_N'])} of N, {cmp} with the plugin "
            f"({_pct(ps['achieved_pct_of_N'])}). What the plugin buys is "
            f"{npl['received'] / max(npl['ok'], 1):.1f} -> {ps['received'] / max(ps['ok'], 1):.2f} requests sent "
            "per success, and calls that wait instead of failing"
            + (
                "; the number of successful requests is not where it wins."
                if cmp != "lower than"
                else "; here the client without it also got fewer successes."
            ),
            "",
        ]
    return out


def _md_observations(results: dict[str, Any]) -> list[str]:
    """Plain statements drawn from this run's figures (what to look at, not what to conclude)."""
    obs: list[str] = []
    eng = results.get("engine")
    if eng:
        m = eng["subjects"]["ours_6x3_acquire_release"]["median_us"]
        one = eng["subjects"]["ours_1x1_acquire_release"]["median_us"]
        obs.append(
            f"One decision over 6 levels x 3 limits costs {_us(m)} (median), "
            f"{'within' if m <= 20 else 'above'} the 20 µs target; with 1 level x 1 limit it costs {_us(one)}, "
            "the same order as the single-limit libraries."
        )
    e2e = results.get("e2e")
    if e2e:
        a, sy = e2e["async"], e2e["sync"]
        top = sorted(
            (
                (k, v["median_us"] * v["per_call"])
                for k, v in e2e["inside_plugin"]["async"]["methods"].items()
                if not k.endswith("(nested)")
            ),
            key=lambda kv: -kv[1],
        )[:2]
        two = a["modes"].get("hive_limiter_2_levels")
        base = a["modes"]["no_callback"]["median_us"]
        obs.append(
            f"The plugin adds {a['overhead_us']:+.0f} µs ({a['overhead_pct_pooled_median']:+.1f} %) to an async "
            f"and {sy['overhead_us']:+.0f} µs ({sy['overhead_pct_pooled_median']:+.1f} %) to a sync mock call with "
            "6 levels"
            + (f", and {two['median_us'] - base:+.0f} µs ({100.0 * (two['median_us'] / base - 1.0):+.1f} %) to an "
               "async one with the specification's 2 levels" if two else "")
            + ". A mock call is ~1-2 ms of LiteLLM's own work; a real LLM call lasts hundreds of ms to seconds, "
            "where the same microseconds are well under 0.1 %. The largest async entries are "
            + " and ".join(f"`{k}` ({_us(v)})" for k, v in top)
            + "."
        )
    ins = results.get("instructions")
    if ins and "skipped" not in ins:
        ov = ins["overhead_pct"]
        obs.append(
            f"Counted in instructions, which the machine's load does not move: {ov['hive_vs_none']:+.1f} % with "
            f"6 levels, {ov['hive2_vs_none']:+.1f} % with 2; LiteLLM's own handling of a callback with the same "
            f"hooks is {ov['noop_vs_none']:+.1f} % of that, and the plugin's code alone {ov['hooks_vs_none']:.1f} % "
            "of a call"
            + (f"; LiteLLM charges {ov['empty_vs_none']:+.1f} % for any registered `CustomLogger`, even one "
               "overriding nothing" if "empty_vs_none" in ov else "")
            + ". Within the 2 % target there is no room for a 6-level admission, its settlement and the "
            "retry guard in Python on top of LiteLLM's own callback cost."
        )
    mem = results.get("memory")
    if mem:
        e = mem["engine"]
        bd = e.get("one_scope_breakdown_bytes") or {}
        dq = next((v for k, v in bd.items() if "deque" in k), None)  # older runs kept buckets in deques
        if dq and dq > e["bytes_per_key"] / 2:
            obs.append(
                f"An idle-but-remembered key costs {e['bytes_per_key']:,.0f} bytes; {dq:,} of them are the two "
                "empty-or-nearly-empty `collections.deque` objects of its sliding windows (CPython allocates "
                "a 64-slot block per deque), more than half of the total."
            )
        if e["scope_count_after_61s_maintenance"] >= e["keys"]:
            later = (
                "only after a further day"
                if e["scope_count_after_1day_maintenance"] < e["keys"]
                else "not even after a further day"
            )
            obs.append(
                "Idle scopes are not evicted when their own windows have emptied: with 60 s limits, the "
                f"automatic sweep evicted them {later} (the sweep's horizon is the longest period the engine "
                "supports, whatever limits a scope has). A service that sees many short-lived agents or "
                "users keeps each of them that long unless it calls `evict_idle()` itself."
            )
        if e["sweep_acquire_ms_after_1day"] > 10:
            obs.append(
                f"When the sweep does run, it runs inside `acquire` under the engine lock: the `acquire` that "
                f"evicted {e['keys']:,} scopes took {e['sweep_acquire_ms_after_1day']:.0f} ms, during which "
                "no other call can be admitted or released."
            )
        p = mem.get("plugin") or {}
        if "quarter" in p:
            obs.append(
                f"Through the plugin, {p['net_bytes_after_evict_idle'] / 1e6:.1f} MB stay after every scope of "
                f"{p['keys']:,} agents is evicted, and {p['quarter'] / 1e6:.1f} MB after a quarter as many: "
                "caches of at most a few thousand entries (plans, identities, spend-key lists, the runaway "
                "detector's 2,000 agents) and the scope table's capacity at its peak, not kept per agent "
                "(allocation sites listed in section 3)."
            )
    thr = results.get("throughput")
    if thr:
        ps = thr["per_second_plugin"]
        if ps["429"]:
            obs.append(
                f"With a 1 s window the plugin let {ps['429']} requests be refused by the provider: it counts a "
                "request from the moment it admits it, the provider from the moment it arrives, and the "
                f"variation of that delay ({ps['skew_ms']['min']:.0f}-{ps['skew_ms']['max']:.0f} ms) exceeds "
                f"the slack the plugin's buckets leave (the rest of the request's bucket: at most "
                f"{ps['bucket_width_ms']:.1f} ms for a 1 s window)."
                + (
                    f" The per-minute run (1 s buckets) got {thr['per_minute_plugin']['429']} 429s."
                    if "per_minute_plugin" in thr
                    else ""
                )
            )
    if not obs:
        return []
    return ["## Observations", ""] + [f"- {o}" for o in obs] + [""]


def _md_budget(r: dict[str, Any]) -> list[str]:
    return [
        "## 6. Budgets: checks and persistence",
        "",
        "`bench_budget.py`. Engine `acquire` + `release` against 6 levels (request, token and concurrency limits), "
        "with and without a daily budget at every level, interleaved (in memory); and the SQLite write that a "
        "settlement waits for when a state file is configured.",
        "",
        "| measure | median |",
        "|---|---:|",
        f"| acquire + release, 6 levels, no budgets | {_us(r['engine_without_budgets_us'])} |",
        f"| acquire + release, 6 levels, a daily budget at every level | {_us(r['engine_with_budgets_us'])} |",
        f"| added by budget checks, reservations and settlement | {_us(r['budget_overhead_us'])} |",
        f"| `Ledger.record` of one settled call (WAL, synchronous=NORMAL) | {_us(r['ledger_record_us_median'])} "
        f"(p99 {_us(r['ledger_record_us_p99'])}) |",
        "",
        f"Targets: budget checks <= 10 µs: {_verdict(r['budget_overhead_us'] <= 10)}; persistence <= 200 µs per call: "
        f"{_verdict(r['ledger_record_us_p99'] <= 200)} (p99).",
        "",
    ]


def _md_redis(r: dict[str, Any]) -> list[str]:
    lines = [
        "## 9. Shared limits on Redis",
        "",
        f"`bench_redis.py`. One process, one thread, against Redis {r['redis_version']} on this machine "
        f"({r['url']}); {r['rounds']} rounds of {r['per_round']:,} calls per subject, in rotating order; every call "
        "admitted (limits far above the load). Ours is a whole call: admission (the `ADMIT` script) and settlement "
        "(`SETTLE`); `limits`' moving window only admits (`hit`). Round trips counted on the client.",
        "",
        "| subject | calls per second | µs per call | round trips per call | vs `limits` |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in r["results"].items():
        lines.append(f"| {name} | {v['calls_per_second']:,.0f} | {v['us_per_call']:.0f} | "
                     f"{v['round_trips_per_call']:.2f} | {v['ratio_to_limits']:.2f}x |")
    one = r["results"]["ours, 1 level (admit + settle)"]["calls_per_second"]
    six = r["results"]["ours, 6 levels + budget (admit + settle)"]["calls_per_second"]
    mem = r.get("memory_bytes", {})
    lines += [
        "",
        f"Target >= 2,000 admitted calls per second from one process: {_verdict(one >= 2000)} with one level "
        f"({one:,.0f}/s, admission and settlement included); with six levels, tokens, concurrency and a budget "
        f"{six:,.0f}/s. The scripts do more than `limits`' hit (every level, tokens, concurrency, budgets, "
        "provider signals, settlement), in Lua inside Redis; the round trips are the floor "
        "(one per admission attempt, one per settlement).",
        "",
    ]
    if mem:
        lines += ["Redis memory per scope after the six-level subject's calls (bytes, `MEMORY USAGE` summed per "
                  "scope): " + ", ".join(f"{k} {v:,}" for k, v in sorted(mem.items())) + ".", ""]
    return lines


def _md_scenario2(r: dict[str, Any]) -> list[str]:
    lines = [
        "## 5. Scenario 2: a spike of 10,000 requests",
        "",
        f"`bench_scenario2.py`. {r['tasks']} asyncio tasks send {r['requests']:,} `litellm.acompletion` calls in all to "
        f"the fake provider, which enforces {r['provider_rpm']:,} requests per 60 s sliding window and answers 429 "
        "with `retry-after` beyond it. The plugin is set to the provider's limit (`requests_per_minute`) with a "
        "queue that waits; plain LiteLLM runs with its defaults (the openai SDK retries a 429 twice on its own, "
        "honouring `retry-after`). The provider's limit alone makes the run last at least "
        f"{60 * (-(-r['requests'] // r['provider_rpm']) - 1)} s.",
        "",
        "| subject | success | 429s reaching the caller | 429s sent by the provider | requests sent | duration | "
        "share of the provider's ceiling | latency p50 | latency p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("plugin", "plain LiteLLM", "plain LiteLLM, num_retries=3"):
        if name not in r:
            continue
        x = r[name]
        lines.append(
            f"| {name} | {_share(x['success_rate'])} | {x['caller_429s']} | {x['provider_429s']} | "
            f"{x['sent_to_provider']:,} | {x['duration']:.1f} s | "
            f"{100 * min(1.0, x['ok'] / (r['provider_rpm'] * -(-x['duration'] // 60))):.1f} % | "
            f"{x['p50_latency'] or 0:.2f} s | "
            f"{x['p99_latency'] or 0:.2f} s |"
        )
    p = r.get("plugin", {})
    lines += [
        "",
        f"Targets (plugin): 100 % success: {_verdict(p.get('success_rate') == 1.0)}; zero 429s reaching the "
        f"caller: {_verdict(p.get('caller_429s') == 0)}. The plugin also made the provider send "
        f"{p.get('provider_429s', '?')} 429s in all (plain LiteLLM: {r.get('plain LiteLLM', {}).get('provider_429s', '?')})"
        + (": a provider that counts refusals against abuse thresholds sees none. " if not p.get("provider_429s") else
           ". Those few 429s (requests that reached the provider later than the plugin admitted them, on a loaded "
           "machine) are costly: each cools the model down for every caller and lowers the plugin's learned "
           f"limit, and this run took {p.get('duration', 0):.0f} s where plain LiteLLM took "
           f"{r.get('plain LiteLLM', {}).get('duration', 0):.0f} s. ")
        + "Latency is queue wait plus call; "
        "p99 includes the wait for the second window. The provider's ceiling for a run of D seconds is "
        "N x ceil(D / 60) (a full window at the start, then one per minute); past the first window both subjects "
        "are bound by LiteLLM's own CPU cost per call on this 2-core machine, hence durations above the ideal.",
        "",
    ]
    return lines


def _md_router(rt: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if rt and "requests" in rt:
        lines += [
            "### Scenario 2 through LiteLLM's Router",
            "",
            f"`bench_scenario2.py` (`start_router_subjects`). {rt['requests']:,} calls from {rt['tasks']} "
            f"tasks through `Router.acompletion` to one deployment with `rpm: {rt['provider_rpm']:,}` and "
            f"`tpm: {rt['tpm']:,}` (the provider's limit: {rt['provider_rpm']:,} requests per 60 s), routing "
            f"strategy `{rt['strategy']}` (the one that enforces them; the default `simple-shuffle` only uses "
            "them as weights). Alone, and with the plugin registered (its model limit set to the same figures). "
            "Smaller than the spike above; both subjects run at the same time, each in a process of its own, "
            "while the light Scenario 1 and 3 stages run (the Router waits out whole minutes between its own "
            "retries, which would otherwise add minutes of idle time to the run; the stage duration `router` is "
            "the time left to wait for them after those stages).",
            "",
            "| subject | success | 429s reaching the caller | other errors | 429s sent by the provider | "
            "requests sent | duration | latency p50 | latency p99 |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for name in ("Router alone", "Router + plugin"):
            x = rt.get(name)
            if not x:
                continue
            if "ok" not in x:
                lines.append(f"| {name} | failed: `{x.get('error', '?')[:200]}` | | | | | | | |")
                continue
            other = {k: v for k, v in x["errors"].items() if k != "RateLimitError"}
            lines.append(
                f"| {name} | {_share(x['success_rate'])} | {x['caller_429s']:,} | "
                f"{', '.join(f'{k} {v:,}' for k, v in other.items()) or '-'} | {x['provider_429s']:,} | "
                f"{x['sent_to_provider']:,} | {x['duration']:.1f} s | {x['p50_latency'] or 0:.2f} s | "
                f"{x['p99_latency'] or 0:.2f} s |"
            )
        ra = rt.get("Router alone", {})
        if "ok" in ra and ra["caller_429s"]:
            lines += [
                "",
                f"The Router alone sends the provider no more than its limit, but it does not queue: calls beyond "
                f"the deployment's `rpm` fail with `RateLimitError` (\"No deployments available\") after the "
                f"Router's own retries, {ra['caller_429s']:,} of them here.",
            ]
        lines += [""]
    return lines


def _md_scenario1(r: dict[str, Any]) -> list[str]:
    names = ("no limiter", "plugin, hourly budget", "LiteLLM max_budget", "plugin, runaway detector")
    base = r["no limiter"]
    per_call = base["spend"] / base["calls"] if base["calls"] else 0.0
    lines = [
        "## 7. Scenario 1: a runaway agent loop",
        "",
        "`bench_scenario1.py`. The specification: \"a test agent gets stuck in a loop: $847 in charges before "
        "noticed (2 hours); with rate limiting, $10 max (hourly budget), auto-stopped\". An agent loop calls "
        f"`litellm.completion(model=\"{r['model']}\", ...)` against the fake provider, which reports "
        f"{r['prompt_tokens']:,} prompt and {r['completion_tokens']:,} completion tokens per call "
        f"(${per_call:.2f} a call at LiteLLM's prices), once every {r['period_seconds']:g} s of virtual time: the "
        "plugin runs on a fake monotonic and wall clock, so hours of looping take seconds, and every call is a "
        "real LiteLLM call over HTTP. The loop stops at its first error, as an agent does. Spend is LiteLLM's "
        "`completion_cost` of each response.",
        "",
        "| subject | calls | spend | stopped after (virtual) | by |",
        "|---|---:|---:|---:|---|",
    ]
    for n in names:
        x = r.get(n)
        if not x:
            continue
        st = x["stopped"]
        when = f"{x['virtual_seconds'] / 60:.1f} min" if st else f"not stopped in {x['virtual_seconds'] / 60:.0f} min"
        lines.append(f"| {n} | {x['calls']:,} | ${x['spend']:,.2f} | {when} | {('`' + st['error'] + '`') if st else '-'} |")
    lines += [
        "",
        f"Without a limiter the loop spends ${base['spend']:,.2f} in {base['virtual_seconds'] / 60:.0f} minutes; "
        f"at that rate, **${base['spend_at_noticed_extrapolated']:,.0f} by the time it is noticed after "
        f"{r['noticed_after_seconds'] / 3600:g} hours** (the specification's $847). With the plugin's hourly budget "
        f"of ${r['budget']:g} it is stopped once the next call's worst case no longer fits: "
        f"${r['plugin, hourly budget']['spend']:,.2f} spent.",
    ]
    mb = r.get("LiteLLM max_budget")
    if mb and not mb["stopped"]:
        lines.append(
            f"LiteLLM's own `litellm.max_budget = {r['budget']:g}` did not stop the loop at all: LiteLLM's "
            f"running total (`litellm._current_cost`) stood at ${mb.get('litellm_current_cost', 0):,.2f} after "
            f"${mb['spend']:,.2f} of calls (LiteLLM adds to it only for some response types — a dict with a `content` key — not for these chat completions)."
        )
    elif mb:
        lines.append(f"LiteLLM's own `litellm.max_budget = {r['budget']:g}` stopped it after ${mb['spend']:,.2f} "
                     "(a process-wide total: it never resets, and only a restart clears it).")
    rw = r.get("plugin, runaway detector")
    if rw and rw["stopped"]:
        lines.append(
            f"A loop that resends the identical request (every 2 s here) is stopped by the runaway detector "
            f"alone, with no budget configured, after {rw['calls']} calls (default: more than 20 identical "
            "requests in 60 s)."
        )
    lines += [""]
    return lines


def _md_scenario3(r: dict[str, Any]) -> list[str]:
    lines = [
        "## 8. Scenario 3: two models, priorities",
        "",
        "`bench_scenario3.py`. The specification: \"GPT-4 for complex tasks, GPT-3.5 for simple ones; without "
        "rate limiting the GPT-4 quota is exhausted quickly; with it, GPT-4 is reserved for high-value tasks\". "
        f"Two fake providers stand for the two quotas: `openai/gpt-4` at {r['gpt4_rpm']:,} and "
        f"`openai/gpt-3.5-turbo` at {r['gpt35_rpm']:,} requests per 60 s (sliding logs, 429 beyond). "
        f"{r['bulk_tasks']} bulk tasks per model call in closed loops (`priority: low`); high-value tasks arrive "
        f"on gpt-4 at {r['vip_rps']:g} per second (`priority: high`) and count as served if they finish within "
        f"{r['vip_deadline']:g} s. After {r['duration']:g} s of load plus {r['vip_deadline']:g} s, whatever is still "
        "waiting or in flight is cancelled. The plugin has the providers' limits per model and "
        "`queue.high_priority_reserve: 0.2`; plain LiteLLM runs with its defaults (the openai SDK retries a 429 "
        "twice, honouring `retry-after`).",
        "",
        "| subject | class | calls | served | late | cancelled | 429s reaching the caller | latency p50 | latency p99 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("plain LiteLLM", "plugin"):
        x = r.get(name)
        if not x:
            continue
        for kind in ("vip gpt-4", "bulk gpt-4", "bulk gpt-3.5"):
            k = x[kind]
            label = {"vip gpt-4": "high-value, gpt-4", "bulk gpt-4": "bulk, gpt-4", "bulk gpt-3.5": "bulk, gpt-3.5"}[kind]
            p50 = f"{k['p50_latency']:.2f} s" if k["p50_latency"] is not None else "-"
            p99 = f"{k['p99_latency']:.2f} s" if k["p99_latency"] is not None else "-"
            lines.append(f"| {name} | {label} | {k['calls']:,} | {k['ok']:,} | {k['late']:,} | {k['cancelled']:,} | "
                         f"{k['caller_429s']:,} | {p50} | {p99} |")
    lines += ["", "| subject | model | 200s | 429s sent by the provider | share of the provider's limit |",
              "|---|---|---:|---:|---:|"]
    for name in ("plain LiteLLM", "plugin"):
        x = r.get(name)
        if not x:
            continue
        for model in ("gpt-4", "gpt-3.5"):
            pv = x[f"provider {model}"]
            lines.append(f"| {name} | {model} | {pv['ok']:,} | {pv['429']:,} | {100 * pv['share_of_limit']:.0f} % |")
    pl, pn = r.get("plugin", {}).get("vip gpt-4"), r.get("plain LiteLLM", {}).get("vip gpt-4")
    if pl and pn:
        lines += [
            "",
            f"High-value calls served: **{pl['ok']}/{pl['calls']} with the plugin** (p99 "
            f"{pl['p99_latency'] or 0:.2f} s) against {pn['ok']}/{pn['calls']} without. Without it, bulk work "
            "takes the whole gpt-4 window within seconds and every later call, high-value or not, gets 429s and "
            "sleeps out the provider's `retry-after`. With it, bulk calls never use the fifth of each limit "
            "reserved for high priority, so high-value calls pass at once; the price is that bulk work gets at "
            "most 80 % of each model's limit (on gpt-3.5 too: the reserve applies to every limit), and the "
            "saturated gpt-4 queue does not hold up gpt-3.5 calls.",
        ]
    lines += [""]
    return lines


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "What the limiter costs and what it buys: the price of one admission decision (against `limits`, "
        "`pyrate_limiter` and `aiolimiter`), the overhead it adds to a LiteLLM call, the memory each active key "
        "costs and whether idle keys go away, how close it drives a rate-limited provider to its limit "
        "without 429s, and the specification's three scenarios (a spike of 10,000 requests, also through "
        "LiteLLM's Router; a runaway loop; two models with priorities) against plain LiteLLM. "
        + ("Every figure on this page comes from one run of:" if not meta.get("notes") else
           "The figures on this page come from the runs described below the tables; all of them are produced by:"),
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"run on {meta['machine']['date']}, taking {meta['elapsed_s'] / 60:.1f} minutes. The machine is a shared "
        "2-core VM whose speed varies from minute to minute, so figures are medians over many repetitions, "
        "interleaved between the subjects being compared; single figures can still move by 10-20 % between runs.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {meta['machine']['cpu']} ({meta['machine']['nproc']} cores, `nproc`) |",
        f"| Python | {meta['machine']['python']} |",
        f"| OS | {meta['machine']['platform']} |",
        f"| load average at start | {meta['machine']['loadavg_at_start']} |",
        f"| code benchmarked | {meta['code']['source']} (package sources sha256 {meta['code']['package_sha256']}) |",
        "",
        "| package | version |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in meta["versions"].items()]
    lines += [""]
    if meta.get("stage_seconds"):
        lines += ["Stage durations: " + ", ".join(f"{k} {v:.0f} s" for k, v in meta["stage_seconds"].items()) + ".", ""]
    for note in meta.get("notes", []):  # how a page merged from several runs was put together
        lines += [note, ""]
    if "engine" in results:
        lines += _md_engine(results["engine"])
    if "e2e" in results:
        lines += _md_e2e(results["e2e"])
    if "instructions" in results:
        lines += _md_instructions(results["instructions"], results.get("instructions_old"), results.get("kwargs"))
    if "memory" in results:
        lines += _md_memory(results["memory"])
    if "throughput" in results:
        lines += _md_throughput(results["throughput"])
    if "scenario2" in results:
        lines += _md_scenario2(results["scenario2"])
    if "router" in results:
        lines += _md_router(results["router"])
    if "budget" in results:
        lines += _md_budget(results["budget"])
    if "redis" in results:
        lines += _md_redis(results["redis"])
    if "scenario1" in results:
        lines += _md_scenario1(results["scenario1"])
    if "scenario3" in results:
        lines += _md_scenario3(results["scenario3"])
    lines += _md_observations(results)
    for name, err in meta.get("errors", {}).items():
        lines += [f"**{name} failed in this run:** `{err}`", ""]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "export LITELLM_LOCAL_MODEL_COST_MAP=True     # no network needed (the scripts set it too)",
        "pip install -e '.[bench]'                    # limits, aiolimiter, pyrate-limiter, redis",
        "python benchmarks/run.py --output /tmp/benchmarks-run.md   # everything (docs/benchmarks.md is kept by hand: merge)",
        "python benchmarks/run.py --package-from-commit HEAD --output /tmp/benchmarks-run.md   # the same, on a commit",
        "python benchmarks/bench_engine.py            # or one at a time (--quick where the script has it)",
        "python benchmarks/bench_e2e.py",
        "python benchmarks/bench_instructions.py     # the same overhead in CPU instructions (needs valgrind)",
        "python benchmarks/bench_litellm_kwargs.py   # LiteLLM's own cost of the arguments the guard may add (valgrind)",
        "python benchmarks/bench_memory.py",
        "python benchmarks/bench_throughput.py        # alone it adds the 70 s per-minute run unless --no-minute",
        "python benchmarks/bench_scenario2.py         # 10,000 requests, plugin vs plain LiteLLM (--router: + the Router subjects)",
        "python benchmarks/bench_budget.py            # budget checks and persistence",
        "python benchmarks/bench_scenario1.py         # runaway loop: spend and time to stop",
        "python benchmarks/bench_scenario3.py         # two models, priorities",
        "python benchmarks/bench_redis.py             # shared limits on Redis vs limits' Redis moving window (HIVE_BENCH_REDIS)",
        "hive-ratelimit simulate --config configs/spec-example.yaml --rate 50/s --duration 1h --agents 10   # your own load, virtual clock",
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="Run every benchmark and rewrite docs/benchmarks.md.")
    p.add_argument("--quick", action="store_true", help="shorter runs (figures are rough)")
    p.add_argument(
        "--only", choices=["engine", "budget", "redis", "e2e", "instructions", "kwargs", "memory", "throughput", "scenario1", "scenario2",
                           "scenario3", "router"],
        action="append", help="run only these (repeatable)"
    )
    p.add_argument("--with-minute", action="store_true",
                   help="add the per-minute throughput run (70 s; Scenario 2 covers a per-minute window)")
    p.add_argument("--no-minute", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument(
        "--package-from-commit",
        metavar="REV",
        help="benchmark hive_ratelimit_plugin as of this commit (exported to a temp dir)",
    )
    p.add_argument(
        "--reuse", action="append", metavar="STAGE=JSON",
        help="take a stage's figures from a file its own script wrote with --json (the page says so)",
    )
    p.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument(
        "--render-from",
        metavar="JSON",
        help="only rewrite the page from a saved last_run.json (same figures, no benchmark is run)",
    )
    args = p.parse_args()
    if args.render_from:
        sys.path.insert(0, str(HERE))
        saved = json.loads(Path(args.render_from).read_text(encoding="utf-8"))
        Path(args.output).write_text(render(saved["results"], saved["meta"]), encoding="utf-8")
        print(f"rewrote {args.output} from {args.render_from}")
        return

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/run.py", *sys.argv[1:]])
    package_root = REPO
    if args.package_from_commit:
        package_root = _export_commit(args.package_from_commit)
        os.environ["HIVE_BENCH_PACKAGE_ROOT"] = str(package_root)
    sys.path.insert(0, str(HERE))
    import _common as common  # sets the environment and sys.path
    import bench_budget
    import bench_e2e
    import bench_engine
    import bench_instructions
    import bench_litellm_kwargs
    import bench_memory
    import bench_redis
    import bench_scenario1
    import bench_scenario2
    import bench_scenario3
    import bench_throughput

    import hive_ratelimit_plugin

    print(f"benchmarking {hive_ratelimit_plugin.__file__}", flush=True)
    t_start = time.perf_counter()
    meta: dict[str, Any] = {
        "command": command,
        "machine": common.machine(),
        "versions": common.versions(),
        "code": _code_state(package_root, args.package_from_commit),
        "stage_seconds": {},
        "errors": {},
    }
    stages = [
        ("engine", lambda: bench_engine.run(quick=args.quick), bench_engine.summary),
        ("budget", lambda: bench_budget.run(quick=args.quick), bench_budget.summary),
        ("redis", lambda: bench_redis.run(quick=args.quick), bench_redis.summary),
        ("memory", lambda: bench_memory.run(quick=args.quick), bench_memory.summary),
        ("e2e", lambda: bench_e2e.run(quick=args.quick, blocks=None if args.quick else 30), bench_e2e.summary),
        ("instructions", lambda: bench_instructions.run(quick=args.quick), bench_instructions.summary),
        ("kwargs", bench_litellm_kwargs.run, bench_litellm_kwargs.summary),
        (
            "throughput",
            lambda: bench_throughput.run(quick=args.quick, minute=args.with_minute and not args.no_minute),
            bench_throughput.summary,
        ),
        (
            "scenario2",
            lambda: bench_scenario2.run(2_000 if args.quick else 10_000, 1_000 if args.quick else 5_000),
            bench_scenario2.summary,
        ),
        # The Router subjects (own processes, mostly waiting out the Router's per-minute retries) run
        # while the two light stages after them run, so that their idle minutes cost no extra time.
        ("router_start", lambda: router_started.extend(bench_scenario2.start_router_subjects()), None),
        ("scenario1", bench_scenario1.run, bench_scenario1.summary),
        ("scenario3", bench_scenario3.run, bench_scenario3.summary),
        ("router", lambda: bench_scenario2.collect_router_subjects(router_started), bench_scenario2.router_summary),
    ]
    router_started: list[Any] = []
    results: dict[str, Any] = {}
    reused: set[str] = set()
    for spec in args.reuse or []:
        name, _, path = spec.partition("=")
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        results[name] = saved["result"]
        reused.add(name)
        meta.setdefault("notes", []).append(
            f"The `{name}` figures come from a separate run, `{saved['command']}`, at {saved['when']}, of "
            + _reused_code(name, saved.get("commit")) + "; every other figure comes from the run above."
        )
    for name, fn, summ in stages:
        if name in reused:
            continue
        if args.only and (name if not name.startswith("router") else "router") not in args.only:
            continue
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            if summ is None:  # a step, not a stage with results
                fn()
                continue
            results[name] = fn()
            print(summ(results[name]), flush=True)
        except Exception as exc:  # keep the other figures; say what failed
            import traceback

            traceback.print_exc()
            meta["errors"][name] = f"{type(exc).__name__}: {exc}"
        meta["stage_seconds"][name] = time.perf_counter() - t0
    meta["elapsed_s"] = time.perf_counter() - t_start
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, meta), encoding="utf-8")
    (HERE / "last_run.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, default=str), encoding="utf-8"
    )
    print(f"\nwrote {out} and {HERE / 'last_run.json'} ({meta['elapsed_s'] / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
