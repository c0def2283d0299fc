"""Configuration: the specification's YAML, environment overrides, and errors that name the key."""

from __future__ import annotations

import itertools
from pathlib import Path

import litellm
import pytest

from hive_ratelimit_plugin import ConfigError, load_config
from hive_ratelimit_plugin._scopes import Identity, ScopeResolver

ROOT = Path(__file__).resolve().parent.parent


def test_spec_example_parses() -> None:
    """The YAML from the specification loads as written."""
    cfg = load_config(ROOT / "configs" / "spec-example.yaml", use_env=False)
    assert cfg.enabled is True
    assert cfg.global_.requests_per_minute == 60
    assert cfg.global_.tokens_per_minute == 90000
    assert cfg.global_.concurrent_requests == 10
    assert cfg.providers["openai"].models["gpt-4"].requests_per_minute == 500
    assert cfg.providers["anthropic"].models["claude-sonnet-4"].tokens_per_minute == 40000
    assert cfg.agents["my_production_agent"].max_requests_per_run == 100
    assert cfg.agents["my_production_agent"].max_cost_per_hour == 10.0
    assert cfg.has_budgets()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_example_config_is_valid(name: str) -> None:
    """Every file users may copy from configs/ is valid."""
    load_config(ROOT / "configs" / name, use_env=False)


def test_dict_with_or_without_root() -> None:
    """A dict works with or without the rate_limiting root key."""
    a = load_config({"rate_limiting": {"global": {"requests_per_minute": 5}}}, use_env=False)
    b = load_config({"global": {"requests_per_minute": 5}}, use_env=False)
    assert a.global_.requests_per_minute == b.global_.requests_per_minute == 5


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HIVE_RATELIMIT_<PATH> with __ nesting overrides the file; the file path comes from env too."""
    f = tmp_path / "limits.yaml"
    f.write_text("rate_limiting:\n  global:\n    requests_per_minute: 60\n    tokens_per_minute: 1000\n")
    monkeypatch.setenv("HIVE_RATELIMIT_CONFIG", str(f))
    monkeypatch.setenv("HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE", "7")
    monkeypatch.setenv("HIVE_RATELIMIT_QUEUE__MAX_WAIT_SECONDS", "2.5")
    cfg = load_config()
    assert cfg.global_.requests_per_minute == 7
    assert cfg.global_.tokens_per_minute == 1000
    assert cfg.queue.max_wait_seconds == 2.5


def test_use_env_false_ignores_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``load_config(..., use_env=False)`` and ``check-config --no-env`` show the file alone."""
    from hive_ratelimit_plugin.cli import main

    f = tmp_path / "limits.yaml"
    f.write_text("rate_limiting:\n  global:\n    requests_per_minute: 60\n")
    monkeypatch.setenv("HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE", "7")
    monkeypatch.setenv("HIVE_RATELIMIT_QUEUE__MAX_WAIT_SECONDS", "2.5")
    for source in (f, {"global": {"requests_per_minute": 60}}):
        cfg = load_config(source, use_env=False)
        assert cfg.global_.requests_per_minute == 60 and cfg.queue.max_wait_seconds == 60.0
    assert load_config({}, use_env=False).global_.requests_per_minute is None
    assert load_config(f).global_.requests_per_minute == 7  # (and with the environment, it applies)
    assert main(["check-config", str(f), "--no-env"]) == 0
    out = capsys.readouterr().out
    assert "requests_per_minute: 60" in out and "max_wait_seconds: 60.0" in out


def test_provider_api_keys_and_model_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every field can be set with HIVE_RATELIMIT_<PATH>, a provider's API keys (a JSON list)
    and a model's limits included, without pydantic-settings warnings."""
    import warnings

    monkeypatch.setenv("OPENAI_KEY_A", "sk-test-a")
    monkeypatch.setenv("HIVE_RATELIMIT_PROVIDERS__OPENAI__API_KEYS",
                       '[{"env": "OPENAI_KEY_A", "requests_per_minute": 5}]')
    monkeypatch.setenv("HIVE_RATELIMIT_PROVIDERS__OPENAI__GPT-4O__REQUESTS_PER_MINUTE", "7")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config({})
    openai = cfg.providers["openai"]
    assert [(k.env, k.requests_per_minute) for k in openai.api_keys] == [("OPENAI_KEY_A", 5)]
    assert openai.models["gpt-4o"].requests_per_minute == 7


def test_env_enabled_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """HIVE_RATELIMIT_ENABLED=false turns the limiter off."""
    monkeypatch.setenv("HIVE_RATELIMIT_ENABLED", "false")
    assert load_config({"global": {"requests_per_minute": 1}}).enabled is False


def test_a_limiter_switched_off_by_the_environment_says_so(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """HIVE_RATELIMIT_ENABLED is also the autoload's switch: setting it to 0 to keep the autoload
    off also switches off a limiter built in code, which is logged (not silent)."""
    import logging

    from hive_ratelimit_plugin import HiveLimiter

    monkeypatch.setenv("HIVE_RATELIMIT_ENABLED", "0")
    with caplog.at_level(logging.WARNING, logger="hive_ratelimit_plugin"):
        limiter = HiveLimiter({"global": {"requests_per_minute": 1}, "status": {"enabled": False}})
    assert limiter.config.enabled is False
    assert any("HIVE_RATELIMIT_ENABLED='0' switches this limiter off" in r.getMessage() for r in caplog.records)


def test_environment_overrides_are_named_in_the_log_without_their_values(monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A limit in the file or dict that the environment replaces is not silent: the variables that
    apply are logged by name (a value may be a secret, such as a Redis URL's password)."""
    import logging

    monkeypatch.setenv("HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE", "7")
    monkeypatch.setenv("HIVE_RATELIMIT_QUEUE__MAX_WAIT_SECONDS", "3")
    with caplog.at_level(logging.INFO, logger="hive_ratelimit_plugin"):
        cfg = load_config({"global": {"requests_per_minute": 60}})
    assert cfg.global_.requests_per_minute == 7
    lines = [r.getMessage() for r in caplog.records if "overrides the configuration" in r.getMessage()]
    assert lines == ["hive-ratelimit: the environment overrides the configuration (dict): "
                     "HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE, HIVE_RATELIMIT_QUEUE__MAX_WAIT_SECONDS"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hive_ratelimit_plugin"):
        load_config({"global": {"requests_per_minute": 60}}, use_env=False)
    assert not [r for r in caplog.records if "overrides the configuration" in r.getMessage()]


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"global": {"requests_per_minute": -5}}, ["rate_limiting.global.requests_per_minute", "-5", "greater than 0"]),
        ({"global": {"requests_per_minute": 0}}, ["rate_limiting.global.requests_per_minute", "0"]),
        ({"global": {"requests_per_minut": 5}}, ["rate_limiting.global.requests_per_minut", "unknown key"]),
        ({"global": {"tokens_per_minute": "lots"}}, ["rate_limiting.global.tokens_per_minute", "'lots'"]),
        ({"providers": {"openai": {"gpt-4": {"rpm": 5}}}}, ["rate_limiting.providers.openai.gpt-4.rpm"]),
        ({"providers": {"openai": {"requets_per_minute": 5}}}, ["rate_limiting.providers.openai.requets_per_minute"]),
        ({"queue": {"max_wait_seconds": -1}}, ["rate_limiting.queue.max_wait_seconds"]),
        ({"colour": "blue"}, ["rate_limiting.colour", "unknown key"]),
        # (pydantic reads true as 1: it was a silent limit of 1; found by helper-57)
        ({"global": {"requests_per_minute": True}}, ["rate_limiting.global.requests_per_minute", "True",
                                                     "not true/false"]),
        ({"agents": {"a": {"max_cost_per_run": True}}}, ["rate_limiting.agents.a.max_cost_per_run", "not true/false"]),
        ({"queue": {"max_wait_seconds": False}}, ["rate_limiting.queue.max_wait_seconds", "not true/false"]),
        ({"budget": {"warning_thresholds": [0.5, True]}}, ["rate_limiting.budget.warning_thresholds",
                                                           "not true/false"]),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], fragments: list[str]) -> None:
    """Each bad value raises ConfigError naming the key path, the value and the rule."""
    with pytest.raises(ConfigError) as info:
        load_config(data, use_env=False)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # pydantic's "missing" error carries the enclosing block as its input and says "Field
        # required": the line read "...output_per_million: {'input_per_million': 1.0} is not allowed:
        # Field required"
        ({"pricing": {"my-llama": {"input_per_million": 1.0}}},
         "rate_limiting.pricing.my-llama.output_per_million: missing; this key is required here"),
        ({"providers": {"openai": {"api_keys": [{"requests_per_minute": 5}]}}},
         "rate_limiting.providers.openai.api_keys.0.env: missing; this key is required here"),
        # and a scalar where a block belongs named an internal class ("instance of ProviderConfig")
        ({"providers": {"openai": 500}},
         "rate_limiting.providers.openai: 500 is not allowed: expected a block of keys and values"),
        ({"global": None}, "rate_limiting.global: None is not allowed: expected a block of keys and values"),
    ],
)
def test_missing_key_and_non_block_errors_read_plainly(data: dict[str, object], expected: str) -> None:
    """A required key left out is reported as missing (not as its block's value "not allowed"), and a
    value where a block belongs says a block is expected, without pydantic's class names."""
    with pytest.raises(ConfigError) as info:
        load_config(data, use_env=False)
    assert info.value.errors == [expected]
    assert "Field required" not in str(info.value) and "instance of" not in str(info.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"global": {"request_per_minute": 5}},
         "rate_limiting.global.request_per_minute: unknown key (value 5); did you mean requests_per_minute?"),
        ({"queue": {"max_wait": 5}}, "rate_limiting.queue.max_wait: unknown key (value 5); did you mean "
                                     "max_wait_seconds?"),
        ({"agent": {"a": {}}}, "rate_limiting.agent: unknown key (value {'a': {}}); did you mean agents?"),
        ({"budgets": {}}, "rate_limiting.budgets: unknown key (value {}); did you mean budget?"),
        # (a model block: pydantic's path goes through ProviderConfig.models, the message's does not)
        ({"providers": {"openai": {"gpt-4": {"Tokens-Per-Minute": 5}}}},
         "rate_limiting.providers.openai.gpt-4.Tokens-Per-Minute: unknown key (value 5); did you mean "
         "tokens_per_minute?"),
        ({"providers": {"openai": {"gpt-4": 500}}},
         "rate_limiting.providers.openai.gpt-4: unknown key (value 500); if gpt-4 is a model, its limits go in "
         "a block of their own, such as gpt-4: {requests_per_minute: 500}"),
        ({"agents": {"a": {"max_daily_spend": 5}}},
         "rate_limiting.agents.a.max_daily_spend: unknown key (value 5); here the money limit is spelt "
         "max_cost_per_day"),
        ({"budget": {"max_cost_per_month": 5}},
         "rate_limiting.budget.max_cost_per_month: unknown key (value 5); here the money limit is spelt "
         "max_monthly_spend"),
        ({"teams": {"t": {"budget": {"daily": 5}}}},
         "rate_limiting.teams.t.budget: unknown key (value {'daily': 5}); a level's money limits are "
         "max_cost_per_hour, max_cost_per_day and max_cost_per_month; the global budget is the block "
         "rate_limiting.budget"),
        ({"colour": "blue"}, "rate_limiting.colour: unknown key (value 'blue'); check the spelling against the "
                             "documented fields"),
        # (no hint repeats a secret written in the wrong place)
        ({"providers": {"openai": {"secret": "sk-proj-abcdefghijklmnop0123"}}},
         "rate_limiting.providers.openai.secret: unknown key (value '<redacted>'); check the spelling against "
         "the documented fields"),
        ({"pricing": {"m": {"input_per_million": 1, "output_per_million": 1, "zzz": 1}}},
         "rate_limiting.pricing.m.zzz: unknown key (value 1); check the spelling against the documented fields"),
    ],
)
def test_an_unknown_key_names_what_was_most_likely_meant(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(data, use_env=False)
    assert info.value.errors == [expected]


def test_a_proxy_config_without_a_rate_limiting_block_says_so(tmp_path: Path) -> None:
    """Given the LiteLLM proxy's config.yaml, the error was every proxy section as an unknown key."""
    path = tmp_path / "config.yaml"
    path.write_text("model_list:\n  - model_name: gpt-4\n    litellm_params: {model: openai/gpt-4}\n"
                    "general_settings: {master_key: sk-1234567890abcdef}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, use_env=False)
    assert info.value.errors == [
        "no rate_limiting: section; general_settings, model_list are sections of a LiteLLM proxy config.yaml, "
        "in which hive-ratelimit reads its limits from a rate_limiting: block (see docs/proxy.md)"]
    assert "sk-123" not in str(info.value)
    # with the block, the proxy's own sections are the host's (as before)
    path.write_text("model_list: []\nrate_limiting:\n  global: {requests_per_minute: 5}\n")
    assert load_config(path, use_env=False).global_.requests_per_minute == 5


def test_section_outside_the_root_is_an_error_not_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A section written at the top level next to ``rate_limiting:`` (wrongly indented) was
    silently ignored, so its budget or limits did not apply. In a file of ours it is an error; in a
    host application's file (other top-level keys: the LiteLLM proxy's), where the name may be the
    application's own, a warning; the host's other keys are ignored as before."""
    f = tmp_path / "limits.yaml"
    f.write_text("rate_limiting:\n  global: {requests_per_minute: 60}\nbudget:\n  max_daily_spend: 10\n"
                 "global: {tokens_per_minute: 5}\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, use_env=False)
    assert info.value.errors == [
        f"{k}: a rate_limiting section at the top level, next to rate_limiting:, where it is ignored; indent it "
        "under rate_limiting:" for k in ("budget", "global")]
    assert "limits.yaml" in str(info.value)
    with pytest.raises(ConfigError, match="agents: a rate_limiting section at the top level"):
        load_config({"rate_limiting": {}, "agents": {"a": {"requests_per_minute": 1}}}, use_env=False)
    f.write_text("model_list: []\nagents: [planner]\nrate_limiting:\n  budget: {max_daily_spend: 10}\n")
    with caplog.at_level("WARNING", logger="hive_ratelimit_plugin"):
        assert load_config(f, use_env=False).budget.max_daily_spend == 10
    assert "agents: a rate_limiting section at the top level" in caplog.text
    caplog.clear()
    f.write_text("model_list: []\nlitellm_settings: {callbacks: x.y}\n"
                 "rate_limiting:\n  budget: {max_daily_spend: 10}\n")
    with caplog.at_level("WARNING", logger="hive_ratelimit_plugin"):
        assert load_config(f, use_env=False).budget.max_daily_spend == 10
    assert caplog.text == ""


def test_all_errors_reported_at_once() -> None:
    """Several problems are all listed, not just the first."""
    with pytest.raises(ConfigError) as info:
        load_config({"global": {"requests_per_minute": -1, "concurrent_requests": 0}}, use_env=False)
    assert len(info.value.errors) == 2


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    """A YAML syntax error names the file and the line."""
    f = tmp_path / "bad.yaml"
    f.write_text("rate_limiting:\n  global:\n    requests_per_minute: [60\n  agents: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, use_env=False)
    assert "bad.yaml" in str(info.value) and "line" in str(info.value)


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    """Two ``global:`` blocks: YAML would keep the second and drop the first's limits unnoticed."""
    f = tmp_path / "dup.yaml"
    f.write_text("rate_limiting:\n  global:\n    requests_per_minute: 5\n  global:\n    tokens_per_minute: 10\n")
    with pytest.raises(ConfigError, match=r"line 4.*'global' twice"):
        load_config(f, use_env=False)
    f.write_text("rate_limiting:\n  global: &b {requests_per_minute: 5}\n  agents:\n"
                 "    bot: {<<: *b, tokens_per_minute: 9}\n")
    merged = load_config(f, use_env=False).agents["bot"]  # (YAML merge keys still work)
    assert (merged.requests_per_minute, merged.tokens_per_minute) == (5, 9)
    # An anchor that merges and overrides, itself merged from a node built before it: PyYAML
    # rewrites the anchor in place, and its overridden key is not a duplicate.
    f.write_text("x-base: &base {requests_per_minute: 10, tokens_per_minute: 1000}\nrate_limiting:\n"
                 "  agents:\n    researcher: &r\n      <<: *base\n      requests_per_minute: 20\n"
                 "  global:\n    <<: *r\n")
    cfg = load_config(f, use_env=False)
    assert cfg.global_.requests_per_minute == cfg.agents["researcher"].requests_per_minute == 20


def test_a_file_that_is_not_utf8_text_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "limits.yaml"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ConfigError, match=r"limits\.yaml: not a UTF-8 text file"):
        load_config(f, use_env=False)


def test_a_huge_bad_value_is_shown_short(tmp_path: Path) -> None:
    """A few hundred bytes of YAML aliases expand to thousands of values: the error shows a
    cut-down value."""
    f = tmp_path / "aliases.yaml"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abc", "bcd", strict=True)]
    lines += ["rate_limiting:", "  global: {requests_per_minute: *d}"]
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, use_env=False)
    assert "rate_limiting.global.requests_per_minute" in str(info.value) and len(str(info.value)) < 2000


@pytest.mark.parametrize("levels", [7, 12])
def test_an_alias_bomb_is_refused_before_validation(tmp_path: Path, levels: int) -> None:
    """Each level a list of nine of the one before: 9**6 (half a million) values took validation 6 s,
    9**12 would take weeks. Refused at once, whatever the depth."""
    f = tmp_path / "bomb.yaml"
    names = [f"l{i}" for i in range(levels + 1)]
    lines = [f"{names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in itertools.pairwise(names)]
    lines += ["rate_limiting:", f"  global: {{requests_per_minute: *{names[-1]}}}"]
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, use_env=False)
    assert info.value.errors == ["holds more than 1,000,000 values once its aliases (*name) are expanded: not a "
                                 "configuration (an alias bomb?)"]
    # the same through a dict, and a large but real configuration still loads
    with pytest.raises(ConfigError, match="more than 1,000,000 values"):
        load_config({"global": {"requests_per_minute": [1] * 1_000_000}}, use_env=False)
    assert len(load_config({"agents": {f"a{i}": {"requests_per_minute": 1} for i in range(20_000)}},
                           use_env=False).agents) == 20_000


@pytest.mark.parametrize("value", ["garbage", "{not json"])
def test_a_section_variable_that_is_not_json_is_named(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_RATELIMIT_GLOBAL", value)
    with pytest.raises(ConfigError, match="HIVE_RATELIMIT_GLOBAL: not valid JSON"):
        load_config({})


@pytest.mark.parametrize("path", ["retry.base_delay", "retry.max_delay", "circuit_breaker.cooldown_seconds",
                                  "estimation.lease_seconds", "estimation.arrival_margin_seconds",
                                  "status.interval_seconds", "redis.socket_timeout", "redis.retry_interval",
                                  "runaway.cooldown_seconds"])
def test_seconds_that_must_end_cannot_be_infinite(path: str) -> None:
    """``.inf`` there crashed every call (Redis' socket timeout), killed the status thread, or
    froze a model after one 429 for ever; a queue wait may still be infinite."""
    section, field = path.split(".")
    with pytest.raises(ConfigError, match=f"rate_limiting.{path}: inf is not allowed"):
        load_config({section: {field: float("inf")}}, use_env=False)
    assert load_config({"queue": {"max_wait_seconds": float("inf")}}, use_env=False).queue.max_wait_seconds > 1e300


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError, not an OSError."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", use_env=False)


@pytest.mark.parametrize("name", ["HIVE_RATELIMIT_GLOBL__REQUESTS_PER_MINUTE",
                                  "HIVE_RATELIMIT_GLOBAL_REQUESTS_PER_MINUTE", "HIVE_RATELIMIT_REQUESTS_PER_MINUTE"])
def test_an_environment_variable_that_names_no_field_is_an_error(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt section or a missing ``__`` used to be ignored, leaving the limit off unnoticed."""
    monkeypatch.setenv(name, "5")
    with pytest.raises(ConfigError) as info:
        load_config({"global": {"requests_per_minute": 60}})
    assert name in str(info.value) and "unknown key" in str(info.value)
    assert load_config({"global": {"requests_per_minute": 60}}, use_env=False).global_.requests_per_minute == 60


def test_bad_env_value_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad environment value is reported like a bad file value."""
    monkeypatch.setenv("HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE", "-3")
    with pytest.raises(ConfigError, match="requests_per_minute") as info:
        load_config({"global": {"requests_per_minute": 60}})
    # the file says 60: the message names the variable the bad value came from
    assert "from the environment variable HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE" in str(info.value)
    # ... but not when the environment is not read, and the value is the file's
    with pytest.raises(ConfigError) as info:
        load_config({"global": {"requests_per_minute": -1}}, use_env=False)
    assert "environment variable" not in str(info.value)
    monkeypatch.delenv("HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE")
    for var in ("hive_ratelimit_providers__openai__gpt-4o__requests_per_minute",  # any case
                "HIVE_RATELIMIT_PROVIDERS__OPENAI__MODELS__GPT-4O__REQUESTS_PER_MINUTE"):
        monkeypatch.setenv(var, "abc")
        with pytest.raises(ConfigError) as info:
            load_config({})
        assert f"from the environment variable {var}" in str(info.value)
        monkeypatch.delenv(var)


def _keys(resolver: ScopeResolver, provider: str, model: str, **ident: str) -> list[str]:
    """Keys of the scopes that carry limits."""
    return [s.key for s in resolver.scopes(provider, model, Identity(**ident)) if not s.limits.is_empty()]


def test_model_scope_is_always_present() -> None:
    """Every call has a model scope (it carries cooldowns and circuit state), limits or not."""
    r = ScopeResolver(load_config({}, use_env=False))
    scopes = r.scopes("anthropic", "anthropic/claude-sonnet-4", Identity())
    assert [s.key for s in scopes] == ["model:anthropic/claude-sonnet-4"]
    assert scopes[0].limits.is_empty()


def test_model_keys_match_with_or_without_prefix_and_globs() -> None:
    """gpt-4 matches openai/gpt-4; a glob matches a family, each model on its own."""
    cfg = load_config(
        {
            "global": {"requests_per_minute": 100},
            "providers": {
                "openai": {
                    "requests_per_minute": 90,
                    "gpt-4": {"requests_per_minute": 5},
                    "gpt-4o*": {"requests_per_minute": 7},
                    "openai/o1": {"requests_per_minute": 3},
                }
            },
        },
        use_env=False,
    )
    r = ScopeResolver(cfg)
    assert _keys(r, "openai", "gpt-4") == ["global", "provider:openai", "model:openai/gpt-4"]
    assert _keys(r, "openai", "openai/gpt-4") == ["global", "provider:openai", "model:openai/gpt-4"]
    assert _keys(r, "openai", "gpt-4o-mini")[-1] == "model:openai/gpt-4o-mini"
    assert _keys(r, "openai", "o1")[-1] == "model:openai/o1"
    assert _keys(r, "openai", "gpt-3.5-turbo") == ["global", "provider:openai"]
    assert _keys(r, "anthropic", "claude-sonnet-4") == ["global"]


@pytest.mark.parametrize(("called", "block"), [
    ("anthropic/claude-sonnet-4-20250514", "claude-sonnet-4"), ("claude-sonnet-4@20250514", "claude-sonnet-4"),
    ("openai/gpt-4o-2024-08-06", "gpt-4o"), ("gpt-4o", "gpt-4o"), ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("gpt-4-0613", None), ("claude-sonnet-4-extra", None), ("my-model-12345678x", None),
])
def test_a_model_key_holds_its_dated_snapshots(called: str, block: str | None) -> None:
    """``claude-sonnet-4`` (the name the specification and Anthropic's pages use) holds the calls
    to ``claude-sonnet-4-20250514``: an exact key missed them, with no warning. Only a snapshot
    date is left off (``-0613`` is not one). Each snapshot still has its own scope, as each model
    a glob matches."""
    blocks = {"claude-sonnet-4": 1, "claude-sonnet-4-5": 2, "gpt-4o": 3, "gpt-4": 4, "claude-sonnet-4-extra-x": 5}
    provider = "anthropic" if "claude" in called else "openai"
    cfg = load_config({"providers": {provider: {name: {"requests_per_minute": n} for name, n in blocks.items()}}},
                      use_env=False)
    model_scope = ScopeResolver(cfg).scopes(provider, called, Identity())[-1]
    assert model_scope.limits.requests_per_minute == (blocks[block] if block else None)
    assert model_scope.key == f"model:{provider}/{called.removeprefix(provider + '/')}"


def test_a_price_under_an_undated_name_prices_the_snapshots_litellm_does_not() -> None:
    """A ``pricing`` entry under ``claude-sonnet-4`` prices a snapshot LiteLLM's map does not know;
    one the map prices apart keeps the map's price (``gpt-4o-2024-05-13`` costs twice ``gpt-4o``:
    the undated entry would have counted half its bill). Found by helper-49."""
    from hive_ratelimit_plugin._pricing import PriceBook

    book = PriceBook(load_config({"pricing": {"claude-sonnet-4": {"input_per_million": 1, "output_per_million": 2},
                                              "gpt-4o": {"input_per_million": 2.5, "output_per_million": 10}}},
                                 use_env=False))
    unknown = book.price("anthropic", "anthropic/claude-sonnet-4-20990101")
    assert (unknown.source, unknown.input_per_token) == ("config", 1e-6)
    mapped = litellm.model_cost["gpt-4o-2024-05-13"]
    dearer = book.price("openai", "gpt-4o-2024-05-13")
    assert dearer.source == "litellm" and dearer.input_per_token == mapped["input_cost_per_token"] > 2.5e-6
    assert book.price("openai", "gpt-4o").source == "config"  # the undated name itself: the entry


def test_agent_user_team_levels_and_wildcards() -> None:
    """Agents, users and teams match by name or glob; '*' applies to everyone, each separately."""
    cfg = load_config(
        {
            "agents": {"bot": {"requests_per_minute": 1}, "batch-*": {"concurrent_requests": 2}},
            "users": {"*": {"requests_per_hour": 10}},
            "teams": {"growth": {"tokens_per_day": 100}},
        },
        use_env=False,
    )
    r = ScopeResolver(cfg)
    assert _keys(r, "openai", "gpt-4", agent_id="bot", user_id="u1", team_id="growth") == [
        "agent:bot",
        "user:u1",
        "team:growth",
    ]
    assert _keys(r, "openai", "gpt-4", agent_id="batch-7") == ["agent:batch-7"]
    assert _keys(r, "openai", "gpt-4", agent_id="other", team_id="other") == []


def test_limiter_from_a_yaml_path(tmp_path: Path) -> None:
    """``HiveLimiter.from_yaml(path)`` and ``HiveLimiter("limits.yaml")`` read the same file; a bad
    file fails at construction with ConfigError."""
    from hive_ratelimit_plugin import HiveLimiter

    f = tmp_path / "limits.yaml"
    f.write_text("rate_limiting:\n  global:\n    requests_per_minute: 42\n  queue:\n    max_wait_seconds: 3\n"
                 "  status:\n    enabled: false\n")
    for lim in (HiveLimiter.from_yaml(str(f)), HiveLimiter(str(f)), HiveLimiter(f)):  # type: ignore[arg-type]
        assert lim.config.global_.requests_per_minute == 42
        assert lim.config.queue.max_wait_seconds == 3
    f.write_text("rate_limiting:\n  global:\n    requests_per_minute: 0\n")
    with pytest.raises(ConfigError, match=r"rate_limiting\.global\.requests_per_minute"):
        HiveLimiter.from_yaml(str(f))


def test_every_error_is_importable_from_the_package() -> None:
    """The README's error table names them as ``hive_ratelimit_plugin.<Name>``."""
    import hive_ratelimit_plugin as pkg
    from hive_ratelimit_plugin import errors

    for name in errors.__all__:
        cls = getattr(pkg, name)
        assert cls is getattr(errors, name) and issubclass(cls, pkg.HiveRateLimitError)
        assert name in pkg.__all__ and name in dir(pkg) and name in dir(errors)


@pytest.mark.parametrize(("url", "why"), [
    ("redis://127.0.0.1:6379/abc", "the database must be a number"),
    ("rediss://127.0.0.1:6380/0?db=x", "the database must be a number"),
    ("redis://127.0.0.1:port/0", "not a valid Redis URL"),
])
def test_a_redis_url_redis_py_would_misread_is_refused(url: str, why: str) -> None:
    """redis-py reads a database it cannot parse as database 0 (another limiter's, or nobody's, data):
    such a URL is a configuration error, not a silent switch to db 0."""
    with pytest.raises(ConfigError, match=why):
        load_config({"backend": url})
    assert load_config({"backend": "redis://:pw@127.0.0.1:6379/3"}).backend.endswith("/3")


@pytest.mark.parametrize("config", [
    {"redis": "redis://:hunter2x@cache:6379/0"},  # the URL under the redis section
    {"backend": {"url": "redis://user:hunter2x@cache:6379/0"}},
    {"backend": ["redis://:hunter2x@cache:6379/0"]},
], ids=["redis-section", "backend-dict", "backend-list"])
def test_a_redis_url_in_the_wrong_place_keeps_its_password_out_of_the_error(config: dict[str, object]) -> None:
    """A configuration error shows the value it refuses; a Redis URL's user and password stay
    hidden wherever the URL was put (only a URL given as ``backend`` was). Found by helper-52."""
    with pytest.raises(ConfigError) as info:
        load_config(config, use_env=False)
    assert "hunter2x" not in str(info.value) and "***@cache" in str(info.value)


def test_a_redis_url_with_a_bad_parameter_is_a_config_error() -> None:
    """redis-py refuses ``?socket_timeout=abc`` with a bare ValueError; the limiter says which
    setting is wrong, without the password. Found by helper-52."""
    from hive_ratelimit_plugin import HiveLimiter

    with pytest.raises(ConfigError, match=r"rate_limiting\.backend: redis://\*\*\*@127\.0\.0\.1") as info:
        HiveLimiter({"backend": "redis://:hunter2x@127.0.0.1:6379/12?socket_timeout=abc"})
    assert "hunter2x" not in str(info.value) and "socket_timeout" in str(info.value)
