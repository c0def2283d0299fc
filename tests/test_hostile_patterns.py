"""Hostile patterns of real agent code around LiteLLM calls, against the fake provider, on both
LiteLLM versions: calls made from callbacks that LiteLLM runs *inside* a call (a failure callback, a
sync ``log_pre_api_call``), a second limiter that refuses a call the first admitted, and a callback
ahead of the limiter that keeps LiteLLM 1.83 from running the limiter's own settlement hooks.

Each test asserts what the provider's log shows was sent against what the limiter counted."""
from __future__ import annotations

import asyncio
from typing import Any

import litellm
import pytest
from litellm.integrations.custom_logger import CustomLogger

from hive_ratelimit_plugin import HiveLimiter, RateLimitQueueTimeout
from hive_ratelimit_plugin.fake_provider import Scripted
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from . import helpers
from .conftest import redis_client
from .helpers import Ticker, chat_kwargs, global_usage, wait_until
from .test_calls_from_callbacks import Judge, _limiter, _requests, _wait_for

pytestmark = pytest.mark.usefixtures("contract_backend")  # (each test on both backends)


def _sync_call(provider: FakeProvider, judge: Judge, fail: bool) -> None:
    if fail:
        provider.state.push(Scripted(status=500))
        with pytest.raises(litellm.InternalServerError):
            litellm.completion(**chat_kwargs(provider, max_tokens=5))
    else:
        litellm.completion(**chat_kwargs(provider, max_tokens=5))
    _wait_for(judge.results)


# --------------------------------------------- sync calls from callbacks run inside a sync call
# LiteLLM runs a sync call's failure callbacks inline, before the error reaches the guard ("DO NOT
# MAKE THREADED"), and ``log_pre_api_call`` inline before the send: a judge's ``completion`` there
# met the guard's still-open nesting mark on the same thread and was taken for LiteLLM calling
# itself. Was: sent unadmitted and uncounted (requests used 1 with 2 sent), past any limit.
@pytest.mark.parametrize("hook", ["log_failure_event", "log_pre_api_call"])
def test_a_sync_call_from_a_callback_run_inside_the_call_is_counted(provider: FakeProvider, clock: FakeClock,
                                                                    hook: str) -> None:
    limiter = _limiter(clock, rpm=10)
    judge = Judge(provider, hook)
    litellm.callbacks.append(judge)
    fail = hook == "log_failure_event"
    _sync_call(provider, judge, fail)
    assert type(judge.results[0]).__name__ == "ModelResponse", judge.results
    assert sorted(r.status for r in provider.state.log) == ([200, 500] if fail else [200, 200])
    assert _requests(limiter) == 2
    assert global_usage(limiter)["in_flight"] == 0


@pytest.mark.parametrize("hook", ["log_failure_event", "log_pre_api_call"])
def test_a_sync_call_from_a_callback_run_inside_the_call_keeps_to_the_limit(provider: FakeProvider,
                                                                            clock: FakeClock, hook: str) -> None:
    """One request a minute: the judge's call is refused, nothing more is sent. Was: sent."""
    _limiter(clock, rpm=1)
    judge = Judge(provider, hook)
    litellm.callbacks.append(judge)
    fail = hook == "log_failure_event"
    _sync_call(provider, judge, fail)
    assert isinstance(judge.results[0], RateLimitQueueTimeout), judge.results
    assert [r.status for r in provider.state.log] == ([500] if fail else [200])


async def test_an_async_call_from_a_failure_callback_has_its_429_retried(provider: FakeProvider,
                                                                         clock: FakeClock) -> None:
    """LiteLLM awaits ``async_log_failure_event`` inline, inside the failed call's guard: the judge's
    ``acompletion`` there was taken for a try of LiteLLM's own fallbacks (admitted, but its 429 went
    to the judge unretried). It is a call of its own: its 429 is retried after its Retry-After."""
    limiter = _limiter(clock, rpm=10, max_wait=30)
    judge = Judge(provider, "async_log_failure_event")
    litellm.callbacks.append(judge)
    provider.state.push(Scripted(status=500), Scripted(status=429, headers={"retry-after": "0.1"}))
    with Ticker(clock, step=0.05), pytest.raises(litellm.InternalServerError):
        await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))
    assert judge.results and type(judge.results[0]).__name__ == "ModelResponse", judge.results
    assert [r.status for r in provider.state.log] == [500, 429, 200]
    assert _requests(limiter) == 3
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)


# ---------------------------------------------------------------------- two limiters registered
def _drop_keys(prefix: str) -> None:
    client: Any = redis_client()
    keys = list(client.scan_iter(match="{" + prefix + "}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_a_call_a_second_limiter_refuses_is_not_counted_by_the_first(provider: FakeProvider, clock: FakeClock,
                                                                           sync: bool,
                                                                           request: pytest.FixtureRequest) -> None:
    """Two limiters in ``litellm.callbacks`` (an application's and a library's, say): the second
    refuses a call the first had admitted; nothing is sent, and the first gives its request back.
    Was (async calls only): the first counted it as a request sent, so every refusal by the other
    limiter ate one of its requests per minute (requests used 2 with 1 sent)."""
    first = _limiter(clock, rpm=10)
    if helpers.BACKEND:  # (a prefix of its own: two limiters on one prefix share their counts)
        prefix = helpers.BACKEND["redis"]["key_prefix"] + "-2nd"
        request.addfinalizer(lambda: _drop_keys(prefix))
        second = HiveLimiter({"state_path": ":memory:", "global": {"requests_per_minute": 1},
                              "queue": {"max_wait_seconds": 0}, "backend": helpers.BACKEND["backend"],
                              "redis": {"key_prefix": prefix}}, clock=clock)
        litellm.callbacks.append(second)
    else:
        second = _limiter(clock, rpm=1)
    for _ in range(2):
        try:
            if sync:
                litellm.completion(**chat_kwargs(provider, max_tokens=5))
            else:
                await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))
        except RateLimitQueueTimeout:
            pass
    assert len(provider.state.log) == 1
    assert (_requests(first), _requests(second)) == (1, 1)
    assert global_usage(first)["in_flight"] == 0


# ------------------------------------------------- a callback ahead of the limiter (LiteLLM 1.83)
class Guardrailish(CustomLogger):
    """Returns the response from its success deployment hook, as every ``CustomGuardrail`` does:
    LiteLLM 1.83 then runs that hook of no later callback (the limiter's included)."""

    def __init__(self, raise_in_logging_hook: bool = False) -> None:
        super().__init__()
        self.raise_in_logging_hook = raise_in_logging_hook

    async def async_post_call_success_deployment_hook(self, request_data: Any, response: Any, call_type: Any) -> Any:
        return response

    async def async_logging_hook(self, kwargs: Any, result: Any, call_type: Any) -> Any:
        if self.raise_in_logging_hook:
            raise ValueError("a logging callback's own bug")
        return kwargs, result


def test_a_call_behind_a_guardrail_under_asyncio_run_gives_its_slot_back(provider: FakeProvider,
                                                                         clock: FakeClock) -> None:
    """``asyncio.run(litellm.acompletion(...))``, a guardrail ahead of the limiter: on LiteLLM 1.83
    the call was left to LiteLLM's logging hook, which runs on a logging worker the closed loop never
    runs. Was (1.83.4): its slot held and its tokens uncounted after it returned (in_flight 1,
    tokens 0), and the next call refused by ``concurrent_requests: 1`` until the lease ran out."""
    litellm.callbacks.append(Guardrailish())
    limiter = _limiter(clock, rpm=100, concurrent_requests=1)
    for n in (1, 2):
        asyncio.run(litellm.acompletion(**chat_kwargs(provider, max_tokens=5)))
        assert global_usage(limiter)["in_flight"] == 0
        assert limiter.get_usage_stats()["tokens_today"] == 8 * n  # (3 prompt + 5 completion tokens each)
    assert len(provider.state.log) == 2


async def test_a_callback_ahead_that_raises_in_its_logging_hook_does_not_hold_the_slot(
        provider: FakeProvider, clock: FakeClock) -> None:
    """The same guardrail, and a logging hook of its own that raises (LiteLLM 1.83 then runs no
    later callback's logging hook). Was (1.83.4): the slot held until its lease ran out, the call's
    tokens never counted."""
    litellm.callbacks.append(Guardrailish(raise_in_logging_hook=True))
    limiter = _limiter(clock, rpm=100, concurrent_requests=1)
    await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))
    await asyncio.sleep(0.2)  # (LiteLLM's success logging, done)
    assert global_usage(limiter)["in_flight"] == 0
    assert limiter.get_usage_stats()["tokens_today"] == 8
    await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))  # not refused by the slot


class RaisesAfterTheAnswer(CustomLogger):
    async def async_post_call_success_deployment_hook(self, request_data: Any, response: Any, call_type: Any) -> Any:
        raise ValueError("a guardrail's own bug")


async def test_a_call_served_then_failed_by_a_callback_ahead_is_charged(provider: FakeProvider,
                                                                        clock: FakeClock) -> None:
    """The provider served and billed the call (8 tokens); a callback ahead of the limiter then
    raised. Whether or not the caller sees the error (1.83.4: yes; 1.110.2: LiteLLM logs and drops
    it), the call's spend is counted: at its answer's usage or, not seen, its estimate (14). Was
    (1.83.4): settled as a request the provider refused, at 0 tokens and $0 (an error from
    neither the provider nor the connection now counts as an answer not seen)."""
    litellm.callbacks.append(RaisesAfterTheAnswer())
    limiter = _limiter(clock, rpm=100, tokens_per_minute=100_000)  # (tokens counted: an estimate to charge)
    try:
        await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))
    except ValueError:
        pass
    await asyncio.sleep(0.2)
    assert [r.status for r in provider.state.log] == [200]
    assert global_usage(limiter)["in_flight"] == 0
    assert limiter.get_usage_stats()["tokens_today"] >= 8


def test_an_error_from_neither_the_provider_nor_the_connection_leaves_the_outcome_unseen() -> None:
    """How a sent call's error is read (``outcome_unseen``): an error raised by code around the
    request (a callback's own bug) says nothing of whether the provider served it; the provider's
    answer, a refused connection or an HTTP error say so."""
    import httpx
    import openai

    from hive_ratelimit_plugin._retry import outcome_unseen

    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    answer = httpx.Response(500, request=request)
    assert outcome_unseen(ValueError("a guardrail's own bug"))
    assert outcome_unseen(KeyError("choices"))
    assert not outcome_unseen(openai.InternalServerError("500", response=answer, body=None))
    assert not outcome_unseen(httpx.ConnectError("refused", request=request))
    assert not outcome_unseen(ConnectionRefusedError(111, "Connection refused"))
    assert outcome_unseen(httpx.ReadTimeout("slow", request=request))
    wrapped = ValueError("re-raised")
    wrapped.__cause__ = openai.InternalServerError("500", response=answer, body=None)
    assert not outcome_unseen(wrapped)  # (the provider's answer is in its chain)
