"""What a running gateway holds: config, secrets, the token store, the upstream pool,
metrics and the admitter. Both listeners (proxy and admin) share one Runtime.

Opened and closed by the proxy app's cleanup_ctx (see proxy/app.py); constructing one
does no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from aiohttp import web

from proxy.admission import Admitter, OpenAdmitter
from proxy.budget import Limit
from proxy.config import GatewayConfig, Secrets
from proxy.metrics import Metrics
from proxy.routes import RouteTable
from proxy.scheduler import Lane, QueuePolicy, Scheduler, SendLog
from proxy.state import open_send_log, open_token_store
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
    _send_log: SendLog | None = None
    _pruner: asyncio.Task[None] | None = None

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
        self._send_log = await open_send_log(cfg.state)
        self.admitter = await self._open_scheduler(self._send_log)
        self._pruner = asyncio.get_running_loop().create_task(self._prune_forever())

    async def _open_scheduler(self, send_log: SendLog) -> Scheduler:
        cfg = self.config
        limits = [Limit(lim.requests, lim.per_seconds) for lim in cfg.upstream.limits]
        policy = QueuePolicy(
            max_wait=cfg.queue.max_wait_seconds,
            max_depth=cfg.queue.max_depth,
            max_depth_per_token=cfg.queue.max_depth_per_token,
        )
        lanes = {}
        for name in self.secrets.credentials:
            lane = Lane(
                name, limits, cfg.upstream.window_guard_seconds, send_log, policy, self.metrics
            )
            await lane.restore()
            lanes[name] = lane
            self.metrics.upstream_429s.labels(name)  # exported as 0 from the start
        scheduler = Scheduler(lanes, policy, self.metrics)
        self.metrics.attach_budget(scheduler.snapshot)
        return scheduler

    def _horizon(self) -> float:
        """How long a recorded send can still matter, seconds."""
        up = self.config.upstream
        return max(lim.per_seconds for lim in up.limits) + up.window_guard_seconds

    async def _prune_forever(self) -> None:
        """Drop sends no window counts any more, once a minute."""
        while True:
            await asyncio.sleep(60)
            if self._send_log is not None:
                with contextlib.suppress(Exception):
                    await self._send_log.prune(time.time() - self._horizon() - 60)

    async def close(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
        await self.admitter.close()
        if self._upstream is not None:
            await self._upstream.close()
        if self._send_log is not None:
            await self._send_log.close()
        if self._store is not None:
            await self._store.close()


RUNTIME = web.AppKey("runtime", Runtime)
