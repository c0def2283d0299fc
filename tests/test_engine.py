"""The admission engine: decisions, queue order, priorities, leases, eviction (fake clock).

The contract tests run against both backends (``make_engine``: in-memory and Redis)."""

from __future__ import annotations

from typing import Any

import pytest

from hive_ratelimit_plugin._engine import Engine, QueueFull, Scope, Ticket
from hive_ratelimit_plugin._redis import POLL_MAX
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.errors import RequestTooLargeError
from hive_ratelimit_plugin.testing import FakeClock


def scope(key: str = "global", level: str = "global", **limits: int) -> Scope:
    return Scope(level, key, LimitSet(**limits))


def ticket(n: int | str, *scopes: Scope, tin: int = 0, tout: int = 0, prio: int = 0) -> Ticket:
    return Ticket(call_id=str(n), scopes=list(scopes), input_tokens=tin, output_tokens=tout, priority=prio)


class Woken:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_admits_until_request_limit_then_queues(clock: FakeClock, make_engine: Any) -> None:
    """Three per minute: three admitted, the fourth queued with the exact retry time."""
    eng = make_engine(clock)
    g = scope(requests_per_minute=3)
    for i in range(3):
        assert eng.acquire(ticket(i, g), Woken()) is None
    w = eng.acquire(ticket(3, g), Woken())
    assert w is not None and not w.granted
    assert w.blocked is not None and w.blocked.limit == "requests_per_minute"
    assert w.retry_at == pytest.approx(1000.0 + 1.0 + 60.0)  # bucket [1000, 1001) + 60 s
    clock.advance(61.0)
    assert eng.dispatch() == 1
    assert w.granted


def test_token_limit_uses_input_plus_output(clock: FakeClock, make_engine: Any) -> None:
    """A token limit counts prompt plus requested output tokens."""
    eng = make_engine(clock)
    g = scope(tokens_per_minute=1000)
    assert eng.acquire(ticket(1, g, tin=300, tout=500), Woken()) is None
    w = eng.acquire(ticket(2, g, tin=100, tout=150), Woken())
    assert w is not None and w.blocked is not None and w.blocked.limit == "tokens_per_minute"


def test_settlement_refunds_unused_estimate_and_wakes_waiters(clock: FakeClock, make_engine: Any) -> None:
    """Actual usage below the estimate frees room at once for a waiting call."""
    eng = make_engine(clock)
    g = scope(tokens_per_minute=1000)
    assert eng.acquire(ticket(1, g, tin=100, tout=800), Woken()) is None
    woken = Woken()
    w = eng.acquire(ticket(2, g, tin=100, tout=400), woken)
    assert w is not None
    eng.release("1", input_tokens=100, output_tokens=20)
    assert w.granted and woken.count >= 1
    assert eng.snapshot()["global"]["tokens_per_minute"]["used"] == 100 + 20 + 500


def test_separate_input_and_output_limits(clock: FakeClock, make_engine: Any) -> None:
    """input_tokens_per_minute and output_tokens_per_minute are checked separately."""
    eng = make_engine(clock)
    g = scope(input_tokens_per_minute=100, output_tokens_per_minute=1000)
    assert eng.acquire(ticket(1, g, tin=90, tout=10), Woken()) is None
    w = eng.acquire(ticket(2, g, tin=20, tout=10), Woken())
    assert w is not None and w.blocked is not None and w.blocked.limit == "input_tokens_per_minute"


@pytest.mark.parametrize(("tin", "cached", "counted"), [(700, 600, 100), (700, 0, 700), (700, 900, 0),
                                                       (None, 600, 800)])
def test_cache_reads_count_in_token_limits_not_in_input_limits(tin: int | None, cached: int, counted: int,
                                                              clock: FakeClock, make_engine: Any) -> None:
    """Prompt tokens read from the provider's cache count in a token limit (OpenAI's TPM counts
    them) and not in an input-token limit (Anthropic's ITPM does not); a cache count larger than
    the prompt leaves nothing, and with no usage reported the estimate stands whole."""
    eng = make_engine(clock)
    g = scope(tokens_per_minute=10_000, input_tokens_per_minute=10_000)
    assert eng.acquire(ticket(1, g, tin=800, tout=50), Woken()) is None
    eng.release("1", input_tokens=tin, output_tokens=20, cached_input=cached)
    used = eng.snapshot()["global"]
    assert used["input_tokens_per_minute"]["used"] == counted
    assert used["tokens_per_minute"]["used"] == (800 if tin is None else tin) + 20


@pytest.mark.parametrize(("tin", "cached", "counted"), [(700, 600, 100), (None, 0, 200)])
def test_an_expected_cache_read_is_not_reserved_in_input_limits(tin: int | None, cached: int, counted: int,
                                                               clock: FakeClock, make_engine: Any) -> None:
    """A ticket's ``cached_input`` (the part of its prompt expected from the provider's cache) is
    left out of input-token windows at admission, not of token windows; a call larger than the
    input limit then fits. Settled at the answer's count, or, unreported, as reserved."""
    eng = make_engine(clock)
    g = scope(tokens_per_minute=10_000, input_tokens_per_minute=500)
    t = ticket(1, g, tin=800, tout=50)
    t.cached_input = 600
    assert eng.acquire(t, Woken()) is None
    used = eng.snapshot()["global"]
    assert used["input_tokens_per_minute"]["used"] == 200 and used["tokens_per_minute"]["used"] == 850
    eng.release("1", input_tokens=tin, output_tokens=20, cached_input=cached)
    used = eng.snapshot()["global"]
    assert used["input_tokens_per_minute"]["used"] == counted
    assert used["tokens_per_minute"]["used"] == (800 if tin is None else tin) + 20


def test_concurrency_slot_comes_back_on_release(clock: FakeClock, make_engine: Any) -> None:
    """A concurrency-blocked call waits for a release, not for time."""
    eng = make_engine(clock)
    g = scope(concurrent_requests=1)
    assert eng.acquire(ticket(1, g), Woken()) is None
    w = eng.acquire(ticket(2, g), Woken())
    # Notified by the release; a shared backend also re-asks after a short poll (another process may release).
    assert w is not None and (w.retry_at is None or w.retry_at - clock() <= POLL_MAX)
    clock.advance(3600)
    assert eng.dispatch() == 0
    eng.release("1")
    assert w.granted


@pytest.mark.parametrize(("field", "period"), [
    ("requests_per_second", 1.0), ("requests_per_minute", 60.0), ("requests_per_hour", 3600.0),
    ("requests_per_day", 86400.0), ("tokens_per_second", 1.0), ("tokens_per_minute", 60.0),
    ("tokens_per_hour", 3600.0), ("tokens_per_day", 86400.0), ("input_tokens_per_minute", 60.0),
    ("output_tokens_per_minute", 60.0),
])
def test_every_rate_field_holds_for_its_own_period(field: str, period: float, clock: FakeClock,
                                                    make_engine: Any) -> None:
    """Each limit field counts what it names (requests, all tokens, input or output tokens) over
    its own period: room for two calls, the third waits until the window has slid past them,
    not before 90 % of the period and no later than one bucket (1/60) after it."""
    per_call = {"requests": 1, "tokens": 100, "input": 60, "output": 40}[field.split("_")[0]]
    eng = make_engine(clock)
    g = scope(**{field: 2 * per_call})
    for i in range(2):
        assert eng.acquire(ticket(i, g, tin=60, tout=40), Woken()) is None
        eng.release(str(i), input_tokens=60, output_tokens=40)
    w = eng.acquire(ticket(2, g, tin=60, tout=40), Woken())
    assert w is not None and not w.granted
    assert w.blocked is not None and w.blocked.limit == field
    clock.advance(period * 0.9)
    eng.dispatch()
    assert not w.granted
    clock.advance(period * (0.1 + 1 / 60) + 0.01)
    eng.dispatch()
    assert w.granted


def test_every_level_must_have_room(clock: FakeClock, make_engine: Any) -> None:
    """A call is admitted only if every scope it counts against has room."""
    eng = make_engine(clock)
    g = scope(requests_per_minute=100)
    a = scope("agent:a", "agent", requests_per_minute=1)
    assert eng.acquire(ticket(1, g, a), Woken()) is None
    w = eng.acquire(ticket(2, g, a), Woken())
    assert w is not None and w.blocked is not None and w.blocked.scope == "agent:a"
    # Another agent is not held up by agent a's queue.
    b = scope("agent:b", "agent", requests_per_minute=1)
    assert eng.acquire(ticket(3, g, b), Woken()) is None


def test_fifo_within_priority(clock: FakeClock, make_engine: Any) -> None:
    """Waiters are granted in arrival order; a newcomer cannot jump the line."""
    eng = make_engine(clock)
    g = scope(requests_per_minute=1)
    assert eng.acquire(ticket(0, g), Woken()) is None
    waiters = [eng.acquire(ticket(i, g), Woken()) for i in range(1, 4)]
    for expected in waiters:
        clock.advance(61)
        eng.dispatch()
        assert expected is not None and expected.granted
        assert sum(1 for w in waiters if w is not None and w.granted) == waiters.index(expected) + 1


def test_small_call_does_not_overtake_a_big_one(clock: FakeClock, make_engine: Any) -> None:
    """A small request behind a big waiting one waits (no starvation of big requests)."""
    eng = make_engine(clock)
    g = scope(tokens_per_minute=1000)
    assert eng.acquire(ticket(1, g, tin=900), Woken()) is None
    big = eng.acquire(ticket(2, g, tin=500), Woken())
    small = eng.acquire(ticket(3, g, tin=10), Woken())
    assert big is not None and small is not None
    assert not small.granted  # 90 tokens of room, but the big one is first in line
    eng.release("1", input_tokens=100, output_tokens=0)
    assert big.granted and small.granted


def test_high_priority_goes_first(clock: FakeClock, make_engine: Any) -> None:
    """Under saturation, a high-priority waiter is granted before earlier low-priority ones."""
    eng = make_engine(clock)
    g = scope(requests_per_minute=1)
    assert eng.acquire(ticket(0, g), Woken()) is None
    low = [eng.acquire(ticket(f"low{i}", g, prio=-10), Woken()) for i in range(3)]
    high = eng.acquire(ticket("high", g, prio=10), Woken())
    clock.advance(61)
    eng.dispatch()
    assert high is not None and high.granted
    assert not any(w is not None and w.granted for w in low)


def test_line_only_held_on_blocked_scopes(clock: FakeClock, make_engine: Any) -> None:
    """A call waiting on model A does not hold up a call to model B sharing the global scope."""
    eng = make_engine(clock)
    g = scope(requests_per_minute=100)
    ma = scope("model:openai/a", "model", requests_per_minute=1)
    mb = scope("model:openai/b", "model", requests_per_minute=1)
    assert eng.acquire(ticket(1, g, ma), Woken()) is None
    assert eng.acquire(ticket(2, g, ma), Woken()) is not None
    assert eng.acquire(ticket(3, g, mb), Woken()) is None


def test_too_large_request_fails_fast(clock: FakeClock, make_engine: Any) -> None:
    """A call bigger than a whole window can never fit and is rejected at once."""
    eng = make_engine(clock)
    g = scope(tokens_per_minute=100)
    with pytest.raises(RequestTooLargeError) as info:
        eng.acquire(ticket(1, g, tin=50, tout=60), Woken())
    assert info.value.limit == "tokens_per_minute" and info.value.scope == "global"


def test_queue_full(clock: FakeClock, make_engine: Any) -> None:
    """Past max_queue waiters, acquire raises QueueFull."""
    eng = make_engine(clock, max_queue=2)
    g = scope(requests_per_minute=1)
    eng.acquire(ticket(0, g), Woken())
    eng.acquire(ticket(1, g), Woken())
    eng.acquire(ticket(2, g), Woken())
    with pytest.raises(QueueFull):
        eng.acquire(ticket(3, g), Woken())


def test_cancel_frees_the_line(clock: FakeClock, make_engine: Any) -> None:
    """A waiter that gives up lets the one behind it through."""
    eng = make_engine(clock)
    g = scope(tokens_per_minute=100)
    assert eng.acquire(ticket(1, g, tin=60), Woken()) is None
    big = eng.acquire(ticket(2, g, tin=80), Woken())
    small = eng.acquire(ticket(3, g, tin=30), Woken())
    assert big is not None and small is not None and not small.granted
    assert eng.cancel(big) is False
    assert small.granted


def test_lease_expiry_reclaims_abandoned_call(clock: FakeClock, make_engine: Any) -> None:
    """A call never settled (abandoned stream) gives its slot back when its lease expires."""
    eng = make_engine(clock, lease_seconds=30)
    g = scope(concurrent_requests=1)
    assert eng.acquire(ticket(1, g), Woken()) is None
    w = eng.acquire(ticket(2, g), Woken())
    clock.advance(29)
    eng.dispatch()
    assert w is not None and not w.granted
    clock.advance(2)
    eng.dispatch()
    assert w.granted
    assert not eng.holds("1")


def test_renew_keeps_a_live_stream(clock: FakeClock, make_engine: Any) -> None:
    """Renewing a lease (a chunk arrived) keeps the slot held."""
    eng = make_engine(clock, lease_seconds=30)
    g = scope(concurrent_requests=1)
    eng.acquire(ticket(1, g), Woken())
    clock.advance(20)
    eng.renew("1")
    clock.advance(20)
    eng.dispatch()
    assert eng.holds("1")


def test_idle_scopes_are_evicted(clock: FakeClock) -> None:
    """100k agents that go idle do not stay in memory once their windows are empty."""
    eng = Engine(clock)
    for i in range(2000):
        a = scope(f"agent:{i}", "agent", requests_per_minute=5)
        assert eng.acquire(ticket(i, a), Woken()) is None
        eng.release(str(i))
    assert eng.scope_count == 2000
    clock.advance(60 * 60 * 24 + 10)
    eng.acquire(ticket("x", scope(requests_per_minute=5)), Woken())  # triggers maintenance
    assert eng.scope_count == 1


def test_release_is_idempotent_and_unknown_ids_are_ignored(clock: FakeClock, make_engine: Any) -> None:
    """Releasing twice or releasing an unknown call changes nothing."""
    eng = make_engine(clock)
    g = scope(concurrent_requests=2)
    eng.acquire(ticket(1, g), Woken())
    assert eng.release("1") is True
    assert eng.release("1") is False
    assert eng.release("nope") is False
    assert eng.snapshot()["global"]["in_flight"] == 0


def test_request_counts_from_its_send_when_litellm_reports_it(clock: FakeClock, make_engine: Any) -> None:
    """A call that waited in LiteLLM's pipeline (a busy event loop) after admission is counted
    from when its HTTP request was sent (note_attempt), not from its admission: the margin covers
    time on the wire, not time spent before the send."""
    eng = make_engine(clock)
    eng.arrival_margin = 1.0
    g = scope(requests_per_minute=1)
    assert eng.acquire(ticket(1, g), Woken()) is None
    clock.advance(3.0)
    eng.note_attempt("1")  # sent 3 s after admission
    clock.advance(2.0)
    eng.release("1")  # may have arrived as late as send + 1 s = 1004 s
    clock.advance(58.5)  # 63.5 s after admission: counted from admission + margin it would be free
    w = eng.acquire(ticket(2, g), Woken())
    assert w is not None and w.retry_at == pytest.approx(1000.0 + 4.0 + 1.0 + 60.0)  # bucket [1004, 1005)


def test_per_second_request_counts_from_its_end_when_it_was_quick(clock: FakeClock, make_engine: Any) -> None:
    """Per-second windows: a call that completed within half a window of its send is counted
    from its end (it surely arrived by then, however long its bytes waited in a stalled event
    loop); a longer call keeps counting from send + a tenth of the window."""
    eng = make_engine(clock)
    eng.arrival_margin = 1.0
    g = scope(requests_per_second=1)
    assert eng.acquire(ticket(1, g), Woken()) is None  # at 1000.0
    eng.note_attempt("1")
    clock.advance(0.3)
    eng.release("1")  # a quick call, perhaps stalled: counted from 1000.3
    clock.advance(0.9)  # 1001.2: counted from send + 0.1 s it would be free
    w = eng.acquire(ticket(2, g), Woken())
    # its bucket (1/60 s wide) ends at about 1000.3 s; counted from send + 0.1 s it would be ~1001.12
    assert w is not None and w.retry_at == pytest.approx(1001.3 + 1 / 120, abs=1 / 120)
    assert eng.cancel(w) is False
    clock.advance(0.2)  # 1001.4: free
    assert eng.acquire(ticket(3, g), Woken()) is None  # sent at 1001.4
    eng.note_attempt("3")
    clock.advance(0.8)
    eng.release("3")  # a long call: counted from send + 0.1 s = 1001.5
    clock.advance(0.2)  # 1002.4
    w = eng.acquire(ticket(4, g), Woken())
    assert w is not None and w.retry_at == pytest.approx(1002.5 + 1 / 120, abs=1 / 120)


def test_request_counts_from_its_probable_arrival(clock: FakeClock, make_engine: Any) -> None:
    """A request counts from min(its end, admission + margin): a provider that counts arrivals
    never sees more than the limit, whatever the delay between admission and arrival."""
    eng = make_engine(clock)
    eng.arrival_margin = 1.0
    g = scope(requests_per_minute=1)
    assert eng.acquire(ticket(1, g), Woken()) is None
    clock.advance(5.0)
    eng.release("1")  # a slow call: it may have arrived as late as admission + 1 s (the margin)
    clock.advance(56.5)  # 61.5 s after admission: an admission-time count would have expired
    w = eng.acquire(ticket(2, g), Woken())
    assert w is not None and w.retry_at == pytest.approx(1000.0 + 1.0 + 1.0 + 60.0)  # bucket [1001, 1002)


def test_adaptive_rate_recovers_about_five_percent_per_minute(clock: FakeClock, make_engine: Any) -> None:
    """Two 429s within a minute cut a model's rate to 70 % of what it sent; a minute of successful
    calls at the cut rate then gives back about 5 % (not +1 per minute, which left a busy model
    throttled for hours after a few 429s)."""
    eng = make_engine(clock)
    m = scope("model:openai/x", "model")
    for i in range(100):  # 100 calls in the last minute
        assert eng.acquire(ticket(f"a{i}", m), Woken()) is None
        eng.release(f"a{i}")
        clock.advance(0.5)
    for i in range(2):  # two 429s within the minute
        assert eng.acquire(ticket(f"r{i}", m), Woken()) is None
        eng.release(f"r{i}", outcome="rate_limited", wait=1.0)
        clock.advance(5.0)
    lowered = eng.provider_state()["model:openai/x"]["adaptive_requests_per_minute"]
    assert 70 <= lowered <= 90  # 70 % of ~2 per second (102 requests over the 55 s they span)
    clock.advance(60.0)
    n = int(lowered)
    for i in range(n):  # a minute of traffic at the lowered rate, all successful
        assert eng.acquire(ticket(f"b{i}", m), Woken()) is None
        eng.release(f"b{i}")
        clock.advance(60.0 / n)
    recovered = eng.provider_state()["model:openai/x"]["adaptive_requests_per_minute"]
    assert recovered >= lowered * 1.045


def test_adaptive_rate_is_dropped_once_it_is_back_at_its_ceiling(clock: FakeClock, make_engine: Any) -> None:
    """The cut rate recovers up to twice the pace that drew the 429s, and is then forgotten: the
    model is limited by its configured and learned limits alone again (not by a rate frozen at
    its ceiling)."""
    eng = make_engine(clock)
    m = scope("model:openai/x", "model")
    for i in range(10):  # 10 calls a minute...
        assert eng.acquire(ticket(f"a{i}", m), Woken()) is None
        eng.release(f"a{i}")
        clock.advance(6.0)
    for i in range(2):  # ... then two 429s within the minute
        assert eng.acquire(ticket(f"r{i}", m), Woken()) is None
        eng.release(f"r{i}", outcome="rate_limited", wait=1.0)
        clock.advance(2.0)
    lowered = eng.provider_state()["model:openai/x"]["adaptive_requests_per_minute"]
    assert lowered < 12
    clock.advance(60.0)
    rates = []
    for i in range(400):  # successes at a steady 6 a minute: each adds 1/20 (or 1/rate)
        assert eng.acquire(ticket(f"b{i}", m), Woken()) is None
        eng.release(f"b{i}")
        clock.advance(10.0)
        rates.append(eng.provider_state()["model:openai/x"].get("adaptive_requests_per_minute"))
    assert rates[0] is not None and rates[0] > lowered
    assert None in rates  # back at the ceiling (~2 x 11 a minute): forgotten
    gone = rates.index(None)
    assert all(r is None for r in rates[gone:])
    assert all(r is not None and r < 2 * 12 for r in rates[:gone])


def _sent_at_two_a_second_then_two_429s(eng: Any, clock: FakeClock, m: Any) -> float:
    """A minute of 2 requests a second to ``m``, then two 429s (1 s retry-after) 5 s apart: the
    rate is cut. Returns the cut rate."""
    for i in range(120):
        assert eng.acquire(ticket(f"a{i}", m), Woken()) is None
        eng.release(f"a{i}")
        clock.advance(0.5)
    for i in range(2):
        assert eng.acquire(ticket(f"r{i}", m), Woken()) is None
        eng.release(f"r{i}", outcome="rate_limited", wait=1.0)
        clock.advance(5.0)
    return float(eng.provider_state()["model:openai/x"]["adaptive_requests_per_minute"])


def test_a_cut_rate_goes_on_at_its_new_pace_rather_than_stopping(clock: FakeClock, make_engine: Any) -> None:
    """The cut leaves the last minute's requests (~120) above the new limit (~84): calls used to
    stop until enough of that minute had left the window (~18 s with nothing sent, and callers
    timed out in the queue: helper-56's soak). The window now keeps at most the new limit, so
    calls go on at about the new pace at once, and never more than the provider saw leave."""
    eng = make_engine(clock)
    m = scope("model:openai/x", "model")
    lowered = _sent_at_two_a_second_then_two_429s(eng, clock, m)
    assert 60 <= lowered <= 90
    clock.advance(2.0)  # past the cooldown and its pacing (1 s wait: paced until 2 s after it)
    sent: list[float] = []
    t0 = clock()
    while clock() - t0 < 20.0:  # 20 s of callers arriving 10 a second
        if eng.acquire(ticket(f"b{len(sent)}", m), None) is None:
            eng.release(f"b{len(sent)}")
            sent.append(clock() - t0)
        clock.advance(0.1)
    # Calls go at once (they waited ~11 s: the old pace's minute had to drain below the new
    # limit), at least at the new pace (lowered / 6 in 10 s), and never faster on the whole than
    # the old pace's requests leave the window (2 a second).
    assert sent and sent[0] < 1.0
    assert len([t for t in sent if t < 10.0]) >= lowered / 6
    assert len(sent) <= 40


def test_the_rate_is_cut_at_most_once_a_minute(clock: FakeClock, make_engine: Any) -> None:
    """429s in the minute after a cut answer requests sent at the old pace: they do not cut it
    again (each pair of them did: ~750 a minute were cut to ~300 within 95 s by sporadic 429s).
    One a minute later does."""
    eng = make_engine(clock)
    m = scope("model:openai/x", "model")
    lowered = _sent_at_two_a_second_then_two_429s(eng, clock, m)
    for i in range(2):  # two more 429s within the minute of the cut
        clock.advance(10.0)
        assert eng.acquire(ticket(f"s{i}", m), Woken()) is None
        eng.release(f"s{i}", outcome="rate_limited", wait=1.0)
    assert eng.provider_state()["model:openai/x"]["adaptive_requests_per_minute"] == pytest.approx(lowered)
    clock.advance(45.0)  # a minute and more after the cut: a second 429 within a minute cuts again
    assert eng.acquire(ticket("t", m), Woken()) is None
    eng.release("t", outcome="rate_limited", wait=1.0)
    assert eng.provider_state()["model:openai/x"]["adaptive_requests_per_minute"] < lowered


def test_a_cut_never_sends_more_than_a_request_limit_the_headers_gave(clock: FakeClock, make_engine: Any) -> None:
    """A start-up burst of 122 requests in 30 s, then 429s whose headers say 60 a minute: the
    cut (to ~158) scaled the window down to the learned 60, so calls went on at once while the
    burst was still in the provider's minute (115 sent in a minute against its 60). A limit the
    headers gave is a real one: nothing more goes until enough of the burst has left the minute."""
    from hive_ratelimit_plugin._retry import RateSignals

    eng = make_engine(clock)
    m = scope("model:openai/x", "model")
    sent: list[float] = []
    for i in range(122):
        assert eng.acquire(ticket(f"a{i}", m), Woken()) is None
        sent.append(clock())
        if i > 1:
            eng.release(f"a{i}")
        clock.advance(0.25)
    limit = RateSignals(limit_requests=60, remaining_requests=0)
    eng.release("a0", outcome="rate_limited", wait=1.0, signals=limit)
    clock.advance(2.0)
    eng.release("a1", outcome="rate_limited", wait=1.0, signals=limit)  # (a second 429 in the minute: a cut)
    assert eng.provider_state()["model:openai/x"]["adaptive_requests_per_minute"] > 60
    t0, n = clock(), 0
    while clock() - t0 < 120.0:
        if eng.acquire(ticket(f"b{n}", m), None) is None:
            eng.release(f"b{n}")
            sent.append(clock())
            n += 1
        clock.advance(0.1)
    assert n >= 60
    assert max(sum(1 for s in sent if t - 60.0 < s <= t) for t in sent[122:]) <= 60


@pytest.mark.parametrize("field", ["limit_requests", "limit_tokens", "limit_input_tokens", "limit_output_tokens"])
def test_a_limit_of_zero_in_the_headers_is_not_learned(clock: FakeClock, make_engine: Any, field: str) -> None:
    """A header giving a limit of 0 (``x-ratelimit-limit-requests: 0``) is no limit to learn (the
    in-memory engine ignores it). The Redis script read 0 as true and learned a limit of 0: every
    later call of the model was held."""
    from hive_ratelimit_plugin._retry import RateSignals

    eng = make_engine(clock)
    m = scope("model:anthropic/x", "model")
    assert eng.acquire(ticket("a", m, tin=10), Woken()) is None
    eng.release("a", signals=RateSignals(**{field: 0}))
    assert eng.acquire(ticket("b", m, tin=10), Woken()) is None


def test_long_cooldown_outlives_idle_eviction(clock: FakeClock, make_engine: Any) -> None:
    """A provider's Retry-After longer than the idle-eviction horizon still holds the model:
    a scope is never forgotten while the provider has it on hold."""
    eng = make_engine(clock)
    m = scope("model:openai/x", "model")
    assert eng.acquire(ticket("a", m), Woken()) is None
    eng.release("a", outcome="rate_limited", wait=300.0)
    clock.advance(150.0)  # the model's windows are empty now; other traffic runs maintenance
    assert eng.acquire(ticket("b", scope("model:openai/y", "model")), Woken()) is None
    w = eng.acquire(ticket("c", m), Woken())
    assert w is not None and w.blocked is not None and w.blocked.limit == "provider_cooldown"
    assert w.retry_at == pytest.approx(1000.0 + 300.0)


@pytest.mark.parametrize("full", ["requests_per_day", "tokens_per_second", "input_tokens_per_minute",
                                  "output_tokens_per_minute"])
def test_a_refusal_leaves_every_window_as_it_was(full: str, clock: FakeClock) -> None:
    """Admission charges windows kind by kind and period by period, and takes its charges back
    when a later window has no room: whichever window is full, every other one is left exactly
    as it was (and the call, once it fits, is charged in every window once)."""
    eng = Engine(clock=clock)
    limits = dict(requests_per_second=100, requests_per_minute=100, requests_per_day=100, tokens_per_second=10**6,
                  tokens_per_minute=10**6, input_tokens_per_minute=10**6, output_tokens_per_minute=10**6)
    a = scope("global", **limits)
    b = scope("agent:x", "agent", **limits)
    assert eng.acquire(ticket(0, a, b, tin=5, tout=5), Woken()) is None
    eng.release("0", input_tokens=5, output_tokens=5)
    clock.advance(0.5)
    # Fill one window of the second scope (the last one charged of its kind) to its limit.
    st_b = eng._states["agent:x"]
    windows = [w for metric in ("requests", "tokens", "input", "output") for w in getattr(st_b, metric)]
    target = next(w for w in windows if w.name == full)
    target.add(clock(), target.limit - target.total)

    def usage(w: Any) -> tuple[float, dict[float, float]]:  # what each bucket holds (empty ones aside)
        held = {index: amount for index, amount in [*w.buckets, [w.ci, w.cur]] if amount}
        return w.total, held

    def snapshot() -> list[tuple[float, dict[float, float]]]:
        return [usage(w) for st in eng._states.values() for metric in ("requests", "tokens", "input", "output")
                for w in getattr(st, metric)]

    before = snapshot()
    w = eng.acquire(ticket(1, a, b, tin=7, tout=3), None)
    assert w is not None and not w.granted and w.blocked is not None and w.blocked.limit == full
    assert snapshot() == before
    assert all(st.in_flight == 0 for st in eng._states.values())


def test_two_brief_429s_in_a_start_up_burst_do_not_cut_the_rate_to_a_trickle(clock: FakeClock,
                                                                             make_engine: Any) -> None:
    """A burst at start-up (12 requests within a second, no limit configured) and two 429s with a
    0.1 s retry-after: the rate it was sent at is ~12 per second, not 12 per minute, so the cut
    leaves ~500 per minute and the calls after the cooldown go through (it was cut to 8.4 per
    minute, and they timed out in the queue)."""
    eng = make_engine(clock)
    m = scope("model:openai/x", "model")
    for i in range(10):
        assert eng.acquire(ticket(f"a{i}", m), Woken()) is None
        eng.release(f"a{i}")
    for i in range(2):
        clock.advance(0.1)
        assert eng.acquire(ticket(f"r{i}", m), Woken()) is None
        eng.release(f"r{i}", outcome="rate_limited", wait=0.1)
    lowered = eng.provider_state()["model:openai/x"]["adaptive_requests_per_minute"]
    assert lowered >= 0.7 * 12 * 60 * 0.9
    clock.advance(3.0)  # past the cooldown and its pacing
    for i in range(20):
        assert eng.acquire(ticket(f"b{i}", m), None) is None  # admitted at once, nothing queued
        eng.release(f"b{i}")
        clock.advance(0.01)
