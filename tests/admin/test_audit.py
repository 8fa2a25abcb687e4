"""The audit log of token operations through the admin API and the CLI: who, when, from
which address; on a gateway whose tokens are in PostgreSQL (this session's database), in
SQLite, in memory; and the answer of a store that keeps none (Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.cli.main import main
from tests.conftest import ADMIN_TOKEN, GatewayHandle
from tests.procs import Gateway, Spawn, write_config
from tests.state.pg_server import empty_tables, scratch_database
from tests.workers.test_workers import ADMIN, group_config, start_group

MakeGateway = Callable[..., Awaitable[GatewayHandle]]


async def call(
    gw: GatewayHandle, method: str, path: str, body: object | None = None, actor: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    if actor is not None:
        headers["X-Gateway-Actor"] = actor
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.admin_url(path), json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with scratch_database() as url:
        yield url


@pytest.fixture(params=["postgresql", "sqlite", "memory"])
async def audited(
    request: pytest.FixtureRequest, make_gateway: MakeGateway, tmp_path: Path
) -> AsyncIterator[GatewayHandle]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_session_url")
        yield await make_gateway(token_store=url)
        await empty_tables(url)
        return
    state = {"sqlite": f"sqlite:///{tmp_path}/state.db", "memory": "memory://"}[request.param]
    yield await make_gateway(state=state)


async def test_create_change_revoke_are_recorded_with_who_and_where(audited: GatewayHandle) -> None:
    before = time.time()
    status, made = await call(
        audited,
        "POST",
        "/admin/tokens",
        {"name": "billing", "scopes": ["contacts:read"], "hourly": 50},
        actor="ops@example.com",
    )
    assert status == 201, made
    token_id = made["id"]
    status, _ = await call(audited, "PATCH", f"/admin/tokens/{token_id}", {"weight": 3})
    assert status == 200
    status, _ = await call(audited, "DELETE", f"/admin/tokens/{token_id}", actor="jo")
    assert status == 200
    status, body = await call(audited, "GET", f"/admin/audit?token_id={token_id}")
    assert status == 200, body
    revoke, update, create = body["entries"]
    assert [create["action"], update["action"], revoke["action"]] == [
        "token.create",
        "token.update",
        "token.revoke",
    ]
    assert (create["actor"], update["actor"], revoke["actor"]) == (
        "ops@example.com",
        "admin-token",  # no X-Gateway-Actor: the admin token's holder
        "jo",
    )
    assert {e["address"] for e in body["entries"]} == {"127.0.0.1"}
    assert create["detail"]["name"] == "billing" and create["detail"]["hourly"] == 50
    assert update["detail"] == {"weight": 3}
    assert revoke["detail"]["revoked_at"] is not None
    assert create["seq"] < update["seq"] < revoke["seq"]
    assert before - 1 <= _unix(create["at"]) <= time.time() + 1
    text = str(body)
    assert made["token"] not in text and made["token"].rsplit("_", 1)[1] not in text


def _unix(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_a_failed_change_records_nothing(audited: GatewayHandle) -> None:
    status, _ = await call(audited, "POST", "/admin/tokens", {"name": "x", "scopes": ["nope"]})
    assert status == 400
    status, _ = await call(audited, "DELETE", "/admin/tokens/nosuchtoken0")
    assert status == 404
    status, body = await call(audited, "GET", "/admin/audit")
    assert (status, body) == (200, {"entries": []})


async def test_a_bad_actor_or_limit(audited: GatewayHandle) -> None:
    status, _ = await call(
        audited, "POST", "/admin/tokens", {"name": "a", "scopes": ["*"]}, actor="x'); DROP"
    )
    assert status == 201
    status, body = await call(audited, "GET", "/admin/audit?limit=1")
    assert status == 200 and body["entries"][0]["actor"] == "admin-token"
    for bad in ("0", "1001", "ten", "-1", "9" * 5000, "\u0661"):
        status, body = await call(audited, "GET", f"/admin/audit?limit={bad}")
        assert status == 400 and body["error"].startswith("limit:"), body


async def test_a_redis_token_store_keeps_no_audit_log(make_gateway: MakeGateway) -> None:
    prefix = f"egw-test-{uuid.uuid4().hex}:"
    gw = await make_gateway(state="redis://127.0.0.1:6379/0", redis={"key_prefix": prefix})
    try:
        status, body = await call(gw, "GET", "/admin/audit")
        assert status == 404 and "keeps no audit log" in body["error"]
        status, _ = await call(gw, "POST", "/admin/tokens", {"name": "a", "scopes": ["*"]})
        assert status == 201  # the change itself is made
    finally:
        from redis.asyncio import Redis

        client = Redis(host="127.0.0.1", port=6379)
        with contextlib.suppress(Exception):
            keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
        await client.aclose()


async def test_the_cli_works_on_a_postgres_token_store_and_records_its_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ECHOWIN_API_KEY", "k")
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    async with scratch_database() as url:
        config = write_config(tmp_path / "gw.yaml", {"state": "memory://", "token_store": url})
        args = ["--config", str(config)]

        def run(*argv: str) -> str:
            code = main(["token", *argv, *args])
            out = capsys.readouterr()
            assert code == 0, out.err
            return out.out

        loop_free = asyncio.to_thread  # main() runs its own event loop: off this one
        created = await loop_free(run, "create", "--name", "svc", "--scope", "*")
        token_id = created.splitlines()[0].split()[2]
        listed_tokens = await loop_free(run, "list")
        assert token_id in listed_tokens and "active" in listed_tokens
        await loop_free(run, "revoke", token_id)
        assert "revoked" in await loop_free(run, "list")
        listed = await loop_free(run, "audit", "--token-id", token_id)
        lines = listed.splitlines()
        assert len(lines) == 2
        assert "token.revoke" in lines[0] and "token.create" in lines[1]
        assert all("cli:alice from -" in line for line in lines)
        assert created.splitlines()[-1] not in listed


async def group_call(
    gw: Gateway, method: str, path: str, body: object | None = None, actor: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    if actor is not None:
        headers["X-Gateway-Actor"] = actor
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.request(method, gw.admin_url(path), json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_group_of_workers_records_the_group_listeners_peer(
    tmp_path: Path, spawn: Spawn, pg_url: str
) -> None:
    """``serve --workers 2`` on a new database: both workers migrate it at once (the
    advisory lock), and an entry made through the group's admin listener names the
    client's address, not the worker's private socket."""
    gw = group_config(
        tmp_path, "http://127.0.0.1:9", "sqlite", "", [{"requests": 10, "per_seconds": 60}]
    )
    raw = yaml.safe_load(gw.config.read_text())
    raw["token_store"] = pg_url
    write_config(gw.config, raw)
    await start_group(spawn, gw)
    status, made = await group_call(
        gw, "POST", "/admin/tokens", {"name": "svc", "scopes": ["*"]}, actor="deploy-bot"
    )
    assert status == 201, made
    status, body = await group_call(gw, "GET", f"/admin/audit?token_id={made['id']}")
    assert status == 200, body
    (entry,) = body["entries"]
    assert (entry["action"], entry["actor"], entry["address"]) == (
        "token.create",
        "deploy-bot",
        "127.0.0.1",
    )


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
async def test_a_class_change_is_recorded_with_the_class_set(
    request: pytest.FixtureRequest, make_gateway: MakeGateway, tmp_path: Path, backend: str
) -> None:
    classes = {"classes": {"interactive": {"weight": 4}, "batch": {"pace": True}}}
    if backend == "postgresql":
        url = request.getfixturevalue("pg_session_url")
        gw = await make_gateway(token_store=url, default_class="batch", **classes)
    else:
        state = f"sqlite:///{tmp_path}/state.db"
        gw = await make_gateway(state=state, default_class="batch", **classes)
    try:
        body = {"name": "calls", "scopes": ["contacts:read"], "class": "interactive"}
        status, made = await call(gw, "POST", "/admin/tokens", body)
        assert status == 201, made
        token_id = made["id"]
        for change in ({"class": "batch"}, {"class": None, "weight": 2}):
            status, changed = await call(gw, "PATCH", f"/admin/tokens/{token_id}", change)
            assert status == 200, changed
        status, log = await call(gw, "GET", f"/admin/audit?token_id={token_id}")
        assert status == 200, log
        second, first, create = log["entries"]
        assert create["detail"]["class"] == "interactive"
        assert first["detail"] == {"class": "batch"}
        assert second["detail"] == {"class": None, "weight": 2}  # null: the default class
    finally:
        if backend == "postgresql":
            await empty_tables(url)
