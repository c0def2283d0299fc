"""End to end through a real LiteLLM proxy in front of the fake provider.

The proxy (LiteLLM's own FastAPI app, started from configs/proxy.yaml with its api_base pointed
at the fake provider) runs under uvicorn on 127.0.0.1 in a thread of the test process, so that
the limiter it loads can run on a fake clock. Clients talk to it over real HTTP. Without a
database the proxy has no virtual keys, so a custom auth function (the proxy's own extension
point) maps bearer tokens to keys with users, teams and aliases, exactly as
``UserAPIKeyAuth`` objects reach the hooks in production.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import litellm
import pytest
import yaml

from hive_ratelimit_plugin import proxy as proxy_mod
from hive_ratelimit_plugin.fake_provider import Scripted
from hive_ratelimit_plugin.plugin import unregister
from hive_ratelimit_plugin.proxy import ProxyLimiter
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import Ticker, wait_until, wav

_LITELLM = tuple(int(part) for part in importlib.metadata.version("litellm").split(".")[:2])

ROOT = Path(__file__).resolve().parent.parent

AUTH_MODULE = '''
from litellm.proxy._types import UserAPIKeyAuth

# No team_id here: without a database, LiteLLM 1.83.4's custom-auth checks fail on any team
# (teams are covered by the hook tests in test_proxy_hooks.py).
KEYS = {
    "sk-alice": dict(user_id="alice", key_alias="alice-laptop"),
    "sk-alice-2": dict(user_id="alice", key_alias="alice-ci"),
    "sk-bob": dict(user_id="bob", key_alias="bob-key", metadata={"agent_id": "planner"}),
    "sk-carol": dict(user_id="carol", key_alias="carol-key"),
}


async def user_api_key_auth(request, api_key):
    if api_key not in KEYS:
        raise Exception("unknown key")
    return UserAPIKeyAuth(api_key=api_key, **KEYS[api_key])
'''

LIMITS: dict[str, Any] = {
    "queue": {"max_wait_seconds": 120},
    "users": {"alice": {"requests_per_minute": 2}, "bob": {"requests_per_minute": 5},
              "carol": {"max_cost_per_day": 0.0000001}},
}

IMAGE_MODEL = "openai/hive-proxy-image"  # priced per image in the fixture (LiteLLM 1.110's map has no dall-e-3)
IMAGE_MODEL_2 = "openai/hive-proxy-image-2"

_SAVED_LISTS = ("callbacks", "success_callback", "failure_callback", "input_callback", "service_callback",
                "_async_success_callback", "_async_failure_callback", "_async_input_callback")


class Proxy:
    def __init__(self, url: str, provider: FakeProvider) -> None:
        self.url = url
        self.provider = provider
        self.limiter: ProxyLimiter | None = None
        self.clock = FakeClock()

    def use(self, limits: dict[str, Any]) -> ProxyLimiter:
        """A fresh limiter on a fresh fake clock, in place of the previous one."""
        for cb in list(litellm.callbacks):
            if isinstance(cb, ProxyLimiter):  # the previous test's (the conftest restores it)
                unregister(cb)
        self.clock = FakeClock()
        self.limiter = ProxyLimiter(limits, clock=self.clock)
        self.clock.attach(self.limiter)
        proxy_mod._instance = self.limiter
        litellm.callbacks.append(self.limiter)
        return self.limiter

    def post(self, client: httpx.AsyncClient, key: str, **body: Any) -> Any:
        payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
        payload.update(body)
        return client.post(f"{self.url}/v1/chat/completions", json=payload,
                           headers={"authorization": f"Bearer {key}"})


def _allow_restart() -> None:
    """LiteLLM's proxy app (newer versions) answers 'shutting_down' forever once one server on it
    has stopped: let another module's proxy start in the same test process."""
    try:
        from litellm.proxy.shutdown.graceful_shutdown_manager import GracefulShutdownManager
    except ImportError:  # (1.83 has no such state)
        return
    GracefulShutdownManager.reset()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    _allow_restart()
    saved_lists = {n: list(getattr(litellm, n)) for n in _SAVED_LISTS if isinstance(getattr(litellm, n, None), list)}
    saved_env = {k: os.environ.get(k) for k in ("CONFIG_FILE_PATH", "LITELLM_MASTER_KEY")}
    litellm.model_cost[IMAGE_MODEL] = {"output_cost_per_image": 0.05, "litellm_provider": "openai",
                                       "mode": "image_generation"}
    litellm.model_cost[IMAGE_MODEL_2] = dict(litellm.model_cost[IMAGE_MODEL])
    with FakeProvider() as provider:
        # The shipped example, pointed at the fake provider, with a custom auth for the test keys.
        conf = yaml.safe_load((ROOT / "configs" / "proxy.yaml").read_text())
        for dep in conf["model_list"]:
            dep["litellm_params"]["api_base"] = provider.url
            dep["litellm_params"]["api_key"] = "sk-provider-SECRET"
        # A group whose deployments are different models: admitted per deployment instead.
        conf["model_list"] += [
            {"model_name": "mixed", "litellm_params": {"model": m, "api_base": provider.url,
                                                       "api_key": "sk-provider-SECRET"}}
            for m in ("openai/gpt-4o-mini", "openai/gpt-4o")]
        # Groups of one model on two endpoints (two accounts' keys): each endpoint keeps its signals.
        conf["model_list"] += [
            {"model_name": name, "litellm_params": {"model": m, "api_base": base, "api_key": f"sk-provider-SECRET-{i}"}}
            for name, m, base in (("gpt-2keys", "openai/gpt-4o-mini", provider.url),
                                  ("claude-2keys", "anthropic/claude-sonnet-4-5", provider.root))
            for i in (1, 2)]
        conf["model_list"].append({"model_name": "claude", "litellm_params": {  # (the /v1/messages route)
            "model": "anthropic/claude-sonnet-4-5", "api_base": provider.root, "api_key": "sk-provider-SECRET"}})
        conf["model_list"].append({"model_name": "img", "litellm_params": {
            "model": IMAGE_MODEL, "api_base": provider.url, "api_key": "sk-provider-SECRET"}})
        media_models = (("tts", "openai/tts-1", provider.url), ("whisper", "openai/whisper-1", provider.url),
                        ("rerank", "cohere/rerank-english-v3.0", provider.root),
                        ("mixed-img", IMAGE_MODEL, provider.url), ("mixed-img", IMAGE_MODEL_2, provider.url),
                        ("mixed-tts", "openai/tts-1", provider.url), ("mixed-tts", "openai/tts-1-hd", provider.url))
        conf["model_list"] += [
            {"model_name": name, "litellm_params": {"model": model, "api_base": base, "api_key": "sk-provider-SECRET"}}
            for name, model, base in media_models]
        conf["general_settings"] = {"custom_auth": "proxy_auth.user_api_key_auth"}
        conf["rate_limiting"] = LIMITS
        conf.setdefault("litellm_settings", {})["num_retries"] = 0
        d = tmp_path_factory.mktemp("proxy")
        (d / "config.yaml").write_text(yaml.safe_dump(conf))
        (d / "proxy_auth.py").write_text(AUTH_MODULE)
        (d / "hive_limiter.py").write_text((ROOT / "configs" / "hive_limiter.py").read_text())
        os.environ["CONFIG_FILE_PATH"] = str(d / "config.yaml")
        os.environ["LITELLM_MASTER_KEY"] = "sk-" + secrets.token_hex(16)
        px = Proxy("", provider)
        # The limiter the config names is built from the same file's rate_limiting block (what
        # proxy_handler_instance does on first use), here on a fake clock.
        source = proxy_mod._proxy_source()
        assert source is not None and proxy_mod._read_block(source).users["alice"].requests_per_minute == 2
        px.use(LIMITS)
        litellm.callbacks.remove(px.limiter)  # the proxy registers it from config.yaml

        import uvicorn
        from litellm.proxy.proxy_server import app

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, loop="asyncio", lifespan="on", log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        px.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{px.url}/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the proxy did not start"
            assert thread.is_alive(), "the proxy exited during start-up"
            time.sleep(0.05)
        assert px.limiter in litellm.callbacks, "the proxy did not load the limiter named in config.yaml"
        try:
            yield px
        finally:
            server.should_exit = True
            thread.join(20)
            sock.close()
            for name, value in saved_lists.items():
                getattr(litellm, name)[:] = value
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            proxy_mod._instance = None
            litellm.model_cost.pop(IMAGE_MODEL, None)
            litellm.model_cost.pop(IMAGE_MODEL_2, None)
            import litellm.proxy.proxy_server as proxy_server

            proxy_server.llm_router = None  # later tests must not find this proxy's models


@pytest.fixture
def px(proxy: Proxy) -> Iterator[Proxy]:
    proxy.provider.state.reset()
    proxy.use(LIMITS)
    yield proxy


async def test_over_limit_requests_queue_then_run_and_each_is_counted_once(px: Proxy) -> None:
    lim = px.limiter
    assert lim is not None
    async with httpx.AsyncClient(timeout=60) as client:
        # alice may send 2 requests a minute (per user, across both of her keys)
        tasks = [asyncio.create_task(px.post(client, key)) for key in ("sk-alice", "sk-alice-2", "sk-alice",
                                                                        "sk-alice-2")]
        await wait_until(lambda: px.provider.state.ok_count() == 2 and lim._engine.queue_length == 2)
        await asyncio.sleep(0.2)  # the queued ones stay queued while time stands still
        assert px.provider.state.count() == 2
        px.clock.advance(61)
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * 4
    assert px.provider.state.count() == 4
    stats = lim.get_usage_stats()
    # Admitted once per request, although the proxy runs both the pre-call hook and the Router's
    # deployment hook (and LiteLLM's acompletion guard) for each.
    assert stats["admitted_total"] == 4
    assert stats["queued_total"] == 2
    assert lim._engine._leases == {}  # every request settled
    user = stats["levels"]["user"]["user:alice"]
    assert user["requests_per_minute"]["used"] == 2  # the window after the clock moved
    assert user["in_flight"] == 0


async def test_refused_request_gets_429_with_retry_after_and_identity_comes_from_the_key(px: Proxy) -> None:
    lim = px.use({**LIMITS, "queue": {"max_wait_seconds": 0}})
    async with httpx.AsyncClient(timeout=60) as client:
        assert (await px.post(client, "sk-alice")).status_code == 200
        assert (await px.post(client, "sk-alice-2")).status_code == 200
        # Claiming to be someone else in metadata does not help.
        r = await px.post(client, "sk-alice", metadata={"user_id": "bob", "agent_id": "x"},
                          user="someone-else")
        assert r.status_code == 429
        assert 55 <= int(r.headers["retry-after"]) <= 61
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error"
        assert r.headers["x-hive-ratelimit-scope"] == "user:alice"
        assert "sk-provider-SECRET" not in r.text and "sk-alice" not in r.text
        # bob has his own limit
        assert (await px.post(client, "sk-bob")).status_code == 200
    assert px.provider.state.count() == 3  # the refused request was never sent
    stats = lim.get_usage_stats()
    assert set(stats["levels"]["user"]) == {"user:alice", "user:bob"}
    assert stats["levels"]["user"]["user:alice"]["requests_per_minute"]["used"] == 2
    assert stats["admitted_total"] == 3


async def test_a_spent_budget_is_a_budget_error_not_a_rate_limit(px: Proxy) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        r = await px.post(client, "sk-carol")
    assert r.status_code != 429 and 400 <= r.status_code < 500
    assert "retry-after" not in r.headers
    err = r.json()["error"]
    assert err["type"] == "budget_exceeded"
    for phrase in ("rate limit", "429", "too many requests", "capacity"):
        assert phrase not in err["message"].lower()
    assert r.headers["x-hive-ratelimit-scope"] == "user:carol"
    assert px.provider.state.count() == 0


async def test_streaming_through_the_proxy_is_counted_once_and_settled(px: Proxy) -> None:
    lim = px.limiter
    assert lim is not None
    async with httpx.AsyncClient(timeout=60) as client:
        r = await px.post(client, "sk-bob", stream=True, stream_options={"include_usage": True})
        assert r.status_code == 200
        assert "data: [DONE]" in r.text
    await wait_until(lambda: not lim._engine._leases)
    stats = lim.get_usage_stats()
    assert stats["admitted_total"] == 1
    assert px.provider.state.count() == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_the_messages_route_learns_anthropics_limits_from_its_headers(px: Proxy, stream: bool) -> None:
    """``/v1/messages`` (Claude Code's route): LiteLLM answers it with a dict that carries no
    headers; the limits in Anthropic's ``anthropic-ratelimit-*`` headers are learned all the same."""
    limiter = px.limiter
    assert limiter is not None
    px.provider.state.push(Scripted(status=200, headers={
        "anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-input-tokens-limit": "3000", "anthropic-ratelimit-input-tokens-remaining": "2990"}))
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{px.url}/v1/messages", headers={"authorization": "Bearer sk-bob"}, json={
            "model": "claude", "max_tokens": 10, "stream": stream,
            "messages": [{"role": "user", "content": "hello there"}]})
        assert r.status_code == 200, r.text
    model = "model:anthropic/claude-sonnet-4-5"

    def learned() -> dict[str, Any]:
        return dict(limiter.get_usage_stats()["providers"].get(model, {}))

    await wait_until(lambda: "learned_input_tokens_per_minute" in learned())
    assert learned()["learned_input_tokens_per_minute"] == 3000
    assert learned()["learned_requests_per_minute"] == 50
    assert px.provider.state.count() == 1


async def test_embeddings_share_the_limits(px: Proxy) -> None:
    """A client cannot get around the limits through another route."""
    lim = px.use({**LIMITS, "queue": {"max_wait_seconds": 0}, "users": {"bob": {"requests_per_minute": 2}}})
    headers = {"authorization": "Bearer sk-bob"}
    body = {"model": "text-embedding-3-small", "input": ["a", "b"]}
    async with httpx.AsyncClient(timeout=60) as client:
        assert (await client.post(f"{px.url}/v1/embeddings", headers=headers, json=body)).status_code == 200
        assert (await px.post(client, "sk-bob")).status_code == 200
        refused = await client.post(f"{px.url}/v1/embeddings", headers=headers, json=body)
    assert refused.status_code == 429
    assert "retry-after" in refused.headers
    await wait_until(lambda: not lim._engine._leases)
    assert lim.get_usage_stats()["admitted_total"] == 2
    assert px.provider.state.count() == 2


async def test_image_requests_are_limited_per_user_and_priced_per_image(px: Proxy) -> None:
    lim = px.use({**LIMITS, "queue": {"max_wait_seconds": 0}, "users": {"bob": {"requests_per_minute": 2}},
                  "budget": {"max_daily_spend": 10}})
    headers = {"authorization": "Bearer sk-bob"}
    body = {"model": "img", "prompt": "a cat", "n": 2}
    async with httpx.AsyncClient(timeout=60) as client:
        ok = [await client.post(f"{px.url}/v1/images/generations", headers=headers, json=body) for _ in range(2)]
        refused = await client.post(f"{px.url}/v1/images/generations", headers=headers, json=body)
    assert [r.status_code for r in ok] == [200, 200], ok[0].text
    assert refused.status_code == 429, refused.text
    # (LiteLLM's image route answers with its own headers only: the wait is in the message)
    assert "retry in 61" in refused.json()["error"]["message"]
    await wait_until(lambda: not lim._engine._leases)
    assert px.provider.state.count() == 2
    stats = lim.get_usage_stats()
    assert stats["admitted_total"] == 2
    assert stats["levels"]["user"]["user:bob"]["requests_per_minute"]["used"] == 2
    assert stats["cost_today"] == pytest.approx(4 * 0.05)


@pytest.mark.parametrize(("route", "group"), [("/v1/chat/completions", "gpt-2keys"), ("/v1/completions", "gpt-2keys"),
                                              ("/v1/messages", "claude-2keys"), ("/v1/completions", "mixed"),
                                              ("/v1/embeddings", "gpt-2keys")])
async def test_a_group_of_one_model_on_two_endpoints_refuses_with_429(px: Proxy, route: str, group: str) -> None:
    """A group of one model on two endpoints (or of two models): a refusal is a 429 on every route.
    (/v1/messages and /v1/completions ignore the failure hook's answer: a refusal raised in the
    deployment hook was a 500 there, so those routes admit such a group before the Router picks.)"""
    px.use({**LIMITS, "queue": {"max_wait_seconds": 0}})
    body: dict[str, Any] = {"model": group, "max_tokens": 5}
    if route == "/v1/completions":
        body["prompt"] = "hello there"
    elif route == "/v1/embeddings":
        del body["max_tokens"]
        body["input"] = "hello there"
    else:
        body["messages"] = [{"role": "user", "content": "hello there"}]
    async with httpx.AsyncClient(timeout=60) as client:
        answers = [await client.post(f"{px.url}{route}", json=body, headers={"authorization": "Bearer sk-alice"})
                   for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429], [a.text[:300] for a in answers]
    assert "SECRET" not in answers[-1].text
    assert "retry in 61" in answers[-1].text
    if route in ("/v1/chat/completions", "/v1/embeddings") or _LITELLM >= (1, 110):
        # (/v1/completions and /v1/messages answer the hook's error themselves: LiteLLM 1.83 drops
        # its headers whatever it is; 1.110 keeps a ProxyException's)
        assert 55 <= int(answers[-1].headers["retry-after"]) <= 61
    assert px.provider.state.count() == 2


async def test_a_group_admitted_calls_429_cools_the_model_not_another_endpoint(px: Proxy) -> None:
    """A /v1/messages request to a group of one model on two endpoints is admitted for the group
    (the endpoint the Router picks is not known then). Once the model has split, its 429 cools the
    model, as before the split: it was sent to cool the first endpoint seen, whichever sent it."""
    lim = px.use({"users": {"bob": {"requests_per_minute": 100}}})  # (bob's 5 a minute held the 6th)
    model = "model:anthropic/claude-sonnet-4-5"
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(20):  # chat requests to the group, admitted per deployment: the model splits
            r = await client.post(f"{px.url}/v1/chat/completions", headers={"authorization": "Bearer sk-bob"},
                                  json={"model": "claude-2keys", "max_tokens": 5,
                                        "messages": [{"role": "user", "content": "hello there"}]})
            assert r.status_code == 200, r.text
            if len([k for k in lim.get_usage_stats()["providers"] if k.startswith("key:anthropic/")]) == 2:
                break
        endpoints = [k for k in lim.get_usage_stats()["providers"] if k.startswith("key:anthropic/")]
        assert len(endpoints) == 2
        px.provider.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        task = asyncio.ensure_future(client.post(
            f"{px.url}/v1/messages", headers={"authorization": "Bearer sk-bob"},
            json={"model": "claude-2keys", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        await wait_until(lambda: px.provider.state.count(429) == 1 and lim._engine.queue_length == 1, timeout=30)
        signals = lim.get_usage_stats()["providers"]
        assert signals[model].get("cooldown_seconds", 0) > 25
        assert not any("cooldown_seconds" in signals[k] for k in endpoints)
        with Ticker(px.clock, step=0.5, when=lambda: lim._engine.queue_length > 0):
            assert (await asyncio.wait_for(task, 60)).status_code == 200


async def test_the_proxys_router_sends_requests_to_the_endpoint_no_cooldown_holds(px: Proxy) -> None:
    """A group of one model under two keys: one key's request is answered 429 (retry after 30 s).
    The Router is told (async_filter_deployments) and sends the next requests to the other key,
    answered at once, while the refused request waits out its 30 s for its own key."""
    # (up to 31 identical requests: the runaway detector, on by default, would stop the 21st)
    lim = px.use({"users": {"bob": {"requests_per_minute": 1000}}, "runaway": {"enabled": False}})
    headers = {"authorization": "Bearer sk-bob"}
    body = {"model": "gpt-2keys", "max_tokens": 5, "messages": [{"role": "user", "content": "hello there"}]}
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(20):  # until the Router has used both keys: the model is split
            assert (await client.post(f"{px.url}/v1/chat/completions", headers=headers, json=body)).status_code == 200
            if len({r.authorization for r in px.provider.state.log}) == 2:
                break
        assert len({r.authorization for r in px.provider.state.log}) == 2
        px.provider.state.push(Scripted(status=429, headers={"retry-after": "30"}))
        start = px.clock()
        refused = asyncio.ensure_future(client.post(f"{px.url}/v1/chat/completions", headers=headers, json=body))
        await wait_until(lambda: px.provider.state.count(429) == 1 and lim._engine.queue_length == 1, timeout=30)
        cooled = next(r.authorization for r in px.provider.state.log if r.status == 429)
        seen = len(px.provider.state.log)
        for _ in range(10):  # (no fake time passes: a request sent to the cooled key would wait 30 s)
            r = await asyncio.wait_for(client.post(f"{px.url}/v1/chat/completions", headers=headers, json=body), 20)
            assert r.status_code == 200, r.text
        assert px.clock() == start
        assert [r.authorization for r in px.provider.state.log[seen:]] == [
            next(a for a in {r.authorization for r in px.provider.state.log} if a != cooled)] * 10
        with Ticker(px.clock, step=0.5, when=lambda: lim._engine.queue_length > 0):
            assert (await asyncio.wait_for(refused, 60)).status_code == 200
        assert px.provider.state.log[-1].authorization == cooled and px.clock() - start >= 30.0


async def test_mixed_model_groups_are_limited_per_deployment(px: Proxy) -> None:
    lim = px.use({**LIMITS, "queue": {"max_wait_seconds": 0}})
    async with httpx.AsyncClient(timeout=60) as client:
        ok = [await px.post(client, key, model="mixed") for key in ("sk-alice", "sk-alice-2")]
        refused = await px.post(client, "sk-alice", model="mixed", metadata={"user_id": "bob"})
        for _ in range(5):
            assert (await px.post(client, "sk-alice", model="mixed")).status_code == 429
        other = await px.post(client, "sk-bob", model="mixed")
    assert [r.status_code for r in ok] == [200, 200]
    assert refused.status_code == 429, refused.text
    assert 55 <= int(refused.headers["retry-after"]) <= 61
    assert other.status_code == 200  # six refusals did not put the group's deployments in cooldown
    await wait_until(lambda: not lim._engine._leases)
    assert px.provider.state.count() == 3
    stats = lim.get_usage_stats()
    assert stats["admitted_total"] == 3
    assert stats["levels"]["user"]["user:alice"]["requests_per_minute"]["used"] == 2


# name -> (client route, provider path, request (json or multipart), LiteLLM's price of one)
MEDIA: dict[str, tuple[str, str, dict[str, Any], float]] = {
    "speech": ("/v1/audio/speech", "/v1/audio/speech",
               {"json": {"model": "tts", "input": "hello there", "voice": "alloy"}}, 0.00015),
    "transcription": ("/v1/audio/transcriptions", "/v1/audio/transcriptions",
                      {"data": {"model": "whisper"}, "files": {"file": ("a.wav", wav(2.0), "audio/wav")}},
                      3.0 * 0.0001),  # (the fake's transcript says 3 s)
    "image_edit": ("/v1/images/edits", "/v1/images/edits",
                   {"data": {"model": "img", "prompt": "a hat"},
                    "files": {"image": ("a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "image/png")}}, 0.05),
    "rerank": ("/v1/rerank", "/v2/rerank", {"json": {"model": "rerank", "query": "q", "documents": ["a", "b"]}},
               0.002),
    "rerank_unversioned": ("/rerank", "/v2/rerank",
                           {"json": {"model": "rerank", "query": "q", "documents": ["a", "b"]}}, 0.002),
}


@pytest.mark.parametrize("name", list(MEDIA))
async def test_media_requests_are_limited_per_user_counted_once_and_settled_at_litellms_cost(
        px: Proxy, name: str) -> None:
    route, path, request, price = MEDIA[name]
    lim = px.use({**LIMITS, "queue": {"max_wait_seconds": 0}, "users": {"alice": {"requests_per_minute": 2}},
                  "budget": {"max_daily_spend": 10}})
    async with httpx.AsyncClient(timeout=60) as client:
        # both of alice's keys count against her
        ok = [await client.post(f"{px.url}{route}", headers={"authorization": f"Bearer {key}"}, **request)
              for key in ("sk-alice", "sk-alice-2")]
        refused = await client.post(f"{px.url}{route}", headers={"authorization": "Bearer sk-alice"}, **request)
    assert [r.status_code for r in ok] == [200, 200], ok[0].text
    assert refused.status_code == 429, refused.text
    assert "retry in 61" in refused.text, refused.text  # (the speech route answers {"detail": ...})
    await wait_until(lambda: not lim._engine._leases)
    assert [r.path for r in px.provider.state.log] == [path, path]  # the refused one was never sent
    stats = lim.get_usage_stats()
    assert stats["admitted_total"] == 2
    assert set(stats["levels"]["user"]) == {"user:alice"}
    assert stats["levels"]["user"]["user:alice"]["requests_per_minute"]["used"] == 2
    assert stats["levels"]["user"]["user:alice"]["in_flight"] == 0
    await wait_until(lambda: lim.get_usage_stats()["cost_today"] >= 2 * price * 0.999)
    await asyncio.sleep(0.1)  # (a second settlement would land here)
    stats = lim.get_usage_stats()
    header_costs = [r.headers.get("x-litellm-response-cost") for r in ok]
    litellm_costs = [float(c) for c in header_costs if c not in (None, "", "None")]
    if len(litellm_costs) == 2:
        assert sum(litellm_costs) == pytest.approx(2 * price)
    assert stats["cost_today"] == pytest.approx(2 * price)


@pytest.mark.parametrize("name", list(MEDIA))
async def test_a_spent_budget_refuses_media_requests_with_the_budget_error(px: Proxy, name: str) -> None:
    route, _, request, _ = MEDIA[name]
    lim = px.limiter
    assert lim is not None
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f"{px.url}{route}", headers={"authorization": "Bearer sk-carol"}, **request)
    assert r.status_code != 429 and 400 <= r.status_code < 500, r.text
    if name == "speech":  # (LiteLLM's speech route re-raises a hook's HTTPException as {"detail": ...})
        assert "budget of user carol" in r.json()["detail"]
    else:
        assert r.json()["error"]["type"] == "budget_exceeded"
    assert px.provider.state.count() == 0
    assert lim._engine._leases == {}
    assert lim.get_usage_stats()["admitted_total"] == 0


@pytest.mark.parametrize("status", [500, 429])
@pytest.mark.parametrize("name", list(MEDIA))
async def test_a_failed_media_request_is_released_and_costs_nothing(px: Proxy, name: str, status: int) -> None:
    route, _, request, price = MEDIA[name]
    lim = px.use({**LIMITS, "queue": {"max_wait_seconds": 0}, "budget": {"max_daily_spend": 10}})
    px.provider.state.script.append(Scripted(status=status, headers={"retry-after": "1"}))
    async with httpx.AsyncClient(timeout=60) as client:
        # (on LiteLLM 1.83 a provider's error escapes the speech route: uvicorn answers a plain
        # 500 and closes the connection, which must not be reused for the next request)
        failed = await client.post(f"{px.url}{route}", headers={"authorization": "Bearer sk-bob",
                                                                  "connection": "close"}, **request)
        assert failed.status_code >= 400, failed.text
        await wait_until(lambda: not lim._engine._leases)
        px.clock.advance(2)  # (past the provider's retry-after, which the limiter honours)
        ok = await client.post(f"{px.url}{route}", headers={"authorization": "Bearer sk-bob"}, **request)
    assert ok.status_code == 200, ok.text
    await wait_until(lambda: not lim._engine._leases)
    assert [r.status for r in px.provider.state.log] == [status, 200]
    stats = lim.get_usage_stats()
    assert stats["admitted_total"] == 2
    assert stats["levels"]["user"]["user:bob"]["in_flight"] == 0
    await wait_until(lambda: lim.get_usage_stats()["cost_today"] >= price * 0.999)
    await asyncio.sleep(0.1)
    assert lim.get_usage_stats()["cost_today"] == pytest.approx(price)


@pytest.mark.parametrize("name", list(MEDIA))
async def test_a_queued_media_request_runs_when_the_window_moves_and_is_counted_once(px: Proxy, name: str) -> None:
    route, _, request, price = MEDIA[name]
    lim = px.use({**LIMITS, "users": {"alice": {"requests_per_minute": 1}}, "budget": {"max_daily_spend": 10}})
    async with httpx.AsyncClient(timeout=60) as client:
        tasks = [asyncio.create_task(client.post(f"{px.url}{route}", headers={"authorization": f"Bearer {key}"},
                                                 **request)) for key in ("sk-alice", "sk-alice-2")]
        await wait_until(lambda: px.provider.state.ok_count() == 1 and lim._engine.queue_length == 1)
        px.clock.advance(61)
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200, 200], responses[0].text
    await wait_until(lambda: not lim._engine._leases)
    assert px.provider.state.count() == 2
    stats = lim.get_usage_stats()
    assert stats["admitted_total"] == 2 and stats["queued_total"] == 1
    await wait_until(lambda: lim.get_usage_stats()["cost_today"] >= 2 * price * 0.999)
    await asyncio.sleep(0.1)
    assert lim.get_usage_stats()["cost_today"] == pytest.approx(2 * price)



@pytest.mark.parametrize("route,body", [
    ("/v1/images/generations", {"model": "mixed-img", "prompt": "a cat"}),
    ("/v1/audio/speech", {"model": "mixed-tts", "input": "hello there", "voice": "alloy"}),
])
async def test_media_requests_to_mixed_model_groups_are_refused_with_429(px: Proxy, route: str,
                                                                        body: dict[str, Any]) -> None:
    lim = px.use({**LIMITS, "queue": {"max_wait_seconds": 0}})
    async with httpx.AsyncClient(timeout=60) as client:
        ok = [await client.post(f"{px.url}{route}", headers={"authorization": f"Bearer {key}"}, json=body)
              for key in ("sk-alice", "sk-alice-2")]
        refused = await client.post(f"{px.url}{route}", headers={"authorization": "Bearer sk-alice",
                                                                 "connection": "close"}, json=body)
    assert [r.status_code for r in ok] == [200, 200], ok[0].text
    assert refused.status_code == 429, refused.text
    await wait_until(lambda: not lim._engine._leases)
    assert px.provider.state.count() == 2
    stats = lim.get_usage_stats()
    # (admitted_total also counts a reservation moved to the deployment the Router picked)
    assert stats["levels"]["user"]["user:alice"]["in_flight"] == 0
    assert stats["levels"]["user"]["user:alice"]["requests_per_minute"]["used"] == 2
