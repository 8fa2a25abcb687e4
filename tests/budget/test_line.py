"""Cross-process fairness: the line of processes waiting for a credential's next slot.

Two workers on one SQLite file (or two replicas on one Redis) each queue their own
callers. When one slot frees at a time, both try at the same moment; without a line the
one that always gets there first would take every slot and the other's callers would wait
out their whole ``max_wait``. With it, a process that lost a race is in line and the next
free slot is its. SQLite tests pass the clock in; the Redis test runs on Redis' clock with
a short window, trying again when the source itself says to (bounded in rounds and time).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from proxy.budget.local_slots import LocalSlots
from proxy.budget.slots import LINE_GRACE, SlotSource
from proxy.budget.windows import CredentialBudget, Limit
from proxy.state.redis.slots import RedisSlots
from proxy.state.sqlite.sends import SqliteSendLog

NAME = "default"
T0 = 1_000_000.0


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[tuple[LocalSlots, LocalSlots]]:
    logs = [await SqliteSendLog.open(tmp_path / "state.db") for _ in range(2)]
    a, b = (LocalSlots(NAME, CredentialBudget((Limit(1, 1.0),), 0.0), log) for log in logs)
    yield a, b
    for source, log in zip((a, b), logs, strict=True):
        await source.close()
        await log.close()


async def drain(source: SlotSource, now: float, cap: int = 10) -> int:
    """What one pump run does: take slots for waiting requests until refused."""
    got = 0
    for _ in range(cap):
        if await source.take(now, waiting=True) is None:
            break
        got += 1
    return got


async def test_the_worker_that_always_tries_first_does_not_take_every_slot(
    two_workers: tuple[LocalSlots, LocalSlots],
) -> None:
    a, b = two_workers
    shares = {"a": 0, "b": 0}
    for second in range(40):  # one slot per second; both have callers waiting throughout
        now = T0 + second
        shares["a"] += await drain(a, now)  # a's timer always fires first
        shares["b"] += await drain(b, now)
    assert shares["a"] + shares["b"] == 40  # every slot used, none twice
    assert abs(shares["a"] - shares["b"]) <= 1, shares


async def test_a_new_request_does_not_jump_the_line(
    two_workers: tuple[LocalSlots, LocalSlots],
) -> None:
    a, b = two_workers
    assert await drain(b, T0) == 1
    assert await drain(a, T0) == 0  # a waits, in line
    # At T0 + 1 a new request reaches b first: the free slot is a's (served longer ago).
    assert await b.take(T0 + 1) is None
    assert await drain(b, T0 + 1) == 0  # queued there, b takes its place in line
    assert 0 < b.retry_in(T0 + 1) <= 2 * LINE_GRACE
    assert await drain(a, T0 + 1) == 1
    # b tries again when a's turn is over, learns the slot went, waits for the next one ...
    assert await drain(b, T0 + 1 + b.retry_in(T0 + 1)) == 0
    # ... which is b's, though a asks first.
    assert await drain(a, T0 + 2) == 0
    assert await drain(b, T0 + 2) == 1


async def test_without_waiters_nobody_takes_a_place_in_line(
    two_workers: tuple[LocalSlots, LocalSlots],
) -> None:
    a, b = two_workers
    for second in range(5):  # only a's callers wait; b's take is a new request's
        assert await drain(a, T0 + second) == 1
        assert await b.take(T0 + second) is None
    assert await drain(a, T0 + 5) == 1  # b never queued: a is not made to wait for it


async def test_a_place_in_line_lapses_when_its_worker_does_not_come(
    two_workers: tuple[LocalSlots, LocalSlots],
) -> None:
    a, b = two_workers
    assert await drain(a, T0) == 1
    assert await drain(b, T0) == 0  # b lost the race: in line for the slot at T0 + 1
    assert b.retry_in(T0) == pytest.approx(1.0)
    # The slot frees at T0 + 1: a, behind b, leaves it to b for the grace ...
    assert await a.take(T0 + 1, waiting=True) is None
    assert 0 < a.retry_in(T0 + 1) <= 2 * LINE_GRACE
    # ... and takes it when b did not come (its callers left, or it died).
    later = T0 + 1 + a.retry_in(T0 + 1) + 0.001
    assert await a.take(later, waiting=True) is not None


async def test_slots_free_at_once_go_to_both_without_idling(tmp_path: Path) -> None:
    logs = [await SqliteSendLog.open(tmp_path / "state.db") for _ in range(2)]
    a, b = (LocalSlots(NAME, CredentialBudget((Limit(4, 1.0),), 0.0), log) for log in logs)
    try:
        assert await drain(a, T0) == 4
        assert await drain(b, T0) == 0  # in line
        # All four free again at T0 + 1: a gets there first but keeps one for b.
        assert await drain(a, T0 + 1) == 3
        assert await drain(b, T0 + 1) == 1
    finally:
        for source, log in zip((a, b), logs, strict=True):
            await source.close()
            await log.close()


async def test_closing_leaves_the_line(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    logs = [await SqliteSendLog.open(path) for _ in range(2)]
    a, b = (LocalSlots(NAME, CredentialBudget((Limit(1, 1.0),), 0.0), log) for log in logs)
    assert await drain(a, T0) == 1
    assert await drain(b, T0) == 0  # b in line
    await b.close()
    await logs[1].close()
    assert await a.take(T0 + 1, waiting=True) is not None  # nobody left to wait for
    await a.close()
    await logs[0].close()


async def test_replicas_on_redis_take_turns(redis_client: Redis) -> None:
    prefix = f"egw-test-{uuid.uuid4().hex[:10]}:"
    limits = (Limit(1, 0.1),)

    def replica() -> RedisSlots:
        return RedisSlots(NAME, redis_client, prefix, limits, 0.0, replicas=2, mode="closed")

    a, b = replica(), replica()
    shares = {"a": 0, "b": 0}
    until = time.monotonic() + 6.0
    for _ in range(60):
        if time.monotonic() > until or shares["a"] + shares["b"] >= 30:
            break
        now = time.time()
        shares["a"] += await drain(a, now)  # a always tries first
        shares["b"] += await drain(b, time.time())
        # Try again when either says a slot may be there (Redis' clock decides).
        await asyncio.sleep(max(0.001, min(a.retry_in(time.time()), b.retry_in(time.time()))))
    await a.close()
    await b.close()
    total = shares["a"] + shares["b"]
    assert total >= 20, shares
    assert min(shares.values()) >= 0.35 * total, shares
