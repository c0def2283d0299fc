"""Helpers shared by the tests (not fixtures)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import litellm
import pytest
from litellm.integrations.custom_logger import CustomLogger

from hive_ratelimit_plugin import HiveLimiter, RateLimitQueueTimeout
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider


class Recorder(CustomLogger):
    """Records the (clock) time at which each HTTP attempt is about to be sent."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.sent: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
        with self.lock:
            self.sent.append((self.clock(), str(kwargs.get("model"))))


def wav(seconds: float, rate: int = 16_000) -> bytes:
    """A 16-bit mono WAV of ``seconds`` of silence (byte rate ``2 * rate``)."""
    data = b"\x00\x00" * int(rate * seconds)
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16) + b"data" + struct.pack("<I", len(data))
    return header + data


def chat_kwargs(provider: FakeProvider, **extra: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "model": "openai/gpt-4o-mini",
        "api_base": provider.url,
        "api_key": "sk-test-SECRET-0123456789",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_retries": 0,
    }
    kw.update(extra)
    return kw


def max_in_any_window(times: list[float], period: float) -> int:
    """The largest number of events inside any half-open interval of ``period`` seconds."""
    times = sorted(times)
    best = 0
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - period:
            j += 1
        best = max(best, i - j + 1)
    return best


class Ticker:
    """Advances a FakeClock by ``step`` every few real milliseconds, in a thread, while active.

    Time-dependent waits (cooldowns, windows) then pass in fake time at a controlled pace without
    sleeping for real durations.

    ``when`` (a predicate, e.g. "a call is waiting") makes it move the clock only while it holds:
    real time drives the ticker, and a loaded machine can keep the code under test busy for long
    real seconds (a slow provider, a late logging thread) in which an unconditional ticker carries
    the fake clock past a window or a lease the test then asserts on.
    """

    def __init__(self, clock: Any, step: float = 0.25, every: float = 0.003,
                 when: Callable[[], bool] | None = None) -> None:
        self.clock = clock
        self.step = step
        self.every = every
        self.when = when
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if self.when is None or self.when():
                self.clock.advance(self.step)

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


#: Configuration keys of the backend under test (set by the ``contract_backend`` fixture: the
#: modules marked with it run against the in-memory and the Redis backend alike).
BACKEND: dict[str, Any] = {}


def with_backend(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` on the backend under test."""
    return {**config, **BACKEND} if BACKEND else config


def make_limiter(clock: FakeClock, config: dict[str, Any]) -> HiveLimiter:
    """A limiter on ``clock`` (which wakes its waiters when moved), registered with LiteLLM."""
    limiter = HiveLimiter(with_backend(config), clock=clock)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    return limiter


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` on the running loop until it holds (bounded by ``timeout`` real seconds)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def chunk_reader(stream: Any, sync: bool) -> Callable[[], Awaitable[Any]]:
    """A coroutine function that reads one chunk of ``stream`` (a sync or an async iterator),
    raising ``StopAsyncIteration`` at its end either way."""
    if sync:
        it = iter(stream)

        async def read() -> Any:
            try:
                return next(it)
            except StopIteration:
                raise StopAsyncIteration from None
        return read
    ait = aiter(stream)

    async def read_async() -> Any:
        return await anext(ait)
    return read_async


def global_usage(limiter: HiveLimiter) -> dict[str, Any]:
    """The global level's usage (``get_usage_stats``)."""
    return limiter.get_usage_stats()["levels"]["global"]["global"]  # type: ignore[no-any-return]


async def assert_a_stream_being_read_keeps_its_slot(limiter: HiveLimiter, provider: FakeProvider, clock: FakeClock,
                                                   read: Callable[[], Awaitable[Any]]) -> None:
    """Read a stream (from ``chunk_reader``) for 80 s, 20 s between reads, its lease being 30 s: it
    keeps its slot (the limiter allowing one at a time), then gives it back once read to its end."""
    for _ in range(4):
        await read()
        clock.advance(20)  # past the lease, never past a renewal
    with pytest.raises(RateLimitQueueTimeout):
        await litellm.acompletion(**chat_kwargs(provider))
    assert global_usage(limiter)["in_flight"] == 1
    with contextlib.suppress(StopAsyncIteration):
        while True:
            await read()
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)


async def assert_cancelling_in_flight_frees_the_slot(limiter: HiveLimiter, provider: FakeProvider,
                                                     call: Callable[[], Awaitable[Any]]) -> None:
    """Cancel ``call()`` while its request is in flight (the limiter allowing one at a time): its
    slot comes back at once, not after a lease, and the next call gets it."""
    provider.state.latency = 0.3
    task = asyncio.ensure_future(call())
    await wait_until(lambda: provider.state.in_flight == 1)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the call was not cancelled")
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
    provider.state.latency = 0.0
    await call()
    # the abandoned request is still answered (into the log): let it finish inside this test
    await wait_until(lambda: provider.state.in_flight == 0)


class JsonServer:
    """An HTTP server on 127.0.0.1 answering every POST with ``body()`` as JSON: a provider whose
    answers the fake provider cannot script (odd usage, another wire format). ``url`` is its root."""

    def __init__(self, body: Callable[[], dict[str, Any]]) -> None:
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                data = json.dumps(body()).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def unused_port() -> int:
    """A free TCP port on 127.0.0.1, below the kernel's ephemeral range. Connecting to a port in
    that range with nothing listening can connect a client to itself (TCP simultaneous open), and
    a "dead" Redis then seems to answer, with the client's own command: one CI run saw a killed
    Redis "answer again after 0.0s". Ports the kernel never hands out as a source cannot."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError), \
            open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
        low = int(f.read().split()[0])
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")
