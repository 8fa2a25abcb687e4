"""Token changes told at once through LISTEN/NOTIFY (proxy/state/postgres/feed.py): two
stores on one private database of the real server, as two replicas hold them; a listening
connection killed by the server comes back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from proxy.state import PostgresTokenStore, open_token_store
from tests.state.pg_server import scratch_database
from tests.state.test_token_store import T0, record

WAIT = 5.0  # seconds: a notice takes a round trip; this bounds a broken one


@pytest.fixture
async def two() -> AsyncIterator[tuple[PostgresTokenStore, PostgresTokenStore, str]]:
    async with scratch_database() as url:
        a, b = await open_token_store(url), await open_token_store(url)
        assert isinstance(a, PostgresTokenStore) and isinstance(b, PostgresTokenStore)
        try:
            yield a, b, url
        finally:
            await a.close()
            await b.close()


async def follow(store: PostgresTokenStore) -> asyncio.Queue[str]:
    heard: asyncio.Queue[str] = asyncio.Queue()
    store.follow(heard.put_nowait)
    assert store._follower is not None
    await asyncio.wait_for(store._follower.listening.wait(), WAIT)
    return heard


async def test_every_write_of_another_store_is_heard(
    two: tuple[PostgresTokenStore, PostgresTokenStore, str],
) -> None:
    a, b, _ = two
    heard = await follow(a)
    await b.put(record(1))
    assert await asyncio.wait_for(heard.get(), WAIT) == record(1).id
    await b.update(record(1).id, weight=5)
    assert await asyncio.wait_for(heard.get(), WAIT) == record(1).id
    await b.revoke(record(1).id, T0)
    assert await asyncio.wait_for(heard.get(), WAIT) == record(1).id
    assert heard.empty()


async def test_a_refused_change_or_unknown_id_tells_nothing(
    two: tuple[PostgresTokenStore, PostgresTokenStore, str],
) -> None:
    a, b, _ = two
    await b.put(record(1))
    await b.put(record(2))
    heard = await follow(a)
    with pytest.raises(ValueError, match="weight"):
        await b.update(record(1).id, weight=0)
    assert await b.revoke("nosuchtoken0", T0) is None
    await b.revoke(record(2).id, T0)  # the next notice must be this one's
    assert await asyncio.wait_for(heard.get(), WAIT) == record(2).id
    assert heard.empty()


async def test_the_listener_comes_back_after_its_connection_is_killed(
    two: tuple[PostgresTokenStore, PostgresTokenStore, str],
) -> None:
    a, b, url = two
    heard = await follow(a)
    assert a._follower is not None
    admin = await asyncpg.connect(url, timeout=5)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
        assert killed == 1
    finally:
        await admin.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while a._follower.listening.is_set():  # it notices the loss ...
        assert loop.time() < deadline, "the lost connection went unnoticed"
        await asyncio.sleep(0.02)
    await asyncio.wait_for(a._follower.listening.wait(), WAIT)  # ... and listens again
    assert await b.revoke(record(0).id, T0) is None  # an unknown id: tells nothing
    await b.put(record(3))
    assert await asyncio.wait_for(heard.get(), WAIT) == record(3).id


async def test_closing_stops_following(
    two: tuple[PostgresTokenStore, PostgresTokenStore, str],
) -> None:
    a, _, url = two
    await follow(a)
    await a.close()
    admin = await asyncpg.connect(url, timeout=5)
    try:
        for _ in range(100):  # the server ends the backend just after the client leaves
            listening = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
            if listening == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        await admin.close()
    assert listening == 0


async def test_an_unexpected_error_does_not_end_the_follower(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from proxy.state.postgres.feed import ChangeFollower

    health: asyncio.Queue[bool] = asyncio.Queue()
    # An argument asyncpg does not take: a TypeError, none of the network's errors.
    follower = ChangeFollower({"no_such_argument": 1}, lambda _id: None, health.put_nowait)
    follower.start()
    try:
        assert await asyncio.wait_for(health.get(), WAIT) is False
        assert follower._task is not None and not follower._task.done()
        assert any(getattr(r, "fields", {}).get("error") == "TypeError" for r in caplog.records)
    finally:
        await follower.stop()
