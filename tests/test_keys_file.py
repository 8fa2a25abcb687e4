"""upstream.keys_file at the scale it is for: a gateway with 500 keys from one file sends a
token's request with the key the token is bound to; SIGHUP adds and removes keys; no key
shows in an answer, the log or check-config's output."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.procs import (
    Spawn,
    create_token,
    eventually,
    gateway_config,
    http_client,
    run_cli,
    start_gateway,
    start_sim,
    write_config,
)
from tests.test_reload import metric, sim_keys

KEYS = 500
ADMIN = "admin-token-keys-file-test-0123"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


def subteam_key(index: int | str) -> str:
    return f"subteam-key-{index}-5f0e1d2c3b4a59687766"


def write_keys(path: Path, names: list[str], own_limit: int = 7) -> dict[str, str]:
    """The keys file: every name's key; team-499 with a window of its own."""
    keys = {name: subteam_key(name.removeprefix("team-")) for name in names}
    entries: dict[str, Any] = dict(keys)
    if "team-499" in entries:
        limits = [{"requests": own_limit, "per_seconds": 60}]
        entries["team-499"] = {"key": keys["team-499"], "limits": limits}
    path.write_text(json.dumps(entries), encoding="utf-8")
    return keys


async def get(session: aiohttp.ClientSession, url: str, token: str) -> tuple[int, str]:
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.text()


async def test_500_keys_route_by_token_and_reload_adds_and_removes(
    tmp_path: Path, spawn: Spawn
) -> None:
    keys_path = tmp_path / "subteams.json"
    names = [f"team-{i:03d}" for i in range(KEYS)]
    keys = write_keys(keys_path, names)
    sim = await start_sim(spawn, "--key", keys["team-321"], "--key", subteam_key("new"))
    gw = gateway_config(tmp_path, sim.url)
    raw: dict[str, Any] = yaml.safe_load(gw.config.read_text())
    raw["upstream"]["keys_file"] = {"file": str(keys_path)}
    write_config(gw.config, raw)
    gw.env["GATEWAY_ADMIN_TOKEN"] = ADMIN

    checked = run_cli("check-config", gw.config, env=gw.env)
    assert checked.returncode == 0, checked.stderr
    bound = create_token(gw, "--name", "sub321", "--scope", "*", "--upstream-key", "team-321")
    async with http_client() as session:
        proc = await start_gateway(spawn, session, gw)
        status, _ = await get(session, gw.url("/api/v1/contacts"), bound)
        assert status == 200
        assert (await sim_keys(session, sim.url))[-1] == keys["team-321"]
        async with session.get(gw.admin_url("/metrics")) as resp:
            text = await resp.text()
        assert 'echowin_gateway_upstream_429_total{credential="team-499"} 0.0' in text

        # team-321 leaves, team-new comes: one SIGHUP, no restart.
        names = [n for n in names if n != "team-321"] + ["team-new"]
        write_keys(keys_path, names)
        proc.popen.send_signal(signal.SIGHUP)
        success = 'echowin_gateway_config_reloads_total{result="success"}'

        async def reloaded() -> bool:
            return await metric(session, gw.admin_url("/metrics"), success) == 1

        await eventually(reloaded, "the reload", 10)
        status, body = await get(session, gw.url("/api/v1/contacts"), bound)
        assert status == 503 and json.loads(body)["reason"] == "no_credential", body
        assert keys["team-321"] not in body
        fresh = create_token(gw, "--name", "subnew", "--scope", "*", "--upstream-key", "team-new")
        status, _ = await get(session, gw.url("/api/v1/contacts"), fresh)
        assert status == 200
        assert (await sim_keys(session, sim.url))[-1] == subteam_key("new")
        async with session.get(gw.admin_url("/admin/budget"), headers=ADMIN_AUTH) as resp:
            budget = (await resp.json())["credentials"]
        assert "team-new" in budget and "team-321" not in budget and len(budget) == KEYS + 1
        assert [w["requests"] for w in budget["team-499"]["windows"]] == [7]
        assert [w["requests"] for w in budget["team-new"]["windows"]] == [1000, 100]

        # A key's own limits are its lane's windows: changing them needs a restart.
        write_keys(keys_path, names, own_limit=8)
        proc.popen.send_signal(signal.SIGHUP)
        failure = 'echowin_gateway_config_reloads_total{result="failure"}'

        async def refused() -> bool:
            return await metric(session, gw.admin_url("/metrics"), failure) == 1

        await eventually(refused, "the refused reload", 10)
    log = proc.stderr()
    assert "upstream keys changed" in log
    assert "upstream key team-499: changing its limits needs a restart" in log
    for key in (keys["team-321"], subteam_key("new"), subteam_key("000")):
        assert key not in log and key not in checked.stdout + checked.stderr
