"""One model served by more than one endpoint (a Router's deployments of one model in two regions,
or under two accounts' keys): what a provider says is about the endpoint that said it.

Real LiteLLM calls against two fake providers; time is a FakeClock, moved only where a test says so.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter, RateLimitQueueTimeout
from hive_ratelimit_plugin.errors import CircuitOpenError
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import Ticker, chat_kwargs, wait_until, with_backend

# Contract: every test here runs against the in-memory and the Redis backend.
pytestmark = pytest.mark.usefixtures("contract_backend")

MODEL = "model:openai/gpt-4o-mini"


def make(clock: FakeClock, config: dict[str, Any] | None = None) -> HiveLimiter:
    limiter = HiveLimiter(with_backend(config or {}), clock=clock)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    return limiter


def call(p: FakeProvider, **extra: Any) -> Any:
    kw = chat_kwargs(p, **extra)
    kw.pop("max_retries", None)  # 429s are the limiter's to retry
    return litellm.acompletion(**kw)


def endpoint_of(limiter: HiveLimiter, p: FakeProvider) -> str:
    """The scope that holds the provider's signals for calls to ``p``."""
    port = p.url.split(":")[2].split("/")[0]
    prefix = f"key:openai/gpt-4o-mini@127.0.0.1:{port}#"
    found = [k for k in limiter.get_usage_stats()["providers"] if k.startswith(prefix)]
    assert len(found) == 1, limiter.get_usage_stats()["providers"]
    return found[0]


@pytest.mark.parametrize("refusing_first", [False, True], ids=["healthy-first", "refusing-first"])
async def test_a_429_from_one_endpoint_does_not_hold_the_models_other_endpoint(
        refusing_first: bool, provider: FakeProvider, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """A 429 (retry after 30 s) from one endpoint of a model cools that endpoint only: a call to
    the model's other endpoint goes at once, while the refused call waits out its 30 s. (Before,
    the cooldown was the model's, and held every call to it, whichever endpoint it went to.)
    refusing-first: the refusing endpoint is the first the model was seen at, so its 429 cools
    the model's scope; the call to the second endpoint moves that cooldown to the first, and the
    refused call, waiting in the queue, waits for its own endpoint from then on."""
    caplog.set_level(logging.DEBUG, logger="hive_ratelimit_plugin")
    limiter = make(clock)
    start = clock()
    with FakeProvider() as other:
        if not refusing_first:
            await call(provider)
        other.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        refused = asyncio.create_task(call(other))
        await wait_until(lambda: other.state.count(429) == 1 and limiter._engine.queue_length == 1)
        await asyncio.wait_for(call(provider), 20)  # (no fake time passes: it must not wait)
        assert provider.state.count() == (1 if refusing_first else 2) and not refused.done()
        signals = limiter.get_usage_stats()["providers"]
        cooling = {k for k, v in signals.items() if "cooldown_seconds" in v}
        assert cooling == {endpoint_of(limiter, other)}
        assert signals[endpoint_of(limiter, other)]["cooldown_seconds"] == pytest.approx(30, abs=0.5)
        with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0):
            await asyncio.wait_for(refused, 30)
        assert other.state.count() == 2 and clock() - start >= 30.0  # (its retry waited the 30 s)
    text = repr(limiter.get_usage_stats()) + " ".join(r.getMessage() for r in caplog.records)
    assert "sk-test-SECRET" not in text  # (an endpoint is named by a digest of its key, never the key)


async def test_one_endpoints_failures_open_its_breaker_only(provider: FakeProvider, clock: FakeClock) -> None:
    """Consecutive 5xx from one endpoint open that endpoint's circuit breaker: its calls fail fast
    while the model's other endpoint goes on."""
    limiter = make(clock, {"circuit_breaker": {"failure_threshold": 2, "cooldown_seconds": 30},
                           "queue": {"max_wait_seconds": 5}})
    with FakeProvider() as other:
        await call(provider)
        other.state.push(Scripted(status=500), Scripted(status=500))
        for _ in range(2):
            with pytest.raises(litellm.InternalServerError):
                await call(other)
        with pytest.raises(CircuitOpenError):
            await call(other)
        assert other.state.count() == 2  # nothing sent while open
        await call(provider)
        signals = limiter.get_usage_stats()["providers"]
        assert signals[endpoint_of(limiter, other)]["circuit"] == "open"
        assert signals[MODEL]["circuit"] == "closed"
        assert signals[endpoint_of(limiter, provider)]["circuit"] == "closed"


async def test_what_the_model_learned_moves_to_the_endpoint_it_came_from(
        provider: FakeProvider, clock: FakeClock) -> None:
    """While a model's calls all go to one endpoint, its limits are learned on the model's scope;
    once a call goes to another endpoint, what was learned holds for the first endpoint only:
    the second is not held to the first one's limit, the first still is."""
    limiter = make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.requests_per_window = 2  # the first endpoint allows 2 a minute, and says so
    with FakeProvider() as other:
        await call(provider)
        assert limiter.get_usage_stats()["providers"][MODEL]["learned_requests_per_minute"] == 2
        for _ in range(4):  # the other endpoint: not held to the first one's 2 a minute
            await call(other)
        signals = limiter.get_usage_stats()["providers"]
        assert "learned_requests_per_minute" not in signals[MODEL]
        assert signals[endpoint_of(limiter, provider)]["learned_requests_per_minute"] == 2
        await call(provider)
        with pytest.raises(RateLimitQueueTimeout) as info:  # the first endpoint is still held to it
            await call(provider)
        assert info.value.scope == endpoint_of(limiter, provider)
        assert provider.state.count(429) == 0 and other.state.count() == 4


async def test_a_routers_deployments_of_one_model_keep_their_own_cooldowns(
        provider: FakeProvider, clock: FakeClock) -> None:
    """Through a Router whose two deployments serve one model: while one deployment's 429 is waited
    out, the Router's calls that go to the other deployment are sent at once."""
    limiter = make(clock)
    with FakeProvider() as other:
        router = litellm.Router(model_list=[
            {"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": p.url,
                                                     "api_key": f"sk-test-{i}"}}
            for i, p in enumerate((provider, other))], num_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        other.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        start = clock()
        first: list[asyncio.Task[Any]] = []
        while other.state.count(429) == 0:  # until the Router has sent one to the refusing deployment
            first.append(asyncio.create_task(router.acompletion(model="gpt", messages=messages)))
            await asyncio.wait({first[-1]}, timeout=1.0)
            assert len(first) < 40
        await wait_until(lambda: limiter._engine.queue_length >= 1)
        sent = provider.state.count()
        # (20: that the Router sends all of them to the refusing deployment is a 1 in 10^6 chance)
        later = [asyncio.create_task(router.acompletion(model="gpt", messages=messages)) for _ in range(20)]
        await wait_until(lambda: provider.state.count() > sent, timeout=20)  # (no fake time passes)
        assert clock() == start
        with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0):
            await asyncio.wait_for(asyncio.gather(*first, *later), 60)
        assert other.state.count(429) == 1


# ---------------------------------------------------------------- the split's edges (helper-62)
def limit_headers(limit: int, remaining: int) -> dict[str, str]:
    return {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": "20s"}


async def test_a_limit_learned_by_a_call_in_flight_at_the_split_is_its_endpoints(
        provider: FakeProvider, clock: FakeClock) -> None:
    """A call to the first endpoint, sent before the split and answered after it with that
    endpoint's limit (3 a minute): the limit is the first endpoint's, not the model's (every
    endpoint's calls carry the model's scope: the other endpoint was held to 3 a minute)."""
    limiter = make(clock, {"queue": {"max_wait_seconds": 0}})
    with FakeProvider() as other:
        provider.state.push(Scripted(status=200, delay=1.0, headers=limit_headers(3, 2)))
        slow = asyncio.create_task(call(provider))
        await wait_until(lambda: provider.state.in_flight == 1)
        await call(other)  # the split (nothing learned yet: nothing moves)
        await slow
        for _ in range(6):  # the other endpoint has no limit
            await call(other)
        assert other.state.count() == 7
        signals = limiter.get_usage_stats()["providers"]
        assert "learned_requests_per_minute" not in signals[MODEL]
        assert signals[endpoint_of(limiter, provider)]["learned_requests_per_minute"] == 3


async def test_a_429_to_a_call_in_flight_at_the_split_cools_its_endpoint_only(
        provider: FakeProvider, clock: FakeClock) -> None:
    """As above, with a 429 (retry after 30 s): the first endpoint is cooled, not the model."""
    limiter = make(clock)
    with FakeProvider() as other:
        provider.state.push(Scripted(status=429, delay=1.0, headers={"retry-after": "30"}))
        slow = asyncio.create_task(call(provider))
        await wait_until(lambda: provider.state.in_flight == 1)
        await call(other)  # the split
        await wait_until(lambda: provider.state.count(429) == 1 and limiter._engine.queue_length == 1)
        start = clock()
        await asyncio.wait_for(call(other), 20)  # (no fake time passes: it must not wait)
        assert clock() == start
        with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0):
            await asyncio.wait_for(slow, 30)
        assert provider.state.count() == 2


async def test_the_requests_counted_toward_a_learned_limit_move_with_it(
        provider: FakeProvider, clock: FakeClock) -> None:
    """The first endpoint says 3 a minute and had 2 calls: after the split, 1 more fits there."""
    make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.push(Scripted(status=200, headers=limit_headers(3, 2)),
                        Scripted(status=200, headers=limit_headers(3, 1)))
    with FakeProvider() as other:
        await call(provider)
        await call(provider)
        await call(other)  # the split
        await call(provider)  # the 3rd of its 3
        with pytest.raises(RateLimitQueueTimeout):
            await call(provider)  # a 4th within the minute
        assert provider.state.count() == 3


async def test_two_threads_splitting_a_model_at_once_move_its_signals_once(
        provider: FakeProvider, clock: FakeClock) -> None:
    """Two threads see a model at a second endpoint at once: the second move copied the model's
    (by then empty) signals over the cooldown the first had moved to the first endpoint."""
    limiter = make(clock, {"queue": {"max_wait_seconds": 0}})
    provider.state.push(Scripted(status=429, headers={"retry-after": "30"}))
    with pytest.raises(Exception):  # noqa: B017 (its retry cannot wait: max_wait 0)
        await call(provider)
    assert limiter.get_usage_stats()["providers"][MODEL]["cooldown_seconds"] > 25
    plan = next(iter(limiter._plans.values()))
    barrier = threading.Barrier(2)
    reads = [0]

    class BothReadFirst(dict[Any, Any]):  # both threads read "one endpoint so far" before either splits
        def get(self, k: Any, d: Any = None) -> Any:
            v = super().get(k, d)
            if k == plan.model_key:
                reads[0] += 1
                if reads[0] <= 2:
                    barrier.wait(5)
            return v

    limiter._endpoints = BothReadFirst(limiter._endpoints)
    kws = [{"api_base": "https://a.example/v1", "api_key": "sk-a"},
           {"api_base": "https://b.example/v1", "api_key": "sk-b"}]
    threads = [threading.Thread(target=limiter._endpoint_scopes, args=(plan, kw)) for kw in kws]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert limiter.get_usage_stats()["providers"][endpoint_of(limiter, provider)]["cooldown_seconds"] > 25


async def test_a_second_process_splitting_a_model_moves_what_it_learned_since(
        provider: FakeProvider, clock: FakeClock) -> None:
    """Two limiters (with Redis: two processes sharing it). A splits first; B learns the first
    endpoint's limit on the model before it sees the second endpoint; at B's split that limit
    moves to the first endpoint (in Redis, whose hash A's calls had made already)."""
    from hive_ratelimit_plugin.plugin import unregister

    with FakeProvider() as other:
        a = make(clock, {"queue": {"max_wait_seconds": 0}})
        provider.state.push(*(Scripted(status=200, headers=limit_headers(3, 2)) for _ in range(2)))
        await call(provider)
        await call(other)  # A splits
        await call(provider)  # the first endpoint's signals exist now
        unregister(a)
        if a in litellm.callbacks:
            litellm.callbacks.remove(a)
        b = make(clock, {"queue": {"max_wait_seconds": 0}})
        provider.state.push(Scripted(status=200, headers=limit_headers(3, 2)))
        await call(provider)  # B: one endpoint so far: learned on the model
        await call(other)  # B splits
        for _ in range(4):
            await call(other)  # the second endpoint has no limit
        assert other.state.count() == 6
        assert "learned_requests_per_minute" not in b.get_usage_stats()["providers"][MODEL]


async def test_a_split_made_by_another_process_holds_in_one_that_saw_a_single_endpoint(
        provider: FakeProvider, clock: FakeClock, contract_backend: dict[str, Any]) -> None:
    """Two limiters (with Redis: two processes sharing it). A has called both endpoints of the
    model (it split it); B only ever calls the second, which answers with a 429 (retry after
    30 s). B learns of A's split from Redis and splits too: the cooldown is the second
    endpoint's, and A's next call to the first is sent at once. (Before, B, having seen one
    endpoint, kept the cooldown on the model's scope, which A's calls carry too: A's call to the
    healthy endpoint waited out B's 30 s.)"""
    from hive_ratelimit_plugin.plugin import unregister

    shared = bool(contract_backend)  # (the Redis backend)

    def use(limiter: HiveLimiter) -> None:  # (one limiter registered at a time: one "process" calls)
        for each in (a, b):
            unregister(each)
        litellm.callbacks.append(limiter)

    with FakeProvider() as other:
        a = make(clock, {"queue": {"max_wait_seconds": 0}})
        await call(provider)
        await call(other)  # A splits
        b = make(clock, {"queue": {"max_wait_seconds": 0}})
        use(b)
        other.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        with pytest.raises(Exception):  # noqa: B017 (its retry cannot wait: max_wait 0)
            await call(other)
        assert other.state.count(429) == 1
        use(a)
        await call(provider)  # (max_wait 0: held by B's cooldown, it would raise)
        assert provider.state.count() == 2
        if not shared:
            return  # (two limiters in memory share nothing: B's cooldown was never A's)
        signals = b.get_usage_stats()["providers"]
        assert "cooldown_seconds" not in signals[MODEL]
        assert signals[endpoint_of(b, other)]["cooldown_seconds"] == pytest.approx(30, abs=0.5)
        with pytest.raises(RateLimitQueueTimeout) as info:  # A's calls to the second endpoint: held by it
            await call(other)
        assert info.value.scope == endpoint_of(a, other) and other.state.count() == 2


async def test_a_429_to_a_call_in_flight_at_another_process_split_leaves_the_model(
        provider: FakeProvider, clock: FakeClock, contract_backend: dict[str, Any]) -> None:
    """As above, B's call sent before A's split and answered with a 429 after it, and not retried
    (no admission follows it): the settlement that cools the model tells B of the split, and B
    moves the cooldown to the second endpoint at once. A's call to the first is sent at once."""
    from hive_ratelimit_plugin.plugin import unregister

    a = make(clock, {"queue": {"max_wait_seconds": 0}})
    await call(provider)  # A: one endpoint so far
    plan = next(iter(a._plans.values()))
    unregister(a)
    with FakeProvider() as other:
        b = make(clock, {"queue": {"max_wait_seconds": 0}, "retry": {"enabled": False}})
        other.state.push(Scripted(status=429, delay=1.0, headers={"retry-after": "30"}))
        slow = asyncio.create_task(call(other))
        await wait_until(lambda: other.state.in_flight == 1)
        a._endpoint_scopes(plan, {"api_base": other.url, "api_key": "sk-test-SECRET-0123456789"})  # A splits
        with pytest.raises(litellm.RateLimitError):
            await slow
        unregister(b)
        litellm.callbacks.append(a)
        await call(provider)  # (max_wait 0: held by B's cooldown, it would raise)
        assert provider.state.count() == 2
        if contract_backend:  # (two limiters in memory share nothing)
            signals = b.get_usage_stats()["providers"]
            assert "cooldown_seconds" not in signals[MODEL]
            assert signals[endpoint_of(b, other)]["cooldown_seconds"] == pytest.approx(30, abs=0.5)


async def test_a_new_process_first_call_to_an_endpoint_another_process_cooled_waits(
        provider: FakeProvider, clock: FakeClock, contract_backend: dict[str, Any]) -> None:
    """With Redis: A split the model and its call to the second endpoint got a 429 (retry after
    30 s). B, a new process, has never called the model: its first call to that endpoint is
    admitted on the model's scope (which holds only the split mark), hears of the split in the
    reply, and was sent anyway, into the endpoint's cooldown (helper-65). It is now admitted
    again, with its endpoint's scope, and waits for it (here: refused, max_wait 0)."""
    from hive_ratelimit_plugin.plugin import unregister

    with FakeProvider() as other:
        a = make(clock, {"queue": {"max_wait_seconds": 0}})
        await call(provider)
        await call(other)  # A splits
        other.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        with pytest.raises(Exception):  # noqa: B017 (its retry cannot wait: max_wait 0)
            await call(other)
        unregister(a)
        make(clock, {"queue": {"max_wait_seconds": 0}})
        sent = other.state.count()
        if not contract_backend:  # (in memory two limiters share nothing: B knows of no cooldown)
            await call(other)
            assert other.state.count() == sent + 1
            return
        b = litellm.callbacks[-1]
        with pytest.raises(RateLimitQueueTimeout):
            await call(other)
        assert other.state.count() == sent
        assert b.get_usage_stats()["admitted_total"] == 0  # (its admission on the model's scope, given back)
        unregister(b)
        c = make(clock, {"queue": {"max_wait_seconds": 0}})
        await call(provider)  # a new process's first call, to the free endpoint: admitted again there, and sent
        assert provider.state.count() == 2
        assert c.get_usage_stats()["admitted_total"] == 1  # (one call: counted once)


def test_endpoint_scope_lists_are_bounded_across_plans(clock: FakeClock) -> None:
    """Each plan (model x identity) keeps a scope list per endpoint of a split model, at most 256;
    across plans they are bounded too (thousands of identities each calling with a key of their
    own per call would otherwise keep 256 lists each): past the cap all are dropped and rebuilt
    on demand, the same lists again."""
    from hive_ratelimit_plugin._scopes import Identity

    limiter = HiveLimiter({}, clock=clock)
    limiter._MAX_ENDPOINT_LISTS = 10
    plans = [limiter._plan("openai/gpt-4o-mini", None, None, Identity(agent_id=f"a{i}")) for i in range(4)]
    first = limiter._endpoint_scopes(plans[0], {"api_base": "https://one.invalid", "api_key": "sk-test-k0"})
    split = limiter._endpoint_scopes(plans[0], {"api_base": "https://two.invalid", "api_key": "sk-test-k1"})
    assert len(split) == len(first) + 1  # (split: the endpoint's own scope)
    seen = set()
    for n in range(60):
        plan = plans[n % 4]
        scopes = limiter._endpoint_scopes(plan, {"api_base": "https://two.invalid", "api_key": f"sk-test-x{n}"})
        seen.add(scopes[-1].key)  # (each key's endpoint scope)
        assert sum(len(p.endpoints) for p in plans) <= 10
    assert len(seen) == 60 and split[-1].key not in seen
    again = limiter._endpoint_scopes(plans[0], {"api_base": "https://two.invalid", "api_key": "sk-test-k1"})
    assert [s.key for s in again] == [s.key for s in split]
