"""Images, speech, transcription and rerank: limited and budgeted like chat calls, priced per unit.

Every call goes through LiteLLM's real entry points (sync and async) to the fake provider's
``/images/generations``, ``/audio/speech``, ``/audio/transcriptions`` and (Cohere's) ``/v2/rerank``.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter, _media
from hive_ratelimit_plugin.errors import BudgetExceededError, RateLimitQueueTimeout
from hive_ratelimit_plugin.fake_provider import Scripted
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import (
    assert_cancelling_in_flight_frees_the_slot,
    global_usage,
    make_limiter,
    wait_until,
    wav,
    with_backend,
)

KEY = "sk-test-SECRET-0123456789"
IMAGE_MODEL = "openai/hive-test-image"  # priced per image below (LiteLLM 1.110's map has no dall-e-3)
IMAGE_PRICE = 0.05
SPEECH_COST = 0.00015  # tts-1 at 15e-6 per character, as LiteLLM counts "hello there"


@pytest.fixture(autouse=True)
def image_price() -> Iterator[None]:
    """A model LiteLLM prices per image, on every LiteLLM version under test."""
    entry = {"output_cost_per_image": IMAGE_PRICE, "litellm_provider": "openai", "mode": "image_generation"}
    litellm.model_cost[IMAGE_MODEL] = entry
    yield
    litellm.model_cost.pop(IMAGE_MODEL, None)


def _png() -> io.BytesIO:
    f = io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    f.name = "a.png"
    return f


def _calls(provider: FakeProvider) -> dict[str, tuple[str, Callable[..., Any], dict[str, Any]]]:
    """name -> (path the provider sees, LiteLLM entry point, its arguments)."""
    base = {"api_base": provider.url, "api_key": KEY}
    return {
        "image_generation": ("/v1/images/generations", litellm.image_generation,
                             {"model": IMAGE_MODEL, "prompt": "a cat", "n": 2, **base}),
        "aimage_generation": ("/v1/images/generations", litellm.aimage_generation,
                              {"model": IMAGE_MODEL, "prompt": "a cat", "n": 2, **base}),
        "image_edit": ("/v1/images/edits", litellm.image_edit,
                       {"model": IMAGE_MODEL, "image": _png(), "prompt": "a hat", **base}),
        "aimage_edit": ("/v1/images/edits", litellm.aimage_edit,
                        {"model": IMAGE_MODEL, "image": _png(), "prompt": "a hat", **base}),
        "speech": ("/v1/audio/speech", litellm.speech,
                   {"model": "openai/tts-1", "input": "hello there", "voice": "alloy", **base}),
        "aspeech": ("/v1/audio/speech", litellm.aspeech,
                    {"model": "openai/tts-1", "input": "hello there", "voice": "alloy", **base}),
        "transcription": ("/v1/audio/transcriptions", litellm.transcription,
                          {"model": "openai/whisper-1", "file": ("a.wav", wav(2.0), "audio/wav"), **base}),
        "atranscription": ("/v1/audio/transcriptions", litellm.atranscription,
                           {"model": "openai/whisper-1", "file": ("a.wav", wav(2.0), "audio/wav"), **base}),
        "rerank": ("/v2/rerank", litellm.rerank,
                   {"model": "cohere/rerank-english-v3.0", "query": "q", "documents": ["a", "b"],
                    "api_base": provider.root, "api_key": KEY}),
        "arerank": ("/v2/rerank", litellm.arerank,
                    {"model": "cohere/rerank-english-v3.0", "query": "q", "documents": ["a", "b"],
                     "api_base": provider.root, "api_key": KEY}),
    }


async def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    if asyncio.iscoroutinefunction(fn):
        return await fn(**kwargs)
    return fn(**kwargs)  # (a sync call on the loop's thread: the provider answers from its own)


def _config(**extra: Any) -> dict[str, Any]:
    return {"global": {"requests_per_minute": 100, "tokens_per_minute": 100_000, "concurrent_requests": 4},
            "providers": {"openai": {"requests_per_minute": 100}},
            "agents": {"painter": {"requests_per_minute": 100}},
            "budget": {"max_daily_spend": 10}, "runaway": {"enabled": False}, **extra}


@pytest.mark.usefixtures("contract_backend")
@pytest.mark.parametrize("name", ["image_generation", "aimage_generation", "image_edit", "aimage_edit", "speech",
                                  "aspeech", "transcription", "atranscription", "rerank", "arerank"])
async def test_every_media_entry_point_counts_one_request_and_settles_at_litellms_cost(
        name: str, provider: FakeProvider, clock: FakeClock) -> None:
    lim = make_limiter(clock, _config())
    path, fn, kwargs = _calls(provider)[name]
    response = await _call(fn, {**kwargs, "metadata": {"agent_id": "painter"}})
    # (an async call is settled by LiteLLM's logging hook, which runs after the call returns)
    await wait_until(lambda: lim.get_usage_stats()["cost_today"] > 0)
    stats = lim.get_usage_stats()
    assert [r.path for r in provider.state.log] == [path]
    assert stats["admitted_total"] == 1
    levels = stats["levels"]
    assert global_usage(lim)["requests_per_minute"]["used"] == 1 and global_usage(lim)["in_flight"] == 0
    assert global_usage(lim)["tokens_per_minute"]["used"] == 0
    assert levels["agent"]["agent:painter"]["requests_per_minute"]["used"] == 1
    if not name.endswith("rerank"):
        assert levels["provider"]["provider:openai"]["requests_per_minute"]["used"] == 1
    litellm_cost = (getattr(response, "_hidden_params", None) or {}).get("response_cost")
    expected = {"image": IMAGE_PRICE * (1 if "edit" in name else 2), "speech": SPEECH_COST, "rerank": 0.002,
                "transcription": 0.0001 * 3.0}[_media.FAMILIES[name]]  # (the fake transcript says 3 s)
    if litellm_cost is not None:
        assert litellm_cost == pytest.approx(expected)
    assert stats["cost_today"] == pytest.approx(expected)


@pytest.mark.parametrize("name", ["image_generation", "aimage_generation", "aspeech", "transcription", "arerank"])
async def test_a_request_limit_holds_back_media_calls_and_nothing_more_is_sent(
        name: str, provider: FakeProvider, clock: FakeClock) -> None:
    lim = make_limiter(clock, {"global": {"requests_per_minute": 1}, "queue": {"max_wait_seconds": 0}})
    path, fn, kwargs = _calls(provider)[name]
    await _call(fn, kwargs)
    with pytest.raises(RateLimitQueueTimeout):
        await _call(fn, kwargs)
    assert [r.path for r in provider.state.log] == [path]
    assert lim.get_usage_stats()["admitted_total"] == 1


@pytest.mark.parametrize("name", ["speech", "aspeech"])
async def test_a_budget_refuses_a_call_that_would_overspend_it_before_it_is_sent(
        name: str, provider: FakeProvider, clock: FakeClock) -> None:
    # "hello there" is estimated at 11 * 15e-6 = 0.000165 and costs 0.00015: one fits in 0.0002, a
    # second does not.
    lim = make_limiter(clock, {"budget": {"max_daily_spend": 0.0002}, "runaway": {"enabled": False}})
    _, fn, kwargs = _calls(provider)[name]
    await _call(fn, kwargs)
    await wait_until(lambda: lim.get_usage_stats()["cost_today"] > 0)
    with pytest.raises(BudgetExceededError):
        await _call(fn, kwargs)
    assert len(provider.state.log) == 1
    assert lim.get_usage_stats()["cost_today"] == pytest.approx(SPEECH_COST)


async def test_an_image_models_price_per_image_is_the_estimate_a_budget_is_checked_against(
        provider: FakeProvider, clock: FakeClock) -> None:
    lim = make_limiter(clock, {"budget": {"max_daily_spend": 0.12}, "runaway": {"enabled": False}})
    _, fn, kwargs = _calls(provider)["aimage_generation"]
    await fn(**kwargs)  # 2 images: 0.10
    await wait_until(lambda: lim.get_usage_stats()["cost_today"] > 0)
    with pytest.raises(BudgetExceededError):
        await fn(**{**kwargs, "n": 1})  # 0.05 more would make 0.15
    assert len(provider.state.log) == 1
    assert lim.get_usage_stats()["cost_today"] == pytest.approx(0.10)


async def test_a_media_model_litellm_cannot_price_is_refused_under_unknown_price_block(
        provider: FakeProvider, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    make_limiter(clock, {"budget": {"max_daily_spend": 10}, "unknown_price": "block"})
    _, fn, kwargs = _calls(provider)["aimage_generation"]
    with caplog.at_level(logging.WARNING, logger="hive_ratelimit_plugin"), \
            pytest.raises(BudgetExceededError) as caught:
        await fn(**{**kwargs, "model": "openai/hive-unpriced-image"})
    assert "register_model" in str(caught.value)
    assert "rate_limiting.pricing" not in caplog.text and "register_model" in caplog.text
    assert provider.state.log == []


async def test_a_media_model_litellm_cannot_price_is_charged_the_fallback_under_unknown_price_estimate(
        provider: FakeProvider, clock: FakeClock) -> None:
    lim = make_limiter(clock, {"budget": {"max_daily_spend": 10}, "estimation": {"default_output_tokens": 1000},
                               "fallback_price": {"input_per_million": 10, "output_per_million": 100}})
    _, fn, kwargs = _calls(provider)["image_generation"]
    fn(**{**kwargs, "model": "openai/hive-unpriced-image"})
    # LiteLLM has no cost for it either: the estimate stands (1000 output tokens at 100 per million)
    assert lim.get_usage_stats()["cost_today"] == pytest.approx(0.1)


async def test_cancelling_an_image_call_in_flight_gives_its_slot_back_at_once(
        provider: FakeProvider, clock: FakeClock) -> None:
    lim = make_limiter(clock, {"global": {"concurrent_requests": 1}})
    _, fn, kwargs = _calls(provider)["aimage_generation"]
    await assert_cancelling_in_flight_frees_the_slot(lim, provider, lambda: fn(**kwargs))


@pytest.mark.parametrize("name", ["aspeech", "transcription", "aimage_generation"])
async def test_a_provider_429_on_a_media_call_is_retried_and_each_attempt_admitted(
        name: str, provider: FakeProvider, clock: FakeClock) -> None:
    lim = make_limiter(clock, {"global": {"requests_per_minute": 100}, "runaway": {"enabled": False}})
    provider.state.push(Scripted(status=429, headers={"retry-after": "0"}))
    _, fn, kwargs = _calls(provider)[name]
    await _call(fn, kwargs)
    sent = len(provider.state.log)
    stats = lim.get_usage_stats()
    assert sent == 2
    if name == "aimage_generation" and not _image_retries_taken_over():
        assert stats["admitted_total"] == 1  # LiteLLM 1.83.4 drops max_retries: the SDK retried, unseen
    else:
        assert stats["admitted_total"] == 2 and stats["retried_total"] == 1


def _image_retries_taken_over() -> bool:
    """Whether this LiteLLM hands an image call's ``max_retries`` to the SDK (1.83.4 drops it)."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("litellm").split(".")[:2])
    return (major, minor) > (1, 83)


async def test_a_routers_media_calls_are_limited_and_priced_too(provider: FakeProvider, clock: FakeClock) -> None:
    lim = make_limiter(clock, _config())
    base = {"api_base": provider.url, "api_key": KEY}
    router = litellm.Router(model_list=[
        {"model_name": "img", "litellm_params": {"model": IMAGE_MODEL, **base}},
        {"model_name": "tts", "litellm_params": {"model": "openai/tts-1", **base}},
        {"model_name": "stt", "litellm_params": {"model": "openai/whisper-1", **base}},
        {"model_name": "rr", "litellm_params": {"model": "cohere/rerank-english-v3.0", "api_base": provider.root,
                                                "api_key": KEY}},
    ])
    router.image_generation(model="img", prompt="a cat")
    await router.aimage_generation(model="img", prompt="a cat")
    await router.aspeech(model="tts", input="hello there", voice="alloy")
    await router.atranscription(model="stt", file=("a.wav", wav(1.0), "audio/wav"))
    await router.arerank(model="rr", query="q", documents=["a", "b"])
    expected = 2 * IMAGE_PRICE + SPEECH_COST + 0.0001 * 3.0 + 0.002
    await wait_until(lambda: lim.get_usage_stats()["cost_today"] >= expected - 1e-9)
    stats = lim.get_usage_stats()
    assert len(provider.state.log) == 5 and stats["admitted_total"] == 5
    assert stats["cost_today"] == pytest.approx(expected)
    assert global_usage(lim)["in_flight"] == 0


async def test_moderation_is_still_not_limited(provider: FakeProvider, clock: FakeClock) -> None:
    lim = make_limiter(clock, {"global": {"requests_per_minute": 1}})
    for call_type in ("moderation", "amoderation"):
        ticket = lim._ticket("mod-1", call_type, {"model": "omni-moderation-latest", "input": "hi"}, None)
        assert ticket is None


# ------------------------------------------------------------------------- estimates (unit)
def test_an_images_estimate_reads_the_price_of_its_quality_and_size_else_the_models(
        monkeypatch: pytest.MonkeyPatch) -> None:
    table = {
        "hd/1024-x-1792/pic": {"input_cost_per_pixel": 1e-7},
        "standard/1024-x-1024/pic": {"input_cost_per_pixel": 3e-8},
        "flat": {"output_cost_per_image": 0.02},
    }
    monkeypatch.setattr(litellm, "model_cost", table)
    assert _media.unit_cost("image", "openai", "pic", {"size": "1024x1792", "quality": "hd", "n": 2}) == \
        pytest.approx(1e-7 * 1024 * 1792 * 2)
    assert _media.unit_cost("image", "openai", "openai/pic", {}) == pytest.approx(3e-8 * 1024 * 1024)
    assert _media.unit_cost("image", "openai", "openai/flat", {"n": 3}) == pytest.approx(0.06)
    assert _media.unit_cost("image", "openai", "nothing", {}) is None


def test_a_transcriptions_estimate_reads_the_wav_header_else_128_kbit_per_second(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(litellm, "model_cost", {"whisper-1": {"input_cost_per_second": 0.0001}})
    audio = wav(10.0)  # 16 kHz 16-bit mono: 32,000 bytes a second
    assert _media.audio_seconds(("a.wav", audio, "audio/wav")) == pytest.approx(10.0, abs=0.01)
    assert _media.unit_cost("transcription", "openai", "whisper-1", {"file": audio}) == pytest.approx(0.0011)
    mp3 = tmp_path / "a.mp3"
    mp3.write_bytes(b"\xff" * 160_000)  # 10 s at 128 kbit/s
    assert _media.audio_seconds(str(mp3)) == pytest.approx(10.0)
    with mp3.open("rb") as f:
        assert _media.audio_seconds(f) == pytest.approx(10.0)
    assert _media.audio_seconds(io.BytesIO(b"\xff" * 32_000)) == pytest.approx(2.0)

    class Pipe:  # (a stream whose size cannot be known: no estimate from it)
        def fileno(self) -> int:
            raise RuntimeError("not a file")
    assert _media.audio_seconds(Pipe()) is None


def test_a_model_priced_per_token_only_is_estimated_at_its_dearest_call_so_far(
        clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(litellm.model_cost, "token-image", {"input_cost_per_token": 5e-6,
                                                            "output_cost_per_image_token": 4e-5})
    lim = HiveLimiter(with_backend({"budget": {"max_daily_spend": 10}}), clock=clock)
    kwargs = {"model": "token-image", "prompt": "a cat"}
    assert lim._media_estimate("image_generation", kwargs, "token-image", "openai") == 0.0
    lim._media_costs.note("openai", "token-image", 0.17)
    lim._media_costs.note("openai", "token-image", 0.04)
    assert lim._media_estimate("image_generation", kwargs, "token-image", "openai") == pytest.approx(0.17)


def test_an_image_without_a_quality_is_estimated_at_the_dearest_quality_of_its_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(litellm, "model_cost", {"low/1024-x-1024/pic": {"output_cost_per_image": 0.01},
                                                "high/1024-x-1024/pic": {"output_cost_per_image": 0.17}})
    assert _media.unit_cost("image", "openai", "pic", {}) == pytest.approx(0.17)
    assert _media.unit_cost("image", "openai", "pic", {"quality": "low"}) == pytest.approx(0.01)


# ------------------------------------------------------------------------- review regressions
@pytest.mark.usefixtures("contract_backend")
@pytest.mark.parametrize("name", ["aspeech", "atranscription", "aimage_generation", "arerank"])
def test_an_async_media_call_in_a_short_lived_event_loop_is_settled_at_litellms_cost(
        name: str, provider: FakeProvider, clock: FakeClock) -> None:
    # asyncio.run(...) closes its loop at once: LiteLLM's async logging hook never runs there.
    lim = make_limiter(clock, _config())
    _, fn, kwargs = _calls(provider)[name]
    response = asyncio.run(fn(**kwargs))
    cost = _media.litellm_cost(response)  # (LiteLLM 1.83.4 cannot price the test image: its estimate)
    assert lim._engine._open_ids() == []
    assert lim.get_usage_stats()["cost_today"] == pytest.approx(IMAGE_PRICE * 2 if cost is None else cost)


def test_a_sync_image_calls_positional_n_is_estimated(provider: FakeProvider, clock: FakeClock) -> None:
    lim = make_limiter(clock, _config())
    litellm.image_generation("a cat", IMAGE_MODEL, 2, api_base=provider.url, api_key=KEY)
    assert lim.get_usage_stats()["cost_today"] == pytest.approx(2 * IMAGE_PRICE)
