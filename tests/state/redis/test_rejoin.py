"""Replicas rejoin Redis one by one after an outage: the first back must not spend, through
Redis, the share of a replica still alone, whose sends Redis does not hold yet.

A private redis-server on a free port, stopped and started again (empty, as it keeps
nothing on disk); two replicas of one credential, ``replicas: 2``. Replica b is kept alone
after Redis is back by holding its probe: the slowest a replica rejoins is one probe
interval plus a Redis timeout, and the test makes that gap as long as it needs.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

from proxy.state.redis.client import RedisOptions, open_redis
from proxy.state.redis.fallback import PROBE_INTERVAL
from proxy.state.redis.slots import SETTLE_SECONDS
from tests.state.redis.test_slots import prefix, redis_server, slots, start_redis, wait_redis

__all__ = ["prefix", "redis_server"]  # the fixtures, used here by name


async def test_the_first_replica_back_keeps_its_share_while_another_is_alone(
    redis_server: tuple[int, list[subprocess.Popen[bytes]]], tmp_path: Path, prefix: str
) -> None:
    port, procs = redis_server
    start_redis(port, procs, tmp_path)
    # The gateway's own client: a refused connection is retried twice, 50 and 100 ms apart.
    url = f"redis://127.0.0.1:{port}/0"
    clients = [open_redis(url, RedisOptions(timeout_seconds=0.3)) for _ in "ab"]
    await wait_redis(clients[0], up=True)
    a, b = (slots(client, prefix, replicas=2) for client in clients)  # 5 per 10 s, 3 per s
    b_back = asyncio.Event()
    b_probe = b._link._probe

    async def held_probe() -> None:  # b stays alone until the test lets it probe
        await b_back.wait()
        await b_probe()

    b._link._probe = held_probe  # type: ignore[method-assign]
    for _ in range(3):
        assert await b.take(time.time()) is not None  # the 3-per-second window is full
    await a.refresh(time.time())  # a knows b's three sends
    procs[0].kill()
    procs[0].wait(timeout=5)
    await wait_redis(clients[0], up=False)
    assert await a.take(time.time()) is None and not a.healthy
    assert await b.take(time.time()) is None and not b.healthy
    await asyncio.sleep(1.05)  # the 3-per-second window turns; the 10-s one holds 3 of 5
    # Alone, each replica's sends weigh 2: each has room for one (3 + 2 = 5).
    assert await a.take(time.time()) is not None
    assert await b.take(time.time()) is not None
    start_redis(port, procs, tmp_path)
    deadline = time.monotonic() + 5 + PROBE_INTERVAL
    while not a.healthy and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert a.healthy, "a did not rejoin by itself"
    # Redis came back empty and holds a's send alone; a's next reservation would put back
    # b's three it knew of, and see one free in the 10-s window. b's send alone took it:
    # until b is back, a keeps to its own share, and asks Redis nothing.
    assert await a.take(time.time()) is None
    assert await clients[0].zcard(f"{prefix}default:sends") == 1
    assert a.retry_in(time.time()) > 0
    b_back.set()
    while not b.healthy and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert b.healthy, "b did not rejoin once let"
    assert await clients[0].zcard(f"{prefix}default:sends") == 5  # every send is in Redis
    await asyncio.sleep(max(0.0, SETTLE_SECONDS - 0.2))  # a's settling ends
    a._hint_until = 0.0
    assert await a.take(time.time()) is None  # now Redis alone decides: full, 5 of 5
    for replica in (a, b):
        await replica.close()
    for client in clients:
        await client.aclose()
