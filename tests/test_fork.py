"""A process forked from one that has a limiter (multiprocessing's ``fork`` start method, Celery's
and gunicorn's forking workers) gets a limiter that works: no lock held by a thread the child does
not have, no slot or queue place of a call that is the parent's, and a state file of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from hive_ratelimit_plugin._engine import Engine, Scope, Ticket
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.testing import FakeClock

from .conftest import REDIS_URL

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _scope(**limits: Any) -> Scope:
    return Scope("global", "global", LimitSet(**limits))


def _ticket(name: str, *scopes: Scope) -> Ticket:
    return Ticket(name, list(scopes), input_tokens=10, output_tokens=10, spend_keys=["global"])


def _nothing() -> None:
    pass


@contextmanager
def _lock_held_by_another_thread(lock: Any) -> Iterator[None]:
    """``lock`` is held by another thread for the duration (the moment a status snapshot or
    another caller's admission holds it)."""
    held, go = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            go.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        yield
    finally:
        go.set()
        t.join(10)


def _in_child(check: Callable[[], None]) -> int:
    """Fork; run ``check`` in the child (exit 0 if it passes, 1 if it fails, 3 if it hangs);
    return the child's exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
            signal.alarm(10)
            check()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()  # (pytest shows the child's stderr with the failure)
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return 3


def _assert_child_starts_free(eng: Engine, g: Scope, make: Callable[[str], Ticket]) -> None:
    def check() -> None:
        assert eng.queue_length == 0  # the parent's waiter is not ahead of the child's callers
        assert not eng.holds("parent")
        assert eng.acquire(make("child"), _nothing) is None  # the parent's slot is not the child's
        assert eng.release("child")

    assert _in_child(check) == 0


def test_a_forked_child_gets_a_free_engine_and_the_parent_keeps_its_own(clock: FakeClock) -> None:
    """Forked while another thread held the engine's lock, with one call in flight and one
    waiting: the child's first call is admitted at once (without the reset it would hang on the
    lock, or wait for a slot that only the parent can free); the parent's state is untouched."""
    eng = Engine(clock)
    g = _scope(concurrent_requests=1, requests_per_minute=100)
    assert eng.acquire(_ticket("parent", g), _nothing) is None
    waiter = eng.acquire(_ticket("waiting", g), _nothing)
    assert waiter is not None
    with _lock_held_by_another_thread(eng._lock):
        _assert_child_starts_free(eng, g, lambda name: _ticket(name, g))
    assert eng.holds("parent") and eng.queue_length == 1
    assert eng.release("parent")
    assert waiter.granted


def test_the_child_drops_the_parents_budget_reservations(clock: FakeClock) -> None:
    """A call in flight reserves its cost against a budget; in the child that reservation would
    never be released (only the parent settles the call)."""
    eng = Engine(clock)
    g = _scope(max_cost_per_day=1.0)
    assert eng.acquire(Ticket("parent", [g], cost=0.8, spend_keys=["global"]), _nothing) is None

    def check() -> None:
        assert eng.acquire(Ticket("child", [g], cost=0.8, spend_keys=["global"]), _nothing) is None

    assert _in_child(check) == 0
    assert eng.holds("parent")


def test_a_forked_child_of_a_redis_limiter_gets_a_lock_of_its_own(clock: FakeClock, redis_prefix: str) -> None:
    """With Redis the parent's call stays in Redis (the limit is shared): the child takes the
    second slot, and its lock is its own."""
    from hive_ratelimit_plugin._redis import RedisEngine

    eng = RedisEngine(clock, url=REDIS_URL, prefix=redis_prefix, server_time=False, wall_clock=clock)
    g = _scope(concurrent_requests=2, requests_per_minute=100)
    assert eng.acquire(_ticket("parent", g), _nothing) is None

    def check() -> None:
        assert not eng.holds("parent")
        assert eng.acquire(_ticket("child", g), _nothing) is None
        assert eng.acquire(_ticket("third", g), _nothing) is not None  # both slots are taken
        assert eng.release("child")

    with _lock_held_by_another_thread(eng._lock):
        assert _in_child(check) == 0
    assert eng.holds("parent") and eng.release("parent")


_WORKER_SCRIPT = """
import json, multiprocessing, sys, threading, time
import litellm
from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.testing import FakeProvider
litellm.suppress_debug_info = True
config = json.loads(sys.argv[1])

def worker(queue, url):
    kw = dict(model="openai/gpt-4o-mini", api_base=url, api_key="sk-x", messages=[{"role": "user", "content": "hi"}])
    try:
        litellm.completion(**kw)
        queue.put("ok")
    except Exception as exc:
        queue.put(type(exc).__name__)

with FakeProvider() as p:
    limiter = HiveLimiter(config)
    litellm.callbacks.append(limiter)
    kw = dict(model="openai/gpt-4o-mini", api_base=p.url, api_key="sk-x", messages=[{"role": "user", "content": "hi"}])
    stream = litellm.completion(**kw, stream=True)  # in flight while the worker is forked: the one slot
    held, go = threading.Event(), threading.Event()
    def hold():
        with limiter._engine._lock:  # as a status snapshot or another thread's admission would
            held.set()
            go.wait(10)
    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=worker, args=(queue, p.url))
    proc.start()
    go.set()
    t.join()
    result = queue.get(timeout=60)
    proc.join(30)
    for _ in stream:
        pass
    def requests_spent():
        day = limiter.get_usage_stats()["spend"].get("global", {}).get("global", {}).get("day", {})
        return day.get("requests", 0)
    for _ in range(300):  # the state file is read about once a second; the stream settles in LiteLLM's thread
        if requests_spent() >= 2:
            break
        time.sleep(0.05)
    stats = limiter.get_usage_stats()
    print(json.dumps({"worker": result, "exitcode": proc.exitcode, "provider": p.state.count(),
                      "spend_requests": requests_spent(),
                      "in_flight": stats["levels"]["global"]["global"]["in_flight"]}))
"""


def test_a_multiprocessing_worker_forked_mid_call_calls_through_litellm(tmp_path: Any) -> None:
    """End to end, in a process of its own: a parent with a stream in flight (its only slot) and
    its engine's lock held by a thread forks a multiprocessing worker. The worker's
    ``litellm.completion`` goes through at once; its spend, written to the shared state file under
    a writer id of its own, reaches the parent's daily budget (with the parent's id, the parent
    would take it for its own row and skip it)."""
    config = {"global": {"concurrent_requests": 1}, "budget": {"max_daily_spend": 100.0},
              "queue": {"max_wait_seconds": 5}, "state_path": str(tmp_path / "state.sqlite")}
    out = subprocess.run([sys.executable, "-c", _WORKER_SCRIPT, json.dumps(config)], capture_output=True,
                         text=True, timeout=180, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"worker": "ok", "exitcode": 0, "provider": 2, "spend_requests": 2, "in_flight": 0}


def test_a_forked_child_exiting_leaves_the_parents_status_file(tmp_path: Any) -> None:
    """A gunicorn or Celery worker exits through atexit, which removes the snapshot files its
    publisher wrote: the child has written none, so the parent's stays."""
    import litellm

    from hive_ratelimit_plugin import HiveLimiter
    from hive_ratelimit_plugin.status import PUBLISHER, status_dir

    state = str(tmp_path / "state.sqlite")
    limiter = HiveLimiter({"state_path": state})
    litellm.callbacks.append(limiter)
    try:
        PUBLISHER.publish_once()
        mine = status_dir(state) / f"{os.getpid()}.json"
        assert mine.exists()
        assert _in_child(PUBLISHER.stop) == 0  # what the child's atexit runs
        assert mine.exists()
    finally:
        litellm.callbacks.remove(limiter)
