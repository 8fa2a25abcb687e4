"""The response cache under ``serve --workers 2``: a write through one worker purges the
copies every worker holds, within a second: on Redis pub/sub (redis state), or between the
workers' unix datagram sockets (sqlite state). Real ``serve`` processes, the real
simulator; every wait polls with a deadline."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.sim import Simulator
from tests.procs import Gateway, Spawn, write_config
from tests.workers.test_workers import (
    HUGE_LIMITS,
    big_sim,  # noqa: F401
    by_worker,
    group_config,
    metrics_text,
    new_token,
    redis_prefix,  # noqa: F401
    start_group,
)

DEADLINE = 15.0


async def tags_fresh(gw: Gateway, token: str, n: int) -> list[bytes]:
    """``n`` GETs of the tag list, each on a new connection (the kernel picks a worker)."""
    connector = aiohttp.TCPConnector(force_close=True)
    bodies = []
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(n):
            async with session.get(
                gw.url("/api/v1/tags"), headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 200
                bodies.append(await resp.read())
    return bodies


async def lookups(gw: Gateway, result: str) -> Counter[str]:
    text = await metrics_text(gw)
    return by_worker(text, "echowin_gateway_cache_lookups_total", result=result)


@pytest.mark.parametrize("state", ["redis", "sqlite"])
async def test_a_write_through_one_worker_purges_every_worker(
    tmp_path: Path,
    spawn: Spawn,
    big_sim: tuple[Simulator, str],  # noqa: F811
    redis_prefix: str,  # noqa: F811
    state: str,
) -> None:
    sim, sim_url = big_sim
    gw = group_config(tmp_path, sim_url, state, redis_prefix, HUGE_LIMITS)
    raw = yaml.safe_load(gw.config.read_text())
    raw["cache"] = {"routes": {"/api/v1/tags": 300}}
    write_config(gw.config, raw)
    await start_group(spawn, gw)
    token = await new_token(gw)
    deadline = time.monotonic() + DEADLINE
    while set(await lookups(gw, "hit")) != {"0", "1"}:  # both workers hold a copy
        assert time.monotonic() < deadline, "the kernel never gave both workers a connection"
        await tags_fresh(gw, token, 10)
    before = sum(1 for r in sim.log if r.method == "GET" and r.path == "/api/v1/tags")
    assert before == 2  # one per worker

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url("/api/v1/tags"),
            json={"name": "made-by-a-worker"},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.status in (200, 201)
    written = time.monotonic()
    while True:  # the copies are gone on both workers
        held = by_worker(await metrics_text(gw), "echowin_gateway_cache_entries")
        if set(held) >= {"0", "1"} and held["0"] == held["1"] == 0:
            break
        assert time.monotonic() - written < 1.0, f"not purged within a second: {held}"
    misses_before = await lookups(gw, "miss")
    deadline = time.monotonic() + DEADLINE
    while True:  # both workers asked echowin again, and every answer shows the write
        bodies = await tags_fresh(gw, token, 10)
        assert all(b"made-by-a-worker" in body for body in bodies)
        misses = await lookups(gw, "miss")
        if all(misses[w] > misses_before[w] for w in ("0", "1")):
            break
        assert time.monotonic() < deadline
    after = sum(1 for r in sim.log if r.method == "GET" and r.path == "/api/v1/tags")
    assert after == before + 2
    assert sim.statuses()[429] == 0
