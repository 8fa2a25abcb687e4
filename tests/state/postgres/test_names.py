"""One active token per name, even when replicas (or the CLI) create one at once: the
PostgreSQL store checks and inserts in one transaction under a lock on the name. Two
stores on one private database of the real server, as two replicas hold them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.admin.tokenops import NameTaken, create_token
from proxy.config import GatewayConfig
from proxy.state import PostgresTokenStore, open_token_store
from tests.state.pg_server import scratch_database

CONFIG = GatewayConfig()


@pytest.fixture
async def two() -> AsyncIterator[tuple[PostgresTokenStore, PostgresTokenStore]]:
    async with scratch_database() as url:
        a, b = await open_token_store(url), await open_token_store(url)
        assert isinstance(a, PostgresTokenStore) and isinstance(b, PostgresTokenStore)
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()


async def make(store: PostgresTokenStore, name: str, now: float, **kw: object) -> str:
    new = await create_token(
        store, CONFIG, CONFIG.route_table(), name=name, scopes=["tags:read"], now=now, **kw
    )
    return new.record.id


async def test_two_replicas_creating_one_name_at_once_make_one_token(
    two: tuple[PostgresTokenStore, PostgresTokenStore],
) -> None:
    a, b = two
    for round_ in range(5):  # each round a fresh name, both stores at once
        name = f"svc-{round_}"
        results = await asyncio.gather(
            make(a, name, 1000.0), make(b, name, 1000.0), return_exceptions=True
        )
        made = [r for r in results if isinstance(r, str)]
        refused = [r for r in results if isinstance(r, NameTaken)]
        assert len(made) == 1 and len(refused) == 1, results
        assert made[0] in str(refused[0])
    assert len(await a.list()) == 5


async def test_a_revoked_or_expired_tokens_name_may_be_taken_again(
    two: tuple[PostgresTokenStore, PostgresTokenStore],
) -> None:
    a, b = two
    first = await make(a, "svc", 1000.0)
    await a.revoke(first, 1001.0)
    await make(b, "svc", 1002.0, expires_in=10)
    with pytest.raises(NameTaken):
        await make(a, "svc", 1005.0)  # the second is still active
    await make(a, "svc", 1013.0)  # the second has expired
