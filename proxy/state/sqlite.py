"""SQLite token store (``sqlite:///path``), the default for ``serve``: stdlib ``sqlite3`` only.

The database file is meant to hold all of one gateway's durable state: tokens now, budget
reservations later. ``open_sqlite`` is the one way to open it (permissions, pragmas, schema
migrations), so a budget module opens its own connection to the same file the same way.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Self, TypeVar, Unpack

from proxy.auth.tokens import TokenChanges, TokenRecord, apply_changes
from proxy.budget.slots import Line

if TYPE_CHECKING:
    from proxy.budget.slots import Row

__all__ = [
    "SCHEMA_MIGRATIONS",
    "SCHEMA_VERSION",
    "SqliteSendLog",
    "SqliteTokenStore",
    "StateFileError",
    "open_sqlite",
    "transaction",
]

T = TypeVar("T")


class StateFileError(RuntimeError):
    """The state file cannot be used: not created, not a database, read-only, or of a newer
    schema. The message starts ``state:`` and names the file (a path holds no secret)."""


BUSY_TIMEOUT_SECONDS = 5.0
"""How long a statement waits for another process's write lock before failing."""

SCHEMA_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 0 -> 1: tokens. Scopes are a JSON array of strings; times are Unix seconds.
    (
        """CREATE TABLE tokens (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            secret_hash TEXT NOT NULL,
            scopes TEXT NOT NULL,
            upstream_key TEXT NOT NULL,
            hourly INTEGER,
            per_minute INTEGER,
            weight INTEGER NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL,
            revoked_at REAL
        )""",
        "CREATE INDEX tokens_by_created_at ON tokens (created_at, id)",
    ),
    # 1 -> 2: the budget's write-ahead send log. One row per send slot, Unix seconds.
    (
        "CREATE TABLE sends (credential TEXT NOT NULL, at REAL NOT NULL)",
        "CREATE INDEX sends_by_credential ON sends (credential, at)",
    ),
    # 2 -> 3: one row may reserve a block of ``n`` sends (``n`` < 0 gives sends back,
    # ``n`` = 0 is a freeze until ``at``);
    # ``owner`` is the writing process, ``id`` only grows, so processes sharing the file
    # read each other's new rows by id.
    (
        """CREATE TABLE send_rows (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            credential TEXT NOT NULL,
            at REAL NOT NULL,
            n INTEGER NOT NULL,
            owner TEXT NOT NULL
        )""",
        "INSERT INTO send_rows (credential, at, n, owner) SELECT credential, at, 1, ''"
        " FROM sends ORDER BY at",
        "DROP TABLE sends",
        "CREATE INDEX send_rows_by_credential ON send_rows (credential, id)",
        "CREATE INDEX send_rows_by_time ON send_rows (at)",
    ),
    # 3 -> 4: the line of processes waiting for a credential's next free slot
    # (proxy.budget.slots.Line): one place per waiting process, in line since ``since``, lapsed
    # after ``due``.
    (
        """CREATE TABLE send_line (
            credential TEXT NOT NULL,
            owner TEXT NOT NULL,
            since REAL NOT NULL,
            due REAL NOT NULL,
            PRIMARY KEY (credential, owner)
        ) WITHOUT ROWID""",
    ),
)
"""Entry ``i`` takes the schema from ``PRAGMA user_version`` ``i`` to ``i + 1``. Only append."""

SCHEMA_VERSION = len(SCHEMA_MIGRATIONS)

_SELECT = (
    "SELECT id, name, secret_hash, scopes, upstream_key, hourly, per_minute, weight,"
    " created_at, expires_at, revoked_at FROM tokens"
)


@contextmanager
def transaction(conn: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception.

    IMMEDIATE takes the write lock up front, so a read-modify-write is atomic across
    processes. Needs a connection from ``open_sqlite`` (autocommit mode).
    """
    conn.execute("BEGIN IMMEDIATE" if kind == "IMMEDIATE" else "BEGIN DEFERRED")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _create_private(path: str) -> None:
    """Create the file (and its missing directories) readable by the owner only.

    SQLite gives its -wal and -shm files the main file's mode, so they stay private too.
    An existing file keeps the mode its owner gave it, and is not opened here at all:
    closing any descriptor of a database file drops every POSIX lock this process holds on
    it, those of its open SQLite connections included (SQLite's "posix advisory locks"
    caveat). A process whose connections had silently lost their shared lock let another
    process take the file for the last user on close, checkpoint and delete the WAL, and
    every later commit of the first process went to the deleted file: gone. That is how a
    second connection in one process (token store, then send log) lost budget rows with
    ``serve --workers``.
    """
    if os.path.exists(path):
        return
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it just now
        return
    os.close(fd)


def _migrate(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StateFileError(
                f"state: database schema version {version} is newer than this gateway"
                f" understands ({SCHEMA_VERSION}); upgrade the gateway"
            )
        for statements in SCHEMA_MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        # PRAGMA takes no bound parameters; the value is our own integer.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")


def _set_wal(conn: sqlite3.Connection) -> str:
    """``PRAGMA journal_mode=WAL``, waiting out other processes that open the same new file
    at the same moment (``serve --workers N``): switching the journal mode needs the file
    to itself, and SQLite answers "database is locked" at once there instead of calling its
    busy handler."""
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    pause = 0.005
    while True:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            return str(mode)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def open_sqlite(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open the state database at ``path``, creating it (mode 0600) and migrating its schema.

    The connection is in autocommit mode (use ``transaction``), WAL journal, synchronous=NORMAL
    (durable across process crashes; a power cut may lose the last commits), and usable from
    any thread (``check_same_thread=False``): the caller serialises access with a lock.
    Blocking: call it through ``asyncio.to_thread`` from async code. StateFileError when
    the file cannot be created, opened or migrated.
    """
    path = os.fspath(path)
    try:
        _create_private(path)
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )
    except (OSError, sqlite3.Error) as exc:
        raise _unusable(path, exc) from None
    try:
        mode = _set_wal(conn)
        if mode != "wal":
            raise StateFileError(f"state: SQLite refused WAL mode for {path} (got {mode!r})")
        conn.execute("PRAGMA synchronous=NORMAL")
        _migrate(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise _unusable(path, exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _unusable(path: str, exc: OSError | sqlite3.Error) -> StateFileError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return StateFileError(f"state: cannot use the sqlite file {path}: {reason}")


def _to_row(record: TokenRecord) -> tuple[object, ...]:
    return (
        record.id,
        record.name,
        record.secret_hash,
        json.dumps(list(record.scopes)),
        record.upstream_key,
        record.hourly,
        record.per_minute,
        record.weight,
        record.created_at,
        record.expires_at,
        record.revoked_at,
    )


def _from_row(row: tuple[Any, ...]) -> TokenRecord:
    """Rebuild a record; TokenRecord's own checks reject a corrupt or tampered row."""
    (id_, name, secret_hash, scopes, upstream_key, hourly, per_minute, weight, *times) = row
    created_at, expires_at, revoked_at = times
    return TokenRecord(
        id=id_,
        name=name,
        secret_hash=secret_hash,
        scopes=tuple(json.loads(scopes)),
        upstream_key=upstream_key,
        hourly=hourly,
        per_minute=per_minute,
        weight=weight,
        created_at=created_at,
        expires_at=expires_at,
        revoked_at=revoked_at,
    )


def _get(conn: sqlite3.Connection, token_id: str) -> TokenRecord | None:
    row = conn.execute(_SELECT + " WHERE id = ?", (token_id,)).fetchone()
    return None if row is None else _from_row(row)


def _put(conn: sqlite3.Connection, record: TokenRecord) -> None:
    try:
        conn.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _to_row(record))
    except sqlite3.IntegrityError:
        raise ValueError(f"token id {record.id!r} already exists") from None


def _list(conn: sqlite3.Connection) -> builtins.list[TokenRecord]:
    return [_from_row(row) for row in conn.execute(_SELECT + " ORDER BY created_at, id")]


def _revoke(conn: sqlite3.Connection, token_id: str, now: float) -> TokenRecord | None:
    with transaction(conn):
        conn.execute(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, token_id)
        )
        return _get(conn, token_id)


def _update(conn: sqlite3.Connection, token_id: str, changes: TokenChanges) -> TokenRecord | None:
    with transaction(conn):
        record = _get(conn, token_id)
        if record is None:
            return None
        updated = apply_changes(record, changes)
        conn.execute(
            "UPDATE tokens SET scopes = ?, hourly = ?, per_minute = ?, weight = ?, expires_at = ?"
            " WHERE id = ?",
            (
                json.dumps(list(updated.scopes)),
                updated.hourly,
                updated.per_minute,
                updated.weight,
                updated.expires_at,
                token_id,
            ),
        )
        return updated


class _Connection:
    """One SQLite connection used from worker threads, one statement at a time."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Self:
        """Open (creating and migrating as needed) the database at ``path``."""
        return cls(await asyncio.to_thread(open_sqlite, path))

    async def _run(self, call: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return call(self._conn)

        return await asyncio.to_thread(locked)

    async def close(self) -> None:
        await self._run(lambda conn: conn.close())


class SqliteTokenStore(_Connection):
    """``proxy.auth.tokens.TokenStore`` on one SQLite connection, which it owns and closes.

    Each call runs in a worker thread (``asyncio.to_thread``) under a ``threading.Lock``, so
    the event loop never blocks on disk and the connection sees one statement at a time.
    Writes that read first run in one IMMEDIATE transaction, so several processes sharing
    the file stay consistent. A call whose caller is cancelled still finishes in its thread.
    """

    async def put(self, record: TokenRecord) -> None:
        await self._run(lambda conn: _put(conn, record))

    async def get(self, token_id: str) -> TokenRecord | None:
        return await self._run(lambda conn: _get(conn, token_id))

    async def list(self) -> builtins.list[TokenRecord]:
        return await self._run(_list)

    async def revoke(self, token_id: str, now: float) -> TokenRecord | None:
        return await self._run(lambda conn: _revoke(conn, token_id, now))

    async def update(self, token_id: str, **changes: Unpack[TokenChanges]) -> TokenRecord | None:
        return await self._run(lambda conn: _update(conn, token_id, changes))

    async def ping(self) -> None:
        """Raises ``sqlite3.Error`` if the database cannot answer, e.g. once closed."""
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())


class SqliteSendLog(_Connection):
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

    def _new_rows(self, conn: sqlite3.Connection, credential: str) -> builtins.list[Row]:
        rows = conn.execute(
            "SELECT id, at, n, owner FROM send_rows WHERE credential = ? AND id > ? ORDER BY id",
            (credential, self._cursor.get(credential, self._start)),
        ).fetchall()
        if rows:
            self._cursor[credential] = int(rows[-1][0])
        return [(float(at), int(n)) for _, at, n, owner in rows if owner != self.owner]

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
                    "INSERT INTO send_rows (credential, at, n, owner) VALUES (?, ?, ?, ?)",
                    [(credential, at, n, self.owner) for at, n in writes],
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

    async def give_back(self, credential: str, at: float, n: int) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO send_rows (credential, at, n, owner) VALUES (?, ?, ?, ?)",
                (credential, at, -n, self.owner),
            )
        )

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

    async def prune(self, before: float) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM send_rows WHERE at < ?", (before,))
            conn.execute("DELETE FROM send_line WHERE due < ?", (before,))

        await self._run(delete)

    async def close(self) -> None:
        """Leave every line this process is in, then close."""

        def leave(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM send_line WHERE owner = ?", (self.owner,))

        try:
            await self._run(leave)
        finally:
            await super().close()
