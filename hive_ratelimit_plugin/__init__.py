"""hive-ratelimit: keep LiteLLM calls inside provider rate limits, queueing instead of failing.

Enable with one line::

    import litellm
    from hive_ratelimit_plugin import HiveLimiter

    litellm.callbacks.append(HiveLimiter("limits.yaml"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._scopes import scope
from .config import RateLimitingConfig, load_config
from .errors import ConfigError, HiveRateLimitError, RateLimitQueueTimeout, RequestTooLargeError

if TYPE_CHECKING:
    from .plugin import HiveLimiter

__all__ = [
    "ConfigError",
    "HiveLimiter",
    "HiveRateLimitError",
    "RateLimitQueueTimeout",
    "RateLimitingConfig",
    "RequestTooLargeError",
    "load_config",
    "scope",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # HiveLimiter imports litellm (~4 s); load it only when asked for.
    if name == "HiveLimiter":
        from .plugin import HiveLimiter

        return HiveLimiter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
