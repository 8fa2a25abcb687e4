"""The PostgreSQL the tests use: the server at 127.0.0.1:5432 (user ``postgres``, trust), in
private databases (``egw_test_<random>``) created for a test session or a test and dropped
afterwards. When it does not answer, the tests FAIL (never skip): scripts/test-deps.sh
starts one for `make test`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import pytest

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
T = TypeVar("T")


def pg_url(database: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


async def _admin() -> asyncpg.Connection[asyncpg.Record]:
    try:
        return await asyncpg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres", timeout=5
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"these tests need PostgreSQL at {PG_HOST}:{PG_PORT} (user {PG_USER}, trust;"
            f" scripts/test-deps.sh starts one): {type(exc).__name__}: {exc}",
            pytrace=False,
        )


async def create_database() -> str:
    """A new empty database; its name."""
    name = f"egw_test_{uuid.uuid4().hex[:16]}"
    conn = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    conn = await _admin()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """The URL of a new database, dropped afterwards."""
    name = await create_database()
    try:
        yield pg_url(name)
    finally:
        await drop_database(name)


def _run_apart(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``fn()`` on an event loop of its own thread (a fixture may be set up from inside a
    running loop, where ``asyncio.run`` is refused)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(fn())).result(timeout=30)


@pytest.fixture(scope="session")
def pg_session_url() -> Iterator[str]:
    """One database for the session's contract tests (each empties what it wrote)."""
    name = _run_apart(create_database)
    try:
        yield pg_url(name)
    finally:
        _run_apart(lambda: drop_database(name))


async def empty_tables(url: str) -> None:
    """Delete every token and audit entry (the schema stays)."""
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute("TRUNCATE egw_tokens, egw_token_audit")
    finally:
        await conn.close()
