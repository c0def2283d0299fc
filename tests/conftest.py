"""Shared fixtures: one fake provider per session, a clean LiteLLM callback list per test."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# The tests set their own configuration; never pick up a developer's environment.
for _name in list(os.environ):
    if _name.startswith("HIVE_RATELIMIT_"):
        del os.environ[_name]
# A developer's shell may enable zero-code autoload (the .pth file): not in the tests.
from hive_ratelimit_plugin import _autoload

_autoload.uninstall()

import collections.abc
import time

import litellm
import pytest

from hive_ratelimit_plugin import _observe
from hive_ratelimit_plugin.plugin import unregister
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, ProviderState

from .helpers import Recorder

litellm.suppress_debug_info = True
litellm.telemetry = False


@pytest.fixture(scope="session")
def provider_server() -> collections.abc.Iterator[FakeProvider]:
    with FakeProvider(ProviderState()) as server:
        yield server


@pytest.fixture
def provider(provider_server: FakeProvider) -> collections.abc.Iterator[FakeProvider]:
    """The fake provider with no limits, no script and an empty log."""
    state = provider_server.state
    state.reset()
    state.requests_per_window = None
    state.tokens_per_window = None
    state.window_seconds = 60.0
    state.latency = 0.0
    state.chunk_delay = 0.0
    state.cached_prompt_tokens = 0
    state.cache_written_tokens = 0
    state.cache_write_ttl = "5m"
    state.completion_tokens = 5
    state.algorithm = "sliding_window"
    state.clock = time.monotonic
    yield provider_server
    # A request still being answered (a scripted delay the client gave up on) would land in the
    # next test's log: let it finish first.
    deadline = time.monotonic() + 5.0
    while state.in_flight > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    state.reset()
    state.algorithm = "sliding_window"
    state.clock = time.monotonic


@pytest.fixture(autouse=True)
def clean_callbacks() -> collections.abc.Iterator[None]:
    """Every test starts and ends with no registered callbacks, in ``litellm.callbacks`` and in the
    lists LiteLLM copies them into (a test that clears ``litellm.callbacks`` leaves its limiters
    there, where they would still receive every later test's events)."""
    lists = ("callbacks", "success_callback", "failure_callback", "input_callback", "_async_success_callback",
             "_async_failure_callback", "_async_input_callback")
    before = {id(cb) for name in lists for cb in getattr(litellm, name, [])}
    saved = list(litellm.callbacks)
    yield
    for name in lists:
        for cb in list(getattr(litellm, name, [])):
            if id(cb) not in before and not isinstance(cb, str):
                unregister(cb)
    litellm.callbacks[:] = saved


@pytest.fixture(autouse=True)
def isolated_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default state file (budgets) lives in a fresh directory for every test."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def fresh_log_summary() -> collections.abc.Iterator[None]:
    """Repeated-line summaries do not carry over from one test to the next."""
    _observe.SUMMARY.reset()
    yield
    _observe.SUMMARY.reset()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def recorder(clock: FakeClock) -> Recorder:
    return Recorder(clock)


# ----------------------------------------------------------------- backends
REDIS_URL = os.environ.get("HIVE_RL_TEST_REDIS", "redis://127.0.0.1:6379/15")


def redis_client() -> object:
    """A client for the test Redis. The server must be running: .ci/run starts one when none answers."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # a clear failure, never a silent skip
        raise RuntimeError(f"the Redis-backend tests need a Redis server at {REDIS_URL} (.ci/run starts one)") from exc
    return client


@pytest.fixture
def redis_prefix() -> collections.abc.Iterator[str]:
    """A fresh key prefix on the test Redis; its keys are deleted after the test."""
    import uuid

    client = redis_client()
    prefix = "test-" + uuid.uuid4().hex[:10]
    yield prefix
    keys = list(client.scan_iter(match="{" + prefix + "}*", count=1000))  # type: ignore[attr-defined]
    if keys:
        client.delete(*keys)  # type: ignore[attr-defined]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, object]:
    """Configuration keys selecting a backend: the contract tests run against both."""
    if request.param == "memory":
        return {}
    prefix = request.getfixturevalue("redis_prefix")
    return {"backend": REDIS_URL, "redis": {"key_prefix": prefix}}


@pytest.fixture
def make_engine(backend: dict[str, object]) -> collections.abc.Callable[..., object]:
    """Build an engine of the parametrized backend on a given clock."""
    from hive_ratelimit_plugin._engine import Engine

    def build(clock: object, **kwargs: object) -> object:
        if not backend:
            return Engine(clock, **kwargs)  # type: ignore[arg-type]
        from hive_ratelimit_plugin._redis import RedisEngine

        prefix = backend["redis"]["key_prefix"]  # type: ignore[index]
        return RedisEngine(clock, url=REDIS_URL, prefix=prefix, server_time=False, **kwargs)  # type: ignore[arg-type]

    return build


@pytest.fixture
def contract_backend(backend: dict[str, object]) -> collections.abc.Iterator[dict[str, object]]:
    """Run a whole test module against both backends (``pytestmark = usefixtures("contract_backend")``)."""
    from . import helpers

    helpers.BACKEND.clear()
    helpers.BACKEND.update(backend)
    yield backend
    helpers.BACKEND.clear()


@pytest.fixture
def litellm_cache() -> collections.abc.Iterator[object]:
    """LiteLLM's in-memory response cache (``litellm.cache``), removed after the test."""
    import litellm
    from litellm.caching.caching import Cache

    litellm.cache = cached = Cache(type="local")
    try:
        yield cached
    finally:
        litellm.cache = None
