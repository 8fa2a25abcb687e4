"""The Redis shapes as configured: ``redis-sentinel://`` and ``redis-cluster://`` URLs,
``redis.tls``, ``redis.username``, ``redis.pool_size``; every refusal names its key and
never repeats a password. No server is needed: nothing here reaches one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from proxy.config import ConfigError, parse_config
from proxy.config.state_url import RedisAddress, parse_redis_url
from proxy.config.stores import RedisTlsConfig
from proxy.state.redis.client import RedisOptions, open_redis
from proxy.state.redis.preflight import check_access
from tests.procs import free_ports

SENTINELS = (("s1", 26379), ("s2", 26380))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis-sentinel://s1:26379,s2:26380/mymaster",
            RedisAddress("s1", 26379, shape="sentinel", nodes=SENTINELS, service="mymaster"),
        ),
        (
            "rediss-sentinel://gw@s1:26379,s2:26380/mymaster/3",
            RedisAddress(
                "s1", 26379, 3, True, "gw", "sentinel", nodes=SENTINELS, service="mymaster"
            ),
        ),
        (
            "redis-cluster://c1:7000,[::1]:7001",
            RedisAddress("c1", 7000, shape="cluster", nodes=(("c1", 7000), ("::1", 7001))),
        ),
        (
            "REDISS-CLUSTER://c1:7000",
            RedisAddress("c1", 7000, tls=True, shape="cluster", nodes=(("c1", 7000),)),
        ),
    ],
)
def test_sentinel_and_cluster_urls(url: str, expected: RedisAddress) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis-sentinel://s1:26379", "master's name"),
        ("redis-sentinel://s1:26379/m/x", "database number"),
        ("redis-sentinel://s1/m", "host:port"),
        ("redis-cluster://c1:7000/0", "takes no path"),
        ("redis-cluster://c1:7000,", "host:port"),
        ("redis-cluster://c1:0", "host:port"),
        ("redis-cluster://c1:7000?x=1", "no query"),
        ("redis-cluster://gw:s3cret-pass@c1:7000", "must not carry a password"),
    ],
)
def test_bad_shape_urls_are_refused_without_echoing_them(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        parse_redis_url(url)
    assert str(refused.value).startswith("state: ")
    assert "s3cret" not in str(refused.value)


def config(state: str, **redis: Any) -> dict[str, Any]:
    return {"state": state, "redis": redis}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (config("redis://r:6379/0", tls={}), "redis.tls: needs a TLS state URL (rediss://"),
        (
            config("redis-cluster://c:7000", tls={}),
            "redis.tls: needs a TLS state URL (rediss-cluster://",
        ),
        (
            config("rediss://r:6379/0", tls={"cert_file": "/etc/hostname"}),
            "redis.tls: cert_file and key_file go together",
        ),
        (
            config("rediss://r:6379/0", tls={"ca_file": "/nonexistent/ca.pem"}),
            "redis.tls.ca_file: '/nonexistent/ca.pem' is not a readable file",
        ),
        (
            config("rediss-cluster://c:7000", tls={"server_name": "r.example"}),
            "redis.tls.server_name: a cluster's nodes are checked by the names they announce",
        ),
        (config("redis://gw@r:6379/0", username="other"), "redis.username: differs"),
        (config("redis://r:6379/0", key_prefix="egw{x}:"), "redis.key_prefix: must not hold {"),
        (config("redis://r:6379/0", pool_size=0), "redis.pool_size: must be a positive integer"),
        (
            config("redis://r:6379/0", connect_timeout_seconds=-1),
            "redis.connect_timeout_seconds: must be a positive number",
        ),
    ],
)
def test_redis_settings_that_do_not_fit_are_named(raw: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(raw)
    assert any(line.startswith(expected) for line in refused.value.lines), refused.value.lines


def test_a_fitting_tls_section_loads(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed at load")
    raw = config("rediss-sentinel://s:26379/m", username="gw", tls={"ca_file": str(ca)})
    loaded = parse_config(raw)
    assert loaded.redis.tls == RedisTlsConfig(ca_file=str(ca))
    assert loaded.redis.username == "gw"


async def test_a_standalone_pool_is_bounded_and_waits() -> None:
    client = open_redis("redis://r:6379/0", RedisOptions(pool_size=7, timeout_seconds=0.4))
    try:
        pool = client.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert (pool.max_connections, pool.timeout) == (7, 0.4)
    finally:
        await client.aclose()


async def test_a_server_name_is_what_tls_checks() -> None:
    tls = RedisTlsConfig(server_name="redis.internal", check_hostname=True)
    client = open_redis("rediss://10.0.0.5:6380/0", RedisOptions(tls=tls))
    try:
        pool = client.connection_pool
        assert issubclass(pool.connection_class, SSLConnection)
        connection = pool.make_connection()
        assert connection._connection_arguments()["server_hostname"] == "redis.internal"
        assert connection._connection_arguments()["host"] == "10.0.0.5"
    finally:
        await client.aclose()


async def test_sentinel_and_cluster_clients() -> None:
    sentinel = open_redis(
        "redis-sentinel://s1:26379,s2:26380/mymaster/2", RedisOptions(pool_size=9)
    )
    cluster = open_redis("redis-cluster://c1:7000,c2:7001", RedisOptions(username="gw"))
    try:
        pool = sentinel.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "mymaster"
        assert pool.max_connections == 9
        assert pool.connection_kwargs["db"] == 2
        assert isinstance(cluster, RedisCluster)
    finally:
        await sentinel.aclose()
        await cluster.aclose()


async def test_a_redis_that_does_not_answer_at_start_is_an_outage_not_an_error() -> None:
    """Nothing listens: check_access warns and returns; the gateway starts and runs as
    on_state_failure says until Redis answers."""
    (port,) = free_ports(1)
    client = open_redis(f"redis://127.0.0.1:{port}/0", RedisOptions(timeout_seconds=0.2))
    try:
        await check_access(client, "egw-none:")
    finally:
        await client.aclose()
