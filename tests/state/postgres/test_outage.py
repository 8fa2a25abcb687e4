"""PostgreSQL for tokens unreachable while the gateway runs (its private database closed to
every connection, its pool's connections ended): tokens this replica has seen keep working
(``on_state_failure: local``), an unseen one gets 503 ``state_unavailable``, ``/readyz`` says
degraded, ``echowin_gateway_state_backend_up{backend="postgresql"}`` is 0, and all is well
again once the database opens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import asyncpg
import pytest

from tests.conftest import GatewayHandle
from tests.state.pg_server import PG_HOST, PG_PORT, PG_USER, scratch_database

MakeGateway = Callable[..., Awaitable[GatewayHandle]]
CACHE_TTL = 0.2


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with scratch_database() as url:
        yield url


async def allow_connections(url: str, allowed: bool) -> None:
    """Open or close ``url``'s database to every new connection; closing also ends those
    it has (superusers included: ALLOW_CONNECTIONS binds them too)."""
    database = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres", timeout=5
    )
    try:
        await conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                database,
            )
    finally:
        await conn.close()


async def get(gw: GatewayHandle, token: str) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}", "X-Gateway-Max-Wait": "0"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url("/api/v1/contacts"), headers=headers) as resp,
    ):
        body = await resp.json(content_type=None)
        return resp.status, body.get("reason", "") if isinstance(body, dict) else ""


async def readyz(gw: GatewayHandle) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.get(gw.admin_url("/readyz")) as resp:
        return resp.status, await resp.json()


async def postgres_up(gw: GatewayHandle) -> float | None:
    """``echowin_gateway_state_backend_up{backend="postgresql"}`` on the admin listener."""
    async with aiohttp.ClientSession() as session, session.get(gw.admin_url("/metrics")) as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith('echowin_gateway_state_backend_up{backend="postgresql"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


async def until_postgres_up_is(gw: GatewayHandle, value: float) -> None:
    for _ in range(100):  # bounded: 10 s
        if await postgres_up(gw) == value:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"state_backend_up{{backend=postgresql}} never became {value}")


async def change_log_read(gw: GatewayHandle, url: str) -> None:
    """Until the gateway has read the token change log past every write made so far: a
    probe token, looked up, then revoked with SQL alone (the trigger writes the log; no
    notice is sent), is refused once a read of the log has dropped it. A change the log
    reports drops what the gateway holds of that token, its copy for an outage included."""
    probe = await gw.token(name="probe")
    assert (await get(gw, probe))[0] == 200
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(
            "UPDATE egw_tokens SET revoked_at = 1 WHERE id = $1", probe.split("_")[1]
        )
    finally:
        await conn.close()
    for _ in range(100):  # bounded: 10 s
        if (await get(gw, probe))[0] == 401:
            return
        await asyncio.sleep(0.1)
    pytest.fail("the gateway never read the token change log")


async def test_seen_tokens_ride_out_a_postgres_outage(
    make_gateway: MakeGateway, pg_url: str
) -> None:
    gw = await make_gateway(
        token_store=pg_url,
        tokens={"cache_ttl_seconds": CACHE_TTL},
        postgres={"timeout_seconds": 1.0},
    )
    seen = await gw.token(name="seen")
    unseen = await gw.token(name="unseen")
    await change_log_read(gw, pg_url)  # its creation read: the lookup below stays as it is
    assert (await get(gw, seen))[0] == 200
    await until_postgres_up_is(gw, 1.0)
    await allow_connections(pg_url, False)
    try:
        await until_postgres_up_is(gw, 0.0)
        await asyncio.sleep(CACHE_TTL + 0.1)  # the cached record has lapsed: the store is asked
        assert await get(gw, seen) == (200, "")
        status, reason = await get(gw, unseen)
        assert (status, reason) == (503, "state_unavailable")
        status, body = await readyz(gw)
        assert status == 200 and body["status"] == "degraded" and body["token_store"] == "down"
    finally:
        await allow_connections(pg_url, True)
    for _ in range(50):  # bounded: the pool connects again on its next use
        if (await get(gw, unseen))[0] == 200:
            break
        await asyncio.sleep(0.1)
    assert (await get(gw, unseen))[0] == 200
    assert (await readyz(gw))[1]["status"] == "ready"
    await until_postgres_up_is(gw, 1.0)
