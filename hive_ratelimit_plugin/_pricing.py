"""Prices: LiteLLM's price map plus the user's ``rate_limiting.pricing`` overrides.

An unknown price is explicit, never a silent $0: with ``unknown_price: estimate`` the call is
priced at ``fallback_price`` (a deliberately high default) and a warning is logged once per model;
with ``unknown_price: block`` a budgeted call to such a model is refused with a message saying
how to add its price.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _fork
from ._scopes import split_model
from .config import RateLimitingConfig, match_model, match_name

logger = logging.getLogger("hive_ratelimit_plugin")


#: ``input_cost_per_token_above_200k_tokens``: LiteLLM's price-map keys of long-context tiers.
_TIER = re.compile(r"^input_cost_per_token_above_(\d+)k_tokens$")


@dataclass(frozen=True, slots=True)
class Tier:
    """The prices of a call whose prompt is longer than ``above`` tokens (long-context pricing)."""

    above: int
    input_per_token: float
    output_per_token: float
    cache_read_per_token: float | None
    cache_write_per_token: float | None
    cache_write_1h_per_token: float | None = None


@dataclass(frozen=True, slots=True)
class Price:
    """Per-token prices and where they came from. From LiteLLM's price map also the prices of
    prompt-cache reads and writes (5-minute and 1-hour) and of long-context tiers, where it has
    them; a ``pricing`` override has input and output prices and, optionally, cache prices."""

    input_per_token: float
    output_per_token: float
    source: str  # "config", "litellm" or "fallback"
    cache_read_per_token: float | None = None
    cache_write_per_token: float | None = None
    cache_write_1h_per_token: float | None = None
    tiers: tuple[Tier, ...] = ()  # longest threshold first
    #: Bills one-hour cache writes at twice the input price where the map has no such price
    #: (Anthropic's models, in older price maps); others bill any write at the write price.
    anthropic: bool = False

    @property
    def known(self) -> bool:
        return self.source != "fallback"

    @property
    def detailed(self) -> bool:
        """Whether a call's cost depends on more than its input and output token counts."""
        return (self.cache_read_per_token is not None or self.cache_write_per_token is not None
                or self.cache_write_1h_per_token is not None or bool(self.tiers))

    @property
    def prices_writes(self) -> bool:
        """Whether a prompt-cache write costs more than the input price here (a write price is known)."""
        return self.cache_write_per_token is not None or self.cache_write_1h_per_token is not None

    def cost(self, input_tokens: int, output_tokens: int, writes: int = 0) -> float:
        """A reservation's worst case: the cost of a call with no prompt-cache reads (which only
        make it cheaper) and, when it asks for prompt-cache writes (``writes``: 1 for 5 minutes,
        2 for an hour, see ``_tokens.cache_writes``) on a model with a write price, its whole
        prompt written at that price."""
        if writes and self.prices_writes:
            hour = writes > 1 and (self.cache_write_1h_per_token is not None or self.anthropic)
            return max(self.billed(input_tokens, output_tokens),
                       self.billed(input_tokens, output_tokens, 0, input_tokens, input_tokens if hour else 0))
        if self.tiers:
            return self.billed(input_tokens, output_tokens)
        return input_tokens * self.input_per_token + output_tokens * self.output_per_token

    def billed(self, prompt: int, output: int, cached: int = 0, written: int = 0, written_1h: int = 0) -> float:
        """What a provider bills for a call whose prompt of ``prompt`` tokens (all of them, as
        LiteLLM reports them) held ``cached`` tokens read from its prompt cache and ``written``
        written to it (``written_1h`` of them for an hour)."""
        inp, out, read, write = self.input_per_token, self.output_per_token, self.cache_read_per_token, \
            self.cache_write_per_token
        write_1h = self.cache_write_1h_per_token
        for t in self.tiers:
            if prompt > t.above:
                inp, out = t.input_per_token, t.output_per_token
                read = t.cache_read_per_token if t.cache_read_per_token is not None else read
                write = t.cache_write_per_token if t.cache_write_per_token is not None else write
                write_1h = t.cache_write_1h_per_token if t.cache_write_1h_per_token is not None else write_1h
                break
        cached = min(max(cached, 0), prompt)
        written = min(max(written, 0), prompt - cached)
        written_1h = min(max(written_1h, 0), written)
        write = inp if write is None else write
        if write_1h is None:  # (older price maps): Anthropic's price, twice the input's; others: the write price
            write_1h = max(write, 2 * inp) if self.anthropic else write
        return ((prompt - cached - written) * inp + cached * (inp if read is None else read)
                + (written - written_1h) * write + written_1h * write_1h + output * out)


def _from_map(info: dict[str, object], name: str = "") -> Price:
    """A :class:`Price` from one entry of LiteLLM's price map."""

    def num(key: str) -> float | None:
        v = info.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else None

    tiers = []
    for key in info:
        m = _TIER.match(key)
        tier_in = num(key) if m else None
        if m and tier_in is not None:
            k = m.group(1)
            tier_out = num(f"output_cost_per_token_above_{k}k_tokens")
            tiers.append(Tier(int(k) * 1000, tier_in,
                              tier_out if tier_out is not None else float(num("output_cost_per_token") or 0.0),
                              num(f"cache_read_input_token_cost_above_{k}k_tokens"),
                              num(f"cache_creation_input_token_cost_above_{k}k_tokens"),
                              num(f"cache_creation_input_token_cost_above_1hr_above_{k}k_tokens")))
    return Price(float(num("input_cost_per_token") or 0.0), float(num("output_cost_per_token") or 0.0), "litellm",
                 num("cache_read_input_token_cost"), num("cache_creation_input_token_cost"),
                 num("cache_creation_input_token_cost_above_1hr"),
                 tuple(sorted(tiers, key=lambda t: -t.above)),
                 "claude" in name.lower() or info.get("litellm_provider") == "anthropic")


class PriceBook:
    """Looks up and caches prices per (provider, model)."""

    def __init__(self, config: RateLimitingConfig) -> None:
        self.config = config
        self._cache: dict[tuple[str, str], Price] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        _fork.track(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # (see _fork)

    def price(self, provider: str, model: str) -> Price:
        """The price of ``model`` (with or without its provider prefix)."""
        key = (provider, model)
        found = self._cache.get(key)
        if found is None:
            found = self._lookup(provider, model)
            with self._lock:
                if len(self._cache) > 4096:
                    self._cache.clear()
                self._cache[key] = found
        return found

    def _lookup(self, provider: str, model: str) -> Price:
        bare = model[len(provider) + 1:] if model.startswith(provider + "/") else model
        names = [model, bare, f"{provider}/{bare}"]
        found = self._configured(names, match_name)
        if found is not None:
            return found
        try:
            import litellm

            table = litellm.model_cost
        except Exception:  # pragma: no cover - litellm is a dependency
            table = {}
        for name in names:
            info = table.get(name)
            if info:
                inp = info.get("input_cost_per_token")
                out = info.get("output_cost_per_token")
                if inp is not None and (inp > 0 or (out or 0) > 0):
                    return _from_map(info, name)
        # A snapshot the map does not know, priced under its undated name (claude-sonnet-4 for
        # claude-sonnet-4-20250514). After the map: a snapshot priced apart there (gpt-4o-2024-05-13
        # costs twice gpt-4o) keeps its own price.
        found = self._configured(names, match_model)
        if found is not None:
            return found
        fb = self.config.fallback_price
        return Price(fb.input_per_million / 1e6, fb.output_per_million / 1e6, "fallback")

    def _configured(self, names: list[str],
                    match: Callable[[dict[str, Any], str], tuple[str, Any] | None]) -> Price | None:
        """The ``pricing`` entry the first of ``names`` to have one has (by ``match``), if any."""
        for name in names:
            hit = match(self.config.pricing, name)
            if hit is not None:
                p = hit[1]

                def per_token(v: float | None) -> float | None:
                    return None if v is None else v / 1e6

                return Price(p.input_per_million / 1e6, p.output_per_million / 1e6, "config",
                             per_token(p.cache_read_per_million), per_token(p.cache_write_per_million),
                             per_token(p.cache_write_1h_per_million))
        return None

    def warn_unknown(self, provider: str, model: str, why: str, how: str | None = None) -> None:
        """Log once per model that its price is unknown, what policy applies, and ``how`` to price it
        (by default: ``rate_limiting.pricing``)."""
        name = f"{provider}/{model}" if not model.startswith(provider + "/") else model
        with self._lock:
            if name in self._warned:
                return
            self._warned.add(name)
        cfg = self.config
        if cfg.unknown_price == "estimate":
            fb = cfg.fallback_price
            logger.warning(
                "no price known for model %s (%s): pricing it at the fallback %s %.2f/%.2f per million "
                "input/output tokens; %s",
                name, why, cfg.budget.currency, fb.input_per_million, fb.output_per_million,
                how or f"set rate_limiting.pricing.{split_model(model, provider)} to price it exactly",
            )
        else:
            logger.warning(
                "no price known for model %s (%s): budgeted calls to it are refused (unknown_price: block); %s",
                name, why, how or f"set rate_limiting.pricing.{split_model(model, provider)} "
                               "{input_per_million, output_per_million}",
            )
