"""The shared budget in a real Redis: one Lua reservation per send, across replicas, with
the configured failure mode while Redis is away and a journal replay when it is back.

Needs Redis on 127.0.0.1:6379 (fails, never skips, without it); the outage tests start
their own redis-server on a free port so that they can stop it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.budget.classes import ClassBook, ServiceClass
from proxy.budget.slots import StateUnavailable
from proxy.budget.windows import Limit
from proxy.state.redis.class_view import class_of_member, follow_classes
from proxy.state.redis.fallback import PROBE_INTERVAL
from proxy.state.redis.slots import RedisSlots
from tests.procs import eventually, free_ports

LIMITS = (Limit(5, 10.0), Limit(3, 1.0))


@pytest.fixture
def client(redis_client: Redis) -> Redis:
    return redis_client


@pytest.fixture
def prefix() -> str:
    return f"egw-test-{uuid.uuid4().hex[:10]}:"


def slots(client: Redis, prefix: str, **kw: object) -> RedisSlots:
    options: dict[str, object] = {"replicas": 2, "mode": "local"}
    options.update(kw)
    return RedisSlots("default", client, prefix, LIMITS, 0.0, **options)  # type: ignore[arg-type]


async def test_reservations_are_shared_across_replicas(client: Redis, prefix: str) -> None:
    a, b = slots(client, prefix), slots(client, prefix)
    now = time.time()
    taken = [await a.take(now), await b.take(now), await a.take(now), await b.take(now)]
    assert sum(s is not None for s in taken) == 3  # 3 per second, whichever replica asks
    assert a.retry_in(now) > 0 or b.retry_in(now) > 0
    assert await client.zcard(f"{prefix}default:sends") == 3


async def test_refused_attempts_record_nothing(client: Redis, prefix: str) -> None:
    a = slots(client, prefix)
    now = time.time()
    for _ in range(3):
        assert await a.take(now) is not None
    for _ in range(5):
        a._hint_until = 0.0  # ask Redis every time, not the local hint
        assert await a.take(now) is None
    assert await client.zcard(f"{prefix}default:sends") == 3


async def test_give_back_frees_the_slot(client: Redis, prefix: str) -> None:
    a = slots(client, prefix)
    now = time.time()
    got = [await a.take(now) for _ in range(3)]
    assert all(s is not None for s in got)
    first = got[0]
    assert first is not None
    a.give_back(first)
    await asyncio.gather(*a._link.tasks)
    assert await client.zcard(f"{prefix}default:sends") == 2
    assert await a.take(now) is not None


async def test_the_reserve_rule_is_checked_in_the_reservation_across_replicas(
    client: Redis, prefix: str
) -> None:
    # interactive holds 2 of the 5 per 10 s; replicas that keep no class view of their
    # own (RedisSlots alone, no lane): only reserve.lua can hold the line.
    table: Any = ("batch", [("interactive", [2]), ("batch", [0])], {})
    options: dict[str, Any] = {"replicas": 2, "mode": "local"}
    a, b = (RedisSlots("default", client, prefix, [Limit(5, 10.0)], 0.0, **options) for _ in "ab")
    a.class_table = b.class_table = table
    now = time.time()
    for replica in (a, b, a):
        assert await replica.take(now, cls="batch") is not None
    # 3 of 5 sent: what is free (2) no longer exceeds interactive's unused 2.
    assert await b.take(now, cls="batch") is None
    assert b.retry_in(now) == 0  # held back by a class, not the budget: others may go
    assert await b.take(now, cls="interactive") is not None
    assert await a.take(now, cls="interactive") is not None
    assert await a.take(now, cls="interactive") is None  # the window is full
    # Pace in the same step: a bucket of 2 that refills once a minute, across replicas.
    paced: Any = ("batch", [("batch", [0])], {"batch": [(2, 1 / 60)]})
    c, d = (RedisSlots("paced", client, prefix, [Limit(50, 10.0)], 0.0, **options) for _ in "cd")
    c.class_table = d.class_table = paced
    assert await c.take(now, cls="batch") is not None
    assert await d.take(now, cls="batch") is not None
    assert await c.take(now, cls="batch") is None  # the budget has 48 more; the pace none
    assert await d.take(now) is not None  # a send of no class: no pace to keep
    members = [m.decode() for m in await client.zrange(f"{prefix}default:sends", 0, -1)]
    assert sorted(m.rpartition("|")[2] for m in members) == ["batch"] * 3 + ["interactive"] * 2


def replicas_with_classes(
    client: Redis, prefix: str
) -> tuple[RedisSlots, RedisSlots, list[ClassBook]]:
    """Two replicas whose classes (interactive reserves 2 per 10 s, batch) follow Redis."""
    specs = [ServiceClass("interactive", reserve=(Limit(2, 10.0),)), ServiceClass("batch")]
    a, b = slots(client, prefix), slots(client, prefix)
    books = [ClassBook(specs, LIMITS, 0.0, "batch") for _ in "ab"]
    follow_classes(a, books[0])
    follow_classes(b, books[1])
    return a, b, books


async def test_each_replicas_classes_follow_every_replicas_sends(
    client: Redis, prefix: str
) -> None:
    a, b, books = replicas_with_classes(client, prefix)
    now = time.time()
    assert await a.take(now, cls="interactive") is not None
    assert await b.take(now, cls="batch") is not None  # its reply brings a's send along
    await a.refresh(now)  # a snapshot: the whole picture again
    for book, source in zip(books, (a, b), strict=True):
        views = book.views(now, source.budget)
        assert (views["interactive"][0].used, views["batch"][0].used) == (1, 1)
    assert class_of_member(b"abc:1|interactive") == "interactive"
    assert class_of_member(b"abc:2") is None


async def test_a_late_answer_moves_the_send_for_every_replica_and_its_class(
    client: Redis, prefix: str
) -> None:
    """Replica a's send is answered half a second late: Redis moves its score, and b, which
    knew it at its first time, moves it in its view and its classes when it reads it again."""
    a, b, books = replicas_with_classes(client, prefix)
    now = time.time()
    late = await a.take(now, cls="interactive")
    assert late is not None and late.ref is not None
    assert await b.take(now, cls="batch") is not None  # b knows a's send at its first time
    a.answered(late, now + 0.5)  # the guard is 0 here: it counts from now + 0.5
    await asyncio.gather(*a._link.tasks)
    assert await b.take(now, cls="batch") is not None  # its reply brings the moved send
    after = now + 10.2  # the sends made at `now` stop counting; the moved one still counts
    for book, source in zip(books, (a, b), strict=True):
        assert source._view.known[late.ref.encode()] == pytest.approx(now + 0.5, abs=0.05)
        assert book.views(after, source.budget)["interactive"][0].used == 1
        assert source.snapshot(after)[0].used == 1
    await a.close()
    await b.close()


async def test_sends_alone_keep_their_class_in_the_book_and_in_the_replay(
    client: Redis, prefix: str
) -> None:
    """While Redis is away a replica's own sends still count in the classes it keeps (the
    lane checks the reserve and the pace against the fallback's budget), and the journal
    puts each back under its class once Redis answers."""
    specs = [ServiceClass("interactive", reserve=(Limit(2, 10.0),)), ServiceClass("batch")]
    a = slots(client, prefix)
    book = ClassBook(specs, LIMITS, 0.0, "batch")
    follow_classes(a, book)
    await a.restore(time.time())
    assert await a.take(time.time(), cls="batch") is not None  # a fresh view
    a._link.went_down()  # as a failed call does: the replica decides alone
    assert not a.healthy
    now = time.time() + 1.5  # past the 1 s window the blind margin filled
    slot = await a.take(now, cls="interactive")
    assert slot is not None and (slot.ref or "").endswith("|interactive")
    assert book.views(now, a.budget)["interactive"][0].used == 1

    async def rejoined() -> bool:
        return a.healthy

    await eventually(rejoined, "the replica shares again", 5.0)
    members = [m.decode() for m in await client.zrange(f"{prefix}default:sends", 0, -1)]
    assert sorted(m.rpartition("|")[2] for m in members) == ["batch", "interactive"]
    await a.close()


async def test_external_use_and_freeze_reach_every_replica(client: Redis, prefix: str) -> None:
    a, b = slots(client, prefix), slots(client, prefix)
    now = time.time()
    assert await a.take(now) is not None
    a.observe(now, limit=5, remaining=1)  # echowin counts 4 in the 10 s window; we sent 1
    await asyncio.gather(*a._link.tasks)
    await b.refresh(time.time())
    views = b.snapshot(time.time())
    assert views[0].used == 4
    assert views[0].external == 3
    a.freeze(time.time() + 30)
    await asyncio.gather(*a._link.tasks)
    b._view.read_at = float("-inf")
    await b.refresh(time.time())
    frozen = b.frozen_until(time.time())
    assert frozen is not None
    assert frozen > time.time() + 25
    b._hint_until = 0.0
    assert await b.take(time.time()) is None  # Redis refuses during the freeze


async def test_keys_expire_on_their_own(client: Redis, prefix: str) -> None:
    a = slots(client, prefix)
    assert await a.take(time.time()) is not None
    ttl = await client.pttl(f"{prefix}default:sends")
    assert 0 < ttl <= 10_000


async def test_closed_mode_refuses_when_redis_is_unreachable(prefix: str) -> None:
    (port,) = free_ports(1)
    dead = Redis(host="127.0.0.1", port=port, socket_timeout=0.2, socket_connect_timeout=0.2)
    a = slots(dead, prefix, mode="closed")
    with pytest.raises(StateUnavailable):
        await a.take(time.time())
    assert a.healthy is False
    await a.close()
    await dead.aclose()


class Clock:
    """Wall-clock seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_local_mode_carries_on_with_a_share(prefix: str) -> None:
    (port,) = free_ports(1)
    dead = Redis(host="127.0.0.1", port=port, socket_timeout=0.2, socket_connect_timeout=0.2)
    clock = Clock()
    a = slots(dead, prefix, replicas=2, clock=clock)
    a._view.seen_at = clock.now  # it saw Redis empty a moment ago (a view of no age)
    # Knowing nothing, it assumes other replicas may have used what the tightest window
    # had free (3 per second) just before Redis went away: nothing now...
    assert await a.take(clock.now) is None
    assert a.healthy is False
    assert a.retry_in(clock.now) > 0.9
    # ...then, per window, its own sends count twice (2 replicas): 5 per 10 s less the 3
    # it assumed leaves room for exactly one send of its own.
    clock.now += 1.01
    taken = [await a.take(clock.now) for _ in range(3)]
    assert sum(s is not None for s in taken) == 1
    await a.close()
    await dead.aclose()


async def test_new_limits_while_alone_keep_this_replicas_sends(prefix: str) -> None:
    """A quota changed while Redis is away (``relimit``): the fallback keeps counting the
    sends this replica made alone and the others' it allowed for."""
    (port,) = free_ports(1)
    dead = Redis(host="127.0.0.1", port=port, socket_timeout=0.2, socket_connect_timeout=0.2)
    clock = Clock()
    a = slots(dead, prefix, replicas=2, clock=clock)
    a._view.seen_at = clock.now  # it saw Redis empty a moment ago (a view of no age)
    assert await a.take(clock.now) is None  # as above: Redis found away, room assumed used
    clock.now += 1.01
    assert await a.take(clock.now) is not None  # counted twice (2 replicas): 3 + 2 of 5
    await a.relimit([Limit(7, 10.0)], clock.now)  # raised, the per-second limit dropped
    taken = [await a.take(clock.now) for _ in range(3)]
    assert sum(s is not None for s in taken) == 1  # 3 + 2 of 7: one more (x2), not two
    await a.close()
    await dead.aclose()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """A private redis-server on a free port; the test may stop and restart it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    (port,) = free_ports(1)
    procs: list[subprocess.Popen[bytes]] = []
    yield port, procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def start_redis(port: int, procs: list[subprocess.Popen[bytes]], tmp: Path) -> None:
    binary = shutil.which("redis-server")
    assert binary is not None
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    procs.append(
        subprocess.Popen(
            [*args, "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    )


async def wait_redis(client: Redis, up: bool, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await client.ping()
            if up:
                return
        except Exception:
            if not up:
                return
        await asyncio.sleep(0.05)
    pytest.fail(f"redis did not become {'up' if up else 'down'} within {timeout}s")


async def test_a_restarted_empty_redis_gets_the_journal_back(
    redis_server: tuple[int, list[subprocess.Popen[bytes]]], tmp_path: Path, prefix: str
) -> None:
    port, procs = redis_server
    start_redis(port, procs, tmp_path)
    client = Redis(host="127.0.0.1", port=port, socket_timeout=0.3, socket_connect_timeout=0.3)
    await wait_redis(client, up=True)
    clock = Clock()
    a = slots(client, prefix, replicas=1, clock=clock)
    assert await a.take(clock.now) is not None
    assert await a.take(clock.now) is not None
    procs[0].kill()
    procs[0].wait(timeout=5)
    await wait_redis(client, up=False)
    # It notices at once. Others may have used what the tightest window had free (1 of
    # the 3 per second) just before Redis went away: that counts as sent now.
    assert await a.take(clock.now) is None
    clock.now += 1.01  # the 3-per-second window has room again
    # Alone, the 10 s window holds 2 + 1 of 5: two more sends of its own fit.
    alone = [await a.take(clock.now) for _ in range(4)]
    assert sum(s is not None for s in alone) == 2
    assert a.healthy is False
    start_redis(port, procs, tmp_path)  # comes back empty: it keeps nothing on disk
    deadline = time.monotonic() + 5 + PROBE_INTERVAL
    while not a.healthy and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert a.healthy, "the replica did not resume sharing by itself"
    assert await client.zcard(f"{prefix}default:sends") == 4  # every send it made is back
    await a.close()
    await client.aclose()


async def test_echowin_reports_reach_the_fallback_while_alone(prefix: str) -> None:
    (port,) = free_ports(1)
    dead = Redis(host="127.0.0.1", port=port, socket_timeout=0.2, socket_connect_timeout=0.2)
    clock = Clock()
    a = slots(dead, prefix, replicas=1, clock=clock)
    assert await a.take(clock.now) is None  # notices; the blind margin fills the 1 s window
    clock.now += 1.01
    # 5 per 10 s, 3 assumed: 2 would fit, but echowin says the window is already full.
    a.observe(clock.now, limit=5, remaining=0)
    assert await a.take(clock.now) is None
    await a.close()
    await dead.aclose()


async def test_a_freeze_set_while_alone_reaches_redis_when_it_is_back(
    redis_server: tuple[int, list[subprocess.Popen[bytes]]], tmp_path: Path, prefix: str
) -> None:
    port, procs = redis_server
    start_redis(port, procs, tmp_path)
    client = Redis(host="127.0.0.1", port=port, socket_timeout=0.3, socket_connect_timeout=0.3)
    await wait_redis(client, up=True)
    a = slots(client, prefix, replicas=1)
    assert await a.take(time.time()) is not None
    procs[0].kill()
    procs[0].wait(timeout=5)
    await wait_redis(client, up=False)
    assert await a.take(time.time()) is None or not a.healthy
    a.freeze(time.time() + 30)  # an upstream 429 while alone
    start_redis(port, procs, tmp_path)
    deadline = time.monotonic() + 5 + PROBE_INTERVAL
    while not a.healthy and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert a.healthy
    ttl = await client.pttl(f"{prefix}default:frozen")
    assert 20_000 < ttl <= 30_000  # every replica now sees the freeze
    await a.close()
    await client.aclose()


async def test_a_reservation_whose_caller_left_records_no_send(client: Redis, prefix: str) -> None:
    """A client hanging up while the reservation script runs: the script records the send,
    the caller is gone before it hears so; the send must not stay counted."""
    a = slots(client, prefix)
    ran, release = asyncio.Event(), asyncio.Event()
    real_call = a._link.call

    async def held_reply(op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        reply = await real_call(op, script, keys, args)
        ran.set()  # Redis has recorded it; the reply is on its way back
        await release.wait()
        return reply

    a._link.call = held_reply  # type: ignore[method-assign]
    taking = asyncio.ensure_future(a.take(time.time()))
    await ran.wait()
    assert await client.zcard(f"{prefix}default:sends") == 1
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking
    release.set()
    await eventually(
        lambda: _zcard_is(client, f"{prefix}default:sends", 0), "the send removed", 5.0
    )


async def _zcard_is(client: Redis, key: str, n: int) -> bool:
    return bool(await client.zcard(key) == n)
