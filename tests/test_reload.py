"""SIGHUP reloads config, secrets and routes without dropping requests; a bad new config
is refused, logged, and the old one kept; reloads are counted."""

from __future__ import annotations

import asyncio
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
    start_gateway,
    start_sim,
    write_config,
)

OLD_KEY = "rotating-key-old-0123456789"
NEW_KEY = "rotating-key-new-9876543210"


async def sim_keys(session: aiohttp.ClientSession, sim_url: str) -> list[str]:
    async with session.get(f"{sim_url}/_sim/requests") as resp:
        recorded = (await resp.json())["requests"]
    return [{k.lower(): v for k, v in r["headers"].items()}.get("x-api-key", "") for r in recorded]


async def metric(session: aiohttp.ClientSession, url: str, line_start: str) -> float:
    async with session.get(url) as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starting {line_start!r}")


async def test_sighup_rotates_the_key_and_refuses_bad_configs(tmp_path: Path, spawn: Spawn) -> None:
    sim = await start_sim(spawn, "--key", NEW_KEY, key=OLD_KEY)
    key_file = tmp_path / "echowin-key"
    key_file.write_text(OLD_KEY + "\n")
    gw = gateway_config(tmp_path, sim.url)
    raw: dict[str, Any] = yaml.safe_load(gw.config.read_text())
    raw["upstream"]["api_key"] = {"file": str(key_file)}
    write_config(gw.config, raw)
    token = create_token(gw, "--name", "svc", "--scope", "contacts:read")
    auth = {"Authorization": f"Bearer {token}"}
    reloads = gw.admin_url("/metrics")
    async with http_client() as session:
        proc = await start_gateway(spawn, session, gw)
        async with session.get(gw.url("/api/v1/contacts"), headers=auth) as resp:
            assert resp.status == 200
        assert (await sim_keys(session, sim.url))[-1] == OLD_KEY

        # Rotate: a request in flight during the reload still completes.
        async with session.post(f"{sim.url}/_sim/faults", json={"latency_seconds": 1.0}) as r:
            assert r.status == 200
        slow = asyncio.ensure_future(session.get(gw.url("/api/v1/contacts"), headers=auth))
        await asyncio.sleep(0.3)  # let it reach the simulator before the signal
        key_file.write_text(NEW_KEY + "\n")
        proc.popen.send_signal(signal.SIGHUP)
        async with await slow as resp:
            assert resp.status == 200
        async with session.delete(f"{sim.url}/_sim/faults") as r:
            assert r.status == 200

        async def rotated() -> bool:
            return (
                await metric(
                    session, reloads, 'echowin_gateway_config_reloads_total{result="success"}'
                )
                == 1
            )

        await eventually(rotated, "the reload", 5)
        async with session.get(gw.url("/api/v1/contacts"), headers=auth) as resp:
            assert resp.status == 200
        assert (await sim_keys(session, sim.url))[-1] == NEW_KEY

        # A config that does not parse is refused; the running one stays.
        good = gw.config.read_text()
        gw.config.write_text("listen: [unclosed\n")
        proc.popen.send_signal(signal.SIGHUP)

        async def refused(n: int) -> bool:
            return (
                await metric(
                    session, reloads, 'echowin_gateway_config_reloads_total{result="failure"}'
                )
                == n
            )

        await eventually(lambda: refused(1), "the refused reload", 5)
        # So is one that changes what only a restart can change.
        changed = yaml.safe_load(good)
        changed["listen"] = "127.0.0.1:1"
        write_config(gw.config, changed)
        proc.popen.send_signal(signal.SIGHUP)
        await eventually(lambda: refused(2), "the second refused reload", 5)
        proc.check_alive()
        async with session.get(gw.url("/api/v1/contacts"), headers=auth) as resp:
            assert resp.status == 200
        assert (await sim_keys(session, sim.url))[-1] == NEW_KEY
    log = proc.stderr()
    assert "config reload refused" in log
    assert "listen: changing it needs a restart" in log
    assert OLD_KEY not in log
    assert NEW_KEY not in log
