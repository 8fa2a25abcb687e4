"""Edge cases of tokens and administration: bad input to the config, the CLI and the admin
API gets a clear error (never a traceback or a 500), and a revocation or scope change made
through the admin listener of `serve --workers N` reaches every worker at once."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from proxy.cli.main import main
from proxy.config import ConfigError, SecretRef, load_config, parse_config
from proxy.sim import Simulator
from tests.conftest import ADMIN_TOKEN, GatewayHandle
from tests.procs import Spawn, write_config
from tests.workers.test_workers import (  # noqa: F401 - fixtures
    admin_call,
    big_sim,
    fresh_connections,
    group_config,
    new_token,
    start_group,
)

MakeGateway = Callable[..., Awaitable[GatewayHandle]]
ServerFactory = Callable[..., Awaitable[TestServer]]


async def admin_raw(gw: GatewayHandle, method: str, path: str, data: bytes) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.admin_url(path), data=data, headers=headers) as resp,
    ):
        return resp.status, await resp.text()


# --- revocation through the admin listener of `serve --workers N` ------------------------


@pytest.mark.parametrize(
    ("method", "body", "want"),
    [("DELETE", None, 401), ("PATCH", {"scopes": ["tags:read"]}, 403)],
    ids=["revoke", "narrow-scopes"],
)
async def test_a_token_change_through_group_admin_reaches_every_worker_at_once(
    tmp_path: Path,
    spawn: Spawn,
    big_sim: tuple[Simulator, str],  # noqa: F811
    method: str,
    body: dict[str, Any] | None,
    want: int,
) -> None:
    _, sim_url = big_sim
    gw = group_config(tmp_path, sim_url, "sqlite", "", [{"requests": 10**6, "per_seconds": 3600}])
    raw = yaml.safe_load(gw.config.read_text())
    raw["tokens"] = {"cache_ttl_seconds": 60}
    write_config(gw.config, raw)
    await start_group(spawn, gw)
    token = await new_token(gw)
    # 16 fresh connections: both workers (the kernel spreads them) now cache the token.
    assert await fresh_connections(gw, token, 16) == {200: 16}
    status, answer = await admin_call(gw, method, f"/admin/tokens/{token.split('_')[1]}", json=body)
    assert status == 200, answer
    # GET /api/v1/contacts: a revoked token is unknown (401), tags:read lacks the scope (403)
    after = await fresh_connections(gw, token, 16)
    assert after == {want: 16}, f"a worker still serves the token as before: {after}"


# --- config: check-config passes what serve then refuses with a traceback ----------------


@pytest.mark.parametrize(
    "state",
    [
        "sqlite:///",
        "redis://:inline-secret-password@127.0.0.1:6379/0",
        "redis://127.0.0.1:99999/0",
        "memory://x",
    ],
)
def test_state_url_is_fully_checked_by_config_validation(state: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"state": state})
    line = info.value.lines[0]
    assert line.startswith("state: "), line
    assert "inline-secret-password" not in line


def test_cli_state_override_is_validated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "g.yaml", {"state": f"sqlite:///{tmp_path}/s.db"})
    code = main(["token", "list", "--config", str(config), "--state", "sqlite:///"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: state: "), err


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("tokens", "cache_ttl_seconds", float("nan")),
        ("tokens", "cache_ttl_seconds", float("inf")),
        ("upstream", "window_guard_seconds", float("nan")),
        ("queue", "max_wait_seconds", float("nan")),
        ("upstream", "timeout_seconds", float("inf")),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(
    section: str, key: str, value: float
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({section: {key: value}})
    assert info.value.lines[0].startswith(f"{section}.{key}: "), info.value.lines


def test_non_finite_limit_window_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"upstream": {"limits": [{"requests": 10, "per_seconds": float("inf")}]}})
    assert info.value.lines[0].startswith("upstream.limits[0].per_seconds: "), info.value.lines


def test_config_file_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b'state: "memory://"\n# caf\xe9\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.lines[0]


def test_secret_file_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"\xff\xfe\x00k")
    with pytest.raises(ConfigError) as info:
        SecretRef(file=str(path)).resolve("upstream.api_key", {})
    assert info.value.lines[0].startswith("upstream.api_key: "), info.value.lines


# --- admin API inputs that must not give a 500 -------------------------------------------


async def test_huge_quota_is_a_400_not_a_500(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = await make_gateway(state=f"sqlite:///{tmp_path}/state.db")
    body = {"name": "svc", "scopes": ["*"], "hourly": 10**30}
    status, text = await admin_raw(gw, "POST", "/admin/tokens", json.dumps(body).encode())
    assert status == 400, text
    assert "hourly" in text
    ok = {"name": "svc", "scopes": ["*"]}
    status, text = await admin_raw(gw, "POST", "/admin/tokens", json.dumps(ok).encode())
    assert status == 201, text
    token_id = json.loads(text)["id"]
    patch = json.dumps({"per_minute": 10**30}).encode()
    status, text = await admin_raw(gw, "PATCH", f"/admin/tokens/{token_id}", patch)
    assert status == 400, text
    assert "per_minute" in text


def test_cli_huge_quota_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "g.yaml", {"state": f"sqlite:///{tmp_path}/s.db"})
    argv = ["token", "create", "--config", str(config), "--name", "a", "--scope", "*"]
    code = main([*argv, "--hourly", str(10**30)])
    assert code == 2
    assert "hourly" in capsys.readouterr().err


async def test_deeply_nested_json_is_a_400(gateway: GatewayHandle) -> None:
    status, text = await admin_raw(gateway, "POST", "/admin/tokens", b"[" * 30000)
    assert status == 400, text


async def test_expires_in_true_is_refused(gateway: GatewayHandle) -> None:
    body = {"name": "svc", "scopes": ["*"], "expires_in": True}
    status, text = await admin_raw(gateway, "POST", "/admin/tokens", json.dumps(body).encode())
    assert status == 400, text
    assert "expires_in" in text
