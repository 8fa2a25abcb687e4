"""PostgreSQL token store: ``proxy.auth.tokens.TokenStore`` and ``proxy.auth.audit.AuditLog``
in the database ``token_store`` names (tables in ``connection.py``'s migrations)."""

from __future__ import annotations

import asyncio
import builtins
import json
from collections.abc import Callable
from typing import Any, Unpack

import asyncpg

from proxy.auth.audit import MAX_AUDIT_PAGE, AuditEntry
from proxy.auth.changes import changes_after
from proxy.auth.tokens import TokenChanges, TokenRecord, apply_changes
from proxy.config.postgres_url import parse_postgres_url
from proxy.state.postgres.connection import PostgresOptions, as_json, connect_args, open_pool
from proxy.state.postgres.feed import CHANNEL, ChangeFollower

__all__ = ["PostgresTokenStore"]

_COLUMNS = (
    "id, name, secret_hash, scopes, upstream_key, hourly, per_minute, weight,"
    " created_at, expires_at, revoked_at, service_class"
)
_FIELDS = _COLUMNS.count(",") + 1
_SELECT = f"SELECT {_COLUMNS} FROM egw_tokens"  # noqa: S608 - fixed column names only
_AUDIT_COLUMNS = "seq, at, action, token_id, actor, address, detail"
_REVOKE_SET = "SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1"
# The change and its notice in one statement: the notice leaves when it is committed.
_CHANGED = f"UPDATE egw_tokens {_REVOKE_SET} RETURNING {_COLUMNS}"
_TOLD = f"pg_notify('{CHANNEL}', changed.id)"
_REVOKE = f"WITH changed AS ({_CHANGED}) SELECT changed.*, {_TOLD} FROM changed"  # noqa: S608
# Two creations of one name wait for each other (the lock ends with the transaction).
_NAME_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('egw_tokens.name:' || $1, 0))"
_ACTIVE_NAMED = (
    "SELECT id FROM egw_tokens WHERE name = $1 AND revoked_at IS NULL"
    " AND (expires_at IS NULL OR expires_at > $2) LIMIT 1"
)
CLOSE_SECONDS = 5.0

_NOTIFY = f"SELECT pg_notify('{CHANNEL}', $1)"


def _from_row(row: asyncpg.Record) -> TokenRecord:
    """Rebuild a record; TokenRecord's own checks reject a corrupt or tampered row."""
    return TokenRecord(
        id=row["id"],
        name=row["name"],
        secret_hash=row["secret_hash"],
        scopes=tuple(row["scopes"]),
        upstream_key=row["upstream_key"],
        hourly=row["hourly"],
        per_minute=row["per_minute"],
        weight=row["weight"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        service_class=row["service_class"],
    )


def _to_args(record: TokenRecord) -> tuple[object, ...]:
    return (
        record.id,
        record.name,
        record.secret_hash,
        list(record.scopes),
        record.upstream_key,
        record.hourly,
        record.per_minute,
        record.weight,
        record.created_at,
        record.expires_at,
        record.revoked_at,
        record.service_class,
    )


def _entry(row: asyncpg.Record) -> AuditEntry:
    return AuditEntry(
        at=row["at"],
        action=row["action"],
        token_id=row["token_id"],
        actor=row["actor"],
        address=row["address"],
        detail=json.loads(row["detail"]),
        seq=row["seq"],
    )


class PostgresTokenStore:
    """Tokens in PostgreSQL, shared by every replica and surviving any Redis.

    Each method is one statement or one transaction (``update`` holds the row's lock from
    the read to the write), so it is atomic across replicas; each write also notifies
    ``feed.CHANNEL`` with the token's id (``follow``). Errors propagate (asyncpg's, OSError,
    TimeoutError); the caller treats any as "store unavailable". After ``close`` every
    method raises RuntimeError.
    """

    def __init__(
        self, pool: asyncpg.Pool[asyncpg.Record], connect: dict[str, Any] | None = None
    ) -> None:
        """``connect``: asyncpg's keywords for ``follow``'s own connection."""
        self._pool = pool
        self._connect = connect
        self._follower: ChangeFollower | None = None
        self._closed = False

    @classmethod
    async def open(cls, url: str, options: PostgresOptions) -> PostgresTokenStore:
        """Connect and migrate (``connection.open_pool``: its errors)."""
        pool = await open_pool(url, options)
        return cls(pool, connect_args(parse_postgres_url(url), options))

    def follow(
        self, on_change: Callable[[str], None], on_health: Callable[[bool], None] | None = None
    ) -> None:
        """Call ``on_change(token_id)`` whenever any process creates, changes or revokes a
        token (LISTEN/NOTIFY, ``feed.py``), until ``close``; ``on_health(up)`` as the
        listening connection comes and goes. Once per store."""
        if self._connect is None or self._follower is not None:
            return
        self._follower = ChangeFollower(self._connect, on_change, on_health)
        self._follower.start()

    def _open_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._closed:
            raise RuntimeError("postgresql token store is closed")
        return self._pool

    async def put(self, record: TokenRecord) -> None:
        values = ", ".join(f"${n}" for n in range(1, _FIELDS + 1))
        statement = f"INSERT INTO egw_tokens ({_COLUMNS}) VALUES ({values})"  # noqa: S608
        try:
            async with self._open_pool().acquire() as conn, conn.transaction():
                await conn.execute(statement, *_to_args(record))
                await conn.execute(_NOTIFY, record.id)  # a replica may know it as unknown
        except asyncpg.UniqueViolationError:
            raise ValueError(f"token id {record.id!r} already exists") from None

    async def put_unique_name(self, record: TokenRecord, now: float) -> str | None:
        """Store ``record`` unless a token active at ``now`` (neither revoked nor expired)
        has its name: then the id of that token, and nothing stored. Atomic across
        replicas and the CLI: one transaction holding an advisory lock on the name (a
        unique index cannot say "not expired": ``now`` is not in a row)."""
        values = ", ".join(f"${n}" for n in range(1, _FIELDS + 1))
        statement = f"INSERT INTO egw_tokens ({_COLUMNS}) VALUES ({values})"  # noqa: S608
        try:
            async with self._open_pool().acquire() as conn, conn.transaction():
                await conn.execute(_NAME_LOCK, record.name)
                holder: str | None = await conn.fetchval(_ACTIVE_NAMED, record.name, now)
                if holder is not None:
                    return holder
                await conn.execute(statement, *_to_args(record))
                await conn.execute(_NOTIFY, record.id)
        except asyncpg.UniqueViolationError:
            raise ValueError(f"token id {record.id!r} already exists") from None
        return None

    async def get(self, token_id: str) -> TokenRecord | None:
        row = await self._open_pool().fetchrow(_SELECT + " WHERE id = $1", token_id)
        return None if row is None else _from_row(row)

    async def changes_since(self, cursor: int | None) -> tuple[int, builtins.list[str] | None]:
        """``proxy.auth.changes.TokenChangeLog``: the newest number first, then the rows (a
        change committed between the two reads is among the rows)."""
        pool = self._open_pool()
        newest = int(await pool.fetchval("SELECT COALESCE(MAX(seq), 0) FROM egw_token_changes"))
        rows: builtins.list[tuple[int, str]] = []
        if cursor is not None:
            found = await pool.fetch(
                "SELECT seq, token_id FROM egw_token_changes WHERE seq > $1 ORDER BY seq", cursor
            )
            rows = [(int(r["seq"]), str(r["token_id"])) for r in found]
        return changes_after(cursor, rows, max([newest, *(seq for seq, _ in rows[-1:])]))

    async def list(self) -> builtins.list[TokenRecord]:
        rows = await self._open_pool().fetch(_SELECT + ' ORDER BY created_at, id COLLATE "C"')
        return [_from_row(row) for row in rows]

    async def by_name(self, name: str) -> builtins.list[TokenRecord]:
        """The tokens called ``name`` (index ``egw_tokens_by_name``)."""
        rows = await self._open_pool().fetch(
            _SELECT + ' WHERE name = $1 ORDER BY created_at, id COLLATE "C"', name
        )
        return [_from_row(row) for row in rows]

    async def revoke(self, token_id: str, now: float) -> TokenRecord | None:
        """One statement: the first revocation time is kept."""
        row = await self._open_pool().fetchrow(_REVOKE, token_id, now)
        return None if row is None else _from_row(row)

    async def update(self, token_id: str, **changes: Unpack[TokenChanges]) -> TokenRecord | None:
        """Read (row locked), ``apply_changes`` (validated in Python), write; one transaction,
        so a concurrent revoke or update waits and is not lost. ValueError writes nothing."""
        async with self._open_pool().acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_SELECT + " WHERE id = $1 FOR UPDATE", token_id)
            if row is None:
                return None
            updated = apply_changes(_from_row(row), changes)
            await conn.execute(
                "UPDATE egw_tokens SET scopes = $2, hourly = $3, per_minute = $4, weight = $5,"
                " expires_at = $6, service_class = $7 WHERE id = $1",
                token_id,
                list(updated.scopes),
                updated.hourly,
                updated.per_minute,
                updated.weight,
                updated.expires_at,
                updated.service_class,
            )
            await conn.execute(_NOTIFY, token_id)
            return updated

    async def append(self, entry: AuditEntry) -> None:
        await self._open_pool().execute(
            "INSERT INTO egw_token_audit (at, action, token_id, actor, address, detail)"
            " VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
            entry.at,
            entry.action,
            entry.token_id,
            entry.actor,
            entry.address,
            as_json(entry.detail),
        )

    async def entries(
        self, *, token_id: str | None = None, limit: int = 100
    ) -> builtins.list[AuditEntry]:
        limit = max(1, min(limit, MAX_AUDIT_PAGE))
        select = f"SELECT {_AUDIT_COLUMNS} FROM egw_token_audit"  # noqa: S608 - fixed names
        pool = self._open_pool()
        if token_id is None:
            rows = await pool.fetch(select + " ORDER BY seq DESC LIMIT $1", limit)
        else:
            rows = await pool.fetch(
                select + " WHERE token_id = $1 ORDER BY seq DESC LIMIT $2", token_id, limit
            )
        return [_entry(row) for row in rows]

    async def ping(self) -> None:
        """``SELECT 1``; raises if PostgreSQL does not answer in time, RuntimeError if closed."""
        await self._open_pool().fetchval("SELECT 1")

    async def close(self) -> None:
        """Stop following; close the pool: connections in use are waited for, up to
        ``CLOSE_SECONDS``, then every connection is ended (asyncpg's advice: a connection
        whose call was cut off mid-connect can stay taken, and ``close`` would wait for it
        forever). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._follower is not None:
            await self._follower.stop()
        try:
            await asyncio.wait_for(self._pool.close(), CLOSE_SECONDS)
        except TimeoutError:
            self._pool.terminate()
