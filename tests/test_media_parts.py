"""Images, documents, files and audio in a prompt are estimated by what providers bill for them
(pages, seconds, a per-image reserve), never by the length of their base64: a 3 MB PDF of three
pages must not look like a million-token prompt that no limit can ever admit."""

from __future__ import annotations

import base64
import os
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import RequestTooLargeError
from hive_ratelimit_plugin import _tokens as tokens
from hive_ratelimit_plugin._tokens import (
    AUDIO_TOKENS_PER_SECOND,
    FILE_TOKENS,
    IMAGE_TOKENS,
    PAGE_TOKENS,
    count_messages,
    count_response_input,
)
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs, make_limiter, wait_until

MODEL = "gpt-4o-mini"


def pdf(pages: int, padding: int = 1_000_000, page_objects: bool = True) -> bytes:
    """A PDF-shaped file with ``pages`` page objects (written out, or only in the page tree's
    /Count when ``page_objects`` is false, as in a PDF with compressed object streams) and
    ``padding`` bytes of random stream data (scanned images)."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    body = [b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n",
            f"2 0 obj << /Type /Pages /Kids [{kids}] /Count {pages} >> endobj\n".encode()]
    if page_objects:
        body += [f"{3 + i} 0 obj << /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >> endobj\n".encode()
                 for i in range(pages)]
    else:
        body.append(b"5 0 obj << /Type /ObjStm /N 3 /Filter /FlateDecode >> stream\n")
    body += [b"6 0 obj << /Length %d >> stream\n" % padding, os.urandom(padding), b"\nendstream endobj\n%%EOF"]
    return b"".join(body)


def data_url(raw: bytes, media_type: str = "application/pdf") -> str:
    return f"data:{media_type};base64,{base64.b64encode(raw).decode()}"


def wav(seconds: float, rate: int = 16_000, sample_bytes: int = 2) -> bytes:
    data = b"\x00" * int(seconds * rate * sample_bytes)
    byte_rate = rate * sample_bytes
    header = (b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
              + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + rate.to_bytes(4, "little")
              + byte_rate.to_bytes(4, "little") + sample_bytes.to_bytes(2, "little") + (16).to_bytes(2, "little")
              + b"data" + len(data).to_bytes(4, "little"))
    return header + data


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "summarise this"}, *parts]}]


TEXT_ONLY = count_messages(MODEL, user({"type": "text", "text": ""}))  # (with the parts' separator)


def media(messages: list[dict[str, Any]]) -> int:
    """What the media parts of ``messages`` add to the text-only estimate."""
    return count_messages(MODEL, messages) - TEXT_ONLY


# ----------------------------------------------------------------------------- the estimate
@pytest.mark.parametrize("pages", [1, 3, 12])
def test_an_inline_pdf_is_estimated_by_its_pages(pages: int) -> None:
    doc = data_url(pdf(pages))
    assert len(doc) > 1_300_000  # a megabyte of base64: ~350k tokens if it were counted as text
    assert media(user({"type": "file", "file": {"file_data": doc, "filename": "report.pdf"}})) == pages * PAGE_TOKENS


def test_a_pdf_whose_pages_are_compressed_is_estimated_from_its_page_tree() -> None:
    doc = data_url(pdf(7, page_objects=False))
    assert media(user({"type": "file", "file": {"file_data": doc}})) == 7 * PAGE_TOKENS


def test_a_pdf_with_no_readable_structure_is_estimated_by_its_size() -> None:
    raw = b"%PDF-1.7\n" + os.urandom(240_000)  # nothing readable: one page per 50 kB
    assert media(user({"type": "file", "file": {"file_data": data_url(raw)}})) == 5 * PAGE_TOKENS


def test_every_spelling_of_a_document_part_is_recognised() -> None:
    raw = pdf(2, padding=10_000)
    b64 = base64.b64encode(raw).decode()
    anthropic = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": b64}}
    responses = {"type": "input_file", "file_data": data_url(raw), "filename": "a.pdf"}
    assert media(user(anthropic)) == 2 * PAGE_TOKENS
    assert count_response_input(MODEL, [{"role": "user", "content": [{"type": "input_text", "text": "summarise this"},
                                                                     responses]}]) == TEXT_ONLY + 2 * PAGE_TOKENS
    # Inside an Anthropic tool result, next to an image.
    tool_result = {"type": "tool_result", "tool_use_id": "t1",
                   "content": [anthropic, {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                        "data": "iVBORw0KGgo="}}]}
    assert media(user(tool_result)) >= 2 * PAGE_TOKENS + IMAGE_TOKENS


def test_a_document_given_as_text_is_counted_as_its_text() -> None:
    text = "the quarterly revenue grew by four percent " * 50
    as_text = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": text}}
    as_content = {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": text}]}}
    plain = media(user({"type": "text", "text": text}))
    assert media(user(as_text)) == media(user(as_content)) == plain
    assert 300 < plain < 600
    as_base64 = {"type": "file", "file": {"file_data": data_url(text.encode(), "text/plain")}}
    assert plain <= media(user(as_base64)) < 2 * plain  # ~4 bytes per token, not the base64's length


def test_a_file_sent_by_reference_reserves_a_fixed_amount() -> None:
    assert media(user({"type": "file", "file": {"file_id": "file-abc123"}})) == FILE_TOKENS
    by_url = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    assert media(user(by_url)) == FILE_TOKENS
    assert media(user({"type": "document", "source": {"type": "file", "file_id": "file_011"}})) == FILE_TOKENS


@pytest.mark.parametrize("seconds", [1.0, 30.0])
def test_audio_is_estimated_by_its_duration(seconds: float) -> None:
    clip = base64.b64encode(wav(seconds)).decode()
    part = {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}
    assert media(user(part)) == round(seconds * AUDIO_TOKENS_PER_SECOND)
    # mp3 (no header read): counted at 128 kbit/s, 16,000 bytes a second
    mp3 = base64.b64encode(b"\xff\xfb" * 8000 * int(seconds)).decode()
    assert media(user({"type": "input_audio", "input_audio": {"data": mp3, "format": "mp3"}})) == \
        round(seconds * AUDIO_TOKENS_PER_SECOND)


@pytest.mark.parametrize("data", ["not base64 at all!", "data:application/pdf;base64,@@@", "", None, 42])
def test_broken_file_data_gets_an_estimate_not_an_error(data: Any) -> None:
    estimate = media(user({"type": "file", "file": {"file_data": data}}))
    assert 0 < estimate <= FILE_TOKENS


def test_base64_is_never_handed_to_the_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = litellm.token_counter

    def spy(*args: Any, **kwargs: Any) -> int:
        seen.append(len(kwargs.get("text") or ""))
        return int(real(*args, **kwargs))

    monkeypatch.setattr(litellm, "token_counter", spy)
    doc = data_url(pdf(2, padding=300_000))
    count_messages(MODEL, [{"role": "user", "content": [
        {"type": "text", "text": "fresh text for the spy " + os.urandom(4).hex()},
        {"type": "file", "file": {"file_data": doc}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": doc[28:]}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav(3)).decode(), "format": "wav"}},
        {"type": "image_url", "image_url": {"url": data_url(os.urandom(200_000), "image/png")}},
    ]}])
    assert seen and max(seen) < 200


def test_the_same_document_is_read_once_across_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent resends its document every turn: the estimate is cached, not re-read per call."""
    doc = data_url(pdf(4, padding=50_000))
    reads: list[int] = []
    real = tokens._pdf_pages
    monkeypatch.setattr(tokens, "_pdf_pages", lambda raw: reads.append(len(raw)) or real(raw))
    for turn in range(5):
        history = user({"type": "file", "file": {"file_data": doc}}) + [
            {"role": "assistant", "content": f"answer {i}"} for i in range(turn)]
        assert count_messages(MODEL, history) >= TEXT_ONLY + 4 * PAGE_TOKENS
    assert len(reads) <= 1


# ----------------------------------------------------------------------------- through LiteLLM
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_three_page_pdf_is_admitted_under_a_small_token_limit(
        mode: str, provider: FakeProvider, clock: FakeClock) -> None:
    """A 3 MB, 3-page PDF under tokens_per_minute=8,000: admitted (3 x 2,000 tokens reserved), sent,
    and settled to the provider's usage; a 5-page one cannot fit and is refused unsent."""
    limiter = make_limiter(clock, {"global": {"tokens_per_minute": 8_000, "requests_per_minute": 100}})
    small = user({"type": "file", "file": {"file_data": data_url(pdf(3, padding=2_000_000)), "filename": "a.pdf"}})
    large = user({"type": "file", "file": {"file_data": data_url(pdf(5, padding=2_000_000)), "filename": "b.pdf"}})
    kw = chat_kwargs(provider, messages=small, max_tokens=50)
    if mode == "sync":
        litellm.completion(**kw)
    else:
        await litellm.acompletion(**kw)
    assert provider.state.count() == 1
    stats = limiter.get_usage_stats()["levels"]["global"]["global"]
    await wait_until(lambda: limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 0)
    stats = limiter.get_usage_stats()["levels"]["global"]["global"]
    sent = provider.state.log[0]
    assert stats["tokens_per_minute"]["used"] == sent.prompt_tokens + sent.completion_tokens  # settled
    with pytest.raises(RequestTooLargeError):
        kw = chat_kwargs(provider, messages=large, max_tokens=50)
        if mode == "sync":
            litellm.completion(**kw)
        else:
            await litellm.acompletion(**kw)
    assert provider.state.count() == 1, "a call that can never fit was sent"
