"""Promise 1 across restarts: the gateway SIGKILLed and restarted under load never makes
echowin answer 429, because every send is written ahead to the sqlite state first.

Twice: with limits small enough that every send has its own row, and with limits large
enough that the gateway reserves blocks of slots per row (leases) at the start of every
window, so the kills land while a lease is open."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from proxy.admin.tokenops import create_token
from proxy.config import load_config
from proxy.sim import SimConfig, SimLimit, Simulator
from proxy.state import open_token_store
from tests.conftest import base_url
from tests.procs import REAL_KEY, Proc, Spawn, gateway_config, load_loop, wait_http, write_config
from tests.test_budget_e2e import LIMITS, max_in_any_window

ServerFactory = Callable[..., Awaitable[TestServer]]
RESTARTS = 3
RUN_SECONDS = 20.0


LEASED_LIMITS = ((1200, 10.0), (400, 2.0))  # 400 free: a row reserves 25 slots


@pytest.mark.parametrize("limits", [LIMITS, LEASED_LIMITS], ids=["row-per-send", "leases"])
async def test_sigkill_restarts_under_load_cause_no_upstream_429(
    tmp_path: Path,
    spawn: Spawn,
    aiohttp_server: ServerFactory,
    limits: tuple[tuple[int, float], ...],
) -> None:
    sim_limits = tuple(SimLimit(n, t) for n, t in limits)
    sim = Simulator(SimConfig(team_keys=frozenset({REAL_KEY}), limits=sim_limits))
    server = await aiohttp_server(sim.app())
    sim_url = base_url(server)
    upstream = {
        "base_url": sim_url,
        "api_key": {"env": "ECHOWIN_API_KEY"},
        "timeout_seconds": 5,
        "connect_timeout_seconds": 2,
        "limits": [{"requests": n, "per_seconds": t} for n, t in limits],
    }
    gw = gateway_config(tmp_path, sim_url, queue={"max_wait_seconds": 3})
    raw = yaml.safe_load(gw.config.read_text())
    raw["upstream"] = upstream
    write_config(gw.config, raw)
    config = load_config(gw.config)
    assert [(lim.requests, lim.per_seconds) for lim in config.upstream.limits] == list(limits)
    store = await open_token_store(config.state)
    try:
        tokens = [
            (
                await create_token(
                    store, config, config.route_table(), name=f"svc{i}", scopes=["*"]
                )
            ).token
            for i in range(3)
        ]
    finally:
        await store.close()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as probe:

        async def start() -> Proc:
            proc = spawn(
                "serve", "--config", gw.config, env=gw.env, name=f"serve{time.monotonic_ns()}"
            )
            assert await wait_http(probe, gw.admin_url("/healthz"), proc) == 200
            return proc

        proc = await start()
        statuses: Counter[int] = Counter()
        until = time.monotonic() + RUN_SECONDS
        load = asyncio.gather(
            *(
                load_loop(gw.url("/api/v1/contacts"), tokens[i % 3], until, statuses)
                for i in range(9)
            )
        )
        for _ in range(RESTARTS):
            await asyncio.sleep(RUN_SECONDS / (RESTARTS + 1))
            proc.popen.send_signal(signal.SIGKILL)
            await proc.wait_exit(5)
            proc = await start()
        await load
    arrivals = [r.at for r in sim.log if r.status not in (0, 401, 429)]
    assert sim.statuses()[429] == 0, "a restart forgot a send"
    for n, per in limits:
        assert max_in_any_window(arrivals, per) <= n
    assert statuses[200] >= 40, statuses  # the gateway kept serving between restarts
    assert config.state.startswith("sqlite:///")
    with sqlite3.connect(config.state.removeprefix("sqlite:///")) as db:
        (blocks,) = db.execute("SELECT COUNT(*) FROM send_rows WHERE n > 1").fetchone()
    if limits is LEASED_LIMITS:
        assert blocks > 0, "no lease was taken: the test did not test leases"
    else:
        assert blocks == 0
