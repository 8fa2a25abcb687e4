"""The admin API beyond create/list/revoke: update, usage, OpenAPI, audit, the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from proxy.cli.main import main
from tests.conftest import ADMIN_TOKEN, GatewayHandle, SimHandle

MakeGateway = Callable[..., Awaitable[GatewayHandle]]


async def admin(
    gw: GatewayHandle, method: str, path: str, body: object | None = None, token: str = ADMIN_TOKEN
) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.admin_url(path), json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def proxied(gw: GatewayHandle, token: str, path: str = "/api/v1/contacts") -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url(path), headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        await resp.read()
        return resp.status


async def test_update_quotas_and_scopes_take_effect_at_once(
    gateway: GatewayHandle, sim: SimHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="echowin_gateway.audit")
    token = await gateway.token("contacts:read", name="svc")
    token_id = token.split("_")[1]
    assert await proxied(gateway, token, "/api/v1/tags") == 403
    status, body = await admin(
        gateway, "PATCH", f"/admin/tokens/{token_id}", {"per_minute": 1, "scopes": ["*"]}
    )
    assert status == 200, body
    assert body["per_minute"] == 1
    assert body["scopes"] == ["*"]
    assert await proxied(gateway, token, "/api/v1/tags") == 200
    assert await proxied(gateway, token, "/api/v1/tags") == 429  # its own quota: 1 a minute
    status, body = await admin(gateway, "PATCH", f"/admin/tokens/{token_id}", {"per_minute": None})
    assert status == 200
    assert body["per_minute"] is None
    assert await proxied(gateway, token, "/api/v1/tags") == 200
    actions = [r.fields["action"] for r in caplog.records if r.name == "echowin_gateway.audit"]  # type: ignore[attr-defined]
    assert actions == ["token.update", "token.update"]


async def test_usage_counts_answers_and_shows_the_quota(gateway: GatewayHandle) -> None:
    token = await gateway.token("contacts:read", name="counted", hourly=10)
    for _ in range(3):
        assert await proxied(gateway, token) == 200
    assert await proxied(gateway, token, "/api/v1/tags") == 403
    status, body = await admin(gateway, "GET", f"/admin/tokens/{token.split('_')[1]}/usage")
    assert status == 200
    assert body["answered"] == {"200": 3, "403": 1}
    quota = body["quota"]
    assert isinstance(quota, list)
    assert quota[0]["requests"] == 10
    assert quota[0]["used"] == 3


@pytest.mark.parametrize(
    "change",
    [
        {"hourly": -1},
        {"hourly": "10"},
        {"weight": 0},
        {"scopes": ["nope:read"]},
        {"scopes": []},
        {"colour": "red"},
        {},
        {"expires_in": "soon"},
    ],
)
async def test_bad_updates_are_400_and_change_nothing(
    gateway: GatewayHandle, change: dict[str, object]
) -> None:
    token = await gateway.token("contacts:read", name="stable", hourly=5)
    token_id = token.split("_")[1]
    before = await gateway.runtime.store.get(token_id)
    status, body = await admin(gateway, "PATCH", f"/admin/tokens/{token_id}", change)
    assert status == 400, body
    assert body["error"]
    assert await gateway.runtime.store.get(token_id) == before


async def test_unknown_token_is_404(gateway: GatewayHandle) -> None:
    for method, path, body in (
        ("GET", "/admin/tokens/nosuchtoken1", None),
        ("PATCH", "/admin/tokens/nosuchtoken1", {"weight": 2}),
        ("DELETE", "/admin/tokens/nosuchtoken1", None),
        ("GET", "/admin/tokens/nosuchtoken1/usage", None),
    ):
        status, _ = await admin(gateway, method, path, body)
        assert status == 404, (method, path)


async def test_openapi_document_describes_every_admin_route(gateway: GatewayHandle) -> None:
    status, doc = await admin(gateway, "GET", "/admin/openapi.json")
    assert status == 200
    assert doc["openapi"] == "3.1.0"
    paths = doc["paths"]
    assert isinstance(paths, dict)
    app = gateway.admin.app
    assert app is not None
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/admin/")
        and route.method != "HEAD"
    }
    documented = {
        (method, path) for path, ops in paths.items() for method in ops if method != "parameters"
    }
    assert served - {("get", "/admin/openapi.json")} == documented
    status, _ = await admin(gateway, "GET", "/admin/openapi.json", token="wrong")
    assert status == 401


async def test_cli_works_through_the_admin_api(
    gateway: GatewayHandle, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    base = gateway.admin_url("/").rstrip("/")

    # main() runs its own event loop: run it in a thread so this test's loop keeps serving.
    def cli(*args: str) -> int:
        return main(list(args))

    code = await asyncio.to_thread(
        cli, "token", "create", "--admin-url", base, "--name", "remote", "--scope", "tags:read"
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    token = out[-1]
    assert await proxied(gateway, token, "/api/v1/tags") == 200
    code = await asyncio.to_thread(cli, "token", "list", "--admin-url", base, "--json")
    listed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [t["name"] for t in listed] == ["remote"]
    code = await asyncio.to_thread(
        cli, "token", "create", "--admin-url", base, "--name", "x", "--scope", "bad:scope"
    )
    assert code == 2
    assert "unknown scope" in capsys.readouterr().err
    code = await asyncio.to_thread(cli, "token", "revoke", listed[0]["id"], "--admin-url", base)
    assert code == 0
    assert await proxied(gateway, token, "/api/v1/tags") == 401
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "wrong")
    code = await asyncio.to_thread(cli, "token", "list", "--admin-url", base)
    assert code == 1
    assert "Invalid admin token" in capsys.readouterr().err


CLASSES = {
    "classes": {"interactive": {"weight": 4}, "batch": {"pace": True}},
    "default_class": "batch",
}


async def test_the_admin_api_creates_shows_and_changes_a_tokens_class(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(**CLASSES)
    body = {"name": "calls", "scopes": ["contacts:read"], "class": "interactive"}
    status, created = await admin(gw, "POST", "/admin/tokens", body)
    assert status == 201, created
    assert created["class"] == "interactive"
    token_id = created["id"]
    status, changed = await admin(gw, "PATCH", f"/admin/tokens/{token_id}", {"class": None})
    assert (status, changed["class"]) == (200, "batch")  # none of its own: default_class
    stored = await gw.runtime.store.get(str(token_id))
    assert stored is not None and stored.service_class is None
    status, refused = await admin(gw, "PATCH", f"/admin/tokens/{token_id}", {"class": "bulk"})
    assert status == 400 and "class" in str(refused["error"]), refused
    status, listed = await admin(gw, "GET", "/admin/tokens")
    assert [t["class"] for t in listed["tokens"]] == ["batch"]  # type: ignore[index]
