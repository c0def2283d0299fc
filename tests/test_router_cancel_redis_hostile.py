"""Router conformance under cancellation and with the Redis backend: a real ``litellm.Router``
against the fake provider, the plugin compared with what LiteLLM does without it.

Bug found by this pass (the test below fails without its fix):

* ``BackendUnavailableError`` (Redis down under ``on_backend_error: closed``, or under ``local`` a
  budget this process has not seen) was retried by a Router in the same model group, like any
  error without a status code: with ``num_retries=2`` the call was refused three times, after the
  Router's backoff each time (~4.5 s on LiteLLM 1.83.4 and 1.110.2; twice that with a fallback
  group, whose call was refused three times too), though nothing could change in between: the
  limiter tries Redis again only every ``redis.retry_interval``. It now reads ``num_retries == 0``
  for the Router, as ``RateLimitQueueTimeout`` and ``CircuitOpenError`` do: refused once per group,
  still falling back.

Pinned, verified correct and covered nowhere else in tests/ (two processes, each with its own
limiter and Router, on one Redis prefix: ``tests/router_redis_worker.py``): a shared
``requests_per_minute`` holds exactly across the two Routers; a Router call cancelled in flight in
one process frees the shared concurrency slot for a call queued in the other at once; a 429 with
``retry-after`` seen by one process keeps the other's Router off that deployment.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import BackendUnavailableError, HiveLimiter
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .conftest import REDIS_URL
from .helpers import unused_port
from .test_router_queue_timeout import refusals, watch_cooldowns

KEY = "sk-test-SECRET-0123456789"
MESSAGES = [{"role": "user", "content": "hello there"}]
WORKER = Path(__file__).with_name("router_redis_worker.py")


def deployment(group: str, model: str, p: FakeProvider) -> dict[str, Any]:
    return {"model_name": group, "litellm_params": {"model": model, "api_base": p.url, "api_key": KEY}}


# ------------------------------------------------------------------ Redis down: the Router's retries
@pytest.mark.parametrize("fallback", [False, True], ids=["no-fallback", "fallback"])
@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_router_does_not_retry_a_call_refused_while_redis_is_down(
        mode: str, fallback: bool, provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis unreachable, ``on_backend_error: closed``, a Router with ``num_retries=2``: the call is
    refused once per group (the fallback's once too), with nothing sent and no cooldown, and its
    caller gets ``BackendUnavailableError`` at once, not after the Router's backoff."""
    limiter = HiveLimiter({"backend": f"redis://127.0.0.1:{unused_port()}/0",
                           "redis": {"on_backend_error": "closed", "socket_timeout": 0.2, "retry_interval": 5.0},
                           "global": {"requests_per_minute": 10}, "queue": {"max_wait_seconds": 0}}, clock=clock)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    extra: dict[str, Any] = {"fallbacks": [{"gpt": ["cheap"]}]} if fallback else {}
    router = litellm.Router(model_list=[deployment("gpt", "openai/gpt-4o", provider),
                                        deployment("cheap", "openai/gpt-4o-mini", provider)],
                            num_retries=2, **extra)
    added = watch_cooldowns(router)
    refused = refusals(limiter, monkeypatch)
    with pytest.raises(BackendUnavailableError) as info:
        if mode == "async":
            await router.acompletion(model="gpt", messages=MESSAGES)
        else:
            import asyncio

            await asyncio.to_thread(router.completion, model="gpt", messages=MESSAGES)
    assert info.value.retry_after is not None
    assert [type(e) for e in refused] == [BackendUnavailableError] * (2 if fallback else 1)
    assert len(provider.state.log) == 0 and added == []
    stats = limiter.get_usage_stats()
    assert stats["queued"] == 0 and not limiter._engine._leases


# ------------------------------------------------------------------ two processes on one Redis prefix
class Worker:
    """A process with its own limiter and Router (tests/router_redis_worker.py), driven by line."""

    def __init__(self, config: dict[str, Any], model_list: list[dict[str, Any]]) -> None:
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        self.proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(config), json.dumps(model_list)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.results: dict[str, str] = {}
        threading.Thread(target=self._read, daemon=True).start()
        assert self._next(60).get("ready")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def _next(self, timeout: float) -> dict[str, Any]:
        while True:
            msg = self.lines.get(timeout=timeout)
            if "id" in msg:
                self.results[msg["id"]] = msg["result"]
                continue
            return msg

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def call(self, call_id: str, **kw: Any) -> None:
        self.send(op="call", id=call_id, kw={"model": "gpt", **kw})

    def result(self, call_id: str, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        while call_id not in self.results:
            try:
                msg = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no answer for {call_id}") from None
            if "id" in msg:
                self.results[msg["id"]] = msg["result"]
        return self.results[call_id]

    def stats(self) -> dict[str, Any]:
        self.send(op="stats")
        return self._next(30)["stats"]  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send(op="quit")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def workers(redis_prefix: str) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(config: dict[str, Any], model_list: list[dict[str, Any]]) -> Worker:
        w = Worker({**config, "backend": REDIS_URL, "redis": {"key_prefix": redis_prefix},
                    "state_path": ":memory:"}, model_list)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()


def poll(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def settled(*ws: Worker) -> None:
    for w in ws:
        poll(lambda w=w: (lambda s: s["in_flight"] == 0 and s["queued"] == 0 and s["leases"] == 0)(w.stats()))


def test_two_routers_share_a_requests_per_minute_limit_exactly(provider: FakeProvider, workers: Any) -> None:
    """Three requests a minute between two processes' Routers, six calls at once: exactly three
    are sent, the others refused (nothing sent), and both books say three."""
    config = {"global": {"requests_per_minute": 3}, "queue": {"max_wait_seconds": 0}}
    a, b = (workers(config, [deployment("gpt", "openai/gpt-4o", provider)]) for _ in range(2))
    for i in range(3):
        a.call(f"a{i}")
        b.call(f"b{i}")
    results = [w.result(f"{n}{i}") for w, n in ((a, "a"), (b, "b")) for i in range(3)]
    assert sorted(results) == ["RateLimitQueueTimeout"] * 3 + ["ok"] * 3
    assert provider.state.count() == 3
    settled(a, b)
    assert a.stats()["requests"] == b.stats()["requests"] == 3


def test_a_router_call_cancelled_in_one_process_frees_the_shared_slot_for_the_other(
        provider: FakeProvider, workers: Any) -> None:
    """One call at a time between two processes. A's call is in flight (a slow answer), B's waits
    in B's queue; A's caller cancels: B's call is sent while A's abandoned request is still being
    answered, not after it or a lease. Each counts one request; nothing is left held."""
    config = {"global": {"requests_per_minute": 100, "concurrent_requests": 1}, "queue": {"max_wait_seconds": 60}}
    a, b = (workers(config, [deployment("gpt", "openai/gpt-4o", provider)]) for _ in range(2))
    provider.state.latency = 3.0
    a.call("a1")
    poll(lambda: provider.state.in_flight == 1)
    b.call("b1")
    poll(lambda: b.stats()["queued"] == 1)
    assert provider.state.in_flight == 1
    a.send(op="cancel", id="a1")
    assert a.result("a1") == "CancelledError"
    poll(lambda: provider.state.in_flight == 2, timeout=2.5)  # a1 still being answered
    provider.state.latency = 0.0
    assert b.result("b1") == "ok"
    poll(lambda: provider.state.in_flight == 0)
    settled(a, b)
    assert provider.state.count() == 2 and a.stats()["requests"] == 2


def test_a_429_seen_by_one_process_keeps_the_others_router_off_that_deployment(
        provider: FakeProvider, workers: Any) -> None:
    """A's call to gpt-4o gets a 429 with ``retry-after: 30`` (no retries: A's caller gets the
    ``RateLimitError``). B's Router, whose group has gpt-4o and gpt-4o-mini, then sends every call
    to gpt-4o-mini: it leaves the deployment another process saw refused out of its choice."""
    config = {"global": {"requests_per_minute": 100}, "retry": {"max_attempts": 1}}
    with FakeProvider() as other:
        a = workers(config, [deployment("gpt", "openai/gpt-4o", provider)])
        b = workers(config, [deployment("gpt", "openai/gpt-4o", provider),
                             deployment("gpt", "openai/gpt-4o-mini", other)])
        provider.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        a.call("a1")
        assert a.result("a1") == "RateLimitError"
        assert provider.state.count(429) == 1
        for i in range(6):
            b.call(f"b{i}")
            assert b.result(f"b{i}") == "ok"
        assert provider.state.count() == 1 and other.state.count() == 6
        settled(a, b)
