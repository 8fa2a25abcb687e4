"""The status view without Grafana: JSON, terminal bars, and an HTML page that a real
headless Chromium renders (its screenshot is kept in tests/artifacts/)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import aiohttp
import pytest

from proxy.cli.main import main
from tests.conftest import SECRETS, GatewayHandle

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


async def get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, await resp.text()


async def busy_gateway(gateway: GatewayHandle) -> tuple[str, str]:
    noisy = await gateway.token("contacts:read", name="crm-sync")
    quiet = await gateway.token("contacts:read", name="dashboard", per_minute=1)
    for _ in range(4):
        await get(gateway.url("/api/v1/contacts"), noisy)
    for _ in range(2):
        await get(gateway.url("/api/v1/contacts"), quiet)
    return noisy, quiet


async def test_status_json_and_terminal_view(
    gateway: GatewayHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    noisy, quiet = await busy_gateway(gateway)
    status, text = await get(gateway.admin_url("/status.json"))
    assert status == 200
    data = json.loads(text)
    assert [t["name"] for t in data["busiest_tokens"]] == ["crm-sync", "dashboard"]
    assert data["busiest_tokens"][1]["refused"] == 1
    windows = data["credentials"]["default"]["windows"]
    assert [w["used"] for w in windows] == [5, 5]
    history = data["credentials"]["default"]["history"]
    assert sum(history["sends"]) == 5  # the last hour, per minute: the same five sends
    base = gateway.admin_url("/").rstrip("/")
    code = await asyncio.to_thread(main, ["status", "--admin-url", base])
    out = capsys.readouterr().out
    assert code == 0
    assert "default" in out
    assert "1000/3600s" in out
    assert "crm-sync" in out
    assert "sends/min" in out and "last hour" in out
    for secret in (*SECRETS, noisy, quiet):
        assert secret not in out
        assert secret not in text


async def test_status_page_renders_in_headless_chromium(gateway: GatewayHandle) -> None:
    await busy_gateway(gateway)
    status, page = await get(gateway.admin_url("/status"))
    assert status == 200
    assert "crm-sync" in page
    assert 'class="bar"' in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed (.ci/run installs the Debian package)")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status.png"
    shot.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1000,700",
        ]
        url = gateway.admin_url("/status")
        dom = await asyncio.to_thread(
            subprocess.run,
            [browser, *flags, "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HOME": profile},
        )
        assert "Busiest tokens" in dom.stdout, dom.stderr[-2000:]
        assert "crm-sync" in dom.stdout
        await asyncio.to_thread(
            subprocess.run,
            [browser, *flags, f"--screenshot={shot}", url],
            capture_output=True,
            timeout=60,
            env={**os.environ, "HOME": profile},
        )
    assert shot.exists()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 5_000  # a rendered page, not an empty canvas
