"""The output-token limit learned from Anthropic's headers (``learned_output_tokens_per_minute``)
where the window appears while calls are in flight, after a quiet spell, and at a model's split
between endpoints. Both backends. (The end-to-end cases are in test_provider_429.py.)"""
from __future__ import annotations

import asyncio
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import RateLimitQueueTimeout
from hive_ratelimit_plugin._engine import Scope, Ticket
from hive_ratelimit_plugin._retry import RateSignals
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import wait_until
from .test_learned_input_limit import Woken, anthropic_signals
from .test_provider_429 import _anthropic_output_headers, make

pytestmark = pytest.mark.usefixtures("contract_backend")

MODEL = "model:anthropic/claude-sonnet-4-5"


def _otpm(n: int) -> RateSignals:
    return anthropic_signals(limit_output_tokens=n)


def test_a_call_in_flight_when_the_window_appears_does_not_touch_it(clock: FakeClock, make_engine: Any) -> None:
    """A call admitted before the learned output window existed never charged it: its settlement
    (4,000 asked, 10 used) must not take back what it never reserved from another call's charge."""
    eng = make_engine(clock)
    m = Scope("model", "model:anthropic/x", LimitSet())
    assert eng.acquire(Ticket("a", [m], output_tokens=100), Woken()) is None
    assert eng.acquire(Ticket("b", [m], output_tokens=4000), Woken()) is None  # in flight, estimated
    eng.release("a", input_tokens=0, output_tokens=100, signals=_otpm(10_000))  # learns: window appears
    assert eng.acquire(Ticket("c", [m], output_tokens=3000), Woken()) is None  # charged 3,000 there
    eng.release("b", input_tokens=0, output_tokens=10)
    snap = eng.snapshot()["model:anthropic/x"]["learned_output_tokens_per_minute"]
    assert snap == {"used": 3000, "limit": 10_000}
    assert eng.provider_state()["model:anthropic/x"]["learned_output_tokens_per_minute"] == 10_000
    # the limit holds: 3,000 in flight, 7,000 left
    w = eng.acquire(Ticket("d", [m], output_tokens=7001), Woken())
    assert w is not None and w.blocked is not None and w.blocked.limit == "learned_output_tokens_per_minute"


def _kw(p: FakeProvider, max_tokens: int) -> dict[str, Any]:
    return {"model": "anthropic/claude-sonnet-4-5", "api_base": p.root, "api_key": "sk-ant-test-SECRET",
            "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}


async def test_the_learned_output_window_outlives_an_idle_minute(provider: FakeProvider, clock: FakeClock) -> None:
    """A model whose output-token limit was learned keeps its window through a quiet spell: the
    next burst is held to the limit before any answer teaches it again."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.push(Scripted(status=200, headers=_anthropic_output_headers(10_000)))
    await litellm.acompletion(**_kw(provider, 10))
    clock.advance(120)
    limiter._engine.sweep()
    assert any(w.name == "learned_output_tokens_per_minute"
               for st in limiter._engine._states.values() for w in st.windows()), "window dropped"
    provider.state.completion_tokens = 6000
    await litellm.acompletion(**_kw(provider, 6000))  # uses them all
    with pytest.raises(RateLimitQueueTimeout) as info:
        await litellm.acompletion(**_kw(provider, 6000))  # 12,000 > 10,000 within the minute
    assert info.value.limit == "learned_output_tokens_per_minute"
    assert provider.state.count() == 2 and provider.state.count(429) == 0


async def test_the_learned_output_limit_moves_to_the_endpoint_it_came_from(provider: FakeProvider,
                                                                           clock: FakeClock) -> None:
    """Learned on the model while its calls all went to one endpoint; once a call goes to
    another, the limit, and the output tokens counted toward it, hold for the first endpoint
    only: it is still held to them, the other is not."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.completion_tokens = 3000
    for _ in range(3):  # learns 10,000 a minute; the 2nd and 3rd count 6,000
        provider.state.push(Scripted(status=200, headers=_anthropic_output_headers(10_000)))
        await litellm.acompletion(**_kw(provider, 3000))
    assert limiter.get_usage_stats()["providers"][MODEL]["learned_output_tokens_per_minute"] == 10_000
    with FakeProvider() as other:
        other.state.completion_tokens = 10
        await litellm.acompletion(**_kw(other, 5000))  # the split
        signals = limiter.get_usage_stats()["providers"]
        assert "learned_output_tokens_per_minute" not in signals[MODEL]
        port = provider.url.split(":")[2].split("/")[0]
        [endpoint] = [k for k in signals if k.startswith(f"key:anthropic/claude-sonnet-4-5@127.0.0.1:{port}#")]
        assert signals[endpoint]["learned_output_tokens_per_minute"] == 10_000
        await litellm.acompletion(**_kw(other, 5000))  # not held to the first endpoint's limit
        with pytest.raises(RateLimitQueueTimeout) as info:  # 6,000 + 5,000 > 10,000 there
            await litellm.acompletion(**_kw(provider, 5000))
        assert info.value.scope == endpoint
        assert provider.state.count() == 3 and other.state.count() == 2


def test_a_call_in_flight_at_a_split_is_settled_where_its_reservation_moved(clock: FakeClock,
                                                                           make_engine: Any) -> None:
    """A call admitted on the model's learned output window, in flight when the model splits:
    the window (its reservation at max_tokens among it) moves to the endpoint, and the call's
    settlement (8,000 asked, 10 used) must free the rest there too, not only on the model."""
    eng = make_engine(clock)
    m = Scope("model", "model:anthropic/x", LimitSet())
    k = Scope("key", "key:anthropic/x@127.0.0.1:1#abc", LimitSet())
    assert eng.acquire(Ticket("a", [m], output_tokens=100), Woken()) is None
    eng.release("a", input_tokens=0, output_tokens=100, signals=_otpm(10_000))  # learns: window appears
    assert eng.acquire(Ticket("b", [m], output_tokens=8000), Woken()) is None  # in flight: 8,000 reserved
    eng.move_signals(m.key, k)
    eng.release("b", input_tokens=0, output_tokens=10)
    assert eng.snapshot()[k.key]["learned_output_tokens_per_minute"]["used"] == 10
    assert eng.acquire(Ticket("c", [k], output_tokens=5000), Woken()) is None  # 10 + 5,000 fit 10,000


def test_calls_in_flight_at_a_split_that_never_report_are_not_remembered(clock: FakeClock, make_engine: Any) -> None:
    """The calls in flight at a split are remembered until their outcome comes. One that never
    comes (an abandoned stream whose lease ran out, a reservation dropped) must not stay behind."""
    eng = make_engine(clock, lease_seconds=30)
    m = Scope("model", "model:anthropic/x", LimitSet())
    k = Scope("key", "key:anthropic/x@127.0.0.1:1#abc", LimitSet())
    for call_id in ("a", "b", "c"):
        assert eng.acquire(Ticket(call_id, [m]), Woken()) is None
    eng.move_signals(m.key, k)
    assert eng._moved_calls == {"a", "b", "c"}
    eng.release("a", input_tokens=0, output_tokens=10)
    eng.forget("b")
    clock.advance(31)  # "c" was abandoned: its lease runs out
    eng.sweep()
    assert not eng._leases
    assert eng._moved_calls == set()


def test_a_stream_in_flight_at_a_split_whose_slot_was_freed_first_is_settled_on_the_endpoint(
        clock: FakeClock, make_engine: Any) -> None:
    """As above, for a stream whose last chunk freed its slot before its usage came (free_slot,
    then release): freeing the slot must not make its settlement forget the split."""
    eng = make_engine(clock)
    m = Scope("model", "model:anthropic/x", LimitSet())
    k = Scope("key", "key:anthropic/x@127.0.0.1:1#abc", LimitSet())
    assert eng.acquire(Ticket("a", [m], output_tokens=100), Woken()) is None
    eng.release("a", input_tokens=0, output_tokens=100, signals=_otpm(10_000))
    assert eng.acquire(Ticket("b", [m], output_tokens=8000), Woken()) is None
    eng.move_signals(m.key, k)
    eng.free_slot("b")
    eng.release("b", input_tokens=0, output_tokens=10, signals=_otpm(20_000))
    assert eng.snapshot()[k.key]["learned_output_tokens_per_minute"] == {"used": 10, "limit": 20_000}
    assert "learned_output_tokens_per_minute" not in eng.provider_state().get(m.key, {})


async def test_a_call_asking_for_more_than_the_learned_output_limit_goes_alone(provider: FakeProvider,
                                                                              clock: FakeClock) -> None:
    """max_tokens above the learned output-token limit: no RequestTooLargeError (the header may mean
    something else than we read); it goes once the window is empty, the provider judges it."""
    _limiter, _ = make(clock, {"queue": {"max_wait_seconds": 120}})
    provider.state.completion_tokens = 10
    provider.state.push(Scripted(status=200, headers=_anthropic_output_headers(10_000)))
    await litellm.acompletion(**_kw(provider, 10))  # learns 10,000
    clock.advance(61)
    provider.state.push(Scripted(status=200, headers=_anthropic_output_headers(10_000)))
    await litellm.acompletion(**_kw(provider, 20_000))
    assert provider.state.count() == 2


def test_a_call_admitted_after_another_process_split_the_model_frees_nothing_on_the_endpoint(
        clock: FakeClock, backend: dict[str, Any]) -> None:
    """A process splits the model first (MOVE copies the model's learned windows). A call
    another process admits on the model after that, told of the split by its admission, charged
    the model's window only: its settlement must not take its estimate back from the endpoint's
    copy (other calls' charge). Admitted before the split, it is settled there too."""
    from hive_ratelimit_plugin._engine import Engine
    from hive_ratelimit_plugin._redis import RedisEngine

    from .conftest import REDIS_URL

    if backend:
        prefix = backend["redis"]["key_prefix"]
        one, two = (RedisEngine(clock, url=REDIS_URL, prefix=prefix, server_time=False) for _ in range(2))
    else:  # (in memory, one process: the split is its own, and "after" is admitted after it all the same)
        one = two = Engine(clock)
    m = Scope("model", "model:anthropic/x", LimitSet())
    k = Scope("key", "key:anthropic/x@127.0.0.1:1#abc", LimitSet())
    for eng in dict.fromkeys((one, two)):  # both learn 10,000 a minute
        assert eng.acquire(Ticket("a" + str(id(eng)), [m], output_tokens=100), Woken()) is None
        eng.release("a" + str(id(eng)), input_tokens=0, output_tokens=100, signals=_otpm(10_000))
    assert one.acquire(Ticket("before", [m], output_tokens=3000), Woken()) is None
    two.move_signals(m.key, k)  # the first split: the endpoint's copy holds 3,000
    assert one.acquire(Ticket("after", [m], output_tokens=4000), Woken()) is None  # told of the split
    one.move_signals(m.key, k)  # (as its on_split does)
    one.release("after", input_tokens=0, output_tokens=10)
    assert two.snapshot()[k.key]["learned_output_tokens_per_minute"]["used"] == 3000
    one.release("before", input_tokens=0, output_tokens=10)
    assert two.snapshot()[k.key]["learned_output_tokens_per_minute"]["used"] == 10


async def test_a_call_in_flight_when_the_model_splits_does_not_hold_the_endpoint_at_its_max_tokens(
        provider: FakeProvider, clock: FakeClock) -> None:
    """End to end: a call asking for 8,000 (using 10) is in flight when a call to another endpoint
    splits the model. Its 8,000 moved with the model's window to its endpoint's; once it is
    answered that endpoint holds 20 output tokens, and a call asking for 5,000 goes at once."""
    limiter, _ = make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.completion_tokens = 10
    provider.state.push(Scripted(status=200, headers=_anthropic_output_headers(10_000)))
    await litellm.acompletion(**_kw(provider, 10))  # learns 10,000 a minute (this one is not counted)
    provider.state.push(Scripted(status=200, headers=_anthropic_output_headers(10_000)))
    provider.state.latency = 0.5
    first = asyncio.ensure_future(litellm.acompletion(**_kw(provider, 8000)))
    await wait_until(lambda: any(st.in_flight for st in limiter._engine._states.values())
                     or bool(limiter._engine._leases))
    with FakeProvider() as other:
        other.state.completion_tokens = 10
        await litellm.acompletion(**_kw(other, 10))  # the split, the first call in flight
        await asyncio.wait_for(first, 10)
        provider.state.latency = 0.0
        provider.state.push(Scripted(status=200, headers=_anthropic_output_headers(10_000)))
        await litellm.acompletion(**_kw(provider, 5000))  # 20 + 5,000 of 10,000
    assert provider.state.count() == 3 and provider.state.count(429) == 0
