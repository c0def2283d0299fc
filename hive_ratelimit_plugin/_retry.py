"""Reading providers' rate-limit signals, and backoff. Pure functions; ``now`` is passed in.

Headers understood (case-insensitive; LiteLLM's ``llm_provider-`` prefix is accepted too):

* ``retry-after``: seconds (``"7"``, ``"1.5"``) or an HTTP date (sent twice, ``"5, 10"``: the longer);
* ``retry-after-ms``: milliseconds;
* ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens``: OpenAI durations (``"1s"``,
  ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``);
* ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset``: RFC 3339 times;
* ``x-ratelimit-limit-*`` / ``x-ratelimit-remaining-*`` and Anthropic's ``-limit`` / ``-remaining``.

Malformed, negative or huge values never raise: they are ignored or clamped to ``[0, cap]``.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")


def _headers(raw: Any) -> dict[str, str]:
    """Lower-cased header dict from a Mapping/httpx.Headers/list of pairs; ``llm_provider-`` stripped."""
    out: dict[str, str] = {}
    if raw is None:
        return out
    try:
        items = list(raw.items()) if hasattr(raw, "items") else list(raw)
    except Exception:
        return out
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], str):
            continue
        k, v = item
        key = k.lower()
        if key.startswith("llm_provider-"):
            key = key[len("llm_provider-"):]
        out.setdefault(key, str(v))
    return out


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


def parse_seconds(value: str) -> float | None:
    """``"7"``, ``"1.5"`` -> seconds; anything else -> ``None``."""
    try:
        x = float(value.strip())
    except (ValueError, AttributeError):
        return None
    return x if _finite(x) else None


def parse_http_date(value: str, now: float) -> float | None:
    """An HTTP date -> seconds from ``now``."""
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp() - now


def parse_duration(value: str) -> float | None:
    """OpenAI's ``"6m0s"``, ``"1s"``, ``"20ms"``, ``"1h2m3.5s"`` (or plain seconds) -> seconds."""
    v = value.strip().lower()
    if not v:
        return None
    plain = parse_seconds(v)
    if plain is not None:
        return plain
    m = _DURATION.match(v)
    if not m or not any(m.groups()):
        return None
    h, mi, s, ms = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def parse_rfc3339(value: str, now: float) -> float | None:
    """``2026-11-28T17:30:00Z`` -> seconds from ``now``."""
    try:
        when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp() - now


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        x = float(value.strip())
    except ValueError:
        return None
    if not _finite(x) or x < 0:
        return None
    return int(x)


@dataclass(slots=True)
class RateSignals:
    """What a provider's headers say about its limits."""

    retry_after: float | None = None  # seconds to wait, clamped to [0, cap]
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None
    learn_tokens: bool = True  # False: the token headers give no limit to hold calls to (Anthropic's)
    limit_input_tokens: int | None = None  # Anthropic's input tokens per minute (cache reads not counted)
    limit_output_tokens: int | None = None  # Anthropic's output tokens per minute

    def exhausted(self) -> list[tuple[str, float, float]]:
        """``(what, reset, wait)`` for each limit (``requests``, ``tokens``) the provider says is
        used up: the time until it is back to its full value, and until the next request is
        possible (reset / limit, providers refill continuously; the whole reset without a limit)."""
        out = []
        for what, left, reset, limit in (
                ("requests", self.remaining_requests, self.reset_requests, self.limit_requests),
                ("tokens", self.remaining_tokens, self.reset_tokens, self.limit_tokens)):
            if left == 0 and reset:
                out.append((what, reset, reset / limit if limit else reset))
        return out


def read_signals(raw_headers: Any, now: float, cap: float = 600.0) -> RateSignals:
    """Parse every rate-limit header we know. Never raises.

    Args:
        raw_headers: response headers in any mapping-like form.
        now: epoch seconds (for HTTP dates and RFC 3339 times).
        cap: upper bound for any wait read from a header.
    """
    h = _headers(raw_headers)
    sig = RateSignals()

    def clamp(x: float | None) -> float | None:
        if x is None or not _finite(x):
            return None
        return min(max(x, 0.0), cap)

    waits: list[float] = []
    ms = h.get("retry-after-ms")
    if ms is not None:
        x = parse_seconds(ms)
        if x is not None and x >= 0:  # (a negative one is malformed: retry-after, if any, decides)
            waits.append(x / 1000)
    ra = h.get("retry-after")
    if ra is not None and not waits:
        x = parse_seconds(ra)
        if x is None:
            x = parse_http_date(ra, now)
        if x is None and "," in ra:  # the header sent twice, joined by the HTTP client ("5, 10"): the longer
            parts = [parse_seconds(p) for p in ra.split(",")]
            seconds = [p for p in parts if p is not None and p >= 0]
            x = max(seconds) if len(seconds) == len(parts) else None
        if x is not None and (x >= 0 or ra.strip()[:1].isalpha()):
            waits.append(x)  # a negative number is malformed; a date in the past means "now"
    sig.retry_after = clamp(waits[0]) if waits else None

    sig.limit_requests = _int(h.get("x-ratelimit-limit-requests") or h.get("anthropic-ratelimit-requests-limit"))
    sig.remaining_requests = _int(h.get("x-ratelimit-remaining-requests")
                                  or h.get("anthropic-ratelimit-requests-remaining"))
    sig.limit_tokens = _int(h.get("x-ratelimit-limit-tokens") or h.get("anthropic-ratelimit-tokens-limit"))
    if "anthropic-ratelimit-tokens-limit" in h or "anthropic-ratelimit-input-tokens-limit" in h \
            or "anthropic-ratelimit-output-tokens-limit" in h:
        # Anthropic's "tokens" headers (which LiteLLM also copies to x-ratelimit-*-tokens) give the
        # most restrictive of its input and output limits (cached input not counted): not a limit
        # on input plus output tokens. Held to, it refused a 12k-token prompt under a 40k input
        # limit (its 8k output limit). Not learned; a "0 remaining" still waits for the reset.
        sig.limit_tokens = None
        sig.learn_tokens = False
        # Its input-token limit is one: the prompt tokens a minute, less those read from the cache
        # (an input_tokens_per_minute limit, learned as learned_input_tokens_per_minute).
        sig.limit_input_tokens = _int(h.get("anthropic-ratelimit-input-tokens-limit"))
        # So is its output-token limit: the completion tokens a minute (an output_tokens_per_minute
        # limit, learned as learned_output_tokens_per_minute).
        sig.limit_output_tokens = _int(h.get("anthropic-ratelimit-output-tokens-limit"))
    sig.remaining_tokens = _int(h.get("x-ratelimit-remaining-tokens") or h.get("anthropic-ratelimit-tokens-remaining"))
    rr = h.get("x-ratelimit-reset-requests")
    sig.reset_requests = clamp(parse_duration(rr)) if rr else None
    if sig.reset_requests is None and h.get("anthropic-ratelimit-requests-reset"):
        sig.reset_requests = clamp(parse_rfc3339(h["anthropic-ratelimit-requests-reset"], now))
    rt = h.get("x-ratelimit-reset-tokens")
    sig.reset_tokens = clamp(parse_duration(rt)) if rt else None
    if sig.reset_tokens is None:
        for name in ("anthropic-ratelimit-tokens-reset", "anthropic-ratelimit-input-tokens-reset",
                     "anthropic-ratelimit-output-tokens-reset"):
            if h.get(name):
                sig.reset_tokens = clamp(parse_rfc3339(h[name], now))
                break
    return sig


def suggested_wait(sig: RateSignals) -> float | None:
    """How long a 429 asks us to wait: Retry-After, else the relevant reset time."""
    if sig.retry_after is not None:
        return sig.retry_after
    resets = []
    if sig.remaining_requests == 0 and sig.reset_requests is not None:
        resets.append(sig.reset_requests)
    if sig.remaining_tokens == 0 and sig.reset_tokens is not None:
        resets.append(sig.reset_tokens)
    if resets:
        return max(resets)
    candidates = [x for x in (sig.reset_requests, sig.reset_tokens) if x is not None]
    return min(candidates) if candidates else None


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(cap, base * 2**attempt)]``."""
    r = rng.random() if rng is not None else random.random()
    return float(r * min(cap, base * 2.0 ** max(attempt, 0)))


def is_rate_limit(exc: BaseException) -> bool:
    """A provider's 429, or Anthropic's 529 "overloaded" (LiteLLM maps it to a 500)."""
    status = getattr(exc, "status_code", None)
    if status == 429 or status == 529:
        return True
    name = type(exc).__name__
    if name == "RateLimitError":
        return True
    return status in (500, 503) and "overloaded" in str(exc).lower()


def is_transient(exc: BaseException) -> bool:
    """5xx and timeouts: failures that count toward a circuit breaker."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and status >= 500:
        return True
    name = type(exc).__name__
    return name in ("Timeout", "APITimeoutError", "APIConnectionError", "ServiceUnavailableError",
                    "InternalServerError", "TimeoutError")


# Errors after which a sent request may still have been served (and billed): the answer was not
# seen, not refused. (LiteLLM gives a timeout status 408 and a lost connection 500 of its own.)
_UNSEEN = frozenset({"Timeout", "APITimeoutError", "APIConnectionError", "ReadTimeout", "WriteTimeout",
                     "ReadError", "WriteError", "RemoteProtocolError", "MidStreamFallbackError",
                     "TimeoutError", "CancelledError",
                     "JSONDecodeError"})  # (an answer that could not be read: it may have been served)
# Errors that show the request never reached the provider.
_NOT_SENT = frozenset({"ConnectError", "ConnectTimeout", "PoolTimeout"})
# Errors that carry the provider's HTTP answer (an error status, 408 and 504 included): it was
# seen, and providers do not bill those.
_ANSWERED = frozenset({"HTTPStatusError", "APIStatusError"})
# Where a provider's refusal, or a transport's failure, comes from. An error with none of these
# in its chain (nor an OSError) did not come from the provider or the connection: raised after
# the send by code around it (another callback's hook, a bug in a response's handling), it says
# nothing of whether the provider served the request.
_HTTP_STACK = frozenset({"litellm", "openai", "anthropic", "httpx", "httpcore", "h11", "h2", "aiohttp",
                         "requests", "urllib3", "botocore", "boto3", "google", "websockets"})


def outcome_unseen(exc: BaseException | None, prior: BaseException | None = None) -> bool:
    """Whether a call that was sent and ended with ``exc`` may have been served all the same:
    cancelled (``None``, or an interruption) or cut off by a timeout or a lost connection, unless
    the error shows the connection was never made or carries the provider's answer; or ended with
    an error that came neither from the provider nor from the connection (see ``_HTTP_STACK``).

    The error's chain is read down to the transport's error, and no further: past it lie earlier
    attempts' errors (a retry made inside an ``except`` block: ``prior``, the error being handled
    when the attempt began, or a LiteLLM error below a transport one)."""
    if exc is None or not isinstance(exc, Exception):
        return True
    seen: set[int] = set()
    unseen = transport = http = False
    e: BaseException | None = exc
    while e is not None and e is not prior and id(e) not in seen and len(seen) < 16:
        seen.add(id(e))
        cls = type(e)
        if transport and cls.__module__ == "litellm.exceptions":
            break  # an earlier attempt's
        top = cls.__module__.split(".", 1)[0]
        ours = top == "litellm"
        if not ours:
            transport = True
        if not http and (top in _HTTP_STACK or isinstance(e, OSError)):
            http = True
        names = {c.__name__ for c in cls.__mro__}
        # (LiteLLM's own errors all derive from the SDK's status errors, a lost connection's 500
        # included: what was seen is read from the errors below them, where there are any)
        if names & _NOT_SENT or (names & _ANSWERED and not (ours and (e.__cause__ or e.__context__))):
            return False
        if cls.__name__ in _UNSEEN or isinstance(e, TimeoutError):
            unseen = True
        e = e.__cause__ or e.__context__
    return unseen or not http


def response_headers(obj: Any) -> Mapping[str, Any] | None:
    """Headers of a LiteLLM exception or response, wherever LiteLLM put them."""
    if isinstance(obj, BaseException):
        h = getattr(obj, "litellm_response_headers", None)
        if not h:
            h = getattr(getattr(obj, "response", None), "headers", None)
        if not h:  # LiteLLM 1.83's unmapped provider error (the messages API's): headers of its own
            h = getattr(obj, "headers", None)
        return h if h and isinstance(h, Mapping) else None
    # A response: look only where LiteLLM puts headers (missing attributes on pydantic models
    # are slow to probe).
    # Pydantic keeps private attributes in __pydantic_private__; reading them there skips its
    # __getattr__ fallback (~1-2 µs per call).
    private = getattr(obj, "__pydantic_private__", None)
    hidden = private.get("_hidden_params") if type(private) is dict else None
    if hidden is None:
        hidden = getattr(obj, "_hidden_params", None)
    if type(hidden) is dict or isinstance(hidden, Mapping):  # (dict first: the ABC check is slow)
        h = hidden.get("additional_headers")
        return h if h else None
    return None
