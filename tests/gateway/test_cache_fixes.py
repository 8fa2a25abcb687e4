"""The response cache's edges end to end: fields the key does not hold, purges racing a
GET in flight, a stale copy's charge. The real gateway in front of the real simulator, on
loopback; concurrency made by the simulator's latency fault, waits bounded."""

from __future__ import annotations

import asyncio

import pytest

from proxy.sim import Faults
from tests.conftest import SimHandle
from tests.gateway.test_cache import (
    FakeClock,
    MakeGateway,
    cached_gateway,
    call,
    sent,
    until,
)

pytestmark = pytest.mark.filterwarnings("error")


async def test_a_conditional_get_neither_joins_nor_is_joined(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway)
    a = await gw.token("tags:read", "boards:read", name="a")
    b = await gw.token("tags:read", name="b")
    assert (await call("GET", gw.url("/api/v1/boards"), a))[0] == 200  # warm
    sim.sim.set_faults(Faults(latency_seconds=0.4, count=2))
    first = asyncio.ensure_future(call("GET", gw.url("/api/v1/tags"), a, {"If-None-Match": '"v1"'}))
    await until(lambda: sim.sim.faults_left == 1)  # A's GET is at echowin
    status, headers, body = await call("GET", gw.url("/api/v1/tags"), b)
    assert status == 200 and body
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss; stored"
    _, a_headers, _ = await first
    assert a_headers["Cache-Status"] == "echowin-gateway; fwd=bypass; detail=unkeyed-field"
    assert sent(sim, "GET", "/api/v1/tags") == 2


async def test_a_field_the_key_does_not_hold_gets_no_copy_and_leaves_none(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway)
    token = await gw.token("tags:read")
    for language in ("fr", "en"):
        _, headers, _ = await call(
            "GET", gw.url("/api/v1/tags"), token, {"Accept-Language": language}
        )
        assert headers["Cache-Status"] == "echowin-gateway; fwd=bypass; detail=unkeyed-field"
    assert sent(sim, "GET", "/api/v1/tags") == 2
    _, headers, _ = await call("GET", gw.url("/api/v1/tags"), token)
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss; stored"
    for extra in ({"Accept-Language": "fr"}, {"Cookie": "a=1"}, {"X-Tenant": "t"}):
        _, headers, _ = await call("GET", gw.url("/api/v1/tags"), token, extra)
        assert headers["Cache-Status"].startswith("echowin-gateway; fwd=bypass"), extra
    assert sent(sim, "GET", "/api/v1/tags") == 6
    # Fields that never change the answer keep the copy.
    safe = {"User-Agent": "svc/1", "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    _, headers, _ = await call("GET", gw.url("/api/v1/tags"), token, safe)
    assert headers["Cache-Status"].startswith("echowin-gateway; hit")
    # The copy held is not this request's: only-if-cached finds nothing.
    only = {"Prefer": "return=minimal", "Cache-Control": "only-if-cached"}
    status, headers, _ = await call("GET", gw.url("/api/v1/tags"), token, only)
    assert status == 504
    assert sent(sim, "GET", "/api/v1/tags") == 6


async def test_a_purge_while_a_no_cache_get_is_at_echowin_keeps_its_answer_out(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway)
    token = await gw.token("tags:read", "tags:write", "boards:read")
    assert (await call("GET", gw.url("/api/v1/boards"), token))[0] == 200  # warm
    sim.sim.set_faults(Faults(latency_seconds=0.5, count=1))
    reading = asyncio.ensure_future(
        call("GET", gw.url("/api/v1/tags"), token, {"Cache-Control": "no-cache"})
    )
    await until(lambda: sim.sim.faults is None)  # the GET is at echowin
    status, _, _ = await call("POST", gw.url("/api/v1/tags"), token, json={"name": "late"})
    assert status in (200, 201)
    _, headers, _ = await reading
    # Real echowin may have read the list before the write: nothing it brought is kept.
    assert headers["Cache-Status"] == "echowin-gateway; fwd=request"
    _, headers, body = await call("GET", gw.url("/api/v1/tags"), token)
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss; stored"
    assert b"late" in body


async def test_a_stale_copy_in_place_of_echowins_error_is_charged_once(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway, routes={"/api/v1/tags": 1})
    cache = gw.runtime.cache
    assert cache is not None
    clock = FakeClock()
    cache.clock = cache.store.clock = clock
    token = await gw.token("tags:read", per_minute=4)
    assert (await call("GET", gw.url("/api/v1/tags"), token))[0] == 200  # 1 charged
    clock.now += 5  # stale
    sim.sim.set_faults(Faults(status=500, count=1))
    status, headers, _ = await call("GET", gw.url("/api/v1/tags"), token)  # 2 charged
    assert status == 200
    assert headers["Cache-Status"].endswith("detail=stale-upstream-error")
    later = [(await call("GET", gw.url("/api/v1/tags"), token))[0] for _ in range(3)]
    assert later == [200, 200, 429]  # 3 (a miss) and 4 (a hit), then the quota is spent
    assert sent(sim, "GET", "/api/v1/tags") == 3


async def test_a_copy_to_be_revalidated_does_not_stand_in_for_echowins_error(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway, routes={"/api/v1/tags": 1})
    cache = gw.runtime.cache
    assert cache is not None
    clock = FakeClock()
    cache.clock = cache.store.clock = clock
    token = await gw.token("tags:read")
    assert (await call("GET", gw.url("/api/v1/tags"), token))[0] == 200
    (key,) = cache.store._entries.keys()
    entry = cache.store.get(key)
    assert entry is not None and not entry.must_revalidate
    # As if echowin had said "Cache-Control: max-age=1, must-revalidate" (the simulator
    # sends no Cache-Control): what fetch.py reads from it is recorded on the copy.
    cache.store.put(key, entry.answer, entry.fresh_for, must_revalidate=True)
    clock.now += 5
    sim.sim.set_faults(Faults(status=500, count=1))
    status, headers, _ = await call("GET", gw.url("/api/v1/tags"), token)
    assert status == 500
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss"
    status, _, _ = await call(
        "GET", gw.url("/api/v1/tags"), token, {"Cache-Control": "max-stale, only-if-cached"}
    )
    assert status == 504
