"""The Redis backend beyond the shared contract: several processes, outages, key expiry, config.

The contract itself (windows, queueing, budgets, provider signals) runs against both backends in
test_engine, test_litellm_calls, test_budgets and test_provider_429.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.config import load_config
from hive_ratelimit_plugin.errors import BackendUnavailableError, ConfigError, RateLimitQueueTimeout
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .conftest import REDIS_URL, redis_client
from .helpers import chat_kwargs, max_in_any_window, unused_port

WORKER = Path(__file__).with_name("redis_worker.py")
UNIT_PRICE = {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}


def _run_workers(config: dict[str, Any], provider: FakeProvider, processes: int, tasks: int,
                 calls: int) -> list[dict[str, Any]]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(config), provider.url, str(tasks), str(calls)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
             for _ in range(processes)]
    for p in procs:  # every process has imported litellm and built its limiter
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_four_processes_share_one_limit_and_one_budget(provider: FakeProvider, redis_prefix: str) -> None:
    """4 processes x 6 tasks share, through Redis, 8 requests per second and a $600 hourly budget
    (a call reserves $14 at the test's unit price and costs $8; the budget lasts ~9 s, so that a
    process the machine's load starts a few seconds late still gets its share):

    * Redis admits at most 8 calls in any second, on its own clock (the one all processes share);
    * calls over the rate are queued, not refused; every process gets its share;
    * together they spend at most $300, use it up, and Redis holds exactly what the provider billed.
    """
    config = {"backend": REDIS_URL, "redis": {"key_prefix": redis_prefix}, "runaway": {"enabled": False},
              "global": {"requests_per_second": 8}, "queue": {"max_wait_seconds": 60},
              "budget": {"max_hourly_spend": 600}, "pricing": UNIT_PRICE, "state_path": ":memory:"}
    results = _run_workers(config, provider, processes=4, tasks=6, calls=4)
    assert all(not r["other"] for r in results), results
    ok = sum(r["ok"] for r in results)
    assert ok == len(provider.state.log) and sum(r["budget"] for r in results) > 0  # stopped by the budget
    admitted = sorted(t for r in results for t in r["admitted"])
    assert len(admitted) == ok
    assert max_in_any_window(admitted, 1.0) <= 8
    assert admitted[-1] - admitted[0] >= ok / 8 - 1.2  # it really was held to the shared rate
    assert all(len(r["admitted"]) >= 2 for r in results)  # every process got a share (loose: CPU load skews it)
    billed = sum(r.prompt_tokens + r.completion_tokens for r in provider.state.log)
    assert 600 - 14 <= billed <= 600
    client: Any = redis_client()
    spent = float(client.hget("{" + redis_prefix + "}:b:global:hour", "cost"))
    assert spent == pytest.approx(billed)


# ------------------------------------------------------------------ outages
def _free_port() -> int:
    return unused_port()  # (not an ephemeral one: see helpers.unused_port)


class OwnRedis:
    """A redis-server of the test's own on a spare port, with an append-only file so that a
    restart keeps what it held (as a production Redis with persistence would)."""

    def __init__(self, directory: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it)")
        self.exe, self.dir, self.port = exe, directory, _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("own redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def _outage_limiter(clock: FakeClock, url: str, policy: str) -> HiveLimiter:
    limiter = HiveLimiter({"backend": url, "redis": {"on_backend_error": policy, "local_share": 0.5,
                                                      "retry_interval": 5.0, "socket_timeout": 0.2},
                           "global": {"requests_per_minute": 10}, "queue": {"max_wait_seconds": 0},
                           "budget": {"max_daily_spend": 1000}, "pricing": UNIT_PRICE, "state_path": ":memory:",
                           "runaway": {"enabled": False}}, clock=clock)
    clock.attach(limiter)
    litellm.callbacks.append(limiter)
    return limiter


def test_outage_local_policy_keeps_working_and_loses_no_spend(
        provider: FakeProvider, clock: FakeClock, own_redis: OwnRedis, caplog: pytest.LogCaptureFixture) -> None:
    """Redis dies mid-run: the agent keeps working on half the limit in-process, the outage is
    logged once, and after Redis is back every settled call's spend is in Redis."""
    caplog.set_level(logging.INFO, logger="hive_ratelimit_plugin")
    limiter = _outage_limiter(clock, own_redis.url, "local")
    for _ in range(3):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))
    own_redis.kill()
    sent_during = 0
    for _ in range(7):  # local share: 5 of the 10 per minute
        try:
            litellm.completion(**chat_kwargs(provider, max_tokens=5))
            sent_during += 1
        except RateLimitQueueTimeout:
            pass
    assert sent_during == 5
    assert limiter.get_usage_stats()["levels"]["global"]["global"]["requests_per_minute"]["limit"] == 5
    downs = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(downs) == 1 and "sk-" not in downs[0].getMessage()
    own_redis.start()
    clock.advance(61)  # past retry_interval, and a fresh minute
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert any("answers again" in r.getMessage() for r in caplog.records)
    import redis

    client = redis.Redis(port=own_redis.port)
    spent = float(client.hget("{hive-rl}:b:global:day", "cost") or 0)
    billed = sum(r.prompt_tokens + r.completion_tokens for r in provider.state.log)
    assert len(provider.state.log) == 3 + 5 + 1
    assert billed > 0 and spent == pytest.approx(billed)


def test_outage_closed_policy_refuses_and_open_policy_lets_through(
        provider: FakeProvider, clock: FakeClock, own_redis: OwnRedis) -> None:
    """closed: a clear BackendUnavailableError and nothing sent; open: calls go through."""
    _outage_limiter(clock, own_redis.url, "closed")
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    own_redis.kill()
    with pytest.raises(BackendUnavailableError) as info:
        litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert "closed" in str(info.value) and info.value.retry_after is not None
    # (what the proxy's x-hive-ratelimit-scope/-limit headers and the rejection metric report)
    assert (info.value.scope, info.value.limit) == ("global", "on_backend_error")
    from hive_ratelimit_plugin._observe import rejection_reason

    assert rejection_reason(info.value) == ("global", "backend_unavailable")
    assert len(provider.state.log) == 1
    litellm.callbacks.clear()
    _outage_limiter(clock, own_redis.url, "open")
    for _ in range(12):  # more than the limit: nothing counts while open
        litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert len(provider.state.log) == 13


# ------------------------------------------------------------ keys, config
def test_every_key_expires_and_memory_is_reported(provider: FakeProvider, clock: FakeClock,
                                                   redis_prefix: str) -> None:
    """No key lives forever: windows, spend, leases and state all carry a TTL; settled calls leave
    no lease behind; Redis memory is reported per scope."""
    limiter = HiveLimiter({"backend": REDIS_URL, "redis": {"key_prefix": redis_prefix},
                           "global": {"requests_per_minute": 100, "tokens_per_minute": 100000,
                                      "concurrent_requests": 4},
                           "agents": {"a": {"max_cost_per_day": 100, "requests_per_minute": 50}},
                           "pricing": UNIT_PRICE, "state_path": ":memory:"}, clock=clock)
    litellm.callbacks.append(limiter)
    for _ in range(5):
        litellm.completion(**chat_kwargs(provider, max_tokens=5, metadata={"agent_id": "a"}))
    client: Any = redis_client()
    keys = [k.decode() for k in client.scan_iter(match="{" + redis_prefix + "}*")]
    assert keys
    assert all(client.ttl(k) > 0 for k in keys), {k: client.ttl(k) for k in keys}
    assert not [k for k in keys if ":l:" in k]  # settled: no lease record left
    memory = limiter.redis_memory()
    assert memory["global"] > 0 and memory["agent:a"] > 0
    backend = limiter.get_usage_stats()["backend"]
    assert backend["type"] == "redis" and backend["available"] and backend["round_trips"] >= 10


def test_backend_must_be_memory_or_a_redis_url() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"backend": "mysql://x"})
    assert "backend" in str(info.value)
    assert load_config({"backend": "redis://h:6379/0"}).backend == "redis://h:6379/0"


def test_backend_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_RATELIMIT_BACKEND", REDIS_URL)
    monkeypatch.setenv("HIVE_RATELIMIT_REDIS__KEY_PREFIX", "envprefix")
    cfg = load_config(None)
    assert cfg.backend == REDIS_URL and cfg.redis.key_prefix == "envprefix"


def test_missing_redis_package_names_the_extra() -> None:
    """Without the redis package, a Redis backend fails at start with the extra to install."""
    code = ("import sys; sys.modules['redis'] = None\n"
            "from hive_ratelimit_plugin import HiveLimiter\n"
            "from hive_ratelimit_plugin.errors import ConfigError\n"
            "try:\n    HiveLimiter({'backend': 'redis://127.0.0.1:6379/0'})\n"
            "except ConfigError as e:\n    print('CONFIGERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert "CONFIGERROR" in out.stdout and "hive-ratelimit[redis]" in out.stdout, out.stderr[-1000:]


def test_password_never_logged(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """A Redis URL's password stays out of logs, errors and repr when Redis is unreachable."""
    caplog.set_level(logging.INFO, logger="hive_ratelimit_plugin")
    url = f"redis://user:hunter2-secret@127.0.0.1:{_free_port()}/0"
    limiter = HiveLimiter({"backend": url, "redis": {"on_backend_error": "closed", "socket_timeout": 0.1},
                           "global": {"requests_per_minute": 5}}, clock=clock)
    engine: Any = limiter._engine
    from hive_ratelimit_plugin._engine import Scope, Ticket
    from hive_ratelimit_plugin.config import LimitSet

    with pytest.raises(BackendUnavailableError) as info:
        engine.acquire(Ticket("1", [Scope("global", "global", LimitSet(requests_per_minute=5))]), lambda: None)
    text = str(info.value) + repr(limiter) + " ".join(r.getMessage() for r in caplog.records)
    assert "hunter2" not in text and "***@" in text


def test_usage_stats_while_other_threads_admit_calls_of_new_ids(redis_prefix: str) -> None:
    """get_usage_stats() lists the spend of every key this process has seen, while admissions on
    other threads add the keys of new agents and users to that list (under the engine's lock).
    An admission landing in the middle of the listing once raised "RuntimeError: dictionary
    changed size during iteration" from get_usage_stats (and silently skipped status snapshots)."""
    import threading

    from hive_ratelimit_plugin._redis import RedisEngine

    eng = RedisEngine(FakeClock(), url=REDIS_URL, prefix=redis_prefix, server_time=False)
    for i in range(3):
        eng._remember_spend_key(f"agent:a{i}")

    def admission_of_a_new_id() -> None:  # what _remote_try does for a call of a new agent
        with eng._lock:
            eng._remember_spend_key("agent:newcomer")

    class Key(str):
        """A spend key whose reading lets another thread's admission run (a thread switch there)."""
        fired = False

        def startswith(self, *a: Any) -> bool:  # type: ignore[override]
            if not Key.fired:
                Key.fired = True
                t = threading.Thread(target=admission_of_a_new_id)
                t.start()
                t.join(5)
                assert not t.is_alive(), "the admission waited for the stats' lock"
            return str.startswith(self, *a)

    eng._remember_spend_key(Key("agent:switch"))
    eng.spend_snapshot()  # raised RuntimeError
    assert Key.fired
    assert "agent:newcomer" in eng._spend_seen
