"""The response cache end to end (SPEC §5 "Budget savers"): the real gateway in front of
the real simulator, on loopback. Concurrency is made by the simulator's latency fault;
nothing here sleeps to hope."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.sim import Faults
from proxy.sim.echo import encode
from tests.conftest import SECRETS, TEAM_KEY, GatewayHandle, SimHandle
from tests.gateway.test_handler import access_lines, capture_access_log

MakeGateway = Callable[..., Awaitable[GatewayHandle]]

CACHE: dict[str, Any] = {
    "stale_seconds": 300,
    "routes": {
        "/api/v1/tags": 60,
        "/api/v1/boards": 60,
        "/api/v1/contacts": 10,
        "/api/v1/contacts/{contactId}": 10,
    },
}


async def call(
    method: str,
    url: str,
    token: str,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> tuple[int, dict[str, str], bytes]:
    fields = {"Authorization": f"Bearer {token}", **(headers or {})}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=fields, **kw) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


def sent(sim: SimHandle, method: str, path: str) -> int:
    """Requests echowin received for ``method path`` (path without query)."""
    return sum(1 for r in sim.sim.log if r.method == method and r.path.split("?")[0] == path)


def no_429s(sim: SimHandle) -> None:
    assert sim.sim.statuses()[429] == 0


async def cached_gateway(make_gateway: MakeGateway, **cache: Any) -> GatewayHandle:
    return await make_gateway(cache={**CACHE, **cache})


async def test_thirty_identical_gets_make_one_upstream_request_and_a_second_wave_none(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway)
    token = await gw.token("tags:read", "boards:read")
    # Warm: the token verified, the lane calibrated by echowin's first answer (until then
    # it sends one request at a time, and the 29 would be answered from the stored copy).
    assert (await call("GET", gw.url("/api/v1/boards"), token))[0] == 200
    sim.sim.set_faults(Faults(latency_seconds=0.3, count=1))
    first = await asyncio.gather(*(call("GET", gw.url("/api/v1/tags"), token) for _ in range(30)))
    assert {status for status, _, _ in first} == {200}
    assert sent(sim, "GET", "/api/v1/tags") == 1
    statuses = sorted(headers["Cache-Status"] for _, headers, _ in first)
    assert statuses.count("echowin-gateway; fwd=miss; stored") == 1
    assert statuses.count("echowin-gateway; fwd=miss; collapsed") == 29
    bodies = {body for _, _, body in first}
    assert len(bodies) == 1
    second = await asyncio.gather(*(call("GET", gw.url("/api/v1/tags"), token) for _ in range(30)))
    assert sent(sim, "GET", "/api/v1/tags") == 1
    for status, headers, body in second:
        assert status == 200
        assert headers["Cache-Status"].startswith("echowin-gateway; hit; ttl=")
        assert int(headers["Age"]) >= 0
        assert body in bodies
    no_429s(sim)


async def test_a_write_purges_and_the_next_get_shows_it(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway)
    token = await gw.token("tags:read", "tags:write", "contacts:read")
    status, _, body = await call("GET", gw.url("/api/v1/tags"), token)
    assert status == 200
    before = json.loads(body)["data"]
    await call("GET", gw.url("/api/v1/contacts?page=1"), token)
    _, headers, _ = await call("GET", gw.url("/api/v1/tags"), token)
    assert headers["Cache-Status"].startswith("echowin-gateway; hit; ttl=")
    status, _, _ = await call("POST", gw.url("/api/v1/tags"), token, json={"name": "fresh"})
    assert status in (200, 201)
    status, headers, body = await call("GET", gw.url("/api/v1/tags"), token)
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss; stored"
    after = json.loads(body)["data"]
    assert len(after) == len(before) + 1
    assert any(tag["name"] == "fresh" for tag in after)
    # POST /api/v1/tags purges the contact lists too (their availableTags).
    _, headers, _ = await call("GET", gw.url("/api/v1/contacts?page=1"), token)
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss; stored"
    assert sent(sim, "GET", "/api/v1/tags") == 2
    no_429s(sim)


async def test_no_answer_crosses_credentials(make_gateway: MakeGateway, sim: SimHandle) -> None:
    gw = await cached_gateway(make_gateway)
    team = await gw.token("tags:read", name="team")
    acme = await gw.token("tags:read", "tags:write", name="acme", upstream_key="acme")
    await call("POST", gw.url("/api/v1/tags"), acme, json={"name": "acme-only"})
    _, _, team_body = await call("GET", gw.url("/api/v1/tags"), team)
    status, headers, acme_body = await call("GET", gw.url("/api/v1/tags"), acme)
    assert status == 200
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss; stored"
    assert b"acme-only" in acme_body and b"acme-only" not in team_body
    assert sent(sim, "GET", "/api/v1/tags") == 2


async def test_a_token_without_the_scope_gets_403_on_a_cached_route(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway)
    reader = await gw.token("tags:read", name="reader")
    other = await gw.token("boards:read", name="other")
    assert (await call("GET", gw.url("/api/v1/tags"), reader))[0] == 200
    status, headers, body = await call("GET", gw.url("/api/v1/tags"), other)
    assert status == 403
    assert json.loads(body)["reason"] == "missing_scope"
    assert "Cache-Status" not in headers
    assert sent(sim, "GET", "/api/v1/tags") == 1


async def test_budget_out_gives_the_stale_copy_and_max_stale_0_the_refusal(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    limits = [{"requests": 3, "per_seconds": 3600}]
    gw = await make_gateway(
        cache={**CACHE, "routes": {"/api/v1/tags": 1}},
        upstream={"limits": limits},
        queue={"max_wait_seconds": 0},
    )
    clock = FakeClock()
    assert gw.runtime.cache is not None
    gw.runtime.cache.clock = clock
    gw.runtime.cache.store.clock = clock
    token = await gw.token("tags:read", "boards:read")
    status, _, kept = await call("GET", gw.url("/api/v1/tags"), token)
    assert status == 200
    for _ in range(2):  # the rest of the budget
        assert (await call("GET", gw.url("/api/v1/boards"), token))[0] == 200
    clock.now += 5  # the copy is 4 s past its 1 s TTL
    status, headers, body = await call("GET", gw.url("/api/v1/tags"), token)
    assert status == 200, body
    assert body == kept
    assert headers["Cache-Status"] == "echowin-gateway; hit; ttl=-4; detail=stale-budget"
    assert headers["Age"] == "5"
    status, headers, body = await call(
        "GET", gw.url("/api/v1/tags"), token, {"Cache-Control": "max-stale=0"}
    )
    assert status == 429
    assert json.loads(body)["reason"] == "upstream_budget"
    status, _, _ = await call(
        "GET", gw.url("/api/v1/tags"), token, {"Cache-Control": "max-stale=10"}
    )
    assert status == 200
    assert sent(sim, "GET", "/api/v1/tags") == 1
    no_429s(sim)


async def test_only_if_cached_on_an_empty_cache_is_504(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway)
    token = await gw.token("tags:read")
    status, headers, body = await call(
        "GET", gw.url("/api/v1/tags"), token, {"Cache-Control": "only-if-cached"}
    )
    assert status == 504
    assert json.loads(body)["reason"] == "not_cached"
    assert sent(sim, "GET", "/api/v1/tags") == 0
    await call("GET", gw.url("/api/v1/tags"), token)
    status, headers, _ = await call(
        "GET", gw.url("/api/v1/tags"), token, {"Cache-Control": "only-if-cached"}
    )
    assert status == 200
    assert headers["Cache-Status"].startswith("echowin-gateway; hit")
    assert sent(sim, "GET", "/api/v1/tags") == 1


@pytest.mark.parametrize(("form", "gzipped"), [("verbatim", False), ("base64_1", True)])
async def test_no_copy_ever_holds_the_key(
    make_gateway: MakeGateway, sim: SimHandle, form: str, gzipped: bool
) -> None:
    gw = await cached_gateway(make_gateway)
    token = await gw.token("tags:read")
    sim.sim.set_faults(Faults(echo_key=form, echo_in="body", gzip=gzipped, count=1))
    headers = {"Accept-Encoding": "gzip"} if gzipped else {}
    _, _, first = await call("GET", gw.url("/api/v1/tags"), token, headers)
    _, cached, second = await call("GET", gw.url("/api/v1/tags"), token, headers)
    assert cached["Cache-Status"].startswith("echowin-gateway; hit")
    assert first == second
    assert sent(sim, "GET", "/api/v1/tags") == 1
    echoed = encode(form, TEAM_KEY)
    for body in (first, second):
        assert echoed not in body
        assert all(secret.encode() not in body for secret in SECRETS)
    cache = gw.runtime.cache
    assert cache is not None and cache.store.entries == 1
    (key,) = cache.store._entries.keys()
    entry = cache.store.get(key)
    assert entry is not None
    assert echoed not in entry.answer.body
    assert all(TEAM_KEY not in value for _, value in entry.answer.headers)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


pytestmark = pytest.mark.filterwarnings("error")


async def test_a_leaving_first_caller_does_not_cancel_the_others(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway)
    cache = gw.runtime.cache
    assert cache is not None
    token = await gw.token("tags:read", "boards:read")
    assert (await call("GET", gw.url("/api/v1/boards"), token))[0] == 200  # warm
    sim.sim.set_faults(Faults(latency_seconds=0.5, count=1))
    first = asyncio.ensure_future(call("GET", gw.url("/api/v1/tags"), token))
    await until(lambda: len(cache.flights) == 1)
    (flight,) = cache.flights._flying.values()
    others = [asyncio.ensure_future(call("GET", gw.url("/api/v1/tags"), token)) for _ in range(5)]
    await until(lambda: flight.joined == 5)
    first.cancel()  # the first caller hangs up; its handler is cancelled
    results = await asyncio.gather(*others)
    assert [status for status, _, _ in results] == [200] * 5
    assert {h["Cache-Status"] for _, h, _ in results} == {"echowin-gateway; fwd=miss; collapsed"}
    assert sent(sim, "GET", "/api/v1/tags") == 1
    # The flight's answer was kept although its first caller left.
    _, headers, _ = await call("GET", gw.url("/api/v1/tags"), token)
    assert headers["Cache-Status"].startswith("echowin-gateway; hit")


async def test_a_hit_counts_against_the_tokens_own_quota_not_the_budget(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway)
    token = await gw.token("tags:read", per_minute=3)
    answers = [await call("GET", gw.url("/api/v1/tags"), token) for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 429]
    assert json.loads(answers[3][2])["reason"] == "token_quota"
    assert answers[1][1]["Content-Type"] == answers[0][1]["Content-Type"]
    assert answers[1][1]["Content-Type"].startswith("application/json")
    assert sent(sim, "GET", "/api/v1/tags") == 1
    budget = gw.runtime.admitter.snapshot()["default"]
    assert budget["windows"][0]["used"] == 1  # type: ignore[index]


async def test_a_route_not_kept_shares_flights_but_keeps_nothing(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway, routes={"/api/v1/tags": 60})
    token = await gw.token("boards:read", "tags:read")
    assert (await call("GET", gw.url("/api/v1/tags"), token))[0] == 200  # warm
    sim.sim.set_faults(Faults(latency_seconds=0.3, count=1))
    wave = await asyncio.gather(*(call("GET", gw.url("/api/v1/boards"), token) for _ in range(10)))
    assert {status for status, _, _ in wave} == {200}
    assert sent(sim, "GET", "/api/v1/boards") == 1
    statuses = sorted(h["Cache-Status"] for _, h, _ in wave)
    assert statuses == ["echowin-gateway; fwd=miss"] + ["echowin-gateway; fwd=miss; collapsed"] * 9
    _, headers, _ = await call("GET", gw.url("/api/v1/boards"), token)
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss"
    assert sent(sim, "GET", "/api/v1/boards") == 2


async def until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_the_access_log_says_what_the_cache_did(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await cached_gateway(make_gateway)
    token = await gw.token("tags:read", "tags:write")
    buffer = capture_access_log(gw)
    await call("GET", gw.url("/api/v1/tags"), token)
    await call("GET", gw.url("/api/v1/tags"), token)
    await call("GET", gw.url("/api/v1/tags"), token, {"Cache-Control": "no-cache"})
    await call("POST", gw.url("/api/v1/tags"), token, json={"name": "logged"})
    lines = access_lines(gw, buffer)
    assert [line.get("cache") for line in lines] == ["miss", "hit", "bypass", None]
    assert "cache" not in lines[3]  # a write has no cache field
    assert lines[1]["upstream_status"] is None and lines[1]["status"] == 200


async def test_the_callers_max_age_and_no_store(make_gateway: MakeGateway, sim: SimHandle) -> None:
    gw = await cached_gateway(make_gateway)
    cache = gw.runtime.cache
    assert cache is not None
    clock = FakeClock()
    cache.clock = cache.store.clock = clock
    token = await gw.token("tags:read")
    _, headers, _ = await call("GET", gw.url("/api/v1/tags"), token, {"Cache-Control": "no-store"})
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss"  # not kept
    await call("GET", gw.url("/api/v1/tags"), token)
    clock.now += 20
    _, headers, _ = await call(
        "GET", gw.url("/api/v1/tags"), token, {"Cache-Control": "max-age=30"}
    )
    assert headers["Cache-Status"] == "echowin-gateway; hit; ttl=40"
    assert headers["Age"] == "20"
    _, headers, _ = await call(
        "GET", gw.url("/api/v1/tags"), token, {"Cache-Control": "max-age=10"}
    )
    assert headers["Cache-Status"] == "echowin-gateway; fwd=miss; stored"  # too old for it
    _, headers, _ = await call("GET", gw.url("/api/v1/tags"), token, {"Pragma": "no-cache"})
    assert headers["Cache-Status"] == "echowin-gateway; fwd=request; stored"
    assert sent(sim, "GET", "/api/v1/tags") == 4
