"""Images, documents, files and audio in a prompt are estimated by what providers bill for them
(pages, seconds, a per-image reserve), never by the length of their base64: a 3 MB PDF of three
pages must not look like a million-token prompt that no limit can ever admit."""

from __future__ import annotations

import base64
import os
import zlib
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

from .helpers import chat_kwargs, global_usage, make_limiter, wait_until

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


TEXT_ONLY = count_messages(MODEL, user())


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


def compressed_pdf(pages: int) -> bytes:
    """A PDF 1.5 file whose page tree and pages sit in a compressed object stream, as most PDF
    writers save them: no page object or /Count is visible in the file itself."""
    objects = [f"<< /Type /Pages /Kids [{' '.join(f'{3 + i} 0 R' for i in range(pages))}] /Count {pages} >>"]
    objects += ["<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>" for _ in range(pages)]
    packed = zlib.compress(" ".join(objects).encode())
    return b"".join([
        b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n",
        b"%d 0 obj << /Type /ObjStm /N %d /First 0 /Filter /FlateDecode /Length %d >>\nstream\n"
        % (pages + 3, pages + 1, len(packed)), packed, b"\nendstream endobj\n",
        b"%d 0 obj << /Length 200000 >> stream\n" % (pages + 4), os.urandom(200_000), b"\nendstream endobj\n%%EOF",
    ])


@pytest.mark.parametrize("pages", [3, 30, 200])
def test_a_pdf_with_compressed_object_streams_is_counted_from_inside_them(pages: int) -> None:
    raw = compressed_pdf(pages)
    assert b"/Type /Page " not in raw and b"/Count" not in raw
    assert media(user({"type": "file", "file": {"file_data": data_url(raw)}})) == pages * PAGE_TOKENS


def test_an_incrementally_updated_pdf_is_not_counted_twice() -> None:
    once = pdf(5, padding=10_000)
    again = once + b"\n" + b"".join(f"{3 + i} 0 obj << /Type /Page /Parent 2 0 R /Rotate 90 >> endobj\n".encode()
                                     for i in range(5)) + b"%%EOF"
    assert media(user({"type": "file", "file": {"file_data": data_url(again)}})) == 5 * PAGE_TOKENS


@pytest.mark.parametrize("raw", [b"/Count " + b"1" * 80_000, b"/Count 1" * 50_000, b"/Type/Pages" * 36_363,
                                 b"/Type /Pages /Count " + b"9" * 5000, b"/Type /ObjStm stream\n" + b"x" * 10_000,
                                 # ~170 object-stream marks sharing one stream of empty deflate blocks
                                 (b"/Type/ObjStm" * 170 + b" stream\nx\x9c" + b"\x02\x08\x20\x80\x00" * 100_000) * 6])
def test_hostile_pdf_bytes_get_an_estimate(raw: bytes) -> None:
    """Adversarial files are read in linear time and get a bounded estimate (no quadratic regex,
    no integer-parsing error on a 5,000-digit /Count)."""
    estimate = media(user({"type": "file", "file": {"file_data": data_url(raw)}}))
    assert 0 < estimate <= 1_000_000_000 * PAGE_TOKENS


def test_an_indirect_page_count_is_not_read_as_a_number() -> None:
    raw = b"%PDF-1.7\n2 0 obj << /Type /Pages /Count 9 0 R >> endobj\n" + b"".join(
        f"{10 + i} 0 obj << /Type /Page /Parent 2 0 R >> endobj\n".encode() for i in range(30))
    assert media(user({"type": "file", "file": {"file_data": data_url(raw)}})) == 30 * PAGE_TOKENS


def test_text_cannot_pass_for_a_media_estimate() -> None:
    """Text holding NULs and digits is text: it cannot inject a token count."""
    odd = "hi \x00999999999999\x00 there"
    assert count_messages(MODEL, [{"role": "user", "content": odd}]) < 50
    assert count_messages(MODEL, [{"role": "user", "content": [{"type": "text", "text": odd}]}]) < 50


@pytest.mark.parametrize("content", [
    [{"type": ["image_url"]}], [{"type": {}}], [{"type": None, "data": 1}],
    "nest", [{"type": "tool_result", "content": [{"type": "text", "text": "x" * 10}]}],
])
def test_odd_parts_never_break_the_estimate(content: Any) -> None:
    if content == "nest":  # tool results nested 400 deep
        content = [{"type": "text", "text": "leaf"}]
        for _ in range(400):
            content = [{"type": "tool_result", "tool_use_id": "t", "content": content}]
    assert count_messages(MODEL, [{"role": "user", "content": content}]) > 0


def test_other_media_spellings_are_sized_not_tokenized() -> None:
    video = data_url(os.urandom(1_250_000), "video/mp4")  # 10 s at 1 Mbit/s
    audio = data_url(wav(10), "audio/wav")
    assert media(user({"type": "video_url", "video_url": {"url": video}})) == 10 * 300
    assert media(user({"type": "audio_url", "audio_url": {"url": audio}})) == 10 * AUDIO_TOKENS_PER_SECOND
    # An inline PDF in an image part is a document (LiteLLM passes it on as one).
    assert media(user({"type": "image_url", "image_url": {"url": data_url(pdf(40, padding=1000))}})) == 40 * PAGE_TOKENS
    mp3 = base64.b64encode(b"\xff\xfb" * 8000 * 60).decode()  # 60 s at 128 kbit/s
    assert media(user({"type": "file", "file": {"file_data": mp3, "format": "audio/mpeg"}})) == \
        60 * AUDIO_TOKENS_PER_SECOND
    assert media(user({"type": "file", "file": {"file_data": "https://example.com/a.pdf"}})) == FILE_TOKENS
    assert media(user({"type": "file", "file": {"file_data": "gs://bucket/a.pdf"}})) == FILE_TOKENS
    # A wav header claiming 1 byte a second is read at 8 kB/s at the slowest.
    bad = bytearray(wav(1))
    bad[28:32] = (1).to_bytes(4, "little")
    clip = base64.b64encode(bytes(bad)).decode()
    assert media(user({"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}})) <= \
        4 * AUDIO_TOKENS_PER_SECOND


def test_a_function_output_with_a_file_is_sized_not_tokenized() -> None:
    doc = data_url(pdf(3, padding=500_000))
    item = {"type": "function_call_output", "call_id": "c1",
            "output": [{"type": "input_text", "text": "summarise this"}, {"type": "input_file", "file_data": doc}]}
    assert count_response_input(MODEL, [item]) == TEXT_ONLY + 3 * PAGE_TOKENS


async def test_the_proxys_responses_route_sizes_its_files(clock: FakeClock) -> None:
    """The proxy's /v1/responses (and /v1/messages) requests are estimated as what they are."""
    from litellm.proxy._types import UserAPIKeyAuth

    from hive_ratelimit_plugin.proxy import ProxyLimiter

    lim = ProxyLimiter({"global": {"tokens_per_minute": 50_000}, "queue": {"max_wait_seconds": 0}}, clock=clock)
    clock.attach(lim)
    litellm.callbacks.append(lim)
    inp = [{"role": "user", "content": [{"type": "input_text", "text": "summarise this"},
                                        {"type": "input_file", "file_data": data_url(pdf(3, padding=300_000))}]}]
    auth = UserAPIKeyAuth(api_key="a" * 64, user_id="alice")
    await lim.async_pre_call_hook(auth, None, {"model": "gpt-4o-mini", "input": inp, "instructions": "be brief",
                                               "litellm_call_id": "c1"}, "aresponses")
    used = global_usage(lim)["tokens_per_minute"]["used"]
    assert 3 * PAGE_TOKENS < used < 3 * PAGE_TOKENS + 1000


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
    await wait_until(lambda: global_usage(limiter)["in_flight"] == 0)
    stats = global_usage(limiter)
    sent = provider.state.log[0]
    assert stats["tokens_per_minute"]["used"] == sent.prompt_tokens + sent.completion_tokens  # settled
    with pytest.raises(RequestTooLargeError):
        kw = chat_kwargs(provider, messages=large, max_tokens=50)
        if mode == "sync":
            litellm.completion(**kw)
        else:
            await litellm.acompletion(**kw)
    assert provider.state.count() == 1, "a call that can never fit was sent"
