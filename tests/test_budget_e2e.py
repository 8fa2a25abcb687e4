"""The budget promises end to end: the real gateway in front of the real simulator, with
short rolling windows (40 per 10 s and 12 per 2 s, counted at the simulator's arrival).

The gateway runs in this process; with ``EGW_TEST_WORKERS=N`` it is ``serve --workers N``
in subprocesses instead (``=1``: one ``serve`` process; state: a sqlite file, or Redis with
``EGW_TEST_STATE=redis``), so that the same promises are checked across N processes. The
tests read the gateway's state through its admin listener only, which serves both.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.sim import Faults, SimConfig, SimLimit, Simulator
from tests.conftest import (
    ACME_KEY,
    ADMIN_TOKEN,
    AGENCY_KEY,
    ENV,
    TEAM_KEY,
    GatewayHandle,
    base_url,
    gateway_config,
)
from tests.procs import (
    Spawn,
    child_env,
    free_ports,
    http_client,
    wait_http,
    workers_under_test,
    write_config,
)

LIMITS = ((40, 10.0), (12, 2.0))
SIM_LIMITS = tuple(SimLimit(n, t) for n, t in LIMITS)
GATEWAY_LIMITS = [{"requests": n, "per_seconds": t} for n, t in LIMITS]
RUN_SECONDS = 30.0

ServerFactory = Callable[..., Awaitable[TestServer]]
MakeGateway = Callable[..., Awaitable[Any]]  # GatewayHandle, or WorkersGateway
WORKERS = workers_under_test()


def perfect_count(limits: tuple[tuple[int, float], ...], duration: float) -> int:
    """Sends a perfect sender fits in [0, duration) under every rolling window."""
    sends: list[float] = []
    t = 0.0
    while t < duration:
        waits = []
        for n, per in limits:
            inside = [s for s in sends if s > t - per]
            waits.append(0.0 if len(inside) < n else inside[-n] + per - t)
        wait = max(waits)
        if wait <= 1e-12:
            sends.append(t)
        else:
            t += wait
    return len(sends)


def max_in_any_window(arrivals: list[float], per: float) -> int:
    """The most arrivals in any half-open window [x, x + per)."""
    arrivals = sorted(arrivals)
    best, lo = 0, 0
    for hi, t in enumerate(arrivals):
        while arrivals[lo] <= t - per:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@dataclass
class Results:
    statuses: Counter[int] = field(default_factory=Counter)
    refusals_without_retry_after: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    by_token: dict[str, Counter[int]] = field(default_factory=dict)

    def add(self, who: str, status: int, headers: Any, body: bytes) -> None:
        self.statuses[status] += 1
        self.by_token.setdefault(who, Counter())[status] += 1
        if status == 429:
            if not headers.get("Retry-After", "").isdigit():
                self.refusals_without_retry_after += 1
            self.reasons[json.loads(body).get("reason", "?")] += 1


async def one_call(
    session: aiohttp.ClientSession, url: str, token: str, results: Results, who: str
) -> int:
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.read()
        results.add(who, resp.status, resp.headers, body)
        return resp.status


async def hammer(url: str, token: str, until: float, results: Results, who: str) -> None:
    """Call back to back until ``until``; after a 429 pause briefly (bounded loop)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(100_000):
            if time.monotonic() >= until:
                return
            if await one_call(session, url, token, results, who) == 429:
                await asyncio.sleep(0.2)


def sim_arrivals(sim: Simulator, key: str) -> list[float]:
    return [r.at for r in sim.log if r.key == key and r.status not in (0, 401, 429)]


@pytest.fixture
async def short_sim(aiohttp_server: ServerFactory) -> tuple[Simulator, str]:
    simulator = Simulator(
        SimConfig(
            team_keys=frozenset({TEAM_KEY, ACME_KEY}),
            agency_keys=frozenset({AGENCY_KEY}),
            limits=SIM_LIMITS,
        )
    )
    server = await aiohttp_server(simulator.app())
    return simulator, base_url(server)


@dataclass
class WorkersGateway:
    """``serve --workers N`` in subprocesses: what the tests use of a GatewayHandle."""

    port: int
    admin_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    minted: int = 0

    async def token(self, *scopes: str, name: str | None = None, **kwargs: Any) -> str:
        """As GatewayHandle.token: without ``name``, "svc", then "svc-2", ... (active names
        are unique)."""
        self.minted += 1
        if name is None:
            name = "svc" if self.minted == 1 else f"svc-{self.minted}"
        body = {"name": name, "scopes": list(scopes or ("*",)), **kwargs}
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with (
            http_client() as session,
            session.post(self.admin_url("/admin/tokens"), json=body, headers=headers) as resp,
        ):
            assert resp.status == 201, await resp.text()
            token: str = (await resp.json())["token"]
            return token


@pytest.fixture
async def make_gateway(
    make_gateway: MakeGateway, spawn: Spawn, tmp_path: Path
) -> AsyncIterator[MakeGateway]:
    """The conftest's in-process gateway; with EGW_TEST_WORKERS=N, ``serve --workers N``."""
    if "EGW_TEST_WORKERS" not in os.environ:  # =1: a subprocess all the same
        yield make_gateway
        return
    prefix = f"egw-e2e-{uuid.uuid4().hex[:8]}:"
    redis = os.environ.get("EGW_TEST_STATE") == "redis"

    async def make(upstream_url: str | None = None, **overrides: Any) -> WorkersGateway:
        assert upstream_url is not None
        port, admin_port = free_ports(2)
        raw = gateway_config(upstream_url, **overrides)
        raw |= {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}"}
        raw["state"] = f"sqlite:///{tmp_path}/state-{port}.db"
        if redis:
            raw |= {"state": "redis://127.0.0.1:6379/0", "redis": {"key_prefix": prefix}}
        raw["server"] = {"shutdown_grace_seconds": 2}
        raw["tokens"] = {"cache_ttl_seconds": 0}
        raw["logging"] = {"access_log": False}
        path = write_config(tmp_path / f"gateway-{port}.yaml", raw)
        proc = spawn("serve", "--config", path, env=child_env(**ENV), name=f"serve-{port}")
        async with http_client() as session:
            assert await wait_http(session, f"http://127.0.0.1:{admin_port}/healthz", proc) == 200
        return WorkersGateway(port, admin_port)

    yield make
    if redis:
        from proxy.state import RedisOptions, open_redis
        from tests.state.test_token_store import REDIS_URL

        client = open_redis(REDIS_URL, RedisOptions(timeout_seconds=2.0))
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def metric_values(gw: Any, sample: str, **labels: str) -> list[float]:
    """Every value of ``sample`` on the admin listener's /metrics whose labels include
    ``labels``: one per worker (one in all for a single process)."""
    _, text = await _get(gw.admin_url("/metrics"))
    return [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]


async def queue_depth(gw: Any) -> int:
    return int(sum(await metric_values(gw, "echowin_gateway_queue_depth", credential="default")))


async def wait_queue_depth(gw: Any, depth: int) -> None:
    for _ in range(200):
        if await queue_depth(gw) == depth:
            return
        await asyncio.sleep(0.01)
    assert await queue_depth(gw) == depth


async def short_gateway(make_gateway: MakeGateway, sim_url: str, **overrides: Any) -> GatewayHandle:
    upstream = {"limits": GATEWAY_LIMITS, "window_guard_seconds": 0.25}
    upstream.update(overrides.pop("upstream", {}))
    queue = {"max_wait_seconds": 3}
    queue.update(overrides.pop("queue", {}))
    return await make_gateway(sim_url, upstream=upstream, queue=queue, **overrides)


async def spend_burst(session: aiohttp.ClientSession, url: str, token: str) -> Results:
    """Twelve calls at once: the 12-per-2-s window is then full for about 2.25 s."""
    results = Results()
    await asyncio.gather(*(one_call(session, url, token, results, "t") for _ in range(12)))
    return results


async def test_saturating_load_never_causes_a_429_and_uses_the_budget(
    make_gateway: MakeGateway, short_sim: tuple[Simulator, str]
) -> None:
    sim, sim_url = short_sim
    gw = await short_gateway(make_gateway, sim_url)
    tokens = [await gw.token("contacts:read", name=f"svc{i}") for i in range(4)]
    results = Results()
    url = gw.url("/api/v1/contacts")
    until = time.monotonic() + RUN_SECONDS
    await asyncio.gather(
        *(hammer(url, tokens[i % 4], until, results, f"svc{i % 4}") for i in range(16))
    )
    arrivals = sim_arrivals(sim, TEAM_KEY)
    assert sim.statuses()[429] == 0, "the simulator refused a request: the budget leaked"
    for n, per in LIMITS:
        assert max_in_any_window(arrivals, per) <= n
    first = min(arrivals)
    in_run = [t for t in arrivals if t < first + RUN_SECONDS]
    perfect = perfect_count(LIMITS, RUN_SECONDS)
    assert len(in_run) >= 0.95 * perfect, (len(in_run), perfect)
    assert results.statuses[200] == len(arrivals)
    assert results.refusals_without_retry_after == 0
    assert set(results.reasons) <= {"upstream_budget"}
    for who, statuses in results.by_token.items():
        assert statuses[200] > 0, f"{who} never got through"


async def test_a_send_that_arrives_late_keeps_its_slot_until_its_answer(
    make_gateway: MakeGateway, short_sim: tuple[Simulator, str]
) -> None:
    """The first twelve requests spend 0.6 s on their way in, more than the 0.25 s guard,
    and echowin counts each from its late arrival. The gateway holds each slot until the
    answer came back plus the window; counted from the send alone, the next request would
    leave 2.25 s after the first and arrive within 2 s of the late ones."""
    sim, sim_url = short_sim
    gw = await short_gateway(make_gateway, sim_url)
    token = await gw.token("contacts:read")
    sim.set_faults(Faults(arrival_delay_seconds=0.6, count=12))
    results = Results()
    url = gw.url("/api/v1/contacts")
    until = time.monotonic() + 6.0
    await asyncio.gather(*(hammer(url, token, until, results, "t") for _ in range(12)))
    assert sim.faults is None, "every late request was sent"
    assert sim.statuses()[429] == 0, "a late arrival was counted in time: the window leaked"
    arrivals = sim_arrivals(sim, TEAM_KEY)
    for n, per in LIMITS:
        assert max_in_any_window(arrivals, per) <= n
    assert len(arrivals) >= 24, "the budget went on after the late requests"
    assert results.statuses[200] == len(arrivals)


async def test_a_noisy_token_cannot_starve_quiet_ones(
    make_gateway: MakeGateway, short_sim: tuple[Simulator, str]
) -> None:
    sim, sim_url = short_sim
    gw = await short_gateway(make_gateway, sim_url, queue={"max_wait_seconds": 10})
    noisy = await gw.token("contacts:read", name="noisy")
    quiet = [await gw.token("contacts:read", name=f"quiet{i}") for i in range(3)]
    results = Results()
    url = gw.url("/api/v1/contacts")
    until = time.monotonic() + 20.0

    async def quiet_loop(token: str, who: str, offset: float) -> None:
        await asyncio.sleep(offset)
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                if time.monotonic() >= until:
                    return
                started = time.monotonic()
                await one_call(session, url, token, results, who)
                await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - started)))

    await asyncio.gather(
        *(hammer(url, noisy, until, results, "noisy") for _ in range(30)),
        *(quiet_loop(t, f"quiet{i}", 0.5 + i * 0.6) for i, t in enumerate(quiet)),
    )
    assert sim.statuses()[429] == 0
    for i in range(3):
        statuses = results.by_token[f"quiet{i}"]
        total = sum(statuses.values())
        assert total >= 5
        assert statuses[200] >= 0.95 * total, (i, statuses)
    assert results.by_token["noisy"][429] > 0, "the noisy token should have been held back"


async def test_token_quota_is_enforced_before_the_shared_budget(
    make_gateway: MakeGateway, short_sim: tuple[Simulator, str]
) -> None:
    sim, sim_url = short_sim
    gw = await short_gateway(make_gateway, sim_url)
    token = await gw.token("contacts:read", name="capped", per_minute=3)
    results = Results()
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            await one_call(session, gw.url("/api/v1/contacts"), token, results, "capped")
    assert results.statuses[200] == 3
    assert results.reasons == Counter({"token_quota": 2})
    assert len(sim_arrivals(sim, TEAM_KEY)) == 3


async def test_refusal_is_immediate_when_the_wait_would_be_too_long(
    make_gateway: MakeGateway, short_sim: tuple[Simulator, str]
) -> None:
    sim, sim_url = short_sim
    gw = await short_gateway(make_gateway, sim_url, queue={"max_wait_seconds": 1})
    token = await gw.token("contacts:read")
    async with aiohttp.ClientSession() as session:
        await spend_burst(session, gw.url("/api/v1/contacts"), token)
        started = time.monotonic()
        async with session.get(
            gw.url("/api/v1/contacts"), headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            body = await resp.json()
            elapsed = time.monotonic() - started
            assert resp.status == 429
            assert body["reason"] == "upstream_budget"
            assert int(resp.headers["Retry-After"]) >= 1
            assert body["retryAfter"] == int(resp.headers["Retry-After"])
            assert resp.headers["X-RateLimit-Remaining"] == "0"
    assert elapsed < 0.5  # refused at once, not after waiting out max_wait
    assert sim.statuses()[429] == 0


async def test_caller_headers_replace_echowins(
    make_gateway: MakeGateway, short_sim: tuple[Simulator, str]
) -> None:
    _, sim_url = short_sim
    gw = await short_gateway(make_gateway, sim_url)
    token = await gw.token("contacts:read", per_minute=5)
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            gw.url("/api/v1/contacts"), headers={"Authorization": f"Bearer {token}"}
        ) as resp,
    ):
        assert resp.status == 200
        h = resp.headers
        # The tightest window for this caller is its own 5/min quota (4 left after this call).
        assert h["X-RateLimit-Limit"] == "5"
        assert h["X-RateLimit-Remaining"] == "4"
        assert int(h["X-RateLimit-Reset"]) >= int(time.time())
        assert '"echowin-10s";q=40;w=10' in h["RateLimit-Policy"]
        assert '"token-60s";q=5;w=60' in h["RateLimit-Policy"]
        assert h["RateLimit"].startswith('"token-60s";r=4;t=')
        assert "queue;dur=" in h["Server-Timing"]
        assert "upstream;dur=" in h["Server-Timing"]


async def test_client_disconnect_while_queued_consumes_nothing(
    make_gateway: MakeGateway, short_sim: tuple[Simulator, str]
) -> None:
    sim, sim_url = short_sim
    gw = await short_gateway(make_gateway, sim_url, queue={"max_wait_seconds": 5})
    token = await gw.token("contacts:read")
    url = gw.url("/api/v1/contacts")
    async with aiohttp.ClientSession() as session:
        results = await spend_burst(session, url, token)
        assert results.statuses[200] == 12
        waiting = asyncio.ensure_future(one_call(session, url, token, results, "t"))
        await wait_queue_depth(gw, 1)
        waiting.cancel()  # the client goes away while queued
        await wait_queue_depth(gw, 0)
        used = await metric_values(
            gw, "echowin_gateway_budget_used", credential="default", window="10s"
        )
        assert max(used) == 12  # the departed request took no slot
    assert len(sim_arrivals(sim, TEAM_KEY)) == 12


async def test_unexpected_upstream_429_freezes_the_credential(
    make_gateway: MakeGateway, short_sim: tuple[Simulator, str]
) -> None:
    sim, sim_url = short_sim
    gw = await short_gateway(make_gateway, sim_url, queue={"max_wait_seconds": 1})
    token = await gw.token("contacts:read")
    sim.set_faults(Faults(force_429=True, retry_after=5, count=1))
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {token}"}
        async with session.get(gw.url("/api/v1/contacts"), headers=headers) as resp:
            assert resp.status == 429  # echowin's own 429, told as the gateway's
            assert (await resp.json())["reason"] == "upstream_429"
        seen = len(sim.log)
        async with session.get(gw.url("/api/v1/contacts"), headers=headers) as resp:
            body = await resp.json()
            assert resp.status == 429
            assert body["reason"] == "upstream_frozen"
            # The freeze is 5 s, but echowin's 429 also said Remaining: 0 of the 40 per 10 s:
            # the gateway sends nothing before that window frees, 10.25 s on. Coming back at
            # 5 s would only meet a second refusal.
            assert 9 <= int(resp.headers["Retry-After"]) <= 11
    assert len(sim.log) == seen, "echowin must see nothing during the freeze"
    for name in ("echowin_gateway_upstream_429_total", "echowin_gateway_freezes_total"):
        assert sum(await metric_values(gw, name, credential="default")) == 1


async def test_half_spent_key_is_learned_from_the_headers(
    make_gateway: MakeGateway, short_sim: tuple[Simulator, str]
) -> None:
    sim, sim_url = short_sim
    sim.spend(TEAM_KEY, 20)  # another client of the same key has used half the 10 s window
    gw = await short_gateway(make_gateway, sim_url)
    tokens = [await gw.token("contacts:read", name=f"svc{i}") for i in range(2)]
    results = Results()
    url = gw.url("/api/v1/contacts")
    until = time.monotonic() + 12.0
    await asyncio.gather(*(hammer(url, tokens[i % 2], until, results, "x") for i in range(6)))
    # memory:// (in this process) and a sqlite log with nothing in it (EGW_TEST_WORKERS)
    # start uncalibrated: one request at a time until echowin's headers tell what others
    # used, so at most one 429 per process. Redis state (EGW_TEST_STATE=redis) is shared and
    # trusted from the start: the first requests in flight (one per caller) may all meet
    # the others' use.
    workers = int(os.environ.get("EGW_TEST_WORKERS") or 1)
    in_flight = 6 if os.environ.get("EGW_TEST_STATE") == "redis" else workers
    assert sim.statuses()[429] <= in_flight
    freezes = await metric_values(gw, "echowin_gateway_freezes_total", credential="default")
    assert sum(freezes) <= in_flight


async def test_budget_endpoint_and_metrics(
    make_gateway: MakeGateway, short_sim: tuple[Simulator, str]
) -> None:
    _, sim_url = short_sim
    gw = await short_gateway(make_gateway, sim_url)
    token = await gw.token("contacts:read")
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(
                gw.url("/api/v1/contacts"), headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 200
    status, body = await _get(
        gw.admin_url("/admin/budget"), {"Authorization": "Bearer admin-token-for-tests"}
    )
    assert status == 200
    view = json.loads(body)["credentials"]["default"]
    assert [w["used"] for w in view["windows"]] == [3, 3]
    assert [w["remaining"] for w in view["windows"]] == [37, 9]
    assert view["queue_depth"] == 0
    used = await metric_values(
        gw, "echowin_gateway_budget_used", credential="default", window="10s"
    )
    assert max(used) == 3  # a worker that sent nothing may lag; none sees more
    remaining = await metric_values(
        gw, "echowin_gateway_budget_remaining", credential="default", window="2s"
    )
    assert min(remaining) == 9
    limit = await metric_values(
        gw, "echowin_gateway_budget_limit", credential="agency", window="10s"
    )
    assert set(limit) == {40}
    assert await metric_values(
        gw, "echowin_gateway_echowin_reported_remaining", credential="default"
    )


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_caller_max_wait_header_shortens_the_wait(
    make_gateway: MakeGateway, short_sim: tuple[Simulator, str]
) -> None:
    sim, sim_url = short_sim
    gw = await short_gateway(make_gateway, sim_url, queue={"max_wait_seconds": 5})
    token = await gw.token("contacts:read")
    url = gw.url("/api/v1/contacts")
    async with aiohttp.ClientSession() as session:
        await spend_burst(session, url, token)
        headers = {"Authorization": f"Bearer {token}", "X-Gateway-Max-Wait": "0.5"}
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 429  # the next slot is ~2.25 s away: more than 0.5 s
            assert (await resp.json())["reason"] == "upstream_budget"
        assert await queue_depth(gw) == 0
        headers["X-Gateway-Max-Wait"] = "4"
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200  # within 4 s the 2 s window frees again
            assert float(resp.headers["Server-Timing"].split("=")[1].split(",")[0]) > 1000
    assert sim.statuses()[429] == 0
