"""What a running gateway holds: config, secrets, the token store, the upstream pool,
metrics and the admitter. Both listeners (proxy and admin) share one Runtime.

Opened and closed by the proxy app's cleanup_ctx (see proxy/app.py); constructing one
does no I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from proxy.admission import Admitter, OpenAdmitter
from proxy.config import GatewayConfig, Secrets
from proxy.metrics import Metrics
from proxy.routes import RouteTable
from proxy.state import open_token_store
from proxy.tokens import TokenAuthenticator, TokenStore
from proxy.upstream import Upstream


@dataclass(slots=True)
class Runtime:
    config: GatewayConfig
    secrets: Secrets
    routes: RouteTable
    metrics: Metrics = field(default_factory=Metrics)
    admitter: Admitter = field(default_factory=OpenAdmitter)
    started_at: float = field(default_factory=time.time)
    _store: TokenStore | None = None
    _auth: TokenAuthenticator | None = None
    _upstream: Upstream | None = None

    @classmethod
    def from_config(cls, config: GatewayConfig, secrets: Secrets) -> Runtime:
        return cls(config=config, secrets=secrets, routes=config.route_table())

    @property
    def store(self) -> TokenStore:
        assert self._store is not None, "Runtime not opened"
        return self._store

    @property
    def auth(self) -> TokenAuthenticator:
        assert self._auth is not None, "Runtime not opened"
        return self._auth

    @property
    def upstream(self) -> Upstream:
        assert self._upstream is not None, "Runtime not opened"
        return self._upstream

    async def open(self) -> None:
        """Open the token store and the upstream pool."""
        cfg = self.config
        self._store = await open_token_store(cfg.state)
        self._auth = TokenAuthenticator(
            self._store,
            cache_ttl=cfg.tokens.cache_ttl_seconds,
            cache_size=cfg.tokens.cache_size,
        )
        self._upstream = Upstream(
            cfg.upstream.base_url,
            timeout_seconds=cfg.upstream.timeout_seconds,
            connect_timeout_seconds=cfg.upstream.connect_timeout_seconds,
            max_connections=cfg.upstream.max_connections,
        )
        await self._upstream.start()

    async def close(self) -> None:
        if self._upstream is not None:
            await self._upstream.close()
        if self._store is not None:
            await self._store.close()


RUNTIME = web.AppKey("runtime", Runtime)
