"""The exception hierarchy. Every error the plugin raises derives from :class:`HiveRateLimitError`.

Errors carry structured fields (``scope``, ``limit``, ``remaining``, ``retry_after``) so that
callers can react without parsing messages. No error message ever contains an API key.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "BudgetExceededError",
    "CircuitOpenError",
    "ConfigError",
    "HiveRateLimitError",
    "RateLimitQueueTimeout",
    "RequestTooLargeError",
    "RunawayDetectedError",
]


class HiveRateLimitError(Exception):
    """Root of every error raised by hive-ratelimit.

    Attributes:
        scope: the scope key that blocked the call (``"model:openai/gpt-4"``), if any.
        limit: the name of the limit that blocked (``"requests_per_minute"``), if any.
        remaining: what was left of that limit when the call was blocked, if known.
        retry_after: seconds after which a retry may succeed, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        scope: str | None = None,
        limit: str | None = None,
        remaining: float | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.scope = scope
        self.limit = limit
        self.remaining = remaining
        self.retry_after = retry_after


class ConfigError(HiveRateLimitError, ValueError):
    """The configuration (YAML file, dict or environment) is invalid.

    The message names every bad key path, the value found and what is allowed.
    """

    def __init__(self, message: str, *, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


class _NotRetriedInItsGroup:
    """An error a ``litellm.Router`` does not retry in the same model group; it still falls back
    to another group (``fallbacks``), whose call is admitted anew.

    Both Routers (LiteLLM 1.83.4 and 1.110.2) read an error's ``num_retries`` as how often to
    retry it in the group. Retrying a call that has just waited ``max_wait_seconds`` would make it
    wait as long again on each of the Router's ``num_retries`` (3x the wait by default), and one
    refused by an open circuit would be refused again after the Router's backoff. It reads 0
    always, and writes to it are ignored: LiteLLM writes over it (1.83.4 the call's
    ``num_retries``, ``None`` for most, on its way out of ``acompletion``, before its Router reads
    it; 1.110.2 the retries it made).

    No ``status_code`` is set (the Router would cool the deployment down for a 429; this is the
    limiter's own wait, not the provider's answer).
    """

    __slots__ = ()

    @property
    def num_retries(self) -> int:
        return 0

    @num_retries.setter
    def num_retries(self, value: object) -> None:
        pass


class RateLimitQueueTimeout(_NotRetriedInItsGroup, HiveRateLimitError):
    """A call waited ``max_wait_seconds`` (or found the queue full) and no request was sent.

    This is transient: retrying after ``retry_after`` seconds may succeed. A ``litellm.Router``
    does not retry it in the same model group (``num_retries`` reads 0): its caller hears back
    after one wait, or the Router falls back to another group.
    """


class RequestTooLargeError(HiveRateLimitError):
    """A single call needs more than a limit allows in a whole window, so it can never be admitted.

    Example: 50,000 estimated tokens against ``tokens_per_minute: 40000``. Lower ``max_tokens``,
    shorten the prompt, or raise the limit. No request was sent.
    """

    # What the proxy answers with. LiteLLM's Router retries an error without a status code (with
    # backoff, each attempt refused again): one that can never fit is not retried.
    status_code = 400


class BackendUnavailableError(_NotRetriedInItsGroup, HiveRateLimitError):
    """The shared backend (Redis) does not answer and ``on_backend_error: closed`` refuses calls
    rather than let them through uncounted. No request was sent; retry after ``retry_after``.

    A ``litellm.Router`` does not retry it in the same model group (``num_retries`` reads 0): the
    backend is tried again only every ``redis.retry_interval``, so each Router retry would be
    refused again after the Router's backoff. It still falls back to another group."""


def __getattr__(name: str) -> type[HiveRateLimitError]:
    # BudgetExceededError subclasses litellm.BudgetExceededError, so defining it imports
    # litellm (seconds). Load it only when asked for.
    if name in ("BudgetExceededError", "RunawayDetectedError"):
        from . import _budget_errors

        return getattr(_budget_errors, name)  # type: ignore[no-any-return]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class CircuitOpenError(_NotRetriedInItsGroup, HiveRateLimitError):
    """The circuit breaker of a provider/model is open after repeated failures; no request was sent.

    Transient: it lets a probe through after ``retry_after`` seconds. A ``litellm.Router`` does
    not retry it in the same model group (``num_retries`` reads 0) but may fall back to another.
    """
