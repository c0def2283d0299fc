"""A fake OpenAI/Anthropic-compatible provider on 127.0.0.1 for tests and benchmarks.

It behaves like a real provider where a rate limiter cares: responses carry ``usage``;
it enforces requests and tokens per window, either as an exact sliding log (the default) or as
token buckets that refill continuously (``algorithm="token_bucket"``, how OpenAI describes its
limits), and answers ``429`` with ``retry-after`` and ``x-ratelimit-*`` headers; it adds a
configurable latency; it can be scripted to fail (429 storms, 5xx, slow or dropped responses,
malformed headers).

Run standalone: ``python -m hive_ratelimit_plugin.fake_provider --port 8099 --rpm 60 [--token-bucket]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SLIDING_WINDOW = "sliding_window"
TOKEN_BUCKET = "token_bucket"
ALGORITHMS = (SLIDING_WINDOW, TOKEN_BUCKET)


@dataclass
class Scripted:
    """One scripted response that overrides normal behaviour for the next request."""

    status: int = 429
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    delay: float = 0.0
    drop: bool = False  # close the connection without answering
    cut_after: int | None = None  # a streamed answer: close the connection after this many chunks

    @classmethod
    def context_length_exceeded(cls) -> Scripted:
        """A ``400`` saying the prompt is longer than the model's context window, worded as
        OpenAI words it (LiteLLM raises ``ContextWindowExceededError`` for it)."""
        return cls(status=400, body={"error": {
            "message": "This model's maximum context length is 8192 tokens. However, your messages "
                       "resulted in 9000 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})


@dataclass
class Received:
    """What the provider saw of one request."""

    time: float
    path: str
    model: str
    stream: bool
    authorization: str
    status: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Decision:
    """A provider's answer to one request: admitted or not, and what its headers would say."""

    ok: bool
    retry_after: float  # seconds until the request would fit (0.0 when admitted)
    remaining_requests: int
    remaining_tokens: int
    full_reset: float  # seconds until the limits are back to their full value


class SlidingLog:
    """Exact sliding-window log: a request fits if the requests (tokens) of the last
    ``window`` seconds, plus its own, stay within the limits. Time is passed in."""

    def __init__(self) -> None:
        self.hits: collections.deque[tuple[float, int]] = collections.deque()
        self.used_tokens = 0  # sum of the tokens in ``hits``

    def clear(self) -> None:
        self.hits.clear()
        self.used_tokens = 0

    def admit(self, now: float, tokens: int, requests_limit: float | None, tokens_limit: float | None,
              window: float) -> Decision:
        hits = self.hits
        cutoff = now - window
        while hits and hits[0][0] <= cutoff:
            self.used_tokens -= hits.popleft()[1]
        used_req = len(hits)
        used_tok = self.used_tokens
        over_req = requests_limit is not None and used_req + 1 > requests_limit
        over_tok = tokens_limit is not None and used_tok + tokens > tokens_limit
        rem_req = int(requests_limit or 0) - used_req
        rem_tok = int(tokens_limit or 0) - used_tok
        if over_req or over_tok:
            retry = hits[0][0] + window - now if hits else window
            reset = max(hits[-1][0] + window - now, 0.0) if hits else 0.0
            return Decision(False, max(retry, 0.001), rem_req, rem_tok, reset)
        hits.append((now, tokens))
        self.used_tokens += tokens
        return Decision(True, 0.0, rem_req - 1, rem_tok - tokens, window)


class TokenBucket:
    """Token buckets: one of ``requests_limit`` requests and one of ``tokens_limit`` tokens, both
    full at the start and refilling continuously at limit / ``window`` per second. A request takes
    1 from the first and its tokens from the second; a burst of a whole window's worth passes at
    once, after which requests pass at the refill rate. Time is passed in."""

    def __init__(self) -> None:
        self.requests: float | None = None  # current levels; None = full
        self.tokens: float | None = None
        self.at: float | None = None

    def clear(self) -> None:
        self.requests = self.tokens = self.at = None

    def admit(self, now: float, tokens: int, requests_limit: float | None, tokens_limit: float | None,
              window: float) -> Decision:
        elapsed = 0.0 if self.at is None else max(now - self.at, 0.0)
        self.at = now
        req = self._refill(self.requests, requests_limit, window, elapsed)
        tok = self._refill(self.tokens, tokens_limit, window, elapsed)
        waits = []
        eps = 1e-9  # refills accumulate rounding errors: 5.9 s + 0.1 s of refill is a whole request
        if requests_limit is not None and req < 1 - eps:
            waits.append((1 - req) * window / requests_limit)
        if tokens_limit is not None and tok < tokens - eps * max(tokens, 1):
            # A request larger than the whole bucket could never pass; say "a full window".
            waits.append((tokens - tok) * window / tokens_limit if tokens <= tokens_limit else window)
        if not waits:
            if requests_limit is not None:
                req -= 1
            if tokens_limit is not None:
                tok -= tokens
        self.requests = req if requests_limit is not None else None
        self.tokens = tok if tokens_limit is not None else None
        reset = max(
            (requests_limit - req) * window / requests_limit if requests_limit else 0.0,
            (tokens_limit - tok) * window / tokens_limit if tokens_limit else 0.0,
        )
        rem_req, rem_tok = int(max(req, 0.0)), int(max(tok, 0.0))
        if waits:
            return Decision(False, max(max(waits), 0.001), rem_req, rem_tok, reset)
        return Decision(True, 0.0, rem_req, rem_tok, reset)

    @staticmethod
    def _refill(level: float | None, limit: float | None, window: float, elapsed: float) -> float:
        if limit is None:
            return 0.0
        if level is None:
            return float(limit)
        return min(float(limit), level + elapsed * limit / window)


def make_algorithm(name: str) -> SlidingLog | TokenBucket:
    """The enforcement named ``name`` (``"sliding_window"`` or ``"token_bucket"``)."""
    if name == SLIDING_WINDOW:
        return SlidingLog()
    if name == TOKEN_BUCKET:
        return TokenBucket()
    raise ValueError(f"unknown provider algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")


class ProviderState:
    """Limits, scripted failures and a log of requests, shared by the handler threads.

    Args:
        requests_per_window: requests allowed per ``window_seconds`` (``None``: unlimited).
        tokens_per_window: prompt + completion tokens allowed per ``window_seconds``.
        window_seconds: the window (sliding log) or the time a bucket takes to refill from empty.
        latency: seconds each successful request takes to answer.
        chunk_delay: seconds between two events of a streamed answer (generation time).
        cached_prompt_tokens: prompt tokens an answer reports as read from the prompt cache
            (Anthropic-style: ``cache_read_input_tokens``, left out of its ``input_tokens``;
            OpenAI-style: ``prompt_tokens_details.cached_tokens``, part of ``prompt_tokens``).
        cache_written_tokens: prompt tokens an Anthropic-style answer reports as written to the
            prompt cache (``cache_creation_input_tokens``, left out of its ``input_tokens``), for
            ``cache_write_ttl`` (``"5m"`` or ``"1h"``).
        algorithm: ``"sliding_window"`` (exact log, the default) or ``"token_bucket"``.
        clock: monotonic time source (tests may pass a fake clock).
    """

    def __init__(
        self,
        requests_per_window: int | None = None,
        tokens_per_window: int | None = None,
        window_seconds: float = 60.0,
        latency: float = 0.0,
        completion_tokens: int = 5,
        cost_model: str = "gpt-4o-mini",
        algorithm: str = SLIDING_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        chunk_delay: float = 0.0,
        cached_prompt_tokens: int = 0,
        cache_written_tokens: int = 0,
        cache_write_ttl: str = "5m",
    ) -> None:
        self._enforcer = make_algorithm(algorithm)
        self._algorithm = algorithm
        self.clock = clock
        self.requests_per_window = requests_per_window
        self.tokens_per_window = tokens_per_window
        self.window_seconds = window_seconds
        self.latency = latency
        self.chunk_delay = chunk_delay
        self.cached_prompt_tokens = cached_prompt_tokens
        self.cache_written_tokens = cache_written_tokens
        self.cache_write_ttl = cache_write_ttl
        self.completion_tokens = completion_tokens
        self.cost_model = cost_model
        self.lock = threading.Lock()
        self.script: collections.deque[Scripted] = collections.deque()
        #: Scripted responses for one model's requests only (the ``model`` of the request body), used
        #: before ``script``: see :meth:`push_for`.
        self.model_script: dict[str, collections.deque[Scripted]] = {}
        self.log: list[Received] = []
        #: Requests being answered (a provider's concurrency): from arrival until the answer starts
        #: (non-streaming) or until generation ends (a stream's ``finish_reason`` chunk).
        self.in_flight = 0
        self.max_in_flight = 0
        #: Responses API conversations stored by response id: the tokens a turn continuing one
        #: (``previous_response_id``) is billed as input on top of its own, as OpenAI bills them.
        self.conversations: dict[str, int] = {}
        self._last_reset = 0.0  # full_reset of the latest decision (read under the lock)

    # -- configuration -------------------------------------------------
    @property
    def algorithm(self) -> str:
        """``"sliding_window"`` or ``"token_bucket"``; setting it starts from empty (full buckets)."""
        return self._algorithm

    @algorithm.setter
    def algorithm(self, name: str) -> None:
        enforcer = make_algorithm(name)
        with self.lock:
            self._enforcer, self._algorithm = enforcer, name

    def push(self, *responses: Scripted) -> None:
        """Queue scripted responses, used in order by the next requests."""
        with self.lock:
            self.script.extend(responses)

    def push_for(self, model: str, *responses: Scripted) -> None:
        """Queue scripted responses for the next requests for ``model`` (as the request body names
        it, e.g. ``"gpt-4o-mini"``); other models' requests are answered as usual."""
        with self.lock:
            self.model_script.setdefault(model, collections.deque()).extend(responses)

    def reset(self) -> None:
        with self.lock:
            self.script.clear()
            self.model_script.clear()
            self.log.clear()
            self._enforcer.clear()
            self.in_flight = 0
            self.max_in_flight = 0

    # -- accounting ----------------------------------------------------
    def ok_count(self) -> int:
        with self.lock:
            return sum(1 for r in self.log if r.status == 200)

    def count(self, status: int | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.log if status is None or r.status == status)

    def _admit(self, now: float, tokens: int) -> tuple[bool, float, int, int]:
        """Enforce the limits (caller holds the lock). Returns (ok, retry_after, remaining_req, remaining_tok)."""
        d = self._decide(now, tokens)
        return d.ok, d.retry_after, d.remaining_requests, d.remaining_tokens

    def _decide(self, now: float, tokens: int) -> Decision:
        d = self._enforcer.admit(now, tokens, self.requests_per_window, self.tokens_per_window, self.window_seconds)
        self._last_reset = d.full_reset
        return d


#: What the fake bills per image, document, file or audio part: providers bill media by its pixels,
#: pages or seconds, never by the length of its base64.
MEDIA_PART_TOKENS = 1000
_MEDIA_PARTS = frozenset(("image_url", "image", "input_image", "file", "input_file", "document", "input_audio",
                          "video_url", "audio_url"))


def _rough_tokens(body: dict[str, Any]) -> int:
    media = 0

    def text_of(value: Any) -> str:
        nonlocal media
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            parts = []
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind in _MEDIA_PARTS:
                    media += 1
                elif isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif isinstance(part, dict) and "content" in part:  # a Responses input item, a tool result
                    parts.append(text_of(part["content"]))
                elif isinstance(part, dict) and isinstance(part.get("output"), list):  # a function output
                    parts.append(text_of(part["output"]))
                else:
                    parts.append(text_of(part))
            return "\n".join(parts)
        return json.dumps(value)

    text = ""
    for m in body.get("messages") or []:
        text += text_of(m.get("content"))
    text += text_of(body.get("input") or body.get("prompt") or "")
    for name in ("system", "instructions"):  # Anthropic's system prompt, the Responses API's instructions
        text += text_of(body.get(name) or "")
    return max(1, math.ceil(len(text) / 4)) + media * MEDIA_PART_TOKENS


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm on, a body that does not
    # fit the first segment waits for the client's delayed ACK (40 ms on Linux) on every response.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        state = self.server.state
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        path = self.path.split("?")[0]
        model = str(body.get("model", ""))
        stream = bool(body.get("stream"))
        prompt_tokens = _rough_tokens(body)
        if body.get("previous_response_id"):
            prompt_tokens += state.conversations.get(str(body["previous_response_id"]), 0)
        max_out = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
        completion_tokens = min(state.completion_tokens, int(max_out)) if max_out else state.completion_tokens
        if path.endswith("/embeddings"):
            completion_tokens = 0
        auth = self.headers.get("authorization") or self.headers.get("x-api-key") or ""

        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            own = state.model_script.get(model) if state.model_script else None
            scripted = own.popleft() if own else state.script.popleft() if state.script else None
        self._in_flight = True
        self._cut_after: int | None = None
        try:
            self._respond(state, path, body, model, stream, prompt_tokens, completion_tokens, auth, scripted)
        finally:
            self._leave(state)

    def _leave(self, state: ProviderState) -> None:
        # A request stops being "in flight" when its answer starts: a client may send its next
        # request as soon as it has read this one, before this thread gets to run again.
        if getattr(self, "_in_flight", False):
            self._in_flight = False
            with state.lock:
                state.in_flight -= 1

    def _respond(
        self,
        state: ProviderState,
        path: str,
        body: dict[str, Any],
        model: str,
        stream: bool,
        prompt_tokens: int,
        completion_tokens: int,
        auth: str,
        scripted: Scripted | None,
    ) -> None:
        now = state.clock()
        status = 200
        headers: dict[str, str] = {}
        if scripted is not None:
            if scripted.delay:
                time.sleep(scripted.delay)
            if scripted.drop:
                self._record(state, now, path, model, stream, auth, 0, prompt_tokens, 0)
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if scripted.status != 200:
                self._record(state, now, path, model, stream, auth, scripted.status, prompt_tokens, 0)
                self._send_error(scripted.status, scripted.headers, scripted.body)
                return
            headers.update(scripted.headers)
            self._cut_after = scripted.cut_after
        with state.lock:
            ok, retry, rem_req, rem_tok = state._admit(now, prompt_tokens + completion_tokens)
            full_reset = state._last_reset
        # Like OpenAI: limits per minute whatever window is enforced, and "reset" is the time until
        # the limit is back to its full value (sliding log: when the newest counted request leaves
        # the window; token bucket: when the bucket has refilled).
        per_minute = 60.0 / state.window_seconds
        if state.requests_per_window is not None:
            headers["x-ratelimit-limit-requests"] = str(int(state.requests_per_window * per_minute))
            headers["x-ratelimit-remaining-requests"] = str(max(int(rem_req * per_minute), 0))
            headers["x-ratelimit-reset-requests"] = f"{full_reset:.3f}s"
        if state.tokens_per_window is not None:
            headers["x-ratelimit-limit-tokens"] = str(int(state.tokens_per_window * per_minute))
            headers["x-ratelimit-remaining-tokens"] = str(max(int(rem_tok * per_minute), 0))
            headers["x-ratelimit-reset-tokens"] = f"{full_reset:.3f}s"
        if not ok:
            headers["retry-after"] = str(max(1, math.ceil(retry)))
            headers["retry-after-ms"] = str(int(retry * 1000))
            self._record(state, now, path, model, stream, auth, 429, prompt_tokens, 0)
            self._send_error(429, headers, None)
            return
        if state.latency:
            time.sleep(state.latency)
        self._record(state, now, path, model, stream, auth, status, prompt_tokens, completion_tokens)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if state.cached_prompt_tokens and not path.endswith("/messages"):
            usage["prompt_tokens_details"] = {"cached_tokens": min(state.cached_prompt_tokens, prompt_tokens)}
        if path.endswith("/messages"):
            self._anthropic(body, model, usage, headers, stream)
        elif path.endswith("/responses"):
            self._responses(model, usage, headers, stream, completion_tokens)
        elif path.endswith("/images/generations") or path.endswith("/images/edits"):
            n = body.get("n")
            images = n if type(n) is int and n > 0 else 1
            made = [{"b64_json": "aGl2ZQ==", "revised_prompt": str(body.get("prompt", ""))} for _ in range(images)]
            self._send_json(200, {"created": int(time.time()), "data": made}, headers)
        elif path.endswith("/audio/speech"):
            self._send_bytes(200, b"ID3" + b"\x00" * 64, "audio/mpeg", headers)
        elif path.endswith("/audio/transcriptions"):
            self._send_json(200, {"text": "ok", "duration": 3.0}, headers)
        elif path.endswith("/rerank"):
            docs = body.get("documents")
            ranked = range(len(docs) if isinstance(docs, list) else 0)
            results = [{"index": i, "relevance_score": 1.0 / (i + 1)} for i in ranked]
            reranked: dict[str, Any] = {"id": "rerank-fake", "results": results,
                                        "meta": {"billed_units": {"search_units": 1}}}
            self._send_json(200, reranked, headers)
        elif path.endswith("/embeddings"):
            inputs = body.get("input")
            n = len(inputs) if isinstance(inputs, list) else 1
            data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(n)]
            self._send_json(200, {"object": "list", "data": data, "model": model, "usage": usage}, headers)
        elif path.endswith("/completions") and not path.endswith("chat/completions"):
            if stream:
                self._stream(body, model, usage, headers, completion_tokens, text=True)
                return
            self._send_json(200, {
                "id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"text": " ok" * completion_tokens, "index": 0, "finish_reason": "stop", "logprobs": None}],
                "usage": usage,
            }, headers)
        elif stream:
            self._stream(body, model, usage, headers, completion_tokens)
        else:
            self._send_json(200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": " ".join(["ok"] * completion_tokens)}}],
                "usage": usage,
            }, headers)

    def _record(self, state: ProviderState, now: float, path: str, model: str, stream: bool, auth: str,
                status: int, prompt_tokens: int, completion_tokens: int) -> None:
        with state.lock:
            state.log.append(Received(now, path, model, stream, auth, status, prompt_tokens, completion_tokens))
        if status != 200 or not stream:
            self._leave(state)  # the answer is about to be written

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

    def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, headers: dict[str, str], body: dict[str, Any] | None) -> None:
        payload = body or {"error": {
            "message": "Rate limit reached for requests" if status == 429 else f"fake provider error {status}",
            "type": "requests" if status == 429 else "server_error",
            "code": "rate_limit_exceeded" if status == 429 else None,
        }}
        self._send_json(status, payload, headers)

    def _stream(self, body: dict[str, Any], model: str, usage: dict[str, Any],
                headers: dict[str, str], completion_tokens: int, text: bool = False) -> None:
        """Server-sent events: one chunk per output token, a final chunk with ``finish_reason``,
        then the usage chunk if the request asked for it (``stream_options.include_usage``)."""
        self._begin_events(headers)
        kind = ("cmpl-fake", "text_completion") if text else ("chatcmpl-fake", "chat.completion.chunk")
        base = {"id": kind[0], "object": kind[1], "created": int(time.time()), "model": model}

        def choice(piece: str, finish: str | None) -> dict[str, Any]:
            if text:
                return {"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "delta": {"role": "assistant", "content": piece} if piece else {},
                    "finish_reason": finish}

        chunks = [dict(base, choices=[choice("ok ", None)]) for _ in range(max(completion_tokens, 1))]
        chunks.append(dict(base, choices=[choice("", "stop")]))
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(dict(base, choices=[], usage=usage))
        cut = self._cut_after
        finish = max(completion_tokens, 1)  # the chunk with finish_reason
        try:
            for i, c in enumerate(chunks):
                if cut is not None and i >= cut:  # scripted: the connection is lost mid-stream
                    self._leave(self.server.state)
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if i == finish:
                    # Generation is over: what follows (usage, [DONE]) is bytes in transit, and a
                    # client may take this chunk as the end (the limiter frees its slot here).
                    self._leave(self.server.state)
                self._chunk(f"data: {json.dumps(c)}\n\n".encode())
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _begin_events(self, headers: dict[str, str]) -> None:
        """The headers of a server-sent-events answer (its body follows in chunks)."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _send_named_events(self, events: list[dict[str, Any]]) -> None:
        """``event: <type>`` / ``data: <json>`` pairs (Anthropic's and the Responses API's form),
        then the end of the body."""
        try:
            for event in events:
                self._chunk(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        if not data:  # the terminating chunk: the client may send its next request right after it
            self._leave(self.server.state)
        elif self.server.state.chunk_delay:
            time.sleep(self.server.state.chunk_delay)
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _responses(self, model: str, usage: dict[str, Any], headers: dict[str, str], stream: bool,
                   completion_tokens: int) -> None:
        """OpenAI's Responses API (``/v1/responses``): a response object, or its server-sent events
        (one ``response.output_text.delta`` per output token; usage in ``response.completed``)."""
        pieces = ["ok "] * max(completion_tokens, 1)
        created = int(time.time())
        rid = f"resp_fake_{uuid.uuid4().hex[:16]}"
        self.server.state.conversations[rid] = usage["prompt_tokens"] + usage["completion_tokens"]
        message = {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": "".join(pieces), "annotations": []}]}
        done = {
            "id": rid, "object": "response", "created_at": created, "status": "completed",
            "model": model, "output": [message], "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": [], "text": {"format": {"type": "text"}}, "error": None, "incomplete_details": None,
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                      "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
        }
        if not stream:
            self._send_json(200, done, headers)
            return
        self._begin_events(headers)
        started = dict(done, status="in_progress", output=[], usage=None)
        item = dict(message, status="in_progress", content=[])
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": started},
            {"type": "response.output_item.added", "output_index": 0, "item": item},
            {"type": "response.content_part.added", "item_id": "msg_fake", "output_index": 0, "content_index": 0,
             "part": {"type": "output_text", "text": "", "annotations": []}},
        ]
        events += [{"type": "response.output_text.delta", "item_id": "msg_fake", "output_index": 0,
                    "content_index": 0, "delta": piece} for piece in pieces]
        events += [
            {"type": "response.output_text.done", "item_id": "msg_fake", "output_index": 0, "content_index": 0,
             "text": "".join(pieces)},
            {"type": "response.output_item.done", "output_index": 0, "item": message},
            {"type": "response.completed", "response": done},
        ]
        for n, event in enumerate(events):
            event["sequence_number"] = n
        self._send_named_events(events)

    def _anthropic(self, body: dict[str, Any], model: str, usage: dict[str, Any],
                   headers: dict[str, str], stream: bool) -> None:
        state = self.server.state
        cached = min(state.cached_prompt_tokens, usage["prompt_tokens"])
        written = min(state.cache_written_tokens, usage["prompt_tokens"] - cached)
        au: dict[str, Any] = {"input_tokens": usage["prompt_tokens"] - cached - written,
                              "output_tokens": usage["completion_tokens"],
                              "cache_creation_input_tokens": written, "cache_read_input_tokens": cached}
        if written:
            one_hour = state.cache_write_ttl == "1h"
            au["cache_creation"] = {"ephemeral_5m_input_tokens": 0 if one_hour else written,
                                    "ephemeral_1h_input_tokens": written if one_hour else 0}
        if not stream:
            self._send_json(200, {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": au,
            }, headers)
            return
        self._begin_events(headers)
        self._send_named_events([
            {"type": "message_start", "message": {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {**au, "output_tokens": 1}}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            *[{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok "}}
              for _ in range(max(au["output_tokens"], 1))],
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": au["output_tokens"]}},
            {"type": "message_stop"},
        ])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    state: ProviderState

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients closing keep-alive connections is normal; anything else is worth seeing.
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class FakeProvider:
    """Runs the fake provider in a background thread: ``with FakeProvider() as p: p.url``."""

    def __init__(self, state: ProviderState | None = None, port: int = 0) -> None:
        self.state = state or ProviderState()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-provider", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """OpenAI-style base URL (``.../v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        """Base URL without ``/v1`` (for Anthropic-style clients)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--rpm", type=int, default=None, help="requests per window")
    parser.add_argument("--tpm", type=int, default=None, help="tokens per window")
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--token-bucket", action="store_true", help="enforce token buckets, not a sliding log")
    args = parser.parse_args()
    state = ProviderState(args.rpm, args.tpm, args.window, args.latency,
                          algorithm=TOKEN_BUCKET if args.token_bucket else SLIDING_WINDOW)
    provider = FakeProvider(state, args.port)
    print(f"fake provider on {provider.url}", flush=True)
    provider._server.serve_forever()


if __name__ == "__main__":
    main()
