"""``ProxyLimiter``: HiveLimiter for the LiteLLM proxy (``litellm --config config.yaml``).

List it in the proxy's ``config.yaml``::

    litellm_settings:
      callbacks: hive_ratelimit_plugin.proxy.proxy_handler_instance

``proxy_handler_instance`` (also importable as ``limiter``) is built on first use from
``HIVE_RATELIMIT_CONFIG`` (a YAML file with a ``rate_limiting:`` root), or else from a
``rate_limiting:`` block in the proxy's own config file, plus ``HIVE_RATELIMIT_*`` overrides. See
docs/proxy.md.

How a proxy request is held:

* ``async_pre_call_hook`` (which the proxy calls only when it is defined on the callback's own
  class) admits the request before the Router runs: it waits in the queue there, or the client
  gets HTTP 429 with ``retry-after`` (rate limits), a ``budget_exceeded`` error (budgets), 400
  (a request that can never fit), or 503 with ``retry-after`` (a provider's circuit open, or the
  shared backend down under ``on_backend_error: closed``). Identity comes from the authenticated key
  (``user_api_key_dict``), never from what the client puts in ``metadata``.
* The deployment hook that the Router runs next sees the same ``litellm_call_id`` and finds the
  request already admitted: it is counted once. Settlement with actual usage happens in the same
  success/failure hooks as in SDK mode. A Router retry after a failed attempt (which the failure
  event released) is admitted again in the deployment hook, with the same trusted identity.
* A model group whose deployments are different models (or providers) cannot be charged before
  the Router picks one, so such requests are admitted per deployment in the deployment hook;
  ``async_post_call_failure_hook`` turns a refusal there into the same HTTP answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from . import _media
from ._engine import Ticket
from ._scopes import IDENTITY_FIELDS, split_model
from .config import RateLimitingConfig, clean_id
from .errors import (
    BackendUnavailableError,
    CircuitOpenError,
    ConfigError,
    HiveRateLimitError,
    RateLimitQueueTimeout,
    RequestTooLargeError,
)
from .plugin import HiveLimiter, _call_type_name, _endpoint, _Plan, _timeout_event, key_id

__all__ = ["ProxyLimiter", "get_instance", "limiter", "proxy_handler_instance", "proxy_identity"]  # noqa: F822 (lazy)

logger = logging.getLogger("hive_ratelimit_plugin")

# The proxy's call types (they differ between LiteLLM versions) -> the SDK call type whose
# estimation rules apply. Anything else (moderation, MCP, pass-through) is not limited.
_CALL_TYPES = {
    "completion": "acompletion",
    "acompletion": "acompletion",
    "text_completion": "atext_completion",
    "atext_completion": "atext_completion",
    "embeddings": "aembedding",
    "embedding": "aembedding",
    "aembedding": "aembedding",
    "anthropic_messages": "anthropic_messages",  # (its system prompt is a parameter of its own)
    "responses": "aresponses",  # (input items, instructions, media and previous_response_id)
    "aresponses": "aresponses",
    # Billed per unit (see _media): admitted here too, where a refusal becomes the proxy's answer
    # on every route (a refusal in the deployment hook would be a 500 on these routes).
    "image_generation": "aimage_generation",
    "aimage_generation": "aimage_generation",
    "image_edit": "aimage_edit",
    "aimage_edit": "aimage_edit",
    "speech": "aspeech",
    "aspeech": "aspeech",
    "transcription": "atranscription",
    "atranscription": "atranscription",
    "rerank": "arerank",
    "arerank": "arerank",
}
_HEX = frozenset("0123456789abcdef")
_RUNAWAY_FLAG = "_hive_ratelimit_runaway"  # set on our private copy of a request's kwargs
_ANY_ENDPOINT = "_hive_ratelimit_any_endpoint"  # (likewise: admitted before the Router picks an endpoint)
# Its value: an object, not True, which no request body (JSON, the client's) can hold. A client's
# "_hive_ratelimit_any_endpoint": true left its endpoint's scope out (a 429's cooldown skipped).
_ANY = object()
# Routes that answer a refusal raised in the deployment hook with a 500 (they ignore the failure
# hook's answer): /v1/messages, /v1/completions and the media routes; and /v1/responses, not
# tested so (its route needs PyNaCl, which CI does not install). A group that mixes models or
# endpoints is admitted for the group there (see async_pre_call_hook).
_GROUP_ADMITTED = frozenset({"anthropic_messages", "atext_completion", "aresponses"}) | _media.CALL_TYPES
#: Routes whose handler answers what the pre-call hook raises itself, keeping a ProxyException's
#: headers on LiteLLM 1.110 (see _as_route_exception). The media routes keep none whatever is
#: raised; /v1/responses is untested (its route needs PyNaCl, which the tests do not install).
_OWN_ERROR_ROUTES = frozenset({"anthropic_messages", "atext_completion"})


def _key_name(token: Any) -> str | None:
    """A short, stable, non-secret name for a key: ``key-`` + 12 hex digits of its hash."""
    if not isinstance(token, str) or not token:
        return None
    digest = token if len(token) == 64 and set(token) <= _HEX else hashlib.sha256(token.encode()).hexdigest()
    return f"key-{digest[:12]}"


def _end_user(user_api_key_dict: Any) -> Any:
    """The request's end user (its ``user``), as ``key#<hash>`` when it is the caller's own key
    (ids reach stats, logs and Redis keys, which must never hold a key)."""
    end = _field(user_api_key_dict, "end_user_id")
    if not isinstance(end, str) or not end:
        return end
    token = _field(user_api_key_dict, "token")
    if end == _field(user_api_key_dict, "api_key") or (
            isinstance(token, str) and token == hashlib.sha256(end.encode("utf-8", "surrogatepass")).hexdigest()):
        return key_id(end)
    return end


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def proxy_identity(user_api_key_dict: Any, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Who a proxy request counts against, from the authenticated key only.

    * ``agent_id``: the key's metadata ``agent_id`` (set when the key is generated), else the
      key's alias, else ``key-`` + the first 12 hex digits of the key's hash.
    * ``user_id``: the key's user, else the end user (the request's ``user`` as the proxy
      resolved it).
    * ``team_id``: the key's team.
    * ``priority``: the key's (else the team's) metadata ``priority``; clients cannot raise it.
    * ``run_id``: the request's ``metadata.run_id`` (it only selects per-run caps).
    * ``runaway``: ``False`` when the agent is the key itself (alias or hash): one key often
      serves many clients that may send the same prompt, so the runaway breaker (the same request
      repeated) applies only to agents named in key metadata.

    Client-sent ``metadata`` (``agent_id``, ``user_id``, ``team_id``, ``priority``) is ignored.
    """
    key_md = _field(user_api_key_dict, "metadata")
    key_md = key_md if isinstance(key_md, Mapping) else {}
    team_md = _field(user_api_key_dict, "team_metadata")
    team_md = team_md if isinstance(team_md, Mapping) else {}
    agent = key_md.get("agent_id") or _field(user_api_key_dict, "key_alias") \
        or _key_name(_field(user_api_key_dict, "token") or _field(user_api_key_dict, "api_key"))
    user = _field(user_api_key_dict, "user_id") or _end_user(user_api_key_dict)
    priority = key_md.get("priority", team_md.get("priority"))
    run = None
    if data is not None:
        for md_name in ("metadata", "litellm_metadata"):
            md = data.get(md_name)
            if isinstance(md, Mapping):
                requester = md.get("requester_metadata")
                for src in (md, requester if isinstance(requester, Mapping) else {}):
                    if src.get("run_id") is not None:
                        run = src.get("run_id")
                        break
            if run is not None:
                break
    out = {"agent_id": agent, "user_id": user, "team_id": _field(user_api_key_dict, "team_id"),
           "run_id": run, "priority": priority}
    ident: dict[str, Any] = {k: (str(v) if k != "priority" else v) for k, v in out.items() if v not in (None, "")}
    if not key_md.get("agent_id"):
        ident["runaway"] = False
    return ident


def _auth_from_metadata(md: Mapping[str, Any]) -> dict[str, Any] | None:
    """The key's identity as the proxy copies it into a request's metadata (``user_api_key_*``)."""
    if not any(k.startswith("user_api_key") for k in md):
        return None
    key_md = md.get("user_api_key_metadata") or md.get("user_api_key_auth_metadata")
    return {
        "metadata": key_md if isinstance(key_md, Mapping) else {},
        "team_metadata": md.get("user_api_key_team_metadata"),
        "key_alias": md.get("user_api_key_alias"),
        "token": md.get("user_api_key_hash") or md.get("user_api_key"),
        "user_id": md.get("user_api_key_user_id"),
        "end_user_id": md.get("user_api_key_end_user_id"),
        "team_id": md.get("user_api_key_team_id"),
    }


def _retry_after(exc: HiveRateLimitError) -> str:
    ra = exc.retry_after
    return str(max(1, math.ceil(ra))) if isinstance(ra, (int, float)) and math.isfinite(ra) else "1"


def http_error(exc: HiveRateLimitError) -> tuple[int, str, str, dict[str, str]]:
    """(status, error type, code, headers) with which the proxy answers one of our errors."""
    from ._budget_errors import BudgetExceededError, budget_status_code

    headers: dict[str, str] = {}
    if exc.scope:
        headers["x-hive-ratelimit-scope"] = exc.scope
    if exc.limit:
        headers["x-hive-ratelimit-limit"] = exc.limit
    if isinstance(exc, BudgetExceededError):
        return budget_status_code(), "budget_exceeded", "budget_exceeded", headers
    if isinstance(exc, RequestTooLargeError):
        return 400, "invalid_request_error", "request_too_large", headers
    if isinstance(exc, ConfigError):
        return 500, "internal_server_error", "hive_ratelimit_config_error", headers
    headers["retry-after"] = _retry_after(exc)
    if isinstance(exc, CircuitOpenError):
        return 503, "service_unavailable", "circuit_open", headers
    if isinstance(exc, BackendUnavailableError):  # (the limiter's own outage, not the client's rate)
        return 503, "service_unavailable", "backend_unavailable", headers
    return 429, "rate_limit_error", "rate_limit_exceeded", headers


def _find_ours(exc: BaseException | None) -> HiveRateLimitError | None:
    """Our error, also when LiteLLM wrapped it (``__cause__``/``__context__``/``original_exception``)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, HiveRateLimitError):
            return exc
        seen += 1
        inner = getattr(exc, "original_exception", None)
        exc = inner if isinstance(inner, BaseException) else (exc.__cause__ or exc.__context__)
    return None


class ProxyLimiter(HiveLimiter):
    """HiveLimiter with the LiteLLM proxy's request hooks. Same arguments as :class:`HiveLimiter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # litellm_call_id -> the trusted identity (and whether the pre-call hook admitted it).
        self._proxy_calls: LRUCache[str, tuple[dict[str, Any], bool]] = LRUCache(maxsize=65536)
        self._proxy_lock = threading.Lock()

    def _load(self, source: Any) -> RateLimitingConfig:
        if isinstance(source, _ProxyBlock):  # (built by get_instance from the proxy's config file)
            return _read_block(source)
        return super()._load(source)

    def _after_fork_in_child(self) -> None:
        super()._after_fork_in_child()
        self._proxy_lock = threading.Lock()  # (see _fork: the parent's requests are the parent's)
        self._proxy_calls = LRUCache(maxsize=65536)

    # ------------------------------------------------------------ identity
    def identity(self, user_api_key_dict: Any, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The identity a request counts against; override to map keys differently."""
        return proxy_identity(user_api_key_dict, data)

    def _admitted_upstream(self, call_id: str) -> bool:
        # True once: for the first attempt LiteLLM sends. A retry whose failed attempt has not
        # been released yet (failure events run in the background) gets an id of its own.
        with self._proxy_lock:
            entry = self._proxy_calls.get(call_id)
            if entry is None or not entry[1]:
                return False
            self._proxy_calls[call_id] = (entry[0], False)
            return True

    def _trusted(self, call_id: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The identity of the authenticated key behind a call (in the proxy, whatever the client sent)."""
        with self._proxy_lock:
            entry = self._proxy_calls.get(call_id)
        if entry is not None:
            return entry[0]
        for name in ("metadata", "litellm_metadata"):
            md = kwargs.get(name)
            auth = _auth_from_metadata(md) if isinstance(md, Mapping) else None
            if auth is not None:
                return self.identity(auth, kwargs)
        return {}

    def _not_sent(self, kwargs: Mapping[str, Any], exc: HiveRateLimitError, agent: str | None = None) -> None:
        if agent is None:  # (the deployment hook's refusal: the key's agent, never the client's metadata)
            trusted = self._trusted(str(kwargs.get("litellm_call_id") or ""), kwargs)
            agent = clean_id(trusted.get("agent_id"))
            if agent is None or trusted.get("runaway", True) is False:
                return
        super()._not_sent(kwargs, exc, agent)

    def _ticket(self, call_id: str, call_type: str, kwargs: Mapping[str, Any],
                metadata: Mapping[str, Any] | None) -> Ticket | None:
        # In the proxy, identity is the authenticated key's, whatever the client sent.
        trusted = self._trusted(call_id, kwargs)
        view = dict(kwargs)
        view["user"] = None
        view.pop("timeout", None)  # (a client's body must not set how long its slot outlives a dead process)
        view[_RUNAWAY_FLAG] = trusted.get("runaway", True) is not False
        return super()._ticket(call_id, call_type, view, {k: trusted.get(k) for k in IDENTITY_FIELDS})

    def _key_choices(self, choices: Any, provider: str, kwargs: Any) -> None:
        return None  # the proxy's model_list picks the API key of each deployment (after a reload too)

    def _endpoint_scopes(self, plan: _Plan, kwargs: Any) -> list[Any]:
        if kwargs.get(_ANY_ENDPOINT) is _ANY:  # admitted for a group of several endpoints before the Router picks one
            return plan.scopes
        return super()._endpoint_scopes(plan, kwargs)

    def _finish(self, call_id: str | None, response: Any = None, *, failed: bool = False,
                exc: BaseException | None = None, prior: BaseException | None = None,
                logged_cost: Any = None, headers: Mapping[str, Any] | None = None,
                cached: bool = False) -> None:
        if failed and getattr(exc, "hive_ratelimit_code", None) == "duplicate_call_id":
            return  # a request refused for reusing this id (its events carry it): the call holding it is another's
        super()._finish(call_id, response, failed=failed, exc=exc, prior=prior, logged_cost=logged_cost,
                        headers=headers, cached=cached)
        if not failed and call_id:
            # A request answered is over: no retry or fallback of it will ask for its identity
            # again. (Left in place, every request's entry stayed until the LRU dropped it: 65,536
            # identities held for good in a busy proxy.) A failed attempt keeps it for the retry.
            self._request_over(call_id)

    def _request_over(self, call_id: str) -> None:
        """Forget the identity of a request that has ended (see _finish)."""
        with self._proxy_lock:
            self._proxy_calls.pop(call_id, None)

    def _check_runaway(self, agent_id: str, model: str, kwargs: Mapping[str, Any]) -> None:
        if kwargs.get(_RUNAWAY_FLAG, True):
            super()._check_runaway(agent_id, model, kwargs)

    # -------------------------------------------------------------- models
    def _targets(self, model: str) -> list[dict[str, Any]]:
        """The deployments (``litellm_params``) the proxy's Router may send ``model`` to."""
        try:
            from litellm.proxy import proxy_server
        except Exception:  # the proxy's requirements are missing: not running inside a proxy
            return []
        router = getattr(proxy_server, "llm_router", None)
        if router is None or not model:
            return []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                registry = getattr(router, "registry", None)
                found = registry().deployments(model) if callable(registry) else router.get_model_list(model_name=model)
        except Exception as exc:
            logger.debug("could not list the deployments of %s: %s", model, exc)
            return []
        out: list[dict[str, Any]] = []
        for dep in found or ():
            params = dep.get("litellm_params") if isinstance(dep, Mapping) else None
            if isinstance(params, Mapping) and params.get("model"):
                out.append(dict(params))
        return out

    def _resolve(self, data: Mapping[str, Any], mixed: bool = False) -> dict[str, Any] | None:
        """The one (model, provider, endpoint) a request goes to, or None if its group mixes models
        or endpoints (with ``mixed``: then its first deployment's model, as the model's scope
        alone: which endpoint serves it is not known yet)."""
        model = str(data.get("model") or "")
        targets = self._targets(model)
        if not targets:
            return {"model": model, "custom_llm_provider": data.get("custom_llm_provider"),
                    "api_base": data.get("api_base")}
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        endpoints = set()
        for t in targets:
            m = str(t["model"])
            if m.endswith("/*"):  # a wildcard route: the request names the model
                m = model
            provider = self._provider_of(m, t.get("custom_llm_provider"), t.get("api_base"))
            key = t.get("api_key")
            if type(key) is str and key.startswith("os.environ/"):  # (as the Router reads it)
                key = os.environ.get(key[len("os.environ/"):])
            target = {"model": m, "custom_llm_provider": t.get("custom_llm_provider"), "api_base": t.get("api_base"),
                      "api_key": key}
            seen.setdefault((provider, split_model(m, provider)), target)
            endpoints.add(_endpoint(target))
        if len(seen) == 1 and len(endpoints) == 1:
            return next(iter(seen.values()))
        if mixed:
            return {**next(iter(seen.values())), _ANY_ENDPOINT: _ANY}
        return None

    # --------------------------------------------------------------- hooks
    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict[str, Any],
                                  call_type: Any) -> dict[str, Any] | None:
        """Admit a proxy request before the Router runs (waits in the queue if needed).

        Raises:
            fastapi.HTTPException: 429 with ``retry-after`` (rate limit), the proxy's budget status
                with type ``budget_exceeded`` (budget), 400 (can never fit), 503 (circuit open, or
                the shared backend down under ``on_backend_error: closed``).
        """
        if not self._config.enabled:
            return None
        kind = _CALL_TYPES.get(_call_type_name(call_type))
        if kind is None:
            return None
        ident = self.identity(user_api_key_dict, data)
        call_id = data.get("litellm_call_id")
        if not call_id:
            call_id = data["litellm_call_id"] = str(uuid.uuid4())
        call_id = str(call_id)
        if self._engine.holds(call_id) or self._engine.waiting(call_id):
            # Ids come from the client's x-litellm-call-id header when it sends one; reusing an id
            # in flight (or waiting) would let a second request ride on the first one's admission.
            # (The proxy's failure hook runs for this refusal too: it must not release the first
            # request, which holds the id.)
            raise _http_exception(
                f"litellm_call_id {call_id} is already in flight; send a unique x-litellm-call-id",
                "invalid_request_error", "duplicate_call_id", 400, {})
        # Some routes (media, /v1/messages, /v1/completions) ignore the failure hook's answer: a
        # refusal in the deployment hook would be a 500. Those are admitted here for their group's
        # first deployment even when it mixes models or endpoints; if the Router picks another
        # model, the deployment hook moves the reservation to it (see _held_for_another_model).
        target = self._resolve(data, mixed=kind in _GROUP_ADMITTED)
        if target is None:
            # The Router picks among different models or endpoints: admit per deployment (deployment hook).
            with self._proxy_lock:
                self._proxy_calls[call_id] = (ident, False)
            return None
        view = dict(data)
        view.update(target)
        with self._proxy_lock:
            self._proxy_calls[call_id] = (ident, True)
        try:
            ticket = self._ticket(call_id, kind, view, None)
            if ticket is None:
                return None
            try:
                waited = 0.0 if self._engine.admit_now(ticket) else await self._queue_async(ticket, kind, view)
            except RateLimitQueueTimeout as exc:
                self._emit(_timeout_event(ticket, exc, self._engine.wall()))
                raise
        except HiveRateLimitError as exc:
            self._obs.rejected(exc)  # (the calls_rejected metric and the status line, as in SDK mode)
            self._not_sent(view, exc)  # (before the call's identity is dropped: _not_sent reads it)
            with self._proxy_lock:
                self._proxy_calls.pop(call_id, None)
            raise (_as_route_exception(exc) if kind in _OWN_ERROR_ROUTES else _as_http_exception(exc)) from exc
        except BaseException:
            with self._proxy_lock:
                self._proxy_calls.pop(call_id, None)
            raise
        if waited:
            self._obs.queue_wait(waited)
        return None

    async def async_post_call_failure_hook(self, request_data: dict[str, Any], original_exception: Exception,
                                           user_api_key_dict: Any, traceback_str: str | None = None,
                                           **kwargs: Any) -> Any:
        """Release a request that failed anywhere after admission; answer our errors properly."""
        call_id = request_data.get("litellm_call_id") if isinstance(request_data, Mapping) else None
        if call_id:
            self._finish(str(call_id), failed=True, exc=original_exception)
            if getattr(original_exception, "hive_ratelimit_code", None) != "duplicate_call_id":
                # The request is over: nothing asks for its identity again. (Not a request refused
                # for reusing an id: the identity under that id is the request holding it.)
                self._request_over(str(call_id))
        from fastapi import HTTPException

        if isinstance(original_exception, HTTPException):
            return None  # already an HTTP answer (our pre-call hook raises these)
        ours = _find_ours(original_exception)
        if ours is None:
            return None
        # A refusal in the deployment hook (model groups that mix models).
        return _as_http_exception(ours)


def _http_exception(message: str, kind: str, code: str, status: int, headers: dict[str, str]) -> Exception:
    """An HTTPException the proxy answers as ``{"error": {"message", "type", ...}}`` with our status
    and headers. (Every LiteLLM version turns an HTTPException raised in a pre-call hook, or
    returned by a failure hook, into its error response and reads ``type``/``param`` off it;
    a ProxyException raised from a hook becomes a 500 on LiteLLM 1.83.)"""
    from fastapi import HTTPException

    exc = HTTPException(status_code=status, detail=message, headers=headers)
    exc.type = kind  # type: ignore[attr-defined]
    exc.param = None  # type: ignore[attr-defined]
    exc.hive_ratelimit_code = code  # type: ignore[attr-defined]
    return exc


def _as_http_exception(exc: HiveRateLimitError) -> Exception:
    status, kind, code, headers = http_error(exc)
    return _http_exception(str(exc), kind, code, status, headers)


def _as_route_exception(exc: HiveRateLimitError) -> Exception:
    """Our error for a route whose handler catches what the pre-call hook raises and answers it
    itself (/v1/completions, /v1/messages): an HTTPException's headers are
    dropped there, so ``retry-after`` was lost. A ProxyException is answered as it is, headers
    included, by LiteLLM 1.110's handlers; older ones rebuild it from its ``status_code``,
    ``type`` and ``message`` (the status stays ours, the headers are lost as before)."""
    from litellm.proxy._types import ProxyException

    status, kind, code, headers = http_error(exc)
    out = ProxyException(message=str(exc), type=kind, param=None, code=status, headers=headers, openai_code=code)
    out.status_code = status  # type: ignore[attr-defined]
    out.hive_ratelimit_code = code  # type: ignore[attr-defined]
    return out


# ---------------------------------------------------------------- the instance
_instance: ProxyLimiter | None = None
_instance_lock = threading.Lock()


def _proxy_config_file() -> str | None:
    path = os.environ.get("CONFIG_FILE_PATH")
    if path:
        return path
    worker = os.environ.get("WORKER_CONFIG")
    if worker:
        try:
            parsed = json.loads(worker)
        except ValueError:
            return None
        if isinstance(parsed, Mapping) and isinstance(parsed.get("config"), str):
            return str(parsed["config"])
    return None


@dataclass(frozen=True)
class _ProxyBlock:
    """A configuration source: the ``rate_limiting:`` block of the proxy's config file ``path``
    (read at start, and again by ``reload()``)."""

    path: str


def _proxy_source() -> _ProxyBlock | None:
    """Where the proxy's limiter reads its configuration, decided once at start: ``None`` (as
    ``HiveLimiter()``: ``HIVE_RATELIMIT_CONFIG`` and the ``HIVE_RATELIMIT_*`` overrides) when that
    variable is set or the proxy's config file has no ``rate_limiting:`` block; else that block."""
    if os.environ.get("HIVE_RATELIMIT_CONFIG"):
        return None
    path = _proxy_config_file()
    if not path or not os.path.isfile(path):
        return None
    doc = _proxy_yaml(path)
    return _ProxyBlock(os.path.abspath(path)) if isinstance(doc, Mapping) and "rate_limiting" in doc else None


def _proxy_yaml(path: str) -> Any:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({type(exc).__name__}: {exc.strerror})") from exc


def _read_block(source: _ProxyBlock) -> RateLimitingConfig:
    from .config import load_config, stray_sections

    doc = _proxy_yaml(source.path)
    if not (isinstance(doc, Mapping) and "rate_limiting" in doc):
        raise ConfigError(f"{source.path}: has no rate_limiting: block any more (the proxy's limiter is "
                          "configured by it)")
    stray_sections(doc, str(source.path))
    return load_config({"rate_limiting": doc["rate_limiting"]})


def get_instance() -> ProxyLimiter:
    """The process-wide :class:`ProxyLimiter` the proxy's ``config.yaml`` names (built once)."""
    global _instance
    with _instance_lock:
        if _instance is None:
            _instance = ProxyLimiter(_proxy_source())
            logger.info("hive-ratelimit: proxy limiter ready (%r)", _instance)
        return _instance


def __getattr__(name: str) -> Any:
    # Built on first use, so that importing this module (docs, tests) reads no configuration.
    if name in ("proxy_handler_instance", "limiter"):
        return get_instance()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
