"""End to end: gateways (real ``serve`` subprocesses) with the budget in a private Redis (a
redis-server of this test, on a free port) and the tokens in PostgreSQL (a private database).

- Redis restarted EMPTY: callers keep their tokens; the loss is logged and counted
  (``echowin_gateway_state_resets_total``). With the tokens in Redis instead, the same loss
  costs callers their tokens, and the log line says so.
- A revocation made on one replica reaches the other within ``tokens.cache_ttl_seconds``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.admin.tokenops import create_token
from proxy.config import load_config
from proxy.sim import Simulator
from proxy.state import RedisOptions, open_token_store
from tests.procs import REAL_KEY, Proc, Spawn, child_env, wait_http
from tests.state.pg_server import scratch_database
from tests.state.redis.test_replicas import (  # noqa: F401 - fixtures
    RedisServer,
    Replica,
    redis_server,
    replica_configs,
    sim_server,
    wait_redis_up,
)

CACHE_TTL = 1.0
DEADLINE = 15.0


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with scratch_database() as url:
        yield url


async def mint(replica: Replica) -> str:
    """A token in the store the replica's config names (token_store, else its Redis)."""
    config = load_config(replica.config)
    url = config.token_store or config.state
    store = await open_token_store(
        url, redis_options=RedisOptions(key_prefix=config.redis.key_prefix)
    )
    try:
        new = await create_token(store, config, config.route_table(), name="svc", scopes=["*"])
        return new.token
    finally:
        await store.close()


async def status_of(session: aiohttp.ClientSession, replica: Replica, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}", "X-Gateway-Max-Wait": "0"}
    async with session.get(replica.url("/api/v1/contacts"), headers=headers) as resp:
        await resp.read()
        return resp.status


async def resets_counted(session: aiohttp.ClientSession, replica: Replica) -> float:
    async with session.get(replica.admin_url("/metrics")) as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("echowin_gateway_state_resets_total "):
            return float(line.split()[1])
    pytest.fail("echowin_gateway_state_resets_total is not exported")


async def wait_for(what: str, check: Any, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.1)


def restart_empty(server: RedisServer) -> None:
    """Stop Redis, drop what it saved, start it again on the same port: empty."""
    server.stop()
    (server.tmp / "redis.rdb").unlink(missing_ok=True)
    server.start()


def configs(
    tmp_path: Path, sim_url: str, redis_url: str, n: int, token_store: str | None
) -> list[Replica]:
    extra: dict[str, Any] = {"tokens": {"cache_ttl_seconds": CACHE_TTL}}
    if token_store is not None:
        extra["token_store"] = token_store
    return replica_configs(tmp_path, sim_url, redis_url, n, **extra)


async def start(spawn: Spawn, replica: Replica, name: str, **env: str) -> Proc:
    proc = spawn(
        "serve",
        "--config",
        replica.config,
        env=child_env(ECHOWIN_API_KEY=REAL_KEY, **env),
        name=name,
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        assert await wait_http(session, replica.admin_url("/healthz"), proc) == 200
    return proc


@pytest.mark.parametrize("tokens_in", ["postgresql", "redis"])
async def test_a_redis_restarted_empty_is_told_and_costs_no_token_in_postgres(
    tmp_path: Path,
    spawn: Spawn,
    redis_server: RedisServer,  # noqa: F811
    sim_server: tuple[Simulator, str],  # noqa: F811
    pg_url: str,
    tokens_in: str,
) -> None:
    sim, sim_url = sim_server
    await wait_redis_up(redis_server.url)
    token_store = pg_url if tokens_in == "postgresql" else None
    (replica,) = configs(tmp_path, sim_url, redis_server.url, 1, token_store)
    token = await mint(replica)
    proc = await start(spawn, replica, "gw")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        assert await status_of(session, replica, token) == 200
        assert await resets_counted(session, replica) == 0
        await asyncio.sleep(2.5)  # the watch has read the marker once (every 2 s)

        restart_empty(redis_server)
        await wait_redis_up(redis_server.url)

        async def counted() -> bool:
            return await resets_counted(session, replica) >= 1

        await wait_for("the reset counted", counted)
        await asyncio.sleep(CACHE_TTL + 0.2)  # the token's cached record has lapsed
        expected = 200 if tokens_in == "postgresql" else 401

        async def answered() -> bool:
            return await status_of(session, replica, token) == expected

        await wait_for(f"the token answered {expected}", answered)
        # Held: not a moment's luck.
        for _ in range(5):
            assert await status_of(session, replica, token) == expected
            await asyncio.sleep(0.2)
        assert await resets_counted(session, replica) == 1
    logged = proc.stdout() + proc.stderr()
    assert "Redis lost its data" in logged
    said = "kept in postgresql" if tokens_in == "postgresql" else "lost with it"
    assert said in logged
    assert sim.statuses()[429] == 0


async def test_revocation_reaches_every_replica_within_the_cache_bound(
    tmp_path: Path,
    spawn: Spawn,
    redis_server: RedisServer,  # noqa: F811
    sim_server: tuple[Simulator, str],  # noqa: F811
    pg_url: str,
) -> None:
    _, sim_url = sim_server
    await wait_redis_up(redis_server.url)
    a, b = configs(tmp_path, sim_url, redis_server.url, 2, pg_url)
    token = await mint(a)
    await start(spawn, a, "a")
    await start(spawn, b, "b")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        assert await status_of(session, b, token) == 200  # B has it cached now
        store = await open_token_store(pg_url)
        try:
            await store.revoke(token.split("_")[1], time.time())  # as A's admin API would
        finally:
            await store.close()
        revoked_at = time.monotonic()
        refused_after = None
        while time.monotonic() - revoked_at < CACHE_TTL + 2.0:
            if await status_of(session, b, token) == 401:
                refused_after = time.monotonic() - revoked_at
                break
            await asyncio.sleep(0.05)
        assert refused_after is not None, "replica B never saw the revocation"
        assert refused_after <= CACHE_TTL + 0.25
        assert await status_of(session, a, token) == 401
