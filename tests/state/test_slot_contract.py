"""The SlotSource contract, run against every budget backend.

One credential, the same limits and guard everywhere: ``memory`` and ``sqlite`` are
:class:`LocalSlots` on a :class:`MemorySendLog` / :class:`SqliteSendLog`, ``redis`` is
:class:`RedisSlots` on the real server at 127.0.0.1:6379 (the tests FAIL, never skip,
without it) under a fresh key prefix that is deleted afterwards; ``sentinel`` and
``cluster`` are RedisSlots on the private Sentinel group and cluster this session starts
(tests/state/conftest.py), reached through their URLs as the gateway reaches them.

The ``make_source`` fixture is a factory: calling it again builds a second source on the
same state (same SQLite file, same Redis prefix, a new MemorySendLog), which is how these
tests simulate a restart. To add a backend, add its name to BACKENDS and a case to
``Sources.__call__``; every contract test then runs against it unchanged.

Redis decides with its own clock (``TIME``), so every test passes one ``now`` taken at its
start and stays well inside the tightest window; the only sleep is the short freeze.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from proxy.budget.local_slots import LocalSlots
from proxy.budget.slots import Slot, SlotSource
from proxy.budget.windows import CredentialBudget, Limit
from proxy.state.memory import MemorySendLog
from proxy.state.redis.client import RedisClient, RedisOptions, open_redis
from proxy.state.redis.slots import RedisSlots
from proxy.state.sqlite.sends import SqliteSendLog
from tests.procs import eventually

BACKENDS = ["memory", "sqlite", "redis", "sentinel", "cluster"]
NAME = "default"
LIMITS = (Limit(5, 10.0), Limit(3, 1.0))  # the 3-per-second window is the tightest now
GUARD = 0.25
SPANS = [lim.per_seconds + GUARD for lim in LIMITS]  # how long a send counts, seconds
EPS = 1e-3  # Redis reports times to the microsecond and converts them to local time


class Sources:
    """Builds slot sources of one backend on one shared state, and closes them all."""

    def __init__(self, kind: str, tmp_path: Path, redis: RedisClient | None, prefix: str) -> None:
        self.kind = kind
        self._db = tmp_path / "state.db"
        self._redis = redis
        self._prefix = prefix
        self._built: list[SlotSource] = []
        self._logs: list[SqliteSendLog] = []

    async def __call__(self) -> SlotSource:
        source: SlotSource
        if self.kind == "memory":
            source = LocalSlots(NAME, CredentialBudget(LIMITS, GUARD), MemorySendLog())
        elif self.kind == "sqlite":
            log = await SqliteSendLog.open(self._db)
            self._logs.append(log)
            source = LocalSlots(NAME, CredentialBudget(LIMITS, GUARD), log)
        else:
            assert self._redis is not None
            source = RedisSlots(
                NAME, self._redis, self._prefix, LIMITS, GUARD, replicas=1, mode="local"
            )
        self._built.append(source)
        return source

    async def close(self) -> None:
        for source in self._built:
            await source.close()
        for log in self._logs:
            await log.close()
        # mode="local" would carry on alone without Redis: a test that passed that way
        # tested the fallback, not the shared state.
        assert all(source.healthy for source in self._built), "Redis went away mid-test"


@asynccontextmanager
async def scratch_redis(url: str | None = None) -> AsyncIterator[tuple[RedisClient, str]]:
    """A client on the test Redis (or the one at ``url``) and a fresh key prefix, whose keys
    are deleted afterwards.

    Fails the test (never skips it) when Redis does not answer."""
    client: RedisClient
    if url is None:
        client = Redis(host="127.0.0.1", port=6379, socket_timeout=2, socket_connect_timeout=2)
    else:
        client = open_redis(url, RedisOptions(timeout_seconds=2.0))
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        pytest.fail(f"these tests need Redis on 127.0.0.1:6379: {exc!r}", pytrace=False)
    prefix = f"egw-test-{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        for key in keys:  # one by one: on a cluster they lie in different slots
            await client.delete(key)
        await client.aclose()


@pytest.fixture(params=BACKENDS)
async def make_source(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sources]:
    async with AsyncExitStack() as stack:
        redis, prefix = None, ""
        if request.param == "redis":
            redis, prefix = await stack.enter_async_context(scratch_redis())
        elif request.param in ("sentinel", "cluster"):
            url = str(request.getfixturevalue(f"redis_{request.param}").url)
            redis, prefix = await stack.enter_async_context(scratch_redis(url))
        sources = Sources(request.param, tmp_path, redis, prefix)
        # Registered after the Redis scratch: runs first, so sources close before cleanup.
        stack.push_async_callback(sources.close)
        yield sources


async def settle(source: SlotSource) -> None:
    """Wait for the writes a source makes in the background (give_back, observe, freeze).

    Reaches into internals (LocalSlots._background, RedisSlots._link.tasks): the contract only
    says they happen "in background", and a test must not race them."""
    if isinstance(source, RedisSlots):
        pending = list(source._link.tasks)
    else:
        assert isinstance(source, LocalSlots)
        pending = list(source._background)
    await asyncio.gather(*pending)


async def reread(source: SlotSource, now: float) -> None:
    """Rebuild the source's view from its backend (RedisSlots caches it for 0.1 s)."""
    if isinstance(source, RedisSlots):
        source._view.read_at = -math.inf
    await source.refresh(now)


async def take_all(source: SlotSource, now: float, attempts: int) -> list[Slot]:
    """Up to ``attempts`` takes at ``now``; the slots granted."""
    got = [await source.take(now) for _ in range(attempts)]
    return [slot for slot in got if slot is not None]


def used(source: SlotSource, now: float) -> list[int]:
    return [view.used for view in source.snapshot(now)]


async def rows(source: SlotSource, now: float) -> int:
    """Sends in a LocalSlots' write-ahead log (SQLite: the rows a restart would load)."""
    assert isinstance(source, LocalSlots)
    return len(await source.log.recent(NAME, now - 60))


# --- 1. take: the hard cap -------------------------------------------------------------


async def test_take_grants_up_to_the_tightest_limit_then_refuses(make_source: Sources) -> None:
    source = await make_source()
    now = time.time()
    granted = await take_all(source, now, 3)
    assert len(granted) == 3
    assert all(slot.at == pytest.approx(now, abs=EPS) for slot in granted)
    for _ in range(5):
        assert await source.take(now) is None
    assert used(source, now) == [3, 3]  # refused attempts record nothing...
    source.give_back(granted[0])
    await settle(source)
    # ...so giving back one granted slot makes room for exactly one more.
    assert len(await take_all(source, now, 3)) == 1
    assert used(source, now) == [3, 3]


# --- 2. commit and give_back -------------------------------------------------------------


async def test_give_back_of_a_committed_slot_frees_exactly_one(make_source: Sources) -> None:
    source = await make_source()
    now = time.time()
    granted = await take_all(source, now, 3)
    for slot in granted:
        await source.commit(slot)
    assert all(slot.committed for slot in granted) or isinstance(source, RedisSlots)
    source.give_back(granted[0])
    await settle(source)
    assert used(source, now) == [2, 2]
    again = await take_all(source, now, 3)
    assert len(again) == 1
    await source.commit(again[0])
    if make_source.kind == "sqlite":
        assert await rows(source, now) == 3  # 3 written, 1 removed, 1 written
    restarted = await make_source()
    await restarted.restore(now)
    assert used(restarted, now) == ([3, 3] if restarted.durable else [0, 0])


async def test_give_back_of_an_uncommitted_slot_frees_it_and_no_other(
    make_source: Sources,
) -> None:
    source = await make_source()
    now = time.time()
    first, second, third = await take_all(source, now, 3)  # all recorded at the same `now`
    await source.commit(first)
    await source.commit(second)
    source.give_back(third)  # its request never left, and it was never written ahead
    await settle(source)
    assert used(source, now) == [2, 2]
    if make_source.kind == "sqlite":
        # Both rows share the uncommitted slot's time: neither may be deleted for it.
        assert await rows(source, now) == 2
    # The durable state keeps both committed sends: a restart still counts them.
    restarted = await make_source()
    await restarted.restore(now)
    assert used(restarted, now) == ([2, 2] if restarted.durable else [0, 0])
    assert len(await take_all(source, now, 3)) == 1


async def test_a_late_answer_moves_its_send_to_the_answer_less_the_guard(
    make_source: Sources,
) -> None:
    """echowin counts a send when it arrives, no later than its answer: an answer more than
    the guard after the send keeps its slot until the answer plus the window."""
    source = await make_source()
    now = time.time()
    first, second, third = await take_all(source, now, 3)
    for slot in (first, second, third):
        await source.commit(slot)
    source.answered(first, now + GUARD)  # in time: it stays where it is
    for slot in (second, third):
        source.answered(slot, now + GUARD + 0.5)
    await settle(source)
    assert first.at == pytest.approx(now, abs=EPS)
    assert second.at == third.at == pytest.approx(now + 0.5, abs=EPS)
    assert used(source, now + 0.5) == [3, 3]
    await reread(source, now)
    # The tightest window frees one slot when the first send stops counting, the next two
    # half a second later (the 10 s window allows two more).
    assert source.predict_wait(now, 0, None) == pytest.approx(SPANS[1], abs=0.1)
    assert source.predict_wait(now, 1, None) == pytest.approx(SPANS[1] + 0.5, abs=0.1)
    restarted = await make_source()  # what a restart, or another process, reads
    await restarted.restore(now)
    if restarted.durable:
        assert restarted.predict_wait(now, 1, None) == pytest.approx(SPANS[1] + 0.5, abs=0.1)


# --- 3. retry_in and predict_wait -----------------------------------------------------


async def test_retry_in_and_predict_wait_when_full(make_source: Sources) -> None:
    source = await make_source()
    now = time.time()
    assert source.retry_in(now) == 0
    assert source.predict_wait(now, 0, None) == 0
    assert len(await take_all(source, now, 4)) == 3  # the 4th attempt is refused
    retry = source.retry_in(now)
    assert 0 < retry <= SPANS[1] + EPS  # the 3-per-second window frees first
    await reread(source, now)
    waits = [source.predict_wait(now, ahead, None) for ahead in range(7)]
    assert waits[0] >= retry - EPS
    assert waits[0] == pytest.approx(SPANS[1], abs=0.1)
    assert waits == sorted(waits)  # more sends ahead never means a shorter wait
    # Two more fit when the 1 s window frees; the third waits for the 10 s window.
    assert waits[1] == pytest.approx(waits[0], abs=EPS)
    assert waits[2] == pytest.approx(SPANS[0], abs=0.1)
    assert waits[6] > waits[2] > waits[0]
    assert source.predict_wait(now, 2, SPANS[1] + 1.0) == math.inf  # past the horizon
    assert source.predict_wait(now, 0, SPANS[1] + 1.0) == pytest.approx(waits[0])


# --- 4. freeze -----------------------------------------------------------------------


async def test_freeze_refuses_until_it_ends(make_source: Sources) -> None:
    source = await make_source()
    now = time.time()
    until = now + 0.3
    source.freeze(until)
    await settle(source)  # Redis: the frozen key is written in the background
    assert source.frozen_until(now) == pytest.approx(until, abs=EPS)
    assert await source.take(now) is None
    assert 0 < source.retry_in(now) <= until - now + EPS
    views = source.snapshot(now)
    assert [(v.requests, v.per_seconds) for v in views] == [
        (lim.requests, lim.per_seconds) for lim in LIMITS
    ]
    assert [v.used for v in views] == [0, 0]  # a freeze is not a send
    await asyncio.sleep(max(0.0, until + 0.05 - time.time()))
    later = time.time()
    assert source.frozen_until(later) is None
    # Redis counts the freeze from when its write ran, a moment after the call (longer on
    # a busy machine): there it may end that much later, never sooner.
    await eventually(lambda: took(source), "a send once the freeze is over", 1.0)


async def took(source: SlotSource) -> bool:
    return await source.take(time.time()) is not None


async def test_a_shorter_freeze_never_shortens_a_longer_one(make_source: Sources) -> None:
    source = await make_source()
    now = time.time()
    source.freeze(now + 30)
    source.freeze(now + 0.1)
    await settle(source)
    await reread(source, now)
    frozen = source.frozen_until(now)
    assert frozen == pytest.approx(now + 30, abs=0.05)
    assert await source.take(now) is None
    assert source.retry_in(now) > 29


# --- 5. what echowin reports ----------------------------------------------------------


async def test_observed_external_use_counts_and_refuses(make_source: Sources) -> None:
    source = await make_source()
    now = time.time()
    (mine,) = await take_all(source, now, 1)
    await source.commit(mine)
    # echowin counts 4 of 5 in its 10 s window after our one send: 3 are someone else's.
    source.observe(now, limit=5, remaining=1)
    ten_s, one_s = source.snapshot(now)
    assert (ten_s.used, ten_s.external, ten_s.remaining) == (4, 3, 1)
    assert (one_s.used, one_s.external) == (1, 0)  # only the window the header describes
    await settle(source)
    await reread(source, now)  # Redis: the shared state says the same
    ten_s, one_s = source.snapshot(now)
    assert (ten_s.used, ten_s.external) == (4, 3)
    assert (one_s.used, one_s.external) == (1, 0)
    # One more send fits in the 10 s window (the 1 s window had room for two).
    assert len(await take_all(source, now, 3)) == 1
    assert source.retry_in(now) > SPANS[1]  # now it is the 10 s window that blocks
    # The same report again (after our second send) adds no one else's sends.
    source.observe(now, limit=5, remaining=0)
    await settle(source)
    await reread(source, now)
    assert [(v.used, v.external) for v in source.snapshot(now)] == [(5, 3), (2, 0)]


# --- 6. durability ---------------------------------------------------------------------


async def test_a_restart_remembers_sends_only_if_durable(make_source: Sources) -> None:
    source = await make_source()
    assert source.durable is (make_source.kind != "memory")
    now = time.time()
    for slot in await take_all(source, now, 3):
        await source.commit(slot)
    await settle(source)
    restarted = await make_source()
    assert restarted.durable is source.durable
    await restarted.restore(now)
    if restarted.durable:
        assert used(restarted, now) == [3, 3]
        assert await restarted.take(now) is None  # the limit holds across the restart
        assert restarted.retry_in(now) > 0
    else:
        # memory:// forgets; the scheduler calibrates with one probe instead.
        assert used(restarted, now) == [0, 0]
        assert len(await take_all(restarted, now, 4)) == 3


# --- 7. snapshot -----------------------------------------------------------------------


async def test_snapshot_reflects_what_was_taken(make_source: Sources) -> None:
    source = await make_source()
    now = time.time()
    empty = source.snapshot(now)
    assert [(v.requests, v.per_seconds) for v in empty] == [
        (lim.requests, lim.per_seconds) for lim in LIMITS
    ]
    assert [(v.used, v.remaining, v.reset_in, v.external) for v in empty] == [
        (0, 5, 0, 0),
        (0, 3, 0, 0),
    ]
    first, _ = await take_all(source, now, 2)
    views = source.snapshot(now)
    assert [(v.used, v.remaining, v.external) for v in views] == [(2, 3, 0), (2, 1, 0)]
    for view, span in zip(views, SPANS, strict=True):
        assert view.reset_in == pytest.approx(span, abs=EPS)
    source.give_back(first)
    await settle(source)
    await reread(source, now)
    assert [(v.used, v.remaining) for v in source.snapshot(now)] == [(1, 4), (1, 2)]
