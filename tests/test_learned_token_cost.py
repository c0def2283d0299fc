"""A token limit learned for one model makes only that model's calls estimated (a first version,
once any answer carried x-ratelimit-limit-tokens, as every OpenAI answer does, tokenized every
later call to any model: ~300 us for a 2 KB prompt on LiteLLM 1.110.2)."""
from __future__ import annotations

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter, plugin
from hive_ratelimit_plugin.testing import FakeProvider, Scripted

from .helpers import chat_kwargs


def test_a_model_without_a_learned_token_limit_is_not_tokenized(provider: FakeProvider,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    limiter = HiveLimiter({})
    litellm.callbacks.append(limiter)
    # model A's provider says it allows 1M tokens a minute (as OpenAI does on every answer)
    provider.state.push(Scripted(status=200, headers={"x-ratelimit-limit-tokens": "1000000",
                                                      "x-ratelimit-remaining-tokens": "999990"}))
    litellm.completion(**chat_kwargs(provider, model="openai/gpt-4o-mini"))
    counted = []
    real = plugin.count_messages
    monkeypatch.setattr(plugin, "count_messages", lambda *a, **k: counted.append(a[0]) or real(*a, **k))
    for _ in range(5):  # model B: no configured token limit, nothing learned for it
        litellm.completion(**chat_kwargs(provider, model="openai/gpt-4o"))
    assert "model:openai/gpt-4o" not in limiter.get_usage_stats()["providers"] or \
        "learned_tokens_per_minute" not in limiter.get_usage_stats()["providers"]["model:openai/gpt-4o"]
    assert counted == [], f"{len(counted)} calls tokenized for nothing"
