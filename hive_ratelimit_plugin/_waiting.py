"""Turning the engine's decisions into waiting: one driver for threads, one for asyncio.

Both follow the same loop: ask the engine; if queued, sleep until granted, until the engine's
earliest retry time (then ask it to dispatch), or until the deadline (then give up with
:class:`~hive_ratelimit_plugin.errors.RateLimitQueueTimeout`). Sync callers block only their own
thread; async callers await without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from ._engine import NEVER, Engine, QueueFull, Ticket, Waiter
from .errors import RateLimitQueueTimeout

logger = logging.getLogger("hive_ratelimit_plugin")


def _queue_full(engine: Engine) -> RateLimitQueueTimeout:
    """Refused at the door: ``queue.max_size`` calls are already waiting."""
    return RateLimitQueueTimeout(f"call held by max_size of queue: queue is full ({engine.queue_length} waiting, "
                                 f"max_size {engine.max_queue}) "
                                 "after waiting 0.0s; no request was sent", scope="queue", limit="max_size",
                                 remaining=0.0, retry_after=None)


def _timeout_error(engine: Engine, waiter: Waiter, waited: float, reason: str) -> RateLimitQueueTimeout:
    blocked = waiter.blocked
    now = engine.clock()
    retry_after = None
    at = None if blocked is None else blocked.frees_at if blocked.frees_at is not None else blocked.retry_at
    if at is not None and at != NEVER:
        retry_after = max(at - now, 0.0)
    scope = blocked.scope if blocked else None
    limit = blocked.limit if blocked else None
    where = f" by {limit} of {scope}" if scope else ""
    hint = f"; retry in {retry_after:.1f}s" if retry_after is not None else ""
    return RateLimitQueueTimeout(
        f"call held{where}: {reason} after waiting {waited:.1f}s; no request was sent{hint}",
        scope=scope,
        limit=limit,
        remaining=blocked.remaining if blocked else None,
        retry_after=retry_after,
    )


_LONGEST_SLEEP = 3600.0  # re-check at least hourly (threading's timeout overflows past ~9.2e9 s)


def _sleep_for(engine: Engine, waiter: Waiter, deadline: float) -> float:
    retry_at = waiter.retry_at
    if retry_at is None:  # waiting for a release: an expiring lease is one too
        retry_at = engine.next_reclaim()
    until = deadline if retry_at is None else min(deadline, retry_at)
    return min(max(until - engine.clock(), 0.0), _LONGEST_SLEEP)


def _settled_after_wake(engine: Engine, waiter: Waiter, start: float, deadline: float) -> bool:
    """The step both drivers take when a waiter wakes: ``True`` if it holds its grant now; raises
    its error, or :class:`RateLimitQueueTimeout` past the deadline; ``False`` to wait again."""
    if waiter.granted:
        return True
    if waiter.error is not None:
        raise waiter.error
    # A last try at the deadline too: a wait that ends just before it (a breaker's probe, a
    # provider's cooldown) may wake a moment after it, and must not then time out for nothing.
    engine.dispatch()
    if waiter.granted:
        return True
    if waiter.error is not None:
        raise waiter.error
    if engine.clock() >= deadline:
        if engine.cancel(waiter):
            return True  # granted at the last moment
        raise _timeout_error(engine, waiter, engine.clock() - start, "queue wait limit reached")
    return False


_local = threading.local()


def _thread_event() -> threading.Event:
    """This thread's wake-up event, cleared (an Event costs a Condition and a Lock to build).

    A thread waits for one admission at a time, so one event per thread suffices; a late
    ``set()`` left over from an earlier wait only causes a spurious wake-up, which the wait
    loop treats as "check again".
    """
    event: threading.Event | None = getattr(_local, "event", None)
    if event is None:
        event = _local.event = threading.Event()
    else:
        event.clear()
    return event


_warned_loop = False
_warned_executor = False


def _warn_if_on_a_loop() -> None:
    """A sync call that must wait on a thread running an event loop (``litellm.completion`` in a
    coroutine: a sync tool of an async agent) blocks that loop while it waits: the loop's own calls
    cannot finish meanwhile, so a concurrency slot they hold cannot come back before the wait runs
    out. Said once per process."""
    global _warned_loop, _warned_executor
    if _warned_loop and _warned_executor:
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        # A thread of an event loop's default executor (asyncio.to_thread, run_in_executor(None)):
        # LiteLLM runs part of every async call in that executor, after the call was admitted. When
        # its threads all wait here, the async calls holding the slots cannot finish either.
        if not _warned_executor and threading.current_thread().name.startswith("asyncio_"):
            _warned_executor = True
            logger.warning("hive-ratelimit: a sync LiteLLM call waits for a limit on a thread of an event loop's "
                           "default executor (asyncio.to_thread): LiteLLM runs part of every async call in that "
                           "executor, so when its threads all wait here, async calls that hold the slots cannot "
                           "finish and the waiting calls time out. Run sync calls in a ThreadPoolExecutor of "
                           "their own, or use litellm.acompletion")
        return
    if _warned_loop or _on_a_private_router_loop():
        return
    _warned_loop = True
    logger.warning("hive-ratelimit: a sync LiteLLM call waits for a limit on a thread that runs an asyncio event "
                   "loop: the loop is blocked while it waits, and its own calls (which may hold the slot this "
                   "one waits for) cannot finish meanwhile. Use litellm.acompletion there, or run the sync call "
                   "in a ThreadPoolExecutor of its own")


def _on_a_private_router_loop() -> bool:
    """Whether this thread's running loop is one LiteLLM made for this call alone: on LiteLLM 1.83
    a sync ``Router.completion`` runs its fallbacks and retries with ``run_async_function``, in a
    new event loop whose only task is ``Router.async_function_with_fallbacks``, and calls the sync
    ``litellm.completion`` from there. Nothing else runs on that loop, so waiting blocks nothing."""
    try:
        task = asyncio.current_task()
        if task is None or len(asyncio.all_tasks()) != 1:
            return False
        return str(getattr(task.get_coro(), "__qualname__", "")).endswith("Router.async_function_with_fallbacks")
    except RuntimeError:
        return False


def acquire_sync(engine: Engine, ticket: Ticket, max_wait: float) -> float:
    """Block the calling thread until ``ticket`` is admitted.

    Returns:
        Seconds spent waiting (0.0 when admitted at once).

    Raises:
        RateLimitQueueTimeout: not admitted within ``max_wait`` seconds, or the queue is full.
        RequestTooLargeError: the call can never fit.
    """
    if engine.admit_now(ticket):
        return 0.0
    event = _thread_event()
    start = engine.clock()
    ticket.deadline = start + max_wait
    try:
        waiter = engine.acquire(ticket, event.set)
    except QueueFull:
        raise _queue_full(engine) from None
    if waiter is None:
        return 0.0
    _warn_if_on_a_loop()
    deadline = start + max_wait
    try:
        while True:
            event.wait(_sleep_for(engine, waiter, deadline))
            event.clear()
            if _settled_after_wake(engine, waiter, start, deadline):
                return engine.clock() - start
    except BaseException:
        if engine.cancel(waiter):  # granted as it was given up: never sent, costs nothing
            engine.release(ticket.call_id, input_tokens=0, output_tokens=0, cost=0.0, outcome="void")
        raise


async def acquire_async(engine: Engine, ticket: Ticket, max_wait: float) -> float:
    """Await until ``ticket`` is admitted, without blocking the event loop.

    Returns:
        Seconds spent waiting.

    Raises:
        RateLimitQueueTimeout: not admitted within ``max_wait`` seconds, or the queue is full.
        RequestTooLargeError: the call can never fit.
        asyncio.CancelledError: the caller was cancelled; nothing stays reserved.
    """
    if engine.admit_now(ticket):
        return 0.0
    return await queue_async(engine, ticket, max_wait)


async def queue_async(engine: Engine, ticket: Ticket, max_wait: float) -> float:
    """:func:`acquire_async` for a ticket that :meth:`Engine.admit_now` has just turned down (the
    hot path calls that first itself, and awaits this only when it must wait)."""
    box: list[asyncio.Future[None]] = []

    def wake() -> None:
        if not box:
            return  # granted before it ever waited
        fut = box[0]
        loop = fut.get_loop()

        def _set() -> None:
            if not fut.done():
                fut.set_result(None)

        try:
            loop.call_soon_threadsafe(_set)
        except RuntimeError:  # loop closed: the caller is gone; the deadline path cleans up
            pass

    start = engine.clock()
    ticket.deadline = start + max_wait
    try:
        waiter = engine.acquire(ticket, wake)
    except QueueFull:
        raise _queue_full(engine) from None
    if waiter is None:
        return 0.0
    loop = asyncio.get_running_loop()
    box.append(loop.create_future())
    deadline = start + max_wait
    try:
        while True:
            fut = box[0]
            if not waiter.granted and waiter.error is None:
                timer = loop.call_later(_sleep_for(engine, waiter, deadline), wake)
                try:
                    await fut
                finally:
                    timer.cancel()
            box[0] = loop.create_future()
            if _settled_after_wake(engine, waiter, start, deadline):
                return engine.clock() - start
    except BaseException:
        if engine.cancel(waiter):  # granted as it was given up: never sent, costs nothing
            engine.release(ticket.call_id, input_tokens=0, output_tokens=0, cost=0.0, outcome="void")
        raise
