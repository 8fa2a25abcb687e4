"""The shared state behind Redis Sentinel (``redis-sentinel://``): the gateway finds the
master through the sentinels and follows a failover by itself. A private master, its
replica and three sentinels on free ports (tests/state/redis/shapes.py); the failover is
real: the master is killed under load.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from proxy.config import load_config
from proxy.sim import Simulator
from proxy.state.redis.client import RedisOptions, open_redis
from tests.procs import Spawn, load_loop
from tests.state.redis import shapes
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
