"""End to end: gateways (real ``serve`` subprocesses) with the budget in a private Redis (a
redis-server of this test, on a free port) and the tokens in PostgreSQL (a private database).

- Redis restarted EMPTY: callers keep their tokens; the loss is logged and counted
  (``echowin_gateway_state_resets_total``). With the tokens in Redis instead, the same loss
  costs callers their tokens, and the log line says so.
- Two replicas under load across that restart: no 401, no upstream 429.
- A token revoked straight in PostgreSQL (as ``token revoke --config`` does) is refused by
  every replica within a second, though each caches records for 30 s: LISTEN/NOTIFY.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.admin.tokenops import create_token
from proxy.config import load_config
from proxy.sim import Simulator
from proxy.state import RedisOptions, open_token_store
from tests.procs import REAL_KEY, Proc, Spawn, child_env, load_loop, wait_http
from tests.state.pg_server import scratch_database
from tests.state.redis.test_replicas import (  # noqa: F401 - fixtures
    RedisServer,
    Replica,
    redis_server,
    replica_configs,
    sim_server,
    wait_redis_up,
)
from tests.test_budget_e2e import LIMITS, max_in_any_window

CACHE_TTL = 1.0
DEADLINE = 15.0


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with scratch_database() as url:
        yield url


async def mint(replica: Replica, name: str = "svc") -> str:
    """A token in the store the replica's config names (token_store, else its Redis);
    ``name``: one active token per name."""
    config = load_config(replica.config)
    url = config.token_store or config.state
    store = await open_token_store(
        url, redis_options=RedisOptions(key_prefix=config.redis.key_prefix)
    )
    try:
        new = await create_token(store, config, config.route_table(), name=name, scopes=["*"])
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


async def listeners(url: str) -> int:
    """Connections LISTENing on ``url``'s database (one per gateway process)."""
    conn = await asyncpg.connect(url, timeout=5)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
        return int(count)
    finally:
        await conn.close()


async def marked(server: RedisServer, replica: Replica) -> None:
    """Wait (bounded) until Redis holds the replicas' marker: each replica's first reading
    runs as it opens, before its listener answers, so once it is there and the replicas
    answer, they know it; what they find after a restart is then a loss."""
    from redis.asyncio import Redis

    key = f"{load_config(replica.config).redis.key_prefix}instance"
    client = Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    try:

        async def present() -> bool:
            return await client.get(key) is not None

        await wait_for("the marker key set", present)
    finally:
        await client.aclose()


def restart_empty(server: RedisServer) -> None:
    """Stop Redis, drop what it saved, start it again on the same port: empty."""
    server.stop()
    (server.tmp / "redis.rdb").unlink(missing_ok=True)
    server.start()


def configs(
    tmp_path: Path,
    sim_url: str,
    redis_url: str,
    n: int,
    token_store: str | None,
    cache_ttl: float = CACHE_TTL,
) -> list[Replica]:
    extra: dict[str, Any] = {"tokens": {"cache_ttl_seconds": cache_ttl}}
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
        await marked(redis_server, replica)

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


async def test_a_revocation_reaches_another_replica_at_once_through_notify(
    tmp_path: Path,
    spawn: Spawn,
    redis_server: RedisServer,  # noqa: F811
    sim_server: tuple[Simulator, str],  # noqa: F811
    pg_url: str,
) -> None:
    """With a 30 s cache, B still refuses a token revoked by the CLI's way (straight to
    PostgreSQL) within a second: the NOTIFY drops B's cached record."""
    _, sim_url = sim_server
    await wait_redis_up(redis_server.url)
    a, b = configs(tmp_path, sim_url, redis_server.url, 2, pg_url, cache_ttl=30.0)
    token = await mint(a)
    await start(spawn, a, "a")
    await start(spawn, b, "b")

    async def both_listening() -> bool:
        return await listeners(pg_url) == 2

    await wait_for("both replicas listening", both_listening)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        assert await status_of(session, b, token) == 200  # cached on B for 30 s
        store = await open_token_store(pg_url)
        try:
            await store.revoke(token.split("_")[1], time.time())
        finally:
            await store.close()
        revoked_at = time.monotonic()

        async def refused() -> bool:
            return await status_of(session, b, token) == 401

        await wait_for("B refusing the revoked token", refused, timeout=1.0)
        assert time.monotonic() - revoked_at < 1.0


async def test_two_loaded_replicas_keep_every_caller_across_an_empty_redis_restart(
    tmp_path: Path,
    spawn: Spawn,
    redis_server: RedisServer,  # noqa: F811
    sim_server: tuple[Simulator, str],  # noqa: F811
    pg_url: str,
) -> None:
    """Load on two replicas (tokens in PostgreSQL) while Redis restarts empty: no caller
    gets a 401, echowin sends no 429, both replicas count the loss once, and the budget
    is served again after it."""
    sim, sim_url = sim_server
    await wait_redis_up(redis_server.url)
    replicas = configs(tmp_path, sim_url, redis_server.url, 2, pg_url)
    tokens = [await mint(replicas[0], f"svc-{i}") for i in range(3)]
    for i, replica in enumerate(replicas):
        await start(spawn, replica, f"r{i}")
    await marked(redis_server, replicas[0])
    phases: list[Counter[int]] = [Counter(), Counter(), Counter()]

    async def phase(index: int, seconds: float) -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(
                load_loop(
                    replicas[i % 2].url("/api/v1/contacts"), tokens[i % 3], until, phases[index]
                )
                for i in range(6)
            )
        )

    await phase(0, 5.0)
    during = asyncio.ensure_future(phase(1, 8.0))
    await asyncio.sleep(1.0)
    restart_empty(redis_server)
    await wait_redis_up(redis_server.url)
    await during
    await phase(2, 5.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for replica in replicas:
            assert await resets_counted(session, replica) == 1
    assert all(p[401] == 0 for p in phases), phases
    assert sim.statuses()[429] == 0
    assert phases[0][200] > 0 and phases[2][200] > 0, phases
    arrivals = sorted(r.at for r in sim.log if r.status not in (0, 401, 429))
    for n, per in LIMITS:
        assert max_in_any_window(arrivals, per) <= n
