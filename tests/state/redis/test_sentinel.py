"""The shared state behind Redis Sentinel (``redis-sentinel://``): the gateway finds the
master through the sentinels and follows a failover by itself. A private master, its
replica and three sentinels on free ports (tests/state/redis/shapes.py); the failover is
real: the master is killed under load.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.budget.windows import Limit
from proxy.config import load_config
from proxy.config.stores import RedisTlsConfig
from proxy.sim import Simulator
from proxy.state import redis_options, sentinel_password
from proxy.state.redis.client import RedisOptions, open_redis
from proxy.state.redis.fallback import SETTLE_SECONDS
from proxy.state.redis.preflight import check_access
from proxy.state.redis.slots import RedisSlots
from tests.procs import Spawn, eventually, load_loop
from tests.state.redis import shapes
from tests.state.redis.gate import Gate
from tests.state.redis.test_freezes import freeze_reaches_the_other_replica, replica
from tests.state.redis.test_replicas import (
    mint,
    replica_configs,
    served_arrivals,
    sim_server,
    start_all,
)
from tests.test_budget_e2e import LIMITS, max_in_any_window

__all__ = ["sim_server"]  # the fixture, imported for the tests here

SHARING_AGAIN_WITHIN = 5.0  # seconds after the promotion


@pytest.fixture
async def sentinel_client(redis_sentinel: shapes.SentinelGroup) -> AsyncIterator[Redis]:
    client = open_redis(redis_sentinel.url, RedisOptions(timeout_seconds=2.0))
    assert isinstance(client, Redis)
    yield client
    await client.aclose()


async def test_a_freeze_reaches_the_other_replica(sentinel_client: Redis) -> None:
    prefix = f"egw-freeze-{uuid.uuid4().hex[:10]}:"
    a, b = replica(sentinel_client, prefix), replica(sentinel_client, prefix)
    await a.restore()
    await b.restore()
    await freeze_reaches_the_other_replica(a, b)
    await a.close()
    await b.close()


def _sends_on(port: int, key: str) -> set[bytes]:
    with shapes.client(port) as c:
        return set(c.zrange(key, 0, -1))


async def _wait_promoted(group: shapes.SentinelGroup, old: int) -> float:
    """The monotonic time the sentinels first name another master (bounded)."""
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        try:
            if await asyncio.to_thread(group.master_port) != old:
                return time.monotonic()
        except (shapes.redis.RedisError, OSError):
            pass
        await asyncio.sleep(0.05)
    pytest.fail(f"no promotion within 20 s\n{group.logs()}")


async def _wait_shared(port: int, key: str, before: set[bytes], since: float) -> float:
    """Seconds from ``since`` until the new master holds a send not in ``before`` (the
    replicas reserve there again, not alone)."""
    deadline = since + SHARING_AGAIN_WITHIN + 5.0
    while time.monotonic() < deadline:
        try:
            if await asyncio.to_thread(_sends_on, port, key) - before:
                return time.monotonic() - since
        except (shapes.redis.RedisError, OSError):
            pass
        await asyncio.sleep(0.05)
    pytest.fail("the replicas never reserved on the new master")


async def test_a_failover_under_load(
    tmp_path: Path, spawn: Spawn, sim_server: tuple[Simulator, str]
) -> None:
    """Two gateway replicas under load; the master is killed. While the sentinels agree
    and promote the replica, the gateways run alone on their shares; within seconds of the
    promotion they reserve on the new master. No upstream 429 throughout."""
    sim, sim_url = sim_server
    group = shapes.start_sentinel_group(tmp_path / "sentinel")
    try:
        replicas = replica_configs(tmp_path, sim_url, group.url, 2)
        tokens = await mint(replicas[0], 4)
        await start_all(spawn, replicas)
        prefix = load_config(replicas[0].config).redis.key_prefix
        sends = f"{prefix}default:sends"
        statuses: Counter[int] = Counter()
        until = time.monotonic() + 25.0
        load = asyncio.gather(
            *(
                load_loop(replicas[i % 2].url("/api/v1/contacts"), tokens[i % 4], until,
                          statuses)
                for i in range(8)
            )
        )  # fmt: skip
        await asyncio.sleep(6.0)
        assert statuses[200] > 0
        old = group.master
        group.kill(old)
        killed = time.monotonic()
        promoted = await _wait_promoted(group, old)
        new = group.master_port()
        assert new == group.replica
        before = await asyncio.to_thread(_sends_on, new, sends)
        shared_after = await _wait_shared(new, sends, before, promoted)
        at_promotion = statuses[200]
        await load
        assert sim.statuses()[429] == 0, "the replicas overspent the shared budget"
        arrivals = served_arrivals(sim)
        for n, per in LIMITS:
            assert max_in_any_window(arrivals, per) <= n
        assert shared_after <= SHARING_AGAIN_WITHIN, (shared_after, promoted - killed)
        assert statuses[200] > at_promotion, "not admitting after the promotion"
        assert statuses[0] == 0, statuses
    finally:
        group.stop()


async def test_sends_the_old_master_never_replicated_are_put_back(tmp_path: Path) -> None:
    """The master acknowledges a send its replica never gets (the replication stream is
    held back), then dies; Sentinel promotes the replica, which lacks it. The replica of
    the gateway that made the send puts it back from its journal, so the other replica
    still sees the whole budget spent: one more send, then a refusal."""
    gates: list[Gate] = []

    def through(master: int) -> int:
        gates.append(Gate(master))
        return gates[0].port

    group = shapes.start_sentinel_group(tmp_path / "sentinel", through)
    prefix = f"egw-lost-{uuid.uuid4().hex[:8]}:"
    sends = f"{prefix}default:sends"
    clients = [open_redis(group.url, RedisOptions(timeout_seconds=0.5)) for _ in range(2)]
    a, b = (
        RedisSlots("default", c, prefix, LOST_LIMITS, 0.0, replicas=2, mode="local")
        for c in clients
    )
    try:
        now = time.time()
        await a.restore(now)
        await b.restore(now)
        assert await a.take(now) is not None and await a.take(now) is not None
        await eventually(
            lambda: asyncio.to_thread(lambda: len(_sends_on(group.replica, sends)) == 2),
            "two sends replicated",
            5.0,
        )
        gates[0].hold()
        assert await a.take(time.time()) is not None  # acknowledged, never replicated
        assert len(await asyncio.to_thread(_sends_on, group.master, sends)) == 3
        # A holds no connection to the old master: its next call goes to the new one and
        # succeeds, so A never sees the failover as an error (which would replay anyway).
        await clients[0].connection_pool.disconnect()
        group.kill(gates[0].target)  # the master itself, behind the gate
        await _wait_promoted(group, group.master)
        assert len(await asyncio.to_thread(_sends_on, group.replica, sends)) == 2  # lost one
        await a.refresh(time.time())  # A talks to Redis again (any call would)
        assert a.healthy, "A met the failover as an error: not the case tested here"
        await eventually(
            lambda: asyncio.to_thread(lambda: len(_sends_on(group.replica, sends)) == 3),
            "A's lost send put back on the new master",
            10.0,
        )
        await eventually(lambda: _healthy(b), "B shares again", 10.0)
        # If B met the failover as an error, back in Redis it keeps to its share alone (no
        # room: its sends weigh 2) until its settling ends (fallback.Settling); then Redis
        # has the 4th of 4 for it, and no 5th.
        await eventually(lambda: _took(b), "B's 4th send, once settled", 5.0 + SETTLE_SECONDS)
        assert await b.take(time.time()) is None, "B spent a send the old master lost"
    finally:
        for source in (a, b):
            await source.close()
        for c in clients:
            await c.aclose()
        for gate in gates:
            gate.close()
        group.stop()


LOST_LIMITS = (Limit(4, 60.0),)


async def _took(source: RedisSlots) -> bool:
    return await source.take(time.time()) is not None


async def _healthy(source: RedisSlots) -> bool:
    if not source.healthy:
        return False
    await source.refresh(time.time())
    return source.healthy


async def test_sentinel_over_tls(tmp_path: Path) -> None:
    """``rediss-sentinel://``: the sentinels and the servers speak TLS only and demand a
    client certificate; the gateway finds the master through them and passes its checks
    at start. (The certificates name redis.test, not the address: names are not checked.)"""
    certs = shapes.make_certs(tmp_path / "certs")
    group = shapes.start_sentinel_group(tmp_path / "sentinel", certs=certs)
    tls = RedisTlsConfig(
        ca_file=str(certs.ca),
        cert_file=str(certs.client_cert),
        key_file=str(certs.client_key),
        check_hostname=False,
    )
    url = group.url.replace("redis-sentinel://", "rediss-sentinel://")
    client = open_redis(url, RedisOptions(timeout_seconds=2.0, tls=tls))
    try:
        await check_access(client, "egw-tls:")
        assert await client.set("egw-tls:probe", "1", px=2000)
    finally:
        await client.aclose()
        group.stop()


async def test_sentinels_that_demand_a_password(tmp_path: Path) -> None:
    """Sentinels with a password of their own (``requirepass``; the servers have none):
    ``redis.sentinel_password``, read from the environment like every secret, reaches
    them, and the gateway finds the master and passes its checks. Without it the sentinels
    refuse, and the master is never found."""
    group = shapes.start_sentinel_group(tmp_path / "sentinel", sentinel_password="only-sentinels")
    raw = {
        "upstream": {"base_url": "http://127.0.0.1:9", "api_key": {"env": "K"}},
        "state": group.url,
        "redis": {"sentinel_password": {"env": "EGW_SENTINEL_PASSWORD"}},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(raw))
    config = load_config(path)
    env = {"K": "sk_test", "EGW_SENTINEL_PASSWORD": "only-sentinels"}
    options = redis_options(config, None, sentinel_password(config, env))
    assert options is not None and "only-sentinels" not in repr(options)
    clients = [open_redis(group.url, options), open_redis(group.url, RedisOptions())]
    try:
        await check_access(clients[0], "egw-sentinel-auth:")
        assert await clients[0].set("egw-sentinel-auth:probe", "1", px=2000)
        with pytest.raises(RedisError):
            await clients[1].ping()
    finally:
        for c in clients:
            await c.aclose()
        group.stop()


@pytest.mark.parametrize("url", ["standalone", "sentinel"])
async def test_a_full_pool_makes_a_command_wait_not_fail(
    redis_sentinel: shapes.SentinelGroup, url: str
) -> None:
    """``redis.pool_size`` bounds the connections; a command beyond it waits (up to
    ``redis.timeout_seconds``) for one to come free. Three commands that each hold the one
    connection for 0.2 s all succeed."""
    target = (
        f"redis://127.0.0.1:{redis_sentinel.master_port()}/0" if url == "standalone"
        else redis_sentinel.url
    )  # fmt: skip
    client = open_redis(target, RedisOptions(pool_size=1, timeout_seconds=2.0))
    key = f"egw-pool-{uuid.uuid4().hex[:8]}:nothing"
    try:
        started = time.monotonic()
        await asyncio.gather(*(client.blpop([key], timeout=0.2) for _ in range(3)))
        assert time.monotonic() - started >= 0.55  # one after another, on one connection
    finally:
        await client.aclose()
