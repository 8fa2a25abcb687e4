"""The PostgreSQL connection pool for ``token_store: postgresql://...``, and the schema
migrations the gateway applies itself when it opens the pool.

Migrations are numbered; ``egw_schema_version`` holds one row per version applied. They
run in one transaction under a transaction-scoped advisory lock, so replicas starting at
once apply each exactly once (the others wait for the lock, then find nothing to do), and
a migration that fails leaves the schema as it was. A database of a newer schema than this
gateway knows is refused at start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from proxy.config.postgres_url import PostgresAddress, parse_postgres_url
from proxy.state.sqlite.connection import StateFileError

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PostgresOptions",
    "PostgresStoreError",
    "as_json",
    "connect_args",
    "migrate",
    "open_pool",
]

# "egw_migr" as a big-endian integer: the advisory lock every replica's migration takes.
MIGRATION_LOCK = 0x6567775F6D696772

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: tokens, as proxy.auth.tokens.TokenRecord holds them; times are Unix seconds.
    (
        """CREATE TABLE egw_tokens (
            id text PRIMARY KEY,
            name text NOT NULL,
            secret_hash text NOT NULL,
            scopes text[] NOT NULL,
            upstream_key text NOT NULL,
            hourly bigint,
            per_minute bigint,
            weight integer NOT NULL,
            created_at double precision NOT NULL,
            expires_at double precision,
            revoked_at double precision
        )""",
        'CREATE INDEX egw_tokens_by_created_at ON egw_tokens (created_at, id COLLATE "C")',
    ),
    # 2: the audit log of token operations (proxy.auth.audit.AuditEntry), append-only.
    (
        """CREATE TABLE egw_token_audit (
            seq bigserial PRIMARY KEY,
            at double precision NOT NULL,
            action text NOT NULL,
            token_id text NOT NULL,
            actor text,
            address text,
            detail jsonb NOT NULL DEFAULT '{}'::jsonb
        )""",
        "CREATE INDEX egw_token_audit_by_token ON egw_token_audit (token_id, seq)",
    ),
    # 3: a token's class of service (SPEC §5); NULL: the default class.
    ("ALTER TABLE egw_tokens ADD COLUMN service_class text",),
    # 4: the tokens of one name (the check that no two active tokens share a name).
    ('CREATE INDEX egw_tokens_by_name ON egw_tokens (name, created_at, id COLLATE "C")',),
    # 5: the tokens' change log (proxy.auth.changes), written by a trigger, so every writer
    # is in it: numbered 1, 2, 3... under a lock held to the commit, so the numbers commit
    # in order and none is skipped (a reader that saw n + 1 has seen n); the newest 10,000.
    (
        "CREATE TABLE egw_token_changes (seq bigint PRIMARY KEY, token_id text NOT NULL)",
        """CREATE FUNCTION egw_token_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            n bigint;
        BEGIN
            LOCK TABLE egw_token_changes IN EXCLUSIVE MODE;
            SELECT COALESCE(MAX(seq), 0) + 1 INTO n FROM egw_token_changes;
            IF TG_OP = 'TRUNCATE' THEN
                INSERT INTO egw_token_changes VALUES (n, '*');  -- every token
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO egw_token_changes VALUES (n, OLD.id);
            ELSE
                INSERT INTO egw_token_changes VALUES (n, NEW.id);
                IF TG_OP = 'UPDATE' AND NEW.id <> OLD.id THEN
                    n := n + 1;
                    INSERT INTO egw_token_changes VALUES (n, OLD.id);
                END IF;
            END IF;
            DELETE FROM egw_token_changes WHERE seq <= n - 10000;
            RETURN NULL;
        END $$""",
        "CREATE TRIGGER egw_token_changes AFTER INSERT OR DELETE ON egw_tokens"
        " FOR EACH ROW EXECUTE FUNCTION egw_token_changed()",
        # An update that leaves the row as it was (a second revocation) changes nothing.
        "CREATE TRIGGER egw_token_changes_on_update AFTER UPDATE ON egw_tokens"
        " FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*)"
        " EXECUTE FUNCTION egw_token_changed()",
        # A TRUNCATE fires no row trigger: its row names every token ('*').
        "CREATE TRIGGER egw_token_changes_on_truncate AFTER TRUNCATE ON egw_tokens"
        " FOR EACH STATEMENT EXECUTE FUNCTION egw_token_changed()",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class PostgresStoreError(StateFileError):
    """The token store in PostgreSQL cannot be used: it does not answer, refuses the login,
    or holds a newer schema. The message starts ``token_store:`` and names the database
    (``postgresql://user@host:port/db``, never a password)."""


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """``postgres:`` of the config: the password (resolved), the timeout of one connect or
    statement (seconds) and the pool's bound (connections per process)."""

    password: str | None = field(default=None, repr=False)
    timeout_seconds: float = 5.0
    pool_size: int = 4


def connect_args(address: PostgresAddress, options: PostgresOptions) -> dict[str, Any]:
    """asyncpg's keywords for one connection to ``address`` (no DSN: a password never
    travels in a string that could be logged)."""
    return {
        "host": address.host,
        "port": address.port,
        "user": address.user,
        "database": address.database,
        "password": options.password,
        "ssl": address.sslmode,
        "timeout": options.timeout_seconds,
        "command_timeout": options.timeout_seconds,
    }


async def open_pool(url: str, options: PostgresOptions) -> asyncpg.Pool[asyncpg.Record]:
    """A pool on ``url``, its schema migrated to ``SCHEMA_VERSION``.

    ValueError (``token_store:``) for a bad URL; PostgresStoreError when the database does not
    answer, refuses us, or is newer than this gateway.
    """
    address = parse_postgres_url(url)
    try:
        pool = await asyncpg.create_pool(
            min_size=1, max_size=options.pool_size, **connect_args(address, options)
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _unusable(address, exc) from None
    try:
        async with pool.acquire() as conn:
            await migrate(conn, address)
    except BaseException as exc:
        await pool.close()
        if isinstance(exc, OSError | TimeoutError | asyncpg.PostgresError):
            raise _unusable(address, exc) from None
        raise
    return pool


def _unusable(address: PostgresAddress, exc: BaseException) -> PostgresStoreError:
    return PostgresStoreError(
        f"token_store: {address.describe()} cannot be used: {type(exc).__name__}: {exc}"
    )


async def migrate(
    conn: asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record],
    address: PostgresAddress,
) -> int:
    """Apply the migrations ``conn``'s database lacks, in one transaction; return the version
    it was at. Idempotent; safe to run from many replicas at once (advisory lock)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS egw_schema_version ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        found = await conn.fetchval("SELECT coalesce(max(version), 0) FROM egw_schema_version")
        assert isinstance(found, int)
        if found > SCHEMA_VERSION:
            raise PostgresStoreError(
                f"token_store: {address.describe()} is at schema version {found},"
                f" newer than this gateway ({SCHEMA_VERSION}): run the newer gateway"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO egw_schema_version (version) VALUES ($1)", version)
        return found


def as_json(detail: Mapping[str, object]) -> str:
    """``detail`` for a ``jsonb`` column (asyncpg sends text for it)."""
    return json.dumps(dict(detail), sort_keys=True, separators=(",", ":"))
