"""The budget's write-ahead send log (``proxy.budget.slots.SendLog``) in the SQLite state file."""

from __future__ import annotations

import asyncio
import builtins
import secrets
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.budget.slots import Line
from proxy.state.sqlite.connection import Connection, transaction

if TYPE_CHECKING:
    from proxy.budget.slots import Row

__all__ = ["RETURN_BATCH_SECONDS", "SqliteSendLog"]

RETURN_BATCH_SECONDS = 0.1
"""How long a give-back waits for others to share its commit: when a burst ends, every
key's lease ends idle, one after the other, and hundreds of keys would each write a
transaction. A slot returned later is the safe side (it stays counted a moment longer);
this process's own view has it back at once."""

_INSERT = "INSERT INTO send_rows (credential, at, n, owner, cls) VALUES (?, ?, ?, ?, ?)"


class SqliteSendLog(Connection):
    """The budget's write-ahead send log (``proxy.budget.slots.SendLog``) in the state file.

    A row is committed in WAL mode with synchronous=NORMAL, which survives a crash of the
    process (SIGKILL included); only a power cut may lose the last commits. Its own
    connection, so token lookups never wait behind budget writes. Several processes may
    share the file (``serve --workers N``): ``reserve`` reads the rows the others wrote
    since its last read and writes its own in one IMMEDIATE transaction, so two processes
    never both spend the last slot. ``reserve`` and ``poll`` run on the caller's thread
    (the event loop): they are short, and a lease makes them rare far from every limit.
    """

    durable = True
    block_max = 256

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__(conn)
        self.owner = secrets.token_hex(8)
        (start,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM send_rows").fetchone()
        self._start = int(start)
        self._cursor: dict[str, int] = {}  # per credential: the last row id read
        self._returns: builtins.list[tuple[str, float, int, str, str]] = []
        self._returning: asyncio.Task[None] | None = None  # the batch they go out in
        self._batches: set[asyncio.Task[None]] = set()  # every batch not yet written

    def _new_rows(self, conn: sqlite3.Connection, credential: str) -> builtins.list[Row]:
        rows = conn.execute(
            "SELECT id, at, n, owner, cls FROM send_rows WHERE credential = ? AND id > ?"
            " ORDER BY id",
            (credential, self._cursor.get(credential, self._start)),
        ).fetchall()
        if rows:
            self._cursor[credential] = int(rows[-1][0])
        return [
            (float(at), int(n), str(cls)) for _, at, n, owner, cls in rows if owner != self.owner
        ]

    def reserve(
        self,
        credential: str,
        plan: Callable[[builtins.list[Row], Line], Row | None],
        returned: Row | None,
    ) -> Row | None:
        with self._lock, transaction(self._conn) as conn:
            line = Line([])
            for owner, since, due in conn.execute(
                "SELECT owner, since, due FROM send_line WHERE credential = ?", (credential,)
            ):
                if owner == self.owner:
                    line.mine = (float(since), float(due))
                else:
                    line.others.append((float(since), float(due)))
            mine = line.mine
            row = plan(self._new_rows(conn, credential), line)
            writes = [r for r in (returned, row) if r is not None]
            if writes:
                conn.executemany(
                    _INSERT,
                    [(credential, at, n, self.owner, cls) for at, n, cls in writes],
                )
            if line.mine is None and mine is not None:
                conn.execute(
                    "DELETE FROM send_line WHERE credential = ? AND owner = ?",
                    (credential, self.owner),
                )
            elif line.mine is not None and line.mine != mine:
                conn.execute(
                    "INSERT OR REPLACE INTO send_line (credential, owner, since, due)"
                    " VALUES (?, ?, ?, ?)",
                    (credential, self.owner, *line.mine),
                )
            return row

    def poll(self, credential: str) -> builtins.list[Row]:
        with self._lock:
            return self._new_rows(self._conn, credential)

    async def give_back(self, credential: str, at: float, n: int, cls: str = "") -> None:
        """Written with the others of the next ``RETURN_BATCH_SECONDS``, in one commit;
        returns once it is written."""
        self._returns.append((credential, at, -n, self.owner, cls))
        batch = self._returning
        if batch is None or batch.done():  # done: cancelled in its wait (a loop stopping)
            batch = self._returning = asyncio.get_running_loop().create_task(self._return())
            self._batches.add(batch)
            batch.add_done_callback(self._batches.discard)
        await asyncio.shield(batch)  # a caller that gives up leaves the others' rows alone

    async def _return(self) -> None:
        """Write the batch. Cancelled in its wait (a loop stopping), its rows wait for the
        next batch, or for ``close``."""
        await asyncio.sleep(RETURN_BATCH_SECONDS)
        rows, self._returns, self._returning = self._returns, [], None
        await self._run(lambda c: _insert(c, rows))

    async def move(self, credential: str, at: float, to: float, cls: str = "") -> None:
        rows = [(credential, at, -1, self.owner, cls), (credential, to, 1, self.owner, cls)]
        await self._run(lambda c: _insert(c, rows))  # both or neither

    async def freeze(self, credential: str, until: float) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO send_rows (credential, at, n, owner) VALUES (?, ?, 0, ?)",
                (credential, until, self.owner),
            )
        )

    async def frozen(self, credential: str) -> float | None:
        (until,) = await self._run(
            lambda c: c.execute(
                "SELECT MAX(at) FROM send_rows WHERE credential = ? AND n = 0", (credential,)
            ).fetchone()
        )
        return None if until is None else float(until)

    async def recent(self, credential: str, since: float) -> builtins.list[float]:
        def read(conn: sqlite3.Connection) -> tuple[builtins.list[tuple[float, int]], int]:
            with transaction(conn, "DEFERRED"):
                net = conn.execute(
                    "SELECT at, SUM(n) FROM send_rows WHERE credential = ? AND at > ?"
                    " GROUP BY at ORDER BY at",
                    (credential, since),
                ).fetchall()
                (last,) = conn.execute(
                    "SELECT COALESCE(MAX(id), 0) FROM send_rows WHERE credential = ?",
                    (credential,),
                ).fetchone()
            return [(float(at), int(n)) for at, n in net], int(last)

        net, last = await self._run(read)
        self._cursor[credential] = max(last, self._cursor.get(credential, self._start))
        return [at for at, n in net for _ in range(max(n, 0))]

    async def recent_classes(
        self, credential: str, since: float
    ) -> builtins.list[tuple[float, str]]:
        net = await self._run(
            lambda c: c.execute(
                "SELECT at, cls, SUM(n) FROM send_rows WHERE credential = ? AND at > ?"
                " AND cls != '' GROUP BY at, cls ORDER BY at",
                (credential, since),
            ).fetchall()
        )
        return [(float(at), str(cls)) for at, cls, n in net for _ in range(max(int(n), 0))]

    async def prune(self, before: float) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM send_rows WHERE at < ?", (before,))
            conn.execute("DELETE FROM send_line WHERE due < ?", (before,))

        await self._run(delete)

    async def close(self) -> None:
        """Write the give-backs waiting for their batch, leave every line this process is
        in, then close."""
        if self._batches:  # waiting, or being written
            await asyncio.shield(asyncio.gather(*self._batches, return_exceptions=True))
        if self._returns:  # left by a batch cancelled in its wait
            rows, self._returns = self._returns, []
            await self._run(lambda c: _insert(c, rows))

        def leave(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM send_line WHERE owner = ?", (self.owner,))

        try:
            await self._run(leave)
        finally:
            await super().close()


def _insert(
    conn: sqlite3.Connection, rows: builtins.list[tuple[str, float, int, str, str]]
) -> None:
    with transaction(conn):  # one commit (autocommit would make one per row)
        conn.executemany(_INSERT, rows)
