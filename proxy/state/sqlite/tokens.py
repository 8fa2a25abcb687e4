"""SQLite token store: ``proxy.auth.tokens.TokenStore`` in the state file."""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar, Unpack

from proxy.auth.audit import MAX_AUDIT_PAGE, AuditEntry
from proxy.auth.changes import changes_after
from proxy.auth.tokens import TokenChanges, TokenRecord, apply_changes
from proxy.state.sqlite.connection import Connection, transaction

__all__ = ["SqliteTokenStore"]

T = TypeVar("T")

_SELECT = (
    "SELECT id, name, secret_hash, scopes, upstream_key, hourly, per_minute, weight,"
    " created_at, expires_at, revoked_at, service_class FROM tokens"
)

_INSERT = (
    "INSERT INTO tokens (id, name, secret_hash, scopes, upstream_key, hourly, per_minute,"
    " weight, created_at, expires_at, revoked_at, service_class)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


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
        record.service_class,
    )


def _from_row(row: tuple[Any, ...]) -> TokenRecord:
    """Rebuild a record; TokenRecord's own checks reject a corrupt or tampered row."""
    (id_, name, secret_hash, scopes, upstream_key, hourly, per_minute, weight, *times) = row
    created_at, expires_at, revoked_at, service_class = times
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
        service_class=service_class,
    )


def _get(conn: sqlite3.Connection, token_id: str) -> TokenRecord | None:
    row = conn.execute(_SELECT + " WHERE id = ?", (token_id,)).fetchone()
    return None if row is None else _from_row(row)


def _changes_since(
    conn: sqlite3.Connection, cursor: int | None
) -> tuple[int, builtins.list[str] | None]:
    # The newest number first (the table's last seq, which outlives the rows the log
    # dropped), then the rows: a change committed between the two is among the rows.
    found = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'token_changes'").fetchone()
    newest = 0 if found is None else int(found[0])
    rows: builtins.list[tuple[int, str]] = []
    if cursor is not None:
        rows = conn.execute(
            "SELECT seq, token_id FROM token_changes WHERE seq > ? ORDER BY seq", (cursor,)
        ).fetchall()
    return changes_after(cursor, rows, max([newest, *(seq for seq, _ in rows[-1:])]))


def _put(conn: sqlite3.Connection, record: TokenRecord) -> None:
    try:
        conn.execute(_INSERT, _to_row(record))
    except sqlite3.IntegrityError:
        raise ValueError(f"token id {record.id!r} already exists") from None


def _put_unique_name(conn: sqlite3.Connection, record: TokenRecord, now: float) -> str | None:
    with transaction(conn):  # IMMEDIATE: the write lock before the check
        row = conn.execute(
            "SELECT id FROM tokens WHERE name = ? AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > ?) LIMIT 1",
            (record.name, now),
        ).fetchone()
        if row is not None:
            return str(row[0])
        _put(conn, record)
        return None


def _list(conn: sqlite3.Connection) -> builtins.list[TokenRecord]:
    return [_from_row(row) for row in conn.execute(_SELECT + " ORDER BY created_at, id")]


def _by_name(conn: sqlite3.Connection, name: str) -> builtins.list[TokenRecord]:
    rows = conn.execute(_SELECT + " WHERE name = ? ORDER BY created_at, id", (name,))
    return [_from_row(row) for row in rows]


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
            "UPDATE tokens SET scopes = ?, hourly = ?, per_minute = ?, weight = ?, expires_at = ?,"
            " service_class = ? WHERE id = ?",
            (
                json.dumps(list(updated.scopes)),
                updated.hourly,
                updated.per_minute,
                updated.weight,
                updated.expires_at,
                updated.service_class,
                token_id,
            ),
        )
        return updated


def _append(conn: sqlite3.Connection, entry: AuditEntry) -> None:
    conn.execute(
        "INSERT INTO token_audit (at, action, token_id, actor, address, detail)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            entry.at,
            entry.action,
            entry.token_id,
            entry.actor,
            entry.address,
            json.dumps(dict(entry.detail), sort_keys=True),
        ),
    )


def _entries(conn: sqlite3.Connection, token_id: str | None, limit: int) -> list[AuditEntry]:
    select = "SELECT seq, at, action, token_id, actor, address, detail FROM token_audit"
    limit = max(1, min(limit, MAX_AUDIT_PAGE))
    if token_id is None:
        rows = conn.execute(select + " ORDER BY seq DESC LIMIT ?", (limit,))
    else:
        rows = conn.execute(
            select + " WHERE token_id = ? ORDER BY seq DESC LIMIT ?", (token_id, limit)
        )
    return [
        AuditEntry(
            at=at,
            action=action,
            token_id=tid,
            actor=actor,
            address=address,
            detail=json.loads(detail),
            seq=seq,
        )
        for seq, at, action, tid, actor, address, detail in rows
    ]


class SqliteTokenStore(Connection):
    """``proxy.auth.tokens.TokenStore`` on one SQLite connection, which it owns and closes.

    Each call runs in a worker thread (``asyncio.to_thread``) under a ``threading.Lock``, so
    the event loop never blocks on disk and the connection sees one statement at a time.
    Writes that read first run in one IMMEDIATE transaction, so several processes sharing
    the file stay consistent. A call whose caller is cancelled still finishes in its thread.
    """

    async def put(self, record: TokenRecord) -> None:
        await self._run(lambda conn: _put(conn, record))

    async def put_unique_name(self, record: TokenRecord, now: float) -> str | None:
        """Store ``record`` unless a token active at ``now`` has its name: then that
        token's id, and nothing stored. One IMMEDIATE transaction: atomic across the
        processes sharing the file."""
        return await self._run(lambda conn: _put_unique_name(conn, record, now))

    async def get(self, token_id: str) -> TokenRecord | None:
        """A read by primary key (``_short_read``): a token's first lookup, and its next
        one when it changed (or every ``tokens.cache_ttl_seconds`` when the change log
        cannot be read)."""
        return await self._short_read(lambda conn: _get(conn, token_id))

    async def changes_since(self, cursor: int | None) -> tuple[int, builtins.list[str] | None]:
        """``proxy.auth.changes.TokenChangeLog`` (``_short_read``)."""
        return await self._short_read(lambda conn: _changes_since(conn, cursor))

    async def _short_read(self, call: Callable[[sqlite3.Connection], T]) -> T:
        """Made on the caller's thread (the event loop) when the connection is free, as
        the send log's reads are: a hop to a worker thread and back costs several times
        a read by key. When another statement holds the connection (an admin write), in
        a worker thread: the loop never waits for it."""
        if not self._lock.acquire(blocking=False):
            return await self._run(call)
        try:
            return call(self._conn)
        finally:
            self._lock.release()

    async def list(self) -> builtins.list[TokenRecord]:
        return await self._run(_list)

    async def by_name(self, name: str) -> builtins.list[TokenRecord]:
        """The tokens called ``name`` (index ``tokens_by_name``)."""
        return await self._run(lambda conn: _by_name(conn, name))

    async def revoke(self, token_id: str, now: float) -> TokenRecord | None:
        return await self._run(lambda conn: _revoke(conn, token_id, now))

    async def update(self, token_id: str, **changes: Unpack[TokenChanges]) -> TokenRecord | None:
        return await self._run(lambda conn: _update(conn, token_id, changes))

    async def append(self, entry: AuditEntry) -> None:
        """One row of the audit log (``proxy.auth.audit.AuditLog``)."""
        await self._run(lambda conn: _append(conn, entry))

    async def entries(
        self, *, token_id: str | None = None, limit: int = 100
    ) -> builtins.list[AuditEntry]:
        return await self._run(lambda conn: _entries(conn, token_id, limit))

    async def ping(self) -> None:
        """Raises ``sqlite3.Error`` if the database cannot answer, e.g. once closed."""
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())
