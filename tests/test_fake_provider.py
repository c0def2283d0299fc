"""The fake provider's enforcement: sliding log (default) and token bucket, alone and through LiteLLM."""

from __future__ import annotations

import litellm
import pytest

from hive_ratelimit_plugin._retry import response_headers
from hive_ratelimit_plugin.fake_provider import SlidingLog, TokenBucket, make_algorithm
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs


def test_token_bucket_allows_a_full_burst_then_the_refill_rate() -> None:
    b = TokenBucket()
    # 10 requests per 60 s: a full bucket of 10, refilling one every 6 s.
    for i in range(10):
        assert b.admit(0.0, 1, 10, None, 60.0).ok, i
    d = b.admit(0.0, 1, 10, None, 60.0)
    assert not d.ok
    assert d.retry_after == pytest.approx(6.0)
    assert d.remaining_requests == 0
    assert d.full_reset == pytest.approx(60.0)
    assert not b.admit(5.9, 1, 10, None, 60.0).ok
    assert b.admit(6.0, 1, 10, None, 60.0).ok
    assert not b.admit(6.0, 1, 10, None, 60.0).ok
    # After a quiet minute the bucket is full again (and never more than full).
    for i in range(10):
        assert b.admit(200.0, 1, 10, None, 60.0).ok, i
    assert not b.admit(200.0, 1, 10, None, 60.0).ok


def test_token_bucket_tokens_refill_in_proportion() -> None:
    b = TokenBucket()
    assert b.admit(0.0, 900, None, 1000, 60.0).ok
    d = b.admit(0.0, 300, None, 1000, 60.0)  # 100 left, needs 300: 200 more at 1000/60 per s = 12 s
    assert not d.ok
    assert d.retry_after == pytest.approx(12.0)
    assert d.remaining_tokens == 100
    assert b.admit(12.0, 300, None, 1000, 60.0).ok
    too_big = b.admit(1000.0, 5000, None, 1000, 60.0)  # larger than the whole bucket: never fits
    assert not too_big.ok and too_big.retry_after == pytest.approx(60.0)


def test_sliding_log_differs_from_the_bucket_after_the_burst() -> None:
    log, bucket = SlidingLog(), TokenBucket()
    for i in range(10):
        assert log.admit(0.0, 1, 10, None, 60.0).ok, i
        assert bucket.admit(0.0, 1, 10, None, 60.0).ok, i
    # 6 s later the bucket has refilled one request; the log waits for the whole window.
    assert bucket.admit(6.0, 1, 10, None, 60.0).ok
    d = log.admit(6.0, 1, 10, None, 60.0)
    assert not d.ok and d.retry_after == pytest.approx(54.0)
    assert log.admit(60.0, 1, 10, None, 60.0).ok


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="token_bucket"):
        make_algorithm("leaky")


def test_token_bucket_through_litellm(provider: FakeProvider) -> None:
    clock = FakeClock()
    provider.state.clock = clock
    provider.state.algorithm = "token_bucket"
    provider.state.requests_per_window = 3  # 3 per 60 s: one back every 20 s
    for _ in range(3):
        litellm.completion(**chat_kwargs(provider))
    with pytest.raises(litellm.RateLimitError) as info:
        litellm.completion(**chat_kwargs(provider))
    headers = response_headers(info.value)  # where this LiteLLM version put them
    assert headers is not None
    assert headers["retry-after"] == "20"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == "3"
    clock.advance(19.0)
    with pytest.raises(litellm.RateLimitError):
        litellm.completion(**chat_kwargs(provider))
    clock.advance(1.0)
    resp = litellm.completion(**chat_kwargs(provider))
    assert resp.usage.total_tokens > 0
    assert provider.state.count(200) == 4
    assert provider.state.count(429) == 2


def test_sliding_window_stays_the_default(provider: FakeProvider) -> None:
    clock = FakeClock()
    provider.state.clock = clock
    provider.state.requests_per_window = 2
    assert provider.state.algorithm == "sliding_window"
    litellm.completion(**chat_kwargs(provider))
    clock.advance(30.0)
    litellm.completion(**chat_kwargs(provider))
    clock.advance(20.0)  # a bucket would have refilled 1.67 requests by now; the log has not moved
    with pytest.raises(litellm.RateLimitError) as info:
        litellm.completion(**chat_kwargs(provider))
    headers = response_headers(info.value)
    assert headers is not None and headers["retry-after"] == "10"
    clock.advance(10.0)
    litellm.completion(**chat_kwargs(provider))
