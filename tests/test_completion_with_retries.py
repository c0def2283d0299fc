"""``litellm.completion_with_retries``: LiteLLM's own retry loop around ``completion`` (tenacity,
no wait between tries). Each try it makes goes through the limiter's guard: admitted, counted as
the request it sends, and its slot given back whether it fails or answers; a provider 429 is
retried by the limiter itself first (honouring ``retry-after``), inside the try."""

from __future__ import annotations

import litellm
import pytest
import tenacity  # noqa: F401  (litellm.completion_with_retries needs it: in the dev extra, never skipped)

from hive_ratelimit_plugin import RateLimitQueueTimeout
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import chat_kwargs, global_usage, make_limiter


def limiter_for(clock: FakeClock, rpm: int = 100):  # type: ignore[no-untyped-def]
    return make_limiter(clock, {"global": {"requests_per_minute": rpm, "concurrent_requests": 1},
                                "queue": {"max_wait_seconds": 0}})


def counted(limiter) -> float:  # type: ignore[no-untyped-def]
    return global_usage(limiter)["requests_per_minute"]["used"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("statuses", "answered"), [([500, 500], True), ([500, 500, 500], False), ([429], True)],
                         ids=["two-5xx-then-ok", "three-5xx", "429-then-ok"])
def test_every_try_is_admitted_counted_and_freed(provider: FakeProvider, clock: FakeClock,
                                                 statuses: list[int], answered: bool) -> None:
    limiter = limiter_for(clock)
    for status in statuses:
        provider.state.push(Scripted(status=status, headers={"retry-after": "0"} if status == 429 else {}))
    if answered:
        resp = litellm.completion_with_retries(**chat_kwargs(provider, max_tokens=3), num_retries=3)
        assert resp.choices[0].message.content
    else:
        with pytest.raises(litellm.InternalServerError):
            litellm.completion_with_retries(**chat_kwargs(provider, max_tokens=3), num_retries=3)
    sent = [r.status for r in provider.state.log]
    assert sent == statuses + ([200] if answered else [])
    assert counted(limiter) == len(sent)  # one request counted per request sent, none unseen
    assert global_usage(limiter)["in_flight"] == 0  # (one slot: each try gave it back)


def test_a_refused_try_sends_nothing(provider: FakeProvider, clock: FakeClock) -> None:
    """The limit used up: the try is refused before anything is sent, and LiteLLM's loop does not
    turn the refusal into more requests."""
    limiter = limiter_for(clock, rpm=1)
    litellm.completion(**chat_kwargs(provider, max_tokens=3))
    with pytest.raises(RateLimitQueueTimeout):
        litellm.completion_with_retries(**chat_kwargs(provider, max_tokens=3), num_retries=3)
    assert [r.status for r in provider.state.log] == [200]
    assert counted(limiter) == 1
