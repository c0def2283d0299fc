"""A sync call that is not streamed is settled by the guard, on the caller's thread, before
``litellm.completion`` returns. LiteLLM also hands its success handler to a thread of its own
before returning; when that thread got to the call first, the call returned while its settlement
was still being made there (a Redis write, an outage being noticed), and the provider's limits
in the answer's headers were noted twice."""
from __future__ import annotations

import threading
from typing import Any

import litellm

from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs, make_limiter


def test_a_sync_answer_is_settled_on_the_callers_thread_even_when_litellms_handler_runs_first(
        provider: FakeProvider, clock: FakeClock) -> None:
    limiter: Any = make_limiter(clock, {"global": {"requests_per_minute": 100}})
    handler_ran = threading.Event()
    releases: list[str] = []
    real_logged, real_finish, real_release = limiter._settle_logged, limiter._finish, limiter._engine.release

    def settle_logged(kwargs: Any, result: Any) -> None:
        real_logged(kwargs, result)
        handler_ran.set()

    def finish(call_id: Any, response: Any = None, **kw: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            handler_ran.wait(5)  # (LiteLLM's success handler gets there first)
        real_finish(call_id, response, **kw)

    def release(call_id: str, **kw: Any) -> Any:
        releases.append(threading.current_thread().name)
        return real_release(call_id, **kw)

    limiter._settle_logged, limiter._finish, limiter._engine.release = settle_logged, finish, release
    litellm.completion(**chat_kwargs(provider))
    assert handler_ran.is_set(), "LiteLLM's success handler never ran: the test shows nothing"
    assert releases == [threading.main_thread().name], f"settled on {releases}"
    assert limiter.get_usage_stats()["levels"]["global"]["global"]["in_flight"] == 0
