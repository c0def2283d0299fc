"""Review of the nesting rule (ee98a46): a call LiteLLM makes to its own entry points from inside a
guarded sync call without the call's ``litellm_logging_obj``, against the fake provider.

LiteLLM's semantic caches (``qdrant-semantic``, ``redis-semantic``) embed the prompt with
``litellm.embedding(model=..., input=..., cache=...)`` from inside ``completion``'s own wrapper, on
the call's thread, before the send (``get_cache``) and after the answer (``set_cache``): no logging
object (1.83.4 ``caching/qdrant_semantic_cache.py``; 1.110.2 ``_get_embedding``). The guard took
each for a call of its own and admitted it while the outer call held its slot: under
``concurrent_requests: 1`` the embedding waited for the slot its own call holds, a self-deadlock
(the queue's whole ``max_wait_seconds``, then ``RateLimitQueueTimeout`` out of the user's
``completion``, nothing sent). Before ee98a46 it was passed through, as LiteLLM calling itself."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import litellm
import pytest
from litellm.caching.caching import Cache

from hive_ratelimit_plugin import HiveLimiter, RateLimitQueueTimeout
from hive_ratelimit_plugin.testing import FakeClock, FakeProvider

from .helpers import chat_kwargs, global_usage, make_limiter
from .test_calls_from_callbacks import Judge


class _Qdrant(BaseHTTPRequestHandler):
    """Just enough of Qdrant's REST API for LiteLLM's ``qdrant-semantic`` cache: the collection
    exists, a search finds nothing (a miss), an upsert succeeds."""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.endswith("/exists"):
            body: dict[str, Any] = {"result": {"exists": True}}
        elif self.path.endswith("/search"):
            body = {"result": []}
        else:
            body = {"result": {}}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def semantic_cache(provider: FakeProvider, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``litellm.cache``: a Qdrant semantic cache (on a stub Qdrant) embedding with the fake provider."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Qdrant)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_BASE", provider.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET-0123456789")
    litellm.cache = Cache(type="qdrant-semantic", qdrant_api_base=f"http://127.0.0.1:{server.server_address[1]}",
                          qdrant_collection_name="review", similarity_threshold=0.8,
                          qdrant_semantic_cache_embedding_model="openai/text-embedding-3-small")
    try:
        yield
    finally:
        litellm.cache = None
        server.shutdown()
        server.server_close()


@pytest.mark.usefixtures("semantic_cache")
def test_a_semantic_cache_lookup_does_not_wait_for_its_own_calls_slot(provider: FakeProvider) -> None:
    """One call at a time, a real clock, 2 s of queue: the call's own cache lookup must not queue
    behind it. Was: ``RateLimitQueueTimeout`` after 2 s, out of ``completion``; nothing sent."""
    litellm.completion(**chat_kwargs(provider, max_tokens=5))  # (LiteLLM's first-call imports, unlimited)
    provider.state.reset()
    limiter = HiveLimiter({"state_path": ":memory:", "global": {"requests_per_minute": 100, "concurrent_requests": 1},
                           "queue": {"max_wait_seconds": 2}})
    litellm.callbacks.append(limiter)
    started = time.monotonic()
    try:
        litellm.completion(**chat_kwargs(provider, max_tokens=5, messages=[{"role": "user", "content": "other"}]))
    except RateLimitQueueTimeout as exc:  # (LiteLLM logs and drops its cache's errors: not seen so far)
        raise AssertionError(f"the call waited for its own slot: {exc!r}") from exc
    elapsed = time.monotonic() - started
    # Was: each embedding queued its 2 s behind the call's own slot, was refused, and the cache
    # logged "queue wait limit reached ... no request was sent": only the chat request went out.
    assert [r.path for r in provider.state.log] == ["/v1/embeddings", "/v1/chat/completions", "/v1/embeddings"]
    assert elapsed < 1.5, elapsed
    assert global_usage(limiter)["in_flight"] == 0


def test_a_judge_in_log_pre_api_call_is_still_a_call_of_its_own(provider: FakeProvider, clock: FakeClock) -> None:
    """(What ee98a46 fixed, kept by the fix above: the judge's call is counted.)"""
    limiter = make_limiter(clock, {"state_path": ":memory:", "global": {"requests_per_minute": 10},
                                   "queue": {"max_wait_seconds": 0}})
    judge = Judge(provider, "log_pre_api_call")
    litellm.callbacks.append(judge)
    litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert len(judge.results) == 1
    assert len(provider.state.log) == 2
    assert global_usage(limiter)["requests_per_minute"]["used"] == 2
