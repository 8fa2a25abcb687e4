"""Several gateway processes on one Redis: one budget, one set of tokens (issue: replicas).

Real ``serve`` subprocesses, a real Redis (a private redis-server on a free port, so the
outage test can stop it), the real simulator with short rolling windows counted at arrival.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.admin.tokenops import create_token
from proxy.config import load_config
from proxy.sim import SimConfig, Simulator
from proxy.state import open_token_store, redis_options, state_password
from tests.conftest import base_url
from tests.procs import (
    REAL_KEY,
    Proc,
    Spawn,
    child_env,
    free_ports,
    load_loop,
    wait_http,
    write_config,
)
from tests.test_budget_e2e import (
    GATEWAY_LIMITS,
    LIMITS,
    SIM_LIMITS,
    max_in_any_window,
    perfect_count,
)

ServerFactory = Callable[..., Awaitable[TestServer]]
RUN_SECONDS = 30.0


@dataclass
class RedisServer:
    port: int
    tmp: Path
    procs: list[subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        # Saved on a clean stop and loaded at start, as a production Redis keeps its data:
        # tokens live there. (A Redis that comes back empty: tests/state/redis/test_slots.py.)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "3600 1"]
        args += ["--appendonly", "no", "--dir", str(self.tmp), "--dbfilename", "redis.rdb"]
        self.procs.append(
            subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )

    def stop(self) -> None:
        proc = self.procs[-1]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    (port,) = free_ports(1)
    server = RedisServer(port, tmp_path, [])
    server.start()
    yield server
    for proc in server.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


async def wait_redis_up(url: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_timeout=0.3, socket_connect_timeout=0.3)
    try:
        for _ in range(100):
            try:
                await client.ping()
                return
            except Exception:
                await asyncio.sleep(0.05)
        pytest.fail(f"redis at {url} did not come up")
    finally:
        await client.aclose()


@dataclass
class Replica:
    config: Path
    port: int
    admin_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"


def replica_configs(
    tmp_path: Path,
    sim_url: str,
    redis_url: str,
    n: int,
    *,
    redis: dict[str, Any] | None = None,
    **extra: Any,
) -> list[Replica]:
    """``n`` replicas' configs on one Redis; ``redis``: more keys of its section."""
    prefix = f"egw-it-{uuid.uuid4().hex[:8]}:"
    replicas = []
    for i in range(n):
        port, admin_port = free_ports(2)
        raw: dict[str, Any] = {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin_port}",
            "state": redis_url,
            "redis": {"key_prefix": prefix, "timeout_seconds": 0.3, **(redis or {})},
            "replicas": n,
            "upstream": {
                "base_url": sim_url,
                "api_key": {"env": "ECHOWIN_API_KEY"},
                "timeout_seconds": 5,
                "connect_timeout_seconds": 2,
                "limits": GATEWAY_LIMITS,
            },
            "queue": {"max_wait_seconds": 3},
            "tokens": {"cache_ttl_seconds": 1},
            "logging": {"access_log": False},
            **extra,
        }
        path = write_config(tmp_path / f"replica{i}.yaml", raw)
        replicas.append(Replica(path, port, admin_port))
    return replicas


async def mint(replica: Replica, n: int, env: dict[str, str] | None = None) -> list[str]:
    """``n`` tokens, written as ``token create`` would (``env``: the secrets' variables)."""
    config = load_config(replica.config)
    options = redis_options(config, state_password(config, env or {}))
    store = await open_token_store(config.state, redis_options=options)
    try:
        return [
            (
                await create_token(
                    store, config, config.route_table(), name=f"svc{i}", scopes=["*"]
                )
            ).token
            for i in range(n)
        ]
    finally:
        await store.close()


async def start_all(spawn: Spawn, replicas: list[Replica], **env_extra: str) -> list[Proc]:
    env = child_env(ECHOWIN_API_KEY=REAL_KEY, **env_extra)
    procs = [
        spawn("serve", "--config", r.config, env=env, name=f"replica{i}")
        for i, r in enumerate(replicas)
    ]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for replica, proc in zip(replicas, procs, strict=True):
            assert await wait_http(session, replica.admin_url("/healthz"), proc) == 200
    return procs


@pytest.fixture
async def sim_server(aiohttp_server: ServerFactory) -> tuple[Simulator, str]:
    sim = Simulator(SimConfig(team_keys=frozenset({REAL_KEY}), limits=SIM_LIMITS))
    server = await aiohttp_server(sim.app())
    return sim, base_url(server)


def served_arrivals(sim: Simulator) -> list[float]:
    return sorted(r.at for r in sim.log if r.status not in (0, 401, 429))


async def test_three_replicas_share_one_budget(
    tmp_path: Path, spawn: Spawn, redis_server: RedisServer, sim_server: tuple[Simulator, str]
) -> None:
    sim, sim_url = sim_server
    await wait_redis_up(redis_server.url)
    replicas = replica_configs(tmp_path, sim_url, redis_server.url, 3)
    tokens = await mint(replicas[0], 6)
    await start_all(spawn, replicas)
    statuses: Counter[int] = Counter()
    until = time.monotonic() + RUN_SECONDS
    await asyncio.gather(
        *(
            load_loop(replicas[i % 3].url("/api/v1/contacts"), tokens[i % 6], until, statuses)
            for i in range(18)
        )
    )
    arrivals = served_arrivals(sim)
    assert sim.statuses()[429] == 0, "the replicas overspent the shared budget"
    for n, per in LIMITS:
        assert max_in_any_window(arrivals, per) <= n
    in_run = [t for t in arrivals if t < arrivals[0] + RUN_SECONDS]
    perfect = perfect_count(LIMITS, RUN_SECONDS)
    assert len(in_run) >= 0.9 * perfect, (len(in_run), perfect, statuses)
    assert statuses[0] == 0


async def test_revocation_reaches_every_replica_within_the_cache_bound(
    tmp_path: Path, spawn: Spawn, redis_server: RedisServer, sim_server: tuple[Simulator, str]
) -> None:
    _, sim_url = sim_server
    await wait_redis_up(redis_server.url)
    admin = "replica-admin-token"
    replicas = replica_configs(
        tmp_path, sim_url, redis_server.url, 2, admin_token={"env": "GATEWAY_ADMIN_TOKEN"}
    )
    (token,) = await mint(replicas[0], 1)
    env = child_env(ECHOWIN_API_KEY=REAL_KEY, GATEWAY_ADMIN_TOKEN=admin)
    procs = [
        spawn("serve", "--config", r.config, env=env, name=f"rev{i}")
        for i, r in enumerate(replicas)
    ]
    a, b = replicas
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for replica, proc in zip(replicas, procs, strict=True):
            assert await wait_http(session, replica.admin_url("/healthz"), proc) == 200
        async with session.get(b.url("/api/v1/contacts"), headers=auth) as resp:
            assert resp.status == 200  # B has it cached now
        token_id = token.split("_")[1]
        async with session.delete(
            a.admin_url(f"/admin/tokens/{token_id}"), headers={"Authorization": f"Bearer {admin}"}
        ) as resp:
            assert resp.status == 200
        revoked_at = time.monotonic()
        async with session.get(a.url("/api/v1/contacts"), headers=auth) as resp:
            assert resp.status == 401  # at once on the replica that revoked
        bound = 1.0  # tokens.cache_ttl_seconds
        refused_after = None
        # Max wait 0: a poll never queues for budget, so it answers at once (429 = still valid).
        poll = {**auth, "X-Gateway-Max-Wait": "0"}
        while time.monotonic() - revoked_at < bound + 2.0:
            async with session.get(b.url("/api/v1/contacts"), headers=poll) as resp:
                if resp.status == 401:
                    refused_after = time.monotonic() - revoked_at
                    break
            await asyncio.sleep(0.05)
        assert refused_after is not None, "replica B never saw the revocation"
        assert refused_after <= bound + 0.25


async def readyz_during_outage(replica: Replica) -> tuple[int, dict[str, Any]]:
    """/readyz once it has noticed the store is down (polled, bounded)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        for _ in range(60):
            async with session.get(replica.admin_url("/readyz")) as resp:
                body = await resp.json()
                if body.get("token_store") == "down":
                    return resp.status, body
            await asyncio.sleep(0.1)
    pytest.fail("/readyz never reported the token store down")


@pytest.mark.parametrize("mode", ["local", "closed"])
async def test_redis_outage_mid_run(
    tmp_path: Path,
    spawn: Spawn,
    redis_server: RedisServer,
    sim_server: tuple[Simulator, str],
    mode: str,
) -> None:
    sim, sim_url = sim_server
    await wait_redis_up(redis_server.url)
    replicas = replica_configs(tmp_path, sim_url, redis_server.url, 3, on_state_failure=mode)
    tokens = await mint(replicas[0], 3)
    procs = await start_all(spawn, replicas)
    phases: list[Counter[int]] = [Counter(), Counter(), Counter()]

    async def phase(index: int, seconds: float) -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(
                load_loop(
                    replicas[i % 3].url("/api/v1/contacts"), tokens[i % 3], until, phases[index]
                )
                for i in range(9)
            )
        )

    await phase(0, 8.0)
    redis_server.stop()
    outage_started = time.time()
    readiness = asyncio.ensure_future(readyz_during_outage(replicas[0]))
    await phase(1, 10.0)
    ready_status, ready_body = await readiness
    if mode == "local":
        assert ready_status == 200
        assert ready_body["status"] == "degraded"
    else:
        assert ready_status == 503
    redis_server.start()
    await wait_redis_up(redis_server.url)
    await phase(2, 8.0)
    for proc in procs:
        proc.check_alive()  # no crash
    assert sim.statuses()[429] == 0
    arrivals = served_arrivals(sim)
    for n, per in LIMITS:
        assert max_in_any_window(arrivals, per) <= n
    during = [t for t in sim.log if t.status == 200]
    assert phases[0][200] > 0
    assert phases[2][200] > 0, "the replicas did not resume by themselves"
    if mode == "closed":
        assert phases[1][503] > 0
        assert phases[1][200] <= 3 * 9  # only what was already admitted as Redis went away
    else:
        assert phases[1][200] > 0, "local mode should carry on alone"
        assert phases[1][503] == 0
    assert during
    _ = outage_started
    async with (
        aiohttp.ClientSession() as session,
        session.get(replicas[0].admin_url("/metrics")) as r,
    ):
        text = await r.text()
    assert 'echowin_gateway_state_backend_up{backend="redis"} 1.0' in text
