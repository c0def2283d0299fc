"""Estimating a call's tokens before it runs, cheaply.

Prompt tokens come from ``litellm.token_counter``, counted per message and cached (agents resend
the same system prompt and history on every turn, so most messages are counted once). Output
tokens are the request's ``max_tokens`` / ``max_completion_tokens``, or a configured default.
"""

from __future__ import annotations

import functools
import json
import logging
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
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, Mapping) and part.get("type") in ("image_url", "image", "input_image"):
                parts.append(_IMAGE_MARK)  # counted as IMAGE_TOKENS, not as text
            else:
                parts.append(json.dumps(part, default=str))
        return "\n".join(parts)
    if content is None:
        return ""
    return json.dumps(content, default=str)


#: Tokens reserved per image part: a high-detail image costs 765+ tokens on gpt-4o, up to ~1.6k
#: on Claude; reserving too much is settled back after the call, too little risks a 429.
IMAGE_TOKENS = 1600
_IMAGE_MARK = "\x00image\x00"


@functools.lru_cache(maxsize=16384)  # C-implemented LRU: a hit costs a fraction of a Python-level cache's
def _cached(model: str, role: str, text: str) -> int:
    """Tokens of one message (cached per model, role and text)."""
    images = text.count(_IMAGE_MARK)
    if images:
        text = text.replace(_IMAGE_MARK, "")
    return _count_text(model, text) + _PER_MESSAGE_OVERHEAD + images * IMAGE_TOKENS


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
