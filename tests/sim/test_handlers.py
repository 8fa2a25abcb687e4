"""The simulator's API routes: echowin's data round-trips and its JSON errors."""

from __future__ import annotations

from typing import Any

import pytest

from tests.sim.conftest import (
    AGENCY_H,
    TEAM_B,
    TEAM_H,
    Client,
    FakeClock,
    call,
    create_contact,
)

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
