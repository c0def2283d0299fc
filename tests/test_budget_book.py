"""BudgetBook: spend tallied on the hot path is never lost, double counted or filed under the wrong window."""

from __future__ import annotations

from hive_ratelimit_plugin._budget import BudgetBook

HOUR_A = {"hour": 0.0, "day": 0.0, "month": 0.0, "run": 0.0}
HOUR_B = {"hour": 3600.0, "day": 0.0, "month": 0.0, "run": 0.0}  # the next hour, same day


def test_repeated_adds_are_all_read_back() -> None:
    book = BudgetBook()
    keys = ["global", "agent:a"]
    for _ in range(3):
        book.add(keys, HOUR_A, 0.5, 1, 10)
    for key in keys:
        c = book.get(key, "hour", 0.0)
        assert c is not None and (c.cost, c.requests, c.tokens) == (1.5, 3, 30)
    book.add(keys, HOUR_A, 0.5, 1, 10)  # after a read, still counted
    c = book.get("agent:a", "day", 0.0)
    assert c is not None and c.requests == 4


def test_equal_key_lists_that_are_different_objects_both_count() -> None:
    book = BudgetBook()
    book.add(["global"], HOUR_A, 1.0, 1, 1)
    book.add(["global"], HOUR_A, 2.0, 1, 1)
    c = book.get("global", "hour", 0.0)
    assert c is not None and (c.cost, c.requests) == (3.0, 2)


def test_a_new_hour_files_earlier_spend_under_the_earlier_hour() -> None:
    book = BudgetBook()
    keys = ["global"]
    book.add(keys, HOUR_A, 1.0, 1, 10)
    book.add(keys, dict(HOUR_B), 2.0, 1, 5)  # the calendar moved on: a new starts dict
    earlier = book.get("global", "hour", 0.0)  # rolled over: the earlier hour's counter is gone, and a
    assert earlier is not None and earlier.start == 3600.0  # clock stepped back reads (and adds to) the newest
    hour = book.get("global", "hour", 3600.0)
    day = book.get("global", "day", 0.0)
    assert hour is not None and (hour.cost, hour.requests, hour.tokens) == (2.0, 1, 5)
    assert day is not None and (day.cost, day.requests, day.tokens) == (3.0, 2, 15)


def test_many_distinct_key_lists_overflow_the_tab_without_loss() -> None:
    book = BudgetBook()
    lists = [["global", f"agent:{i}"] for i in range(200)]
    for keys in lists * 2:
        book.add(keys, HOUR_A, 1.0, 1, 1)
    total = book.get("global", "month", 0.0)
    assert total is not None and total.requests == 400
    for i in (0, 63, 64, 199):
        c = book.get(f"agent:{i}", "hour", 0.0)
        assert c is not None and c.requests == 2


def test_spend_from_elsewhere_and_every_reader_see_the_tab() -> None:
    book = BudgetBook()
    keys = ["global"]
    book.add(keys, HOUR_A, 1.0, 1, 1)
    book.add(["global"], HOUR_A, 4.0, 1, 1, since=0.0)  # another process's row
    assert dict((k, c.cost) for k, c in book.items())[("global", "hour")] == 5.0
    book.add(keys, HOUR_A, 1.0, 1, 1)
    assert len(book) == 3  # hour, day, month of "global"
    book.add(keys, HOUR_A, 1.0, 1, 1)
    book.clear("global")
    assert book.get("global", "hour", 0.0) is None
    book.add(keys, HOUR_A, 1.0, 1, 1)
    book.set("global", "day", 0.0, 10.0, 1, 1)
    day, hour = book.get("global", "day", 0.0), book.get("global", "hour", 0.0)
    assert day is not None and day.cost == 10.0
    assert hour is not None and hour.cost == 1.0
    book.add(keys, HOUR_A, 1.0, 1, 1)
    book.sweep(HOUR_B)  # the hour rolled over: its counter goes, the day's stays
    assert book.get("global", "hour", 0.0) is None
    day = book.get("global", "day", 0.0)
    assert day is not None and day.cost == 11.0
