"""A caller's litellm_call_id on a retried call: each attempt LiteLLM sends, and so its logging
(what the caller's other callbacks, and the proxy's spend logs, key on), carries it. (Read from
the event LiteLLM gives before each HTTP attempt, in line: its success event comes from a logging
worker whose timing across the tests' event loops is its own.)"""
from __future__ import annotations

from typing import Any

import litellm
from litellm.integrations.custom_logger import CustomLogger

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.testing import FakeProvider, Scripted

from .helpers import chat_kwargs


class Ids(CustomLogger):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []
        self.ok: list[str] = []

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
        self.sent.append(kwargs.get("litellm_call_id"))

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self.ok.append(kwargs.get("litellm_call_id"))


async def test_router_retry_keeps_the_callers_call_id(provider: FakeProvider) -> None:
    limiter = HiveLimiter({})
    ids = Ids()
    litellm.callbacks.extend([limiter, ids])
    router = litellm.Router(model_list=[{"model_name": "m", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": provider.url, "api_key": "sk-test"}}],
        num_retries=2, retry_after=0)
    provider.state.push(Scripted(status=500))
    await router.acompletion(model="m", messages=[{"role": "user", "content": "hi"}], litellm_call_id="trace-1")
    assert provider.state.count() == 2
    assert ids.sent == ["trace-1", "trace-1"], ids.sent


async def test_sdk_retry_keeps_the_callers_call_id(provider: FakeProvider) -> None:
    limiter = HiveLimiter({})
    ids = Ids()
    litellm.callbacks.extend([limiter, ids])
    provider.state.push(Scripted(status=500), Scripted(status=500))
    await litellm.acompletion(**chat_kwargs(provider, num_retries=2, litellm_call_id="trace-2"))
    assert provider.state.count() == 3
    assert ids.sent == ["trace-2"] * 3, ids.sent
