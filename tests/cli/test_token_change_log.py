"""A change made to the state file by another process reaches a running gateway through
the file's token change log, within half of ``tokens.cache_ttl_seconds``, though the
gateway has the token cached for the whole bound."""

from __future__ import annotations

from pathlib import Path

from tests.procs import (
    Spawn,
    create_token,
    eventually,
    gateway_config,
    http_client,
    run_cli,
    start_gateway,
    start_sim,
)

TTL = 8.0  # the change log is read every TTL / 2


async def test_a_revocation_by_the_cli_on_the_file_reaches_a_gateway_within_half_its_ttl(
    tmp_path: Path, spawn: Spawn
) -> None:
    sim = await start_sim(spawn)
    gw = gateway_config(tmp_path, sim.url, tokens={"cache_ttl_seconds": TTL})
    token = create_token(gw, "--name", "crm", "--scope", "contacts:read")
    headers = {"Authorization": f"Bearer {token}"}
    async with http_client() as session:
        gateway = await start_gateway(spawn, session, gw)

        async def status() -> int:
            async with session.get(gw.url("/api/v1/contacts"), headers=headers) as resp:
                return resp.status

        assert await status() == 200  # looked up: cached for TTL
        revoked = run_cli("token", "revoke", token.split("_")[1], "--config", gw.config, env=gw.env)
        assert revoked.returncode == 0, revoked.stderr

        async def refused() -> bool:
            return await status() == 401

        # The cache alone would keep it until TTL after the lookup; the log's next read,
        # at most TTL / 2 away, drops it.
        await eventually(refused, "the revocation", TTL / 2 + 1.5)
        gateway.check_alive()
