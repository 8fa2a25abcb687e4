"""Operational edges: shutdown with a queue, state files that cannot be used, config input
that must give one clear error. Real ``serve`` and CLI subprocesses (tests/procs.py)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp

from tests.procs import (
    Spawn,
    create_token,
    eventually,
    gateway_config,
    http_client,
    start_gateway,
    start_sim,
)


async def _queue_depth(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url) as resp:
        text = await resp.text()
    depth = 0.0
    for line in text.splitlines():
        if line.startswith("echowin_gateway_queue_depth{"):
            depth += float(line.rsplit(" ", 1)[1])
    return depth


async def test_sigterm_answers_a_request_still_queued_when_the_grace_ends(
    tmp_path: Path, spawn: Spawn
) -> None:
    """A request waiting for budget when the drain's grace runs out gets an answer (503,
    Retry-After), not a dropped connection, and the process still exits within the grace."""
    sim = await start_sim(spawn)
    gw = gateway_config(
        tmp_path,
        sim.url,
        server={"shutdown_grace_seconds": 1},
        queue={"max_wait_seconds": 30},
    )
    raw_limits = [{"requests": 1, "per_seconds": 20}]
    text = gw.config.read_text(encoding="utf-8")
    gw.config.write_text(
        text.replace("  timeout_seconds: 5\n", f"  timeout_seconds: 5\n  limits: {raw_limits}\n"),
        encoding="utf-8",
    )
    token = create_token(gw, "--name", "svc", "--scope", "contacts:read")
    auth = {"Authorization": f"Bearer {token}"}
    async with http_client() as session:
        proc = await start_gateway(spawn, session, gw)
        async with session.get(gw.url("/api/v1/contacts"), headers=auth) as resp:
            assert resp.status == 200  # the window's one send

        async def queued() -> tuple[int, str, str | None]:
            async with (
                http_client() as client,
                client.get(gw.url("/api/v1/contacts"), headers=auth) as resp,
            ):
                return resp.status, await resp.text(), resp.headers.get("Retry-After")

        waiting = asyncio.create_task(queued())

        async def is_queued() -> bool:
            return await _queue_depth(session, gw.admin_url("/metrics")) >= 1

        await eventually(is_queued, "a request queued for budget", timeout=5)
        signalled = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        try:
            status, body, retry_after = await asyncio.wait_for(waiting, timeout=10)
        except aiohttp.ClientError as exc:
            raise AssertionError(f"the queued request got no answer: {exc!r}") from exc
        assert status == 503, body
        assert '"reason":"shutting_down"' in body.replace(" ", ""), body
        assert retry_after is not None
        assert await proc.wait_exit(timeout=10) == 0, proc.stderr()[-3000:]
        assert time.monotonic() - signalled < 1 + 2
        assert "Traceback" not in proc.stderr()
