"""Shared fixtures: the real gateway in front of the real simulator, both on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner
from redis.asyncio import Redis

from proxy.admin.tokenops import create_token
from proxy.app import build_apps, listener_guard
from proxy.config import parse_config, resolve_secrets
from proxy.gateway.handler import lobby_decider
from proxy.runtime import RUNTIME, Runtime
from proxy.server.guard import Guard, MalformedLog
from proxy.server.listeners import JsonErrorRunner, ProxyRunner
from proxy.sim import SimConfig, SimLimit, Simulator

# The subprocess helpers' fixtures (``spawn``) and the PostgreSQL database of the session
# (``pg_session_url``) are shared by every test module.
pytest_plugins = ["tests.procs", "tests.state.pg_server"]

TEAM_KEY = "real-team-key-0123456789abcdef"
ACME_KEY = "real-acme-key-fedcba9876543210"
AGENCY_KEY = "real-agency-key-55555555555555"
ADMIN_TOKEN = "admin-token-for-tests"
SECRETS = (TEAM_KEY, ACME_KEY, AGENCY_KEY)
ENV = {
    "ECHOWIN_API_KEY": TEAM_KEY,
    "ECHOWIN_ACME_KEY": ACME_KEY,
    "ECHOWIN_AGENCY_KEY": AGENCY_KEY,
    "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
}

ServerFactory = Callable[..., Awaitable[TestServer]]


def base_url(server: TestServer) -> str:
    """A test server's URL without the trailing slash: an upstream's ``base_url``."""
    return str(server.make_url("")).rstrip("/")


@dataclass
class SimHandle:
    sim: Simulator
    server: TestServer

    @property
    def url(self) -> str:
        return base_url(self.server)


@dataclass
class GatewayHandle:
    runtime: Runtime
    proxy: TestServer
    admin: TestServer

    def url(self, path: str) -> str:
        return str(self.proxy.make_url(path))

    def admin_url(self, path: str) -> str:
        return str(self.admin.make_url(path))

    minted: int = 0

    async def token(self, *scopes: str, name: str | None = None, **kwargs: Any) -> str:
        """A new token; without ``name``, "svc", then "svc-2", ... (active names are unique)."""
        self.minted += 1
        if name is None:
            name = "svc" if self.minted == 1 else f"svc-{self.minted}"
        rt = self.runtime
        new = await create_token(
            rt.store, rt.config, rt.routes, name=name, scopes=scopes or ("*",), **kwargs
        )
        return new.token


@pytest.fixture
async def sim(aiohttp_server: ServerFactory) -> SimHandle:
    simulator = Simulator(
        SimConfig(
            team_keys=frozenset({TEAM_KEY, ACME_KEY}),
            agency_keys=frozenset({AGENCY_KEY}),
            limits=(SimLimit(100_000, 3600.0),),
        )
    )
    server = await aiohttp_server(simulator.app())
    return SimHandle(simulator, server)


def gateway_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    upstream = {
        "base_url": upstream_url,
        "api_key": {"env": "ECHOWIN_API_KEY"},
        "agency_key": {"env": "ECHOWIN_AGENCY_KEY"},
        "extra_keys": {"acme": {"env": "ECHOWIN_ACME_KEY"}},
        "timeout_seconds": 2,
        "connect_timeout_seconds": 1,
    }
    upstream.update(overrides.pop("upstream", {}))
    raw: dict[str, Any] = {"state": "memory://", "upstream": upstream}
    raw.update(overrides)
    return raw


@pytest.fixture
async def make_gateway(
    aiohttp_server: ServerFactory, sim: SimHandle
) -> AsyncIterator[Callable[..., Awaitable[GatewayHandle]]]:
    proxies: list[ProxyTestServer] = []
    admins: list[TestServer] = []

    async def make(upstream_url: str | None = None, **overrides: Any) -> GatewayHandle:
        config = parse_config(gateway_config(upstream_url or sim.url, **overrides))
        proxy_app, admin_app = build_apps(config, resolve_secrets(config, ENV))
        malformed = MalformedLog()
        proxy = ProxyTestServer(proxy_app, malformed, host="127.0.0.1")
        await proxy.start_server()
        proxies.append(proxy)
        admin = AdminTestServer(admin_app, listener_guard(proxy_app[RUNTIME], malformed))
        await admin.start_server()
        admins.append(admin)
        return GatewayHandle(proxy_app[RUNTIME], proxy, admin)

    yield make
    while proxies:
        proxy = proxies.pop()
        await proxy.close()
        proxy.malformed.close()
    while admins:
        await admins.pop().close()


class ProxyTestServer(TestServer):
    """The proxy app served as ``serve`` serves it: connections start in the lobby."""

    def __init__(self, app: web.Application, malformed: MalformedLog, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.malformed = malformed

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        assert self.app is not None
        rt = self.app[RUNTIME]
        return ProxyRunner(
            self.app,
            lobby_decider(rt),
            lambda: rt.config.upstream.max_connections,
            rt.metrics.count_connections,
            guard=listener_guard(rt, self.malformed),
            **kwargs,
        )


class AdminTestServer(TestServer):
    """The admin app served as ``serve`` serves it: bounded, timed, JSON errors."""

    def __init__(self, app: web.Application, guard: Guard, **kwargs: Any) -> None:
        kwargs.setdefault("host", "127.0.0.1")
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        assert self.app is not None
        return JsonErrorRunner(self.app, guard=self.guard, **kwargs)


@pytest.fixture
async def gateway(make_gateway: Callable[..., Awaitable[GatewayHandle]]) -> GatewayHandle:
    return await make_gateway()


def app_of(server: TestServer) -> web.Application:
    app = server.app
    assert app is not None
    return app


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    """A client of the Redis on 127.0.0.1:6379; fails (never skips) without one."""
    redis = Redis(host="127.0.0.1", port=6379, socket_timeout=1, socket_connect_timeout=1)
    try:
        await redis.ping()
    except Exception as exc:  # pragma: no cover - the environment's fault
        pytest.fail(f"this test needs Redis on 127.0.0.1:6379: {exc!r}")
    yield redis
    await redis.aclose()


@contextlib.asynccontextmanager
async def raw_upstream(answer: bytes) -> AsyncIterator[str]:
    """A loopback upstream that reads a request's head, writes ``answer`` as given (bytes no
    well-behaved server would send), and closes; yields its base URL."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
