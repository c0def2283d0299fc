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
import zlib
from collections.abc import Iterator, Mapping
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


class _Parts:
    """Walks a message's content: its text, and the tokens of its media parts (images, documents,
    files, audio, video) estimated by what providers bill for them, so that base64 data is never
    counted as text."""

    __slots__ = ("media", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.media = 0

    def content(self, content: Any, depth: int = 0) -> None:
        if isinstance(content, str):
            self.texts.append(content)
        elif isinstance(content, list) and depth < _MAX_DEPTH:
            for part in content:
                self.part(part, depth + 1)
        elif content is not None:
            self.texts.append(_dumps(content))

    def part(self, part: Any, depth: int) -> None:
        if not isinstance(part, Mapping):
            self.texts.append(part if isinstance(part, str) else _dumps(part))
            return
        text = part.get("text")
        if isinstance(text, str):  # text, input_text, output_text
            self.texts.append(text)
            return
        kind = part.get("type")
        kind = kind if isinstance(kind, str) else ""
        if kind in _IMAGE_TYPES:
            url = _url_of(part.get(kind))
            # An inline PDF in an image part is a document (LiteLLM passes it on as one).
            inline = url is not None and url.startswith("data:") and not url.startswith("data:image/")
            self.media += _data_tokens(url, None) if inline else IMAGE_TOKENS
        elif kind in ("video_url", "audio_url"):
            self.media += _data_tokens(_url_of(part.get(kind)), None)
        elif kind == "file":  # chat completions: {"file": {"file_data" | "file_id", "filename", "format"}}
            f = part.get("file")
            f = f if isinstance(f, Mapping) else {}
            self.media += _data_tokens(f.get("file_data"), f.get("format"))
        elif kind == "input_file":  # the Responses API: {"file_data" | "file_id" | "file_url", "filename"}
            self.media += _data_tokens(part.get("file_data"), None)
        elif kind == "document":  # Anthropic: {"source": {"type": "base64" | "text" | "content" | "url" | "file"}}
            self.document(part, depth)
        elif kind == "input_audio":  # chat completions: {"input_audio": {"data", "format"}}
            audio = part.get("input_audio")
            audio = audio if isinstance(audio, Mapping) else {}
            fmt = audio.get("format")
            self.media += _data_tokens(audio.get("data"), f"audio/{fmt}" if isinstance(fmt, str) else "audio/")
        elif isinstance(part.get("content"), list):  # an Anthropic tool result: may hold images, documents
            self.content(part["content"], depth)
        elif isinstance(part.get("output"), list):  # a Responses function_call_output with parts
            self.content(part["output"], depth)
        else:
            self.texts.append(_dumps(part))

    def document(self, part: Mapping[str, Any], depth: int) -> None:
        source = part.get("source")
        source = source if isinstance(source, Mapping) else {}
        self.texts.extend(v for v in (part.get("title"), part.get("context")) if isinstance(v, str) and v)
        kind = source.get("type")
        if kind == "text" and isinstance(source.get("data"), str):
            self.texts.append(source["data"])
        elif kind == "content":
            self.content(source.get("content"), depth)
        else:
            self.media += _data_tokens(source.get("data"), source.get("media_type"))


def _content(content: Any) -> tuple[str, int]:
    """``(text, media tokens)`` of a message's content."""
    walk = _Parts()
    walk.content(content)
    return "\n".join(walk.texts), walk.media


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, default=str)
    except (ValueError, TypeError, RecursionError):  # circular, or nested too deep
        return str(type(value).__name__)


def _url_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("url"), str):
        return str(value["url"])
    return None


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
#: Tokens reserved per second of video (Gemini bills ~260-300), its length taken at 1 Mbit/s.
VIDEO_TOKENS_PER_SECOND = 300
#: When a PDF's page count cannot be read, one page per this many bytes.
_BYTES_PER_PAGE = 50_000
_MAX_DEPTH = 32  # content nested deeper (tool results in tool results...) counts as its type's name
_IMAGE_TYPES = frozenset(("image_url", "image", "input_image"))
_PAGE_RE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_PAGES_RE = re.compile(rb"/Type\s*/Pages\b")
_COUNT_RE = re.compile(rb"/Count\s+(\d{1,9})(?!\d|\s+\d+\s+R\b)")  # (not an indirect reference)
_OBJSTM_RE = re.compile(rb"/Type\s*/ObjStm\b")
_STREAM_RE = re.compile(rb"stream\r?\n")
_MAX_INFLATED = 16 << 20  # bytes of compressed object streams read per PDF
_MAX_STREAM = 2 << 20  # compressed bytes read per object stream
_MAX_OBJECT_STREAMS = 1000  # object streams read per PDF (a real one has a few; each holds ~100 objects)


def _data_tokens(data: Any, media_type: Any) -> int:
    """Estimated tokens of an inline file (a data URL or base64), or of a file sent by reference."""
    if not isinstance(data, str) or not data:
        return FILE_TOKENS
    if not data.startswith("data:") and "://" in data[:16]:  # https://..., gs://...: by reference
        return FILE_TOKENS
    mt = media_type if isinstance(media_type, str) else None
    key = (len(data), hash(data), mt)
    hit = _inline_cache.get(key)
    if hit is None:
        try:
            hit = _inline_tokens(data, mt)
        except Exception:  # never let an odd file break the call: reserve as for a file by reference
            logger.debug("hive-ratelimit: could not size an inline file; reserving %d tokens", FILE_TOKENS,
                         exc_info=True)
            hit = FILE_TOKENS
        if len(_inline_cache) >= 256:
            _inline_cache.clear()
        _inline_cache[key] = hit
    return hit


_inline_cache: dict[tuple[int, int, str | None], int] = {}


def _inline_tokens(data: str, media_type: str | None) -> int:
    encoded = True
    if data.startswith("data:"):
        head, _, payload = data.partition(",")
        kind = head[5:].split(";", 1)[0].lower()
        encoded = ";base64" in head.lower()
    else:
        kind, payload = (media_type or "").lower(), data
    if encoded:
        try:
            raw = binascii.a2b_base64(payload)
        except (binascii.Error, ValueError):
            raw = payload.encode("utf-8", "replace")  # not base64: take it as it is
    else:  # a percent-encoded data URL
        raw = payload.encode("utf-8", "replace")
    if kind.startswith("image/"):
        return IMAGE_TOKENS
    if kind.startswith("text/") or kind in ("application/json", "application/xml"):
        return len(raw) // 4 + 1  # ~4 bytes per token of plain text
    if kind.startswith("audio/"):
        return _audio_tokens(raw, kind.rsplit("/", 1)[-1])
    if kind.startswith("video/"):
        return max(1, math.ceil(len(raw) / 125_000 * VIDEO_TOKENS_PER_SECOND))
    return _pdf_pages(raw) * PAGE_TOKENS  # a PDF (what providers take), or unknown: by pages


def _pdf_pages(raw: bytes) -> int:
    """Pages of a PDF: the page tree's /Count (compressed object streams inflated), bounded by the
    number of page objects when there is one (incremental updates repeat page objects; outlines
    have a /Count too), else one page per 50 kB."""
    pages = counts = 0
    for chunk in _pdf_chunks(raw):
        pages += len(_PAGE_RE.findall(chunk))
        if _PAGES_RE.search(chunk):
            counts = max(counts, max((int(n) for n in _COUNT_RE.findall(chunk)), default=0))
    if counts and pages:
        return min(counts, pages)
    return counts or pages or max(1, -(-len(raw) // _BYTES_PER_PAGE))


def _pdf_chunks(raw: bytes) -> Iterator[bytes]:
    """The file, then the inflated content of each compressed object stream (bounded)."""
    yield raw
    budget = _MAX_INFLATED  # bytes read or written: inflating costs at most this much per file
    done = 0  # where the last stream read ended: each stream is read once, whatever marks it
    view = memoryview(raw)  # (slices of it copy nothing)
    for seen, m in enumerate(_OBJSTM_RE.finditer(raw)):
        if budget <= 0 or seen >= _MAX_OBJECT_STREAMS:
            return
        s = _STREAM_RE.search(raw, m.end(), m.end() + 2048)
        if s is None or s.end() < done:
            continue
        chunk = view[s.end():s.end() + min(budget, _MAX_STREAM)]
        inflate = zlib.decompressobj()
        try:
            out = inflate.decompress(chunk, budget)
        except zlib.error:
            done, budget = s.end() + 1, budget - len(chunk)  # (how far it read is unknown: all of it)
            continue
        consumed = len(chunk) - len(inflate.unconsumed_tail) - len(inflate.unused_data)
        done, budget = s.end() + consumed, budget - max(len(out), consumed)
        yield out


#: Bytes per second of audio whose file says nothing better (128 kbit/s).
AUDIO_BYTES_PER_SECOND = 16_000


def wav_byte_rate(raw: bytes | bytearray) -> int | None:
    """The byte rate a WAV header gives (at least 8 kHz 8-bit mono's), or None if ``raw`` has none."""
    if len(raw) >= 44 and raw[:4] == b"RIFF" and raw[8:12] == b"WAVE":
        return max(int.from_bytes(raw[28:32], "little"), 8_000)
    return None


def _audio_tokens(raw: bytes, fmt: str) -> int:
    """Audio by its duration: a WAV header gives the byte rate; other formats count as 128 kbit/s."""
    rate, size = AUDIO_BYTES_PER_SECOND, len(raw)
    wav = wav_byte_rate(raw) if fmt in ("wav", "wave", "x-wav") else None
    if wav is not None:
        rate, size = wav, size - 44
    return max(1, math.ceil(size / rate * AUDIO_TOKENS_PER_SECOND))


@functools.lru_cache(maxsize=16384)  # C-implemented LRU: a hit costs a fraction of a Python-level cache's
def _cached(model: str, role: str, text: str) -> int:
    """Tokens of one message's text (cached per model, role and text)."""
    return _count_text(model, text) + _PER_MESSAGE_OVERHEAD


def count_messages(model: str, messages: Any, tools: Any = None) -> int:
    """Prompt tokens of a chat request, tool definitions included (cached per message)."""
    total = 3
    try:
        if tools:
            total += _cached(model, "tools", _dumps_sorted(tools))
        if not isinstance(messages, list):
            return total
        for m in messages:
            if type(m) is not dict and not isinstance(m, Mapping):  # (dict first: the ABC check is slow)
                continue
            role = str(m.get("role", ""))
            content = m.get("content")
            if isinstance(content, str):
                text = content
            else:
                text, media = _content(content)
                total += media
            extra = m.get("tool_calls")
            if extra:
                text += _dumps(extra)
            total += _cached(model, role, text)
    except Exception:  # an estimate never breaks a call: what was counted so far, and a warning
        logger.warning("hive-ratelimit: could not estimate a prompt's tokens; counted %d", total, exc_info=True)
    return total


def _dumps_sorted(value: Any) -> str:
    try:
        return json.dumps(value, default=str, sort_keys=True)
    except (ValueError, TypeError, RecursionError):  # (keys of mixed types cannot be sorted)
        return _dumps(value)


def count_input(model: str, value: Any) -> int:
    """Tokens of an embedding ``input`` or a text-completion ``prompt``."""
    try:
        return _count_input(model, value, 0)
    except Exception:  # an estimate never breaks a call
        logger.warning("hive-ratelimit: could not estimate an input's tokens; counted 0", exc_info=True)
        return 0


def _count_input(model: str, value: Any, depth: int) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return _count_text(model, value)
    if isinstance(value, list) and depth < _MAX_DEPTH:
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # already token ids
        return sum(_count_input(model, v, depth + 1) for v in value)
    return _count_text(model, _dumps(value))


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
            elif isinstance(item, Mapping) and isinstance(item.get("output"), list):  # an output with parts
                items.append({"role": "tool", "content": item["output"]})
            else:  # a function call, its output, a reasoning item...: counted as its JSON
                items.append({"role": "item", "content": _dumps_sorted(item)})
    elif value is not None:
        items.append({"role": "user", "content": _dumps(value)})
    return count_messages(model, items, tools)


def requested_output(kwargs: Mapping[str, Any], default: int, prompts: int = 1) -> int:
    """The output tokens a call may produce: its cap if it set one, else ``default``; times the
    completions it asks for (``n``, or ``best_of``, which the provider generates and bills all of),
    times the ``prompts`` it sends (a text completion's batch: each is answered on its own)."""
    if type(kwargs) is dict and kwargs.keys().isdisjoint(_OUTPUT_ARGS):  # (the usual call sets none of them)
        out = default * prompts
        return out if out <= _MAX_OUTPUT else _MAX_OUTPUT
    out = default
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        v = kwargs.get(name)
        if v is not None and isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out = v
            break
    n = kwargs.get("n")
    best_of = kwargs.get("best_of")
    if n is not None or best_of is not None:
        choices = max((c for c in (n, best_of) if type(c) is int and c > 1), default=1)
        out *= choices
    out *= prompts
    return out if out <= _MAX_OUTPUT else _MAX_OUTPUT


#: The arguments :func:`requested_output` reads.
_OUTPUT_ARGS = frozenset(("max_completion_tokens", "max_tokens", "max_output_tokens", "n", "best_of"))

#: A cap on the output a call is taken to ask for: ``max_tokens=10**400`` would overflow the
#: float arithmetic of its cost; any real limit refuses this much anyway.
_MAX_OUTPUT = 10**12


#: What :func:`cache_writes` returns: no prompt-cache write asked for, a 5-minute one, a 1-hour one.
NO_WRITE, WRITE_5M, WRITE_1H = 0, 1, 2


def _mark(value: Any) -> int:
    """The write a ``cache_control`` value asks for (Anthropic's ``{"type": "ephemeral", "ttl": "1h"}``)."""
    if not isinstance(value, Mapping):
        return NO_WRITE if value is None or value is False else WRITE_5M  # (no truth test: a numpy array)
    ttl = value.get("ttl")
    return WRITE_1H if isinstance(ttl, str) and ttl.strip().lower() in ("1h", "60m", "3600s") else WRITE_5M


def _marks_in(items: Any, nested: bool = True) -> int:
    """The longest write the ``cache_control`` marks in a list of messages, blocks or tools ask
    for (with ``nested``, the marks of each item's content blocks too)."""
    found = NO_WRITE
    if not isinstance(items, (list, tuple)):
        return found
    for item in items:
        if not isinstance(item, Mapping):
            continue
        mark = item.get("cache_control")
        if mark is not None:
            found = max(found, _mark(mark))
        if nested:
            found = max(found, _marks_in(item.get("content"), nested=False))
        if found == WRITE_1H:
            break
    return found


def cache_writes(kwargs: Mapping[str, Any]) -> int:
    """Whether a request may make its provider write its prompt to the prompt cache, and for how
    long: Anthropic-style ``cache_control`` marks on messages, their content blocks, the system
    prompt or tools (``function.cache_control`` too), a top-level ``cache_control``, LiteLLM's
    ``cache_control_injection_points``, or LiteLLM's automatic breakpoints
    (``litellm.enable_anthropic_prompt_caching`` or a request's ``enable_prompt_caching``, newer
    LiteLLM). Such a call may be billed its prompt at the cache-write price (1.25x the input
    price for 5 minutes, 2x for an hour), so its reservation is priced that way."""
    tools = kwargs.get("tools")
    found = max(_marks_in(kwargs.get("messages")), _marks_in(kwargs.get("system")), _marks_in(tools))
    if isinstance(tools, (list, tuple)):
        found = max(found, _marks_in([t.get("function") for t in tools if isinstance(t, Mapping)]))
    top = kwargs.get("cache_control")
    if top is not None:
        found = max(found, _mark(top))
    points = kwargs.get("cache_control_injection_points")
    if isinstance(points, (list, tuple)):
        for point in points:
            if isinstance(point, Mapping):
                found = max(found, _mark(point.get("control") or point))
    if found == NO_WRITE:
        import litellm

        auto = getattr(litellm, "enable_anthropic_prompt_caching", None)
        if auto is True or kwargs.get("enable_prompt_caching") is True:
            found = WRITE_1H if getattr(litellm, "anthropic_prompt_caching_ttl", None) == "1h" else WRITE_5M
    return found
