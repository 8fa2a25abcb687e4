"""The response cache across processes and by hand: a write through one replica purges
the copies of another sharing Redis (pub/sub, within a second); ``DELETE /admin/cache``;
what /admin/budget and the status page show. Real gateways, the real simulator, the test
Redis (fails, never skips, without it)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.sim import Faults
from tests.conftest import ADMIN_TOKEN, GatewayHandle, SimHandle
from tests.gateway.test_cache import CACHE, call, no_429s, sent
from tests.state.test_token_store import REDIS_URL, scratch_redis

MakeGateway = Callable[..., Awaitable[GatewayHandle]]


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    async with scratch_redis() as (_, prefix):
        yield prefix


async def until(what: str, seconds: float, check: Callable[[], Awaitable[bool]]) -> float:
    """Wait (bounded) for ``check``; how long it took."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < seconds, f"{what}: not within {seconds} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def admin(gw: GatewayHandle, method: str, path: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.admin_url(path), headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_write_through_one_replica_purges_the_other_within_a_second(
    make_gateway: MakeGateway, sim: SimHandle, redis_prefix: str
) -> None:
    shared = {"state": REDIS_URL, "redis": {"key_prefix": redis_prefix}, "replicas": 2}
    one = await make_gateway(cache=CACHE, **shared)
    two = await make_gateway(cache=CACHE, **shared)
    assert one.runtime.cache is not None and two.runtime.cache is not None
    for gw in (one, two):  # both listening before the write
        channel = gw.runtime.cache.channel
        await asyncio.wait_for(channel.subscribed.wait(), 5)  # type: ignore[union-attr]
    token = await one.token("tags:read", "tags:write")  # tokens live in Redis: both know it
    _, _, before = await call("GET", two.url("/api/v1/tags"), token)
    _, headers, _ = await call("GET", two.url("/api/v1/tags"), token)
    assert headers["Cache-Status"].startswith("echowin-gateway; hit")
    status, _, _ = await call("POST", one.url("/api/v1/tags"), token, json={"name": "via-one"})
    assert status in (200, 201)
    cache_two = two.runtime.cache

    async def purged() -> bool:
        return cache_two.store.entries == 0

    assert await until("the purge reaching the other replica", 1.0, purged) < 1.0
    status, headers, after = await call("GET", two.url("/api/v1/tags"), token)
    assert status == 200
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss; stored"
    assert b"via-one" in after and b"via-one" not in before
    assert sent(sim, "GET", "/api/v1/tags") == 2
    no_429s(sim)


async def test_admin_purges_by_credential_and_prefix_and_shows_savings(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await make_gateway(cache=CACHE)
    team = await gw.token("tags:read", "boards:read", name="team")
    acme = await gw.token("tags:read", name="acme", upstream_key="acme")
    for token, path in ((team, "/api/v1/tags"), (team, "/api/v1/boards"), (acme, "/api/v1/tags")):
        for _ in range(2):
            assert (await call("GET", gw.url(path), token))[0] == 200
    status, body = await admin(gw, "GET", "/admin/budget")
    assert status == 200
    cache = body["cache"]
    assert cache["entries"] == 3
    assert cache["lookups"]["hit"] == 3 and cache["lookups"]["miss"] == 3
    assert cache["sends_saved"] == 3
    status, body = await admin(gw, "DELETE", "/admin/cache?credential=acme")
    assert (status, body["purged"]) == (200, 1)
    status, body = await admin(gw, "DELETE", "/admin/cache?prefix=/api/v1/bo")
    assert (status, body["purged"]) == (200, 1)
    assert (await call("GET", gw.url("/api/v1/tags"), team))[1]["Cache-Status"].startswith(
        "echowin-gateway; hit"
    )
    status, body = await admin(gw, "DELETE", "/admin/cache?credential=nobody")
    assert status == 400 and body["reason"] == "bad_request"
    status, body = await admin(gw, "DELETE", "/admin/cache")
    assert (status, body["purged"]) == (200, 1)
    async with aiohttp.ClientSession() as session, session.get(gw.admin_url("/status")) as resp:
        page = await resp.text()
    assert "Response cache" in page and "upstream sends saved" in page
    async with aiohttp.ClientSession() as session, session.get(gw.admin_url("/metrics")) as resp:
        metrics = await resp.text()
    assert 'echowin_gateway_cache_sends_saved_total{route="/api/v1/tags"} 3.0' in metrics
    assert 'echowin_gateway_cache_lookups_total{result="hit",route="/api/v1/boards"} 1.0' in metrics
    assert "echowin_gateway_cache_entries 0.0" in metrics


async def test_admin_cache_is_404_when_the_cache_is_off(gateway: GatewayHandle) -> None:
    status, body = await admin(gateway, "DELETE", "/admin/cache")
    assert status == 404 and body["reason"] == "not_found"
    status, body = await admin(gateway, "GET", "/admin/budget")
    assert "cache" not in body


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        (Faults(status=503), "stale-upstream-error"),
        (Faults(reset=True), "stale-unreachable"),
        (Faults(force_429=True, retry_after=30, count=1), "stale-frozen"),
        (Faults(latency_seconds=1.5), "stale-timeout"),
    ],
)
async def test_echowin_failing_gives_the_stale_copy(
    make_gateway: MakeGateway, sim: SimHandle, fault: Faults, detail: str
) -> None:
    gw = await make_gateway(
        cache={**CACHE, "routes": {"/api/v1/tags": 1}}, upstream={"timeout_seconds": 0.5}
    )
    clock = [1000.0]
    cache = gw.runtime.cache
    assert cache is not None
    cache.clock = cache.store.clock = lambda: clock[0]
    token = await gw.token("tags:read")
    _, _, kept = await call("GET", gw.url("/api/v1/tags"), token)
    clock[0] += 3
    sim.sim.set_faults(fault)
    status, headers, body = await call("GET", gw.url("/api/v1/tags"), token)
    assert status == 200
    assert body == kept
    assert headers["Cache-Status"] == f"echowin-gateway; hit; ttl=-2; detail={detail}"
    assert headers["Age"] == "3"
    status, _, body = await call(
        "GET", gw.url("/api/v1/tags"), token, {"Cache-Control": "no-cache"}
    )
    assert status in (429, 502, 503, 504)  # no-cache: the refusal or failure itself
    assert json.loads(body)["error"]


async def test_a_write_echowin_refused_purges_nothing_one_it_may_have_applied_does(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await make_gateway(cache=CACHE, upstream={"timeout_seconds": 0.5})
    token = await gw.token("tags:read", "tags:write")
    assert (await call("POST", gw.url("/api/v1/tags"), token, json={"name": "once"}))[0] == 201
    await call("GET", gw.url("/api/v1/tags"), token)
    status, _, _ = await call("POST", gw.url("/api/v1/tags"), token, json={"name": "once"})
    assert status == 409  # a duplicate: echowin changed nothing
    _, headers, _ = await call("GET", gw.url("/api/v1/tags"), token)
    assert headers["Cache-Status"].startswith("echowin-gateway; hit")
    sim.sim.set_faults(Faults(latency_seconds=1.5, count=1))
    status, _, _ = await call("POST", gw.url("/api/v1/tags"), token, json={"name": "late"})
    assert status == 504  # echowin may still have made it
    _, headers, _ = await call("GET", gw.url("/api/v1/tags"), token)
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss; stored"


async def test_callers_sharing_a_failing_flight_all_get_the_stale_copy(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await make_gateway(cache={**CACHE, "routes": {"/api/v1/tags": 1}})
    clock = [1000.0]
    cache = gw.runtime.cache
    assert cache is not None
    cache.clock = cache.store.clock = lambda: clock[0]
    token = await gw.token("tags:read")
    _, _, kept = await call("GET", gw.url("/api/v1/tags"), token)
    clock[0] += 10
    sim.sim.set_faults(Faults(status=503, latency_seconds=0.3, count=1))
    wave = await asyncio.gather(*(call("GET", gw.url("/api/v1/tags"), token) for _ in range(10)))
    assert [status for status, _, _ in wave] == [200] * 10
    assert {body for _, _, body in wave} == {kept}
    assert {h["Cache-Status"] for _, h, _ in wave} == {
        "echowin-gateway; hit; ttl=-9; detail=stale-upstream-error"
    }
    assert sent(sim, "GET", "/api/v1/tags") == 2
