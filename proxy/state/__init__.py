"""Durable state behind Protocols, and the one place that picks a backend from the state URL
(parsed by :mod:`proxy.config.state_url`, whose docstring lists the URLs)."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from proxy.auth.tokens import TokenStore
from proxy.config import GatewayConfig
from proxy.config.state_url import StateUrl, parse_state_url
from proxy.state.memory import MemorySendLog, MemoryTokenStore
from proxy.state.sqlite import SqliteSendLog, SqliteTokenStore

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from proxy.state.redis import RedisOptions, RedisTokenStore, open_redis

__all__ = [
    "MemorySendLog",
    "MemoryTokenStore",
    "RedisOptions",
    "RedisTokenStore",
    "SqliteSendLog",
    "SqliteTokenStore",
    "StateUrl",
    "open_redis",
    "open_send_log",
    "open_token_store",
    "parse_state_url",
    "redis_options",
]

_REDIS_NAMES = frozenset({"RedisOptions", "RedisTokenStore", "open_redis"})


def __getattr__(name: str) -> object:
    """The Redis names, imported on first use so memory and sqlite work without redis-py."""
    if name in _REDIS_NAMES:
        return getattr(importlib.import_module("proxy.state.redis"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def redis_options(config: GatewayConfig, password: str | None) -> RedisOptions:
    """The RedisOptions for ``config`` (redis-py is imported only for redis:// states)."""
    from proxy.state.redis import RedisOptions

    return RedisOptions(
        password=password,
        key_prefix=config.redis.key_prefix,
        timeout_seconds=config.redis.timeout_seconds,
    )


async def open_token_store(
    url: str,
    *,
    redis_options: RedisOptions | None = None,
    redis_client: Redis | None = None,
) -> TokenStore:
    """Open the token store named by a ``state`` URL (async: opening may touch disk or network).

    The caller owns the store and must ``await store.close()``. ValueError for a bad URL (see
    ``parse_state_url``); ``StateFileError`` (proxy.state.sqlite) if the file cannot be
    opened.

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
    from proxy.state.redis import RedisOptions, RedisTokenStore, open_redis

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
