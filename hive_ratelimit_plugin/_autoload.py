"""Zero-code enablement: register a ``HiveLimiter`` in any program that imports LiteLLM.

``hive_ratelimit_autoload.pth`` (installed at the root of site-packages) imports this module at interpreter
start when ``HIVE_RATELIMIT_ENABLED`` is truthy; ``hive-ratelimit run`` imports it from a
``sitecustomize`` instead. Importing it:

* does nothing unless ``HIVE_RATELIMIT_ENABLED`` is ``1``, ``true``, ``yes`` or ``on``;
* never imports LiteLLM (seconds) or anything heavy: it only puts a finder on ``sys.meta_path``;
* when ``litellm`` has finished importing (whenever the program imports it), calls
  :func:`hive_ratelimit_plugin.enable`, which appends one ``HiveLimiter`` to
  ``litellm.callbacks``. If LiteLLM is already imported, it registers at once.

An invalid configuration makes ``import litellm`` raise
:class:`~hive_ratelimit_plugin.errors.ConfigError` (and logs an ERROR): LLM calls never run
unlimited while the user asked for limits. The finder stays in place until registration
succeeds, so a second ``import litellm`` fails the same way.

Only the standard library's ``os`` and ``sys`` are imported here (no ``__future__``, no
``typing``): this module runs at interpreter start.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

ENV_VAR = "HIVE_RATELIMIT_ENABLED"
#: Values of ``HIVE_RATELIMIT_ENABLED`` (after strip + lower) that turn the autoload on.
#: ``hive_ratelimit_autoload.pth`` repeats this set inline so that a disabled interpreter never imports
#: this package; tests/test_zero_code.py checks that the two agree.
TRUTHY = frozenset({"1", "true", "yes", "on"})

__all__ = ["ENV_VAR", "TRUTHY", "LiteLLMImportHook", "install", "installed", "is_enabled", "uninstall"]


def is_enabled(environ: "Mapping[str, str] | None" = None) -> bool:
    """True when ``HIVE_RATELIMIT_ENABLED`` (in ``environ``, default ``os.environ``) is truthy."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return value.strip().lower() in TRUTHY


class LiteLLMImportHook:
    """A ``sys.meta_path`` finder that calls ``on_import(module)`` once ``litellm`` is imported.

    It does not load anything itself: for ``litellm`` it asks the finders behind it for the
    spec, then wraps that spec's loader's ``exec_module`` (on the loader instance, removed again
    as soon as it runs) so that the callback runs right after LiteLLM's ``__init__`` finished,
    before ``import litellm`` returns to the program. Every other name costs one string compare.
    """

    def __init__(self, on_import: "Callable[[ModuleType], None]") -> None:
        self._on_import = on_import
        self._busy = False

    def __repr__(self) -> str:
        return "<hive_ratelimit_plugin autoload: registers a HiveLimiter when litellm is imported>"

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> "ModuleSpec | None":
        if fullname != "litellm" or self._busy:
            return None
        self._busy = True  # the import lock for "litellm" is held: no other thread is here
        spec: ModuleSpec | None = None  # local annotations are never evaluated
        try:
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        if spec is None:
            return None
        loader: Any = spec.loader
        original = getattr(loader, "exec_module", None)
        if original is None or isinstance(loader, type):
            _log_warning("cannot hook the import of litellm (loader %r); call hive_ratelimit_plugin.enable() "
                         "after importing litellm instead", loader)
            return spec
        on_import = self._on_import

        def exec_module(module: "ModuleType") -> None:
            try:
                del loader.exec_module  # the loader is itself again
            except AttributeError:
                pass
            original(module)
            on_import(module)

        try:
            loader.exec_module = exec_module
        except (AttributeError, TypeError):
            _log_warning("cannot hook the import of litellm (loader %r); call hive_ratelimit_plugin.enable() "
                         "after importing litellm instead", loader)
        return spec


_hook: "LiteLLMImportHook | None" = None


def _log_warning(msg: str, *args: object) -> None:
    import logging

    logging.getLogger("hive_ratelimit_plugin").warning(msg, *args)


def _litellm_imported(module: "ModuleType") -> None:
    from ._enable import autoload_register

    autoload_register()  # raises (and the import of litellm fails) on a bad configuration
    uninstall()


def installed() -> bool:
    """True while the autoload waits for ``litellm`` to be imported."""
    return _hook is not None and _hook in sys.meta_path


def install() -> None:
    """Register a ``HiveLimiter`` when ``litellm`` is imported, or now if it already is.

    Idempotent. Called at import of this module when ``HIVE_RATELIMIT_ENABLED`` is truthy.
    """
    global _hook
    module = sys.modules.get("litellm")
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        _litellm_imported(module)
        return
    if installed():
        return
    _hook = LiteLLMImportHook(_litellm_imported)
    sys.meta_path.insert(0, _hook)


def uninstall() -> None:
    """Stop waiting for ``litellm`` (a limiter already registered stays; see ``disable()``)."""
    global _hook
    hook, _hook = _hook, None
    if hook is not None:
        try:
            sys.meta_path.remove(hook)
        except ValueError:
            pass


if is_enabled():
    install()
