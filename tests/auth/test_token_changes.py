"""The tokens' change log: a cached token is read again when it changed, not every
``cache_ttl``; a change made by another process shows at the next poll; when the log
cannot be read, records age out at ``cache_ttl`` as they do without it.

Real SQLite state files: a second store on the same file is another process (a worker,
the ``token`` commands) writing. Time is a fake clock, moved by hand.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.auth.authenticator import RENEWALS, AuthFailure, TokenAuthenticator
from proxy.auth.changes import ChangePoller, TokenChangeLog, changes_after
from proxy.auth.tokens import NewToken, TokenRecord, TokenStore
from proxy.state import SqliteTokenStore, open_token_store
from tests.auth.conftest import T0, CountingStore, FakeClock, mint, stored
from tests.state.pg_server import empty_tables

TTL = 5.0


class Counting:
    """A real store, counting its reads by id; its change log fails while ``broken``."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store
        self.gets = 0
        self.broken = False

    async def get(self, token_id: str) -> TokenRecord | None:
        self.gets += 1
        return await self.store.get(token_id)

    async def changes_since(self, cursor: int | None) -> tuple[int, list[str] | None]:
        if self.broken:
            raise OSError("the store went away")  # what a lost connection raises
        assert isinstance(self.store, TokenChangeLog)
        return await self.store.changes_since(cursor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture(params=["sqlite", "postgresql"])
async def stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Counting, TokenStore]]:
    """This process's store, and another process's on the same file or database."""
    async with AsyncExitStack() as stack:
        if request.param == "postgresql":
            url = request.getfixturevalue("pg_session_url")
            stack.push_async_callback(empty_tables, url)
        else:
            url = f"sqlite:///{tmp_path}/state.db"
        ours = await open_token_store(url)
        stack.push_async_callback(ours.close)
        theirs = await open_token_store(url)
        stack.push_async_callback(theirs.close)
        yield Counting(ours), theirs


def setup(store: Counting) -> tuple[FakeClock, TokenAuthenticator, ChangePoller]:
    timer = FakeClock(0.0)
    auth = TokenAuthenticator(store, clock=FakeClock(T0), cache_ttl=TTL, timer=timer)  # type: ignore[arg-type]
    return timer, auth, ChangePoller(store, auth, TTL / 2, timer=timer)


@dataclass
class Cached:
    """A token another process made, looked up after the log's first poll."""

    ours: Counting
    theirs: TokenStore
    timer: FakeClock
    auth: TokenAuthenticator
    poller: ChangePoller
    new: NewToken


async def cached(stores: tuple[Counting, TokenStore]) -> Cached:
    ours, theirs = stores
    timer, auth, poller = setup(ours)
    new = mint()
    await theirs.put(new.record)
    await poller.poll()
    assert (await auth.authenticate(new.token)).ok
    return Cached(ours, theirs, timer, auth, poller, new)


def test_changes_after_reads_a_log_numbered_without_gaps() -> None:
    assert changes_after(7, [(8, "a"), (9, "*")], 9) == (9, None)  # every token (TRUNCATE)
    assert changes_after(None, [], 7) == (7, None)  # no cursor: anything may have changed
    assert changes_after(7, [], 7) == (7, [])
    assert changes_after(7, [(8, "a"), (9, "b"), (10, "a")], 10) == (10, ["a", "b", "a"])
    assert changes_after(7, [(9, "b")], 9) == (9, None)  # 8 was dropped
    assert changes_after(5, [], 7) == (7, None)  # no row after 5, yet 7 exists
    assert changes_after(9, [], 7) == (7, None)  # a log behind the cursor: another log


async def test_the_store_keeps_a_change_log(stores: tuple[Counting, TokenStore]) -> None:
    ours, theirs = stores
    assert isinstance(ours.store, TokenChangeLog)
    start, everything = await ours.changes_since(None)
    assert everything is None  # no cursor: any token may have changed
    a, b = mint(name="a"), mint(name="b")
    await theirs.put(a.record)
    await theirs.put(b.record)
    await theirs.revoke(a.record.id, T0 + 1)
    await theirs.revoke(a.record.id, T0 + 2)  # already revoked: nothing changes
    await theirs.update(b.record.id, weight=3)
    newest, changed = await ours.changes_since(start)
    assert changed == [a.record.id, b.record.id, a.record.id, b.record.id]
    assert newest == start + 4
    assert await ours.changes_since(newest) == (newest, [])


async def test_a_write_outside_the_store_is_in_the_log_too(tmp_path: Path) -> None:
    """Triggers write the log: a fix made with the sqlite3 shell is seen like any other."""
    store = await SqliteTokenStore.open(tmp_path / "state.db")
    try:
        new = mint()
        await store.put(new.record)
        start, _ = await store.changes_since(None)
        conn = sqlite3.connect(tmp_path / "state.db")
        conn.execute("UPDATE tokens SET revoked_at = ? WHERE id = ?", (T0, new.record.id))
        conn.execute("DELETE FROM tokens WHERE id = ?", (new.record.id,))
        conn.commit()
        conn.close()
        assert await store.changes_since(start) == (start + 2, [new.record.id] * 2)
    finally:
        await store.close()


async def test_a_cursor_the_log_no_longer_reaches_means_any_token_changed(tmp_path: Path) -> None:
    store = await SqliteTokenStore.open(tmp_path / "state.db")
    try:
        start, _ = await store.changes_since(None)
        conn = sqlite3.connect(tmp_path / "state.db")
        conn.executemany(  # the log keeps the newest 10,000 changes
            "INSERT INTO token_changes (token_id) VALUES (?)", [("x",)] * 10_001
        )
        conn.execute("DELETE FROM token_changes WHERE seq <= ?", (start + 1,))
        conn.commit()
        conn.close()
        assert await store.changes_since(start) == (start + 10_001, None)
        assert await store.changes_since(start + 10_001) == (start + 10_001, [])
        assert (await store.changes_since(start + 20_000))[1] is None  # another file
    finally:
        await store.close()


async def test_a_cached_token_is_not_read_again_while_the_log_says_it_is_unchanged(
    stores: tuple[Counting, TokenStore],
) -> None:
    c = await cached(stores)  # looked up at 0, after the log's first poll
    ours, _theirs, timer, auth, poller, new = c.ours, c.theirs, c.timer, c.auth, c.poller, c.new
    assert ours.gets == 1
    for _ in range(10):  # a minute of polls, every TTL / 2
        timer.now += TTL / 2
        await poller.poll()
        assert (await auth.authenticate(new.token)).ok
    assert ours.gets == 1
    # Without the polls it is read again once its TTL has passed.
    timer.now += TTL
    assert (await auth.authenticate(new.token)).ok
    assert ours.gets == 2


async def test_a_revocation_by_another_process_shows_at_the_next_poll(
    stores: tuple[Counting, TokenStore],
) -> None:
    ours, theirs = stores
    timer, auth, poller = setup(ours)
    new, other = mint(name="a"), mint(name="b")
    await theirs.put(new.record)
    await theirs.put(other.record)
    await poller.poll()
    assert (await auth.authenticate(new.token)).ok
    assert (await auth.authenticate(other.token)).ok
    await theirs.revoke(new.record.id, T0)
    timer.now += 0.1
    assert (await auth.authenticate(new.token)).ok  # not polled yet: cached
    await poller.poll()
    assert (await auth.authenticate(new.token)).failure is AuthFailure.REVOKED
    reads = ours.gets
    assert (await auth.authenticate(other.token)).ok  # not named: still cached
    assert ours.gets == reads


async def test_the_first_poll_drops_what_was_cached_before_it(
    stores: tuple[Counting, TokenStore],
) -> None:
    """A record cached before the first poll may predate a change behind the first
    cursor, which no later poll names: the first poll drops it, and later polls never
    renew a record the log could not vouch for."""
    ours, theirs = stores
    timer, auth, poller = setup(ours)
    new = mint()
    await theirs.put(new.record)
    assert (await auth.authenticate(new.token)).ok
    await theirs.revoke(new.record.id, T0)
    timer.now += 1.0
    await poller.poll()
    assert (await auth.authenticate(new.token)).failure is AuthFailure.REVOKED
    for _ in range(4):  # and stays refused, poll after poll
        timer.now += TTL / 2
        await poller.poll()
        assert (await auth.authenticate(new.token)).failure is AuthFailure.REVOKED


async def test_when_the_log_cannot_be_read_records_age_out_at_their_ttl(
    stores: tuple[Counting, TokenStore],
) -> None:
    c = await cached(stores)
    ours, theirs, timer, auth, poller, new = c.ours, c.theirs, c.timer, c.auth, c.poller, c.new
    timer.now += TTL / 2
    await poller.poll()  # confirmed at TTL / 2: fresh until 1.5 TTL
    ours.broken = True
    await theirs.revoke(new.record.id, T0)
    timer.now += TTL / 2
    with pytest.raises(OSError, match="went away"):
        await poller.poll()
    assert (await auth.authenticate(new.token)).ok  # within the bound: cached
    timer.now = 1.5 * TTL
    assert (await auth.authenticate(new.token)).failure is AuthFailure.REVOKED


async def test_a_log_that_lost_track_drops_every_cached_token(tmp_path: Path) -> None:
    theirs = await SqliteTokenStore.open(tmp_path / "state.db")
    ours = Counting(await SqliteTokenStore.open(tmp_path / "state.db"))
    try:
        await lost_track(ours, theirs, tmp_path / "state.db")
    finally:
        await ours.close()
        await theirs.close()


async def lost_track(ours: Counting, theirs: TokenStore, path: Path) -> None:
    _, auth, poller = setup(ours)
    new = mint()
    await theirs.put(new.record)
    await poller.poll()
    assert (await auth.authenticate(new.token)).ok
    conn = sqlite3.connect(path)
    conn.executemany("INSERT INTO token_changes (token_id) VALUES (?)", [("x",)] * 10_001)
    conn.execute("DELETE FROM token_changes WHERE seq <= (SELECT MAX(seq) FROM token_changes) - 10")
    conn.commit()
    conn.close()
    await poller.poll()
    assert (await auth.authenticate(new.token)).ok
    assert ours.gets == 2  # read again, though its id was not in the rows kept


async def test_a_poll_confirms_as_of_when_it_started(
    stores: tuple[Counting, TokenStore],
) -> None:
    """A change committed while a poll is under way (after the log was read) is not
    confirmed away: the records are current as of the poll's start, not its end."""
    c = await cached(stores)  # looked up at 0, after the log's first poll
    ours, theirs, timer, auth, poller, new = c.ours, c.theirs, c.timer, c.auth, c.poller, c.new
    read = ours.changes_since

    async def slow(cursor: int | None) -> tuple[int, list[str] | None]:
        found = await read(cursor)
        await theirs.revoke(new.record.id, T0)  # after the log was read
        timer.now += 1.0
        return found

    ours.changes_since = slow  # type: ignore[method-assign]
    timer.now = TTL / 2
    await poller.poll()  # started at TTL / 2, ended at TTL / 2 + 1
    timer.now = 1.5 * TTL + 0.5  # past the bound counted from its start
    assert (await auth.authenticate(new.token)).failure is AuthFailure.REVOKED


async def test_stopping_waits_for_a_poll_under_way_and_never_cancels_it(
    stores: tuple[Counting, TokenStore],
) -> None:
    """A store call cancelled midway may leave its connection taken (asyncpg's pool then
    waits for it forever at close): stop lets the poll under way finish."""
    ours, _ = stores
    _, _, poller = setup(ours)
    read = ours.changes_since
    entered, release = asyncio.Event(), asyncio.Event()
    finished: list[bool] = []

    async def held(cursor: int | None) -> tuple[int, list[str] | None]:
        entered.set()
        await release.wait()
        found = await read(cursor)
        finished.append(True)
        return found

    ours.changes_since = held  # type: ignore[method-assign]
    poller.start()
    await asyncio.wait_for(entered.wait(), timeout=5)
    stopping = asyncio.ensure_future(poller.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # waits for the poll
    release.set()
    await asyncio.wait_for(stopping, timeout=5)
    assert finished == [True]


async def test_a_record_the_log_keeps_confirming_is_read_again_after_renewals_ttls(
    stores: tuple[Counting, TokenStore],
) -> None:
    """The bound for a write the log cannot see (its triggers off): RENEWALS TTLs."""
    c = await cached(stores)  # looked up at 0, after the log's first poll
    ours, _theirs, timer, auth, poller, new = c.ours, c.theirs, c.timer, c.auth, c.poller, c.new
    while timer.now < RENEWALS * TTL - TTL / 2:
        timer.now += TTL / 2
        await poller.poll()
        assert (await auth.authenticate(new.token)).ok
    assert ours.gets == 1
    timer.now = RENEWALS * TTL + 0.01
    await poller.poll()
    assert (await auth.authenticate(new.token)).ok
    assert ours.gets == 2


async def test_a_record_is_as_old_as_its_lookups_start() -> None:
    """A lookup that read the store, then took a while to come back, caches a record as
    of when it started: its TTL runs from then."""
    store = CountingStore()
    timer = FakeClock(0.0)
    auth = TokenAuthenticator(store, clock=FakeClock(T0), cache_ttl=TTL, timer=timer)
    new = await stored(store)
    store.gate = asyncio.Event()
    lookup = asyncio.ensure_future(auth.authenticate(new.token))
    await asyncio.sleep(0)
    timer.now = TTL - 1  # the lookup is slow to come back
    store.gate.set()
    assert (await lookup).ok
    timer.now = TTL + 0.01
    store.gate = None
    assert (await auth.authenticate(new.token)).ok
    assert store.gets == 2  # its TTL ran from the lookup's start


async def test_a_truncate_of_the_postgres_tokens_table_drops_every_token(
    pg_session_url: str,
) -> None:
    store = await open_token_store(pg_session_url)
    try:
        assert isinstance(store, TokenChangeLog)
        start, _ = await store.changes_since(None)
        conn = await asyncpg.connect(pg_session_url, timeout=5)
        try:
            await conn.execute("TRUNCATE egw_tokens")
        finally:
            await conn.close()
        assert await store.changes_since(start) == (start + 1, None)
    finally:
        await store.close()
        await empty_tables(pg_session_url)


async def test_while_the_log_cannot_be_read_the_poller_waits_longer_each_time(
    stores: tuple[Counting, TokenStore],
) -> None:
    ours, _ = stores
    _, _, poller = setup(ours)
    failed = OSError("the store went away")
    pauses = []
    for _ in range(7):
        poller._health(False, failed)
        pauses.append(poller._pause)
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    poller._health(True, None)
    assert poller._pause == poller.interval == TTL / 2
