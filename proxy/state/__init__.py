"""Durable state behind Protocols, and the one place that maps a state URL (parsed by
:mod:`proxy.config.state_url`, whose docstring lists the URLs) to a backend: ``open_state``
for a gateway process, ``open_token_store`` and ``open_send_log`` for one part alone.
Nothing outside this module asks which backend a URL names."""

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
from proxy.config.state_url import StateUrl, parse_state_url
from proxy.state.memory import MemorySendLog, MemoryTokenStore
from proxy.state.sqlite.sends import SqliteSendLog
from proxy.state.sqlite.tokens import SqliteTokenStore

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from proxy.state.redis.client import RedisOptions, open_redis
    from proxy.state.redis.tokens import RedisTokenStore

__all__ = [
    "MemorySendLog",
    "MemoryTokenStore",
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
    "redis_options",
    "state_password",
]

_REDIS_NAMES = {
    "RedisOptions": "proxy.state.redis.client",
    "open_redis": "proxy.state.redis.client",
    "RedisTokenStore": "proxy.state.redis.tokens",
}


def __getattr__(name: str) -> object:
    """The Redis names, imported on first use so memory and sqlite work without redis-py."""
    if name in _REDIS_NAMES:
        return getattr(importlib.import_module(_REDIS_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def redis_options(config: GatewayConfig, password: str | None) -> RedisOptions | None:
    """The RedisOptions for ``config``; None unless its state is in Redis (redis-py is
    imported only then)."""
    if parse_state_url(config.state).backend != "redis":
        return None
    from proxy.state.redis.client import RedisOptions

    return RedisOptions(
        password=password,
        key_prefix=config.redis.key_prefix,
        timeout_seconds=config.redis.timeout_seconds,
    )


def state_password(config: GatewayConfig, environ: Mapping[str, str]) -> str | None:
    """``redis.password`` read from ``environ`` (or its file) when the state is in Redis;
    None otherwise, or when none is set. ConfigError if it cannot be read."""
    ref = config.redis.password
    if ref is None or parse_state_url(config.state).backend != "redis":
        return None
    return ref.resolve("redis.password", environ).reveal()


async def open_token_store(
    url: str,
    *,
    redis_options: RedisOptions | None = None,
    redis_client: Redis | None = None,
) -> TokenStore:
    """Open the token store named by a ``state`` URL (async: opening may touch disk or network).

    The caller owns the store and must ``await store.close()``. ValueError for a bad URL (see
    ``parse_state_url``); ``StateFileError`` (proxy.state.sqlite.connection) if the file
    cannot be opened.

    For ``redis://``: ``redis_options`` gives the password, key prefix and timeout (default
    ``RedisOptions()``). With ``redis_client`` (from ``open_redis``, shared with the budget)
    the store uses it and leaves it open on ``close``; without, the store opens its own client
    and closes it. Nothing is sent to Redis here, so a gateway starts while Redis is down;
    ``ping`` tells. Both keywords are ignored for the other backends.
    """
    state = parse_state_url(url)
    if state.backend == "memory":
        return MemoryTokenStore()
    if state.backend == "redis":
        return _open_redis_store(url, redis_options, redis_client)
    assert state.path is not None
    return await SqliteTokenStore.open(state.path)


def _open_redis_store(
    url: str, options: RedisOptions | None, client: Redis | None
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
    _redis: Redis | None = None

    @property
    def shared(self) -> bool:
        return self._redis is not None

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

    async def close(self) -> None:
        """Close the send log, the token store and the Redis client (after the slots)."""
        if self.send_log is not None:
            await self.send_log.close()
        await self.store.close()
        if self._redis is not None:
            await self._redis.aclose()


async def open_state(config: GatewayConfig, password: str | None, hooks: SharedSlotsHooks) -> State:
    """Open what ``config.state`` names: the token store and the budget's state (a send log,
    or one Redis client shared by the store and every slot source). ``password``: the
    resolved ``redis.password`` (ignored by the other backends)."""
    client = None
    options = redis_options(config, password)
    if options is not None:
        from proxy.state.redis.client import open_redis  # redis-py only when Redis is used

        client = open_redis(config.state, options)
    store = await open_token_store(config.state, redis_options=options, redis_client=client)
    try:
        send_log = None if client is not None else await open_send_log(config.state)
    except BaseException:
        await store.close()
        raise
    return State(parse_state_url(config.state).backend, store, send_log, config, hooks, client)
