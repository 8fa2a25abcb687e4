"""PostgreSQL specifics of the token store: the migrations the gateway applies itself
(versioned, idempotent, concurrent replicas), errors that name the database and never a
password, the URL. The TokenStore contract itself runs in tests/state/test_token_store.py;
these tests use private databases of the real server (tests/state/pg_server.py).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
import pytest
import yaml

from proxy.auth.audit import AuditEntry
from proxy.config.postgres_url import PostgresAddress, parse_postgres_url
from proxy.state import PostgresOptions, PostgresTokenStore, open_token_store
from proxy.state.postgres.connection import (
    MIGRATIONS,
    SCHEMA_VERSION,
    PostgresStoreError,
)
from tests.procs import assert_clean_error, free_ports, gateway_config, run_cli, write_config
from tests.state.pg_server import scratch_database
from tests.state.test_token_store import T0, record


async def _versions(url: str) -> list[int]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        rows = await conn.fetch("SELECT version FROM egw_schema_version ORDER BY version")
        return [row["version"] for row in rows]
    finally:
        await conn.close()


async def test_a_new_database_is_migrated_to_the_current_version() -> None:
    async with scratch_database() as url:
        store = await open_token_store(url)
        await store.close()
        assert await _versions(url) == list(range(1, SCHEMA_VERSION + 1))
        assert SCHEMA_VERSION == len(MIGRATIONS) >= 2


async def test_opening_again_changes_nothing_and_keeps_the_tokens() -> None:
    async with scratch_database() as url:
        first = await open_token_store(url)
        await first.put(record(1))
        await first.close()
        second = await open_token_store(url)
        try:
            assert await second.list() == [record(1)]
        finally:
            await second.close()
        assert await _versions(url) == list(range(1, SCHEMA_VERSION + 1))


async def test_replicas_starting_at_once_migrate_once() -> None:
    """Eight stores opened at once on an empty database: the advisory lock lets one
    migrate; the others wait, find the schema current, and all of them work."""
    async with scratch_database() as url:
        stores = await asyncio.gather(*(open_token_store(url) for _ in range(8)))
        try:
            await asyncio.gather(*(s.put(record(n)) for n, s in enumerate(stores)))
            assert len(await stores[0].list()) == 8
        finally:
            await asyncio.gather(*(s.close() for s in stores))
        assert await _versions(url) == list(range(1, SCHEMA_VERSION + 1))


async def test_a_database_at_an_older_version_is_brought_up_to_date() -> None:
    async with scratch_database() as url:
        conn = await asyncpg.connect(url, timeout=5)
        try:  # as a gateway of schema 1 left it
            await conn.execute(
                "CREATE TABLE egw_schema_version (version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for statement in MIGRATIONS[0]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO egw_schema_version (version) VALUES (1)")
        finally:
            await conn.close()
        store = await open_token_store(url)
        assert isinstance(store, PostgresTokenStore)
        try:
            await store.append(AuditEntry(at=T0, action="token.create", token_id="a" * 12))
            assert len(await store.entries()) == 1
        finally:
            await store.close()
        assert await _versions(url) == list(range(1, SCHEMA_VERSION + 1))


async def test_tokens_of_schema_2_gain_a_class_column_and_keep_their_values() -> None:
    """Schema 3 adds ``service_class``: a token stored before it reads back in the default
    class (None), and its class can then be set."""
    async with scratch_database() as url:
        conn = await asyncpg.connect(url, timeout=5)
        old = record(1)
        try:  # as a gateway of schema 2 left it
            await conn.execute(
                "CREATE TABLE egw_schema_version (version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, statements in enumerate(MIGRATIONS[:2], start=1):
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO egw_schema_version (version) VALUES ($1)", version)
            await conn.execute(
                "INSERT INTO egw_tokens (id, name, secret_hash, scopes, upstream_key, hourly,"
                " per_minute, weight, created_at, expires_at, revoked_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                old.id,
                old.name,
                old.secret_hash,
                list(old.scopes),
                old.upstream_key,
                old.hourly,
                old.per_minute,
                old.weight,
                old.created_at,
                old.expires_at,
                old.revoked_at,
            )
        finally:
            await conn.close()
        store = await open_token_store(url)
        try:
            assert await store.get(old.id) == old
            assert old.service_class is None
            changed = await store.update(old.id, service_class="batch")
            assert changed is not None
            assert (await store.get(old.id)) == changed
            assert changed.service_class == "batch"
        finally:
            await store.close()
        assert await _versions(url) == list(range(1, SCHEMA_VERSION + 1)) == [1, 2, 3, 4, 5]
        conn = await asyncpg.connect(url, timeout=5)
        try:  # 4: the tokens of one name
            query = "SELECT indexname FROM pg_indexes WHERE tablename = 'egw_tokens'"
            assert "egw_tokens_by_name" in {row["indexname"] for row in await conn.fetch(query)}
            # 5: the change log, written by its trigger: the update above is in it
            changes = await conn.fetch("SELECT seq, token_id FROM egw_token_changes")
            assert [tuple(row) for row in changes] == [(1, old.id)]
        finally:
            await conn.close()


async def test_a_newer_schema_is_refused() -> None:
    async with scratch_database() as url:
        store = await open_token_store(url)
        await store.close()
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute(
                "INSERT INTO egw_schema_version (version) VALUES ($1)", SCHEMA_VERSION + 1
            )
        finally:
            await conn.close()
        with pytest.raises(PostgresStoreError, match="newer than this gateway") as caught:
            await open_token_store(url)
        assert str(caught.value).startswith("token_store: postgresql://postgres@127.0.0.1:")


async def test_an_unreachable_database_is_named_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    (port,) = free_ports(1)
    options = PostgresOptions(password="hunter2-secret", timeout_seconds=1.0)
    assert "hunter2" not in repr(options)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PostgresStoreError) as caught:
        await open_token_store(f"postgresql://gw@127.0.0.1:{port}/tokens", postgres_options=options)
    message = str(caught.value)
    assert message.startswith(
        f"token_store: postgresql://gw@127.0.0.1:{port}/tokens cannot be used"
    )
    assert "hunter2" not in message
    assert "hunter2" not in caplog.text


async def test_a_refused_login_is_named_without_repeating_the_password() -> None:
    """The shared server trusts loopback, so the refusal here is of a role it lacks."""
    async with scratch_database() as url:
        db = parse_postgres_url(url).database
        options = PostgresOptions(password="wrong-hunter2", timeout_seconds=2.0)
        with pytest.raises(PostgresStoreError) as caught:
            await open_token_store(
                f"postgresql://no_such_role_{db}@127.0.0.1:5432/{db}", postgres_options=options
            )
        assert "hunter2" not in str(caught.value)
        assert "cannot be used" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://gw@db/tokens", PostgresAddress("db", 5432, "tokens", "gw")),
        ("POSTGRES://gw@db:6432/tokens", PostgresAddress("db", 6432, "tokens", "gw")),
        (
            "postgresql://gw@db/tokens?sslmode=verify-full",
            PostgresAddress("db", 5432, "tokens", "gw", "verify-full"),
        ),
        ("postgresql://g%40w@[::1]:5433/t%20s", PostgresAddress("::1", 5433, "t s", "g@w")),
    ],
)
def test_parse_postgres_url(url: str, expected: PostgresAddress) -> None:
    assert parse_postgres_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://gw:hunter2@db/tokens", "must not carry a password"),
        ("postgresql://:hunter2@db/tokens", "must not carry a password"),
        ("postgresql://db/tokens", "needs a user"),
        ("postgresql://gw@db", "needs one database name"),
        ("postgresql://gw@db/a/b", "needs one database name"),
        ("postgresql://gw@/tokens", "needs a host"),
        ("postgresql://gw@db:0/tokens", "needs a port"),
        ("postgresql://gw@db:99999/tokens", "malformed host or port"),
        ("postgresql://gw@db/tokens?password=hunter2", "only sslmode"),
        ("postgresql://gw@db/tokens?sslmode=hunter2", "sslmode must be one of"),
        ("postgresql://gw@db/tokens#hunter2", "no fragment"),
        ("mysql://gw@db/tokens", "starts with postgresql://"),
    ],
)
def test_parse_postgres_url_refuses(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^token_store: .*{message}") as caught:
        parse_postgres_url(url)
    assert "hunter2" not in str(caught.value)


def test_describe_shows_no_password() -> None:
    address = parse_postgres_url("postgresql://gw@db.internal:6432/tokens?sslmode=require")
    assert address.describe() == "postgresql://gw@db.internal:6432/tokens"


async def test_serve_and_the_token_commands_stop_with_one_line_naming_the_database(
    tmp_path: Path,
) -> None:
    """The console script, as an operator runs it: PostgreSQL not answering, or a password
    in the URL; one ``error:`` line, no traceback, no password."""
    (pg_port,) = free_ports(1)
    url = f"postgresql://gw@127.0.0.1:{pg_port}/tokens"
    gw = gateway_config(tmp_path, "http://127.0.0.1:9", token_store=url)
    env = {**gw.env, "POSTGRES_PASSWORD": "hunter2-secret"}
    raw = yaml.safe_load(gw.config.read_text())
    raw["postgres"] = {"password": {"env": "POSTGRES_PASSWORD"}, "timeout_seconds": 1}
    write_config(gw.config, raw)
    for args in (("serve",), ("token", "list")):
        result = await asyncio.to_thread(run_cli, *args, "--config", gw.config, env=env)
        line = assert_clean_error(result, 1, f"token_store: {url} cannot be used")
        assert "hunter2" not in result.stderr + result.stdout, line
    raw["token_store"] = f"postgresql://gw:hunter2-secret@127.0.0.1:{pg_port}/tokens"
    write_config(gw.config, raw)
    result = await asyncio.to_thread(run_cli, "check-config", gw.config, env=env)
    assert_clean_error(result, 2, "token_store: a postgresql:// URL must not carry a password")
    assert "hunter2" not in result.stderr
