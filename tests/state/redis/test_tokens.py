"""Redis specifics of the token store: URLs, client options, key layout, sharing, concurrency.

The contract itself runs in tests/state/test_token_store.py. These tests use the real Redis at
``REDIS_URL`` and fail (never skip) when it is absent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.auth.tokens import TokenRecord
from proxy.config.state_url import RedisAddress, parse_redis_url
from proxy.state import RedisOptions, RedisTokenStore, open_redis, open_token_store
from tests.state.test_token_store import REDIS_URL, T0, record, scratch_redis

PASSWORD = "hunter2-not-for-logs"


@pytest.fixture
async def scratch() -> AsyncIterator[tuple[Redis, str]]:
    async with scratch_redis() as pair:
        yield pair


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _texts(exc: BaseException) -> str:
    """str and repr of an exception and everything it chains to."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += (str(seen), repr(seen))
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


# --- URLs and options ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://cache", RedisAddress("cache")),
        ("redis://cache:6380", RedisAddress("cache", 6380)),
        ("redis://127.0.0.1:6379/0", RedisAddress("127.0.0.1", 6379, 0)),
        ("redis://cache/", RedisAddress("cache")),
        ("redis://Cache.Example:7000/3", RedisAddress("cache.example", 7000, 3)),
        ("rediss://cache.example:6380/1", RedisAddress("cache.example", 6380, 1, tls=True)),
        ("REDISS://cache", RedisAddress("cache", tls=True)),
        ("redis://[::1]:6379/0", RedisAddress("::1")),
        ("redis://gateway@cache/2", RedisAddress("cache", db=2, username="gateway")),
        ("redis://gate%40way@cache", RedisAddress("cache", username="gate@way")),
    ],
)
def test_parse_redis_url(url: str, expected: RedisAddress) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{PASSWORD}@cache:6379/0",
        f"redis://default:{PASSWORD}@cache:6379/0",
        f"rediss://user:{PASSWORD}@cache",
        f"redis://:{PASSWORD}@",
    ],
)
def test_a_password_in_the_url_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ValueError, match="must not carry a password") as caught:
        open_redis(url, RedisOptions())
    assert PASSWORD not in _texts(caught.value)


def test_options_never_show_the_password() -> None:
    options = RedisOptions(password=PASSWORD)
    assert PASSWORD not in repr(options)
    assert PASSWORD not in str(options)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"key_prefix": ""}, "key_prefix"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"timeout_seconds": float("inf")}, "timeout_seconds"),
        ({"timeout_seconds": True}, "timeout_seconds"),
    ],
)
def test_options_are_checked(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=rf"^redis\.{message}:"):
        RedisOptions(**changes)  # type: ignore[arg-type]


async def test_open_redis_sets_timeouts_retries_and_raw_bytes() -> None:
    client = open_redis(
        "redis://cache:6380/2", RedisOptions(password=PASSWORD, timeout_seconds=0.3)
    )
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache", 6380, 2)
        assert kwargs["password"] == PASSWORD
        assert kwargs["socket_timeout"] == 0.3
        assert kwargs["socket_connect_timeout"] == 0.3
        assert kwargs["health_check_interval"] == 10
        assert kwargs["decode_responses"] is False
        retry = kwargs["retry"]
        assert 1 <= retry.get_retries() <= 5
        assert client.connection_pool.connection_class is not SSLConnection
    finally:
        await client.aclose()


async def test_rediss_url_opens_a_tls_client() -> None:
    client = open_redis("rediss://cache.example:6380/1", RedisOptions())
    try:
        assert client.connection_pool.connection_class is SSLConnection
        assert client.connection_pool.connection_kwargs["ssl_cert_reqs"] == "required"
    finally:
        await client.aclose()


def test_the_state_package_works_without_redis_py() -> None:
    """redis-py is an optional extra: memory and sqlite must not need it."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.modules["redis"] = None  # as if not installed
        from proxy.state import open_token_store, parse_state_url
        store = asyncio.run(open_token_store("memory://"))
        try:
            parse_state_url("redis://cache:6379/0")
        except ValueError as exc:
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "echowin-gateway[redis]" in done.stdout


# --- failures -----------------------------------------------------------------------------


async def test_an_unreachable_redis_fails_ping_fast_without_the_password() -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    store = await open_token_store(
        url, redis_options=RedisOptions(password=PASSWORD, timeout_seconds=0.2)
    )
    started = time.monotonic()
    try:
        with pytest.raises(RedisError) as caught:
            await store.ping()
    finally:
        await store.close()
    assert isinstance(caught.value, RedisConnectionError)
    assert time.monotonic() - started < 3.0  # a few retries with short backoff, no more
    assert PASSWORD not in _texts(caught.value)


async def test_a_wrong_password_fails_without_echoing_it(scratch: tuple[Redis, str]) -> None:
    admin, prefix = scratch
    user = prefix.rstrip(":")
    good = uuid.uuid4().hex
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{good}", f"~{prefix}*", "+@all")
    try:
        url = f"redis://{user}@127.0.0.1:6379/0"
        right = await open_token_store(
            url, redis_options=RedisOptions(password=good, key_prefix=prefix)
        )
        await right.put(record(1))  # AUTH with the URL's user and the configured password
        await right.close()
        wrong = await open_token_store(
            url, redis_options=RedisOptions(password=PASSWORD, key_prefix=prefix)
        )
        with pytest.raises(RedisError) as caught:
            await wrong.get(record(1).id)
        await wrong.close()
        assert PASSWORD not in _texts(caught.value)
    finally:
        await admin.execute_command("ACL", "DELUSER", user)


async def test_every_method_raises_once_closed(scratch: tuple[Redis, str]) -> None:
    client, prefix = scratch
    store = RedisTokenStore(client, key_prefix=prefix)
    await store.close()
    calls = [
        store.put(record(1)),
        store.get(record(1).id),
        store.list(),
        store.revoke(record(1).id, T0),
        store.update(record(1).id, weight=2),
        store.ping(),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="closed"):
            await call
    assert await client.ping()  # a shared client outlives the store


async def test_an_owning_store_closes_its_client(scratch: tuple[Redis, str]) -> None:
    admin, prefix = scratch
    client = open_redis(REDIS_URL, RedisOptions())
    store = RedisTokenStore(client, key_prefix=prefix, owns_client=True)
    await store.ping()
    client_id = await client.client_id()  # the pool's one connection
    await store.close()
    await store.close()
    for _ in range(100):  # the server notices the closed socket within a few ms
        if not await admin.client_list(client_id=[client_id]):
            break
        await asyncio.sleep(0.01)
    assert await admin.client_list(client_id=[client_id]) == []


# --- layout and sharing -------------------------------------------------------------------


async def test_key_layout(scratch: tuple[Redis, str]) -> None:
    """Pinned: other tools (and older replicas) read these keys."""
    client, prefix = scratch
    store = RedisTokenStore(client, key_prefix=prefix)
    stored = record(1, created_at=T0 + 0.25, per_minute=None, expires_at=None)
    await store.put(stored)
    assert await client.hgetall(f"{prefix}token:{stored.id}") == {
        b"id": stored.id.encode(),
        b"name": b"svc-1",
        b"secret_hash": stored.secret_hash.encode(),
        b"scopes": b'["contacts:read", "tags:*"]',
        b"upstream_key": b"acme",
        b"hourly": b"100",
        b"weight": b"2",
        b"created_at": b"1700000000.25",
    }
    assert await client.zrange(f"{prefix}tokens", 0, -1, withscores=True) == [
        (stored.id.encode(), T0 + 0.25)
    ]
    # The name's index (id -> created_at) and how many ids the name indexes hold.
    assert await client.hgetall(f"{prefix}tokens:name:svc-1") == {
        stored.id.encode(): b"1700000000.25"
    }
    assert await client.get(f"{prefix}tokens:names") == b"1"
    assert sorted(await client.keys(f"{prefix}*")) == [
        f"{prefix}token:{stored.id}".encode(),
        f"{prefix}tokens".encode(),
        f"{prefix}tokens:name:svc-1".encode(),
        f"{prefix}tokens:names".encode(),
    ]


async def test_two_stores_on_one_prefix_share_tokens(scratch: tuple[Redis, str]) -> None:
    """Replicas: each has its own client; a write on one is read at once on the other."""
    _, prefix = scratch
    options = RedisOptions(key_prefix=prefix)
    a = await open_token_store(REDIS_URL, redis_options=options)
    b = await open_token_store(REDIS_URL, redis_options=options)
    try:
        await a.put(record(1))
        assert await b.get(record(1).id) == record(1)
        await b.revoke(record(1).id, T0 + 3)
        await b.update(record(1).id, weight=9)
        assert await a.get(record(1).id) == record(1, revoked_at=T0 + 3, weight=9)
        with pytest.raises(ValueError, match="already exists"):
            await b.put(record(1, name="other"))
        assert await a.list() == await b.list()
    finally:
        await a.close()
        await b.close()


async def test_prefixes_keep_gateways_apart(scratch: tuple[Redis, str]) -> None:
    client, prefix = scratch
    one = RedisTokenStore(client, key_prefix=f"{prefix}one:")
    two = RedisTokenStore(client, key_prefix=f"{prefix}two:")
    await one.put(record(1))
    assert await two.get(record(1).id) is None
    assert await two.list() == []
    await two.put(record(1, name="same-id-elsewhere"))
    stored = await one.get(record(1).id)
    assert stored is not None
    assert stored.name == "svc-1"


async def test_concurrent_updates_of_different_fields_are_all_kept(
    scratch: tuple[Redis, str],
) -> None:
    client, prefix = scratch
    # Two stores on one prefix, as two replicas: conflicts cross clients, not just tasks.
    stores = [RedisTokenStore(client, key_prefix=prefix) for _ in range(2)]
    tokens = range(8)
    for n in tokens:
        await stores[0].put(record(n))
    writes = []
    for n in tokens:
        writes += [
            stores[0].update(record(n).id, hourly=1000 + n),
            stores[1].update(record(n).id, per_minute=10 + n),
            stores[0].update(record(n).id, weight=1 + n),
            stores[1].update(record(n).id, scopes=(f"s{n}:read",)),
            stores[0].update(record(n).id, expires_at=T0 + n),
            stores[1].revoke(record(n).id, T0 + 100 + n),
        ]
    await asyncio.gather(*writes)
    expected = [
        record(
            n,
            hourly=1000 + n,
            per_minute=10 + n,
            weight=1 + n,
            scopes=(f"s{n}:read",),
            expires_at=T0 + n,
            revoked_at=T0 + 100 + n,
        )
        for n in tokens
    ]
    assert await stores[1].list() == expected


async def test_concurrent_updates_of_one_field_end_on_one_of_them(
    scratch: tuple[Redis, str],
) -> None:
    client, prefix = scratch
    store = RedisTokenStore(client, key_prefix=prefix)
    await store.put(record(1))
    results = await asyncio.gather(*(store.update(record(1).id, weight=w) for w in range(1, 41)))
    assert [r.weight if r else None for r in results] == list(range(1, 41))
    final = await store.get(record(1).id)
    assert final is not None
    assert final.weight in range(1, 41)
    assert dataclasses.replace(final, weight=2) == record(1)


async def test_an_update_that_only_clears_fields(scratch: tuple[Redis, str]) -> None:
    client, prefix = scratch
    store = RedisTokenStore(client, key_prefix=prefix)
    await store.put(record(1))
    cleared = await store.update(record(1).id, hourly=None, expires_at=None)
    assert cleared == record(1, hourly=None, expires_at=None)
    assert await store.get(record(1).id) == cleared
    fields = await client.hkeys(f"{prefix}token:{record(1).id}")
    assert b"hourly" not in fields
    assert b"expires_at" not in fields
    assert await store.update(record(1).id) == cleared  # no changes: nothing written


async def test_concurrent_puts_of_one_id_create_it_once(scratch: tuple[Redis, str]) -> None:
    client, prefix = scratch
    store = RedisTokenStore(client, key_prefix=prefix)
    outcomes = await asyncio.gather(
        *(store.put(record(1, name=f"svc-{k}")) for k in range(10)), return_exceptions=True
    )
    assert sum(o is None for o in outcomes) == 1
    assert all(isinstance(o, ValueError) for o in outcomes if o is not None)
    assert await client.zcard(f"{prefix}tokens") == 1


async def test_a_corrupt_record_is_refused(scratch: tuple[Redis, str]) -> None:
    client, prefix = scratch
    store = RedisTokenStore(client, key_prefix=prefix)
    await store.put(record(1))
    await client.hset(f"{prefix}token:{record(1).id}", "weight", "0")
    with pytest.raises(ValueError, match=r"^weight:"):
        await store.get(record(1).id)
    await client.hdel(f"{prefix}token:{record(1).id}", "name")
    with pytest.raises(ValueError, match="lacks name"):
        await store.get(record(1).id)


def test_records_round_trip_exact_floats() -> None:
    from proxy.state.redis.tokens import _decode, _encode

    odd = record(1, created_at=0.1 + 0.2, expires_at=T0 + 1 / 3, revoked_at=1e-7)
    encoded = {k.encode(): v.encode() for k, v in _encode(odd).items()}
    assert _decode(encoded) == odd
    assert isinstance(_decode(encoded), TokenRecord)
