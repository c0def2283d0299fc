"""Who a call counts against: identity (agent, user, team, run, priority) and the scope list.

Identity comes from the request's ``metadata`` (``agent_id``, ``user_id``, ``team_id``,
``run_id``, ``priority``) and ``user=``, falling back to what :func:`scope` set in the current
context (contextvars follow ``await``, tasks created inside, and ``asyncio.to_thread``), and last
to the ambient identity of a known agent framework (:data:`AMBIENT_IDENTITY`: Hive's agent and run,
see :mod:`hive_ratelimit_plugin.integrations.hive`). Metadata wins over the context, which wins
over the framework.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from ._budget import run_key
from ._engine import Scope
from .config import MAX_ID, AgentLimits, LimitSet, RateLimitingConfig, clean_id, match_block, match_model_block
from .integrations.hive import hive_identity

logger = logging.getLogger("hive_ratelimit_plugin")

PRIORITY_NAMES: dict[str, int] = {"high": 10, "normal": 0, "low": -10}
_NO_LIMITS = LimitSet()
_generations = itertools.count(1)
IDENTITY_FIELDS = ("agent_id", "user_id", "team_id", "run_id", "priority")

_context: ContextVar[Mapping[str, Any] | None] = ContextVar("hive_ratelimit_identity", default=None)
_EMPTY: Mapping[str, Any] = {}

#: Last-resort identity sources, asked in order for the fields that neither the request's metadata
#: nor :func:`scope` set. Each returns a mapping with some of :data:`IDENTITY_FIELDS` (``None``
#: values are ignored) or ``None``, must be cheap when its framework is absent, and must not raise.
AMBIENT_IDENTITY: list[Callable[[], Mapping[str, Any] | None]] = [hive_identity]


@contextlib.contextmanager
def scope(**identity: Any) -> Iterator[None]:
    """Attribute every LiteLLM call made inside the block to this identity.

    Args:
        **identity: any of ``agent_id``, ``user_id``, ``team_id``, ``run_id``, ``priority``.
            Nested blocks add to (and override) the outer block.

    Raises:
        TypeError: an unknown identity field was given.
    """
    unknown = set(identity) - set(IDENTITY_FIELDS)
    if unknown:
        raise TypeError(f"unknown identity field(s) {sorted(unknown)}; allowed: {', '.join(IDENTITY_FIELDS)}")
    outer = _context.get() or {}
    token = _context.set({**outer, **{k: v for k, v in identity.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


_warned_priorities: set[str] = set()


def parse_priority(value: Any) -> int:
    """``high``/``normal``/``low`` or an int (larger runs first); anything else is normal (with a
    warning, once per value: a misspelt ``"urgent"`` would otherwise pass unnoticed)."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, (bool, str, float)):
        try:
            return operator.index(value)  # (numpy's integers)
        except TypeError:
            pass
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PRIORITY_NAMES:
            return PRIORITY_NAMES[name]
        try:
            return int(name)
        except ValueError:
            pass
    shown = repr(value)[:40]
    if shown not in _warned_priorities and len(_warned_priorities) < 100:
        _warned_priorities.add(shown)
        logger.warning("hive-ratelimit: priority %s is not high, normal, low or an integer; the call runs at "
                       "normal priority", shown)
    return 0


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling."""

    agent_id: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    run_id: str | None = None
    priority: int = 0




def resolve_identity(metadata: Mapping[str, Any] | None, user: Any = None) -> Identity:
    """Merge, field by field: the request's metadata and ``user`` > :func:`scope` >
    :data:`AMBIENT_IDENTITY` (Hive's running agent and run)."""
    ctx = _context.get()
    md = metadata if type(metadata) is dict or isinstance(metadata, Mapping) else _EMPTY
    user_id = md.get("user_id")
    agent_id, team_id, run_id, priority = md.get("agent_id"), md.get("team_id"), md.get("run_id"), md.get("priority")
    if ctx:
        if user_id is None:
            user_id = user if user else ctx.get("user_id")
        if agent_id is None:
            agent_id = ctx.get("agent_id")
        if team_id is None:
            team_id = ctx.get("team_id")
        if run_id is None:
            run_id = ctx.get("run_id")
        if priority is None:
            priority = ctx.get("priority")
    elif user_id is None and user:
        user_id = user
    if agent_id is None or run_id is None or user_id is None or team_id is None:
        for source in AMBIENT_IDENTITY:
            amb = source()
            if amb:
                agent_id = agent_id if agent_id is not None else amb.get("agent_id")
                user_id = user_id if user_id is not None else amb.get("user_id")
                team_id = team_id if team_id is not None else amb.get("team_id")
                run_id = run_id if run_id is not None else amb.get("run_id")
                priority = priority if priority is not None else amb.get("priority")
    raw = (agent_id, user_id, team_id, run_id, priority)
    if not ((agent_id is None or type(agent_id) is str) and (user_id is None or type(user_id) is str)
            and (team_id is None or type(team_id) is str) and (run_id is None or type(run_id) is str)
            and (priority is None or type(priority) is str or type(priority) is int)):
        return _identity(*raw)  # other types (1 == 1.0 == True) would share a cache entry
    found = _identities.get(raw)
    if found is None:
        found = _identity(*raw)
        if sum(len(v) for v in raw[:4] if v is not None) > 4 * MAX_ID:
            return found  # (not cached: the cache would hold the long ids themselves)
        if len(_identities) > 8192:
            _identities.clear()
        _identities[raw] = found
    return found


def with_context_identity(metadata: Any, user: Any = None) -> Any:
    """``metadata`` with the identity fields that :func:`scope` (then :data:`AMBIENT_IDENTITY`)
    gives in the current context filled in where ``metadata`` leaves them unset, for calls LiteLLM
    makes on threads of its own (``batch_completion``'s pool), which do not carry context
    variables. The caller's mapping is not changed (a new dict is returned when anything is added);
    ``user_id`` is not added for a call that gives ``user=``, which wins over the context. Metadata
    that is not a mapping is returned as it is."""
    if metadata is not None and type(metadata) is not dict and not isinstance(metadata, Mapping):
        return metadata
    found: dict[str, Any] = dict(_context.get() or _EMPTY)
    md = metadata or _EMPTY
    # The ambient sources, asked as resolve_identity asks them: only if one of the four ids is
    # given by none of the metadata, ``user`` and the context.
    if any(md.get(f) is None and found.get(f) is None and not (user and f == "user_id")
           for f in IDENTITY_FIELDS[:4]):
        for source in AMBIENT_IDENTITY:
            amb = source()
            for f in IDENTITY_FIELDS:
                if amb and found.get(f) is None and amb.get(f) is not None:
                    found[f] = amb[f]
    if user:
        found.pop("user_id", None)
    extra = {f: v for f, v in found.items() if v is not None and md.get(f) is None}
    if not extra:
        return metadata
    return {**md, **extra}


def _identity(agent_id: Any, user_id: Any, team_id: Any, run_id: Any, priority: Any) -> Identity:
    return Identity(
        agent_id=clean_id(agent_id),
        user_id=clean_id(user_id),
        team_id=clean_id(team_id),
        run_id=clean_id(run_id),
        priority=parse_priority(priority),
    )


# Identity per raw (agent, user, team, run, priority), for str/None ids and str/int priorities
# only: an agent sends the same ones on every call.
_identities: dict[tuple[Any, ...], Identity] = {}


def split_model(model: str, provider: str) -> str:
    """``openai/gpt-4`` -> ``gpt-4`` when the prefix is the provider; otherwise unchanged."""
    prefix = provider + "/"
    return model[len(prefix):] if model.startswith(prefix) else model


class ScopeResolver:
    """Maps (provider, model, identity) to the list of limited scopes, cached."""

    def __init__(self, config: RateLimitingConfig) -> None:
        self.config = config
        self._cache: LRUCache[tuple[Any, ...], list[Scope]] = LRUCache(maxsize=8192)
        self._choices: dict[str, list[Scope] | None] = {}
        self._warned_no_run: set[str] = set()
        self._table_limits: dict[tuple[str, str], LimitSet] = {}  # (level, block name) -> its limits
        self.generation = next(_generations)
        g, b = config.global_, config.budget

        def tighter(a: float | None, c: float | None) -> float | None:
            return c if a is None else a if c is None else min(a, c)

        # rate_limiting.budget is the global budget; global.max_cost_per_* is the same thing.
        self.global_limits = g.model_copy(update={
            "max_cost_per_hour": tighter(g.max_cost_per_hour, b.max_hourly_spend),
            "max_cost_per_day": tighter(g.max_cost_per_day, b.max_daily_spend),
            "max_cost_per_month": tighter(g.max_cost_per_month, b.max_monthly_spend),
        })

    def _model_limits(self, provider: str, model: str) -> tuple[str, LimitSet] | None:
        pconf = self.config.providers.get(provider)
        if pconf is None or not pconf.models:
            return None
        bare = split_model(model, provider)
        found = match_model_block(pconf.models, provider, bare)
        if found is None:
            return None
        return bare, found[1]

    def scopes(self, provider: str, model: str, ident: Identity) -> list[Scope]:
        """The scopes with limits that a call to ``provider``/``model`` by ``ident`` counts against."""
        cache_key = (provider, model, ident.agent_id, ident.user_id, ident.team_id, ident.run_id)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        cfg = self.config
        out: list[Scope] = []
        if not self.global_limits.is_empty():
            out.append(Scope("global", "global", self.global_limits, self.generation))
        own = self._provider_limits(provider)
        if not own.is_empty():
            out.append(Scope("provider", f"provider:{provider}", own, self.generation))
        found = self._model_limits(provider, model)
        bare = split_model(model, provider)
        # The model scope is always there, limits or not: it carries the provider's signals
        # (cooldown after a 429, circuit breaker, learned limits).
        out.append(Scope("model", f"model:{provider}/{bare}", found[1] if found is not None else _NO_LIMITS,
                         self.generation))
        for level, name, table in (
            ("agent", ident.agent_id, cfg.agents),
            ("user", ident.user_id, cfg.users),
            ("team", ident.team_id, cfg.teams),
        ):
            if name is None:
                continue
            found_block = self._block(level, table, name)
            if found_block is not None:
                block, limits = found_block
                if not limits.is_empty():
                    out.append(Scope(level, f"{level}:{name}", limits, self.generation))
                if level == "agent" and isinstance(block, AgentLimits):
                    run_scope = self._run_scope(name, ident.run_id, block)
                    if run_scope is not None:
                        out.append(run_scope)
        self._cache[cache_key] = out
        return out

    def limits_for(self, level: str, key: str) -> LimitSet | None:
        """The limits this configuration gives the scope ``key`` (of ``level``); ``None`` where
        that cannot be told from the key alone (per-run caps and API keys)."""
        cfg = self.config
        if level == "global":
            return self.global_limits
        name = key.split(":", 1)[1] if ":" in key else key
        if level == "provider":
            return self._provider_limits(name)
        if level == "model":
            provider, _, model = name.partition("/")
            found = self._model_limits(provider, model)
            return found[1] if found is not None else _NO_LIMITS
        tables: dict[str, dict[str, Any]] = {"agent": cfg.agents, "user": cfg.users, "team": cfg.teams}
        table = tables.get(level)
        if table is None:
            return None
        found_block = self._block(level, table, name)
        return found_block[1] if found_block is not None else _NO_LIMITS

    def _provider_limits(self, provider: str) -> LimitSet:
        """A provider block's own (provider-wide) limits; none without a block."""
        pconf = self.config.providers.get(provider)
        if pconf is None:
            return _NO_LIMITS
        return LimitSet.model_validate({k: getattr(pconf, k) for k in LimitSet.model_fields})

    def _block(self, level: str, table: dict[str, Any], name: str) -> tuple[Any, LimitSet] | None:
        """The block of an agents/users/teams ``table`` that ``name`` falls under (its own key, a
        glob, else ``*``) and that block's limits (one object per block, however many names)."""
        hit = match_block(table, name)
        if hit is None:
            return None
        limits = self._table_limits.get((level, hit[0]))
        if limits is None:
            limits = LimitSet.model_validate({k: getattr(hit[1], k) for k in LimitSet.model_fields})
            self._table_limits[(level, hit[0])] = limits
        return hit[1], limits

    def choices(self, provider: str) -> list[Scope] | None:
        """The provider's API keys as scopes to choose from (``None`` if it has none configured)."""
        if provider in self._choices:
            return self._choices[provider]
        pconf = self.config.providers.get(provider)
        out: list[Scope] | None = None
        if pconf is not None and pconf.api_keys:
            out = [Scope("key", f"key:{provider}/{k.env}",
                         LimitSet.model_validate({f: getattr(k, f) for f in LimitSet.model_fields}), self.generation)
                   for k in pconf.api_keys]
        self._choices[provider] = out
        return out

    def _run_scope(self, agent: str, run_id: str | None, limits: AgentLimits) -> Scope | None:
        if limits.max_requests_per_run is None and limits.max_cost_per_run is None:
            return None
        if run_id is None:
            if agent not in self._warned_no_run:
                self._warned_no_run.add(agent)
                logger.warning(
                    "agent %s has per-run caps but its calls carry no run_id (metadata['run_id'] or "
                    "HiveLimiter.scope(run_id=...)); the per-run caps cannot apply to them", agent)
            return None
        run_limits = AgentLimits(max_requests_per_run=limits.max_requests_per_run,
                                 max_cost_per_run=limits.max_cost_per_run)
        return Scope("run", run_key(agent, run_id), run_limits, self.generation)
