"""``enable()`` / ``disable()``: one process-wide ``HiveLimiter``, kept registered in LiteLLM.

The zero-code autoload (``HIVE_RATELIMIT_ENABLED=1``) goes through :func:`enable` too, so code
can fetch the autoloaded limiter with ``enable()`` and switch it off with ``disable()``.

**Keeping it registered.** Programs (and some LiteLLM integrations) replace the whole list
(``litellm.callbacks = [MyLogger()]``), which would silently drop the limiter. While a limiter is
enabled, ``litellm``'s module class is swapped for a subclass whose ``callbacks`` property
stores the list in the module ``__dict__`` as before and, when an assignment replaces a list that
held the limiter with one that does not, appends the limiter to the new list and logs a WARNING.
Reads cost one property call. Deliberate removals are respected (no re-attach): ``disable()``;
removing it from the list in place (``unregister(limiter)``, ``.remove()``, ``.clear()``,
``[:] = ...``; a later replacement does not bring it back); LiteLLM's own callback manager
(``_reset_all_callbacks``, ``drop_callbacks``), logged as a WARNING; and a replacement list that
holds another ``HiveLimiter`` (the program manages its own). ``enable()`` registers it again.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import RateLimitingConfig
    from .plugin import HiveLimiter

__all__ = ["autoload_register", "disable", "enable", "enabled_limiter"]

logger = logging.getLogger("hive_ratelimit_plugin")

_lock = threading.RLock()
_limiter: HiveLimiter | None = None
_WATCH_FLAG = "__hive_ratelimit_watch__"
# Code in these modules that assigns ``litellm.callbacks`` is removing callbacks on purpose.
_DELIBERATE = ("litellm.litellm_core_utils.logging_callback_manager", "hive_ratelimit_plugin")


#: The configuration (``model_dump()``) the active limiter was enabled with.
_enabled_with: dict[str, Any] | None = None


def enable(config: str | Mapping[str, Any] | RateLimitingConfig | None = None) -> HiveLimiter:
    """Register one :class:`~hive_ratelimit_plugin.HiveLimiter` for this process and return it.

    Idempotent: while a limiter from ``enable()`` (or the autoload) is active, calling it again
    with the same effective configuration it was enabled with returns that same instance
    (re-appending it to ``litellm.callbacks`` if it was removed), with any ``set_budget()`` or
    ``reload()`` made to it since kept. A *different* configuration replaces it: a new
    limiter is registered and the old one unregistered (usage counted in memory starts afresh;
    budgets with a ``state_path`` carry over through the state file). To change limits while
    keeping the counted usage, call ``enable().reload(new_config)`` instead.

    Args:
        config: as for ``HiveLimiter``: a YAML path, a dict, a ``RateLimitingConfig``, or
            ``None`` for ``HIVE_RATELIMIT_CONFIG`` and the ``HIVE_RATELIMIT_*`` overrides.

    Raises:
        ConfigError: the configuration is invalid (any active limiter stays as it was).
    """
    global _limiter, _enabled_with
    import litellm

    from .plugin import HiveLimiter, _pinned, _read_config

    with _lock:
        cfg = _read_config(config)
        current = _limiter
        # Compared with the configuration it was enabled with as well as its current one:
        # set_budget() and reload() change that, and enable() is also how code fetches it.
        wanted = cfg.model_dump()
        if current is not None and wanted in (_enabled_with, current.config.model_dump()):
            if not any(cb is current for cb in litellm.callbacks):
                litellm.callbacks.append(current)
            _watch(litellm)
            return current
        limiter = HiveLimiter(cfg)
        limiter._source = _pinned(config)  # (reload() reads the file, or the environment, again)
        if current is not None:
            _limiter = None
            _unregister(current)
            logger.info("hive-ratelimit: enable() with a new configuration replaced the active limiter")
        _limiter = limiter
        _enabled_with = wanted
        litellm.callbacks.append(limiter)
        _watch(litellm)
        return limiter


def disable() -> None:
    """Unregister the limiter from :func:`enable` (or the autoload) and stop keeping it registered.

    Also cancels a pending autoload (``HIVE_RATELIMIT_ENABLED`` set, LiteLLM not imported yet).
    A ``HiveLimiter`` the program registered by hand is not touched. Idempotent.
    """
    global _limiter
    from . import _autoload

    with _lock:
        _autoload.uninstall()
        limiter, _limiter = _limiter, None
        module = sys.modules.get("litellm")
        if module is not None:
            _unwatch(module)
        if limiter is not None:
            _unregister(limiter)


def enabled_limiter() -> HiveLimiter | None:
    """The limiter :func:`enable` (or the autoload) registered, if one is active."""
    return _limiter


def autoload_register() -> None:
    """Called by the autoload once ``litellm`` is imported. Fails closed on a bad configuration.

    Raises:
        ConfigError: the configuration is invalid. ``import litellm`` then fails with it: the
            program asked for limits (``HIVE_RATELIMIT_ENABLED``), so it must not run unlimited.
    """
    from ._autoload import ENV_VAR

    try:
        limiter = enable()
    except ConfigError as exc:
        logger.error("hive-ratelimit: %s is set but the configuration is invalid, so LiteLLM calls would run "
                     "unlimited; refusing to start. %s", ENV_VAR, exc)
        raise ConfigError(
            f"hive-ratelimit could not start ({ENV_VAR} is set): {exc}\n"
            "Fix the configuration (check it with `hive-ratelimit check-config FILE`) or unset "
            f"{ENV_VAR} to run without limits.",
            errors=exc.errors,
        ) from None
    except Exception:
        logger.exception("hive-ratelimit: %s is set but the limiter could not be created", ENV_VAR)
        raise
    logger.info("hive-ratelimit: enabled by %s (%r)", ENV_VAR, limiter)


# ----------------------------------------------------------------- re-attach
def _unregister(limiter: HiveLimiter) -> None:
    from .plugin import unregister

    unregister(limiter)


def _get_callbacks(module: ModuleType) -> Any:
    try:
        return module.__dict__["callbacks"]
    except KeyError:
        raise AttributeError("callbacks") from None


def _set_callbacks(module: ModuleType, value: Any) -> None:
    previous = module.__dict__.get("callbacks")
    module.__dict__["callbacks"] = value
    limiter = _limiter
    if limiter is not None and not isinstance(value, list):
        # (a tuple, say: nothing can be appended to it. Said, and forgotten, rather than reported
        # as enabled while no call is limited; found by helper-61)
        held = isinstance(previous, list) and any(cb is limiter for cb in previous)
        if held and not (isinstance(value, tuple) and any(cb is limiter for cb in value)):
            logger.warning("hive-ratelimit: litellm.callbacks was replaced by a %s without the rate limiter, which "
                           "cannot be re-attached to it; LiteLLM calls in this process are no longer limited. "
                           "Assign a list, or call hive_ratelimit_plugin.enable() again.", type(value).__name__)
            _forget(limiter)
        return
    if limiter is None or any(cb is limiter for cb in value):
        return
    if not isinstance(previous, list) or not any(cb is limiter for cb in previous):
        return  # it had been taken out already (in place, unregister()): that removal was deliberate
    caller = str(sys._getframe(1).f_globals.get("__name__", ""))
    if caller.startswith(_DELIBERATE):
        logger.warning("hive-ratelimit: the limiter was removed from litellm.callbacks (by %s); LiteLLM calls "
                       "in this process are no longer limited. Call hive_ratelimit_plugin.enable() to "
                       "register it again.", caller)
        _forget(limiter)
        return
    from .plugin import HiveLimiter

    if any(isinstance(cb, HiveLimiter) for cb in value):
        logger.warning("hive-ratelimit: litellm.callbacks was replaced by a list with its own HiveLimiter; the "
                       "enabled limiter is not re-attached (call hive_ratelimit_plugin.disable() to silence this)")
        _forget(limiter)
        return
    value.append(limiter)
    logger.warning("hive-ratelimit: litellm.callbacks was replaced (by %s) without the rate limiter; re-attached "
                   "it. Append to litellm.callbacks instead of replacing it, or call "
                   "hive_ratelimit_plugin.disable() to remove the limiter on purpose.", caller or "unknown code")


def _del_callbacks(module: ModuleType) -> None:
    try:
        del module.__dict__["callbacks"]
    except KeyError:
        raise AttributeError("callbacks") from None


def _forget(limiter: HiveLimiter) -> None:
    """Stop keeping ``limiter`` registered (it was removed on purpose)."""
    global _limiter
    with _lock:
        if _limiter is limiter:
            _limiter = None
            module = sys.modules.get("litellm")
            if module is not None:
                _unwatch(module)


def _watch(module: ModuleType) -> None:
    cls = type(module)
    if getattr(cls, _WATCH_FLAG, False):
        return
    if "callbacks" not in module.__dict__:
        logger.warning("hive-ratelimit: litellm has no callbacks list; cannot watch it for replacement")
        return
    watched = type(cls.__name__, (cls,), {
        "__module__": cls.__module__,
        "__doc__": cls.__doc__,
        "callbacks": property(_get_callbacks, _set_callbacks, _del_callbacks,
                              doc="LiteLLM's callbacks; a replacement list keeps the enabled HiveLimiter"),
        _WATCH_FLAG: True,
    })
    try:
        module.__class__ = watched
    except TypeError as exc:
        logger.warning("hive-ratelimit: cannot watch litellm.callbacks for replacement (%s); if the program "
                       "replaces the list, the limiter is dropped", exc)


def _unwatch(module: ModuleType) -> None:
    cls = type(module)
    if getattr(cls, _WATCH_FLAG, False):
        try:
            module.__class__ = cls.__mro__[1]
        except TypeError:
            pass
