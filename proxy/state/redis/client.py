"""The Redis client of a process (``redis://host:6379/0``, ``rediss://`` for TLS).

``open_redis`` is the one way to open it, so the token store and the budget share one
connection pool per process. Secrets never come from the URL: the password is
``redis.password`` in the config (env or file), passed in ``RedisOptions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.config.state_url import parse_redis_url

__all__ = ["RedisOptions", "open_redis"]

HEALTH_CHECK_INTERVAL_SECONDS = 10
"""A pooled connection idle this long is PINGed before reuse, so a dead one is replaced."""

RETRIES = 2
"""Extra attempts after a connection error (so 3 in all), after 50 then 100 ms of backoff."""

RETRY_BACKOFF_BASE_SECONDS = 0.025
RETRY_BACKOFF_CAP_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """How to talk to Redis, from the config's ``redis:`` section.

    ``timeout_seconds`` bounds one connect and one command (socket read/write); a slower
    Redis counts as failed. ``key_prefix`` starts every key this gateway writes, so several
    gateways can share one Redis. ``password`` (AUTH) never shows in repr.
    """

    password: str | None = field(default=None, repr=False)
    key_prefix: str = "egw:"
    timeout_seconds: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.key_prefix, str) or not self.key_prefix:
            raise ValueError("redis.key_prefix: must be a non-empty string")
        timeout = self.timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ValueError("redis.timeout_seconds: must be seconds > 0")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError("redis.timeout_seconds: must be seconds > 0")


def open_redis(url: str, options: RedisOptions) -> redis.asyncio.Redis:
    """A client (with its connection pool) for ``url``; connects lazily, on the first command.

    Open ONE per process and share it (token store, budget): the pool is the expensive part.
    Every connect and command is bounded by ``options.timeout_seconds``. A connection error is
    retried twice with short exponential backoff (50 ms, 100 ms) on a fresh connection, so a
    restarted Redis is picked up without help; a timeout is not retried, since the command may
    have run and the caller's time budget is spent. Errors are ``redis.exceptions.RedisError``
    and never contain the password. The caller closes it with ``await client.aclose()``.
    """
    address = parse_redis_url(url)
    retry = Retry(
        ExponentialBackoff(cap=RETRY_BACKOFF_CAP_SECONDS, base=RETRY_BACKOFF_BASE_SECONDS),
        RETRIES,
        supported_errors=(RedisConnectionError,),
    )
    return redis.asyncio.Redis(
        host=address.host,
        port=address.port,
        db=address.db,
        username=address.username,
        password=options.password,
        ssl=address.tls,
        socket_timeout=options.timeout_seconds,
        socket_connect_timeout=options.timeout_seconds,
        health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
        retry=retry,
        decode_responses=False,
    )
