"""The limiter with the OpenAI HTTP endpoint mocked by respx instead of the fake provider.

respx patches httpx's transports, so it sees what LiteLLM sends through the openai SDK's httpx
client:

* sync ``litellm.completion`` (openai SDK, ``httpx.Client``): intercepted as is.
* async ``litellm.acompletion``: recent LiteLLM gives the openai SDK an aiohttp-based httpx
  transport, which respx cannot see (the request would go to the network). With
  ``litellm.disable_aiohttp_transport = True`` LiteLLM uses httpx's own transport, and respx
  intercepts it. The flag is restored after each test.

Each test uses its own ``api_base`` host so that an httpx client LiteLLM cached in an earlier
test (and built with another transport) is never reused here.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import litellm
import pytest
import respx

from hive_ratelimit_plugin import RateLimitQueueTimeout
from hive_ratelimit_plugin.testing import FakeClock

from .helpers import make_limiter

SECRET = "sk-test-SECRET-0123456789"


def _completion_body(prompt_tokens: int = 7, completion_tokens: int = 3) -> dict[str, Any]:
    return {
        "id": "chatcmpl-respx", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


@pytest.fixture
def api_base() -> str:
    return f"https://respx-{uuid.uuid4().hex[:10]}.example.test/v1"


@pytest.fixture
def no_aiohttp() -> Iterator[None]:
    saved = getattr(litellm, "disable_aiohttp_transport", False)
    litellm.disable_aiohttp_transport = True
    try:
        yield
    finally:
        litellm.disable_aiohttp_transport = saved


def kwargs(api_base: str, **extra: Any) -> dict[str, Any]:
    return {"model": "openai/gpt-4o-mini", "api_base": api_base, "api_key": SECRET,
            "messages": [{"role": "user", "content": "hi"}], "max_retries": 0, **extra}


def test_sync_completion_second_call_held_route_called_once(clock: FakeClock, api_base: str) -> None:
    """Sync completion via respx: the call over the limit is held, the mocked route is hit exactly once."""
    make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 0}})
    with respx.mock(assert_all_mocked=True, assert_all_called=True) as router:
        route = router.post(f"{api_base}/chat/completions").mock(
            return_value=httpx.Response(200, json=_completion_body()))
        resp = litellm.completion(**kwargs(api_base))
        assert resp.choices[0].message.content == "ok"
        with pytest.raises(RateLimitQueueTimeout):
            litellm.completion(**kwargs(api_base))
        assert route.call_count == 1
        assert router.calls.call_count == 1  # nothing else went out either
        clock.advance(61)
        litellm.completion(**kwargs(api_base))
        assert route.call_count == 2


def test_sync_settlement_uses_mocked_usage(clock: FakeClock, api_base: str) -> None:
    """The reported usage in the mocked response replaces the token estimate."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 10_000}})
    with respx.mock(assert_all_called=True) as router:
        router.post(f"{api_base}/chat/completions").mock(
            return_value=httpx.Response(200, json=_completion_body(prompt_tokens=11, completion_tokens=13)))
        litellm.completion(**kwargs(api_base, max_tokens=2000))
    entry = limiter.get_usage_stats()["levels"]["global"]["global"]
    assert entry["tokens_per_minute"]["used"] == 24
    assert entry["in_flight"] == 0


def test_sync_mocked_server_error_releases_slot(clock: FakeClock, api_base: str) -> None:
    """A mocked 500 surfaces as LiteLLM's InternalServerError and frees the concurrency slot."""
    limiter = make_limiter(clock, {"global": {"concurrent_requests": 1}, "queue": {"max_wait_seconds": 0}})
    with respx.mock(assert_all_called=True) as router:
        route = router.post(f"{api_base}/chat/completions").mock(side_effect=[
            httpx.Response(500, json={"error": {"message": "boom", "type": "server_error", "code": None}}),
            httpx.Response(200, json=_completion_body()),
        ])
        with pytest.raises(litellm.InternalServerError):
            litellm.completion(**kwargs(api_base))
        assert limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 0
        litellm.completion(**kwargs(api_base))  # would be held if the slot had leaked
        assert route.call_count == 2


@pytest.mark.usefixtures("no_aiohttp")
async def test_async_completion_second_call_held_route_called_once(clock: FakeClock, api_base: str) -> None:
    """Async acompletion via respx (aiohttp transport off): over the limit, held; route hit once."""
    make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 30}})
    with respx.mock(assert_all_mocked=True, assert_all_called=True) as router:
        route = router.post(f"{api_base}/chat/completions").mock(
            return_value=httpx.Response(200, json=_completion_body()))
        await litellm.acompletion(**kwargs(api_base))
        second = asyncio.create_task(litellm.acompletion(**kwargs(api_base)))
        for _ in range(100):
            await asyncio.sleep(0)
        assert not second.done()
        assert route.call_count == 1
        clock.advance(61)
        await asyncio.wait_for(second, 10)
        assert route.call_count == 2
