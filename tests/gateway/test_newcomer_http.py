"""The proxy's answers as HTTP tools and newcomers see them (issue 21, points 10, 15 and
16): the real gateway in front of the real simulator, or a raw upstream, on loopback."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from proxy import SERVER_NAME
from tests.conftest import GatewayHandle, raw_upstream

MakeGateway = Callable[..., Awaitable[GatewayHandle]]
VARY = "Authorization, X-API-Key, X-AGENCY-KEY"


async def get(
    gw: GatewayHandle, path: str, headers: dict[str, str] | None = None
) -> tuple[int, aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession() as session, session.get(gw.url(path), headers=headers) as r:
        return r.status, r, await r.read()


async def test_authorization_without_bearer_says_the_scheme_is_not_recognised(
    gateway: GatewayHandle,
) -> None:
    token = await gateway.token("contacts:read")
    for value in (token, f"Basic {token}", f"Token {token}"):
        status, resp, body = await get(gateway, "/api/v1/contacts", {"Authorization": value})
        assert status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        answer = json.loads(body)
        assert answer["error"].startswith("Authorization scheme not recognised"), answer
        assert answer["reason"] == "missing"
        assert token not in body.decode()
    status, _, body = await get(gateway, "/api/v1/contacts")
    assert status == 401
    assert b"Missing X-API-Key header" in body


async def test_server_names_the_gateway_without_versions(gateway: GatewayHandle) -> None:
    token = await gateway.token("contacts:read")
    answers = [
        await get(gateway, "/api/v1/contacts", {"Authorization": f"Bearer {token}"}),
        await get(gateway, "/api/v1/contacts"),
    ]
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/metrics", "/admin/tokens", "/nowhere"):
            async with session.get(gateway.admin_url(path)) as resp:
                await resp.read()
                answers.append((resp.status, resp, b""))
    for _, resp, _ in answers:
        assert resp.headers.getall("Server") == [SERVER_NAME], resp.headers
    assert answers[0][0] == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/status", "/healthz?x=1"])
async def test_admin_paths_on_the_proxy_port_point_to_the_admin_listener(
    gateway: GatewayHandle, path: str
) -> None:
    token = await gateway.token("contacts:read")
    for headers in ({}, {"Authorization": f"Bearer {token}"}):
        status, resp, body = await get(gateway, path, headers)
        assert status == 404
        assert resp.content_type == "application/json"
        assert b"admin listener (admin_listen)" in body
        assert b'"reason":"not_found"' in body


async def test_a_proxied_answer_is_private_and_varies_by_token(gateway: GatewayHandle) -> None:
    token = await gateway.token("contacts:read")
    status, resp, _ = await get(gateway, "/api/v1/contacts", {"X-API-Key": token})
    assert status == 200
    assert "X-RateLimit-Remaining" in resp.headers  # the caller's own figures...
    assert resp.headers["Cache-Control"] == "private"  # ...kept from shared caches
    assert resp.headers["Vary"] == VARY


@pytest.mark.parametrize(
    ("fields", "cache_control", "vary"),
    [
        (b"Cache-Control: no-store\r\nVary: Accept\r\n", "no-store", f"Accept, {VARY}"),
        (b"Vary: *\r\n", "private", "*"),
    ],
)
async def test_echowins_own_cache_fields_are_kept(
    make_gateway: MakeGateway, fields: bytes, cache_control: str, vary: str
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + fields + b"\r\n{}"
    async with raw_upstream(answer) as url:
        gw = await make_gateway(url)
        token = await gw.token("contacts:read")
        status, resp, _ = await get(gw, "/api/v1/contacts", {"X-API-Key": token})
    assert status == 200
    assert resp.headers["Cache-Control"] == cache_control
    assert resp.headers["Vary"] == vary
