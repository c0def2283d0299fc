"""Attribute LiteLLM calls to Hive agents and runs from Hive's own context, with no change to Hive.

`Hive <https://github.com/aden-hive/hive>`_ keeps the identity of the agent that is running in
contextvars, which follow ``await`` and tasks into its LiteLLM calls:

* the tool execution context (``framework.loader.tool_registry._execution_context``, read through
  ``framework.tasks.tools._context.current_context()`` when that module is loaded):
  ``agent_id`` (``"queen"`` or the worker's name), ``session_id``, ``usage_agent_id``,
  ``colony_id``;
* the trace context (``framework.observability.logging.get_trace_context()``): ``run_id``,
  ``execution_id``, ``trace_id``, ``agent_id`` (the graph id), ...

:func:`hive_identity` reads them at call time and returns ``agent_id`` and ``run_id``:

* ``agent_id``: the execution context's ``agent_id``, else the trace context's ``agent_id``,
  else ``usage_agent_id``;
* ``run_id``: the trace context's ``run_id``, else its ``execution_id``, else the execution
  context's ``session_id``.

:func:`hive_ratelimit_plugin._scopes.resolve_identity` uses it as the last fallback: request
``metadata`` wins, then ``HiveLimiter.scope()``, then Hive.

This module imports nothing from Hive, ever. Hive is a running agent's framework: if its modules
are not in ``sys.modules`` no Hive agent is running in this process, so there is nothing to read.
The check when Hive is absent is one dictionary lookup (``"framework" in sys.modules``); the
context objects are looked up once and cached after Hive has been loaded.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["hive_identity", "hive_loaded"]

logger = logging.getLogger("hive_ratelimit_plugin")

_EXEC_MODULES = ("framework.tasks.tools._context", "framework.loader.tool_registry")
_TRACE_MODULE = "framework.observability.logging"

# Readers of Hive's two contexts, found once Hive is loaded (None: not found yet).
_exec_reader: Callable[[], Any] | None = None
_trace_reader: Callable[[], Any] | None = None
_warned = False


def hive_loaded() -> bool:
    """True when Hive's ``framework`` package is loaded in this process."""
    return "framework" in sys.modules


def _find_exec_reader() -> Callable[[], Any] | None:
    module = sys.modules.get(_EXEC_MODULES[0])
    fn = getattr(module, "current_context", None)
    if callable(fn):
        return fn  # type: ignore[no-any-return]
    module = sys.modules.get(_EXEC_MODULES[1])
    var = getattr(module, "_execution_context", None)
    get = getattr(var, "get", None)
    return get if callable(get) else None


def _find_trace_reader() -> Callable[[], Any] | None:
    module = sys.modules.get(_TRACE_MODULE)
    fn = getattr(module, "get_trace_context", None)
    return fn if callable(fn) else None


def _first(*values: Any) -> Any:
    for v in values:
        if v is not None and v != "":
            return v
    return None


def hive_identity() -> dict[str, Any] | None:
    """The running Hive agent's ``agent_id`` and ``run_id``, or ``None`` outside Hive.

    Never raises: attribution must not break a call (a failure is logged once at DEBUG).
    """
    global _exec_reader, _trace_reader, _warned
    if "framework" not in sys.modules:
        return None
    try:
        # A reader is cached once found; until then (Hive still importing) look again.
        exec_reader = _exec_reader or _find_exec_reader()
        trace_reader = _trace_reader or _find_trace_reader()
        _exec_reader, _trace_reader = exec_reader, trace_reader
        ex = exec_reader() if exec_reader is not None else None
        tr = trace_reader() if trace_reader is not None else None
        ex = ex if isinstance(ex, Mapping) else {}
        tr = tr if isinstance(tr, Mapping) else {}
        if not ex and not tr:
            return None
        agent_id = _first(ex.get("agent_id"), tr.get("agent_id"), ex.get("usage_agent_id"))
        run_id = _first(tr.get("run_id"), tr.get("execution_id"), ex.get("session_id"))
    except Exception:
        if not _warned:
            _warned = True
            logger.debug("hive-ratelimit: could not read Hive's context; calls are not attributed to Hive agents",
                         exc_info=True)
        return None
    if agent_id is None and run_id is None:
        return None
    return {"agent_id": agent_id, "run_id": run_id}


def _reset_cache() -> None:
    """Forget the cached readers (tests load and unload stand-in Hive packages)."""
    global _exec_reader, _trace_reader, _warned
    _exec_reader = _trace_reader = None
    _warned = False
