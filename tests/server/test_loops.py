"""proxy.server.loops and ``server.event_loop``: which loop ``serve`` runs on. The unit tests open
no sockets; one functional test runs ``echowin-gateway serve`` on each loop."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, parse_config
from proxy.config import schema as config
from proxy.server import loops
from tests.procs import (
    Spawn,
    create_token,
    gateway_config,
    http_client,
    start_gateway,
    start_sim,
)


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_takes_uvloop_only_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loops, "uvloop_installed", lambda: False)
    assert loops.resolve("auto") == "asyncio"
    assert loops.loop_factory("auto") is None
    monkeypatch.setattr(loops, "uvloop_installed", lambda: True)
    assert loops.resolve("auto") == "uvloop"
    assert loops.resolve("asyncio") == "asyncio"
    assert loops.loop_factory("asyncio") is None


def test_run_on_asyncio() -> None:
    assert loops.run(loop_module(), "asyncio").startswith("asyncio")


def test_run_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    assert loops.run(loop_module(), "uvloop").startswith("uvloop")
    assert loops.run(loop_module(), "auto").startswith("uvloop")


def test_uvloop_asked_for_but_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # importing it fails
    monkeypatch.setattr(loops, "uvloop_installed", lambda: False)
    # The coroutine is closed, not leaked: a "never awaited" warning would fail the test.
    with pytest.raises(RuntimeError, match=r"uvloop is not installed \(pip install"):
        loops.run(loop_module(), "uvloop")
    assert loops.run(loop_module(), "auto").startswith("asyncio")


def test_the_config_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config({}).server.event_loop == "auto"
    assert parse_config({"server": {"event_loop": "asyncio"}}).server.event_loop == "asyncio"
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"event_loop": "trio"}})
    assert info.value.lines == [
        "server.event_loop: must be one of 'auto', 'asyncio' or 'uvloop', got \"trio\""
    ]
    monkeypatch.setattr(config, "uvloop_installed", lambda: False)
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"event_loop": "uvloop"}})
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith("server.event_loop: uvloop is not installed")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_serve_runs_on_the_configured_loop(tmp_path: Path, spawn: Spawn, loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    sim = await start_sim(spawn)
    gw = gateway_config(tmp_path, sim.url, server={"shutdown_grace_seconds": 5, "event_loop": loop})
    token = create_token(gw, "--name", "crm", "--scope", "contacts:read")
    async with http_client() as session:
        gateway = await start_gateway(spawn, session, gw)
        for _ in range(3):
            async with session.get(
                gw.url("/api/v1/contacts"), headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 200, await resp.text()
        gateway.check_alive()
    lines = [json.loads(line) for line in gateway.stderr().splitlines() if line.startswith("{")]
    assert [line.get("event_loop") for line in lines if line["msg"] == "gateway listening"] == [
        loop
    ]


def test_loop_name() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert loops.loop_name(loop) == "asyncio"
    finally:
        loop.close()
