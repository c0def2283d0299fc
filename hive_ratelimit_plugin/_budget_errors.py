"""Budget errors. They subclass ``litellm.BudgetExceededError`` so that LiteLLM's Router and SDK
retries do not retry them, and their messages never read like a rate limit (Hive retries
anything that mentions one for up to 10 minutes; a budget stop must stop)."""

from __future__ import annotations

import re

from litellm.exceptions import BudgetExceededError as _LiteLLMBudgetExceededError

from .errors import HiveRateLimitError

__all__ = ["BudgetExceededError", "RunawayDetectedError"]

FORBIDDEN_PHRASES = ("rate limit", "ratelimit", "rate_limit", "429", "529", "capacity", "too many requests",
                     "overloaded", "service unavailable")
_NUMBER = re.compile(r"\d[\d.,]*")


def budget_status_code() -> int:
    """The HTTP status of a budget stop: LiteLLM's ``budget_exceeded_status_code`` (422 on recent
    LiteLLM), else 400. Never one that clients and LiteLLM's Router retry (408, 409, 429, 5xx)."""
    import litellm

    status = getattr(litellm, "budget_exceeded_status_code", 400)
    return status if isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 429) else 400


class BudgetExceededError(HiveRateLimitError, _LiteLLMBudgetExceededError):
    """A money budget, per-run cap or runaway breaker stopped the call; no request was sent.

    Attributes:
        scope: the level that stopped it (``"agent:my_production_agent"``).
        limit: the budget (``"max_cost_per_day"``, ``"max_requests_per_run"``, ...).
        spent: what the window has spent (currency units, or requests for request caps).
        budget: the budget's value.
        window: ``"hour"``, ``"day"``, ``"month"`` or ``"run"``.
        retry_after: seconds until the window rolls over, if it does.

    Code of one's own may raise it with a message alone (``raise BudgetExceededError("Daily
    spending limit reached")``, as a hand-written breaker does); the fields are then ``None``.
    That is also how ``pickle`` rebuilds one (a worker process's error sent back to its pool).
    """

    def __init__(
        self,
        message: str,
        *,
        scope: str | None = None,
        limit: str | None = None,
        spent: float | None = None,
        budget: float | None = None,
        window: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        # A guard on our own wording (see the module docstring): an amount such as 0.0529 must
        # not read like a status code; the exact figures are on the exception's attributes.
        message = _NUMBER.sub(
            lambda m: "(see exc.spent / exc.budget)" if ("429" in m.group() or "529" in m.group()) else m.group(),
            message,
        )
        for phrase in FORBIDDEN_PHRASES:
            if phrase in message.lower():
                message = re.sub(re.escape(phrase), "budget", message, flags=re.IGNORECASE)
        # (LiteLLM's own fields are numbers: 0.0 where the figures are not known)
        _LiteLLMBudgetExceededError.__init__(self, spent if spent is not None else 0.0,
                                             budget if budget is not None else 0.0, message)
        # LiteLLM's Router retries (and cools down the deployment for) an error whose status reads
        # as retryable, and one with none on LiteLLM 1.83 (whose BudgetExceededError sets none).
        self.status_code = budget_status_code()
        self.scope = scope
        self.limit = limit
        self.remaining = max(budget - spent, 0.0) if budget is not None and spent is not None else None
        self.retry_after = retry_after
        self.spent = spent
        self.budget = budget
        self.window = window


class RunawayDetectedError(BudgetExceededError):
    """An agent repeated the same request too often in a short time: its breaker tripped."""
