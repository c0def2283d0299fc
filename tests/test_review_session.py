"""A review of the money, proxy and zero-code fixes: each test failed on the package before its
fix and shows one defect. Real LiteLLM calls go to servers on 127.0.0.1; time runs on
fake clocks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.testing import FakeClock

from .helpers import JsonServer

WALL_START = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


# ------------------------------------------------------------------ a Gemini endpoint
class GeminiServer:
    """Google AI Studio's generateContent on 127.0.0.1, answering with the usageMetadata it is given."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] = {}
        self.grounding: dict[str, Any] | None = None
        self._server = JsonServer(self._answer)
        self.url = self._server.url

    def _answer(self) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": "ok"}], "role": "model"},
                                     "finishReason": "STOP", "index": 0}
        if self.grounding is not None:
            candidate["groundingMetadata"] = self.grounding
        return {"candidates": [candidate], "usageMetadata": self.usage, "modelVersion": "gemini-2.0-flash"}

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def gemini() -> Iterator[GeminiServer]:
    server = GeminiServer()
    yield server
    server.close()


def test_gemini_tool_use_prompt_tokens_are_not_settled_as_output(gemini: GeminiServer, clock: FakeClock) -> None:
    """Gemini's ``totalTokenCount`` includes ``toolUsePromptTokenCount`` (the search results /
    tool output Gemini reads back: prompt-side tokens). LiteLLM keeps them out of
    ``prompt_tokens`` (1.83.4: always; 1.110.2: when the answer was grounded with Google Search,
    as they are not billed as tokens then) but passes ``totalTokenCount`` through as
    ``total_tokens``. ``_usage_counts`` now books "the rest of total_tokens" as OUTPUT: 4,000
    search-result tokens are priced at the output price (and counted in output/token windows),
    for a call that produced 5 output tokens. At most they are input."""
    prices = {"gemini-2.0-flash": {"input_per_million": 1_000_000, "output_per_million": 10_000_000}}
    limiter = HiveLimiter({"pricing": prices, "budget": {"max_daily_spend": 10_000_000}, "state_path": ":memory:"},
                          clock=clock, wall_clock=FakeClock(WALL_START))
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    gemini.grounding = {"webSearchQueries": ["weather in paris"]}
    gemini.usage = {"promptTokenCount": 10, "candidatesTokenCount": 5, "toolUsePromptTokenCount": 4000,
                    "totalTokenCount": 4015}
    litellm.completion(model="gemini/gemini-2.0-flash", api_base=gemini.url, api_key="test-key",
                       messages=[{"role": "user", "content": "weather in paris?"}], max_tokens=100, max_retries=0)
    cost = limiter.get_usage_stats()["cost_today"]
    # 10 prompt + 5 output tokens; at the very most the 4,000 tool-use tokens at the INPUT price.
    most = (10 + 4000) * 1 + 5 * 10
    assert cost <= most, f"settled at {cost}: Gemini's tool-use prompt tokens were priced as output tokens"


# ------------------------------------------------------------------ a wall clock stepped back
class SteppableWall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


UNIT_PRICE = {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}


def test_spend_kept_in_the_newest_day_after_a_clock_step_back_survives_a_restart(
        provider: Any, clock: FakeClock, tmp_path: Any) -> None:
    """Spend settled while the wall clock is stepped back is counted in the newest window in
    memory; the state file must record it there too. Recorded under the stepped-back time (the
    day before), a restart or another process tailing the file (apply_external skips rows older
    than the current window) gave the newest day less spend than the process counted: the 8
    settled during the step back were forgotten and the daily budget reopened by that much."""
    from .helpers import chat_kwargs

    state = str(tmp_path / "state.sqlite")
    config = {"pricing": UNIT_PRICE, "state_path": state, "budget": {"max_daily_spend": 1000}}
    wall = SteppableWall(WALL_START + 16 * 3600 - 2)  # 2027-01-15 23:59:58 UTC
    limiter = HiveLimiter(config, clock=clock, wall_clock=wall)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    wall.now += 3  # 00:00:01 on the 16th
    litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 8 on the 16th
    wall.now -= 2  # NTP steps the clock back: 23:59:59 on the 15th
    litellm.completion(**chat_kwargs(provider, max_tokens=5))  # counted in the 16th
    wall.now += 2  # the 16th again
    in_memory = limiter.get_usage_stats()["cost_today"]
    assert in_memory == 16
    litellm.callbacks.clear()
    restarted = HiveLimiter(config, clock=FakeClock(), wall_clock=SteppableWall(wall.now))
    got = restarted.get_usage_stats()["cost_today"]
    assert got == in_memory, f"restarted at {got}: " \
        "the state file puts the spend settled during the step back in the previous day"


# ------------------------------------------------------------------ zero code: enable() after reload()
async def test_enable_after_the_limits_file_was_reloaded_returns_the_reloaded_limiter(
        provider: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented way to change limits and keep the counted usage is reload(); enable() is
    the documented way to fetch the active limiter. Operator edits HIVE_RATELIMIT_CONFIG, the
    program reloads the limiter it holds (reload() with no argument reads the file again), then
    any module fetches the limiter with enable(), which reads the same (edited) file: its
    configuration IS the limiter's current one, so the same limiter comes back. Compared only
    with the configuration the limiter was *first* enabled with, enable() built a new limiter and
    unregistered the old one: the reloaded limits held again from zero (usage counted in memory
    was gone)."""
    from hive_ratelimit_plugin import disable, enable
    from hive_ratelimit_plugin.errors import RateLimitQueueTimeout

    from .helpers import chat_kwargs

    path = tmp_path / "limits.yaml"
    path.write_text("rate_limiting:\n  global: {requests_per_minute: 100}\n  queue: {max_wait_seconds: 0}\n")
    monkeypatch.setenv("HIVE_RATELIMIT_CONFIG", str(path))
    try:
        limiter = enable()
        path.write_text("rate_limiting:\n  global: {requests_per_minute: 1}\n  queue: {max_wait_seconds: 0}\n")
        limiter.reload()  # the edited file
        await litellm.acompletion(**chat_kwargs(provider))  # the one request of this minute
        fetched = enable()  # another module fetching the process-wide limiter
        assert fetched is limiter, "enable() replaced the limiter whose configuration it was given"
        with pytest.raises(RateLimitQueueTimeout):
            await litellm.acompletion(**chat_kwargs(provider))
    finally:
        disable()


def test_a_scope_first_charged_while_the_clock_is_stepped_back_keeps_its_spend(
        provider: Any, clock: FakeClock) -> None:
    """The step-back rule is per counter: a counter that exists keeps its newest window, but one
    created while the clock is stepped back (the first spend of an agent that day, or the first
    after reset_budget) is created in the *older* window and is wiped as soon as the clock comes
    back. Here agent "b" spends 8 while the clock reads 23:59:59 on the 15th (the host is really
    in the 16th, where the global counter puts that spend); once the clock is back, the global
    counter has 16, agent b's own daily budget 0: its spend is forgotten and its budget reopens."""
    from .helpers import chat_kwargs

    config = {"pricing": UNIT_PRICE, "state_path": ":memory:",
              "budget": {"max_daily_spend": 1000}, "agents": {"b": {"max_cost_per_day": 1000}}}
    wall = SteppableWall(WALL_START + 16 * 3600 + 1)  # 2027-01-16 00:00:01 UTC
    limiter = HiveLimiter(config, clock=clock, wall_clock=wall)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    litellm.completion(**chat_kwargs(provider, max_tokens=5, metadata={"agent_id": "a"}))  # 8 on the 16th
    wall.now -= 2  # NTP steps the clock back: 23:59:59 on the 15th
    litellm.completion(**chat_kwargs(provider, max_tokens=5, metadata={"agent_id": "b"}))  # b's first spend
    wall.now += 2  # the 16th again
    stats = limiter.get_usage_stats()
    assert stats["cost_today"] == 16  # the global counter kept both in the newest day
    spent_b = limiter._engine.spend("agent:b", "day")[0]
    assert spent_b == 8, f"agent b's daily spend reads {spent_b} once the clock is back: its 8 were wiped"
