"""Prices: LiteLLM's price map plus the user's ``rate_limiting.pricing`` overrides.

An unknown price is explicit, never a silent $0: with ``unknown_price: estimate`` the call is
priced at ``fallback_price`` (a deliberately high default) and a warning is logged once per model;
with ``unknown_price: block`` a budgeted call to such a model is refused with a message saying
how to add its price.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from . import _fork
from .config import RateLimitingConfig, match_name

logger = logging.getLogger("hive_ratelimit_plugin")


@dataclass(frozen=True, slots=True)
class Price:
    """Per-token prices and where they came from."""

    input_per_token: float
    output_per_token: float
    source: str  # "config", "litellm" or "fallback"

    @property
    def known(self) -> bool:
        return self.source != "fallback"

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return input_tokens * self.input_per_token + output_tokens * self.output_per_token


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
        for name in names:
            hit = match_name(self.config.pricing, name)
            if hit is not None:
                p = hit[1]
                return Price(p.input_per_million / 1e6, p.output_per_million / 1e6, "config")
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
                    return Price(float(inp), float(out or 0.0), "litellm")
        fb = self.config.fallback_price
        return Price(fb.input_per_million / 1e6, fb.output_per_million / 1e6, "fallback")

    def warn_unknown(self, provider: str, model: str, why: str) -> None:
        """Log once per model that its price is unknown and what policy applies."""
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
                "input/output tokens; set rate_limiting.pricing.%s to price it exactly",
                name, why, cfg.budget.currency, fb.input_per_million, fb.output_per_million, model,
            )
        else:
            logger.warning(
                "no price known for model %s (%s): budgeted calls to it are refused (unknown_price: block); "
                "set rate_limiting.pricing.%s {input_per_million, output_per_million}",
                name, why, model,
            )
