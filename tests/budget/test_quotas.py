"""A token's own quota (``--hourly``, ``--per-minute``) kept in the gateway's state: the
schedulers of several processes (``serve --workers``: one SQLite file; replicas: one Redis)
grant it once between them, and a restart remembers it. Each ``Scheduler`` here is one
process, built as proxy/runtime.py builds it; the credential's own budget is huge and
local (not the subject). Redis: the real server on 127.0.0.1:6379 (fails, never skips,
without it). Redis decides with its own clock, so every test stays inside one minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from proxy.auth.tokens import TokenRecord, mint_token
from proxy.budget.admission import AdmitRequest, Refusal
from proxy.budget.grants import SlotGrant
from proxy.budget.lane import Lane, QueuePolicy
from proxy.budget.local_slots import LocalSlots
from proxy.budget.quotas import QuotaSources, local_quota_source
from proxy.budget.scheduler import Scheduler
from proxy.budget.slots import SlotSource
from proxy.budget.windows import Limit
from proxy.state.memory import MemorySendLog, memory_quota_sources
from proxy.state.redis import link as redis_link
from proxy.state.redis import slots as redis_budget
from proxy.state.redis.slots import RedisSlots
from proxy.state.sqlite.sends import SqliteSendLog
from tests.budget.test_scheduler import Recorder
from tests.conftest import GatewayHandle
from tests.state.test_slot_contract import scratch_redis
from tests.state.test_slot_contract import settle as settle_source

CREDENTIAL = "default"
HUGE = Limit(1_000_000, 60.0)


class Processes:
    """Schedulers on one shared state, one per simulated process; closes them all."""

    def __init__(self, kind: str, tmp_path: Path, redis: Redis | None, prefix: str) -> None:
        self.kind = kind
        self.db = tmp_path / "state.db"
        self.redis = redis
        self.prefix = prefix
        self.schedulers: list[Scheduler] = []
        self.logs: list[SqliteSendLog] = []

    async def start(self, lane_limit: Limit = HUGE) -> Scheduler:
        log: SqliteSendLog | None = None
        if self.kind == "sqlite":
            log = await SqliteSendLog.open(self.db)
            self.logs.append(log)

        def quota_source(name: str, limits: tuple[Limit, ...]) -> SlotSource:
            if log is not None:
                return local_quota_source(name, limits, log)  # as proxy/runtime.py does
            assert self.redis is not None
            return RedisSlots(name, self.redis, self.prefix, limits, 0.0, replicas=2, mode="local")

        return self.track(scheduler_on(quota_source, lane_limit))

    def track(self, scheduler: Scheduler) -> Scheduler:
        self.schedulers.append(scheduler)
        return scheduler

    async def close(self) -> None:
        for scheduler in self.schedulers:
            await scheduler.close()
        for log in self.logs:
            await log.close()


def scheduler_on(quotas: QuotaSources | None, lane_limit: Limit = HUGE) -> Scheduler:
    """One process's scheduler: token quotas from ``quotas`` (None: in memory, as with
    ``memory://``), the credential's budget (the lane) local and calibrated (no probe)."""
    policy = QueuePolicy(max_wait=0.0, max_depth=100, max_depth_per_token=50)
    observer = Recorder()
    lane = Lane(CREDENTIAL, [lane_limit], 0.0, MemorySendLog(), policy, observer)
    lane.calibrated = True
    sources = memory_quota_sources() if quotas is None else quotas
    return Scheduler({CREDENTIAL: lane}, policy, observer, quota_sources=sources)


@pytest.fixture(params=["sqlite", "redis"])
async def processes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Processes]:
    async with AsyncExitStack() as stack:
        redis, prefix = None, ""
        if request.param == "redis":
            redis, prefix = await stack.enter_async_context(scratch_redis())
        procs = Processes(request.param, tmp_path, redis, prefix)
        stack.push_async_callback(procs.close)
        yield procs


def capped(per_minute: int) -> TokenRecord:
    return mint_token(name="capped", scopes=("*",), now=0.0, per_minute=per_minute).record


async def admit(scheduler: Scheduler, token: TokenRecord) -> SlotGrant | Refusal:
    result = await scheduler.admit(AdmitRequest(token, CREDENTIAL, "/v1/contacts", max_wait=0.0))
    assert isinstance(result, SlotGrant | Refusal)
    return result


async def granted(scheduler: Scheduler, token: TokenRecord, count: int) -> list[bool]:
    """``count`` requests one after another: which were granted."""
    return [isinstance(await admit(scheduler, token), SlotGrant) for _ in range(count)]


def age_views(scheduler: Scheduler) -> None:
    """Make the quota sources' views of the shared state due for a re-read (they re-read
    it at most every 50 ms (SQLite) / 100 ms (Redis))."""
    for quota in scheduler.quotas.in_use.values():
        source = quota.source
        if isinstance(source, RedisSlots):
            source._view.read_at = -math.inf
        else:
            assert isinstance(source, LocalSlots)
            source._polled = -math.inf


async def settle(scheduler: Scheduler) -> None:
    """Wait for the quota sources' background writes (a charge given back)."""
    for quota in scheduler.quotas.in_use.values():
        await settle_source(quota.source)


async def test_two_processes_grant_a_quota_once_between_them(processes: Processes) -> None:
    a, b = await processes.start(), await processes.start()
    token = capped(3)
    results = [await admit(scheduler, token) for scheduler in (a, b) * 4]
    grants = [r for r in results if isinstance(r, SlotGrant)]
    refused = [r for r in results if isinstance(r, Refusal)]
    assert len(grants) == 3
    assert {r.reason for r in refused} == {"token_quota"}
    assert all(0 < r.retry_after <= 60 for r in refused)
    # Both processes granted: the quota was shared, not used up by the first alone.
    assert grants[0].lane is not grants[1].lane


async def test_a_quota_outlives_a_restart(processes: Processes) -> None:
    token = capped(3)
    first = await processes.start()
    assert await granted(first, token, 2) == [True, True]
    await first.close()
    restarted = await processes.start()
    assert isinstance(await admit(restarted, token), SlotGrant)
    refusal = await admit(restarted, token)
    assert isinstance(refusal, Refusal) and refusal.reason == "token_quota"


async def test_a_charge_given_back_is_free_for_every_process(processes: Processes) -> None:
    a, b = await processes.start(), await processes.start()
    token = capped(2)
    grants = [await admit(a, token), await admit(b, token)]
    assert all(isinstance(g, SlotGrant) for g in grants)
    assert isinstance(await admit(b, token), Refusal)
    first = grants[0]
    assert isinstance(first, SlotGrant)
    first.unsent()  # a's request never reached echowin: its charge comes back
    await settle(a)
    age_views(b)
    assert isinstance(await admit(b, token), SlotGrant)
    assert isinstance(await admit(a, token), Refusal)


async def test_a_changed_quota_counts_what_was_already_sent(processes: Processes) -> None:
    a = await processes.start()
    token = capped(3)
    assert await granted(a, token, 4) == [True, True, True, False]
    raised = dataclasses.replace(token, per_minute=5)  # the admin API raised it to 5
    assert await granted(a, raised, 3) == [True, True, False]
    lowered = dataclasses.replace(token, per_minute=None)  # and then took it away
    assert isinstance(await admit(a, lowered), SlotGrant)
    assert token.id not in a.quotas.in_use


async def test_charges_made_before_a_change_are_given_back_after_it(
    processes: Processes,
) -> None:
    a = await processes.start()
    token = capped(3)
    in_flight = [await admit(a, token) for _ in range(3)]
    raised = dataclasses.replace(token, per_minute=4)
    last = await admit(a, raised)
    assert isinstance(last, SlotGrant)
    for grant in in_flight:  # charged before the change; they never reached echowin
        assert isinstance(grant, SlotGrant)
        grant.unsent()
    await settle(a)
    age_views(a)
    assert await granted(a, raised, 4) == [True, True, True, False]


async def test_two_limits_at_first_use_make_one_source(processes: Processes) -> None:
    """Requests of one token with its old and new limits meet at the quota's first use
    (a cached record and a fresh one): one source, every charge counted once."""
    a = await processes.start()
    old = capped(3)
    new = dataclasses.replace(old, per_minute=2)
    results = await asyncio.gather(admit(a, old), admit(a, new), admit(a, old))
    grants = sum(isinstance(r, SlotGrant) for r in results)
    assert grants >= 2
    quota = a.quotas.in_use[old.id]
    await quota.ready
    assert [v.used for v in quota.source.snapshot(a.clock())] == [grants]
    await a.close()
    restarted = await processes.start()
    assert await granted(restarted, new, 1) == [False]  # the state holds both charges


async def test_no_process_holds_back_part_of_a_quota(processes: Processes) -> None:
    """A quota large enough for the credentials' leases (blocks of slots reserved ahead)
    is still granted whole when its token's requests move to another process."""
    a, b = await processes.start(), await processes.start()
    token = dataclasses.replace(capped(1), per_minute=None, hourly=1000)
    assert await granted(a, token, 1) == [True]  # then a never sees the token again
    got = await granted(b, token, 1000)
    assert got.count(True) == 999 and got[-1] is False


async def test_a_request_the_budget_refuses_at_once_is_not_charged(
    processes: Processes,
) -> None:
    a = await processes.start(lane_limit=Limit(1, 60.0))
    token = capped(5)
    assert await granted(a, token, 1) == [True]
    for _ in range(20):  # a flood the credential's budget refuses
        refusal = await admit(a, token)
        assert isinstance(refusal, Refusal) and refusal.reason == "upstream_budget"
    await settle(a)
    source = a.quotas.in_use[token.id].source
    assert [v.used for v in source.snapshot(a.clock())] == [1]
    # The first refusal was charged and given back (the lane learnt then that it refuses
    # until the window moves): a row each; the 19 after it wrote nothing.
    if processes.kind == "sqlite":
        with contextlib.closing(sqlite3.connect(processes.db)) as conn:
            (rows,) = conn.execute(
                "SELECT COUNT(*) FROM send_rows WHERE credential = ?", (source.name,)
            ).fetchone()
        assert rows == 1 + 2


class FailingLog(MemorySendLog):
    """A durable-looking log whose first read fails, as a locked or broken file would."""

    durable = True

    def __init__(self) -> None:
        self.failures = 1

    async def recent(self, credential: str, since: float) -> list[float]:
        await asyncio.sleep(0)
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return []


async def test_a_quota_that_cannot_be_read_refuses_with_503_then_recovers() -> None:
    log = FailingLog()
    scheduler = scheduler_on(lambda name, limits: local_quota_source(name, limits, log))
    token = capped(5)
    first = await asyncio.gather(admit(scheduler, token), admit(scheduler, token))
    assert [(r.status, r.reason) for r in first if isinstance(r, Refusal)] == [
        (503, "state_unavailable"),
        (503, "state_unavailable"),
    ]
    assert isinstance(await admit(scheduler, token), SlotGrant)  # read again, and fine
    await scheduler.close()


async def test_a_changed_quota_in_memory_counts_what_was_already_sent() -> None:
    scheduler = scheduler_on(None)  # memory://: nothing to read back, the view is carried
    token = capped(3)
    assert await granted(scheduler, token, 4) == [True, True, True, False]
    raised = dataclasses.replace(token, per_minute=5, hourly=4)
    assert await granted(scheduler, raised, 2) == [True, False]  # the hour has 3 of 4
    await scheduler.close()


async def test_a_spent_quota_refuses_as_itself_while_the_budget_refuses_too(
    processes: Processes,
) -> None:
    """The quota comes first: once the credential's budget refuses at once (and charging
    is skipped), a token whose own quota is spent still hears ``token_quota`` and its
    Retry-After, not the budget's."""
    a = await processes.start(lane_limit=Limit(1, 60.0))
    capped_hourly = dataclasses.replace(capped(1), per_minute=None, hourly=1)
    assert await granted(a, capped_hourly, 1) == [True]  # the lane's slot and the quota
    plain = mint_token(name="plain", scopes=("*",), now=0.0).record
    lane_refusal = await admit(a, plain)
    assert isinstance(lane_refusal, Refusal) and lane_refusal.reason == "upstream_budget"
    refusal = await admit(a, capped_hourly)
    assert isinstance(refusal, Refusal)
    assert (refusal.reason, refusal.retry_after > 3000) == ("token_quota", True)


async def test_a_charge_given_back_while_the_quota_changes_is_freed(tmp_path: Path) -> None:
    log = await SqliteSendLog.open(tmp_path / "state.db")
    source = local_quota_source("quota:t", [Limit(3, 60.0)], log)
    now = time.time()
    slots = [await source.take(now) for _ in range(2)]
    changing = asyncio.ensure_future(source.relimit([Limit(5, 60.0)], now))
    await asyncio.sleep(0)  # the rebuild is reading the log ...
    assert source._held is not None and not changing.done()
    first = slots[0]
    assert first is not None
    source.give_back(first)  # ... when a request that never left gives its charge back
    await changing
    await source.close()
    assert [v.used for v in source.snapshot(now)] == [1]
    assert len(await log.recent("quota:t", now - 60)) == 1  # and the log agrees
    await log.close()


class StalledLog(MemorySendLog):
    """A durable-looking log whose reads never finish (a file locked for good)."""

    durable = True

    def __init__(self) -> None:
        self.reads_cancelled = 0

    async def recent(self, credential: str, since: float) -> list[float]:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.reads_cancelled += 1
            raise
        return []


async def test_closing_stops_a_quota_still_being_read_and_changed() -> None:
    log = StalledLog()
    scheduler = scheduler_on(lambda name, limits: local_quota_source(name, limits, log))
    token = capped(3)
    waiting = [
        asyncio.ensure_future(admit(scheduler, token)),  # its quota's first read stalls
        asyncio.ensure_future(admit(scheduler, dataclasses.replace(token, per_minute=5))),
    ]
    for _ in range(5):
        await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    await scheduler.close()
    # Bounded: a read left running would keep the first request waiting for good.
    await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    assert log.reads_cancelled == 1  # the first read too, not only the change after it


IDLE_TOKENS = 60
SNAPSHOTS = re.compile(
    r'^echowin_gateway_state_backend_duration_seconds_count\{operation="snapshot"\} (\S+)$', re.M
)


async def test_idle_token_quotas_on_redis_do_not_read_redis_every_tick(
    make_gateway: Callable[..., Awaitable[GatewayHandle]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real gateway on Redis, 60 tokens with a quota, one request each, then none: a
    quota's view is kept fresh only while its token is in use here (QUOTA_IN_USE), so the
    idle tokens cost no Redis call per refresh tick; only the credentials' views (3 here,
    kept fresh always) are read. Counted by the gateway's own metric of snapshot reads."""
    monkeypatch.setattr(redis_link, "VIEW_MAX_IDLE", 0.05)  # one tick
    monkeypatch.setattr(redis_budget, "MIRROR_MAX_AGE", 0.01)  # below a tick
    monkeypatch.setattr(redis_budget, "QUOTA_IN_USE", 0.2)
    async with scratch_redis() as (_, prefix):
        gateway = await make_gateway(state="redis://127.0.0.1:6379/0", redis={"key_prefix": prefix})
        lanes = len(gateway.runtime.secrets.credentials)  # team, acme, agency
        tokens = [
            await gateway.token("tags:read", name=f"svc{i}", per_minute=100)
            for i in range(IDLE_TOKENS)
        ]
        async with aiohttp.ClientSession() as session:

            async def snapshots() -> float:
                async with session.get(gateway.admin_url("/metrics")) as response:
                    match = SNAPSHOTS.search(await response.text())
                assert match is not None
                return float(match.group(1))

            for value in tokens:
                headers = {"Authorization": f"Bearer {value}"}
                async with session.get(gateway.url("/api/v1/tags"), headers=headers) as response:
                    assert response.status == 200
            assert await snapshots() >= IDLE_TOKENS  # each quota read its view once at least

            async def reads_in(seconds: float) -> float:
                before = await snapshots()
                await asyncio.sleep(seconds)  # a measured interval, not a wait for an event
                return await snapshots() - before

            # Per 10 ticks the credentials' views are read about 10 times each; every idle
            # quota read each tick would add 600.
            interval = 10 * redis_link.VIEW_MAX_IDLE
            bound = lanes * (10 + 3)
            deadline = time.monotonic() + 5.0
            while (reads := await reads_in(interval)) > bound:
                if time.monotonic() > deadline:
                    pytest.fail(f"{reads} snapshot reads per 10 ticks with every token idle")
            assert await reads_in(interval) <= bound
