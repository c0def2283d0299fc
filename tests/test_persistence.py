"""Spend survives restarts and SIGKILL, is shared by processes on one host, and changes are audited."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.cli import main as cli_main
from hive_ratelimit_plugin.errors import BudgetExceededError
from hive_ratelimit_plugin.plugin import unregister
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs

WORKER = Path(__file__).with_name("spend_worker.py")
UNIT_PRICE = {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}


def limiter_for(path: Path, clock: FakeClock, **extra: Any) -> HiveLimiter:
    cfg = {"state_path": str(path), "pricing": UNIT_PRICE, "budget": {"max_daily_spend": 1000}, **extra}
    lim = HiveLimiter(cfg, clock=clock)
    litellm.callbacks.append(lim)
    return lim


def ledger_total(path: Path) -> tuple[int, float]:
    with sqlite3.connect(path) as conn:
        n, total = conn.execute("SELECT COUNT(*), COALESCE(SUM(cost), 0) FROM spend").fetchone()
    return int(n), float(total)


def test_restart_keeps_spend_and_budget(provider: FakeProvider, clock: FakeClock, tmp_path: Path) -> None:
    """A new limiter on the same state file starts from the settled spend, and enforces it."""
    path = tmp_path / "state.sqlite"
    first = limiter_for(path, clock)
    for _ in range(3):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert first.get_usage_stats()["cost_today"] == 24
    unregister(first)
    second = limiter_for(path, clock, budget={"max_daily_spend": 30})
    stats = second.get_usage_stats()
    assert stats["cost_today"] == 24 and stats["requests_today"] == 3
    with pytest.raises(BudgetExceededError):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 24 + 14 > 30
    assert provider.state.count() == 3


def test_a_first_budget_set_at_run_time_keeps_the_spend_counted_before_it(provider: FakeProvider,
                                                                           clock: FakeClock) -> None:
    """A limiter with no budget and no state file counts spend in memory only. Its first
    ``set_budget()`` opens the (default) state file and reads the spend another process settled
    there: that spend is added to what this process counted, not put in its place. Was: the
    file's totals replaced this process's own, and the budget started low (16 instead of 24)."""
    default = Path(os.environ["XDG_STATE_HOME"]) / "hive-ratelimit" / "state.sqlite"
    other = HiveLimiter({"pricing": UNIT_PRICE, "budget": {"max_daily_spend": 1000}}, clock=clock)
    litellm.callbacks.append(other)
    for _ in range(2):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))
    unregister(other)
    assert ledger_total(default) == (2, 16)
    late = HiveLimiter({"pricing": UNIT_PRICE}, clock=clock)  # no budget, no state file
    litellm.callbacks.append(late)
    assert late._ledger is None
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert late.get_usage_stats()["cost_today"] == 8
    late.set_budget(max_daily_spend=30)
    stats = late.get_usage_stats()
    assert stats["cost_today"] == 24 and stats["requests_today"] == 3
    with pytest.raises(BudgetExceededError):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 24 + 14 > 30
    assert provider.state.count() == 3


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_new_state_file_is_readable_by_its_owner_only(provider: FakeProvider, clock: FakeClock,
                                                        tmp_path: Path) -> None:
    """The state file holds every id's spend and the audit trail (OS users, hosts): created 0600,
    its WAL too (it was 0644 under the usual umask); a file that exists keeps its permissions."""
    path = tmp_path / "state.sqlite"
    lim = limiter_for(path, clock)
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert lim.get_usage_stats()["cost_today"] == 8
    for f in (path, tmp_path / "state.sqlite-wal"):
        assert f.stat().st_mode & 0o777 == 0o600, (f, oct(f.stat().st_mode))
    unregister(lim)
    shared = tmp_path / "shared.sqlite"
    shared.touch()
    shared.chmod(0o664)  # (shared by a group on purpose)
    unregister(limiter_for(shared, clock))
    assert shared.stat().st_mode & 0o777 == 0o664


def test_sigkill_mid_run_loses_no_settled_cent(tmp_path: Path) -> None:
    """A process killed with SIGKILL mid-run: every call it reported settled is in the state file."""
    path = tmp_path / "state.sqlite"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(path), "1000", "victim"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert proc.stdout is not None
    last = 0.0
    settled = 0
    for line in proc.stdout:
        if line.startswith("settled"):
            _, n, total = line.split()
            settled, last = int(n), float(total)
            if settled >= 25:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    rows, total = ledger_total(path)
    assert rows >= settled and total >= last  # nothing reported as settled was lost
    assert total == 8 * rows
    reopened = HiveLimiter({"state_path": str(path), "pricing": UNIT_PRICE,
                            "budget": {"max_monthly_spend": 1_000_000}})
    assert reopened.get_usage_stats()["cost_this_month"] == total


def test_processes_share_one_state_file(provider: FakeProvider, clock: FakeClock, tmp_path: Path) -> None:
    """Two processes writing the same file at once: no lost row, and a third process sees their spend."""
    path = tmp_path / "state.sqlite"
    watcher = limiter_for(path, clock)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(path), "30", f"w{i}"], stdout=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    assert ledger_total(path) == (60, 480.0)
    clock.advance(2)  # the watcher tails the shared file about once a second
    stats = watcher.get_usage_stats()
    assert stats["cost_today"] == 480 and stats["requests_today"] == 60
    assert stats["spend"]["agent"]["agent:w0"]["day"]["cost"] == 240


def test_budget_changes_are_audited(clock: FakeClock, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """set_budget, reset_budget and reload are recorded with who, where, old and new values."""
    path = tmp_path / "state.sqlite"
    lim = limiter_for(path, clock)
    lim.set_budget(max_daily_spend=50, agent_id="bot")
    lim.reset_budget(agent_id="bot")
    lim.reload({"state_path": str(path), "pricing": UNIT_PRICE, "budget": {"max_daily_spend": 500}})
    rows = lim.audit_log()
    assert [r["action"] for r in rows] == ["set", "reset", "reload"]
    assert rows[0]["scope"] == "agent:bot"
    assert json.loads(rows[0]["new"]) == {"agents.bot.max_cost_per_day": 50}
    assert json.loads(rows[0]["old"]) == {"agents.bot.max_cost_per_day": None}
    assert json.loads(rows[2]["old"])["budget.max_daily_spend"] == 1000
    assert rows[0]["pid"] == os.getpid() and rows[0]["host"] and rows[0]["user"]
    assert cli_main(["audit", "--state-path", str(path)]) == 0
    out = capsys.readouterr().out
    assert "set    agent:bot" in out and "reload" in out


def test_memory_state_path_writes_no_file(provider: FakeProvider, clock: FakeClock, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """state_path ':memory:' keeps budgets in memory only."""
    monkeypatch.chdir(tmp_path)
    lim = HiveLimiter({"state_path": ":memory:", "budget": {"max_daily_spend": 10}}, clock=clock)
    litellm.callbacks.append(lim)
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert list(tmp_path.iterdir()) == []
    # No ledger anywhere: only the live status snapshots (a separate feature, written by a
    # background thread whenever its tick comes) may appear in the state directory.
    state_dir = Path(os.environ["XDG_STATE_HOME"]) / "hive-ratelimit"
    assert not state_dir.exists() or [p.name for p in state_dir.iterdir()] == ["status"]


def test_default_state_file_location(provider: FakeProvider, clock: FakeClock) -> None:
    """Without state_path, budgets persist under $XDG_STATE_HOME/hive-ratelimit/."""
    lim = HiveLimiter({"budget": {"max_daily_spend": 10}}, clock=clock)
    litellm.callbacks.append(lim)
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert (Path(os.environ["XDG_STATE_HOME"]) / "hive-ratelimit" / "state.sqlite").exists()


def test_unwritable_ledger_is_logged_not_fatal(provider: FakeProvider, clock: FakeClock, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """If the state file cannot be written, calls go on, spend is still counted, and it is logged."""
    lim = limiter_for(tmp_path / "state.sqlite", clock)
    assert lim._ledger is not None
    lim._ledger.close()  # every write now fails
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert lim.get_usage_stats()["cost_today"] == 8
    assert any("could not write settled calls" in r.getMessage() for r in caplog.records)


def test_a_state_file_that_turns_read_only_keeps_the_rows_for_the_next_write(
        provider: FakeProvider, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A write refused for the file as a whole ("attempt to write a readonly database": a
    remount, permissions changed; "disk I/O error") keeps the settled calls in memory and writes
    them once the file takes writes again, as after a lock. Was: they were dropped while the log
    line said they were kept (with a count of 0)."""
    path = tmp_path / "state.sqlite"
    lim = limiter_for(path, clock)
    assert lim._ledger is not None
    lim._ledger._conn.execute("PRAGMA query_only = ON")  # every write now fails: SQLITE_READONLY
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert lim.get_usage_stats()["cost_today"] == 8
    assert ledger_total(path) == (0, 0)
    logged = [r.getMessage() for r in caplog.records if "could not write settled calls" in r.getMessage()]
    assert logged and "readonly" in logged[0] and "1 kept in memory" in logged[0], logged
    lim._ledger._conn.execute("PRAGMA query_only = OFF")
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert ledger_total(path) == (2, 16)
    assert lim._ledger.unsaved == 0


def test_a_locked_state_file_delays_the_record_but_loses_nothing(provider: FakeProvider, clock: FakeClock,
                                                                  tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Another process holding the state file's write lock: settlements do not wait for it (they
    waited 10 s each, on the agent's call) and do not drop their rows (they were logged and lost
    to every other process and to the next start): the rows are kept and written, each once,
    by the next settlement after the lock is gone, or at exit."""
    import weakref

    from hive_ratelimit_plugin.plugin import _settle_at_exit

    path = tmp_path / "state.sqlite"
    lim = limiter_for(path, clock)
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    for _ in range(3):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert lim._ledger is not None and lim._ledger.unsaved == 3
    assert any("kept in memory to be written" in r.getMessage() for r in caplog.records)
    locker.execute("COMMIT")
    assert ledger_total(path) == (1, 8)
    litellm.completion(**chat_kwargs(provider, max_tokens=5))  # writes the three with its own
    assert ledger_total(path) == (5, 40) and lim._ledger.unsaved == 0
    locker.execute("BEGIN EXCLUSIVE")
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    locker.execute("COMMIT")
    _settle_at_exit(weakref.ref(lim))
    assert ledger_total(path) == (6, 48)
    locker.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_left_unread_at_exit_is_recorded(mode: str, provider: FakeProvider, tmp_path: Path) -> None:
    """A short-lived process (a cron agent) that stops reading a stream and exits: the provider bills
    the call, so its worst case (9 + max_tokens 50 = 59) reaches the state file at exit, not nothing."""
    path = tmp_path / "state.sqlite"
    script = f"""
import asyncio, os, sys
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import litellm
from hive_ratelimit_plugin import HiveLimiter
litellm.callbacks.append(HiveLimiter({{"state_path": {str(path)!r}, "pricing": {UNIT_PRICE!r},
                                       "budget": {{"max_daily_spend": 1000}}}}))
kw = dict(model="openai/gpt-4o-mini", api_base={provider.url!r}, api_key="sk-x", max_tokens=50, stream=True,
          messages=[{{"role": "user", "content": "hello there"}}], max_retries=0)
if {mode!r} == "sync":
    for i, _ in enumerate(litellm.completion(**kw)):
        if i == 2:
            break  # found what it needed
else:
    async def main():
        stream = await litellm.acompletion(**kw)
        async for i, _ in _enum(stream):
            if i == 2:
                break
    async def _enum(stream):
        i = 0
        async for chunk in stream:
            yield i, chunk
            i += 1
    asyncio.run(main())
print("done", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True"))
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]
    assert provider.state.count() == 1
    assert ledger_total(path) == (1, 59.0)


def test_a_row_of_odd_types_is_written_and_blocks_nothing(provider: FakeProvider, clock: FakeClock,
                                                          tmp_path: Path) -> None:
    """A call id given as a UUID object (SQLite cannot bind it) once failed its row and, kept for
    the next write, every later write with it: nothing more reached the file."""
    import uuid

    path = tmp_path / "state.sqlite"
    lim = limiter_for(path, clock)
    litellm.completion(**chat_kwargs(provider, max_tokens=5, litellm_call_id=uuid.uuid4()))
    for _ in range(3):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert ledger_total(path) == (4, 32)
    assert lim._ledger is not None and lim._ledger.unsaved == 0


def test_a_ledger_dropped_with_unsaved_rows_still_writes_them(tmp_path: Path) -> None:
    """Rows kept while the state file was locked are written by the next settlement or at exit;
    a limiter replaced and collected before either (its exit hook holds it weakly) lost them: its
    ledger now writes them when collected."""
    import gc

    from hive_ratelimit_plugin._budget import SpendRow
    from hive_ratelimit_plugin._ledger import Ledger

    path = tmp_path / "state.sqlite"
    ledger = Ledger(path)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError):
        ledger.record([SpendRow(1.0, "c1", "openai", "gpt-4o-mini", None, None, None, None, 1, 3, 5, 8.0)])
    assert ledger.unsaved == 1
    locker.execute("COMMIT")
    locker.close()
    del ledger
    gc.collect()
    assert ledger_total(path) == (1, 8)
