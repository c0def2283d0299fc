"""Calls made from another call's success callback (an LLM judge that grades each answer, an
evaluation logger): LiteLLM runs that callback after the call, in a task (async) or on a thread
of its own (sync), with a copy of the call's context. Such a call is a call of its own: admitted,
counted and retried as any other. Was: it was taken for a call LiteLLM makes inside the finished
call, so a sync one was sent unadmitted and uncounted (past any limit), and an async one's 429
was not retried. Real LiteLLM calls against the fake provider, both LiteLLM versions."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import litellm
import pytest
from litellm.integrations.custom_logger import CustomLogger

from hive_ratelimit_plugin import RateLimitQueueTimeout
from hive_ratelimit_plugin.fake_provider import Scripted
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs, global_usage, make_limiter


def _is_judge(kwargs: dict[str, Any]) -> bool:
    params = kwargs.get("litellm_params") or {}
    return bool((params.get("metadata") or kwargs.get("metadata") or {}).get("judge"))


def _judge_kwargs(provider: FakeProvider) -> dict[str, Any]:
    return chat_kwargs(provider, max_tokens=5, metadata={"judge": True})


def _limiter(clock: FakeClock, rpm: int, max_wait: float = 0, **extra: Any) -> Any:
    return make_limiter(clock, {"state_path": ":memory:", "global": {"requests_per_minute": rpm, **extra},
                                "queue": {"max_wait_seconds": max_wait}})


def _requests(limiter: Any) -> float:
    return global_usage(limiter)["requests_per_minute"]["used"]  # type: ignore[no-any-return]


def _wait_for(results: list[Any], clock: FakeClock | None = None) -> None:
    for _ in range(250):
        if results:
            return
        time.sleep(0.02)
        if clock is not None:
            clock.advance(0.05)
    raise AssertionError("the judge's call did not finish")


class Judge(CustomLogger):
    """Makes one LiteLLM call of its own (sync or async) from the callback method ``hook``, once per
    call judged (LiteLLM may deliver a call's event twice under load), and keeps what it got."""

    def __init__(self, provider: FakeProvider, hook: str) -> None:
        super().__init__()
        self.provider = provider
        self.hook = hook
        self.results: list[Any] = []
        self.seen: set[Any] = set()

    def _first(self, kwargs: dict[str, Any]) -> bool:
        call_id = kwargs.get("litellm_call_id")
        if _is_judge(kwargs) or call_id in self.seen:
            return False
        self.seen.add(call_id)
        return True

    def _judge_sync(self, hook: str, kwargs: dict[str, Any]) -> None:
        if hook == self.hook and self._first(kwargs):
            try:
                self.results.append(litellm.completion(**_judge_kwargs(self.provider)))
            except Exception as exc:
                self.results.append(exc)

    async def _judge_async(self, hook: str, kwargs: dict[str, Any]) -> None:
        if hook == self.hook and self._first(kwargs):
            try:
                self.results.append(await litellm.acompletion(**_judge_kwargs(self.provider)))
            except Exception as exc:
                self.results.append(exc)

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
        self._judge_sync("log_pre_api_call", kwargs)

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._judge_sync("log_success_event", kwargs)

    def log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._judge_sync("log_failure_event", kwargs)

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        await self._judge_async("async_log_success_event", kwargs)

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        await self._judge_async("async_log_failure_event", kwargs)


def test_a_sync_call_from_a_success_callback_is_counted(provider: FakeProvider, clock: FakeClock) -> None:
    limiter = _limiter(clock, rpm=10)
    judge = Judge(provider, "log_success_event")
    litellm.callbacks.append(judge)
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    _wait_for(judge.results)
    assert type(judge.results[0]).__name__ == "ModelResponse", judge.results
    assert [r.status for r in provider.state.log] == [200, 200]
    assert _requests(limiter) == 2


def test_a_sync_call_from_a_success_callback_keeps_to_the_limit(provider: FakeProvider, clock: FakeClock) -> None:
    """One request a minute: the judge's call is refused, nothing more is sent."""
    _limiter(clock, rpm=1)
    judge = Judge(provider, "log_success_event")
    litellm.callbacks.append(judge)
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    _wait_for(judge.results)
    assert isinstance(judge.results[0], RateLimitQueueTimeout), judge.results
    assert [r.status for r in provider.state.log] == [200]


async def test_an_async_call_from_a_success_callback_keeps_to_the_limit(provider: FakeProvider,
                                                                        clock: FakeClock) -> None:
    _limiter(clock, rpm=1)
    judge = Judge(provider, "async_log_success_event")
    litellm.callbacks.append(judge)
    await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))
    await asyncio.to_thread(_wait_for, judge.results)
    assert isinstance(judge.results[0], RateLimitQueueTimeout), judge.results
    assert [r.status for r in provider.state.log] == [200]


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_call_from_a_success_callback_has_its_429_retried(provider: FakeProvider, clock: FakeClock,
                                                                  sync: bool) -> None:
    """The judge's request gets a 429: retried after its Retry-After, as any call's."""
    limiter = _limiter(clock, rpm=10, max_wait=30)
    judge = Judge(provider, "log_success_event") if sync else Judge(provider, "async_log_success_event")
    litellm.callbacks.append(judge)
    provider.state.push(Scripted(status=200), Scripted(status=429, headers={"retry-after": "0.1"}))
    if sync:
        await asyncio.to_thread(litellm.completion, **chat_kwargs(provider, max_tokens=5))
    else:
        await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))
    await asyncio.to_thread(_wait_for, judge.results, clock)
    assert type(judge.results[0]).__name__ == "ModelResponse", judge.results
    assert [r.status for r in provider.state.log] == [200, 429, 200]
    assert _requests(limiter) == 3
