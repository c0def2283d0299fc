"""Benchmark 6: what budgets add to an admission, and what persisting spend costs per call.

* Engine acquire + release against 6 levels with request, token and concurrency limits, with and
  without a daily budget at every level (in memory), interleaved; the difference is the cost of
  budget checks, reservations and settlement.
* ``Ledger.record`` of one settled call (the SQLite write a settlement waits for, WAL,
  ``synchronous=NORMAL``), on a file in a temporary directory.

Run alone: ``python benchmarks/bench_budget.py``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]

LEVELS = (("global", "global"), ("provider", "provider:openai"), ("model", "model:openai/gpt-4o-mini"),
          ("agent", "agent:a"), ("user", "user:u"), ("team", "team:t"))


def _engine(budgets: bool) -> tuple[Any, list[Any], int]:
    from hive_ratelimit_plugin._engine import Engine, Scope
    from hive_ratelimit_plugin.config import LimitSet

    limits: dict[str, Any] = {"requests_per_minute": common.HUGE, "tokens_per_minute": common.HUGE,
                              "concurrent_requests": common.HUGE}
    if budgets:
        limits["max_cost_per_day"] = 1e12
    scopes = [Scope(level, key, LimitSet(**limits)) for level, key in LEVELS]
    eng = Engine(time.monotonic)
    return eng, scopes, 0


def _time_engine(budgets: bool, n: int) -> list[int]:
    from hive_ratelimit_plugin._engine import Ticket

    eng, scopes, _ = _engine(budgets)
    keys = [s.key for s in scopes]
    samples = []
    for i in range(n):
        t = Ticket(call_id=str(i), scopes=scopes, input_tokens=20, output_tokens=100, cost=0.001,
                   dims=("openai", "gpt-4o-mini", "a", "u", "t", None), spend_keys=keys)
        t0 = time.perf_counter_ns()
        eng.acquire(t, None)
        eng.release(str(i), input_tokens=20, output_tokens=10, cost=0.0005)
        samples.append(time.perf_counter_ns() - t0)
    return samples


def run(quick: bool = False) -> dict[str, Any]:
    from hive_ratelimit_plugin._budget import SpendRow
    from hive_ratelimit_plugin._ledger import Ledger

    rounds, per = (6, 2000) if quick else (20, 5000)
    with_b: list[int] = []
    without_b: list[int] = []
    _time_engine(True, 3000)
    _time_engine(False, 3000)
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for b in order:
            (with_b if b else without_b).extend(_time_engine(b, per))
    res: dict[str, Any] = {
        "engine_with_budgets_us": statistics.median(with_b) / 1000,
        "engine_without_budgets_us": statistics.median(without_b) / 1000,
    }
    res["budget_overhead_us"] = res["engine_with_budgets_us"] - res["engine_without_budgets_us"]
    with tempfile.TemporaryDirectory() as d:
        ledger = Ledger(str(Path(d) / "state.sqlite"))
        writes = []
        for _ in range(2000 if quick else 10000):
            row = SpendRow(time.time(), str(uuid.uuid4()), "openai", "gpt-4o-mini", "a", "u", "t", None, 1, 20, 10,
                           0.0005)
            t0 = time.perf_counter_ns()
            ledger.record([row])
            writes.append(time.perf_counter_ns() - t0)
        ledger.close()
    res["ledger_record_us_median"] = statistics.median(writes) / 1000
    res["ledger_record_us_p99"] = common.percentile(writes, 0.99) / 1000
    return res


def summary(r: dict[str, Any]) -> str:
    return (f"engine acquire+release, 6 levels: {r['engine_without_budgets_us']:.1f} µs without budgets, "
            f"{r['engine_with_budgets_us']:.1f} µs with a daily budget at every level "
            f"(+{r['budget_overhead_us']:.1f} µs); ledger write per settled call: median "
            f"{r['ledger_record_us_median']:.0f} µs, p99 {r['ledger_record_us_p99']:.0f} µs")


if __name__ == "__main__":
    print(summary(run()))
