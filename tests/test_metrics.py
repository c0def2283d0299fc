"""Prometheus metrics: scraped over HTTP after real LiteLLM calls against the fake provider."""

from __future__ import annotations

import asyncio
import importlib
import sys
import urllib.request

import litellm
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hive_ratelimit_plugin import RequestTooLargeError
from hive_ratelimit_plugin.metrics import instrument, serve
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import Ticker, chat_kwargs, make_limiter


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_metrics_served_over_http_after_real_calls(provider: FakeProvider, clock: FakeClock) -> None:
    limiter = make_limiter(clock, {
        "global": {"requests_per_minute": 60, "requests_per_second": 1},
        "providers": {"openai": {"gpt-4o-mini": {"tokens_per_minute": 5000}}},
        "budget": {"max_daily_spend": 100.0},
        "queue": {"max_wait_seconds": 30},
    })
    metrics = serve(limiter, 0)
    try:
        port = metrics.port
        provider.state.push(Scripted(status=429, headers={"retry-after": "1"}))
        kwargs = chat_kwargs(provider)
        kwargs.pop("max_retries")  # leave retries to the limiter
        with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
            await asyncio.gather(*(litellm.acompletion(**kwargs) for _ in range(3)))
        with pytest.raises(RequestTooLargeError):
            await litellm.acompletion(**chat_kwargs(provider, max_tokens=10_000))
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()
    m = _samples(body)
    stats = limiter.get_usage_stats()
    admitted = _get(m, "hive_ratelimit_calls_admitted_total")
    assert admitted == stats["admitted_total"] == 4  # 3 calls + the retry of the one refused with 429
    assert _get(m, "hive_ratelimit_calls_queued_total") == stats["queued_total"] >= 2  # one per second
    assert _get(m, "hive_ratelimit_queue_depth") == 0
    assert _get(m, "hive_ratelimit_calls_rejected_total", level="model", reason="request_too_large") == 1
    assert _get(m, "hive_ratelimit_provider_429_total", provider="openai", model="gpt-4o-mini") == 1
    assert _get(m, "hive_ratelimit_provider_429_retried_total") == 1
    # The 3 answered calls (the refused attempt settles when LiteLLM reports its failure).
    assert _get(m, "hive_ratelimit_calls_settled_total", provider="openai", model="gpt-4o-mini") >= 3
    tin = _get(m, "hive_ratelimit_tokens_total", provider="openai", model="gpt-4o-mini", direction="input")
    tout = _get(m, "hive_ratelimit_tokens_total", provider="openai", model="gpt-4o-mini", direction="output")
    assert tout == 3 * provider.state.completion_tokens and tin > 0
    cost = _get(m, "hive_ratelimit_cost_total", provider="openai", model="gpt-4o-mini", currency="USD")
    assert cost == pytest.approx(stats["cost_today"]) and cost > 0
    assert _get(m, "hive_ratelimit_budget_utilization", scope="global", budget="max_cost_per_day",
                window="day") == pytest.approx(stats["cost_today"] / 100.0)
    assert _get(m, "hive_ratelimit_circuit_state", scope="model:openai/gpt-4o-mini") == 0
    assert _get(m, "hive_ratelimit_queue_wait_seconds_count") == admitted
    assert _get(m, "hive_ratelimit_queue_wait_seconds_bucket", le="+Inf") == admitted
    assert _get(m, "hive_ratelimit_queue_wait_seconds_sum") >= 1.0  # the 429's cooldown was waited out
    assert _get(m, "hive_ratelimit_limit_utilization", level="global", scope="global",
                limit="requests_per_minute") == pytest.approx(4 / 60)
    assert "SECRET" not in body


def test_metrics_register_into_an_existing_registry(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    limiter = make_limiter(clock, {"global": {"requests_per_minute": 60}})
    metrics = instrument(limiter, registry)
    text = generate_latest(registry).decode()
    assert "hive_ratelimit_calls_admitted_total 0.0" in text
    metrics.close()
    assert "hive_ratelimit" not in generate_latest(registry).decode()


def test_circuit_state_gauge_reports_an_open_breaker(provider: FakeProvider, clock: FakeClock) -> None:
    registry = CollectorRegistry()
    limiter = make_limiter(clock, {"circuit_breaker": {"failure_threshold": 2}, "retry": {"enabled": False}})
    instrument(limiter, registry)
    provider.state.push(Scripted(status=500), Scripted(status=500))
    for _ in range(2):
        with pytest.raises(litellm.InternalServerError):
            litellm.completion(**chat_kwargs(provider))
    m = _samples(generate_latest(registry).decode())
    assert _get(m, "hive_ratelimit_circuit_state", scope="model:openai/gpt-4o-mini") == 2
    assert _get(m, "hive_ratelimit_events_total", type="circuit_opened") == 1


def test_missing_prometheus_client_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "hive_ratelimit_plugin.metrics")
    with pytest.raises(ImportError, match=r"pip install 'hive-ratelimit\[prometheus\]'"):
        importlib.import_module("hive_ratelimit_plugin.metrics")


def test_sync_429_with_positional_model_is_counted(provider: FakeProvider, clock: FakeClock) -> None:
    registry = CollectorRegistry()
    limiter = make_limiter(clock, {})
    instrument(limiter, registry)
    provider.state.push(Scripted(status=429, headers={"retry-after": "1"}))
    kwargs = chat_kwargs(provider)
    kwargs.pop("max_retries")
    model = kwargs.pop("model")
    with Ticker(clock, step=0.05, when=lambda: limiter._engine.queue_length > 0):
        litellm.completion(model, **kwargs)
    m = _samples(generate_latest(registry).decode())
    assert _get(m, "hive_ratelimit_provider_429_total", provider="openai", model="gpt-4o-mini") == 1
    assert _get(m, "hive_ratelimit_provider_429_retried_total") == 1


def test_one_limiter_per_registry(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    first = instrument(make_limiter(clock, {}), registry)
    with pytest.raises(ValueError, match="own CollectorRegistry"):
        instrument(make_limiter(clock, {}), registry)
    first.close()
    instrument(make_limiter(clock, {}), registry).close()  # free again after close


def test_a_full_queue_is_counted_as_such() -> None:
    """A call refused because the queue is full is a ``queue_full`` rejection at level ``queue``,
    not a queue timeout (the error names its scope and limit: queue, max_size)."""
    from hive_ratelimit_plugin._engine import Engine
    from hive_ratelimit_plugin._observe import rejection_reason
    from hive_ratelimit_plugin._waiting import _queue_full

    assert rejection_reason(_queue_full(Engine(lambda: 0.0, max_queue=3))) == ("queue", "queue_full")
