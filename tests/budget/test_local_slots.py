"""Write-ahead leases: the SQLite send log reserves blocks of slots far from every limit.

``LocalSlots`` on ``SqliteSendLog``: one row per send near a limit, one row per block of
slots (a lease) far from every limit; several processes on one file (two log objects on
one file here, each with its own owner id, as two workers have) share one budget. The
clock is passed in: no test sleeps.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.budget.classes import ClassBook, ServiceClass
from proxy.budget.lease import LEASE_MAX_SECONDS, LEASE_WANT, Lease, next_length
from proxy.budget.local_slots import LocalSlots
from proxy.budget.slots import Slot
from proxy.budget.windows import CredentialBudget, Limit
from proxy.state.sqlite.connection import SCHEMA_VERSION
from proxy.state.sqlite.sends import SqliteSendLog

NAME = "default"
GUARD = 0.25
T0 = 1_000_000.0
LEASE = LocalSlots.LEASE_SECONDS


class Files:
    """Slot sources on one SQLite file; ``source()`` is one more process on it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.logs: list[SqliteSendLog] = []
        self.sources: list[LocalSlots] = []

    async def source(self, *limits: Limit) -> LocalSlots:
        log = await SqliteSendLog.open(self.path)
        self.logs.append(log)
        source = LocalSlots(NAME, CredentialBudget(limits, GUARD), log)
        self.sources.append(source)
        return source

    def rows(self) -> list[tuple[float, int]]:
        with sqlite3.connect(self.path) as conn:
            return [
                (float(at), int(n))
                for at, n in conn.execute("SELECT at, n FROM send_rows ORDER BY id")
            ]

    async def close(self) -> None:
        for source in self.sources:
            await source.close()
        for log in self.logs:
            await log.close()
        self.sources.clear()
        self.logs.clear()


@pytest.fixture
async def files(tmp_path: Path) -> AsyncIterator[Files]:
    files = Files(tmp_path / "state.db")
    yield files
    await files.close()


async def take(source: LocalSlots, now: float, count: int) -> list[Slot]:
    got = [await source.take(now) for _ in range(count)]
    return [slot for slot in got if slot is not None]


async def test_far_from_every_limit_one_row_reserves_a_block(files: Files) -> None:
    source = await files.source(Limit(100_000, 3600), Limit(10_000, 60))
    slots = await take(source, T0, 1000)
    assert len(slots) == 1000
    rows = files.rows()
    # The first block is 1/16 of what the tightest window has free, capped at block_max.
    assert rows[0] == (T0 + LEASE, SqliteSendLog.block_max)
    assert len(rows) == -(-1000 // SqliteSendLog.block_max)  # 4 writes, not 1000
    assert sum(n for _, n in rows) >= 1000
    assert all(slot.committed and slot.at == T0 + LEASE for slot in slots)


async def test_near_a_limit_every_send_has_its_own_row_at_its_own_time(files: Files) -> None:
    source = await files.source(Limit(100, 60))  # echowin's per-minute limit
    slots = await take(source, T0, 150)
    assert len(slots) == 100
    assert files.rows() == [(T0, 1)] * 100


async def test_a_lease_ends_after_its_time_and_gives_back_what_it_did_not_use(
    files: Files,
) -> None:
    source = await files.source(Limit(10_000, 60))
    first = await take(source, T0, 10)
    block = files.rows()[0][1]
    assert block > 10
    assert [v.used for v in source.snapshot(T0)] == [10]  # unused slots show as free
    # Past the lease's end its slots may no longer leave: the next take opens a new lease
    # and gives back the old one's unused slots in the same write.
    later = await take(source, T0 + LEASE + 0.01, 1)
    # It handed out fewer than LEASE_WANT in its time: the next lasts twice as long.
    assert later[0].at == T0 + LEASE + 0.01 + 2 * LEASE
    assert files.rows()[1] == (first[0].at, -(block - 10))
    assert [v.used for v in source.snapshot(T0 + LEASE + 0.01)] == [11]
    # 10 spent, and a new lease of twice what the last one handed out (see the next test)
    assert len(await source.log.recent(NAME, 0.0)) == 10 + 2 * 10


async def test_a_lease_is_sized_by_what_the_last_one_handed_out(files: Files) -> None:
    # One key of hundreds sees a send now and then: a block of block_max per send would
    # record 256 slots and release 255 in every window, each time. Its leases shrink to
    # twice what the last one handed out (at least 2); a busy key doubles back to the cap.
    source = await files.source(Limit(100_000, 3600))
    now = T0
    for _ in range(3):  # one send per lease
        assert len(await take(source, now, 1)) == 1
        now += source.lease_seconds + 0.01  # (a quiet key's leases last longer: next test)
    sizes = [n for _, n in files.rows() if n > 0]
    assert sizes == [SqliteSendLog.block_max, 2, 2]
    await take(source, now, 2)  # a lease of 2, used up: the next one is 4, then 8...
    slots = await take(source, now, 2 + 4 + 8)
    assert len(slots) == 14
    sizes = [n for _, n in files.rows() if n > 0]
    assert sizes[-4:] == [2, 4, 8, 16]
    for _ in range(6):
        await take(source, now, sizes[-1])
        sizes = [n for _, n in files.rows() if n > 0]
    assert sizes[-1] == SqliteSendLog.block_max


async def test_a_quiet_keys_lease_lasts_longer_and_shares_its_row(files: Files) -> None:
    # One key of hundreds, a send a second: with 0.25 s leases every send opened its own
    # row (and gave back an unused slot). Its leases double in length while they
    # hand out fewer than LEASE_WANT slots, up to LEASE_MAX_SECONDS, and halve back once one
    # runs out with twice that many. Every slot's row counts it from before it leaves
    # until at least its moment plus the window, as with any lease.
    source = await files.source(Limit(100_000, 3600))
    sends = [T0 + i * 1.0 for i in range(200)]  # 200 s at 1 a second
    for now in sends:
        (slot,) = await take(source, now, 1)
        assert now <= slot.at <= now + LEASE_MAX_SECONDS
    rows = [n for _, n in files.rows() if n > 0]
    assert len(rows) < len(sends) / 8  # was a row per send
    assert source.lease_seconds == LEASE_MAX_SECONDS
    assert [v.used for v in source.snapshot(sends[-1])] == [200]  # each send counted once
    # A burst runs leases out with many slots: each next one is half as long.
    now = sends[-1] + LEASE_MAX_SECONDS + 0.01
    burst = await take(source, now, 2000)
    # (the shorter leases end just after the first, not before it: next test)
    end = now + LEASE_MAX_SECONDS + 1e-6
    assert len(burst) == 2000 and all(now <= slot.at <= end for slot in burst)
    assert source.lease_seconds == LEASE


async def test_a_shorter_lease_after_a_longer_one_records_its_slots_after_the_last_ones(
    files: Files,
) -> None:
    # A quiet key's leases last LEASE_MAX_SECONDS; a burst then runs them out and halves
    # each next one. Ended at ``now + lease_seconds``, a shorter lease would record its
    # slots before those of the longer one already in every window's log: each an insertion
    # into an hour of sends, not an append. It records them just after the newest instead
    # (later than they can leave: they count longer, never shorter), and is handed out
    # until then; its pace is learnt as before.
    source = await files.source(Limit(100_000, 3600))
    for i in range(200):
        assert len(await take(source, T0 + i * 1.0, 1)) == 1
    assert source.lease_seconds == LEASE_MAX_SECONDS
    now = T0 + 200 * 1.0
    burst = await take(source, now, 2000)
    ats = [slot.at for slot in burst]
    assert len(burst) == 2000 and ats == sorted(ats)
    assert all(now <= at <= now + 2 * LEASE_MAX_SECONDS for at in ats)
    assert source.lease_seconds == LEASE
    reserved = [at for at, n in files.rows() if n > 0]
    assert reserved == sorted(reserved)  # every row after the ones before it
    assert [v.used for v in source.snapshot(now)] == [2200]  # each send counted once
    # Once the clock is past them, a lease ends at its own length again.
    later = max(ats) + 0.01
    (slot,) = await take(source, later, 1)
    assert later < slot.at <= later + 2 * LEASE


def test_a_lease_is_never_longer_than_a_quarter_of_the_shortest_window() -> None:
    quiet = Lease(T0, 1)
    quiet.seconds = 1.0
    assert next_length(quiet, True, 3600.0) == 2.0
    assert next_length(quiet, True, 4.0) == 1.0  # 4 s / 4
    assert next_length(quiet, True, 0.5) == LEASE  # never below the first lease's length
    assert next_length(quiet, False, 3600.0) == 1.0  # ran out with 2 slots: as long
    busy = Lease(T0, 2 * LEASE_WANT - 1)
    busy.seconds, busy.left = 2.0, 0
    assert next_length(busy, False, 3600.0) == 1.0
    assert next_length(busy, True, 3600.0) == 2.0  # 32 handed out in its time: as long
    quiet.seconds = 8.0
    assert next_length(quiet, True, 3600.0) == LEASE_MAX_SECONDS == 16.0
    assert next_length(quiet, True, 60.0) == 15.0  # echowin's minute: 15 s


async def test_a_slot_given_back_returns_to_its_open_lease(files: Files) -> None:
    source = await files.source(Limit(10_000, 60))
    (slot,) = await take(source, T0, 1)
    before = len(files.rows())
    source.give_back(slot)
    assert len(files.rows()) == before  # no write: the lease's row still covers it
    assert [v.used for v in source.snapshot(T0)] == [0]
    again = await source.take(T0)
    assert again is not None and again.at == slot.at


async def test_a_crash_mid_lease_counts_the_whole_block_after_restart(files: Files) -> None:
    source = await files.source(Limit(10_000, 60))
    await take(source, T0, 3)
    block = files.rows()[0][1]
    # SIGKILL: nothing is closed, nothing given back. The restarted process cannot know
    # how many of the block left, so it counts all of them, for as long as the last could.
    restarted = await files.source(Limit(10_000, 60))
    await restarted.restore(T0 + 1)
    assert [v.used for v in restarted.snapshot(T0 + 1)] == [block]
    span = 60 + GUARD
    assert [v.used for v in restarted.snapshot(T0 + LEASE + span - 0.001)] == [block]
    assert [v.used for v in restarted.snapshot(T0 + LEASE + span)] == [0]


async def test_a_clean_close_gives_the_unused_slots_back(files: Files) -> None:
    source = await files.source(Limit(10_000, 60))
    await take(source, T0, 3)
    await source.close()
    restarted = await files.source(Limit(10_000, 60))
    await restarted.restore(T0 + 1)
    assert [v.used for v in restarted.snapshot(T0 + 1)] == [3]


async def test_a_freeze_ends_the_open_lease(files: Files) -> None:
    source = await files.source(Limit(10_000, 60))
    await take(source, T0, 1)
    source.freeze(T0 + 30)
    await source.close()  # waits for the background writes
    assert sum(n for _, n in files.rows()) == 1
    assert await source.take(T0 + 0.1) is None


async def test_a_freeze_holds_for_the_other_processes_and_after_a_restart(
    files: Files,
) -> None:
    a = await files.source(Limit(100, 60))
    b = await files.source(Limit(100, 60))
    assert await b.take(T0) is not None
    a.freeze(T0 + 30)  # a met an unexpected 429
    await a.close()
    assert await b.take(T0 + 1) is None  # b reads a's freeze before it writes a send
    assert b.frozen_until(T0 + 1) == T0 + 30
    restarted = await files.source(Limit(100, 60))
    await restarted.restore(T0 + 2)
    assert restarted.frozen_until(T0 + 2) == T0 + 30
    assert await restarted.take(T0 + 2) is None
    assert await restarted.take(T0 + 30) is not None


async def test_another_process_sees_the_leases_and_the_rows(files: Files) -> None:
    a = await files.source(Limit(1000, 60))
    b = await files.source(Limit(1000, 60))
    first = await take(a, T0, 1)  # a lease of 1000 // 16 = 62
    block = files.rows()[0][1]
    await b.refresh(T0)
    assert [v.used for v in b.snapshot(T0)] == [block]
    # b spends the rest; a's lease still holds its unused slots for a.
    granted_b = await take(b, T0, 1000)
    granted_a = await take(a, T0, 1000)
    assert len(first) + len(granted_a) + len(granted_b) == 1000


async def lease_timer_fired(source: LocalSlots) -> None:
    """Until the lease's timer (LEASE_IDLE_SECONDS patched to 0) has ended the lease."""
    async with asyncio.timeout(5):
        while source._lease is not None:
            await asyncio.sleep(0.001)


async def written(source: LocalSlots) -> None:
    """Until the rows the source writes in the background are in the log."""
    async with asyncio.timeout(5):
        while source._background:
            await asyncio.gather(*source._background)


async def test_an_idle_process_gives_its_lease_back_for_the_others(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker that takes one slot and then gets no more requests: its lease's unused
    # slots go back when the lease's timer fires, not when it next takes (maybe never).
    monkeypatch.setattr(LocalSlots, "LEASE_IDLE_SECONDS", 0.0)
    a = await files.source(Limit(1000, 60))
    b = await files.source(Limit(1000, 60))
    assert len(await take(a, T0, 1)) == 1  # a lease of 1000 // 16 = 62
    block = files.rows()[0][1]
    assert block > 1
    await lease_timer_fired(a)
    await written(a)
    assert files.rows()[-1] == (T0 + LEASE, -(block - 1))
    assert len(await take(b, T0, 1000)) == 999  # all but a's one send


async def test_a_used_up_lease_ends_too_and_a_slot_given_back_later_goes_to_everyone(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The idle worker's lease has no slot left when its timer fires; one of its requests
    # then never leaves. Its slot goes back to the log, not into the ended lease.
    monkeypatch.setattr(LocalSlots, "LEASE_IDLE_SECONDS", 0.0)
    a = await files.source(Limit(1000, 60))
    b = await files.source(Limit(1000, 60))
    slots = await take(a, T0, 1000 // 16)  # one lease of 62, all of it handed out
    assert files.rows() == [(T0 + LEASE, len(slots))]
    await lease_timer_fired(a)
    a.give_back(slots[-1])
    await written(a)
    assert files.rows()[-1] == (T0 + LEASE, -1)
    assert len(await take(b, T0, 1000)) == 1000 - (len(slots) - 1)


async def test_a_slot_given_back_after_a_freeze_does_not_leave_through_a_used_up_lease(
    files: Files,
) -> None:
    source = await files.source(Limit(10_000, 60))
    slots = await take(source, T0, SqliteSendLog.block_max)  # the first lease, used up
    assert source._lease is not None and source._lease.left == 0
    source.freeze(T0 + 30)  # echowin answered 429: nothing leaves before T0 + 30
    source.give_back(slots[-1])  # a request of the lease that never left
    assert await source.take(T0 + 0.1) is None
    assert await source.take(T0 + 30) is not None


async def test_the_other_processes_sends_are_not_taken_for_someone_elses(files: Files) -> None:
    a = await files.source(Limit(40, 10))
    b = await files.source(Limit(40, 10))
    assert len(await take(a, T0, 5)) == 5
    assert len(await take(b, T0, 5)) == 5  # a has not read b's rows yet
    # echowin's answer to one of a's sends counts all ten: none of them is someone else's.
    a.observe(T0 + 0.1, limit=40, remaining=30)
    (window,) = a.snapshot(T0 + 0.1)
    assert (window.used, window.external) == (10, 0)
    # Someone else's sends still show: echowin counts 3 more than the two processes made.
    a.observe(T0 + 0.2, limit=40, remaining=27)
    (window,) = a.snapshot(T0 + 0.2)
    assert (window.used, window.external) == (13, 3)


async def test_first_start_probes_of_two_processes_count_each_send_once(files: Files) -> None:
    # ``serve --workers 2`` on a new file: each worker calibrates with one probe, and
    # echowin's answer to a's probe already counts b's.
    a = await files.source(Limit(12, 2), Limit(40, 10))
    b = await files.source(Limit(12, 2), Limit(40, 10))
    assert len(await take(a, T0, 1)) == 1
    assert len(await take(b, T0, 1)) == 1  # a has not read b's row yet
    a.assume_external(T0 + 0.1, 2)
    assert [(v.used, v.external) for v in a.snapshot(T0 + 0.1)] == [(2, 0), (2, 0)]
    # The ten slots left are a's and b's to take, not nine.
    assert len(await take(a, T0 + 0.1, 5)) + len(await take(b, T0 + 0.1, 10)) == 10


async def test_schema_is_migrated_with_the_old_sends_kept(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE sends (credential TEXT NOT NULL, at REAL NOT NULL)")
    conn.executemany("INSERT INTO sends VALUES (?, ?)", [(NAME, T0), (NAME, T0 + 1)])
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    # The tokens table of version 1 is missing here; create it as version 1 would have.
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE tokens (id TEXT PRIMARY KEY, name TEXT NOT NULL, secret_hash TEXT NOT"
        " NULL, scopes TEXT NOT NULL, upstream_key TEXT NOT NULL, hourly INTEGER, per_minute"
        " INTEGER, weight INTEGER NOT NULL, created_at REAL NOT NULL, expires_at REAL,"
        " revoked_at REAL)"
    )
    conn.commit()
    conn.close()
    log = await SqliteSendLog.open(path)
    try:
        assert await log.recent(NAME, 0.0) == [T0, T0 + 1]
    finally:
        await log.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()


# --- two processes, random interleavings: never more than N in any window -------------


STEP = st.tuples(
    st.integers(0, 1),  # which process
    st.sampled_from(["take", "take", "take", "give_back", "close"]),
    st.integers(0, 150),  # how many
    st.sampled_from([0.0, 0.0, 0.01, 0.1, LEASE, 1.0, 5.0]),  # time passing first
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(STEP, min_size=1, max_size=30))
async def test_two_processes_never_send_more_than_the_limit_in_any_window(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[int, str, int, float]]
) -> None:
    limit = Limit(300, 2.0)  # 300 free: leases of 18
    files = Files(tmp_path_factory.mktemp("leases") / "state.db")
    try:
        procs = [await files.source(limit), await files.source(limit)]
        now = T0
        kept: list[float] = []  # sends of processes that restarted
        held: list[list[tuple[Slot, float]]] = [[], []]  # slots and when they left
        for who, op, count, dt in steps:
            now += dt
            source = procs[who]
            if op == "take":
                await source.refresh(now)
                for slot in await take(source, now, count):
                    assert slot.at >= now  # recorded no earlier than it leaves
                    held[who].append((slot, now))
            elif op == "give_back":
                for _ in range(min(count, len(held[who]))):
                    slot, _ = held[who].pop()
                    source.give_back(slot)  # it never left
            elif op == "close":  # a restart: what it sent stays sent
                await source.close()
                files.sources.remove(source)
                procs[who] = await files.source(limit)
                await procs[who].restore(now)
                kept.extend(t for _, t in held[who])
                held[who] = []
        sent = sorted(kept + [t for slots in held for _, t in slots])
        for i, start in enumerate(sent):
            inside = [t for t in sent[i:] if t < start + limit.per_seconds + GUARD]
            assert len(inside) <= limit.requests
    finally:
        await files.close()


async def test_with_classes_leases_fit_the_surplus_and_two_processes_keep_the_reserve(
    tmp_path: Path,
) -> None:
    # Two processes on one file (serve --workers 2), classes of service: interactive holds
    # 9,000 of the minute's 10,000. Batch's leases fit the 1,000 nobody holds, and whatever
    # both processes send, interactive's reservation stays whole; a paced class takes no
    # lease (one row per send).
    limits = (Limit(10_000, 60),)
    specs = [
        ServiceClass("interactive", reserve=(Limit(9_000, 60),)),
        ServiceClass("batch"),
        ServiceClass("paced", pace=True, burst=50),
    ]
    logs = [await SqliteSendLog.open(tmp_path / "state.db") for _ in range(2)]
    sources = [
        LocalSlots(NAME, CredentialBudget(limits, GUARD), log, classes=ClassBook(
            specs, limits, GUARD, "batch"))
        for log in logs
    ]  # fmt: skip
    try:
        got = [await sources[i % 2].take(T0, cls="batch") for i in range(2_000)]
        assert sum(slot is not None for slot in got) == 1_000  # the surplus, not a slot more
        sources[0].refreshed(T0 + 1)
        assert sum(1 for s in (await take_class(sources[0], T0, "interactive", 9_500))) == 9_000
        with sqlite3.connect(tmp_path / "state.db") as conn:
            classes = dict(conn.execute("SELECT cls, SUM(n) FROM send_rows GROUP BY cls"))
        assert classes["interactive"] == 9_000
        assert classes.get("*", 0) + classes.get("batch", 0) == 1_000
        later = T0 + 120  # every window empty again
        assert len(await take_class(sources[1], later, "paced", 60)) == 50  # its burst
        with sqlite3.connect(tmp_path / "state.db") as conn:
            paced = conn.execute("SELECT n FROM send_rows WHERE cls = 'paced'").fetchall()
        assert paced == [(1,)] * 50  # a row per send: no lease
    finally:
        for source in sources:
            await source.close()
        for log in logs:
            await log.close()


async def take_class(source: LocalSlots, now: float, cls: str, count: int) -> list[Slot]:
    got = [await source.take(now, cls=cls) for _ in range(count)]
    return [slot for slot in got if slot is not None]


async def test_a_restart_rebuilds_each_class_from_the_log(tmp_path: Path) -> None:
    # The send rows carry their class: a restarted process (a new LocalSlots on the same
    # file) counts interactive's sends against its reservation, and batch's pace.
    limits = (Limit(100, 60),)
    specs = [
        ServiceClass("interactive", reserve=(Limit(20, 60),)),
        ServiceClass("batch", pace=True, burst=5),
    ]
    path = tmp_path / "state.db"

    async def start() -> tuple[SqliteSendLog, LocalSlots]:
        log = await SqliteSendLog.open(path)
        book = ClassBook(specs, limits, GUARD, "batch")
        source = LocalSlots(NAME, CredentialBudget(limits, GUARD), log, classes=book)
        await source.restore(T0)
        return log, source

    log, source = await start()
    assert len(await take_class(source, T0, "interactive", 3)) == 3
    assert len(await take_class(source, T0, "batch", 10)) == 5  # its burst
    await source.close()
    await log.close()
    log, source = await start()
    try:
        assert source.classes is not None
        views = source.classes.views(T0, source.budget)
        assert [v.used for v in views["interactive"]] == [3]
        assert [v.free for v in views["batch"]] == [100 - 8 - 17]  # interactive's 17 held
        assert await source.take(T0, cls="batch") is None  # its pace, rebuilt: spent
        assert await source.take(T0 + 0.7, cls="batch") is not None  # 100/60 s refill
    finally:
        await source.close()
        await log.close()
