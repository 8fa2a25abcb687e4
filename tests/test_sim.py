"""Functional tests of the echowin simulator: a real aiohttp server on loopback.

Window math runs on a fake clock that tests move by hand; nothing sleeps except the one
latency test, which needs real time to pass.
"""

from __future__ import annotations

import asyncio
import binascii
import gzip
import json
import re
import time
import urllib.parse
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

import proxy.sim
from proxy.sim import (
    NO_RESPONSE,
    Faults,
    SimConfig,
    SimLimit,
    Simulator,
    parse_limit,
    run_simulator,
)
from proxy.sim import _KeyBudget as KeyBudget

TEAM = "team-key-A"
TEAM_B = "team-key-B"
AGENCY = "agency-key-1"
TEAM_H = {"X-API-Key": TEAM}
AGENCY_H = {"X-AGENCY-KEY": AGENCY}
START = 1000.0
WALL_AT_START = 1_795_708_800  # 2026-11-26T16:00:00Z
RATE_LIMITED = {"error": "Rate limit exceeded. Please try again later."}

Client = TestClient[web.Request, web.Application]
StartSim = Callable[..., Awaitable[tuple[Simulator, Client]]]


class FakeClock:
    """Monotonic seconds when called; ``wall()`` is the matching Unix time."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL_AT_START + (self.now - START)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def start_sim(aiohttp_client: AiohttpClient, clock: FakeClock) -> StartSim:
    """Start a simulator (keys TEAM, TEAM_B, AGENCY; SimConfig overrides as keywords)."""

    async def start(client_kwargs: dict[str, Any] | None = None, **overrides: Any) -> Any:
        settings_: dict[str, Any] = {
            "team_keys": frozenset({TEAM, TEAM_B}),
            "agency_keys": frozenset({AGENCY}),
            "remaining_window": "tightest",
        }
        sim = Simulator(SimConfig(**(settings_ | overrides)), clock=clock, wall=clock.wall)
        return sim, await aiohttp_client(sim.app(), **(client_kwargs or {}))

    return start


@pytest.fixture
async def sim_client(start_sim: StartSim) -> tuple[Simulator, Client]:
    return await start_sim()


@pytest.fixture
def sim(sim_client: tuple[Simulator, Client]) -> Simulator:
    return sim_client[0]


@pytest.fixture
def client(sim_client: tuple[Simulator, Client]) -> Client:
    return sim_client[1]


async def call(
    client: Client,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    response = await client.request(method, path, json=body, headers=TEAM_H | (headers or {}))
    return response.status, await response.json()


async def create_contact(client: Client, **fields: Any) -> dict[str, Any]:
    status, body = await call(
        client, "POST", "/api/v1/contacts", {"number": "+15550000000"} | fields
    )
    assert status == 201, body
    return dict(body["data"])


# --- configuration --------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000/3600", SimLimit(1000, 3600.0)),
        (" 100/60 ", SimLimit(100, 60.0)),
        ("5/0.5", SimLimit(5, 0.5)),
    ],
)
def test_parse_limit_reads_requests_per_seconds(text: str, expected: SimLimit) -> None:
    assert parse_limit(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1000",
        "1000/",
        "/60",
        "x/60",
        "10/y",
        "0/60",
        "10/0",
        "10/-5",
        "10/inf",
        "1.5/60",
        "1/2/3",
    ],
)
def test_parse_limit_rejects_malformed_text_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid limit .*REQUESTS/SECONDS"):
        parse_limit(text)


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


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"latency_seconds": -1}, "latency_seconds"),
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


# --- routes ---------------------------------------------------------------------------------

CONTACT_KEYS = {
    "id",
    "firstName",
    "lastName",
    "email",
    "number",
    "carrier",
    "customFields",
    "tags",
    "crmStage",
    "createdAt",
}


async def test_contact_round_trips_create_get_update_delete(client: Client) -> None:
    created = await create_contact(
        client, firstName="Ada", email="ada@example.com", customFields={"company": "Acme"}
    )
    assert set(created) == CONTACT_KEYS
    assert created["number"] == "+15550000000"
    assert created["firstName"] == "Ada"
    assert created["lastName"] is None
    assert created["customFields"] == {"company": "Acme"}
    assert created["tags"] == []
    assert created["crmStage"] is None
    assert created["createdAt"] == "2026-11-26T16:00:00.000Z"

    path = f"/api/v1/contacts/{created['id']}"
    assert await call(client, "GET", path) == (200, {"data": created})

    status, updated = await call(client, "PUT", path, {"lastName": "Lovelace"})
    assert status == 200
    assert updated["data"] == created | {"lastName": "Lovelace"}

    status, deleted = await call(client, "DELETE", path)
    assert (status, deleted["data"]) == (200, {"id": created["id"], "deleted": True})
    assert await call(client, "GET", path) == (404, {"error": "Contact not found"})


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("PUT", "", {"firstName": "x"}),
        ("DELETE", "", None),
        ("GET", "/notes", None),
        ("POST", "/notes", {"note": "hi"}),
        ("GET", "/assignments", None),
        ("PUT", "/assignments", {"userIds": ["u1"]}),
        ("POST", "/boards", {"boardIds": ["board-sales"]}),
    ],
)
async def test_unknown_contact_is_404(
    client: Client, method: str, suffix: str, body: dict[str, Any] | None
) -> None:
    status, payload = await call(client, method, f"/api/v1/contacts/nope{suffix}", body)
    assert (status, payload) == (404, {"error": "Contact not found"})


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({}, "number is required"),
        ({"number": ""}, "number is required"),
        ({"number": 15550000000}, "number must be a string"),
        ({"number": "+1", "tagIds": ["missing"]}, "Tag not found: missing"),
        ({"number": "+1", "boardIds": ["missing"]}, "Board not found: missing"),
        ({"number": "+1", "customFields": []}, "customFields must be an object"),
    ],
)
async def test_create_contact_validates(client: Client, body: dict[str, Any], error: str) -> None:
    assert await call(client, "POST", "/api/v1/contacts", body) == (400, {"error": error})
    _status, listing = await call(client, "GET", "/api/v1/contacts")
    assert listing["pagination"]["totalCount"] == 0  # nothing half-made


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/api/v1/contacts", b"{nope", TEAM_H),
        # Python's json reads NaN and Infinity; JSON (and echowin's parser) does not, and the
        # simulator would store them and answer bodies no JSON client can read.
        ("/api/v1/contacts", b'{"number": "1", "customFields": {"score": Infinity}}', TEAM_H),
        (
            "/api/v1/agency/subteams",
            b'{"firstName": "A", "lastName": "B", "teamName": "C", "email": "a@b.example",'
            b' "totalMonthlyCredits": NaN}',
            AGENCY_H,
        ),
    ],
)
async def test_invalid_json_body_is_400(
    client: Client, path: str, body: bytes, headers: dict[str, str]
) -> None:
    response = await client.post(path, data=body, headers=headers)
    assert response.status == 400
    assert await response.json() == {"error": "Invalid JSON body"}


async def test_contact_list_paginates_with_documented_shape(
    client: Client, clock: FakeClock
) -> None:
    for i in range(25):
        await create_contact(client, firstName=f"name{i:02d}")
        clock.advance(1)
    status, page = await call(client, "GET", "/api/v1/contacts?page=3&limit=10")
    assert status == 200
    assert set(page) == {"data", "pagination", "customFieldSchemas", "availableTags"}
    assert page["pagination"] == {"page": 3, "limit": 10, "totalCount": 25, "totalPages": 3}
    # Default order is newest first.
    assert [c["firstName"] for c in page["data"]] == [f"name{i:02d}" for i in range(4, -1, -1)]
    assert {f["name"] for f in page["customFieldSchemas"]} == {"company", "role"}

    _, capped = await call(client, "GET", "/api/v1/contacts?limit=500")
    assert capped["pagination"]["limit"] == 100
    assert len(capped["data"]) == 25


@pytest.mark.parametrize(
    "query",
    [
        "page=0",
        "page=x",
        "limit=0",
        "limit=-1",
        "sortBy=password",
        "sortOrder=up",
        "page=%C2%B2",  # a superscript two: str.isdigit() says yes, int() says no
        "limit=%E2%91%A0",  # a circled one
    ],
)
async def test_contact_list_rejects_bad_query(client: Client, query: str) -> None:
    status, body = await call(client, "GET", f"/api/v1/contacts?{query}")
    assert status == 400
    assert set(body) == {"error"}


async def test_contact_list_searches_sorts_and_filters_by_tag(client: Client) -> None:
    await create_contact(client, firstName="Zoe", tagNames=["VIP"])
    await create_contact(client, firstName="adam", email="adam@corp.example")
    await create_contact(client, firstName="Bea", tagNames=["Lead", "VIP"])

    _, asc = await call(client, "GET", "/api/v1/contacts?sortBy=firstName&sortOrder=asc")
    assert [c["firstName"] for c in asc["data"]] == ["adam", "Bea", "Zoe"]
    assert {t["name"] for t in asc["availableTags"]} == {"VIP", "Lead"}

    _, found = await call(client, "GET", "/api/v1/contacts?search=CORP")
    assert [c["firstName"] for c in found["data"]] == ["adam"]

    vip = next(t["id"] for t in asc["availableTags"] if t["name"] == "VIP")
    _, tagged = await call(client, "GET", f"/api/v1/contacts?tagIds={vip}&sortBy=firstName")
    assert [c["firstName"] for c in tagged["data"]] == ["Zoe", "Bea"]
    assert all(vip in {t["id"] for t in c["tags"]} for c in tagged["data"])


async def test_contact_list_takes_tag_ids_comma_separated_or_repeated(client: Client) -> None:
    await create_contact(client, firstName="Zoe", tagNames=["VIP"])
    await create_contact(client, firstName="Bea", tagNames=["Lead"])
    await create_contact(client, firstName="adam")
    _, listed = await call(client, "GET", "/api/v1/contacts")
    ids = {t["name"]: t["id"] for t in listed["availableTags"]}
    vip, lead = ids["VIP"], ids["Lead"]

    for query in (f"tagIds={vip},{lead}", f"tagIds={vip}&tagIds={lead}"):
        _, tagged = await call(client, "GET", f"/api/v1/contacts?{query}&sortBy=firstName")
        assert [c["firstName"] for c in tagged["data"]] == ["Zoe", "Bea"], query


async def test_each_team_key_has_its_own_store(client: Client) -> None:
    await create_contact(client)
    _, mine = await call(client, "GET", "/api/v1/contacts")
    _, theirs = await call(client, "GET", "/api/v1/contacts", headers={"X-API-Key": TEAM_B})
    assert mine["pagination"]["totalCount"] == 1
    assert theirs["pagination"]["totalCount"] == 0


async def test_bulk_create_reports_each_failure_by_index(client: Client) -> None:
    body = {"contacts": [{"number": "+1"}, {"firstName": "no number"}, {"number": "+2"}]}
    status, result = await call(client, "POST", "/api/v1/contacts/bulk", body)
    assert status == 201
    assert [c["number"] for c in result["data"]["created"]] == ["+1", "+2"]
    assert result["data"]["errors"] == [{"index": 1, "error": "number is required"}]
    status, result = await call(client, "POST", "/api/v1/contacts/bulk", {"contacts": []})
    assert status == 400


async def test_notes_need_text_and_list_in_order(client: Client) -> None:
    contact = await create_contact(client, note="first")
    path = f"/api/v1/contacts/{contact['id']}/notes"
    assert await call(client, "POST", path, {"type": "call"}) == (
        400,
        {"error": "note is required"},
    )
    status, added = await call(client, "POST", path, {"note": "second", "type": "call"})
    assert status == 201
    assert set(added["data"]) == {"id", "note", "type", "createdAt"}
    _, notes = await call(client, "GET", path)
    assert [(n["note"], n["type"]) for n in notes["data"]] == [
        ("first", "general"),
        ("second", "call"),
    ]


async def test_assignments_post_adds_and_put_replaces(client: Client) -> None:
    contact = await create_contact(client, assignUserIds=["u1"])
    path = f"/api/v1/contacts/{contact['id']}/assignments"
    _, added = await call(client, "POST", path, {"userIds": ["u2", "u1"]})
    assert added["data"] == {"contactId": contact["id"], "userIds": ["u1", "u2"]}
    _, replaced = await call(client, "PUT", path, {"userIds": ["u3"]})
    assert replaced["data"]["userIds"] == ["u3"]
    _, listed = await call(client, "GET", path)
    assert listed["data"]["userIds"] == ["u3"]
    assert await call(client, "PUT", path, {"userIds": "u3"}) == (
        400,
        {"error": "userIds must be an array of strings"},
    )


async def test_boards_list_and_contact_board_membership_sets_crm_stage(client: Client) -> None:
    _, boards = await call(client, "GET", "/api/v1/boards")
    assert {b["id"] for b in boards["data"]} == {"board-sales", "board-support"}
    assert all({"id", "name", "stages"} <= set(b) for b in boards["data"])

    contact = await create_contact(client)
    path = f"/api/v1/contacts/{contact['id']}/boards"
    _, added = await call(client, "POST", path, {"boardIds": ["board-support"]})
    assert added["data"]["boardIds"] == ["board-support"]
    assert added["data"]["crmStage"] == {"id": "board-support-open", "name": "Open"}
    _, replaced = await call(client, "PUT", path, {"boardIds": ["board-sales"]})
    assert replaced["data"]["boardIds"] == ["board-sales"]
    _, fetched = await call(client, "GET", f"/api/v1/contacts/{contact['id']}")
    assert fetched["data"]["crmStage"] == {"id": "board-sales-lead", "name": "Lead"}
    assert await call(client, "PUT", path, {"boardIds": ["x"]}) == (
        400,
        {"error": "Board not found: x"},
    )


async def test_custom_fields_list(client: Client) -> None:
    status, body = await call(client, "GET", "/api/v1/contacts/custom-fields")
    assert status == 200
    assert [f["name"] for f in body["data"]] == ["company", "role"]
    assert all({"id", "name", "label", "type", "required"} == set(f) for f in body["data"])


async def test_tags_create_list_and_validate(client: Client) -> None:
    status, created = await call(
        client, "POST", "/api/v1/tags", {"name": "VIP", "color": "#10B981"}
    )
    assert status == 201
    assert created["data"] | {"id": "x"} == {"id": "x", "name": "VIP", "color": "#10B981"}
    assert await call(client, "POST", "/api/v1/tags", {"color": "#fff"}) == (
        400,
        {"error": "name is required"},
    )
    assert (await call(client, "POST", "/api/v1/tags", {"name": "vip"}))[0] == 409
    assert await call(client, "GET", "/api/v1/tags") == (200, {"data": [created["data"]]})

    contact = await create_contact(client, tagIds=[created["data"]["id"]])
    assert contact["tags"] == [created["data"]]


async def test_agency_creates_subteams(client: Client) -> None:
    body = {
        "firstName": "John",
        "lastName": "Doe",
        "teamName": "John's Team",
        "email": "john@example.com",
        "accessConfig": {"users": True},
    }
    status, created = await call(client, "POST", "/api/v1/agency/subteams", body, AGENCY_H)
    assert status == 201
    assert created["data"] | {"id": "x"} == body | {
        "id": "x",
        "totalMonthlyCredits": 1000,
        "createdAt": "2026-11-26T16:00:00.000Z",
    }
    bad = body | {"email": "not-an-email"}
    status, error = await call(client, "POST", "/api/v1/agency/subteams", bad, AGENCY_H)
    assert (status, error) == (400, {"error": "email must be a valid email address"})
    status, error = await call(
        client, "POST", "/api/v1/agency/subteams", {"firstName": "J"}, AGENCY_H
    )
    assert (status, error) == (400, {"error": "lastName is required"})


async def test_unknown_route_and_method_are_json_and_counted(client: Client) -> None:
    response = await client.get("/api/v1/agents", headers=TEAM_H)
    assert response.status == 404
    assert await response.json() == {"error": "Not found"}
    assert response.headers["X-RateLimit-Remaining"] == "99"

    response = await client.delete("/api/v1/tags", headers=TEAM_H)
    assert response.status == 405
    assert await response.json() == {"error": "Method not allowed"}
    assert "POST" in response.headers["Allow"]
    assert response.headers["X-RateLimit-Remaining"] == "98"


# --- rate limits ------------------------------------------------------------------------------


async def get_tags(client: Client) -> aiohttp.ClientResponse:
    response = await client.get("/api/v1/tags", headers=TEAM_H)
    await response.read()
    return response


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


@settings(max_examples=200, deadline=None)
@given(
    limits=st.lists(
        st.builds(SimLimit, st.integers(1, 5), st.integers(1, 20).map(float)),
        min_size=1,
        max_size=3,
    ),
    gaps=st.lists(st.integers(0, 8).map(lambda half_seconds: half_seconds / 2), max_size=60),
)
def test_window_admits_exactly_what_every_rolling_window_allows(
    limits: list[SimLimit], gaps: list[float]
) -> None:
    budget = KeyBudget(tuple(limits))
    admitted: list[float] = []

    def fits(at: float) -> bool:
        """The model: a send at t counts for arrivals in [t, t + per)."""
        counts = ((sum(t <= at < t + lim.per_seconds for t in admitted), lim) for lim in limits)
        return all(count < lim.requests for count, lim in counts)

    now = 0.0
    for gap in gaps:
        now += gap
        allowed = fits(now)
        wait = budget.admit(now)
        assert (wait is None) == allowed
        if wait is None:
            admitted.append(now)
        else:  # with nothing else admitted, every window has room at now + wait, not before
            assert fits(now + wait)
            assert not fits(now + wait - 0.25)


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


# --- faults -----------------------------------------------------------------------------------


async def test_latency_fault_delays_the_answer(sim: Simulator, client: Client) -> None:
    sim.set_faults(Faults(latency_seconds=0.05))
    began = time.monotonic()
    response = await get_tags(client)
    assert response.status == 200
    assert time.monotonic() - began >= 0.05


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
