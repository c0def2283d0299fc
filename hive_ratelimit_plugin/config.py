"""Configuration: the ``rate_limiting:`` YAML schema, environment overrides, and loading.

Sources, lowest to highest precedence: the YAML file (``HIVE_RATELIMIT_CONFIG`` or an explicit
path), an explicit dict, then environment variables ``HIVE_RATELIMIT_<FIELD>`` with ``__`` for
nesting (``HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE=60``). Every problem is reported as a
:class:`~hive_ratelimit_plugin.errors.ConfigError` naming the key path, the value and what is allowed.
"""

from __future__ import annotations

import contextvars
import difflib
import fnmatch
import hashlib
import logging
import os
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from .errors import ConfigError

__all__ = [
    "AgentLimits",
    "BudgetConfig",
    "LimitSet",
    "PriceConfig",
    "ProviderConfig",
    "QueueConfig",
    "RateLimitingConfig",
    "load_config",
]

ENV_PREFIX = "HIVE_RATELIMIT_"
logger = logging.getLogger("hive_ratelimit_plugin")

#: Seconds in each period name used by limit fields.
PERIODS: dict[str, float] = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


#: Seconds and the like that must be a real number (``.inf`` would crash a timer or freeze a
#: model for ever; only waits, ``max_wait_seconds``, may be infinite). At most 1e9 (31 years).
FinitePositive = Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False)]


def _numeric(annotation: Any) -> bool:
    """Whether a field takes only numbers (and ``None``): ``int``, ``float``, ``PositiveInt``..."""
    if get_origin(annotation) is Annotated:
        return _numeric(get_args(annotation)[0])
    if get_origin(annotation) in (Union, type(int | None)):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return bool(args) and all(_numeric(a) for a in args)
    return isinstance(annotation, type) and issubclass(annotation, (int, float)) and annotation is not bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic reads true as 1: `requests_per_minute: true` would silently be a limit of 1.
        if not info.field_name:
            return value
        annotation = cls.model_fields[info.field_name].annotation
        if type(value) is bool and _numeric(annotation):
            raise ValueError("must be a number, not true/false")
        if type(value) is list and any(type(v) is bool for v in value) and get_origin(annotation) is list \
                and all(_numeric(a) for a in get_args(annotation)):
            raise ValueError("must be numbers, not true/false")  # (warning_thresholds: [true])
        return value


class LimitSet(_Strict):
    """Limits that can be set at any level. Every field is optional; ``None`` means unlimited.

    Rate limits slide (``requests_per_minute`` counts the last 60 seconds); money limits
    (``max_cost_per_hour|day|month``) follow the calendar in ``budget.timezone``.
    """

    requests_per_second: PositiveInt | None = None
    requests_per_minute: PositiveInt | None = None
    requests_per_hour: PositiveInt | None = None
    requests_per_day: PositiveInt | None = None
    tokens_per_second: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    tokens_per_hour: PositiveInt | None = None
    tokens_per_day: PositiveInt | None = None
    input_tokens_per_minute: PositiveInt | None = None
    output_tokens_per_minute: PositiveInt | None = None
    concurrent_requests: PositiveInt | None = None
    max_cost_per_hour: PositiveFloat | None = None
    max_cost_per_day: PositiveFloat | None = None
    max_cost_per_month: PositiveFloat | None = None

    def is_empty(self) -> bool:
        """True when no limit is set."""
        return all(v is None for v in self.__dict__.values())


LIMIT_FIELDS: frozenset[str] = frozenset(LimitSet.model_fields)


class AgentLimits(LimitSet):
    """Limits for one agent (or a glob of agent names), plus per-run caps (``metadata["run_id"]``)."""

    max_requests_per_run: PositiveInt | None = None
    max_cost_per_run: PositiveFloat | None = None


class ApiKeyConfig(LimitSet):
    """One of several API keys of a provider: the key is read from the environment variable ``env``."""

    env: str

    @field_validator("env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        # (The messages never repeat the value: it may be the key itself, written by mistake.)
        if not value or not all(c.isalnum() or c == "_" for c in value) or looks_like_key(value):
            raise ValueError("must be the NAME of an environment variable (letters, digits, _), not a key")
        if value not in os.environ:
            raise ValueError("no environment variable of this name is set")
        return value


class ProviderConfig(LimitSet):
    """A provider block: provider-wide limits next to per-model blocks.

    In YAML both stand side by side, as in the specification::

        openai:
          requests_per_minute: 10000   # provider-wide
          gpt-4:                        # a model (with or without the "openai/" prefix)
            requests_per_minute: 500
          "gpt-4o*":                    # a glob: each matching model gets these limits
            tokens_per_minute: 300000
    """

    models: dict[str, LimitSet] = Field(default_factory=dict)
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _split_models(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        own: dict[str, Any] = {}
        models: dict[str, Any] = dict(data.get("models") or {})
        for key, value in data.items():
            if key == "models":
                continue
            if key == "api_keys":
                own[key] = value
                continue
            if key in LIMIT_FIELDS:
                own[key] = value
            elif isinstance(value, dict) or value is None:
                models[str(key)] = value or {}
            else:
                # A scalar under an unknown name: most likely a misspelt limit field.
                own[key] = value
        own["models"] = models
        return own


class QueueConfig(_Strict):
    """How over-limit calls wait."""

    max_wait_seconds: float = Field(default=60.0, ge=0)
    max_size: PositiveInt = 10_000
    high_priority_reserve: float = Field(default=0.0, ge=0, lt=1)
    """Share of every limit that only ``high``-priority calls (priority >= 10) may use."""


class RetryConfig(_Strict):
    """Retrying calls that a provider answered with 429 (or Anthropic's 529 "overloaded")."""

    enabled: bool = True
    max_attempts: PositiveInt = 5
    """Attempts in all, the first included (5 = up to 4 retries)."""
    max_wait_seconds: float = Field(default=120.0, ge=0)
    """Total time a call may spend waiting for retries; past it the caller gets the RateLimitError."""
    base_delay: FinitePositive = 1.0
    max_delay: FinitePositive = 60.0
    """Cap on one wait, whatever Retry-After says."""
    take_over_sdk_retries: bool = True
    """Set ``max_retries=0`` (and ``num_retries=0`` where one applies) on every call, so neither
    the openai SDK nor LiteLLM's own retry loop resends behind the limiter's back. The limiter
    retries 429s itself (the settings above), and makes the retries of 5xx and timeouts that a
    call asked for (``num_retries``, ``max_retries``, or ``litellm.num_retries`` on async calls)
    itself too, after a jittered backoff (``base_delay``, ``max_delay``): each attempt is admitted
    and counted. A Router's deployment calls get the zeros but no retries (the Router retries
    through the guard); sync calls under ``litellm.num_retries`` are left alone
    (docs/troubleshooting.md)."""


class CircuitBreakerConfig(_Strict):
    """Per provider/model (and API key): stop calling after consecutive failures."""

    enabled: bool = True
    failure_threshold: PositiveInt = 5
    cooldown_seconds: FinitePositive = 30.0
    max_cooldown_seconds: FinitePositive = 300.0


class AdaptiveConfig(_Strict):
    """Learn a provider's real limits from x-ratelimit-* headers and from 429s (AIMD)."""

    enabled: bool = True
    decrease_factor: float = Field(default=0.7, gt=0, lt=1)


class EstimationConfig(_Strict):
    """How a call's usage is estimated before it runs."""

    default_output_tokens: PositiveInt = 256
    lease_seconds: FinitePositive = 300.0
    """How long a call's reservation lives without news: a call that never ends (an abandoned
    stream) gives its slot back this long after it was admitted or its last chunk was read."""
    arrival_margin_seconds: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """A request counts in request windows from when it may have reached the provider: when it
    completed, if that was within this long (and half the window) of LiteLLM sending it; a longer
    call counts from its send plus this margin (at most a tenth of the window). The send is the
    admission if LiteLLM did not report it. Guards against 429s from providers that count
    arrivals; 0 counts from admission."""


class BudgetConfig(_Strict):
    """The global money budget (``rate_limiting.budget``), warnings and the calendar's time zone."""

    max_hourly_spend: PositiveFloat | None = None
    max_daily_spend: PositiveFloat | None = None
    max_monthly_spend: PositiveFloat | None = None
    currency: str = "USD"
    warning_thresholds: list[float] = Field(default_factory=lambda: [0.8])
    timezone: str = "UTC"

    @field_validator("warning_thresholds")
    @classmethod
    def _thresholds(cls, value: list[float]) -> list[float]:
        for v in value:
            if not 0 < v < 1:
                raise ValueError(f"each threshold must be between 0 and 1 (exclusive), got {v}")
        return sorted(set(value))

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as 'UTC' or 'Europe/Paris')") from exc
        return value

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        if not (len(value) == 3 and value.isalpha()):
            raise ValueError("currency must be a 3-letter code such as USD")
        return value.upper()


class PriceConfig(_Strict):
    """A model's price in the budget currency per million tokens."""

    input_per_million: float = Field(ge=0, allow_inf_nan=False)
    output_per_million: float = Field(ge=0, allow_inf_nan=False)
    #: Prompt-cache prices (optional; without them cached and written tokens cost the input price).
    cache_read_per_million: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cache_write_per_million: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cache_write_1h_per_million: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class RunawayConfig(_Strict):
    """Trip an agent's breaker when it repeats the same request too often (a loop)."""

    enabled: bool = True
    max_identical_requests: PositiveInt = 20
    window_seconds: FinitePositive = 60.0
    cooldown_seconds: FinitePositive = 600.0


class RedisConfig(_Strict):
    """The shared backend (``backend: redis://...``): see docs/deployment.md."""

    key_prefix: str = Field(default="hive-rl", min_length=1, max_length=64, pattern=r"^[^{}\s]+$")
    on_backend_error: Literal["open", "closed", "local"] = "local"
    local_share: float = Field(default=0.5, gt=0, le=1)  # of each limit a process may use during an outage
    socket_timeout: FinitePositive = 0.5
    retry_interval: FinitePositive = 1.0  # how often to try Redis again during an outage


class StatusConfig(_Strict):
    """Live status snapshots for ``hive-ratelimit status`` (``status/<pid>.json`` next to the state file)."""

    enabled: bool = True
    interval_seconds: FinitePositive = 1.0


_ENV_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("hive_ratelimit_env_off", default=False)


class RateLimitingConfig(BaseSettings):
    """The whole ``rate_limiting:`` block."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    enabled: bool = True
    global_: LimitSet = Field(
        default_factory=LimitSet,
        # An alias bypasses env_prefix in pydantic-settings, so name the env variable explicitly.
        validation_alias=AliasChoices("global", ENV_PREFIX + "GLOBAL"),
    )
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    agents: dict[str, AgentLimits] = Field(default_factory=dict)
    users: dict[str, LimitSet] = Field(default_factory=dict)
    teams: dict[str, LimitSet] = Field(default_factory=dict)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    estimation: EstimationConfig = Field(default_factory=EstimationConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    pricing: dict[str, PriceConfig] = Field(default_factory=dict)
    unknown_price: Literal["block", "estimate"] = "estimate"
    fallback_price: PriceConfig = Field(
        default_factory=lambda: PriceConfig(input_per_million=15.0, output_per_million=75.0)
    )
    runaway: RunawayConfig = Field(default_factory=RunawayConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig)
    state_path: str | None = None
    backend: str = "memory"
    redis: RedisConfig = Field(default_factory=lambda: RedisConfig())
    status: StatusConfig = Field(default_factory=StatusConfig)

    @field_validator("enabled", mode="before")
    @classmethod
    def _strip_switch(cls, v: Any) -> Any:
        # HIVE_RATELIMIT_ENABLED is also the autoload's switch, which reads it stripped: "1\r" from
        # a .env file with CRLF line endings turns the autoload on and must not then be "invalid".
        return v.strip() if isinstance(v, str) else v

    @field_validator("agents", "users", "teams")
    @classmethod
    def _clean_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Names as calls' ids are counted (clean_id): a 300-character or multi-line name still matches.
        return {(clean_id(k) or k): block for k, block in v.items()}

    @field_validator("state_path")
    @classmethod
    def _check_state_path(cls, v: str | None) -> str | None:
        if v is not None and v != ":memory:" and os.path.isdir(os.path.expanduser(v)):
            raise ValueError("is a directory; give the path of a file in it, such as "
                             f"{os.path.join(v, 'state.sqlite')}")
        return v

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, v: str) -> str:
        v = v.strip()
        if v == "memory" or v.startswith("unix://"):
            return v
        if v.startswith(("redis://", "rediss://")):
            from urllib.parse import parse_qs, urlsplit

            try:
                parts = urlsplit(v)
                _ = parts.port  # (raises on a port that is not a number)
            except ValueError as exc:
                raise ValueError(f"not a valid Redis URL ({exc})") from None
            db = parts.path.strip("/")
            for value in [db, *parse_qs(parts.query).get("db", [])]:
                # (redis-py reads a database it cannot parse as database 0: another limiter's data)
                if value and not (value.isdigit() and value.isascii()):
                    raise ValueError(f"the database must be a number, such as redis://127.0.0.1:6379/0 "
                                     f"(got {value!r})")
            return v
        raise ValueError("must be 'memory' or a Redis URL such as redis://127.0.0.1:6379/0 (rediss:// for TLS)")

    def has_budgets(self) -> bool:
        """True when any money budget or per-run cap is configured anywhere."""
        b = self.budget
        if b.max_hourly_spend or b.max_daily_spend or b.max_monthly_spend:
            return True
        blocks: list[LimitSet] = [self.global_, *self.agents.values(), *self.users.values(), *self.teams.values()]
        for p in self.providers.values():
            blocks.append(p)
            blocks.extend(p.models.values())
        for blk in blocks:
            if blk.max_cost_per_hour or blk.max_cost_per_day or blk.max_cost_per_month:
                return True
            if isinstance(blk, AgentLimits) and (blk.max_cost_per_run or blk.max_requests_per_run):
                return True
        return False

    _SOURCES_ENV_FIRST: ClassVar[bool] = True

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment overrides the file/dict given at construction (unless load_config(use_env=False)).
        if _ENV_OFF.get():
            return (init_settings,)
        return (env_settings, init_settings)


_SECRET_NAMES = ("key", "secret", "password", "credential")
# How providers' API keys begin (OpenAI, Anthropic, Groq, xAI, Google, Hugging Face, Perplexity,
# Replicate, and LiteLLM's own virtual keys).
KEY_PREFIXES = ("sk-", "sk_", "gsk_", "xai-", "AIza", "hf_", "pplx-", "r8_", "AKIA")
_VAR_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def looks_like_key(value: str) -> bool:
    """Whether ``value`` looks like an API key rather than a name: a known prefix, or a long
    token mixing lower-case letters and digits (environment variable names are upper case)."""
    if value.startswith(KEY_PREFIXES) or value.startswith("Bearer "):
        return True
    return (len(value) >= 20 and " " not in value and any(c.islower() for c in value)
            and any(c.isdigit() for c in value) and not any(c in value for c in "-./:"))


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 2, 6, 6, 6, 6
_REPR.maxstring = _REPR.maxother = 160


def _short(value: Any) -> str:
    """``repr(value)``, cut short (a few-hundred-byte YAML file of aliases expands to megabytes)."""
    return _REPR.repr(value)


def _shown(name: str, value: Any) -> Any:
    """A value as it may appear in an error: secrets (by key name or by look) are redacted."""
    lowered = name.lower()
    if lowered == "backend" and isinstance(value, str):  # a URL's user info and password= stay hidden
        return re.sub(r"(?i)(password|username)=[^&]*", r"\1=***", re.sub(r"[^/@]*@", "***@", value))
    if isinstance(value, str) and "://" in value:  # a URL in the wrong place (redis: URL, backend: {url: ...})
        value = re.sub(r"(?i)(password|username)=[^&\s]*", r"\1=***", re.sub(r"://[^/@\s]*@", "://***@", value))
    if isinstance(value, (list, tuple)):
        return [_shown(name, v) for v in value]
    if any(s in lowered for s in _SECRET_NAMES) and not lowered.endswith("api_keys"):
        return "<redacted>"
    if lowered == "env" and isinstance(value, str) and not (_VAR_NAME.fullmatch(value) and not looks_like_key(value)):
        return "<redacted>"  # an API key's variable: shown only if it reads as a variable's name
    if isinstance(value, str) and (looks_like_key(value) or
                                   (len(value) >= 32 and " " not in value and not value.isalpha())):
        return "<redacted>"
    if isinstance(value, dict):
        return {k: _shown(str(k), v) for k, v in value.items()}
    return value


def _env_var_of(locs: list[list[Any]]) -> str | None:
    """The ``HIVE_RATELIMIT_*`` variable set for one of these field paths, if any (as written,
    any case: pydantic-settings reads them so)."""
    names = {k.upper(): k for k in os.environ if k.upper().startswith(ENV_PREFIX)}
    for loc in locs:
        var = ENV_PREFIX + "__".join("GLOBAL" if p == "global_" else str(p).upper() for p in loc)
        if loc and var in names:
            return names[var]
    return None


def _block_at(loc: list[Any]) -> type[BaseModel] | None:
    """The configuration class of the block at ``loc`` (a validation error's path), if any."""
    tp: Any = RateLimitingConfig
    for part in loc:
        tp = _bare(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get("global_" if part == "global" else str(part))
            if field is None:
                return None
            tp = field.annotation
        elif get_origin(tp) in (dict, list):
            tp = get_args(tp)[-1]  # (a dict's key or a list's index: the value's type)
        else:
            return None
    tp = _bare(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _bare(tp: Any) -> Any:
    """``X`` for ``X | None`` and ``Annotated[X, ...]``."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, type(int | None)):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


#: Money keys written the way another level spells them.
_MONEY_NAMES = {"max_hourly_spend": "max_cost_per_hour", "max_daily_spend": "max_cost_per_day",
                "max_monthly_spend": "max_cost_per_month", "max_cost_per_hour": "max_hourly_spend",
                "max_cost_per_day": "max_daily_spend", "max_cost_per_month": "max_monthly_spend"}


def _unknown_key_hint(loc: list[Any], value: Any) -> str:
    """What to write instead of the unknown key at ``loc``: the field it most likely meant, or why
    it does not belong there. (``value`` as the error shows it: secrets redacted.)"""
    key = str(loc[-1]) if loc else ""
    block = _block_at(loc[:-1])
    if block is None:
        return "check the spelling against the documented fields"
    names = ["global" if n == "global_" else n for n in block.model_fields if n != "models"]
    if key in _MONEY_NAMES and _MONEY_NAMES[key] in names:
        return f"here the money limit is spelt {_MONEY_NAMES[key]}"
    if key in ("budget", "budgets") and issubclass(block, LimitSet):
        return ("a level's money limits are max_cost_per_hour, max_cost_per_day and max_cost_per_month; "
                "the global budget is the block rate_limiting.budget")
    lowered = key.lower().replace("-", "_")
    close = [n for n in names if n == lowered or (len(lowered) >= 4 and n.startswith(lowered))]
    close += difflib.get_close_matches(lowered, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    if (issubclass(block, ProviderConfig) and isinstance(value, (int, float)) and not isinstance(value, bool)
            and not looks_like_key(key)):
        return (f"if {key} is a model, its limits go in a block of their own, such as "
                f"{key}: {{requests_per_minute: {_short(value)}}}")
    return "check the spelling against the documented fields"


def _format_validation_error(exc: ValidationError, root: str, env: bool = True) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        locs = [list(loc)]
        if len(loc) > 2 and loc[0] == "providers" and loc[2] == "models":
            del loc[2]  # a model's limits sit right under its provider, as the configuration is written
            locs.append(list(loc))
        path = ".".join([root, *("global" if p == "global_" else str(p) for p in loc)])
        value = _shown(str(err["loc"][-1]) if err["loc"] else "", err.get("input"))
        kind = err["type"]
        # The environment overrides the file: name the variable a bad value came from.
        var = _env_var_of(locs) if env else None
        source = f" (from the environment variable {var})" if var else ""
        if kind == "extra_forbidden":
            lines.append(f"{path}: unknown key (value {_short(value)}){source}; "
                         + _unknown_key_hint(list(err["loc"]), value))
        elif kind == "missing":
            # (pydantic's input here is the enclosing block, not a value of this key)
            lines.append(f"{path}: missing; this key is required here")
        elif kind == "model_type":
            # (pydantic's message names the internal class: "... or instance of LimitSet")
            lines.append(f"{path}: {_short(value)}{source} is not allowed: expected a block of keys and values")
        else:
            lines.append(f"{path}: {_short(value)}{source} is not allowed: {err['msg']}")
    return lines


class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc,unused-ignore]
    """``yaml.safe_load`` that refuses a key given twice in one mapping (two ``global:`` blocks:
    the second would silently replace the first, and its limits with it)."""

    def _written_keys(self, node: yaml.MappingNode) -> list[Any]:
        # The keys written in this mapping, before a merge (<<) rewrites it in place: merged keys
        # that the mapping overrides are not duplicates.
        written: dict[int, list[Any]] = self.__dict__.setdefault("_written", {})
        keys = written.get(id(node))
        if keys is None:
            keys = written[id(node)] = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        return keys

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        self._written_keys(node)
        super().flatten_mapping(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node in self._written_keys(node):
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice (the second would "
                    "replace the first)", key_node.start_mark)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


#: Bytes read of a configuration file at most: a generated one of 300,000 users is 11 MB. A log or
#: a device given by mistake (``/dev/zero``) would otherwise be read until memory runs out.
MAX_FILE_BYTES = 64 * 1024 * 1024


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError(f"{p}: larger than {MAX_FILE_BYTES // 2**20} MiB; not a configuration file")
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {str(p)!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}); "
                          "a configuration file is YAML text") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: YAML syntax error{where}: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: YAML syntax error: {exc}") from exc
    if data is None:
        # (truncated, or a mount not populated yet: read as "no limits", it would run unlimited)
        raise ConfigError(f"{p}: the file is empty; expected a 'rate_limiting:' section (write "
                          "'rate_limiting: {}' for the defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping with a 'rate_limiting:' key, got {type(data).__name__}")
    return data


#: Sections of ``rate_limiting:`` whose limits or budgets would silently not apply if written at the
#: top level of a file by mistake (indented wrongly). Generic names (enabled, queue, retry, redis,
#: status ...) are left out: a host application's own file may well have those at its top level.
_STRAY_SECTIONS = frozenset({"global", "providers", "agents", "users", "teams", "budget", "pricing", "unknown_price",
                             "fallback_price", "runaway", "circuit_breaker"})


def _invalid(origin: str, problems: list[str]) -> ConfigError:
    """The error for a configuration from ``origin`` with these problems (one line each)."""
    return ConfigError(f"invalid configuration ({origin}):\n  " + "\n  ".join(problems), errors=problems)


#: Top-level sections of a LiteLLM proxy ``config.yaml``.
_HOST_SECTIONS = frozenset({"model_list", "litellm_settings", "general_settings", "router_settings",
                            "environment_variables", "guardrails", "mcp_servers", "credential_list"})


def stray_sections(data: Mapping[Any, Any], origin: str) -> None:
    """Top-level keys next to ``rate_limiting:`` belong to the host application's file (the LiteLLM
    proxy's ``model_list``, ...) and are ignored. One named like a section of ``rate_limiting`` is
    most likely that section indented wrongly, its limits or budget silently ignored: in a file of
    ours (no key of another application beside it) that is a :class:`ConfigError`; in a host
    application's file, where the name may be its own, a warning."""
    stray = sorted(str(k) for k in data if str(k) in _STRAY_SECTIONS)
    if not stray:
        return
    problems = [f"{k}: a rate_limiting section at the top level, next to rate_limiting:, where it is ignored; "
                "indent it under rate_limiting:" for k in stray]
    if len(stray) == len(data) - 1:
        raise _invalid(origin, problems)
    logger.warning("%s: %s (if it is the application's own key, ignore this)", origin, "; ".join(problems))


def _unwrap(data: dict[str, Any], origin: str) -> dict[str, Any]:
    if "rate_limiting" in data:
        block = data["rate_limiting"]
        if block is None:
            return {}
        if not isinstance(block, dict):
            raise ConfigError(f"{origin}: rate_limiting: expected a mapping, got {type(block).__name__}")
        stray_sections(data, origin)
        return dict(block)
    host = sorted(str(k) for k in data if str(k) in _HOST_SECTIONS)
    if host:
        what = f"{host[0]} is a section" if len(host) == 1 else f"{', '.join(host)} are sections"
        problem = (f"no rate_limiting: section; {what} of a LiteLLM proxy config.yaml, in which hive-ratelimit "
                   "reads its limits from a rate_limiting: block (see docs/proxy.md)")
        raise _invalid(origin, [problem])
    return dict(data)


def load_config(
    source: str | os.PathLike[str] | dict[str, Any] | RateLimitingConfig | None = None,
    *,
    use_env: bool = True,
) -> RateLimitingConfig:
    """Build the effective configuration.

    Args:
        source: a YAML path, a dict (with or without the ``rate_limiting`` root), a ready
            :class:`RateLimitingConfig`, or ``None`` to use ``HIVE_RATELIMIT_CONFIG`` if set.
        use_env: apply ``HIVE_RATELIMIT_*`` environment overrides (on by default).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid. The message lists
            every problem with its key path.
    """
    if isinstance(source, RateLimitingConfig):
        return source
    origin = "dict"
    data: dict[str, Any]
    if source is None:
        path = os.environ.get(ENV_PREFIX + "CONFIG") if use_env else None
        data = _unwrap(_read_yaml(path), path) if path else {}
        origin = path or "environment"
    elif isinstance(source, dict):
        data = _unwrap(source, "dict")
    else:
        origin = str(source)
        data = _unwrap(_read_yaml(source), origin)
    _not_too_big(data, origin)
    problems = _unknown_env_names() if use_env else []
    cfg: RateLimitingConfig | None = None
    try:
        cfg = RateLimitingConfig(**data) if use_env else _no_env(data)
    except ValidationError as exc:
        problems += _format_validation_error(exc, "rate_limiting", env=use_env)
    except SettingsError as exc:  # a section's variable that is not JSON (HIVE_RATELIMIT_GLOBAL=garbage)
        problems.append(_settings_problem(exc))
    if problems or cfg is None:
        raise _invalid(origin, problems)
    overrides = env_overrides() if use_env else []
    if overrides:
        # (names only: a value may hold a secret, such as a Redis URL's password)
        logger.info("hive-ratelimit: the environment overrides the configuration (%s): %s", origin,
                    ", ".join(overrides))
    return cfg


#: More values than any configuration holds (a generated one of 100,000 users has 200,000): a few
#: hundred bytes of YAML aliases (each a list of the one before) expand to billions, which
#: validation would walk for days.
MAX_VALUES = 1_000_000


def _not_too_big(data: Any, origin: str) -> None:
    """Raise :class:`ConfigError` if ``data`` holds more than :data:`MAX_VALUES` values, counting
    what aliases repeat (a walk that stops at the limit)."""
    count = 0
    stack = [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_VALUES:
            problem = (f"holds more than {MAX_VALUES:,} values once its aliases (*name) are expanded: "
                       "not a configuration (an alias bomb?)")
            raise _invalid(origin, [problem])
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def env_overrides() -> list[str]:
    """The ``HIVE_RATELIMIT_*`` variables that set configuration fields (all but ``HIVE_RATELIMIT_CONFIG``,
    which names the file), sorted: what overrides the file or dict a limiter is given."""
    return sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() != ENV_PREFIX + "CONFIG")


def _settings_problem(exc: Exception) -> str:
    """What pydantic-settings could not parse, named by its environment variable (it names only
    the field: 'error parsing value for field "global_" from source "EnvSettingsSource"')."""
    m = re.search(r'field "([^"]+)"', str(exc))
    field = m.group(1) if m else ""
    section = "GLOBAL" if field == "global_" else field.upper()
    names = sorted(k for k in os.environ if section and k.upper() == ENV_PREFIX + section)
    var = names[0] if names else ENV_PREFIX + (section or "<section>")
    return (f"{var}: not valid JSON (environment); a whole section is given as a JSON object, as in "
            f"{ENV_PREFIX}GLOBAL='{{\"requests_per_minute\": 60}}', or one field at a time with __, as in "
            f"{ENV_PREFIX}GLOBAL__REQUESTS_PER_MINUTE=60")


def _unknown_env_names() -> list[str]:
    """``HIVE_RATELIMIT_*`` variables that name no field: pydantic-settings would ignore them, and a
    misspelt section (``HIVE_RATELIMIT_GLOBL__REQUESTS_PER_MINUTE``) would leave a limit off."""
    known = {name.upper() for name in RateLimitingConfig.model_fields} | {"GLOBAL", "CONFIG"}
    problems = []
    for key in sorted(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            head = key[len(ENV_PREFIX):].split("__", 1)[0].upper()
            if head not in known:
                problems.append(f"{key}: unknown key {head.lower()!r} (environment); sections are "
                                f"{', '.join(sorted(n.lower() for n in known - {'GLOBAL_', 'CONFIG'}))}; "
                                "nest with __, as in HIVE_RATELIMIT_GLOBAL__REQUESTS_PER_MINUTE")
    return problems


def _no_env(data: dict[str, Any]) -> RateLimitingConfig:
    # BaseSettings reads the environment on any construction, model_validate() included: its
    # sources say not to for this one.
    token = _ENV_OFF.set(True)
    try:
        return RateLimitingConfig(**data)
    finally:
        _ENV_OFF.reset(token)


#: Longest id kept as given; a longer one keeps its start and a hash of the whole (one agent id
#: of a megabyte would otherwise be held by every cache it is a key of).
MAX_ID = 200


def clean_id(value: Any) -> str | None:
    """An agent, user, team or run id as the limiter counts it: ``None`` for none or ``""``;
    otherwise its text, with control characters escaped (a newline in an id would forge log
    lines) and cut to :data:`MAX_ID` characters plus a hash of the whole. The same cleaning
    applies to the names of the ``agents``/``users``/``teams`` tables and to ``set_budget``'s
    and ``reset_budget``'s ids, so a name matches however it is given."""
    if value is None:
        return None
    text: str
    if type(value) is str:
        text = value
    else:
        try:
            text = str(value)
        except Exception:  # an object whose str() fails still gets a (shared) name
            text = f"<{type(value).__name__}>"
    if not text:
        return None
    if len(text) <= MAX_ID and text.isprintable():
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= MAX_ID else f"{text[:MAX_ID - 17]}#{digest}"


#: A model's snapshot date (Anthropic's ``-20250514``, OpenAI's ``-2024-08-06``, Vertex AI's ``@20250514``).
_SNAPSHOT = re.compile(r"(?:-\d{8}|-\d{4}-\d{2}-\d{2}|@\d{8})$")


def undated(name: str) -> str | None:
    """A model snapshot's name without its date (``claude-sonnet-4`` for ``claude-sonnet-4-20250514``);
    ``None`` for a name without one."""
    dated = _SNAPSHOT.search(name)
    return name[:dated.start()] if dated is not None else None


def match_model(patterns: dict[str, Any], name: str) -> tuple[str, Any] | None:
    """Find the block for a model ``name``: its exact key first, then its key without a snapshot
    date (``claude-sonnet-4`` for ``claude-sonnet-4-20250514``, the name providers document and
    users write), then the first glob that matches."""
    if name not in patterns:
        base = undated(name)
        if base is not None and base in patterns:
            return base, patterns[base]
    return match_name(patterns, name)


def match_model_block(models: dict[str, Any], provider: str, bare: str) -> tuple[str, Any] | None:
    """The block of a provider's ``models`` that its model ``bare`` (no provider prefix) falls
    under: written with or without the prefix (see :func:`match_model`)."""
    return match_model(models, bare) or match_model(models, f"{provider}/{bare}")


def match_block(table: dict[str, Any], name: str) -> tuple[str, Any] | None:
    """The block of an agents/users/teams ``table`` that ``name`` falls under: its own key, a glob,
    else ``*``."""
    return match_name(table, name) or (("*", table["*"]) if "*" in table else None)


def match_name(patterns: dict[str, Any], name: str) -> tuple[str, Any] | None:
    """Find the block for ``name``: an exact key first, then the first glob that matches."""
    if name in patterns:
        return name, patterns[name]
    for pattern, value in patterns.items():
        if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern):
            return pattern, value
    return None
