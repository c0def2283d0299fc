"""Estimating a call's tokens before it runs, cheaply.

Prompt tokens come from ``litellm.token_counter``, counted per message and cached (agents resend
the same system prompt and history on every turn, so most messages are counted once). Output
tokens are the request's ``max_tokens`` / ``max_completion_tokens``, or a configured default.
"""

from __future__ import annotations

import binascii
import functools
import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("hive_ratelimit_plugin")

_PER_MESSAGE_OVERHEAD = 4
_failed_models: set[str] = set()


def _count_text(model: str, text: str) -> int:
    if model not in _failed_models:
        try:
            import litellm

            return int(litellm.token_counter(model=model, text=text))
        except Exception as exc:  # tokenizer missing for this model: fall back, once-logged
            _failed_models.add(model)
            logger.warning("token counting unavailable for model %r (%s); estimating 1 token per 3 characters",
                           model, type(exc).__name__)
    return len(text) // 3 + 1


def _content_text(content: Any) -> str:
    """The text of a message's content; each media part (image, document, file, audio) becomes a
    mark carrying its own estimate, so that base64 data is never counted as text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join([_part_text(part) for part in content])
    if content is None:
        return ""
    return json.dumps(content, default=str)


def _part_text(part: Any) -> str:
    if not isinstance(part, Mapping):
        return part if isinstance(part, str) else json.dumps(part, default=str)
    text = part.get("text")
    if isinstance(text, str):  # text, input_text, output_text
        return text
    kind = part.get("type")
    if kind in _IMAGE_TYPES:
        return _mark(IMAGE_TOKENS)
    if kind == "file":  # chat completions: {"file": {"file_data" | "file_id", "filename"}}
        f = part.get("file")
        f = f if isinstance(f, Mapping) else {}
        return _mark(_data_tokens(f.get("file_data"), None))
    if kind == "input_file":  # the Responses API: {"file_data" | "file_id" | "file_url", "filename"}
        return _mark(_data_tokens(part.get("file_data"), None))
    if kind == "document":  # Anthropic: {"source": {"type": "base64" | "text" | "content" | "url" | "file"}}
        return _document_text(part)
    if kind == "input_audio":  # chat completions: {"input_audio": {"data", "format"}}
        audio = part.get("input_audio")
        audio = audio if isinstance(audio, Mapping) else {}
        return _mark(_audio_tokens(audio.get("data"), audio.get("format")))
    if kind == "tool_result" and "content" in part:  # Anthropic: may hold images and documents
        return _content_text(part.get("content"))
    return json.dumps(part, default=str)


def _document_text(part: Mapping[str, Any]) -> str:
    source = part.get("source")
    source = source if isinstance(source, Mapping) else {}
    extra = [v for v in (part.get("title"), part.get("context")) if isinstance(v, str) and v]
    kind = source.get("type")
    if kind == "text" and isinstance(source.get("data"), str):
        body = source["data"]
    elif kind == "content":
        body = _content_text(source.get("content"))
    else:
        body = _mark(_data_tokens(source.get("data"), source.get("media_type")))
    return "\n".join([*extra, body])


#: Tokens reserved per image part: a high-detail image costs 765+ tokens on gpt-4o, up to ~1.6k
#: on Claude; reserving too much is settled back after the call, too little risks a 429.
IMAGE_TOKENS = 1600
#: Tokens reserved per page of a PDF document (providers bill a page as its text plus, on most of
#: them, an image of it: ~1.5-3k tokens on Claude).
PAGE_TOKENS = 2000
#: Tokens reserved for a file sent by reference (``file_id``, a URL): its size is unknown here.
FILE_TOKENS = 2 * PAGE_TOKENS
#: Tokens reserved per second of audio (Gemini bills 32, OpenAI's audio models about 10).
AUDIO_TOKENS_PER_SECOND = 32
#: When a PDF's page count cannot be read (compressed object streams), one page per this many bytes.
_BYTES_PER_PAGE = 50_000
_IMAGE_TYPES = frozenset(("image_url", "image", "input_image"))
_MARK_RE = re.compile("\x00(\\d+)\x00")
_PAGE_RE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_PAGE_COUNT_RE = re.compile(rb"/Type\s*/Pages\b[^>]*?/Count\s+(\d+)|/Count\s+(\d+)[^>]*?/Type\s*/Pages\b")


def _mark(tokens: int) -> str:
    return f"\x00{tokens}\x00"


def _split_data(data: str, media_type: Any) -> tuple[str, str]:
    """``(media type, base64 payload)`` of a data URL or of raw base64 with its media type apart."""
    if data.startswith("data:"):
        head, _, payload = data.partition(",")
        return head[5:].split(";", 1)[0].lower(), payload
    return (media_type.lower() if isinstance(media_type, str) else ""), data


def _data_tokens(data: Any, media_type: Any) -> int:
    """Estimated tokens of an inline file (a data URL or base64), or of a file sent by reference."""
    if not isinstance(data, str) or not data:
        return FILE_TOKENS
    return _inline_tokens(len(data), hash(data), data, media_type if isinstance(media_type, str) else None)


def _inline_tokens(size: int, digest: int, data: str, media_type: str | None) -> int:
    key = (size, digest, media_type)
    hit = _inline_cache.get(key)
    if hit is not None:
        return hit
    kind, payload = _split_data(data, media_type)
    try:
        raw = binascii.a2b_base64(payload)
    except (binascii.Error, ValueError):
        raw = payload.encode("utf-8", "replace")  # not base64: take it as it is
    if kind.startswith("image/"):
        tokens = IMAGE_TOKENS
    elif kind.startswith("text/") or kind in ("application/json", "application/xml"):
        tokens = len(raw) // 4 + 1  # ~4 bytes per token of plain text
    elif kind.startswith("audio/"):
        tokens = _audio_tokens_of(raw, kind.rsplit("/", 1)[-1])
    else:  # PDF (what providers accept), or unknown: by pages
        tokens = _pdf_pages(raw) * PAGE_TOKENS
    if len(_inline_cache) >= 256:
        _inline_cache.clear()
    _inline_cache[key] = tokens
    return tokens


_inline_cache: dict[tuple[int, int, str | None], int] = {}


def _pdf_pages(raw: bytes) -> int:
    """Pages of a PDF: its page objects, else the page tree's count, else one per 50 kB."""
    pages = len(_PAGE_RE.findall(raw))
    if not pages:
        counts = [int(a or b) for a, b in _PAGE_COUNT_RE.findall(raw)]
        pages = max(counts, default=0)
    return pages or max(1, -(-len(raw) // _BYTES_PER_PAGE))


def _audio_tokens(data: Any, fmt: Any) -> int:
    if not isinstance(data, str) or not data:
        return FILE_TOKENS
    return _inline_tokens(len(data), hash(data), data, f"audio/{fmt}" if isinstance(fmt, str) else "audio/")


def _audio_tokens_of(raw: bytes, fmt: str) -> int:
    """Audio by its duration: a WAV header gives the byte rate; other formats count as 128 kbit/s."""
    rate, size = 16_000, len(raw)
    if fmt in ("wav", "wave", "x-wav") and size >= 44 and raw[:4] == b"RIFF" and raw[8:12] == b"WAVE":
        rate = int.from_bytes(raw[28:32], "little") or rate
        size -= 44
    seconds = size / rate
    return max(1, math.ceil(seconds * AUDIO_TOKENS_PER_SECOND))


@functools.lru_cache(maxsize=16384)  # C-implemented LRU: a hit costs a fraction of a Python-level cache's
def _cached(model: str, role: str, text: str) -> int:
    """Tokens of one message (cached per model, role and text; media parts are marks with their own count)."""
    media = 0
    if "\x00" in text:
        media = sum(int(n) for n in _MARK_RE.findall(text))
        text = _MARK_RE.sub("", text)
    return _count_text(model, text) + _PER_MESSAGE_OVERHEAD + media


def count_messages(model: str, messages: Any, tools: Any = None) -> int:
    """Prompt tokens of a chat request, tool definitions included (cached per message)."""
    total = 3
    if tools:
        total += _cached(model, "tools", json.dumps(tools, default=str, sort_keys=True))
    if not isinstance(messages, list):
        return total
    for m in messages:
        if type(m) is not dict and not isinstance(m, Mapping):  # (dict first: the ABC check is slow)
            continue
        role = str(m.get("role", ""))
        content = m.get("content")
        text = content if isinstance(content, str) else _content_text(content)
        extra = m.get("tool_calls")
        if extra:
            text += json.dumps(extra, default=str)
        total += _cached(model, role, text)
    return total


def count_input(model: str, value: Any) -> int:
    """Tokens of an embedding ``input`` or a text-completion ``prompt``."""
    if value is None:
        return 0
    if isinstance(value, str):
        return _count_text(model, value)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # already token ids
        return sum(count_input(model, v) for v in value)
    return _count_text(model, json.dumps(value, default=str))


def count_response_input(model: str, value: Any, instructions: Any = None, tools: Any = None) -> int:
    """Prompt tokens of a Responses API request: its ``input`` (a string, or a list of items:
    messages with string or part-list content, tool calls and their outputs), its
    ``instructions`` and its tool definitions."""
    items: list[Any] = []
    if isinstance(instructions, str) and instructions:
        items.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        items.append({"role": "user", "content": value})
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping) and "content" in item:
                items.append(item)
            elif isinstance(item, str):
                items.append({"role": "user", "content": item})
            else:  # a function call, its output, a reasoning item...: counted as its JSON
                items.append({"role": "item", "content": json.dumps(item, default=str, sort_keys=True)})
    elif value is not None:
        items.append({"role": "user", "content": json.dumps(value, default=str)})
    return count_messages(model, items, tools)


def requested_output(kwargs: Mapping[str, Any], default: int) -> int:
    """The output tokens a call may produce: its cap if it set one, else ``default``."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        v = kwargs.get(name)
        if v is not None and isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default
