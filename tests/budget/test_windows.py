"""Unit tests for proxy.budget.windows: the pure window math. No sockets, no sleeps: the clock is an
argument. The property tests check the budget against brute-force models written here
without its deques, ranks or recurrences.

Random times, windows and guards are drawn on a 1/64 s grid (delays on 1/256 s): sums of
such floats are exact, so the models can compare exactly and a failure is a real bug, never
a rounding ulp. The safety checkers also count in exact fractions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.budget.windows import CredentialBudget, Limit, WindowView

GRID = 64


def grid(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.integers(round(lo * GRID), round(hi * GRID)).map(lambda k: k / GRID)


LIMITS = st.lists(st.builds(Limit, st.integers(1, 20), grid(0.5, 30)), min_size=1, max_size=3)
GUARD = grid(0, 0.5)
KINDS = ("try", "try", "try", "greedy", "greedy", "release", "observe", "external", "freeze")
# One step of a run: (kind, seconds the clock moves first, two small integer arguments).
OPS = st.tuples(st.sampled_from(KINDS), grid(0, 3), st.integers(-2, 25), st.integers(-2, 25))
FAST = settings(max_examples=150, deadline=None)


# --- independent models ------------------------------------------------------------------


def counting(log: Sequence[float], span: float, t: float) -> int:
    """Sends in `log` that count at `t`: a send at x counts while t < x + span."""
    return sum(1 for x in log if Fraction(t) < Fraction(x) + Fraction(span))


def max_in_window(times: Sequence[float], length: Fraction) -> int:
    """Most of `times` inside any half-open window [x, x + length). A fullest window can be
    slid right until it starts at one of the times, so those starts are enough."""
    exact = [Fraction(t) for t in times]
    return max((sum(1 for y in exact if x <= y < x + length) for x in exact), default=0)


def greedy_schedule(
    logs: list[list[float]],
    limits: Sequence[Limit],
    guard: float,
    start: float,
    count: int,
) -> list[float]:
    """The earliest times of `count` sends in order, by search: a time is allowed iff every
    window counts fewer than N of its log, and allowed-ness changes only at `start` or where
    a logged send stops counting, so the earliest allowed time is one of those points."""
    logs = [list(log) for log in logs]
    spans = [limit.per_seconds + guard for limit in limits]
    planned: list[float] = []
    prev = start
    for _ in range(count):
        points = {prev} | {x + s for log, s in zip(logs, spans, strict=True) for x in log}
        t = min(
            p
            for p in points
            if p >= prev
            and all(
                counting(log, s, p) < limit.requests
                for log, s, limit in zip(logs, spans, limits, strict=True)
            )
        )
        for log in logs:
            log.append(t)
        planned.append(t)
        prev = t
    return planned


def optimum_times(limits: Sequence[Limit], guard: float, horizon: float) -> list[float]:
    """Times of the k-th send of the fastest schedule from an empty log at 0. Any schedule
    that keeps every window has s_k >= s_(k-N) + T + guard, so by induction s_k >= t_k for
    t_k = max(0, t_(k-N) + T + guard over windows): no schedule sends more in [0, horizon)."""
    times: list[Fraction] = []
    while True:
        t = max(
            [Fraction(0)]
            + [
                times[-lim.requests] + Fraction(lim.per_seconds) + Fraction(guard)
                for lim in limits
                if len(times) >= lim.requests
            ]
        )
        if t >= horizon:
            return [float(x) for x in times]
        times.append(t)


def run(
    limits: list[Limit], guard: float, ops: list[tuple[str, float, int, int]]
) -> tuple[CredentialBudget, list[float]]:
    """Drive a budget through `ops` on a non-decreasing clock; return it and the sends that
    left (accepted, not released)."""
    budget = CredentialBudget(limits, guard)
    now = 0.0
    live: list[float] = []
    for kind, dt, a, b in ops:
        now += dt
        if kind == "try" and budget.try_record(now):
            live.append(now)
        elif kind == "greedy":
            now += budget.wait_time(now)
            assert budget.try_record(now), "wait_time promised a slot at this time"
            live.append(now)
        elif kind == "release" and live:
            at = live[-1 - a % min(len(live), 4)]  # one of the last few sends
            if budget.release(at):
                live.remove(at)
        elif kind == "observe":
            limit = limits[a % len(limits)].requests if b >= 0 else None
            budget.observe(now, limit=limit, remaining=a, sent_count=b)
        elif kind == "external":
            budget.assume_external(now, a)
        elif kind == "freeze":
            budget.freeze(now + dt)
    return budget, live


# --- basics ------------------------------------------------------------------------------


def test_three_per_ten_with_guard() -> None:
    budget = CredentialBudget([Limit(3, 10)], guard=0.25)
    assert [budget.try_record(0.0) for _ in range(3)] == [True, True, True]
    assert budget.wait_time(0.0) == 10.25
    assert not budget.try_record(0.0)
    assert budget.wait_time(10.0) == 0.25
    assert not budget.try_record(10.249)
    assert budget.wait_time(10.25) == 0.0
    assert budget.try_record(10.25)


def test_refused_attempts_record_nothing() -> None:
    budget = CredentialBudget([Limit(1, 10)], guard=0.0)
    assert budget.try_record(0.0)
    for t in (1.0, 5.0, 9.99):
        assert not budget.try_record(t)
    assert budget.count(9.99, 0) == 1
    assert budget.try_record(10.0)  # refusals did not push the slot back


def test_two_limits_interact() -> None:
    budget = CredentialBudget([Limit(40, 10), Limit(12, 2)], guard=0.25)
    sent: list[float] = []
    for burst_at in (0.0, 2.25, 4.5):
        assert budget.wait_time(burst_at) == 0.0
        while budget.try_record(burst_at):
            sent.append(burst_at)
        assert budget.wait_time(burst_at) == 2.25  # the 12/2 window binds
    assert len(sent) == 36
    for _ in range(4):
        assert budget.try_record(6.75)
    assert budget.wait_time(6.75) == 3.5  # now the 40/10 window binds: 0 + 10.25
    assert budget.count(6.75, 0) == 40
    assert budget.count(6.75, 1) == 4  # the burst at 4.5 stopped counting at 4.5 + 2.25
    assert budget.remaining(6.75, 0) == 0
    assert budget.remaining(6.75, 1) == 8


def test_bad_limits_and_guard_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CredentialBudget([])
    for requests, per in ((0, 1.0), (1, 0.0), (1, -1.0), (1, math.nan), (1, math.inf)):
        with pytest.raises(ValueError, match=r"requests|per_seconds"):
            Limit(requests, per)
    with pytest.raises(ValueError, match="integer"):
        Limit(True, 1.0)
    for guard in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="guard"):
            CredentialBudget([Limit(1, 1)], guard=guard)
    with pytest.raises(ValueError, match="now"):
        CredentialBudget([Limit(1, 1)]).try_record(math.nan)


def test_a_clock_step_back_keeps_later_sends_counting() -> None:
    budget = CredentialBudget([Limit(1, 10)], guard=0.0)
    assert budget.try_record(100.0)
    assert budget.count(95.0, 0) == 1
    assert budget.wait_time(95.0) == 15.0  # until 100 + 10, where that send stops counting
    assert not budget.try_record(95.0)
    assert budget.try_record(110.0)


# --- release, freeze ---------------------------------------------------------------------


def test_release_gives_the_slot_back() -> None:
    budget = CredentialBudget([Limit(2, 10), Limit(5, 60)], guard=0.0)
    assert budget.try_record(0.0)
    assert budget.try_record(1.0)
    assert not budget.try_record(2.0)
    assert budget.release(1.0)
    assert budget.count(2.0, 0) == 1
    assert budget.count(2.0, 1) == 1  # gone from every window
    assert budget.try_record(2.0)
    assert not budget.release(5.0)  # never recorded
    assert budget.sends() == [0.0, 2.0]


def test_release_removes_exactly_one_of_equal_sends() -> None:
    budget = CredentialBudget([Limit(3, 10)], guard=0.0)
    for _ in range(3):
        assert budget.try_record(4.0)
    assert budget.release(4.0)
    assert budget.count(4.0, 0) == 2
    assert budget.sends() == [4.0, 4.0]


def test_release_never_uncovers_an_older_send() -> None:
    # With externals the window holds more than N entries; releasing a newer one must
    # leave the older ones counting (a log cut to its newest N would have lost them).
    budget = CredentialBudget([Limit(2, 10)], guard=0.0)
    assert budget.try_record(0.0)
    assert budget.try_record(1.0)
    budget.observe(1.0, limit=2, remaining=0, sent_count=1)  # one send we did not make
    assert budget.release(1.0)
    assert budget.count(1.5, 0) == 2
    assert not budget.try_record(1.5)
    assert budget.wait_time(1.5) == 8.5  # the send at 0 stops counting at 10


def test_release_does_not_take_back_an_external_send() -> None:
    budget = CredentialBudget([Limit(5, 10)], guard=0.0)
    budget.assume_external(3.0, 2)
    assert not budget.release(3.0)
    assert budget.count(3.0, 0) == 2


def test_freeze_blocks_and_expires() -> None:
    budget = CredentialBudget([Limit(10, 10)], guard=0.0)
    assert budget.frozen_until(0.0) is None
    budget.freeze(5.0)
    budget.freeze(3.0)  # an earlier end never shortens the freeze
    assert budget.frozen_until(0.0) == 5.0
    assert budget.wait_time(1.0) == 4.0
    assert budget.predict_wait(1.0, 0) == 4.0
    assert not budget.try_record(4.9)
    assert budget.frozen_until(5.0) is None
    assert budget.try_record(5.0)
    budget.freeze(8.0)
    assert budget.frozen_until(6.0) == 8.0
    with pytest.raises(ValueError, match="until"):
        budget.freeze(math.inf)


# --- observe, assume_external, load --------------------------------------------------------


def hour_and_minute(guard: float = 0.0) -> CredentialBudget:
    return CredentialBudget([Limit(1000, 3600), Limit(100, 60)], guard=guard)


def test_observe_adds_external_sends_to_that_window_only() -> None:
    budget = hour_and_minute()
    assert budget.try_record(0.0)
    sent = budget.own_count(0.0, 0)
    assert sent == 1
    budget.observe(0.5, limit=1000, remaining=990, sent_count=sent)  # echowin counts 10
    assert budget.count(0.5, 0) == 10
    assert budget.count(0.5, 1) == 1
    assert budget.own_count(0.5, 0) == 1
    assert budget.snapshot(0.5)[0].external == 9
    budget.observe(0.6, limit=1000, remaining=990, sent_count=sent)  # same news again
    assert budget.count(0.6, 0) == 10
    budget.observe(0.7, limit=1000, remaining=985, sent_count=sent)  # 5 more out there
    assert budget.count(0.7, 0) == 15
    # External sends are stamped when we learn of them: they count as long as possible.
    assert budget.count(3600.5 - 1e-6, 0) == 14
    assert budget.count(3600.7, 0) == 0


def test_observe_never_lowers_our_count() -> None:
    budget = hour_and_minute()
    for t in (0.0, 1.0, 2.0):
        assert budget.try_record(t)
    budget.observe(3.0, limit=1000, remaining=999, sent_count=3)  # echowin counts fewer
    assert budget.count(3.0, 0) == 3
    assert budget.count(3.0, 1) == 3
    assert budget.snapshot(3.0)[0].external == 0


def test_observe_picks_the_window_by_its_limit_else_the_longest() -> None:
    budget = CredentialBudget([Limit(100, 60), Limit(1000, 3600)], guard=0.0)
    assert budget.window_index(100) == 0
    assert budget.window_index(1000) == 1
    assert budget.window_index(777) == 1
    budget.observe(0.0, limit=100, remaining=90, sent_count=0)
    assert [v.external for v in budget.snapshot(0.0)] == [10, 0]
    budget.observe(0.0, limit=5000, remaining=4980, sent_count=0)  # no such window
    assert [v.external for v in budget.snapshot(0.0)] == [10, 20]


@pytest.mark.parametrize(
    ("limit", "remaining", "sent_count"),
    [
        (None, 0, 0),
        (100, None, 0),
        (100, 0, None),
        (100, -1, 0),
        (100, 101, 0),
        (0, 0, 0),
        (-5, -10, 0),
        (100, 0, -1),
    ],
)
def test_observe_ignores_missing_and_garbage_values(
    limit: int | None, remaining: int | None, sent_count: int | None
) -> None:
    budget = hour_and_minute()
    budget.observe(0.0, limit=limit, remaining=remaining, sent_count=sent_count)
    assert [v.used for v in budget.snapshot(0.0)] == [0, 0]


def test_observe_adds_at_most_n_per_call() -> None:
    budget = CredentialBudget([Limit(5, 10)], guard=0.0)
    budget.observe(0.0, limit=1000, remaining=0, sent_count=0)  # not our window: longest
    assert budget.count(0.0, 0) == 5


def test_assume_external_fills_every_window_up_to_used() -> None:
    budget = hour_and_minute(guard=0.25)
    for _ in range(3):
        assert budget.try_record(0.0)
    budget.assume_external(10.0, 250)
    views = budget.snapshot(10.0)
    assert [(v.used, v.external) for v in views] == [(250, 247), (100, 97)]
    # The minute window is full until our own oldest send stops counting (0 + 60.25); the
    # 97 external ones count there as if they had all just happened.
    assert budget.wait_time(10.0) == 50.25
    budget.assume_external(20.0, 5)  # already counting more: nothing to add
    assert [v.used for v in budget.snapshot(20.0)] == [250, 100]
    assert budget.count(60.25, 1) == 97
    assert budget.sends() == [0.0, 0.0, 0.0]  # external sends are not ours to persist


def test_load_drops_sends_no_window_counts() -> None:
    budget = CredentialBudget([Limit(3, 10), Limit(5, 100)], guard=0.0)
    budget.load([99.0, 0.0, 50.0, 95.0], now=100.0)  # any order
    assert budget.sends() == [50.0, 95.0, 99.0]
    assert budget.count(100.0, 0) == 2
    assert budget.count(100.0, 1) == 3
    assert budget.try_record(100.0)
    assert not budget.try_record(100.0)
    assert budget.wait_time(100.0) == 5.0  # 95 + 10
    with pytest.raises(ValueError, match="send time"):
        budget.load([math.nan], now=100.0)


def test_load_merges_with_what_is_recorded() -> None:
    budget = CredentialBudget([Limit(5, 10)], guard=0.0)
    assert budget.try_record(5.0)
    budget.load([2.0, 6.0], now=7.0)
    assert budget.sends() == [2.0, 5.0, 6.0]
    assert budget.reset_at(7.0, 0) == 12.0


def test_views() -> None:
    budget = CredentialBudget([Limit(3, 10), Limit(10, 60)], guard=0.5)
    assert budget.limits == (Limit(3, 10), Limit(10, 60))
    assert budget.guard == 0.5
    assert budget.reset_at(0.0, 0) == 0.0
    assert budget.try_record(1.0)
    assert budget.try_record(2.0)
    assert budget.reset_at(3.0, 0) == 11.5
    assert budget.remaining(3.0, 0) == 1
    assert budget.snapshot(3.0) == [
        WindowView(requests=3, per_seconds=10, used=2, remaining=1, reset_in=8.5, external=0),
        WindowView(requests=10, per_seconds=60, used=2, remaining=8, reset_in=58.5, external=0),
    ]
    assert budget.snapshot(11.5)[0].used == 1
    assert budget.sends() == [1.0, 2.0]


# --- predict_wait ------------------------------------------------------------------------


def test_predict_wait_walks_both_windows() -> None:
    budget = CredentialBudget([Limit(40, 10), Limit(12, 2)], guard=0.25)
    assert budget.predict_wait(0.0, 0) == 0.0
    assert budget.predict_wait(0.0, 11) == 0.0
    assert budget.predict_wait(0.0, 12) == 2.25
    assert budget.predict_wait(0.0, 39) == 6.75
    assert budget.predict_wait(0.0, 40) == 10.25
    assert budget.predict_wait(0.0, 80) == 20.5
    assert budget.predict_wait(0.0, 80, horizon=20.5) == 20.5
    assert budget.predict_wait(0.0, 80, horizon=20.4) == math.inf
    # A cap keeps a huge queue cheap: the walk stops once it passes the horizon.
    assert budget.predict_wait(0.0, 10**7, horizon=10.0) == math.inf
    with pytest.raises(ValueError, match="ahead"):
        budget.predict_wait(0.0, -1)


@FAST
@given(
    limits=LIMITS,
    guard=GUARD,
    ops=st.lists(OPS.filter(lambda op: op[0] != "observe"), max_size=30),
    back=st.one_of(st.just(0.0), grid(0, 5)),
    ahead=st.integers(0, 25),
    horizon=grid(0, 40),
)
def test_predict_wait_equals_the_greedy_schedule(
    limits: list[Limit],
    guard: float,
    ops: list[tuple[str, float, int, int]],
    back: float,
    ahead: int,
    horizon: float,
) -> None:
    # Build the state and, beside it, a plain model: each window's log of counting sends.
    budget = CredentialBudget(limits, guard)
    spans = [lim.per_seconds + guard for lim in limits]
    logs: list[list[float]] = [[] for _ in limits]
    frozen = -math.inf
    now = 0.0
    for kind, dt, a, _ in ops:
        now += dt
        if kind in ("try", "greedy", "release") and budget.try_record(now):
            for log in logs:
                log.append(now)
        elif kind == "external":
            budget.assume_external(now, a)
            for log, s, lim in zip(logs, spans, limits, strict=True):
                log.extend([now] * (min(a, lim.requests) - counting(log, s, now)))
        elif kind == "freeze":
            budget.freeze(now + dt)
            frozen = max(frozen, now + dt)
    # Sends that stopped counting by the latest clock seen are forgotten, even if the clock
    # then steps back (`back`): real time has passed beyond them.
    logs = [[x for x in log if now < x + s] for log, s in zip(logs, spans, strict=True)]
    at = now - back
    want = greedy_schedule(logs, limits, guard, max(at, frozen), ahead + 1)[-1] - at
    assert budget.predict_wait(at, ahead) == want
    assert budget.predict_wait(at, 0) == budget.wait_time(at)
    capped = budget.predict_wait(at, ahead, horizon=horizon)
    assert capped == (want if want <= horizon else math.inf)


def test_predict_wait_far_from_every_limit_copies_no_log(monkeypatch: pytest.MonkeyPatch) -> None:
    # An open lease logs its slots at its end, after ``now``: the prediction replays the
    # greedy schedule on a copy of every log, unless every window has room for the whole
    # queue, where all of it goes at once (or when a freeze ends).
    budget = CredentialBudget([Limit(10_000, 3600), Limit(1_000, 60)], 0.25)
    for _ in range(256):
        budget.record(1.5)  # a lease ending at 1.5
    monkeypatch.setattr(CredentialBudget, "_replay", lambda *args: pytest.fail("replayed"))
    assert budget.predict_wait(1.0, 0) == 0.0
    assert budget.predict_wait(1.0, 743) == 0.0  # 256 + 743 + 1 = 1,000: still room
    assert budget.predict_wait(1.0, 743, horizon=0.0) == 0.0
    budget.freeze(3.0)
    assert budget.predict_wait(1.0, 10) == 2.0
    assert budget.predict_wait(1.0, 10, horizon=1.0) == math.inf
    monkeypatch.undo()
    # no room for 745 at the end of the freeze: the last waits for the lease to stop counting
    assert budget.predict_wait(1.0, 744) == pytest.approx(1.5 + 60.25 - 1.0)


def recurrence_schedule(
    logs: list[list[float]], limits: Sequence[Limit], guard: float, start: float, count: int
) -> list[float]:
    """The walk ``predict_wait`` made before it became O(1) in ``ahead``, kept as a
    reference: planned send k waits until send number ``len + k - N`` of the window's log
    followed by the planned sends stops counting (logs sorted, none later than ``start``)."""
    spans = [limit.per_seconds + guard for limit in limits]
    planned: list[float] = []
    for extra in range(count):
        at = planned[-1] if planned else start
        for log, span, limit in zip(logs, spans, limits, strict=True):
            rank = len(log) + extra - limit.requests
            if rank >= 0:
                at = max(at, (log[rank] if rank < len(log) else planned[rank - len(log)]) + span)
        planned.append(at)
    return planned


@settings(max_examples=300, deadline=None)
@given(
    limits=st.lists(st.builds(Limit, st.integers(1, 12), grid(0.5, 30)), min_size=1, max_size=4),
    guard=GUARD,
    ops=st.lists(OPS, max_size=60),
    wait=grid(0, 40),
    aheads=st.lists(st.integers(0, 400), min_size=1, max_size=6),
    horizon=grid(0, 200),
)
def test_predict_wait_equals_the_replaced_walk(
    limits: list[Limit],
    guard: float,
    ops: list[tuple[str, float, int, int]],
    wait: float,
    aheads: list[int],
    horizon: float,
) -> None:
    # Deep queues over several small windows: the reach takes many steps and mixes windows.
    # Every op kind runs, ``observe`` included (external sends in one window only).
    budget, _ = run(limits, guard, ops)
    logs = [[at for at, _ in window.entries] for window in budget._windows]
    latest = max((log[-1] for log in logs if log), default=0.0)
    now = latest + wait
    spans = [lim.per_seconds + guard for lim in limits]
    logs = [[x for x in log if now < x + span] for log, span in zip(logs, spans, strict=True)]
    frozen = budget.frozen_until(now)
    start = now if frozen is None else frozen
    want = recurrence_schedule(logs, limits, guard, start, max(aheads) + 1)
    for ahead in aheads:  # in any order: the reach is extended, never recomputed
        assert budget.predict_wait(now, ahead) == want[ahead] - now
        capped = budget.predict_wait(now, ahead, horizon=horizon)
        assert capped == (want[ahead] - now if want[ahead] - now <= horizon else math.inf)


# --- the promises ----------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(limits=LIMITS, guard=GUARD, ops=st.lists(OPS, max_size=80))
def test_no_window_ever_holds_more_than_n_sends(
    limits: list[Limit], guard: float, ops: list[tuple[str, float, int, int]]
) -> None:
    _, sent = run(limits, guard, ops)
    for lim in limits:
        length = Fraction(lim.per_seconds) + Fraction(guard)
        assert max_in_window(sent, length) <= lim.requests


@settings(max_examples=300, deadline=None)
@given(
    limits=LIMITS,
    guard=GUARD,
    ops=st.lists(OPS, max_size=80),
    base=grid(0, 2),
    jitter=st.lists(st.integers(0, 4), min_size=80, max_size=80),
)
def test_jitter_within_guard_never_overfills_echowins_windows(
    limits: list[Limit],
    guard: float,
    ops: list[tuple[str, float, int, int]],
    base: float,
    jitter: list[int],
) -> None:
    # Each send reaches echowin after a delay in [base, base + guard]; echowin counts each
    # limit over windows of exactly T on its arrival clock.
    _, sent = run(limits, guard, ops)
    arrivals = [s + base + guard * j / 4 for s, j in zip(sent, jitter, strict=False)]
    for lim in limits:
        assert max_in_window(arrivals, Fraction(lim.per_seconds)) <= lim.requests


def saturate(budget: CredentialBudget, horizon: float) -> list[float]:
    """A sender with endless demand: sends whenever allowed, else sleeps exactly until then.
    Checks every decision against the model, so a refusal with free budget fails too."""
    spans = [lim.per_seconds + budget.guard for lim in budget.limits]
    sent: list[float] = []
    t = 0.0
    while t < horizon:
        recent = sent[-max(lim.requests for lim in budget.limits) :]
        free = all(
            counting(recent, s, t) < lim.requests
            for s, lim in zip(spans, budget.limits, strict=True)
        )
        wait = budget.wait_time(t)
        assert (wait == 0.0) == free
        if wait == 0.0:
            assert budget.try_record(t)
            sent.append(t)
        else:
            t += wait
    return sent


def test_full_use_of_forty_per_ten_and_twelve_per_two() -> None:
    budget = CredentialBudget([Limit(40, 10), Limit(12, 2)], guard=0.25)
    sent = saturate(budget, 30.0)
    # 40 per 10.25 s period (12 + 12 + 12 + 4 at 0, 2.25, 4.5, 6.75), three periods.
    assert len(sent) == 120
    assert sent == optimum_times(budget.limits, 0.25, 30.0)


@FAST
@given(limits=LIMITS, guard=GUARD, horizon=grid(1, 20))
def test_full_use_matches_the_optimum(limits: list[Limit], guard: float, horizon: float) -> None:
    budget = CredentialBudget(limits, guard)
    assert saturate(budget, horizon) == optimum_times(limits, guard, horizon)
