"""Exact under contention: 200 asyncio tasks and 16 threads mixing calls never exceed any limit.

Time-dependent behaviour runs on the injected :class:`FakeClock`. A driver thread advances it in
steps of a few fake seconds every few real milliseconds while 200 asyncio tasks (``acompletion``,
streaming ``acompletion``, ``aembedding``) and 16 threads (``completion``, streaming
``completion``, ``embedding``) run against the fake provider at the same time. Each HTTP attempt
is stamped on the fake clock by a recorder registered *after* the limiter (its
``log_pre_api_call`` runs right before the request is sent), so the stamps are the send times.

The driver only moves the clock when every admitted call has been stamped (checked under the
engine's lock, so no admission can slip in between the check and the move). Without that, a call
admitted at ``t`` could be stamped at ``t + step`` and the stamps would no longer be the
admission times the limiter decided on.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import defaultdict
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import Recorder, max_in_any_window

SECRET = "sk-test-SECRET-0123456789"

RPM = 40
TPM = 800
CONCURRENCY = 4
MODEL_RPM = 12  # openai/gpt-4o-mini
AGENT0_RPM = 5  # agent-0
AGENT_RPM = 8  # every other agent ("*": each agent on its own)

N_TASKS = 200
N_THREADS = 16
CALLS_PER_WORKER = 2
# Fake seconds per driver step: irregular, so that admissions land at all sorts of offsets and an
# off-by-a-second window would show (steps that divide 60 would hide it).
STEPS = (1.5, 7.0, 3.0, 11.0, 0.5, 4.5, 2.0, 6.0)
AGENTS = [f"agent-{i}" for i in range(6)]

CONFIG: dict[str, Any] = {
    "global": {"requests_per_minute": RPM, "tokens_per_minute": TPM, "concurrent_requests": CONCURRENCY},
    "providers": {"openai": {"gpt-4o-mini": {"requests_per_minute": MODEL_RPM}}},
    "agents": {"agent-0": {"requests_per_minute": AGENT0_RPM}, "*": {"requests_per_minute": AGENT_RPM}},
    "queue": {"max_wait_seconds": 10**7, "max_size": 10_000},
}


class SendRecorder(Recorder):
    """Recorder that also keeps each attempt's call id (to join it with the call's usage)."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.by_call: dict[str, float] = {}

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
        with self.lock:
            now = self.clock()
            self.sent.append((now, str(kwargs.get("model"))))
            call_id = kwargs.get("litellm_call_id")
            if call_id:
                self.by_call[str(call_id)] = now


class Plan:
    """What each call was: its agent, model, kind; filled in with its usage when it returns."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, dict[str, Any]] = {}
        self.errors: list[BaseException] = []
        self._ids = itertools.count()

    def new(self, kind: str, agent: str, model: str) -> str:
        with self.lock:
            call_id = f"contention-{next(self._ids)}-{kind}"
            self.calls[call_id] = {"kind": kind, "agent": agent, "model": model, "tokens": None}
        return call_id

    def done(self, call_id: str, usage: Any) -> None:
        with self.lock:
            self.calls[call_id]["tokens"] = int(usage.prompt_tokens) + int(usage.completion_tokens or 0)


def _chat(provider: FakeProvider, call_id: str, agent: str, model: str, words: int, **extra: Any) -> dict[str, Any]:
    # max_tokens leaves room above the provider's 5 completion tokens, so the limiter's estimate
    # is never below what the provider reports (the window check below uses the real usage).
    return {
        "model": model,
        "api_base": provider.url,
        "api_key": SECRET,
        # Unique per call: identical requests from one agent would look like a runaway loop.
        "messages": [{"role": "user", "content": " ".join(["word"] * words) + f" ({call_id})"}],
        "max_tokens": 40,
        "max_retries": 0,
        "metadata": {"agent_id": agent},
        "litellm_call_id": call_id,
        **extra,
    }


def _embed(provider: FakeProvider, call_id: str, agent: str) -> dict[str, Any]:
    # Digits separated by spaces: the tokenizer counts more tokens than the provider's
    # characters/4, so the estimate again bounds the reported usage.
    return {
        "model": "openai/text-embedding-3-small",
        "api_base": provider.url,
        "api_key": SECRET,
        "input": ["1 2 3 4 5 6 " + " ".join(call_id.split("-")[1])],  # unique digits per call
        "max_retries": 0,
        "metadata": {"agent_id": agent},
        "litellm_call_id": call_id,
    }


async def _async_worker(i: int, provider: FakeProvider, plan: Plan) -> None:
    for j in range(CALLS_PER_WORKER):
        agent = AGENTS[(i + j) % len(AGENTS)]
        kind = ("chat", "stream", "embed")[(i + j) % 3]
        model = "openai/gpt-4o-mini" if (i + j) % 2 else "openai/gpt-4o"
        words = 1 + (i * 7 + j) % 40
        if kind == "embed":
            cid = plan.new("aembedding", agent, "openai/text-embedding-3-small")
            resp = await litellm.aembedding(**_embed(provider, cid, agent))
            plan.done(cid, resp.usage)
        elif kind == "chat":
            cid = plan.new("acompletion", agent, model)
            resp = await litellm.acompletion(**_chat(provider, cid, agent, model, words))
            plan.done(cid, resp.usage)
        else:
            cid = plan.new("acompletion-stream", agent, model)
            stream = await litellm.acompletion(**_chat(provider, cid, agent, model, words), stream=True,
                                               stream_options={"include_usage": True})
            usage = None
            async for chunk in stream:
                if getattr(chunk, "usage", None) is not None:
                    usage = chunk.usage
            assert usage is not None, "include_usage stream ended without a usage chunk"
            plan.done(cid, usage)


def _thread_worker(i: int, provider: FakeProvider, plan: Plan) -> None:
    try:
        for j in range(CALLS_PER_WORKER):
            agent = AGENTS[(i + j + 1) % len(AGENTS)]
            kind = ("chat", "embed", "stream")[(i + j) % 3]
            model = "openai/gpt-4o-mini" if (i + j) % 2 else "openai/gpt-4o"
            words = 1 + (i * 5 + j) % 30
            if kind == "embed":
                cid = plan.new("embedding", agent, "openai/text-embedding-3-small")
                resp = litellm.embedding(**_embed(provider, cid, agent))
                plan.done(cid, resp.usage)
            elif kind == "chat":
                cid = plan.new("completion", agent, model)
                resp = litellm.completion(**_chat(provider, cid, agent, model, words))
                plan.done(cid, resp.usage)
            else:
                cid = plan.new("completion-stream", agent, model)
                stream = litellm.completion(**_chat(provider, cid, agent, model, words), stream=True,
                                            stream_options={"include_usage": True})
                usage = None
                for chunk in stream:
                    if getattr(chunk, "usage", None) is not None:
                        usage = chunk.usage
                assert usage is not None, "include_usage stream ended without a usage chunk"
                plan.done(cid, usage)
    except BaseException as exc:  # reported by the test
        with plan.lock:
            plan.errors.append(exc)


def _drive(limiter: HiveLimiter, clock: FakeClock, recorder: SendRecorder, stop: threading.Event,
           stats: dict[str, int]) -> None:
    """Advance the fake clock by the next of STEPS every few ms, only when every admitted call was stamped."""
    engine = limiter._engine
    pause = threading.Event()
    steps = itertools.cycle(STEPS)
    while not stop.is_set():
        pause.wait(0.015)
        step = next(steps)
        give_up = time.monotonic() + 2.0
        while not stop.is_set():
            with engine._lock:  # no admission can happen between the check and the move
                with recorder.lock:
                    stamped = len(recorder.sent)
                if engine.admitted_total == stamped:
                    clock.advance(step)
                    stats["steps"] += 1
                    break
                if time.monotonic() > give_up:  # an admitted call never sent: let the test fail
                    clock.advance(step)
                    stats["forced"] += 1
                    break
            pause.wait(0.001)


def _max_tokens_in_any_window(events: list[tuple[float, int]], period: float) -> int:
    events = sorted(events)
    best = total = j = 0
    for t, amount in events:
        total += amount
        while events[j][0] <= t - period:
            total -= events[j][1]
            j += 1
        best = max(best, total)
    return best


async def test_200_tasks_and_16_threads_never_exceed_any_limit(provider: FakeProvider, clock: FakeClock) -> None:
    """200 asyncio tasks + 16 threads mixing calls stay within every request, token and concurrency limit."""
    provider.state.latency = 0.003  # long enough for concurrency to bind
    limiter = HiveLimiter(CONFIG, clock=clock)
    clock.attach(limiter)
    recorder = SendRecorder(clock)
    litellm.callbacks.append(limiter)
    litellm.callbacks.append(recorder)  # after the limiter: sees only admitted attempts
    plan = Plan()
    stop = threading.Event()
    stats = {"steps": 0, "forced": 0}
    driver = threading.Thread(target=_drive, args=(limiter, clock, recorder, stop, stats), daemon=True)
    threads = [threading.Thread(target=_thread_worker, args=(i, provider, plan), daemon=True)
               for i in range(N_THREADS)]
    start_fake = clock()
    driver.start()
    for t in threads:
        t.start()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(_async_worker(i, provider, plan) for i in range(N_TASKS)), return_exceptions=True),
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not any(t.is_alive() for t in threads), "sync workers did not finish"
        # Sync streams settle from LiteLLM's logging thread: let the last ones land (bounded).
        for _ in range(500):
            if not limiter._engine._leases:
                break
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        driver.join(5)

    errors = [r for r in results if isinstance(r, BaseException)] + plan.errors
    assert not errors, f"calls failed: {errors[:3]!r}"
    total_calls = (N_TASKS + N_THREADS) * CALLS_PER_WORKER
    assert len(plan.calls) == total_calls
    assert all(c["tokens"] is not None for c in plan.calls.values()), "a call did not complete"
    assert stats["forced"] == 0, "an admitted call was never sent"

    # Every call reached the provider exactly once, and only admitted attempts were sent.
    assert provider.state.count(200) == provider.state.count() == total_calls
    assert len(recorder.sent) == total_calls == limiter.get_usage_stats()["admitted_total"]
    assert set(recorder.by_call) == set(plan.calls)

    # Requests: global, per model and per agent, in any window of 60 fake seconds.
    send_times = [t for t, _ in recorder.sent]
    assert max_in_any_window(send_times, 60.0) <= RPM
    by_model: dict[str, list[float]] = defaultdict(list)
    by_agent: dict[str, list[float]] = defaultdict(list)
    for cid, info in plan.calls.items():
        by_model[info["model"]].append(recorder.by_call[cid])
        by_agent[info["agent"]].append(recorder.by_call[cid])
    assert max_in_any_window(by_model["openai/gpt-4o-mini"], 60.0) <= MODEL_RPM
    assert max_in_any_window(by_agent["agent-0"], 60.0) <= AGENT0_RPM
    for agent in AGENTS[1:]:
        assert max_in_any_window(by_agent[agent], 60.0) <= AGENT_RPM, agent

    # Tokens the provider reported, placed at each call's send time.
    token_events = [(recorder.by_call[cid], info["tokens"]) for cid, info in plan.calls.items()]
    assert sum(n for _, n in token_events) == sum(
        r.prompt_tokens + r.completion_tokens for r in provider.state.log)
    assert _max_tokens_in_any_window(token_events, 60.0) <= TPM

    # Concurrency, as the provider saw it.
    assert 1 <= provider.state.max_in_flight <= CONCURRENCY

    # The limits really were under pressure (otherwise the checks above prove nothing).
    assert limiter.get_usage_stats()["queued_total"] >= total_calls // 2
    # (A pressure check, not a throughput figure, which benchmarks/ measures: the fake clock moves
    # on real time, so a loaded machine sends fewer calls per fake minute.)
    assert max_in_any_window(send_times, 60.0) >= RPM * 0.4
    assert clock() - start_fake >= 60.0 * (total_calls / RPM - 1)

    # Nothing left behind.
    usage = limiter.get_usage_stats()
    assert usage["queued"] == 0
    for level, scopes in usage["levels"].items():
        for key, entry in scopes.items():
            assert entry["in_flight"] == 0, (level, key)
            assert entry["queued"] == 0, (level, key)


@pytest.fixture(autouse=True)
def _restore_provider_latency(provider: FakeProvider) -> Any:
    yield
    provider.state.latency = 0.0
