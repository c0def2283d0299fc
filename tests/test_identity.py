"""Identity: who a call counts against (metadata, ``user=``, ``scope()`` blocks) and its priority,
through real LiteLLM calls to the fake provider."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import litellm
import pytest

import hive_ratelimit_plugin
from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import Recorder, chat_kwargs, make_limiter, wait_until

SECRET = "sk-test-SECRET-0123456789"

# Every agent, user and team gets its own (generous) scope, so the scope keys show attribution.
PER_IDENTITY = {
    "global": {"requests_per_minute": 1000},
    "agents": {"*": {"requests_per_minute": 1000}},
    "users": {"*": {"requests_per_minute": 1000}},
    "teams": {"*": {"requests_per_minute": 1000}},
}


def keys(limiter: HiveLimiter, level: str) -> set[str]:
    return set(limiter.get_usage_stats()["levels"].get(level, {}))


def used(limiter: HiveLimiter, level: str, key: str) -> int:
    entry = limiter.get_usage_stats()["levels"].get(level, {}).get(key)
    return 0 if entry is None else int(entry["requests_per_minute"]["used"])


# ----------------------------------------------------------------- metadata and user=
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_metadata_routes_call_to_agent_user_and_team(mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """metadata agent_id/user_id/team_id put the call on exactly those scopes."""
    limiter = make_limiter(clock, PER_IDENTITY)
    md = {"agent_id": "researcher", "user_id": "alice", "team_id": "growth"}
    if mode == "sync":
        litellm.completion(**chat_kwargs(provider, metadata=md))
    else:
        await litellm.acompletion(**chat_kwargs(provider, metadata=md))
    assert keys(limiter, "agent") == {"agent:researcher"}
    assert keys(limiter, "user") == {"user:alice"}
    assert keys(limiter, "team") == {"team:growth"}
    assert used(limiter, "agent", "agent:researcher") == 1
    assert used(limiter, "global", "global") == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_user_kwarg_counts_as_user(mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """user= (the OpenAI end-user field) attributes the call to that user scope."""
    limiter = make_limiter(clock, PER_IDENTITY)
    if mode == "sync":
        litellm.completion(**chat_kwargs(provider, user="bob"))
    else:
        await litellm.acompletion(**chat_kwargs(provider, user="bob"))
    assert keys(limiter, "user") == {"user:bob"}
    assert "agent" not in limiter.get_usage_stats()["levels"]


async def test_distinct_agents_are_limited_separately(provider: FakeProvider, clock: FakeClock) -> None:
    """An agent at its own limit waits while another agent's call goes straight through."""
    limiter = make_limiter(clock, {"agents": {"*": {"requests_per_minute": 1}},
                                   "queue": {"max_wait_seconds": 0}})
    await litellm.acompletion(**chat_kwargs(provider, metadata={"agent_id": "a"}))
    with pytest.raises(hive_ratelimit_plugin.RateLimitQueueTimeout) as info:
        await litellm.acompletion(**chat_kwargs(provider, metadata={"agent_id": "a"}))
    assert info.value.scope == "agent:a"
    await litellm.acompletion(**chat_kwargs(provider, metadata={"agent_id": "b"}))
    assert provider.state.count() == 2
    assert keys(limiter, "agent") == {"agent:a", "agent:b"}


# ----------------------------------------------------------------- scope() blocks
async def test_scope_holds_across_await(provider: FakeProvider, clock: FakeClock) -> None:
    """limiter.scope(agent_id=...) still applies after awaits inside the block."""
    limiter = make_limiter(clock, PER_IDENTITY)
    with limiter.scope(agent_id="ctx-agent", team_id="ctx-team"):
        await asyncio.sleep(0)
        await litellm.acompletion(**chat_kwargs(provider))
        await asyncio.sleep(0.001)
        await litellm.acompletion(**chat_kwargs(provider))
    assert keys(limiter, "agent") == {"agent:ctx-agent"}
    assert keys(limiter, "team") == {"team:ctx-team"}
    assert used(limiter, "agent", "agent:ctx-agent") == 2


async def test_scope_ends_with_its_block(provider: FakeProvider, clock: FakeClock) -> None:
    """A call made after the block counts against no agent."""
    limiter = make_limiter(clock, PER_IDENTITY)
    with hive_ratelimit_plugin.scope(agent_id="inside"):
        await litellm.acompletion(**chat_kwargs(provider))
    await litellm.acompletion(**chat_kwargs(provider))
    assert used(limiter, "agent", "agent:inside") == 1
    assert used(limiter, "global", "global") == 2


async def test_scope_follows_tasks_created_inside(provider: FakeProvider, clock: FakeClock) -> None:
    """A task created inside the block keeps the identity even when it calls after the block ended."""
    limiter = make_limiter(clock, PER_IDENTITY)
    go = asyncio.Event()

    async def later() -> None:
        await go.wait()
        await litellm.acompletion(**chat_kwargs(provider))

    with limiter.scope(agent_id="spawner", user_id="carol"):
        task = asyncio.create_task(later())
    await asyncio.sleep(0)
    go.set()  # the block has exited; the task runs its call now
    await asyncio.wait_for(task, 10)
    assert keys(limiter, "agent") == {"agent:spawner"}
    assert keys(limiter, "user") == {"user:carol"}


@pytest.mark.parametrize("which", ["limiter.scope", "hive_ratelimit_plugin.scope"])
async def test_scope_follows_to_thread_sync_completion(which: str, provider: FakeProvider, clock: FakeClock) -> None:
    """asyncio.to_thread running a sync litellm.completion inherits the block's identity."""
    limiter = make_limiter(clock, PER_IDENTITY)
    cm = limiter.scope if which == "limiter.scope" else hive_ratelimit_plugin.scope
    seen: list[str] = []

    def work() -> Any:
        seen.append(threading.current_thread().name)
        return litellm.completion(**chat_kwargs(provider))

    with cm(agent_id="threaded", team_id="ops"):
        await asyncio.to_thread(work)
    assert seen and seen[0] != threading.current_thread().name  # it really ran elsewhere
    assert keys(limiter, "agent") == {"agent:threaded"}
    assert keys(limiter, "team") == {"team:ops"}


async def test_plain_thread_does_not_inherit_scope(provider: FakeProvider, clock: FakeClock) -> None:
    """A bare threading.Thread starts with an empty context, so the block does not apply there."""
    limiter = make_limiter(clock, PER_IDENTITY)
    with limiter.scope(agent_id="not-inherited"):
        t = threading.Thread(target=lambda: litellm.completion(**chat_kwargs(provider)))
        t.start()
        await asyncio.to_thread(t.join, 10)
    assert provider.state.count() == 1
    assert "agent" not in limiter.get_usage_stats()["levels"]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_metadata_wins_over_scope(mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """Request metadata overrides the block's identity field by field."""
    limiter = make_limiter(clock, PER_IDENTITY)
    with limiter.scope(agent_id="from-context", team_id="ctx-team"):
        kw = chat_kwargs(provider, metadata={"agent_id": "from-metadata"})
        if mode == "sync":
            litellm.completion(**kw)
        else:
            await litellm.acompletion(**kw)
    assert keys(limiter, "agent") == {"agent:from-metadata"}
    assert keys(limiter, "team") == {"team:ctx-team"}  # not overridden: still from the block


async def test_nested_scopes_merge(provider: FakeProvider, clock: FakeClock) -> None:
    """An inner block adds to and overrides the outer one; leaving it restores the outer identity."""
    limiter = make_limiter(clock, PER_IDENTITY)
    with limiter.scope(agent_id="outer", team_id="t-outer"):
        with hive_ratelimit_plugin.scope(agent_id="inner", user_id="u-inner"):
            await litellm.acompletion(**chat_kwargs(provider))
        await litellm.acompletion(**chat_kwargs(provider))
    assert used(limiter, "agent", "agent:inner") == 1
    assert used(limiter, "agent", "agent:outer") == 1
    assert used(limiter, "team", "team:t-outer") == 2  # the inner block kept the outer team
    assert used(limiter, "user", "user:u-inner") == 1  # only the inner call had a user


async def test_sibling_tasks_keep_their_own_scopes(provider: FakeProvider, clock: FakeClock) -> None:
    """Concurrent tasks with different blocks never see each other's identity."""
    limiter = make_limiter(clock, PER_IDENTITY)

    async def agent(name: str, n: int) -> None:
        with limiter.scope(agent_id=name):
            for _ in range(n):
                await asyncio.sleep(0)
                await litellm.acompletion(**chat_kwargs(provider))

    await asyncio.gather(agent("x", 3), agent("y", 2), agent("z", 1))
    assert used(limiter, "agent", "agent:x") == 3
    assert used(limiter, "agent", "agent:y") == 2
    assert used(limiter, "agent", "agent:z") == 1


@pytest.mark.parametrize("cm", [HiveLimiter.scope, hive_ratelimit_plugin.scope])
def test_unknown_identity_field_raises_type_error(cm: Callable[..., Any]) -> None:
    """A misspelt identity field is a TypeError naming the field, not silently ignored."""
    with pytest.raises(TypeError, match="agentid"), cm(agentid="typo"):
        pass  # pragma: no cover - never entered


# ----------------------------------------------------------------- priority end to end
@pytest.mark.parametrize("how", ["metadata", "scope"])
async def test_high_priority_call_reaches_provider_first(how: str, provider: FakeProvider, clock: FakeClock) -> None:
    """With the limit saturated, a later high-priority call is sent before an earlier low-priority one."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 1000}})
    recorder = Recorder(clock)
    litellm.callbacks.append(recorder)
    await litellm.acompletion(**chat_kwargs(provider))  # saturates the minute

    async def call(model: str, priority: str) -> Any:
        if how == "metadata":
            return await litellm.acompletion(**chat_kwargs(provider, model=model, metadata={"priority": priority}))
        with limiter.scope(priority=priority):
            return await litellm.acompletion(**chat_kwargs(provider, model=model))

    low = asyncio.create_task(call("openai/gpt-4o-mini", "low"))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    high = asyncio.create_task(call("openai/gpt-4o", "high"))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 2)
    assert provider.state.count() == 1

    clock.advance(61)
    await asyncio.wait_for(high, 10)
    assert not low.done()
    assert limiter.get_usage_stats()["queued"] == 1
    assert [r.model for r in provider.state.log] == ["gpt-4o-mini", "gpt-4o"]

    clock.advance(61)
    await asyncio.wait_for(low, 10)
    assert [r.model for r in provider.state.log] == ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini"]
    assert [m for _, m in recorder.sent] == ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini"]
    assert [t for t, _ in recorder.sent] == [1000.0, 1061.0, 1122.0]


async def test_high_priority_async_call_overtakes_waiting_sync_thread(provider: FakeProvider, clock: FakeClock) -> None:
    """Priority applies across drivers: a high async call beats a low sync call queued earlier."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 1000}})
    litellm.completion(**chat_kwargs(provider))
    errors: list[BaseException] = []

    def low_sync() -> None:
        try:
            litellm.completion(**chat_kwargs(provider, model="openai/gpt-4o-mini", metadata={"priority": "low"}))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=low_sync)
    t.start()
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 1)
    high = asyncio.create_task(litellm.acompletion(
        **chat_kwargs(provider, model="openai/gpt-4o", metadata={"priority": 5})))
    await wait_until(lambda: limiter.get_usage_stats()["queued"] == 2)
    clock.advance(61)
    await asyncio.wait_for(high, 10)
    assert t.is_alive()
    clock.advance(61)
    await asyncio.to_thread(t.join, 10)
    assert not t.is_alive() and not errors
    assert [r.model for r in provider.state.log] == ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini"]


# ----------------------------------------------------------------- cached resolution
def test_identity_values_of_different_types_stay_apart() -> None:
    """Identities are cached per raw value, yet equal values of different types (1, 1.0, True)
    are each cleaned on their own, whichever was seen first."""
    from hive_ratelimit_plugin._scopes import resolve_identity

    for _ in range(2):
        assert resolve_identity({"agent_id": 1}).agent_id == "1"
        assert resolve_identity({"agent_id": 1.0}).agent_id == "1.0"
        assert resolve_identity({"agent_id": "a", "priority": 1}).priority == 1
        assert resolve_identity({"agent_id": "a", "priority": True}).priority == 0
        assert resolve_identity({"agent_id": "a", "priority": "high"}).priority == 10
        assert resolve_identity({"agent_id": ""}, user="u").agent_id is None


async def test_reload_adds_a_level_to_an_identity_already_seen(provider: FakeProvider, clock: FakeClock) -> None:
    """What a call counts against is cached per model and identity; a reload that limits this
    identity's team applies from the next call."""
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 1000}})
    md = {"agent_id": "a1", "team_id": "t1"}
    await litellm.acompletion(**chat_kwargs(provider, metadata=dict(md)))
    assert keys(limiter, "team") == set()
    limiter.reload({"global": {"requests_per_minute": 1000}, "teams": {"t1": {"requests_per_minute": 1}},
                    "queue": {"max_wait_seconds": 0}})
    await litellm.acompletion(**chat_kwargs(provider, metadata=dict(md)))
    assert used(limiter, "team", "team:t1") == 1
    with pytest.raises(hive_ratelimit_plugin.RateLimitQueueTimeout):
        await litellm.acompletion(**chat_kwargs(provider, metadata=dict(md)))


def test_an_unknown_priority_runs_normal_and_says_so_once(caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from hive_ratelimit_plugin import _scopes
    from hive_ratelimit_plugin._scopes import parse_priority

    # (Each value is warned about once per process, and at most 100 values: start from none, as
    # a fresh process would, whatever ran before in this one.)
    monkeypatch.setattr(_scopes, "_warned_priorities", set())
    assert parse_priority("HIGH") == 10 and parse_priority(" 5 ") == 5 and parse_priority(-3) == -3
    with caplog.at_level(logging.WARNING, logger="hive_ratelimit_plugin"):
        assert parse_priority("urgent-test") == 0 and parse_priority("urgent-test") == 0
        assert parse_priority(b"urgent-bytes-test") == 0
    warned = [r.getMessage() for r in caplog.records if "priority" in r.getMessage()]
    assert len([m for m in warned if "'urgent-test'" in m]) == 1 and any("urgent-bytes-test" in m for m in warned)


def test_ids_are_counted_safely_whatever_they_hold() -> None:
    """Ids reach stats, logs, state files and Redis keys: a newline is escaped (no forged log
    lines), a megabyte id is cut to a bounded one that stays distinct, and objects whose ``==`` or
    ``str`` misbehave get a name instead of an error."""
    from hive_ratelimit_plugin._scopes import MAX_ID, clean_id, parse_priority, resolve_identity

    assert clean_id("a\nWARNING forged") == "a\\nWARNING forged"
    big_a, big_b = "x" * 1_000_000 + "a", "x" * 1_000_000 + "b"
    assert len(clean_id(big_a) or "") == MAX_ID and clean_id(big_a) != clean_id(big_b)
    assert clean_id(big_a) == clean_id(big_a)  # (stable: the same agent across calls)
    for name in ("xai-grok-research-agent", "hf_dataset_curator_agent01", "sk_learn_pipeline_agent"):
        assert clean_id(name) == name  # (names that start like keys are names)

    class NoEq:
        def __eq__(self, other: object) -> bool:
            raise ValueError("ambiguous")

        __hash__ = object.__hash__

        def __str__(self) -> str:
            return "no-eq"

    class NoStr:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert resolve_identity({"run_id": NoEq(), "agent_id": NoStr()}).run_id == "no-eq"
    assert clean_id(NoStr()) == "<NoStr>"

    class NumpyLikeInt:  # numpy.int64 and the like
        def __index__(self) -> int:
            return 10

    assert parse_priority(NumpyLikeInt()) == 10


def test_run_ids_of_agents_with_a_slash_do_not_collide(provider: FakeProvider, clock: FakeClock) -> None:
    """Agent ``team/a`` in run ``r1`` and agent ``team`` in run ``a/r1`` once shared one run
    (``run:team/a/r1``) and one per-run cap."""
    limiter = make_limiter(clock, {"agents": {"*": {"max_requests_per_run": 2}}, "queue": {"max_wait_seconds": 0}})
    for md in ({"agent_id": "team/a", "run_id": "r1"}, {"agent_id": "team/a", "run_id": "r1"},
               {"agent_id": "team", "run_id": "a/r1"}, {"agent_id": "team", "run_id": "a/r1"}):
        litellm.completion(**chat_kwargs(provider, metadata=dict(md)))
    assert provider.state.count() == 4
    with pytest.raises(hive_ratelimit_plugin.BudgetExceededError):
        litellm.completion(**chat_kwargs(provider, metadata={"agent_id": "team/a", "run_id": "r1"}))
    limiter.reset_budget(agent_id="team/a", run_id="r1")
    litellm.completion(**chat_kwargs(provider, metadata={"agent_id": "team/a", "run_id": "r1"}))
    assert provider.state.count() == 5


def test_a_huge_max_tokens_is_refused_not_crashed(provider: FakeProvider, clock: FakeClock) -> None:
    """``max_tokens=10**400`` overflowed the cost's float arithmetic (a raw OverflowError in the
    agent); it now meets the limits like any too-large call."""
    make_limiter(clock, {"global": {"tokens_per_minute": 1000}, "budget": {"max_daily_spend": 100}})
    for extra in ({"max_tokens": 10**400}, {"max_tokens": 10, "n": 10**400}):
        with pytest.raises(hive_ratelimit_plugin.HiveRateLimitError):
            litellm.completion(**chat_kwargs(provider, **extra))
    assert provider.state.count() == 0


def test_an_api_key_passed_as_an_id_is_never_stored(provider: FakeProvider, clock: FakeClock, tmp_path: Any) -> None:
    """A caller passing its API key as ``user=`` (or as an agent id): the id is counted as
    ``key#<hash>``, so the key reaches no stats, status or state file."""
    import sqlite3

    key = "sk-proj-LEAKCHECK0123456789abcdef"
    limiter = make_limiter(clock, {"users": {"*": {"requests_per_minute": 100}}, "budget": {"max_daily_spend": 10},
                                   "state_path": str(tmp_path / "state.sqlite")})
    litellm.completion(**dict(chat_kwargs(provider, user=key, metadata={"agent_id": key}), api_key=key))
    stats = repr(limiter.get_usage_stats())
    assert key not in stats and "user:key#" in stats and "agent:key#" in stats
    with sqlite3.connect(tmp_path / "state.sqlite") as db:
        assert key not in repr(db.execute("SELECT * FROM spend").fetchall())


LONG_KEY = "sk-proj-" + "A1b2C3d4" * 30  # 248 characters: longer than an id is kept as given (MAX_ID)
ENV_KEY = "sk-from-the-environment-0123456789"


@pytest.mark.parametrize("where", ["long api_key=", "OPENAI_API_KEY", "litellm.api_key", "litellm.openai_key",
                                   "FIREWORKS_API_KEY"])
async def test_an_api_key_litellm_sends_is_never_stored_as_an_id(
        where: str, provider: FakeProvider, clock: FakeClock, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, for the keys that check missed (found by helper-57): a key longer than 200
    characters (the id is cut to 183 characters and a hash before it is compared: the cut key was
    kept), and a key LiteLLM takes from the environment or its module settings rather than from
    ``api_key=``. The key went to stats and the state file (and Redis keys). FIREWORKS_API_KEY:
    a variable LiteLLM reads that is not named ``<PROVIDER>_API_KEY`` (``fireworks_ai``): any
    environment variable named like a secret is checked."""
    import sqlite3

    limiter = make_limiter(clock, {"users": {"*": {"requests_per_minute": 100}}, "budget": {"max_daily_spend": 100},
                                   "state_path": str(tmp_path / "state.sqlite")})
    key = LONG_KEY if where == "long api_key=" else ENV_KEY
    kwargs = chat_kwargs(provider, user=key)
    if where == "long api_key=":
        kwargs["api_key"] = key
    else:
        del kwargs["api_key"]
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        if where == "OPENAI_API_KEY":
            monkeypatch.setenv("OPENAI_API_KEY", key)
        elif where == "FIREWORKS_API_KEY":
            monkeypatch.setenv("FIREWORKS_API_KEY", key)
            kwargs["model"] = "fireworks_ai/accounts/fireworks/models/llama-v3-8b-instruct"
        else:
            monkeypatch.setattr(litellm, where.split(".")[1], key)
    await litellm.acompletion(**kwargs)
    litellm.completion(**kwargs)
    assert provider.state.log[-1].authorization.endswith(key)  # (the key that was sent)
    stats = repr(limiter.get_usage_stats())
    assert "user:key#" in stats and key[:24] not in stats
    with sqlite3.connect(tmp_path / "state.sqlite") as db:
        assert key[:24] not in repr(db.execute("SELECT * FROM spend").fetchall())


def test_long_and_multiline_names_match_their_config_and_set_budget(provider: FakeProvider,
                                                                     clock: FakeClock) -> None:
    """Table names and set_budget ids are cleaned as call ids are: a 300-character agent name or
    one with a newline is limited by its own block, and set_budget reaches it."""
    long_name, odd_name = "a" * 300, "two\nlines"
    limiter = make_limiter(clock, {"agents": {long_name: {"requests_per_minute": 1},
                                              odd_name: {"requests_per_minute": 1}},
                                   "queue": {"max_wait_seconds": 0}})
    for name in (long_name, odd_name):
        litellm.completion(**chat_kwargs(provider, metadata={"agent_id": name}))
        with pytest.raises(hive_ratelimit_plugin.RateLimitQueueTimeout):
            litellm.completion(**chat_kwargs(provider, metadata={"agent_id": name}))
    limiter.set_budget(max_daily_spend=1e-12, agent_id=long_name)
    assert [len(k) for k in limiter.config.agents if k.startswith("a" * 150)] == [200]  # one block, set in place
    clock.advance(61)
    with pytest.raises(hive_ratelimit_plugin.BudgetExceededError):
        litellm.completion(**chat_kwargs(provider, metadata={"agent_id": long_name}))


def test_refused_calls_of_an_agent_named_by_its_api_key_are_not_a_loop(provider: FakeProvider,
                                                                      clock: FakeClock) -> None:
    """A call refused before it was sent is taken back from the runaway detector: also for an
    agent whose id is an API key (counted as ``key#<hash>``; it was taken back under the key
    itself, so a few refused retries tripped a runaway breaker)."""
    key = "sk-proj-LEAKCHECK0123456789abcdef"
    make_limiter(clock, {"runaway": {"max_identical_requests": 3}, "agents": {"*": {"requests_per_minute": 1}},
                         "queue": {"max_wait_seconds": 0}})
    kwargs = dict(chat_kwargs(provider, metadata={"agent_id": key}), api_key=key)
    litellm.completion(**kwargs)
    for _ in range(5):
        with pytest.raises(hive_ratelimit_plugin.RateLimitQueueTimeout):
            litellm.completion(**kwargs)
    assert provider.state.count() == 1


def test_an_identity_carried_to_another_thread_resolves_as_it_would_have_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """``with_context_identity`` (what ``batch_completion``'s calls carry to LiteLLM's threads,
    which do not see context variables) gives, resolved there, the identity the call would have
    had here: for every mix of metadata, ``user=``, ``scope()`` and an ambient source (Hive's
    running agent). Was: an ambient source filled in ``priority`` for metadata that names all four
    ids but no priority, where a call made here ignores the ambient source."""
    import concurrent.futures
    import itertools

    from hive_ratelimit_plugin import _scopes

    ambient = {"agent_id": "amb-agent", "user_id": "amb-user", "team_id": "amb-team", "run_id": "amb-run",
               "priority": "high"}
    monkeypatch.setattr(_scopes, "AMBIENT_IDENTITY", [lambda: ambient])
    ids = ("agent_id", "user_id", "team_id", "run_id")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # (a fresh context, as LiteLLM's pool)
    checked = 0
    try:
        for md_fields in itertools.product((False, True), repeat=5):
            metadata = {f: f"md-{f}" for f, on in zip((*ids, "priority"), md_fields, strict=True) if on}
            metadata = {k: ("low" if k == "priority" else v) for k, v in metadata.items()}
            for ctx_fields, user in itertools.product(((), ("agent_id",), ("priority",), ids, (*ids, "priority")),
                                                      (None, "the-user")):
                ctx = {f: ("normal" if f == "priority" else f"ctx-{f}") for f in ctx_fields}
                with _scopes.scope(**ctx):
                    here = _scopes.resolve_identity(metadata, user)
                    carried = _scopes.with_context_identity(metadata, user)
                there = pool.submit(_scopes.resolve_identity, carried, user).result()
                assert there == here, (metadata, ctx, user)
                checked += 1
    finally:
        pool.shutdown()
    assert checked == 32 * 5 * 2
