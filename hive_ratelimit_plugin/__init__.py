"""hive-ratelimit: keep LiteLLM calls inside provider rate limits, queueing instead of failing.

Enable with one line::

    import litellm
    from hive_ratelimit_plugin import HiveLimiter

    litellm.callbacks.append(HiveLimiter("limits.yaml"))

or with none: ``HIVE_RATELIMIT_ENABLED=1`` (see docs/zero-code.md), or ``enable()``.

Every export is loaded on first use (PEP 562): importing the package itself costs next to
nothing, which the zero-code autoload (``hive_ratelimit_autoload.pth``, imported at every interpreter
start) relies on. ``HiveLimiter`` and ``enable`` import LiteLLM (seconds).
"""

# No ``from __future__`` or ``typing`` imports at run time: each costs a fraction of a millisecond
# at interpreter start when the autoload is on.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._budget_errors import BudgetExceededError, RunawayDetectedError
    from ._enable import disable, enable
    from ._scopes import scope
    from .config import RateLimitingConfig, load_config
    from .errors import (
        BackendUnavailableError,
        CircuitOpenError,
        ConfigError,
        HiveRateLimitError,
        RateLimitQueueTimeout,
        RequestTooLargeError,
    )
    from .plugin import HiveLimiter

__all__ = [
    "BackendUnavailableError",
    "BudgetExceededError",
    "CircuitOpenError",
    "ConfigError",
    "HiveLimiter",
    "HiveRateLimitError",
    "RateLimitQueueTimeout",
    "RateLimitingConfig",
    "RequestTooLargeError",
    "RunawayDetectedError",
    "disable",
    "enable",
    "load_config",
    "scope",
]

__version__ = "0.1.0"

# export name -> the submodule that defines it
_EXPORTS = {
    "BackendUnavailableError": "errors",
    "BudgetExceededError": "errors",  # (imports LiteLLM: it subclasses litellm.BudgetExceededError)
    "CircuitOpenError": "errors",
    "RunawayDetectedError": "errors",
    "ConfigError": "errors",
    "HiveRateLimitError": "errors",
    "RateLimitQueueTimeout": "errors",
    "RequestTooLargeError": "errors",
    "RateLimitingConfig": "config",
    "load_config": "config",
    "scope": "_scopes",
    "HiveLimiter": "plugin",
    "enable": "_enable",
    "disable": "_enable",
}
# public submodules that ``import hive_ratelimit_plugin`` used to load eagerly
_SUBMODULES = frozenset({"config", "errors", "plugin", "testing", "fake_provider", "cli", "integrations"})


def __getattr__(name: str) -> "Any":
    import importlib

    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> "list[str]":
    return sorted(set(globals()) | set(__all__))
