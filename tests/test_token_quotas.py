"""A token's own quota (``--hourly``, ``--per-minute``) kept in the gateway's state: the
schedulers of several processes (``serve --workers``: one SQLite file; replicas: one Redis)
grant it once between them, and a restart remembers it. Each ``Scheduler`` here is one
process, built as proxy/runtime.py builds it; the credential's own budget is huge and
local (not the subject). Redis: the real server on 127.0.0.1:6379 (fails, never skips,
without it). Redis decides with its own clock, so every test stays inside one minute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from redis.asyncio import Redis

from proxy.admission import AdmitRequest, Refusal
from proxy.budget import CredentialBudget, Limit
from proxy.scheduler import Lane, QueuePolicy, Scheduler, SlotGrant
from proxy.slots import LocalSlots, SlotSource
from proxy.state.memory import MemorySendLog
from proxy.state.redis_budget import RedisSlots
from proxy.state.sqlite import SqliteSendLog
from proxy.tokens import TokenRecord, mint_token
from tests.test_scheduler import Recorder
from tests.test_slot_contract import scratch_redis

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

    async def start(self) -> Scheduler:
        log: SqliteSendLog | None = None
        if self.kind == "sqlite":
            log = await SqliteSendLog.open(self.db)
            self.logs.append(log)

        def quota_source(name: str, limits: tuple[Limit, ...]) -> SlotSource:
            if log is not None:
                return LocalSlots(name, CredentialBudget(limits, 0.0), log)
            assert self.redis is not None
            return RedisSlots(name, self.redis, self.prefix, limits, 0.0, replicas=2, mode="local")

        policy = QueuePolicy(max_wait=0.0, max_depth=100, max_depth_per_token=50)
        observer = Recorder()
        lane = Lane(CREDENTIAL, [HUGE], 0.0, MemorySendLog(), policy, observer)
        lane.calibrated = True  # no probe: the credential's budget is not the subject
        scheduler = Scheduler({CREDENTIAL: lane}, policy, observer, quota_sources=quota_source)
        self.schedulers.append(scheduler)
        return scheduler

    async def close(self) -> None:
        for scheduler in self.schedulers:
            await scheduler.close()
        for log in self.logs:
            await log.close()


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
    for quota in scheduler._quotas.values():
        source = quota.source
        if isinstance(source, RedisSlots):
            source._mirror_at = -math.inf
        else:
            assert isinstance(source, LocalSlots)
            source._polled = -math.inf


async def settle(scheduler: Scheduler) -> None:
    """Wait for the quota sources' background writes (a charge given back)."""
    for quota in scheduler._quotas.values():
        source = quota.source
        if isinstance(source, RedisSlots):
            await asyncio.gather(*list(source._tasks))
        else:
            assert isinstance(source, LocalSlots)
            await asyncio.gather(*list(source._background))


async def test_two_processes_grant_a_quota_once_between_them(processes: Processes) -> None:
    a, b = await processes.start(), await processes.start()
    token = capped(3)
    results = [await admit(scheduler, token) for scheduler in (a, b) * 4]
    granted = [r for r in results if isinstance(r, SlotGrant)]
    refused = [r for r in results if isinstance(r, Refusal)]
    assert len(granted) == 3
    assert {r.reason for r in refused} == {"token_quota"}
    assert all(0 < r.retry_after <= 60 for r in refused)
    # Both processes granted: the quota was shared, not used up by the first alone.
    assert granted[0].lane is not granted[1].lane


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
    assert token.id not in a._quotas
