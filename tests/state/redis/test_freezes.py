"""An unexpected upstream 429 on one replica, as the waiters of the OTHER replicas see it:
refused at once with ``upstream_frozen`` (the freeze is published in Redis and each lane's
source listens), not after waiting out their max wait for ``upstream_budget``. Two Lanes
on their own RedisSlots stand for two replicas; a real Redis, nothing mocked.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from proxy.budget.admission import Refusal
from proxy.budget.grants import SlotGrant
from proxy.budget.lane import Lane, QueuePolicy
from proxy.budget.windows import Limit
from proxy.state.redis.client import RedisOptions, open_redis
from proxy.state.redis.freezes import FreezeListener
from proxy.state.redis.slots import RedisSlots
from tests.budget.test_scheduler import Recorder, token
from tests.procs import eventually
from tests.state.redis.test_slots import redis_server, start_redis, wait_redis  # noqa: F401
from tests.state.redis.test_slots_edges import restart_empty

# One send per 8 s and a max wait of 10 s: a second request queues (its predicted wait is
# under 8 s) and, left alone, would wait about 8 s. Heard in time, it is refused in ms.
LIMITS = (Limit(1, 8.0),)
MAX_WAIT = 10.0
HEARD_WITHIN = 1.0  # seconds: far below the 8 s the budget would take to free


@pytest.fixture
def prefix() -> str:
    return f"egw-freeze-{uuid.uuid4().hex[:10]}:"


def replica(client: Redis, prefix: str) -> Lane:
    source = RedisSlots("default", client, prefix, LIMITS, 0.0, replicas=2, mode="local")
    policy = QueuePolicy(max_wait=MAX_WAIT, max_depth=100, max_depth_per_token=100)
    return Lane("default", LIMITS, 0.0, None, policy, Recorder(), source=source)


async def listening(client: Redis, prefix: str, n: int) -> bool:
    """``n`` connections are subscribed to the credential's freeze channel."""
    channel = f"{prefix}default:freezes"
    counts = dict(await client.pubsub_numsub(channel))
    return bool(counts.get(channel.encode(), 0) == n)


async def queued(lane: Lane) -> bool:
    return lane.depth == 1


async def freeze_reaches_the_other_replica(a: Lane, b: Lane) -> None:
    """A sends, one request waits on each replica, A's send meets a 429 (Retry-After 60):
    both waiters are refused at once with upstream_frozen, B's too."""
    svc = token("svc")
    grant = await a.admit(svc, None, MAX_WAIT)
    assert isinstance(grant, SlotGrant)
    on_a = asyncio.ensure_future(a.admit(svc, None, MAX_WAIT))
    on_b = asyncio.ensure_future(b.admit(svc, None, MAX_WAIT))
    await eventually(lambda: queued(a), "a request queued on A", 5.0)
    await eventually(lambda: queued(b), "a request queued on B", 5.0)
    grant.sent(429, {"Retry-After": "60"})
    refused_a = await asyncio.wait_for(on_a, 0.1)  # this replica: at once, as before
    assert isinstance(refused_a, Refusal) and refused_a.reason == "upstream_frozen"
    started = time.monotonic()
    try:
        refused_b = await asyncio.wait_for(on_b, HEARD_WITHIN)
    except TimeoutError:
        pytest.fail(f"B's waiter still waits {HEARD_WITHIN}s after A's freeze")
    assert isinstance(refused_b, Refusal)
    assert refused_b.reason == "upstream_frozen", refused_b
    assert 55 < refused_b.retry_after <= 60
    assert b.depth == 0
    assert time.monotonic() - started < HEARD_WITHIN


async def test_a_freeze_refuses_the_other_replicas_waiters_at_once(
    redis_client: Redis, prefix: str
) -> None:
    a, b = replica(redis_client, prefix), replica(redis_client, prefix)
    await a.restore()
    await b.restore()
    await freeze_reaches_the_other_replica(a, b)
    await a.close()
    await b.close()


async def test_the_freeze_listener_survives_a_redis_restart_and_stops_when_closed(
    redis_server: tuple[int, list[subprocess.Popen[bytes]]],  # noqa: F811
    tmp_path: Path,
    prefix: str,
) -> None:
    """Redis restarts (empty) and, later, drops every subscriber's connection: each
    replica listens again by itself and still hears the next freeze at once. Closed, no
    replica listens any more and no task of theirs is left."""
    port, procs = redis_server
    start_redis(port, procs, tmp_path)
    client = open_redis(f"redis://127.0.0.1:{port}/0", RedisOptions(timeout_seconds=0.5))
    await wait_redis(client, up=True)
    a, b = replica(client, prefix), replica(client, prefix)
    await a.restore()
    await b.restore()
    await eventually(lambda: listening(client, prefix, 2), "both replicas listen", 5.0)
    await restart_empty(port, procs, tmp_path)
    await eventually(lambda: listening(client, prefix, 2), "both listen again", 10.0)
    # The connections drop while Redis stays up: the client reconnects and subscribes by
    # itself, and a freeze published before it did is read from Redis then.
    await client.client_kill_filter(_type="pubsub")
    await freeze_reaches_the_other_replica(a, b)
    await a.close()
    await b.close()
    await eventually(lambda: listening(client, prefix, 0), "nobody listens once closed", 5.0)
    for lane in (a, b):
        source = lane.source
        assert isinstance(source, RedisSlots)
        assert source._link.listener is not None and source._link.listener.done()
        assert not source._link.tasks, "a task of a closed source is left"
    await client.aclose()


async def test_a_lost_subscription_starts_the_fallback_before_any_reservation(
    redis_server: tuple[int, list[subprocess.Popen[bytes]]],  # noqa: F811
    tmp_path: Path,
    prefix: str,
) -> None:
    """Redis goes away while a replica makes no call (its window is full for 8 s): the
    freeze listener's broken subscription is the first sign, and the replica falls back at
    once, from a view as old as its last answer, instead of at its next reservation or
    idle refresh (5 s), by which time the windows have turned and the blind margin counts
    what freed meanwhile as spent (tests/bench/outage.py measures what that costs)."""
    port, procs = redis_server
    start_redis(port, procs, tmp_path)
    client = open_redis(f"redis://127.0.0.1:{port}/0", RedisOptions(timeout_seconds=0.5))
    await wait_redis(client, up=True)
    lane = replica(client, prefix)
    await lane.restore()
    await eventually(lambda: listening(client, prefix, 1), "the replica listens", 5.0)
    assert isinstance(await lane.take(time.time()), SlotGrant)
    source = lane.source
    assert isinstance(source, RedisSlots)
    procs[-1].terminate()
    procs[-1].wait(timeout=10)

    async def alone() -> bool:
        return not source.healthy

    await eventually(alone, "the replica fell back", 2.0)
    await lane.close()
    await client.aclose()


async def test_a_cancel_that_surfaces_as_a_timeout_still_stops_the_listener(
    redis_client: Redis, prefix: str
) -> None:
    """Closing cancels the listener; a cancel that meets a call's own timeout can come out
    as TimeoutError, an OSError, which the listener takes for an outage. It must stop all
    the same (``cancelling()``), or the link's close would wait for it forever."""

    class Converting:  # the Redis client, whose subscription turns the cancel into a timeout
        def __init__(self, real: Redis) -> None:
            self.real = real
            self.give_up = False  # the test's own way out, should the listener not stop

        def pubsub(self, **kwargs: object) -> object:
            return self.real.pubsub(**kwargs)

        async def get(self, key: str) -> object:
            if self.give_up:
                raise asyncio.CancelledError
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                raise TimeoutError from None
            return None

    losses: list[float] = []
    client = Converting(redis_client)
    listener = FreezeListener(
        client,  # type: ignore[arg-type]
        channel=f"{prefix}default:freezes",
        frozen_key=f"{prefix}default:frozen",
        replica="r1",
        name="default",
        heard=lambda until: None,
        spawn=lambda coro: None,
        lost=lambda: losses.append(time.time()),
    )
    task = asyncio.ensure_future(listener.run())
    await asyncio.sleep(0.3)  # subscribed, reading the freeze Redis holds
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5.0)
    if not done:  # stop it all the same, so that a failure does not hang the run
        client.give_up = True
        await asyncio.wait({task}, timeout=5.0)
    assert done, "the listener went on after its cancel"
    assert task.cancelled()
    assert losses == [], "a cancel is not an outage"
