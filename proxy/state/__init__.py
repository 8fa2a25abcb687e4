"""Durable state behind Protocols, and the one place that maps a state URL (parsed by
:mod:`proxy.config.state_url`, whose docstring lists the URLs) or a ``token_store`` URL
(:mod:`proxy.config.postgres_url`) to a backend: ``open_state`` for a gateway process,
``open_token_store`` and ``open_send_log`` for one part alone. Nothing outside this module
opens a backend by name (``token migrate`` only asks which password a URL needs)."""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.auth.tokens import TokenStore
from proxy.budget.classes import ClassBook
from proxy.budget.quotas import local_quota_source
from proxy.budget.slots import SendLog, SlotSource
from proxy.budget.windows import Limit
from proxy.config import GatewayConfig
from proxy.config.postgres_url import is_postgres_url
from proxy.config.state_url import StateUrl, parse_state_url
from proxy.state.memory import MemorySendLog, MemoryTokenStore
from proxy.state.sqlite.sends import SqliteSendLog
from proxy.state.sqlite.tokens import SqliteTokenStore

if TYPE_CHECKING:
    from proxy.state.postgres.connection import PostgresOptions
    from proxy.state.postgres.tokens import PostgresTokenStore
    from proxy.state.redis.client import RedisClient, RedisOptions, open_redis
    from proxy.state.redis.reset import ResetWatch
    from proxy.state.redis.tokens import RedisTokenStore

__all__ = [
    "MemorySendLog",
    "MemoryTokenStore",
    "PostgresOptions",
    "PostgresTokenStore",
    "RedisOptions",
    "RedisTokenStore",
    "SharedSlotsHooks",
    "SqliteSendLog",
    "SqliteTokenStore",
    "State",
    "StateUrl",
    "open_redis",
    "open_send_log",
    "open_state",
    "open_token_store",
    "parse_state_url",
    "postgres_options",
    "redis_options",
    "sentinel_password",
    "state_password",
]

_REDIS_NAMES = {
    "RedisOptions": "proxy.state.redis.client",
    "open_redis": "proxy.state.redis.client",
    "RedisTokenStore": "proxy.state.redis.tokens",
    "PostgresOptions": "proxy.state.postgres.connection",
    "PostgresTokenStore": "proxy.state.postgres.tokens",
}


def __getattr__(name: str) -> object:
    """The Redis and PostgreSQL names, imported on first use so memory and sqlite work
    without redis-py or asyncpg."""
    if name in _REDIS_NAMES:
        return getattr(importlib.import_module(_REDIS_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def redis_options(
    config: GatewayConfig, password: str | None, sentinel_password: str | None = None
) -> RedisOptions | None:
    """The RedisOptions for ``config``; None unless its state is in Redis (redis-py is
    imported only then). ``password``, ``sentinel_password``: ``redis.password`` and
    ``redis.sentinel_password``, resolved."""
    if parse_state_url(config.state).backend != "redis":
        return None
    from proxy.state.redis.client import RedisOptions

    redis = config.redis
    return RedisOptions(
        password=password,
        key_prefix=redis.key_prefix,
        timeout_seconds=redis.timeout_seconds,
        username=redis.username,
        sentinel_username=redis.sentinel_username,
        sentinel_password=sentinel_password,
        pool_size=redis.pool_size,
        connect_timeout_seconds=redis.connect_timeout_seconds,
        tls=redis.tls,
    )


def postgres_options(config: GatewayConfig, password: str | None) -> PostgresOptions | None:
    """The PostgresOptions for ``config``'s ``token_store``; None unless it is PostgreSQL.
    ``password``: the resolved ``postgres.password``."""
    if config.token_store is None:
        return None
    from proxy.state.postgres.connection import PostgresOptions

    pg = config.postgres
    return PostgresOptions(
        password=password, timeout_seconds=pg.timeout_seconds, pool_size=pg.pool_size
    )


def state_password(config: GatewayConfig, environ: Mapping[str, str]) -> str | None:
    """``redis.password`` read from ``environ`` (or its file) when the state is in Redis;
    None otherwise, or when none is set. ConfigError if it cannot be read."""
    ref = config.redis.password
    if ref is None or parse_state_url(config.state).backend != "redis":
        return None
    return ref.resolve("redis.password", environ).reveal()


def sentinel_password(config: GatewayConfig, environ: Mapping[str, str]) -> str | None:
    """``redis.sentinel_password`` read from ``environ`` (or its file) when the state is in
    Redis; None otherwise, or when none is set. ConfigError if it cannot be read."""
    ref = config.redis.sentinel_password
    if ref is None or parse_state_url(config.state).backend != "redis":
        return None
    return ref.resolve("redis.sentinel_password", environ).reveal()


async def open_token_store(
    url: str,
    *,
    redis_options: RedisOptions | None = None,
    redis_client: RedisClient | None = None,
    postgres_options: PostgresOptions | None = None,
) -> TokenStore:
    """Open the token store named by a ``state`` or ``token_store`` URL (async: opening may
    touch disk or network).

    The caller owns the store and must ``await store.close()``. ValueError for a bad URL (see
    ``parse_state_url``); ``StateFileError`` (proxy.state.sqlite.connection) if the file
    cannot be opened.

    For ``redis://``: ``redis_options`` gives the password, key prefix and timeout (default
    ``RedisOptions()``). With ``redis_client`` (from ``open_redis``, shared with the budget)
    the store uses it and leaves it open on ``close``; without, the store opens its own client
    and closes it. Nothing is sent to Redis here, so a gateway starts while Redis is down;
    ``ping`` tells. Both keywords are ignored for the other backends.

    For ``postgresql://``: ``postgres_options`` (default ``PostgresOptions()``) gives the
    password, timeout and pool size; the store connects and migrates the schema here
    (``PostgresStoreError`` when it cannot) and also keeps the audit log.
    """
    if is_postgres_url(url):
        from proxy.state.postgres.connection import PostgresOptions
        from proxy.state.postgres.tokens import PostgresTokenStore

        options = PostgresOptions() if postgres_options is None else postgres_options
        return await PostgresTokenStore.open(url, options)
    state = parse_state_url(url)
    if state.backend == "memory":
        return MemoryTokenStore()
    if state.backend == "redis":
        return _open_redis_store(url, redis_options, redis_client)
    assert state.path is not None
    return await SqliteTokenStore.open(state.path)


def _open_redis_store(
    url: str, options: RedisOptions | None, client: RedisClient | None
) -> RedisTokenStore:
    from proxy.state.redis.client import RedisOptions, open_redis
    from proxy.state.redis.tokens import RedisTokenStore

    options = RedisOptions() if options is None else options
    if client is not None:
        return RedisTokenStore(client, key_prefix=options.key_prefix)
    return RedisTokenStore(
        open_redis(url, options), key_prefix=options.key_prefix, owns_client=True
    )


async def open_send_log(url: str) -> MemorySendLog | SqliteSendLog:
    """Open the budget's write-ahead send log named by a ``state`` URL (see above).

    ValueError for ``redis://``: the shared budget keeps its state in Redis by other means.
    """
    state = parse_state_url(url)
    if state.backend == "memory":
        return MemorySendLog()
    if state.backend == "redis":
        raise ValueError("state: open_send_log serves memory:// and sqlite:// only, not redis://")
    assert state.path is not None
    return await SqliteSendLog.open(state.path)


@dataclass(frozen=True, slots=True)
class SharedSlotsHooks:
    """What a gateway process hears from shared (Redis) slots: ``replicas`` counting each
    worker; ``on_latency(op, seconds)`` per Redis call; ``on_health(up)``."""

    replicas: int
    on_latency: Callable[[str, float], None]
    on_health: Callable[[bool], None]


@dataclass(slots=True)
class State:
    """One process's durable state, as ``open_state`` opened it. ``backend``: the state
    URL's (``memory``, ``sqlite``, ``redis``). ``shared``: True when the budget and the
    tokens live in Redis, shared with other replicas. ``send_log``: the budget's write-ahead
    log for local slots (None when ``shared``)."""

    backend: str
    store: TokenStore
    send_log: SendLog | None
    _config: GatewayConfig
    _hooks: SharedSlotsHooks
    _redis: RedisClient | None = None
    _reset_watch: ResetWatch | None = None

    @property
    def shared(self) -> bool:
        return self._redis is not None

    @property
    def redis(self) -> RedisClient | None:
        """The Redis client the state uses (None unless ``shared``)."""
        return self._redis

    @property
    def token_backend(self) -> str:
        """Where the tokens live: ``postgresql`` for a ``token_store``, else ``backend``."""
        return "postgresql" if self._config.token_store is not None else self.backend

    @property
    def tokens_shared(self) -> bool:
        """True when the tokens live in a store other replicas share (Redis, PostgreSQL)."""
        return self.shared or self._config.token_store is not None

    def credential_source(
        self, name: str, limits: Sequence[Limit], classes: ClassBook | None = None
    ) -> SlotSource | None:
        """The shared slot source of credential ``name``; None for local slots (the lane
        keeps them on ``send_log``). ``classes``: its classes of service, whose reserve
        rule a shared source checks in the reservation's own step."""
        return self._shared_slots(name, limits, quota=False, classes=classes)

    def quota_source(self, name: str, limits: tuple[Limit, ...]) -> SlotSource:
        """A token's own quota, kept where the credentials' budgets are (no guard: the
        gateway counts it, echowin does not)."""
        source = self._shared_slots(name, limits, quota=True)
        if source is None:
            assert self.send_log is not None
            source = local_quota_source(name, limits, self.send_log, time.time)
        return source

    def _shared_slots(
        self, name: str, limits: Sequence[Limit], *, quota: bool, classes: ClassBook | None = None
    ) -> SlotSource | None:
        """Redis slots: a token's quota keeps its view fresh only while the token is in use
        here (``QUOTA_IN_USE``), a credential's always."""
        if self._redis is None:
            return None
        from proxy.state.redis.slots import QUOTA_IN_USE, RedisSlots

        cfg, hooks = self._config, self._hooks
        source = RedisSlots(
            name,
            self._redis,
            cfg.redis.key_prefix,
            limits,
            0.0 if quota else cfg.upstream.window_guard_seconds,
            replicas=hooks.replicas,
            mode=cfg.on_state_failure,
            on_latency=hooks.on_latency,
            on_health=hooks.on_health,
            keep_view=QUOTA_IN_USE if quota else math.inf,
        )
        if classes is not None:
            from proxy.state.redis.class_view import follow_classes

            follow_classes(source, classes)
        return source

    def watch_resets(self, on_reset: Callable[[], None], interval: float | None = None) -> None:
        """With state in Redis: call ``on_reset()`` each time Redis is found to have lost
        its data (``proxy.state.redis.reset``), checking every ``interval`` seconds (default
        ``CHECK_SECONDS``) until ``close``. Nothing for the other backends."""
        if self._redis is None or self._reset_watch is not None:
            return
        from proxy.state.redis.reset import CHECK_SECONDS, ResetWatch

        every = CHECK_SECONDS if interval is None else interval
        watch = ResetWatch(self._redis, self._config.redis.key_prefix, on_reset, interval=every)
        self._reset_watch = watch
        watch.start()

    async def close(self) -> None:
        """Close the send log, the token store and the Redis client (after the slots)."""
        if self._reset_watch is not None:
            await self._reset_watch.stop()
        try:
            if self.send_log is not None:
                await self.send_log.close()
            await self.store.close()
        finally:
            if self._redis is not None:
                await self._redis.aclose()


async def open_state(
    config: GatewayConfig,
    password: str | None,
    hooks: SharedSlotsHooks,
    token_store_password: str | None = None,
    sentinel_password: str | None = None,
) -> State:
    """Open what ``config.state`` names: the token store and the budget's state (a send log,
    or one Redis client shared by the store and every slot source); the token store is
    ``config.token_store``'s instead when set. ``password``: the resolved ``redis.password``
    (ignored by the other backends), ``sentinel_password`` the sentinels' own;
    ``token_store_password``: ``postgres.password``. A
    Redis that refuses what the gateway needs (a permission, the password, TLS) raises
    ``StateAccessError`` (proxy.state.redis.preflight); one that does not answer lets the
    gateway start."""
    client = None
    options = redis_options(config, password, sentinel_password)
    if options is not None:
        from proxy.state.redis.client import open_redis  # redis-py only when Redis is used
        from proxy.state.redis.preflight import check_access

        client = open_redis(config.state, options)
        try:
            await check_access(client, options.key_prefix)  # a refused permission: an error
        except BaseException:
            await client.aclose()
            raise
    try:
        if config.token_store is not None:
            pg = postgres_options(config, token_store_password)
            store = await open_token_store(config.token_store, postgres_options=pg)
        else:
            store = await open_token_store(config.state, redis_options=options, redis_client=client)
    except BaseException:
        if client is not None:
            await client.aclose()
        raise
    try:
        send_log = None if client is not None else await open_send_log(config.state)
    except BaseException:
        await store.close()
        raise
    return State(parse_state_url(config.state).backend, store, send_log, config, hooks, client)
