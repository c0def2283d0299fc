"""Hostile tests: the LiteLLM proxy path, the Hive / zero-code path.

Each test here failed against the package when it was written; each names the defect it shows.
The proxy tests reuse test_proxy_e2e's module-scoped real proxy (LiteLLM's own app under uvicorn
in front of the fake provider, the limiter on a fake clock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import litellm
import pytest

from hive_ratelimit_plugin import disable, enable
from hive_ratelimit_plugin.errors import BudgetExceededError, RateLimitQueueTimeout

from .helpers import chat_kwargs, wait_until
from .test_proxy_e2e import LIMITS, Proxy, proxy  # noqa: F401  (the module-scoped real proxy)

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
def px(proxy: Proxy) -> Iterator[Proxy]:  # noqa: F811
    st = proxy.provider.state
    st.reset()
    st.latency = 0.0
    proxy.use(LIMITS)
    yield proxy
    st.latency = 0.0


# --------------------------------------------------------------------------- proxy
async def test_duplicate_call_id_refusal_does_not_free_the_in_flight_requests_slot(px: Proxy) -> None:
    """docs/proxy.md: 'a reused x-litellm-call-id that is still in flight -> 400'. The 400 is given,
    but the proxy then runs async_post_call_failure_hook for the refused duplicate, which releases
    the ORIGINAL request's reservation (same call id) while it is still in flight. Any client can
    thus empty its own concurrency slots (and the global ones) by re-sending its call id."""
    lim = px.use({**LIMITS, "global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0}})
    st = px.provider.state
    st.latency = 1.5
    async with httpx.AsyncClient(timeout=60) as client:
        headers = {"authorization": "Bearer sk-bob", "x-litellm-call-id": "dup-call-id-1"}
        first = asyncio.create_task(client.post(f"{px.url}/v1/chat/completions", json=BODY, headers=headers))
        await wait_until(lambda: st.in_flight == 1)
        dup = await client.post(f"{px.url}/v1/chat/completions", json=BODY, headers=headers)
        assert dup.status_code == 400
        # The first request is still being answered: it must still hold the only slot.
        in_flight = lim.get_usage_stats()["levels"]["global"]["global"]["in_flight"]
        other = await client.post(f"{px.url}/v1/chat/completions", json=BODY,
                                  headers={"authorization": "Bearer sk-alice"})
        await first
    assert in_flight == 1, "the refused duplicate released the in-flight request's slot"
    assert other.status_code == 429, "a second request ran while the first still held the only slot"
    assert st.max_in_flight == 1


# ----------------------------------------------------------------------- zero code
@pytest.fixture
def env_limits(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What the autoload uses: HIVE_RATELIMIT_CONFIG, and enable() with no argument."""
    path = tmp_path / "limits.yaml"
    path.write_text("rate_limiting:\n  global: {requests_per_minute: 100}\n  queue: {max_wait_seconds: 0}\n")
    monkeypatch.setenv("HIVE_RATELIMIT_CONFIG", str(path))
    yield
    disable()


async def test_enable_again_after_set_budget_keeps_the_budget(env_limits: None, provider: Any) -> None:
    """docs/zero-code.md: 'In an autoloaded process, enable() therefore returns the autoloaded
    limiter' / 'fetch the autoloaded limiter with enable()'. But set_budget() changes the active
    limiter's config, so the next enable() sees a 'different configuration', builds a NEW limiter
    from the file and unregisters the old one: the budget set at runtime is silently gone."""
    limiter = enable()
    limiter.set_budget(max_daily_spend=0.0000001, agent_id="researcher")
    fetched = enable()  # e.g. another module fetching the process-wide limiter
    with pytest.raises(BudgetExceededError):  # observed: the call is sent, unbudgeted
        await litellm.acompletion(**chat_kwargs(provider, metadata={"agent_id": "researcher"}))
    assert fetched is limiter


async def test_enable_again_after_reload_keeps_the_reloaded_limits(env_limits: None, provider: Any) -> None:
    """docs/zero-code.md: 'To change limits and keep the counted usage, call
    enable().reload(new_config)'. A later enable() (documented as the way to fetch the limiter)
    replaces the reloaded limiter with a fresh one from the file: limits and usage both revert."""
    limiter = enable()
    limiter.reload({"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 0}})
    await litellm.acompletion(**chat_kwargs(provider))
    fetched = enable()
    with pytest.raises(RateLimitQueueTimeout):  # observed: sent (a fresh limiter from the file)
        await litellm.acompletion(**chat_kwargs(provider))
    assert fetched is limiter


async def test_reused_call_id_of_a_queued_request_is_not_counted_twice(px: Proxy) -> None:
    """The duplicate-id check in async_pre_call_hook only looks at ids that are *held*
    (engine.holds), not at ids still waiting in the queue. A second request reusing the id of a
    queued one is queued too; later the retry guard finds the id held and gives the request a
    fresh id, so it is admitted a second time in the deployment hook. Observed: 3 requests sent,
    4 admissions (requests_per_minute charged 4)."""
    lim = px.use({**LIMITS, "global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 30}})
    st = px.provider.state
    st.latency = 0.5
    url = f"{px.url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=60) as client:
        a = asyncio.create_task(client.post(url, json=BODY, headers={"authorization": "Bearer sk-bob"}))
        await wait_until(lambda: st.in_flight == 1)
        same = {"authorization": "Bearer sk-bob", "x-litellm-call-id": "queued-call-id-1"}
        b = asyncio.create_task(client.post(url, json=BODY, headers=same))
        await wait_until(lambda: lim._engine.queue_length == 1)
        c = asyncio.create_task(client.post(url, json=BODY, headers=same))
        responses = await asyncio.gather(a, b, c)
    await wait_until(lambda: not lim._engine._leases)
    sent = st.count()
    statuses = sorted(r.status_code for r in responses)
    # Either the reused id is refused (400, not sent) or every request is admitted once.
    assert statuses in ([200, 200, 400], [200, 200, 200]), statuses
    assert lim.get_usage_stats()["admitted_total"] == sent, "a request was admitted twice"


async def test_fallback_after_a_failure_before_sending_is_charged_to_the_model_actually_called(
        px: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-call hook admits a request against the model of the group it names. When the Router
    fails that group before sending anything (here: its mock_testing_fallbacks switch, standing in
    for 'no deployment available': cooldown, deployment rpm/tpm, pre-call checks) and falls back
    to another group, the fallback call rides on the first admission (the deployment hook finds the
    call id held and returns). Observed: every request went to openai/gpt-4o, none was counted
    against it (its requests_per_minute: 1 did not hold), all were charged to gpt-4o-mini's scope
    and price."""
    from litellm.proxy import proxy_server

    monkeypatch.setitem(proxy_server.general_settings, "dangerously_allow_mock_testing_request_params", True)
    lim = px.use({**LIMITS, "queue": {"max_wait_seconds": 0}, "users": {},
                  "providers": {"openai": {"gpt-4o": {"requests_per_minute": 1}}}})
    st = px.provider.state
    def to_4o() -> int:
        return sum(1 for r in st.log if r.model == "gpt-4o")

    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(12):  # the Router picks either deployment of "mixed": until two went to gpt-4o
            await px.post(client, "sk-bob", mock_testing_fallbacks=True, fallbacks=["mixed"])
            if to_4o() >= 2:
                break
    await wait_until(lambda: not lim._engine._leases)
    to_4o = to_4o()
    counted = lim.get_usage_stats()["levels"]["model"].get("model:openai/gpt-4o", {})
    assert to_4o <= 1, f"{to_4o} requests sent to gpt-4o past its requests_per_minute of 1"
    assert counted.get("requests_per_minute", {}).get("used", 0) == to_4o


async def test_an_end_user_id_holding_the_callers_key_is_not_exposed(clock: Any) -> None:
    """README: 'an id equal to the call's API key (a user= holding the caller's sk-...) is counted
    as key#<hash>' so that keys never reach stats, logs, state files or Redis keys. In the proxy a
    key without a user_id is identified by the end user, which the proxy takes from the request's
    `user`; a client that puts its own key there gets it counted, and echoed, verbatim: in
    x-hive-ratelimit-scope, in the error message and in get_usage_stats()."""
    from fastapi import HTTPException
    from litellm.proxy._types import UserAPIKeyAuth

    from hive_ratelimit_plugin.proxy import ProxyLimiter

    secret = "sk-live-0123456789abcdef0123"
    lim = ProxyLimiter({"users": {"*": {"requests_per_minute": 1}}, "queue": {"max_wait_seconds": 0}},
                       clock=clock)
    clock.attach(lim)
    litellm.callbacks.append(lim)
    auth = UserAPIKeyAuth(api_key=secret, end_user_id=secret)  # what the proxy resolves from `user`
    data = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "user": secret}
    await lim.async_pre_call_hook(auth, None, {**data, "litellm_call_id": "c1"}, "acompletion")
    with pytest.raises(HTTPException) as caught:
        await lim.async_pre_call_hook(auth, None, {**data, "litellm_call_id": "c2"}, "acompletion")
    exc = caught.value
    shown = f"{exc.detail} {exc.headers} {lim.get_usage_stats()}"
    assert secret not in shown


def test_an_enabled_value_the_autoload_accepts_does_not_break_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """The autoload (and the .pth line) strip HIVE_RATELIMIT_ENABLED before comparing, so "1\\r"
    (a .env file with CRLF line endings) or "1 " turns the autoload on. The same variable is also
    the rate_limiting.enabled override, which pydantic parses unstripped: the configuration is
    then 'invalid' and `import litellm` raises ConfigError in a program whose limits file is fine."""
    from hive_ratelimit_plugin import _autoload
    from hive_ratelimit_plugin.config import load_config

    monkeypatch.setenv("HIVE_RATELIMIT_ENABLED", "1\r")
    assert _autoload.is_enabled()
    assert load_config(None).enabled is True  # observed: ConfigError (not a valid boolean)


def test_an_empty_limits_file_does_not_silently_run_unlimited(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """docs/zero-code.md: with HIVE_RATELIMIT_ENABLED set, a configuration that does not load makes
    `import litellm` fail, because 'running it without [limits] would be a silent bypass'. An
    empty (e.g. truncated, or a not-yet-populated mount) HIVE_RATELIMIT_CONFIG file is accepted
    as 'no limits at all' without a word at WARNING or above: the agent runs unlimited."""
    from hive_ratelimit_plugin import _enable
    from hive_ratelimit_plugin.errors import ConfigError

    path = tmp_path / "limits.yaml"
    path.write_text("")
    monkeypatch.setenv("HIVE_RATELIMIT_CONFIG", str(path))
    try:
        with caplog.at_level("WARNING", logger="hive_ratelimit_plugin"):
            try:
                _enable.autoload_register()
            except ConfigError:
                return  # failing closed is fine
        assert caplog.records, "an empty limits file gave a limiter with no limits, silently"
    finally:
        disable()
