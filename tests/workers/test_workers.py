"""``serve --workers N``: N processes on one port, one budget, one admin listener.

Real ``serve`` subprocesses (a supervisor and its workers), the real simulator in this
process, the test Redis on 127.0.0.1:6379 (a fresh key prefix per test) or a sqlite file.
Every wait polls with a deadline; nothing asserts on speed.

The sqlite variants need the budget shared across processes on one SQLite file
(proxy/budget/slots.py, proxy/state/sqlite.py); the Redis ones work on Redis' shared budget.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.sim import Faults, SimConfig, SimLimit, Simulator
from tests.conftest import base_url
from tests.procs import (
    REAL_KEY,
    Gateway,
    Proc,
    Spawn,
    assert_clean_error,
    connection_refused,
    eventually,
    gateway_config,
    load_loop,
    run_cli,
    wait_http,
    write_config,
)
from tests.state.test_token_store import scratch_redis
from tests.test_budget_e2e import (
    GATEWAY_LIMITS,
    LIMITS,
    SIM_LIMITS,
    max_in_any_window,
    perfect_count,
)

ServerFactory = Callable[..., Awaitable[TestServer]]
ADMIN = "workers-admin-token"
WORKERS = 2
HUGE_LIMITS = [{"requests": 1_000_000, "per_seconds": 3600}]
DEADLINE = 15.0


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    async with scratch_redis() as (_, prefix):
        yield prefix


@pytest.fixture
async def short_sim(aiohttp_server: ServerFactory) -> tuple[Simulator, str]:
    """echowin with the short windows of the budget tests."""
    sim = Simulator(SimConfig(team_keys=frozenset({REAL_KEY}), limits=SIM_LIMITS))
    server = await aiohttp_server(sim.app())
    return sim, base_url(server)


@pytest.fixture
async def big_sim(aiohttp_server: ServerFactory) -> tuple[Simulator, str]:
    """echowin with limits no test reaches."""
    sim = Simulator(SimConfig(team_keys=frozenset({REAL_KEY}), limits=(SimLimit(10**6, 3600),)))
    server = await aiohttp_server(sim.app())
    return sim, base_url(server)


def group_config(
    tmp_path: Path, sim_url: str, state: str, prefix: str, limits: list[dict[str, Any]]
) -> Gateway:
    """A config for ``serve --workers 2``; ``state`` is ``redis`` or ``sqlite``."""
    gw = gateway_config(tmp_path, sim_url, queue={"max_wait_seconds": 3})
    raw = yaml.safe_load(gw.config.read_text())
    raw["upstream"]["limits"] = limits
    raw["admin_token"] = {"env": "GATEWAY_ADMIN_TOKEN"}
    raw["logging"] = {"format": "text"}
    if state == "redis":
        raw["state"] = "redis://127.0.0.1:6379/0"
        raw["redis"] = {"key_prefix": prefix}
    write_config(gw.config, raw)
    gw.env["GATEWAY_ADMIN_TOKEN"] = ADMIN
    return gw


async def start_group(spawn: Spawn, gw: Gateway, name: str = "group") -> Proc:
    """``serve --workers 2``; returns once its admin listener answers (every worker is up)."""
    proc = spawn("serve", "--config", gw.config, "--workers", str(WORKERS), env=gw.env, name=name)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        assert await wait_http(session, gw.admin_url("/healthz"), proc, timeout=20.0) == 200
    return proc


async def admin_call(gw: Gateway, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.request(method, gw.admin_url(path), headers=headers, **kwargs) as resp,
    ):
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def new_token(gw: Gateway, name: str = "svc") -> str:
    status, body = await admin_call(
        gw, "POST", "/admin/tokens", json={"name": name, "scopes": ["*"]}
    )
    assert status == 201, body
    token: str = body["token"]
    return token


async def health(gw: Gateway) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(gw.admin_url("/healthz")) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        return body


async def metrics_text(gw: Gateway) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(gw.admin_url("/metrics")) as resp,
    ):
        assert resp.status == 200
        return await resp.text()


def by_worker(text: str, sample: str, **labels: str) -> Counter[str]:
    """Sum of ``sample``'s values per ``worker`` label, over samples matching ``labels``."""
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.labels["worker"]] += s.value
    return out


async def fresh_connections(gw: Gateway, token: str, n: int) -> Counter[int]:
    """``n`` requests, each on a new connection (the kernel picks a worker per connection)."""
    statuses: Counter[int] = Counter()
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(n):
            async with session.get(
                gw.url("/api/v1/contacts"), headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                await resp.read()
                statuses[resp.status] += 1
    return statuses


def gone(pid: int) -> bool:
    """No such process, or a zombie that nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# --- tests -----------------------------------------------------------------------------------


def test_memory_state_with_workers_is_one_clear_error(tmp_path: Path) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9", state="memory://")
    result = run_cli("serve", "--config", gw.config, "--workers", "2", env=gw.env)
    assert_clean_error(result, 2, "state: memory://", "--workers 2", "sqlite://", "redis://")
    raw = yaml.safe_load(gw.config.read_text())
    raw["server"]["workers"] = 2
    write_config(gw.config, raw)
    result = run_cli("check-config", gw.config, env=gw.env)
    assert_clean_error(result, 2, "state: memory://", "server.workers 2")
    result = run_cli("serve", "--config", gw.config, "--workers", "65", env=gw.env)
    assert result.returncode == 2
    assert "--workers: must be 1-64, or 0 or auto" in result.stderr


async def test_the_group_admin_listener_answers_unparsable_requests_in_json(
    tmp_path: Path, spawn: Spawn, big_sim: tuple[Simulator, str]
) -> None:
    """As ``serve``'s own admin listener does: the group's is the one callers reach."""
    _, sim_url = big_sim
    gw = group_config(tmp_path, sim_url, "sqlite", "", HUGE_LIMITS)
    await start_group(spawn, gw)
    for port in (gw.admin_port, gw.port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nNot a header line\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)  # and the connection closes
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split()[1] == b"400", (port, answer[:200])
        assert b"content-type: application/json" in head.lower(), (port, answer[:300])
        assert json.loads(body) == {"error": "Bad Request", "reason": "bad_request"}


async def test_both_workers_serve_one_port_behind_one_admin_listener(
    tmp_path: Path, spawn: Spawn, big_sim: tuple[Simulator, str], redis_prefix: str
) -> None:
    _, sim_url = big_sim
    gw = group_config(tmp_path, sim_url, "redis", redis_prefix, HUGE_LIMITS)
    proc = await start_group(spawn, gw)
    body = await health(gw)
    assert body["status"] == "ok"
    pids = [w["pid"] for w in body["workers"]]
    assert [w["worker"] for w in body["workers"]] == [0, 1]
    assert len(set(pids)) == 2 and proc.popen.pid not in pids
    assert all(w["ready"] and w["restarts"] == 0 for w in body["workers"])
    status, ready = await admin_call(gw, "GET", "/readyz")
    assert (status, ready["status"]) == (200, "ready")

    # The token API goes through the supervisor to a worker; the token works on both.
    token = await new_token(gw)
    status, listed = await admin_call(gw, "GET", "/admin/tokens")
    assert status == 200 and [t["name"] for t in listed["tokens"]] == ["svc"]
    async with aiohttp.ClientSession() as session, session.get(gw.admin_url("/admin/tokens")) as r:
        assert r.status == 401  # the worker's own admin auth, unchanged
    assert "admin action" in proc.stderr() and "peer=127.0.0.1" in proc.stderr()

    sent: Counter[int] = Counter()
    deadline = time.monotonic() + DEADLINE
    while True:  # new connections until the kernel has given some to each worker
        sent += await fresh_connections(gw, token, 20)
        per_worker = by_worker(
            await metrics_text(gw), "echowin_gateway_requests_total", status="200"
        )
        if set(per_worker) == {"0", "1"} or time.monotonic() > deadline:
            break
    assert set(per_worker) == {"0", "1"}, per_worker
    assert sum(per_worker.values()) == sent[200] == sent.total()

    # One exposition: every family's HELP and TYPE once, every sample labelled by worker.
    text = await metrics_text(gw)
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    workers = {
        s.labels.get("worker") for f in text_string_to_metric_families(text) for s in f.samples
    }
    assert workers == {"0", "1", "supervisor"}
    supervisor_cpu = by_worker(text, "process_cpu_seconds_total")
    assert set(supervisor_cpu) == {"0", "1", "supervisor"}

    # The budget as the group sees it: every send, whichever worker made it.
    status, budget = await admin_call(gw, "GET", "/admin/budget")
    assert status == 200
    assert budget["credentials"]["default"]["windows"][0]["used"] == sent[200]
    status, page = await admin_call(gw, "GET", "/status.json")
    assert page["busiest_tokens"][0]["requests"] == sent[200]
    assert sum(page["credentials"]["default"]["history"]["sends"]) == sent[200]
    status, html = await admin_call(gw, "GET", "/status")
    assert status == 200 and "busiest tokens" in html.lower()
    assert 'data-credential="default"' in html  # the picture of every worker's minutes


@pytest.mark.parametrize("state", ["redis", "sqlite"])
async def test_the_budget_holds_across_workers(
    tmp_path: Path,
    spawn: Spawn,
    short_sim: tuple[Simulator, str],
    redis_prefix: str,
    state: str,
) -> None:
    """Promise 1 with two processes sending: no 429 from echowin, no window overfilled; and
    the budget is used (both workers send). sqlite: needs the cross-process leases."""
    sim, sim_url = short_sim
    gw = group_config(tmp_path, sim_url, state, redis_prefix, GATEWAY_LIMITS)
    await start_group(spawn, gw)
    tokens = [await new_token(gw, f"svc{i}") for i in range(4)]
    statuses: Counter[int] = Counter()
    run = 16.0
    until = time.monotonic() + run
    await asyncio.gather(
        *(load_loop(gw.url("/api/v1/contacts"), tokens[i % 4], until, statuses) for i in range(12))
    )
    arrivals = sorted(r.at for r in sim.log if r.status not in (0, 401, 429))
    assert sim.statuses()[429] == 0, "the workers overspent the shared budget"
    for n, per in LIMITS:
        assert max_in_any_window(arrivals, per) <= n
    assert statuses[0] == 0, statuses
    in_run = [t for t in arrivals if t < arrivals[0] + run]
    assert len(in_run) >= 0.9 * perfect_count(LIMITS, run), (len(in_run), statuses)
    admitted = by_worker(await metrics_text(gw), "echowin_gateway_requests_total", status="200")
    assert set(admitted) == {"0", "1"}, admitted


async def group_with_calls_in_flight(
    tmp_path: Path,
    spawn: Spawn,
    big_sim: tuple[Simulator, str],
    redis_prefix: str,
    count: int,
) -> tuple[Gateway, Proc, list[int], list[asyncio.Future[Counter[int]]]]:
    """A 2-worker group on Redis, its worker pids, and ``count`` calls held in flight by a
    slow simulator (1.5 s), once the merged metrics count all of them."""
    sim, sim_url = big_sim
    gw = group_config(tmp_path, sim_url, "redis", redis_prefix, HUGE_LIMITS)
    proc = await start_group(spawn, gw)
    token = await new_token(gw)
    pids = [w["pid"] for w in (await health(gw))["workers"]]
    sim.set_faults(Faults(latency_seconds=1.5))
    calls = [asyncio.ensure_future(fresh_connections(gw, token, 1)) for _ in range(count)]

    async def all_in_flight() -> bool:
        text = await metrics_text(gw)
        return sum(by_worker(text, "echowin_gateway_in_flight_requests").values()) == count

    await eventually(all_in_flight, f"{count} requests in flight", DEADLINE)
    return gw, proc, pids, calls


async def test_sigterm_drains_every_worker_and_exits_0(
    tmp_path: Path, spawn: Spawn, big_sim: tuple[Simulator, str], redis_prefix: str
) -> None:
    gw, proc, pids, calls = await group_with_calls_in_flight(
        tmp_path, spawn, big_sim, redis_prefix, 8
    )
    proc.popen.send_signal(signal.SIGTERM)
    answered = sum(await asyncio.gather(*calls), Counter())
    assert answered == Counter({200: 8}), answered  # in flight when it stopped: finished
    assert await proc.wait_exit(DEADLINE) == 0
    assert all(gone(pid) for pid in pids)
    assert await connection_refused(gw.port)
    assert "stopping workers signal=SIGTERM" in proc.stderr()


async def test_sighup_reloads_every_worker(
    tmp_path: Path, spawn: Spawn, big_sim: tuple[Simulator, str], redis_prefix: str
) -> None:
    _, sim_url = big_sim
    gw = group_config(tmp_path, sim_url, "redis", redis_prefix, HUGE_LIMITS)
    proc = await start_group(spawn, gw)
    raw = yaml.safe_load(gw.config.read_text())
    raw["queue"]["max_wait_seconds"] = 7
    write_config(gw.config, raw)
    proc.popen.send_signal(signal.SIGHUP)

    async def reloaded() -> bool:
        text = await metrics_text(gw)
        ok = by_worker(text, "echowin_gateway_config_reloads_total", result="success")
        wait = by_worker(text, "echowin_gateway_queue_max_wait_seconds")
        return ok == Counter({"0": 1, "1": 1}) and wait == Counter({"0": 7, "1": 7})

    await eventually(reloaded, "both workers reloaded", DEADLINE)
    proc.check_alive()


async def test_a_killed_worker_is_restarted(
    tmp_path: Path, spawn: Spawn, big_sim: tuple[Simulator, str], redis_prefix: str
) -> None:
    _, sim_url = big_sim
    gw = group_config(tmp_path, sim_url, "redis", redis_prefix, HUGE_LIMITS)
    proc = await start_group(spawn, gw)
    token = await new_token(gw)
    before = (await health(gw))["workers"]
    os.kill(before[1]["pid"], signal.SIGKILL)

    async def back() -> bool:
        w = (await health(gw))["workers"][1]
        return w["ready"] and w["pid"] not in (None, before[1]["pid"]) and w["restarts"] == 1

    await eventually(back, "worker 1 restarted", DEADLINE)
    after = (await health(gw))["workers"]
    assert after[0] == before[0]  # the other worker was left alone
    status, ready = await admin_call(gw, "GET", "/readyz")
    assert (status, ready["status"]) == (200, "ready")
    assert await fresh_connections(gw, token, 10) == Counter({200: 10})
    assert "worker died; restarting worker=1" in proc.stderr()
    assert "status=137" in proc.stderr()
    restarts = by_worker(await metrics_text(gw), "echowin_gateway_worker_restarts_total")
    assert restarts == Counter({"0": 0, "1": 1})

    # Every line a worker writes names it, access lines included (written within 0.2 s).
    def access() -> list[str]:
        return [line for line in proc.stderr().splitlines() if "echowin_gateway.access" in line]

    async def logged() -> bool:
        return len(access()) >= 10

    await eventually(logged, "access lines written", DEADLINE)
    assert all(re.search(r" worker=[01]( |$)", line) for line in access())
    proc.check_alive()


async def test_workers_die_with_their_supervisor(
    tmp_path: Path, spawn: Spawn, big_sim: tuple[Simulator, str], redis_prefix: str
) -> None:
    """SIGKILL to the supervisor: the kernel tells the workers, which drain and exit."""
    gw, proc, pids, calls = await group_with_calls_in_flight(
        tmp_path, spawn, big_sim, redis_prefix, 4
    )
    proc.popen.send_signal(signal.SIGKILL)
    await proc.wait_exit(5)
    answered = sum(await asyncio.gather(*calls), Counter())
    assert answered == Counter({200: 4}), answered  # drained, not dropped

    async def orphans_gone() -> bool:
        return all(gone(pid) for pid in pids)

    await eventually(orphans_gone, "no orphaned worker", DEADLINE)
    assert await connection_refused(gw.port)


async def test_a_worker_that_cannot_start_stops_the_group(
    tmp_path: Path, spawn: Spawn, big_sim: tuple[Simulator, str]
) -> None:
    """A sqlite path that cannot be created: the workers fail, the supervisor exits 1."""
    _, sim_url = big_sim
    gw = group_config(tmp_path, sim_url, "sqlite", "", HUGE_LIMITS)
    (tmp_path / "blocker").write_text("a file, not a directory")
    raw = yaml.safe_load(gw.config.read_text())
    raw["state"] = f"sqlite:///{tmp_path}/blocker/state-{uuid.uuid4().hex[:6]}.db"
    write_config(gw.config, raw)
    proc = spawn("serve", "--config", gw.config, "--workers", "2", env=gw.env, name="bad")
    assert await proc.wait_exit(DEADLINE) == 1
    assert "worker failed to start; stopping" in proc.stderr()
    assert await connection_refused(gw.admin_port)


@pytest.mark.parametrize("state", ["sqlite", "redis"])
async def test_a_token_quota_holds_across_workers(
    tmp_path: Path,
    spawn: Spawn,
    big_sim: tuple[Simulator, str],
    redis_prefix: str,
    state: str,
) -> None:
    _, sim_url = big_sim
    gw = group_config(tmp_path, sim_url, state, redis_prefix, HUGE_LIMITS)
    await start_group(spawn, gw)
    status, body = await admin_call(
        gw, "POST", "/admin/tokens", json={"name": "capped", "scopes": ["*"], "per_minute": 3}
    )
    assert status == 201, body
    answered = await fresh_connections(gw, body["token"], 12)  # spread over both workers
    admitted = by_worker(await metrics_text(gw), "echowin_gateway_requests_total", status="200")
    assert set(admitted) == {"0", "1"} or answered[200] <= 3, admitted
    assert answered == Counter({200: 3, 429: 9}), answered
