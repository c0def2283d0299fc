"""Status snapshots, the ``hive-ratelimit status`` dashboard and the ``get_usage_stats()`` contract."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin._budget import SpendRow
from hive_ratelimit_plugin._ledger import Ledger
from hive_ratelimit_plugin.cli import main
from hive_ratelimit_plugin.status import (
    PUBLISHER,
    LedgerStatusSource,
    ProcessStatusSource,
    merge_snapshots,
    read_status,
    render_dashboard,
    status_dir,
)
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs

KNOWN_STATE: dict[str, Any] = {
    "version": 1,
    "source": "processes",
    "generated_at": 1795910400.0,  # 2026-11-29 00:00:00 UTC
    "processes": [{"pid": 4242, "host": "build-1", "backend": "memory", "age_seconds": 0.4}],
    "currency": "USD",
    "warning_thresholds": [0.8],
    "scopes": {
        "global": {"level": "global", "in_flight": 3, "queued": 0,
                   "limits": {"requests_per_minute": {"used": 45, "limit": 60},
                              "concurrent_requests": {"used": 3, "limit": 10}}},
        "model:openai/gpt-4": {"level": "model", "in_flight": 2, "queued": 4,
                               "limits": {"tokens_per_minute": {"used": 240000, "limit": 300000},
                                          "requests_per_minute": {"used": 450, "limit": 500}}},
        "model:anthropic/claude-sonnet-4": {"level": "model", "in_flight": 1, "queued": 0,
                                            "limits": {"requests_per_minute": {"used": 42, "limit": 50},
                                                       "tokens_per_minute": {"used": 34000, "limit": 40000}}},
        "agent:researcher": {"level": "agent", "in_flight": 1, "queued": 0,
                             "limits": {"requests_per_minute": {"used": 30, "limit": 30}}},
    },
    "budgets": {
        "global": {"max_cost_per_day": {"window": "day", "window_label": "2026-11-28 UTC", "spent": 87.34,
                                        "reserved": 0.0, "limit": 100.0, "remaining": 12.66, "tripped": False}},
        "agent:researcher": {"max_cost_per_day": {"window": "day", "window_label": "2026-11-28 UTC", "spent": 5.0,
                                                  "reserved": 0.0, "limit": 5.0, "remaining": 0.0, "tripped": True}},
    },
    "spend": {},
    "circuits": {"model:anthropic/claude-sonnet-4": {"circuit": "open", "cooldown_seconds": 12.0}},
    "totals": {"admitted_total": 1234, "queued_total": 56, "queued": 4, "retried_total": 10,
               "provider_429s": 12, "rejected": {"queue/queue_timeout": 3}},
}

EXPECTED = """\
┌──────────────────────────────────────────────────────────────┐
│ Rate Limit Status · 1 process (pid 4242)                     │
├──────────────────────────────────────────────────────────────┤
│ Global                                                       │
│ ███████████████░░░░░ 45/60 RPM (75%)                         │
│ ██████░░░░░░░░░░░░░░ 3/10 concurrent (30%)                   │
│                                                              │
│ Model anthropic/claude-sonnet-4                              │
│ ████████████████░░░░ 42/50 RPM (84%) ⚠                       │
│ █████████████████░░░ 34K/40K TPM (85%) ⚠                     │
│   ✖ circuit open · ⚠ provider cooldown 12s                   │
│                                                              │
│ Model openai/gpt-4                                           │
│ ██████████████████░░ 450/500 RPM (90%) ⚠                     │
│ ████████████████░░░░ 240K/300K TPM (80%) ⚠                   │
│   4 queued                                                   │
│                                                              │
│ Budget (Today) · 2026-11-28 UTC                              │
│ █████████████████░░░ $87.34/$100.00 (87%) ⚠                  │
│ ⚠  WARNING: Approaching daily limit                          │
│                                                              │
│ Budget (Today) · agent researcher · 2026-11-28 UTC           │
│ ████████████████████ $5.00/$5.00 (100%) ✖ EXCEEDED           │
│ ✖  EXCEEDED: daily limit reached; calls here are stopped     │
│                                                              │
│ admitted 1234 · queued now 4 (total 56) · rejected 3         │
│ provider 429s 12 (retried 10)                                │
├──────────────────────────────────────────────────────────────┤
│ updated 2026-11-29 00:00:00 UTC                              │
└──────────────────────────────────────────────────────────────┘
"""


# ------------------------------------------------------------------ rendering
def test_dashboard_renders_known_state_like_the_mockup() -> None:
    """Bars, K suffixes, percentages, warning markers and the budget warning line, exactly."""
    assert render_dashboard(KNOWN_STATE) == EXPECTED


def test_dashboard_levels_are_opt_in() -> None:
    """Agents are drawn only when asked; their budgets always are."""
    default = render_dashboard(KNOWN_STATE)
    with_agents = render_dashboard(KNOWN_STATE, levels=("global", "provider", "model", "agent"))
    assert "Agent researcher" not in default and "agent researcher" in default  # the budget
    block = with_agents.split("│ Agent researcher")[1].splitlines()[1]
    assert block == "│ ████████████████████ 30/30 RPM (100%) ✖ FULL                 │"


def test_dashboard_is_pure_and_handles_an_empty_state() -> None:
    state = json.loads(json.dumps(KNOWN_STATE))
    assert render_dashboard(state) == render_dashboard(state)
    assert state == KNOWN_STATE  # not mutated
    empty = {"source": "none", "generated_at": 0.0}
    text = render_dashboard(empty)
    assert "nothing running · no state recorded" in text and "no usage recorded" in text


def test_dashboard_of_processes_read_from_redis_says_they_run() -> None:
    """With the Redis backend the snapshots come from Redis (any host): the header names the
    running processes and the totals line is drawn, as for local snapshots."""
    state = json.loads(json.dumps(KNOWN_STATE))
    state["source"] = "redis"
    state["processes"] = [{"pid": 4242, "host": "build-1"}, {"pid": 77, "host": "build-2"}]
    state["totals"] = {"admitted_total": 12, "queued": 1, "queued_total": 3, "rejected": {"x": 2}}
    text = render_dashboard(state)
    assert "2 processes (host:pid build-1:4242, build-2:77) · redis" in text
    assert "admitted 12 · queued now 1 (total 3) · rejected 2" in text and "nothing running" not in text
    state["processes"] = []
    assert "nothing running · redis" in render_dashboard(state)


def test_dashboard_labels_the_limits_learned_from_anthropics_headers() -> None:
    """The input- and output-token limits learned from Anthropic's headers are labelled as such,
    after the configured ones."""
    state = {"source": "processes", "generated_at": 0.0, "processes": [{"pid": 1}], "warning_thresholds": [0.8],
             "scopes": {"model:anthropic/claude-sonnet-4-5": {"level": "model", "limits": {
                 "learned_output_tokens_per_minute": {"used": 2000, "limit": 8000},
                 "learned_input_tokens_per_minute": {"used": 10000, "limit": 40000},
                 "requests_per_minute": {"used": 5, "limit": 50}}}}}
    lines = [line for line in render_dashboard(state).splitlines() if "(25%)" in line or "(10%)" in line]
    assert [line.split()[2:4] for line in lines] == [["5/50", "RPM"], ["10K/40K", "input"], ["2K/8K", "output"]]
    assert "2K/8K output TPM (learned) (25%)" in lines[2]


def test_dashboard_below_threshold_has_no_marker_and_tiny_values_read_well() -> None:
    state = {"source": "processes", "generated_at": 0.0, "processes": [{"pid": 1}], "warning_thresholds": [0.9],
             "scopes": {"global": {"level": "global", "limits": {
                 "requests_per_minute": {"used": 85, "limit": 100},
                 "tokens_per_day": {"used": 30, "limit": 1_500_000}}}},
             "budgets": {"global": {"max_cost_per_hour": {"window": "hour", "spent": 0.0021, "limit": 0.01}}}}
    text = render_dashboard(state)
    assert "85/100 RPM (85%)  " in text and "85/100 RPM (85%) ⚠" not in text  # threshold is 90 %
    assert "30/1.5M TPD (<1%)" in text
    assert "$0.0021/$0.01 (21%)" in text


def test_merge_sums_limits_and_usage_and_keeps_largest_budget_spend() -> None:
    """Memory backend: each process has its own allowance, so both are summed; budgets are shared."""
    def snap(pid: int, used: int, spent: float) -> dict[str, Any]:
        return {"version": 1, "pid": pid, "host": "h", "written_at": 100.0, "limiters": [{
            "currency": "USD", "warning_thresholds": [0.8],
            "budgets": {"global": {"max_cost_per_day": {"window": "day", "spent": spent, "reserved": 1.0,
                                                        "limit": 10.0}}},
            "stats": {"levels": {"model": {"model:openai/gpt-4": {
                "requests_per_minute": {"used": used, "limit": 50}, "in_flight": 1, "queued": 2}}},
                "providers": {"model:openai/gpt-4": {"circuit": "open" if pid == 2 else "closed"}},
                "admitted_total": 5, "queued_total": 1, "queued": 2, "retried_total": 1,
                "rejected": {"max_cost_per_day": 1}},
            "counters": {"provider_429s": 3, "rejections": {"queue/queue_timeout": 1}},
        }]}

    state = merge_snapshots([snap(1, 10, 4.0), snap(2, 30, 6.0)], now=101.0)
    model = state["scopes"]["model:openai/gpt-4"]
    assert model["limits"]["requests_per_minute"] == {"used": 40.0, "limit": 100.0}
    assert model["in_flight"] == 2 and model["queued"] == 4
    assert state["budgets"]["global"]["max_cost_per_day"]["spent"] == 6.0
    assert state["budgets"]["global"]["max_cost_per_day"]["reserved"] == 2.0
    assert state["circuits"]["model:openai/gpt-4"]["circuit"] == "open"
    assert state["totals"]["admitted_total"] == 10 and state["totals"]["provider_429s"] == 6
    assert state["totals"]["rejected"] == {"queue/queue_timeout": 2}
    assert [p["pid"] for p in state["processes"]] == [1, 2]


# ------------------------------------------------------------------ snapshots
def _write(directory: Path, pid: int, host: str, written_at: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{pid}.json"
    path.write_text(json.dumps({"version": 1, "pid": pid, "host": host, "written_at": written_at,
                                "limiters": [{"stats": {"admitted_total": 7}}]}))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_snapshots_are_ignored(tmp_path: Path) -> None:
    """A dead process' file, an old file and a corrupt file are skipped; a live one is read."""
    d = tmp_path / "status"
    host = socket.gethostname()
    _write(d, os.getpid(), host, time.time())
    _write(d, _dead_pid(), host, time.time())
    old = _write(d, 999_999_0, "other-host", time.time())
    os.utime(old, (time.time() - 60, time.time() - 60))
    (d / "123.json").write_text("{ not json")
    state = ProcessStatusSource(d, max_age=10).read()
    assert [p["pid"] for p in state["processes"]] == [os.getpid()]
    assert state["totals"]["admitted_total"] == 7


def test_snapshots_of_another_shape_are_ignored_not_a_traceback(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Version-1 JSON files in the status directory that are not what a limiter publishes (a
    hand-edited file, another program's; NaN, which Python's json reads) made ``status`` die with
    a traceback (AttributeError, ValueError), and ``--json`` print NaN, which is not JSON. They
    are skipped like a corrupt file; the live process is still drawn."""
    state_path = tmp_path / "state.sqlite"
    d = status_dir(str(state_path))
    _write(d, os.getpid(), socket.gethostname(), time.time())
    bad = [
        {"limiters": "not a list"},
        {"limiters": [{"stats": {"levels": {"global": {"global": {"in_flight": 1, "queued": 0,
                                                                 "requests_per_minute": {"used": "many",
                                                                                         "limit": 10}}}}}}]},
        {"limiters": [{"budgets": {"global": {"max_cost_per_day": {"window": "day", "spent": "x", "limit": 1}}}}]},
        {"limiters": [{"stats": None}]},
    ]
    for i, extra in enumerate(bad):
        (d / f"{10_000_000 + i}.json").write_text(json.dumps({"version": 1, "pid": 10_000_000 + i,
                                                              "host": "other-host", "written_at": 0, **extra}))
    (d / "10000009.json").write_text(
        '{"version": 1, "pid": 10000009, "host": "other-host", "written_at": 0, "limiters": [{"stats": {"levels":'
        ' {"global": {"global": {"in_flight": 1, "queued": 0, "requests_per_minute": {"used": NaN,'
        ' "limit": Infinity}}}}}}]}')
    assert main(["status", "--state-path", str(state_path)]) == 0
    out = capsys.readouterr().out
    assert f"1 process (pid {os.getpid()})" in out and "admitted 7" in out
    assert main(["status", "--json", "--state-path", str(state_path)]) == 0

    def strict(name: str) -> Any:
        raise AssertionError(f"{name} in --json output")

    state = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert [p["pid"] for p in state["processes"]] == [os.getpid()]


async def test_registered_limiter_publishes_and_unpublishes(provider: FakeProvider, tmp_path: Path) -> None:
    """Only a limiter registered with LiteLLM publishes; the file goes when it is unregistered."""
    state_path = tmp_path / "s" / "state.sqlite"
    limiter = HiveLimiter({"state_path": str(state_path), "global": {"requests_per_minute": 60}})
    mine = status_dir(str(state_path)) / f"{os.getpid()}.json"
    PUBLISHER.publish_once()
    assert not mine.exists()  # not registered: not running
    litellm.callbacks.append(limiter)
    await litellm.acompletion(**chat_kwargs(provider))
    PUBLISHER.publish_once()
    doc = json.loads(mine.read_text())
    assert doc["pid"] == os.getpid()
    [snap] = doc["limiters"]
    assert snap["stats"]["levels"]["global"]["global"]["requests_per_minute"] == {"used": 1, "limit": 60}
    assert "sk-test-SECRET" not in mine.read_text()
    litellm.callbacks.remove(limiter)
    PUBLISHER.publish_once()
    assert not mine.exists()


def test_snapshot_publishing_can_be_turned_off(tmp_path: Path) -> None:
    state_path = tmp_path / "state.sqlite"
    limiter = HiveLimiter({"state_path": str(state_path), "status": {"enabled": False}})
    litellm.callbacks.append(limiter)
    PUBLISHER.publish_once()
    assert not (status_dir(str(state_path)) / f"{os.getpid()}.json").exists()


# ----------------------------------------------------------------------- CLI
def test_status_json_prints_the_same_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state_path = tmp_path / "state.sqlite"
    d = status_dir(str(state_path))
    d.mkdir(parents=True)
    snap = {"version": 1, "pid": os.getpid(), "host": socket.gethostname(), "written_at": time.time(),
            "limiters": [{"currency": "USD", "warning_thresholds": [0.8], "budgets": {},
                          "stats": {"levels": {"global": {"global": {
                              "requests_per_minute": {"used": 3, "limit": 60}, "in_flight": 0, "queued": 0}}},
                              "admitted_total": 3}}]}
    (d / f"{os.getpid()}.json").write_text(json.dumps(snap))
    assert main(["status", "--json", "--state-path", str(state_path)]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["source"] == "processes"
    assert state["scopes"]["global"]["limits"]["requests_per_minute"] == {"used": 3.0, "limit": 60.0}
    assert main(["status", "--state-path", str(state_path)]) == 0
    text = capsys.readouterr().out
    assert render_dashboard(state).splitlines()[1:-3] == text.splitlines()[1:-3]  # same, but for the times
    assert "3/60 RPM (5%)" in text


def test_status_watch_redraws(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--watch", "--count", "2", "--interval", "0", "--state-path",
                 str(tmp_path / "state.sqlite")]) == 0
    out = capsys.readouterr().out
    assert out.count("Rate Limit Status") == 2


def test_status_with_nothing_running_shows_persisted_budgets(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """No process: the budgets and spend in the SQLite ledger, with limits from the configuration."""
    state_path = tmp_path / "state.sqlite"
    cfg = tmp_path / "limits.yaml"
    cfg.write_text(f"rate_limiting:\n  state_path: {state_path}\n  budget: {{max_daily_spend: 10}}\n"
                   "  agents: {researcher: {max_cost_per_day: 2}}\n")
    ledger = Ledger(str(state_path))
    ledger.record([SpendRow(time.time(), "c1", "openai", "gpt-4o-mini", "researcher", None, None, None,
                            1, 100, 20, 1.7)])
    ledger.close()
    assert main(["status", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "nothing running · persisted budgets" in text
    assert "$1.70/$10.00 (17%)" in text
    assert "$1.70/$2.00 (85%) ⚠" in text and "WARNING: Approaching daily limit" in text
    assert "Spend (Today) · provider openai: $1.70 (no budget set)" in text
    state = LedgerStatusSource(str(state_path)).read()
    assert state["spend"]["agent:researcher"]["day"] == {"cost": 1.7, "requests": 1, "tokens": 120}


def test_a_model_budget_is_shown_on_the_snapshots_it_holds(provider: FakeProvider, tmp_path: Path) -> None:
    """A budget under ``claude-sonnet-4`` holds ``claude-sonnet-4-20250514`` (a scope of its own):
    the live snapshot and the ledger (no process) show it there with its limit, not an untouched
    budget under the undated key beside the one being spent. Found by helper-49."""
    from hive_ratelimit_plugin import BudgetExceededError
    from hive_ratelimit_plugin.config import load_config
    from hive_ratelimit_plugin.status import build_snapshot

    state_path = str(tmp_path / "state.sqlite")
    config = {"pricing": {"claude-sonnet-4": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}},
              "state_path": state_path, "providers": {"anthropic": {"claude-sonnet-4": {"max_cost_per_day": 20}}}}
    limiter = HiveLimiter(config)
    litellm.callbacks.append(limiter)
    kw = chat_kwargs(provider, model="anthropic/claude-sonnet-4-20990101", api_base=provider.root, max_tokens=5)
    litellm.completion(**kw)
    with pytest.raises(BudgetExceededError) as info:
        litellm.completion(**kw)
    snapshot = "model:anthropic/claude-sonnet-4-20990101"
    assert info.value.scope == snapshot
    live = build_snapshot(limiter)
    assert live is not None and "model:anthropic/claude-sonnet-4" not in live["budgets"]
    shown = live["budgets"][snapshot]["max_cost_per_day"]
    assert shown["limit"] == 20 and shown["spent"] > 0
    litellm.callbacks.remove(limiter)  # (its spend is in the state file: written as each call settles)
    persisted = LedgerStatusSource(state_path, load_config(config, use_env=False)).read()["budgets"]
    assert "model:anthropic/claude-sonnet-4" not in persisted
    assert persisted[snapshot]["max_cost_per_day"]["limit"] == 20
    assert persisted[snapshot]["max_cost_per_day"]["spent"] == pytest.approx(shown["spent"])


def test_status_without_any_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--state-path", str(tmp_path / "none.sqlite")]) == 0
    assert "no state recorded" in capsys.readouterr().out
    assert not (tmp_path / "none.sqlite").exists()  # looking does not create it


def test_live_process_snapshot_is_read_by_status(provider: FakeProvider, tmp_path: Path) -> None:
    """A separate process makes real calls; ``status`` shows them; its file is gone after it exits."""
    state_path = tmp_path / "state.sqlite"
    cfg = tmp_path / "limits.yaml"
    cfg.write_text(
        "rate_limiting:\n"
        f"  state_path: {state_path}\n"
        "  global: {requests_per_minute: 60, concurrent_requests: 10}\n"
        "  providers: {openai: {gpt-4o-mini: {requests_per_minute: 50, tokens_per_minute: 40000}}}\n"
        "  budget: {max_daily_spend: 100}\n"
        "  status: {interval_seconds: 0.05}\n"
    )
    child = subprocess.Popen([sys.executable, str(Path(__file__).with_name("status_worker.py")), str(cfg),
                              provider.url, "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        deadline = time.monotonic() + 20
        while True:
            state = read_status(str(state_path))
            pids = [p["pid"] for p in state["processes"]]
            if child.pid in pids and state["scopes"].get("global", {}).get("limits", {}).get(
                    "requests_per_minute", {}).get("used") == 3:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.02)
        assert state["scopes"]["model:openai/gpt-4o-mini"]["limits"]["requests_per_minute"]["limit"] == 50
        assert state["budgets"]["global"]["max_cost_per_day"]["limit"] == 100
        assert state["totals"]["admitted_total"] == 3
        text = render_dashboard(state)
        assert "Model openai/gpt-4o-mini" in text and "3/50 RPM (6%)" in text and "3/60 RPM (5%)" in text
        assert "Budget (Today)" in text
        snapshot_file = status_dir(str(state_path)) / f"{child.pid}.json"
        assert snapshot_file.exists() and "SECRET" not in snapshot_file.read_text()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert child.returncode == 0
    assert not snapshot_file.exists()  # removed at exit
    after = read_status(str(state_path))
    assert after["source"] == "ledger" and after["processes"] == []
    assert after["spend"]["global"]["day"]["requests"] == 3


# ---------------------------------------------------------- get_usage_stats
async def test_get_usage_stats_structure_is_stable(provider: FakeProvider, clock: FakeClock) -> None:
    """Pins the documented keys and types (docs/monitoring.md); extend both together."""
    limiter = HiveLimiter({
        "global": {"requests_per_minute": 60, "concurrent_requests": 5},
        "providers": {"openai": {"gpt-4o-mini": {"tokens_per_minute": 100000}}},
        "agents": {"researcher": {"requests_per_minute": 10, "max_cost_per_day": 5.0}},
        "budget": {"max_daily_spend": 100.0},
    }, clock=clock)
    litellm.callbacks.append(limiter)
    await litellm.acompletion(**chat_kwargs(provider, metadata={"agent_id": "researcher"}))
    stats = limiter.get_usage_stats()
    top = {
        "currency": str,
        "requests_today": int, "tokens_today": int, "cost_today": float, "remaining_budget": float,
        "requests_this_hour": int, "tokens_this_hour": int, "cost_this_hour": float,
        "remaining_hourly_budget": type(None),
        "requests_this_month": int, "tokens_this_month": int, "cost_this_month": float,
        "remaining_monthly_budget": type(None),
        "budgets": dict, "spend": dict, "levels": dict, "queued": int, "admitted_total": int,
        "queued_total": int, "rejected": dict, "retried_total": int, "providers": dict, "backend": dict,
    }
    assert set(stats) == set(top)
    for key, kind in top.items():
        assert isinstance(stats[key], kind), (key, stats[key])
    assert stats["requests_today"] == 1 and stats["admitted_total"] == 1
    # A level appears once a call counted against it; the provider has no limits of its own here.
    assert set(stats["levels"]) == {"global", "model", "agent"}
    g = stats["levels"]["global"]["global"]
    assert set(g) == {"requests_per_minute", "concurrent_requests", "in_flight", "queued"}
    assert g["requests_per_minute"] == {"used": 1, "limit": 60}
    assert g["concurrent_requests"] == {"used": 0, "limit": 5}
    model = stats["levels"]["model"]["model:openai/gpt-4o-mini"]
    assert set(model) == {"tokens_per_minute", "in_flight", "queued"}
    assert set(stats["budgets"]) == {"global", "agent:researcher"}
    day = stats["budgets"]["agent:researcher"]["max_cost_per_day"]
    assert set(day) == {"window", "window_label", "spent", "reserved", "limit", "remaining", "tripped"}
    assert day["window"] == "day" and day["limit"] == 5.0 and day["tripped"] is False
    assert isinstance(day["spent"], float) and isinstance(day["window_label"], str)
    assert set(stats["spend"]) >= {"global", "agent"}
    assert set(stats["spend"]["global"]["global"]) == {"hour", "day", "month"}
    assert set(stats["spend"]["global"]["global"]["day"]) == {"cost", "requests", "tokens"}
    assert stats["providers"]["model:openai/gpt-4o-mini"] == {"circuit": "closed"}
    assert stats["backend"] == {"type": "memory"}


async def test_chunked_engine_snapshot_matches_one_pass(provider: FakeProvider, clock: FakeClock) -> None:
    """The publisher reads scopes a few at a time under the lock; the picture is the same."""
    limiter = HiveLimiter({"global": {"requests_per_minute": 60}, "agents": {"*": {"requests_per_minute": 5}}},
                          clock=clock)
    litellm.callbacks.append(limiter)
    for agent in ("a", "b", "c", "d", "e"):
        await litellm.acompletion(**chat_kwargs(provider, metadata={"agent_id": agent}))
    eng = limiter._engine
    assert eng.snapshot(2) == eng.snapshot() and len(eng.snapshot(2)) == 7


def test_other_sources_are_asked_first(tmp_path: Path) -> None:
    """A shared backend plugs in as a StatusSource; with no process there, the files are read."""
    class Shared:
        def __init__(self, state: dict[str, Any]) -> None:
            self.state = state

        def read(self) -> dict[str, Any]:
            return self.state

    running = dict(KNOWN_STATE, source="redis")
    assert read_status(str(tmp_path / "s.sqlite"), sources=[Shared(running)])["source"] == "redis"
    idle = merge_snapshots([], now=0.0)
    assert read_status(str(tmp_path / "s.sqlite"), sources=[Shared(idle)])["source"] == "none"


def test_publishing_problems_never_reach_the_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A snapshot that fails to build, or a directory that cannot be written, is only logged (DEBUG)."""
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "status").write_text("a file where the status directory should be")
    broken = HiveLimiter({"state_path": str(tmp_path / "blocked" / "state.sqlite"),
                          "global": {"requests_per_minute": 5}})
    failing = HiveLimiter({"state_path": str(tmp_path / "ok" / "state.sqlite")})
    litellm.callbacks.extend([broken, failing])

    def boom(chunk: int = 0) -> dict[str, Any]:
        raise RuntimeError("snapshot exploded")

    monkeypatch.setattr(failing, "_usage_stats", boom)
    caplog.set_level(logging.DEBUG, logger="hive_ratelimit_plugin")
    PUBLISHER.publish_once()  # does not raise
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "snapshot exploded" in messages and "could not write status snapshot" in messages
    assert not (status_dir(str(tmp_path / "ok" / "state.sqlite")) / f"{os.getpid()}.json").exists()


# ---------------------------------------------------------------------- Redis
async def test_processes_sharing_redis_publish_there_and_are_not_double_counted(
        provider: FakeProvider, tmp_path: Path, redis_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    """With the Redis backend each process publishes its snapshot to Redis (any host can read it);
    the counters are shared, so two processes' reports are merged, not added."""
    from hive_ratelimit_plugin.status import RedisStatusSource

    from .conftest import REDIS_URL, redis_client

    config = {"backend": REDIS_URL, "redis": {"key_prefix": redis_prefix}, "state_path": str(tmp_path / "s.sqlite"),
              "global": {"requests_per_minute": 60}}
    limiter = HiveLimiter(config)
    litellm.callbacks.append(limiter)
    for _ in range(2):
        await litellm.acompletion(**chat_kwargs(provider))
    PUBLISHER.publish_once()
    client: Any = redis_client()
    [key] = list(client.scan_iter(match="{" + redis_prefix + "}:status:*"))
    assert 0 < client.ttl(key) <= 30
    doc = json.loads(client.get(key))
    doc["pid"] += 1  # the same counters, as a second process sharing them would report
    client.set(key.decode().rsplit(":", 1)[0] + f":{doc['pid']}", json.dumps(doc), ex=30)
    state = RedisStatusSource(REDIS_URL, redis_prefix).read()
    assert state["source"] == "redis" and len(state["processes"]) == 2
    assert {p["backend"] for p in state["processes"]} == {"redis"}
    assert state["scopes"]["global"]["limits"]["requests_per_minute"] == {"used": 2.0, "limit": 60.0}
    cfg_file = tmp_path / "limits.yaml"
    cfg_file.write_text(json.dumps({"rate_limiting": config}))  # JSON is YAML
    assert main(["status", "--json", "--config", str(cfg_file)]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "redis"


async def test_a_process_that_exits_leaves_the_redis_dashboard_at_once(
        provider: FakeProvider, tmp_path: Path, redis_prefix: str) -> None:
    """At exit the publisher removes this process' snapshot from Redis too, as it removes its
    files: it was listed as running for up to 10 s after it had gone (helper-58)."""
    from hive_ratelimit_plugin.status import StatusPublisher

    from .conftest import REDIS_URL, redis_client

    limiter = HiveLimiter({"backend": REDIS_URL, "redis": {"key_prefix": redis_prefix},
                           "state_path": str(tmp_path / "s.sqlite"), "global": {"requests_per_minute": 60},
                           "status": {"enabled": False}})  # (not registered with the process' publisher...)
    limiter.config.status.enabled = True  # (... but with this test's own, below)
    litellm.callbacks.append(limiter)
    await litellm.acompletion(**chat_kwargs(provider))
    publisher = StatusPublisher()
    publisher.register(limiter, tmp_path / "status", 3600.0)
    publisher.publish_once()
    client: Any = redis_client()
    assert len(list(client.scan_iter(match="{" + redis_prefix + "}:status:*"))) == 1
    assert list((tmp_path / "status").glob("*.json"))
    publisher.stop()  # what runs at exit
    assert list(client.scan_iter(match="{" + redis_prefix + "}:status:*")) == []
    assert not list((tmp_path / "status").glob("*.json"))


def test_small_amounts_of_money_keep_their_digits() -> None:
    """A $0.0005 budget reads as such, not as $0.00 (in warnings, errors and the dashboard)."""
    from hive_ratelimit_plugin._budget import money_text

    cases = {0: "0.00", 1234.5: "1,234.50", 0.01: "0.01", 0.0099: "0.0099", 0.0005: "0.00050",
             0.00002: "0.000020", -0.0004: "-0.00040"}
    assert {x: money_text(x) for x in cases} == cases
    state = {"source": "processes", "generated_at": 0.0, "processes": [{"pid": 1}],
             "budgets": {"global": {"max_cost_per_day": {"window": "day", "spent": 0.0003, "limit": 0.0005}}}}
    assert "$0.00030/$0.00050 (60%)" in render_dashboard(state)


def test_count_or_interval_without_watch_watches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``status --count 3`` or ``--interval 5`` without ``--watch`` printed one frame: the flag was
    silently ignored. Either one now watches (as ``--watch`` with it would); Ctrl-C ends a watch
    with status 0, as before."""
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C, ending a watch of no --count

    monkeypatch.setattr(time, "sleep", nap)
    state = ["--state-path", str(tmp_path / "state.sqlite")]
    assert main(["status", "--count", "2", *state]) == 0
    assert capsys.readouterr().out.count("Rate Limit Status") == 2
    assert naps == [1.0]  # (the default interval)
    assert main(["status", "--interval", "5", "--json", *state]) == 0
    out = capsys.readouterr().out
    assert naps == [1.0, 5.0, 5.0]
    lines = out.splitlines()
    assert len(lines) == 2 and all(json.loads(line)["source"] == "none" for line in lines)  # one per line
    # An interval below 0.1 s is 0.1 s, as watch(1) does: 0 redrew in a busy loop
    assert main(["status", "--interval", "0", "--count", "2", *state]) == 0
    assert naps[3:] == [0.1]


def test_ctrl_c_during_a_single_status_is_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C before a one-off ``status`` had printed anything exited 0, as if it had; 130 as every
    other command (a watch still ends with 0 on Ctrl-C: that is how it is stopped)."""
    from hive_ratelimit_plugin import status

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(status, "read_status", interrupted)
    assert main(["status", "--state-path", str(tmp_path / "state.sqlite")]) == 130
    assert capsys.readouterr() == ("", "interrupted\n")
    assert main(["status", "--watch", "--state-path", str(tmp_path / "state.sqlite")]) == 0


def test_huge_limits_and_budgets_are_drawn_compactly() -> None:
    """A budget of ``1e300`` (meaning "no limit") was drawn as 400 digits with thousands
    separators, and a limit of 1e300 as 292 digits and a G; the box grew as wide. Amounts from
    1e15 on (no cents left in a float) are written in scientific notation, every digit kept;
    smaller ones as before."""
    from hive_ratelimit_plugin._budget import money_text

    cases = {1e300: "1e+300", -1e300: "-1e+300", 1e15: "1e+15", 1.5e20: "1.5e+20",
             1.2345678901234566e17: "1.2345678901234566e+17", 999_999_999_999.99: "999,999,999,999.99",
             12_345_678.5: "12,345,678.50", float("inf"): "inf"}
    assert {x: money_text(x) for x in cases} == cases
    assert float(money_text(1.2345678901234566e17)) == 1.2345678901234566e17  # (no digit lost)
    state = {"source": "processes", "generated_at": 0.0, "processes": [{"pid": 1}],
             "scopes": {"global": {"level": "global", "limits": {
                 "requests_per_minute": {"used": 3, "limit": 1e300}}}},
             "budgets": {"global": {"max_cost_per_day": {"window": "day", "spent": 1.25, "limit": 1e300}}}}
    text = render_dashboard(state)
    assert "3/1e+300 RPM (<1%)" in text
    assert "$1.25/$1e+300 (<1%)" in text
    assert max(len(line) for line in text.splitlines()) < 80
