"""What outside tools expect of the admin API (issue 21, points 12 and 16): every error
JSON, 401 with WWW-Authenticate, a duplicate active name 409, and an OpenAPI document that
says which values the server takes; all against the real admin listener."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.admin.openapi import DURATION_PATTERN
from proxy.auth.tokens import parse_duration
from tests.conftest import ADMIN_TOKEN, GatewayHandle


async def call(
    gw: GatewayHandle, method: str, path: str, body: object = None, token: str | None = ADMIN_TOKEN
) -> tuple[int, aiohttp.typedefs.LooseHeaders, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.admin_url(path), json=body, headers=headers) as resp,
    ):
        assert resp.content_type == "application/json", (method, path, await resp.text())
        return resp.status, resp.headers, await resp.json()


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_admin_401_carries_a_challenge(gateway: GatewayHandle, token: str | None) -> None:
    status, headers, body = await call(gateway, "GET", "/admin/tokens", token=token)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert body["reason"] == "unauthorized"
    assert body["error"] == ("Missing admin token" if token is None else "Invalid admin token")


@pytest.mark.parametrize(
    ("method", "path", "status", "reason"),
    [
        ("GET", "/nowhere", 404, "not_found"),
        ("GET", "/admin/nowhere", 404, "not_found"),
        ("PUT", "/admin/tokens", 405, "method_not_allowed"),
        ("POST", "/healthz", 405, "method_not_allowed"),
        ("DELETE", "/metrics", 405, "method_not_allowed"),
    ],
)
async def test_aiohttp_own_errors_are_json(
    gateway: GatewayHandle, method: str, path: str, status: int, reason: str
) -> None:
    got, headers, body = await call(gateway, method, path)
    assert got == status
    assert body["reason"] == reason
    assert path in body["error"]
    if status == 405:
        assert "GET" in headers["Allow"]
        assert headers["Allow"] in body["error"]


async def test_a_body_too_large_is_json(gateway: GatewayHandle) -> None:
    body = {"name": "x", "scopes": ["*"], "pad": "x" * 70_000}
    status, _, answer = await call(gateway, "POST", "/admin/tokens", body)
    assert status == 413
    assert answer["reason"] == "body_too_large"


async def test_a_duplicate_active_name_is_409(gateway: GatewayHandle) -> None:
    status, _, first = await call(
        gateway, "POST", "/admin/tokens", {"name": "crm-sync", "scopes": ["*"]}
    )
    assert status == 201
    status, _, body = await call(
        gateway, "POST", "/admin/tokens", {"name": "crm-sync", "scopes": ["tags:read"]}
    )
    assert status == 409
    assert body["reason"] == "name_taken"
    assert first["id"] in body["error"] and "crm-sync" in body["error"]
    status, _, _ = await call(gateway, "DELETE", f"/admin/tokens/{first['id']}")
    assert status == 200
    status, _, _ = await call(
        gateway, "POST", "/admin/tokens", {"name": "crm-sync", "scopes": ["tags:read"]}
    )
    assert status == 201


async def test_expires_in_errors_name_the_field(gateway: GatewayHandle) -> None:
    for value in ("", "soon", "-1d"):
        body = {"name": "x", "scopes": ["*"], "expires_in": value}
        status, _, answer = await call(gateway, "POST", "/admin/tokens", body)
        assert status == 400
        assert answer["error"].startswith("expires_in: "), answer


async def test_openapi_says_what_the_server_takes(gateway: GatewayHandle) -> None:
    status, _, doc = await call(gateway, "GET", "/admin/openapi.json")
    assert status == 200
    schemas = doc["components"]["schemas"]
    create = schemas["TokenCreate"]["properties"]
    scopes = set(create["scopes"]["items"]["enum"])
    assert {"contacts:read", "contacts:*", "*", "agency:subteams:write"} <= scopes
    assert "contact:read" not in scopes
    assert schemas["TokenUpdate"]["properties"]["scopes"]["items"]["enum"] == sorted(scopes)
    assert create["upstream_key"]["enum"] == ["default", "acme"]  # conftest's extra key
    assert create["expires_in"]["pattern"] == DURATION_PATTERN
    post = doc["paths"]["/admin/tokens"]["post"]["responses"]
    assert "409" in post
    assert "WWW-Authenticate" in post["401"]["headers"]
    # Each enumerated scope is one the server takes, and one outside the enum is refused.
    for scope in sorted(scopes):
        name = "s-" + re.sub(r"[^a-z0-9]", "-", scope)
        status, _, _ = await call(
            gateway, "POST", "/admin/tokens", {"name": name, "scopes": [scope]}
        )
        assert status == 201, scope
    status, _, _ = await call(gateway, "POST", "/admin/tokens", {"name": "n", "scopes": ["x:y"]})
    assert status == 400


@given(st.one_of(st.from_regex(DURATION_PATTERN, fullmatch=True), st.text(max_size=12)))
def test_the_duration_pattern_is_what_parse_duration_takes(text: str) -> None:
    """The document's pattern and the server agree on every string (length within 32)."""
    matches = re.fullmatch(DURATION_PATTERN.strip("^$"), text) is not None
    try:
        parse_duration(text)
        parsed = True
    except ValueError:
        parsed = False
    if len(text) <= 32:
        assert matches == parsed, text
