"""The SQLite state file (``sqlite:///path``), the default for ``serve``: stdlib ``sqlite3``
only. It holds all of one gateway's durable state: tokens (``tokens.py``) and the budget's
send log (``sends.py``). ``open_sqlite`` is the one way to open it (permissions, pragmas,
schema migrations), so each of them opens its own connection to the same file the same way.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Self, TypeVar

__all__ = [
    "SCHEMA_MIGRATIONS",
    "SCHEMA_VERSION",
    "Connection",
    "StateFileError",
    "open_sqlite",
    "transaction",
]

T = TypeVar("T")


class StateFileError(RuntimeError):
    """The state file cannot be used: not created, not a database, read-only, or of a newer
    schema. The message starts ``state:`` and names the file (a path holds no secret).
    ``serve`` and the ``token`` commands answer it with that one line, exit status 1; the
    PostgreSQL token store's ``PostgresStoreError`` is one too (``token_store:``)."""


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
    # 4 -> 5: the audit log of token operations (proxy.auth.audit.AuditEntry), append-only;
    # ``detail`` is a JSON object.
    (
        """CREATE TABLE token_audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            action TEXT NOT NULL,
            token_id TEXT NOT NULL,
            actor TEXT,
            address TEXT,
            detail TEXT NOT NULL
        )""",
        "CREATE INDEX token_audit_by_token ON token_audit (token_id, seq)",
    ),
    # 5 -> 6: classes of service (SPEC §5): a token's class (NULL: the default class) and
    # the class of each send row ('' before classes; a give-back or freeze row: its own).
    (
        "ALTER TABLE tokens ADD COLUMN service_class TEXT",
        "ALTER TABLE send_rows ADD COLUMN cls TEXT NOT NULL DEFAULT ''",
    ),
    # 6 -> 7: the tokens of one name (the check that no two active tokens share a name).
    ("CREATE INDEX tokens_by_name ON tokens (name, created_at, id)",),
    # 7 -> 8: the tokens' change log (proxy.auth.changes): a row per token created, changed
    # or deleted, by any writer (manual SQL included), the newest 10,000 rows kept.
    (
        "CREATE TABLE token_changes ("
        " seq INTEGER PRIMARY KEY AUTOINCREMENT, token_id TEXT NOT NULL)",
        "CREATE TRIGGER token_changes_on_insert AFTER INSERT ON tokens BEGIN"
        " INSERT INTO token_changes (token_id) VALUES (NEW.id);"
        " DELETE FROM token_changes WHERE seq <= last_insert_rowid() - 10000; END",
        "CREATE TRIGGER token_changes_on_update AFTER UPDATE ON tokens BEGIN"
        " INSERT INTO token_changes (token_id) VALUES (OLD.id);"
        " INSERT INTO token_changes (token_id) SELECT NEW.id WHERE NEW.id <> OLD.id;"
        " DELETE FROM token_changes WHERE seq <= last_insert_rowid() - 10000; END",
        "CREATE TRIGGER token_changes_on_delete AFTER DELETE ON tokens BEGIN"
        " INSERT INTO token_changes (token_id) VALUES (OLD.id);"
        " DELETE FROM token_changes WHERE seq <= last_insert_rowid() - 10000; END",
    ),
)
"""Entry ``i`` takes the schema from ``PRAGMA user_version`` ``i`` to ``i + 1``. Only append."""

SCHEMA_VERSION = len(SCHEMA_MIGRATIONS)


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


class Connection:
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
