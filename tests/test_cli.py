"""The ``hive-ratelimit`` command: the README's demo and ``check-config``."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.cli import main


def test_demo_runs_offline_and_shows_queueing_by_priority(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's first command: simulated agents against the built-in fake provider. It prints
    what was sent after how long, what timed out, the provider's view and live usage per level;
    high priority goes first, nothing gets a 429, concurrency stays within its limit of 3."""
    assert main(["demo", "--calls", "3"]) == 0
    out = capsys.readouterr().out
    sent = re.findall(r"t=\s*([\d.]+)s\s+(\S+)\s+\((\w+)\s*\) call \d: sent after waiting ([\d.]+)s", out)
    assert {agent for _, agent, _, _ in sent} >= {"researcher", "writer"}
    first = {agent: min(float(t) for t, a, _, _ in sent if a == agent) for _, agent, _, _ in sent}
    assert first["researcher"] < first["writer"]
    assert all(float(t) < first["writer"] for t, a, _, _ in sent if a == "researcher")
    # The first high-priority call is not held: the demo's timings are queue waits, not start-up.
    assert min(float(w) for _, a, _, w in sent if a == "researcher") < 0.5
    m = re.search(r"provider received (\d+) requests, (\d+) answered 429; at most (\d+) at once", out)
    assert m is not None, out
    assert int(m.group(1)) == len(sent) and int(m.group(2)) == 0 and 1 <= int(m.group(3)) <= 3
    assert "live usage per level:" in out and "concurrent_requests 0/3" in out
    assert "sk-demo" not in out
    assert not any(isinstance(cb, HiveLimiter) for cb in litellm.callbacks)  # it cleans up after itself


def test_the_demo_keeps_its_own_limits_whatever_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A user's HIVE_RATELIMIT_* variables (even a misspelt one, an error for their own limiter)
    neither break the demo nor change its limits."""
    monkeypatch.setenv("HIVE_RATELIMIT_GLOBL__REQUESTS_PER_MINUTE", "1")
    monkeypatch.setenv("HIVE_RATELIMIT_GLOBAL__CONCURRENT_REQUESTS", "1")
    assert main(["demo", "--calls", "1"]) == 0
    assert "concurrent_requests 0/3" in capsys.readouterr().out


def test_a_state_file_that_is_not_one_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A YAML file given as the state file (mixed up with --config), or a directory as state_path:
    one line naming the path and the key, exit 1, no traceback; a limiter raises ConfigError."""
    from hive_ratelimit_plugin.errors import ConfigError

    yaml_file = tmp_path / "limits.yaml"
    yaml_file.write_text("rate_limiting:\n  budget: {max_daily_spend: 5}\n")
    for argv in (["audit", "--state-path", str(yaml_file)], ["status", "--state-path", str(yaml_file)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: rate_limiting.state_path: cannot use") and str(yaml_file) in err
        assert "Traceback" not in err
    with pytest.raises(ConfigError, match="state_path: cannot use"):
        HiveLimiter({"budget": {"max_daily_spend": 5}, "state_path": str(yaml_file)})
    with pytest.raises(ConfigError, match="is a directory"):
        HiveLimiter({"budget": {"max_daily_spend": 5}, "state_path": str(tmp_path)})


def test_check_config_prints_the_effective_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("rate_limiting:\n  global:\n    requests_per_minute: 60\n"
                    "  providers:\n    openai:\n      gpt-4:\n        tokens_per_minute: 40000\n")
    assert main(["check-config", str(path), "--no-env"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# effective configuration of {path}")
    assert "requests_per_minute: 60" in out and "tokens_per_minute: 40000" in out
    assert "max_wait_seconds: 60.0" in out  # defaults are shown too


def test_check_config_warns_of_a_provider_litellm_does_not_know(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A misspelt provider is a block no call counts against: ``check-config`` (which the
    troubleshooting guide sends users to when nothing is limited) says so, as the limiter does."""
    path = tmp_path / "limits.yaml"
    path.write_text("rate_limiting:\n  providers:\n    opnai:\n      requests_per_minute: 5\n")
    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    assert main(["check-config", str(path), "--no-env"]) == 0
    assert any("opnai" in r.getMessage() and "did you mean 'openai'" in r.getMessage() for r in caplog.records)


def test_check_config_names_the_environment_variables_that_override_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("rate_limiting:\n  global:\n    requests_per_minute: 60\n")
    monkeypatch.setenv("HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE", "7")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# effective configuration of {path} (overridden by the environment: "
                          "HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE)\n")
    assert "requests_per_minute: 7" in out


def test_check_config_lists_every_error_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rate_limiting:\n  global:\n    requests_per_minute: -5\n    tokens_per_mnute: 100\n"
                    "  providers:\n    openai:\n      gpt-4:\n        concurrent_requests: many\n")
    assert main(["check-config", str(path), "--no-env"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert "rate_limiting.global.requests_per_minute: -5 is not allowed" in err
    assert "rate_limiting.global.tokens_per_mnute: unknown key" in err
    assert "rate_limiting.providers.openai.gpt-4.concurrent_requests: 'many' is not allowed" in err


def test_check_config_reports_a_yaml_syntax_error_with_its_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("rate_limiting:\n  global:\n    requests_per_minute: 5\n  queue: [1,\n")
    assert main(["check-config", str(path)]) == 1
    assert re.search(r"YAML syntax error at line \d+", capsys.readouterr().err)


@pytest.mark.parametrize("argv", [["demo", "--calls", "-1"], ["demo", "--calls", "0"], ["audit", "--limit", "0"],
                                  ["status", "--interval", "-1"], ["status", "--max-age", "inf"],
                                  ["status", "--watch", "--interval", "1e300"]])
def test_nonsense_numbers_on_the_command_line_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``demo --calls -1`` ran a demo of no calls; numbers that mean nothing are usage errors."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "must be" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


def test_output_piped_into_a_reader_that_stops_is_not_a_traceback(tmp_path: Path) -> None:
    """``hive-ratelimit check-config big.yaml | head``: the reader goes away, the next write fails
    with EPIPE. That was a BrokenPipeError traceback (and "Exception ignored" at exit); it is now
    silent, with the exit status of a program killed by SIGPIPE."""
    path = tmp_path / "big.yaml"
    path.write_text("rate_limiting:\n  users:\n" + "".join(f"    u{i}: {{requests_per_minute: 5}}\n"
                                                           for i in range(5000)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONUNBUFFERED", None)  # (unbuffered, Python drops the rest of a partial write silently)
    child = subprocess.Popen([sys.executable, "-m", "hive_ratelimit_plugin.cli", "check-config", str(path),
                              "--no-env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.readline().startswith(b"# effective configuration")
    child.stdout.close()  # (the output is far more than a pipe holds: the writer is still writing)
    err = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_ctrl_c_is_a_short_message_and_status_130(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C during a long simulation (or LiteLLM's import by check-config, or the demo) printed a
    KeyboardInterrupt traceback."""
    from hive_ratelimit_plugin import simulate

    def interrupted(args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(simulate, "simulate_from_args", interrupted)
    try:
        code = main(["simulate", "--config", "x.yaml", "--rate", "1", "--duration", "60"])
    except KeyboardInterrupt:  # (not raised on: it would end the test session)
        pytest.fail("KeyboardInterrupt escaped main()")
    assert code == 130
    assert capsys.readouterr().err == "interrupted\n"


def _schema_tables(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master"))
    finally:
        conn.close()


def test_audit_and_status_only_read_the_state_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``audit`` and ``status`` opened the state file as a limiter does: an empty file became an
    SQLite database, another program's database got the ledger's tables (and WAL mode), and a
    file of a newer schema ended in an ``sqlite3.OperationalError`` traceback. They now write
    nothing and say what is wrong in one line."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (x TEXT)")
    conn.commit()
    conn.close()
    for path in (empty, other):
        before = path.read_bytes()
        for argv in (["audit", "--state-path", str(path)], ["status", "--state-path", str(path)]):
            assert main(argv) == 1
            err = capsys.readouterr().err
            assert err.startswith(f"error: rate_limiting.state_path: cannot use {str(path)!r}")
            assert "not a hive-ratelimit state file" in err
        assert path.read_bytes() == before
        assert sorted(os.listdir(tmp_path)) == ["empty.yaml", "other.sqlite"]
    # A state file whose audit table a later version changed: one line, no traceback.
    newer = tmp_path / "newer.sqlite"
    from hive_ratelimit_plugin._ledger import _SCHEMA

    conn = sqlite3.connect(newer)
    conn.executescript(_SCHEMA.replace("action TEXT NOT NULL, scope TEXT, old TEXT, new TEXT",
                                       "verb TEXT NOT NULL, target TEXT, diff TEXT")
                       .replace("cost REAL NOT NULL", "cost_micros INTEGER NOT NULL"))
    conn.close()
    for argv in (["audit", "--state-path", str(newer)], ["status", "--state-path", str(newer)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: rate_limiting.state_path: cannot use") and "no such column" in err
        assert "another version of hive-ratelimit" in err
    # A real state file, read while a limiter has it open, is read (and left as it was).
    from hive_ratelimit_plugin._ledger import Ledger

    live = tmp_path / "live" / "state.sqlite"
    ledger = Ledger(live)
    ledger.audit("set", "global", None, {"max_daily_spend": 5})
    try:
        assert main(["audit", "--state-path", str(live)]) == 0
        assert "set    global" in capsys.readouterr().out
    finally:
        ledger.close()
    assert main(["audit", "--state-path", str(live)]) == 0
    assert os.listdir(live.parent) == ["state.sqlite"]  # (no -wal or -shm left behind)


def _cli_without_privileges(argv: list[str]) -> tuple[int, str]:
    """``hive-ratelimit argv`` in a subprocess that cannot write what it may not (root runs it
    without its capabilities, CAP_DAC_OVERRIDE among them: ``setpriv``, from util-linux)."""
    cmd = [sys.executable, "-m", "hive_ratelimit_plugin.cli", *argv]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("running as root, this test needs setpriv (util-linux) to drop root's capabilities")
        cmd = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, done.stdout + done.stderr


def test_a_state_file_this_user_cannot_write_is_read(tmp_path: Path) -> None:
    """The limiter's state file, read by an operator who may not write it (another user's, a
    read-only mount): ``audit`` and ``status`` failed with "attempt to write a readonly
    database"."""
    from hive_ratelimit_plugin._budget import SpendRow
    from hive_ratelimit_plugin._ledger import Ledger

    path = tmp_path / "ro" / "state.sqlite"
    ledger = Ledger(path)
    ledger.audit("set", "global", None, {"max_daily_spend": 5})
    ledger.record([SpendRow(time.time(), "c1", "openai", "gpt-4o-mini", "bob", None, None, None,
                            1, 100, 50, 0.25)])
    ledger.close()
    path.chmod(0o444)
    path.parent.chmod(0o555)
    try:
        code, out = _cli_without_privileges(["audit", "--state-path", str(path)])
        assert code == 0 and "set    global" in out, out
        code, out = _cli_without_privileges(["status", "--state-path", str(path), "--all"])
        assert code == 0 and "Spend (Today) · agent bob: $0.25" in out, out
        assert sorted(p.name for p in path.parent.iterdir()) == ["state.sqlite"]  # (nothing written)
    finally:
        path.parent.chmod(0o755)
        path.chmod(0o644)


def test_a_huge_file_or_a_device_is_not_read_to_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``check-config /dev/zero`` (or a log file named by mistake) read until memory ran out:
    a MemoryError traceback, or the machine swapping. At most ``MAX_FILE_BYTES`` are read."""
    from hive_ratelimit_plugin import config

    monkeypatch.setattr(config, "MAX_FILE_BYTES", 2**20)
    path = tmp_path / "big.yaml"
    path.write_text("rate_limiting:\n  global: {requests_per_minute: 60}\n" + "# padding\n" * 110_000)
    assert main(["check-config", str(path), "--no-env"]) == 1
    assert capsys.readouterr().err == f"error: {path}: larger than 1 MiB; not a configuration file\n"
    monkeypatch.undo()
    if os.path.exists("/dev/zero"):
        assert main(["check-config", "/dev/zero", "--no-env"]) == 1
        assert "/dev/zero: larger than 64 MiB; not a configuration file" in capsys.readouterr().err


def test_run_exits_126_for_a_command_it_cannot_execute_and_127_for_none(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``hive-ratelimit run -- ./script`` of a script without its execute bit exited 127, the
    status of a command not found; as env(1) and the shells, 126 is "found, but cannot be
    executed" (not executable, a directory), 127 "not found". (Root too gets EACCES for a file
    with no execute bit at all.)"""
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    for command, code, reason in ((str(script), 126, "Permission denied"), (str(tmp_path), 126, "Permission denied"),
                                  (str(tmp_path / "missing"), 127, "No such file or directory")):
        assert main(["run", "--", command]) == code, command
        assert capsys.readouterr().err == f"error: cannot run {command!r}: {reason}\n"
        if shutil.which("env"):  # (what the convention is, on this system)
            assert subprocess.run(["env", command], capture_output=True, check=False).returncode == code


FAKE_SLOW_YAML = """\
import sys, time
sys.stderr.write("fake yaml: importing\\n")
sys.stderr.flush()
# Interrupted by the test's SIGINT (short sleeps: Python acts on a signal between them, so one
# that lands before the first sleep starts is not left waiting for a long sleep to end).
for _ in range(12_000):
    time.sleep(0.05)
"""


@pytest.mark.parametrize("entry", ["-m", "console-script"])
def test_ctrl_c_while_the_command_starts_is_quiet_and_130(tmp_path: Path, entry: str) -> None:
    """Ctrl-C in the first ~150 ms (while the command imports PyYAML and pydantic) printed a
    KeyboardInterrupt traceback and the process died of SIGINT; later it was "interrupted" and
    130. Those imports now happen where ``main`` catches it. Here a stand-in for ``yaml`` (first on
    PYTHONPATH) makes that import slow: the test waits until it has started, then sends SIGINT."""
    import signal

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "yaml.py").write_text(FAKE_SLOW_YAML)
    cfg = tmp_path / "limits.yaml"
    cfg.write_text("rate_limiting: {}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("HIVE_RATELIMIT_ENABLED", None)
    start = (["-m", "hive_ratelimit_plugin.cli"] if entry == "-m" else
             ["-c", "import sys; from hive_ratelimit_plugin.cli import main; sys.exit(main())"])  # (as pip's script)
    # Ctrl-C as at a terminal: the child does not inherit an ignored SIGINT. (A test run started
    # in the background by a shell without job control, `pytest &` in a script, ignores SIGINT,
    # and so would the child, which then slept on: the test hung for its 60 s.)
    child = subprocess.Popen([sys.executable, *start, "check-config", str(cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert child.stderr is not None
        first = child.stderr.readline().decode()
        assert first == "fake yaml: importing\n", first + child.stderr.read().decode()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, err.decode()
    assert err.decode() == "interrupted\n" and out == b""
