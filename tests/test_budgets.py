"""Money budgets: reservations, breakers, warnings, unknown prices, runaway loops, per-run caps."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.errors import BudgetExceededError, RateLimitQueueTimeout, RunawayDetectedError
from hive_ratelimit_plugin.fake_provider import Scripted
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs, wait_until, with_backend

# Contract: every test here runs against the in-memory and the Redis backend.
pytestmark = pytest.mark.usefixtures("contract_backend")

# 2027-01-15 08:00:00 UTC: a wall clock for calendar windows.
WALL_START = 1_800_000_000.0
# One currency unit per token makes costs easy to read: a call with 3 prompt tokens and 5 output
# tokens (what the fake provider reports for chat_kwargs) costs 8.
UNIT_PRICE = {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}
FORBIDDEN = ("rate limit", "429", "capacity", "too many requests")


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(WALL_START)


def make(clock: FakeClock, wall: FakeClock, config: dict[str, Any], tmp_path: Path | None = None) -> HiveLimiter:
    config = {"pricing": UNIT_PRICE, "state_path": str(tmp_path / "state.sqlite") if tmp_path else ":memory:",
              **config}
    limiter = HiveLimiter(with_backend(config), clock=clock, wall_clock=wall)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    return limiter


def small(provider: FakeProvider, **extra: Any) -> dict[str, Any]:
    """A call whose worst case is 14 (9 estimated prompt tokens + max_tokens 5) and which costs 8."""
    return chat_kwargs(provider, max_tokens=5, **extra)


def assert_budget_error(exc: BaseException) -> None:
    assert isinstance(exc, BudgetExceededError)
    assert isinstance(exc, litellm.BudgetExceededError)  # LiteLLM's Router and retries do not retry it
    text = str(exc).lower()
    for phrase in FORBIDDEN:
        assert phrase not in text, phrase


def test_a_process_that_has_made_no_call_shows_the_global_budget(provider: FakeProvider, clock: FakeClock,
                                                                  wall: FakeClock) -> None:
    """A monitoring process (or one just started) read ``remaining_budget: None`` ("no budget")
    and no spend until it made a call itself; with Redis, other processes' spend is shown too."""
    first = make(clock, wall, {"budget": {"max_daily_spend": 1000}})
    litellm.completion(**small(provider))
    litellm.callbacks.clear()
    fresh = make(clock, wall, {"budget": {"max_daily_spend": 1000}})
    stats = fresh.get_usage_stats()
    assert stats["remaining_budget"] is not None and "global" in stats["budgets"]
    if first.get_usage_stats()["backend"].get("type") == "redis":  # (shared spend)
        assert stats["remaining_budget"] == 992 and stats["cost_today"] == 8
    else:
        assert stats["remaining_budget"] == 1000


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_spent_budget_stops_calls(mode: str, provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """Once the daily budget is spent, calls raise BudgetExceededError and nothing is sent."""
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 22}})

    async def call() -> Any:
        if mode == "sync":
            return litellm.completion(**small(provider))
        return await litellm.acompletion(**small(provider))

    await call()
    await call()  # worst case 8 + 14 fits 22; spent 16
    assert limiter.get_usage_stats()["cost_today"] == 16
    with pytest.raises(BudgetExceededError, match="cannot cover") as info:
        await call()  # 16 + 14 > 22
    assert_budget_error(info.value)
    limiter.set_budget(max_daily_spend=16)  # now spent: the breaker is open
    with pytest.raises(BudgetExceededError) as info:
        await call()
    assert_budget_error(info.value)
    assert provider.state.count() == 2
    err = info.value
    assert err.scope == "global" and err.limit == "max_cost_per_day" and err.window == "day"
    assert err.spent == 16 and err.budget == 16 and err.remaining == 0
    assert "daily budget of global is spent" in str(err) and "2027-01-15 UTC" in str(err)
    assert err.retry_after == pytest.approx(16 * 3600)  # until midnight UTC


@pytest.mark.parametrize("status", [None, 429])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_router_does_not_retry_a_budget_stop(mode: str, status: int | None, provider: FakeProvider,
                                                     clock: FakeClock, wall: FakeClock,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A Router with ``num_retries`` raises a budget stop at once, and its deployments stay up for
    the other agents. It retried it, with backoff, on LiteLLM 1.83 (whose BudgetExceededError has
    no status code) and under ``litellm.budget_exceeded_status_code = 429`` (LiteLLM's switch back
    to its old status), where it also cooled down every deployment of the group: one agent's
    spent budget answered everyone else with "no deployments available"."""
    if status is not None:
        monkeypatch.setattr(litellm, "budget_exceeded_status_code", status, raising=False)
    limiter = make(clock, wall, {"agents": {"spender": {"max_cost_per_day": 10}}})
    deployment = {"model_name": "m", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": provider.url, "api_key": "sk-test-0123456789"}}
    router = litellm.Router(model_list=[deployment, dict(deployment)], num_retries=2, retry_after=0)

    async def call(agent: str) -> Any:
        kw = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5,
              "metadata": {"agent_id": agent}}
        return router.completion(**kw) if mode == "sync" else await router.acompletion(**kw)

    with pytest.raises(BudgetExceededError) as info:
        await call("spender")  # worst case 14 > 10
    assert_budget_error(info.value)
    assert limiter.get_usage_stats()["rejected"] == {"max_cost_per_day": 1}  # (not retried)
    assert provider.state.count() == 0
    await call("other")
    assert provider.state.count() == 1
    assert info.value.status_code not in (429, None) and not litellm._should_retry(info.value.status_code)


def test_a_budget_stop_survives_pickling_and_can_be_raised_with_a_message_alone(
        provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """A budget stop raised in a worker process reaches its pool (``ProcessPoolExecutor``,
    ``multiprocessing``, Celery) pickled: it could not be unpickled (its fields were required
    keywords), and the pool broke (``BrokenProcessPool``) instead of handing the caller the error.
    The specification's own breaker, ``raise BudgetExceededError("Daily spending limit reached")``,
    was a ``TypeError`` for the same reason."""
    make(clock, wall, {"budget": {"max_daily_spend": 10}})
    with pytest.raises(BudgetExceededError) as info:
        litellm.completion(**small(provider))  # worst case 14 > 10
    for err in (info.value, RunawayDetectedError("loop", scope="agent:a", limit="runaway", spent=21.0,
                                                 budget=20.0, window="runaway", retry_after=600.0)):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert (back.scope, back.limit, back.window, back.spent, back.budget, back.remaining, back.retry_after,
                back.status_code) == (err.scope, err.limit, err.window, err.spent, err.budget, err.remaining,
                                      err.retry_after, err.status_code)
    with pytest.raises(litellm.BudgetExceededError, match="Daily spending limit reached") as own:
        raise BudgetExceededError("Daily spending limit reached")
    assert own.value.scope is None and own.value.remaining is None and own.value.retry_after is None
    assert_budget_error(own.value)


async def test_worst_case_that_does_not_fit_is_refused(provider: FakeProvider, clock: FakeClock,
                                                       wall: FakeClock) -> None:
    """A call whose worst-case cost exceeds what is left is refused, so the budget is never overshot."""
    make(clock, wall, {"budget": {"max_hourly_spend": 20}})
    await litellm.acompletion(**small(provider))  # reserves 14, settles 8
    with pytest.raises(BudgetExceededError, match="cannot cover this call") as info:
        await litellm.acompletion(**small(provider))  # 8 + 14 > 20
    assert_budget_error(info.value)
    assert provider.state.count() == 1


async def test_budget_held_by_reservations_waits_instead_of_failing(
    provider: FakeProvider, clock: FakeClock, wall: FakeClock
) -> None:
    """When only in-flight reservations fill the budget, the next call waits for them to settle."""
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 25}})
    provider.state.latency = 0.2
    first = asyncio.create_task(litellm.acompletion(**small(provider)))  # reserves 14
    await wait_until(lambda: limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 1)
    second = asyncio.create_task(litellm.acompletion(**small(provider)))  # 14 + 14 > 25: waits
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    assert limiter.get_usage_stats()["queued"] == 1
    await asyncio.wait_for(asyncio.gather(first, second), 5)  # first settles at 8: 8 + 14 fits
    assert limiter.get_usage_stats()["cost_today"] == 16


async def test_raising_the_budget_admits_a_waiting_call_at_once(
    provider: FakeProvider, clock: FakeClock, wall: FakeClock
) -> None:
    """A call waiting for in-flight reservations to settle is admitted as soon as the budget is
    raised, without waiting for them."""
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 25}})
    provider.state.push(Scripted(status=200, delay=2.0))
    first = asyncio.create_task(litellm.acompletion(**small(provider)))  # reserves 14 for 2 s
    def in_flight() -> int:
        return int(limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"])

    await wait_until(lambda: in_flight() == 1)
    second = asyncio.create_task(litellm.acompletion(**small(provider)))  # 14 + 14 > 25: waits
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    limiter.set_budget(max_daily_spend=100)
    await wait_until(lambda: in_flight() == 2, timeout=1.0)
    assert not first.done()
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert limiter.get_usage_stats()["cost_today"] == 16


async def test_fifty_concurrent_calls_racing_for_the_last_dollar(
    provider: FakeProvider, clock: FakeClock, wall: FakeClock
) -> None:
    """50 concurrent calls never overshoot; each either succeeds or gets BudgetExceededError."""
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 100}, "queue": {"max_wait_seconds": 30}})
    provider.state.latency = 0.01
    results = await asyncio.gather(*(litellm.acompletion(**small(provider)) for _ in range(50)),
                                   return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, BudgetExceededError) for e in errors), errors[:3]
    spent = limiter.get_usage_stats()["cost_today"]
    assert spent <= 100
    assert spent == 8 * len(ok) == 8 * provider.state.count()
    # The budget was used, not abandoned early: another worst case (14) no longer fits.
    assert spent + 14 > 100


async def test_nothing_is_shown_reserved_once_every_call_is_done(provider: FakeProvider, clock: FakeClock,
                                                                 wall: FakeClock) -> None:
    """Worst cases that are not exact in binary (a tenth of a unit per token) reserved and given
    back in another order left a float's leftover (1.3e-18), which ``hive-ratelimit status`` drew
    as "+ $0.00000000 reserved by calls in flight" with nothing in flight. Found by helper-58."""
    tenths = {"gpt-4o-mini": {"input_per_million": 100_000, "output_per_million": 300_000}}
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 1000}, "pricing": tenths})
    provider.state.latency = 0.05
    calls = [asyncio.ensure_future(litellm.acompletion(**chat_kwargs(provider, max_tokens=n))) for n in (7, 3, 11, 5)]
    await wait_until(lambda: limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 4)
    assert limiter.get_usage_stats()["budgets"]["global"]["max_cost_per_day"]["reserved"] > 0
    await asyncio.gather(*calls)
    await wait_until(lambda: limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 0)
    assert limiter.get_usage_stats()["budgets"]["global"]["max_cost_per_day"]["reserved"] == 0.0


async def test_window_rollover_closes_the_breaker(provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """An hourly budget stops calls until the clock hour rolls over."""
    make(clock, wall, {"budget": {"max_hourly_spend": 15}})  # one call (worst case 14, cost 8)
    await litellm.acompletion(**small(provider))
    with pytest.raises(BudgetExceededError):
        await litellm.acompletion(**small(provider))
    wall.advance(3599)
    with pytest.raises(BudgetExceededError):
        await litellm.acompletion(**small(provider))
    wall.advance(1)  # 09:00
    await litellm.acompletion(**small(provider))


async def test_set_and_reset_budget_take_effect_on_next_call(
    provider: FakeProvider, clock: FakeClock, wall: FakeClock
) -> None:
    """Raising the budget or resetting spend reopens the breaker at once."""
    limiter = make(clock, wall, {})
    limiter.set_budget(max_daily_spend=15)
    await litellm.acompletion(**small(provider))
    with pytest.raises(BudgetExceededError):
        await litellm.acompletion(**small(provider))
    limiter.set_budget(max_daily_spend=30)
    await litellm.acompletion(**small(provider))
    limiter.set_budget(max_daily_spend=16)
    with pytest.raises(BudgetExceededError):
        await litellm.acompletion(**small(provider))
    limiter.reset_budget()
    assert limiter.get_usage_stats()["cost_today"] == 0
    await litellm.acompletion(**small(provider))
    limiter.set_budget(max_daily_spend=None)  # None removes the budget
    for _ in range(3):
        await litellm.acompletion(**small(provider))


async def test_set_budget_changes_a_global_budget_written_in_the_global_block(
    provider: FakeProvider, clock: FakeClock, wall: FakeClock
) -> None:
    """``global.max_cost_per_day`` is the same budget as ``budget.max_daily_spend`` (docs/budgets.md).
    ``set_budget(max_daily_spend=...)`` wrote only the latter, and the tighter of the two counted:
    raising the budget left the calls stopped at the configured amount, and ``None`` removed
    nothing. The hourly budget, not named, stays."""
    limiter = make(clock, wall, {"global": {"max_cost_per_day": 15, "max_cost_per_hour": 100}})
    await litellm.acompletion(**small(provider))
    with pytest.raises(BudgetExceededError):
        await litellm.acompletion(**small(provider))
    limiter.set_budget(max_daily_spend=30)
    await litellm.acompletion(**small(provider))
    budgets = limiter.get_usage_stats()["budgets"]["global"]
    assert budgets["max_cost_per_day"]["limit"] == 30 and budgets["max_cost_per_hour"]["limit"] == 100
    limiter.set_budget(max_daily_spend=None)  # None removes the budget
    for _ in range(3):
        await litellm.acompletion(**small(provider))
    assert set(limiter.get_usage_stats()["budgets"]["global"]) == {"max_cost_per_hour"}


@pytest.mark.parametrize("level", ["agent", "user", "model"])
async def test_set_budget_keeps_the_limits_a_glob_gave(level: str, provider: FakeProvider, clock: FakeClock,
                                                       wall: FakeClock) -> None:
    """``set_budget(agent_id="bot", ...)`` for an agent that ``agents: {"*": ...}`` governs (a user
    under ``users: {"*": ...}``, a model under a glob or its ``provider/`` name) made it a block
    of its own holding the budget alone, which wins over the glob wholly: its request limits and
    its other budgets were gone, and it called unlimited."""
    limits = {"requests_per_minute": 1, "max_cost_per_hour": 100}
    config: dict[str, Any] = {"queue": {"max_wait_seconds": 0}}
    if level == "model":
        config["providers"] = {"openai": {"openai/gpt-4o-mini": limits}}
    else:
        config[f"{level}s"] = {"*": limits}
    limiter = make(clock, wall, config)
    extra: dict[str, Any] = {"metadata": {"agent_id": "bot"}} if level == "agent" else {"user": "bot"}
    await litellm.acompletion(**small(provider, **extra))
    where: dict[str, Any] = {"model": {"provider": "openai", "model": "gpt-4o-mini"}}.get(level, {f"{level}_id": "bot"})
    limiter.set_budget(max_daily_spend=1000, **where)
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**small(provider, **extra))
    assert provider.state.count() == 1
    scope = {"model": "model:openai/gpt-4o-mini"}.get(level, f"{level}:bot")
    budgets = limiter.get_usage_stats()["budgets"][scope]
    assert budgets["max_cost_per_day"]["limit"] == 1000 and budgets["max_cost_per_hour"]["limit"] == 100


async def test_a_removed_budget_leaves_the_stats(provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """A budget removed (``set_budget(...=None)``, or a reload without it) is gone from the stats
    and the dashboard at once, not shown as spent and tripped while calls go through; the limits
    that stay are shown as they now are."""
    limiter = make(clock, wall, {"agents": {"bot": {"max_cost_per_day": 20, "requests_per_minute": 50}}})
    limiter.set_budget(max_daily_spend=20)
    bot = {"metadata": {"agent_id": "bot"}}
    await litellm.acompletion(**small(provider, **bot))  # 8 spent
    stats = limiter.get_usage_stats()
    assert set(stats["budgets"]) == {"global", "agent:bot"} and stats["remaining_budget"] == 12
    limiter.set_budget(max_daily_spend=None)
    limiter.reload({"pricing": UNIT_PRICE, "agents": {"bot": {"requests_per_minute": 40}},
                    **with_backend({}), "state_path": ":memory:"})
    for _ in range(2):
        await litellm.acompletion(**small(provider, metadata={"agent_id": "other"}))  # (no agent limits)
    stats = limiter.get_usage_stats()
    assert stats["budgets"] == {} and stats["remaining_budget"] is None
    assert stats["levels"]["agent"]["agent:bot"]["requests_per_minute"]["limit"] == 40


async def test_levels_have_their_own_budgets(provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """An agent's budget stops that agent only; set_budget works per level too."""
    limiter = make(clock, wall, {"agents": {"looper": {"max_cost_per_hour": 15}}})
    limiter.set_budget(max_daily_spend=15, team_id="growth")
    looper = {"metadata": {"agent_id": "looper"}}
    await litellm.acompletion(**small(provider, **looper))
    with pytest.raises(BudgetExceededError) as info:
        await litellm.acompletion(**small(provider, **looper))
    assert info.value.scope == "agent:looper"
    await litellm.acompletion(**small(provider, metadata={"agent_id": "other"}))
    await litellm.acompletion(**small(provider, metadata={"team_id": "growth"}))
    with pytest.raises(BudgetExceededError) as info:
        await litellm.acompletion(**small(provider, metadata={"team_id": "growth"}))
    assert info.value.scope == "team:growth"
    stats = limiter.get_usage_stats()
    assert stats["spend"]["agent"]["agent:looper"]["hour"]["cost"] == 8
    assert stats["budgets"]["agent:looper"]["max_cost_per_hour"]["remaining"] == 7
    assert stats["cost_today"] == 24


async def test_provider_and_model_budgets(provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """Budgets at provider and model level, from YAML keys and from set_budget."""
    limiter = make(clock, wall, {"providers": {"openai": {"gpt-4o-mini": {"max_cost_per_month": 15}}}})
    await litellm.acompletion(**small(provider))
    with pytest.raises(BudgetExceededError) as info:
        await litellm.acompletion(**small(provider))
    assert info.value.scope == "model:openai/gpt-4o-mini" and info.value.window == "month"
    limiter.set_budget(max_monthly_spend=100, provider="openai", model="gpt-4o-mini")
    limiter.set_budget(max_hourly_spend=23, provider="openai")  # 8 spent: one more call fits
    await litellm.acompletion(**small(provider))
    with pytest.raises(BudgetExceededError) as info:
        await litellm.acompletion(**small(provider))
    assert info.value.scope == "provider:openai"


async def test_warnings_once_per_window(
    provider: FakeProvider, clock: FakeClock, wall: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Each threshold warns once per window, in the log and through on_event."""
    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    limiter = make(clock, wall, {"agents": {"my_production_agent": {"max_cost_per_day": 40}},
                                 "budget": {"warning_thresholds": [0.5, 0.8]}})
    events: list[dict[str, Any]] = []
    limiter.on_event(events.append)
    md = {"metadata": {"agent_id": "my_production_agent"}}
    for _ in range(4):  # spent 8, 16, 24, 32 (each admitted: spent + worst case 14 <= 40)
        await litellm.acompletion(**small(provider, **md))
    kinds = [(e["type"], e.get("threshold")) for e in events if e["type"].startswith("budget_")]
    assert kinds == [("budget_warning", 0.5), ("budget_warning", 0.8)]
    with pytest.raises(BudgetExceededError):
        await litellm.acompletion(**small(provider, **md))  # 32 + 14 > 40
    limiter.set_budget(max_daily_spend=32, agent_id="my_production_agent")
    with pytest.raises(BudgetExceededError):
        await litellm.acompletion(**small(provider, **md))
    assert [e["type"] for e in events].count("budget_exceeded") == 1  # the breaker tripped once
    messages = [r.getMessage() for r in caplog.records]
    assert "50% of daily budget consumed: $24.00 of $40.00 (agent my_production_agent)" in messages
    assert "80% of daily budget consumed: $32.00 of $40.00 (agent my_production_agent)" in messages
    wall.advance(86400)  # a new day: warnings may fire again
    for _ in range(3):
        await litellm.acompletion(**small(provider, **md))
    assert [e["threshold"] for e in events if e["type"] == "budget_warning"][-1] == 0.5


async def test_a_raised_budget_warns_again(
    provider: FakeProvider, clock: FakeClock, wall: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A budget raised after its warning fired (the usual answer to "80 % of the daily budget
    consumed") is a new budget: it warns again when its own 80 % is reached in the same window.
    The warning's mark was kept per window only, so the raised budget was spent in silence."""
    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    limiter = make(clock, wall, {"agents": {"bot": {"max_cost_per_day": 40}}})
    events: list[dict[str, Any]] = []
    limiter.on_event(events.append)
    md = {"metadata": {"agent_id": "bot"}}
    for _ in range(4):  # spent 32: 80 % of 40
        await litellm.acompletion(**small(provider, **md))
    limiter.set_budget(max_daily_spend=100, agent_id="bot")
    for _ in range(6):  # spent 80: 80 % of 100
        await litellm.acompletion(**small(provider, **md))
    warnings = [(e["spent"], e["limit"]) for e in events if e["type"] == "budget_warning"]
    assert warnings == [(32.0, 40.0), (80.0, 100.0)]
    assert "80% of daily budget consumed: $80.00 of $100.00 (agent bot)" in [r.getMessage() for r in caplog.records]


async def test_a_tripped_budget_is_announced_once_by_its_process(
    provider: FakeProvider, clock: FakeClock, wall: FakeClock
) -> None:
    """The settlement that spends a budget announces budget_exceeded; the calls it then refuses
    do not announce it again (with Redis, the settlement's event came from the script and the
    refusal, not knowing it, announced the trip a second time)."""
    from hive_ratelimit_plugin.errors import BudgetExceededError

    # (a call without max_tokens reserves 9 + 1 and, answering 20 tokens, costs 23: past the budget)
    limiter = make(clock, wall, {"agents": {"bot": {"max_cost_per_day": 20}},
                                 "estimation": {"default_output_tokens": 1}})
    provider.state.completion_tokens = 20
    events: list[dict[str, Any]] = []
    limiter.on_event(events.append)
    md = {"metadata": {"agent_id": "bot"}}
    await litellm.acompletion(**chat_kwargs(provider, **md))
    for _ in range(2):
        with pytest.raises(BudgetExceededError):
            await litellm.acompletion(**chat_kwargs(provider, **md))
    assert [(e["spent"], e["limit"]) for e in events if e["type"] == "budget_exceeded"] == [(23.0, 20.0)]
    assert provider.state.count() == 1


async def test_unknown_price_estimate_policy(
    provider: FakeProvider, clock: FakeClock, wall: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A model missing from every price table is priced at the fallback price, warned once, never $0."""
    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 1000},
                                 "fallback_price": {"input_per_million": 1_000_000, "output_per_million": 0}})
    for _ in range(2):
        await litellm.acompletion(**small(provider, model="openai/house-model-x"))
    assert limiter.get_usage_stats()["cost_today"] == 6  # 3 prompt tokens x 1 each, twice
    warnings = [r for r in caplog.records if "no price known for model openai/house-model-x" in r.getMessage()]
    assert len(warnings) == 1
    # (the model as the error names it, without its provider: "openai/house-model-x" was given)
    assert "set rate_limiting.pricing.house-model-x to price it" in warnings[0].getMessage()


async def test_unknown_price_block_policy(provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """With unknown_price: block, a budgeted call to an unpriced model is refused with the fix named."""
    make(clock, wall, {"budget": {"max_daily_spend": 1000}, "unknown_price": "block"})
    with pytest.raises(BudgetExceededError, match=r"Add pricing\.house-model-x") as info:
        await litellm.acompletion(**small(provider, model="openai/house-model-x"))
    assert_budget_error(info.value)
    assert provider.state.count() == 0


async def test_zero_cost_from_litellm_is_not_free(provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """claude-sonnet-4 is absent from LiteLLM's price map (LiteLLM reports $0): a configured price is used."""
    limiter = make(clock, wall, {
        "budget": {"max_daily_spend": 100},
        "pricing": {"claude-sonnet-4": {"input_per_million": 3_000_000, "output_per_million": 15_000_000}},
    })
    resp = await litellm.acompletion(model="anthropic/claude-sonnet-4", api_base=provider.root, api_key="sk-x",
                                     messages=[{"role": "user", "content": "hello there"}], max_tokens=2)
    expected = resp.usage.prompt_tokens * 3 + resp.usage.completion_tokens * 15
    assert limiter.get_usage_stats()["cost_today"] == pytest.approx(expected)


async def test_requests_and_cost_per_run(provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """max_requests_per_run and max_cost_per_run cap each run of an agent separately."""
    make(clock, wall, {"agents": {"worker": {"max_requests_per_run": 2, "max_cost_per_run": 100}}})
    run1 = {"metadata": {"agent_id": "worker", "run_id": "r1"}}
    await litellm.acompletion(**small(provider, **run1))
    litellm.completion(**small(provider, **run1))
    with pytest.raises(BudgetExceededError, match="cap of 2 requests per run") as info:
        await litellm.acompletion(**small(provider, **run1))
    assert info.value.scope == "run:worker/r1" and info.value.limit == "max_requests_per_run"
    with HiveLimiter.scope(agent_id="worker", run_id="r2"):
        await litellm.acompletion(**small(provider))


async def test_cost_per_run(provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """max_cost_per_run stops a run that has spent its money."""
    make(clock, wall, {"agents": {"worker": {"max_cost_per_run": 16}}})
    md = {"metadata": {"agent_id": "worker", "run_id": "r1"}}
    await litellm.acompletion(**small(provider, **md))
    with pytest.raises(BudgetExceededError) as info:
        await litellm.acompletion(**small(provider, **md))  # 8 + 14 > 16
    assert info.value.limit == "max_cost_per_run"


async def test_runaway_loop_trips_the_agents_breaker(
    provider: FakeProvider, clock: FakeClock, wall: FakeClock
) -> None:
    """The same agent repeating an identical request too often is stopped, and says why."""
    limiter = make(clock, wall, {"runaway": {"max_identical_requests": 3, "window_seconds": 60}})
    events: list[dict[str, Any]] = []
    limiter.on_event(events.append)
    md = {"metadata": {"agent_id": "looper"}}
    for _ in range(3):
        await litellm.acompletion(**small(provider, **md))
    with pytest.raises(RunawayDetectedError, match="stuck in a loop") as info:
        await litellm.acompletion(**small(provider, **md))
    assert_budget_error(info.value)
    # The breaker stays open for this agent, even for other requests ...
    with pytest.raises(RunawayDetectedError):
        await litellm.acompletion(**small(provider, metadata={"agent_id": "looper"},
                                          messages=[{"role": "user", "content": "something else"}]))
    # ... but not for other agents; and a reset closes it.
    await litellm.acompletion(**small(provider, metadata={"agent_id": "other"}))
    assert [e["type"] for e in events].count("runaway_detected") == 1
    limiter.reset_budget(agent_id="looper")
    await litellm.acompletion(**small(provider, **md))
    assert provider.state.count() == 5


async def test_runaway_breaker_closes_after_its_cooldown(provider: FakeProvider, clock: FakeClock,
                                                      wall: FakeClock) -> None:
    """A tripped agent is stopped for ``cooldown_seconds``, then may call again (its loop counted
    afresh: the same request trips it again only after ``max_identical_requests`` more)."""
    make(clock, wall, {"runaway": {"max_identical_requests": 2, "window_seconds": 60, "cooldown_seconds": 300}})
    md = {"metadata": {"agent_id": "looper"}}
    for _ in range(2):
        await litellm.acompletion(**small(provider, **md))
    with pytest.raises(RunawayDetectedError) as info:
        await litellm.acompletion(**small(provider, **md))
    assert info.value.retry_after == pytest.approx(300)
    clock.advance(299)
    with pytest.raises(RunawayDetectedError):
        await litellm.acompletion(**small(provider, **md))
    clock.advance(1)
    for _ in range(2):
        await litellm.acompletion(**small(provider, **md))
    with pytest.raises(RunawayDetectedError):
        await litellm.acompletion(**small(provider, **md))
    assert provider.state.count() == 4


async def test_breakers_of_agents_that_never_call_again_are_not_kept(provider: FakeProvider, clock: FakeClock,
                                                                     wall: FakeClock,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent id per job: each one that loops trips its breaker and never calls again. Their
    breakers, cooled down, must not pile up (only the next call of their agent dropped them)."""
    from hive_ratelimit_plugin._budget import RunawayDetector

    monkeypatch.setattr(RunawayDetector, "MAX_AGENTS", 4)
    limiter = make(clock, wall, {"runaway": {"max_identical_requests": 1, "window_seconds": 60,
                                             "cooldown_seconds": 10}})
    for i in range(12):
        md = {"metadata": {"agent_id": f"job-{i}"}}
        await litellm.acompletion(**small(provider, **md))
        with pytest.raises(RunawayDetectedError):
            await litellm.acompletion(**small(provider, **md))
        clock.advance(11)
    assert len(limiter._runaway.tripped) <= 4
    assert "job-11" in limiter._runaway.tripped  # (the latest, still cooling down, is kept)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_calls_refused_before_sending_are_not_a_loop(mode: str, provider: FakeProvider, clock: FakeClock,
                                                           wall: FakeClock) -> None:
    """An agent retrying a call the limiter refused (a full window here; an open breaker alike)
    sends nothing: it was counted as repeating its request and blocked for 10 minutes."""
    make(clock, wall, {"runaway": {"max_identical_requests": 3, "window_seconds": 60},
                       "global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 0}})
    kw = small(provider, metadata={"agent_id": "patient"})

    async def call() -> None:
        if mode == "sync":
            litellm.completion(**kw)
        else:
            await litellm.acompletion(**kw)

    await call()
    for _ in range(6):
        with pytest.raises(RateLimitQueueTimeout):
            await call()
    clock.advance(61)
    await call()
    assert provider.state.count() == 2


async def test_distinct_requests_are_not_a_loop(provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """Different requests, or identical ones spread over time, do not trip the breaker."""
    make(clock, wall, {"runaway": {"max_identical_requests": 3, "window_seconds": 60}})
    for i in range(6):
        await litellm.acompletion(**small(provider, metadata={"agent_id": "a"},
                                          messages=[{"role": "user", "content": f"step {i}"}]))
    for _ in range(6):
        clock.advance(30)
        await litellm.acompletion(**small(provider, metadata={"agent_id": "a"}))


def test_usage_stats_shape(provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """get_usage_stats has the specification's keys and a per-level breakdown."""
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 100, "max_hourly_spend": 50,
                                            "max_monthly_spend": 1000}})
    litellm.completion(**small(provider, metadata={"agent_id": "a", "team_id": "t"}, user="u"))
    s = limiter.get_usage_stats()
    assert s["requests_today"] == 1 and s["tokens_today"] == 8 and s["cost_today"] == 8
    assert s["remaining_budget"] == 92
    assert s["remaining_hourly_budget"] == 42 and s["remaining_monthly_budget"] == 992
    assert s["requests_this_hour"] == s["requests_this_month"] == 1
    assert s["currency"] == "USD"
    for level, key in (("agent", "agent:a"), ("team", "team:t"), ("user", "user:u"),
                       ("model", "model:openai/gpt-4o-mini"), ("provider", "provider:openai")):
        assert s["spend"][level][key]["day"] == {"cost": 8, "requests": 1, "tokens": 8}
    # the specification's own reading of it (section 5: `usage.cost_today > 0.8 * ...`), and a
    # plain dict for JSON
    assert s.cost_today == 8 and s.remaining_budget == 92 and s.spend is s["spend"]
    with pytest.raises(AttributeError, match="no 'cost_yesterday'"):
        _ = s.cost_yesterday
    assert json.loads(json.dumps(s))["cost_today"] == 8


async def test_scenario_1_looping_agent_stops_at_hourly_budget(
    provider: FakeProvider, clock: FakeClock, wall: FakeClock
) -> None:
    """Scenario 1: a looping agent with a $10 hourly budget and 20 concurrent tasks stops at <= $10.00,
    and the recorded spend equals the sum of the costs LiteLLM reported for the responses."""
    limiter = HiveLimiter({"agents": {"test_agent": {"max_cost_per_hour": 10.0}}, "state_path": ":memory:",
                           "queue": {"max_wait_seconds": 30}}, clock=clock, wall_clock=wall)
    litellm.callbacks.append(limiter)
    provider.state.completion_tokens = 2000  # each gpt-4 call costs about $0.12
    reported: list[float] = []
    stopped: list[BudgetExceededError] = []

    async def loop(task: int) -> None:
        step = 0
        while True:
            step += 1
            try:
                resp = await litellm.acompletion(
                    model="openai/gpt-4", api_base=provider.url, api_key="sk-x", max_retries=0, max_tokens=2000,
                    messages=[{"role": "user", "content": f"task {task} step {step}: keep going"}],
                    metadata={"agent_id": "test_agent"},
                )
            except BudgetExceededError as exc:
                stopped.append(exc)
                return
            reported.append(resp._hidden_params["response_cost"])

    await asyncio.wait_for(asyncio.gather(*(loop(i) for i in range(20))), 60)
    spent = limiter.get_usage_stats()["spend"]["agent"]["agent:test_agent"]["hour"]["cost"]
    assert len(stopped) == 20
    assert spent <= 10.00
    assert spent == pytest.approx(sum(reported), rel=1e-9)
    assert spent > 10.00 - 0.13  # it used the budget rather than stopping early
    assert provider.state.count() == len(reported)


@pytest.mark.parametrize("mode", ["sync", "async", "cancelled"])
async def test_a_call_cut_off_after_its_send_counts_its_worst_case(mode: str, provider: FakeProvider,
                                                                   clock: FakeClock, wall: FakeClock) -> None:
    """A call that timed out or was cancelled after its request went out may still have been served,
    and billed: it counts at its worst case (14), never at 0. One the provider refused with an error
    status counts 0."""
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 1000}})
    provider.state.push(Scripted(status=200, delay=1.0))  # answers, but after the caller gave up
    if mode == "cancelled":
        # Cancel once the provider holds the request (not on a timer: admission and LiteLLM's first
        # client set-up can take longer than any fixed delay on a slow machine).
        task = asyncio.create_task(litellm.acompletion(**small(provider)))
        for _ in range(1000):
            if provider.state.in_flight or task.done():
                break
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with pytest.raises((litellm.Timeout, asyncio.TimeoutError)):
            if mode == "sync":
                litellm.completion(**small(provider, timeout=0.2))
            else:
                await litellm.acompletion(**small(provider, timeout=0.2))
    stats = limiter.get_usage_stats()
    assert stats["cost_today"] == 14
    assert stats["levels"]["global"]["global"]["in_flight"] == 0
    provider.state.push(Scripted(status=400))
    with pytest.raises(litellm.BadRequestError):
        if mode == "sync":
            litellm.completion(**small(provider))
        else:
            await litellm.acompletion(**small(provider))
    assert limiter.get_usage_stats()["cost_today"] == 14  # refused by the provider: not billed


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_call_that_never_connected_counts_nothing(mode: str, provider: FakeProvider, clock: FakeClock,
                                                         wall: FakeClock) -> None:
    """A connection refused: the request never reached a provider, so it costs nothing."""
    from .helpers import unused_port

    port = unused_port()  # a port nobody listens on
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 1000}})
    kw = small(provider, api_base=f"http://127.0.0.1:{port}/v1")
    with pytest.raises((litellm.APIConnectionError, litellm.InternalServerError)):  # (LiteLLM says either)
        if mode == "sync":
            litellm.completion(**kw)
        else:
            await litellm.acompletion(**kw)
    assert limiter.get_usage_stats()["cost_today"] == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_stream_cut_off_midway_counts_its_worst_case(mode: str, provider: FakeProvider, clock: FakeClock,
                                                            wall: FakeClock) -> None:
    """The provider began to answer (and bills what it generated): a stream that breaks part-way
    counts at its worst case, not 0."""
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 1000}})
    provider.state.push(Scripted(status=200, cut_after=2))
    read = 0
    with pytest.raises(Exception) as info:  # (LiteLLM raises a different type for it in each version)
        if mode == "sync":
            for _ in litellm.completion(**small(provider, stream=True)):
                read += 1
        else:
            async for _ in await litellm.acompletion(**small(provider, stream=True)):
                read += 1
        raise AssertionError("the stream ended normally")  # (LiteLLM 1.83 ends a cut async stream quietly)
    quiet = isinstance(info.value, AssertionError)
    assert read >= 2 if quiet else read == 2
    # (LiteLLM reports a stream's end or failure from a task or a worker thread)
    await wait_until(lambda: limiter.get_usage_stats()["cost_today"] > 0)
    if quiet:  # settled as a success, from LiteLLM's usage for what was read (prompt and 2 chunks at least)
        assert limiter.get_usage_stats()["cost_today"] >= 5
    else:
        assert limiter.get_usage_stats()["cost_today"] == 14  # the worst case: it was billed 2 tokens and more


def test_several_completions_reserve_each_output(provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """``n=8`` asks the provider for eight completions, all billed: the worst case holds eight
    outputs (9 + 8 x 5 = 49 > 40: refused, nothing sent; n=3: 9 + 15 = 24 fits)."""
    make(clock, wall, {"budget": {"max_daily_spend": 40}})
    with pytest.raises(BudgetExceededError, match="can never fit") as info:
        litellm.completion(**small(provider, n=8))
    assert info.value.retry_after is None  # no window roll-over helps it
    assert provider.state.count() == 0
    litellm.completion(**small(provider, n=3))
    assert provider.state.count() == 1


def test_a_call_that_exactly_fits_the_budget_left_is_admitted(provider: FakeProvider, clock: FakeClock,
                                                               wall: FakeClock) -> None:
    """Costs summed in floats drift (0.0024 + 0.0014 = 0.0038000000000000004): a call whose worst
    case is exactly what is left of the budget still fits; the next one does not."""
    make(clock, wall, {"pricing": {"gpt-4o-mini": {"input_per_million": 100, "output_per_million": 100}},
                       "budget": {"max_daily_spend": 0.0038}})
    for _ in range(3):
        litellm.completion(**small(provider))  # 0.0008 each
    litellm.completion(**small(provider))  # 0.0024 spent, worst case 0.0014: exactly the 0.0038
    with pytest.raises(BudgetExceededError):
        litellm.completion(**small(provider))
    assert provider.state.count() == 4


@pytest.mark.parametrize("where", ["one scope", "two scopes"])
def test_a_refusal_names_the_budget_that_frees_last(where: str, provider: FakeProvider, clock: FakeClock,
                                                     wall: FakeClock) -> None:
    """An hourly and a monthly budget both unable to cover a call: waiting for the hour would not
    help, so the error is the monthly budget's, with its retry_after (to 2027-02-01 00:00 UTC)."""
    if where == "one scope":
        make(clock, wall, {"budget": {"max_hourly_spend": 22, "max_monthly_spend": 22}})
    else:
        make(clock, wall, {"budget": {"max_hourly_spend": 22}, "agents": {"bot": {"max_cost_per_month": 22}}})
    kw = small(provider, metadata={"agent_id": "bot"})
    litellm.completion(**kw)
    litellm.completion(**kw)  # 16 spent of both: the next worst case (14) fits neither
    with pytest.raises(BudgetExceededError) as info:
        litellm.completion(**kw)
    err = info.value
    assert (err.window, err.limit) == ("month", "max_cost_per_month")
    assert err.scope == ("global" if where == "one scope" else "agent:bot")
    month_end = 1_801_440_000.0  # 2027-02-01 00:00:00 UTC
    assert err.retry_after == pytest.approx(month_end - WALL_START)
    assert provider.state.count() == 2


CLAUDE = "anthropic/claude-sonnet-4-5-20250929"  # LiteLLM's price map: cache reads 0.1x, writes 1.25x (1 h: 2x)


@pytest.mark.parametrize(("case", "cached", "written", "ttl"), [
    ("cache read", 1000, 0, "5m"), ("cache write, 5 minutes", 0, 1000, "5m"), ("cache write, 1 hour", 0, 1000, "1h"),
])
def test_prompt_cache_reads_and_writes_are_priced_as_billed(case: str, cached: int, written: int, ttl: str,
                                                           provider: FakeProvider, clock: FakeClock,
                                                           wall: FakeClock) -> None:
    """Anthropic bills tokens read from its prompt cache at a tenth of the input price and tokens
    written to it at 1.25x (2x for an hour): the settled cost is that, not every prompt token at
    the input price (which stopped cache-heavy agents at a tenth of their budget, and let
    cache-writing ones overspend)."""
    limiter = make(clock, wall, {"pricing": {}, "budget": {"max_daily_spend": 100}})
    provider.state.cached_prompt_tokens = cached
    provider.state.cache_written_tokens = written
    provider.state.cache_write_ttl = ttl
    prompt = " ".join(["word"] * 1100)
    resp = litellm.completion(model=CLAUDE, api_base=provider.root, api_key="sk-ant-test-0123456789", max_tokens=5,
                              messages=[{"role": "user", "content": prompt}])
    info = litellm.model_cost[CLAUDE.split("/", 1)[1]]
    inp, out = info["input_cost_per_token"], info["output_cost_per_token"]
    sent = provider.state.log[0].prompt_tokens
    assert sent > 1000 and resp.usage.prompt_tokens == sent  # (LiteLLM's prompt_tokens hold the cache's)
    rate = {"cache read": 0.1, "cache write, 5 minutes": 1.25, "cache write, 1 hour": 2.0}[case] * inp
    billed = (sent - 1000) * inp + 1000 * rate + 5 * out
    assert limiter.get_usage_stats()["cost_today"] == pytest.approx(billed, rel=1e-9)


@pytest.mark.parametrize("with_cache_prices", [True, False])
def test_a_pricing_override_can_price_the_prompt_cache(with_cache_prices: bool, provider: FakeProvider,
                                                      clock: FakeClock, wall: FakeClock) -> None:
    """``rate_limiting.pricing`` takes optional cache prices (a model missing from LiteLLM's map,
    or negotiated prices); without them every prompt token costs the input price."""
    price: dict[str, float] = {"input_per_million": 4.0, "output_per_million": 20.0}
    if with_cache_prices:
        price.update(cache_read_per_million=0.4, cache_write_per_million=5.0, cache_write_1h_per_million=8.0)
    limiter = make(clock, wall, {"pricing": {"claude-sonnet-4-5*": price}, "budget": {"max_daily_spend": 100}})
    provider.state.cached_prompt_tokens = 600
    provider.state.cache_written_tokens = 400
    provider.state.cache_write_ttl = "1h"
    litellm.completion(**_claude_call(provider, None))
    sent = provider.state.log[0].prompt_tokens
    if with_cache_prices:
        billed = (sent - 1000) * 4e-6 + 600 * 0.4e-6 + 400 * 8e-6 + 5 * 20e-6
    else:
        billed = sent * 4e-6 + 5 * 20e-6
    assert limiter.get_usage_stats()["cost_today"] == pytest.approx(billed, rel=1e-9)


def _claude_call(provider: FakeProvider, mark: dict[str, Any] | None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": " ".join(["word"] * 1100)}
    if mark is not None:
        block["cache_control"] = mark
    return {"model": CLAUDE, "api_base": provider.root, "api_key": "sk-ant-test-0123456789", "max_tokens": 5,
            "messages": [{"role": "user", "content": [block]}]}


@pytest.mark.parametrize("ttl", ["5m", "1h"])
def test_a_call_that_asks_for_a_cache_write_reserves_the_write_price(ttl: str, provider: FakeProvider,
                                                                      clock: FakeClock, wall: FakeClock) -> None:
    """A prompt marked with ``cache_control`` may be billed at the cache-write price (1.25x the
    input price; 2x for an hour): its worst case is that, so concurrent cache-writing calls
    cannot together overshoot a budget by the write premium. Here a budget between the two worst
    cases refuses the marked call before it is sent and admits the same call with a shorter (or
    no) write."""
    from hive_ratelimit_plugin._pricing import PriceBook
    from hive_ratelimit_plugin._tokens import count_messages
    from hive_ratelimit_plugin.config import load_config

    price = PriceBook(load_config({})).price("anthropic", CLAUDE)
    five, hour = {"type": "ephemeral"}, {"type": "ephemeral", "ttl": "1h"}
    tin = count_messages(CLAUDE, _claude_call(provider, None)["messages"])
    plain, w5, w1 = price.cost(tin, 5), price.billed(tin, 5, 0, tin), price.billed(tin, 5, 0, tin, tin)
    assert plain < w5 < w1
    lower, upper, marked, shorter = (plain, w5, five, None) if ttl == "5m" else (w5, w1, hour, five)
    make(clock, wall, {"budget": {"max_daily_spend": (lower + upper) / 2}})
    with pytest.raises(BudgetExceededError, match="can never fit"):
        litellm.completion(**_claude_call(provider, marked))
    assert provider.state.count() == 0
    litellm.completion(**_claude_call(provider, shorter))
    assert provider.state.count() == 1


def test_a_one_hour_mark_costs_no_more_where_the_provider_has_no_one_hour_price() -> None:
    """Twice the input price for a one-hour write is Anthropic's (older price maps lack it);
    other providers with a write price (an OpenAI fine-tune, Azure, DeepSeek) bill any write at
    that price: a 1-h mark on their calls reserves no more, and a partial override too."""
    from hive_ratelimit_plugin._pricing import Price, _from_map

    other = _from_map({"input_cost_per_token": 3.75e-6, "output_cost_per_token": 1.5e-5,
                       "cache_creation_input_token_cost": 1.875e-6, "litellm_provider": "openai"}, "ft:gpt-4o")
    assert other.cost(1000, 0, 2) == other.cost(1000, 0, 1) == other.cost(1000, 0) == pytest.approx(3.75e-3)
    claude = _from_map({"input_cost_per_token": 3e-6, "output_cost_per_token": 1.5e-5,
                        "cache_creation_input_token_cost": 3.75e-6}, "claude-3-7-sonnet")
    assert claude.cost(1000, 0, 2) == pytest.approx(6e-3) and claude.cost(1000, 0, 1) == pytest.approx(3.75e-3)
    partial = Price(1e-6, 2e-6, "config", cache_read_per_token=1e-7)  # an override with a read price only
    assert partial.billed(1000, 0, 0, 1000, 1000) == pytest.approx(1e-3)


def test_cache_write_marks_are_found_wherever_litellm_takes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from hive_ratelimit_plugin._tokens import WRITE_1H, WRITE_5M, cache_writes

    five, hour = {"type": "ephemeral"}, {"type": "ephemeral", "ttl": "1h"}
    text = [{"role": "user", "content": "hi"}]
    assert cache_writes({"messages": text}) == 0
    assert cache_writes({"messages": [{"role": "system", "content": "s", "cache_control": five}]}) == WRITE_5M
    assert cache_writes({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                   {"type": "text", "text": "b",
                                                                    "cache_control": hour}]}]}) == WRITE_1H
    assert cache_writes({"messages": text, "system": [{"type": "text", "text": "s", "cache_control": five}]}) == 1
    assert cache_writes({"messages": text, "tools": [{"name": "t", "cache_control": hour}]}) == WRITE_1H
    assert cache_writes({"messages": text, "tools": [{"type": "function",
                                                      "function": {"name": "t", "cache_control": five}}]}) == 1
    assert cache_writes({"messages": text, "cache_control": five}) == WRITE_5M
    assert cache_writes({"messages": text, "cache_control_injection_points": [
        {"location": "message", "role": "system"}]}) == WRITE_5M
    assert cache_writes({"messages": text, "cache_control_injection_points": [
        {"location": "message", "index": -1, "control": hour}]}) == WRITE_1H
    assert cache_writes({"messages": text, "enable_prompt_caching": True}) == WRITE_5M
    monkeypatch.setattr(litellm, "enable_anthropic_prompt_caching", True, raising=False)
    monkeypatch.setattr(litellm, "anthropic_prompt_caching_ttl", "1h", raising=False)
    assert cache_writes({"messages": text}) == WRITE_1H
    assert cache_writes({"messages": "not a list", "tools": 3, "system": None}) == WRITE_1H  # (odd input: no error)
    monkeypatch.setattr(litellm, "enable_anthropic_prompt_caching", False, raising=False)

    class ArrayLike:  # numpy's arrays refuse a truth test
        def __bool__(self) -> bool:
            raise ValueError("ambiguous")

    assert cache_writes({"messages": ({"role": "user", "content": ({"type": "text", "text": "a",
                                                                    "cache_control": ArrayLike()},)},)}) == WRITE_5M


def test_long_prompts_are_priced_at_the_long_context_rate() -> None:
    """Gemini 2.5 Pro bills a prompt over 200k tokens at twice the input price (and 1.5x output):
    its reservation and its cost use that tier, as LiteLLM's own cost does."""
    from hive_ratelimit_plugin._pricing import PriceBook
    from hive_ratelimit_plugin.config import load_config

    price = PriceBook(load_config({})).price("gemini", "gemini/gemini-2.5-pro")
    for prompt in (1000, 300_000):
        a, b = litellm.cost_per_token(model="gemini/gemini-2.5-pro", prompt_tokens=prompt, completion_tokens=2000)
        assert price.cost(prompt, 2000) == pytest.approx(a + b, rel=1e-9)
        assert price.billed(prompt, 2000) == pytest.approx(a + b, rel=1e-9)
    assert price.cost(300_000, 0) == pytest.approx(300_000 * 2 * price.input_per_token, rel=1e-9)


@pytest.mark.parametrize("status", [408, 504])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_timeout_status_from_the_provider_counts_nothing(status: int, mode: str, provider: FakeProvider,
                                                                 clock: FakeClock, wall: FakeClock) -> None:
    """LiteLLM raises its Timeout for a provider's 408 or 504 too; that call was answered, with an
    error: not billed, so it counts nothing (unlike a timeout on the caller's side)."""
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 1000}, "retry": {"max_attempts": 1}})
    provider.state.push(Scripted(status=status))
    with pytest.raises(litellm.Timeout):
        if mode == "sync":
            litellm.completion(**small(provider))
        else:
            await litellm.acompletion(**small(provider))
    assert limiter.get_usage_stats()["cost_today"] == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_retry_made_while_handling_an_error_is_judged_on_its_own(mode: str, provider: FakeProvider,
                                                                         clock: FakeClock, wall: FakeClock) -> None:
    """An agent that retries inside its ``except`` block: the retry's error carries the first
    one in its context, which must not decide how the retry is counted (a refused retry after a
    timeout costs nothing; a timed-out retry after a refused connection costs its worst case)."""
    from .helpers import unused_port

    dead = f"http://127.0.0.1:{unused_port()}/v1"
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 1000}})

    async def call(**extra: Any) -> None:
        if mode == "sync":
            litellm.completion(**small(provider, **extra))
        else:
            await litellm.acompletion(**small(provider, **extra))

    provider.state.push(Scripted(status=200, delay=0.6))
    provider.state.push(Scripted(status=400))
    try:
        await call(timeout=0.2)  # counts its worst case, 14
    except litellm.Timeout:
        with pytest.raises(litellm.BadRequestError):
            await call()  # refused: nothing
    assert limiter.get_usage_stats()["cost_today"] == 14
    provider.state.script.clear()
    provider.state.push(Scripted(status=200, delay=0.6))
    try:
        await call(api_base=dead)  # never connected: nothing
    except (litellm.APIConnectionError, litellm.InternalServerError):
        with pytest.raises(litellm.Timeout):
            await call(timeout=0.2)  # counts its worst case
    assert limiter.get_usage_stats()["cost_today"] == 28


def test_a_one_hour_cache_write_in_a_long_prompt_uses_its_tier_price() -> None:
    """The price map's one-hour write price for prompts over a tier
    (``cache_creation_input_token_cost_above_1hr_above_200k_tokens``) applies to such a write."""
    from hive_ratelimit_plugin._pricing import _from_map

    price = _from_map({"input_cost_per_token": 3e-6, "output_cost_per_token": 1.5e-5,
                       "cache_creation_input_token_cost": 3.75e-6, "cache_creation_input_token_cost_above_1hr": 6e-6,
                       "input_cost_per_token_above_200k_tokens": 6e-6,
                       "output_cost_per_token_above_200k_tokens": 2.25e-5,
                       "cache_creation_input_token_cost_above_200k_tokens": 7.5e-6,
                       "cache_creation_input_token_cost_above_1hr_above_200k_tokens": 1.2e-5})
    assert price.billed(300_000, 0, 0, 100_000, 100_000) == pytest.approx(200_000 * 6e-6 + 100_000 * 1.2e-5)
    assert price.billed(300_000, 0, 0, 100_000, 0) == pytest.approx(200_000 * 6e-6 + 100_000 * 7.5e-6)
    assert price.billed(150_000, 0, 0, 100_000, 100_000) == pytest.approx(50_000 * 3e-6 + 100_000 * 6e-6)
