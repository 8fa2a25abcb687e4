"""The budget promises end to end: the real gateway in front of the real simulator, with
short rolling windows (40 per 10 s and 12 per 2 s, counted at the simulator's arrival)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.sim import Faults, SimConfig, SimLimit, Simulator
from tests.conftest import ACME_KEY, AGENCY_KEY, TEAM_KEY, GatewayHandle

LIMITS = ((40, 10.0), (12, 2.0))
SIM_LIMITS = tuple(SimLimit(n, t) for n, t in LIMITS)
GATEWAY_LIMITS = [{"requests": n, "per_seconds": t} for n, t in LIMITS]
RUN_SECONDS = 30.0

ServerFactory = Callable[..., Awaitable[TestServer]]
MakeGateway = Callable[..., Awaitable[GatewayHandle]]


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
    return simulator, str(server.make_url("")).rstrip("/")


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
        lane = gw.runtime.admitter.lanes["default"]  # type: ignore[attr-defined]
        for _ in range(200):
            if lane.depth == 1:
                break
            await asyncio.sleep(0.01)
        assert lane.depth == 1
        waiting.cancel()  # the client goes away while queued
        for _ in range(200):
            if lane.depth == 0:
                break
            await asyncio.sleep(0.01)
        assert lane.depth == 0
        used = lane.budget.count(time.time(), 1)
        assert used == 12  # the departed request took no slot
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
            assert resp.status == 429  # echowin's own 429, passed through once
        seen = len(sim.log)
        async with session.get(gw.url("/api/v1/contacts"), headers=headers) as resp:
            body = await resp.json()
            assert resp.status == 429
            assert body["reason"] == "upstream_frozen"
            assert 4 <= int(resp.headers["Retry-After"]) <= 5
    assert len(sim.log) == seen, "echowin must see nothing during the freeze"
    _, metrics = await _get(gw.admin_url("/metrics"))
    assert 'echowin_gateway_upstream_429_total{credential="default"} 1.0' in metrics
    assert 'echowin_gateway_freezes_total{credential="default"} 1.0' in metrics


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
    assert sim.statuses()[429] <= 1  # at most one request per freeze
    assert gw.runtime.metrics.freezes.labels("default")._value.get() <= 1


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
    _, metrics = await _get(gw.admin_url("/metrics"))
    assert 'echowin_gateway_budget_used{credential="default",window="10s"} 3.0' in metrics
    assert 'echowin_gateway_budget_remaining{credential="default",window="2s"} 9.0' in metrics
    assert 'echowin_gateway_budget_limit{credential="agency",window="10s"} 40.0' in metrics
    assert 'echowin_gateway_echowin_reported_remaining{credential="default"}' in metrics


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
        lane = gw.runtime.admitter.lanes["default"]  # type: ignore[attr-defined]
        assert lane.depth == 0
        headers["X-Gateway-Max-Wait"] = "4"
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200  # within 4 s the 2 s window frees again
            assert float(resp.headers["Server-Timing"].split("=")[1].split(",")[0]) > 1000
    assert sim.statuses()[429] == 0
