"""Edge cases of the budget, the queue and echowin's rate-limit headers, each found by a
review: a test here failed on the code before its fix. Driven like tests/budget/test_scheduler.py
(a fake clock, timers fired by hand, no real waits)."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.auth.tokens import TokenRecord
from proxy.budget import fairness
from proxy.budget.admission import AdmitRequest
from proxy.budget.fairness import Turns
from proxy.budget.grants import SlotGrant
from proxy.budget.lane import Lane, QueuePolicy
from proxy.budget.local_slots import LocalSlots
from proxy.budget.ratelimit_headers import parse_reset, parse_retry_after
from proxy.budget.scheduler import Scheduler
from proxy.budget.windows import CredentialBudget, Limit
from proxy.state.memory import MemorySendLog, memory_quota_sources
from tests.budget.test_scheduler import (
    CREDENTIAL,
    GUARD,
    T0,
    AdmitTask,
    FakeClock,
    Recorder,
    Rig,
    drain,
    finished,
    fire,
    full_lane,
    granted,
    lane_after_429,
    refuse_now,
    refused,
    rig,
    rl,
    settle,
    token,
)

__all__ = ["rig"]  # the fixture, imported for pytest


# --- malformed headers from echowin ------------------------------------------------------


def test_a_retry_after_of_non_ascii_digits_is_ignored_not_a_crash() -> None:
    # "²".isdigit() is True but int("²") raises: a header aiohttp decodes from UTF-8.
    assert parse_retry_after("²", T0) is None
    assert parse_retry_after("٣", T0) is None
    assert parse_retry_after("3", T0) == T0 + 3


def test_a_retry_after_too_long_for_int_is_far_away_not_a_crash() -> None:
    # int() refuses more than 4300 digits (Python 3.11's limit); aiohttp's client takes a
    # header value of up to 8190 bytes. Like any huge delay, it is far away (a freeze caps
    # it at an hour).
    at = parse_retry_after("9" * 5000, T0)
    assert at is not None and T0 + 3600 < at < math.inf
    assert parse_retry_after("9" * 20, T0) == at


async def test_a_429_with_a_malformed_retry_after_still_freezes_and_ends_the_probe(
    rig: Rig,
) -> None:
    # memory://: uncalibrated, one probe at a time. The probe's 429 must freeze the key and
    # end the probe; a crash in on_response left the lane probing (never sending again).
    lane = rig.lane(MemorySendLog(), Limit(10, 60))
    svc = token("svc")
    probe = await lane.admit(svc, None, 1.0)
    assert isinstance(probe, SlotGrant)
    waiting = await rig.enqueue(lane, svc, max_wait=1000.0)
    probe.sent(429, {"Retry-After": "²"})
    assert lane.budget.frozen_until(T0) == T0 + 60.0  # the default freeze
    assert not lane.probing
    await fire(lane, rig.clock, 60.0)
    (done,) = await finished([waiting], 1)
    assert granted(done).at == T0 + 60.0


# --- the freeze after an unexpected 429 --------------------------------------------------


async def test_a_429_with_retry_after_0_freezes_until_a_future_reset(rig: Rig) -> None:
    # Retry-After: 0 says nothing usable; X-RateLimit-Reset does: 5 s, not the 60 s default.
    lane = await lane_after_429(rig, {"Retry-After": "0", "X-RateLimit-Reset": "5"})  # a delta
    assert lane.budget.frozen_until(T0) == T0 + 5.0


async def test_a_429_with_a_past_retry_after_date_freezes_until_a_future_reset(
    rig: Rig,
) -> None:
    past = "Thu, 01 Jan 1970 00:00:00 GMT"
    lane = await lane_after_429(rig, {"Retry-After": past, "X-RateLimit-Reset": "7"})  # a delta
    assert lane.budget.frozen_until(T0) == T0 + 7.0


async def test_a_frozen_refusal_says_when_the_budget_frees_not_only_the_freeze(
    rig: Rig,
) -> None:
    # echowin's 429 says the window is spent (Remaining 0) and to pause 5 s. The window
    # holds until T0 + 60.25 at least: a Retry-After of 5 sends the client back to be
    # refused again.
    spent = {"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0", "Retry-After": "5"}
    lane = await lane_after_429(rig, spent)
    assert lane.budget.frozen_until(T0) == T0 + 5.0
    first = await refuse_now(lane.admit(token("svc"), None, 1.0), "upstream_frozen")
    assert first.retry_after == pytest.approx(60.25)
    again = await refuse_now(lane.admit(token("svc"), None, 1.0), "upstream_frozen")
    assert again.retry_after == pytest.approx(60.25)  # the known refusal, too


async def test_a_429_refuses_a_waiter_at_once_when_the_budget_outlasts_its_wait(
    rig: Rig,
) -> None:
    # The freeze is 5 s, but the spent window keeps the waiter (deadline T0 + 20) from
    # being served before T0 + 60.25: refuse it now with that Retry-After, not at T0 + 20.
    lane = rig.lane(await rig.sqlite_log(), Limit(1, 1), Limit(10, 60))
    grant = await lane.admit(token("svc"), None, 1.0)
    assert isinstance(grant, SlotGrant)
    waiter = await rig.enqueue(lane, token("other"), max_wait=20.0)
    grant.sent(429, {"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0", "Retry-After": "5"})
    await settle()
    assert waiter.done()
    refusal = waiter.result()
    assert not isinstance(refusal, SlotGrant)
    assert refusal.reason == "upstream_frozen"
    assert refusal.retry_after == pytest.approx(60.25)
    assert lane.depth == 0


# --- token quotas ----------------------------------------------------------------------------


async def test_a_quota_refusal_covers_the_lane_refusal_it_was_told_of(rig: Rig) -> None:
    # Both refuse at once: the quota frees at T0 + 60, the shared budget at T0 + 100.25.
    # A Retry-After of 60 sends the client back to be refused again by the budget.
    lane = rig.lane(await rig.sqlite_log(), Limit(1, 100))
    scheduler = Scheduler(
        {CREDENTIAL: lane},
        rig.policy,
        rig.observer,
        rig.clock,
        quota_sources=memory_quota_sources(rig.clock),
    )
    svc = token("svc", per_minute=1)
    request = AdmitRequest(svc, CREDENTIAL, "/v1/calls", max_wait=1.0)
    assert isinstance(await scheduler.admit(request), SlotGrant)
    other = AdmitRequest(token("other"), CREDENTIAL, "/v1/calls", max_wait=1.0)
    await refuse_now(scheduler.admit(other), "upstream_budget")  # the lane knows its answer
    refusal = await refuse_now(scheduler.admit(request), "token_quota")
    assert refusal.retry_after == pytest.approx(100.25)


# --- fairness: a token whose queue empties as it is served -----------------------------------


async def closed_loop_shares(
    rig: Rig, noisy_weight: int, loop_weights: list[int], slots: int
) -> dict[str, int]:
    """A noisy token with a backlog, and tokens that each keep one request waiting (a
    client with one request in flight: the next comes as soon as the last is served).
    Returns how many of ``slots`` consecutive slots each got."""
    lane, _ = await full_lane(rig, Limit(1, 1))
    noisy = token("noisy", weight=noisy_weight)
    owner = {await rig.enqueue(lane, noisy): "noisy" for _ in range(slots)}
    loops = [token(f"loop{i}", weight=w) for i, w in enumerate(loop_weights)]
    for tok in loops:
        owner[await rig.enqueue(lane, tok)] = tok.name
    shares = dict.fromkeys(["noisy", *(tok.name for tok in loops)], 0)
    for _ in range(slots):
        await fire(lane, rig.clock, 1.25)
        (done,) = await finished(list(owner), 1)
        name = owner.pop(done)
        shares[name] += 1
        for tok in loops:
            if tok.name == name:  # served: its client sends the next one at once
                owner[await rig.enqueue(lane, tok)] = name
    return shares


async def test_a_heavier_token_with_one_request_waiting_does_not_starve_a_noisy_one(
    rig: Rig,
) -> None:
    # Weights 3 and 1, both always waiting: 3 slots in 4 and 1 in 4. Its queue emptying
    # each time it was served used to hand its debt to the noisy token: 8 of 8.
    assert await closed_loop_shares(rig, 1, [3], 8) == {"noisy": 2, "loop0": 6}


async def test_two_one_at_a_time_tokens_and_a_noisy_one_share_by_weight(rig: Rig) -> None:
    shares = await closed_loop_shares(rig, 1, [1, 1], 9)
    assert shares == {"noisy": 3, "loop0": 3, "loop1": 3}


# --- X-RateLimit-Reset as ISO 8601 ------------------------------------------------------------


@pytest.fixture
def new_york() -> Iterator[None]:
    """The process's local time zone is not UTC (a host or container set to one)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.usefixtures("new_york")
def test_an_iso_reset_without_an_offset_is_utc_whatever_the_local_zone() -> None:
    # A timestamp with no offset is UTC (as echowin's Unix seconds are); read as local time
    # it was hours off: a freeze of an hour (the cap) or none at all.
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    assert parse_reset("2026-01-01T12:00:30", now) == now + 30
    assert parse_reset("2026-01-01T12:00:30Z", now) == now + 30
    assert parse_reset("2026-01-01T07:00:30-05:00", now) == now + 30


# --- predicted waits: the round-robin's own order ---------------------------------------------


async def served_at(rig: Rig, lane: Lane, task: AdmitTask, others: list[AdmitTask]) -> float:
    """Step the clock a slot (1.25 s) at a time until ``task`` is granted; its slot's time."""
    while not task.done():
        await fire(lane, rig.clock, 1.25)
        await finished([*others, task], 1)
    return granted(task).at


async def test_a_request_predicted_to_be_served_in_time_is_not_refused(rig: Rig) -> None:
    # Weight 5 with 8 waiting, and a weight-1 newcomer: smooth round-robin serves it
    # third... fourth (3 ahead, T0 + 5), not after a whole round of 5 (T0 + 7.5).
    lane, _ = await full_lane(rig, Limit(1, 1))
    heavy, light = token("heavy", weight=5), token("light")
    backlog = [await rig.enqueue(lane, heavy) for _ in range(8)]
    assert lane.predicted_wait(T0, light, None) == 5.0
    mine = await rig.enqueue(lane, light, max_wait=5.0)  # was refused: 7.5 > 5
    assert await served_at(rig, lane, mine, backlog) == T0 + 5.0


async def test_a_queued_request_is_served_within_its_predicted_wait(rig: Rig) -> None:
    # One t0 waiting, three t1, one t2 (weight 3); a second t0 request is served sixth
    # (T0 + 7.5), not fifth as rounds of weights said (T0 + 6.25): with a max wait of 6.25
    # it was queued, then waited past it, instead of being refused at once.
    lane, _ = await full_lane(rig, Limit(1, 1))
    t0, t1, t2 = token("t0"), token("t1"), token("t2", weight=3)
    others = [await rig.enqueue(lane, t0)]
    others += [await rig.enqueue(lane, t1) for _ in range(3)]
    others += [await rig.enqueue(lane, t2)]
    assert lane.predicted_wait(T0, t0, None) == 7.5
    await refuse_now(lane.admit(t0, None, 6.25), "upstream_budget")
    mine = await rig.enqueue(lane, t0, max_wait=7.5)
    assert await served_at(rig, lane, mine, others) == T0 + 7.5


async def play_prediction(weights: list[int], ops: list[tuple[bool, int]], who: int) -> None:
    clock = FakeClock()
    policy = QueuePolicy(max_wait=1000.0, max_depth=1000, max_depth_per_token=1000)
    lane = Lane(CREDENTIAL, [Limit(1, 1)], GUARD, MemorySendLog(), policy, Recorder(), clock)
    tokens = [token(f"t{i}", weight=w) for i, w in enumerate(weights)]
    tasks: dict[AdmitTask, int] = {}

    def admit(i: int) -> None:
        tasks[asyncio.ensure_future(lane.admit(tokens[i], None, 1000.0))] = i

    try:
        probe = await lane.admit(tokens[0], None, 1.0)
        assert isinstance(probe, SlotGrant)
        probe.sent(200, rl(1, 0))  # calibrated; the window is full until T0 + 1.25
        for step, i in ops:  # arrivals, and slots whose token sends its next at once
            if step and any(not task.done() for task in tasks):
                await fire(lane, clock, 1.25)
                (done,) = await finished(list(tasks), 1)
                if i % 2:
                    admit(tasks[done])
            else:
                admit(i % len(tokens))
            await settle()
        predicted = lane.predicted_wait(clock.now, tokens[who % len(tokens)], None)
        start = clock.now
        admit(who % len(tokens))
        await settle()
        mine = list(tasks)[-1]
        while not mine.done():
            await fire(lane, clock, 1.25)
            await finished(list(tasks), 1)
        assert granted(mine).at - start == predicted
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await lane.close()


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=30),
    who=st.integers(0, 3),
)
def test_the_predicted_wait_is_when_the_round_robin_serves_it(
    weights: list[int], ops: list[tuple[bool, int]], who: int
) -> None:
    # With nobody else arriving, a new request is served exactly when predicted.
    asyncio.run(play_prediction(weights, ops, who))


# --- the cost of a prediction on the arrival path --------------------------------------------


async def spent_lane_with(rig: Rig, waiting: list[TokenRecord], policy: QueuePolicy) -> Lane:
    """A lane of one send a second whose send is spent, one request of each token queued."""
    lane = rig.lane(await rig.sqlite_log(), Limit(1, 1), policy=policy)
    first = await lane.admit(token("filler"), None, 1.0)
    assert isinstance(first, SlotGrant)
    first.sent(200, {})
    for tok in waiting:
        await rig.enqueue(lane, tok)
    return lane


def count_plays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the round-robin's choices (``take_turn`` calls, each counted by the
    members it chooses among: those that wait) are counted in the returned list's one
    item."""
    calls = [0]
    take_turn = fairness.take_turn

    def counted(members: dict[str, Turns]) -> Turns:
        calls[0] += sum(1 for m in members.values() if m.waiting)
        return take_turn(members)

    monkeypatch.setattr(fairness, "take_turn", counted)
    return calls


async def test_a_refusal_flood_does_not_play_the_round_robin_again_for_each_arrival(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 60 tokens wait one request each. Every arrival that is refused predicted its wait by
    # playing the round-robin forward: O(sends ahead * tokens waiting), about 3,700 steps
    # here and 37 ms per refused request at 1,000 tokens, while nothing in the queue had
    # changed since the last arrival. Counted by the round-robin's choices (take_turn).
    waiting = [token(f"w{i}") for i in range(60)]
    policy = QueuePolicy(max_wait=1000.0, max_depth=1000, max_depth_per_token=50)
    lane = await spent_lane_with(rig, waiting, policy)
    calls = count_plays(monkeypatch)
    newcomer, another = token("new"), token("another")
    expected = [
        lane.predicted_wait(T0, tok, None) for tok in (newcomer, another, waiting[7], waiting[59])
    ]
    once = calls[0]
    assert once > 1000  # the exact play, for each kind of arrival
    refusals = []
    for _ in range(50):
        for tok in (newcomer, another, waiting[7], waiting[59]):
            refusals.append(await refuse_now(lane.admit(tok, None, 5.0), "upstream_budget"))
    assert calls[0] == once  # nothing changed in the queue: nothing played again
    assert [r.retry_after for r in refusals] == expected * 50
    # A change in the queue (a slot served) is seen: played again, one fewer ahead.
    await fire(lane, rig.clock, 1.25)
    await settle()
    assert lane.predicted_wait(rig.clock.now, newcomer, None) == expected[0] - 1.25
    assert calls[0] > once


async def test_one_prediction_looks_at_a_bounded_number_of_queues_however_many_tokens_wait(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 500 tokens wait one request each: playing 256 sends forward looked at ~128,000 token
    # queues (about 15 ms) for the first arrival after each change of the queue.
    policy = QueuePolicy(max_wait=10_000.0, max_depth=2000, max_depth_per_token=5)
    lane = await spent_lane_with(rig, [token(f"w{i}") for i in range(500)], policy)
    calls = count_plays(monkeypatch)
    wait = lane.predicted_wait(T0, token("new"), None)
    assert calls[0] <= 10_000  # PLAYED_WORK (8,192) and one last pick, then the bound by rounds
    assert wait >= 500  # a newcomer still waits behind every one of them (1 send a second)


# --- shed: the end of the drain --------------------------------------------------------------


class GatedQuota(LocalSlots):
    """A token quota whose state answers only once ``gate`` is set (a slow SQLite or Redis)."""

    def __init__(self, name: str, limits: tuple[Limit, ...], gate: asyncio.Event) -> None:
        super().__init__(name, CredentialBudget(limits, 0.0), MemorySendLog(), leases=False)
        self.gate = gate

    async def restore(self, now: float) -> None:
        await self.gate.wait()
        await super().restore(now)


async def test_a_request_that_reaches_the_queue_after_shed_is_refused_too(rig: Rig) -> None:
    # shed() refuses the queued requests and every later one "at once"; but a request that
    # passed the check before shed() and was still reading its token quota's state queued
    # afterwards, and waited until the server cancelled it: the disconnect shed prevents.
    lane, _ = await full_lane(rig, Limit(1, 100))
    gate = asyncio.Event()

    def quotas(name: str, limits: tuple[Limit, ...]) -> LocalSlots:
        return GatedQuota(name, limits, gate)

    scheduler = Scheduler(
        {CREDENTIAL: lane}, rig.policy, rig.observer, clock=rig.clock, quota_sources=quotas
    )
    request = AdmitRequest(token("svc", per_minute=10), CREDENTIAL, "/v1/calls", None)
    late = rig.spawn(scheduler.admit(request))
    await settle()
    assert not late.done()  # reading its quota
    scheduler.shed()
    gate.set()
    await settle()
    assert late.done(), "queued after shed: it waits until the server cancels it"
    assert refused(late.result(), "shutting_down").status == 503
    assert lane.depth == 0
    quota = scheduler.quotas.in_use[request.token.id].source
    assert quota.budget.count(rig.clock.now, 0) == 0  # its charge refunded


# --- a freeze another worker wrote, read with the rows after it ------------------------------


async def test_a_freeze_read_with_a_give_back_after_it_keeps_a_waiter_that_can_wait(
    rig: Rig,
) -> None:
    # serve --workers on one SQLite file. A sends at T0; B's request queues behind the 1 s
    # window (deadline T0 + 10). A sends again at T0 + 1.375 (B's place in line lapsed; the
    # 2-a-minute window is now full until T0 + 60.375), its first send meets a 429 (pause
    # 3 s), and the second never leaves (given back). B reads the three rows at once: the
    # freeze ends at T0 + 4.375 and
    # the minute window has room, so B's waiter can wait. It was refused for 59 s: told of
    # the freeze row before the give-back row after it was merged.
    limits = (Limit(1, 1), Limit(2, 60))
    a = rig.lane(await rig.sqlite_log(), *limits)
    b = rig.lane(await rig.sqlite_log(), *limits)
    g1 = await a.admit(token("a"), None, 1.0)
    assert isinstance(g1, SlotGrant)
    waiter = await rig.enqueue(b, token("b"), max_wait=10.0)
    rig.clock.now = T0 + 1.375
    g2 = await a.admit(token("a"), None, 1.0)
    assert isinstance(g2, SlotGrant)
    g1.sent(429, {"Retry-After": "3"})
    await drain(a)
    g2.unsent()
    await drain(a)
    await b.source.refresh(rig.clock.now)
    await settle()
    assert not waiter.done(), waiter.result()
    assert b.depth == 1
    assert b.source.predict_wait(rig.clock.now, 0, None) == pytest.approx(3.0)
