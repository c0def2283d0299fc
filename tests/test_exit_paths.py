"""The exit paths of a call (from a hostile pass): a reused caller-given call id, a connection
lost after the send, an answer that cannot be read or reports no usage, a call cancelled as it is
granted, a sync stream stopped at its last chunk, a lease that runs out in a quiet process. Each
leaves no slot held and counts what the provider may bill, no more (the call never sent) and no
less (the call that may have been served).

Memory backend, the fake provider (and a bare server for answers it cannot produce) on 127.0.0.1,
real litellm.completion / acompletion calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.fake_provider import Scripted
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs, wait_until

WALL_START = 1_800_000_000.0
# One currency unit per token: a call of 3 prompt tokens and 5 output tokens (what the fake reports
# for chat_kwargs) costs 8; its worst case (9 estimated prompt tokens + max_tokens 5) is 14.
UNIT_PRICE = {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}


def make(clock: FakeClock, config: dict[str, Any], backend: dict[str, Any] | None = None) -> HiveLimiter:
    """A limiter with unit prices and a large daily budget (``backend``: the ``backend`` fixture's
    keys, to run on Redis)."""
    cfg = {"pricing": UNIT_PRICE, "state_path": ":memory:", "budget": {"max_daily_spend": 100_000}, **config,
           **(backend or {})}
    limiter = HiveLimiter(cfg, clock=clock, wall_clock=FakeClock(WALL_START))
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    return limiter


def small(provider: FakeProvider, **extra: Any) -> dict[str, Any]:
    return chat_kwargs(provider, max_tokens=5, **extra)


def g(limiter: HiveLimiter) -> dict[str, Any]:
    return limiter.get_usage_stats()["levels"]["global"]["global"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Was (hostile pass, F1): a call's late success event (LiteLLM's async success handler runs as a task, after the
# call has returned) settles and frees *another* call that is in flight under the same
# caller-given litellm_call_id.
async def test_late_success_event_does_not_settle_a_later_call_reusing_the_id(provider: FakeProvider,
                                                                              clock: FakeClock) -> None:
    limiter = make(clock, {"global": {"concurrent_requests": 1}})
    await litellm.acompletion(**small(provider, litellm_call_id="trace-1"))  # settled inline: 8
    provider.state.latency = 0.4
    provider.state.completion_tokens = 40
    second = asyncio.ensure_future(litellm.acompletion(**chat_kwargs(provider, litellm_call_id="trace-1",
                                                                     max_tokens=50)))
    await wait_until(lambda: provider.state.in_flight == 1)
    await asyncio.sleep(0.05)  # (the first call's success task runs now)
    # The second call is on the wire: it holds the only slot.
    assert g(limiter)["in_flight"] == 1, "the in-flight call lost its slot"
    await second
    await asyncio.sleep(0.1)
    # 3 + 5 for the first call, 3 + 40 for the second, as the provider reported.
    assert limiter.get_usage_stats()["cost_today"] == 8 + 43


# Was (hostile pass, F1b): a caller-given litellm_call_id shared by a call that waits in the queue and a call admitted
# meanwhile (another agent, not blocked): when the waiter is granted its reservation overwrites the
# other's in the engine. The overwritten one is never released, not even by its lease: its slot
# and reserved cost are lost for the life of the process.
async def test_a_waiting_and_an_admitted_call_sharing_an_id_leak_nothing(provider: FakeProvider,
                                                                         clock: FakeClock) -> None:
    limiter = make(clock, {"global": {"concurrent_requests": 10},
                           "agents": {"a1": {"requests_per_minute": 1}},
                           "estimation": {"lease_seconds": 120}})
    await litellm.acompletion(**small(provider, metadata={"agent_id": "a1"}))  # a1's minute is spent
    waiter = asyncio.ensure_future(litellm.acompletion(**small(provider, metadata={"agent_id": "a1"},
                                                               litellm_call_id="shared")))
    await wait_until(lambda: limiter._engine.queue_length == 1)
    provider.state.latency = 0.4
    other = asyncio.ensure_future(litellm.acompletion(**small(provider, metadata={"agent_id": "a2"},
                                                              litellm_call_id="shared")))
    await wait_until(lambda: provider.state.in_flight == 1)  # a2's call is on the wire under "shared"
    clock.advance(61)  # a1's window slides: the waiter is granted
    await asyncio.gather(waiter, other)
    await asyncio.sleep(0.1)
    clock.advance(121)  # past any lease
    limiter._engine.dispatch()
    stats = limiter.get_usage_stats()
    assert stats["levels"]["global"]["global"]["in_flight"] == 0
    assert stats["budgets"]["global"]["max_cost_per_day"]["reserved"] == 0
    assert stats["cost_today"] == 3 * 8  # three calls answered, 8 each


# --------------------------------------------------------------------------------------------
# Was (hostile pass, F2): "a call whose request went out but whose answer was not seen, because ... the connection
# was lost, may still have been served and billed: it is counted at its reservation"
# (docs/budgets.md). The provider received the request and closed the connection without
# answering: LiteLLM raises its InternalServerError (a subclass of openai's APIStatusError), which
# outcome_unseen() takes for "the provider's HTTP answer", so the call counts 0.
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_connection_lost_after_the_send_counts_its_worst_case(mode: str, provider: FakeProvider,
                                                                      clock: FakeClock) -> None:
    limiter = make(clock, {})
    provider.state.push(Scripted(drop=True))  # read the request, then hang up without an answer
    with pytest.raises(litellm.InternalServerError):
        if mode == "sync":
            litellm.completion(**small(provider))
        else:
            await litellm.acompletion(**small(provider))
    assert provider.state.count() == 1  # the provider did receive it
    stats = limiter.get_usage_stats()
    assert stats["levels"]["global"]["global"]["in_flight"] == 0
    assert stats["cost_today"] == 14  # worst case, like a timeout; not 0


# --------------------------------------------------------------------------------------------
# Was (hostile pass, F3): README "A stream holds its slot while it is read, until the chunk that ends generation (the
# one with finish_reason; a usage chunk and [DONE] after it are bytes in transit)". True for async
# streams (the streaming deployment hook frees it), not for sync ones: a sync stream read up to its
# finish_reason chunk (the usual `if finish_reason: break`) holds its slot for a whole lease.
def test_a_sync_stream_read_to_its_finish_reason_chunk_gives_its_slot_back(provider: FakeProvider,
                                                                            clock: FakeClock,
                                                                            backend: dict[str, Any]) -> None:
    limiter = make(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0},
                           "estimation": {"lease_seconds": 30}}, backend)
    stream = litellm.completion(**small(provider, stream=True, stream_options={"include_usage": True}))
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            break  # generation is over
    assert g(limiter)["in_flight"] == 0, "slot held after the chunk that ends generation"
    litellm.completion(**small(provider))  # the slot is free: admitted at once


async def test_an_async_stream_read_to_its_finish_reason_chunk_gives_its_slot_back(provider: FakeProvider,
                                                                                   clock: FakeClock) -> None:
    """(The async counterpart holds: for comparison.)"""
    limiter = make(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0},
                           "estimation": {"lease_seconds": 30}})
    stream = await litellm.acompletion(**small(provider, stream=True, stream_options={"include_usage": True}))
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            break
    await wait_until(lambda: g(limiter)["in_flight"] == 0)
    await litellm.acompletion(**small(provider))


# --------------------------------------------------------------------------------------------
# Was (hostile pass, F4): a waiting call cancelled in the instant it is granted (asyncio.wait_for / timeout firing in
# the same loop iteration as the grant, a TaskGroup sibling failing, ...) is never sent, yet
# queue_async's cleanup releases it with cost=None, i.e. at its worst-case cost, and counts it as
# a request in the spend book (and toward max_requests_per_run).
async def test_a_call_cancelled_as_it_is_granted_costs_nothing(provider: FakeProvider, clock: FakeClock,
                                                                backend: dict[str, Any]) -> None:
    limiter = make(clock, {"global": {"requests_per_minute": 1}}, backend)
    await litellm.acompletion(**small(provider))  # 8
    late = asyncio.ensure_future(litellm.acompletion(**small(provider)))
    await wait_until(lambda: limiter._engine.queue_length == 1)
    clock.advance(61)
    limiter._engine.dispatch()  # granted now (its task has not run yet)...
    late.cancel()  # ...and cancelled before it could send anything
    with contextlib.suppress(asyncio.CancelledError):
        await late
    assert provider.state.count() == 1
    stats = limiter.get_usage_stats()
    assert g(limiter)["in_flight"] == 0
    assert stats["requests_today"] == 1
    assert stats["cost_today"] == 8  # not 8 + 14 for a call never sent


def test_a_sync_call_interrupted_as_it_is_granted_costs_nothing(provider: FakeProvider, clock: FakeClock) -> None:
    """Same in acquire_sync: a BaseException (KeyboardInterrupt) landing right after the grant."""
    from hive_ratelimit_plugin import _waiting

    limiter = make(clock, {"global": {"requests_per_minute": 1}})
    litellm.completion(**small(provider))  # 8
    real_wait, real_sleep = _waiting._settled_after_wake, _waiting._sleep_for

    def interrupted(engine: Any, waiter: Any, start: float, deadline: float) -> bool:
        clock._now += 61  # the window slides while the thread sleeps
        engine.dispatch()  # it is granted...
        assert waiter.granted
        raise KeyboardInterrupt  # ...and Ctrl-C lands before the call is sent

    _waiting._settled_after_wake = interrupted
    _waiting._sleep_for = lambda *a: 0.0  # (no real sleep: the fake clock moves in `interrupted`)
    try:
        with pytest.raises(KeyboardInterrupt):
            litellm.completion(**small(provider))
    finally:
        _waiting._settled_after_wake, _waiting._sleep_for = real_wait, real_sleep
    assert provider.state.count() == 1
    stats = limiter.get_usage_stats()
    assert stats["requests_today"] == 1
    assert stats["cost_today"] == 8


async def test_cancelling_a_task_group_charges_nothing_for_calls_never_sent(provider: FakeProvider,
                                                                            clock: FakeClock) -> None:
    """F4 as it happens without any contrivance: a TaskGroup of 6 calls under concurrent_requests 2 is
    cancelled (a sibling task fails) while 2 are on the wire. Cancelling those releases their slots,
    which grants 2 of the waiters in the same instant, and those are cancelled too: never sent,
    yet each is charged its worst case (14) and counted as a request."""
    limiter = make(clock, {"global": {"concurrent_requests": 2}})
    provider.state.latency = 0.3

    async def fail_when_two_are_sent() -> None:
        await wait_until(lambda: provider.state.in_flight == 2 and limiter._engine.queue_length == 4)
        raise ValueError("a sibling task failed")

    with pytest.raises(ExceptionGroup):
        async with asyncio.TaskGroup() as tg:
            for _ in range(6):
                tg.create_task(litellm.acompletion(**small(provider)))
            tg.create_task(fail_when_two_are_sent())
    await wait_until(lambda: provider.state.in_flight == 0)  # the two on the wire land in the log
    sent = provider.state.count()
    assert sent == 2
    stats = limiter.get_usage_stats()
    assert g(limiter)["in_flight"] == 0
    assert stats["requests_today"] == sent
    assert stats["cost_today"] == 14 * sent  # the two sent count at their worst case; nothing else


# --------------------------------------------------------------------------------------------
# Was (hostile pass, F5): expired leases are swept only by a later admission (Engine._maintain runs from _acquire, and
# from dispatch() only while calls wait). In a process that goes quiet after abandoning a stream,
# the stream's slot and its worst-case spend stay unsettled indefinitely: get_usage_stats() (and
# status/metrics) keep showing it in flight with the spend reserved, not spent, and no row reaches
# the state file (other processes sharing it undercount) until the next call or exit.
async def test_an_abandoned_stream_is_settled_once_its_lease_has_passed_without_another_call(
        provider: FakeProvider, clock: FakeClock, backend: dict[str, Any]) -> None:
    limiter = make(clock, {"estimation": {"lease_seconds": 30}}, backend)
    stream = await litellm.acompletion(**small(provider, stream=True))
    async for _ in stream:
        break  # abandoned, not closed
    assert g(limiter)["in_flight"] == 1
    clock.advance(60)  # two leases later
    await asyncio.sleep(0.1)
    stats = limiter.get_usage_stats()
    assert stats["levels"]["global"]["global"]["in_flight"] == 0
    assert stats["cost_today"] == 14  # counted at its worst case, as an expired lease is


# --------------------------------------------------------------------------------------------
# Helpers for F2b / F7: a bare OpenAI-compatible endpoint on 127.0.0.1 answering 200 with a body the
# fake provider cannot produce (it always reports usage and always sends well-formed JSON).
@pytest.fixture
def raw_server() -> Any:
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer: dict[str, Any] = {"body": b"", "type": "application/json", "hits": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            answer["hits"] += 1
            data = answer["body"]
            self.send_response(200)
            self.send_header("content-type", answer["type"])
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    answer["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    answer["json"] = json.dumps
    yield answer
    server.shutdown()
    server.server_close()


def raw_kwargs(raw: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "openai/gpt-4o-mini", "api_base": raw["url"], "api_key": "sk-test-SECRET-0123456789",
            "messages": [{"role": "user", "content": "hello there"}], "max_retries": 0, "max_tokens": 5, **extra}


# Was (hostile pass, F7): a 200 answer that reports no usage (some OpenAI-compatible servers and gateways omit it) is
# turned by LiteLLM into Usage(prompt_tokens=0, completion_tokens=0); the limiter takes those zeros
# as the provider's count and settles the call at 0 tokens and $0. Every such call is free: budgets
# never trip and token limits never fill. (Unknown usage should keep the estimate / worst case, as
# the limiter already does for a usage-less response object and for "$0 with tokens > 0".)
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_answer_without_usage_is_not_free(mode: str, raw_server: dict[str, Any], clock: FakeClock) -> None:
    limiter = make(clock, {})
    raw_server["body"] = raw_server["json"]({
        "id": "x", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok ok"}}],
    }).encode()
    if mode == "sync":
        litellm.completion(**raw_kwargs(raw_server))
    else:
        await litellm.acompletion(**raw_kwargs(raw_server))
    assert raw_server["hits"] == 1
    stats = limiter.get_usage_stats()
    assert stats["tokens_today"] > 0
    assert stats["cost_today"] > 0  # (its estimate, 14, would do)


# Was (hostile pass, F2b): same root cause as F2 — a 200 answer whose body cannot be parsed (an HTML error page from a
# gateway, a body cut short) was served, and may be billed, but LiteLLM raises InternalServerError
# (an APIStatusError) and the call counts $0.
@pytest.mark.parametrize("body", [b"<html>upstream hiccup</html>", b'{"id": "x", "object": "chat.completion", "cho'])
async def test_a_served_answer_that_cannot_be_parsed_counts_its_worst_case(body: bytes, raw_server: dict[str, Any],
                                                                          clock: FakeClock) -> None:
    limiter = make(clock, {})
    raw_server["body"] = body
    with pytest.raises(litellm.InternalServerError):
        await litellm.acompletion(**raw_kwargs(raw_server))
    assert raw_server["hits"] == 1
    assert limiter.get_usage_stats()["cost_today"] == 14


@pytest.mark.parametrize("mode", ["async"])  # (LiteLLM keeps a sync stream referenced: its lease bounds it)
async def test_a_stream_dropped_unclosed_gives_its_slot_back_once_collected(mode: str, provider: FakeProvider,
                                                                          clock: FakeClock) -> None:
    """``async for chunk in stream: break`` without ``aclose()``: once the stream is collected
    nothing can read it, and its slot comes back (it was held for the whole lease, five minutes
    by default)."""
    import gc

    limiter = make(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0}})
    provider.state.completion_tokens = 20

    async def read_one_chunk() -> None:
        if mode == "sync":
            for _ in litellm.completion(**chat_kwargs(provider, stream=True, max_tokens=30)):
                break
        else:
            async for _ in await litellm.acompletion(**chat_kwargs(provider, stream=True, max_tokens=30)):
                break

    await read_one_chunk()
    gc.collect()
    await wait_until(lambda: g(limiter)["in_flight"] == 0)
    litellm.completion(**small(provider))  # admitted at once: the slot is free


async def test_a_call_cancelled_while_a_callback_makes_a_nested_call_leaks_nothing(provider: FakeProvider,
                                                                                   clock: FakeClock) -> None:
    """A callback's pre-call hook that makes a LiteLLM call of its own (an LLM judge) runs it in the
    outer call's context: its admission took the outer call's place in the guard, so cancelling
    the outer call released the judge's (settled) id and left its own slot held for a lease."""
    from litellm.integrations.custom_logger import CustomLogger

    class Judge(CustomLogger):
        async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> None:
            if not (kwargs.get("metadata") or {}).get("judge"):
                await litellm.acompletion(**small(provider, metadata={"judge": True}))
            return None

    limiter = make(clock, {})
    litellm.callbacks.append(Judge())
    provider.state.push(Scripted(status=200, delay=0.5))  # the judge's call is slow
    outer = asyncio.ensure_future(litellm.acompletion(**small(provider)))
    await wait_until(lambda: provider.state.in_flight == 1)  # the judge's call is on the wire
    outer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await outer
    assert g(limiter)["in_flight"] == 0, "the outer call's slot is still held"
    assert limiter._engine._leases == {}


async def test_turning_the_limiter_off_releases_the_calls_waiting(provider: FakeProvider, clock: FakeClock,
                                                                 backend: dict[str, Any]) -> None:
    """``reload(enabled: false)`` lets the calls already waiting go at once (with Redis too)."""
    limiter = make(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 30}}, backend)
    await litellm.acompletion(**small(provider))
    late = asyncio.ensure_future(litellm.acompletion(**small(provider)))
    await wait_until(lambda: limiter._engine.queue_length == 1)
    limiter.reload({"enabled": False, "pricing": UNIT_PRICE, "state_path": ":memory:",
                    "budget": {"max_daily_spend": 100_000}, "global": {"requests_per_minute": 1}, **backend})
    await asyncio.wait_for(late, 5)
    assert provider.state.count() == 2
