"""Reading providers' rate-limit headers and backing off: pure functions, exact numbers."""

from __future__ import annotations

import random

import pytest

from hive_ratelimit_plugin._retry import (
    backoff,
    is_rate_limit,
    parse_duration,
    read_signals,
    suggested_wait,
)

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2m", 120.0), ("0.5", 0.5),
     ("", None), ("soon", None), ("5x", None), ("1m1m", None)],
)
def test_openai_durations(text: str, seconds: float | None) -> None:
    """OpenAI's reset durations parse to seconds; anything else is None."""
    assert parse_duration(text) == seconds


def test_retry_after_seconds_date_and_ms() -> None:
    """retry-after in seconds or as an HTTP date, and retry-after-ms (which wins)."""
    assert read_signals({"retry-after": "7"}, NOW).retry_after == 7
    assert read_signals({"Retry-After": "Fri, 15 Jan 2027 08:00:30 GMT"}, NOW).retry_after == 30
    assert read_signals({"retry-after": "7", "retry-after-ms": "1500"}, NOW).retry_after == 1.5


def test_litellm_prefixed_headers() -> None:
    """LiteLLM's llm_provider- prefix is understood."""
    sig = read_signals({"llm_provider-x-ratelimit-limit-requests": "500",
                        "llm_provider-x-ratelimit-remaining-requests": "0",
                        "llm_provider-x-ratelimit-reset-requests": "6m0s"}, NOW)
    assert (sig.limit_requests, sig.remaining_requests, sig.reset_requests) == (500, 0, 360.0)
    assert suggested_wait(sig) == 360.0


def test_anthropic_headers() -> None:
    """Anthropic's limit/remaining/reset (RFC 3339) headers."""
    sig = read_signals({"anthropic-ratelimit-requests-limit": "50",
                        "anthropic-ratelimit-requests-remaining": "0",
                        "anthropic-ratelimit-requests-reset": "2027-01-15T08:00:12Z",
                        "anthropic-ratelimit-tokens-reset": "2027-01-15T08:00:03+00:00"}, NOW)
    assert sig.limit_requests == 50 and sig.reset_requests == 12 and sig.reset_tokens == 3
    assert suggested_wait(sig) == 12  # out of requests: wait for the requests reset


@pytest.mark.parametrize("prefix", ["", "llm_provider-"])
def test_anthropics_token_headers_are_not_read_as_a_tokens_per_minute_limit(prefix: str) -> None:
    """Anthropic's ``tokens`` headers give the most restrictive of its input and output limits
    (LiteLLM copies them to ``x-ratelimit-*-tokens`` as well): not a limit on input plus output
    tokens, so none is learned from them; its "0 remaining" still waits for the reset."""
    headers = {f"{prefix}anthropic-ratelimit-requests-limit": "50",
               f"{prefix}anthropic-ratelimit-tokens-limit": "8000",
               f"{prefix}anthropic-ratelimit-tokens-remaining": "0",
               f"{prefix}anthropic-ratelimit-tokens-reset": "2027-01-15T08:00:03Z",
               f"{prefix}anthropic-ratelimit-input-tokens-limit": "40000",
               f"{prefix}anthropic-ratelimit-output-tokens-limit": "8000"}
    if prefix:  # as LiteLLM hands them over
        headers.update({"x-ratelimit-limit-tokens": "8000", "x-ratelimit-remaining-tokens": "0"})
    sig = read_signals(headers, NOW)
    assert sig.limit_requests == 50 and sig.limit_tokens is None
    assert sig.limit_input_tokens == 40000  # (its input-token limit is one: learned as such)
    assert sig.limit_output_tokens == 8000  # (and so is its output-token limit)
    assert sig.remaining_tokens == 0 and sig.reset_tokens == 3
    assert [(what, wait) for what, _, wait in sig.exhausted()] == [("tokens", 3)]
    openai = read_signals({"x-ratelimit-limit-tokens": "8000", "x-ratelimit-remaining-tokens": "10"}, NOW)
    assert openai.limit_tokens == 8000  # (OpenAI's is a limit on input plus output)
    assert openai.limit_input_tokens is None and openai.limit_output_tokens is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "-5"}, None),  # negative: malformed, ignored
        ({"retry-after": "nan"}, None),
        ({"retry-after": "1e309"}, None),  # inf
        ({"retry-after": "999999"}, 600.0),  # huge: clamped to the cap
        ({"retry-after": "Mon, 01 Jan 2001 00:00:00 GMT"}, 0.0),  # a date in the past: now
        ({"retry-after": "tomorrow"}, None),
        ({"retry-after": "5, 10"}, 10.0),  # sent twice, joined by the HTTP client: the longer (was ignored)
        ({"retry-after": "5, -1"}, None),
        ({"retry-after": "5, soon"}, None),
        ({"retry-after-ms": "abc", "retry-after": "2"}, 2.0),
        ({"retry-after-ms": "-1", "retry-after": "5"}, 5.0),  # (a negative -ms once won: a retry storm)
        ({"retry-after-ms": "-1"}, None),
        ({"x-ratelimit-reset-requests": "-1s"}, None),
    ],
)
def test_malformed_values_never_raise(headers: dict[str, str], expected: float | None) -> None:
    """Malformed, negative or huge values are ignored or clamped, never raised."""
    assert read_signals(headers, NOW, cap=600).retry_after == expected


@pytest.mark.parametrize("raw", [None, 42, "text", [("a", "b")], {1: 2}, {"x-ratelimit-limit-requests": "-3"}])
def test_odd_header_containers(raw: object) -> None:
    """Odd header objects give empty signals instead of errors."""
    sig = read_signals(raw, NOW)
    assert sig.retry_after is None and sig.limit_requests is None


def test_backoff_is_full_jitter_capped() -> None:
    """Backoff is uniform in [0, min(cap, base * 2**attempt)]."""
    rng = random.Random(7)
    samples = [backoff(3, 1.0, 60.0, rng) for _ in range(2000)]
    assert min(samples) >= 0 and max(samples) <= 8.0
    assert 3.5 < sum(samples) / len(samples) < 4.5
    assert max(backoff(30, 1.0, 60.0, rng) for _ in range(200)) <= 60.0


def test_rate_limit_detection() -> None:
    """429s and Anthropic's 529 "overloaded" (which LiteLLM maps to a 500) are rate limits."""

    class FakeStatusError(Exception):
        def __init__(self, status: int, text: str = "") -> None:
            super().__init__(text)
            self.status_code = status

    assert is_rate_limit(FakeStatusError(429))
    assert is_rate_limit(FakeStatusError(529))
    assert is_rate_limit(FakeStatusError(500, '{"type":"overloaded_error","message":"Overloaded"}'))
    assert not is_rate_limit(FakeStatusError(500, "internal error"))
    assert not is_rate_limit(FakeStatusError(400))
