"""Unit tests for proxy.budget.lane (via its Lane: queue, fairness, refusals, freeze, calibration,
restore) and proxy.budget.scheduler (token quotas), driven directly: no HTTP, no sockets.

Time. Every lane reads a ``FakeClock``. A lane arms a real loop timer (``call_later``) for the
instant its budget frees, computed from that clock; no test lets one fire on its own. ``fire``
moves the clock, disarms the pending timer and runs the lane's timer callback itself, so a
dispatch happens exactly when a test says. Waiter tasks run on ``settle`` (a few zero sleeps);
with the SQLite log the write-ahead runs in a worker thread, so ``finished`` awaits the tasks
themselves. Nothing sleeps for a real duration.

Fake times sit on a 1/64 s grid (``T0`` included), so sums of times and spans are exact and the
brute-force window checks compare exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.auth.tokens import TokenRecord, mint_token
from proxy.budget.admission import AdmitRequest, Grant, Refusal
from proxy.budget.grants import SlotGrant
from proxy.budget.lane import Lane, QueuePolicy
from proxy.budget.local_slots import LocalSlots
from proxy.budget.quotas import TokenCharge
from proxy.budget.ratelimit_headers import caller_headers
from proxy.budget.scheduler import Scheduler
from proxy.budget.slots import SendLog
from proxy.budget.windows import CredentialBudget, Limit
from proxy.state.memory import MemorySendLog, memory_quota_sources
from proxy.state.sqlite.sends import SqliteSendLog

T0 = 1_000_000.0  # fake wall-clock start, on the 1/64 s grid
GUARD = 0.25
CREDENTIAL = "team"
# Real seconds a granted waiter may take to finish its write-ahead (one SQLite row, in a
# thread: milliseconds). Only a broken scheduler ever waits this long.
GRANT_TIMEOUT = 3.0

Result = Grant | Refusal  # what an admit returns: a SlotGrant from a Lane
AdmitTask = asyncio.Task[Result]


# --- test doubles and helpers --------------------------------------------------------------


class FakeClock:
    """Wall-clock seconds that move only when a test says."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """An Observer (proxy.budget.lane.Observer) that records every call as a tuple."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def refused(self, credential: str, token: str, reason: str) -> None:
        self.calls.append(("refused", credential, token, reason))

    def waited(self, credential: str, seconds: float) -> None:
        self.calls.append(("waited", credential, seconds))

    def upstream_429(self, credential: str) -> None:
        self.calls.append(("upstream_429", credential))

    def frozen(self, credential: str) -> None:
        self.calls.append(("frozen", credential))

    def reported_remaining(self, credential: str, remaining: int) -> None:
        self.calls.append(("reported_remaining", credential, remaining))

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


def token(name: str, weight: int = 1, per_minute: int | None = None) -> TokenRecord:
    return mint_token(name=name, scopes=("*",), now=T0, weight=weight, per_minute=per_minute).record


async def settle(rounds: int = 10) -> None:
    """Let ready tasks run (waiters resuming, background writes starting); no real time."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def fire(lane: Lane, clock: FakeClock, step: float = 0.0) -> None:
    """Move the clock by ``step`` seconds and run the lane's timer callback now, as the real
    timer would once that time came (the real one is disarmed so it never runs as well).
    Returns once the lane's pump has handed out what the budget allows, before the waiters
    it granted resume: a test can still cancel one of them in between."""
    clock.now += step
    if lane.dispatch._timer is not None:
        lane.dispatch._timer.cancel()
    lane.dispatch._on_timer()
    await asyncio.sleep(0)  # the pump task runs first; woken waiters are queued after us
    assert lane.dispatch._pump is None or lane.dispatch._pump.done(), (
        "the pump did not finish in one step"
    )


def armed_in(lane: Lane) -> float:
    """Seconds until the lane's pending timer fires (it must have one)."""
    timer = lane.dispatch._timer
    assert timer is not None, "waiters queued but no timer armed"
    assert not timer.cancelled()
    return timer.when() - asyncio.get_running_loop().time()


async def drain(lane: Lane) -> None:
    """Wait for the lane's background log writes (``remove`` after a slot is given back)."""
    source = lane.source
    assert isinstance(source, LocalSlots)
    await asyncio.gather(*source._background)


async def finished(tasks: Sequence[AdmitTask], count: int) -> list[AdmitTask]:
    """The ``count`` tasks among the unfinished ``tasks`` that finish next, in finishing order.
    Waits for real completion (write-ahead may run in a thread), never for a fixed time."""
    pending = {task for task in tasks if not task.done()}
    done: list[AdmitTask] = []
    while len(done) < count:
        newly, pending = await asyncio.wait(
            pending, timeout=GRANT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        assert newly, f"only {len(done)} of {count} expected grants happened"
        done += sorted(newly, key=list(tasks).index)
    return done


def granted(task: AdmitTask) -> SlotGrant:
    result = task.result()
    assert isinstance(result, SlotGrant), result
    return result


def refused(result: object, reason: str) -> Refusal:
    assert isinstance(result, Refusal), result
    assert result.reason == reason, result
    return result


async def refuse_now(admit: Coroutine[Any, Any, Result], reason: str) -> Refusal:
    """Run an admit that must be refused at once: it finishes with no clock step, no timer
    and no real wait (a refusal touches no log), else the test fails instead of hanging."""
    task = asyncio.ensure_future(admit)
    await settle()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pytest.fail(f"expected a {reason} refusal at once, but the request waited")
    return refused(task.result(), reason)


def own_sends(lane: Lane, now: float) -> list[float]:
    lane.budget.snapshot(now)  # prune at now
    return lane.budget.sends()


class Rig:
    """One test's clock, observer, queue policy, logs, lanes and waiter tasks; closes them all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock = FakeClock()
        self.observer = Recorder()
        self.policy = QueuePolicy(max_wait=1000.0, max_depth=100, max_depth_per_token=50)
        self.logs: list[SendLog] = []
        self.lanes: list[Lane] = []
        self.tasks: list[AdmitTask] = []

    async def sqlite_log(self) -> SqliteSendLog:
        log = await SqliteSendLog.open(self.path / "state.db")
        self.logs.append(log)
        return log

    def lane(
        self,
        log: SendLog,
        *limits: Limit,
        name: str = CREDENTIAL,
        policy: QueuePolicy | None = None,
    ) -> Lane:
        lane = Lane(
            name,
            limits,
            GUARD,
            log,
            policy or self.policy,
            self.observer,
            clock=self.clock,
        )
        self.lanes.append(lane)
        return lane

    def spawn(self, coro: Coroutine[Any, Any, Result]) -> AdmitTask:
        task = asyncio.create_task(coro)
        self.tasks.append(task)
        return task

    async def enqueue(self, lane: Lane, tok: TokenRecord, max_wait: float = 1000.0) -> AdmitTask:
        """Admit in a task that must end up queued (the budget is busy)."""
        task = self.spawn(lane.admit(tok, None, max_wait))
        await settle()
        assert not task.done(), task.result()
        return task

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for lane in self.lanes:
            await lane.close()
        for log in self.logs:
            await log.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    await rig.close()


async def full_lane(rig: Rig, *limits: Limit) -> tuple[Lane, SlotGrant]:
    """A lane on the SQLite log whose budget one immediate (answered) send has filled."""
    lane = rig.lane(await rig.sqlite_log(), *limits)
    first = await lane.admit(token("filler"), None, 1.0)
    assert isinstance(first, SlotGrant)
    first.sent(200, {})
    assert lane.budget.wait_time(rig.clock.now) > 0
    return lane, first


async def lane_after_429(rig: Rig, headers: dict[str, str]) -> Lane:
    """A lane on the SQLite log (10 per 60 s) whose one send echowin answered 429 with
    ``headers``."""
    lane = rig.lane(await rig.sqlite_log(), Limit(10, 60))
    grant = await lane.admit(token("svc"), None, 1.0)
    assert isinstance(grant, SlotGrant)
    grant.sent(429, headers)
    return lane


# --- 1. immediate grant, write-ahead, unsent ------------------------------------------------


async def test_free_budget_grants_at_once_written_ahead_and_unsent_gives_all_back(
    rig: Rig,
) -> None:
    log = await rig.sqlite_log()
    lane = rig.lane(log, Limit(2, 60))
    quota = LocalSlots("quota:svc", CredentialBudget([Limit(5, 60)], guard=0.0), MemorySendLog())
    slot = await quota.take(T0)
    assert slot is not None
    charge = TokenCharge(quota, slot)

    grant = await lane.admit(token("svc"), charge, 1.0)

    assert isinstance(grant, SlotGrant)
    assert (grant.at, grant.queued_seconds, grant.quota) == (T0, 0.0, charge)
    assert await log.recent(CREDENTIAL, 0.0) == [T0]  # durable before admit returned
    assert lane.budget.count(T0, 0) == 1
    assert (lane.depth, rig.policy.waiting) == (0, 0)

    rig.clock.now += 1
    grant.unsent()
    assert lane.budget.count(rig.clock.now, 0) == 0  # at once, before any I/O
    assert charge.refunded
    assert quota.budget.count(rig.clock.now, 0) == 0
    await drain(lane)
    assert await log.recent(CREDENTIAL, 0.0) == []

    grant.sent(200, {})  # a grant takes effect once: this is ignored
    grant.unsent()
    assert lane.budget.count(rig.clock.now, 0) == 0
    assert quota.budget.count(rig.clock.now, 0) == 0


async def test_a_sent_grant_keeps_its_slot_and_its_row(rig: Rig) -> None:
    log = await rig.sqlite_log()
    lane = rig.lane(log, Limit(2, 60))
    grants = [await lane.admit(token("svc"), None, 1.0) for _ in range(2)]
    for grant in grants:
        assert isinstance(grant, SlotGrant)
        grant.sent(200, {})
        grant.unsent()  # too late: echowin answered
    await drain(lane)
    assert lane.budget.count(T0, 0) == 2
    assert await log.recent(CREDENTIAL, 0.0) == [T0, T0]


# --- 2. smooth weighted round-robin, FIFO per token ------------------------------------------


async def queue_a_and_b(
    rig: Rig, arrivals: str = "ab" * 8
) -> tuple[Lane, dict[AdmitTask, str], list[AdmitTask]]:
    """Limit 1 per 1 s, budget full; A (weight 3) and B (weight 1) queue 8 each, in the
    order ``arrivals`` spells."""
    lane, _ = await full_lane(rig, Limit(1, 1))
    tokens = {"a": token("a", weight=3), "b": token("b", weight=1)}
    owner: dict[AdmitTask, str] = {}
    order: list[AdmitTask] = []
    for name in arrivals:
        task = await rig.enqueue(lane, tokens[name])
        owner[task] = name
        order.append(task)
    assert lane.depth == rig.policy.waiting == 16
    return lane, owner, order


async def grant_one_per_window(
    rig: Rig, lane: Lane, tasks: list[AdmitTask], slots: int
) -> list[AdmitTask]:
    """Step the clock one 1 s window (+ guard) at a time; each step must grant one waiter."""
    return await grant_one_per_window_of(rig, lane, tasks, slots, 1.25)


async def grant_one_per_window_of(
    rig: Rig, lane: Lane, tasks: list[AdmitTask], slots: int, window: float
) -> list[AdmitTask]:
    """Step the clock ``window`` seconds at a time (a limit of 1 per window, guard included);
    each step must grant exactly one waiter, and the lane's timer was armed for it."""
    served: list[AdmitTask] = []
    for _ in range(slots):
        assert armed_in(lane) == pytest.approx(window, abs=0.2)  # the earliest free instant
        depth = lane.depth
        await fire(lane, rig.clock, window)
        assert lane.depth == depth - 1
        (task,) = await finished(tasks, 1)
        assert granted(task).at == rig.clock.now
        served.append(task)
    return served


async def test_queued_waiters_get_one_slot_per_window_fifo_within_each_token(rig: Rig) -> None:
    lane, owner, order = await queue_a_and_b(rig)
    served = await grant_one_per_window(rig, lane, order, 16)
    for name in ("a", "b"):
        mine = [task for task in order if owner[task] == name]
        assert [task for task in served if owner[task] == name] == mine  # FIFO
    assert (lane.depth, rig.policy.waiting, lane.queue.tokens) == (0, 0, {})
    assert ("waited", CREDENTIAL, 1.25) in rig.observer.calls


@pytest.mark.parametrize(
    ("arrivals", "expected"),
    [
        ("ab" * 8, "aabaaaba"),
        ("a" * 8 + "b" * 8, "aabaaaba"),
        # Smooth WRR breaks ties in favour of the token that queued first (as nginx does by
        # peer order): the same cycle, rotated.
        ("b" * 8 + "a" * 8, "abaaabaa"),
    ],
)
async def test_weighted_round_robin_serves_a_three_times_as_often_as_b(
    rig: Rig, arrivals: str, expected: str
) -> None:
    lane, owner, order = await queue_a_and_b(rig, arrivals)
    served = "".join(owner[task] for task in await grant_one_per_window(rig, lane, order, 8))
    assert (served.count("a"), served.count("b")) == (6, 2)
    assert served == expected


# --- 3. a quiet token is not stuck behind a noisy one ----------------------------------------


async def test_a_quiet_tokens_request_is_served_within_two_slots(rig: Rig) -> None:
    lane, _ = await full_lane(rig, Limit(1, 1))
    noisy, quiet = token("noisy"), token("quiet")
    backlog = [await rig.enqueue(lane, noisy) for _ in range(10)]
    mine = await rig.enqueue(lane, quiet)
    served = await grant_one_per_window(rig, lane, [*backlog, mine], 2)
    assert mine in served
    assert backlog[0] in served  # and the noisy token's head was not skipped


async def test_a_quiet_token_is_not_held_back_by_credit_from_tokens_that_came_and_went(
    rig: Rig,
) -> None:
    lane, _ = await full_lane(rig, Limit(1, 1))
    noisy, heavy, quiet = token("noisy"), token("heavy", weight=10), token("quiet")
    backlog = [await rig.enqueue(lane, noisy) for _ in range(20)]
    served: list[AdmitTask] = []
    for _ in range(8):  # a heavy token's lone requests come and go, 10 slots in 11 theirs
        visit = await rig.enqueue(lane, heavy)
        while visit not in served:
            await fire(lane, rig.clock, 1.25)
            served += await finished([*backlog, visit], 1)
    assert len(served) == 9  # the noisy token's one slot in the round of 11
    predicted = lane.predicted_wait(rig.clock.now, quiet, 1000.0)
    mine = await rig.enqueue(lane, quiet)
    served = await grant_one_per_window(rig, lane, [*backlog, mine], 2)
    # The heavy token left owing nothing (repaid): the noisy one has had its slot of the
    # round, so the newcomer goes first, as predicted.
    assert predicted == 1.25
    assert served[0] is mine


# --- 4. refusals ---------------------------------------------------------------------------


async def test_a_wait_beyond_max_wait_is_refused_at_once(rig: Rig) -> None:
    lane, _ = await full_lane(rig, Limit(1, 10))
    refusal = await refuse_now(lane.admit(token("svc"), None, 5.0), "upstream_budget")
    assert refusal.retry_after >= 10.25  # the one send counts until T0 + 10 + guard
    assert refusal.retry_after == pytest.approx(10.25)
    assert (lane.depth, rig.policy.waiting, rig.clock.now) == (0, 0, T0)
    assert lane.budget.count(T0, 0) == 1  # a refusal spends nothing


async def test_a_refusal_flood_is_answered_from_the_known_free_moment(rig: Rig) -> None:
    lane, _ = await full_lane(rig, Limit(1, 10))
    svc = token("svc")
    first = await refuse_now(lane.admit(svc, None, 5.0), "upstream_budget")
    assert first.retry_after == pytest.approx(10.25)
    rig.clock.now += 3
    predictions = 0
    predict = lane.source.predict_wait

    def counting(now: float, ahead: int, horizon: float | None) -> float:
        nonlocal predictions
        predictions += 1
        return predict(now, ahead, horizon)

    lane.source.predict_wait = counting  # type: ignore[method-assign]
    again = await refuse_now(lane.admit(svc, None, 5.0), "upstream_budget")
    assert again.retry_after == pytest.approx(7.25)  # the same free moment, 3 s later
    assert predictions == 0  # nothing changed: no prediction, no slot asked for
    # Within max_wait of the free moment, the request queues (and is served then).
    rig.clock.now += 2.5
    task = await rig.enqueue(lane, svc, max_wait=5.0)
    assert lane.depth == 1 and not task.done()
    assert predictions == 1  # queueing predicts, as ever
    await fire(lane, rig.clock, 4.75)
    (done,) = await finished([task], 1)
    assert granted(done).at == T0 + 10.25
    # The send changed the budget: the next refusal is predicted again.
    later = await refuse_now(lane.admit(svc, None, 5.0), "upstream_budget")
    assert later.retry_after == pytest.approx(10.25)
    assert predictions == 2


async def test_a_wait_within_max_wait_queues_instead(rig: Rig) -> None:
    lane, _ = await full_lane(rig, Limit(1, 10))
    task = await rig.enqueue(lane, token("svc"), max_wait=10.25)
    assert lane.depth == 1
    await fire(lane, rig.clock, 10.25)
    (done,) = await finished([task], 1)
    assert granted(done).at == T0 + 10.25
    assert granted(done).queued_seconds == 10.25


async def test_the_predicted_wait_counts_other_tokens_waiters_exactly(rig: Rig) -> None:
    lane, _ = await full_lane(rig, Limit(1, 10))
    a, b = token("a"), token("b")
    queued_b = [await rig.enqueue(lane, b) for _ in range(3)]
    # Round-robin: one of b's waiters goes first, then a: two slots, at T0 + 10.25 and 20.5.
    assert lane.predicted_wait(T0, a, 1000.0) == 20.5
    await refuse_now(lane.admit(a, None, 15.0), "upstream_budget")
    mine = await rig.enqueue(lane, a, max_wait=20.5)
    served = await grant_one_per_window_of(rig, lane, [*queued_b, mine], 2, 10.25)
    assert served == [queued_b[0], mine]
    assert granted(mine).at == T0 + 20.5


async def test_refusal_retry_after_covers_the_queue_ahead(rig: Rig) -> None:
    lane, _ = await full_lane(rig, Limit(1, 10))
    svc = token("svc")
    ahead = [await rig.enqueue(lane, svc) for _ in range(2)]
    refusal = await refuse_now(lane.admit(svc, None, 5.0), "upstream_budget")
    # The true wait: queue the same request and see when it is served.
    mine = await rig.enqueue(lane, svc)
    while not mine.done():
        await fire(lane, rig.clock, 10.25)
        await finished([*ahead, mine], 1)
    true_wait = granted(mine).at - T0
    assert true_wait == 30.75
    assert refusal.retry_after >= true_wait


async def test_per_token_depth_is_bounded(rig: Rig) -> None:
    rig.policy.max_depth_per_token = 2
    lane, _ = await full_lane(rig, Limit(1, 10))
    a, b = token("a"), token("b")
    for _ in range(2):
        await rig.enqueue(lane, a)
    refusal = await refuse_now(lane.admit(a, None, 1000.0), "queue_full")
    assert refusal.retry_after >= 1.0
    await rig.enqueue(lane, b)  # another token still queues
    assert lane.depth == rig.policy.waiting == 3


async def test_global_depth_is_shared_by_lanes_of_one_policy(rig: Rig) -> None:
    policy = QueuePolicy(max_wait=1000.0, max_depth=3, max_depth_per_token=10)
    log = await rig.sqlite_log()
    team = rig.lane(log, Limit(1, 10), name="team", policy=policy)
    acme = rig.lane(log, Limit(1, 10), name="acme", policy=policy)
    a, b = token("a"), token("b")
    for lane in (team, acme):
        assert isinstance(await lane.admit(a, None, 1.0), SlotGrant)  # fills its budget
    first = await rig.enqueue(team, a)
    await rig.enqueue(team, b)
    await rig.enqueue(acme, a)
    assert policy.waiting == team.depth + acme.depth == 3

    await refuse_now(acme.admit(b, None, 1000.0), "queue_full")
    await refuse_now(team.admit(token("c"), None, 1000.0), "queue_full")
    assert policy.waiting == 3

    first.cancel()
    await settle()
    assert policy.waiting == 2
    await rig.enqueue(acme, b)  # room again, in any lane
    assert (policy.waiting, team.depth, acme.depth) == (3, 1, 2)


async def test_scheduler_refuses_past_a_tokens_own_quota_and_keeps_its_count(rig: Rig) -> None:
    lane = rig.lane(await rig.sqlite_log(), Limit(100, 60))
    scheduler = Scheduler(
        {CREDENTIAL: lane},
        rig.policy,
        rig.observer,
        rig.clock,
        quota_sources=memory_quota_sources(rig.clock),
    )
    svc = token("svc", per_minute=2)
    request = AdmitRequest(svc, CREDENTIAL, "/v1/calls", max_wait=1.0)
    grants = [await scheduler.admit(request) for _ in range(2)]
    assert isinstance(grants[0], SlotGrant)
    assert isinstance(grants[1], SlotGrant)

    refusal = await refuse_now(scheduler.admit(request), "token_quota")
    assert refusal.retry_after == pytest.approx(60.0)
    assert ("refused", CREDENTIAL, "svc", "token_quota") in rig.observer.calls
    headers = scheduler.caller_headers(request)
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("2", "0")
    await refuse_now(scheduler.admit(request), "token_quota")  # still spent: nothing refunded
    assert lane.budget.count(T0, 0) == 2  # the shared budget never saw the refused ones

    grants[0].unsent()  # a send that never left is given back to the token's quota too
    headers = scheduler.caller_headers(request)
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("2", "1")
    assert isinstance(await scheduler.admit(request), SlotGrant)


async def test_scheduler_refunds_the_token_charge_of_a_lane_refusal(rig: Rig) -> None:
    lane = rig.lane(await rig.sqlite_log(), Limit(1, 10))
    scheduler = Scheduler(
        {CREDENTIAL: lane},
        rig.policy,
        rig.observer,
        rig.clock,
        quota_sources=memory_quota_sources(rig.clock),
    )
    svc = token("svc", per_minute=2)
    request = AdmitRequest(svc, CREDENTIAL, "/v1/calls", max_wait=1.0)
    assert isinstance(await scheduler.admit(request), SlotGrant)
    hurried = AdmitRequest(svc, CREDENTIAL, "/v1/calls", max_wait=1.0)
    await refuse_now(scheduler.admit(hurried), "upstream_budget")
    assert ("refused", CREDENTIAL, "svc", "upstream_budget") in rig.observer.calls
    # Had the refusal kept its charge, the minute quota (2) would now be spent.
    rig.clock.now += 10.25
    assert isinstance(await scheduler.admit(request), SlotGrant)


# --- 5. cancellation -----------------------------------------------------------------------


async def test_a_waiter_cancelled_while_queued_leaves_and_consumes_nothing(rig: Rig) -> None:
    lane, _ = await full_lane(rig, Limit(1, 10))
    a, b = token("a"), token("b")
    a1, a2 = await rig.enqueue(lane, a), await rig.enqueue(lane, a)
    b1 = await rig.enqueue(lane, b)
    assert lane.depth == rig.policy.waiting == 3

    a1.cancel()
    await settle()
    assert a1.cancelled()
    assert lane.depth == rig.policy.waiting == 3 - 1
    assert sum(len(q.waiters) for q in lane.queue.tokens.values()) == 2
    assert own_sends(lane, rig.clock.now) == [T0]  # no slot taken

    await fire(lane, rig.clock, 10.25)
    (first,) = await finished([a2, b1], 1)  # one slot, one grant: a1 took none
    assert lane.depth == rig.policy.waiting == 1
    assert own_sends(lane, rig.clock.now) == [T0 + 10.25]
    await fire(lane, rig.clock, 10.25)
    (second,) = await finished([a2, b1], 1)
    assert {first, second} == {a2, b1}


async def test_a_granted_waiter_cancelled_before_it_resumes_gives_the_slot_back(
    rig: Rig,
) -> None:
    lane, _ = await full_lane(rig, Limit(1, 10))
    svc = token("svc")
    a1 = await rig.enqueue(lane, svc)  # one token: FIFO says a1 is served first
    b1 = await rig.enqueue(lane, svc)
    await fire(lane, rig.clock, 10.25)
    assert lane.depth == 1  # a1's slot is recorded and its future set ...
    a1.cancel()  # ... but its client left before it resumed
    (done,) = await finished([b1], 1)
    assert a1.cancelled()
    assert done is b1
    assert granted(done).at == T0 + 10.25  # the slot went to the next waiter at once
    assert own_sends(lane, rig.clock.now) == [T0 + 10.25]
    assert (lane.depth, rig.policy.waiting) == (0, 0)


async def test_a_cancelled_scheduler_request_refunds_its_token_charge(rig: Rig) -> None:
    lane = rig.lane(await rig.sqlite_log(), Limit(1, 10))
    scheduler = Scheduler(
        {CREDENTIAL: lane},
        rig.policy,
        rig.observer,
        rig.clock,
        quota_sources=memory_quota_sources(rig.clock),
    )
    svc = token("svc", per_minute=2)
    request = AdmitRequest(svc, CREDENTIAL, "/v1/calls", max_wait=1.0)
    assert isinstance(await scheduler.admit(request), SlotGrant)
    patient = AdmitRequest(svc, CREDENTIAL, "/v1/calls", max_wait=None)  # policy: 1000 s
    task = rig.spawn(scheduler.admit(patient))
    await settle()
    assert not task.done()
    task.cancel()
    await settle()
    assert task.cancelled()
    assert (lane.depth, rig.policy.waiting) == (0, 0)
    headers = scheduler.caller_headers(request)
    assert headers["X-RateLimit-Remaining"] == "0"  # the lane's budget is the tight one
    rig.clock.now += 10.25
    # The minute quota holds 1 (the first send), not 2: the cancelled charge came back.
    assert isinstance(await scheduler.admit(request), SlotGrant)
    await refuse_now(scheduler.admit(request), "token_quota")


async def test_a_slot_never_written_ahead_removes_no_log_row(rig: Rig) -> None:
    log = await rig.sqlite_log()
    lane = rig.lane(log, Limit(2, 10))
    svc = token("svc")
    x = await lane.admit(svc, None, 1.0)
    y = await lane.admit(svc, None, 1.0)
    assert isinstance(x, SlotGrant)
    assert isinstance(y, SlotGrant)
    w = await rig.enqueue(lane, svc)
    y.unsent()  # frees a slot at the same instant: the pump grants it to w at T0 ...
    await asyncio.sleep(0)
    assert lane.depth == 0
    w.cancel()  # ... and w leaves before it resumed to write it ahead
    await settle()
    assert w.cancelled()
    await drain(lane)
    assert own_sends(lane, T0) == [T0]  # x alone, which really left
    assert await log.recent(CREDENTIAL, 0.0) == [T0]


# --- 6. freeze after an upstream 429 ----------------------------------------------------------


async def test_an_upstream_429_freezes_the_lane(rig: Rig) -> None:
    lane = rig.lane(await rig.sqlite_log(), Limit(1, 1))
    first = await lane.admit(token("first"), None, 1.0)
    assert isinstance(first, SlotGrant)
    short = await rig.enqueue(lane, token("short"), max_wait=3.0)  # deadline T0 + 3
    patient = await rig.enqueue(lane, token("patient"), max_wait=1000.0)

    rig.clock.now += 0.5
    first.sent(429, {"Retry-After": "5"})  # lane.on_response: frozen until T0 + 5.5
    assert lane.budget.frozen_until(rig.clock.now) == T0 + 5.5
    await settle()
    refusal = refused(short.result(), "upstream_frozen")
    assert refusal.retry_after == pytest.approx(5.0)
    assert not patient.done()
    assert (lane.depth, rig.policy.waiting) == (1, 1)
    assert armed_in(lane) == pytest.approx(5.0, abs=0.2)  # one timer, for the thaw

    late = await refuse_now(lane.admit(token("late"), None, 1.0), "upstream_frozen")
    # Behind the patient waiter (served at the thaw, T0 + 5.5): the next slot is 1.25 s
    # later. Back at the thaw, its wait (1.25 s) would exceed its max_wait and be refused.
    assert late.retry_after == pytest.approx(6.25)
    assert rig.observer.names().count("upstream_429") == 1
    assert rig.observer.names().count("frozen") == 1

    await fire(lane, rig.clock, 4.0)  # T0 + 4.5: still frozen, though the budget is free
    await settle()
    assert not patient.done()
    await fire(lane, rig.clock, 1.0)  # T0 + 5.5: thawed
    (done,) = await finished([patient], 1)
    assert granted(done).at == T0 + 5.5


async def test_a_freeze_another_worker_wrote_refuses_this_workers_waiters(rig: Rig) -> None:
    """``serve --workers``: a worker that reads another's freeze row from the shared log
    refuses the waiters that cannot wait the freeze out, as the worker that met the 429
    does, instead of letting them wait out their max wait."""
    a = rig.lane(await rig.sqlite_log(), Limit(1, 1))
    b = rig.lane(await rig.sqlite_log(), Limit(1, 1))
    first = await a.admit(token("first"), None, 1.0)
    assert isinstance(first, SlotGrant)
    short = await rig.enqueue(b, token("short"), max_wait=3.0)  # deadline T0 + 3
    patient = await rig.enqueue(b, token("patient"), max_wait=1000.0)
    first.sent(429, {"Retry-After": "5"})  # A: frozen until T0 + 5
    await drain(a)  # the freeze row is in the log
    rig.clock.now += LocalSlots.POLL_SECONDS
    await b.source.refresh(rig.clock.now)  # B reads the others' rows
    await settle()
    assert refused(short.result(), "upstream_frozen").retry_after == pytest.approx(4.95)
    assert not patient.done()
    assert b.depth == 1


async def test_a_429_through_a_grant_freezes_with_the_default_when_no_header_says(
    rig: Rig,
) -> None:
    lane = await lane_after_429(rig, {})
    assert lane.budget.frozen_until(T0) == T0 + 60.0
    await refuse_now(lane.admit(token("svc"), None, 10.0), "upstream_frozen")
    assert own_sends(lane, T0) == [T0]  # a 429 answer still counts as sent


# --- 7. reconciliation with echowin's headers ------------------------------------------------


def rl(limit: int, remaining: int) -> dict[str, str]:
    return {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(remaining)}


async def test_echowin_reporting_more_use_adds_external_sends(rig: Rig) -> None:
    lane = rig.lane(await rig.sqlite_log(), Limit(10, 60), Limit(100, 3600))
    g1, g2 = [await lane.admit(token("svc"), None, 1.0) for _ in range(2)]
    assert isinstance(g1, SlotGrant)
    assert isinstance(g2, SlotGrant)
    # Both ours are in flight; echowin has seen only g1. Not someone else's use.
    g1.sent(200, rl(100, 99))
    minute, hour = lane.budget.snapshot(T0)
    assert (hour.used, hour.external) == (2, 0)
    # Then echowin counts 5: three are someone else's (X-RateLimit-Limit: the hourly window).
    g2.sent(200, rl(100, 95))
    minute, hour = lane.budget.snapshot(T0)
    assert (hour.used, hour.external) == (5, 3)
    assert (minute.used, minute.external) == (2, 0)
    assert ("reported_remaining", CREDENTIAL, 95) in rig.observer.calls
    assert lane.reported_remaining == 95


async def test_echowin_reporting_less_use_never_lowers_our_count(rig: Rig) -> None:
    lane = rig.lane(await rig.sqlite_log(), Limit(10, 60))
    grants = [await lane.admit(token("svc"), None, 1.0) for _ in range(3)]
    first, *rest = grants
    assert isinstance(first, SlotGrant)
    first.sent(200, rl(10, 3))  # echowin: 7 used; ours 3, so 4 external
    assert (lane.budget.snapshot(T0)[0].used, lane.budget.snapshot(T0)[0].external) == (7, 4)
    for grant in rest:
        assert isinstance(grant, SlotGrant)
        grant.sent(200, rl(10, 10))  # "nothing used": ignored, never lowers
    (window,) = lane.budget.snapshot(T0)
    assert (window.used, window.external) == (7, 4)
    assert own_sends(lane, T0) == [T0] * 3


# --- 8. calibration without a durable log -------------------------------------------------------


async def test_memory_log_probes_one_at_a_time_until_echowin_says_where_the_budget_is(
    rig: Rig,
) -> None:
    lane = rig.lane(MemorySendLog(), Limit(10, 60))
    assert not lane.calibrated
    svc = token("svc")
    probe = await lane.admit(svc, None, 1.0)
    assert isinstance(probe, SlotGrant)
    waiting = [await rig.enqueue(lane, svc) for _ in range(3)]  # budget free, probe out
    assert lane.depth == 3

    probe.sent(200, {})  # no rate-limit headers: still blind, next probe only
    await settle()
    assert [task.done() for task in waiting] == [True, False, False]
    assert lane.depth == 2 and not lane.calibrated

    second = granted(waiting[0])
    second.sent(200, rl(10, 4))  # echowin counts 6, so 4 are not ours
    assert lane.calibrated
    await settle()
    assert all(task.done() for task in waiting)  # the rest leave together
    assert lane.depth == 0
    (window,) = lane.budget.snapshot(T0)
    assert (window.used, window.external) == (8, 4)
    assert ("reported_remaining", CREDENTIAL, 4) in rig.observer.calls

    for _ in range(2):
        assert isinstance(await lane.admit(svc, None, 1.0), SlotGrant)
    refusal = await refuse_now(lane.admit(svc, None, 5.0), "upstream_budget")
    assert refusal.retry_after >= 60.25  # the assumed external sends count a full window


async def test_an_unsent_probe_lets_the_next_one_go(rig: Rig) -> None:
    lane = rig.lane(MemorySendLog(), Limit(10, 60))
    svc = token("svc")
    probe = await lane.admit(svc, None, 1.0)
    assert isinstance(probe, SlotGrant)
    waiting = [await rig.enqueue(lane, svc) for _ in range(2)]
    probe.unsent()
    await settle()
    assert [task.done() for task in waiting] == [True, False]
    assert own_sends(lane, T0) == [T0]


# --- 9. restore after a restart ----------------------------------------------------------------


async def test_a_new_lane_on_the_same_file_counts_the_sends_of_the_old_one(rig: Rig) -> None:
    old_log = await rig.sqlite_log()
    old = rig.lane(old_log, Limit(3, 60))
    svc = token("svc")
    rig.clock.now = T0 - 100  # long gone by the restart
    stale = await old.admit(svc, None, 1.0)
    assert isinstance(stale, SlotGrant)
    for t in (T0, T0 + 1, T0 + 2):
        rig.clock.now = t
        grant = await old.admit(svc, None, 1.0)
        assert isinstance(grant, SlotGrant)
        grant.sent(200, {})
    await old.close()
    await old_log.close()
    rig.logs.remove(old_log)

    rig.clock.now = T0 + 3
    new = rig.lane(await rig.sqlite_log(), Limit(3, 60))
    await new.restore()
    assert own_sends(new, rig.clock.now) == [T0, T0 + 1, T0 + 2]
    refusal = await refuse_now(new.admit(svc, None, 1.0), "upstream_budget")
    assert refusal.retry_after == pytest.approx(T0 + 60.25 - rig.clock.now)

    other = rig.lane(rig.logs[-1], Limit(3, 60), name="acme")
    await other.restore()
    assert own_sends(other, rig.clock.now) == []  # each credential keeps its own sends


# --- 10. random interleavings ------------------------------------------------------------------


GRID = 64


def grid(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.integers(round(lo * GRID), round(hi * GRID)).map(lambda k: k / GRID)


LIMITS = st.lists(st.builds(Limit, st.integers(1, 3), grid(0.5, 4)), min_size=1, max_size=2)
WEIGHTS = st.lists(st.integers(1, 4), min_size=2, max_size=4)
MAX_WAITS = (2.0, 6.0, 1000.0)  # seconds; also real timeouts, far beyond a run's duration
KINDS = ("admit",) * 5 + ("step",) * 3 + ("cancel", "sent", "sent", "unsent", "429")
# One step of a run: (kind, seconds for a clock step, an index, a small integer argument).
OP = st.tuples(st.sampled_from(KINDS), grid(0, 2), st.integers(0, 6), st.integers(-1, 12))


def most_in_any_window(times: Sequence[float], span: float) -> int:
    """Most of ``times`` in any half-open interval [x, x + span): a fullest one can be slid
    right until it starts at one of the times."""
    return max((sum(1 for y in times if x <= y < x + span) for x in times), default=0)


class Model:
    """What the test itself knows: the tasks, who owns them, the grants they got."""

    def __init__(self, lane: Lane, policy: QueuePolicy, tokens: list[TokenRecord]) -> None:
        self.lane, self.policy, self.tokens = lane, policy, tokens
        self.tasks: list[AdmitTask] = []
        self.owner: dict[AdmitTask, int] = {}
        self.finish_order: list[AdmitTask] = []  # by done-callback: the order grants came
        self.collected = 0
        self.open: list[SlotGrant] = []  # granted, not yet sent or unsent
        self.live: list[float] = []  # times of grants that count: open or sent
        self.granted: list[float] = []  # the times they were granted at (never moved)
        # A late answer came after its slot had stopped counting in some window: another
        # send may have gone meanwhile, so only the granted times must keep that window.
        self.overdue = False
        self.seen: set[int] = set()  # ids of grants handed out

    def admit(self, who: int, max_wait: float) -> None:
        tok = self.tokens[who % len(self.tokens)]
        task = asyncio.create_task(self.lane.admit(tok, None, max_wait))
        task.add_done_callback(self.finish_order.append)
        self.owner[task] = who % len(self.tokens)
        self.tasks.append(task)

    def pending(self) -> list[AdmitTask]:
        return [task for task in self.tasks if not task.done()]

    def collect(self) -> None:
        """Take in the grants of tasks that finished since the last call."""
        for task in self.finish_order[self.collected :]:
            self.collected += 1
            if task.cancelled():
                continue
            result = task.result()
            if isinstance(result, SlotGrant):
                assert id(result) not in self.seen, "one grant handed out twice"
                self.seen.add(id(result))
                self.open.append(result)
                self.live.append(result.at)
                self.granted.append(result.at)
            else:
                assert isinstance(result, Refusal), result
                assert result.reason in ("upstream_budget", "queue_full", "upstream_frozen")

    def check(self, now: float) -> None:
        lane, policy = self.lane, self.policy
        queued = sum(len(queue.waiters) for queue in lane.queue.tokens.values())
        assert lane.depth == queued == policy.waiting == len(self.pending())
        # A token's emptied queue stays in the round while it owes (see FairQueue._emptied), never
        # once nobody waits; the round-robin credits keep summing to zero.
        assert lane.depth or not lane.queue.tokens
        assert abs(sum(queue.current for queue in lane.queue.tokens.values())) < 1e-6
        # Every send that counts is ours in the lane's log, and nothing else of ours is.
        longest = max(limit.per_seconds for limit in lane.budget.limits) + GUARD
        assert own_sends(lane, now) == sorted(t for t in self.live if t + longest > now)
        for limit in lane.budget.limits:
            span = limit.per_seconds + GUARD
            assert most_in_any_window(self.granted, span) <= limit.requests
            assert self.overdue or most_in_any_window(self.live, span) <= limit.requests
        if not lane.calibrated:
            assert len(self.open) <= 1, "more than one probe out before calibration"
        # Nobody waits while a send is allowed (unless a blind probe is out).
        if lane.depth and lane.can_send():
            assert lane.budget.wait_time(now) > 0
            assert lane.dispatch._timer is not None
        # FIFO per token among the grants.
        for who in range(len(self.tokens)):
            order = [
                self.tasks.index(task)
                for task in self.finish_order
                if self.owner[task] == who
                and not task.cancelled()
                and isinstance(task.result(), SlotGrant)
            ]
            assert order == sorted(order)


async def run_interleaving(
    limits: list[Limit], weights: list[int], calibrate: bool, ops: list[tuple[str, float, int, int]]
) -> None:
    clock = FakeClock()
    policy = QueuePolicy(max_wait=1000.0, max_depth=6, max_depth_per_token=3)
    lane = Lane(CREDENTIAL, limits, GUARD, MemorySendLog(), policy, Recorder(), clock=clock)
    tokens = [token(f"t{i}", weight=w) for i, w in enumerate(weights)]
    model = Model(lane, policy, tokens)
    top = limits[-1].requests
    if calibrate:  # the probe's answer: echowin has counted it alone
        ops = [("admit", 0.0, 0, 2), ("sent", 0.0, 0, top - 1), *ops]
    try:
        for kind, dt, a, b in ops:
            pending = model.pending()
            if kind == "admit":
                model.admit(a, MAX_WAITS[b % len(MAX_WAITS)])
            elif kind == "step":
                await fire(lane, clock, dt)
                if 0 <= b < 8 and pending:  # a client may leave right after its slot came
                    pending[b % 2 % len(pending)].cancel()
            elif kind == "cancel" and pending:
                pending[a % len(pending)].cancel()
            elif kind in ("sent", "unsent", "429") and model.open:
                grant = model.open.pop(a % len(model.open))
                before = grant.at
                if kind == "unsent":
                    grant.unsent()
                    model.live.remove(grant.at)
                    model.granted.remove(before)
                elif kind == "sent":
                    grant.sent(200, rl(top, min(b, top)) if b >= 0 else {})
                else:
                    grant.sent(429, {"Retry-After": str(1 + b % 3)})
                if kind != "unsent":  # answered now: it counts from now - guard at the latest
                    assert grant.at == max(before, clock.now - GUARD)
                    if grant.at != before:
                        model.live[model.live.index(before)] = grant.at
                        shortest = min(limit.per_seconds for limit in limits)
                        model.overdue |= clock.now > before + shortest + GUARD
            await settle()
            model.collect()
            model.check(clock.now)
            if lane.dispatch._timer is not None:
                # only `step` dispatches on time: runs are deterministic
                lane.dispatch._timer.cancel()
    finally:
        await lane.close()
        for task in model.tasks:
            task.cancel()
        await asyncio.gather(*model.tasks, return_exceptions=True)


@settings(max_examples=150, deadline=None)
@given(
    limits=LIMITS,
    weights=WEIGHTS,
    calibrate=st.booleans() | st.just(True),
    ops=st.lists(OP, min_size=5, max_size=60),
)
def test_random_interleavings_keep_every_window_and_the_queue_books(
    limits: list[Limit], weights: list[int], calibrate: bool, ops: list[tuple[str, float, int, int]]
) -> None:
    asyncio.run(run_interleaving(limits, weights, calibrate, ops))


def test_most_in_any_window_counts_a_half_open_interval() -> None:
    assert most_in_any_window([0.0, 1.0, 2.0], 2.0) == 2
    assert most_in_any_window([0.0, 1.0, 1.5], 2.0) == 3
    assert most_in_any_window([], 1.0) == 0


async def test_a_waiter_cancelled_just_before_the_pump_runs_takes_no_slot(rig: Rig) -> None:
    lane, _ = await full_lane(rig, Limit(1, 10))
    svc = token("svc")
    leaving = await rig.enqueue(lane, svc)
    staying = await rig.enqueue(lane, svc)
    rig.clock.now += 10.25  # the window frees one slot
    if lane.dispatch._timer is not None:
        lane.dispatch._timer.cancel()
    lane.dispatch._on_timer()  # the pump is scheduled first ...
    leaving.cancel()  # ... then the client of the first waiter goes away: its future is
    await settle()  # cancelled at once, its task only runs after the pump
    assert lane.dispatch._pump is not None
    assert lane.dispatch._pump.done()
    assert lane.dispatch._pump.exception() is None  # no InvalidStateError: the pump skipped it
    assert leaving.cancelled()
    await asyncio.wait_for(asyncio.shield(staying), 5)  # its write-ahead runs in a thread
    assert granted(staying).at == rig.clock.now  # the slot went to the one still waiting
    assert lane.depth == 0
    assert lane.policy.waiting == 0
    assert lane.budget.count(rig.clock.now, 0) == 1


@pytest.mark.parametrize(
    "limits",
    [
        (Limit(3, 2), Limit(5, 10)),  # the tightest window changes as sends come and go
        (Limit(2000, 2), Limit(2100, 10)),  # far from both: slots leased in blocks
    ],
)
async def test_kept_caller_headers_always_equal_fresh_ones(
    rig: Rig, limits: tuple[Limit, Limit]
) -> None:
    """Scheduler.caller_headers keeps its answer between budget changes, and makes a new
    one from the tightest window alone: at every moment it must still be what a
    computation from scratch gives, whatever echowin reports meanwhile."""
    lane = rig.lane(await rig.sqlite_log(), *limits)
    scheduler = Scheduler(
        {CREDENTIAL: lane},
        rig.policy,
        rig.observer,
        rig.clock,
        quota_sources=memory_quota_sources(rig.clock),
    )
    request = AdmitRequest(token("svc"), CREDENTIAL, "/v1/calls", max_wait=0.0)

    def fresh() -> dict[str, str]:
        windows = [("echowin", w) for w in lane.source.snapshot(rig.clock.now)]
        return caller_headers(rig.clock.now, windows)

    rig.clock.now += 1 / 64  # off a whole second: X-RateLimit-Reset (now, rounded up) holds
    first = scheduler.caller_headers(request)
    assert scheduler.caller_headers(request) is first  # nothing changed: the same answer
    grants = []
    shown = set()
    for step in range(160):  # 12.5 s in steps of 5/64 s, sends and give-backs on the way
        for _ in range(1 + step % 3):
            if step % 7 == 0 or limits[0].requests > 100:
                result = await scheduler.admit(request)
                if isinstance(result, SlotGrant):
                    grants.append(result)
        if step % 11 == 0 and grants:
            grants.pop().unsent()
        if step % 13 == 0 and grants:
            # echowin counts one more than we do in one of its windows: someone else's
            spent = lane.source.snapshot(rig.clock.now)[step // 13 % 2]
            said = {
                "X-RateLimit-Limit": str(spent.requests),
                "X-RateLimit-Remaining": str(max(0, spent.remaining - 1)),
            }
            grants.pop().sent(200, said)
        headers = dict(scheduler.caller_headers(request))
        assert headers == fresh(), step
        shown.add(headers["RateLimit"].partition(";")[0])
        rig.clock.now += 5 / 64
    assert len(shown) == 2  # each window was the tightest at some point
    if limits[0].requests > 100:
        assert isinstance(lane.source, LocalSlots) and lane.source._lease is not None


async def test_a_queued_request_granted_without_the_clock_moving_is_observed_once(
    rig: Rig,
) -> None:
    """The queue-wait histogram counts each admitted request once, also when a slot given
    back lets a queued request through before the clock has moved (a wait of 0 s)."""
    lane = rig.lane(await rig.sqlite_log(), Limit(1, 60))
    first = await lane.admit(token("filler"), None, 1.0)
    assert isinstance(first, SlotGrant)
    rig.observer.calls.clear()
    waiter = await rig.enqueue(lane, token("svc"))
    first.unsent()  # its slot back, at the same instant
    (done,) = await finished([waiter], 1)
    assert granted(done).queued_seconds == 0.0
    assert [c for c in rig.observer.calls if c[0] == "waited"] == [("waited", CREDENTIAL, 0.0)]
