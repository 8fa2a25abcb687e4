"""Purges between the workers of one ``serve --workers N``: unix datagram sockets, real
ones, two channels in one event loop standing for two workers. A burst larger than the
kernel's queue for a socket (``net.unix.max_dgram_qlen``, 10 by default) still arrives."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from proxy.cache.channel import MAX_QUEUED, SiblingChannel
from proxy.cache.keeper import GatewayCache
from proxy.cache.keys import CacheKey
from proxy.cache.purge import Purge
from proxy.cache.store import Answer
from proxy.config import CacheConfig

pytestmark = pytest.mark.filterwarnings("error")


def filled(n: int) -> GatewayCache:
    cache = GatewayCache(CacheConfig(), CollectorRegistry())
    for i in range(n):
        path = f"/api/v1/boards/{i}"
        key = CacheKey("default", "/api/v1/boards/{boardId}", path, "", "*/*", "")
        assert cache.store.put(key, Answer(200, (), b"{}"), 60.0)
    return cache


@pytest.fixture
async def pair() -> AsyncIterator[tuple[SiblingChannel, GatewayCache]]:
    """Worker 0's channel, and worker 1's cache (30 copies) listening on its own."""
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        sender = await SiblingChannel(directory, 0, filled(0)).open()
        heard_by = filled(30)
        listener = await SiblingChannel(directory, 1, heard_by).open()
        try:
            yield sender, heard_by
        finally:
            await sender.close()
            await listener.close()


async def until_empty(cache: GatewayCache, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while cache.store.entries:
        assert asyncio.get_running_loop().time() < deadline, f"{cache.store.entries} left"
        await asyncio.sleep(0.01)


async def test_thirty_purges_in_one_loop_turn_all_reach_the_sibling(
    pair: tuple[SiblingChannel, GatewayCache],
) -> None:
    sender, heard_by = pair
    for i in range(30):  # no await between them: the sibling reads nothing meanwhile
        sender.publish("default", Purge(frozenset({f"/api/v1/boards/{i}"})))
    await until_empty(heard_by)
    assert heard_by.purged == 30


async def test_a_burst_past_the_queue_bound_becomes_one_purge_of_everything(
    pair: tuple[SiblingChannel, GatewayCache],
) -> None:
    sender, heard_by = pair
    for i in range(MAX_QUEUED + 40):
        sender.publish("default", Purge(frozenset({f"/api/v1/tags/{i}"})))  # none held
    await until_empty(heard_by)  # the coalesced purge of everything took the boards
    assert heard_by.purged == 30


async def test_a_message_not_in_utf8_on_redis_does_not_stop_the_listener() -> None:
    from proxy.cache.channel import RedisChannel
    from tests.state.test_token_store import scratch_redis

    async with scratch_redis() as (client, prefix):
        cache = filled(30)
        channel = RedisChannel(client, prefix, cache)
        try:
            await asyncio.wait_for(channel.subscribed.wait(), 5)
            name = f"{prefix}cache:purges"
            await client.publish(name, b"other \xff\xfe|\xc3|")
            await client.publish(name, "other default /api/v1/boards/0||")
            deadline = asyncio.get_running_loop().time() + 0.5  # a restart pauses >= 1 s
            while cache.store.entries == 30:
                assert asyncio.get_running_loop().time() < deadline, "the purge was lost"
                await asyncio.sleep(0.01)
            assert cache.purged == 1 and channel.subscribed.is_set()
        finally:
            await channel.close()
