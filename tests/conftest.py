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
    state.completion_tokens = 5
    state.algorithm = "sliding_window"
    state.clock = time.monotonic
    yield provider_server
    state.reset()
    state.algorithm = "sliding_window"
    state.clock = time.monotonic


@pytest.fixture(autouse=True)
def clean_callbacks() -> collections.abc.Iterator[None]:
    """Every test starts and ends with no registered callbacks."""
    saved = list(litellm.callbacks)
    yield
    for cb in list(litellm.callbacks):
        if cb not in saved:
            unregister(cb)
    litellm.callbacks[:] = saved


@pytest.fixture(autouse=True)
def isolated_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default state file (budgets) lives in a fresh directory for every test."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def recorder(clock: FakeClock) -> Recorder:
    return Recorder(clock)
