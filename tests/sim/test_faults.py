"""The simulator's faults: validated, switched over HTTP, applied to API answers."""

from __future__ import annotations

import binascii
import gzip
import json
import time
import urllib.parse
import zlib
from typing import Any

import aiohttp
import pytest

from proxy.sim import (
    NO_RESPONSE,
    Faults,
    SimConfig,
    Simulator,
)
from tests.sim.conftest import (
    AGENCY,
    AGENCY_H,
    RATE_LIMITED,
    TEAM,
    TEAM_H,
    AiohttpClient,
    Client,
    StartSim,
    get_tags,
)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"latency_seconds": -1}, "latency_seconds"),
        ({"arrival_delay_seconds": 601}, "arrival_delay_seconds"),
        ({"status": 200}, "status"),
        ({"retry_after": 0}, "retry_after"),
        ({"count": 0}, "count"),
    ],
)
def test_faults_validate_ranges(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Faults(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"echo_key": "rot13"}, "echo_key must be one of verbatim, upper"),
        ({"echo_key": "verbatim", "echo_in": "footer"}, "echo_in must be one of body, header"),
        ({"echo_in": "header"}, "echo_in needs echo_key"),
        ({"echo_key": "utf16le", "echo_in": "header"}, "cannot go in a header"),
        ({"echo_key": "utf16be", "echo_in": "location"}, "cannot go in a header"),
        ({"echo_key": "utf16le", "echo_in": "split_headers"}, "cannot go in a header"),
        ({"echo_key": "verbatim", "echo_percent": (1,)}, "echo_percent applies only"),
        ({"echo_key": "upper", "echo_swapcase": (1,)}, "echo_swapcase applies only"),
        ({"echo_key": "percent_some", "echo_percent": (-1,)}, "echo_percent must hold"),
        ({"echo_key": "percent_some", "echo_percent": (True,)}, "echo_percent must hold"),
        ({"echo_key": "mixed_case", "echo_swapcase": (4096,)}, "echo_swapcase must hold"),
        ({"echo_key": "mixed_case", "echo_swapcase": "12"}, "echo_swapcase must be a sequence"),
        ({"echo_key": "percent_some", "echo_percent": (0,) * 4097}, "at most 4096 positions"),
    ],
)
def test_echo_faults_validate_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Faults(**fields)


def test_echo_faults_keep_positions_as_tuples_and_round_trip_through_json() -> None:
    faults = Faults(echo_key="percent_some", echo_in="gzip", echo_percent=[3, 1])  # type: ignore[arg-type]
    assert faults.echo_percent == (3, 1)
    assert Faults.from_json(json.loads(json.dumps(faults.to_json()))) == faults


async def test_latency_fault_delays_the_answer(sim: Simulator, client: Client) -> None:
    sim.set_faults(Faults(latency_seconds=0.05))
    began = time.monotonic()
    response = await get_tags(client)
    assert response.status == 200
    assert time.monotonic() - began >= 0.05


async def test_arrival_delay_counts_the_request_when_it_arrives(
    aiohttp_client: AiohttpClient,
) -> None:
    """The request is held on its way in: its arrival, the time its windows count from, is
    read after the delay (a real clock here), and the answer follows."""
    sim = Simulator(SimConfig(team_keys=frozenset({TEAM})), clock=time.monotonic)
    client = await aiohttp_client(sim.app())
    sim.set_faults(Faults(arrival_delay_seconds=0.05, count=1))
    sent_at = time.monotonic()
    response = await get_tags(client)
    assert response.status == 200
    assert sim.log[-1].at >= sent_at + 0.05
    assert sim.faults is None  # its one use, taken at arrival


async def test_status_fault_answers_json_5xx_for_count_requests_then_clears(
    sim: Simulator, client: Client
) -> None:
    sim.set_faults(Faults(status=503, count=1))
    failed = await get_tags(client)
    assert (failed.status, await failed.json()) == (503, {"error": "Service Unavailable"})
    # echowin may have counted a request it then failed: the simulator does.
    assert failed.headers["X-RateLimit-Remaining"] == "99"
    assert sim.faults is None
    assert (await get_tags(client)).status == 200


async def test_reset_fault_drops_the_connection_unanswered(sim: Simulator, client: Client) -> None:
    sim.set_faults(Faults(reset=True))
    with pytest.raises(aiohttp.ClientError):
        await client.get("/api/v1/tags", headers=TEAM_H)
    assert sim.log[-1].status == NO_RESPONSE
    sim.clear_faults()
    assert (await get_tags(client)).status == 200


async def test_force_429_refuses_without_counting(sim: Simulator, client: Client) -> None:
    sim.set_faults(Faults(force_429=True, retry_after=7, count=1))
    refused = await get_tags(client)
    assert refused.status == 429
    assert await refused.json() == RATE_LIMITED
    assert refused.headers["Retry-After"] == "7"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    after = await get_tags(client)
    assert (after.status, after.headers["X-RateLimit-Remaining"]) == (200, "99")


async def test_gzip_fault_sends_gzip_bytes(start_sim: StartSim) -> None:
    sim, client = await start_sim(client_kwargs={"auto_decompress": False})
    sim.set_faults(Faults(gzip=True))
    response = await client.get("/api/v1/tags", headers=TEAM_H)
    raw = await response.read()
    assert response.headers["Content-Encoding"] == "gzip"
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw)) == {"data": []}


async def test_faults_are_switched_over_http(client: Client) -> None:
    response = await client.post("/_sim/faults", json={"status": 500, "count": 2})
    assert (await response.json())["faults"]["status"] == 500
    # Control requests neither use up a counted fault nor get faulted.
    assert (await (await client.get("/_sim/faults")).json())["left"] == 2
    assert (await get_tags(client)).status == 500
    assert (await (await client.get("/_sim/faults")).json())["left"] == 1
    assert [(await get_tags(client)).status for _ in range(2)] == [500, 200]
    assert await (await client.get("/_sim/faults")).json() == {"faults": None, "left": None}

    await client.post("/_sim/faults", json={"force_429": True})
    assert [(await get_tags(client)).status for _ in range(2)] == [429, 429]
    await client.delete("/_sim/faults")
    assert (await get_tags(client)).status == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"status": "500"}, "status"),
        ({"status": 200}, "status"),
        ({"reset": 1}, "reset"),
        ({"latency_seconds": "slow"}, "latency_seconds"),
        ({"count": 1.5}, "count"),
        ([], "object"),
        ({"echo_key": 5}, "echo_key"),
        ({"echo_key": "rot13"}, "echo_key"),
        ({"echo_key": "hex", "echo_in": "moon"}, "echo_in"),
        ({"echo_key": "hex", "echo_in": 3}, "echo_in"),
        ({"echo_key": "hex", "echo_in": ""}, "echo_in"),
        ({"echo_key": "percent_some", "echo_percent": "1,2"}, "echo_percent"),
        ({"echo_key": "percent_some", "echo_percent": [1.5]}, "echo_percent"),
        ({"echo_key": "mixed_case", "echo_swapcase": [False]}, "echo_swapcase"),
    ],
)
async def test_fault_endpoint_rejects_bad_bodies_naming_the_field(
    client: Client, body: Any, field: str
) -> None:
    response = await client.post("/_sim/faults", json=body)
    assert response.status == 400
    assert field in (await response.json())["error"]


async def test_echo_fault_puts_the_received_team_key_in_the_body(client: Client) -> None:
    await client.post("/_sim/faults", json={"echo_key": "percent_all", "echo_in": "body"})
    response = await client.get("/api/v1/tags", headers=TEAM_H)
    text = await response.text()
    assert response.status == 200
    assert TEAM not in text
    assert f"X-API-Key: {TEAM}" in urllib.parse.unquote(text)
    assert '"answer":{"data": []}' in text  # the real answer follows the echo


async def test_echo_fault_uses_the_agency_key_on_agency_routes(client: Client) -> None:
    await client.post("/_sim/faults", json={"echo_key": "hex", "echo_in": "header"})
    body = {"firstName": "J", "lastName": "D", "teamName": "T", "email": "j@example.com"}
    response = await client.post("/api/v1/agency/subteams", json=body, headers=AGENCY_H)
    assert response.status == 201
    assert binascii.unhexlify(response.headers["X-Debug-Echo"]) == AGENCY.encode()
    assert (await response.json())["data"]["teamName"] == "T"


async def test_echo_fault_echoes_even_a_refused_key_but_nothing_without_one(
    client: Client,
) -> None:
    await client.post("/_sim/faults", json={"echo_key": "upper", "echo_in": "header"})
    refused = await client.get("/api/v1/tags", headers={"X-API-Key": "wrong"})
    assert (refused.status, refused.headers["X-Debug-Echo"]) == (401, "WRONG")
    keyless = await client.get("/api/v1/tags")
    assert keyless.status == 401
    assert "X-Debug-Echo" not in keyless.headers


async def test_echo_fault_location_and_split_headers(client: Client) -> None:
    await client.post("/_sim/faults", json={"echo_key": "verbatim", "echo_in": "location"})
    moved = await client.get("/api/v1/tags", headers=TEAM_H, allow_redirects=False)
    assert moved.status == 302
    assert moved.headers["Location"].endswith(f"/api/v1/contacts?api_key={TEAM}")
    assert moved.headers["Location"].startswith("http://")
    assert moved.headers["Content-Location"] == f"/api/v1/contacts?api_key={TEAM}"
    await client.post("/_sim/faults", json={"echo_key": "verbatim", "echo_in": "split_headers"})
    split = await client.get("/api/v1/tags", headers=TEAM_H)
    halves = split.headers["X-Debug-A"], split.headers["X-Debug-B"]
    assert all(halves) and "".join(halves) == TEAM


@pytest.mark.parametrize(("place", "wbits"), [("gzip", 31), ("deflate", 15), ("gzip_stream", 31)])
async def test_echo_fault_compresses_the_body_with_the_coding_it_names(
    start_sim: StartSim, place: str, wbits: int
) -> None:
    sim, client = await start_sim(client_kwargs={"auto_decompress": False})
    # gzip on top is ignored: the echo's answer has its coding already.
    sim.set_faults(Faults(echo_key="verbatim", echo_in=place, gzip=True))
    response = await client.get("/api/v1/tags", headers=TEAM_H)
    raw = await response.read()
    assert response.headers["Content-Encoding"] == place.removesuffix("_stream")
    plain = zlib.decompress(raw, wbits)
    assert f"X-API-Key: {TEAM}".encode() in plain
    if place == "gzip_stream":  # kilobytes of filler come before the key
        assert plain.index(TEAM.encode()) > 8000
        assert response.headers["Transfer-Encoding"] == "chunked"


async def test_echo_fault_chunked_sends_one_byte_per_chunk(start_sim: StartSim) -> None:
    sim, client = await start_sim()
    sim.set_faults(Faults(echo_key="json_u", echo_in="chunked"))
    response = await client.get("/api/v1/tags", headers=TEAM_H)
    assert response.headers["Transfer-Encoding"] == "chunked"
    pieces = [data async for data, _ in response.content.iter_chunks() if data]
    assert {len(piece) for piece in pieces} == {1}  # iter_chunks keeps each chunk's bounds
    body = json.loads(b"".join(pieces))
    assert body["debug"] == f"request carried X-API-Key: {TEAM}"  # json_u read back


async def test_echo_fault_with_gzip_gzips_a_body_echo(start_sim: StartSim) -> None:
    sim, client = await start_sim(client_kwargs={"auto_decompress": False})
    sim.set_faults(Faults(echo_key="verbatim", gzip=True))
    response = await client.get("/api/v1/tags", headers=TEAM_H)
    assert response.headers["Content-Encoding"] == "gzip"
    assert TEAM.encode() in gzip.decompress(await response.read())
