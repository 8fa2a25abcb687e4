"""Telling that Redis lost its data (proxy/state/redis/reset.py), on the real Redis at
127.0.0.1:6379 under a fresh key prefix: the marker key gone (a restart without persistence,
a flush) or replaced (another replica re-marked it first) is one loss, counted once. The
restart itself, end to end: tests/state/postgres/test_tokens_survive_redis.py."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from proxy.state.redis.reset import ResetWatch
from tests.state.test_token_store import scratch_redis


async def test_a_lost_marker_is_one_reset_and_a_new_redis_none() -> None:
    async with scratch_redis() as (client, prefix):
        seen: list[int] = []
        watch = ResetWatch(client, prefix, lambda: seen.append(1))
        assert await watch.check() is False  # a Redis it had never read: not a loss
        assert await client.get(f"{prefix}instance") is not None
        assert await watch.check() is False
        await client.delete(f"{prefix}instance")  # what an empty restart leaves
        assert await watch.check() is True
        assert await watch.check() is False  # re-marked: told once
        assert seen == [1]


async def test_another_replica_marking_first_is_still_a_loss_for_this_one() -> None:
    async with scratch_redis() as (client, prefix):
        seen: list[str] = []
        a = ResetWatch(client, prefix, lambda: seen.append("a"))
        b = ResetWatch(client, prefix, lambda: seen.append("b"))
        await a.check()
        await b.check()
        await client.delete(f"{prefix}instance")
        assert await b.check() is True  # b sets a new marker ...
        assert await a.check() is True  # ... which a has never seen: its data is gone too
        assert sorted(seen) == ["a", "b"]


async def test_the_watch_runs_on_its_own_and_survives_an_unreachable_redis() -> None:
    async with scratch_redis() as (client, prefix):
        seen: list[int] = []
        watch = ResetWatch(client, prefix, lambda: seen.append(1), interval=0.05)
        watch.start()
        try:
            for _ in range(100):  # bounded: 5 s
                if await client.get(f"{prefix}instance") is not None:
                    break
                await asyncio.sleep(0.05)
            await client.delete(f"{prefix}instance")
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.05)
            assert seen == [1]
        finally:
            await watch.stop()
    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    idle = ResetWatch(dead, "egw-test:", lambda: seen.append(2), interval=0.05)
    idle.start()
    await asyncio.sleep(0.3)  # checks fail quietly: the budget's own health reports it
    await idle.stop()
    await dead.aclose()
    assert seen == [1]
