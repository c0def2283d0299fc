"""``hive-ratelimit simulate``: the real engine on a virtual clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.cli import main
from hive_ratelimit_plugin.config import load_config
from hive_ratelimit_plugin.simulate import (
    ProviderModel,
    SimulationError,
    VirtualClock,
    Workload,
    build_engine,
    parse_duration,
    parse_rate,
    simulate,
)


def _strip(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("real_seconds",)}


def test_same_seed_same_result_other_seed_other_result() -> None:
    cfg = {"global": {"requests_per_minute": 100, "tokens_per_minute": 60000},
           "agents": {"*": {"requests_per_minute": 30}}}
    work = dict(rate=3.0, duration=300.0, agents=["a", "b", "c", "d"])
    one = simulate(cfg, Workload(**work, seed=7), ProviderModel(requests_per_minute=90))
    two = simulate(cfg, Workload(**work, seed=7), ProviderModel(requests_per_minute=90))
    other = simulate(cfg, Workload(**work, seed=8), ProviderModel(requests_per_minute=90))
    assert _strip(one) == _strip(two)
    assert one["calls"]["offered"] != other["calls"]["offered"] or one["wait_seconds"] != other["wait_seconds"]
    assert one["calls"]["offered"] == pytest.approx(900, rel=0.15)  # Poisson at 3/s for 300 s


def test_same_seed_same_result_in_every_process() -> None:
    """A call waiting behind the lines of several scopes is counted at one of them: the same one
    in every process, whatever its string hashing (it was ``next(iter(a frozenset))``)."""
    script = (
        "import json\n"
        "from hive_ratelimit_plugin.simulate import Workload, simulate\n"
        "cfg = {'global': {'requests_per_minute': 60}, 'agents': {'researcher': {'requests_per_minute': 20}}}\n"
        "r = simulate(cfg, Workload(rate=2.0, duration=120.0, agents=['researcher', 'writer'],\n"
        "                           priorities={'researcher': 'high'}, seed=1))\n"
        "print(json.dumps({k: v for k, v in r.items() if k != 'real_seconds'}, sort_keys=True))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    reports = set()
    for hash_seed in ("1", "2", "3", "4"):
        out = subprocess.run([sys.executable, "-c", script], env={**env, "PYTHONHASHSEED": hash_seed},
                             capture_output=True, text=True, timeout=120, check=True).stdout
        reports.add(out)
    assert len(reports) == 1
    assert json.loads(reports.pop())["scopes"]["global"]["queued_by"]["queue"] > 0


def test_a_config_that_must_queue_shows_queueing() -> None:
    # 2 calls/s offered against 60 per minute: half must wait; nothing times out in 10 minutes of waiting.
    cfg = {"global": {"requests_per_minute": 60}, "queue": {"max_wait_seconds": 600}}
    r = simulate(cfg, Workload(rate=2.0, duration=120.0, arrivals="uniform", latency=0.1))
    c = r["calls"]
    assert c["offered"] == 240
    assert c["queued"] > 100
    assert c["rejected"] == 0
    assert c["admitted"] == 240  # the simulation runs on until the queue has drained
    assert r["simulated_seconds"] > 200  # 240 calls at 60 per minute take 4 minutes
    assert r["wait_seconds"]["queued_only"]["p50"] > 10
    g = r["scopes"]["global"]
    assert g["queued_by"].get("requests_per_minute", 0) >= 1
    assert g["admitted"] == 240
    # Never more than 60 admissions in a minute, as the engine enforces (60 per sliding minute): in
    # the rates_over_seconds the calls were admitted in, at most 60 in each minute it began.
    assert c["admitted"] <= 60 * (r["rates_over_seconds"] // 60 + 1)
    assert c["admitted_per_second"] == round(240 / r["rates_over_seconds"], 4)


def test_queue_timeouts_are_rejections_with_the_limit_that_held_them() -> None:
    cfg = {"global": {"requests_per_minute": 60}, "queue": {"max_wait_seconds": 5}}
    r = simulate(cfg, Workload(rate=2.0, duration=120.0, arrivals="uniform", latency=0.1))
    c = r["calls"]
    assert c["rejected_by_reason"].get("queue_timeout", 0) > 50
    assert c["admitted"] + c["rejected"] == c["offered"]
    assert r["wait_seconds"]["all_admitted"]["max"] <= 5.0 + 1e-9
    assert r["scopes"]["global"]["rejected"] == c["rejected"]


def test_budget_trip_time_is_computed_from_settled_spend(tmp_path: Path) -> None:
    # Every call costs exactly $1,000 (1,000 tokens at $1 per token); $10,000 per hour.
    # Calls arrive at t = 0, 1, 2, ...; each settles 0.5 s later. The 10th settles at t = 9.5: the
    # budget is spent then; the 11th call (t = 10) is the first refused; 80 % is reached at t = 7.5.
    cfg = {"budget": {"max_hourly_spend": 10000, "warning_thresholds": [0.8]},
           "pricing": {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}}
    work = Workload(rate=1.0, duration=60.0, arrivals="uniform", token_spread=0.0, latency=0.5,
                    input_tokens=900, output_tokens=100, max_tokens=100)
    r = simulate(cfg, work)
    (b,) = r["budgets"]
    assert (b["scope"], b["budget"], b["limit"]) == ("global", "max_cost_per_hour", 10000)
    assert b["warnings"][0]["after_seconds"] == pytest.approx(7.5)
    assert b["tripped"]["after_seconds"] == pytest.approx(9.5)
    assert b["tripped"]["at"] == "2026-01-05T09:00:09+00:00"
    assert b["first_refusal"]["after_seconds"] == pytest.approx(10.0)
    assert b["refused_calls"] == 50
    assert r["spend"]["total"] == pytest.approx(10000)
    assert r["calls"]["rejected_by_reason"] == {"budget": 50}


def test_hourly_budget_rolls_over_with_the_virtual_calendar() -> None:
    cfg = {"budget": {"max_hourly_spend": 10000},
           "pricing": {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}}
    work = Workload(rate=1 / 60, duration=3 * 3600.0, arrivals="uniform", token_spread=0.0, latency=0.5,
                    input_tokens=1900, output_tokens=100, max_tokens=100, start="2026-01-05T09:30")
    r = simulate(cfg, work)
    # $2,000 a call, one a minute: 5 calls per hour fit. 09:30-10:00 has 30 calls, 5 admitted;
    # each full hour after it admits 5 again.
    assert r["calls"]["admitted"] == 5 + 5 + 5 + 5
    assert r["spend"]["total"] == pytest.approx(40000)


def test_provider_429s_with_and_without_the_limiter() -> None:
    prov = ProviderModel(requests_per_minute=60)
    work = Workload(rate=2.0, duration=180.0, latency=0.2)
    loose = simulate({"global": {"requests_per_minute": 1000}}, work, prov)
    matched = simulate({"global": {"requests_per_minute": 60}, "queue": {"max_wait_seconds": 1000}}, work, prov)
    assert loose["provider_429s"]["without_limiter"] > 150
    assert matched["provider_429s"]["with_limiter"] == 0
    assert matched["provider_429s"]["without_limiter"] == loose["provider_429s"]["without_limiter"]
    assert matched["calls"]["rejected"] == 0
    # A configuration above the provider's limit: the plugin still learns the limit from the
    # x-ratelimit headers of the first answers and holds calls by it (as it does for real).
    assert loose["provider_429s"]["with_limiter"] == 0
    assert "learned_requests_per_minute" in loose["scopes"]["model:openai/gpt-4o-mini"]["rejected_by"]


def test_a_burst_before_any_answer_collects_a_429_that_cools_the_model() -> None:
    # 100 calls/s with 2 s per call: the 61st call is sent before any answer has told the plugin the
    # provider's limit. Its 429 (answered at once) cools the model for every caller, and is retried.
    prov = ProviderModel(requests_per_minute=60)
    r = simulate({"global": {"requests_per_minute": 100000}}, Workload(rate=100.0, duration=20.0, latency=2.0), prov)
    p = r["provider_429s"]
    assert 1 <= p["with_limiter"] <= 3
    assert p["retried"] >= 1
    assert p["without_limiter"] > 1000
    assert p["requests_sent"] == r["calls"]["admitted"] + p["with_limiter"]


def test_token_bucket_provider_in_the_simulation() -> None:
    prov = ProviderModel(requests_per_minute=60, algorithm="token_bucket")
    r = simulate({"global": {"requests_per_minute": 1000}}, Workload(rate=2.0, duration=120.0, latency=0.2), prov)
    assert r["provider"]["algorithm"] == "token_bucket"
    assert r["provider_429s"]["without_limiter"] > 50


def test_engine_is_set_up_like_the_plugins() -> None:
    cfg = load_config({"queue": {"high_priority_reserve": 0.2, "max_size": 77},
                       "circuit_breaker": {"failure_threshold": 3}, "adaptive": {"enabled": False},
                       "estimation": {"arrival_margin_seconds": 0.5, "lease_seconds": 42}})
    clock = VirtualClock()
    ours = build_engine(cfg, clock, lambda: 0.0)
    theirs = HiveLimiter(cfg, clock=clock)._engine
    for name in ("lease_seconds", "max_queue", "currency", "thresholds", "arrival_margin", "low_priority_share",
                 "circuit_threshold", "circuit_cooldown", "circuit_max_cooldown", "adaptive", "adaptive_decrease"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_high_priority_agents_go_first() -> None:
    # 4 calls/s against 60 per minute: most calls cannot be served. The high-priority agent's are
    # (a wait limit longer than the window: admissions come in bursts a window apart under overload).
    cfg = {"global": {"requests_per_minute": 60}, "queue": {"max_wait_seconds": 90}}
    work = Workload(rate=4.0, duration=300.0, agents=["vip", "bulk1", "bulk2", "bulk3", "bulk4", "bulk5", "bulk6",
                                                      "bulk7"], priorities={"vip": "high"}, latency=0.1)
    r = simulate(cfg, work)
    high, normal = r["by_priority"]["high"], r["by_priority"]["normal"]
    assert high["rejected"] == 0
    assert normal["rejected"] > 500
    assert high["wait_seconds"]["p50"] * 3 < normal["wait_seconds"]["p50"]


@pytest.mark.parametrize(("text", "per_second"), [("50", 50.0), ("50/s", 50.0), ("3000/m", 50.0),
                                                  ("3000/min", 50.0), ("180000/h", 50.0), (" 2.5 ", 2.5)])
def test_parse_rate(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize(("text", "seconds"), [("600", 600.0), ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0),
                                               ("2d", 172800.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump({"rate_limiting": {"global": {"requests_per_minute": 60}}}))
    return path


@pytest.mark.parametrize(("args", "message"), [
    (["--rate", "fast"], "--rate 'fast': expected requests per second"),
    (["--rate", "0"], "must be more than 0"),
    (["--rate", "5/fortnight"], "unknown unit"),
    (["--duration", "0"], "--duration '0': must be more than 0"),
    (["--duration", "1y"], "unknown unit"),
    (["--duration", "40d"], "at most 31 days"),
    (["--agents", "0"], "--agents must be at least 1"),
    (["--rate", "10000/s", "--duration", "1d"], "at most 5,000,000 can be simulated"),
    (["--spread", "1.5"], "--spread must be at least 0 and below 1"),
    (["--priority", "nobody=high"], "not simulated: nobody"),
    (["--priority", "agent-1"], "expected AGENT=LEVEL"),
    (["--priority", "agent-1=urgent"], "high, normal, low or an integer"),
    (["--provider-rpm", "-3"], "--provider-rpm must be more than 0"),
    (["--start", "yesterday"], "--start 'yesterday': expected an ISO time"),
    # (these three ended in a traceback: OverflowError, or ran with no model at all)
    (["--latency", "1e300"], "--latency: at most 31 days"),
    (["--start", "9999-12-31T00:00"], "--start '9999-12-31T00:00': the year must be between 1970 and 9000"),
    (["--model", ""], "--model '': give a model such as openai/gpt-4o-mini"),
])
def test_bad_arguments_give_clear_errors(config_file: Path, args: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = {"--config": str(config_file), "--rate": "2", "--duration": "60"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["simulate"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    assert "Traceback" not in err


def test_missing_and_invalid_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--config", str(tmp_path / "nope.yaml"), "--rate", "1", "--duration", "60"]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("rate_limiting:\n  global:\n    requests_per_minute: -5\n")
    assert main(["simulate", "--config", str(bad), "--rate", "1", "--duration", "60"]) == 2
    err = capsys.readouterr().err
    assert "rate_limiting.global.requests_per_minute" in err


def test_cli_text_and_json(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--config", str(config_file), "--rate", "120/m", "--duration", "2m", "--agents", "3",
            "--provider-rpm", "60"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "calls offered" in text and "queue wait" in text and "provider 429s: 0 with this configuration" in text
    # 120/min against 60/min for 2 min, 60 s of waiting allowed: a minute's worth cannot be served.
    assert "verdict: does not hold:" in text and "queue_timeout" in text
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["workload"]["agents"] == 3
    assert 40 < data["calls"]["rejected_by_reason"]["queue_timeout"] < 100
    assert data["calls"]["queued"] > 0
    assert data["provider_429s"]["with_limiter"] == 0


def test_json_stays_json_for_a_model_litellm_does_not_know(config_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """LiteLLM printed its "Provider List: ..." banner to stdout for a model of no provider it
    knows, ahead of the report: ``--json`` was not JSON."""
    import litellm

    monkeypatch.setattr(litellm, "suppress_debug_info", False)  # (LiteLLM's default; restored after)
    assert main(["simulate", "--config", str(config_file), "--rate", "1", "--duration", "10",
                 "--model", "nosuch/model", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["calls"]["offered"] > 0


def test_bad_workload_objects_raise_simulation_error() -> None:
    with pytest.raises(SimulationError, match="at least one agent"):
        simulate({}, Workload(rate=1, duration=10, agents=[]))
    with pytest.raises(SimulationError, match="provider-algorithm"):
        simulate({}, Workload(rate=1, duration=10), ProviderModel(60, algorithm="leaky"))


def test_verdict_holds_when_every_call_is_admitted(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--config", str(config_file), "--rate", "50/m", "--duration", "10m"]) == 0
    assert "verdict: holds: every call admitted" in capsys.readouterr().out


def test_text_report_summarises_many_scopes_of_a_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump({"rate_limiting": {"agents": {"*": {"requests_per_minute": 5}}}}))
    assert main(["simulate", "--config", str(path), "--rate", "10", "--duration", "60", "--agents", "30"]) == 0
    text = capsys.readouterr().out
    assert text.count("agent:agent-") == 10
    assert "... 20 more (--json lists all)" in text
    assert main(["simulate", "--config", str(path), "--rate", "10", "--duration", "60", "--agents", "30",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sum(1 for e in data["scopes"].values() if e["level"] == "agent") == 30


def test_the_report_says_what_was_simulated_and_what_its_rates_divide_by(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``--duration 1m`` printed "simulated 119.9 s of traffic": the run goes on after the last
    arrival for queued calls to be admitted or time out, and went on further, to the timers of
    queued calls long admitted (up to max_wait_seconds after their arrival). The rates divided by
    that whole run. The header now says what was simulated (60 s of arrivals) and how far the
    run went on (to the last admission, completion or timeout); "/s" and "/h" divide by the time
    calls were admitted in, and say so."""
    path = tmp_path / "limits.yaml"
    path.write_text("rate_limiting:\n  global: {requests_per_minute: 60}\n  queue: {max_wait_seconds: 60}\n")
    argv = ["simulate", "--config", str(path), "--rate", "2", "--duration", "1m", "--arrivals", "uniform",
            "--spread", "0", "--no-env"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    # 60 admitted at once in the first 30 s, the other 60 as the first minute's slide out, the last
    # at 91 s; it completes 1 s later.
    assert text.startswith("simulated 60.0 s of arrivals in ")
    assert "\n  the run continued to 92.0 s for queued and in-flight calls to finish or time out\n" in text
    assert "completed               120   (1.3187/s over the 91.0 s until the last admission; " in text
    assert "/h over the 91.0 s until the last admission); the offered load would cost" in text
    assert main([*argv, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["arrival_seconds"], r["simulated_seconds"], r["rates_over_seconds"]) == (60.0, 92.0, 91.0)
    assert r["calls"]["admitted_per_second"] == round(120 / 91.0, 4)
    assert r["spend"]["per_hour"] == pytest.approx(r["spend"]["total"] / 91.0 * 3600, rel=1e-5)
    # Nothing held, a long latency: every call admitted on arrival, at the offered rate (it was the
    # calls over the arrivals and the last calls' 30 s at the provider: 1.33/s).
    unlimited = tmp_path / "none.yaml"
    unlimited.write_text("rate_limiting: {}\n")
    assert main(["simulate", "--config", str(unlimited), "--rate", "2", "--duration", "1m", "--arrivals",
                 "uniform", "--latency", "30", "--spread", "0", "--no-env", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["arrival_seconds"], r["simulated_seconds"], r["rates_over_seconds"]) == (60.0, 89.5, 60.0)
    assert r["calls"]["admitted_per_second"] == r["calls"]["offered_per_second"] == 2.0
    assert main(["simulate", "--config", str(unlimited), "--rate", "2", "--duration", "1m", "--arrivals",
                 "uniform", "--latency", "30", "--spread", "0", "--no-env"]) == 0
    text = capsys.readouterr().out
    assert "(2/s over the 60.0 s of arrivals; " in text and "/h over the 60.0 s of arrivals)" in text
