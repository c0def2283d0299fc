"""A Router's model group while a provider holds one of its deployments (a 429's cooldown, an open
circuit breaker): the Router is told, through ``async_filter_deployments``, and sends its calls to
a free deployment instead of one where they would wait in the queue.

Real Router calls against two fake providers; time is a FakeClock, moved only where a test says so.
"""

from __future__ import annotations

import asyncio
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import Ticker, wait_until, with_backend

# Contract: every test here runs against the in-memory and the Redis backend.
pytestmark = pytest.mark.usefixtures("contract_backend")

MESSAGES = [{"role": "user", "content": "hi"}]


def make(clock: FakeClock, config: dict[str, Any] | None = None) -> HiveLimiter:
    limiter = HiveLimiter(with_backend(config or {}), clock=clock)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    return limiter


def router(*deployments: tuple[str, FakeProvider], **settings: Any) -> litellm.Router:
    return litellm.Router(model_list=[
        {"model_name": "gpt", "litellm_params": {"model": model, "api_base": p.url, "api_key": f"sk-test-{i}"}}
        for i, (model, p) in enumerate(deployments)], num_retries=0, **settings)


async def until_refused(r: litellm.Router, refusing: FakeProvider, limiter: HiveLimiter) -> list[asyncio.Task[Any]]:
    """Router calls until one reaches ``refusing`` (its 429 then waits in the queue); those still waiting."""
    tasks: list[asyncio.Task[Any]] = []
    while refusing.state.count(429) == 0:
        tasks.append(asyncio.create_task(r.acompletion(model="gpt", messages=MESSAGES)))
        await asyncio.wait({tasks[-1]}, timeout=1.0)
        assert len(tasks) < 40
    await wait_until(lambda: not all(t.done() for t in tasks) and limiter._engine.queue_length >= 1)
    return [t for t in tasks if not t.done()]


@pytest.mark.parametrize("same_model", [True, False], ids=["one-model-two-endpoints", "two-models"])
async def test_the_router_sends_calls_to_the_deployment_no_cooldown_holds(
        same_model: bool, provider: FakeProvider, clock: FakeClock) -> None:
    """One deployment answers a 429 with a 30 s retry-after. The Router's next 20 calls all go to
    the other deployment and are answered at once. (Before, the Router picked at random: about
    half of them went to the cooled deployment and waited its 30 s in the queue.)"""
    limiter = make(clock)
    with FakeProvider() as other:
        r = router(("openai/gpt-4o-mini", provider), ("openai/gpt-4o-mini" if same_model else "openai/gpt-4o", other))
        for _ in range(40):  # (until the Router has used both: the model is then served by two endpoints)
            await r.acompletion(model="gpt", messages=MESSAGES)
            if provider.state.count() and other.state.count():
                break
        other.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        start, sent, refused_total = clock(), provider.state.count(), other.state.count()
        (refused,) = await until_refused(r, other, limiter)
        later = [asyncio.create_task(r.acompletion(model="gpt", messages=MESSAGES)) for _ in range(20)]
        await asyncio.wait_for(asyncio.gather(*later), 20)  # (no fake time passes: none may wait)
        assert clock() == start
        assert other.state.count() == refused_total + 1  # the 429 only
        assert provider.state.count() >= sent + 20
        with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0):
            await asyncio.wait_for(refused, 60)  # (it waits out its deployment's 30 s and is sent there)
        assert other.state.count(200) == refused_total + 1 and other.state.count() == refused_total + 2
        assert clock() - start >= 30.0


async def test_with_every_deployment_held_the_router_still_chooses_and_the_call_waits(
        provider: FakeProvider, clock: FakeClock) -> None:
    """Both deployments cooled: the Router's list is left whole (an empty one would fail the call)
    and the call waits in the queue for the deployment the Router picks. (The Router's own
    cooldowns are off: LiteLLM 1.83's Router cools a deployment after its 429 by itself, and with
    both cooled fails the call before any hook runs.)"""
    limiter = make(clock)
    with FakeProvider() as other:
        r = router(("openai/gpt-4o-mini", provider), ("openai/gpt-4o", other), disable_cooldowns=True)
        refused: list[asyncio.Task[Any]] = []
        for p in (provider, other):  # (one after the other: the second is refused once the first is held)
            p.state.push(Scripted(status=429, headers={"retry-after": "10"}))
            refused += await until_refused(r, p, limiter)
        assert {k for k, v in limiter.get_usage_stats()["providers"].items() if "cooldown_seconds" in v} == {
            "model:openai/gpt-4o-mini", "model:openai/gpt-4o"}
        start, waiting = clock(), limiter._engine.queue_length
        last = asyncio.create_task(r.acompletion(model="gpt", messages=MESSAGES))
        await wait_until(lambda: limiter._engine.queue_length == waiting + 1)
        assert not last.done()
        with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0):
            await asyncio.wait_for(asyncio.gather(*refused, last), 60)
        assert clock() - start >= 8.0
        assert provider.state.count(429) == other.state.count(429) == 1


async def test_a_failing_check_leaves_the_routers_choice_alone(provider: FakeProvider, clock: FakeClock,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is an aid to routing: if it fails (the engine raising), the Router's list stays
    whole and the call goes on, with a warning."""
    limiter = make(clock)
    with FakeProvider() as other:
        r = router(("openai/gpt-4o-mini", provider), ("openai/gpt-4o", other))

        def broken(keys: Any) -> dict[str, float]:
            raise RuntimeError("engine down")

        monkeypatch.setattr(limiter._engine, "held_for", broken)
        for _ in range(4):
            await r.acompletion(model="gpt", messages=MESSAGES)
        assert provider.state.count() + other.state.count() == 4
        assert limiter.get_usage_stats()["admitted_total"] == 4


async def test_a_held_deployment_stays_while_the_free_ones_have_other_tags(
        provider: FakeProvider, clock: FakeClock) -> None:
    """The Router filters by tags after the callbacks' filters (LiteLLM 1.83 and 1.110): a held
    deployment left out for a free one of other tags left the call's tag with no deployment, and
    the call failed at once ("Not allowed to access model due to tags configuration") where it
    would have waited for its deployment. A held deployment goes only while a free one with the
    same tags stays."""
    limiter = make(clock)
    with FakeProvider() as other:
        r = litellm.Router(model_list=[
            {"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": provider.url,
                                                     "api_key": "sk-test-0", "tags": ["paid"]}},
            {"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o", "api_base": other.url,
                                                     "api_key": "sk-test-1", "tags": ["free"]}},
        ], num_retries=0, enable_tag_filtering=True, disable_cooldowns=True)
        provider.state.push(Scripted(status=429, headers={"retry-after": "10"}))
        first = asyncio.create_task(r.acompletion(model="gpt", messages=MESSAGES, metadata={"tags": ["paid"]}))
        await wait_until(lambda: provider.state.count(429) == 1 and limiter._engine.queue_length >= 1)
        start = clock()
        last = asyncio.create_task(r.acompletion(model="gpt", messages=MESSAGES, metadata={"tags": ["paid"]}))
        await wait_until(lambda: last.done() or limiter._engine.queue_length >= 2)
        assert not last.done(), last.exception()
        with Ticker(clock, step=0.5, when=lambda: limiter._engine.queue_length > 0):
            await asyncio.wait_for(asyncio.gather(first, last), 60)
        assert clock() - start >= 8.0
        assert provider.state.count(200) == 2 and other.state.count() == 0
