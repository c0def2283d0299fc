"""``HiveLimiter``: the LiteLLM callback. The only module that touches LiteLLM internals.

How a call is held (see docs/architecture.md for the verified LiteLLM facts):

* async entry points (``acompletion``, ``aembedding``, ``atext_completion``, Router async):
  ``async_pre_call_deployment_hook`` is awaited on the caller's loop before the HTTP request, so
  it waits in the queue there, or raises and no request is sent.
* sync entry points (``completion``, ``embedding``, ``text_completion``, Router sync): LiteLLM
  swallows exceptions from every sync pre-call hook, so a guard around ``litellm.completion``,
  ``litellm.embedding`` and ``litellm.text_completion`` (installed once per process, active only
  while a ``HiveLimiter`` is registered) admits the call on the caller's thread.
* usage is settled from the response inline (success deployment hook / the guard), or for
  streams from the final event; failures and cancellations release; a stream the caller abandons
  is reclaimed when its lease expires.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import copy
import dataclasses
import difflib
import functools
import hashlib
import inspect
import itertools
import logging
import math
import numbers
import os
import queue
import re
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import litellm
from litellm.exceptions import BudgetExceededError as _LiteLLMBudgetExceeded
from litellm.integrations.custom_logger import CustomLogger

from . import _fork, _media, _observe
from . import status as _status
from ._budget import WINDOW_ADJECTIVE, RunawayDetector, SpendRow, dim_keys, money, run_key
from ._engine import NEVER, Engine, Scope, Ticket
from ._ledger import MAX_UNSAVED, Ledger, default_state_path
from ._pricing import PriceBook
from ._retry import (
    backoff,
    is_rate_limit,
    is_transient,
    outcome_unseen,
    read_signals,
    response_headers,
    suggested_wait,
)
from ._scopes import Identity, ScopeResolver, resolve_identity, split_model, with_context_identity
from ._scopes import scope as _scope_cm
from ._tokens import NO_WRITE, cache_writes, count_input, count_messages, count_response_input, requested_output
from ._waiting import acquire_sync, queue_async
from .config import MAX_ID, LimitSet, RateLimitingConfig, clean_id, load_config, match_block, match_model_block
from .errors import ConfigError, HiveRateLimitError, RateLimitQueueTimeout

__all__ = ["HiveLimiter"]

logger = logging.getLogger("hive_ratelimit_plugin")
_observe.install(logger)  # repeated lines summarised, secrets redacted
_status.PUBLISHER.tick_hooks.append(_observe.SUMMARY.flush)

_EMBEDDING_TYPES = frozenset({"embedding", "aembedding"})
_TEXT_TYPES = frozenset({"text_completion", "atext_completion"})
_RESPONSES_TYPES = frozenset({"responses", "aresponses"})
_ANTHROPIC_TYPES = frozenset({"anthropic_messages"})
#: counted otherwise (media: images, speech, transcription and rerank, priced per unit: see _media)
_NOT_CHAT_TYPES = _EMBEDDING_TYPES | _TEXT_TYPES | _RESPONSES_TYPES | _ANTHROPIC_TYPES | _media.CALL_TYPES
#: An endpoint's scope has no limits of its own: it carries what its provider says (see _endpoint_scopes).
_ENDPOINT_LIMITS = LimitSet()
_SERVED_BY_MANY = object()  # a model seen served by more than one endpoint
_SKIP_TYPES = frozenset({"moderation", "amoderation"})  # (providers do not bill them)
_CHAT_RESPONSE = litellm.ModelResponse  # (the usual response: one identity test tells it is not media)

# Set while a sync guard is running a call, so nested LiteLLM entry points (text_completion ->
# completion, on this thread; an async one LiteLLM runs for it) know the call is already held.
_guarded_call: ContextVar[_Held | None] = ContextVar("hive_ratelimit_guarded_call", default=None)
#: What tells LiteLLM calling itself inside a guarded call (text_completion -> completion, its SDK
#: fallbacks' tries) from a call a callback makes while the call runs (an LLM judge in a sync
#: ``log_pre_api_call`` or in a failure callback, which LiteLLM runs inline, inside the guard): the
#: former carry the call's logging object in their keywords, the latter start afresh without one
#: and are calls of their own (admitted, counted, retried). (Was: such a sync call was sent
#: unadmitted and uncounted, and an async one's 429 was not retried.)
_LOGGING_OBJ = "litellm_logging_obj"


class _Held:
    """A sync guarded call in progress, as :data:`_guarded_call` holds it. A thread LiteLLM starts
    with a copy of the call's context (its success logging, whose callbacks may make calls of
    their own, an LLM judge's) sees it too: such a call is one of its own. A sync entry point
    called on another thread, or once the guard has returned (``closed``), is admitted."""

    __slots__ = ("closed", "frame", "thread")

    def __init__(self, frame: Any) -> None:
        self.thread = threading.get_ident()
        self.closed = False
        self.frame = frame  # (the guard's: see _litellm_calling_itself)


#: LiteLLM's modules whose code is a callback's (its integrations, the proxy's hooks and
#: guardrails): a call made there is one of its own, as a user callback's is.
_CALLBACK_MODULES = ("litellm.integrations.", "litellm.proxy.")


def _litellm_calling_itself(frame: Any, outer: Any) -> bool:
    """Whether every frame from ``frame`` (a guard's caller) up to ``outer`` (the running guarded
    call's guard) is LiteLLM's own code: LiteLLM calling an entry point for the call without its
    logging object (a semantic cache embedding the prompt: ``litellm.embedding`` in
    ``get_cache`` / ``set_cache``). A frame of other code on the way (a callback's: an LLM judge in
    ``log_pre_api_call``, or in a failure callback) makes it a call of its own. Read only where
    the mark is open and the logging object missing."""
    depth = 0
    while frame is not None and frame is not outer and depth < 400:
        module = frame.f_globals.get("__name__") or ""
        if not (module == "litellm" or module.startswith("litellm.")) or module.startswith(_CALLBACK_MODULES):
            return False
        frame = frame.f_back
        depth += 1
    return frame is outer and outer is not None


_MAX_PROVIDER_WAIT = 3600.0  # absurd Retry-After values are clamped to this
_LONG_PROVIDER_WAIT = 10.0  # a wait for a provider's reset this long is logged
#: Responses API turns remembered per limiter (~100 bytes each) for ``previous_response_id``.
_MAX_TURNS = 10_000
_ID_REUSE_SECONDS = 120.0  # a call id a caller gave is not reused for another call this soon (see _claim_call_id)
_MAX_GIVEN_IDS = 16_384  # caller-given ids remembered for that (~2.5 MB at most)
# While a call is being retried: the engine-clock time by which its admission must finish.
_wait_budget: ContextVar[float | None] = ContextVar("hive_ratelimit_wait_budget", default=None)
# Set while an async guard runs its call: a one-item list where the pre-call hook notes the id it
# admitted the current attempt under (LiteLLM assigns the id itself: passing our own costs LiteLLM
# 1.110 ~19k CPU instructions per call), so that a failed or cancelled attempt is released at once.
_in_async_guard: ContextVar[_Admitted | None] = ContextVar("hive_ratelimit_in_async_guard", default=None)


class _Admitted(list):  # type: ignore[type-arg]  # (list[str | None])
    """What :data:`_in_async_guard` holds: the ids a guarded call's attempts were admitted under.
    ``closed`` once the guard has returned: a task the call started sees the list still (LiteLLM's
    success logging, whose callbacks may make calls of their own, an LLM judge's), and a call made
    there is a call of its own, not one LiteLLM makes for the finished call."""

    closed = False


# Set while LiteLLM's SDK fallbacks make their tries (see _sdk_fallbacks): what the tries need of the
# call around them (see _FallbackCall).
_fallback_call: ContextVar[_FallbackCall | None] = ContextVar("hive_ratelimit_fallback_call", default=None)


class _FallbackCall:
    """A call with SDK fallbacks, for its tries (:func:`_nested_async`): the retries of a failed
    try the caller asked for (``num_retries``: the guard took them from LiteLLM, which would have
    retried each try; made here, each one admitted), and the limiter's own refusal of the last try
    if it was refused (LiteLLM turns the last try's error into a bare ``Exception`` carrying only its
    text; the guard raises the refusal itself, RateLimitQueueTimeout or BudgetExceededError, as it
    would without fallbacks)."""

    __slots__ = ("asked", "limiter", "refusal", "started")

    def __init__(self, limiter: HiveLimiter, started: float, asked: int) -> None:
        self.limiter = limiter
        self.started = started
        self.asked = asked
        self.refusal: BaseException | None = None


def _seed_call_ids() -> None:
    global _id_prefix, _id_counter
    # "xxxxxxxx-xxxx-4xxx-yxxx-" from a random UUID, then a 12-digit hex counter from a random
    # start: the shape of a UUID, unique per process, without a getrandom() syscall per call
    # (uuid4() costs that; on some VMs it is slow).
    _id_prefix = str(uuid.uuid4())[:24]
    _id_counter = itertools.count(int.from_bytes(os.urandom(5), "big"))


_id_prefix = ""
_id_counter = itertools.count()
_limiter_ids = itertools.count(1)
_seed_call_ids()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_seed_call_ids)  # a forked worker must not repeat the parent's ids


def new_call_id() -> str:
    """A fresh ``litellm_call_id`` for a call that came without one."""
    return _id_prefix + "%012x" % (next(_id_counter) & 0xFFFFFFFFFFFF)  # (%: cheaper than a format spec)


def _exception_of(kwargs: Mapping[str, Any], response_obj: Any) -> BaseException | None:
    exc = kwargs.get("exception")
    if isinstance(exc, BaseException):
        return exc
    return response_obj if isinstance(response_obj, BaseException) else None


class _Unset:
    """Marks an omitted argument (``None`` means "remove")."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def _budget_view(cfg: RateLimitingConfig) -> dict[str, Any]:
    """Every budget setting, flattened (for change detection and the audit log)."""
    out: dict[str, Any] = {}
    b = cfg.budget
    for name in ("max_hourly_spend", "max_daily_spend", "max_monthly_spend"):
        if getattr(b, name) is not None:
            out[f"budget.{name}"] = getattr(b, name)
    out["budget.currency"] = b.currency
    fields = ("max_cost_per_hour", "max_cost_per_day", "max_cost_per_month", "max_cost_per_run",
              "max_requests_per_run")
    blocks: list[tuple[str, Any]] = [("global", cfg.global_)]
    for p, pconf in cfg.providers.items():
        blocks.append((f"providers.{p}", pconf))
        blocks.extend((f"providers.{p}.{m}", mconf) for m, mconf in pconf.models.items())
    for level, table in (("agents", cfg.agents), ("users", cfg.users), ("teams", cfg.teams)):
        blocks.extend((f"{level}.{name}", blk) for name, blk in table.items())
    for path, blk in blocks:
        for name in fields:
            v = getattr(blk, name, None)
            if v is not None:
                out[f"{path}.{name}"] = v
    return out


def _own_block(table: dict[str, Any], name: str,
               match: Callable[[dict[str, Any], str], tuple[str, Any] | None]) -> dict[str, Any]:
    """``table``'s block for ``name`` (a configuration dumped to a dict), made if it has none.

    A new block starts as a copy of the one that governed ``name`` until now (``match``: the
    resolver's own rule, so a glob such as ``"*"``, or the model under its ``provider/`` name or
    its undated name): the block ``name``
    gets wins over that one wholly, and a budget set alone would drop its other limits.
    """
    if name not in table:
        found = match(table, name)
        table[name] = copy.deepcopy(found[1]) if found is not None else {}
    return table[name]  # type: ignore[no-any-return]


class UsageStats(dict[str, Any]):
    """What :meth:`HiveLimiter.get_usage_stats` returns: a dict whose top-level keys also read as
    attributes (``usage.cost_today``, as the specification writes it)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"usage stats have no {name!r}") from None


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    return value


def _who(scope: str) -> str:
    level, _, name = scope.partition(":")
    return "global" if level == "global" else f"{level} {name}"


def _log_event(event: dict[str, Any]) -> None:
    kind = event.get("type")
    if kind in ("budget_warning", "budget_exceeded") and event.get("budget") == "max_requests_per_run":
        # A cap on requests, not money, and a run has no window that rolls over.
        used = f"{event['spent']:g} of {event['limit']:g} requests"
        if kind == "budget_warning":
            logger.warning("%d%% of the per-run request cap used: %s (%s)", round(event["threshold"] * 100),
                           used, _who(event["scope"]))
        else:
            logger.warning("Per-run request cap reached: %s (%s); the run's calls are stopped until the cap is "
                           "raised or reset", used, _who(event["scope"]))
    elif kind == "budget_warning":
        logger.warning(
            "%d%% of %s budget consumed: %s of %s (%s)",
            round(event["threshold"] * 100), WINDOW_ADJECTIVE.get(event["window"], event["window"]),
            money(event["spent"], event["currency"]), money(event["limit"], event["currency"]),
            _who(event["scope"]),
        )
    elif kind == "budget_exceeded":
        logger.warning(
            "%s budget spent: %s of %s (%s); calls there are stopped until %sthe budget is raised or reset",
            WINDOW_ADJECTIVE.get(event["window"], event["window"]).capitalize(),
            money(event["spent"], event["currency"]), money(event["limit"], event["currency"]),
            _who(event["scope"]), "" if event["window"] == "run" else "the window rolls over or ",
        )
    elif kind == "runaway_detected":
        logger.error("agent %s asked for the same request %d times within %.0fs (the last one not sent): its "
                     "breaker is open for %.0fs",
                     event["agent_id"], event["count"], event["window_seconds"], event["cooldown_seconds"])
    elif kind == "budget_changed":
        logger.info("budget %s on %s: %s -> %s", event["action"], event["scope"], event["old"], event["new"])
    elif kind == "provider_429":
        wait = event["retry_after"]
        logger.warning("provider %s answered 429 for %s (%s)%s", event["provider"], event["model"],
                       "retried" if event["retried"] else "not retried",
                       f"; the provider asked to wait {wait:.1f}s" if wait is not None else "",
                       # (retried and not retried apart: a summary repeats its last line's words)
                       extra={"hive_repeat_key": ("429", event["provider"], event["model"], event["retried"])})
    elif kind == "circuit_opened":
        logger.warning("circuit breaker of %s opened after %d consecutive provider failures; a probe goes "
                       "through in %.0fs", event["scope"], event["failures"], event["seconds"],
                       extra={"hive_repeat_key": ("circuit", event["scope"])})
    elif kind == "circuit_closed":
        logger.info("circuit breaker of %s closed: the probe succeeded", event["scope"])
    elif kind == "queue_timeout" and event["scope"] == "queue" and event["limit"] == "max_size":
        logger.warning("call refused: the queue is full (queue.max_size calls waiting; no request sent)",
                       extra={"hive_repeat_key": ("queue_timeout", "queue")})
    elif kind == "queue_timeout":
        logger.warning("call held by %s of %s timed out in the queue (no request sent)", event["limit"],
                       event["scope"], extra={"hive_repeat_key": ("queue_timeout", event["scope"])})


def _fingerprint(model: str, kwargs: Mapping[str, Any]) -> int:
    messages = kwargs.get("messages")
    if isinstance(messages, list):
        parts: list[Any] = [model]
        for m in messages:
            if isinstance(m, Mapping):
                c = m.get("content")
                parts.append((m.get("role"), c if isinstance(c, str) else repr(c)))
            else:
                parts.append(repr(m))
        system = kwargs.get("system")  # (Anthropic's messages API: the system prompt apart)
        if system:
            parts.append(repr(system))
        return hash(tuple(parts))
    # (A Responses API turn is its input *after* the conversation it continues.)
    return hash((model, repr(kwargs.get("input")), repr(kwargs.get("prompt")), kwargs.get("previous_response_id"),
                 repr(kwargs.get("instructions"))))


_call_type_names: dict[Any, str] = {}


def _call_type_name(call_type: Any) -> str:
    """``"acompletion"`` for ``CallTypes.acompletion`` or the string itself (cached: an enum's
    ``value`` is a slow descriptor)."""
    try:
        name = _call_type_names.get(call_type)
    except TypeError:  # unhashable
        return str(getattr(call_type, "value", call_type))
    if name is None:
        name = str(getattr(call_type, "value", call_type))
        if len(_call_type_names) < 1024:
            _call_type_names[call_type] = name
    return name


def _cache_hit(response: Any) -> bool:
    """Whether LiteLLM marked ``response`` as served from its cache (``caching=True``)."""
    # (read from __pydantic_private__ first, as _retry.response_headers does: a pydantic
    # private attribute found by plain lookup goes through a slow __getattr__)
    private = getattr(response, "__pydantic_private__", None)
    hidden = private.get("_hidden_params") if type(private) is dict else None
    if hidden is None:
        hidden = getattr(response, "_hidden_params", None)
    return type(hidden) is dict and hidden.get("cache_hit") is True


def _usage_obj(response: Any) -> Any:
    # LiteLLM's responses keep ``usage`` as a pydantic extra field: read it from
    # __pydantic_extra__ first (the attribute lookup falls back to a slow __getattr__).
    extra = getattr(response, "__pydantic_extra__", None)
    usage = extra.get("usage") if type(extra) is dict else None
    if usage is None:
        usage = getattr(response, "usage", None)
    if usage is None and isinstance(response, Mapping):
        usage = response.get("usage")
    return usage


def _logged_headers(details: Any) -> Mapping[str, Any] | None:
    """The response headers LiteLLM keeps in a call's logging details (``model_call_details``, or
    a request's ``litellm_logging_obj``'s). Anthropic's messages API returns a plain dict (a
    stream: an assembled response) with no headers of its own: only there do its
    ``anthropic-ratelimit-*`` headers survive."""
    if not isinstance(details, Mapping):
        return None
    if "litellm_logging_obj" in details and "httpx_response" not in details:  # a request's data
        details = getattr(details["litellm_logging_obj"], "model_call_details", None)
        if not isinstance(details, Mapping):
            return None
    headers = details.get("response_headers")  # (LiteLLM 1.110 and later)
    if not headers:
        headers = getattr(details.get("httpx_response"), "headers", None)
    try:
        return dict(headers) if headers else None
    except Exception:  # not a mapping after all: nothing learned
        return None


def _count(value: Any) -> int:
    return value if type(value) is int and 0 < value <= _MAX_CALL_TOKENS else 0


def _getter(obj: Any) -> Callable[[str], Any]:
    """``get(name)`` for a mapping or an object's attributes (a pydantic model's fields and extras
    read from its dicts: a missing attribute would go through its slow ``__getattr__``)."""
    if isinstance(obj, Mapping):
        return obj.get
    fields = getattr(obj, "__dict__", None)
    extra = getattr(obj, "__pydantic_extra__", None)
    if type(fields) is dict and type(extra) is dict:
        return lambda name: fields[name] if name in fields else extra.get(name)
    if type(fields) is dict:
        return fields.get
    return lambda name: getattr(obj, name, None)


def _prompt_cache(usage: Any) -> tuple[int, int, int] | None:
    """The prompt-cache tokens a call's usage reports: (read from the cache, written to it, written
    for an hour), in LiteLLM's form (``prompt_tokens_details``, Anthropic's ``cache_*_input_tokens``)
    or the Responses API's (``input_tokens_details``). ``None`` when it reports none."""
    fields = getattr(usage, "__dict__", None)
    if (type(fields) is dict and "prompt_tokens_details" in fields  # LiteLLM's Usage: the usual case first
            and fields["prompt_tokens_details"] is None and not fields.get("cache_read_input_tokens")
            and not fields.get("cache_creation_input_tokens")):
        return None
    get = _getter(usage)
    read = _count(get("cache_read_input_tokens"))
    written = _count(get("cache_creation_input_tokens"))
    details = get("prompt_tokens_details") or get("input_tokens_details")
    written_1h = 0
    if details is not None:
        dget = _getter(details)
        read = max(read, _count(dget("cached_tokens")))
        written = max(written, _count(dget("cache_creation_tokens")))
        split = dget("cache_creation_token_details")
        if split is not None:
            written_1h = _count(_getter(split)("ephemeral_1h_input_tokens"))
    if written and not written_1h:
        split = get("cache_creation")  # (Anthropic's own usage)
        if split is not None:
            written_1h = _count(_getter(split)("ephemeral_1h_input_tokens"))
    return (read, written, written_1h) if read or written else None


def _plain(value: Any) -> Any:
    """``value`` (a request's messages, system prompt or tools) as a hashable value, without its
    ``cache_control`` marks (they move from turn to turn; the cached text is what matters)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _plain(v)) for k, v in value.items() if k != "cache_control"))
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    dump = getattr(value, "model_dump", None)  # (LiteLLM's Message and the like)
    return _plain(dump()) if callable(dump) else repr(value)


def _prompt_print(kwargs: Mapping[str, Any], n: int | None = None) -> tuple[int, int] | None:
    """(``n``, a fingerprint of the tools, the system prompt and the first ``n`` messages) of a
    request (``n``: all its messages); ``None`` if it has fewer, or no messages."""
    messages = kwargs.get("messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        return None
    if n is None:
        n = len(messages)
    elif len(messages) < n:
        return None
    try:
        return n, hash((_plain(kwargs.get("tools")), _plain(kwargs.get("system")), _plain(messages[:n])))
    except Exception:  # (a structure nested past the recursion limit, an odd object): no guess, never an error
        return None


def _counts_input(scopes: Iterable[Scope]) -> bool:
    """Whether an input-token limit applies among ``scopes`` (a cache read is then expected apart)."""
    return any(s.limits.input_tokens_per_minute is not None for s in scopes)


def _usage_of(response: Any) -> tuple[int | None, int | None]:
    return _usage_counts(_usage_obj(response))


#: More tokens than one call can read or write (no model comes near a billion): a count above it
#: is a provider's error, not a bill, and is not trusted (the estimate stands).
_MAX_CALL_TOKENS = 10**9


def _sane(value: Any) -> int | None:
    """A token count as a provider reports it, if it makes sense (a negative count would erase
    others'; an absurd one overflow the price arithmetic)."""
    return int(value) if isinstance(value, int) and 0 <= value <= _MAX_CALL_TOKENS else None


def _usage_counts(usage: Any) -> tuple[int | None, int | None]:
    """(input, output) tokens of a usage, ``None`` for a count not given or not to be trusted (the
    estimate then stands). No tokens at all (LiteLLM's zeros for an answer without usage, or only
    a ``total_tokens``: see :func:`_usage_total`) is ``(None, None)``."""
    if usage is None:
        return None, None
    if isinstance(usage, dict):
        pin = usage.get("prompt_tokens")
        pout = usage.get("completion_tokens")
        if pin is None and pout is None:  # the Responses and Anthropic messages APIs' names
            pin = usage.get("input_tokens")
            pout = usage.get("output_tokens")
            if type(pin) is int:  # Anthropic's input_tokens leave out the prompt cache's (OpenAI's do not)
                for name in ("cache_creation_input_tokens", "cache_read_input_tokens"):
                    cached = usage.get(name)
                    if type(cached) is int and cached > 0:
                        pin += cached
    else:  # LiteLLM's Usage; attributes first (an ABC check on it is slow), then any other mapping
        pin = getattr(usage, "prompt_tokens", None)
        pout = getattr(usage, "completion_tokens", None)
        if pin is None and pout is None:
            if isinstance(usage, Mapping):
                pin = usage.get("prompt_tokens")
                pout = usage.get("completion_tokens")
            if pin is None and pout is None:  # the Responses API's names
                pin = getattr(usage, "input_tokens", None)
                pout = getattr(usage, "output_tokens", None)
    if not pin and not pout:  # none, or zeros: LiteLLM fills in zeros for an answer without usage
        return None, None
    # (the usual counts tested in line: this runs for every call)
    tin = pin if type(pin) is int and 0 <= pin <= _MAX_CALL_TOKENS else _sane(pin)
    tout = pout if type(pout) is int and 0 < pout <= _MAX_CALL_TOKENS else _sane(pout)
    if not tin and tout:
        # A prompt count left out (LiteLLM makes it 0), null or wrong beside an answer: no call
        # reads nothing, and the provider bills its prompt. The rest of the total is the prompt,
        # else its estimate stands.
        total = _usage_total(usage)
        tin = total - tout if total is not None and total > tout else None
    if not tout and tin is not None:
        # An output count left out (LiteLLM makes it 0), null or wrong while the total says more
        # was used: the rest of the total is output (the provider bills it). Only then: a total
        # can hold more than prompt and output (Gemini's tool-use prompt tokens, not billed so).
        total = _usage_total(usage)
        if total is not None and total > tin:
            tout = total - tin
        elif total is None:  # (no total to say the answer was empty: its estimate stands)
            tout = None
    return tin, tout


def _usage_total(usage: Any) -> int | None:
    """The ``total_tokens`` of a usage, if it gives one that makes sense."""
    if usage is None:
        return None
    return _sane(usage.get("total_tokens") if isinstance(usage, Mapping) else getattr(usage, "total_tokens", None)) \
        or None


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a call to one model by one identity counts against (see ``HiveLimiter._plan``)."""

    provider: str
    scopes: list[Any]
    dims: tuple[str | None, ...]
    budgeted: bool
    counts_tokens: bool
    counts_input: bool  # an input-token limit applies (a prompt-cache read is then expected apart)
    spend_keys: list[str]
    choices: list[Any] | None
    info: dict[str, Any]
    model_key: tuple[Any, ...]  # (provider, model)
    # Its scopes plus an endpoint's, per endpoint (api_base, api_key), once its model is known to be
    # served by more than one (see HiveLimiter._endpoint_scopes).
    endpoints: dict[tuple[Any, Any], list[Any]] = dataclasses.field(default_factory=dict)


class HiveLimiter(CustomLogger):
    """Keeps every LiteLLM call inside configured request, token and concurrency limits.

    Register it once: ``litellm.callbacks.append(HiveLimiter())``. Calls over a limit wait in a
    priority-then-FIFO queue for up to ``queue.max_wait_seconds`` and then raise
    :class:`~hive_ratelimit_plugin.errors.RateLimitQueueTimeout` without sending a request.

    Money budgets (hourly, daily, monthly, per run) reserve each call's worst-case cost before it
    is sent and settle to its actual cost afterwards; a spent budget raises
    :class:`~hive_ratelimit_plugin.errors.BudgetExceededError` (a ``litellm.BudgetExceededError``).

    Args:
        config: a YAML path, a dict (with or without the ``rate_limiting`` root), a
            :class:`~hive_ratelimit_plugin.config.RateLimitingConfig`, or ``None`` to read
            ``HIVE_RATELIMIT_CONFIG`` and ``HIVE_RATELIMIT_*`` environment variables.
        clock: monotonic clock in seconds for rate windows (tests inject a fake one).
        wall_clock: epoch clock in seconds for calendar budget windows (tests inject a fake one).
            With the Redis backend and no ``clock``, one more than a minute off Redis' clock is
            corrected to it.

    Raises:
        ConfigError: the configuration is invalid; the message names each bad key.
    """

    #: Endpoint scope lists kept across all plans before they are dropped (see _endpoint_scopes).
    _MAX_ENDPOINT_LISTS = 65536

    def __init__(
        self,
        config: str | Mapping[str, Any] | RateLimitingConfig | None = None,
        *,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__()
        cfg = self._load(config)
        self._source = _pinned(config)  # what reload() with no argument reads again
        if not cfg.enabled and "HIVE_RATELIMIT_ENABLED" in os.environ:
            # The variable is also the autoload's switch: someone setting it to 0 to keep the
            # autoload off may not expect it to switch this limiter off as well.
            logger.warning("hive-ratelimit: HIVE_RATELIMIT_ENABLED=%r switches this limiter off: calls pass "
                           "unlimited. Unset it to use the configuration's 'enabled'.",
                           os.environ["HIVE_RATELIMIT_ENABLED"][:20])
        # LiteLLM treats two callbacks of one class with equal public str/int/bool attributes as
        # the same logger and leaves the later one out of its success and failure lists: a
        # limiter that replaced another (``litellm.callbacks = [HiveLimiter()]`` again) would then
        # never hear of a stream's end. A public id unique to each instance tells them apart.
        self.limiter_id = f"{_id_prefix[:8]}-{next(_limiter_ids)}"
        self._config = cfg
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._obs = _observe.Observations()
        self._ledger: Ledger | None = None
        if cfg.has_budgets() or cfg.state_path is not None:
            self._ledger = Ledger(cfg.state_path)
        engine_kwargs: dict[str, Any] = {
            "lease_seconds": cfg.estimation.lease_seconds,
            "max_queue": cfg.queue.max_size,
            "wall_clock": wall_clock,
            "timezone": cfg.budget.timezone,
            "currency": cfg.budget.currency,
            "warning_thresholds": cfg.budget.warning_thresholds,
            "on_spend": self._persist,
            "on_event": self._emit_all,
        }
        if cfg.backend == "memory":
            self._engine = Engine(clock or time.monotonic, **engine_kwargs)
        else:
            from ._redis import RedisEngine

            rc = cfg.redis
            # Production takes "now" from Redis (one clock for all hosts); an injected clock
            # (tests, simulations) drives Redis too.
            self._engine = RedisEngine(
                clock or time.monotonic, url=cfg.backend, prefix=rc.key_prefix, on_error=rc.on_backend_error,
                local_share=rc.local_share, server_time=clock is None, socket_timeout=rc.socket_timeout,
                retry_interval=rc.retry_interval, **engine_kwargs,
            )
        self._engine.on_split = self._heard_split
        self._resolver = ScopeResolver(cfg)
        self._prices = PriceBook(cfg)
        self._media_costs = _media.SeenCosts()
        self._runaway = RunawayDetector(cfg.runaway.max_identical_requests, cfg.runaway.window_seconds,
                                        cfg.runaway.cooldown_seconds)
        self._provider_cache: dict[tuple[str, str | None], str] = {}
        # (ids, provider) found to hold none of the keys LiteLLM falls back to (see _hide_keys)
        self._keyless_ids: set[tuple[Any, ...]] = set()
        self._repr: tuple[Any, Any, str] = (None, None, "")
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._endpoint_lists = 0  # scope lists in the plans' endpoints (see _endpoint_scopes)
        # Responses API turns by response id: the tokens a turn that continues it (with
        # ``previous_response_id``) carries as its input on top of its own (see _remember_turn).
        self._turns: dict[str, int] = {}
        # provider limits last logged, per model: requests, tokens, input and output tokens
        self._told: dict[str, tuple[int | None, int | None, int | None, int | None]] = {}
        self._own_endpoint_told: set[str] = set()  # providers whose calls were seen with their own api_base
        # (provider, model) -> the one endpoint (api_base, api_key) its calls went to so far, or
        # _SERVED_BY_MANY (see _endpoint_scopes)
        self._endpoints: dict[tuple[Any, ...], Any] = {}
        # (model, endpoint) -> its scope's key, for the Router's choice (see async_filter_deployments)
        self._signal_scopes: dict[tuple[Any, ...], str] = {}
        # model scope key -> (provider, model), of those in _endpoints seen at one endpoint: what a
        # split another process made names (see _heard_split)
        self._model_scopes: dict[str, tuple[Any, ...]] = {}
        self._splits_heard = 0  # how many models _heard_split split (see _after_split)
        self._split_lock = threading.Lock()
        # What each caller's last call left in its provider's prompt cache: (tokens, until when,
        # and the (messages, fingerprint) of the prompt that left them: see _prompt_print); and
        # the prompts of the calls in flight that ask for caching, per call
        self._cache_left: dict[tuple[str | None, ...], tuple[int, float, int, int]] = {}
        self._cache_prompts: dict[str, tuple[int, int]] = {}
        # (provider, model) pairs a provider has given a token limit for: their calls' tokens are
        # estimated, as for a configured token limit (see _note_limits). True: an input-token
        # limit among them (Anthropic's), under which a prompt-cache read is expected apart.
        self._tokens_learned: dict[tuple[str | None, ...], bool] = {}
        self._given_ids: dict[Any, float] = {}  # call ids callers chose, when last seen (see _claim_call_id)
        self._given_lock = threading.Lock()
        # Sync calls (not streamed) the guard settles itself once LiteLLM returns: LiteLLM's
        # success-handler thread (logging_hook) must not settle them first, or the call returns
        # while its settlement is still being made on that thread.
        self._settled_inline: set[str] = set()
        # Calls waiting in the queue: (call type, request), by call id (see _queue_async)
        self._waiting_calls: dict[str, tuple[str, Mapping[str, Any]]] = {}
        self._budgets_set: set[str] = set()  # budget settings made with set_budget() (see reload)
        self._next_tail = 0.0
        self._reload_spend = False  # set in a forked child (see _after_fork_in_child)
        self._configure_engine(cfg)
        if self._ledger is not None:
            self._engine.load_spend(self._ledger.load(self._engine.calendar.starts(self._engine.wall())))
        _fork.track(self)
        atexit.register(_settle_at_exit, weakref.ref(self))
        install_sync_guard()
        self._publish_status(cfg)
        _warn_unknown_providers(cfg)

    # ----------------------------------------------------------------- public
    @classmethod
    def from_yaml(cls, path: str, **kwargs: Any) -> HiveLimiter:
        """Build a limiter from a YAML file (``rate_limiting:`` root)."""
        return cls(path, **kwargs)

    @property
    def config(self) -> RateLimitingConfig:
        """The effective configuration."""
        return self._config

    def reload(self, config: str | Mapping[str, Any] | RateLimitingConfig | None = None) -> None:
        """Replace the configuration; the next call uses the new limits and budgets.

        With no argument, what the limiter was built from (or last reloaded from) is read again:
        its YAML file (edited since), ``HIVE_RATELIMIT_CONFIG``, its dict, the proxy's
        ``config.yaml`` block, with the ``HIVE_RATELIMIT_*`` overrides as they are now (a
        ``RateLimitingConfig`` is applied again as it is).

        Usage already counted is kept. A change of budgets is recorded in the audit log.

        The backend (``backend``, ``redis``), the budgets' time zone (``budget.timezone``: spend is
        counted per calendar window of it) and, once the limiter keeps one, the state file
        (``state_path``) are fixed for a limiter's life: build a new ``HiveLimiter`` to change them.

        Raises:
            ConfigError: the new configuration is invalid, or changes what cannot change (the old
                one stays in force, wholly).
        """
        source = self._source if config is None else config
        cfg = self._load(source)
        old = self._config
        ledger = self._ledger
        path = _state_file(cfg.state_path)
        fixed = [name for name, now, then in (
            ("backend", cfg.backend, old.backend),
            ("redis", cfg.redis, old.redis if old.backend != "memory" else cfg.redis),  # (unused in memory)
            ("state_path", path, ledger.path if ledger is not None else path),
            # (the spend counted so far is counted per calendar window of the old time zone)
            ("budget.timezone", cfg.budget.timezone, old.budget.timezone))
            if now != then]
        if fixed:
            names = ", ".join(f"rate_limiting.{n}" for n in fixed)
            raise ConfigError(f"{names}: cannot change on reload (the limiter keeps its backend, state file and "
                              "budget calendar for its life); build a new HiveLimiter to change them. The old "
                              "configuration stays in force.",
                              errors=[f"rate_limiting.{n}: cannot change on reload" for n in fixed])
        self._apply_config(cfg, action="reload")
        self._source = _pinned(source)

    def _load(self, source: Any) -> RateLimitingConfig:
        """The configuration ``source`` (a constructor's ``config``) gives, as of now."""
        return _read_config(source)

    def _apply_config(self, cfg: RateLimitingConfig, *, action: str, scope: str = "config") -> None:
        old_cfg = self._config
        old_budgets = _budget_view(old_cfg)
        new_budgets = _budget_view(cfg)
        ledger = None
        if new_budgets != old_budgets and self._ledger is None and (cfg.has_budgets() or cfg.state_path is not None):
            ledger = Ledger(cfg.state_path)  # first: if it cannot be opened, nothing has changed yet
        self._config = cfg
        self._resolver = ScopeResolver(cfg)
        self._prices = PriceBook(cfg)
        self._plans = {}  # resolved with the old configuration
        eng = self._engine
        self._configure_engine(cfg)
        eng.max_queue = cfg.queue.max_size
        eng.lease_seconds = cfg.estimation.lease_seconds
        eng.currency = cfg.budget.currency
        eng.thresholds = tuple(cfg.budget.warning_thresholds)
        resolver = self._resolver

        def resolve(t: Ticket) -> list[Any]:
            if not cfg.enabled:  # turned off: the calls waiting go now, as new calls do
                t.choices = []
                return []
            _, _, agent, user, team, run = t.dims
            ident = Identity(agent, user, team, run, t.priority)
            provider, model = str(t.info.get("provider")), str(t.info.get("model"))
            waiting = self._waiting_calls.get(t.call_id)
            # API keys too: their limits may have changed (none for a call to its own endpoint;
            # without its request at hand, a call keeps going without a pool key if it had none)
            if waiting is not None:
                t.choices = self._key_choices(resolver.choices(provider), provider, waiting[1])
            elif t.choices is not None:
                t.choices = resolver.choices(provider)
            scopes = resolver.scopes(provider, model, ident)
            own = [s for s in t.scopes if s.limits is _ENDPOINT_LIMITS]  # (the endpoint it goes to stays)
            if own:
                scopes = [*scopes, *own]
            if waiting is not None:
                # Estimated again: a budget or token limit that applies now may not have when it came
                # (its worst case was then 0), and its spend goes to the new budgets' scopes too.
                call_type, kwargs = waiting
                charged = (*scopes, *(t.choices or ()))  # (as _plan: an API key's limits count too)
                t.input_tokens, t.output_tokens, t.cost = self._estimate(
                    call_type, kwargs, model, provider, t.dims, any(sc.budgeted for sc in scopes),
                    any(sc.counts_tokens for sc in charged))
                counts_input = _counts_input(charged) or self._tokens_learned.get(t.dims[:2], False)
                t.cached_input = self._expected_cache_read(t.dims, kwargs, t.input_tokens) \
                    if counts_input and cache_writes(kwargs) != NO_WRITE else 0
                t.spend_keys = self._spend_keys(scopes, t.dims)
            return scopes

        eng.rescope(resolve)
        # (agents, users and teams may number 100,000s: only the levels whose table changed)
        levels = {"global", "provider", "model"} | {
            level for level, table in (("agent", "agents"), ("user", "users"), ("team", "teams"))
            if getattr(old_cfg, table) != getattr(cfg, table)}
        eng.relimit(resolver.limits_for, resolver.generation, levels)
        self._publish_status(cfg)
        self._runaway.max_identical = cfg.runaway.max_identical_requests
        self._runaway.window = cfg.runaway.window_seconds
        self._runaway.cooldown = cfg.runaway.cooldown_seconds
        if new_budgets != old_budgets:
            if ledger is not None:
                # The file's totals are read before the ledger becomes this limiter's: a call settled
                # meanwhile (another thread) is then in the book and, written after the read, not in
                # the totals added to it (read after, it was in both: counted twice).
                totals = ledger.load(eng.calendar.starts(eng.wall()))
                self._ledger = ledger
                eng.record_spend = True
                eng.load_spend(totals)
            changed = {k: new_budgets.get(k) for k in set(old_budgets) | set(new_budgets)
                       if old_budgets.get(k) != new_budgets.get(k)}
            old = {k: old_budgets.get(k) for k in changed}
            if self._ledger is not None:
                self._ledger.audit(action, scope, old, changed)
            self._emit({"type": "budget_changed", "action": action, "scope": scope, "old": old, "new": changed,
                        "time": eng.wall()})
            if action == "set":
                self._budgets_set.update(changed)
            elif action == "reload" and (lost := sorted(k for k in changed if k in self._budgets_set)):
                # A budget set at run time is not in the source: the reload replaced it.
                logger.warning("reload replaced budgets set with set_budget() by the configuration's (write them "
                               "into the configuration to keep them): %s",
                               ", ".join(f"{k} {old[k]} -> {changed[k]}" for k in lost))
        if action == "reload":
            self._budgets_set.clear()
        self._plans = {}  # again: a call may have planned while the configuration was being replaced
        if cfg.providers != old_cfg.providers:
            _warn_unknown_providers(cfg)

    def _publish_status(self, cfg: RateLimitingConfig) -> None:
        if cfg.status.enabled:
            _status.PUBLISHER.register(self, _status.status_dir(cfg.state_path), cfg.status.interval_seconds)

    def _configure_engine(self, cfg: RateLimitingConfig) -> None:
        eng = self._engine
        eng.record_spend = self._ledger is not None or self._obs.wants_rows
        eng.configure(cfg)

    # ---------------------------------------------------------------- budgets
    def set_budget(
        self,
        max_hourly_spend: float | _Unset | None = _UNSET,
        max_daily_spend: float | _Unset | None = _UNSET,
        max_monthly_spend: float | _Unset | None = _UNSET,
        currency: str | None = None,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        team_id: str | None = None,
        provider: str | None = None,
        model: str | None = None,
    ) -> None:
        """Set spending limits; they apply from the next call.

        Without a level keyword this sets the global budget; with ``agent_id=``, ``user_id=``,
        ``team_id=``, ``provider=`` (optionally with ``model=``) it sets that level's budget.
        An omitted amount is left as it is; ``None`` removes that budget. Recorded in the audit log.

        Raises:
            ConfigError: an amount is zero or negative.
            TypeError: more than one level was named.
        """
        agent_id, user_id, team_id = clean_id(agent_id), clean_id(user_id), clean_id(team_id)
        levels = [k for k, v in (("agent_id", agent_id), ("user_id", user_id), ("team_id", team_id)) if v]
        if provider:
            levels.append("provider")
        if len(levels) > 1:
            raise TypeError(f"set_budget sets one level at a time; got {', '.join(levels)}")
        if model and not provider:
            raise TypeError("set_budget(model=...) needs provider= too (e.g. provider='openai', model='gpt-4')")
        amounts = {"hour": max_hourly_spend, "day": max_daily_spend, "month": max_monthly_spend}
        data = self._config.model_dump(mode="python", by_alias=False, exclude_none=False)
        data["global"] = data.pop("global_")
        if not levels:
            block, scope_key = data["budget"], "global"
            names = {"hour": "max_hourly_spend", "day": "max_daily_spend", "month": "max_monthly_spend"}
        else:
            names = {"hour": "max_cost_per_hour", "day": "max_cost_per_day", "month": "max_cost_per_month"}
            if agent_id:
                block, scope_key = _own_block(data["agents"], agent_id, match_block), f"agent:{agent_id}"
            elif user_id:
                block, scope_key = _own_block(data["users"], user_id, match_block), f"user:{user_id}"
            elif team_id:
                block, scope_key = _own_block(data["teams"], team_id, match_block), f"team:{team_id}"
            else:
                assert provider is not None
                pblock = data["providers"].setdefault(provider, {"models": {}})
                if model:
                    bare = split_model(model, provider)
                    block = _own_block(pblock["models"], bare,
                                       lambda table, name: match_model_block(table, provider, name))
                    scope_key = f"model:{provider}/{bare}"
                else:
                    block, scope_key = pblock, f"provider:{provider}"
        for kind, value in amounts.items():
            if not isinstance(value, _Unset):
                block[names[kind]] = value
                if not levels:
                    # global.max_cost_per_* is the same budget as budget.max_*_spend (the tighter of
                    # the two counts): left there, it would keep the old amount in force.
                    data["global"][f"max_cost_per_{kind}"] = None
        if currency is not None:
            data["budget"]["currency"] = currency
        cfg = load_config(_strip_none(data), use_env=False)
        self._apply_config(cfg, action="set", scope=scope_key)

    def reset_budget(
        self,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        team_id: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        run_id: str | None = None,
    ) -> None:
        """Forget the settled spend of a level (global without keywords) and close its breakers.

        The calls it made stay in the ledger; they no longer count toward this level's current
        budget windows. An agent's runaway breaker is closed too. Recorded in the audit log.
        """
        agent_id, user_id, team_id, run_id = (clean_id(v) for v in (agent_id, user_id, team_id, run_id))
        if run_id and agent_id:
            key = run_key(agent_id, run_id)
        elif agent_id:
            key = f"agent:{agent_id}"
        elif user_id:
            key = f"user:{user_id}"
        elif team_id:
            key = f"team:{team_id}"
        elif provider and model:
            key = f"model:{provider}/{split_model(model, provider)}"
        elif provider:
            key = f"provider:{provider}"
        else:
            key = "global"
        eng = self._engine
        spent = {kind: eng.spend(key, kind)[0] for kind in ("hour", "day", "month")}
        if self._ledger is not None:
            self._ledger.mark_reset(key, eng.wall())
            self._ledger.audit("reset", key, {"spent": spent}, {"spent": 0.0})
        eng.reset_spend(key)
        if agent_id:
            self._runaway.reset(agent_id)
        self._emit({"type": "budget_changed", "action": "reset", "scope": key, "old": {"spent": spent},
                    "new": {"spent": 0.0}, "time": eng.wall()})

    def on_event(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        r"""Register ``callback(event)`` for structured events; returns it (usable as a decorator).

        Event ``type``\ s: ``budget_warning``, ``budget_exceeded``, ``runaway_detected``,
        ``queue_timeout``, ``budget_changed``, ``provider_429``, ``circuit_opened``,
        ``circuit_closed`` (fields: docs/monitoring.md). Events never contain API keys.
        """
        self._listeners.append(callback)
        return callback

    def audit_log(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Budget changes recorded in the state file (empty without one)."""
        return self._ledger.audit_rows(limit) if self._ledger is not None else []

    def _persist(self, rows: list[SpendRow]) -> None:
        if self._obs.wants_rows:
            self._obs.settle_rows(rows)
        if self._ledger is None:
            return
        try:
            self._ledger.record(rows)
        except Exception as exc:  # disk full, file locked by another process...: kept, retried, said
            ledger = self._ledger
            logger.error("could not write settled calls to %s: %s; %d kept in memory to be written with the next "
                         "settlement or at exit%s (their spend is counted in this process meanwhile)",
                         ledger.path, exc, ledger.unsaved,
                         f"; {ledger.dropped} given up so far (past the {MAX_UNSAVED} kept, or a row the file refused)"
                         if ledger.dropped else "",
                         extra={"hive_repeat_key": ("persist", ledger.path)})

    def _emit(self, event: dict[str, Any]) -> None:
        self._emit_all([event])

    def _emit_all(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._obs.event(event)
            _log_event(event)
            for cb in self._listeners:
                try:
                    cb(event)
                except Exception:
                    logger.exception("on_event callback %r failed on a %s event", cb, event.get("type"))

    @staticmethod
    @contextlib.contextmanager
    def scope(**identity: Any) -> Iterator[None]:
        """Attribute calls made inside the block to an identity (``agent_id``, ``user_id``,
        ``team_id``, ``run_id``, ``priority``). Holds across ``await``, tasks created inside and
        ``asyncio.to_thread``. Request metadata wins over it."""
        with _scope_cm(**identity):
            yield

    def get_usage_stats(self) -> dict[str, Any]:
        """Current usage: totals for this hour, day and month, budgets, and every level's windows.

        Returns:
            A dict with, at the top, ``requests_today``, ``tokens_today``, ``cost_today``,
            ``remaining_budget`` (of the global daily budget, ``None`` without one), the same for
            ``_this_hour`` / ``_this_month`` (``remaining_hourly_budget``,
            ``remaining_monthly_budget``), and ``currency``; ``budgets`` (per scope key and budget:
            spent, reserved, limit, remaining, window, tripped); ``spend`` (per level and scope key:
            cost, requests and tokens this hour, day and month); ``levels`` (per level and scope key:
            each rate window's used/limit, ``in_flight``, ``queued``); and the counters ``queued``,
            ``admitted_total``, ``queued_total``, ``rejected``. See docs/monitoring.md. Its
            top-level keys also read as attributes: ``usage.cost_today``.
        """
        self._tail()
        return UsageStats(self._usage_stats())

    def _usage_stats(self, chunk: int = 0) -> dict[str, Any]:
        """:meth:`get_usage_stats` without picking up other processes' spend first."""
        eng = self._engine
        eng.sweep()  # (leases run out in a process gone quiet: counted before they are shown)
        resolver = self._resolver
        if not resolver.global_limits.is_empty():  # (shown before this process's first call too)
            eng.watch(Scope("global", "global", resolver.global_limits, resolver.generation))
        levels: dict[str, dict[str, Any]] = {}
        for key, entry in eng.snapshot(chunk).items():
            levels.setdefault(entry.pop("level"), {})[key] = entry
        spend: dict[str, dict[str, Any]] = {}
        for key, kinds in eng.spend_snapshot().items():
            level = key.split(":", 1)[0]
            spend.setdefault(level, {})[key] = {
                kind: {"cost": c, "requests": r, "tokens": t} for kind, (c, r, t) in kinds.items()
            }
        budgets = eng.budget_snapshot()
        g = budgets.get("global", {})
        out: dict[str, Any] = {"currency": eng.currency}
        for kind, suffix, remaining_name, field in (
            ("day", "today", "remaining_budget", "max_cost_per_day"),
            ("hour", "this_hour", "remaining_hourly_budget", "max_cost_per_hour"),
            ("month", "this_month", "remaining_monthly_budget", "max_cost_per_month"),
        ):
            cost, requests, tokens = eng.spend("global", kind)
            out[f"requests_{suffix}"] = requests
            out[f"tokens_{suffix}"] = tokens
            out[f"cost_{suffix}"] = round(cost, 10)
            out[remaining_name] = round(g[field]["remaining"], 10) if field in g else None
        out.update({
            "budgets": budgets,
            "spend": spend,
            "levels": levels,
            "queued": eng.queue_length,
            "admitted_total": eng.admitted_total,
            "queued_total": eng.queued_total,
            "rejected": dict(eng.rejected),
            "retried_total": eng.retried_total,
            "providers": eng.provider_state(),
            "backend": eng.backend_info(),
        })
        return out

    def redis_memory(self) -> dict[str, int]:
        """Bytes of Redis memory per scope key, with the Redis backend (``{}`` with the memory one)."""
        measure = getattr(self._engine, "redis_memory", None)
        return dict(measure()) if measure is not None else {}

    def _after_fork_in_child(self) -> None:
        """In a forked child (see :mod:`._fork`): the budget counters copied from the parent may
        include spend the parent had not written to the state file yet; the parent writes it later
        and this process would then read it as another's and count it twice. So the counters are
        read again from the file, at the next look at it."""
        self._given_lock = threading.Lock()  # (held by another thread of the parent, maybe)
        if self._ledger is not None and self._engine.backend_info().get("type") == "memory":
            self._reload_spend = True
            self._next_tail = 0.0

    def _tail(self) -> None:
        """Pick up spend other processes wrote to the shared state file (about once a second)."""
        if self._ledger is None:
            return
        now = self._engine.clock()
        if now < self._next_tail:
            return
        self._next_tail = now + 1.0
        if self._reload_spend:
            self._reload_spend = False
            try:
                self._engine.replace_spend(self._ledger.load(self._engine.calendar.starts(self._engine.wall())))
            except Exception as exc:
                logger.error("could not read spend from %s after a fork: %s", self._ledger.path, exc)
            return
        if self._ledger.unsaved:  # an earlier write failed (the file was locked): try again now
            self._persist([])
        try:
            rows = self._ledger.tail()
        except Exception as exc:
            logger.error("could not read shared spend from %s: %s", self._ledger.path, exc)
            return
        if rows:
            self._engine.apply_external(rows)

    def __repr__(self) -> str:
        # LiteLLM formats its callback list into a debug string on every call: keep this cheap
        # (live figures are in get_usage_stats()).
        cfg, eng = self._config, self._engine
        if self._repr[0] is not cfg or self._repr[1] is not eng:
            self._repr = (cfg, eng, f"HiveLimiter(enabled={cfg.enabled}, backend={type(eng).__name__})")
        return self._repr[2]

    # ------------------------------------------------------------- tickets
    def _provider_of(self, model: str, custom_llm_provider: str | None, api_base: str | None) -> str:
        key = (model, custom_llm_provider)
        found = self._provider_cache.get(key)
        if found is not None:
            return found
        try:
            _, provider, _, _ = litellm.get_llm_provider(
                model=model, custom_llm_provider=custom_llm_provider, api_base=api_base
            )
        except Exception:  # unknown to LiteLLM: the call will fail there; count it by prefix
            provider = custom_llm_provider or (model.split("/", 1)[0] if "/" in model else "unknown")
        provider = str(provider)
        if len(self._provider_cache) > 4096:
            self._provider_cache.clear()
        self._provider_cache[key] = provider
        return provider

    def _ticket(self, call_id: str, call_type: str, kwargs: Mapping[str, Any],
                metadata: Mapping[str, Any] | None) -> Ticket | None:
        cfg = self._config
        if not cfg.enabled or call_type in _SKIP_TYPES:
            return None
        model = kwargs.get("model")
        model = model if type(model) is str else str(model or "")
        ident = self._hide_keys(resolve_identity(metadata, kwargs.get("user")), kwargs, model)
        if cfg.runaway.enabled and ident.agent_id is not None:
            self._check_runaway(ident.agent_id, model, kwargs)
        plan = self._plan(model, kwargs.get("custom_llm_provider"), kwargs.get("api_base"), ident)
        input_tokens, output_tokens, cost = self._estimate(call_type, kwargs, model, plan.provider, plan.dims,
                                                           plan.budgeted, plan.counts_tokens)
        if self._ledger is not None:
            self._tail()
        # A call not streamed holds its lease until it returns: no shorter than LiteLLM may wait for it.
        # (no timeout=, the usual call: the engine's lease, as _call_lease says)
        lease = 0.0 if kwargs.get("stream") or kwargs.get("timeout") is None \
            else _call_lease(kwargs, cfg.estimation.lease_seconds)
        choices = plan.choices
        if choices is not None:
            choices = self._key_choices(choices, plan.provider, kwargs)
        scopes = plan.scopes if choices is not None else self._endpoint_scopes(plan, kwargs)
        cached = 0
        learned = self._tokens_learned
        if (plan.counts_input or (learned and learned.get(plan.dims[:2]))) and cache_writes(kwargs) != NO_WRITE:
            cached = self._expected_cache_read(plan.dims, kwargs, input_tokens)
            prompt = _prompt_print(kwargs)
            if prompt is not None:  # what its answer leaves in the cache is for prompts extending this one
                pending = self._cache_prompts
                if len(pending) >= 4096:
                    pending.clear()
                pending[call_id] = prompt
        # (positional: keyword arguments cost more to pass, and this runs for every call)
        return Ticket(call_id, scopes, input_tokens, output_tokens, ident.priority, plan.info, cost,
                      choices, None, NEVER, plan.dims, plan.spend_keys, lease, cached)

    def _expected_cache_read(self, dims: tuple[str | None, ...], kwargs: Mapping[str, Any], input_tokens: int) -> int:
        """Of a call that asks for caching (``cache_control``: its callers check), the prompt tokens
        its provider will likely read from the prompt cache: what the same model's last call by the
        same agent, user, team and run left there (read or written), if that was within the
        cache's lifetime and this call's prompt extends that call's (the next turn of a
        conversation, whose prefix Anthropic reads again and leaves out of its
        input-tokens-per-minute limit). Reserved whole, a mostly cached prompt larger than the
        limit could never be sent. Settled at what the answer reports."""
        seen = self._cache_left.get(dims)
        if seen is None or self._engine.clock() >= seen[1] or not input_tokens:
            return 0
        # Only if this prompt begins with that call's whole prompt (the cache holds a prefix of
        # it): another prompt of the same caller reads nothing, and Anthropic counts all of it.
        if _prompt_print(kwargs, seen[2]) != seen[2:]:
            return 0
        return seen[0] if seen[0] < input_tokens else input_tokens

    def _key_choices(self, choices: list[Scope] | None, provider: str,
                     kwargs: Mapping[str, Any]) -> list[Scope] | None:
        """The provider's API keys a call may take: none for a call that names its own endpoint
        (``api_base``, or LiteLLM's alias ``base_url``), whose own key must stay."""
        if choices is not None and (kwargs.get("api_base") or kwargs.get("base_url")):
            self._own_endpoint(provider)
            return None
        return choices

    def _endpoint_scopes(self, plan: _Plan, kwargs: Mapping[str, Any]) -> list[Any]:
        """A call's scopes, with its endpoint's once its model has been seen served by more than one.

        What a provider says (a 429's cooldown, a circuit breaker, the limits its headers give, the
        rate cut after repeated 429s) is about the endpoint that said it: one ``api_base`` and one
        ``api_key``. While a model's calls all go to one endpoint, that is kept on the model's
        scope. Once a call of it goes to another (a Router's deployments of one model in two
        regions, or under two accounts' keys), every endpoint gets an API-key scope of its own
        for those signals, and what the model's scope held moves to the endpoint it came from:
        a 429 from one deployment no longer holds the Router's retry to another.
        """
        base = kwargs.get("api_base") or kwargs.get("base_url")  # (_endpoint(kwargs), inlined)
        key = kwargs.get("api_key")
        if (base is not None and type(base) is not str) or (key is not None and type(key) is not str):
            endpoint: tuple[Any, Any] = (repr(base), repr(key))
        else:
            endpoint = (base, key)
        model = plan.model_key
        seen = self._endpoints.get(model)
        if seen is None:
            if len(self._endpoints) >= 65536:  # (models, not calls: bounded against a flood of names)
                self._endpoints = {k: v for k, v in self._endpoints.items() if v is _SERVED_BY_MANY}
                self._model_scopes = {}
            self._model_scopes[_model_scope_key(plan)] = model
            self._endpoints[model] = endpoint
            return plan.scopes
        if seen is not _SERVED_BY_MANY:
            if seen == endpoint:
                return plan.scopes
            self._split(model, _model_scope_key(plan), seen)
        scopes = plan.endpoints.get(endpoint)
        if scopes is None:
            if len(plan.endpoints) >= 256:
                plan.endpoints.clear()
            # (and across plans: thousands of identities, each calling a split model with a key of
            # its own per call, would otherwise keep 256 lists each)
            self._endpoint_lists += 1
            if self._endpoint_lists > self._MAX_ENDPOINT_LISTS:
                for each in list(self._plans.values()):
                    each.endpoints.clear()
                self._endpoint_lists = 1
            scopes = plan.endpoints[endpoint] = [*plan.scopes, _endpoint_scope(plan.model_key, endpoint)]
        return scopes

    def _split(self, model: tuple[Any, ...], source: str, first: tuple[Any, Any], heard: bool = False) -> None:
        """A model (``source``: its scope's key) is now seen served by a second endpoint, here or
        by another process (``heard``): what its scope learned moves to the first one this process
        saw, and its calls waiting in the queue wait for their own endpoint from now on."""
        with self._split_lock:  # (two threads seeing a second endpoint at once: one split)
            if self._endpoints.get(model) is _SERVED_BY_MANY:
                return
            self._endpoints[model] = _SERVED_BY_MANY
            self._model_scopes.pop(source, None)
        logger.info("%s/%s is served by more than one endpoint (api_base, api_key)%s: each endpoint now "
                    "keeps its own cooldowns, circuit breaker and learned limits", model[0], model[1],
                    " (seen by another process sharing the backend)" if heard else "")
        self._engine.move_signals(source, _endpoint_scope(model, first))
        waiting = self._waiting_calls

        def with_endpoint(t: Ticket) -> list[Any]:
            found = waiting.get(t.call_id)
            if found is None or t.dims[:2] != model:
                return t.scopes
            return _with_endpoint(t, found[1]) or t.scopes

        self._engine.rescope(with_endpoint)

    def _heard_split(self, sources: list[str]) -> None:
        """The engine's ``on_split``: models (their scopes' keys) that another process sharing the
        backend saw served by more than one endpoint. Where this process has seen one endpoint of
        one, it splits it as if it had seen the second (:meth:`_split`): a 429 from the endpoint
        it calls then holds the others' calls to the model's other endpoints no more. (A model
        it has not called yet is split at its first call's answer, which says so again.)"""
        for source in sources:
            model = self._model_scopes.get(source)
            if model is None:
                continue
            first = self._endpoints.get(model)
            if first is not None and first is not _SERVED_BY_MANY:
                self._split(model, source, first, heard=True)
                self._splits_heard += 1

    def _after_split(self, ticket: Ticket, kwargs: Mapping[str, Any]) -> Ticket | None:
        """A call admitted on its model's scope alone, whose admission's reply told of a split
        another process made of that model (:meth:`_heard_split`): its endpoint may be held (a
        429's cooldown there), which its admission could not see. Its reservation is given back
        (nothing was sent) and the ticket to admit it again, with its endpoint's scope, returned;
        ``None`` when the call needs no second admission."""
        if self._endpoints.get(ticket.dims[:2]) is not _SERVED_BY_MANY:
            return None
        scopes = _with_endpoint(ticket, kwargs)
        if scopes is None:
            return None
        self._unadmit(ticket.call_id)
        return dataclasses.replace(ticket, scopes=scopes, chosen=None, deadline=NEVER)

    def _unadmit(self, call_id: str) -> None:
        """Give back the reservation of a call about to be admitted again (nothing was sent): it
        counts once in ``admitted_total``, at the admission that lets it go."""
        eng = self._engine
        eng.release(call_id, input_tokens=0, output_tokens=0, cost=0.0, outcome="void")
        eng.admitted_total -= 1

    def _own_endpoint(self, provider: str) -> None:
        """A call that names its own ``api_base`` keeps its own key: the provider's key pool is
        for the provider's endpoint. (Swapped in, an OpenAI pool key went to a self-hosted
        OpenAI-compatible server named with ``openai/...`` and ``api_base``.) Said once."""
        if provider not in self._own_endpoint_told:
            self._own_endpoint_told.add(provider)
            logger.warning("calls to %s that name their own api_base keep their own api_key: the keys of "
                           "providers.%s.api_keys go only to the provider's own endpoint (and their limits "
                           "count only those calls)", provider, provider)

    def _estimate(self, call_type: str, kwargs: Mapping[str, Any], model: str, provider: str,
                  dims: tuple[str | None, ...], budgeted: bool, counts_tokens: bool) -> tuple[int, int, float]:
        """A call's estimated (input tokens, output tokens, worst-case cost): tokens only where a
        limit counts them (a budget, a token limit, a token limit learned for its model), cost
        only where a budget applies."""
        cfg = self._config
        input_tokens = output_tokens = 0
        learned = self._tokens_learned
        if budgeted or counts_tokens or (learned and dims[:2] in learned):
            if call_type not in _NOT_CHAT_TYPES:  # (the usual call: one test)
                input_tokens = count_messages(model, kwargs.get("messages"), kwargs.get("tools"))
                output_tokens = requested_output(kwargs, cfg.estimation.default_output_tokens)
            elif call_type in _EMBEDDING_TYPES:
                input_tokens = count_input(model, kwargs.get("input"))
            elif call_type in _TEXT_TYPES:
                prompt = kwargs.get("prompt")
                input_tokens = count_input(model, prompt)
                # (n, best_of and max_tokens are per prompt: a batch of prompts is answered for each)
                output_tokens = requested_output(kwargs, cfg.estimation.default_output_tokens,
                                                 _prompts(prompt, provider, model))
            elif call_type in _media.CALL_TYPES:  # no tokens; priced per unit below
                pass
            elif call_type in _ANTHROPIC_TYPES:  # the system prompt is a parameter of its own there
                system = kwargs.get("system")
                messages = kwargs.get("messages")
                if system and isinstance(messages, list):
                    messages = [{"role": "system", "content": system}, *messages]
                input_tokens = count_messages(model, messages, kwargs.get("tools"))
                output_tokens = requested_output(kwargs, cfg.estimation.default_output_tokens)
            else:  # the Responses API
                input_tokens = count_response_input(model, kwargs.get("input"), kwargs.get("instructions"),
                                                    kwargs.get("tools"))
                previous = kwargs.get("previous_response_id")
                if previous and type(previous) is str:  # the provider bills the conversation so far too
                    input_tokens += self._turns.get(previous, 0)
                output_tokens = requested_output(kwargs, cfg.estimation.default_output_tokens)
        cost = 0.0
        if budgeted and call_type in _media.CALL_TYPES:
            cost = self._media_estimate(call_type, kwargs, model, provider)
        elif budgeted:
            price = self._prices.price(provider, model)
            if not price.known:
                self._prices.warn_unknown(provider, model, "not in LiteLLM's price map or rate_limiting.pricing")
                if cfg.unknown_price == "block":
                    raise _unknown_price_error(provider, model)
            # (the request is scanned for cache marks only where a write has a price: Anthropic's, mostly)
            cost = price.cost(input_tokens, output_tokens, cache_writes(kwargs) if price.prices_writes else 0)
        return input_tokens, output_tokens, cost

    def _media_estimate(self, call_type: str, kwargs: Mapping[str, Any], model: str, provider: str) -> float:
        """A budgeted image, speech, transcription or rerank call's estimated cost (see _media): its
        unit price in LiteLLM's map, at least the most a call to the model has cost so far; a model
        the map does not have follows ``unknown_price`` (refused, or priced at the fallback)."""
        try:
            unit = _media.unit_cost(_media.FAMILIES[call_type], provider, model, kwargs)
            known = unit is not None or _media.map_entry(provider, model) is not None
        except Exception:  # an estimate never breaks a call
            logger.warning("hive-ratelimit: could not price a %s call to %s", call_type, model, exc_info=True)
            unit, known = None, True
        seen = self._media_costs.get(provider, model)
        if known or seen:
            return max(unit or 0.0, seen)
        price = self._prices.price(provider, model)
        if price.known:  # (priced per token in rate_limiting.pricing: no tokens to price)
            return 0.0
        how = "give LiteLLM its price per unit with litellm.register_model(...)"
        self._prices.warn_unknown(provider, model, "not in LiteLLM's price map", how)
        if self._config.unknown_price == "block":
            raise _unknown_price_error(provider, model, how.capitalize())
        return price.cost(0, self._config.estimation.default_output_tokens)

    def _plan(self, model: str, custom_llm_provider: Any, api_base: Any, ident: Identity) -> _Plan:
        """Everything about a call that depends only on its model and identity, cached: its
        provider, scopes, spend keys and API-key choices (rebuilt after a configuration change)."""
        key = (model, custom_llm_provider, ident.agent_id, ident.user_id, ident.team_id, ident.run_id)
        plans = self._plans
        cacheable = True
        try:
            plan = plans.get(key)
        except TypeError:  # an unhashable custom_llm_provider: resolve without caching
            cacheable, plan = False, None
        if plan is not None:
            return plan
        provider = self._provider_of(model, custom_llm_provider, api_base)
        scopes = self._resolver.scopes(provider, model, ident)
        choices = self._resolver.choices(provider)
        keys = choices or ()
        dims = (provider, split_model(model, provider), ident.agent_id, ident.user_id, ident.team_id, ident.run_id)
        plan = _Plan(
            provider=provider,
            scopes=scopes,
            dims=dims,
            budgeted=any(s.budgeted for s in scopes),
            # (an API key's limits count too: whichever key is picked, its windows are charged)
            counts_tokens=any(s.counts_tokens for s in (*scopes, *keys)),
            counts_input=_counts_input((*scopes, *keys)),
            spend_keys=self._spend_keys(scopes, dims),
            choices=choices,
            # Read-only, shared by every ticket of this plan.
            info={"provider": provider, "model": model, "agent_id": ident.agent_id, "run_id": ident.run_id},
            model_key=dims[:2],
        )
        if cacheable:
            if len(plans) > 8192:
                plans.clear()
            plans[key] = plan
        return plan

    def _spend_keys(self, scopes: list[Any], dims: tuple[str | None, ...]) -> list[str]:
        """Where a call's spend is counted: globally, at every level with a budget, and, with a state
        file, at every level (the per-level breakdown of ``get_usage_stats``)."""
        if self._ledger is not None:
            return dim_keys(*dims)
        keys = ["global"]
        keys.extend(s.key for s in scopes if s.budgeted and s.key != "global")
        return keys

    def _hide_keys(self, ident: Identity, kwargs: Mapping[str, Any], model: str) -> Identity:
        """A caller passing its API key as user= (or another id): never stored. Checked where an id
        is the call's api_key, or long enough to be any key LiteLLM may send (see _without_keys)."""
        api_key = kwargs.get("api_key")
        if api_key is None and _short_ids.get(id(ident)) is ident:
            return ident  # (no id long enough to be a key, seen before: the usual call)
        ids = (ident.user_id, ident.agent_id, ident.team_id, ident.run_id)
        for value in ids:
            if value is not None and (value == api_key or len(value) >= _KEY_LENGTH):
                break
        else:
            if api_key is None:
                if len(_short_ids) >= 4096:
                    _short_ids.clear()
                _short_ids[id(ident)] = ident  # (holds it: its id is not reused while there)
            return ident
        provider = self._provider_of(model, kwargs.get("custom_llm_provider"), kwargs.get("api_base"))
        # Long ids (a UUID run id) recur call after call: looking up the fallback keys each time
        # (the environment, LiteLLM's module attributes) cost ~5 µs a call. Ids found to hold none
        # of them are remembered (a key set in the environment later, and then passed as one of
        # those very ids, would be missed).
        seen = (ids, provider)
        own_key = api_key in ids
        if not own_key and seen in self._keyless_ids:
            return ident
        hidden = _without_keys(ident, ids, api_key, provider)
        if hidden is ident and not own_key:
            if len(self._keyless_ids) >= 4096:
                self._keyless_ids.clear()
            self._keyless_ids.add(seen)
        return hidden

    def _not_sent(self, kwargs: Mapping[str, Any], exc: HiveRateLimitError, agent: str | None = None) -> None:
        """A call refused before it was sent: the runaway detector does not count it (an agent that
        retries after a refusal sent nothing; counting it blocked such agents for 10 minutes).
        ``agent``: the caller's agent id when it does not come from the request (the proxy's)."""
        if self._cache_prompts:  # (its prompt leaves nothing in a cache: see _ticket)
            self._cache_prompts.pop(str(kwargs.get("litellm_call_id")), None)
        if exc.limit == "runaway" or not self._config.runaway.enabled:
            return
        try:
            if agent is None:
                agent = resolve_identity(kwargs.get("metadata"), kwargs.get("user")).agent_id
            if agent is not None:
                model = kwargs.get("model")
                model = model if type(model) is str else str(model or "")
                # (counted under the name _ticket gave it: an API key as an id is key#<hash> there)
                agent = self._hide_keys(Identity(agent_id=agent), kwargs, model).agent_id or agent
                self._runaway.uncount(agent, _fingerprint(model, kwargs))
        except Exception:  # (bookkeeping only: never in the way of the refusal itself)
            logger.debug("runaway bookkeeping failed for a refused call", exc_info=True)

    def _check_runaway(self, agent_id: str, model: str, kwargs: Mapping[str, Any]) -> None:
        trip = self._runaway.check(agent_id, _fingerprint(model, kwargs), self._engine.clock())
        if trip is None:
            return
        from ._budget_errors import RunawayDetectedError

        until, count, just_tripped = trip
        now = self._engine.clock()
        rw = self._config.runaway
        if just_tripped:
            self._emit({"type": "runaway_detected", "agent_id": agent_id, "count": count,
                        "window_seconds": rw.window_seconds, "cooldown_seconds": rw.cooldown_seconds,
                        "time": self._engine.wall()})
        raise RunawayDetectedError(
            f"agent {agent_id} looks stuck in a loop: it sent the same request more than "
            f"{rw.max_identical_requests} times within {rw.window_seconds:g}s, so its breaker is open for "
            f"{until - now:.0f}s more (or until reset_budget(agent_id={agent_id!r})). The call was not sent. "
            "Tune or disable this in the runaway section of the configuration.",
            scope=f"agent:{agent_id}", limit="runaway", spent=float(count),
            budget=float(rw.max_identical_requests), window="runaway", retry_after=max(until - now, 0.0),
        )


    def _finish(self, call_id: str | None, response: Any = None, *, failed: bool = False,
                exc: BaseException | None = None, prior: BaseException | None = None,
                logged_cost: Any = None, headers: Mapping[str, Any] | None = None,
                cached: bool = False) -> None:
        """End a call: settle it with its actual usage (or, ``failed``, as its error says) and
        free its slot. ``cached``: LiteLLM's logging says it answered from its own cache."""
        eng = self._engine
        ticket = eng.ticket_of(call_id) if call_id else None
        if ticket is None:
            return  # not ours, or already settled (LiteLLM sends more than one end-of-call event)
        assert call_id is not None
        prompt = self._cache_prompts.pop(call_id, None) if self._cache_prompts else None
        if not failed and (cached or _cache_hit(response)) and not eng.attempted(call_id):
            # Answered from LiteLLM's cache (``caching=True``): no request reached the provider, so
            # none is counted, nor tokens, nor money. (A partial hit, as an embedding of some
            # inputs not in the cache, sent the rest: it made an attempt, and is counted.)
            eng.release(call_id, input_tokens=0, output_tokens=0, cost=0.0, outcome="void")
            return
        if failed:
            outcome, wait, signals = "error", None, None
            if exc is not None:
                headers = response_headers(exc)
                signals = read_signals(headers, eng.wall(), cap=_MAX_PROVIDER_WAIT) if headers else None
                if signals is not None and (signals.limit_tokens or signals.limit_input_tokens
                                            or signals.limit_output_tokens):
                    self._learned_tokens_for(ticket, bool(signals.limit_input_tokens))
                if is_rate_limit(exc):
                    outcome = "rate_limited"
                    wait = suggested_wait(signals) if signals is not None else None
                    if wait is None:
                        wait = self._backoff(call_id)
                elif is_transient(exc):
                    outcome = "failure"
            progress = eng.progress(call_id)
            if progress == 2 or (progress == 1 and outcome_unseen(exc, prior)):
                # Sent, and its answer not seen or cut off (cancelled, timed out, a connection or a
                # stream lost): the provider may well have served it, and bill it. Counted at its
                # estimate and worst-case cost, like a lease that runs out.
                eng.release(call_id, outcome=outcome, wait=wait, signals=signals)
                return
            # Refused by the provider (an error status), or never sent: providers do not bill those,
            # nor count their tokens. The attempt still counts as a request, unless it was cancelled
            # before LiteLLM sent it, or LiteLLM itself refused it before sending (its own
            # ``litellm.max_budget``), or another limiter refused it (a second HiveLimiter in
            # ``litellm.callbacks``, whose deployment hook runs after this one's: was counted here as
            # a request sent, on async calls only). Any other error before the send may be LiteLLM's
            # own or the provider's: counted, to be safe.
            if not progress and (exc is None or isinstance(exc, (_LiteLLMBudgetExceeded, HiveRateLimitError))):
                outcome = "void"
            eng.release(call_id, input_tokens=0, output_tokens=0, cost=0.0, outcome=outcome, wait=wait,
                        signals=signals)
            return
        usage = _usage_obj(response)
        tin, tout = _usage_counts(usage)
        if tin is None and tout is None:
            total = _usage_total(usage)
            if total is not None:  # only a total: the prompt as estimated (at most all of it), the rest output
                tin = min(ticket.input_tokens, total)
                tout = total - tin
        cost = None
        cache = _prompt_cache(usage) if tin else None
        if cache is not None and prompt is not None:  # what the prompt cache now holds for this caller (see _ticket)
            left = self._cache_left
            if len(left) >= 4096:
                left.clear()
            left[ticket.dims] = (cache[0] + cache[1], eng.clock() + (3600.0 if cache[2] else 300.0), *prompt)
        if type(response) is not _CHAT_RESPONSE and _media.is_media(response):  # priced per unit: LiteLLM's cost
            cost = _media.litellm_cost(response, logged_cost)
            if cost is not None:
                info = ticket.info
                self._media_costs.note(str(info.get("provider", "")), str(info.get("model", "")), cost)
        elif tin is not None or tout is not None:
            info = ticket.info
            provider, model = str(info.get("provider", "")), str(info.get("model", ""))
            price = self._prices.price(provider, model)
            if not price.known:
                self._prices.warn_unknown(provider, model, "LiteLLM reports no cost for it")
            out = ticket.output_tokens if tout is None else tout  # (a count not given: its estimate stands)
            if cache is not None and price.detailed:  # tokens read from or written to the prompt cache: priced apart
                cost = price.billed(tin or 0, out, *cache)
            else:
                cost = price.cost(ticket.input_tokens if tin is None else tin, out)
            if getattr(response, "object", None) == "response":
                self._remember_turn(response, tin, tout)
        if headers is None:
            headers = response_headers(response)
        signals = read_signals(headers, eng.wall(), cap=_MAX_PROVIDER_WAIT) \
            if headers and _has_rate_headers(headers) else None
        if signals is not None:
            self._note_limits(ticket, signals)
        # (cache reads: not in input-token limits, as Anthropic's ITPM)
        eng.release(call_id, input_tokens=tin, output_tokens=tout, cost=cost, signals=signals,
                    cached_input=cache[0] if cache is not None else 0)

    def _learned_tokens_for(self, ticket: Ticket, input_limit: bool = False) -> None:
        """A token limit (of tokens, input or output tokens) learned for this call's model holds its
        calls only if their tokens are estimated: from now on they are, as for a configured token
        limit (the provider counts max_tokens too: an output-token limit holds calls to what they
        ask for). Only this model's: a prompt's tokens cost its tokenizer's time. Under an
        input-token limit (``input_limit``) a prompt-cache read is expected apart, as under a
        configured one."""
        key = ticket.dims[:2]  # (provider, model as its scope names it: however the call spelt it)
        learned = self._tokens_learned
        if key not in learned or (input_limit and not learned[key]):
            if len(learned) >= 4096:
                learned.clear()
            learned[key] = input_limit or learned.get(key, False)

    def _note_limits(self, ticket: Ticket, sig: Any) -> None:
        """Say what a provider's headers on a successful answer make the limiter do: the limits it
        learns (which cap calls where lower than configured, until the provider says otherwise:
        one wrong header would otherwise hold a model unnoticed) and a long wait for a reset."""
        where = f"{ticket.dims[0]}/{ticket.dims[1]}"
        if sig.limit_tokens or sig.limit_input_tokens or sig.limit_output_tokens:
            self._learned_tokens_for(ticket, bool(sig.limit_input_tokens))
        if sig.limit_requests or sig.limit_tokens or sig.limit_input_tokens or sig.limit_output_tokens:
            before = self._told.get(where, (None, None, None, None))
            now = (sig.limit_requests or before[0], sig.limit_tokens or before[1], sig.limit_input_tokens or before[2],
                   sig.limit_output_tokens or before[3])
            if now != before:
                if len(self._told) >= 1024:
                    self._told.clear()
                self._told[where] = now
                lowered = any(b is not None and n is not None and n < b for n, b in zip(now, before, strict=True))
                logger.log(logging.WARNING if lowered else logging.INFO,
                           "%s: the provider's headers give its limits as %s%s; calls there are held to them where "
                           "they are lower than configured", where,
                           " and ".join(f"{v:g} {unit} per minute"
                                        for v, unit in zip(now, ("requests", "tokens", "input tokens", "output tokens"),
                                                               strict=True)
                                        if v is not None),
                           f" (was {' and '.join(str(b) for b in before if b is not None)})" if lowered else "",
                           extra={"hive_repeat_key": ("limits", where)})
        for unit, reset, wait in sig.exhausted():
            if wait >= _LONG_PROVIDER_WAIT:
                logger.warning("%s: the provider reports no %s left until its reset in %.0fs; calls there wait "
                               "%.0fs%s", where, unit, reset, wait,
                               " (the most the limiter waits for a provider)" if wait >= _MAX_PROVIDER_WAIT else "",
                               extra={"hive_repeat_key": ("reset_wait", where, unit)})

    def _remember_turn(self, response: Any, tin: int | None, tout: int | None) -> None:
        """Keep what a Responses API turn leaves in its conversation (its input, which held the
        conversation before it, and its output), so that a turn continuing it is estimated with
        it: the provider bills the stored conversation as input. Bounded: the oldest go first."""
        rid = getattr(response, "id", None)
        if not rid or type(rid) is not str:
            return
        turns = self._turns
        if len(turns) >= _MAX_TURNS:
            for old in list(turns)[:_MAX_TURNS // 10]:  # (list() of a dict: one step, whatever other threads do)
                turns.pop(old, None)
        turns[rid] = (tin or 0) + (tout or 0)

    def _note_429(self, model_arg: Any, kwargs: Mapping[str, Any], wait: float | None, retried: bool) -> None:
        """Count and log a provider 429 (the retry loop sees every one, sync or async)."""
        model = str(model_arg or "")
        provider = self._provider_of(model, kwargs.get("custom_llm_provider"), kwargs.get("api_base"))
        bare = split_model(model, provider)
        self._obs.rate_limited(provider, bare)
        self._emit({"type": "provider_429", "provider": provider, "model": bare, "retry_after": wait,
                    "retried": retried, "time": self._engine.wall()})

    def _backoff(self, call_id: str) -> float:
        """Exponential backoff with full jitter for a 429 that named no wait."""
        r = self._config.retry
        failures = self._engine.consecutive_failures(call_id)
        return backoff(failures, r.base_delay, r.max_delay)

    # ------------------------------------------------------- async (hooks)
    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> None:
        """Admit an async call before its HTTP request (waits in the queue if needed)."""
        if "fallbacks" in kwargs and _sdk_fallbacks(kwargs):
            # LiteLLM's own fallbacks (``acompletion(..., fallbacks=[...])``): this call sends
            # nothing itself, it calls ``acompletion`` once per model, each try admitted in turn.
            return None
        call_id = kwargs.get("litellm_call_id")
        if not call_id:
            call_id = kwargs["litellm_call_id"] = new_call_id()
        if self._engine.holds(call_id) and not self._held_for_another_model(call_id, kwargs):
            # Already admitted under this id: this limiter is registered twice, or LiteLLM runs
            # the hook again for the same attempt. (A Router retry comes after the failed
            # attempt's failure event has released it.) Count the call once.
            return None
        try:
            kind = _call_type_name(call_type)
            ticket = self._ticket(call_id, kind, kwargs, kwargs.get("metadata"))
            if ticket is None:
                return None
            heard = self._splits_heard
            try:
                # (admitted at once, the usual case: no coroutine for the wait)
                waited = 0.0 if self._engine.admit_now(ticket) else await self._queue_async(ticket, kind, kwargs)
                if self._splits_heard != heard and (again := self._after_split(ticket, kwargs)) is not None:
                    ticket = again
                    waited += 0.0 if self._engine.admit_now(ticket) else await self._queue_async(ticket, kind, kwargs)
            except RateLimitQueueTimeout as exc:
                self._emit(_timeout_event(ticket, exc, self._engine.wall()))
                raise
        except HiveRateLimitError as exc:
            self._obs.rejected(exc)
            self._not_sent(kwargs, exc)
            raise
        admitted = _in_async_guard.get()
        if admitted is not None:
            # For the guard (see _retry_async): the last id admitted in its context first (LiteLLM
            # calling itself, for its fallbacks, admits each try in turn), and the ones before it
            # after, for a cancellation (which LiteLLM reports to no callback) to release them all:
            # a call another callback's hook made meanwhile (an LLM judge) included.
            if admitted[0] is not None and admitted[0] != call_id:
                admitted.append(admitted[0])
            admitted[0] = call_id
        if waited:
            self._obs.queue_wait(waited)
        if ticket.chosen is not None:
            kwargs["api_key"] = self._key_value(ticket.chosen)
            return kwargs  # type: ignore[return-value]
        return None

    @contextlib.contextmanager
    def _waiting(self, ticket: Ticket, call_type: str, kwargs: Mapping[str, Any]) -> Iterator[None]:
        """While a call waits in the queue, its request is at hand for a configuration change to
        estimate it again (see _apply_config)."""
        self._waiting_calls[ticket.call_id] = (call_type, kwargs)
        try:
            yield
        finally:
            self._waiting_calls.pop(ticket.call_id, None)

    async def _queue_async(self, ticket: Ticket, call_type: str, kwargs: Mapping[str, Any]) -> float:
        """Wait in the queue (a call :meth:`Engine.admit_now` turned down)."""
        with self._waiting(ticket, call_type, kwargs):
            return await queue_async(self._engine, ticket, self._max_wait(kwargs))

    def _queue_sync(self, ticket: Ticket, call_type: str, kwargs: Mapping[str, Any]) -> float:
        """:meth:`_queue_async` for a sync call (blocks its thread)."""
        with self._waiting(ticket, call_type, kwargs):
            return acquire_sync(self._engine, ticket, self._max_wait(kwargs))

    def _held_for_another_model(self, call_id: str, kwargs: Mapping[str, Any]) -> bool:
        """Whether the reservation ``call_id`` holds is for another model than this attempt's, and
        was never sent: a Router fallback after the first model group failed before sending (no
        deployment available, cooled down), under the id the proxy's pre-call hook admitted. That
        reservation is then given back (nothing was sent) and the attempt is admitted for the
        model it goes to."""
        held = self._engine.ticket_of(call_id)
        if held is None:
            return False
        model = kwargs.get("model")
        model = model if type(model) is str else str(model or "")
        if held.info.get("model") == model:  # (the usual case: the same deployment's model)
            return False
        provider = self._provider_of(model, kwargs.get("custom_llm_provider"), kwargs.get("api_base"))
        if held.dims[:2] == (provider, split_model(model, provider)) or self._engine.progress(call_id):
            return False
        self._unadmit(call_id)
        return True

    def _admitted_upstream(self, call_id: str) -> bool:
        """Whether ``call_id`` was admitted before LiteLLM's entry point ran (the proxy's pre-call hook)."""
        return False

    def _max_wait(self, kwargs: Mapping[str, Any]) -> float:
        """How long this call may wait in the queue: ``queue.max_wait_seconds``, no longer than the
        call's own ``timeout=`` (a caller who gives up after 10 s must not be held for 60) nor
        than what is left of its retries' wait budget."""
        limit = self._config.queue.max_wait_seconds
        own = _call_timeout(kwargs)
        if own is not None and own < limit:
            limit = own
        budget = _wait_budget.get()
        return limit if budget is None else max(min(limit, budget - self._engine.clock()), 0.0)

    def _key_value(self, scope_key: str) -> str:
        env = scope_key.split("/", 1)[1]
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"API key environment variable {env} is no longer set")
        return value

    async def async_filter_deployments(self, model: str, healthy_deployments: list[Any], messages: Any,
                                       request_kwargs: dict[str, Any] | None = None,
                                       parent_otel_span: Any = None) -> list[Any]:
        """A Router's choice among a model group's deployments (async calls): those a provider has
        put on hold (a 429's cooldown, an open circuit breaker, on their endpoint or, before their
        model is served by several, on their model) are left out while a free deployment with the
        same tags stays, so that the Router sends the call there rather than have it wait in the
        queue. With none such the list is left as it is (the call waits for its deployment)."""
        if len(healthy_deployments) < 2 or not self._config.enabled:
            return healthy_deployments
        try:
            keys = [self._signal_scope(d) for d in healthy_deployments]
            held = self._engine.held_for({k for k in keys if k is not None})
            if not held:
                return healthy_deployments
            # The Router filters by tags after the callbacks (LiteLLM 1.83, 1.110): a held
            # deployment goes only while a free one with its tags stays, else the call's tags
            # could be left with no deployment (the call failing rather than waiting for one).
            tags = [_route_tags(d) for d in healthy_deployments]
            free_tags = {t for t, k in zip(tags, keys, strict=True) if k not in held}
            free = [d for d, k, t in zip(healthy_deployments, keys, tags, strict=True)
                    if k not in held or t not in free_tags]
        except Exception as exc:  # (a routing aid: never a reason for a call to fail)
            logger.warning("could not check a model group's deployments for provider cooldowns: %s", exc,
                           extra={"hive_repeat_key": ("filter_deployments",)})
            return healthy_deployments
        if len(free) == len(healthy_deployments):
            return healthy_deployments
        logger.debug("%d of %d deployments of %s left out while a provider holds them",
                     len(healthy_deployments) - len(free), len(healthy_deployments), model)
        return free

    def _signal_scope(self, deployment: Any) -> str | None:
        """The scope holding the provider signals of calls to a Router deployment: its endpoint's
        once its model is served by several, else its model's."""
        params = deployment.get("litellm_params") if isinstance(deployment, Mapping) else None
        if not isinstance(params, Mapping):
            return None
        model = params.get("model")
        if type(model) is not str or not model:
            return None
        provider = self._provider_of(model, params.get("custom_llm_provider"), params.get("api_base"))
        key = (provider, split_model(model, provider))
        if self._endpoints.get(key) is not _SERVED_BY_MANY:
            return f"model:{provider}/{key[1]}"
        endpoint = _endpoint(params)
        cache = self._signal_scopes
        found = cache.get((key, endpoint))
        if found is None:
            if len(cache) >= 1024:
                cache.clear()
            found = cache[(key, endpoint)] = _endpoint_scope(key, endpoint).key
        return found

    async def async_post_call_success_deployment_hook(
        self, request_data: dict[str, Any], response: Any, call_type: Any
    ) -> Any:
        """Settle a finished non-streaming async call with its actual usage."""
        if not request_data.get("stream"):
            if type(response) is _CHAT_RESPONSE or not _media.is_media(response) \
                    or _media.litellm_cost(response) is not None:
                # (Anthropic's messages API answers with a dict; its headers are in the logging details)
                self._finish(request_data.get("litellm_call_id"), response,
                             headers=_logged_headers(request_data) if type(response) is dict else None)
            elif request_data.get("litellm_call_id"):
                # Billed per unit, and priced by LiteLLM after this hook: the slot comes back now,
                # the money once priced (the async guard when the call returns, else the logging hook).
                self._engine.free_slot(request_data["litellm_call_id"])
        return response

    async def async_post_call_streaming_deployment_hook(
        self, request_data: dict[str, Any], response_chunk: Any, call_type: Any
    ) -> Any:
        """Settle as soon as the usage chunk passes; free the slot at the chunk that ends generation.

        LiteLLM (1.83 to 1.110) calls this with the last chunk only, so it is not what keeps a live
        stream's lease: the stream object renews it as it is read (see :func:`_keep_alive`)."""
        call_id = request_data.get("litellm_call_id")
        if not call_id:
            return response_chunk
        if getattr(response_chunk, "usage", None) is not None:
            tin, _ = _usage_of(response_chunk)
            if tin is not None:
                # The usage chunk is the last one the provider sends: the call is complete.
                self._finish(call_id, response_chunk)
                return response_chunk
        choices = getattr(response_chunk, "choices", None) or ()
        if any(getattr(c, "finish_reason", None) for c in choices):
            # Generation is over; usage (exact or LiteLLM's estimate) comes with the success event.
            self._engine.free_slot(call_id)
        return response_chunk

    # The success events: LiteLLM runs its logging hooks for every registered CustomLogger, then
    # delivers ``(async_)log_success_event`` to those that override it. The delivery (1.110 copies
    # and redacts the call's details per callback) costs ~50k CPU instructions per call, so the
    # limiter settles from the hooks and overrides neither success event.
    async def async_logging_hook(self, kwargs: dict[str, Any], result: Any, call_type: Any) -> tuple[Any, Any]:
        """Settle a finished call from LiteLLM's async success handler (streams: once assembled)."""
        self._settle_logged(kwargs, result)
        return kwargs, result

    def logging_hook(self, kwargs: dict[str, Any], result: Any, call_type: Any) -> tuple[Any, Any]:
        """Settle a finished sync call from LiteLLM's sync success handler (streams: once assembled).
        LiteLLM 1.83 also runs this handler, in a worker thread, for async streams: those settle from
        the async handler, on the caller's loop, as ``log_success_event`` never saw them."""
        if _call_type_name(call_type) not in _ASYNC_CALL_TYPES:
            self._settle_logged(kwargs, result)
        return kwargs, result

    def redact_standard_logging_payload_from_model_call_details(self, model_call_details: dict[str, Any]) -> Any:
        """What this callback's own success events would receive, redacted. The limiter reads none,
        so nothing needs redacting: LiteLLM 1.83 calls this for every CustomLogger on every async
        success (imports included, ~15k CPU instructions a call) even where the events are
        LiteLLM's no-ops. A subclass that logs success events gets LiteLLM's redaction."""
        cls = type(self)
        if (cls.async_log_success_event is CustomLogger.async_log_success_event
                and cls.async_log_stream_event is CustomLogger.async_log_stream_event):
            return model_call_details
        return super().redact_standard_logging_payload_from_model_call_details(model_call_details)

    def _settle_logged(self, kwargs: Mapping[str, Any], result: Any) -> None:
        call_id = kwargs.get("litellm_call_id")
        if not call_id or call_id in self._settled_inline:
            return
        if not self._engine.holds(call_id):
            # A try of LiteLLM's SDK fallbacks logs under the call's id (its tries share the call's
            # logging object) and is admitted under its own, which LiteLLM notes in litellm_params.
            params = kwargs.get("litellm_params")
            own = params.get("litellm_call_id") if type(params) is dict or isinstance(params, Mapping) else None
            if not own or own == call_id or own in self._settled_inline or not self._engine.holds(own):
                return  # not ours, the guard's to settle, or already settled (success deployment hook, guard)
            call_id = own
        if kwargs.get("stream"):
            # The handler runs per chunk too; the call is over once LiteLLM has assembled it.
            result = kwargs.get("async_complete_streaming_response") or kwargs.get("complete_streaming_response")
            if result is None:
                return
            # (Anthropic's messages API: its assembled answer has no headers; see _logged_headers)
            headers = response_headers(result) or _logged_headers(kwargs)
            self._settle_quietly(call_id, result, kwargs.get("response_cost"), headers,
                                 cached=kwargs.get("cache_hit") is True)
            return
        self._settle_quietly(call_id, result, kwargs.get("response_cost"), cached=kwargs.get("cache_hit") is True)

    def _settle_quietly(self, call_id: str, result: Any, logged_cost: Any = None,
                        headers: Mapping[str, Any] | None = None, cached: bool = False) -> None:
        """Settle a finished call where an error must not reach the caller (LiteLLM 1.83 does not
        guard its logging hooks; a call that succeeded must not fail in its settlement)."""
        try:
            self._finish(call_id, result, logged_cost=logged_cost, headers=headers, cached=cached)
        except Exception:
            logger.exception("hive-ratelimit: settling a finished call failed; its lease will release it")

    async def async_log_failure_event(self, kwargs: dict[str, Any], response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        self._finish(kwargs.get("litellm_call_id"), failed=True, exc=_exception_of(kwargs, response_obj))

    # -------------------------------------------------------- sync (events)
    def log_pre_api_call(self, model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
        """Count retries LiteLLM sends without re-running the pre-call hook (``num_retries``)."""
        call_id = kwargs.get("litellm_call_id")
        if call_id and not self._engine.note_attempt(call_id):
            # A try of SDK fallbacks: LiteLLM logs its send under the outer call's id, and the try
            # was admitted under its own, which its ``litellm_params`` carry. (Unnoted, a try
            # cancelled in flight was settled as never sent: its request and cost given back.)
            own = (kwargs.get("litellm_params") or {}).get("litellm_call_id")
            if own and own != call_id:
                self._engine.note_attempt(own)

    def log_failure_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._finish(kwargs.get("litellm_call_id"), failed=True, exc=_exception_of(kwargs, response_obj))

    # ------------------------------------------------------------ sync guard
    def _guard_sync(self, call_type: str, kwargs: dict[str, Any]) -> str | None:
        call_id = kwargs.get("litellm_call_id")
        if not call_id:
            call_id = kwargs["litellm_call_id"] = new_call_id()
        try:
            ticket = self._ticket(call_id, call_type, kwargs, kwargs.get("metadata"))
            if ticket is None:
                return None
            try:
                heard = self._splits_heard
                waited = 0.0 if self._engine.admit_now(ticket) else self._queue_sync(ticket, call_type, kwargs)
                if self._splits_heard != heard and (again := self._after_split(ticket, kwargs)) is not None:
                    ticket = again
                    waited += 0.0 if self._engine.admit_now(ticket) else self._queue_sync(ticket, call_type, kwargs)
            except RateLimitQueueTimeout as exc:
                self._emit(_timeout_event(ticket, exc, self._engine.wall()))
                raise
        except HiveRateLimitError as exc:
            self._obs.rejected(exc)
            self._not_sent(kwargs, exc)
            raise
        if waited:
            self._obs.queue_wait(waited)
        if ticket.chosen is not None:
            kwargs["api_key"] = self._key_value(ticket.chosen)
        return call_id


#: Seconds a call not streamed may outlive its timeout (LiteLLM's own handling, then settlement).
_LEASE_MARGIN = 30.0
#: The longest lease a call's timeout gives it (seconds).
_MAX_CALL_LEASE = 3600.0


def _read_config(source: Any) -> RateLimitingConfig:
    """The configuration a ``HiveLimiter``'s ``config`` argument gives, as of now."""
    return load_config(dict(source) if isinstance(source, Mapping) else source)


def _pinned(source: Any) -> Any:
    """``source`` as ``reload()`` reads it again: a path made absolute (the process may change
    its working directory meanwhile); a ``RateLimitingConfig`` is applied again as it is."""
    return os.path.abspath(source) if isinstance(source, (str, os.PathLike)) else source


#: Providers whose text completions LiteLLM sends to a completions endpoint (see :func:`_prompts`).
_BATCH_PROVIDERS = frozenset(("text-completion-openai", "azure_text"))


def _prompts(prompt: Any, provider: str, model: str) -> int:
    """How many prompts a text completion's ``prompt`` holds: a list of strings or of token lists
    is a batch (OpenAI's completions API generates ``n`` completions of up to ``max_tokens`` for
    each, in one request), anything else one prompt (a list of ints is one prompt's tokens).
    Only where LiteLLM sends it to a completions endpoint (an OpenAI model that is not a chat
    model, ``text-completion-openai/``, ``azure_text/``, the providers LiteLLM lists as
    OpenAI-text-completion compatible): elsewhere it sends the prompts as the user messages of one
    chat request, which gets one answer (1.83.4 through 1.110.2)."""
    if type(prompt) is list and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt) and (
            provider in _BATCH_PROVIDERS
            or provider in getattr(litellm, "openai_text_completion_compatible_providers", ())
            or (provider == "openai" and split_model(model, provider) not in litellm.open_ai_chat_completion_models)):
        return len(prompt)
    return 1


def _call_timeout(kwargs: Mapping[str, Any]) -> float | None:
    """The call's own ``timeout=`` in seconds: a number, a numeric string, or an ``httpx.Timeout``'s
    longest part (``None`` parts and infinite values: ``inf``); ``None`` when it gives none, or
    none that is usable (not positive, not a number)."""
    t = kwargs.get("timeout")
    if t is None or isinstance(t, bool):
        return None
    seconds: float
    try:
        if isinstance(t, (numbers.Number, str)):
            seconds = float(t)  # type: ignore[arg-type]
        elif hasattr(t, "read") and hasattr(t, "connect"):  # httpx.Timeout
            parts: list[Any] = [getattr(t, n, None) for n in ("connect", "read", "write", "pool")]
            seconds = math.inf if any(v is None for v in parts) else max(float(v) for v in parts)
        else:
            return None
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if seconds > 0 else None  # (NaN fails the test)


def _call_lease(kwargs: Mapping[str, Any], lease_seconds: float) -> float:
    """The lease of a call that is not streamed: a healthy call given a ``timeout=`` longer than
    ``lease_seconds`` must not lose its slot while it runs, so its lease covers that timeout
    (see :func:`_call_timeout`) and a margin, up to an hour; 0 (the engine's ``lease_seconds``)
    otherwise. (Not LiteLLM's default timeout, 6000 s, nor more than an hour: a process that dies
    would hold its slots in Redis for that long.)"""
    seconds = _call_timeout(kwargs)
    if seconds is None or seconds + _LEASE_MARGIN <= lease_seconds:
        return 0.0
    return min(seconds + _LEASE_MARGIN, max(_MAX_CALL_LEASE, lease_seconds))


def _state_file(path: str | None) -> str:
    """The state file a ``state_path`` names (``None``: the default one)."""
    return os.path.expanduser(str(path)) if path else str(default_state_path())


def key_id(api_key: str) -> str:
    """What an id that is an API key is counted as: ``key#<hash>`` (ids reach stats, logs, state
    files and Redis keys, which must never hold a key)."""
    return "key#" + hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


#: The shortest id looked at as a possible API key other than the call's ``api_key=`` (provider
#: keys are 32 characters and more: OpenAI, Anthropic, Mistral, Gemini, Groq, Azure).
_KEY_LENGTH = 20
_ID_FIELDS = ("agent_id", "user_id", "team_id", "run_id")


_SECRET_ENV = re.compile("KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
_env_seen: list[Any] = [-1.0, -1, ()]  # when, len(os.environ) then, the names of its variables named like a secret


#: Identities none of whose ids is long enough to be an API key (see HiveLimiter._hide_keys), by id().
_short_ids: dict[int, Identity] = {}


def _env_secrets() -> list[str]:
    """The values of the environment variables named like a secret. Their names are looked for
    again when a variable was added or removed, and at least once a second (going through the
    whole environment costs ~45 µs); the values are read each time."""
    now = time.monotonic()
    size = len(os.environ)
    if size != _env_seen[1] or now - _env_seen[0] >= 1.0:
        _env_seen[:] = [now, size, tuple(name for name in os.environ if _SECRET_ENV.search(name))]
    get = os.environ.get  # (a short value is no API key: an agent named "1" stays "1" beside KEY_INDEX=1)
    return [value for value in map(get, _env_seen[2]) if value and len(value) >= _KEY_LENGTH]


def _without_keys(ident: Identity, ids: tuple[str | None, ...], api_key: Any, provider: str) -> Identity:
    """``ident`` with any id that is an API key the call may send replaced by :func:`key_id`: its
    ``api_key=``, else what LiteLLM falls back to (``litellm.api_key``, ``litellm.<provider>_key``,
    and any environment variable named like a secret: LiteLLM reads ``FIREWORKS_API_KEY`` for
    ``fireworks_ai``, ``HF_TOKEN`` for ``huggingface``). Ids are compared as they are counted
    (:func:`clean_id`): a key longer than ``MAX_ID`` is kept cut, and must be found cut. (Runs
    once per new id of 20 characters or more: the caller remembers ids found to hold no key.)"""
    keys = [api_key, getattr(litellm, "api_key", None)]
    if provider.isidentifier():
        keys += [getattr(litellm, f"{provider}_key", None), os.environ.get(f"{provider.upper()}_API_KEY")]
    keys += _env_secrets()
    for key in keys:
        if type(key) is not str or not key:
            continue
        shown = key if len(key) <= MAX_ID and key.isprintable() else clean_id(key)  # (clean_id's own test)
        if shown in ids:
            changes: dict[str, Any] = {f: key_id(key) for f in _ID_FIELDS if getattr(ident, f) == shown}
            ident = dataclasses.replace(ident, **changes)
    return ident


def _warn_unknown_providers(cfg: RateLimitingConfig) -> None:
    """A ``providers`` key LiteLLM does not know (``opneai``, ``OpenAI``) is a block no call ever
    counts against: its limits would silently never apply. Said once per configuration (not an
    error: a custom provider name given as ``custom_llm_provider`` is legitimate)."""
    if not cfg.providers:
        return
    try:
        known = {str(getattr(p, "value", p)) for p in litellm.provider_list}
    except Exception:  # pragma: no cover - every supported LiteLLM has provider_list
        return
    for name in cfg.providers:
        if name not in known:
            close = difflib.get_close_matches(name.lower(), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            logger.warning("rate_limiting.providers.%s: LiteLLM knows no provider %r%s; its limits apply only to calls "
                           "whose provider resolves to exactly that name (custom_llm_provider=%r)",
                           name, name, hint, name)


def _settle_at_exit(ref: weakref.ref[HiveLimiter]) -> None:
    """At interpreter exit: calls still open (a stream abandoned unread, a call in a daemon thread)
    are settled at their worst case, as an expired lease would be, so that their spend reaches the
    state file (or Redis) rather than vanish with the process."""
    lim = ref()
    if lim is None:
        return
    try:
        n = lim._engine.settle_open()
    except Exception:
        logger.exception("hive-ratelimit: could not settle the calls still open at exit")
        return
    if n:
        logger.info("hive-ratelimit: %d call(s) still open at exit counted at their worst case", n)
    try:
        kept = lim._engine.flush_pending()  # (a shared backend: what it kept during an outage)
    except Exception:
        logger.exception("hive-ratelimit: could not write the settlements kept during a backend outage at exit")
    else:
        if kept:
            logger.error("hive-ratelimit: %d settlement(s) kept during a backend outage could not be written to "
                         "it at exit: the shared budgets do not count their spend", kept)
    ledger = lim._ledger
    if ledger is not None and ledger.unsaved:
        try:
            ledger.flush()
        except Exception as exc:
            logger.error("hive-ratelimit: %d settled call(s) could not be written to %s at exit (%s): their "
                         "spend is lost to the next process", ledger.unsaved, ledger.path, exc)


def _has_rate_headers(headers: Any) -> bool:
    if not headers:
        return False
    try:
        return any("ratelimit" in k or "retry-after" in k for k in headers if isinstance(k, str))
    except Exception:
        return False


def _unknown_price_error(provider: str, model: str, how: str | None = None) -> HiveRateLimitError:
    from ._budget_errors import BudgetExceededError

    bare = split_model(model, provider)
    # (not "rate_limiting.pricing": a budget error must not read as a rate limit; see _budget_errors)
    how = how or f"Add pricing.{bare}: {{input_per_million: ..., output_per_million: ...}} to the configuration"
    return BudgetExceededError(
        f"no price is known for model {provider}/{bare}, so its budget cannot be "
        f"enforced (unknown_price: block). {how}, or set unknown_price: estimate. "
        "The call was not sent.",
        scope=f"model:{provider}/{bare}", limit="unknown_price", spent=0.0, budget=0.0,
        window="none",
    )


def _timeout_event(ticket: Ticket, exc: RateLimitQueueTimeout, now: float) -> dict[str, Any]:
    return {"type": "queue_timeout", "scope": exc.scope, "limit": exc.limit, "retry_after": exc.retry_after,
            "model": ticket.info.get("model"), "agent_id": ticket.info.get("agent_id"), "time": now}


def unregister(callback: Any) -> None:
    """Remove a callback from every LiteLLM callback list (works on old and new LiteLLM).

    Replacing ``litellm.callbacks`` alone does not unregister an instance: LiteLLM copies
    callbacks into its internal success/failure lists.
    """
    manager = getattr(litellm, "logging_callback_manager", None)
    remove = getattr(manager, "remove_callback_from_all_lists", None)
    if callable(remove):
        remove(callback)
    for name in (
        "callbacks", "success_callback", "failure_callback", "input_callback", "service_callback",
        "_async_success_callback", "_async_failure_callback", "_async_input_callback",
    ):
        lst = getattr(litellm, name, None)
        if isinstance(lst, list):
            while callback in lst:
                lst.remove(callback)


# --------------------------------------------------------------------- guard
_POSITIONAL = {
    "completion": ("model", "messages"),
    "embedding": ("model", "input"),
    "text_completion": ("prompt",),
    "acompletion": ("model", "messages"),
    "aembedding": ("model", "input"),
    "atext_completion": ("prompt",),
    "responses": ("input", "model"),
    "aresponses": ("input", "model"),
    # Billed per unit (see _media); the async ones take ``*args`` and hand them to the sync ones
    # (LiteLLM fails on more than these two positional arguments of aimage_generation).
    "image_generation": ("prompt", "model", "n", "quality", "response_format", "size"),  # (n, size: its price)
    "aimage_generation": ("prompt", "model"),
    "image_edit": ("image", "prompt", "model"),
    "aimage_edit": ("image", "model", "prompt"),
    "speech": ("model", "input", "voice"),
    "aspeech": ("model", "input", "voice"),
    "transcription": ("model", "file"),
    "atranscription": ("model", "file"),
    "rerank": ("model", "query", "documents"),
    "arerank": ("model", "query", "documents"),
}
_ASYNC_NAMES = ("acompletion", "aembedding", "atext_completion", "aresponses", "aimage_generation", "aimage_edit",
                "aspeech", "atranscription", "arerank")
#: The flags LiteLLM's async entry points set on the sync function they run in a worker thread.
_ASYNC_FLAGS = frozenset({"acompletion", "aembedding", "atext_completion", "aresponses", "aimg_generation", "aspeech",
                          "atranscription", "arerank", "async_call"})
_ASYNC_CALL_TYPES = frozenset({*_ASYNC_NAMES, "anthropic_messages"})  # (LiteLLM's call types)
_guard_lock = threading.Lock()


def _active_limiters() -> list[HiveLimiter]:
    out: list[HiveLimiter] = []
    for cb in litellm.callbacks:
        # A limiter appended twice still counts each call once.
        if isinstance(cb, HiveLimiter) and cb._config.enabled and cb not in out:
            out.append(cb)
    return out


def _claim_call_id(limiter: HiveLimiter, kwargs: dict[str, Any]) -> None:
    """Reservations and the events that settle them are matched by call id: a caller reusing an
    id that another call holds, waits with, or ended with in the last two minutes (LiteLLM may
    deliver that call's success event late, and it would settle this one) gets an id of its own.
    (Not when a hook before LiteLLM's entry point admitted this very call, e.g. the proxy's
    pre-call hook: it is counted once.)"""
    cid = kwargs.get("litellm_call_id")
    if not cid or limiter._admitted_upstream(cid):
        return
    given = limiter._given_ids
    eng = limiter._engine
    with limiter._given_lock:  # (two threads giving one id: one keeps it, the other gets its own)
        now = time.monotonic()
        try:
            seen = given.get(cid)
        except TypeError:  # an unhashable id: LiteLLM's own would be a string
            kwargs["litellm_call_id"] = new_call_id()
            return
        if (seen is not None and now - seen < _ID_REUSE_SECONDS) or eng.holds(cid) or eng.waiting(cid):
            kwargs["litellm_call_id"] = new_call_id()
            return
        if len(given) >= _MAX_GIVEN_IDS:  # the oldest first (kept in the order given)
            for old in list(itertools.islice(given, _MAX_GIVEN_IDS // 4)):
                del given[old]
        given.pop(cid, None)
        given[cid] = now


def _forget_given_id(limiter: HiveLimiter, call_id: Any) -> None:
    """An attempt under a caller's id failed, and its failure was handled there and then (LiteLLM
    delivers failure events in line): no late event can come for it, so a retry may keep the id."""
    if call_id and limiter._given_ids:
        with limiter._given_lock, contextlib.suppress(TypeError):
            limiter._given_ids.pop(call_id, None)


def _module_retries(kwargs: Mapping[str, Any]) -> int:
    """``litellm.num_retries``, when it applies to this call (the call sets no ``num_retries``)."""
    g = litellm.num_retries
    return g if type(g) is int and g > 0 and "num_retries" not in kwargs else 0


def _retries_asked(kwargs: Mapping[str, Any]) -> int:
    """How many retries the caller asked LiteLLM for: ``num_retries`` or the SDK's ``max_retries``
    on the call, else the module-wide ``litellm.num_retries``."""
    asked = _module_retries(kwargs)
    for name in ("num_retries", "max_retries"):
        v = kwargs.get(name)
        if type(v) is int and v > asked:
            asked = v
    return asked


def _endpoint(kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    """The endpoint a call goes to: its ``api_base`` (or ``base_url``) and ``api_key`` (``None``:
    LiteLLM's default for its provider), hashable."""
    base = kwargs.get("api_base") or kwargs.get("base_url")
    key = kwargs.get("api_key")
    if (base is not None and type(base) is not str) or (key is not None and type(key) is not str):
        return repr(base), repr(key)
    return base, key


def _route_tags(deployment: Any) -> tuple[str, ...]:
    """A Router deployment's ``tags`` (its ``litellm_params``'), as a set: the Router's tag
    filtering, which runs after the callbacks' filters, decides the same for deployments with the
    same tags."""
    params = deployment.get("litellm_params") if isinstance(deployment, Mapping) else None
    tags = params.get("tags") if isinstance(params, Mapping) else None
    if not tags:
        return ()
    if isinstance(tags, (list, tuple, set, frozenset)):
        return tuple(sorted({str(t) for t in tags}))
    return (str(tags),)


def _model_scope_key(plan: _Plan) -> str:
    """The key of a plan's model scope (every plan has one: it keeps a model's provider signals
    while the model is seen at one endpoint)."""
    key: str = next(s.key for s in plan.scopes if s.level == "model")
    return key


def _with_endpoint(ticket: Ticket, kwargs: Mapping[str, Any]) -> list[Any] | None:
    """The scopes of a ticket built before its model was split, with its endpoint's added (the
    endpoint of the call ``kwargs`` describe); ``None`` when it has its endpoint's already or
    goes with a key pool's key (whose scope keeps its signals)."""
    if ticket.choices is not None or any(s.limits is _ENDPOINT_LIMITS for s in ticket.scopes):
        return None
    return [*ticket.scopes, _endpoint_scope(ticket.dims[:2], _endpoint(kwargs))]


def _endpoint_scope(model: tuple[Any, ...], endpoint: tuple[Any, Any]) -> Scope:
    """The API-key scope of one endpoint of a (provider, model): named by its host and a digest
    of its ``api_base`` and ``api_key`` (never the key itself)."""
    base = endpoint[0]
    host = "default"
    if base:
        try:
            url = urlsplit(str(base))
            host = (url.hostname or "custom") + (f":{url.port}" if url.port else "")
        except ValueError:
            host = "custom"
    digest = hashlib.sha256(repr(endpoint).encode("utf-8", "replace")).hexdigest()[:10]
    return Scope("key", f"key:{model[0]}/{model[1]}@{host}#{digest}", _ENDPOINT_LIMITS)


def _is_router_call(kwargs: Mapping[str, Any]) -> bool:
    """A Router's call to one of its deployments (LiteLLM's own test: ``model_group`` in its metadata)."""
    for name in ("metadata", "litellm_metadata"):
        meta = kwargs.get(name)
        if meta and (type(meta) is dict or isinstance(meta, Mapping)) and "model_group" in meta:
            return True
    return False


def _sdk_fallbacks(kwargs: Mapping[str, Any]) -> bool:
    """A chat call with LiteLLM's SDK fallbacks (``completion(..., fallbacks=[...])``, not a
    Router's): LiteLLM sends nothing for it itself but calls ``acompletion`` once per model in
    turn (``completion_with_fallbacks``, 1.83.4 through 1.110.2), until one answers. Each of those
    tries is admitted, counted and settled on its own model; the call around them is not."""
    return bool(kwargs.get("fallbacks")) and not _is_router_call(kwargs)


def _context_fallback(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The model a chat call goes to next if its own answers that the prompt is too long: its
    ``context_window_fallback_dict`` entry, which is then taken off the call. LiteLLM would make
    that second request itself, inside the call, where no hook sees it (sent unadmitted, its
    answer settled on the first model); the guard makes it instead, admitted like any attempt.
    ``None`` (the call left as it is) without an entry, for a Router's deployment call (LiteLLM
    leaves those to the Router) and on a call with SDK fallbacks (each try carries the table and
    does this itself: :func:`_nested_async`)."""
    table = kwargs.get("context_window_fallback_dict")
    if not table or not isinstance(table, Mapping) or _is_router_call(kwargs) or _sdk_fallbacks(kwargs):
        return None
    model = args[0] if args else kwargs.get("model")
    try:
        target = table.get(model)
    except TypeError:  # an unhashable model: LiteLLM's own lookup fails the same way
        return None
    if not target or not isinstance(target, str):
        return None
    del kwargs["context_window_fallback_dict"]
    return target


def _context_window_exceeded(exc: BaseException) -> bool:
    return isinstance(exc, litellm.exceptions.ContextWindowExceededError)


class _NoSdkRetries(int):
    """A ``max_retries=0`` that LiteLLM's OpenAI embedding handler keeps at 0: it reads
    ``max_retries or DEFAULT_MAX_RETRIES`` (1.83.4 through 1.110.2), which turns a plain 0 into 2
    hidden SDK retries. This 0 is truthy; as a number it is 0 everywhere (the SDK, JSON, logs).
    Given to embedding calls only."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "0"


_EMBEDDING_NO_RETRIES = _NoSdkRetries(0)


def _first_attempt(limiter: HiveLimiter, kwargs: dict[str, Any], sync: bool = False,
                   router_retries: bool = True, embedding: bool = False) -> tuple[float, Any, int, Any]:
    """Prepare a guarded call's first attempt, which runs without the retry state (built only if it
    fails, from what this returns: the start time, the caller's own call id if any, how many
    retries of failed attempts the caller asked for, and a Router deployment's own
    ``num_retries``, set to 0 here, for :func:`_router_retries_back`).

    The openai SDK would retry 429s, 5xx and timeouts itself, inside one attempt: unseen, never
    admitted and never counted (LiteLLM hands it ``num_retries`` as its ``max_retries``), and so
    would LiteLLM's own retry loop (``litellm.num_retries``). So both get 0, and the retries the
    caller asked for are made here instead, each one admitted and counted. A Router's deployment
    call gets 0 too but no retries here: the Router retries itself, through this guard.

    One exception: a sync call under a module-wide ``litellm.num_retries`` is left as it is.
    LiteLLM's sync retry loop reads that setting even when the call says ``num_retries=0``, and
    it needs ``tenacity``; taking the SDK's retries away there would turn a retried success into
    an error. Its retries stay with the SDK, unseen (docs/troubleshooting.md).

    Embeddings get a 0 that survives LiteLLM's embedding handler (:class:`_NoSdkRetries`).
    (LiteLLM 1.83.4's image handler drops ``max_retries`` whatever its value: the SDK's retries
    of an image call stay unseen there.)"""
    started = limiter._engine.clock()
    user_call_id = kwargs.get("litellm_call_id")
    asked = 0
    deployment_retries = None
    if limiter._config.retry.take_over_sdk_retries and not (sync and _module_retries(kwargs)):
        if litellm.num_retries or "num_retries" in kwargs or "max_retries" in kwargs:
            # Retries asked for somewhere (the usual call asks for none: it skips this).
            if router_retries and _is_router_call(kwargs):
                # The Router retries through this guard. LiteLLM 1.110 turns the SDK's retries off
                # for its deployment calls; 1.83 hands them a deployment's num_retries as max_retries.
                if "num_retries" in kwargs:
                    deployment_retries = kwargs["num_retries"]
                    kwargs["num_retries"] = 0
            else:
                asked = _retries_asked(kwargs)
                if asked or "num_retries" in kwargs:
                    # 0, not absent: LiteLLM's own retry loop would fall back to litellm.num_retries
                    kwargs["num_retries"] = 0
        kwargs["max_retries"] = _EMBEDDING_NO_RETRIES if embedding else 0
    if user_call_id:  # (a call id the caller gave: see _claim_call_id)
        _claim_call_id(limiter, kwargs)
    return started, user_call_id, asked, deployment_retries


def _router_retries_back(exc: BaseException, retries: Any) -> None:
    """Give a Router deployment's failed call its ``num_retries`` back, on the error the Router
    reads it from. LiteLLM writes the call's ``num_retries`` onto the error on its way out (1.83.4
    and 1.110.2), and the Router takes that as how often to retry the deployment's failure: the
    guard's 0 (see :func:`_first_attempt`) would leave a deployment that sets ``num_retries``
    with no retries at all. The limiter's own refusals keep what they say (not retried in the
    group: :class:`~.errors.RateLimitQueueTimeout`)."""
    if retries and not isinstance(exc, HiveRateLimitError) and getattr(exc, "num_retries", None) == 0:
        with contextlib.suppress(Exception):  # (an error that does not take attributes keeps its 0)
            exc.num_retries = retries  # type: ignore[attr-defined]


class _Retrying:
    """The retry policy of one guarded call: provider 429s are retried, each attempt re-admitted."""

    def __init__(self, limiter: HiveLimiter, kwargs: dict[str, Any], args: tuple[Any, ...], started: float,
                 user_call_id: Any, asked: int = 0) -> None:
        """Built after the first attempt failed (see :func:`_first_attempt`)."""
        cfg = limiter.config.retry
        self.limiter = limiter
        self.enabled = cfg.enabled
        self.max_attempts = cfg.max_attempts if cfg.enabled else 1
        self.deadline = started + cfg.max_wait_seconds
        self.attempt = 1
        self.last_429: BaseException | None = None
        self.user_call_id = user_call_id  # the id the caller chose, if any (else each attempt gets a fresh one)
        self.kwargs = kwargs
        self.positional_model = args[0] if args and isinstance(args[0], str) else None
        self.asked = asked  # retries of 5xx / timeouts the caller asked for
        self.failures = 0  # of which made so far
        self.delay = 0.0  # how long to wait before the next attempt (after a 5xx or timeout)

    def begin(self, kwargs: dict[str, Any]) -> None:
        self.attempt += 1
        if not self.user_call_id:
            kwargs.pop("litellm_call_id", None)  # a fresh admission for each attempt
        _claim_call_id(self.limiter, kwargs)

    def budget(self) -> float | None:
        return self.deadline if self.attempt > 1 else None

    def should_retry(self, exc: BaseException) -> bool:
        """Decide after a failed attempt; annotates the exception the caller will get."""
        lim = self.limiter
        if isinstance(exc, RateLimitQueueTimeout) and self.last_429 is not None:
            # Waiting for the provider's cooldown would outlast the retry budget.
            raise self.last_429 from None
        self.delay = 0.0
        if not is_rate_limit(exc):
            return self._retry_failure(exc)
        self.last_429 = exc
        now = lim._engine.clock()
        headers = response_headers(exc)
        sig = read_signals(headers, lim._engine.wall(), cap=_MAX_PROVIDER_WAIT) if headers else None
        wait = suggested_wait(sig) if sig is not None else None
        with contextlib.suppress(Exception):
            exc.retry_after = wait  # type: ignore[attr-defined]
        retry = not (self.attempt >= self.max_attempts or not self.enabled or (
            wait is not None and (wait > lim.config.retry.max_delay or now + wait > self.deadline)))
        lim._note_429(self.kwargs.get("model") or self.positional_model, self.kwargs, wait, retry)
        if retry:
            lim._engine.note_retry()
        return retry

    def _retry_failure(self, exc: BaseException) -> bool:
        """A 5xx or a timeout: retried (after a jittered backoff) only as often as the caller asked."""
        if self.failures >= self.asked or not is_transient(exc):
            return False
        cfg = self.limiter.config.retry
        delay = backoff(self.failures, cfg.base_delay, cfg.max_delay)
        if self.limiter._engine.clock() + delay > self.deadline:
            return False
        self.failures += 1
        self.delay = delay
        self.limiter._engine.note_retry()
        logger.debug("retrying a call after %s (retry %d of %d), in %.2fs", type(exc).__name__,
                     self.failures, self.asked, delay)
        return True


def _wrap_sync(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    names = _POSITIONAL[name]
    chat = name == "completion"

    def attempt(limiters: list[HiveLimiter], args: tuple[Any, ...], kwargs: dict[str, Any],
                prior: BaseException | None, started: float = 0.0, asked: int = 0) -> Any:
        if chat and "fallbacks" in kwargs and _sdk_fallbacks(kwargs):
            return _fallbacks_sync(fn, limiters, args, kwargs, prior, _FallbackCall(limiters[0], started, asked))
        view = dict(kwargs)
        for pname, value in zip(names, args, strict=False):
            view.setdefault(pname, value)
        held: list[tuple[HiveLimiter, str]] = []
        try:
            for lim in limiters:
                cid = lim._guard_sync(name, view)
                if cid is not None:
                    held.append((lim, cid))
        except BaseException:
            for lim, cid in held:
                lim._finish(cid, failed=True)
            raise
        if not held:
            return fn(*args, **kwargs)
        kwargs["litellm_call_id"] = view["litellm_call_id"]
        if "api_key" in view and view.get("api_key") is not kwargs.get("api_key"):
            kwargs["api_key"] = view["api_key"]
        held_here = _Held(sys._getframe())  # (this frame: where a nested call's walk up ends)
        token = _guarded_call.set(held_here)
        inline = not view.get("stream")
        if inline:
            for lim, cid in held:
                lim._settled_inline.add(cid)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            for lim, cid in held:
                lim._settled_inline.discard(cid)  # (first: a failing _finish must not leave it behind)
                lim._finish(cid, failed=True, exc=exc, prior=prior)
                _forget_given_id(lim, cid)
            raise
        finally:
            held_here.closed = True
            held_here.frame = None  # (no cycle through this frame)
            _guarded_call.reset(token)
        if inline:
            for lim, cid in held:
                try:
                    lim._finish(cid, result)
                finally:
                    lim._settled_inline.discard(cid)
        else:  # settles from its success event when exhausted; its lease lasts while it is read
            result = _keep_alive(result, held)
        return result

    @functools.wraps(fn)
    def guard(*args: Any, **kwargs: Any) -> Any:
        inside = _guarded_call.get()
        if (inside is not None and not inside.closed and inside.thread == threading.get_ident()
                and (_LOGGING_OBJ in kwargs or _litellm_calling_itself(sys._getframe(1), inside.frame))) or (
                not _ASYNC_FLAGS.isdisjoint(kwargs) and any(kwargs.get(flag) for flag in _ASYNC_FLAGS)):
            return fn(*args, **kwargs)
        limiters = _active_limiters()
        if not limiters:
            return fn(*args, **kwargs)
        prior = sys.exc_info()[1]  # called while handling an error: an earlier attempt's, maybe
        first = limiters[0]
        # (A Router's sync ``responses`` does not retry itself: LiteLLM's own loop did.)
        started, user_call_id, asked, deployment_retries = _first_attempt(
            first, kwargs, sync=True, router_retries=name != "responses", embedding=name == "embedding")
        bigger = _context_fallback(args, kwargs) if chat and "context_window_fallback_dict" in kwargs else None
        retrying: _Retrying | None = None  # built once an attempt fails (see _first_attempt)
        while True:
            token = None
            if retrying is not None:
                if retrying.delay:
                    time.sleep(retrying.delay)
                retrying.begin(kwargs)
                token = _wait_budget.set(retrying.budget())
            try:
                return attempt(limiters, args, kwargs, prior, started, asked)
            except Exception as exc:
                if retrying is None:
                    # (SDK fallbacks: the tries are retried, not the call around them)
                    retrying = _Retrying(first, kwargs, args, started, user_call_id,
                                         0 if chat and _sdk_fallbacks(kwargs) else asked)
                if bigger is not None and _context_window_exceeded(exc):
                    # (the prompt is too long for this model: the next attempt goes to the bigger one)
                    if args:
                        args = (bigger, *args[1:])
                        retrying.positional_model = bigger
                    else:
                        kwargs["model"] = bigger
                    bigger = None
                    retrying.delay = 0.0
                    continue
                if not retrying.should_retry(exc):
                    _router_retries_back(exc, deployment_retries)
                    raise
            finally:
                if token is not None:
                    _wait_budget.reset(token)

    guard.__hive_ratelimit_guard__ = True  # type: ignore[attr-defined]
    return guard


def _keyword_names(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The leading parameters of ``fn`` that positional arguments fill and that can be passed by
    keyword (up to the first that cannot: ``*args``, positional-only)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    names: list[str] = []
    for p in params:
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        names.append(p.name)
    return tuple(names)


def _wrap_async(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    names = _keyword_names(fn) or _POSITIONAL.get(name, ())  # (the latter for ``def f(*args, **kwargs)``)
    embedding = name == "aembedding"
    chat = name == "acompletion"

    @functools.wraps(fn)
    async def guard(*args: Any, **kwargs: Any) -> Any:
        if args:
            # The deployment hook sees only keyword arguments: name the positional ones (all of
            # them or none; an argument given twice is left for Python to refuse, nothing sent).
            if len(args) > len(names) or not kwargs.keys().isdisjoint(names[:len(args)]):
                return await fn(*args, **kwargs)
            kwargs.update(zip(names, args, strict=False))
            args = ()
        nested = _in_async_guard.get()
        if nested is not None and not nested.closed and _LOGGING_OBJ in kwargs:
            return await _nested_async(fn, nested, args, kwargs, chat)  # LiteLLM calling itself (its fallbacks' tries)
        limiters = _active_limiters()
        if not limiters or ((inside := _guarded_call.get()) is not None and not inside.closed
                            and _LOGGING_OBJ in kwargs):
            return await fn(*args, **kwargs)
        admitted = _Admitted((None,))
        prior = sys.exc_info()[1]  # called while handling an error: an earlier attempt's, maybe
        outer = _in_async_guard.set(admitted)
        try:
            return await _retry_async(fn, limiters, args, kwargs, admitted, embedding, prior, chat)
        finally:
            admitted.closed = True
            _in_async_guard.reset(outer)

    guard.__hive_ratelimit_guard__ = True  # type: ignore[attr-defined]
    return guard


async def _retry_async(fn: Callable[..., Any], limiters: list[HiveLimiter], args: tuple[Any, ...],
                       kwargs: dict[str, Any], admitted: list[str | None], embedding: bool = False,
                       prior: BaseException | None = None, chat: bool = False) -> Any:
    # Admission happens in the deployment hook; this loop only retries provider 429s. The
    # first attempt is the common case and runs without the retry state, which is built only
    # when an attempt fails (with the same start time, so the retry budget is unchanged).
    first = limiters[0]
    started, user_call_id, asked, deployment_retries = _first_attempt(first, kwargs, embedding=embedding)
    bigger = _context_fallback(args, kwargs) if chat and "context_window_fallback_dict" in kwargs else None
    fallbacks = chat and "fallbacks" in kwargs and _sdk_fallbacks(kwargs)
    retrying: _Retrying | None = None
    while True:
        token = None
        if retrying is not None:
            if retrying.delay:
                await asyncio.sleep(retrying.delay)
            retrying.begin(kwargs)
            token = _wait_budget.set(retrying.budget())
        # The pre-call hook notes the id it admits this attempt under (LiteLLM assigns it), so that
        # a cancellation (which LiteLLM reports to no callback) can still release its reservation.
        admitted[0] = None
        del admitted[1:]
        try:
            if fallbacks:
                result = await _fallbacks_async(fn, args, kwargs, _FallbackCall(first, started, asked))
            else:
                result = await fn(*args, **kwargs)
        except Exception as exc:
            _release_admitted(limiters, admitted, kwargs, exc, prior)
            if retrying is None:
                # (SDK fallbacks: the tries are retried, not the call around them)
                retrying = _Retrying(first, kwargs, args, started, user_call_id, 0 if fallbacks else asked)
            if bigger is not None and _context_window_exceeded(exc):
                # (the prompt is too long for this model: the next attempt goes to the bigger one)
                kwargs["model"] = bigger
                bigger = None
                retrying.delay = 0.0
                continue
            if not retrying.should_retry(exc):
                _router_retries_back(exc, deployment_retries)
                raise
        except BaseException:  # cancelled (or interrupted) while admitted or in flight
            _release_admitted(limiters, admitted, kwargs, None)
            raise
        else:
            if kwargs.get("stream"):
                call_id = admitted[0] or kwargs.get("litellm_call_id")
                # (the stream's own call, if a call made inside this one was admitted after it)
                own = getattr(getattr(result, "logging_obj", None), "litellm_call_id", None)
                if own is not None and own != call_id and own in admitted:
                    call_id = own
                if call_id:
                    # (a try of SDK fallbacks fails mid-stream with no failure event naming it: see _keep_alive)
                    result = _keep_alive(result, [(lim, call_id) for lim in limiters], settle_on_error=fallbacks)
            elif _cache_hit(result):
                # Answered from LiteLLM's cache: sent nothing, so it gives back everything it took,
                # now. (LiteLLM runs no success deployment hook for a cache hit, and its logging
                # hook runs on LiteLLM's logging worker, which a loop closed at once, as
                # ``asyncio.run``'s, never runs: the hit held its slot and its request until its
                # lease ran out.)
                call_id = admitted[0] or kwargs.get("litellm_call_id")
                if call_id:
                    for lim in limiters:
                        lim._settle_quietly(call_id, result, cached=True)
            elif type(result) is not _CHAT_RESPONSE and _media.is_media(result):
                # Priced by now (LiteLLM sets ``response_cost`` before returning, from what its logging
                # hook sees): settle here rather than wait for that hook, which a closed event loop
                # (``asyncio.run``) never runs.
                call_id = admitted[0] or kwargs.get("litellm_call_id")
                if call_id:
                    for lim in limiters:
                        lim._settle_quietly(call_id, result)
            elif (call_id := admitted[0] or kwargs.get("litellm_call_id")) is not None:
                # Still held: on LiteLLM 1.83 the success deployment hooks stop at the first
                # callback that returns the response (every CustomGuardrail does), and one ahead of
                # the limiter leaves the call to LiteLLM's logging hook, which runs on LiteLLM's
                # logging worker: a loop closed at once (``asyncio.run``) never runs it, and a
                # callback ahead that raises there stops it. Settled here, as the deployment hook
                # would have (was: its slot held and its usage uncounted until its lease ran out).
                for lim in limiters:
                    if lim._engine.holds(call_id):
                        lim._settle_quietly(call_id, result)
            return result
        finally:
            if token is not None:
                _wait_budget.reset(token)


async def _nested_async(fn: Callable[..., Any], admitted: list[str | None], args: tuple[Any, ...],
                        kwargs: dict[str, Any], chat: bool = False) -> Any:
    """A guarded entry point LiteLLM calls from inside a guarded call (a try of its SDK fallbacks,
    see :func:`_sdk_fallbacks`): admitted by the deployment hook. A try that fails is released here,
    as the attempt it was, before LiteLLM makes the next one (under the same call id, for another
    model; its failure events name the outer call), after the retries of it the caller asked for
    (:class:`_FallbackCall`), each one admitted. A try whose prompt is too long for its model goes
    on to the bigger model of its ``context_window_fallback_dict`` from here, admitted there (see
    :func:`_context_fallback`). Other calls LiteLLM makes to itself are retried, if at all, by the
    outer guard."""
    call = _fallback_call.get()
    bigger = _context_fallback(args, kwargs) if chat and "context_window_fallback_dict" in kwargs else None
    retrying: _Retrying | None = None
    while True:
        before = admitted[:]
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            tries = [cid for cid in dict.fromkeys(admitted) if cid is not None and cid not in before]
            if tries:
                limiters = _active_limiters()
                for call_id in tries:
                    _release_attempt(limiters, call_id, exc)
                admitted[:] = before
            if bigger is not None and _context_window_exceeded(exc):
                kwargs["model"] = bigger  # (the prompt is too long for this model: on to the bigger one)
                bigger = None
                continue
            if call is None:
                raise
            call.refusal = exc if isinstance(exc, HiveRateLimitError) else None
            if not call.asked or call.refusal is not None:
                raise
            # (a 5xx or a timeout, retried as often as the caller asked, before the next model)
            if retrying is None:
                retrying = _Retrying(call.limiter, kwargs, args, call.started, kwargs.get("litellm_call_id"),
                                     call.asked)
            if not retrying._retry_failure(exc):
                raise
        if retrying.delay:
            await asyncio.sleep(retrying.delay)


async def _fallbacks_async(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                           call: _FallbackCall) -> Any:
    """An async chat call with SDK fallbacks (:func:`_sdk_fallbacks`), its tries made by LiteLLM
    (see :class:`_FallbackCall`)."""
    token = _fallback_call.set(call)
    try:
        return await fn(*args, **kwargs)
    except Exception:
        if call.refusal is not None:
            raise call.refusal from None
        raise
    finally:
        _fallback_call.reset(token)


def _fallbacks_sync(fn: Callable[..., Any], limiters: list[HiveLimiter], args: tuple[Any, ...],
                    kwargs: dict[str, Any], prior: BaseException | None, call: _FallbackCall) -> Any:
    """A sync chat call with SDK fallbacks (:func:`_sdk_fallbacks`): LiteLLM makes its tries with
    ``acompletion``, on an event loop of its own, where the deployment hook admits each one. The
    call itself is not admitted; what its tries hold is released if it fails or is interrupted."""
    admitted = _Admitted((None,))
    token = _in_async_guard.set(admitted)
    call_token = _fallback_call.set(call)
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            result = fn(*args, **kwargs)
        else:
            # On a thread that runs an event loop LiteLLM makes the tries on a thread of its own,
            # which would not see this context (the call's scope() identity, the guard's notes):
            # that thread is started here, in a copy of it.
            ctx = contextvars.copy_context()
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                result = pool.submit(ctx.run, fn, *args, **kwargs).result()
    except Exception as exc:
        _release_admitted(limiters, admitted, kwargs, exc, prior)
        if call.refusal is not None:
            raise call.refusal from None
        raise
    except BaseException:
        _release_admitted(limiters, admitted, kwargs, None)
        raise
    finally:
        admitted.closed = True
        _fallback_call.reset(call_token)
        _in_async_guard.reset(token)
    if kwargs.get("stream") and admitted[0] is not None:
        # (a try cut off mid-stream: no failure event names it, as in _retry_async)
        result = _keep_alive(result, [(lim, admitted[0]) for lim in limiters], settle_on_error=True)
    return result


def _release_admitted(limiters: list[HiveLimiter], admitted: list[str | None], kwargs: Mapping[str, Any],
                      exc: BaseException | None, prior: BaseException | None = None) -> None:
    """Release what an attempt admitted: its last id (else the call's own) and the ones before it
    (the attempt's own, when a call made inside it, an LLM judge's, was admitted after it)."""
    for call_id in (admitted[0] or kwargs.get("litellm_call_id"), *admitted[1:]):
        _release_attempt(limiters, call_id, exc, prior)


def _release_attempt(limiters: list[HiveLimiter], call_id: str | None, exc: BaseException | None,
                     prior: BaseException | None = None) -> None:
    """Settle a failed (``exc``) or cancelled (``None``) attempt now rather than wait for LiteLLM's
    failure event, which can come late (or, after an earlier event loop was closed, not at all)
    and would hold the slot meanwhile. The event, when it comes, finds nothing left to release."""
    for lim in limiters:
        lim._finish(call_id, failed=True, exc=exc, prior=prior)
        _forget_given_id(lim, call_id)


# ------------------------------------------------------------ stream leases
# LiteLLM runs no hook per chunk (its streaming deployment hook sees only the last one), so a
# stream's lease is renewed by the stream itself: the guard gives the stream object a subclass of
# its own class whose ``__next__`` / ``__anext__`` renew the call's lease before reading on. A
# stream that is still being read thus keeps its slot however long it runs; one the caller
# abandons is reclaimed ``lease_seconds`` after its last chunk was read.
_LEASES = "_hive_ratelimit_leases"
_SETTLE_ON_ERROR = "_hive_ratelimit_settle_on_error"
_renewing: dict[type, type | None] = {}  # a stream class -> its renewing subclass (None: cannot have one)
_renewing_classes: set[type] = set()


def _renew_leases(stream: Any) -> None:
    _on_leases(stream.__dict__.get(_LEASES, ()), "renew")


def _on_leases(held: list[tuple[HiveLimiter, str]], action: str) -> None:
    """Call ``Engine.<action>(call_id)`` for each lease a stream holds; never break the caller's
    stream over it. ``renew``: a chunk is being read; ``free_slot``: the caller closed the stream
    (its slots come back now; what it cost is settled as before, by its success event or lease)."""
    for lim, call_id in held:
        try:
            getattr(lim._engine, action)(call_id)
        except Exception as exc:
            logger.warning("could not %s the lease of a stream: %s", action, exc,
                           extra={"hive_repeat_key": (action,)})


def _failed_read(stream: Any, exc: BaseException) -> None:
    """A read of ``stream`` raised ``exc``: its leases are settled as failed if it was marked so
    (``settle_on_error`` of :func:`_keep_alive`)."""
    if not stream.__dict__.get(_SETTLE_ON_ERROR):
        return
    for lim, call_id in stream.__dict__.get(_LEASES, ()):
        try:
            lim._finish(call_id, failed=True, exc=exc)
        except Exception as err:
            logger.warning("could not settle a failed stream: %s", err, extra={"hive_repeat_key": ("fail_leases",)})


def _renewing_class(cls: type) -> type | None:
    """``cls`` with a ``__next__`` / ``__anext__`` that renews the stream's leases first (cached)."""
    if cls in _renewing:
        return _renewing[cls]
    ns: dict[str, Any] = {"__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                          "__doc__": cls.__doc__}
    base_next = getattr(cls, "__next__", None)
    base_anext = getattr(cls, "__anext__", None)
    if base_next is not None:
        def next_chunk(self: Any) -> Any:
            _renew_leases(self)
            try:
                chunk = base_next(self)
            except StopIteration:
                raise
            except Exception as exc:
                _failed_read(self, exc)
                raise
            # The chunk that ends generation gives the slot back, as the async streaming hook does
            # (sync calls have no hooks): a caller may stop reading there (usage and [DONE] are
            # bytes in transit). What it cost is settled as before.
            for choice in getattr(chunk, "choices", None) or ():
                if getattr(choice, "finish_reason", None):
                    _on_leases(self.__dict__.get(_LEASES, ()), "free_slot")
                    break
            return chunk
        ns["__next__"] = next_chunk
    if base_anext is not None:
        async def next_chunk_async(self: Any) -> Any:
            _renew_leases(self)
            try:
                return await base_anext(self)
            except StopAsyncIteration:
                raise
            except Exception as exc:
                _failed_read(self, exc)
                raise
        ns["__anext__"] = next_chunk_async
    base_close = getattr(cls, "close", None)
    if base_next is not None and callable(base_close):
        def close(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return base_close(self, *args, **kwargs)
            finally:
                _on_leases(self.__dict__.get(_LEASES, ()), "free_slot")
        ns["close"] = close
    base_aclose = getattr(cls, "aclose", None)
    if base_anext is not None and callable(base_aclose):
        async def aclose(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await base_aclose(self, *args, **kwargs)
            finally:
                _on_leases(self.__dict__.get(_LEASES, ()), "free_slot")
        ns["aclose"] = aclose
    sub: type | None = None
    if base_next is not None or base_anext is not None:
        with contextlib.suppress(TypeError):  # a class that cannot be subclassed
            sub = type(cls.__name__, (cls,), ns)
    if len(_renewing) < 256:
        _renewing[cls] = sub
        if sub is not None:
            _renewing_classes.add(sub)
    return sub


def _keep_alive(stream: Any, held: list[tuple[HiveLimiter, str]], settle_on_error: bool = False) -> Any:
    """Make ``stream`` renew the leases in ``held`` each time a chunk is read from it; returns the
    stream to hand to the caller (the same object, or a generator around an async generator).
    ``settle_on_error``: an error while reading the stream settles them as failed (a try of SDK
    fallbacks: LiteLLM's failure event names the call around it, not the try's reservation)."""
    if not held:
        return stream
    if settle_on_error and isinstance(getattr(stream, "__dict__", None), dict):
        stream.__dict__[_SETTLE_ON_ERROR] = True
    for lim, call_id in held:  # the provider has begun to answer: a failure now may still be billed
        lim._engine.note_answered(call_id)
    if not isinstance(getattr(stream, "__dict__", None), dict):
        if inspect.isasyncgen(stream):  # (LiteLLM 1.83's Anthropic messages stream)
            return _renewing_agen(stream, list(held))
        return stream
    if type(stream) in _renewing_classes:  # already renewing: add these leases
        stream.__dict__.setdefault(_LEASES, []).extend(held)
        return stream
    sub = _renewing_class(type(stream))
    if sub is None:
        return stream  # not an iterator we can extend: its lease alone bounds it
    try:
        leases = stream.__dict__[_LEASES] = list(held)
        stream.__class__ = sub
    except TypeError:  # an incompatible instance layout
        stream.__dict__.pop(_LEASES, None)
        logger.debug("a stream of type %s cannot renew its lease; it is reclaimed after lease_seconds",
                     type(stream).__name__)
        return stream
    with contextlib.suppress(TypeError):  # (a stream that cannot be weakly referenced: its lease bounds it)
        # A stream dropped unread and unclosed (``async for chunk in stream: break``): nothing can
        # read it any more once it is collected, so its slots come back then, not at the end of its
        # lease. The collector may run anywhere (inside the engine's lock, a Redis round trip): the
        # finalizer only queues it, for a thread of its own to free the slots; only those of these
        # very reservations (a later call may reuse a caller's id).
        owned = [(lim, cid, lim._engine.reservation(cid)) for lim, cid in leases]
        _start_freeing()
        weakref.finalize(stream, _dropped.put, owned).atexit = False
        _unpin(stream)
    return stream


def _unpin(stream: Any) -> None:
    """LiteLLM 1.83 keeps the locals of the last call's ``pre_call``/``post_call`` logging in a
    module global, ``litellm.error_logs`` (written, never read). For a sync stream they hold the
    stream itself (and its ``Logging``, which holds it too): a stream the caller dropped unclosed
    then stays alive, with its slots, until another call of the process is sent, which a call
    waiting for those very slots never is. Drop those two entries when they are this stream's."""
    logs = getattr(litellm, "error_logs", None)
    if not isinstance(logs, dict) or not logs:
        return
    own = getattr(stream, "logging_obj", None)
    for stage in ("PRE_CALL", "POST_CALL"):
        entry = logs.get(stage)
        if isinstance(entry, dict) and (entry.get("original_response") is stream
                                        or (own is not None and entry.get("self") is own)):
            logs.pop(stage, None)


#: Streams collected unclosed, their slots not yet given back: the finalizer only puts them here
#: (a SimpleQueue's put is safe in a weakref callback) and a thread of their own frees them.
_dropped: queue.SimpleQueue[list[tuple[HiveLimiter, str, Any]]] = queue.SimpleQueue()
_freeing: tuple[int, threading.Thread] | None = None  # (the process it runs in: see _start_freeing)
_freeing_lock = threading.Lock()


def _start_freeing() -> None:
    """Start the thread that frees dropped streams' slots (again in a forked child)."""
    global _freeing
    pid = os.getpid()
    if _freeing is not None and _freeing[0] == pid and _freeing[1].is_alive():
        return
    with _freeing_lock:
        if _freeing is not None and _freeing[0] == pid and _freeing[1].is_alive():
            return
        thread = threading.Thread(target=_free_dropped_forever, name="hive-ratelimit-streams", daemon=True)
        thread.start()
        _freeing = (pid, thread)


def _free_dropped_forever() -> None:
    while True:
        _free_dropped(_dropped.get())


def _free_dropped(owned: list[tuple[HiveLimiter, str, Any]]) -> None:
    """Give back the slots of a stream collected unclosed: only its own reservations' (a later call
    may reuse a caller's id); a waiting call is admitted into them at once."""
    for lim, call_id, res in owned:
        try:
            lim._engine.free_slot_of(call_id, res)
        except Exception as exc:
            logger.warning("could not free the slot of a stream dropped unclosed: %s", exc,
                           extra={"hive_repeat_key": ("free_dropped",)})


async def _renewing_agen(agen: Any, held: list[tuple[HiveLimiter, str]]) -> Any:
    """``agen``'s items, renewing the leases in ``held`` before each read."""
    try:
        while True:
            _on_leases(held, "renew")
            try:
                item = await agen.__anext__()
            except StopAsyncIteration:
                return
            yield item
    finally:
        try:
            await agen.aclose()
        finally:
            _on_leases(held, "free_slot")  # (closed, read to the end or dropped: no longer generating)


#: LiteLLM's entry points that make their calls (``litellm.completion``, guarded) on threads of a
#: pool of their own: ``litellm.batch_completion`` and friends (``litellm/batch_completion/main.py``,
#: 1.83.4 through 1.110.2).
_BATCH_NAMES = ("batch_completion", "batch_completion_models", "batch_completion_models_all_responses")


def _wrap_batch(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A batch entry point whose calls carry the identity :meth:`HiveLimiter.scope` (or Hive)
    gives where it is called. Its calls run on the threads of a ``ThreadPoolExecutor`` it makes,
    where context variables are not carried: each call was counted against no agent, user, team
    or run, so their limits and budgets (a run's cap too) did not hold for it. The identity goes
    in the calls' ``metadata`` instead (which wins over the context anyway: fields the caller's
    metadata sets are kept). Each call is then admitted by the sync guard, as before."""

    @functools.wraps(fn)
    def guard(*args: Any, **kwargs: Any) -> Any:
        if _active_limiters():
            metadata = kwargs.get("metadata")
            carried = with_context_identity(metadata, kwargs.get("user"))
            if carried is not metadata:
                kwargs["metadata"] = carried
        return fn(*args, **kwargs)

    guard.__hive_ratelimit_guard__ = True  # type: ignore[attr-defined]
    return guard


def install_sync_guard() -> None:
    """Wrap LiteLLM's entry points once per process (idempotent).

    Sync entry points are admitted by the guard itself (LiteLLM swallows exceptions raised in
    sync hooks); async ones are admitted in the deployment hook and only retried by the guard.
    The guards do nothing unless an enabled :class:`HiveLimiter` is in ``litellm.callbacks``.
    """
    with _guard_lock:
        # ``litellm.main`` defines them: code there (LiteLLM's own client, ``litellm.LiteLLM()
        # .chat.completions.create``) and ``from litellm.main import completion`` reach them by
        # that module's name, so it gets the same guard (an unguarded sync call is not even counted).
        # (LiteLLM 1.110's ``litellm.completion`` is a dispatcher in front of ``litellm.main``'s,
        # which it holds itself: a call through it meets one guard. Async calls are admitted in
        # the deployment hook whichever way they come.)
        main = sys.modules.get("litellm.main")
        for name in _POSITIONAL:
            current = getattr(litellm, name)
            if not getattr(current, "__hive_ratelimit_guard__", False):
                wrap = _wrap_async if name in _ASYNC_NAMES else _wrap_sync
                setattr(litellm, name, wrap(name, current))
            own = getattr(main, name, None) if name not in _ASYNC_NAMES else None
            if callable(own) and not getattr(own, "__hive_ratelimit_guard__", False):
                setattr(main, name, _wrap_sync(name, own))
        batch = sys.modules.get("litellm.batch_completion.main")
        for owner in (litellm, batch):
            for name in _BATCH_NAMES:
                current = getattr(owner, name, None)
                if callable(current) and not getattr(current, "__hive_ratelimit_guard__", False):
                    setattr(owner, name, _wrap_batch(current))
        # Anthropic's messages API, async (LiteLLM implements no sync path for it): the SDK's
        # ``litellm.anthropic.messages.acreate``, and ``litellm.anthropic_messages``, which a
        # Router's ``aanthropic_messages`` (and the proxy's /v1/messages) calls.
        messages_api = getattr(getattr(litellm, "anthropic", None), "messages", None)
        for owner, attr in ((messages_api, "acreate"), (litellm, "anthropic_messages")):
            current = getattr(owner, attr, None)
            if inspect.iscoroutinefunction(current) and not getattr(current, "__hive_ratelimit_guard__", False):
                setattr(owner, attr, _wrap_async("anthropic_messages", current))


# Wrapped at import, not only when the first limiter is built: code that binds
# ``from litellm import completion`` after importing this package then holds the guard, which
# does nothing until a HiveLimiter is registered.
install_sync_guard()
