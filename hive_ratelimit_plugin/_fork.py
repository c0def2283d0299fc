"""What a forked child process must not inherit from its parent.

``fork()`` copies one thread, the caller. A lock that another thread of the parent held at that
moment stays held in the child, with nobody left to release it: the child's first call through
the limiter would hang. Calls in flight and callers waiting in the parent's queue are the
parent's; in the child they would hold concurrency slots and queue places until their leases
ran out. And a SQLite connection must not be used on both sides of a fork.

So every object that holds such state registers here and gets
``_after_fork_in_child()`` called in the child (multiprocessing's ``fork`` start method, the
default on Linux before Python 3.14; Celery's and gunicorn's forking workers).
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

logger = logging.getLogger("hive_ratelimit_plugin")

_TRACKED: weakref.WeakSet[Any] = weakref.WeakSet()


def track(obj: Any) -> None:
    """Call ``obj._after_fork_in_child()`` in a forked child (``obj`` held weakly)."""
    _TRACKED.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_TRACKED):
        try:
            obj._after_fork_in_child()
        except Exception as exc:  # never let this break the child
            logger.warning("hive-ratelimit: resetting %s after fork failed: %s", type(obj).__name__, exc)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
