"""The tokens' change log: a cached token is read again when it changed, not every
``cache_ttl``; a change made by another process shows at the next poll; when the log
cannot be read, records age out at ``cache_ttl`` as they do without it.

Real SQLite state files: a second store on the same file is another process (a worker,
the ``token`` commands) writing. Time is a fake clock, moved by hand.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.auth.authenticator import AuthFailure, TokenAuthenticator
from proxy.auth.changes import ChangePoller, TokenChangeLog
from proxy.auth.tokens import TokenRecord
from proxy.state import SqliteTokenStore
from tests.auth.conftest import T0, FakeClock, mint

TTL = 5.0


class CountingSqliteStore(SqliteTokenStore):
    """The real store, counting its reads by id; its change log fails while ``broken``."""

    gets = 0
    broken = False

    async def get(self, token_id: str) -> TokenRecord | None:
        self.gets += 1
        return await super().get(token_id)

    async def changes_since(self, cursor: int | None) -> tuple[int, list[str] | None]:
        if self.broken:
            raise sqlite3.OperationalError("disk I/O error")
        return await super().changes_since(cursor)


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[CountingSqliteStore, SqliteTokenStore]]:
    """This process's store, and another process's on the same file."""
    ours = await CountingSqliteStore.open(tmp_path / "state.db")
    theirs = await SqliteTokenStore.open(tmp_path / "state.db")
    try:
        yield ours, theirs
    finally:
        await ours.close()
        await theirs.close()


def setup(store: CountingSqliteStore) -> tuple[FakeClock, TokenAuthenticator, ChangePoller]:
    timer = FakeClock(0.0)
    auth = TokenAuthenticator(store, clock=FakeClock(T0), cache_ttl=TTL, timer=timer)
    return timer, auth, ChangePoller(store, auth, TTL / 2, timer=timer)


async def test_the_sqlite_store_keeps_a_change_log(
    stores: tuple[CountingSqliteStore, SqliteTokenStore],
) -> None:
    ours, theirs = stores
    assert isinstance(ours, TokenChangeLog)
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
    stores: tuple[CountingSqliteStore, SqliteTokenStore],
) -> None:
    ours, theirs = stores
    timer, auth, poller = setup(ours)
    new = mint()
    await theirs.put(new.record)
    await poller.poll()  # where the log stands
    assert (await auth.authenticate(new.token)).ok
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
    stores: tuple[CountingSqliteStore, SqliteTokenStore],
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


async def test_the_first_poll_confirms_nothing(
    stores: tuple[CountingSqliteStore, SqliteTokenStore],
) -> None:
    """A record cached before the first poll may predate a change the log cannot name
    without a cursor: it ages out at its TTL."""
    ours, theirs = stores
    timer, auth, poller = setup(ours)
    new = mint()
    await theirs.put(new.record)
    assert (await auth.authenticate(new.token)).ok
    await theirs.revoke(new.record.id, T0)
    timer.now += 1.0
    await poller.poll()
    assert (await auth.authenticate(new.token)).ok  # cached, unconfirmed
    timer.now += TTL
    assert (await auth.authenticate(new.token)).failure is AuthFailure.REVOKED


async def test_when_the_log_cannot_be_read_records_age_out_at_their_ttl(
    stores: tuple[CountingSqliteStore, SqliteTokenStore],
) -> None:
    ours, theirs = stores
    timer, auth, poller = setup(ours)
    new = mint()
    await theirs.put(new.record)
    await poller.poll()
    assert (await auth.authenticate(new.token)).ok
    timer.now += TTL / 2
    await poller.poll()  # confirmed at TTL / 2: fresh until 1.5 TTL
    ours.broken = True
    await theirs.revoke(new.record.id, T0)
    timer.now += TTL / 2
    with pytest.raises(sqlite3.OperationalError):
        await poller.poll()
    assert (await auth.authenticate(new.token)).ok  # within the bound: cached
    timer.now = 1.5 * TTL
    assert (await auth.authenticate(new.token)).failure is AuthFailure.REVOKED


async def test_a_log_that_lost_track_drops_every_cached_token(
    stores: tuple[CountingSqliteStore, SqliteTokenStore], tmp_path: Path
) -> None:
    ours, theirs = stores
    _, auth, poller = setup(ours)
    new = mint()
    await theirs.put(new.record)
    await poller.poll()
    assert (await auth.authenticate(new.token)).ok
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.executemany("INSERT INTO token_changes (token_id) VALUES (?)", [("x",)] * 10_001)
    conn.execute("DELETE FROM token_changes WHERE seq <= (SELECT MAX(seq) FROM token_changes) - 10")
    conn.commit()
    conn.close()
    await poller.poll()
    assert (await auth.authenticate(new.token)).ok
    assert ours.gets == 2  # read again, though its id was not in the rows kept


async def test_a_poll_confirms_as_of_when_it_started(
    stores: tuple[CountingSqliteStore, SqliteTokenStore],
) -> None:
    """A change committed while a poll is under way (after the log was read) is not
    confirmed away: the records are current as of the poll's start, not its end."""
    ours, theirs = stores
    timer, auth, poller = setup(ours)
    new = mint()
    await theirs.put(new.record)
    await poller.poll()
    assert (await auth.authenticate(new.token)).ok  # loaded at 0
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
