"""Unit tests for proxy.budget.classes: reserve, pace and the class views. No sockets, no
sleeps: the clock is an argument, moved by hypothesis on a 1/64 s grid (sums exact).

Each property drives a :class:`CredentialBudget` and a :class:`ClassBook` the way a lane does
(a send goes when the budget and the class rules both allow it) and checks the outcome
against counts made here by brute force."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.budget.class_queue import ClassQueue
from proxy.budget.classes import UNCLASSED, ClassBook, ServiceClass
from proxy.budget.windows import CredentialBudget, Limit

GRID = 64
FAST = settings(max_examples=150, deadline=None)
NAMES = ("interactive", "batch", "reports")


def grid(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.integers(round(lo * GRID), round(hi * GRID)).map(lambda k: k / GRID)


@dataclass
class Setup:
    limits: list[Limit]
    guard: float
    classes: list[ServiceClass]


@st.composite
def setups(draw: st.DrawFn, pace: bool | None = None) -> Setup:
    """Limits of distinct lengths, 1-3 classes whose reservations fit every limit."""
    lengths = draw(st.lists(grid(0.5, 20), min_size=1, max_size=3, unique=True))
    limits = [Limit(draw(st.integers(1, 15)), length) for length in lengths]
    count = draw(st.integers(1, 3))
    left = [lim.requests for lim in limits]
    classes = []
    for name in NAMES[:count]:
        reserve = []
        for index, lim in enumerate(limits):
            held = draw(st.integers(0, left[index]))
            if held:
                left[index] -= held
                reserve.append(Limit(held, lim.per_seconds))
        paced = draw(st.booleans()) if pace is None else pace
        burst = draw(st.one_of(st.none(), st.integers(1, 10))) if paced else None
        weight = draw(st.integers(1, 4))
        classes.append(ServiceClass(name, weight, tuple(reserve), paced, burst))
    return Setup(limits, draw(grid(0, 0.5)), classes)


def book_of(setup: Setup) -> tuple[CredentialBudget, ClassBook]:
    budget = CredentialBudget(setup.limits, setup.guard)
    return budget, ClassBook(setup.classes, setup.limits, setup.guard, setup.classes[0].name)


def counting(sends: Sequence[float], span: float, t: float) -> int:
    return sum(1 for s in sends if s <= t < s + span)


def send(budget: CredentialBudget, book: ClassBook, name: str, now: float) -> bool:
    """What a lane does: the class rules first, then the budget's hard cap."""
    if budget.wait_time(now) > 0 or not book.allows(name, now, budget):
        return False
    assert budget.try_record(now)
    book.record(name, now)
    return True


STEPS = st.lists(st.tuples(grid(0, 2), st.integers(0, 2)), min_size=1, max_size=80)


@FAST
@given(setups(), STEPS)
def test_every_limit_holds_and_no_class_under_its_reserve_is_refused(
    setup: Setup, steps: list[tuple[float, int]]
) -> None:
    budget, book = book_of(setup)
    sent: dict[str, list[float]] = {c.name: [] for c in setup.classes}
    now = 0.0
    for dt, pick in steps:
        now += dt
        cls = setup.classes[pick % len(setup.classes)]
        # Under its reservation in every window it reserves in, and reserving in every
        # window: whatever the others sent, it goes.
        held = {r.per_seconds: r.requests for r in cls.reserve}
        under = len(held) == len(setup.limits) and all(
            counting(sent[cls.name], lim.per_seconds + setup.guard, now) < held[lim.per_seconds]
            for lim in setup.limits
        )
        if send(budget, book, cls.name, now):
            sent[cls.name].append(now)
        elif under and not cls.pace:
            raise AssertionError(f"{cls.name} refused under its reservation at {now}")
    everything = sorted(t for times in sent.values() for t in times)
    for lim in setup.limits:
        span = lim.per_seconds + setup.guard
        for t in everything:
            assert counting(everything, span, t) <= lim.requests


@FAST
@given(setups(pace=False), STEPS)
def test_alone_a_class_gets_everything_the_others_have_not_reserved(
    setup: Setup, steps: list[tuple[float, int]]
) -> None:
    budget, book = book_of(setup)
    cls = setup.classes[-1]
    others = [{r.per_seconds: r.requests for r in c.reserve} for c in setup.classes if c is not cls]
    now = 0.0
    for dt, _ in steps:
        now += dt
        # It may send exactly while every window has more free than the others reserve.
        expected = all(
            lim.requests - budget.count(now, i) > sum(o.get(lim.per_seconds, 0) for o in others)
            for i, lim in enumerate(setup.limits)
        )
        assert book.allows(cls.name, now, budget) == expected
        if expected:
            assert send(budget, book, cls.name, now)


@FAST
@given(setups(pace=True), st.lists(grid(0, 1.5), min_size=1, max_size=80))
def test_a_paced_class_alone_never_exceeds_its_rate_plus_burst(
    setup: Setup, gaps: list[float]
) -> None:
    budget, book = book_of(setup)
    cls = setup.classes[0]
    shortest = min(setup.limits, key=lambda lim: lim.per_seconds).requests
    burst = cls.burst if cls.burst is not None else shortest
    sent: list[float] = []
    now = 0.0
    for gap in gaps:
        now += gap
        while send(budget, book, cls.name, now):  # as fast as it is let
            sent.append(now)
    for lim in setup.limits:
        for a, start in enumerate(sent):
            for b in range(a, len(sent)):
                t = sent[b] - start
                assert b - a + 1 <= lim.requests * t / lim.per_seconds + burst + 1e-9


@FAST
@given(setups(), STEPS)
def test_the_wait_is_when_the_class_rules_let_it_go(
    setup: Setup, steps: list[tuple[float, int]]
) -> None:
    budget, book = book_of(setup)
    now = 0.0
    for dt, pick in steps:
        now += dt
        name = setup.classes[pick % len(setup.classes)].name
        wait = book.wait(name, now, budget)
        assert (wait <= 0) == book.allows(name, now, budget)
        seen = [(v.share, v.free) for v in book.views(now, budget)[name]]
        assert book.caller_windows(name, now, budget) == seen
        if 0 < wait < 1000:
            assert book.allows(name, now + wait + 1e-9, budget)
        send(budget, book, name, now)


def test_the_worked_example_interactive_keeps_its_reserve_from_a_flat_out_batch() -> None:
    # echowin's limits; interactive reserves 200/h and 20/min; batch runs flat out.
    limits = [Limit(1000, 3600), Limit(100, 60)]
    classes = [
        ServiceClass("interactive", 4, (Limit(200, 3600), Limit(20, 60))),
        ServiceClass("batch"),
    ]
    budget = CredentialBudget(limits, 0.25)
    book = ClassBook(classes, limits, 0.25, "batch")
    batch = sum(send(budget, book, "batch", 0.001 * i) for i in range(200))
    assert batch == 80  # the minute's 100 less interactive's 20
    assert sum(send(budget, book, "interactive", 1 + 0.001 * i) for i in range(30)) == 20
    views = book.views(2.0, budget)
    assert views["interactive"][1] == (100, 60, 20, 20, 0, 100)
    # 1000 - 100 sent, less what interactive has still unused of its 200 (180).
    assert views["batch"][0] == (1000, 3600, 0, 80, 720, 800)


def test_a_paced_batch_spreads_the_hour() -> None:
    limits = [Limit(1000, 3600), Limit(100, 60)]
    budget = CredentialBudget(limits, 0.25)
    book = ClassBook([ServiceClass("batch", pace=True)], limits, 0.25, "batch")
    sent = 0
    for tick in range(600 * 10):  # the first ten minutes, every 0.1 s
        sent += send(budget, book, "batch", tick / 10)
    # At most 1000 * 600 / 3600 + 100 = 266 in ten minutes, where unpaced it had 1000.
    assert 250 <= sent <= 267


def test_a_send_given_back_frees_its_class_reserve_and_pace() -> None:
    limits = [Limit(10, 60)]
    book = ClassBook(
        [ServiceClass("a", reserve=(Limit(5, 60),), pace=True, burst=1), ServiceClass("b")],
        limits,
        0.0,
        "b",
    )
    budget = CredentialBudget(limits, 0.0)
    assert send(budget, book, "a", 0.0)
    assert not book.allows("a", 0.0, budget)  # its burst of 1 is spent
    assert budget.release(0.0) and book.release("a", 0.0)
    assert book.allows("a", 0.0, budget)
    assert book.views(0.0, budget)["a"][0].used == 0


def test_unknown_classes_count_in_the_default_and_bad_books_are_refused() -> None:
    limits = [Limit(10, 60)]
    book = ClassBook([ServiceClass("a"), ServiceClass("b")], limits, 0.0, "b")
    assert book.resolve(None) == "b" and book.resolve("gone") == "b"
    with pytest.raises(ValueError, match="default"):
        ClassBook([ServiceClass("a")], limits, 0.0, "zzz")
    with pytest.raises(ValueError, match="sum past"):
        ClassBook(
            [
                ServiceClass("a", reserve=(Limit(6, 60),)),
                ServiceClass("b", reserve=(Limit(5, 60),)),
            ],
            limits,
            0.0,
            "a",
        )


@given(setups(), STEPS)
@settings(max_examples=50, deadline=None)
def test_a_restart_rebuilds_the_same_decisions(
    setup: Setup, steps: list[tuple[float, int]]
) -> None:
    budget, book = book_of(setup)
    log: list[tuple[float, str | None]] = []
    now = 0.0
    for dt, pick in steps:
        now += dt
        name = setup.classes[pick % len(setup.classes)].name
        if send(budget, book, name, now):
            log.append((now, name))
    assume(log)
    again = CredentialBudget(setup.limits, setup.guard)
    again.load([at for at, _ in log], now)
    rebuilt = ClassBook(setup.classes, setup.limits, setup.guard, setup.classes[0].name)
    rebuilt.load(log, now)
    for cls in setup.classes:
        assert rebuilt.views(now, again)[cls.name] == book.views(now, budget)[cls.name]
        assert rebuilt.allows(cls.name, now, again) == book.allows(cls.name, now, budget)


# --- the queue between classes -----------------------------------------------------------


class _Tally:
    waiting = 0


def _served(queue: ClassQueue[str], n: int, may_send: Callable[[str], bool]) -> list[str]:
    out = []
    for _ in range(n):
        name = queue.next_class(may_send)
        if name is None:
            break
        out.append(queue.pop(name, may_send))
    return out


def test_classes_share_by_class_weight_and_tokens_by_theirs_within() -> None:
    tally = _Tally()
    queue: ClassQueue[str] = ClassQueue(tally, {"interactive": 4, "batch": 1})
    for i in range(20):
        queue.push("calls", 1, f"i{i}", "interactive")
        queue.push("sync", 3, f"s{i}", "batch")
        queue.push("export", 1, f"e{i}", "batch")
    assert (queue.depth, tally.waiting, queue.waiting_tokens()) == (60, 60, 3)
    served = _served(queue, 25, lambda name: True)
    assert sum(s.startswith("i") for s in served) == 20  # 4 of every 5
    batch = [s for s in served if not s.startswith("i")]
    assert len(batch) == 5
    # Inside batch, sync (weight 3) gets three turns to export's one.
    assert (
        sum(s.startswith("s") for s in served[:25])
        >= 3 * sum(s.startswith("e") for s in served[:25]) - 1
    )


def test_a_class_the_rules_hold_back_gives_its_turn_to_the_others() -> None:
    queue: ClassQueue[str] = ClassQueue(_Tally(), {"interactive": 4, "batch": 1})
    for i in range(5):
        queue.push("calls", 1, f"i{i}", "interactive")
        queue.push("sync", 1, f"s{i}", "batch")
    assert _served(queue, 3, lambda name: name == "batch") == ["s0", "s1", "s2"]
    assert queue.next_class(lambda name: False) is None
    assert queue.ahead_of_new("new", 1, "batch") >= 2  # its own two, and interactive's share
    assert queue.ahead_in_class("new", 1, "batch") == 1  # sync, just served, goes after it
    assert queue.remove("calls", "i0") and not queue.remove("calls", "i0")
    assert queue.queued_in("interactive") == 4


def test_a_lease_with_classes_stays_out_of_every_reservation() -> None:
    # Far from every limit a block of slots is reserved at once (a lease); with classes
    # it fits what no reservation needs, and its slots are counted by no class.
    limits = [Limit(10_000, 60)]
    book = ClassBook(
        [ServiceClass("interactive", reserve=(Limit(9_000, 60),)), ServiceClass("batch")],
        limits,
        0.0,
        "batch",
    )
    budget = CredentialBudget(limits, 0.0)
    assert book.surplus(0.0, budget) == 1_000
    budget.record(0.0)
    book.record(UNCLASSED, 0.0)  # a lease's slot: the budget counts it, no class does
    assert book.surplus(0.0, budget) == 999
    assert book.views(0.0, budget)["interactive"][0].used == 0
    assert not book.release(UNCLASSED, 0.0)
