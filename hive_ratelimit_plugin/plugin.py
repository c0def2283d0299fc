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

import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import litellm
from litellm.integrations.custom_logger import CustomLogger

from .config import RateLimitingConfig, load_config
from ._engine import Engine, Ticket
from ._scopes import Identity, ScopeResolver, resolve_identity, scope as _scope_cm
from ._tokens import count_input, count_messages, requested_output
from ._waiting import acquire_async, acquire_sync

__all__ = ["HiveLimiter"]

logger = logging.getLogger("hive_ratelimit_plugin")

_EMBEDDING_TYPES = frozenset({"embedding", "aembedding"})
_TEXT_TYPES = frozenset({"text_completion", "atext_completion"})
_SKIP_TYPES = frozenset({"moderation", "amoderation", "image_generation", "aimage_generation"})

# Set while a sync guard is admitting/running a call on this thread, so nested LiteLLM entry
# points (text_completion -> completion) and log_pre_api_call know the call is already held.
_guarded_call: ContextVar[str | None] = ContextVar("hive_ratelimit_guarded_call", default=None)


def _call_type_name(call_type: Any) -> str:
    value = getattr(call_type, "value", call_type)
    return str(value)


def _usage_of(response: Any) -> tuple[int | None, int | None]:
    usage = getattr(response, "usage", None)
    if usage is None and isinstance(response, Mapping):
        usage = response.get("usage")
    if usage is None:
        return None, None
    get = usage.get if isinstance(usage, Mapping) else lambda k, d=None: getattr(usage, k, d)
    pin = get("prompt_tokens", None)
    pout = get("completion_tokens", None)
    if pin is None and pout is None:
        total = get("total_tokens", None)
        return (int(total), 0) if isinstance(total, int) else (None, None)
    return (int(pin) if isinstance(pin, int) else None, int(pout) if isinstance(pout, int) else 0)


class HiveLimiter(CustomLogger):
    """Keeps every LiteLLM call inside configured request, token and concurrency limits.

    Register it once: ``litellm.callbacks.append(HiveLimiter())``. Calls over a limit wait in a
    priority-then-FIFO queue for up to ``queue.max_wait_seconds`` and then raise
    :class:`~hive_ratelimit_plugin.errors.RateLimitQueueTimeout` without sending a request.

    Args:
        config: a YAML path, a dict (with or without the ``rate_limiting`` root), a
            :class:`~hive_ratelimit_plugin.config.RateLimitingConfig`, or ``None`` to read
            ``HIVE_RATELIMIT_CONFIG`` and ``HIVE_RATELIMIT_*`` environment variables.
        clock: monotonic clock in seconds (tests inject a fake one).

    Raises:
        ConfigError: the configuration is invalid; the message names each bad key.
    """

    def __init__(
        self,
        config: str | Mapping[str, Any] | RateLimitingConfig | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__()
        cfg = load_config(dict(config) if isinstance(config, Mapping) else config)
        self._config = cfg
        self._engine = Engine(
            clock or time.monotonic,
            lease_seconds=cfg.estimation.lease_seconds,
            max_queue=cfg.queue.max_size,
        )
        self._resolver = ScopeResolver(cfg)
        self._attempts: dict[str, int] = {}
        self._attempts_lock = threading.Lock()
        self._provider_cache: dict[tuple[str, str | None], str] = {}
        install_sync_guard()

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
        """Replace the configuration; the next call uses the new limits.

        Raises:
            ConfigError: the new configuration is invalid (the old one stays in force).
        """
        cfg = load_config(dict(config) if isinstance(config, Mapping) else config)
        self._config = cfg
        self._resolver = ScopeResolver(cfg)
        self._engine.max_queue = cfg.queue.max_size
        self._engine.lease_seconds = cfg.estimation.lease_seconds
        self._engine.reconfigure()

    @staticmethod
    @contextlib.contextmanager
    def scope(**identity: Any) -> Iterator[None]:
        """Attribute calls made inside the block to an identity (``agent_id``, ``user_id``,
        ``team_id``, ``run_id``, ``priority``). Holds across ``await``, tasks created inside and
        ``asyncio.to_thread``. Request metadata wins over it."""
        with _scope_cm(**identity):
            yield

    def get_usage_stats(self) -> dict[str, Any]:
        """Current usage per level.

        Returns:
            ``{"levels": {level: {scope_key: {<limit name>: {"used", "limit"}, "in_flight",
            "queued"}}}, "queued": int, "admitted_total": int, "queued_total": int}``
        """
        levels: dict[str, dict[str, Any]] = {}
        for key, entry in self._engine.snapshot().items():
            levels.setdefault(entry.pop("level"), {})[key] = entry
        return {
            "levels": levels,
            "queued": self._engine.queue_length,
            "admitted_total": self._engine.admitted_total,
            "queued_total": self._engine.queued_total,
        }

    def __repr__(self) -> str:
        return f"HiveLimiter(enabled={self._config.enabled}, {self._engine!r})"

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
        if len(self._provider_cache) > 4096:
            self._provider_cache.clear()
        self._provider_cache[key] = provider
        return provider

    def _ticket(self, call_id: str, call_type: str, kwargs: Mapping[str, Any],
                metadata: Mapping[str, Any] | None) -> Ticket | None:
        cfg = self._config
        if not cfg.enabled or call_type in _SKIP_TYPES:
            return None
        model = str(kwargs.get("model") or "")
        provider = self._provider_of(model, kwargs.get("custom_llm_provider"), kwargs.get("api_base"))
        ident: Identity = resolve_identity(metadata, kwargs.get("user"))
        scopes = self._resolver.scopes(provider, model, ident)
        if not scopes:
            return None
        input_tokens = output_tokens = 0
        if any(s.limits.tokens_per_second or s.limits.tokens_per_minute or s.limits.tokens_per_hour
               or s.limits.tokens_per_day or s.limits.input_tokens_per_minute
               or s.limits.output_tokens_per_minute for s in scopes):
            if call_type in _EMBEDDING_TYPES:
                input_tokens = count_input(model, kwargs.get("input"))
            elif call_type in _TEXT_TYPES:
                input_tokens = count_input(model, kwargs.get("prompt"))
                output_tokens = requested_output(kwargs, cfg.estimation.default_output_tokens)
            else:
                input_tokens = count_messages(model, kwargs.get("messages"), kwargs.get("tools"))
                output_tokens = requested_output(kwargs, cfg.estimation.default_output_tokens)
        return Ticket(
            call_id=call_id,
            scopes=scopes,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            priority=ident.priority,
            info={"provider": provider, "model": model, "agent_id": ident.agent_id, "run_id": ident.run_id},
        )

    def _begin_attempts(self, call_id: str) -> None:
        with self._attempts_lock:
            self._attempts[call_id] = 0

    def _finish(self, call_id: str | None, response: Any = None, *, failed: bool = False) -> None:
        if not call_id:
            return
        with self._attempts_lock:
            self._attempts.pop(call_id, None)
        if failed:
            # The prompt was sent; the output estimate was not produced.
            self._engine.release(call_id, output_tokens=0)
            return
        tin, tout = _usage_of(response)
        self._engine.release(call_id, input_tokens=tin, output_tokens=tout)

    # ------------------------------------------------------- async (hooks)
    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> None:
        """Admit an async call before its HTTP request (waits in the queue if needed)."""
        call_id = kwargs.get("litellm_call_id")
        if not call_id:
            call_id = kwargs["litellm_call_id"] = str(uuid.uuid4())
        if self._engine.holds(call_id):
            # The Router re-runs pre hooks per attempt with the same call id: the earlier
            # attempt failed; its request stays counted, its slot is freed.
            self._finish(call_id, failed=True)
        ticket = self._ticket(call_id, _call_type_name(call_type), kwargs, kwargs.get("metadata"))
        if ticket is None:
            return None
        await acquire_async(self._engine, ticket, self._config.queue.max_wait_seconds)
        self._begin_attempts(call_id)
        return None

    async def async_post_call_success_deployment_hook(
        self, request_data: dict[str, Any], response: Any, call_type: Any
    ) -> Any:
        """Settle a finished non-streaming async call with its actual usage."""
        if not request_data.get("stream"):
            self._finish(request_data.get("litellm_call_id"), response)
        return response

    async def async_post_call_streaming_deployment_hook(
        self, request_data: dict[str, Any], response_chunk: Any, call_type: Any
    ) -> Any:
        """Keep a live stream's lease; settle as soon as the usage chunk passes."""
        call_id = request_data.get("litellm_call_id")
        if not call_id:
            return response_chunk
        if getattr(response_chunk, "usage", None) is not None:
            tin, tout = _usage_of(response_chunk)
            if tin is not None:
                # The usage chunk is the last one the provider sends: the call is complete.
                self._finish(call_id, response_chunk)
                return response_chunk
        choices = getattr(response_chunk, "choices", None) or ()
        if any(getattr(c, "finish_reason", None) for c in choices):
            # Generation is over; usage (exact or LiteLLM's estimate) comes with the success event.
            self._engine.free_slot(call_id)
        else:
            self._engine.renew(call_id)
        return response_chunk

    async def async_log_success_event(self, kwargs: dict[str, Any], response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        self._finish(kwargs.get("litellm_call_id"), response_obj)

    async def async_log_failure_event(self, kwargs: dict[str, Any], response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        self._finish(kwargs.get("litellm_call_id"), failed=True)

    # -------------------------------------------------------- sync (events)
    def log_pre_api_call(self, model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
        """Count retries LiteLLM sends without re-running the pre-call hook (``num_retries``)."""
        call_id = kwargs.get("litellm_call_id")
        if not call_id:
            return
        with self._attempts_lock:
            n = self._attempts.get(call_id)
            if n is None:
                return
            self._attempts[call_id] = n + 1
        if n >= 1:
            self._engine.charge_extra_request(call_id)

    def log_success_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._finish(kwargs.get("litellm_call_id"), response_obj)

    def log_failure_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._finish(kwargs.get("litellm_call_id"), failed=True)

    # ------------------------------------------------------------ sync guard
    def _guard_sync(self, call_type: str, kwargs: dict[str, Any]) -> str | None:
        call_id = kwargs.get("litellm_call_id")
        if not call_id:
            call_id = kwargs["litellm_call_id"] = str(uuid.uuid4())
        ticket = self._ticket(call_id, call_type, kwargs, kwargs.get("metadata"))
        if ticket is None:
            return None
        acquire_sync(self._engine, ticket, self._config.queue.max_wait_seconds)
        self._begin_attempts(call_id)
        return call_id


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
}
_guard_lock = threading.Lock()


def _active_limiters() -> list[HiveLimiter]:
    return [cb for cb in litellm.callbacks if isinstance(cb, HiveLimiter)]


def _guarded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    names = _POSITIONAL[name]

    @functools.wraps(fn)
    def guard(*args: Any, **kwargs: Any) -> Any:
        if _guarded_call.get() is not None or kwargs.get("acompletion") or kwargs.get("aembedding") \
                or kwargs.get("atext_completion"):
            return fn(*args, **kwargs)
        limiters = _active_limiters()
        if not limiters:
            return fn(*args, **kwargs)
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
        token = _guarded_call.set(view["litellm_call_id"])
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            for lim, cid in held:
                lim._finish(cid, failed=True)
            raise
        finally:
            _guarded_call.reset(token)
        if not view.get("stream"):
            for lim, cid in held:
                lim._finish(cid, result)
        # A stream settles from its success event when exhausted, or when its lease expires.
        return result

    guard.__hive_ratelimit_guard__ = True  # type: ignore[attr-defined]
    return guard


def install_sync_guard() -> None:
    """Wrap LiteLLM's sync entry points once per process (idempotent).

    The guard does nothing unless a :class:`HiveLimiter` is in ``litellm.callbacks``.
    """
    with _guard_lock:
        for name in _POSITIONAL:
            current = getattr(litellm, name)
            if not getattr(current, "__hive_ratelimit_guard__", False):
                setattr(litellm, name, _guarded(name, current))
