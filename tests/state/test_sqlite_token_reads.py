"""SQLite token reads: a lookup by id is made on the event loop's thread when the
connection is free, and in a worker thread when another statement holds it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from proxy.state import SqliteTokenStore
from tests.state.test_token_store import record


async def test_a_lookup_by_id_does_not_leave_the_loop_when_the_connection_is_free(
    tmp_path: Path,
) -> None:
    store = await SqliteTokenStore.open(tmp_path / "state.db")
    try:
        rec = record(1)
        await store.put(rec)
        lookup = store.get(rec.id)
        with pytest.raises(StopIteration) as done:  # else it waited for a worker thread
            lookup.send(None)  # one step: finished without awaiting a thread
        assert done.value.value == rec
        assert await store.get("missing-id") is None
    finally:
        await store.close()


async def test_a_lookup_while_the_connection_is_busy_waits_in_a_thread(tmp_path: Path) -> None:
    store = await SqliteTokenStore.open(tmp_path / "state.db")
    try:
        rec = record(2)
        await store.put(rec)
        store._lock.acquire()  # another statement (an admin write) holds the connection
        lookup = asyncio.ensure_future(store.get(rec.id))
        for _ in range(20):  # the loop goes on: the lookup waits for the lock in a thread
            await asyncio.sleep(0)
        assert not lookup.done()
        threading.Timer(0.05, store._lock.release).start()
        assert await asyncio.wait_for(lookup, timeout=10) == rec
    finally:
        await store.close()
