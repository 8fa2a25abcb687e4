"""The status page's last hour (proxy/observe/history.py): sends per minute from a send
log's times, and the deepest queue per minute from samples. A fake clock throughout."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from proxy.budget.windows import CredentialBudget, Limit
from proxy.observe.history import MINUTES, QueueHistory, first_minute, sends_per_minute

NOW = 1_800_000_030.5  # 30.5 s into a minute


def test_sends_fall_in_their_wall_clock_minute_oldest_first() -> None:
    start = first_minute(NOW)
    assert start == (NOW // 60 - 59) * 60
    times = [NOW, NOW - 1, NOW - 31, NOW - 60 * 10, start, start - 0.001]
    counts = sends_per_minute(times, NOW, known_since=NOW - 3600)
    assert len(counts) == MINUTES
    assert counts[59] == 2  # 30.5 s and 29.5 s into this minute
    assert counts[58] == 1  # 0.5 s before it began
    assert counts[49] == 1
    assert counts[0] == 1  # the oldest minute's first instant; the one before is cut off
    assert sum(c or 0 for c in counts) == 5


def test_a_send_stamped_ahead_of_now_counts_in_this_minute() -> None:
    # A lease's block is recorded at its end, a quarter second ahead.
    counts = sends_per_minute([NOW + 29.6], NOW, known_since=NOW - 3600)
    assert counts[59] == 1


def test_minutes_older_than_the_log_are_unknown_not_zero() -> None:
    # A budget whose longest window is 10 minutes knows nothing of the 49 minutes that
    # ended before it; the minute it began in is counted as far as it reaches.
    counts = sends_per_minute([NOW - 5], NOW, known_since=NOW - 600.25)
    known = [i for i, c in enumerate(counts) if c is not None]
    assert known == list(range(49, 60))
    assert counts[59] == 1 and counts[49] == 0
    # A window of a second: only this minute.
    counts = sends_per_minute([NOW - 0.5], NOW, known_since=NOW - 1.25)
    assert [i for i, c in enumerate(counts) if c is not None] == [59]


def test_counted_holds_every_send_of_the_longest_window_ours_and_external() -> None:
    budget = CredentialBudget([Limit(100, 60), Limit(1000, 3600)], guard=0.25)
    for at in (NOW - 3000, NOW - 120, NOW - 1):
        budget.record(at)
    budget.load_external(1, [NOW - 1800], NOW)
    assert budget.counted() == [NOW - 3000, NOW - 1800, NOW - 120, NOW - 1]
    counts = sends_per_minute(budget.counted(), NOW, NOW - 3600.25)
    assert sum(c or 0 for c in counts) == 4


def one_by_one(times: list[float], now: float, known_since: float) -> list[int | None]:
    """Each send put in its minute, one at a time: what the search per minute must equal."""
    last = math.floor(now / 60)
    first = last - MINUTES + 1
    counts: list[int | None] = [0] * MINUTES
    for t in times:
        index = min(math.floor(t / 60), last) - first
        if index >= 0:
            counts[index] = (counts[index] or 0) + 1
    for index in range(MINUTES):
        if (first + index + 1) * 60 <= known_since:
            counts[index] = None
    return counts


@given(
    st.lists(st.floats(NOW - 4000, NOW + 5, allow_nan=False), max_size=200),
    st.floats(0, 4000),
    st.sampled_from([0.0, 60.0, 59.999999, 1e-9]),
)
def test_the_count_per_minute_equals_counting_each_send(
    times: list[float], reach: float, shift: float
) -> None:
    now = NOW + shift  # on and near a minute's edge too
    times += [math.floor(t / 60) * 60.0 for t in times[:20]]  # sends on an edge exactly
    assert sends_per_minute(times, now, now - reach) == one_by_one(times, now, now - reach)


def test_the_queue_keeps_the_deepest_sample_of_each_minute() -> None:
    history = QueueHistory()
    assert history.series("default", NOW) == [None] * MINUTES
    for at, depth in ((NOW - 120, 3), (NOW - 100, 7), (NOW - 95, 2), (NOW, 0), (NOW + 1, 4)):
        history.sample("default", at, depth)
    series = history.series("default", NOW + 1)
    assert series[57:] == [7, None, 4]
    assert series[:57] == [None] * 57
    assert history.series("other", NOW) == [None] * MINUTES


def test_the_queue_history_is_bounded_and_slides_with_the_clock() -> None:
    history = QueueHistory(minutes=3)
    for minute in range(10):
        history.sample("default", NOW + 60 * minute, minute)
    assert history.series("default", NOW + 60 * 9) == [7, 8, 9]
    assert history.series("default", NOW + 60 * 10) == [8, 9, None]
    history.sample("default", NOW, 99)  # the clock stepped back: kept in the newest minute
    assert history.series("default", NOW + 60 * 9) == [7, 8, 99]
