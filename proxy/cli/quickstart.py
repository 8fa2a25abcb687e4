"""``echowin-gateway quickstart``: the README's first command.

Runs the gateway on loopback. When ECHOWIN_API_KEY is not set it also runs the echowin
simulator in the same process, with made-up keys, and points the gateway at it, so the
tour costs no echowin quota. It mints a demo token and prints it with a curl line: one
that expires after ``DEMO_LIFETIME``, and the one an earlier start minted is revoked first,
so the state never gathers live demo tokens (the store keeps only a token's hash: an
earlier one cannot be shown again, so it is replaced rather than reused).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time

from aiohttp import web

from proxy.admin.tokenops import create_token, open_store
from proxy.app import serve
from proxy.auth.tokens import NewToken, TokenStore
from proxy.config import ConfigError, GatewayConfig, SecretRef, resolve_secrets
from proxy.sim import SimConfig, Simulator

DEMO_SCOPES = ("contacts:read", "contacts:write", "tags:read", "boards:read")
DEMO_NAME = "quickstart"
DEMO_LIFETIME = "24h"


def _sim_env(config: GatewayConfig) -> tuple[dict[str, str], set[str], set[str]]:
    """Made-up values for every env secret that is unset: (env, team keys, agency keys)."""
    env: dict[str, str] = {}
    team: set[str] = set()
    agency: set[str] = set()
    up = config.upstream
    refs: list[tuple[SecretRef | None, set[str]]] = [(up.api_key, team), (up.agency_key, agency)]
    refs += [(ref, team) for ref in up.extra_keys.values()]
    for ref, bucket in refs:
        if ref is not None and ref.env is not None and not os.environ.get(ref.env):
            env[ref.env] = "sim-" + secrets.token_hex(16)
            bucket.add(env[ref.env])
    return env, team, agency


async def _start_simulator(
    config: GatewayConfig, port: int
) -> tuple[GatewayConfig, web.AppRunner, dict[str, str]]:
    env, team, agency = _sim_env(config)
    sim = Simulator(SimConfig(team_keys=frozenset(team), agency_keys=frozenset(agency)))
    runner = web.AppRunner(sim.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    upstream = config.upstream.model_copy(update={"base_url": f"http://127.0.0.1:{port}"})
    return config.model_copy(update={"upstream": upstream}), runner, env


async def demo_token(store: TokenStore, config: GatewayConfig) -> NewToken:
    """A new demo token, the earlier starts' ones revoked (they were shown once, each)."""
    now = time.time()
    for record in await store.list():
        if record.name == DEMO_NAME and record.status(now) == "active":
            await store.revoke(record.id, now)
    return await create_token(
        store,
        config,
        config.route_table(),
        name=DEMO_NAME,
        scopes=DEMO_SCOPES,
        expires_in=DEMO_LIFETIME,
        now=now,
    )


async def run_quickstart(
    config: GatewayConfig, *, sim_port: int, port: int | None = None, admin_port: int | None = None
) -> int:
    """Serve until SIGINT/SIGTERM. Returns the process exit code. ``port`` and
    ``admin_port`` replace the config's (``make run PORT=... ADMIN_PORT=...``)."""
    if port is None:
        _, port = config.listen_address()
    if admin_port is None:
        _, admin_port = config.admin_address()
    config = config.model_copy(
        update={"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}"}
    )
    env = dict(os.environ)
    sim_runner: web.AppRunner | None = None
    if not env.get("ECHOWIN_API_KEY"):
        config, sim_runner, made_up = await _start_simulator(config, sim_port)
        env.update(made_up)
        print(f"no ECHOWIN_API_KEY: using the echowin simulator at {config.upstream.base_url}")
    admin_ref = config.admin_token
    if admin_ref is not None and admin_ref.env is not None and not env.get(admin_ref.env):
        env[admin_ref.env] = secrets.token_urlsafe(24)
        print(f"admin token (for http://127.0.0.1:{admin_port}/admin/): {env[admin_ref.env]}")
    try:
        resolved = resolve_secrets(config, env)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"error: {line}")
        return 2
    store = await open_store(config)
    try:
        new = await demo_token(store, config)
    finally:
        await store.close()
    ready = asyncio.Event()
    task = asyncio.create_task(serve(config, resolved, ready=ready))
    started = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait({task, started}, return_when="FIRST_COMPLETED")
        if task.done():
            started.cancel()
            await task  # raises what stopped it (e.g. a port in use)
            return 1
        print(
            f"gateway on http://127.0.0.1:{port}, metrics on http://127.0.0.1:{admin_port}/metrics"
        )
        print(f"token (scopes: {' '.join(DEMO_SCOPES)}; expires in {DEMO_LIFETIME}): {new.token}")
        auth = f'-H "Authorization: Bearer {new.token}"'
        print(f"try: curl -s http://127.0.0.1:{port}/api/v1/contacts {auth}")
        print("stop with Ctrl-C")
        await task
    finally:
        if sim_runner is not None:
            await sim_runner.cleanup()
    return 0
