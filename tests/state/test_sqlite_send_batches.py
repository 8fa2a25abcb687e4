"""The SQLite send log's writes behind the event loop: give-backs of one moment share a
commit, a log closed with give-backs waiting writes them first, a late answer's move is
one transaction. A real state file; its statements counted with SQLite's trace hook."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from proxy.state.sqlite.sends import SqliteSendLog

T0 = 1_000_000.0


def traced(log: SqliteSendLog) -> list[str]:
    statements: list[str] = []
    log._conn.set_trace_callback(statements.append)
    return statements


def rows(path: Path) -> list[tuple[str, float, int]]:
    with sqlite3.connect(path) as conn:
        return [
            (str(c), float(at), int(n))
            for c, at, n in conn.execute("SELECT credential, at, n FROM send_rows ORDER BY id")
        ]


async def test_the_give_backs_of_many_keys_at_one_moment_share_one_commit(tmp_path: Path) -> None:
    log = await SqliteSendLog.open(tmp_path / "state.db")
    other = await SqliteSendLog.open(tmp_path / "state.db")  # another worker on the file
    try:
        statements = traced(log)
        keys = [f"team-{i:03d}" for i in range(200)]
        await asyncio.gather(*(log.give_back(k, T0 + i, 3) for i, k in enumerate(keys)))
        assert statements.count("COMMIT") == 1
        assert sorted(rows(tmp_path / "state.db")) == sorted(
            (k, T0 + i, -3) for i, k in enumerate(keys)
        )
        assert other.poll(keys[7]) == [(T0 + 7, -3, "")]
        statements.clear()
        await log.give_back(keys[0], T0, 1)  # a later one: a batch of its own
        assert statements.count("COMMIT") == 1
    finally:
        await log.close()
        await other.close()


async def test_a_log_closed_with_give_backs_waiting_writes_them_first(tmp_path: Path) -> None:
    log = await SqliteSendLog.open(tmp_path / "state.db")
    waiting = [asyncio.ensure_future(log.give_back(f"k{i}", T0, 1)) for i in range(5)]
    await asyncio.sleep(0)  # each has joined the batch; none is written yet
    assert rows(tmp_path / "state.db") == []
    await log.close()
    await asyncio.gather(*waiting)
    assert sorted(rows(tmp_path / "state.db")) == [(f"k{i}", T0, -1) for i in range(5)]


async def test_a_caller_that_gives_up_leaves_the_batch_to_be_written(tmp_path: Path) -> None:
    log = await SqliteSendLog.open(tmp_path / "state.db")
    try:
        first = asyncio.ensure_future(log.give_back("a", T0, 1))
        second = asyncio.ensure_future(log.give_back("b", T0, 2))
        await asyncio.sleep(0)
        first.cancel()
        await second
        assert sorted(rows(tmp_path / "state.db")) == [("a", T0, -1), ("b", T0, -2)]
    finally:
        await log.close()


async def test_a_moved_send_is_written_in_one_transaction(tmp_path: Path) -> None:
    log = await SqliteSendLog.open(tmp_path / "state.db")
    try:
        statements = traced(log)
        await log.move("a", T0, T0 + 2)
        assert [s.split()[0] for s in statements] == ["BEGIN", "INSERT", "INSERT", "COMMIT"]
        assert rows(tmp_path / "state.db") == [("a", T0, -1), ("a", T0 + 2, 1)]
    finally:
        await log.close()


async def test_a_batch_cancelled_before_its_write_leaves_the_next_one_working(
    tmp_path: Path,
) -> None:
    """A loop stopping may cancel the batch in its wait: its rows go with the next one."""
    log = await SqliteSendLog.open(tmp_path / "state.db")
    try:
        lost = asyncio.ensure_future(log.give_back("a", T0, 1))
        await asyncio.sleep(0)
        (batch,) = log._batches
        batch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lost
        await asyncio.wait_for(log.give_back("b", T0, 2), timeout=5)
        assert rows(tmp_path / "state.db") == [("a", T0, -1), ("b", T0, -2)]
    finally:
        await log.close()


async def test_close_waits_for_a_batch_already_being_written(tmp_path: Path) -> None:
    log = await SqliteSendLog.open(tmp_path / "state.db")
    waiting = asyncio.ensure_future(log.give_back("a", T0, 1))
    await asyncio.sleep(0)
    log._lock.acquire()  # the batch's write waits for the connection, in its thread
    try:
        for _ in range(100):  # bounded: until the batch has left its wait for others
            if log._returning is None:
                break
            await asyncio.sleep(0.01)
        assert log._returning is None and log._batches  # being written
        closing = asyncio.ensure_future(log.close())
        await asyncio.sleep(0.05)
        assert not closing.done()
    finally:
        log._lock.release()
    await asyncio.wait_for(closing, timeout=5)
    await waiting
    assert rows(tmp_path / "state.db") == [("a", T0, -1)]
