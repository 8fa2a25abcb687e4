"""What a running gateway holds: config, secrets, the token store, the upstream pool,
metrics and the admitter. Both listeners (proxy and admin) share one Runtime.

Opened and closed by the proxy app's cleanup_ctx (see proxy/app.py); constructing one
does no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from proxy.auth.authenticator import TokenAuthenticator
from proxy.auth.changes import ChangePoller, TokenChangeLog
from proxy.auth.client_address import TrustedProxies
from proxy.auth.routes import RouteTable
from proxy.auth.throttle import AuthThrottle
from proxy.auth.tokens import TokenFeed, TokenStore
from proxy.budget.admission import Admitter, OpenAdmitter
from proxy.budget.classes import ClassBook, ServiceClass
from proxy.budget.lane import Lane, QueuePolicy
from proxy.budget.quotas import QUOTA_HORIZON
from proxy.budget.scheduler import Scheduler
from proxy.budget.windows import Limit
from proxy.cache.channel import open_purge_channel
from proxy.cache.keeper import GatewayCache
from proxy.cache.purge import EVERYTHING
from proxy.config import AGENCY_KEY_NAME, GatewayConfig, Secrets, TracingConfig, tracing_from_env
from proxy.observe.class_metrics import ClassMetrics
from proxy.observe.history import QueueHistory
from proxy.observe.logs import AccessLog, setup_logging
from proxy.observe.metrics import Metrics
from proxy.observe.request_ids import RequestIds
from proxy.state import SharedSlotsHooks, State, open_state
from proxy.upstream import Upstream

if TYPE_CHECKING:  # OpenTelemetry is loaded only when tracing is on
    from proxy.observe.tracing import Tracing

log = logging.getLogger("echowin_gateway.state")

QUEUE_SAMPLE_SECONDS = 1.0
"""How often the queue depth of each credential is sampled for the status page's history."""


@dataclass(slots=True)
class Runtime:
    config: GatewayConfig
    secrets: Secrets
    routes: RouteTable
    metrics: Metrics = field(default_factory=Metrics)
    admitter: Admitter = field(default_factory=OpenAdmitter)
    started_at: float = field(default_factory=time.time)
    # Answers by status per token id on this replica (bounded by the number of tokens).
    usage: dict[str, Counter[int]] = field(default_factory=dict)
    usage_names: dict[str, str] = field(default_factory=dict)
    access_log: AccessLog = field(default_factory=AccessLog)
    request_ids: RequestIds = field(default_factory=RequestIds)
    # Worker processes of this gateway (serve --workers): each is a replica of the budget.
    workers: int = 1
    # Set when SIGTERM's drain starts: the proxy accepts no more, so /readyz says not ready.
    draining: bool = False
    # server.trusted_proxies, parsed once (and again on reload).
    trusted_proxies: TrustedProxies = field(init=False)
    # Failed authentications per client (auth.failures_per_client): proxy/auth/throttle.py.
    auth_throttle: AuthThrottle = field(init=False)
    # The response cache (``cache:``; proxy/cache/); None when it is off.
    cache: GatewayCache | None = None
    # A worker of serve --workers N: its group's private directory and its index (the
    # cache's purges reach the other workers there when the state is not in Redis).
    siblings: tuple[str, int] | None = None
    # Tracing (``tracing:`` or OTEL_* variables): what it runs with, decided once; the
    # tracer, opened with the runtime. Both None when it is off.
    trace_settings: TracingConfig | None = field(init=False)
    tracing: Tracing | None = None
    _state: State | None = None
    _auth: TokenAuthenticator | None = None
    _upstream: Upstream | None = None
    # The deepest queue per credential in each of the last 60 minutes (the status page).
    queue_history: QueueHistory = field(default_factory=QueueHistory)
    _pruner: asyncio.Task[None] | None = None
    _reloading: asyncio.Task[None] | None = None  # a reload opening new keys' lanes
    _sampler: asyncio.Task[None] | None = None
    _token_changes: ChangePoller | None = None

    def __post_init__(self) -> None:
        self.trusted_proxies = TrustedProxies.parse(self.config.server.trusted_proxies)
        self.auth_throttle = _auth_throttle(self.config)
        self.trace_settings = tracing_from_env(self.config.tracing, os.environ)
        self._configure_metrics(self.config)

    def _configure_metrics(self, config: GatewayConfig) -> None:
        bounds = config.metrics
        period = bounds.token_label_period_seconds
        self.metrics.labels.tokens.configure(bounds.token_labels, period)
        self.metrics.labels.credentials.configure(bounds.credential_labels, period)

    @classmethod
    def from_config(cls, config: GatewayConfig, secrets: Secrets) -> Runtime:
        return cls(config=config, secrets=secrets, routes=config.route_table())

    def apply(self, config: GatewayConfig, secrets: Secrets) -> None:
        """Take a reloaded config: secrets, routes, queue bounds, body cap, logging. The
        caller has checked that nothing only a restart can change has changed."""
        self.routes = config.route_table()
        if config.auth != self.config.auth:  # a new rate: the old buckets do not fit it
            self.auth_throttle = _auth_throttle(config)
        self.trusted_proxies = TrustedProxies.parse(config.server.trusted_proxies)
        self._configure_metrics(config)
        self.config = config
        if self.cache is not None:  # a credential given another key: its copies go
            for name, credential in secrets.credentials.items():
                old = self.secrets.credentials.get(name)
                if old is None or old.secret.reveal() != credential.secret.reveal():
                    self.cache.purge(name, EVERYTHING)
        self.secrets = secrets
        if isinstance(self.admitter, Scheduler):
            policy = self.admitter.policy
            policy.max_wait = config.queue.max_wait_seconds
            policy.max_depth = config.queue.max_depth
            policy.max_depth_per_token = config.queue.max_depth_per_token
        self.metrics.queue_max_wait.set(config.queue.max_wait_seconds)
        setup_logging(config.logging.level, config.logging.format)
        self.access_log.configure(config.logging)

    @property
    def reloading(self) -> bool:
        """True while a reload opens the lanes of keys it adds (see proxy/reload.py)."""
        return self._reloading is not None and not self._reloading.done()

    def keep(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a reload's ``work`` in the background (one at a time: see ``reloading``)."""
        self._reloading = asyncio.get_running_loop().create_task(work)

    @property
    def shared_state(self) -> bool:
        """True when the state lives in Redis, shared with other replicas."""
        return self._state is not None and self._state.shared

    @property
    def tokens_shared(self) -> bool:
        """True when the tokens live in a store shared with other replicas (Redis, or
        PostgreSQL through ``token_store``)."""
        return self._state is not None and self._state.tokens_shared

    @property
    def store(self) -> TokenStore:
        assert self._state is not None, "Runtime not opened"
        return self._state.store

    @property
    def auth(self) -> TokenAuthenticator:
        assert self._auth is not None, "Runtime not opened"
        return self._auth

    @property
    def upstream(self) -> Upstream:
        assert self._upstream is not None, "Runtime not opened"
        return self._upstream

    async def open(self) -> None:
        """Open the token store, the upstream pool and the budget's state."""
        cfg = self.config
        self.access_log.configure(cfg.logging)
        password = self.secrets.state_password
        hooks = SharedSlotsHooks(
            replicas=cfg.replicas * self.workers,
            on_latency=lambda op, s: self.metrics.state_latency.labels(op).observe(s),
            on_health=lambda up: self.metrics.state_up.labels("redis").set(1 if up else 0),
        )
        pg_password = self.secrets.token_store_password
        sentinel = self.secrets.sentinel_password
        self._state = state = await open_state(
            cfg,
            password.reveal() if password is not None else None,
            hooks,
            pg_password.reveal() if pg_password is not None else None,
            sentinel.reveal() if sentinel is not None else None,
        )
        self.metrics.state_up.labels(state.backend).set(1)
        state.watch_resets(self._state_reset)
        self._auth = TokenAuthenticator(
            state.store,
            cache_ttl=cfg.tokens.cache_ttl_seconds,
            cache_size=cfg.tokens.cache_size,
            stale_if_error=state.tokens_shared and cfg.on_state_failure == "local",
        )
        if isinstance(state.store, TokenFeed):  # changes made elsewhere drop the cache at once
            up = self.metrics.state_up.labels(state.token_backend)
            state.store.follow(self._auth.invalidate, lambda ok: up.set(1 if ok else 0))
        ttl = cfg.tokens.cache_ttl_seconds
        if isinstance(state.store, TokenChangeLog) and ttl > 0:  # a token read when it changes
            self._token_changes = ChangePoller(state.store, self._auth, ttl / 2)
            self._token_changes.start()
        self._upstream = Upstream(
            cfg.upstream.base_url,
            timeout_seconds=cfg.upstream.timeout_seconds,
            connect_timeout_seconds=cfg.upstream.connect_timeout_seconds,
            max_connections=cfg.upstream.max_connections,
        )
        await self._upstream.start()
        self.admitter = await self._open_scheduler(state)
        if cfg.cache is not None:
            self.cache = GatewayCache(cfg.cache, self.metrics.registry)
            self.cache.channel = await open_purge_channel(
                self.cache, state.redis, cfg.redis.key_prefix, self.siblings
            )
        if state.send_log is not None:
            self._pruner = asyncio.get_running_loop().create_task(self._prune_forever())
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())
        if self.trace_settings is not None:
            headers = {k: v.reveal() for k, v in self.secrets.tracing_headers.items()}
            self.tracing = _open_tracing(self.trace_settings, headers, cfg.upstream.base_url)

    def _state_reset(self) -> None:
        """Redis lost its data: say so, and where the tokens are (lost with it, or not)."""
        self.metrics.state_resets.inc()
        assert self._state is not None
        if self.config.token_store is None:  # tokens in Redis too
            tokens = "lost with it: callers get 401 until their tokens are created again"
            hint = "run Redis with appendonly yes, or keep tokens in token_store: postgresql://"
        else:
            tokens = f"kept in {self._state.token_backend}"
            hint = "the budget is rebuilt from the replicas' journals"
        fields = {"backend": "redis", "tokens": tokens, "hint": hint}
        log.warning("Redis lost its data (restarted empty?)", extra={"fields": fields})

    async def _open_scheduler(self, state: State) -> Scheduler:
        cfg = self.config
        policy = QueuePolicy(
            max_wait=cfg.queue.max_wait_seconds,
            max_depth=cfg.queue.max_depth,
            max_depth_per_token=cfg.queue.max_depth_per_token,
        )
        lanes = {}
        for name in self.secrets.credentials:
            lanes[name] = await self._new_lane(name, state, policy)
        scheduler = Scheduler(lanes, policy, self.metrics, quota_sources=state.quota_source)
        quotas = self.metrics.labels.shown_tokens(scheduler.token_quotas)
        self.metrics.attach_budget(scheduler.snapshot, quotas)
        if cfg.classes:
            scheduler.class_observer = ClassMetrics(
                self.metrics.registry, scheduler.snapshot, self.metrics.labels.credential_now
            )
        self.metrics.queue_max_wait.set(cfg.queue.max_wait_seconds)
        return scheduler

    def lane_limits(self, name: str, secrets: Secrets | None = None) -> tuple[Limit, ...]:
        """The budget windows of the key ``name``: its own (upstream.keys_file) or
        upstream.limits."""
        credential = (secrets or self.secrets).credentials[name]
        if credential.limits is not None:
            return tuple(Limit(n, per) for n, per in credential.limits)
        return tuple(Limit(lim.requests, lim.per_seconds) for lim in self.config.upstream.limits)

    async def _new_lane(
        self, name: str, state: State, policy: QueuePolicy, secrets: Secrets | None = None
    ) -> Lane:
        limits = list(self.lane_limits(name, secrets))
        book = class_book(self.config, limits)  # its own: the classes in the key's windows
        lane = Lane(
            name,
            limits,
            self.config.upstream.window_guard_seconds,
            state.send_log,
            policy,
            self.metrics,
            source=state.credential_source(name, limits, book),
            classes=book,
        )
        await lane.restore()
        self.metrics.upstream_429s.labels(name)  # exported as 0 from the start
        return lane

    def key_problems(self, secrets: Secrets) -> list[str]:
        """What a reload's ``secrets`` change that only a restart can: a key's own limits
        (its lane keeps its windows), or the agency key's presence."""
        problems = []
        old = self.secrets.credentials
        if (AGENCY_KEY_NAME in old) != (AGENCY_KEY_NAME in secrets.credentials):
            problems.append("upstream.agency_key: adding or removing it needs a restart")
        lanes = self.admitter.lanes if isinstance(self.admitter, Scheduler) else {}
        for name in secrets.credentials:
            lane = lanes.get(name)
            if lane is not None and tuple(lane.budget.limits) != self.lane_limits(name, secrets):
                problems.append(f"upstream key {name}: changing its limits needs a restart")
        return problems

    async def change_keys(self, secrets: Secrets) -> None:
        """Open the lanes of the keys ``secrets`` adds (before any request can name them),
        and retire those it takes away; ``apply`` then swaps the secrets in."""
        scheduler = self.admitter
        if not isinstance(scheduler, Scheduler) or self._state is None:
            return
        lanes = [
            scheduler.lanes.get(name)
            or await self._new_lane(name, self._state, scheduler.policy, secrets)
            for name in secrets.credentials
        ]
        for lane in lanes:  # all at once, once every one is open
            scheduler.add_lane(lane)
        for name in self.secrets.credentials:
            if name not in secrets.credentials:
                scheduler.retire(name)

    def _horizon(self) -> float:
        """How long a recorded send can still matter, seconds: a token quota's hour too."""
        up = self.config.upstream
        longest = max(lim.per_seconds for lim in up.limits) + up.window_guard_seconds
        return max(longest, QUOTA_HORIZON)

    async def _prune_forever(self) -> None:
        """Drop sends no window counts any more, once a minute."""
        while True:
            await asyncio.sleep(60)
            if self._state is not None and self._state.send_log is not None:
                with contextlib.suppress(Exception):
                    await self._state.send_log.prune(time.time() - self._horizon() - 60)

    async def _sample_forever(self) -> None:
        """Each credential's queue depth into ``queue_history``, every QUEUE_SAMPLE_SECONDS:
        a dict walk a second, nothing on a request's path."""
        while True:
            if isinstance(self.admitter, Scheduler):
                now = time.time()
                for name, lane in self.admitter.lanes.items():
                    self.queue_history.sample(name, now, lane.depth)
            await asyncio.sleep(QUEUE_SAMPLE_SECONDS)

    async def close(self) -> None:
        self.access_log.close()  # what waits is written; later lines go out at once
        if self._reloading is not None:
            self._reloading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloading
        if self.tracing is not None:  # the last spans exported, off the event loop
            await asyncio.to_thread(self.tracing.shutdown)
        for task in (self._pruner, self._sampler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._token_changes is not None:
            await self._token_changes.stop()
        await self.admitter.close()
        if self.cache is not None:
            await self.cache.close()
        if self._upstream is not None:
            await self._upstream.close()
        if self._state is not None:
            await self._state.close()


def _open_tracing(settings: TracingConfig, headers: dict[str, str], base_url: str) -> Tracing:
    """The tracer (proxy/observe/tracing.py, imported only now: the ``otel`` extra);
    ``headers``: ``tracing.headers``, resolved."""
    from proxy.observe.tracing import Tracing

    upstream = urlsplit(base_url)
    port = upstream.port or (443 if upstream.scheme == "https" else 80)
    return Tracing(settings, headers, os.environ, (upstream.hostname or "", port))


def class_book(config: GatewayConfig, limits: list[Limit]) -> ClassBook | None:
    """One credential's classes of service, as configured (None: none configured)."""
    if not config.classes or config.default_class is None:
        return None
    classes = [
        ServiceClass(
            name,
            spec.weight,
            tuple(Limit(r.requests, r.per_seconds) for r in spec.reserve),
            spec.pace,
            spec.burst,
        )
        for name, spec in config.classes.items()
    ]
    guard = config.upstream.window_guard_seconds
    return ClassBook(classes, limits, guard, config.default_class)


def _auth_throttle(config: GatewayConfig) -> AuthThrottle:
    auth = config.auth
    rate = auth.failures_per_client
    return AuthThrottle(rate.requests, rate.per_seconds, auth.max_clients_tracked)


RUNTIME = web.AppKey("runtime", Runtime)
