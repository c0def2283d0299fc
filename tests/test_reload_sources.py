"""What ``reload()`` with no argument reads again: the limiter's own source (its file, even after
a ``chdir``; ``HIVE_RATELIMIT_CONFIG`` for ``enable()``'s limiter; the proxy's config block), with
the environment's overrides as they are now; and, on Redis, a lost admission that another
thread's call found Redis back before it was kept."""
from __future__ import annotations

from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter, disable, enable
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .conftest import REDIS_URL
from .helpers import chat_kwargs


def test_reload_after_enable_reads_hive_ratelimit_config_again(tmp_path: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The autoload and enable() build their limiter from a ready RateLimitingConfig: reload()
    with no argument re-applied that snapshot instead of reading HIVE_RATELIMIT_CONFIG again."""
    path = tmp_path / "limits.yaml"
    path.write_text("rate_limiting:\n  global: {requests_per_minute: 1}\n")
    monkeypatch.setenv("HIVE_RATELIMIT_CONFIG", str(path))
    limiter = enable()
    try:
        path.write_text("rate_limiting:\n  global: {requests_per_minute: 2}\n")
        limiter.reload()
        assert limiter.config.global_.requests_per_minute == 2
    finally:
        disable()


def test_reload_after_enable_applies_environment_overrides_as_they_are_now(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The overrides of the environment as it is at reload(), for enable()'s limiter too."""
    monkeypatch.delenv("HIVE_RATELIMIT_CONFIG", raising=False)
    limiter = enable({"global": {"requests_per_minute": 1}})
    try:
        monkeypatch.setenv("HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE", "5")
        limiter.reload()
        assert limiter.config.global_.requests_per_minute == 5
    finally:
        disable()


def test_a_void_kept_while_another_thread_finds_redis_back_is_still_given_back(
        provider: FakeProvider, clock: FakeClock, redis_prefix: str) -> None:
    """An admission whose answer was lost (socket timeout after Redis ran it) is kept in _voids, to
    give back its slot. If another thread's call, sent before the blip was noticed, ended the
    outage, the void was never sent (only kept settlements were written outside an outage), and
    the Redis slot stayed taken for a whole lease."""
    import redis

    config = {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0},
              "backend": REDIS_URL, "redis": {"key_prefix": redis_prefix, "on_backend_error": "open"},
              "status": {"enabled": False}}
    limiter = HiveLimiter(config, clock=clock)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    eng: Any = limiter._engine
    real_admit, real_peek, real_begins = eng._admit, eng._peek_s, eng._outage_begins
    lost: list[int] = []

    def admit_answer_lost(*args: Any, **kwargs: Any) -> Any:
        if not lost:
            lost.append(1)
            real_admit(*args, **kwargs)  # Redis ran it ...
            raise redis.TimeoutError("Timeout reading from socket")  # ... its answer is lost
        return real_admit(*args, **kwargs)

    def another_thread_answers() -> None:
        # That thread's call passed the replay check before the blip was noticed and comes back now.
        real_begins()
        since, eng._down_since = eng._down_since, None

        def peek_back(*args: Any, **kwargs: Any) -> Any:
            eng._down_since = since  # (noticed while that call was in flight)
            return real_peek(*args, **kwargs)

        eng._peek_s, eng._next_try = peek_back, -float("inf")
        try:
            eng._peek([], [], [], [], [])
        finally:
            eng._peek_s = real_peek
        assert eng.available

    eng._admit = admit_answer_lost
    eng._outage_begins = another_thread_answers
    litellm.completion(**chat_kwargs(provider))  # admitted uncounted (policy open); Redis holds a ghost slot
    eng._outage_begins = real_begins
    assert eng.available
    # Redis is up; the ghost admission's slot should be given back by the next call that reaches it
    litellm.completion(**chat_kwargs(provider))
    assert provider.state.count() == 2


def test_reload_reads_the_same_file_after_a_chdir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A limiter built from a relative path re-reads, on reload(), whatever that path names in the
    current directory now, not the file it was built from."""
    monkeypatch.delenv("HIVE_RATELIMIT_CONFIG", raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "limits.yaml").write_text("rate_limiting:\n  global: {requests_per_minute: 7}\n")
    (tmp_path / "b" / "limits.yaml").write_text("rate_limiting:\n  global: {requests_per_minute: 1000}\n")
    monkeypatch.chdir(tmp_path / "a")
    limiter = HiveLimiter("limits.yaml", clock=FakeClock())
    monkeypatch.chdir(tmp_path / "b")  # (a worker changing directory, a daemonizing process)
    limiter.reload()
    assert limiter.config.global_.requests_per_minute == 7


def test_a_reload_that_replaces_a_budget_set_at_run_time_warns(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A budget set with set_budget() lives in the limiter, not in its file: a reload replaces it
    with the file's. That is said in a warning naming each setting lost (before, only the audit
    log's "reload" entry told); a reload that leaves it alone says nothing."""
    path = tmp_path / "limits.yaml"
    path.write_text("rate_limiting:\n  budget: {max_daily_spend: 50}\n  pricing: {m: {input_per_million: 1, "
                    "output_per_million: 1}}\n")
    limiter = HiveLimiter(str(path))
    limiter.set_budget(max_daily_spend=5.0, agent_id="looping")
    with caplog.at_level("WARNING", logger="hive_ratelimit_plugin"):
        limiter.reload()  # (the file has no agent budget: it goes)
    assert limiter.config.agents.get("looping") is None or limiter.config.agents["looping"].max_cost_per_day is None
    lost = [r.getMessage() for r in caplog.records if "set_budget()" in r.getMessage()]
    assert len(lost) == 1 and "agents.looping.max_cost_per_day 5.0 -> None" in lost[0]
    caplog.clear()
    limiter.set_budget(max_daily_spend=60.0)
    path.write_text(path.read_text().replace("max_daily_spend: 50", "max_daily_spend: 60"))
    with caplog.at_level("WARNING", logger="hive_ratelimit_plugin"):
        limiter.reload()  # (the file now says what was set: nothing lost)
        limiter.reload()
    assert limiter.config.budget.max_daily_spend == 60
    assert not [r for r in caplog.records if "set_budget()" in r.getMessage()]
