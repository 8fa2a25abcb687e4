"""Edge cases of the Redis-shared budget (RedisSlots): a Redis that restarts empty behind a
reconnecting client, sends taken alone while the journal is replayed, slots given back or
reservations timed out while Redis is away, a freeze racing a refresh, and the fallback of a
replica whose view of the others is old."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.budget.windows import Limit
from proxy.state.redis import link as redis_link
from proxy.state.redis import slots as redis_slots
from proxy.state.redis.client import RedisOptions, open_redis
from proxy.state.redis.slots import RedisSlots
from tests.procs import eventually, free_ports
from tests.state.redis.test_slots import Clock, redis_server, start_redis, wait_redis  # noqa: F401

LIMITS = (Limit(5, 10.0), Limit(3, 1.0))


@pytest.fixture
def prefix() -> str:
    return f"egw-edges-{uuid.uuid4().hex[:10]}:"


def slots(client: Redis, prefix: str, limits: Any = LIMITS, **kw: Any) -> RedisSlots:
    options: dict[str, Any] = {"replicas": 2, "mode": "local"}
    options.update(kw)
    return RedisSlots("default", client, prefix, limits, 0.0, **options)


async def members_once_back(a: RedisSlots, client: Redis, prefix: str) -> list[bytes]:
    """Once ``a`` found Redis again (its probe has put back what it had to): the members of
    the shared set of sends."""
    async with asyncio.timeout(5):
        while not a.healthy:
            await asyncio.sleep(0.01)
    members: list[bytes] = await client.zrange(f"{prefix}default:sends", 0, -1)
    return members


async def restart_empty(port: int, procs: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """Kill the private redis-server and start it again: back, empty (nothing on disk)."""
    procs[0].kill()
    procs[0].wait(timeout=5)
    start_redis(port, procs, tmp_path)
    probe = Redis(host="127.0.0.1", port=port, socket_timeout=0.3, socket_connect_timeout=0.3)
    await wait_redis(probe, up=True)
    await probe.aclose()


async def test_a_redis_restarted_empty_behind_a_reconnecting_client_forgets_nothing(
    redis_server: tuple[int, list[subprocess.Popen[bytes]]],  # noqa: F811
    tmp_path: Path,
    prefix: str,
) -> None:
    """The production client (open_redis) reconnects on its own after a Redis restart, so
    no call fails and the replica never goes down. The state's epoch tells it that Redis
    lost the sends: it puts back what it knows before it reserves again, and the restarted,
    empty Redis does not grant the full window a second time."""
    port, procs = redis_server
    start_redis(port, procs, tmp_path)
    client = open_redis(f"redis://127.0.0.1:{port}/0", RedisOptions(timeout_seconds=0.5))
    await wait_redis(client, up=True)
    a = slots(client, prefix, (Limit(3, 30.0),), replicas=1)
    now = time.time()
    assert [await a.take(now) is not None for _ in range(3)] == [True] * 3
    await restart_empty(port, procs, tmp_path)
    a._hint_until = 0.0
    # The 30 s window is full: 3 sends a moment ago.
    assert await a.take(time.time()) is None, "the restarted Redis granted a 4th send"
    await a.close()
    await client.aclose()


async def test_sends_taken_alone_while_the_journal_is_replayed_reach_redis(
    client_6379: Redis, prefix: str
) -> None:
    """Redis comes back; the probe replays the journal, then carries the freeze over. A
    send taken alone between the replay and `healthy = True` reaches Redis too (the probe
    replays again until a round finds no new send), so the other replicas count it."""
    clock = Clock()
    a = slots(client_6379, prefix, replicas=1, clock=clock)
    assert await a.take(clock.now) is not None  # a current view of the shared state
    real_call = a._link.call
    down = True

    async def flaky(op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        if down:
            raise ConnectionError("Redis is away")
        return await real_call(op, script, keys, args)

    a._link.call = flaky  # type: ignore[method-assign]
    assert await a.take(clock.now) is None  # goes down; the blind margin fills 1 s
    assert a.healthy is False
    clock.now += 1.01  # 1 + 2 assumed of 5 in 10 s: room for this replica's send
    replayed, go_on = asyncio.Event(), asyncio.Event()
    real_carry = a._link.carry_freeze

    async def slow_carry() -> None:  # one more round trip to Redis, held open
        replayed.set()
        await go_on.wait()
        await real_carry()

    a._link.carry_freeze = slow_carry  # type: ignore[method-assign]
    down = False
    await asyncio.wait_for(replayed.wait(), 5)
    late = await a.take(clock.now)  # alone still: healthy is not yet True
    assert late is not None
    go_on.set()
    members = await members_once_back(a, client_6379, prefix)
    assert late.ref is not None
    assert late.ref.encode() in members, "a send made alone never reached the shared set"
    await a.close()


@pytest.fixture
async def client_6379(redis_client: Redis) -> Redis:
    return redis_client


def _switchable(a: RedisSlots) -> dict[str, bool]:
    """Makes the reservation/snapshot scripts of ``a`` fail while state['down']."""
    state = {"down": False}
    real_call = a._link.call

    async def call(op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        if state["down"]:
            raise ConnectionError("Redis is away")
        return await real_call(op, script, keys, args)

    a._link.call = call  # type: ignore[method-assign]
    return state


async def test_a_slot_given_back_while_redis_is_away_is_not_kept_in_redis(
    client_6379: Redis, prefix: str
) -> None:
    """A slot reserved in Redis, then Redis is away (a blip) when its request fails before
    a byte left: it is removed from Redis once Redis is back, not counted by every replica
    for the whole window (an hour at echowin's limits)."""
    a = slots(client_6379, prefix, (Limit(3, 30.0),), replicas=1)
    state = _switchable(a)
    slot = await a.take(time.time())
    assert slot is not None and slot.ref is not None
    state["down"] = True
    await a.take(time.time())  # notices
    assert a.healthy is False
    a.give_back(slot)  # the request never left
    state["down"] = False
    members = await members_once_back(a, client_6379, prefix)
    assert slot.ref.encode() not in members, "the slot given back still counts in Redis"
    await a.close()


async def test_a_stale_view_does_not_let_the_fallback_overspend(
    client_6379: Redis, prefix: str
) -> None:
    """The fallback's blind margin bounds the others' sends since this replica's last
    answer from Redis, however old: a window shorter than that gap may have turned over
    several times. Here B fills the 10 s window (5) in 2-per-0.3 s steps after A last
    looked; A, alone, must not make a 6th send in 10 s."""
    limits = (Limit(5, 10.0), Limit(2, 0.3))
    clock = Clock()
    a = slots(client_6379, prefix, limits, replicas=2, clock=clock)
    b = slots(client_6379, prefix, limits, replicas=2)
    state = _switchable(a)
    clock.now = time.time()
    assert await a.take(clock.now) is not None  # A's last look at the shared state
    sent = 0
    for _ in range(100):  # B sends 4 more, as the 0.3 s window lets it
        now = time.time()
        if await b.take(now) is not None:
            sent += 1
            if sent == 4:
                break
        else:
            await asyncio.sleep(min(max(b.retry_in(now), 0.01), 0.35))
    assert sent == 4
    assert await client_6379.zcard(f"{prefix}default:sends") == 5  # the 10 s window is full
    state["down"] = True
    clock.now = time.time()
    assert await a.take(clock.now) is None  # Redis away: A carries on alone
    assert a.healthy is False
    clock.now += 0.31  # the 0.3 s window has room again; the 10 s one never had
    assert await a.take(clock.now) is None, "a 6th send in 10 s"
    await a.close()
    await b.close()


async def test_a_replica_that_never_saw_redis_assumes_every_window_may_be_full(
    prefix: str,
) -> None:
    """A replica started while Redis is away knows nothing of the others' sends: the last
    10 s may hold 5 of them (3 per second at most). It may not send in that window."""
    (port,) = free_ports(1)
    dead = Redis(host="127.0.0.1", port=port, socket_timeout=0.2, socket_connect_timeout=0.2)
    clock = Clock()
    a = slots(dead, prefix, replicas=2, clock=clock)
    assert await a.take(clock.now) is None
    assert a.healthy is False
    clock.now += 1.01
    assert [await a.take(clock.now) for _ in range(3)] == [None] * 3
    await a.close()
    await dead.aclose()


async def test_a_freeze_survives_a_refresh_that_read_redis_before_it(
    client_6379: Redis, prefix: str
) -> None:
    """An upstream 429 freezes the view at once; the freeze reaches Redis in background. A
    refresh that read Redis before then keeps the local freeze, so when the freeze's own
    write fails (Redis away) the fallback built from that view does not send during it."""
    clock = Clock()
    a = slots(client_6379, prefix, replicas=1, clock=clock)
    assert await a.take(clock.now) is not None
    read, deliver = asyncio.Event(), asyncio.Event()
    real_call = a._link.call

    async def held(op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        reply = await real_call(op, script, keys, args)
        if op == "snapshot":
            read.set()
            await deliver.wait()
        return reply

    a._link.call = held  # type: ignore[method-assign]
    writing = asyncio.Event()

    async def freeze_fails(keys: list[str], args: list[Any]) -> Any:
        await writing.wait()
        raise ConnectionError("Redis is away")

    a._scripts.freeze = freeze_fails  # type: ignore[assignment]
    a._view.read_at = float("-inf")
    refreshing = asyncio.ensure_future(a.refresh(clock.now))
    await asyncio.wait_for(read.wait(), 5)  # Redis has answered: no freeze yet
    a.freeze(clock.now + 60)  # the 429
    deliver.set()
    await refreshing
    writing.set()
    await asyncio.gather(*a._link.tasks)  # the freeze write fails: Redis is away
    assert a.healthy is False
    clock.now += 5  # every window has room again; the freeze holds for 55 s more
    assert a.frozen_until(clock.now) is not None, "the freeze was forgotten"
    assert await a.take(clock.now) is None, "sent during the freeze"
    await a.close()


async def test_a_reservation_that_timed_out_after_redis_ran_it_is_not_kept(
    client_6379: Redis, prefix: str
) -> None:
    """A command timeout (the socket timeout) after the script ran: the send is recorded
    in Redis, the replica counts it as failed and goes on alone with another member. The
    first one never leaves, so it is removed from Redis once Redis answers again."""
    from redis.exceptions import TimeoutError as RedisTimeout

    a = slots(client_6379, prefix, (Limit(3, 30.0),), replicas=1)
    assert await a.take(time.time()) is not None  # a current view
    real_call = a._link.call
    lost: list[str] = []

    async def late(op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        await real_call(op, script, keys, args)
        lost.append(args[0])
        raise RedisTimeout("Timeout reading from socket")

    a._link.call = late  # type: ignore[method-assign]
    await a.take(time.time())
    assert a.healthy is False and lost
    a._link.call = real_call  # type: ignore[method-assign]
    members = await members_once_back(a, client_6379, prefix)
    assert lost[0].encode() not in members, "a reservation nobody used still counts"
    await a.close()


async def test_a_view_some_short_windows_old_bounds_the_others_by_those_windows(
    client_6379: Redis, prefix: str
) -> None:
    """Last answer from Redis 3 s ago, limits 10 per 10 s and 2 per 1 s: in those 3 s the
    others sent at most 2 x 3 = 6 (the 1 s window turned over 3 times), fewer than the
    10 s window had free (9). So the fallback counts 6 in it, not all 9: after the 1 s
    window turns, this replica (2 replicas: each own send counts twice) has one send."""
    limits = (Limit(10, 10.0), Limit(2, 1.0))
    clock = Clock()
    a = slots(client_6379, prefix, limits, replicas=2, clock=clock)
    state = _switchable(a)
    assert await a.take(clock.now) is not None  # the last answer from Redis
    clock.now += 3.0
    state["down"] = True
    assert await a.take(clock.now) is None  # away: the 1 s window counts as full
    assert a.healthy is False
    assert [v.used for v in a.snapshot(clock.now)] == [1 + 6, 2]
    clock.now += 1.01
    assert await a.take(clock.now) is not None  # 7 + 2 of 10
    assert await a.take(clock.now) is None  # 9 + 2 would pass 10
    await a.close()


async def test_an_idle_replica_reads_the_shared_view_by_itself(
    client_6379: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without requests nothing reads Redis, and a fallback built on an old view must count
    every window as full: restore starts a refresh that keeps the view at most
    VIEW_MAX_IDLE old, and sees the other replicas' sends."""
    monkeypatch.setattr(redis_link, "VIEW_MAX_IDLE", 0.01)
    clock = Clock()
    a = slots(client_6379, prefix, replicas=2, clock=clock)
    b = slots(client_6379, prefix, replicas=2)
    await a.restore(clock.now)
    assert await b.take(time.time()) is not None
    clock.now += 60.0  # a minute without a request (Redis' clock places b's send)
    async with asyncio.timeout(5):
        while a._view.seen_at < clock.now:
            await asyncio.sleep(0.005)
    assert [v.used for v in a.snapshot(clock.now)] == [1, 1]  # b's send, made since
    await a.close()
    await b.close()


async def test_a_view_kept_for_a_while_is_read_only_while_in_use(
    client_6379: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``keep_view`` (a token's quota): the idle refresh reads the shared view while this
    replica reserved within ``keep_view``, then stops reading Redis, and the next
    reservation starts it again. Counted through the latency hook (the metric's source)."""
    monkeypatch.setattr(redis_link, "VIEW_MAX_IDLE", 0.02)
    monkeypatch.setattr(redis_slots, "MIRROR_MAX_AGE", 0.005)  # below a tick
    reads: Counter[str] = Counter()
    a = slots(client_6379, prefix, keep_view=0.2, on_latency=lambda op, seconds: reads.update([op]))

    async def read_again() -> bool:
        mark = reads["snapshot"]
        async with asyncio.timeout(2):
            while reads["snapshot"] < mark + 3:
                await asyncio.sleep(0.005)
        return True

    await a.restore(time.time())
    await read_again()  # in use: restored just now
    await eventually(lambda: _quiet_for(reads, 0.1), "the idle refresh stopped", 5.0)
    assert await a.take(time.time()) is not None  # in use again
    await read_again()
    await a.close()


async def _quiet_for(reads: Counter[str], seconds: float) -> bool:
    """No snapshot read during ``seconds`` (5 ticks of VIEW_MAX_IDLE here)."""
    mark = reads["snapshot"]
    await asyncio.sleep(seconds)
    return reads["snapshot"] == mark


async def test_a_refresh_after_an_empty_restart_puts_back_the_others_sends(
    redis_server: tuple[int, list[subprocess.Popen[bytes]]],  # noqa: F811
    tmp_path: Path,
    prefix: str,
) -> None:
    """B fills the window and A learns it (refused). Redis restarts empty. A's first call
    after it is a refresh (a lane refreshes after a refusal; an idle replica every few
    seconds): the view it reads is empty, but the epoch says Redis lost the state, so A
    puts back B's sends too before it takes the empty view, and the window stays full."""
    port, procs = redis_server
    start_redis(port, procs, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    ca = open_redis(url, RedisOptions(timeout_seconds=0.5))
    cb = open_redis(url, RedisOptions(timeout_seconds=0.5))
    await wait_redis(ca, up=True)
    a = slots(ca, prefix, (Limit(3, 30.0),))
    b = slots(cb, prefix, (Limit(3, 30.0),))
    assert [await b.take(time.time()) is not None for _ in range(3)] == [True] * 3
    assert await a.take(time.time()) is None  # refused: A knows B's 3
    await restart_empty(port, procs, tmp_path)
    now = time.time()
    assert await a.take(now) is None  # the hint: no call to Redis
    await a.refresh(now)
    assert await a.take(time.time()) is None, "a 4th send in the 30 s window"
    assert await ca.zcard(f"{prefix}default:sends") == 3
    for source in (a, b):
        await source.close()
    for client in (ca, cb):
        await client.aclose()


async def test_a_slot_given_back_while_pending_removals_are_sent_is_removed_too(
    client_6379: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removals of slots given back while Redis was away are sent when it is back; one
    more given back during one of them is sent too, not dropped from the list unsent."""
    a = slots(client_6379, prefix, (Limit(10, 30.0),), replicas=1)
    first, second = await a.take(time.time()), await a.take(time.time())
    assert first is not None and first.ref is not None
    assert second is not None and second.ref is not None
    a._journal.pending_release.append(first.ref)  # given back while Redis was away
    real = client_6379.zrem
    removing = asyncio.Event()

    async def zrem(key: str, *members: str) -> Any:
        removing.set()
        await asyncio.sleep(0)
        return await real(key, *members)

    monkeypatch.setattr(client_6379, "zrem", zrem)
    pending = asyncio.ensure_future(a._journal.release_pending())
    await removing.wait()
    a._journal.pending_release.append(second.ref)  # another one, during the first removal
    await pending
    left = await client_6379.zrange(f"{prefix}default:sends", 0, -1)
    assert (first.ref.encode() in left, second.ref.encode() in left) == (False, False)
    assert a._journal.pending_release == []
    await a.close()


async def test_an_epoch_change_whose_refill_fails_is_not_a_fresh_view(
    client_6379: Redis, prefix: str
) -> None:
    """Redis answers -1 (another epoch), and putting back what we know fails: nothing was
    learned, so the fallback treats the view as old as it is (3 s: the 1 s window may have
    let 2 x 3 through), not as fresh."""
    clock = Clock()
    a = slots(client_6379, prefix, (Limit(5, 10.0), Limit(2, 1.0)), replicas=2, clock=clock)
    assert await a.take(clock.now) is not None  # the last real view
    clock.now += 3.0

    async def new_epoch(op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        return [-1, b"0", f"{clock.now + a._view.offset:.6f}".encode(), [], b"another"]

    async def replay_fails(offset: float, now: float, others: Any = None) -> None:
        raise ConnectionError("Redis is away again")

    a._link.call = new_epoch  # type: ignore[method-assign]
    a._journal.replay = replay_fails  # type: ignore[method-assign]
    assert await a.take(clock.now) is None
    assert a.healthy is False
    clock.now += 1.01
    assert await a.take(clock.now) is None, "1 + up to 4 unseen + this one: 6 in 10 s"
    await a.close()
