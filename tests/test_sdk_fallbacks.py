"""LiteLLM's own (SDK) fallbacks, outside a Router: ``completion(..., fallbacks=[...])`` and
``context_window_fallback_dict``. Every request sent is admitted once, against the limits of the
model it goes to; a try that fails is settled as a failed request and gives its slot back.

Was: a call with ``fallbacks=`` was admitted twice (the call, then its first try: 2 requests and
twice the tokens and cost for one request sent), and the bigger model of a context-window fallback
was sent unadmitted (counted on the small model, or not at all)."""

from __future__ import annotations

import asyncio
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter, RateLimitQueueTimeout
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import chat_kwargs, global_usage, make_limiter, wait_until

SMALL, BIG = "gpt-4o-mini", "gpt-4o"
# One unit per token on the small model, ten on the big one: a request of chat_kwargs (3 prompt
# tokens, 5 output tokens as the fake answers) costs 8 on the small model, 80 on the big one.
PRICES = {SMALL: {"input_per_million": 1_000_000, "output_per_million": 1_000_000},
          BIG: {"input_per_million": 10_000_000, "output_per_million": 10_000_000}}


def limiter_for(clock: FakeClock, small: int = 1, big: int = 1) -> HiveLimiter:
    """One call at a time, ``small`` / ``big`` requests a minute on each model, no waiting."""
    return make_limiter(clock, {
        "pricing": PRICES, "state_path": ":memory:", "budget": {"max_daily_spend": 100_000},
        "global": {"requests_per_minute": 100, "concurrent_requests": 1},
        "providers": {"openai": {SMALL: {"requests_per_minute": small}, BIG: {"requests_per_minute": big}}},
        "queue": {"max_wait_seconds": 0},
    })


def requests(limiter: HiveLimiter) -> dict[str, float]:
    """Requests counted this minute: globally and per model (0 for a model never counted)."""
    levels = limiter.get_usage_stats()["levels"]
    out = {"global": levels["global"]["global"]["requests_per_minute"]["used"]}
    for model in (SMALL, BIG):
        scope = levels.get("model", {}).get(f"model:openai/{model}", {})
        out[model] = scope.get("requests_per_minute", {}).get("used", 0)
    return out


def sent(provider: FakeProvider) -> list[tuple[str, int]]:
    return [(r.model, r.status) for r in provider.state.log]


def fallbacks_kwargs(provider: FakeProvider) -> dict[str, Any]:
    return chat_kwargs(provider, model=f"openai/{SMALL}", max_tokens=5, fallbacks=[f"openai/{BIG}"])


def context_kwargs(provider: FakeProvider) -> dict[str, Any]:
    return chat_kwargs(provider, model=f"openai/{SMALL}", max_tokens=5,
                       context_window_fallback_dict={f"openai/{SMALL}": f"openai/{BIG}"})


async def settled(limiter: HiveLimiter) -> None:
    """Wait for LiteLLM's success logging (a task after the call returns) to have run."""
    await wait_until(lambda: not limiter._engine._leases and global_usage(limiter)["in_flight"] == 0)


def settled_sync(limiter: HiveLimiter) -> None:
    asyncio.run(settled(limiter))


# ------------------------------------------------------------------------------- fallbacks=
async def test_async_fallbacks_answered_by_the_first_model_are_one_request(provider: FakeProvider,
                                                                           clock: FakeClock) -> None:
    limiter = limiter_for(clock)
    resp = await litellm.acompletion(**fallbacks_kwargs(provider))
    assert resp.choices[0].message.content
    await settled(limiter)
    assert sent(provider) == [(SMALL, 200)]
    assert requests(limiter) == {"global": 1, SMALL: 1, BIG: 0}
    assert limiter.get_usage_stats()["cost_today"] == 8


def test_sync_fallbacks_answered_by_the_first_model_are_one_request(provider: FakeProvider,
                                                                    clock: FakeClock) -> None:
    limiter = limiter_for(clock)
    resp = litellm.completion(**fallbacks_kwargs(provider))
    assert resp.choices[0].message.content
    settled_sync(limiter)
    assert sent(provider) == [(SMALL, 200)]
    assert requests(limiter) == {"global": 1, SMALL: 1, BIG: 0}
    assert limiter.get_usage_stats()["cost_today"] == 8


@pytest.mark.parametrize("status", [500, 429])
async def test_async_fallback_after_a_failed_try_counts_each_try_on_its_own_model(
        provider: FakeProvider, clock: FakeClock, status: int) -> None:
    limiter = limiter_for(clock)
    provider.state.push_for(SMALL, Scripted(status=status))
    resp = await litellm.acompletion(**fallbacks_kwargs(provider))
    assert resp.choices[0].message.content
    await settled(limiter)
    assert sent(provider) == [(SMALL, status), (BIG, 200)]
    # the failed try: a request on the small model, no tokens, no cost; the answer: the big model's
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}
    assert limiter.get_usage_stats()["cost_today"] == 80


@pytest.mark.parametrize("status", [500, 429])
def test_sync_fallback_after_a_failed_try_counts_each_try_on_its_own_model(
        provider: FakeProvider, clock: FakeClock, status: int) -> None:
    limiter = limiter_for(clock)
    provider.state.push_for(SMALL, Scripted(status=status))
    resp = litellm.completion(**fallbacks_kwargs(provider))
    assert resp.choices[0].message.content
    settled_sync(limiter)
    assert sent(provider) == [(SMALL, status), (BIG, 200)]
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}
    assert limiter.get_usage_stats()["cost_today"] == 80


async def test_async_fallbacks_that_all_fail_give_every_slot_back(provider: FakeProvider, clock: FakeClock) -> None:
    limiter = limiter_for(clock, small=5)
    provider.state.push_for(SMALL, Scripted(status=500))
    provider.state.push_for(BIG, Scripted(status=500))
    with pytest.raises(Exception, match="fallback"):
        await litellm.acompletion(**fallbacks_kwargs(provider))
    await settled(limiter)
    assert sent(provider) == [(SMALL, 500), (BIG, 500)]
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}
    assert limiter.get_usage_stats()["cost_today"] == 0
    # the one slot is free again: the next call goes through
    await litellm.acompletion(**chat_kwargs(provider, model=f"openai/{SMALL}", max_tokens=5))
    assert requests(limiter) == {"global": 3, SMALL: 2, BIG: 1}


# ----------------------------------------------------------------- context_window_fallback_dict
async def test_async_context_window_fallback_is_admitted_on_the_bigger_model(provider: FakeProvider,
                                                                            clock: FakeClock) -> None:
    limiter = limiter_for(clock)
    provider.state.push_for(SMALL, Scripted.context_length_exceeded())
    resp = await litellm.acompletion(**context_kwargs(provider))
    assert resp.choices[0].message.content
    await settled(limiter)
    assert sent(provider) == [(SMALL, 400), (BIG, 200)]
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}
    assert limiter.get_usage_stats()["cost_today"] == 80


def test_sync_context_window_fallback_is_admitted_on_the_bigger_model(provider: FakeProvider,
                                                                     clock: FakeClock) -> None:
    limiter = limiter_for(clock)
    provider.state.push_for(SMALL, Scripted.context_length_exceeded())
    resp = litellm.completion(**context_kwargs(provider))
    assert resp.choices[0].message.content
    settled_sync(limiter)
    assert sent(provider) == [(SMALL, 400), (BIG, 200)]
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}
    assert limiter.get_usage_stats()["cost_today"] == 80


async def test_async_context_window_fallback_waits_for_the_bigger_models_limit(provider: FakeProvider,
                                                                              clock: FakeClock) -> None:
    """The bigger model's own limit holds for the fallback: used up, nothing more is sent to it."""
    limiter = limiter_for(clock, small=5)
    await litellm.acompletion(**chat_kwargs(provider, model=f"openai/{BIG}", max_tokens=5))  # its one request
    provider.state.push_for(SMALL, Scripted.context_length_exceeded())
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**context_kwargs(provider))
    await settled(limiter)
    assert sent(provider) == [(BIG, 200), (SMALL, 400)]
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}


def test_sync_context_window_fallback_waits_for_the_bigger_models_limit(provider: FakeProvider,
                                                                       clock: FakeClock) -> None:
    limiter = limiter_for(clock, small=5)
    litellm.completion(**chat_kwargs(provider, model=f"openai/{BIG}", max_tokens=5))
    provider.state.push_for(SMALL, Scripted.context_length_exceeded())
    with pytest.raises(RateLimitQueueTimeout):
        litellm.completion(**context_kwargs(provider))
    settled_sync(limiter)
    assert sent(provider) == [(BIG, 200), (SMALL, 400)]
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_fallbacks_without_limits_count_the_request_once(provider: FakeProvider, clock: FakeClock,
                                                               sync: bool) -> None:
    """Nothing holding the call back: its one request is still counted once, and paid once."""
    limiter = make_limiter(clock, {"pricing": PRICES, "state_path": ":memory:",
                                   "global": {"requests_per_minute": 100},
                                   "providers": {"openai": {SMALL: {"tokens_per_minute": 1000}}}})
    if sync:
        await asyncio.to_thread(litellm.completion, **fallbacks_kwargs(provider))
    else:
        await litellm.acompletion(**fallbacks_kwargs(provider))
    await settled(limiter)
    assert sent(provider) == [(SMALL, 200)]
    stats = limiter.get_usage_stats()
    assert stats["levels"]["global"]["global"]["requests_per_minute"]["used"] == 1
    assert stats["levels"]["model"][f"model:openai/{SMALL}"]["tokens_per_minute"]["used"] == 8
    assert stats["cost_today"] == 8


async def test_async_streamed_fallback_is_settled_on_the_model_that_answered(provider: FakeProvider,
                                                                            clock: FakeClock) -> None:
    """A streamed answer from the fallback model: settled once read (its success event names the
    call, its reservation the try), not left to its lease."""
    limiter = limiter_for(clock)
    provider.state.push_for(SMALL, Scripted(status=500))
    stream = await litellm.acompletion(**fallbacks_kwargs(provider), stream=True,
                                       stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks
    await settled(limiter)
    assert sent(provider) == [(SMALL, 500), (BIG, 200)]
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}
    assert limiter.get_usage_stats()["cost_today"] == 80


# ------------------------------------------------- fallbacks= and context_window_fallback_dict together
OTHER = "gpt-3.5-turbo"  # the call's fallback model: the context-window fallback goes to BIG instead


def both_kwargs(provider: FakeProvider) -> dict[str, Any]:
    return chat_kwargs(provider, model=f"openai/{SMALL}", max_tokens=5, fallbacks=[f"openai/{OTHER}"],
                       context_window_fallback_dict={f"openai/{SMALL}": f"openai/{BIG}"})


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_tries_context_window_fallback_is_admitted_on_the_bigger_model(provider: FakeProvider,
                                                                              clock: FakeClock, sync: bool) -> None:
    """A try of SDK fallbacks whose prompt is too long for its model goes to the bigger model of
    ``context_window_fallback_dict`` (LiteLLM's behaviour), admitted and counted there. Was: that
    request was sent unadmitted, counted against no limit of the bigger model."""
    limiter = limiter_for(clock)
    provider.state.push_for(SMALL, Scripted.context_length_exceeded())
    if sync:
        resp = await asyncio.to_thread(litellm.completion, **both_kwargs(provider))
    else:
        resp = await litellm.acompletion(**both_kwargs(provider))
    assert resp.choices[0].message.content
    await settled(limiter)
    assert sent(provider) == [(SMALL, 400), (BIG, 200)]
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}
    assert limiter.get_usage_stats()["cost_today"] == 80


async def test_a_tries_context_window_fallback_holds_to_the_bigger_models_limit(provider: FakeProvider,
                                                                               clock: FakeClock) -> None:
    """The bigger model's limit used up: nothing more is sent to it, and LiteLLM goes on to the
    call's next fallback model, as after any failed try."""
    limiter = limiter_for(clock, small=5)
    await litellm.acompletion(**chat_kwargs(provider, model=f"openai/{BIG}", max_tokens=5))  # its one request
    provider.state.push_for(SMALL, Scripted.context_length_exceeded())
    resp = await litellm.acompletion(**both_kwargs(provider))
    assert resp.choices[0].message.content
    await settled(limiter)
    assert sent(provider) == [(BIG, 200), (SMALL, 400), (OTHER, 200)]
    assert requests(limiter) == {"global": 3, SMALL: 1, BIG: 1}


# ------------------------------------------------------------- calls made inside a call
def _judge_positional(provider: FakeProvider, **extra: Any) -> Any:
    """A callback whose pre-call hook makes a LiteLLM call of its own (an LLM judge), passing the
    model and the messages positionally, as ``litellm.acompletion(model, messages)`` allows."""
    from litellm.integrations.custom_logger import CustomLogger

    class Judge(CustomLogger):
        async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> None:
            if not (kwargs.get("metadata") or {}).get("judge"):
                kw = chat_kwargs(provider, max_tokens=5, metadata={"judge": True}, **extra)
                await litellm.acompletion(f"openai/{BIG}", kw.pop("messages"),
                                          **{k: v for k, v in kw.items() if k != "model"})
            return None

    judge = Judge()
    litellm.callbacks.insert(0, judge)  # (before the limiter: the outer call is not admitted yet)
    return judge


async def test_a_call_made_inside_a_call_with_positional_arguments_counts_on_its_model(
        provider: FakeProvider, clock: FakeClock) -> None:
    """A call made from inside another call (here a judge in a pre-call hook) that names its model
    positionally is admitted on that model. Was: the nested path passed the positional arguments on
    unnamed, and LiteLLM's deployment hook (keywords only) admitted it on ``unknown``."""
    limiter = make_limiter(clock, {"pricing": PRICES, "state_path": ":memory:",
                                   "global": {"requests_per_minute": 100},
                                   "providers": {"openai": {SMALL: {"requests_per_minute": 5},
                                                            BIG: {"requests_per_minute": 5}}}})
    _judge_positional(provider)
    resp = await litellm.acompletion(**chat_kwargs(provider, model=f"openai/{SMALL}", max_tokens=5))
    assert resp.choices[0].message.content
    await settled(limiter)
    assert sent(provider) == [(BIG, 200), (SMALL, 200)]
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}
    assert "model:unknown" not in str(limiter.get_usage_stats()["levels"].get("model", {}))


async def test_a_positional_call_inside_a_call_takes_its_context_window_fallback(
        provider: FakeProvider, clock: FakeClock) -> None:
    """The same positional call with a ``context_window_fallback_dict`` whose prompt is too long
    goes on to the bigger model. Was: TypeError ("got multiple values for argument 'model'") from
    naming the bigger model next to the positional one."""
    limiter = make_limiter(clock, {"pricing": PRICES, "state_path": ":memory:",
                                   "global": {"requests_per_minute": 100},
                                   "providers": {"openai": {SMALL: {"requests_per_minute": 5},
                                                            BIG: {"requests_per_minute": 5}}}})
    _judge_positional(provider, context_window_fallback_dict={f"openai/{BIG}": f"openai/{SMALL}"})
    provider.state.push_for(BIG, Scripted.context_length_exceeded())
    resp = await litellm.acompletion(**chat_kwargs(provider, model=f"openai/{SMALL}", max_tokens=5))
    assert resp.choices[0].message.content
    await settled(limiter)
    assert sent(provider) == [(BIG, 400), (SMALL, 200), (SMALL, 200)]
    assert requests(limiter) == {"global": 3, SMALL: 2, BIG: 1}


async def test_a_fallback_try_cancelled_in_flight_is_charged_as_sent(provider: FakeProvider,
                                                                      clock: FakeClock) -> None:
    """A try of SDK fallbacks cancelled while its request is at the provider was sent: it is
    charged (its estimate), as a call without fallbacks cancelled in flight is. Was: LiteLLM logs
    the try's send under the outer call's id, which the limiter does not hold, so the send went
    unnoted and the cancelled try was settled as never sent (its request and cost given back)."""
    limiter = limiter_for(clock, small=5, big=5)
    provider.state.push_for(SMALL, Scripted(status=500))
    provider.state.latency = 0.5
    task = asyncio.ensure_future(litellm.acompletion(**fallbacks_kwargs(provider)))
    await wait_until(lambda: len(provider.state.log) >= 1 and global_usage(limiter)["in_flight"] == 1
                     and requests(limiter)[BIG] == 1)
    await asyncio.sleep(0.2)  # (the request to the big model is at the provider, answering slowly)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settled(limiter)
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}
    assert limiter.get_usage_stats()["cost_today"] > 0  # the big model's try, sent: charged
