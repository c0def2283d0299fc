"""Logging: repeated lines are summarised during a 429 storm; secrets never reach a log line."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import litellm
import pytest

from hive_ratelimit_plugin import _observe
from hive_ratelimit_plugin._observe import RepeatSummary, redact
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import Ticker, chat_kwargs, make_limiter


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def summary_logger() -> Iterator[tuple[logging.Logger, RepeatSummary, FakeClock, ListHandler]]:
    clock = FakeClock(0.0)
    log = logging.getLogger("hive_ratelimit_plugin.tests.summary")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    summary = RepeatSummary(window=10.0, clock=clock)
    handler = ListHandler()
    log.addFilter(summary)
    log.addHandler(handler)
    yield log, summary, clock, handler
    log.removeFilter(summary)
    log.removeHandler(handler)


def test_keyed_repeats_are_summarised(summary_logger: tuple[logging.Logger, RepeatSummary, FakeClock,
                                                             ListHandler]) -> None:
    log, summary, clock, handler = summary_logger
    for i in range(58):
        log.warning("provider openai answered 429 for gpt-4o; callers wait %.1fs", 1 + i / 10,
                    extra={"hive_repeat_key": ("429", "openai", "gpt-4o")})
        clock.advance(0.1)
    assert handler.lines == ["provider openai answered 429 for gpt-4o; callers wait 1.0s"]
    summary.flush()  # 5.8 s in: the window is not over
    assert len(handler.lines) == 1
    clock.advance(4.3)
    summary.flush()
    assert handler.lines[1] == ("provider openai answered 429 for gpt-4o; callers wait 6.7s ... repeated 57 times "
                                "in the last 10s")
    summary.flush()
    assert len(handler.lines) == 2  # reported once
    log.warning("provider openai answered 429 for gpt-4o; callers wait %.1fs", 2.0,
                extra={"hive_repeat_key": ("429", "openai", "gpt-4o")})
    assert handler.lines[2].endswith("callers wait 2.0s")  # a new window starts with a full line


def test_summary_is_also_emitted_by_the_next_line_after_the_window(
        summary_logger: tuple[logging.Logger, RepeatSummary, FakeClock, ListHandler]) -> None:
    log, _, clock, handler = summary_logger
    for _ in range(5):
        log.warning("queue timeout", extra={"hive_repeat_key": "q"})
    clock.advance(12)
    log.warning("queue timeout", extra={"hive_repeat_key": "q"})
    assert handler.lines == ["queue timeout", "queue timeout ... repeated 4 times in the last 12s", "queue timeout"]


def test_unkeyed_identical_lines_pass_a_few_times_and_distinct_lines_all_pass(
        summary_logger: tuple[logging.Logger, RepeatSummary, FakeClock, ListHandler]) -> None:
    log, summary, clock, handler = summary_logger
    for _ in range(10):
        log.warning("disk is slow")
    for name in ("a", "b", "c", "d"):
        log.warning("agent %s over budget", name)
    log.info("info lines are never summarised")
    log.info("info lines are never summarised")
    assert handler.lines.count("disk is slow") == 3
    assert [x for x in handler.lines if "over budget" in x] == [f"agent {n} over budget" for n in "abcd"]
    assert handler.lines.count("info lines are never summarised") == 2
    clock.advance(10)
    summary.flush()
    assert handler.lines[-1] == "disk is slow ... repeated 7 times in the last 10s"


def test_secrets_are_redacted_from_messages_and_tracebacks(
        summary_logger: tuple[logging.Logger, RepeatSummary, FakeClock, ListHandler]) -> None:
    log, _, _, handler = summary_logger
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.warning("calling with %s", "sk-proj-abcDEF1234567890")
    log.warning("header Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload")
    try:
        raise ValueError("api_key=sk-live-SECRETSECRET rejected")
    except ValueError:
        log.exception("callback failed")
    text = "\n".join(handler.lines)
    assert "abcDEF" not in text and "eyJhbGci" not in text and "SECRETSECRET" not in text
    assert text.count("<redacted>") >= 3 and "ValueError" in text
    assert redact("model gpt-4o, 1200 tokens") == "model gpt-4o, 1200 tokens"


async def test_429_storm_logs_one_line_then_a_summary(provider: FakeProvider, clock: FakeClock,
                                                      caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Real calls: 12 provider 429s log one warning and one "repeated 11 times" line, no key."""
    log_clock = FakeClock(0.0)
    monkeypatch.setattr(_observe.SUMMARY, "clock", log_clock)
    limiter = make_limiter(clock, {"retry": {"max_attempts": 20}, "circuit_breaker": {"enabled": False},
                                   "adaptive": {"enabled": False}})
    events: list[dict[str, object]] = []
    limiter.on_event(events.append)
    provider.state.push(*[Scripted(status=429, headers={"retry-after": "0.5"})] * 12)
    kwargs = chat_kwargs(provider)
    kwargs.pop("max_retries")
    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        await asyncio.gather(*(litellm.acompletion(**kwargs) for _ in range(4)))
    assert provider.state.count(429) == 12
    lines = [r.getMessage() for r in caplog.records if "answered 429" in r.getMessage()]
    assert lines == ["provider openai answered 429 for gpt-4o-mini (retried); the provider asked to wait 0.5s"]
    log_clock.advance(10)
    _observe.SUMMARY.flush()
    lines = [r.getMessage() for r in caplog.records if "answered 429" in r.getMessage()]
    assert lines[1] == "provider openai answered 429 for gpt-4o-mini (retried); the provider asked to wait 0.5s ... " \
                       "repeated 11 times in the last 10s"
    assert "SECRET" not in caplog.text
    storm = [e for e in events if e["type"] == "provider_429"]
    assert len(storm) == 12  # every 429 is an event, even if the log summarises them
    assert {(e["provider"], e["model"], e["retry_after"], e["retried"]) for e in storm} == {
        ("openai", "gpt-4o-mini", 0.5, True)}
    assert "SECRET" not in repr(events)


def test_429s_retried_and_not_retried_are_summarised_apart(caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A summary repeats its last line's words: 429s retried and not retried are counted apart (one
    summary read "... (not retried) ... repeated 2 times" after one retried and one not)."""
    from hive_ratelimit_plugin.plugin import _log_event

    log_clock = FakeClock(0.0)
    monkeypatch.setattr(_observe.SUMMARY, "clock", log_clock)
    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    for retried in (True, True, True, False, False):
        _log_event({"type": "provider_429", "provider": "openai", "model": "gpt-4o", "retried": retried,
                    "retry_after": None})
    log_clock.advance(10)
    _observe.SUMMARY.flush()
    assert sorted(r.getMessage() for r in caplog.records if "answered 429" in r.getMessage()) == sorted([
        "provider openai answered 429 for gpt-4o (retried)",
        "provider openai answered 429 for gpt-4o (not retried)",
        "provider openai answered 429 for gpt-4o (retried) ... repeated 2 times in the last 10s",
        "provider openai answered 429 for gpt-4o (not retried) ... repeated once more in the last 10s"])


def test_breaker_trip_is_logged(provider: FakeProvider, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    make_limiter(clock, {"circuit_breaker": {"failure_threshold": 2}, "retry": {"enabled": False}})
    provider.state.push(Scripted(status=500), Scripted(status=500))
    caplog.set_level(logging.INFO, logger="hive_ratelimit_plugin")
    for _ in range(2):
        with pytest.raises(litellm.InternalServerError):
            litellm.completion(**chat_kwargs(provider))
    [line] = [r for r in caplog.records if "circuit breaker" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert line.getMessage() == ("circuit breaker of model:openai/gpt-4o-mini opened after 2 consecutive provider "
                                 "failures; a probe goes through in 30s")


def test_pending_repeats_are_reported_on_a_forced_flush(
        summary_logger: tuple[logging.Logger, RepeatSummary, FakeClock, ListHandler]) -> None:
    """At exit the window may not be over: the repeats are still reported, with the real span."""
    log, summary, clock, handler = summary_logger
    for _ in range(4):
        log.warning("queue timeout", extra={"hive_repeat_key": "q"})
        clock.advance(1)
    summary.flush()
    assert handler.lines == ["queue timeout"]
    summary.flush(force=True)
    assert handler.lines == ["queue timeout", "queue timeout ... repeated 3 times in the last 4s"]


def test_limits_a_provider_gives_in_its_headers_are_logged(provider: FakeProvider, clock: FakeClock,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Limits learned from a successful answer's headers cap calls where lower than configured,
    and a long wait for a reset holds a model: both are said, so that one wrong header (a gateway
    sending ``x-ratelimit-limit-requests: 1``) does not hold a model unnoticed."""
    caplog.set_level(logging.INFO, logger="hive_ratelimit_plugin")
    make_limiter(clock, {})
    provider.state.push(Scripted(status=200, headers={"x-ratelimit-limit-requests": "300"}),
                        Scripted(status=200, headers={"x-ratelimit-limit-requests": "300"}),
                        Scripted(status=200, headers={"x-ratelimit-limit-requests": "2",
                                                      "x-ratelimit-remaining-requests": "0",
                                                      "x-ratelimit-reset-requests": "2m"}))
    for _ in range(3):
        litellm.completion(**chat_kwargs(provider))

    def said() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if "the provider" in r.getMessage()]

    deadline = time.monotonic() + 10  # (LiteLLM 1.83 settles on its logging thread, after the call returns)
    while not any("no requests left" in m for _, m in said()) and time.monotonic() < deadline:
        time.sleep(0.01)
    records = said()
    assert records[0] == (logging.INFO, "openai/gpt-4o-mini: the provider's headers give its limits as 300 requests "
                                        "per minute; calls there are held to them where they are lower than configured")
    assert sum("300 requests" in m for _, m in records) == 1  # (said when it changes, not on every answer)
    assert (logging.WARNING, "openai/gpt-4o-mini: the provider's headers give its limits as 2 requests per minute "
            "(was 300); calls there are held to them where they are lower than configured") in records
    assert (logging.WARNING, "openai/gpt-4o-mini: the provider reports no requests left until its reset in 120s; "
            "calls there wait 60s") in records


def test_a_provider_name_litellm_does_not_know_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """``providers: {opneai: ...}`` is a block no call counts against: its limits never apply."""
    from hive_ratelimit_plugin import HiveLimiter

    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    lim = HiveLimiter({"providers": {"opneai": {"gpt-4o-mini": {"requests_per_minute": 1}},
                                     "anthropic": {"requests_per_minute": 5}}})
    messages = [r.getMessage() for r in caplog.records]
    assert any("rate_limiting.providers.opneai: LiteLLM knows no provider 'opneai' (did you mean 'openai'?)" in m
               for m in messages)
    assert not any("providers.anthropic" in m for m in messages)
    caplog.clear()
    lim.reload({"providers": {"OpenAI": {"requests_per_minute": 1}}})
    assert any("providers.OpenAI: LiteLLM knows no provider 'OpenAI' (did you mean 'openai'?)" in r.getMessage()
               for r in caplog.records)


def test_a_per_run_request_cap_is_logged_as_requests_not_money(provider: FakeProvider, clock: FakeClock,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """``max_requests_per_run`` counts requests: its warning and its trip read as requests (they
    read "$2.00 of $2.00"), and a run has no window to roll over."""
    make_limiter(clock, {"agents": {"runner": {"max_requests_per_run": 2}}})
    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    for i in range(2):
        litellm.completion(**chat_kwargs(provider, messages=[{"role": "user", "content": f"r{i}"}],
                                         metadata={"agent_id": "runner", "run_id": "run-1"}))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("hive_ratelimit_plugin")]
    assert "Per-run request cap reached: 2 of 2 requests (run runner/run-1); the run's calls are stopped until the " \
           "cap is raised or reset" in lines, lines
    assert not any("$" in line or "window rolls over" in line for line in lines), lines


async def test_a_sync_call_waiting_on_an_event_loop_thread_is_warned_about(
        provider: FakeProvider, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """``litellm.completion`` inside a coroutine (a sync tool of an async agent) that must wait
    blocks the loop: the loop's own calls, which may hold the slot it waits for, cannot finish
    meanwhile. It still waits (and times out, as here), and says why once."""
    from hive_ratelimit_plugin import RateLimitQueueTimeout, _waiting

    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 0.05}})
    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    _waiting._warned_loop = False
    litellm.completion(**chat_kwargs(provider))
    with Ticker(clock, step=0.02, when=lambda: limiter._engine.queue_length > 0):
        for _ in range(2):
            with pytest.raises(RateLimitQueueTimeout):
                litellm.completion(**chat_kwargs(provider))  # (on this test's event loop thread)
    warned = [r for r in caplog.records if "runs an asyncio event loop" in r.getMessage()]
    assert len(warned) == 1


def test_a_sync_router_call_waiting_on_litellms_own_loop_is_not_warned_about(
        provider: FakeProvider, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """LiteLLM 1.83's sync ``Router.completion`` runs its retries in a new event loop of its own
    (``run_async_function``) and calls the sync ``litellm.completion`` from there: a wait there
    blocks no other call, so the "thread that runs an asyncio event loop" warning, which tells
    the caller to move a call they already made from a plain thread, must not be given. (Found by
    helper-60: the warning came on every process using ``Router.completion`` under a limit.)"""
    from hive_ratelimit_plugin import RateLimitQueueTimeout, _waiting

    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 0.05}})
    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    _waiting._warned_loop = False

    class Router:  # the shape of LiteLLM 1.83's sync path: one task, this coroutine, on a new loop
        async def async_function_with_fallbacks(self) -> None:
            litellm.completion(**chat_kwargs(provider))

    litellm.completion(**chat_kwargs(provider))
    with Ticker(clock, step=0.02, when=lambda: limiter._engine.queue_length > 0), \
            pytest.raises(RateLimitQueueTimeout):
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(Router().async_function_with_fallbacks())
        finally:
            loop.close()
    assert not [r for r in caplog.records if "runs an asyncio event loop" in r.getMessage()]
    _waiting._warned_loop = False
