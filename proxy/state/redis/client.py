"""The Redis client of a process: one standalone server (``redis://host:6379/0``), the
master some sentinels name (``redis-sentinel://``) or a cluster (``redis-cluster://``);
``rediss`` for TLS.

``open_redis`` is the one way to open it, so the token store and the budget share one
connection pool per process. Secrets never come from the URL: the password is
``redis.password`` in the config (env or file), passed in ``RedisOptions``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedSSLConnection,
)
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from proxy.config.state_url import RedisAddress, parse_redis_url
from proxy.config.stores import RedisTlsConfig

__all__ = ["STATE_ERRORS", "RedisClient", "RedisOptions", "cancelling", "open_redis", "server_of"]

RedisClient: TypeAlias = redis.asyncio.Redis | RedisCluster
"""What ``open_redis`` returns: a client of one server (standalone, or the sentinels'
master, followed across failovers), or of a cluster."""

STATE_ERRORS = (RedisError, RedisClusterException, OSError)
"""What a call to Redis raises when Redis cannot answer: redis-py's errors (a cluster client's
"no node reachable" is not a RedisError) and the socket's."""


def cancelling() -> bool:
    """The running task has been asked to stop. A loop that catches STATE_ERRORS must stop
    then: a cancel that meets a call's own timeout may surface as TimeoutError (an OSError),
    and a loop that took it for an outage would never end (its closer waits for it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


HEALTH_CHECK_INTERVAL_SECONDS = 10
"""A pooled connection idle this long is PINGed before reuse, so a dead one is replaced."""

RETRIES = 2
"""Extra attempts after a connection error (so 3 in all), after 50 then 100 ms of backoff."""

RETRY_BACKOFF_BASE_SECONDS = 0.025
RETRY_BACKOFF_CAP_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """How to talk to Redis, from the config's ``redis:`` section.

    ``timeout_seconds`` bounds one command (socket read/write), ``connect_timeout_seconds``
    one connect (default: ``timeout_seconds``); a slower Redis counts as failed.
    ``key_prefix`` starts every key this gateway writes, so several gateways can share one
    Redis. ``pool_size``: connections per Redis server at most (a command waits up to
    ``timeout_seconds`` for one on a standalone server or Sentinel's master; on a cluster
    one beyond it fails). ``username``: the ACL user (the
    URL's, if it names one). ``password`` (AUTH) never shows in repr. ``tls``: CA file,
    client certificate, server name (``rediss`` URLs only). ``sentinel_username`` and
    ``sentinel_password`` (never in repr): the sentinels' own AUTH, if they demand one.
    """

    password: str | None = field(default=None, repr=False)
    key_prefix: str = "egw:"
    timeout_seconds: float = 0.5
    username: str | None = None
    pool_size: int = 100
    connect_timeout_seconds: float | None = None
    tls: RedisTlsConfig | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key_prefix, str) or not self.key_prefix:
            raise ValueError("redis.key_prefix: must be a non-empty string")
        for key in ("timeout_seconds", "connect_timeout_seconds"):
            value = getattr(self, key)
            if value is None and key == "connect_timeout_seconds":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"redis.{key}: must be seconds > 0")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"redis.{key}: must be seconds > 0")
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int):
            raise ValueError("redis.pool_size: must be a positive integer")
        if self.pool_size < 1:
            raise ValueError("redis.pool_size: must be a positive integer")


class _NamedSSLConnection(SSLConnection):
    """TLS whose certificate must carry ``server_name`` rather than the host connected to
    (``redis.tls.server_name``: a server reached by address, or through a tunnel)."""

    server_name = ""

    def _connection_arguments(self) -> Mapping[str, Any]:
        return {**super()._connection_arguments(), "server_hostname": self.server_name}


class _NamedSentinelSSLConnection(SentinelManagedSSLConnection):
    server_name = ""

    def _connection_arguments(self) -> Mapping[str, Any]:
        return {**super()._connection_arguments(), "server_hostname": self.server_name}


def _named(base: type[SSLConnection], name: str) -> type[SSLConnection]:
    return type(f"{base.__name__}For", (base,), {"server_name": name})


def _tls_kwargs(address: RedisAddress, tls: RedisTlsConfig | None) -> dict[str, Any]:
    """redis-py's keywords for TLS (none without it)."""
    if not address.tls:
        return {}
    tls = RedisTlsConfig() if tls is None else tls
    return {
        "ssl": True,
        "ssl_ca_certs": tls.ca_file,
        "ssl_certfile": tls.cert_file,
        "ssl_keyfile": tls.key_file,
        "ssl_check_hostname": tls.check_hostname,
        "ssl_cert_reqs": "required",
    }


def _common_kwargs(address: RedisAddress, options: RedisOptions) -> dict[str, Any]:
    """What every connection (to a server, a sentinel or a cluster node) is made with."""
    connect = options.connect_timeout_seconds or options.timeout_seconds
    return {
        "username": options.username or address.username,
        "password": options.password,
        "socket_timeout": options.timeout_seconds,
        "socket_connect_timeout": connect,
        "health_check_interval": HEALTH_CHECK_INTERVAL_SECONDS,
        "decode_responses": False,
        **_tls_kwargs(address, options.tls),
    }


def _retry() -> Retry:
    return Retry(
        ExponentialBackoff(cap=RETRY_BACKOFF_CAP_SECONDS, base=RETRY_BACKOFF_BASE_SECONDS),
        RETRIES,
        supported_errors=(RedisConnectionError,),
    )


def server_of(client: RedisClient, key: str) -> Callable[[], object]:
    """Which server holds ``key`` now, as the client last learnt it: Sentinel's master
    address, the cluster node of the key's slot; None for a standalone server (which has no
    failover). A change means a failover: the new server may lack the writes the old one
    acknowledged but did not replicate yet. Cheap: no I/O, a lookup per call."""
    if isinstance(client, RedisCluster):

        def node() -> object:
            try:
                found = client.get_node_from_key(key)
            except STATE_ERRORS:  # no slot map yet, or the slot is not covered
                return None
            return None if found is None else found.name

        return node
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        return lambda: pool.master_address
    return lambda: None


def open_redis(url: str, options: RedisOptions) -> RedisClient:
    """A client (with its connection pool) for ``url``; connects lazily, on the first command.

    Open ONE per process and share it (token store, budget): the pool is the expensive part.
    Every connect and command is bounded by the options' timeouts. A connection error is
    retried twice with short exponential backoff (50 ms, 100 ms) on a fresh connection, so a
    restarted Redis (or a new master after a failover) is picked up without help; a timeout
    is not retried, since the command may have run and the caller's time budget is spent.
    Errors are ``redis.exceptions.RedisError`` and never contain the password. The caller
    closes it with ``await client.aclose()``.
    """
    address = parse_redis_url(url)
    if address.shape == "cluster":
        return _open_cluster(address, options)
    if address.shape == "sentinel":
        return _open_sentinel(address, options)
    kwargs = _common_kwargs(address, options)
    server_name = options.tls.server_name if options.tls and address.tls else None
    if kwargs.pop("ssl", False):
        base = SSLConnection
        kwargs["connection_class"] = (
            _named(_NamedSSLConnection, server_name) if server_name else base
        )
    pool = BlockingConnectionPool(
        host=address.host,
        port=address.port,
        db=address.db,
        max_connections=options.pool_size,
        timeout=options.timeout_seconds,
        retry=_retry(),
        **kwargs,
    )
    return redis.asyncio.Redis.from_pool(pool)  # closed with the client


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (the master found through the sentinels) bounded the way a
    standalone one is: past ``max_connections`` a command waits up to ``timeout`` for a
    free connection instead of failing at once."""


class _SentinelMaster(redis.asyncio.Redis):
    """The client of the master the sentinels name; closing it closes the connections to
    the sentinels too (redis-py's own leaves them open)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        await super().aclose(close_connection_pool)
        manager = getattr(pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()


def _open_sentinel(address: RedisAddress, options: RedisOptions) -> redis.asyncio.Redis:
    """The master the sentinels name, found again through them after a failover. The
    sentinels are reached with the same timeouts and TLS (checked against their own
    addresses), and with their own user and password if set (``redis.sentinel_*``)."""
    kwargs = _common_kwargs(address, options)
    own = {k: v for k, v in kwargs.items() if k.startswith(("socket_", "ssl"))}
    if options.sentinel_password is not None:
        own |= {"username": options.sentinel_username, "password": options.sentinel_password}
    sentinel = Sentinel(list(address.nodes), sentinel_kwargs=own)
    server_name = options.tls.server_name if options.tls and address.tls else None
    if kwargs.pop("ssl", False):
        base: type[SSLConnection] = SentinelManagedSSLConnection
        kwargs["connection_class"] = (
            _named(_NamedSentinelSSLConnection, server_name) if server_name else base
        )
    assert address.service is not None
    client: redis.asyncio.Redis = sentinel.master_for(
        address.service,
        redis_class=_SentinelMaster,
        connection_pool_class=_BlockingSentinelPool,
        db=address.db,
        max_connections=options.pool_size,
        timeout=options.timeout_seconds,
        retry=_retry(),
        **kwargs,
    )
    return client


def _open_cluster(address: RedisAddress, options: RedisOptions) -> RedisCluster:
    """A cluster client; it learns the slots from any node listed and follows MOVED and a
    replica's promotion by itself."""
    kwargs = _common_kwargs(address, options)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
        max_connections=options.pool_size,
        retry=_retry(),
        **kwargs,
    )
