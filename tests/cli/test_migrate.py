"""``echowin-gateway token migrate --from URL --to URL``: tokens copied from SQLite and from
Redis into PostgreSQL (a private database of the real server), as the real console script
runs it; again without copying twice; a revocation carried; a conflict reported."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.auth.audit import AuditLog
from proxy.auth.tokens import hash_secret
from proxy.state import RedisOptions, open_token_store
from tests.procs import assert_clean_error, child_env, run_cli, write_config
from tests.state.pg_server import scratch_database
from tests.state.test_token_store import REDIS_URL, T0, record, scratch_redis


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with scratch_database() as url:
        yield url


async def migrate(*args: str) -> tuple[int, str, str]:
    result = await asyncio.to_thread(
        run_cli, "token", "migrate", *args, env=child_env(USER="alice", LOGNAME="alice")
    )
    return result.returncode, result.stdout, result.stderr


async def test_sqlite_to_postgres_keeps_every_token_and_is_idempotent(
    tmp_path: Path, pg_url: str
) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/state.db"
    source = await open_token_store(sqlite_url)
    originals = [
        record(1),
        record(2, created_at=T0 + 1, revoked_at=T0 + 5, hourly=None),
        record(3, created_at=T0 + 2, expires_at=None, scopes=("*",)),
    ]
    for r in originals:
        await source.put(r)
    await source.close()

    code, out, err = await migrate("--from", sqlite_url, "--to", pg_url)
    assert code == 0, err
    assert out.startswith("copied 3, revoked 0, already there 0, conflicting 0")
    dest = await open_token_store(pg_url)
    try:
        assert await dest.list() == originals  # hashes, quotas, times, revocation: as they were
        assert isinstance(dest, AuditLog)
        entries = await dest.entries()
        assert {e.action for e in entries} == {"token.migrate"}
        assert {e.actor for e in entries} == {"cli:alice"}
        assert {e.detail["from"] for e in entries} == {f"sqlite:///{tmp_path}/state.db"}
    finally:
        await dest.close()

    code, out, _ = await migrate("--from", sqlite_url, "--to", pg_url)
    assert code == 0 and out.startswith("copied 0, revoked 0, already there 3, conflicting 0")


async def test_redis_to_postgres_carries_a_later_revocation_and_reports_a_conflict(
    tmp_path: Path, pg_url: str
) -> None:
    async with scratch_redis() as (client, prefix):
        source = await open_token_store(
            REDIS_URL, redis_options=RedisOptions(key_prefix=prefix), redis_client=client
        )
        await source.put(record(1))
        await source.put(record(2, created_at=T0 + 1))
        config = write_config(tmp_path / "gw.yaml", {"redis": {"key_prefix": prefix}})
        args = ("--from", REDIS_URL, "--to", pg_url, "--config", str(config))
        code, out, err = await migrate(*args)
        assert code == 0, err
        assert out.startswith("copied 2, revoked 0")
        assert "redis://127.0.0.1:6379/0 -> postgresql://postgres@127.0.0.1:5432/" in out

        await source.revoke(record(1).id, T0 + 9)  # revoked on the old store after the copy
        await source.put(record(3, created_at=T0 + 2))
        dest = await open_token_store(pg_url)
        await dest.update(record(2).id, weight=7)  # changed on the new one: a conflict
        code, out, _ = await migrate(*args)
        assert code == 1
        assert out.startswith("copied 1, revoked 1, already there 0, conflicting 1")
        assert f"conflict: {record(2).id} differs" in out
        try:
            got = {r.id: r for r in await dest.list()}
            assert got[record(1).id].revoked_at == T0 + 9
            assert got[record(2).id].weight == 7  # left as it is
            assert got[record(3).id] == record(3, created_at=T0 + 2)
        finally:
            await dest.close()
            await source.close()


async def test_bad_urls_are_refused_without_a_password(tmp_path: Path) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/state.db"
    for args, needle in [
        (("--from", sqlite_url, "--to", "postgresql://u:hunter2@db/x"), "token_store:"),
        (("--from", "memory://", "--to", sqlite_url), "memory://"),
        (("--from", sqlite_url, "--to", sqlite_url), "the same store"),
        (("--from", "redis://:hunter2@h/0", "--to", sqlite_url), "state:"),
    ]:
        result = await asyncio.to_thread(run_cli, "token", "migrate", *args)
        line = assert_clean_error(result, 2, needle)
        assert "hunter2" not in line


async def test_an_unreachable_destination_fails_with_one_line(tmp_path: Path) -> None:
    from tests.procs import free_ports

    source = await open_token_store(f"sqlite:///{tmp_path}/state.db")
    await source.put(record(1, secret_hash=hash_secret(uuid.uuid4().hex)))
    await source.close()
    (port,) = free_ports(1)
    result = await asyncio.to_thread(
        run_cli,
        "token", "migrate", "--from", f"sqlite:///{tmp_path}/state.db",
        "--to", f"postgresql://gw@127.0.0.1:{port}/tokens",
    )  # fmt: skip
    line = assert_clean_error(result, 1, "cannot be used")
    assert line.startswith(f"error: token_store: postgresql://gw@127.0.0.1:{port}/tokens ")
