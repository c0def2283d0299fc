"""ProxyLimiter's hooks with the proxy's own data shapes (``UserAPIKeyAuth``, the request dict the
proxy passes), without starting a server. The end-to-end behaviour is in test_proxy_e2e.py."""

from __future__ import annotations

import asyncio
import importlib
import json
import uuid
from pathlib import Path
from typing import Any

import litellm
import pytest
from fastapi import HTTPException
from litellm.proxy._types import ProxyException, UserAPIKeyAuth

from hive_ratelimit_plugin import proxy as proxy_mod
from hive_ratelimit_plugin.errors import RateLimitQueueTimeout
from hive_ratelimit_plugin.proxy import ProxyLimiter, proxy_identity
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import Ticker, chat_kwargs, wait_until

HASH = "a" * 64


def _auth(**kw: Any) -> UserAPIKeyAuth:
    kw.setdefault("api_key", HASH)
    return UserAPIKeyAuth(**kw)


def _data(provider: FakeProvider | None = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": "gpt-4o-mini" if provider is None else "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello there"}],
        "metadata": {"user_id": "mallory", "team_id": "victims", "agent_id": "fake", "priority": "high"},
        "litellm_call_id": "call-1",
    }
    data.update(extra)
    return data


def _limiter(clock: FakeClock, config: dict[str, Any]) -> ProxyLimiter:
    lim = ProxyLimiter(config, clock=clock)
    clock.attach(lim)
    litellm.callbacks.append(lim)
    return lim


def test_identity_comes_from_the_key_not_from_client_metadata() -> None:
    auth = _auth(user_id="alice", team_id="research", key_alias="alice-laptop", end_user_id="customer-7",
                 metadata={"agent_id": "planner", "priority": "high"})
    ident = proxy_identity(auth, _data(metadata={"user_id": "bob", "team_id": "x", "run_id": "r1"}))
    assert ident == {"agent_id": "planner", "user_id": "alice", "team_id": "research", "run_id": "r1",
                     "priority": "high"}
    # Without metadata agent_id: the alias; without alias: a short name derived from the key hash.
    assert proxy_identity(_auth(key_alias="ci"))["agent_id"] == "ci"
    assert proxy_identity(_auth(key_alias="ci"))["runaway"] is False  # see the runaway test
    assert proxy_identity(_auth())["agent_id"] == "key-aaaaaaaaaaaa"
    # A raw key (custom auth may pass one) is hashed, never shown.
    assert "sk-raw-secret" not in str(proxy_identity(_auth(api_key="sk-raw-secret")))
    # No user on the key: the end user the proxy resolved from the request's `user`.
    assert proxy_identity(_auth(end_user_id="customer-7"))["user_id"] == "customer-7"
    # Team metadata priority applies when the key has none.
    assert proxy_identity(_auth(team_metadata={"priority": "low"}))["priority"] == "low"


async def test_pre_call_hook_counts_against_the_keys_levels(clock: FakeClock) -> None:
    lim = _limiter(clock, {"queue": {"max_wait_seconds": 0},
                           "users": {"alice": {"requests_per_minute": 1}},
                           "teams": {"victims": {"requests_per_minute": 1}},
                           "agents": {"*": {"requests_per_minute": 100}}})
    auth = _auth(user_id="alice", team_id="research", key_alias="alice-laptop")
    assert await lim.async_pre_call_hook(auth, None, _data(), "acompletion") is None
    levels = lim.get_usage_stats()["levels"]
    assert set(levels["user"]) == {"user:alice"}
    assert set(levels["agent"]) == {"agent:alice-laptop"}
    assert "team" not in levels  # the client's team_id "victims" was not charged
    with pytest.raises(HTTPException) as caught:
        await lim.async_pre_call_hook(auth, None, _data(litellm_call_id="call-2"), "completion")
    exc = caught.value
    assert exc.status_code == 429
    assert exc.headers is not None and 59 <= int(exc.headers["retry-after"]) <= 61
    assert exc.headers["x-hive-ratelimit-scope"] == "user:alice"
    assert getattr(exc, "type", None) == "rate_limit_error"
    assert isinstance(exc.__cause__, RateLimitQueueTimeout)
    # Counted as a rejection, as in SDK mode (the calls_rejected metric, status's "rejected N"):
    # the proxy counted none. Found by helper-53.
    assert lim._obs.as_dict()["rejections"] == {"user/queue_timeout": 1}


async def test_budget_refusal_is_not_a_429(clock: FakeClock) -> None:
    lim = _limiter(clock, {"users": {"alice": {"max_cost_per_day": 0.0000001}}})
    with pytest.raises(HTTPException) as caught:
        await lim.async_pre_call_hook(_auth(user_id="alice"), None, _data(), "acompletion")
    exc = caught.value
    assert exc.status_code != 429 and 400 <= exc.status_code < 500
    assert exc.headers is not None and "retry-after" not in exc.headers
    assert getattr(exc, "type", None) == "budget_exceeded"
    assert "rate limit" not in str(exc.detail).lower() and "429" not in str(exc.detail)
    assert isinstance(exc.__cause__, litellm.BudgetExceededError)


async def test_a_call_id_in_flight_cannot_be_reused(clock: FakeClock) -> None:
    lim = _limiter(clock, {"users": {"alice": {"requests_per_minute": 100}}})
    auth = _auth(user_id="alice")
    await lim.async_pre_call_hook(auth, None, _data(), "acompletion")
    with pytest.raises(HTTPException) as caught:
        await lim.async_pre_call_hook(auth, None, _data(), "acompletion")
    assert caught.value.status_code == 400
    assert lim.get_usage_stats()["admitted_total"] == 1


async def test_unlimited_call_types_pass_untouched(clock: FakeClock) -> None:
    lim = _limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 0}})
    for i in range(3):
        data = {"model": "omni-moderation-latest", "input": "a cat", "litellm_call_id": f"mod-{i}"}
        assert await lim.async_pre_call_hook(_auth(), None, data, "moderation") is None
    assert lim.get_usage_stats()["admitted_total"] == 0


async def test_admitted_by_the_pre_call_hook_then_sent_by_litellm_counts_once(
        provider: FakeProvider, clock: FakeClock) -> None:
    """What the proxy does next: LiteLLM's acompletion (our guard, then the deployment hook) with
    the same litellm_call_id, and the success event settles that same admission."""
    lim = _limiter(clock, {"users": {"alice": {"requests_per_minute": 100, "tokens_per_minute": 100000}}})
    auth = _auth(user_id="alice")
    data = _data(provider)
    await lim.async_pre_call_hook(auth, None, data, "acompletion")
    assert lim._engine.holds("call-1")
    kw = chat_kwargs(provider, litellm_call_id="call-1", metadata=data["metadata"])
    await litellm.acompletion(**kw)
    await wait_until(lambda: not lim._engine.holds("call-1"))
    stats = lim.get_usage_stats()
    assert stats["admitted_total"] == 1
    assert provider.state.count() == 1
    sent = provider.state.log[0]
    used = stats["levels"]["user"]["user:alice"]["tokens_per_minute"]["used"]
    assert used == sent.prompt_tokens + sent.completion_tokens  # settled to the actual usage


async def test_a_request_that_ended_leaves_no_identity_behind(provider: FakeProvider, clock: FakeClock) -> None:
    """The identity a request was admitted under is dropped once it is answered (streamed or not)
    or has failed: kept, every request of a busy proxy stayed in memory until 65,536 had passed."""
    lim = _limiter(clock, {"users": {"alice": {"requests_per_minute": 100}}})
    auth = _auth(user_id="alice")
    for call_id, stream in (("call-1", False), ("call-2", True)):
        data = _data(provider, litellm_call_id=call_id)
        await lim.async_pre_call_hook(auth, None, data, "acompletion")
        assert call_id in lim._proxy_calls
        answer = await litellm.acompletion(**chat_kwargs(provider, litellm_call_id=call_id, metadata=data["metadata"],
                                                         stream=stream))
        if stream:
            async for _ in answer:
                pass
        await wait_until(lambda cid=call_id: not lim._engine.holds(cid))
        await wait_until(lambda cid=call_id: cid not in lim._proxy_calls, timeout=2.0)
    await lim.async_pre_call_hook(auth, None, _data(litellm_call_id="call-3"), "acompletion")
    # A second request reusing the id is refused; its failure hook keeps the first one's identity.
    with pytest.raises(HTTPException) as refused:
        await lim.async_pre_call_hook(auth, None, _data(litellm_call_id="call-3"), "acompletion")
    await lim.async_post_call_failure_hook(_data(litellm_call_id="call-3"), refused.value, auth)
    assert "call-3" in lim._proxy_calls and lim._engine.holds("call-3")
    await lim.async_post_call_failure_hook(_data(litellm_call_id="call-3"), ValueError("blocked"), auth)
    assert len(lim._proxy_calls) == 0


async def test_a_failure_after_admission_releases_it(clock: FakeClock) -> None:
    lim = _limiter(clock, {"users": {"alice": {"concurrent_requests": 1}}, "queue": {"max_wait_seconds": 0}})
    auth = _auth(user_id="alice")
    await lim.async_pre_call_hook(auth, None, _data(), "acompletion")
    # e.g. a guardrail after ours refused the request, or the Router found no deployment
    assert await lim.async_post_call_failure_hook(_data(), ValueError("blocked"), auth) is None
    assert not lim._engine.holds("call-1")
    await lim.async_pre_call_hook(auth, None, _data(litellm_call_id="call-2"), "acompletion")


async def test_a_refusal_in_the_deployment_hook_is_answered_like_the_pre_call_one(clock: FakeClock) -> None:
    lim = _limiter(clock, {"users": {"alice": {"requests_per_minute": 1}}, "queue": {"max_wait_seconds": 0}})
    wrapped = RuntimeError("router gave up")
    wrapped.__cause__ = RateLimitQueueTimeout("held", scope="user:alice", limit="requests_per_minute",
                                              retry_after=12.2)
    answer = await lim.async_post_call_failure_hook(_data(), wrapped, _auth(user_id="alice"))
    assert isinstance(answer, HTTPException)
    assert answer.status_code == 429 and answer.headers is not None and answer.headers["retry-after"] == "13"


async def test_mixed_model_groups_are_admitted_per_deployment_with_the_keys_identity(
        provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    from litellm.proxy import proxy_server

    router = litellm.Router(model_list=[
        {"model_name": "mixed", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": provider.url,
                                                   "api_key": "sk-x"}},
        {"model_name": "mixed", "litellm_params": {"model": "openai/gpt-4o", "api_base": provider.url,
                                                   "api_key": "sk-x"}},
    ], num_retries=0)
    monkeypatch.setattr(proxy_server, "llm_router", router, raising=False)
    lim = _limiter(clock, {"users": {"alice": {"requests_per_minute": 100}}})
    auth = _auth(user_id="alice")
    data = _data(model="mixed")
    await lim.async_pre_call_hook(auth, None, data, "acompletion")
    assert not lim._engine.holds("call-1")  # not yet: the Router has not picked a model
    await router.acompletion(model="mixed", messages=data["messages"], litellm_call_id="call-1",
                             metadata=data["metadata"], max_retries=0)
    await wait_until(lambda: not lim._engine.holds("call-1"))
    stats = lim.get_usage_stats()
    assert stats["admitted_total"] == 1
    assert set(stats["levels"]["user"]) == {"user:alice"}  # not the client's "mallory"


async def test_a_group_of_one_model_on_two_endpoints_keeps_their_cooldowns_apart(
        provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model group whose deployments are one model on two endpoints (two regions, two accounts)
    is admitted per deployment, so each endpoint keeps its own cooldown: while one deployment's
    429 (retry after 30 s) is waited out, the group's requests the Router sends to the other go
    at once. (Admitted for the group, a 429 from either held every request to the model.)"""
    from litellm.proxy import proxy_server

    with FakeProvider() as other:
        router = litellm.Router(model_list=[
            {"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": p.url,
                                                     "api_key": f"sk-x-{i}"}}
            for i, p in enumerate((provider, other))], num_retries=0)
        monkeypatch.setattr(proxy_server, "llm_router", router, raising=False)
        lim = _limiter(clock, {"users": {"alice": {"requests_per_minute": 100}}})
        auth = _auth(user_id="alice")
        other.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        start = clock()
        calls: list[asyncio.Task[Any]] = []

        run = uuid.uuid4().hex  # (LiteLLM 1.110 delivers success events late, from a worker: an earlier
        # test's "call-1" settled this test's "call-1" as a success before its 429 came back)

        async def request(i: int) -> None:
            data = _data(model="gpt", litellm_call_id=f"{run}-{i}")
            await lim.async_pre_call_hook(auth, None, data, "acompletion")
            await router.acompletion(model="gpt", messages=data["messages"], litellm_call_id=f"{run}-{i}",
                                     metadata=data["metadata"])

        while other.state.count(429) == 0:  # until the Router has sent one to the refusing deployment
            calls.append(asyncio.create_task(request(len(calls))))
            await asyncio.wait({calls[-1]}, timeout=1.0)
            assert len(calls) < 40
        await wait_until(lambda: lim._engine.queue_length >= 1)
        sent = provider.state.count()
        calls += [asyncio.create_task(request(100 + i)) for i in range(20)]  # (all 20 to one: 1 in 10^6)
        await wait_until(lambda: provider.state.count() > sent, timeout=20)  # (no fake time passes)
        assert clock() == start
        with Ticker(clock, step=0.5, when=lambda: lim._engine.queue_length > 0):
            await asyncio.wait_for(asyncio.gather(*calls), 60)
        assert other.state.count(429) == 1
        assert lim.get_usage_stats()["admitted_total"] >= len(calls)


async def test_deployment_admission_without_the_pre_call_hook_uses_the_proxys_key_fields(
        provider: FakeProvider, clock: FakeClock) -> None:
    lim = _limiter(clock, {"users": {"*": {"requests_per_minute": 100}}})
    md = {"user_id": "mallory", "user_api_key_user_id": "alice", "user_api_key_alias": "k1",
          "user_api_key_hash": HASH}
    await litellm.acompletion(**chat_kwargs(provider, metadata=md))
    assert set(lim.get_usage_stats()["levels"]["user"]) == {"user:alice"}


def test_the_instance_named_in_config_yaml_reads_hive_ratelimit_config(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("rate_limiting:\n  users:\n    alice:\n      requests_per_minute: 7\n")
    monkeypatch.setenv("HIVE_RATELIMIT_CONFIG", str(path))
    monkeypatch.setattr(proxy_mod, "_instance", None)
    mod = importlib.import_module("hive_ratelimit_plugin.proxy")
    inst = mod.proxy_handler_instance
    assert isinstance(inst, ProxyLimiter)
    assert inst is mod.limiter
    assert inst.config.users["alice"].requests_per_minute == 7
    assert "async_pre_call_hook" in vars(type(inst))  # the proxy only calls it if defined on the class


def test_the_instance_reads_the_proxy_config_files_rate_limiting_block(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model_list: []\nrate_limiting:\n  teams:\n    research:\n      tokens_per_minute: 900\n")
    monkeypatch.delenv("HIVE_RATELIMIT_CONFIG", raising=False)
    monkeypatch.delenv("CONFIG_FILE_PATH", raising=False)
    monkeypatch.setenv("WORKER_CONFIG", json.dumps({"config": str(path)}))  # what `litellm --config` sets
    monkeypatch.setattr(proxy_mod, "_instance", None)
    inst = proxy_mod.get_instance()
    assert inst.config.teams["research"].tokens_per_minute == 900
    monkeypatch.setattr(proxy_mod, "_instance", None)


def test_reload_with_no_argument_reads_the_proxy_config_files_block_again(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy's limiter, built from its config.yaml's ``rate_limiting:`` block, read only the
    environment on ``reload()``: the block's limits were all dropped."""
    from hive_ratelimit_plugin.errors import ConfigError

    path = tmp_path / "config.yaml"
    path.write_text("model_list: []\nrate_limiting:\n  teams:\n    research:\n      tokens_per_minute: 900\n")
    monkeypatch.delenv("HIVE_RATELIMIT_CONFIG", raising=False)
    monkeypatch.setenv("CONFIG_FILE_PATH", str(path))
    monkeypatch.setattr(proxy_mod, "_instance", None)
    inst = proxy_mod.get_instance()
    path.write_text("model_list: []\nrate_limiting:\n  teams:\n    research:\n      tokens_per_minute: 500\n")
    inst.reload()
    assert inst.config.teams["research"].tokens_per_minute == 500
    # Its source is decided at start: a variable set later, or a block removed, does not turn
    # it into an environment-only limiter (every limit dropped) in silence.
    monkeypatch.setenv("CONFIG_FILE_PATH", str(tmp_path / "elsewhere.yaml"))
    inst.reload()
    assert inst.config.teams["research"].tokens_per_minute == 500
    path.write_text("model_list: []\n")
    with pytest.raises(ConfigError, match="no rate_limiting: block"):
        inst.reload()
    assert inst.config.teams["research"].tokens_per_minute == 500
    monkeypatch.setattr(proxy_mod, "_instance", None)


def test_a_bad_rate_limiting_block_stops_the_proxy_with_a_clear_error(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from hive_ratelimit_plugin.errors import ConfigError

    path = tmp_path / "config.yaml"
    path.write_text("rate_limiting:\n  users:\n    alice:\n      requests_per_minute: -3\n")
    monkeypatch.delenv("HIVE_RATELIMIT_CONFIG", raising=False)
    monkeypatch.setenv("CONFIG_FILE_PATH", str(path))
    monkeypatch.setattr(proxy_mod, "_instance", None)
    with pytest.raises(ConfigError, match="requests_per_minute"):
        proxy_mod.get_instance()


async def test_queued_request_is_released_when_the_client_goes_away(clock: FakeClock) -> None:
    lim = _limiter(clock, {"users": {"alice": {"requests_per_minute": 1}}, "queue": {"max_wait_seconds": 60}})
    auth = _auth(user_id="alice")
    await lim.async_pre_call_hook(auth, None, _data(), "acompletion")
    task = asyncio.create_task(lim.async_pre_call_hook(auth, None, _data(litellm_call_id="call-2"), "acompletion"))
    await wait_until(lambda: lim._engine.queue_length == 1)
    task.cancel()  # the proxy cancels the request's task when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lim._engine.queue_length == 0 and not lim._engine.holds("call-2")
    assert "call-2" not in lim._proxy_calls


async def test_a_provider_429_retry_is_one_more_admission_not_a_free_ride(
        provider: FakeProvider, clock: FakeClock) -> None:
    """After a provider 429 LiteLLM's retry guard sends the request again. The second attempt is
    admitted on its own (the first attempt's failure event may not have released it yet), with the
    same identity, and nothing stays held."""
    lim = _limiter(clock, {"users": {"alice": {"requests_per_minute": 100}}})
    auth = _auth(user_id="alice")
    data = _data(provider)
    await lim.async_pre_call_hook(auth, None, data, "acompletion")
    provider.state.push(Scripted(429, headers={"retry-after": "1"}))
    md = {**data["metadata"], "user_api_key_user_id": "alice", "user_api_key_hash": HASH}
    with Ticker(clock, step=0.25, when=lambda: lim._engine.queue_length > 0):
        await litellm.acompletion(**chat_kwargs(provider, litellm_call_id="call-1", metadata=md))
        await wait_until(lambda: not lim._engine._leases)
    assert [r.status for r in provider.state.log] == [429, 200]
    stats = lim.get_usage_stats()
    assert stats["admitted_total"] == 2  # one per attempt sent
    assert set(stats["levels"]["user"]) == {"user:alice"}
    assert stats["levels"]["user"]["user:alice"]["in_flight"] == 0
    # Only LiteLLM's first attempt rides on the pre-call admission; a later one that finds its
    # failed predecessor still held (failure events run in the background) is re-admitted.
    # (Past the 429's cooldown and pacing first: with the ticker stopped, fake time no longer
    # moves, and a call paced behind the retry would wait forever. Under CPU load the ticker's
    # thread may not have moved time past the pacing slot before the block above ended.)
    clock.advance(10)
    await lim.async_pre_call_hook(auth, None, _data(litellm_call_id="call-9"), "acompletion")
    assert lim._admitted_upstream("call-9") and not lim._admitted_upstream("call-9")


async def test_runaway_breaker_applies_to_named_agents_not_to_shared_keys(clock: FakeClock) -> None:
    """One key often serves many clients sending the same prompt; an agent named in the key's
    metadata is one agent, and the same request 21 times a minute means it is stuck."""
    lim = _limiter(clock, {"agents": {"*": {"requests_per_minute": 1000}}})
    shared = _auth(user_id="app", key_alias="app-key")
    for i in range(25):
        await lim.async_pre_call_hook(shared, None, _data(litellm_call_id=f"s{i}"), "acompletion")
        lim._finish(f"s{i}")
    named = _auth(user_id="alice", metadata={"agent_id": "planner"})
    with pytest.raises(HTTPException) as caught:
        for i in range(25):
            await lim.async_pre_call_hook(named, None, _data(litellm_call_id=f"n{i}"), "acompletion")
            lim._finish(f"n{i}")
    assert getattr(caught.value, "type", None) == "budget_exceeded" and i == 20


@pytest.mark.parametrize("call_type", ["anthropic_messages", "aresponses", "responses", "text_completion",
                                       "embeddings"])
async def test_every_llm_route_is_admitted(call_type: str, clock: FakeClock) -> None:
    lim = _limiter(clock, {"users": {"alice": {"requests_per_minute": 1}}, "queue": {"max_wait_seconds": 0}})
    auth = _auth(user_id="alice")
    body = {"input": "hello there", "prompt": "hello there"}
    await lim.async_pre_call_hook(auth, None, _data(**body), call_type)
    # (/v1/completions and /v1/messages answer a ProxyException with its headers: see _as_route_exception)
    raised = ProxyException if call_type in ("text_completion", "anthropic_messages") else HTTPException
    with pytest.raises(raised) as caught:
        await lim.async_pre_call_hook(auth, None, _data(litellm_call_id="call-2", **body), call_type)
    assert caught.value.status_code == 429  # type: ignore[attr-defined]
    assert 55 <= int(caught.value.headers["retry-after"]) <= 61  # type: ignore[attr-defined]


async def test_configured_api_keys_never_replace_the_deployments_key(
        provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_TEST_OTHER_KEY", "sk-other-key")
    lim = _limiter(clock, {"providers": {"openai": {"api_keys": [{"env": "HIVE_TEST_OTHER_KEY"}]}}})
    md = {"user_api_key_user_id": "alice", "user_api_key_hash": HASH}
    await litellm.acompletion(**chat_kwargs(provider, metadata=md))  # admitted in the deployment hook
    assert provider.state.log[0].authorization == "Bearer sk-test-SECRET-0123456789"
    assert lim.get_usage_stats()["admitted_total"] == 1


async def test_a_proxy_client_cannot_set_its_calls_lease(clock: FakeClock) -> None:
    """A call's ``timeout=`` lengthens its lease (how long its slot outlives a dead process); in
    the proxy the request body is the client's, so it does not."""
    lim = _limiter(clock, {"global": {"concurrent_requests": 5}, "estimation": {"lease_seconds": 2}})
    seen: list[float] = []
    admit = lim._engine.admit_now

    def spy(ticket: Any) -> Any:
        seen.append(ticket.lease)
        return admit(ticket)

    lim._engine.admit_now = spy  # type: ignore[method-assign]
    await lim.async_pre_call_hook(_auth(), None, _data(timeout=9_999_000), "acompletion")
    assert seen == [0.0]


def test_a_section_beside_the_proxys_rate_limiting_block_is_warned_of(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The proxy reads only its config file's ``rate_limiting:`` block: a ``budget:`` written beside
    it (indented wrongly) would not apply. A proxy's file is LiteLLM's too, so it is a warning
    (naming the key), not an error; the block itself still applies."""
    path = tmp_path / "config.yaml"
    path.write_text("model_list: []\nrate_limiting:\n  global: {requests_per_minute: 7}\n"
                    "budget:\n  max_daily_spend: 10\n")
    with caplog.at_level("WARNING", logger="hive_ratelimit_plugin"):
        cfg = proxy_mod._read_block(proxy_mod._ProxyBlock(str(path)))
    assert cfg.global_.requests_per_minute == 7 and cfg.budget.max_daily_spend is None
    assert "budget: a rate_limiting section at the top level, next to rate_limiting:" in caplog.text


async def test_a_proxy_client_cannot_skip_its_endpoints_cooldown_with_the_private_flag(
        provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request body is the client's: a ``_hive_ratelimit_any_endpoint`` key in it (the flag the
    hook sets for a group admitted before the Router picks an endpoint) must not leave the
    endpoint's scope out. It did: a 429's cooldown on that endpoint was skipped, and the request
    was sent into it."""
    from litellm.proxy import proxy_server

    with FakeProvider() as other:
        router = litellm.Router(model_list=[
            {"model_name": name, "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": p.url,
                                                    "api_key": f"sk-x-{name}"}}
            for name, p in (("a", provider), ("b", other))], num_retries=0)
        monkeypatch.setattr(proxy_server, "llm_router", router, raising=False)
        lim = _limiter(clock, {"queue": {"max_wait_seconds": 0}, "retry": {"enabled": False}})
        messages = [{"role": "user", "content": "hello there"}]
        await router.acompletion(model="a", messages=messages)  # the model is now served by two endpoints
        other.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        with pytest.raises(litellm.RateLimitError):
            await router.acompletion(model="b", messages=messages)  # endpoint b cools down for 30 s
        for flag in ({}, {"_hive_ratelimit_any_endpoint": True}):
            with pytest.raises(HTTPException) as refused:
                await lim.async_pre_call_hook(_auth(user_id="alice"), None,
                                              _data(model="b", litellm_call_id=uuid.uuid4().hex, **flag),
                                              "acompletion")
            assert refused.value.status_code == 429
        assert other.state.count() == 1


async def test_the_backend_down_under_closed_is_a_503_not_a_429(clock: FakeClock) -> None:
    """Redis down under ``on_backend_error: closed``: the limiter's own outage, not the client's
    rate. The client gets 503 with ``retry-after`` (as for an open circuit), never 429, which reads
    as "you sent too much"; nothing is sent. Was: 429 ``rate_limit_exceeded``."""
    from hive_ratelimit_plugin.errors import BackendUnavailableError

    from .helpers import unused_port

    lim = _limiter(clock, {"backend": f"redis://:hunter2@127.0.0.1:{unused_port()}/0",
                           "redis": {"on_backend_error": "closed", "socket_timeout": 0.1},
                           "users": {"alice": {"requests_per_minute": 100}}})
    with pytest.raises(HTTPException) as caught:
        await lim.async_pre_call_hook(_auth(user_id="alice"), None, _data(), "acompletion")
    exc = caught.value
    assert isinstance(exc.__cause__, BackendUnavailableError)
    assert exc.status_code == 503
    assert getattr(exc, "type", None) == "service_unavailable"
    assert exc.headers is not None and int(exc.headers["retry-after"]) >= 1
    assert "hunter2" not in repr(exc.detail) + repr(exc.headers)
