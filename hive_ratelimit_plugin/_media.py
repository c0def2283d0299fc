"""Calls that providers bill per unit, not per token: images (generated or edited), speech,
transcription, rerank.

Such a call counts as one request and holds one concurrency slot at every level that applies; it
counts no tokens (its usage, where a provider reports one, is settled like any other). Its money
comes from LiteLLM's price map, by the unit the map prices it in:

* an image: ``output_cost_per_image``, or ``input_cost_per_pixel`` times its size, from the
  entry for its quality and size (``hd/1024-x-1792/dall-e-3``) or for the model, times ``n``;
* speech: ``input_cost_per_character`` times the length of ``input``;
* a transcription: ``input_cost_per_second`` times the audio's duration, which before the call
  is estimated from the file's size (128 kbit/s; a WAV header's byte rate when there is one);
* a rerank: ``input_cost_per_query``.

That is the estimate a budget is checked against before the call. After it, the call is settled
at the cost LiteLLM computed for the response (``response_cost``), which knows the real duration
and sizes. Where the map has no such price (a model priced per token only, like ``gpt-image-1``'s
image tokens), the estimate is the highest cost a call to that model has settled at so far in
this process, and 0 for the first one: a budget is then checked after that first call.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from typing import Any

from . import _fork
from ._tokens import AUDIO_BYTES_PER_SECOND, wav_byte_rate

#: LiteLLM's call types of such calls, with the family their price rule belongs to.
FAMILIES = {
    "image_generation": "image", "aimage_generation": "image", "image_edit": "image", "aimage_edit": "image",
    "speech": "speech", "aspeech": "speech",
    "transcription": "transcription", "atranscription": "transcription",
    "rerank": "rerank", "arerank": "rerank",
}
CALL_TYPES = frozenset(FAMILIES)
#: The response classes LiteLLM returns for them (by name: one of them lives in a different module
#: in each LiteLLM version).
RESPONSES = frozenset({"ImageResponse", "HttpxBinaryResponseContent", "TranscriptionResponse", "RerankResponse"})


def is_media(response: Any) -> bool:
    """Whether ``response`` answers a call billed per unit."""
    return type(response).__name__ in RESPONSES


_MAX_SEEN = 4096


def _num(info: Mapping[str, Any] | None, key: str) -> float | None:
    v = info.get(key) if info else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else None


def _bare(provider: str, model: str) -> str:
    return model[len(provider) + 1:] if model.startswith(provider + "/") else model


def map_entry(provider: str, model: str) -> dict[str, Any] | None:
    """LiteLLM's price-map entry for ``model`` (with or without its provider prefix), if any."""
    return _entry(provider, model, _bare(provider, model))


def _entry(provider: str, *names: str) -> dict[str, Any] | None:
    """The first entry of LiteLLM's price map found under one of ``names``, as given or with
    ``provider``'s prefix."""
    import litellm

    table = litellm.model_cost
    for name in names:
        info = table.get(name) or table.get(f"{provider}/{name}")
        if info:
            return dict(info)
    return None


def _image_size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, str):
        parts = value.lower().replace("-x-", "x").split("x")
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            return int(parts[0]), int(parts[1])
    return None


def _image(provider: str, model: str, kwargs: Mapping[str, Any]) -> float | None:
    bare = _bare(provider, model)
    n = kwargs.get("n")
    n = n if type(n) is int and n > 0 else 1
    size = _image_size(kwargs.get("size")) or (1024, 1024)
    quality = kwargs.get("quality")
    # (no quality given: the dearest the map has for this size, the provider's default being unknown)
    qualities = [quality] if isinstance(quality, str) and quality else ["standard", "hd", "high", "medium", "low"]
    tiers = [_entry(provider, f"{q}/{size[0]}-x-{size[1]}/{bare}") for q in qualities]
    for infos in (tiers, [_entry(provider, f"{size[0]}-x-{size[1]}/{bare}")], [map_entry(provider, model)]):
        prices = [p for p in (_per_image(info, size) for info in infos) if p]
        if prices:
            return max(prices) * n
    return None


def _per_image(info: Mapping[str, Any] | None, size: tuple[int, int]) -> float | None:
    per_image = _num(info, "output_cost_per_image") or _num(info, "input_cost_per_image")
    if per_image:
        return per_image
    per_pixel = _num(info, "input_cost_per_pixel")
    return per_pixel * size[0] * size[1] if per_pixel else None


def _file_size(file: Any) -> int | None:
    """The byte length of a transcription's ``file`` (bytes, a ``(name, content, ...)`` tuple, an
    open file or a path), or None."""
    if isinstance(file, tuple) and len(file) >= 2:
        file = file[1]
    if isinstance(file, (bytes, bytearray, memoryview)):
        return len(file)
    if isinstance(file, (str, os.PathLike)):
        try:
            return os.path.getsize(file)
        except (OSError, ValueError):
            return None
    buffer = getattr(file, "getbuffer", None)  # io.BytesIO
    try:
        if buffer is not None:
            return int(buffer().nbytes)
        return os.fstat(file.fileno()).st_size
    except Exception:  # (no size to be had: no estimate from it)
        return None


def audio_seconds(file: Any) -> float | None:
    """A transcription's duration, estimated from its file: a WAV header's byte rate, else 128 kbit/s."""
    size = _file_size(file)
    if size is None:
        return None
    head = file[1] if isinstance(file, tuple) and len(file) >= 2 else file
    wav = wav_byte_rate(head) if isinstance(head, (bytes, bytearray)) else None
    return size / (wav or AUDIO_BYTES_PER_SECOND)


def unit_cost(family: str, provider: str, model: str, kwargs: Mapping[str, Any]) -> float | None:
    """The cost of a call by LiteLLM's per-unit price for it, or None if the map has no such price."""
    if family == "image":
        return _image(provider, model, kwargs)
    info = map_entry(provider, model)
    if family == "speech":
        per_char = _num(info, "input_cost_per_character")
        text = kwargs.get("input")
        return per_char * len(text) if per_char is not None and isinstance(text, str) else None
    if family == "rerank":
        return _num(info, "input_cost_per_query")
    if family == "transcription":
        per_second = _num(info, "input_cost_per_second")
        seconds = audio_seconds(kwargs.get("file"))
        if per_second is None:
            return None
        return per_second * math.ceil(seconds) if seconds is not None else None
    return None


def litellm_cost(response: Any, logged: Any = None) -> float | None:
    """The cost LiteLLM computed for a finished call: ``logged`` (the ``response_cost`` its
    logging hooks see) or the one it keeps in the response's hidden parameters; None if neither."""
    for value in (logged, (getattr(response, "_hidden_params", None) or {}).get("response_cost")):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            return float(value)
    return None


class SeenCosts:
    """The highest settled cost per (provider, model): the estimate where no unit price is known."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        _fork.track(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # (see _fork)

    def get(self, provider: str, model: str) -> float:
        return self._seen.get((provider, model), 0.0)

    def note(self, provider: str, model: str, cost: float) -> None:
        key = (provider, model)
        with self._lock:
            if cost > self._seen.get(key, 0.0):
                if len(self._seen) >= _MAX_SEEN:
                    self._seen.clear()
                self._seen[key] = cost
