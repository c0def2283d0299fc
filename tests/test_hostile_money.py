"""A hostile pass on money: budgets, spend accounting, persistence and pricing.

Each test here is a defect found by that pass: it failed on the package before its fix. Real
LiteLLM calls go to the fake provider on 127.0.0.1 (or, where a provider must answer with odd
usage, to a small server of this module, also on 127.0.0.1); time-dependent logic runs on
injected fake clocks.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .conftest import REDIS_URL
from .helpers import JsonServer, chat_kwargs

# 2027-01-15 08:00:00 UTC
WALL_START = 1_800_000_000.0
# One currency unit per token: a call's cost reads as its token count.
UNIT_PRICE = {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}


def make(clock: FakeClock, wall: FakeClock, config: dict[str, Any], tmp_path: Path | None = None) -> HiveLimiter:
    config = {"pricing": UNIT_PRICE, "state_path": str(tmp_path / "state.sqlite") if tmp_path else ":memory:",
              **config}
    limiter = HiveLimiter(config, clock=clock, wall_clock=wall)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    return limiter


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(WALL_START)


# ------------------------------------------------------------------ an odd provider
class OddProvider:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 answering with the ``usage`` it is given."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] = {}
        self.content = "ok"
        self._server = JsonServer(self._answer)
        self.url = self._server.url + "/v1"

    def _answer(self) -> dict[str, Any]:
        return {"id": "chatcmpl-odd", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": self.content}}],
                "usage": self.usage}

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def odd() -> Iterator[OddProvider]:
    server = OddProvider()
    yield server
    server.close()


def odd_call(odd: OddProvider, **extra: Any) -> Any:
    kwargs = {"messages": [{"role": "user", "content": "hello there"}], "max_retries": 0, **extra}
    return litellm.completion(model="openai/gpt-4o-mini", api_base=odd.url, api_key="sk-test-SECRET-0123456789",
                              **kwargs)


# ------------------------------------------------------------------ usage
@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 3, "total_tokens": 503},  # completion_tokens left out
    {"prompt_tokens": 3, "completion_tokens": None, "total_tokens": 503},
    {"prompt_tokens": 3, "completion_tokens": -5, "total_tokens": 503},
    {"prompt_tokens": 3},  # and no total either: the estimate (max_tokens) stands
    {"prompt_tokens": 3, "completion_tokens": 0},
], ids=["missing", "null", "negative", "missing-no-total", "zero-no-total"])
def test_usage_without_a_sane_completion_count_is_not_settled_as_zero_output(
        usage: dict[str, Any], odd: OddProvider, clock: FakeClock, wall: FakeClock) -> None:
    """A chat answer whose usage gives the prompt tokens but no usable completion count (left
    out, null, negative) was settled as if it had produced no output at all: only its 3 prompt
    tokens were counted, though its total says 503 tokens and it reserved 9 + 1000. The
    provider bills the 500 output tokens: the spend is lost, and a budget is overspent by it.
    (A negative or missing prompt count keeps the estimate; a missing output count must not
    become zero.)"""
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 1_000_000}})
    odd.usage = usage
    odd.content = " ".join(["ok"] * 500)
    odd_call(odd, max_tokens=1000)
    cost = limiter.get_usage_stats()["cost_today"]
    # At least what the provider's total says was used (503), at most the worst case reserved.
    assert cost >= 503, f"settled at {cost}: the answer's output tokens were counted as zero"


@pytest.mark.parametrize("usage", [
    {"completion_tokens": 5, "total_tokens": 1005},  # prompt_tokens left out
    {"prompt_tokens": None, "completion_tokens": 5, "total_tokens": 1005},
    {"completion_tokens": 5},  # and no total either
], ids=["missing", "null", "missing-no-total"])
def test_usage_without_a_prompt_count_is_not_settled_as_zero_input(
        usage: dict[str, Any], odd: OddProvider, clock: FakeClock, wall: FakeClock) -> None:
    """A chat answer whose usage gives the output tokens but no prompt count (left out or null:
    LiteLLM makes it 0) was settled as if its prompt had been free: 5 tokens counted for a call
    that sent about 1,000 (docs/budgets.md: "a usage that leaves a count out keeps that count's
    estimate"). The provider bills the prompt; a budget is overspent by it. The rest of the
    total is the prompt; without a total, the prompt's estimate stands."""
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 1_000_000}})
    odd.usage = usage
    odd_call(odd, max_tokens=10, messages=[{"role": "user", "content": "hello " * 1000}])
    cost = limiter.get_usage_stats()["cost_today"]
    assert cost >= 1000, f"settled at {cost}: the prompt was counted as zero tokens"


# ------------------------------------------------------------------ Redis
def test_spend_kept_during_a_redis_outage_reaches_redis_when_the_process_exits_after_it_returns(
        provider: FakeProvider, clock: FakeClock, wall: FakeClock, redis_prefix: str) -> None:
    """A settlement made while Redis did not answer is kept in the process, to be "written to
    Redis as soon as it answers again" (docs/deployment.md). But it is written only by the next
    call that reaches Redis: a process whose last call was settled during a blip, and which then
    exits with Redis back (a cron-job agent), takes the spend with it; the exit handler settles
    open calls and flushes the state file, but never writes the kept settlements to Redis. The
    shared budget then never sees that spend."""
    import redis

    from hive_ratelimit_plugin.plugin import _settle_at_exit

    config = {"budget": {"max_daily_spend": 1000}, "backend": REDIS_URL, "redis": {"key_prefix": redis_prefix}}
    limiter = make(clock, wall, config)
    eng: Any = limiter._engine
    real = eng._settle_script
    refused = []

    def settle_once_refused(*args: Any, **kwargs: Any) -> Any:
        if not refused:
            refused.append(1)
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return real(*args, **kwargs)

    eng._settle_script = settle_once_refused
    # No other call of this process writes the kept settlement before it exits: on LiteLLM 1.83.4
    # the sync success handler's thread may reach Redis meanwhile, and its call would replay it
    # (fine, but then the exit path below is not what wrote it).
    real_replay = eng._replay
    eng._replay = lambda: 0
    litellm.completion(**chat_kwargs(provider, max_tokens=5))  # costs 8; its settlement finds Redis gone
    assert eng.backend_info()["pending_settlements"] == 1
    clock.advance(eng.retry_interval + 1)  # Redis is back (it always was, for everyone else)
    eng._replay = real_replay
    _settle_at_exit(weakref.ref(limiter))  # the process exits
    litellm.callbacks.clear()
    other = make(FakeClock(), wall, config)  # another process on the same Redis
    assert other.get_usage_stats()["cost_today"] == 8, "the spend settled during the blip never reached Redis"


def test_a_settlement_kept_while_another_thread_finds_redis_back_is_still_written(
        provider: FakeProvider, clock: FakeClock, wall: FakeClock, redis_prefix: str) -> None:
    """Two threads talk to Redis at once: one's settlement fails (a blip) while another's call,
    sent before the blip was noticed, comes back after it. That call finds Redis back and ends
    the outage before the failed settlement is kept. Kept with Redis "up", the settlement was
    written by no later call (they replay only during an outage), not even at exit: its spend
    never reached the shared budget. (Seen in CI on LiteLLM 1.83.4, where the sync success
    handler runs on a thread of its own.)"""
    import redis

    from hive_ratelimit_plugin import status as _status
    from hive_ratelimit_plugin.plugin import _settle_at_exit

    config = {"budget": {"max_daily_spend": 1000}, "backend": REDIS_URL, "redis": {"key_prefix": redis_prefix}}
    limiter = make(clock, wall, config)
    eng: Any = limiter._engine
    real_settle, real_begins = eng._settle_script, eng._outage_begins
    refused: list[int] = []

    def settle_once_refused(*args: Any, **kwargs: Any) -> Any:
        if not refused:
            refused.append(1)
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return real_settle(*args, **kwargs)

    def outage_begins_then_another_thread_answers() -> None:
        real_begins()
        eng._next_try = -math.inf  # (that thread passed the check before the outage was noticed)
        assert eng._peek([], [], [], [], []) is not None
        assert eng.available, "the other thread's call did not end the outage"

    eng._settle_script = settle_once_refused
    eng._outage_begins = outage_begins_then_another_thread_answers
    # (The status thread's tick reads the spend from Redis, and any call to Redis writes what was
    # kept: held off until the settlement is seen kept.)
    with _status.PUBLISHER._publishing:
        litellm.completion(**chat_kwargs(provider, max_tokens=5))  # costs 8; its settlement finds Redis gone
        assert eng.available and eng.backend_info()["pending_settlements"] == 1
    _settle_at_exit(weakref.ref(limiter))  # the process exits, Redis up all along
    litellm.callbacks.clear()
    other = make(FakeClock(), wall, config)  # another process on the same Redis
    assert other.get_usage_stats()["cost_today"] == 8, "the kept settlement never reached Redis"


def test_usage_with_only_a_total_is_not_priced_all_as_input(odd: OddProvider, clock: FakeClock,
                                                             wall: FakeClock) -> None:
    """An answer whose usage gives only ``total_tokens`` (LiteLLM fills prompt and completion with
    zeros) was settled as if every token were a prompt token, at the input price. With output 10x
    the input price (gpt-4o's is 4x, o1's 4x, Claude's 5x) a call that produced 500 output tokens
    was counted at a tenth of its bill. Its reservation (9 prompt + 1000 output tokens) or the
    total less the prompt estimate priced as output would be conservative; the input price is not."""
    prices = {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 10_000_000}}
    limiter = make(clock, wall, {"pricing": prices, "budget": {"max_daily_spend": 1_000_000}})
    odd.usage = {"total_tokens": 503}
    odd.content = " ".join(["ok"] * 500)
    odd_call(odd, max_tokens=1000)
    cost = limiter.get_usage_stats()["cost_today"]
    assert cost >= 4000, f"settled at {cost}: 500 output tokens priced at the input price"


# ------------------------------------------------------------------ clocks
class SteppableWall:
    """A wall clock that can be stepped back, as NTP (or a resumed VM) steps a host's clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_wall_clock_stepped_back_across_midnight_does_not_forget_the_days_spend(
        provider: FakeProvider, clock: FakeClock) -> None:
    """Budget counters keep one window per scope and kind, and a counter whose window start
    differed from the calendar's was replaced by an empty one, whichever way time moved. A host
    clock stepped back 2 s just after midnight (NTP) wiped the new day's spend (its counter was
    replaced by an empty one for the day before), and a call then found the daily budget open in
    full. As on Redis, only a newer window replaces a counter: a clock stepped back keeps counting
    in the newest window, and no spend is forgotten."""
    from hive_ratelimit_plugin.errors import BudgetExceededError

    wall = SteppableWall(WALL_START + 16 * 3600 - 2)  # 2027-01-15 23:59:58 UTC
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 25}})  # type: ignore[arg-type]
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 16 of 25 spent on the 15th
    wall.now += 3  # 00:00:01 on the 16th
    litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 8 on the 16th
    wall.now -= 2  # NTP steps the clock back: 23:59:59 on the 15th again
    assert limiter.get_usage_stats()["cost_today"] == 8, "the newest day's spend was forgotten"
    litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 8 + 8, counted in the newest day
    wall.now += 2  # midnight again
    assert limiter.get_usage_stats()["cost_today"] == 16
    with pytest.raises(BudgetExceededError):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 16 + 14 > 25


# ------------------------------------------------------------------ budgets changed while calls wait
async def test_a_call_queued_before_a_budget_was_set_is_held_to_it_at_its_worst_case(
        provider: FakeProvider, clock: FakeClock, wall: FakeClock) -> None:
    """A call's worst-case cost is worked out when it arrives, and only if a budget applies then.
    A call that was waiting in the queue (here for a request limit) when ``set_budget`` added a
    budget is re-scoped to the new budget but keeps its worst case of 0: it is admitted however
    little is left and the budget is overspent. ``set_budget`` "takes effect on the next call";
    a call not yet sent must not slip past it."""
    import asyncio

    from hive_ratelimit_plugin.errors import BudgetExceededError

    from .helpers import wait_until

    limiter = make(clock, wall, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 300}})
    await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))  # costs 8
    waiting = asyncio.create_task(litellm.acompletion(**chat_kwargs(provider, max_tokens=5)))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    limiter.set_budget(max_daily_spend=10)  # 8 spent: 2 left, the waiting call may cost 14
    clock.advance(61)
    with pytest.raises(BudgetExceededError):
        await waiting
    assert limiter.get_usage_stats()["cost_today"] <= 10


# ------------------------------------------------------------------ absurd usage
def test_an_absurd_output_count_does_not_turn_a_served_sync_call_into_an_error(
        odd: OddProvider, clock: FakeClock, wall: FakeClock) -> None:
    """A provider reporting an output count too large for a float (a JSON integer of 400 digits,
    which LiteLLM passes through as a Python int) made the settlement's price arithmetic raise
    OverflowError: a sync caller got that error for a call the provider had served (and billed),
    and its reservation stayed open (slot held, nothing counted) until its lease ran out. The
    limiter must settle it (at its worst case, or capped) and hand back the answer."""
    limiter = make(clock, wall, {"budget": {"max_daily_spend": 1_000_000}})
    odd.usage = {"prompt_tokens": 3, "completion_tokens": 10**400, "total_tokens": 503}
    response = odd_call(odd, max_tokens=1000)  # raised OverflowError
    assert response.choices[0].message.content == "ok"
    stats = limiter.get_usage_stats()
    assert stats["levels"]["global"]["global"]["in_flight"] == 0
    assert stats["cost_today"] > 0


def test_an_absurd_token_count_is_not_taken_for_a_redis_outage_and_its_spend_kept(
        odd: OddProvider, clock: FakeClock, wall: FakeClock, redis_prefix: str) -> None:
    """With the Redis backend, a usage of 10**18 output tokens made the settlement script's
    HINCRBY of the token count fail ("value is not an integer": Lua turns it into 1e+18). The
    plugin took that refusal for an outage: the whole process switched to its outage policy, and
    the kept settlement, replayed when the next call reached Redis, failed again and was dropped:
    the call's spend never reached the shared budget. A count no call can reach is not trusted:
    the call is settled at its worst case (its prompt and max_tokens), as an answer without usage."""
    config = {"budget": {"max_daily_spend": 1_000_000}, "backend": REDIS_URL, "redis": {"key_prefix": redis_prefix}}
    limiter = make(clock, wall, config)
    odd.usage = {"prompt_tokens": 3, "completion_tokens": 10**18, "total_tokens": 10**18 + 3}
    odd_call(odd, max_tokens=1000)
    assert limiter._engine.available, "a refused script was taken for a Redis outage"
    clock.advance(5)
    stats = limiter.get_usage_stats()
    assert stats["cost_today"] == 3 + 1000, "the call was not settled at its worst case"
    assert stats["tokens_today"] == 3 + 1000
