"""The Simulator: its public names, config, auth, rate headers, spend, log and run loop.

Window math runs on a fake clock that tests move by hand."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest

import proxy.sim
from proxy.sim import (
    SimConfig,
    SimLimit,
    Simulator,
    run_simulator,
)
from tests.sim.conftest import (
    AGENCY,
    AGENCY_H,
    RATE_LIMITED,
    START,
    TEAM,
    TEAM_B,
    TEAM_H,
    WALL_AT_START,
    Client,
    FakeClock,
    StartSim,
    get_tags,
)


def test_public_names_are_pinned() -> None:
    assert sorted(proxy.sim.__all__) == sorted(
        [
            "NO_RESPONSE",
            "SIMULATOR",
            "Faults",
            "RecordedRequest",
            "SimConfig",
            "SimLimit",
            "Simulator",
            "parse_limit",
            "run_simulator",
        ]
    )


def test_config_rejects_a_bare_string_as_key_set() -> None:
    with pytest.raises(TypeError, match="team_keys"):
        SimConfig(team_keys="abc")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"limits": ()}, "at least one"),
        ({"reset_format": "rfc"}, "reset_format"),
        ({"log_size": 0}, "log_size"),
        ({"team_keys": frozenset({""})}, "non-empty"),
    ],
)
def test_config_validates_each_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimConfig(**({"team_keys": frozenset({TEAM})} | overrides))


def test_app_is_built_once(sim: Simulator) -> None:
    with pytest.raises(RuntimeError, match="already called"):
        sim.app()


# --- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "error"),
    [
        ("/api/v1/tags", {}, "Missing X-API-Key header"),
        ("/api/v1/tags", {"X-API-Key": "nope"}, "Invalid API key"),
        ("/api/v1/tags", {"X-API-Key": AGENCY}, "Invalid API key"),
        ("/api/v1/tags", {"X-AGENCY-KEY": AGENCY}, "Missing X-API-Key header"),
        ("/api/v1/agency/subteams", {}, "Missing X-AGENCY-KEY header"),
        ("/api/v1/agency/subteams", {"X-API-Key": TEAM}, "Missing X-AGENCY-KEY header"),
        ("/api/v1/agency/subteams", {"X-AGENCY-KEY": "nope"}, "Invalid API key"),
        ("/api/v1/agency/subteams", {"X-AGENCY-KEY": TEAM}, "Invalid API key"),
        ("/api/v1/no-such-route", {}, "Missing X-API-Key header"),
    ],
)
async def test_auth_failures_answer_401_uncounted_without_rate_headers(
    sim: Simulator, client: Client, path: str, headers: dict[str, str], error: str
) -> None:
    response = await client.post(path, json={}, headers=headers)
    assert response.status == 401
    assert await response.json() == {"error": error}
    assert "X-RateLimit-Remaining" not in response.headers

    ok = await client.get("/api/v1/tags", headers=TEAM_H)
    assert ok.headers["X-RateLimit-Remaining"] == "99"  # the 401 spent nothing


async def test_rolling_windows_refuse_past_any_limit_without_counting_refusals(
    start_sim: StartSim, clock: FakeClock
) -> None:
    sim, client = await start_sim(limits=(SimLimit(3, 10), SimLimit(5, 60)))
    t0 = clock.now
    for remaining in ("2", "1", "0"):
        response = await get_tags(client)
        assert (response.status, response.headers["X-RateLimit-Remaining"]) == (200, remaining)
        clock.advance(1)

    refused = await get_tags(client)  # t0+3: the 10 s window holds t0, t0+1, t0+2
    assert refused.status == 429
    assert await refused.json() == RATE_LIMITED
    assert refused.headers["Retry-After"] == "7"  # t0 leaves at t0+10
    assert refused.headers["X-RateLimit-Remaining"] == "0"

    clock.now = t0 + 9.5
    assert (await get_tags(client)).headers["Retry-After"] == "1"  # 0.5 s, rounded up

    clock.now = t0 + 10  # t0 has just left the 10 s window
    assert (await get_tags(client)).status == 200
    assert (await get_tags(client)).headers["Retry-After"] == "1"  # t0+1 leaves at t0+11
    clock.now = t0 + 11
    assert (await get_tags(client)).status == 200  # the 60 s window now holds 5

    clock.now = t0 + 12.5  # the 10 s window has room, the 60 s one does not
    refused = await get_tags(client)
    assert (refused.status, refused.headers["Retry-After"]) == (429, "48")

    # Had any of the four refusals counted, the 60 s window would still be full here.
    clock.now = t0 + 60
    assert (await get_tags(client)).status == 200
    assert sim.statuses() == {200: 6, 429: 4}


async def test_rate_headers_report_longest_limit_and_binding_window(
    start_sim: StartSim, clock: FakeClock
) -> None:
    _, client = await start_sim(limits=(SimLimit(3, 10), SimLimit(4, 60)))
    first = await get_tags(client)
    assert first.headers["X-RateLimit-Limit"] == "4"  # the longest window's limit
    assert first.headers["X-RateLimit-Remaining"] == "2"  # min(3 - 1, 4 - 1)
    assert first.headers["X-RateLimit-Reset"] == str(WALL_AT_START + 10)  # binding: 10 s

    clock.advance(20)  # the 10 s window empties; the 60 s one still holds the first send
    second = await get_tags(client)
    assert second.headers["X-RateLimit-Remaining"] == "2"  # 3 - 1 and 4 - 2 tie...
    # ...so the window whose oldest send leaves last binds: the 60 s one.
    assert second.headers["X-RateLimit-Reset"] == str(WALL_AT_START + 60)


async def test_by_default_remaining_describes_the_longest_window(
    start_sim: StartSim, clock: FakeClock
) -> None:
    _, client = await start_sim(
        limits=(SimLimit(3, 10), SimLimit(10, 60)), remaining_window="longest"
    )
    for expected in ("9", "8", "7"):
        response = await get_tags(client)
        assert response.headers["X-RateLimit-Remaining"] == expected
        assert response.headers["X-RateLimit-Reset"] == str(WALL_AT_START + 60)
    refused = await get_tags(client)  # the 10 s window is full even though 7 remain per hour
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "10"


async def test_reset_header_can_be_iso_8601(start_sim: StartSim) -> None:
    _, client = await start_sim(reset_format="iso", limits=(SimLimit(100, 3600),))
    response = await get_tags(client)
    assert response.headers["X-RateLimit-Reset"] == "2026-11-26T17:00:00Z"


async def test_every_answer_to_a_valid_key_carries_rate_headers(client: Client) -> None:
    answers = [
        await client.get("/api/v1/contacts", headers=TEAM_H),
        await client.post("/api/v1/contacts", json={}, headers=TEAM_H),
        await client.get("/api/v1/contacts/missing", headers=TEAM_H),
        await client.get("/api/v1/nothing-here", headers=TEAM_H),
        await client.post("/api/v1/agency/subteams", json={}, headers=AGENCY_H),
    ]
    assert [a.status for a in answers] == [200, 400, 404, 404, 400]
    for answer in answers:
        assert answer.headers["X-RateLimit-Limit"] == "1000"
        assert re.fullmatch(r"\d+", answer.headers["X-RateLimit-Reset"])
    # Agency and team keys keep separate budgets.
    assert [a.headers["X-RateLimit-Remaining"] for a in answers] == ["99", "98", "97", "96", "99"]


# --- spend ------------------------------------------------------------------------------------


async def test_spend_eats_the_keys_budget(sim: Simulator, client: Client) -> None:
    sim.spend(TEAM, 99)
    assert (await get_tags(client)).headers["X-RateLimit-Remaining"] == "0"
    refused = await get_tags(client)
    assert (refused.status, refused.headers["Retry-After"]) == (429, "60")
    other = await client.get("/api/v1/tags", headers={"X-API-Key": TEAM_B})
    assert other.status == 200


async def test_spend_over_the_endpoint_may_exceed_the_limits(
    sim: Simulator, client: Client, clock: FakeClock
) -> None:
    response = await client.post("/_sim/spend", json={"key": TEAM, "n": 500})
    assert (response.status, await response.json()) == (200, {"spent": 500})
    assert (await get_tags(client)).status == 429
    clock.advance(60)
    allowed = await get_tags(client)
    assert allowed.status == 200
    assert allowed.headers["X-RateLimit-Remaining"] == "99"  # hour: 1000 - 501; minute: 99


@pytest.mark.parametrize(
    "body", [{"key": "stranger", "n": 1}, {"key": TEAM, "n": -1}, {"key": TEAM}, {"n": 1}]
)
async def test_spend_rejects_unknown_keys_and_bad_counts(client: Client, body: Any) -> None:
    response = await client.post("/_sim/spend", json=body)
    assert response.status == 400
    assert set(await response.json()) == {"error"}


def test_spend_refuses_a_key_the_simulator_does_not_hold(clock: FakeClock) -> None:
    sim = Simulator(SimConfig(team_keys=frozenset({TEAM})), clock=clock)
    with pytest.raises(ValueError, match="not one of"):
        sim.spend("stranger", 1)


# --- request log ------------------------------------------------------------------------------


async def test_log_records_what_the_simulator_received(
    sim: Simulator, client: Client, clock: FakeClock
) -> None:
    await client.get(
        "/api/v1/contacts?page=2&limit=5",
        headers=TEAM_H | {"Authorization": "Bearer internal", "X-Trace": "t1"},
    )
    clock.advance(2)
    await client.get("/api/v1/tags", headers={"X-API-Key": "wrong"})
    await client.get("/_sim/requests")  # control traffic is not recorded

    first, second = sim.log
    assert (first.at, first.method, first.path) == (START, "GET", "/api/v1/contacts?page=2&limit=5")
    assert (first.key, first.status) == (TEAM, 200)
    assert first.headers["X-Trace"] == "t1"
    assert first.header("authorization") == "Bearer internal"
    assert (second.at, second.key, second.status) == (START + 2, "wrong", 401)
    assert second.header("Authorization") is None
    assert sim.statuses() == {200: 1, 401: 1}


async def test_log_is_served_and_cleared_over_http(sim: Simulator, client: Client) -> None:
    await get_tags(client)
    body = await (await client.get("/_sim/requests")).json()
    assert body["statuses"] == {"200": 1}
    [entry] = body["requests"]
    assert entry == sim.log[0].to_json()
    assert entry["path"] == "/api/v1/tags"
    assert entry["headers"]["X-API-Key"] == TEAM

    assert (await client.delete("/_sim/requests")).status == 200
    assert len(sim.log) == 0
    assert sim.statuses() == {}
    assert (await (await client.get("/_sim/requests")).json())["requests"] == []


async def test_log_keeps_only_the_newest_entries(start_sim: StartSim, clock: FakeClock) -> None:
    sim, client = await start_sim(log_size=3)
    for _ in range(5):
        await get_tags(client)
        clock.advance(1)
    assert [r.at for r in sim.log] == [START + 2, START + 3, START + 4]
    assert sim.statuses() == {200: 5}


async def test_control_routes_are_json_and_keyless(client: Client) -> None:
    assert await (await client.get("/_sim/healthz")).json() == {"status": "ok"}
    missing = await client.get("/_sim/nothing")
    assert (missing.status, await missing.json()) == (404, {"error": "Not found"})


# --- run_simulator ----------------------------------------------------------------------------


async def test_run_simulator_prints_its_address_and_serves_until_cancelled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = SimConfig(team_keys=frozenset({TEAM}))
    task = asyncio.create_task(run_simulator(config, "127.0.0.1", 0))
    out = ""
    for _ in range(500):  # bounded wait for the socket to be bound
        out += capsys.readouterr().out
        if out:
            break
        await asyncio.sleep(0.01)
    match = re.fullmatch(r"echowin simulator listening on http://127\.0\.0\.1:(\d+)\n", out)
    assert match, out
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{match[1]}/api/v1/tags"
        async with session.get(url, headers=TEAM_H) as response:
            assert (response.status, await response.json()) == (200, {"data": []})
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
