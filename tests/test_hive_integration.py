"""Hive attribution: calls made inside a Hive agent count against that agent and run, read from
Hive's own contextvars, with no change to Hive. A stand-in ``framework`` package with Hive's
layout (written to a temp dir and put on ``sys.path``) plays Hive; Hive itself is not installed.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter, scope
from hive_ratelimit_plugin._scopes import resolve_identity
from hive_ratelimit_plugin.errors import BudgetExceededError
from hive_ratelimit_plugin.integrations import hive as hive_integration
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import chat_kwargs, unused_port

WALL_START = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
UNIT_PRICE = {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}
# What Hive's AgentLoop._is_capacity_error retries on (framework/agent_loop/agent_loop.py), plus
# the words the issue lists. A budget stop must match none of them, or Hive retries it for minutes.
HIVE_RETRY_WORDS = ("429", "529", "rate limit", "rate_limit", "overloaded", "capacity", "too many requests",
                    "service unavailable")

# The parts of Hive's layout the integration reads (aden-hive/hive, core/framework/...).
STAND_IN = {
    "framework/__init__.py": '"""Stand-in for the Hive agent framework (tests only)."""\n',
    "framework/loader/__init__.py": "",
    "framework/loader/tool_registry.py": """
        import contextvars
        from typing import Any

        _execution_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
            "_execution_context", default=None)


        class ToolRegistry:
            @staticmethod
            def set_execution_context(**context: Any) -> contextvars.Token:
                current = _execution_context.get() or {}
                return _execution_context.set({**current, **context})

            @staticmethod
            def reset_execution_context(token: contextvars.Token) -> None:
                _execution_context.reset(token)
        """,
    "framework/tasks/__init__.py": "",
    "framework/tasks/tools/__init__.py": "",
    "framework/tasks/tools/_context.py": """
        from typing import Any

        from framework.loader.tool_registry import _execution_context


        def current_context() -> dict[str, Any]:
            return dict(_execution_context.get() or {})
        """,
    "framework/observability/__init__.py": "",
    "framework/observability/logging.py": """
        from contextvars import ContextVar
        from typing import Any

        trace_context: ContextVar[dict[str, Any] | None] = ContextVar("trace_context", default=None)


        def set_trace_context(**kwargs: Any) -> None:
            current = trace_context.get() or {}
            trace_context.set({**current, **kwargs})


        def get_trace_context() -> dict:
            context = trace_context.get() or {}
            return context.copy()


        def clear_trace_context() -> None:
            trace_context.set(None)
        """,
}


def _unload_framework() -> None:
    for name in [n for n in sys.modules if n == "framework" or n.startswith("framework.")]:
        del sys.modules[name]
    hive_integration._reset_cache()


@pytest.fixture(params=["with-task-tools", "registry-only"])
def hive(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """Hive "running" in this process: its modules imported, as a Hive agent process has them.

    ``registry-only``: ``framework.tasks.tools._context`` is not loaded (a Hive run without the
    task tools), so the integration reads the execution contextvar from the tool registry.
    """
    if "framework" in sys.modules:
        pytest.skip("a real 'framework' package is loaded")
    root = tmp_path / "hive_stand_in"
    for rel, text in STAND_IN.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(root))
    import importlib

    registry: Any = importlib.import_module("framework.loader.tool_registry")
    trace: Any = importlib.import_module("framework.observability.logging")
    if request.param == "with-task-tools":
        importlib.import_module("framework.tasks.tools._context")
    hive_integration._reset_cache()
    try:
        yield SimpleNamespace(ToolRegistry=registry.ToolRegistry, set_trace_context=trace.set_trace_context,
                              clear_trace_context=trace.clear_trace_context)
    finally:
        _unload_framework()


class _HiveRun:
    """What Hive's runtime does around an agent's iteration: set the two contexts."""

    def __init__(self, hive: SimpleNamespace, **exec_ctx: Any) -> None:
        self.hive, self.exec_ctx = hive, exec_ctx

    def __enter__(self) -> None:
        self.token = self.hive.ToolRegistry.set_execution_context(**self.exec_ctx)

    def __exit__(self, *exc: object) -> None:
        self.hive.ToolRegistry.reset_execution_context(self.token)
        self.hive.clear_trace_context()


def levels(limiter: HiveLimiter, level: str) -> set[str]:
    return set(limiter.get_usage_stats()["levels"].get(level, {}))


# ----------------------------------------------------------------- reading Hive's context
def test_without_hive_nothing_is_read() -> None:
    """Hive absent: no attribution, no import attempted (Hive's modules stay unloaded)."""
    assert "framework" not in sys.modules
    before = set(sys.modules)
    assert hive_integration.hive_identity() is None
    assert resolve_identity(None) == resolve_identity({})
    assert resolve_identity(None).agent_id is None
    assert not {n for n in set(sys.modules) - before if n.startswith("framework")}


def test_reads_agent_and_run(hive: SimpleNamespace) -> None:
    """agent_id from the execution context; run_id from the trace context's run_id, then
    execution_id, then the session id."""
    assert hive_integration.hive_identity() is None  # Hive loaded, no agent running
    with _HiveRun(hive, agent_id="queen", session_id="session_1", usage_agent_id="profile-x"):
        assert hive_integration.hive_identity() == {"agent_id": "queen", "run_id": "session_1"}
        hive.set_trace_context(execution_id="e" * 32)
        assert hive_integration.hive_identity() == {"agent_id": "queen", "run_id": "e" * 32}
        hive.set_trace_context(run_id="run_s1_20270115_abcd1234")
        ident = resolve_identity(None)
        assert (ident.agent_id, ident.run_id) == ("queen", "run_s1_20270115_abcd1234")
    with _HiveRun(hive, usage_agent_id="worker_colony7"):
        assert hive_integration.hive_identity() == {"agent_id": "worker_colony7", "run_id": None}
        hive.set_trace_context(agent_id="graph-1")  # the orchestrator's graph id beats usage_agent_id
        assert hive_integration.hive_identity() == {"agent_id": "graph-1", "run_id": None}


def test_precedence_metadata_then_scope_then_hive(hive: SimpleNamespace) -> None:
    """Field by field: request metadata > HiveLimiter.scope() > Hive's context."""
    with _HiveRun(hive, agent_id="hive-agent", session_id="hive-session"):
        hive.set_trace_context(run_id="hive-run")
        ident = resolve_identity(None)
        assert (ident.agent_id, ident.run_id) == ("hive-agent", "hive-run")
        with scope(agent_id="scoped-agent"):
            ident = resolve_identity(None)
            assert (ident.agent_id, ident.run_id) == ("scoped-agent", "hive-run")
            ident = resolve_identity({"agent_id": "md-agent", "run_id": "md-run"})
            assert (ident.agent_id, ident.run_id) == ("md-agent", "md-run")
            with scope(run_id="scoped-run"):
                ident = resolve_identity({"agent_id": "md-agent"})
                assert (ident.agent_id, ident.run_id) == ("md-agent", "scoped-run")


def test_broken_hive_context_does_not_break_calls(hive: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hive changed shape underneath us: attribution is skipped, the call is not failed."""
    def boom() -> None:
        raise RuntimeError("changed")

    monkeypatch.setitem(sys.modules["framework.observability.logging"].__dict__, "get_trace_context", boom)
    hive_integration._reset_cache()
    with _HiveRun(hive, agent_id="a"):
        assert hive_integration.hive_identity() is None
        assert resolve_identity({"agent_id": "md"}).agent_id == "md"


# ----------------------------------------------------------------- real LiteLLM calls
PER_AGENT_AND_RUN = {
    "agents": {"*": {"requests_per_minute": 1000, "max_requests_per_run": 100}},
    "state_path": ":memory:",
}


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_calls_inside_a_hive_agent_count_against_it(
    mode: str, hive: SimpleNamespace, provider: FakeProvider, clock: FakeClock
) -> None:
    """A Hive agent's LiteLLM call, with no metadata, lands on its agent and run scopes."""
    limiter = HiveLimiter(PER_AGENT_AND_RUN, clock=clock)
    litellm.callbacks.append(limiter)
    with _HiveRun(hive, agent_id="researcher", session_id="session_9"):
        hive.set_trace_context(run_id="run_7")
        if mode == "sync":
            litellm.completion(**chat_kwargs(provider))
        else:
            await litellm.acompletion(**chat_kwargs(provider))
        # Metadata still wins for the fields it sets.
        await litellm.acompletion(**chat_kwargs(provider, metadata={"agent_id": "explicit"}))
    assert levels(limiter, "agent") == {"agent:researcher", "agent:explicit"}
    assert levels(limiter, "run") == {"run:researcher/run_7", "run:explicit/run_7"}


async def test_concurrent_hive_agents_are_told_apart(
    hive: SimpleNamespace, provider: FakeProvider, clock: FakeClock
) -> None:
    """Hive runs agents as concurrent tasks; each task's calls go to its own agent."""
    limiter = HiveLimiter(PER_AGENT_AND_RUN, clock=clock)
    litellm.callbacks.append(limiter)

    async def agent(name: str) -> None:
        token = hive.ToolRegistry.set_execution_context(agent_id=name, session_id=f"s-{name}")
        try:
            for _ in range(3):
                await litellm.acompletion(**chat_kwargs(provider))
                await asyncio.sleep(0)
        finally:
            hive.ToolRegistry.reset_execution_context(token)

    await asyncio.gather(agent("w1"), agent("w2"), agent("w3"))
    stats = limiter.get_usage_stats()["levels"]
    assert set(stats["agent"]) == {"agent:w1", "agent:w2", "agent:w3"}
    for name in ("w1", "w2", "w3"):
        assert stats["agent"][f"agent:{name}"]["requests_per_minute"]["used"] == 3
    assert set(stats["run"]) == {"run:w1/s-w1", "run:w2/s-w2", "run:w3/s-w3"}


def _hive_would_retry(exc: BaseException) -> bool:
    """Hive's test for "wait and retry" (AgentLoop._is_capacity_error and the RateLimitError catch
    around litellm.completion): the class, its name, or words in the message."""
    name = type(exc).__name__.lower()
    if "ratelimit" in name or "overloaded" in name:
        return True
    if isinstance(exc, litellm.RateLimitError | litellm.ServiceUnavailableError):
        return True
    return any(word in str(exc).lower() for word in HIVE_RETRY_WORDS)


async def test_agent_budget_stops_a_hive_agent(
    hive: SimpleNamespace, provider: FakeProvider, clock: FakeClock
) -> None:
    """An agent's budget, attributed through Hive's context, stops it with a BudgetExceededError
    that Hive does not retry (no rate-limit wording, not a RateLimitError)."""
    wall = FakeClock(WALL_START)
    limiter = HiveLimiter({"agents": {"a1": {"max_cost_per_hour": 15}}, "pricing": UNIT_PRICE,
                           "state_path": ":memory:"}, clock=clock, wall_clock=wall)
    litellm.callbacks.append(limiter)
    attempts = 0

    async def hive_agent_step() -> Any:
        """A Hive-style LLM step: retry what looks like a capacity problem, give up on the rest."""
        nonlocal attempts
        for _ in range(5):
            attempts += 1
            try:
                # One call costs 8 (3 prompt + 5 output tokens at 1 per token); its worst case is 14.
                return await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))
            except Exception as exc:
                if not _hive_would_retry(exc):
                    raise
        raise AssertionError("retried a budget stop")

    with _HiveRun(hive, agent_id="a1", session_id="s1"):
        await hive_agent_step()  # 0 + 14 <= 15: sent, costs 8
        assert limiter.get_usage_stats()["spend"]["agent"]["agent:a1"]["hour"]["cost"] == 8
        with pytest.raises(BudgetExceededError) as info:
            await hive_agent_step()  # 8 + 14 > 15: stopped before sending
    exc = info.value
    assert attempts == 2, "Hive would have retried the budget stop"
    assert isinstance(exc, litellm.BudgetExceededError)
    assert not isinstance(exc, litellm.RateLimitError)
    assert exc.scope == "agent:a1" and exc.limit == "max_cost_per_hour"
    text = str(exc).lower()
    for word in HIVE_RETRY_WORDS:
        assert word not in text, word
    assert provider.state.count() == 1
    # Another Hive agent is not affected by a1's budget.
    with _HiveRun(hive, agent_id="a2", session_id="s2"):
        await hive_agent_step()
    assert provider.state.count() == 2


def test_hive_identity_is_cheap_without_hive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Hive the lookup is a dict membership test (on sys.modules): it imports nothing and
    looks for none of Hive's readers. (Its cost is a benchmark's business, not a timed test's.)"""
    def looked(*_: object) -> None:
        raise AssertionError("looked for Hive's context without Hive")

    monkeypatch.setattr(hive_integration, "_find_exec_reader", looked)
    monkeypatch.setattr(hive_integration, "_find_trace_reader", looked)
    assert "framework" not in sys.modules
    modules = set(sys.modules)
    assert [hive_integration.hive_identity() for _ in range(3)] == [None, None, None]
    assert set(sys.modules) == modules


async def test_a_backend_outage_ends_a_hive_step(hive: SimpleNamespace, provider: FakeProvider,
                                                clock: FakeClock) -> None:
    """docs/hive.md: Hive does not retry BackendUnavailableError (Redis down under
    on_backend_error: closed): neither its class nor its message reads as a capacity problem, and
    nothing is sent."""
    from hive_ratelimit_plugin.errors import BackendUnavailableError

    litellm.callbacks.append(HiveLimiter({"backend": f"redis://127.0.0.1:{unused_port()}/0", "state_path": ":memory:",
                                          "redis": {"on_backend_error": "closed", "socket_timeout": 0.2}},
                                         clock=clock))
    with _HiveRun(hive, agent_id="a1"), pytest.raises(BackendUnavailableError) as outage:
        await litellm.acompletion(**chat_kwargs(provider))
    assert not _hive_would_retry(outage.value), str(outage.value)
    assert provider.state.count() == 0


async def test_an_open_circuit_ends_a_hive_step(hive: SimpleNamespace, provider: FakeProvider,
                                              clock: FakeClock) -> None:
    """docs/hive.md: nor CircuitOpenError (a provider failing again and again)."""
    from hive_ratelimit_plugin.errors import CircuitOpenError

    # (a call that may wait past the circuit's cooldown waits for its probe instead)
    litellm.callbacks.append(HiveLimiter({"circuit_breaker": {"failure_threshold": 2, "cooldown_seconds": 30},
                                          "queue": {"max_wait_seconds": 5}, "state_path": ":memory:"}, clock=clock))
    provider.state.push(Scripted(status=500), Scripted(status=500))
    with _HiveRun(hive, agent_id="a1"):
        for _ in range(2):
            with pytest.raises(litellm.InternalServerError):
                await litellm.acompletion(**chat_kwargs(provider))
        with pytest.raises(CircuitOpenError) as circuit:
            await litellm.acompletion(**chat_kwargs(provider))
    assert not _hive_would_retry(circuit.value), str(circuit.value)
    assert provider.state.count() == 2


async def test_budget_message_amounts_never_read_like_capacity(
    hive: SimpleNamespace, provider: FakeProvider, clock: FakeClock
) -> None:
    """Amounts in a budget stop's message must not contain 429/529 either."""
    wall = FakeClock(WALL_START)
    # 14 tokens (9 estimated prompt + max_tokens 5) at 0.0037786 each: a worst case of USD 0.0529.
    price = {"gpt-4o-mini": {"input_per_million": 3778.6, "output_per_million": 3778.6}}
    limiter = HiveLimiter({"agents": {"a1": {"max_cost_per_hour": 0.05}}, "pricing": price,
                           "state_path": ":memory:"}, clock=clock, wall_clock=wall)
    litellm.callbacks.append(limiter)
    with _HiveRun(hive, agent_id="a1"), pytest.raises(BudgetExceededError) as info:
        await litellm.acompletion(**chat_kwargs(provider, max_tokens=5))
    assert not _hive_would_retry(info.value), str(info.value)
