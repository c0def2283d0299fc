"""The ``hive-ratelimit`` command: the README's demo and ``check-config``."""

from __future__ import annotations

import logging
import re
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
                                  ["status", "--interval", "-1"], ["status", "--max-age", "inf"]])
def test_nonsense_numbers_on_the_command_line_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``demo --calls -1`` ran a demo of no calls; numbers that mean nothing are usage errors."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "must be" in capsys.readouterr().err
