"""A token limit an earlier release learned into Redis from Anthropic's token header (learned_tpm in
the model's :s: hash, TTL a day, refreshed by every settlement) is forgotten at the next answer."""
from __future__ import annotations

import litellm
import redis

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.testing import FakeProvider, Scripted

from .conftest import REDIS_URL

HEADERS = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
           "anthropic-ratelimit-tokens-limit": "8000", "anthropic-ratelimit-tokens-remaining": "7990",
           "anthropic-ratelimit-input-tokens-limit": "40000", "anthropic-ratelimit-input-tokens-remaining": "39990",
           "anthropic-ratelimit-output-tokens-limit": "8000", "anthropic-ratelimit-output-tokens-remaining": "7990"}


def test_token_limit_learned_by_the_previous_release_from_anthropic_is_dropped(
        provider: FakeProvider, redis_prefix: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    # what 54f508a (the previous release) leaves after one Anthropic answer (checked by running it)
    key = "{" + redis_prefix + "}:s:model:anthropic/claude-sonnet-4-5"
    r.hset(key, mapping={"learned_rpm": 50, "learned_tpm": 8000})
    r.expire(key, 86400)
    limiter = HiveLimiter({"backend": REDIS_URL, "redis": {"key_prefix": redis_prefix},
                           "queue": {"max_wait_seconds": 0}})
    litellm.callbacks.append(limiter)
    big = "word " * 12_000
    for i in range(3):
        provider.state.push(Scripted(status=200, headers=HEADERS))
        litellm.completion(model="anthropic/claude-sonnet-4-5", api_base=provider.root, api_key="sk-ant-test",
                           max_tokens=100, messages=[{"role": "user", "content": big + str(i)}])
    assert provider.state.count() == 3
    learned = limiter.get_usage_stats()["providers"]["model:anthropic/claude-sonnet-4-5"]
    assert "learned_tokens_per_minute" not in learned
