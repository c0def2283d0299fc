"""A review of the nesting marks (``_Admitted``, ``_Held``) and of the first budget's merge of the
state file's spend: what they must still count once. Real LiteLLM calls against the fake provider."""
from __future__ import annotations

import threading
from typing import Any

import litellm
import pytest

from hive_ratelimit_plugin import HiveLimiter, _ledger
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider, Scripted

from .helpers import chat_kwargs, global_usage, make_limiter, wait_until
from .test_sdk_fallbacks import BIG, SMALL, requests

UNIT_PRICE = {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}


def test_a_call_settled_while_the_first_budget_opens_the_state_file_is_counted_once(
        provider: FakeProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_apply_config`` makes the new ledger the limiter's (so settlements write to it) before it
    reads the file's totals, which ``load_spend`` now *adds* to the book. A call another thread
    settles in between is in the book (counted in memory) and in the file (its row, just written),
    and the merge counts it twice: 8 + 8 + 8 = 24 instead of 16. (With the old ``set`` the file's
    total replaced the book: counted once.) The window is made deterministic here by settling the
    other thread's call at the moment the totals are read."""
    late = HiveLimiter({"pricing": UNIT_PRICE}, clock=clock)  # no budget, no state file
    litellm.callbacks.append(late)
    assert late._ledger is None
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert late.get_usage_stats()["cost_today"] == 8

    real_load = _ledger.Ledger.load
    done: list[Any] = []

    def load_while_a_call_settles(self: Any, starts: Any) -> Any:
        if not done:  # another thread's call settles now (its spend goes to the book and, if the
            # limiter has its ledger already, to the file)
            t = threading.Thread(target=lambda: done.append(litellm.completion(**chat_kwargs(provider, max_tokens=5))))
            t.start()
            t.join(30)
            assert done
        return real_load(self, starts)

    monkeypatch.setattr(_ledger.Ledger, "load", load_while_a_call_settles)
    late.set_budget(max_daily_spend=1000)
    stats = late.get_usage_stats()
    assert provider.state.count() == 2
    assert (stats["cost_today"], stats["requests_today"]) == (16, 2), stats


# ------------------------------------------------------------------ nesting still recognised
async def test_sync_fallbacks_called_on_a_thread_running_a_loop_count_each_try_once(
        provider: FakeProvider, clock: FakeClock) -> None:
    """Sync ``completion(fallbacks=...)`` from a thread with a running loop: the guard runs it on a
    thread of its own with a copy of the context (LiteLLM would start one without it); the tries
    are nested (the ``_Admitted`` mark is open), each admitted once on its model."""
    limiter = make_limiter(clock, {"state_path": ":memory:", "global": {"requests_per_minute": 100},
                                   "providers": {"openai": {SMALL: {"requests_per_minute": 5},
                                                            BIG: {"requests_per_minute": 5}}}})
    provider.state.push_for(SMALL, Scripted(status=500))
    resp = litellm.completion(**chat_kwargs(provider, model=f"openai/{SMALL}", max_tokens=5,
                                            fallbacks=[f"openai/{BIG}"]))
    assert resp.choices[0].message.content
    await wait_until(lambda: not limiter._engine._leases and global_usage(limiter)["in_flight"] == 0)
    assert [(r.model, r.status) for r in provider.state.log] == [(SMALL, 500), (BIG, 200)]
    assert requests(limiter) == {"global": 2, SMALL: 1, BIG: 1}


def test_sync_text_completion_is_one_request(provider: FakeProvider, clock: FakeClock) -> None:
    """``text_completion`` -> ``completion`` on the same thread: nested, counted once."""
    limiter = make_limiter(clock, {"state_path": ":memory:", "global": {"requests_per_minute": 100}})
    kw = chat_kwargs(provider, max_tokens=5)
    kw.pop("messages")
    litellm.text_completion(prompt="hello there", **kw)
    assert global_usage(limiter)["requests_per_minute"]["used"] == len(provider.state.log) == 1
