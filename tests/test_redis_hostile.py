"""A hostile pass on the Redis backend: the edge cases the contract suite does not reach.

Two :class:`RedisEngine` instances on one key prefix stand for two processes (one that "dies"
simply stops calling). Time is the fake clock (``server_time=False``); where a Redis TTL would
have to run out in real time, the test removes the key itself and says so.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from hive_ratelimit_plugin._engine import Scope, Ticket
from hive_ratelimit_plugin._redis import RedisEngine, safe_url
from hive_ratelimit_plugin.config import LimitSet
from hive_ratelimit_plugin.testing import FakeClock

from .conftest import REDIS_URL, redis_client


def engine(clock: FakeClock, prefix: str, **kwargs: Any) -> RedisEngine:
    kwargs.setdefault("wall_clock", clock)
    return RedisEngine(clock, url=REDIS_URL, prefix=prefix, server_time=False, **kwargs)


def sc(key: str = "global", level: str = "global", **limits: Any) -> Scope:
    return Scope(level, key, LimitSet(**limits))


def tk(n: int | str, *scopes: Scope, cost: float = 0.0, tin: int = 0, tout: int = 0) -> Ticket:
    keys = ["global", *(s.key for s in scopes if s.budgeted and s.key != "global")]
    return Ticket(str(n), list(scopes), input_tokens=tin, output_tokens=tout, cost=cost, spend_keys=keys)


def nothing() -> None:
    pass


def all_keys(prefix: str) -> dict[str, int]:
    """Every key of ``prefix`` with its TTL in seconds (-1: none)."""
    client: Any = redis_client()
    return {k.decode(): client.ttl(k) for k in client.scan_iter(match="{" + prefix + "}*", count=1000)}


@pytest.fixture
def r() -> Any:
    return redis_client()


# ------------------------------------------------------------------ key TTLs
def test_no_key_without_ttl_while_a_call_is_in_flight(clock: FakeClock, redis_prefix: str) -> None:
    """A call holding a slot and a reservation (and whose process may die right now) leaves no
    key that would live forever: the lease index included."""
    eng = engine(clock, redis_prefix)
    g = sc(concurrent_requests=2, max_cost_per_day=10)
    assert eng.acquire(tk(1, g, cost=1.0), nothing) is None
    keys = all_keys(redis_prefix)
    assert keys and all(ttl > 0 for ttl in keys.values()), keys


def test_reclaim_after_the_reservation_key_expired_keeps_the_budget_exact(
        clock: FakeClock, redis_prefix: str, r: Any) -> None:
    """Process A dies holding a $0.4 reservation of a $1 budget. The reservation hash lives 2
    leases, the lease record 2 leases + 60 s: B's next admission in between reclaims A's call
    after the reservation key is gone. The reclaim must not leave a negative reservation (with
    no TTL) that lets B reserve more than the budget."""
    a, b = engine(clock, redis_prefix, lease_seconds=30), engine(clock, redis_prefix, lease_seconds=30)
    g = sc(max_cost_per_day=1.0)
    assert a.acquire(tk("a1", g, cost=0.4), nothing) is None  # then A dies
    clock.advance(61)
    r.delete("{" + redis_prefix + "}:rv:global")  # its TTL ran out (it lived 2 leases, the record 2 + 60 s)
    assert b.acquire(tk("b1", g, cost=0.4), nothing) is None  # reclaims a1: $0.4 charged
    w = b.acquire(tk("b2", g, cost=0.4), nothing)  # 0.4 spent + 0.4 reserved + 0.4 > 1: must wait
    assert w is not None and not w.granted
    keys = all_keys(redis_prefix)
    assert all(ttl > 0 for ttl in keys.values()), keys


def test_settle_after_the_reservation_key_expired_leaves_no_negative_reservation(
        clock: FakeClock, redis_prefix: str, r: Any) -> None:
    """A long call settles after its scope's reservation hash expired: the settlement must not
    create a negative reservation without a TTL (which would let later calls over-reserve)."""
    a = engine(clock, redis_prefix, lease_seconds=30)
    g = sc(max_cost_per_day=1.0)
    assert a.acquire(tk("a1", g, cost=0.4), nothing) is None
    clock.advance(20)
    r.delete("{" + redis_prefix + "}:rv:global")  # as if its TTL ran out under a slow call
    assert a.release("a1", cost=0.1)
    keys = all_keys(redis_prefix)
    assert all(ttl > 0 for ttl in keys.values()), keys
    assert float(r.hget("{" + redis_prefix + "}:rv:global", "cost") or 0) >= 0


def test_renew_keeps_the_slot_and_reservation_keys_alive(clock: FakeClock, redis_prefix: str, r: Any) -> None:
    """A stream renewed well past two leases keeps its concurrency slot and its reservation in
    Redis: renewing must extend the keys that hold them, not only the lease record."""
    a = engine(clock, redis_prefix, lease_seconds=40)
    g = sc(concurrent_requests=1, max_cost_per_day=1.0)
    assert a.acquire(tk("s1", g, cost=0.5), nothing) is None
    p = "{" + redis_prefix + "}"
    a.renew("s1")
    for key in (p + ":c:global", p + ":rv:global"):
        r.pexpire(key, 2000)  # (time passes: 2 s of real TTL left)
    clock.advance(15)
    a.renew("s1")
    assert r.pttl(p + ":c:global") > 40_000 and r.pttl(p + ":rv:global") > 40_000


@pytest.mark.parametrize("reads", [[24.0], [10.0, 15.0], [0.5, 3.0, 6.0], [5.0, 14.0, 20.0, 25.0]],
                         ids=["late-first-read", "two-close-reads", "reads-at-once", "steady"])
def test_a_stream_keeps_its_redis_slot_for_a_lease_after_its_last_read(
        reads: list[float], clock: FakeClock, redis_prefix: str) -> None:
    """Another process must not reclaim a stream within one lease of its last chunk, whenever the
    reads came (a RENEW reaches Redis at most once per quarter lease), and reclaims it within
    1.25 leases once reading stops."""
    a, b = engine(clock, redis_prefix, lease_seconds=30), engine(clock, redis_prefix, lease_seconds=30)
    g = sc(concurrent_requests=1)
    assert a.acquire(tk("s1", g), nothing) is None
    start = clock()
    for at in reads:
        clock.advance(start + at - clock())
        a.renew("s1")
    clock.advance(29.0)  # just under a lease since the last read
    w = b.acquire(tk("b1", g), None)
    assert w is not None and not w.granted, "another process took the slot of a stream read 29 s ago"
    b.cancel(w)
    clock.advance(8.6)  # 1.25 leases since the last read, and a little more
    assert b.acquire(tk("b2", g), None) is None


def test_a_shorter_lease_in_another_process_does_not_shorten_the_slots_of_longer_ones(
        clock: FakeClock, redis_prefix: str) -> None:
    """Processes may run with different ``lease_seconds`` (a rolling configuration change). An
    admission with a short lease must not cut the TTL of the slot set that holds longer-leased
    slots: the set would expire with them live, and the limit be exceeded."""
    a = engine(clock, redis_prefix, lease_seconds=600)
    b = engine(clock, redis_prefix, lease_seconds=4)
    g = sc(concurrent_requests=3)
    assert a.acquire(tk("a1", g), nothing) is None
    assert a.acquire(tk("a2", g), nothing) is None
    assert b.acquire(tk("b1", g), nothing) is None
    assert b.release("b1")
    slot_ttls = [ttl for key, ttl in all_keys(redis_prefix).items() if ":c:" in key]
    assert len(slot_ttls) == 1 and slot_ttls[0] >= 600 * 2 - 60  # (seconds) a's leases, not b's
    assert b.acquire(tk("b2", g), nothing) is None
    assert b.acquire(tk("b3", g), nothing) is not None  # a's two slots still count


def test_an_abandoned_streams_renewal_record_goes_with_its_lease(clock: FakeClock, redis_prefix: str) -> None:
    """A stream read a few times and then dropped: when its lease is reclaimed, nothing about it
    stays in the process (50 such streams used to leave 50 renewal records behind)."""
    a = engine(clock, redis_prefix, lease_seconds=30)
    g = sc(concurrent_requests=100)
    for i in range(50):
        assert a.acquire(tk(f"s{i}", g), nothing) is None
    clock.advance(10)
    for i in range(50):
        a.renew(f"s{i}")
    clock.advance(45)
    assert a.acquire(tk("next", g), nothing) is None  # runs the sweep that reclaims them
    assert not any(cid.startswith("s") for cid in a._leases)
    assert a._renewed == {}


# ------------------------------------------------------------------ secrets
@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0?password=hunter2-secret",
                                 "rediss://h:6380/0?username=u&password=hunter2-secret",
                                 "unix:///tmp/redis.sock?db=0&password=hunter2-secret"])
def test_password_in_the_url_query_is_never_shown(url: str) -> None:
    """redis-py also takes the password as a query parameter: it must be masked like the
    userinfo one (logs, errors, stats and repr all use safe_url)."""
    shown = safe_url(url)
    assert "hunter2" not in shown and "password=***" in shown


def test_a_malformed_backend_url_does_not_echo_its_password() -> None:
    from hive_ratelimit_plugin.config import load_config
    from hive_ratelimit_plugin.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config({"backend": "redis:/:hunter2@h:6379/0"})
    assert "hunter2" not in str(info.value) and "backend" in str(info.value)


# ------------------------------------------------------------------ outages
class Switch:
    """Stands between an engine and Redis: ``refuse`` (connection refused: nothing reaches Redis)
    or ``lost_reply`` (Redis ran the script, the reply never came: a socket timeout)."""

    def __init__(self, eng: RedisEngine) -> None:
        self.mode: str | None = None
        self.plan: list[str | None] = []  # modes of the next calls, before ``mode`` applies again
        for name in ("_admit", "_settle_script", "_hit", "_peek_s", "_reset", "_renew", "_charge", "_move"):
            setattr(eng, name, self._wrap(getattr(eng, name)))

    def _wrap(self, script: Any) -> Any:
        import redis

        def call(*args: Any, **kwargs: Any) -> Any:
            mode = self.plan.pop(0) if self.plan else self.mode
            if mode == "refuse":
                raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            out = script(*args, **kwargs)
            if mode == "lost_reply":
                raise redis.TimeoutError("Timeout reading from socket")
            return out

        return call


def test_budget_warning_crossed_by_a_replayed_settlement_is_announced(clock: FakeClock, redis_prefix: str) -> None:
    """A settlement made while Redis was down is replayed on recovery; if it crosses a warning
    threshold, the warning is announced (the mark is set once, so it is now or never)."""
    got: list[dict[str, Any]] = []
    eng = engine(clock, redis_prefix, warning_thresholds=(0.5,), on_event=got.extend)
    switch = Switch(eng)
    g = sc(max_cost_per_day=1.0)
    assert eng.acquire(tk(1, g, cost=0.8), nothing) is None
    switch.mode = "refuse"
    assert eng.release("1", cost=0.7)  # kept for Redis
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    assert eng.acquire(tk(2, g, cost=0.1), nothing) is None  # Redis answers: the settlement is replayed
    assert [e["threshold"] for e in got if e["type"] == "budget_warning"] == [0.5]
    assert eng.spend("global", "day")[0] == pytest.approx(0.7)


def test_a_replay_cut_short_by_a_new_failure_counts_each_settlement_once(clock: FakeClock, redis_prefix: str) -> None:
    """Redis answers, then fails again in the middle of the replay: what was already written must
    not be written again at the next recovery (spend rows are not idempotent)."""
    eng = engine(clock, redis_prefix, on_error="open")
    switch = Switch(eng)
    g = sc(requests_per_minute=100)
    switch.mode = "refuse"
    for n in range(3):  # admitted uncounted; their spend is owed to Redis
        assert eng.acquire(tk(n, g), nothing) is None
        assert eng.release(str(n), cost=0.25)
    assert eng.backend_info()["pending_settlements"] == 3
    switch.mode = None
    switch.plan = [None, "refuse"]  # one replayed row, then down again
    clock.advance(eng.retry_interval + 0.1)
    eng.acquire(tk("x", g), nothing)
    assert eng.backend_info()["pending_settlements"] == 2
    clock.advance(eng.retry_interval + 0.1)
    eng.acquire(tk("y", g), nothing)
    assert eng.available and eng.backend_info()["pending_settlements"] == 0
    assert eng.spend("global", "day")[0] == pytest.approx(0.75)


# ------------------------------------------------------------------ windows
def test_tokens_settled_late_still_count_after_the_admission_bucket_left(clock: FakeClock, make_engine: Any) -> None:
    """Two long calls settle 100 and 110 s after admission; their extra tokens count from then.
    At 125 s those 80 tokens are in the last minute: a 30-token call must wait (limit 100)."""
    eng = make_engine(clock)
    g = sc(tokens_per_minute=100)
    assert eng.acquire(tk(1, g, tin=5, tout=5), nothing) is None
    assert eng.acquire(tk(2, g, tin=5, tout=5), nothing) is None
    clock.advance(100)
    assert eng.release("1", input_tokens=10, output_tokens=50)  # +50 now
    clock.advance(10)
    assert eng.release("2", input_tokens=10, output_tokens=30)  # +30 now
    clock.advance(15)
    w = eng.acquire(tk(3, g, tin=5, tout=25), nothing)
    assert w is not None and not w.granted


# ------------------------------------------------------------------ odd names
ODD = ["a\0b", "a\x1fb", "x:{y}:z}", "日本語-агент", "pct%00%u0041", "n" * 5000, "bad\udc80utf8"]


@pytest.mark.parametrize("name", ODD, ids=["nul", "unit-sep", "colons-braces", "unicode", "percent", "long",
                                           "lone-surrogate"])
def test_odd_agent_ids_hold_and_free_slots_and_budgets(clock: FakeClock, redis_prefix: str, name: str) -> None:
    """Agent ids come from request metadata: any string. A slot is freed on release, the spend is
    counted under that agent, and nothing is mistaken for an outage."""
    eng = engine(clock, redis_prefix)
    key = f"agent:{name}"
    a = sc(key, "agent", concurrent_requests=1, max_cost_per_day=1.0, requests_per_minute=10)
    assert eng.acquire(tk(1, a, cost=0.3), nothing) is None
    w = eng.acquire(tk(2, a, cost=0.3), nothing)
    assert w is not None and not w.granted
    assert eng.release("1", cost=0.2)
    assert w.granted
    assert eng.release("2", cost=0.2)
    assert eng.available and not eng._pending_settle
    assert eng.spend(key, "day")[0] == pytest.approx(0.4)
    assert eng.snapshot()[key]["requests_per_minute"]["used"] == 2
    keys = all_keys(redis_prefix)
    assert all(ttl > 0 for ttl in keys.values()), keys


def test_scope_keys_differing_only_by_a_separator_stay_apart(clock: FakeClock, redis_prefix: str) -> None:
    eng = engine(clock, redis_prefix)
    for n, name in enumerate(["a\x1fb", "a?b", "a\0b", "a%1Fb", "a\udc80b", "a%uDC80b"]):
        assert eng.acquire(tk(n, sc(f"agent:{name}", "agent", requests_per_minute=1)), nothing) is None, name


def test_budget_reset_rearms_warnings_of_that_scope_only(clock: FakeClock, redis_prefix: str) -> None:
    """reset_budget re-arms the warnings of the reset scope, whatever characters its name holds
    (glob characters, ':'), and of no other scope."""
    got: list[dict[str, Any]] = []
    eng = engine(clock, redis_prefix, warning_thresholds=(0.5,), on_event=got.extend)
    names = ["agent:team[1]", "agent:x", "agent:x:day", "agent:a*"]
    scopes = [sc(n, "agent", max_cost_per_day=1.0) for n in names]
    for i, s in enumerate(scopes):
        assert eng.acquire(tk(f"a{i}", s, cost=0.6), nothing) is None
        assert eng.release(f"a{i}", cost=0.6)
    for n in ("agent:team[1]", "agent:x", "agent:a*"):
        eng.reset_spend(n)
    for i, s in enumerate(scopes):
        cost = 0.6 if s.key != "agent:x:day" else 0.1  # (the one not reset has 0.4 left)
        assert eng.acquire(tk(f"b{i}", s, cost=cost), nothing) is None
        assert eng.release(f"b{i}", cost=cost)
    warned = [e["scope"] for e in got if e["type"] == "budget_warning"]
    assert sorted(warned) == sorted([*names, "agent:team[1]", "agent:x", "agent:a*"])
    keys = all_keys(redis_prefix)
    assert all(ttl > 0 for ttl in keys.values()), keys


def test_memory_per_scope_with_a_prefix_holding_colons_and_glob_characters(clock: FakeClock, redis_prefix: str,
                                                                             r: Any) -> None:
    prefix = redis_prefix + ":prod[1]"
    eng = engine(clock, prefix)
    try:
        a = sc("agent:a\0b", "agent", requests_per_minute=5, concurrent_requests=2)
        assert eng.acquire(tk(1, sc(requests_per_minute=5), a), nothing) is None
        memory = eng.redis_memory()
        assert memory.keys() == {"global", "agent:a\0b", "(leases)", "(boot)"}
        assert all(v > 0 for v in memory.values())
    finally:
        keys = [k for k in r.scan_iter(count=1000) if k.startswith(("{" + prefix + "}").encode())]
        if keys:
            r.delete(*keys)


def test_a_retry_counts_against_the_chosen_api_key_too(clock: FakeClock, make_engine: Any) -> None:
    """LiteLLM retries an admitted call without re-admission: the retry is a request against every
    scope the call holds, the API key it was given included (the provider counts per key)."""
    eng = make_engine(clock)
    key = Scope("key", "key:openai/K1", LimitSet(requests_per_minute=2))
    t = tk(1, sc(requests_per_minute=100))
    t.choices = [key]
    assert eng.acquire(t, nothing) is None and t.chosen == "key:openai/K1"
    eng.note_attempt("1")
    eng.note_attempt("1")  # a retry: the key's second request this minute
    t2 = tk(2, sc(requests_per_minute=100))
    t2.choices = [key]
    w = eng.acquire(t2, nothing)
    assert w is not None and not w.granted


def test_replayed_settlement_keeps_the_injected_clock(clock: FakeClock, redis_prefix: str) -> None:
    """With an injected clock (server_time=False: tests, simulations), a settlement replayed after
    an outage is applied on that clock, not on Redis' own: its extra tokens leave the window a
    minute later instead of sitting decades in the future."""
    eng = engine(clock, redis_prefix)
    switch = Switch(eng)
    g = sc(tokens_per_minute=1000)
    assert eng.acquire(tk(1, g, tin=5, tout=5), nothing) is None
    switch.mode = "refuse"
    assert eng.release("1", input_tokens=10, output_tokens=40)
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    assert eng.snapshot()["global"]["tokens_per_minute"]["used"] == 50  # (replayed)
    clock.advance(62)
    assert eng.snapshot()["global"]["tokens_per_minute"]["used"] == 0


# ------------------------------------------------------------ lost replies
def test_an_admission_whose_reply_was_lost_gives_back_what_redis_holds(clock: FakeClock, redis_prefix: str) -> None:
    """Redis is slow (beyond socket_timeout): it admitted the call, but the answer never came, so
    this process handled the call under its outage policy. Once Redis answers, the slot and the
    reservation it holds for that call are given back at once, and nothing is charged for it
    beyond what the call really cost (not its worst case at reclaim, a lease later)."""
    a = engine(clock, redis_prefix, lease_seconds=300)
    b = engine(clock, redis_prefix, lease_seconds=300)
    switch = Switch(a)
    g = sc(concurrent_requests=1, max_cost_per_day=1.0)
    assert a.acquire(tk(0, g, cost=0.0), nothing) is None  # (so that this process knows the day's spend)
    assert a.release("0", cost=0.0)
    switch.mode = "lost_reply"
    assert a.acquire(tk(1, g, cost=0.5), nothing) is None  # admitted in-process (policy local)
    switch.mode = None
    assert a.release("1", cost=0.1)
    clock.advance(a.retry_interval + 0.1)
    assert a.spend("global", "day")[0] == pytest.approx(0.1)  # Redis answers: the replay runs first
    assert b.acquire(tk(2, g, cost=0.5), nothing) is None  # the slot is free: no lease to wait out
    assert b.release("2", cost=0.2)
    clock.advance(301)
    assert b.acquire(tk(3, g, cost=0.1), nothing) is None  # (reclaims whatever expired)
    assert b.spend("global", "day") == (pytest.approx(0.3), 3, 0)


def test_a_settlement_whose_reply_was_lost_counts_once(clock: FakeClock, redis_prefix: str) -> None:
    eng = engine(clock, redis_prefix)
    switch = Switch(eng)
    g = sc(requests_per_minute=100)
    assert eng.acquire(tk(1, g), nothing) is None
    switch.mode = "lost_reply"
    assert eng.release("1", cost=0.25)  # Redis wrote it; the answer was lost
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    assert eng.spend("global", "day")[0] == pytest.approx(0.25)
    assert eng.spend("global", "day")[1] == 1


def test_a_charge_whose_reply_was_lost_counts_once(clock: FakeClock, redis_prefix: str) -> None:
    """The spend of a call admitted uncounted (policy open) is charged on its own; a charge whose
    answer was lost is kept and sent again, and counts once."""
    eng = engine(clock, redis_prefix, on_error="open")
    switch = Switch(eng)
    g = sc(requests_per_minute=100)
    switch.mode = "refuse"
    assert eng.acquire(tk(1, g), nothing) is None  # admitted uncounted
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    switch.mode = "lost_reply"
    assert eng.release("1", cost=0.25)  # Redis charged it; the answer was lost
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    assert eng.spend("global", "day")[:2] == (pytest.approx(0.25), 1)


def test_writes_in_doubt_are_remembered_only_while_in_doubt(clock: FakeClock, redis_prefix: str) -> None:
    """What Redis keeps to apply a resent write once holds only the writes whose answer this
    process has not seen: after a lost answer and its replay, and hundreds of settlements, it
    holds a few entries (it forgets every 16th write), not one per settlement."""
    eng = engine(clock, redis_prefix)
    switch = Switch(eng)
    g = sc(requests_per_minute=10_000)
    client: Any = redis_client()
    key = f"{{{redis_prefix}}}:once:{eng._sid}"
    for n in range(300):
        assert eng.acquire(tk(n, g), nothing) is None
        if n == 100:
            switch.mode = "lost_reply"
        assert eng.release(str(n), cost=0.01)
        if n == 100:
            switch.mode = None
            clock.advance(eng.retry_interval + 0.1)
    assert eng.spend("global", "day")[:2] == (pytest.approx(3.0), 300)
    assert 1 <= client.zcard(key) <= 16
    assert 0 < client.pttl(key) <= 7 * 86400 * 1000
    assert eng._unsure == {}


def test_a_dropped_pending_write_does_not_hold_the_replay_guard(clock: FakeClock, redis_prefix: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the cap on pending settlements the oldest is dropped (logged): it will never be sent
    again, so it stops holding back what Redis forgets."""
    from hive_ratelimit_plugin import _redis

    monkeypatch.setattr(_redis, "_MAX_PENDING", 2)
    eng = engine(clock, redis_prefix)
    switch = Switch(eng)
    g = sc(requests_per_minute=10_000)
    assert eng.acquire(tk(0, g), nothing) is None
    assert eng.acquire(tk(1, g), nothing) is None
    assert eng.acquire(tk(2, g), nothing) is None
    switch.mode = "lost_reply"
    assert eng.release("0", cost=0.5)  # lost, pending
    switch.mode = "refuse"
    assert eng.release("1", cost=0.25)
    assert eng.release("2", cost=0.125)  # the cap: "0" is dropped
    assert sorted(eng._unsure) == [2, 3]
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    assert eng.spend("global", "day")[0] == pytest.approx(0.875)  # "0" did reach Redis; the rest replayed
    assert eng._unsure == {}


@pytest.mark.parametrize("refusal", ["busy", "oom"])
def test_a_kept_settlement_survives_a_redis_that_is_busy_or_out_of_memory(clock: FakeClock, redis_prefix: str,
                                                                          refusal: str) -> None:
    """Redis answering BUSY (another script runs too long: the usual reason it was slower than
    socket_timeout) or OOM to a replay is not back yet: the settlements kept for it stay kept and
    are written, once, when it runs scripts again (not dropped as a faulty script)."""
    import redis

    eng = engine(clock, redis_prefix)
    switch = Switch(eng)
    g = sc(requests_per_minute=100)
    for n in range(2):
        assert eng.acquire(tk(n, g), nothing) is None
    switch.mode = "lost_reply"
    assert eng.release("0", cost=0.25)  # written; the answer was lost
    switch.mode = "refuse"
    assert eng.release("1", cost=0.5)  # not written
    switch.mode = None
    settle = eng._settle_script

    def not_back(*args: Any, **kwargs: Any) -> Any:
        if refusal == "busy":
            raise redis.ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL or "
                                      "SHUTDOWN NOSCRIPT.")
        raise redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'. script: "
                                                "0123abcd, on @user_script:1.")

    eng._settle_script = not_back
    clock.advance(eng.retry_interval + 0.1)
    assert eng.acquire(tk(2, g), nothing) is None  # (admitted under the outage policy: Redis is not back)
    assert eng.backend_info()["pending_settlements"] == 2
    eng._settle_script = settle
    clock.advance(eng.retry_interval + 0.1)
    assert eng.spend("global", "day")[:2] == (pytest.approx(0.75), 2)
    assert eng.backend_info()["pending_settlements"] == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_workers_forked_from_one_process_do_not_take_each_others_settlements_for_replays(
        clock: FakeClock, redis_prefix: str) -> None:
    """A limiter created before the fork (gunicorn --preload, multiprocessing): each worker numbers
    its writes as a process of its own, so Redis applies both workers' settlements."""
    eng = engine(clock, redis_prefix)
    g = sc(requests_per_minute=1000)
    kids = []
    for n in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                assert eng.acquire(tk(f"child-{n}", g), nothing) is None
                assert eng.release(f"child-{n}", cost=0.25)
                code = 0
            finally:
                os._exit(code)
        kids.append(pid)
    assert [os.waitpid(pid, 0)[1] for pid in kids] == [0, 0]
    assert eng.acquire(tk("parent", g), nothing) is None
    assert eng.release("parent", cost=0.25)
    assert eng.spend("global", "day")[:2] == (pytest.approx(0.75), 3)


def test_an_outage_counts_the_calls_redis_admitted_against_this_process_allowance(
        clock: FakeClock, redis_prefix: str) -> None:
    """Calls in flight when Redis goes away were admitted by Redis; they still cost money and
    hold slots. The outage engine counts them: their reservations against the budget allowance,
    their slots against the scaled concurrency limit, and their spend when they settle (once:
    Redis gets it with the replay, not as outage spend as well)."""
    from hive_ratelimit_plugin.errors import BudgetExceededError

    eng = engine(clock, redis_prefix, local_share=0.5)
    switch = Switch(eng)
    g = sc(max_cost_per_day=2.0, concurrent_requests=4)
    for n in range(4):
        assert eng.acquire(tk(f"r{n}", g, cost=0.2), nothing) is None  # 0.8 reserved, 4 slots
    switch.mode = "refuse"
    assert eng.release("r0", cost=0.1)  # settled as the outage begins: its spend counts
    # The outage allows local_share of each limit: 2 slots (3 held), $1.00 of the budget.
    w = eng.acquire(tk("o1", g, cost=0.3), nothing)
    assert w is not None and not w.granted and w.blocked is not None
    assert w.blocked.limit == "concurrent_requests"
    eng.cancel(w)
    assert eng.release("r1", cost=0.1)
    assert eng.release("r2", cost=0.1)  # one held slot left
    assert eng.acquire(tk("o1", g, cost=0.5), nothing) is None  # 0.3 spent + 0.2 held + 0.5 = 1.0
    w = eng.acquire(tk("o2", g, cost=0.01), nothing)  # fits only if a call in flight costs less
    assert w is not None and not w.granted and w.blocked is not None and w.blocked.limit == "budget_reservations"
    eng.cancel(w)
    assert eng.release("r3", cost=0.1)
    assert eng.release("o1", cost=0.55)  # more than reserved: 0.95 spent of 1.00
    with pytest.raises(BudgetExceededError):
        eng.acquire(tk("o3", g, cost=0.1), nothing)
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    assert eng.acquire(tk("after", g), nothing) is None  # Redis again: the replay runs first
    assert eng.release("after", cost=0.0)
    assert eng.spend("global", "day")[:2] == (pytest.approx(0.95), 6)


def test_a_settlement_whose_record_a_restart_lost_still_counts_once(clock: FakeClock, redis_prefix: str) -> None:
    """Redis restarted without persistence: the lease records of calls in flight are gone, and so
    is the spend so far. A settlement that finds no record used to do nothing (as after a
    settlement or a reclaim in the same dataset); its spend now counts, once."""
    eng = engine(clock, redis_prefix)
    g = sc(max_cost_per_day=10.0, concurrent_requests=5)
    assert eng.acquire(tk(1, g, cost=0.5), nothing) is None
    assert eng.acquire(tk(2, g, cost=0.5), nothing) is None
    assert eng.release("1", cost=0.3)
    client: Any = redis_client()
    client.delete(*client.scan_iter(match="{" + redis_prefix + "}*", count=1000))  # the restart
    assert eng.acquire(tk(3, g, cost=0.5), nothing) is None  # (a new dataset, a new id)
    assert eng.release("2", cost=0.4)
    assert eng.release("3", cost=0.2)
    assert eng.spend("global", "day")[:2] == (pytest.approx(0.6), 2)
    # In the same dataset a record that is gone was settled or reclaimed: nothing more is charged.
    assert eng.acquire(tk(4, g, cost=0.5), nothing) is None
    res = eng._leases["4"]
    assert eng.release("4", cost=0.1)
    eng._leases["4"] = res  # its settlement sent again
    res.settled = False
    assert eng.release("4", cost=0.1)
    assert eng.spend("global", "day")[:2] == (pytest.approx(0.7), 3)


def test_a_stream_read_through_an_outage_keeps_its_hold_there(clock: FakeClock, redis_prefix: str) -> None:
    """The outage engine's copy of a call Redis admitted lives as long as the call: a stream read
    past the lease keeps its slot there, and its settlement counts once; after the outage the
    copy is gone (a later outage holds the calls then in flight afresh)."""
    eng = engine(clock, redis_prefix, local_share=0.5, lease_seconds=30)
    switch = Switch(eng)
    g = sc(max_cost_per_day=2.0, concurrent_requests=2)
    assert eng.acquire(tk("s", g, cost=0.5), nothing) is None
    switch.mode = "refuse"
    w = eng.acquire(tk("o0", g, cost=0.1), nothing)  # one slot in the outage: the stream's
    assert w is not None and not w.granted
    eng.cancel(w)
    for _ in range(4):  # 60 s of reading, past the 30 s lease
        clock.advance(15)
        eng.renew("s")
    w = eng.acquire(tk("o1", g, cost=0.1), nothing)
    assert w is not None and not w.granted, "the stream's slot was reclaimed while it was read"
    eng.cancel(w)
    assert eng.release("s", cost=0.2)
    assert eng.fallback.spend("global", "day")[:2] == (pytest.approx(0.2), 1)
    assert eng.acquire(tk("o2", g, cost=0.1), nothing) is None
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    assert eng.release("o2", cost=0.1)
    assert not eng._held and not eng.fallback._leases
    assert eng.spend("global", "day")[:2] == (pytest.approx(0.3), 2)


def test_a_settlement_as_another_thread_finds_redis_gone_still_counts(clock: FakeClock, redis_prefix: str) -> None:
    """Another thread (the status snapshot, a renewal) may find Redis gone first; a settlement
    right after still counts against the outage allowance."""
    eng = engine(clock, redis_prefix, local_share=1.0)
    switch = Switch(eng)
    g = sc(max_cost_per_day=1.0)
    assert eng.acquire(tk("a", g, cost=0.7), nothing) is None
    switch.mode = "refuse"
    eng.outages += 1  # what that thread's _call did before this one's settlement
    eng._down_since, eng._next_try = clock(), clock() + 10
    assert eng.release("a", cost=0.6)
    w = None
    try:
        w = eng.acquire(tk("b", g, cost=0.5), nothing)
    except Exception as exc:
        assert type(exc).__name__ == "BudgetExceededError"
    else:
        raise AssertionError(f"admitted on top of the spend settled as the outage began: {w}")


def test_what_an_outage_admitted_counts_in_redis_windows_once_it_is_back(clock: FakeClock,
                                                                           redis_prefix: str) -> None:
    """Calls admitted by the outage engine were sent: when Redis answers again its windows learn
    them, so the processes do not admit a whole window's worth on top (5 sent during the outage
    out of 10 a minute: 5 more, not 10)."""
    eng = engine(clock, redis_prefix, local_share=0.5)
    switch = Switch(eng)
    g = sc(requests_per_minute=10)
    assert eng.acquire(tk("before", g), nothing) is None  # (Redis has seen this scope)
    assert eng.release("before")
    switch.mode = "refuse"
    clock.advance(120)  # the first call is out of the window
    outage = [eng.acquire(tk(f"o{n}", g), nothing) for n in range(6)]
    assert [w is None for w in outage] == [True] * 5 + [False]  # local_share: 5 of 10
    eng.cancel(outage[5])  # type: ignore[arg-type]
    for n in range(5):
        assert eng.release(f"o{n}")
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    after = [eng.acquire(tk(f"a{n}", g), nothing) for n in range(6)]
    assert [w is None for w in after] == [True] * 5 + [False]


def test_back_to_back_outages_keep_the_first_ones_spend(clock: FakeClock, redis_prefix: str) -> None:
    """Redis back for a moment (noticed by a stats read, with no admission to report the spend)
    and gone again: the second outage starts from the spend the first one wrote back."""
    from hive_ratelimit_plugin.errors import BudgetExceededError

    eng = engine(clock, redis_prefix, local_share=1.0)
    switch = Switch(eng)
    g = sc(max_cost_per_day=2.0)
    assert eng.acquire(tk("a", g, cost=0.1), nothing) is None
    assert eng.release("a", cost=0.0)
    switch.mode = "refuse"
    assert eng.acquire(tk("o1", g, cost=1.2), nothing) is None
    assert eng.release("o1", cost=1.2)
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    assert eng.spend("global", "day")[:2] == (pytest.approx(1.2), 2)  # the replay, on a stats read
    switch.mode = "refuse"
    clock.advance(eng.retry_interval + 0.1)
    eng.spend("global", "day")  # gone again
    with pytest.raises(BudgetExceededError):
        eng.acquire(tk("o2", g, cost=1.5), nothing)  # 1.2 + 1.5 > 2.0


def test_a_lost_records_settlement_sent_again_counts_once(clock: FakeClock, redis_prefix: str) -> None:
    """The settlement of a record a restart lost runs, but its answer is lost: sent again, it
    charges nothing more."""
    eng = engine(clock, redis_prefix)
    switch = Switch(eng)
    g = sc(max_cost_per_day=10.0, concurrent_requests=5)
    assert eng.acquire(tk(1, g, cost=0.5), nothing) is None
    client: Any = redis_client()
    client.delete(*client.scan_iter(match="{" + redis_prefix + "}*", count=1000))  # the restart
    switch.mode = "lost_reply"
    assert eng.release("1", cost=0.3)
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    assert eng.spend("global", "day")[:2] == (pytest.approx(0.3), 1)


def test_recovery_announces_no_budget_warning_for_calls_still_in_flight(clock: FakeClock, redis_prefix: str) -> None:
    """The outage engine's copies of calls Redis admitted are dropped when Redis answers again,
    not settled at their worst case (which crossed warning thresholds that were never crossed)."""
    events: list[dict[str, Any]] = []
    eng = engine(clock, redis_prefix, local_share=1.0, warning_thresholds=(0.5, 0.8), on_event=events.extend)
    switch = Switch(eng)
    g = sc(max_cost_per_day=1.0)
    assert eng.acquire(tk("seen", g, cost=0.4), nothing) is None
    assert eng.release("seen", cost=0.4)
    assert eng.acquire(tk("long", g, cost=0.6), nothing) is None
    switch.mode = "refuse"
    eng.spend("global", "day")  # the outage, noticed: "long" is held there
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    eng.spend("global", "day")  # Redis again
    assert not eng._held and not eng.fallback._leases
    assert eng.release("long", cost=0.01)
    assert not [e for e in events if e["type"].startswith("budget")]
    assert eng.spend("global", "day")[:2] == (pytest.approx(0.41), 2)


def test_a_line_head_refused_for_good_leaves_the_line_at_once(clock: FakeClock, redis_prefix: str) -> None:
    """A caller first in line for a slot that is then refused for good (its budget is spent)
    takes its place with it: the next caller gets the free slot at once, not 1.5 s later."""
    from hive_ratelimit_plugin.errors import BudgetExceededError

    a, b = engine(clock, redis_prefix), engine(clock, redis_prefix)
    g = sc(concurrent_requests=1)
    agent = sc("agent:b", "agent", max_cost_per_day=1.0)
    assert a.acquire(tk("a1", g), nothing) is None
    wb = b.acquire(tk("b1", g, agent, cost=0.5), nothing)
    assert wb is not None and not wb.granted
    assert b.acquire(tk("b0", agent, cost=0.9), nothing) is None
    assert b.release("b0", cost=0.9)  # the agent's budget is spent now
    clock.advance(0.1)
    b.dispatch()  # b1 asks again: refused for good
    assert isinstance(wb.error, BudgetExceededError)
    assert a.release("a1")
    clock.advance(0.01)
    assert a.acquire(tk("a2", g), nothing) is None


def test_local_policy_does_not_reopen_a_spent_budget(clock: FakeClock, redis_prefix: str) -> None:
    """During an outage (policy local) a process keeps each budget from the spend Redis last
    reported, allowing itself local_share of what was left; a budget it never saw is refused."""
    from hive_ratelimit_plugin.errors import BudgetExceededError

    eng = engine(clock, redis_prefix)
    switch = Switch(eng)
    g = sc(max_cost_per_day=1.0)
    assert eng.acquire(tk(1, g, cost=0.9), nothing) is None
    assert eng.release("1", cost=0.9)
    switch.mode = "refuse"
    with pytest.raises(BudgetExceededError):
        eng.acquire(tk(2, g, cost=0.3), nothing)


# ------------------------------------------------------------ end to end
def _dump(prefix: str) -> str:
    """Every key of ``prefix`` with every value it holds, as text."""
    client: Any = redis_client()
    out = []
    for k in client.scan_iter(match="{" + prefix + "}*", count=1000):
        kind = client.type(k).decode()
        value: Any = (client.hgetall(k) if kind == "hash" else client.zrange(k, 0, -1, withscores=True)
                      if kind == "zset" else client.get(k) if kind == "string" else kind)
        out.append(f"{k!r}={value!r}")
    return "\n".join(out)


def test_api_keys_and_secrets_are_never_stored_in_redis(provider: Any, clock: FakeClock, redis_prefix: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """API keys are chosen, used, cooled and settled through Redis: none of their values (nor the
    key passed to the call) ever lands in Redis; the keys are named by their variable only."""
    import litellm

    from hive_ratelimit_plugin import HiveLimiter

    from .helpers import chat_kwargs

    monkeypatch.setenv("HIVE_TEST_KEY_A", "sk-key-AAAA-secret")
    monkeypatch.setenv("HIVE_TEST_KEY_B", "sk-key-BBBB-secret")
    limiter = HiveLimiter({"backend": REDIS_URL, "redis": {"key_prefix": redis_prefix}, "state_path": ":memory:",
                           "providers": {"openai": {"api_keys": [
                               {"env": "HIVE_TEST_KEY_A", "requests_per_minute": 4, "concurrent_requests": 2},
                               {"env": "HIVE_TEST_KEY_B", "requests_per_minute": 4}]}},
                           "budget": {"max_daily_spend": 100}, "runaway": {"enabled": False}}, clock=clock)
    litellm.callbacks.append(limiter)
    monkeypatch.setattr(litellm, "api_base", provider.url)  # (the pool's keys go to the provider's endpoint)
    for n in range(3):
        kw = chat_kwargs(provider, max_tokens=5, metadata={"agent_id": f"agent-{n}"})
        del kw["api_base"]
        litellm.completion(**kw)
    dump = _dump(redis_prefix)
    assert "key:openai/HIVE_TEST_KEY_A" in dump
    assert "secret" not in dump.lower() and "sk-" not in dump and "AAAA" not in dump and "BBBB" not in dump
    assert "hunter" not in repr(limiter.get_usage_stats())


@pytest.mark.parametrize("policy", ["local", "closed", "open"])
def test_stats_and_memory_never_raise_while_redis_is_down(clock: FakeClock, policy: str) -> None:

    from hive_ratelimit_plugin import HiveLimiter

    from .helpers import unused_port

    port = unused_port()  # (nobody listens there)
    limiter = HiveLimiter({"backend": f"redis://:hunter2@127.0.0.1:{port}/0",
                           "redis": {"on_backend_error": policy, "socket_timeout": 0.1},
                           "global": {"requests_per_minute": 5, "concurrent_requests": 2},
                           "budget": {"max_daily_spend": 10}, "state_path": ":memory:"}, clock=clock)
    stats = limiter.get_usage_stats()
    assert stats["backend"]["available"] is False
    assert limiter.redis_memory() == {}
    limiter.reset_budget()
    text = repr(stats) + repr(limiter) + repr(limiter._engine)
    assert "hunter2" not in text


def test_tokens_another_process_gives_back_reach_this_ones_waiters_soon(clock: FakeClock, redis_prefix: str) -> None:
    """A call reserves its estimate and gives back what it did not use when it settles. When that
    happens in another process, a caller waiting here for the token window hears nothing of it:
    it re-asks within half a second instead of sleeping until the window frees the tokens."""
    a, b = engine(clock, redis_prefix), engine(clock, redis_prefix)
    g = sc(tokens_per_minute=30)
    assert a.acquire(tk(1, g, tin=4, tout=10), nothing) is None
    assert a.acquire(tk(2, g, tin=4, tout=10), nothing) is None
    w = b.acquire(tk(3, g, tin=4, tout=10), nothing)
    assert w is not None and not w.granted and w.blocked is not None
    assert w.blocked.retry_at is not None and w.blocked.retry_at <= clock() + 0.5
    # (a caller told to come back later is still told when the window frees the tokens)
    from hive_ratelimit_plugin._waiting import _timeout_error

    assert _timeout_error(b, w, 0.0, "timeout").retry_after == pytest.approx(61.0, abs=1.0)
    assert a.release("1", input_tokens=4, output_tokens=4)
    assert a.release("2", input_tokens=4, output_tokens=4)  # 16 of 30 used now
    clock.advance(0.5)
    b.dispatch()
    assert w.granted


@pytest.mark.parametrize("slot_on", ["scope", "api_key"])
def test_a_busy_process_does_not_keep_a_shared_slot_from_another(slot_on: str, clock: FakeClock,
                                                                 redis_prefix: str) -> None:
    """One slot, process A with a line of callers, process B with one. When A's call ends, A's
    next caller asks at once while B's only re-asks now and then; B's caller was waiting first,
    so the slot is B's: the line holds across processes (it used to wait until A ran out of work).
    The same with the slot on an API key (a provider's keys share one line: a slot on any of
    them will do)."""
    def ticket(n: str) -> Ticket:
        if slot_on == "scope":
            return tk(n, sc(concurrent_requests=1))
        return Ticket(n, [sc()], choices=[sc("key:openai/K1", "key", concurrent_requests=1)], spend_keys=["global"])

    a, b = engine(clock, redis_prefix), engine(clock, redis_prefix)
    assert a.acquire(ticket("a1"), nothing) is None
    wa2 = a.acquire(ticket("a2"), nothing)
    assert wa2 is not None and not wa2.granted
    clock.advance(0.01)
    wb1 = b.acquire(ticket("b1"), nothing)  # behind a2, ahead of what A queues later
    assert wb1 is not None and not wb1.granted
    assert a.release("a1")
    assert wa2.granted  # first in line
    clock.advance(0.01)
    wa3 = a.acquire(ticket("a3"), nothing)
    assert wa3 is not None and not wa3.granted
    assert a.release("a2")
    assert not wa3.granted and wa3.blocked is not None and wa3.blocked.limit == "queue"
    clock.advance(0.1)
    b.dispatch()  # B re-asks
    assert wb1.granted and wb1.ticket.chosen == (None if slot_on == "scope" else "key:openai/K1")
    assert b.release("b1")
    clock.advance(0.1)
    a.dispatch()
    assert wa3.granted
    assert a.release("a3")


def test_a_caller_that_stops_waiting_leaves_the_line_at_once(clock: FakeClock, redis_prefix: str) -> None:
    a, b = engine(clock, redis_prefix), engine(clock, redis_prefix)
    g = sc(concurrent_requests=1)
    assert a.acquire(tk("a1", g), nothing) is None
    wb = b.acquire(tk("b1", g), nothing)
    assert wb is not None and not wb.granted
    b.cancel(wb)  # a timeout or a cancellation
    assert a.release("a1")
    clock.advance(0.01)
    assert a.acquire(tk("a2", g), nothing) is None


def test_a_caller_gone_from_the_line_does_not_hold_it(clock: FakeClock, redis_prefix: str) -> None:
    """A caller that stopped waiting (timed out, cancelled, its process gone) stops re-asking; its
    place goes once it has not asked for a moment, and the next caller gets the slot."""
    import time

    a, b = engine(clock, redis_prefix), engine(clock, redis_prefix)
    g = sc(concurrent_requests=1)
    assert a.acquire(tk("a1", g), nothing) is None
    wb = b.acquire(tk("b1", g), nothing)
    assert wb is not None and not wb.granted
    b._in_line.clear()  # as if B's process were gone: nothing tells Redis
    b.cancel(wb)
    assert a.release("a1")
    clock.advance(0.01)
    w = a.acquire(tk("a2", g), nothing)
    assert w is not None and w.blocked is not None and w.blocked.limit == "queue"  # b1 may still ask
    time.sleep(1.6)  # (Redis' own clock: b1 has not asked for longer than a caller waiting does)
    clock.advance(0.1)
    a.dispatch()
    assert w.granted


def test_a_model_split_while_redis_is_down_moves_its_signals_once_it_is_back(clock: FakeClock,
                                                                             redis_prefix: str) -> None:
    """A model's signals move to the endpoint they came from when it is seen served by a second
    one (see HiveLimiter._endpoint_scopes). Split during an outage, the move is made when Redis
    answers again: else the limit learned from one endpoint stayed on the model in Redis for
    good, holding every endpoint's calls (every process's too) to it."""
    from hive_ratelimit_plugin._retry import RateSignals

    eng = engine(clock, redis_prefix)
    switch = Switch(eng)
    m = sc("model:openai/gpt-4o", "model")
    first = sc("key:openai/gpt-4o@a#1", "key")
    assert eng.acquire(tk(1, m), nothing) is None
    assert eng.release("1", signals=RateSignals(limit_requests=120, remaining_requests=100))
    switch.mode = "refuse"
    eng.move_signals(m.key, first)
    switch.mode = None
    clock.advance(eng.retry_interval + 0.1)
    assert eng.acquire(tk(2, m, first), nothing) is None  # (Redis again: what was kept is written first)
    other = engine(clock, redis_prefix)  # another process sees what Redis holds
    assert other.acquire(tk(3, m), nothing) is None
    assert other.acquire(tk(4, first), nothing) is None
    shown = other.provider_state()
    assert "learned_requests_per_minute" not in shown[m.key]
    assert shown[first.key]["learned_requests_per_minute"] == 120


def test_cooldown_circuit_and_learned_limits_are_shared(clock: FakeClock, redis_prefix: str) -> None:
    """A 429 seen by process A cools the model for B; B learns A's provider limit; a circuit A
    opened blocks B, and B's probe closes it for A."""
    from hive_ratelimit_plugin._retry import RateSignals
    from hive_ratelimit_plugin.errors import CircuitOpenError

    a, b = engine(clock, redis_prefix), engine(clock, redis_prefix)
    for e in (a, b):
        e.circuit_threshold, e.circuit_cooldown = 2, 10.0
    m = sc("model:openai/gpt-4o", "model")
    assert a.acquire(tk(1, m), nothing) is None
    assert a.release("1", outcome="rate_limited", wait=5.0,
                     signals=RateSignals(limit_requests=120, remaining_requests=3))
    w = b.acquire(tk(2, m), nothing)
    assert w is not None and not w.granted and w.blocked is not None and w.blocked.limit == "provider_cooldown"
    assert b.provider_state()["model:openai/gpt-4o"]["learned_requests_per_minute"] == 120
    clock.advance(6)
    b.dispatch()
    assert w.granted
    assert b.release("2", outcome="failure")  # a second failure in a row (across processes): opens
    t3 = tk(3, m)
    t3.deadline = clock() + 1
    with pytest.raises(CircuitOpenError):  # (it would not reopen within the caller's wait)
        a.acquire(t3, nothing)
    clock.advance(11)
    assert b.acquire(tk(4, m), nothing) is None  # the probe
    w5 = a.acquire(tk(5, m), nothing)
    assert w5 is not None and not w5.granted
    assert b.release("4", outcome="success")
    clock.advance(0.2)
    a.dispatch()
    assert w5.granted and a.provider_state()["model:openai/gpt-4o"]["circuit"] == "closed"
    keys = all_keys(redis_prefix)  # after cooldown, pacing, circuit open/half-open/closed
    assert all(ttl > 0 for ttl in keys.values()), keys


# ------------------------------------------------------------ numbers, time
@pytest.mark.parametrize(("limits", "tin", "tout", "expected"), [
    ({"requests_per_second": 3}, 0, 0, 3),
    ({"requests_per_minute": 10**12}, 0, 0, 6),
    ({"tokens_per_minute": 10**15}, 10**14, 10**14, 5),
    ({"tokens_per_minute": 10}, 0, 0, 6),  # zero-token calls never fill a token window
    ({"tokens_per_minute": 1, "requests_per_hour": 2}, 1, 0, 1),
])
def test_numeric_edges_admit_the_same_as_in_memory(clock: FakeClock, make_engine: Any, limits: dict[str, Any],
                                                   tin: int, tout: int, expected: int) -> None:
    eng = make_engine(clock)
    g = Scope("global", "global", LimitSet(**limits))
    granted = sum(eng.acquire(tk(n, g, tin=tin, tout=tout), nothing) is None for n in range(6))
    assert granted == expected


def test_a_far_clock_jump_frees_everything(clock: FakeClock, make_engine: Any) -> None:
    """After a jump of years, windows are empty and an abandoned call's slot is back."""
    eng = make_engine(clock, lease_seconds=30)
    g = sc(requests_per_minute=1, tokens_per_day=100, concurrent_requests=1)
    assert eng.acquire(tk(1, g, tin=60, tout=40), nothing) is None  # never settled
    clock.advance(3 * 365 * 86400)
    eng.dispatch()
    assert eng.acquire(tk(2, g, tin=60, tout=40), nothing) is None


def test_check_config_does_not_print_the_redis_password(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from hive_ratelimit_plugin.cli import main as cli_main

    path = tmp_path / "c.yaml"
    path.write_text("rate_limiting:\n  backend: redis://user:hunter2-secret@redis.internal:6379/0\n")
    assert cli_main(["check-config", str(path), "--no-env"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "redis.internal:6379/0" in out


# ------------------------------------------------------------ threads
def test_two_threads_finding_redis_back_replay_each_settlement_once(clock: FakeClock, redis_prefix: str) -> None:
    """A stats thread and a request thread both find Redis answering again: the settlements kept
    meanwhile are written once, not once per thread."""
    import threading

    eng = engine(clock, redis_prefix, on_error="open")
    switch = Switch(eng)
    g = sc(requests_per_minute=100)
    switch.mode = "refuse"
    for n in range(3):
        assert eng.acquire(tk(n, g), nothing) is None
        assert eng.release(str(n), cost=0.25)
    switch.mode = None
    entered, proceed = threading.Event(), threading.Event()
    charge = eng._charge

    def slow_first_charge(*args: Any, **kwargs: Any) -> Any:
        if not entered.is_set():
            entered.set()
            proceed.wait(2)
        return charge(*args, **kwargs)

    eng._charge = slow_first_charge
    clock.advance(eng.retry_interval + 0.1)
    first = threading.Thread(target=eng.snapshot)
    first.start()
    assert entered.wait(2)
    second = threading.Thread(target=eng.snapshot)
    second.start()
    second.join(0.3)  # (a second replay, if any, runs now)
    proceed.set()
    first.join(5)
    second.join(5)
    eng._charge = charge
    assert eng.spend("global", "day")[0] == pytest.approx(0.75)


# ------------------------------------------------------------ budget windows
def test_a_call_settled_after_the_hour_turned_does_not_wipe_the_new_hour(clock: FakeClock, make_engine: Any) -> None:
    """A call admitted at 00:59:50 settles at 01:00:10, after another call already spent in the
    new hour: its late spend counts in the new hour, and the new hour's spend is kept."""
    eng = make_engine(clock, wall_clock=clock)
    g = sc(max_cost_per_hour=10)
    clock.advance(3590 - clock())  # 00:59:50 on the wall clock
    assert eng.acquire(tk(1, g, cost=1.0), nothing) is None
    clock.advance(20)
    assert eng.acquire(tk(2, g, cost=2.0), nothing) is None
    assert eng.release("2", cost=2.0)
    assert eng.release("1", cost=0.5)
    assert eng.spend("global", "hour")[0] == pytest.approx(2.5)


def test_a_call_settled_after_the_hour_turned_counts_in_the_new_hour(clock: FakeClock, make_engine: Any) -> None:
    eng = make_engine(clock, wall_clock=clock)
    g = sc(max_cost_per_hour=10)
    clock.advance(3590 - clock())
    assert eng.acquire(tk(1, g, cost=1.0), nothing) is None
    clock.advance(20)
    assert eng.release("1", cost=0.5)
    assert eng.spend("global", "hour")[0] == pytest.approx(0.5)


def test_hosts_with_skewed_wall_clocks_share_one_budget_window(clock: FakeClock, redis_prefix: str) -> None:
    """Host A's wall clock runs 5 s ahead of B's. At the hour, A already spends in the new hour
    while B still thinks it is the old one: B must see that spend, not an empty window."""
    from hive_ratelimit_plugin.errors import BudgetExceededError

    clock.advance(3595 - clock())
    a = engine(clock, redis_prefix, wall_clock=lambda: clock() + 5)
    b = engine(clock, redis_prefix)
    g = sc(max_cost_per_hour=10)
    assert a.acquire(tk("a1", g, cost=8.0), nothing) is None
    assert a.release("a1", cost=8.0)
    with pytest.raises(BudgetExceededError):
        b.acquire(tk("b1", g, cost=5.0), nothing)


def age(clock: FakeClock, prefix: str, seconds: float) -> None:
    """Let ``seconds`` pass for the fake clock and for the TTLs of the prefix' keys alike."""
    client: Any = redis_client()
    for k in list(client.scan_iter(match="{" + prefix + "}*", count=1000)):
        left = client.pttl(k)
        if left > 0:
            if left <= seconds * 1000:
                client.delete(k)
            else:
                client.pexpire(k, int(left - seconds * 1000))
    clock.advance(seconds)


def test_a_call_abandoned_over_a_quiet_spell_is_still_charged(clock: FakeClock, redis_prefix: str) -> None:
    """Process A dies holding a $0.4 reservation; nobody calls for half an hour (a batch job
    crashed and restarts). The next admission still reclaims the dead call and charges its worst
    case: spend the provider may have billed is not lost because the lease record expired first."""
    a = engine(clock, redis_prefix, lease_seconds=300)
    g = sc(max_cost_per_day=10.0)
    assert a.acquire(tk("a1", g, cost=0.4), nothing) is None  # then A dies
    age(clock, redis_prefix, 1800)
    b = engine(clock, redis_prefix, lease_seconds=300)
    assert b.acquire(tk("b1", g, cost=0.1), nothing) is None
    assert b.spend("global", "day") == (pytest.approx(0.4), 1, 0)


# ------------------------------------------------------------ hostile usage
@pytest.mark.parametrize(("tokens", "cost"), [(10**15, 0.5), (10, float("inf")), (10, float("nan"))])
@pytest.mark.parametrize("down", [False, True], ids=["up", "replayed"])
def test_absurd_usage_never_takes_the_backend_down(clock: FakeClock, redis_prefix: str, tokens: int, cost: float,
                                                   down: bool) -> None:
    """A provider (or a proxy) reports absurd usage or a cost that is not a number: the settlement
    is recorded sanely; it must not make Redis refuse the script, which would count as an outage
    and, kept for replay, fail again at every recovery (the backend down for good)."""
    eng = engine(clock, redis_prefix)
    switch = Switch(eng)
    g = sc(tokens_per_minute=10**13, max_cost_per_day=10**6, concurrent_requests=5)
    assert eng.acquire(tk(1, g, tin=5, tout=5, cost=2.0), nothing) is None
    switch.mode = "refuse" if down else None
    assert eng.release("1", input_tokens=5, output_tokens=tokens, cost=cost)
    switch.mode = None
    clock.advance(61)  # (past the retry interval, and the token window)
    assert eng.acquire(tk(2, g, tin=5, tout=5, cost=1.0), nothing) is None
    assert eng.available and eng.backend_info()["pending_settlements"] == 0
    spent = eng.spend("global", "day")[0]
    assert spent == pytest.approx(0.5 if cost == 0.5 else 2.0)  # not a number: the worst case is kept


def test_a_kept_settlement_redis_refuses_is_dropped_not_retried_forever(clock: FakeClock, redis_prefix: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    import redis

    eng = engine(clock, redis_prefix)
    switch = Switch(eng)
    g = sc(concurrent_requests=5)
    for n in range(2):
        assert eng.acquire(tk(n, g), nothing) is None
    switch.mode = "refuse"
    assert eng.release("0") and eng.release("1")
    switch.mode = None
    settle = eng._settle_script

    def refuse_first(*args: Any, **kwargs: Any) -> Any:
        eng._settle_script = settle
        raise redis.ResponseError("ERR user_script:1: Script attempted to access nonexistent global variable "
                                  "script: 0123abcd, on @user_script:1.")

    eng._settle_script = refuse_first
    clock.advance(eng.retry_interval + 0.1)
    assert eng.acquire(tk(2, g), nothing) is None
    assert eng.available and eng.backend_info()["pending_settlements"] == 0
    assert any("refused" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------ across processes
def test_warnings_once_and_resets_across_processes(clock: FakeClock, redis_prefix: str) -> None:
    """Two processes settle into one budget: each threshold is announced once in all; a reset
    by one is seen by the other (spend and warnings)."""
    from hive_ratelimit_plugin.errors import BudgetExceededError

    got_a: list[dict[str, Any]] = []
    got_b: list[dict[str, Any]] = []
    a = engine(clock, redis_prefix, warning_thresholds=(0.5,), on_event=got_a.extend)
    b = engine(clock, redis_prefix, warning_thresholds=(0.5,), on_event=got_b.extend)
    g = sc(max_cost_per_day=1.0)
    for n, e in enumerate((a, b, a, b)):
        assert e.acquire(tk(n, g, cost=0.25), nothing) is None
        assert e.release(str(n), cost=0.25)
    kinds = [ev["type"] for ev in got_a + got_b if ev["type"].startswith("budget")]
    assert sorted(kinds) == ["budget_exceeded", "budget_warning"]
    with pytest.raises(BudgetExceededError):
        b.acquire(tk("x", g, cost=0.25), nothing)
    a.reset_spend("global")
    before = len(got_a + got_b)
    assert b.acquire(tk("y", g, cost=0.6), nothing) is None
    assert b.release("y", cost=0.6)
    assert [ev["threshold"] for ev in got_b[before - len(got_a):] if ev["type"] == "budget_warning"] == [0.5]


def test_threads_of_two_processes_never_exceed_a_shared_concurrency_limit(clock: FakeClock,
                                                                          redis_prefix: str) -> None:
    import threading

    engines = [engine(clock, redis_prefix, lease_seconds=10**7), engine(clock, redis_prefix, lease_seconds=10**7)]
    g = sc(concurrent_requests=3, max_cost_per_day=10**6)
    lock = threading.Lock()
    in_flight = [0]
    peak = [0]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        eng = engines[k % 2]
        try:
            for n in range(15):
                cid = f"{k}-{n}"
                ready = threading.Event()
                w = eng.acquire(tk(cid, g, cost=1.0), ready.set)
                while w is not None and not w.granted:  # (notify also means "re-arm your timer")
                    assert w.error is None
                    if not ready.wait(0.01):
                        # A release in the other process is seen when the poll interval has passed
                        # (in clock time: the fake clock must move).
                        clock.advance(0.11)
                        eng.dispatch()
                    ready.clear()
                with lock:
                    in_flight[0] += 1
                    peak[0] = max(peak[0], in_flight[0])
                with lock:
                    in_flight[0] -= 1
                eng.release(cid, cost=0.5)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and peak[0] <= 3
    assert engines[0].spend("global", "day")[0] == pytest.approx(8 * 15 * 0.5)
    assert all_keys(redis_prefix).keys().isdisjoint({"{" + redis_prefix + "}:c:global"})  # every slot back


def test_local_policy_budget_allowance_and_unknown_budgets(clock: FakeClock, redis_prefix: str) -> None:
    """The outage allowance is local_share (0.5) of what was left: $0.40 of $1.00 spent leaves
    $0.60, so this process may spend $0.30 on its own; a scope whose spend it never saw refuses."""
    from hive_ratelimit_plugin.errors import BackendUnavailableError, BudgetExceededError

    eng = engine(clock, redis_prefix)
    switch = Switch(eng)
    g = sc(max_cost_per_day=1.0)
    assert eng.acquire(tk(1, g, cost=0.4), nothing) is None
    assert eng.release("1", cost=0.4)
    switch.mode = "refuse"
    assert eng.acquire(tk(2, g, cost=0.25), nothing) is None  # 0.4 + 0.25 <= 0.4 + 0.3
    assert eng.release("2", cost=0.25)
    with pytest.raises(BudgetExceededError):
        eng.acquire(tk(3, g, cost=0.1), nothing)  # 0.65 + 0.1 > 0.7
    other = sc("agent:new", "agent", max_cost_per_day=5.0)
    with pytest.raises(BackendUnavailableError) as info:
        eng.acquire(tk(4, other, cost=0.1), nothing)
    assert info.value.scope == "agent:new"


def test_an_idle_process_starts_an_outage_from_the_spend_its_status_snapshot_read(
        clock: FakeClock, redis_prefix: str) -> None:
    """A process idle since its last call heard of none of the others' spend since. The status
    snapshot reads the spend of every scope it has seen once a second (``spend_snapshot``, its
    scopes evicted as idle included): the outage allowance starts from that, not from the spend of
    its last call, so that two processes at local_share 1/2 keep the budget (a review probe: $128
    billed against a $100 budget)."""
    from hive_ratelimit_plugin.errors import BudgetExceededError

    idle, busy = engine(clock, redis_prefix), engine(clock, redis_prefix)
    switch = Switch(idle)
    g = sc(max_cost_per_day=1.0)
    assert idle.acquire(tk(1, g, cost=0.1), nothing) is None
    assert idle.release("1", cost=0.1)
    assert busy.acquire(tk(2, g, cost=0.7), nothing) is None
    assert busy.release("2", cost=0.7)
    clock.advance(120)
    idle.sweep()
    assert "global" not in idle._states  # (evicted as idle)
    idle.spend_snapshot()  # (the status snapshot's read)
    switch.mode = "refuse"
    with pytest.raises(BudgetExceededError):
        idle.acquire(tk(3, g, cost=0.2), nothing)  # 0.8 + 0.2 > 0.8 + 0.5 * 0.2 (not 0.1 + 0.5 * 0.9)
    assert idle.acquire(tk(4, g, cost=0.05), nothing) is None


def test_a_host_whose_clock_runs_ahead_does_not_reset_a_budget_for_all(provider: Any, redis_prefix: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Budgets' calendar windows begin at host times. A host whose wall clock is a day ahead
    began "tomorrow" for everyone, wiping today's spend of a shared budget (the fleet then spent
    the budget again); it now counts in the window stored, and says that its clock is off. Real
    clocks here: the guard compares with Redis' own clock."""
    import logging
    import time

    import litellm

    from hive_ratelimit_plugin import BudgetExceededError, HiveLimiter

    from .helpers import chat_kwargs

    caplog.set_level(logging.WARNING, logger="hive_ratelimit_plugin")
    cfg = {"backend": REDIS_URL, "redis": {"key_prefix": redis_prefix}, "state_path": ":memory:",
           "budget": {"max_daily_spend": 40}, "runaway": {"enabled": False}, "status": {"enabled": False},
           "pricing": {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}}
    right = HiveLimiter(cfg)
    ahead = HiveLimiter(cfg, wall_clock=lambda: time.time() + 86400)
    assert any("clock is 86400s ahead of Redis' clock" in r.getMessage() for r in caplog.records)
    litellm.callbacks.append(right)
    for _ in range(3):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 8 each: 24 of 40
    litellm.callbacks[:] = [ahead]
    litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 32
    litellm.callbacks[:] = [right]
    with pytest.raises(BudgetExceededError):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 32 + 14 > 40
    assert provider.state.count() == 4



@pytest.mark.parametrize("how", ["unmeasured at start", "stepped mid-run"])
def test_a_host_clock_not_measured_or_stepped_is_corrected_before_it_counts(
        how: str, provider: Any, redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host clock is corrected to Redis' before a call counts, not up to ten minutes later:
    when Redis could not be asked at start (it was down) and when the host's clock steps (a VM
    resumed a day later in its clock, a bad NTP step)."""
    import time

    import litellm
    import redis

    from hive_ratelimit_plugin import BudgetExceededError, HiveLimiter

    from .helpers import chat_kwargs

    cfg = {"backend": REDIS_URL, "redis": {"key_prefix": redis_prefix}, "state_path": ":memory:",
           "budget": {"max_daily_spend": 40}, "runaway": {"enabled": False}, "status": {"enabled": False},
           "pricing": {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}}}
    right = HiveLimiter(cfg)
    offset = [86400.0 if how == "unmeasured at start" else 0.0]
    if how == "unmeasured at start":
        def down(self: Any) -> Any:
            raise redis.ConnectionError("not yet")

        monkeypatch.setattr(redis.Redis, "time", down)
    other = HiveLimiter(cfg, wall_clock=lambda: time.time() + offset[0])
    monkeypatch.undo()
    litellm.callbacks[:] = [right]
    for _ in range(3):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 24 of 40
    offset[0] = 86400.0  # (stepped mid-run; already so for the other case)
    litellm.callbacks[:] = [other]
    litellm.completion(**chat_kwargs(provider, max_tokens=5))  # 32: today, not "tomorrow"
    litellm.callbacks[:] = [right]
    with pytest.raises(BudgetExceededError):
        litellm.completion(**chat_kwargs(provider, max_tokens=5))
    assert provider.state.count() == 4


def test_a_waiter_tried_while_it_is_cancelled_leaves_no_answer_behind(redis_prefix: str) -> None:
    """A queue pass of another thread (a release, the clock) may try a waiting call while the call
    is being cancelled (its client gone, its wait over). The answer that try keeps for the call
    must go with it, not stay behind for good: one per such call, in a proxy running for weeks."""
    clock = FakeClock()
    eng = engine(clock, redis_prefix)
    one = sc("agent:a", "agent", concurrent_requests=1)
    assert eng.acquire(tk(1, one), nothing) is None
    waiter = eng.acquire(tk(2, one), nothing)
    assert waiter is not None and "2" in eng._last_block

    class Racing(dict):  # type: ignore[type-arg]
        def pop(self, key: Any, default: Any = None) -> Any:
            out = super().pop(key, default)
            if waiter in eng._waiters:  # still queued: a pass tries it now
                eng._try(waiter.ticket, clock())
            return out

    eng._last_block = Racing(eng._last_block)
    assert eng.cancel(waiter) is False
    assert "2" not in eng._last_block
    eng.release("1")
    assert not eng._last_block


def test_forgetting_a_call_held_through_an_outage_charges_nothing_there(clock: FakeClock, redis_prefix: str) -> None:
    """``forget()`` drops a call without settling it (no spend). A call Redis admitted that an
    outage holds a copy of (its slot and reservation counted there): the copy is forgotten too,
    not released as a success at its worst-case cost against the outage's allowance
    (helper-71's review)."""
    eng = engine(clock, redis_prefix, local_share=0.5)
    switch = Switch(eng)
    g = sc(max_cost_per_day=2.0, concurrent_requests=4)
    assert eng.acquire(tk("r0", g, cost=0.5), nothing) is None
    switch.mode = "refuse"
    w = eng.acquire(tk("o0", g, cost=0.1), nothing)  # the outage begins: r0's copy held there
    assert w is None or w.granted or w.blocked is not None
    if w is not None and not w.granted:
        eng.cancel(w)
    else:
        eng.forget("o0")
    assert "r0" in eng._held
    eng.forget("r0")
    assert "r0" not in eng._held and not eng.fallback._leases
    assert eng.fallback.spend("global", "day")[:2] == (0.0, 0)
