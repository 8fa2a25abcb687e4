"""The TokenStore contract, run against every backend, plus SQLite specifics and URL parsing.

To add a backend, add its name to BACKENDS and a case to the ``store`` fixture; every
contract test then runs against it unchanged. Redis is the real server at ``REDIS_URL``,
PostgreSQL the real server of tests/state/postgres.py (a database of this session): when
either does not answer, its tests FAIL (never skip), so CI cannot pass without it.
``sentinel`` and ``cluster`` are private deployments this session starts on free ports
(tests/state/conftest.py), reached by their ``redis-sentinel://`` and ``redis-cluster://``
URLs as the gateway reaches them.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import stat
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

import proxy.state
from proxy.admin.tokenops import NameTaken, create_token
from proxy.auth.tokens import TokenRecord, TokenStore, hash_secret
from proxy.config import GatewayConfig
from proxy.state import (
    MemoryTokenStore,
    RedisOptions,
    RedisTokenStore,
    SqliteTokenStore,
    StateUrl,
    open_redis,
    open_token_store,
    parse_state_url,
)
from proxy.state.redis.client import RedisClient
from proxy.state.sqlite.connection import SCHEMA_MIGRATIONS, SCHEMA_VERSION, open_sqlite
from tests.state.pg_server import empty_tables

BACKENDS = ["memory", "sqlite", "redis", "sentinel", "cluster", "postgresql"]
T0 = 1_700_000_000.0
REDIS_URL = "redis://127.0.0.1:6379/0"


@asynccontextmanager
async def scratch_redis(url: str = REDIS_URL) -> AsyncIterator[tuple[RedisClient, str]]:
    """A client on the Redis at ``url`` and a fresh key prefix, whose keys are deleted
    afterwards.

    Fails the test (never skips it) when Redis does not answer.
    """
    client = open_redis(url, RedisOptions(timeout_seconds=2.0))
    try:
        await client.ping()
    except RedisError as exc:
        await client.aclose()
        pytest.fail(f"these tests need Redis at {url} (start redis-server): {exc}", pytrace=False)
    prefix = f"egw-test-{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        for key in keys:  # one by one: on a cluster they lie in different slots
            await client.delete(key)
        await client.aclose()


def backend_url(request: pytest.FixtureRequest, kind: str) -> str:
    """The URL of Redis backend ``kind``, its private deployment started on first use."""
    if kind == "redis":
        return REDIS_URL
    deployment = request.getfixturevalue(f"redis_{kind}")
    return str(deployment.url)


@pytest.fixture
async def redis_scratch() -> AsyncIterator[tuple[Redis, str]]:
    async with scratch_redis() as scratch:
        yield scratch


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TokenStore]:
    async with AsyncExitStack() as stack:
        if request.param == "postgresql":
            url = request.getfixturevalue("pg_session_url")
            stack.push_async_callback(empty_tables, url)
            opened = await open_token_store(url)
        elif request.param in ("redis", "sentinel", "cluster"):
            # As the gateway runs it: on a client shared with the budget, under its own prefix.
            url = backend_url(request, request.param)
            client, prefix = await stack.enter_async_context(scratch_redis(url))
            opened = await open_token_store(
                url, redis_options=RedisOptions(key_prefix=prefix), redis_client=client
            )
        else:
            urls = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path}/state.db"}
            opened = await open_token_store(urls[request.param])
        yield opened
        await opened.close()


def record(n: int, *, created_at: float = T0, **overrides: object) -> TokenRecord:
    fields: dict[str, object] = {
        "id": f"tok{n:09d}",
        "name": f"svc-{n}",
        "secret_hash": hash_secret(f"secret-{n}"),
        "scopes": ("contacts:read", "tags:*"),
        "upstream_key": "acme",
        "hourly": 100,
        "per_minute": None,
        "weight": 2,
        "created_at": created_at,
        "expires_at": created_at + 86400.5,
    }
    fields.update(overrides)
    return TokenRecord(**fields)  # type: ignore[arg-type]


# --- the contract -------------------------------------------------------------------------


async def test_put_then_get_returns_an_equal_record(store: TokenStore) -> None:
    original = record(1, created_at=T0 + 0.123456)
    await store.put(original)
    assert await store.get(original.id) == original


async def test_get_unknown_is_none(store: TokenStore) -> None:
    assert await store.get("nosuchtoken0") is None
    assert await store.get("") is None


async def test_duplicate_id_is_refused_and_the_original_kept(store: TokenStore) -> None:
    await store.put(record(1))
    with pytest.raises(ValueError, match="already exists"):
        await store.put(record(1, name="impostor"))
    found = await store.get(record(1).id)
    assert found is not None
    assert found.name == "svc-1"


async def test_list_is_ordered_by_creation_then_id(store: TokenStore) -> None:
    assert await store.list() == []
    records = [
        record(3, created_at=T0 + 30),
        record(1, created_at=T0 + 10),
        record(5, created_at=T0 + 10),
        record(2, created_at=T0 + 20),
        record(4, created_at=T0),
    ]
    for r in records:
        await store.put(r)
    assert [r.id for r in await store.list()] == [record(n).id for n in (4, 1, 5, 2, 3)]


async def test_list_includes_revoked_and_expired(store: TokenStore) -> None:
    await store.put(record(1, expires_at=T0 + 1))
    await store.put(record(2))
    await store.revoke(record(2).id, T0)
    assert {r.id for r in await store.list()} == {record(1).id, record(2).id}


async def test_revoke_sets_the_time_once(store: TokenStore) -> None:
    await store.put(record(1))
    first = await store.revoke(record(1).id, T0 + 5)
    assert first == record(1, revoked_at=T0 + 5)
    again = await store.revoke(record(1).id, T0 + 99)
    assert again is not None
    assert again.revoked_at == T0 + 5
    assert await store.get(record(1).id) == first


async def test_revoke_unknown_is_none(store: TokenStore) -> None:
    assert await store.revoke("nosuchtoken0", T0) is None
    assert await store.list() == []


async def test_revoke_touches_only_its_token(store: TokenStore) -> None:
    await store.put(record(1))
    await store.put(record(2))
    await store.revoke(record(1).id, T0)
    assert await store.get(record(2).id) == record(2)


async def test_update_changes_only_what_it_names(store: TokenStore) -> None:
    await store.put(record(1))
    updated = await store.update(
        record(1).id, hourly=None, per_minute=7, weight=5, scopes=("*",), expires_at=None
    )
    expected = record(1, hourly=None, per_minute=7, weight=5, scopes=("*",), expires_at=None)
    assert updated == expected
    assert await store.get(record(1).id) == expected
    partial = await store.update(record(1).id, hourly=50)
    assert partial == record(1, hourly=50, per_minute=7, weight=5, scopes=("*",), expires_at=None)


async def test_a_token_keeps_its_class_and_one_without_stays_without(store: TokenStore) -> None:
    # A record without a class (every token stored before classes existed) reads back
    # without one: the config's default_class applies to it.
    plain, batch = record(1), record(2, service_class="batch")
    await store.put(plain)
    await store.put(batch)
    assert (await store.get(plain.id)) == plain
    assert (await store.get(batch.id)) == batch
    assert [r.service_class for r in await store.list()] == [None, "batch"]
    moved = await store.update(batch.id, service_class="interactive")
    assert moved == record(2, service_class="interactive")
    cleared = await store.update(batch.id, service_class=None)
    assert cleared == record(2)
    assert await store.get(batch.id) == record(2)


async def test_update_keeps_revocation_and_secret(store: TokenStore) -> None:
    await store.put(record(1))
    await store.revoke(record(1).id, T0 + 1)
    updated = await store.update(record(1).id, weight=3)
    assert updated == record(1, weight=3, revoked_at=T0 + 1)


async def test_update_deduplicates_scopes(store: TokenStore) -> None:
    await store.put(record(1))
    updated = await store.update(record(1).id, scopes=("a:read", "b:read", "a:read"))
    assert updated is not None
    assert updated.scopes == ("a:read", "b:read")
    assert await store.get(record(1).id) == updated


async def test_update_unknown_is_none(store: TokenStore) -> None:
    assert await store.update("nosuchtoken0", weight=2) is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"weight": 0}, "weight"),
        ({"hourly": -1}, "hourly"),
        ({"per_minute": 1.5}, "per_minute"),
        ({"scopes": ()}, "scopes"),
        ({"scopes": "contacts:read"}, "scopes"),
        ({"expires_at": float("nan")}, "expires_at"),
        ({"name": "renamed"}, "update"),
        ({"secret_hash": "0" * 64}, "update"),
        ({"revoked_at": None}, "update"),
    ],
)
async def test_update_refuses_bad_changes_and_keeps_the_record(
    store: TokenStore, changes: dict[str, object], field: str
) -> None:
    await store.put(record(1))
    with pytest.raises(ValueError, match=rf"^{field}:"):
        await store.update(record(1).id, **changes)  # type: ignore[arg-type]
    assert await store.get(record(1).id) == record(1)


async def test_by_name_finds_every_token_of_that_name_and_only_those(store: TokenStore) -> None:
    assert await store.by_name("svc") == []
    named = [
        record(3, name="svc", created_at=T0 + 30),
        record(1, name="svc", created_at=T0 + 10, expires_at=T0 + 11),  # expired by T0 + 30
        record(5, name="svc", created_at=T0 + 10),
        record(2, name="svc-2", created_at=T0 + 20),
        record(4, name="svc.", created_at=T0),  # a name that only starts like it
    ]
    for r in named:
        await store.put(r)
    await store.revoke(record(5).id, T0 + 40)
    found = await store.by_name("svc")
    assert [r.id for r in found] == [record(n).id for n in (1, 5, 3)]  # created_at, then id
    assert [r.status(T0 + 50) for r in found] == ["expired", "revoked", "active"]
    assert found == [await store.get(r.id) for r in found]
    assert [r.id for r in await store.by_name("svc-2")] == [record(2).id]
    assert await store.by_name("SVC") == []  # names are case-sensitive
    assert await store.by_name("sv") == []


async def test_by_name_follows_updates_and_a_refused_rename(store: TokenStore) -> None:
    await store.put(record(1, name="svc"))
    await store.update(record(1).id, weight=9, expires_at=None)
    with pytest.raises(ValueError, match=r"^update:"):
        await store.update(record(1).id, name="renamed")  # type: ignore[call-arg]
    assert await store.by_name("svc") == [record(1, name="svc", weight=9, expires_at=None)]
    assert await store.by_name("renamed") == []


async def test_one_active_token_per_name_through_create_token(store: TokenStore) -> None:
    """create_token's name check, on each store (by_name, or put_unique_name where the
    store has one): refused while a token of the name is active, taken again once that one
    is revoked or expired."""
    config = GatewayConfig()

    async def make(name: str, now: float, **kw: Any) -> str:
        new = await create_token(
            store, config, config.route_table(), name=name, scopes=["tags:read"], now=now, **kw
        )
        return new.record.id

    first = await make("svc", T0)
    await make("other", T0)
    with pytest.raises(NameTaken, match=first):
        await make("svc", T0 + 1)
    await store.revoke(first, T0 + 2)
    second = await make("svc", T0 + 3, expires_in=10)
    with pytest.raises(NameTaken, match=second):
        await make("svc", T0 + 12)
    third = await make("svc", T0 + 13)  # the second expired at T0 + 13
    assert [r.id for r in await store.by_name("svc")] == [first, second, third]


async def test_ping_answers_until_closed(store: TokenStore) -> None:
    await store.ping()
    await store.close()
    with pytest.raises(Exception):  # noqa: B017, PT011 - each backend raises its own error
        await store.ping()
    await store.close()  # idempotent


async def test_concurrent_writers_do_not_lose_updates(store: TokenStore) -> None:
    await asyncio.gather(*(store.put(record(n, created_at=T0 + n)) for n in range(20)))
    await asyncio.gather(*(store.revoke(record(n).id, T0 + 100) for n in range(0, 20, 2)))
    listed = await store.list()
    assert [r.id for r in listed] == [record(n).id for n in range(20)]
    assert [r.revoked_at is not None for r in listed] == [n % 2 == 0 for n in range(20)]


# --- persistence --------------------------------------------------------------------------


async def _fill_and_reopen(url: str, options: RedisOptions | None = None) -> None:
    first = await open_token_store(url, redis_options=options)
    await first.put(record(1))
    await first.put(record(2, created_at=T0 + 1))
    await first.revoke(record(2).id, T0 + 2)
    await first.close()
    second = await open_token_store(url, redis_options=options)
    try:
        assert await second.list() == [record(1), record(2, created_at=T0 + 1, revoked_at=T0 + 2)]
    finally:
        await second.close()


async def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    await _fill_and_reopen(f"sqlite:///{tmp_path}/state.db")


async def test_redis_persists_across_reopen(redis_scratch: tuple[Redis, str]) -> None:
    _, prefix = redis_scratch
    # Each store opens and closes its own client, as after a gateway restart.
    await _fill_and_reopen(REDIS_URL, RedisOptions(key_prefix=prefix))


async def test_redis_by_name_finds_tokens_a_gateway_without_name_indexes_put(
    redis_scratch: tuple[Redis, str],
) -> None:
    """Tokens stored by an older gateway (hash and id index only, as its put script wrote
    them), before and after this one's first put: by_name rebuilds the name indexes once
    it sees they miss a token, and finds them all."""
    client, prefix = redis_scratch
    store = RedisTokenStore(client, key_prefix=prefix)

    async def put_as_older_gateway(r: TokenRecord) -> None:
        hash_key, index, _, _ = store.keys(r.id, r.name)
        fields = {"id": r.id, "name": r.name, "secret_hash": r.secret_hash, "scopes": '["*"]'}
        fields["created_at"] = repr(r.created_at)
        await client.hset(hash_key, mapping=fields)  # type: ignore[arg-type]
        await client.zadd(index, {r.id: r.created_at})

    await put_as_older_gateway(record(1, name="svc"))
    await store.put(record(2, name="svc", created_at=T0 + 1))
    await put_as_older_gateway(record(3, name="svc", created_at=T0 + 2))
    await store.put(record(4, name="other", created_at=T0 + 3))
    assert [r.id for r in await store.by_name("svc")] == [record(n).id for n in (1, 2, 3)]
    count_key = store.keys(record(1).id, "svc")[3]
    assert await client.get(count_key) == b"4"  # rebuilt: every token indexed
    await store.put(record(5, name="svc", created_at=T0 + 4))
    assert await client.get(count_key) == b"5"  # and kept so by the put script
    assert [r.id for r in await store.by_name("svc")] == [record(n).id for n in (1, 2, 3, 5)]
    assert [r.id for r in await store.by_name("other")] == [record(4).id]
    await put_as_older_gateway(record(6, name="solo", created_at=T0 + 5))
    # The name check also rebuilds the indexes first: the older gateway's token holds it.
    assert await store.put_unique_name(record(7, name="solo"), T0 + 6) == record(6).id
    assert await store.get(record(7).id) is None


async def test_redis_replicas_creating_one_name_at_once_make_one_token(
    redis_scratch: tuple[Redis, str],
) -> None:
    """Two stores on one Redis and prefix, as two replicas hold them, each on its own
    client: the name check and the put are one script, so one of each pair is refused."""
    _, prefix = redis_scratch
    options = RedisOptions(key_prefix=prefix)
    a = await open_token_store(REDIS_URL, redis_options=options)
    b = await open_token_store(REDIS_URL, redis_options=options)
    config = GatewayConfig()
    try:
        for round_ in range(5):
            results = await asyncio.gather(
                *(
                    create_token(
                        s, config, config.route_table(), name=f"svc-{round_}", scopes=["*"]
                    )
                    for s in (a, b, a, b)
                ),
                return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, NameTaken)]
            assert len(refused) == 3, [type(r).__name__ for r in results]
        assert len(await a.list()) == 5
    finally:
        await a.close()
        await b.close()


# --- SQLite specifics ---------------------------------------------------------------------


async def test_sqlite_files_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        store = await SqliteTokenStore.open(tmp_path / "state.db")
        await store.put(record(1))
        for suffix in ("", "-wal", "-shm"):
            path = tmp_path / f"state.db{suffix}"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        await store.close()
    finally:
        os.umask(old_umask)


async def test_sqlite_uses_wal_and_the_current_schema(tmp_path: Path) -> None:
    store = await SqliteTokenStore.open(tmp_path / "state.db")
    await store.close()
    conn = sqlite3.connect(tmp_path / "state.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        conn.close()


def test_sqlite_reads_the_tokens_of_one_name_by_its_index(tmp_path: Path) -> None:
    """The name check and by_name read one name's rows, not the table (issue 22: a create
    among 10,000 tokens scanned them all)."""
    conn = open_sqlite(tmp_path / "state.db")
    try:
        for query in (
            "SELECT id FROM tokens WHERE name = ? AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > ?) LIMIT 1",
            "SELECT id FROM tokens WHERE name = ? ORDER BY created_at, id",
        ):
            plan = conn.execute("EXPLAIN QUERY PLAN " + query, ("svc", T0)[: query.count("?")])
            assert "INDEX tokens_by_name (name=?)" in " ".join(str(row) for row in plan), query
    finally:
        conn.close()


def test_open_sqlite_sets_pragmas(tmp_path: Path) -> None:
    conn = open_sqlite(tmp_path / "state.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
        assert conn.in_transaction is False
    finally:
        conn.close()


@pytest.mark.parametrize("version", [4, 5])
async def test_an_older_sqlite_file_gains_classes_and_keeps_its_tokens(
    tmp_path: Path, version: int
) -> None:
    """Version 4 (before the audit log) and 5 (the audit log) files open: classes (6) are
    added after them, every token read back in the default class and free to change."""
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    for statements in SCHEMA_MIGRATIONS[:version]:
        for statement in statements:
            conn.execute(statement)
    conn.execute(
        "INSERT INTO tokens (id, name, secret_hash, scopes, upstream_key, hourly, per_minute,"
        " weight, created_at, expires_at, revoked_at) VALUES"
        " ('aaaaaaaaaaaa', 'old', ?, '[\"contacts:read\"]', 'default', NULL, NULL, 1, ?,"
        " NULL, NULL)",
        ("0" * 64, T0),
    )
    if version == 5:
        conn.execute(
            "INSERT INTO token_audit (at, action, token_id, actor, address, detail)"
            " VALUES (?, 'token.create', 'aaaaaaaaaaaa', 'cli:ops', NULL, '{}')",
            (T0,),
        )
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    store = await SqliteTokenStore.open(path)
    try:
        old = await store.get("aaaaaaaaaaaa")
        assert old is not None
        assert (old.name, old.service_class) == ("old", None)
        changed = await store.update("aaaaaaaaaaaa", service_class="batch")
        assert changed is not None
        assert changed.service_class == "batch"
        assert await store.get("aaaaaaaaaaaa") == changed
        kept = await store.entries(token_id="aaaaaaaaaaaa")
        assert [e.actor for e in kept] == (["cli:ops"] if version == 5 else [])
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (8,)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(send_rows)")}
        assert "cls" in columns
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(tokens)")}
        assert "tokens_by_name" in indexes  # 7: the tokens of one name
        # 8: the change log, written by triggers: the update above is in it
        assert conn.execute("SELECT token_id FROM token_changes").fetchall() == [("aaaaaaaaaaaa",)]
    finally:
        conn.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    conn = open_sqlite(tmp_path / "state.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this gateway"):
        open_sqlite(tmp_path / "state.db")


async def test_sqlite_creates_missing_directories(tmp_path: Path) -> None:
    store = await open_token_store(f"sqlite:///{tmp_path}/a/b/state.db")
    await store.close()
    assert (tmp_path / "a" / "b" / "state.db").is_file()


async def test_sqlite_relative_path_is_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for url, path in [
        ("sqlite:///one.db", "one.db"),
        ("sqlite:///./sub/two.db", "sub/two.db"),
    ]:
        store = await open_token_store(url)
        await store.close()
        assert (tmp_path / path).is_file()


async def test_two_sqlite_stores_share_one_file(tmp_path: Path) -> None:
    a = await SqliteTokenStore.open(tmp_path / "state.db")
    b = await SqliteTokenStore.open(tmp_path / "state.db")
    try:
        await a.put(record(1))
        assert await b.get(record(1).id) == record(1)
        await b.revoke(record(1).id, T0)
        got = await a.get(record(1).id)
        assert got is not None
        assert got.revoked_at == T0
    finally:
        await a.close()
        await b.close()


# --- choosing a backend -------------------------------------------------------------------


def test_state_all_is_pinned() -> None:
    assert sorted(proxy.state.__all__) == [
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


async def test_memory_url_opens_a_memory_store() -> None:
    store = await open_token_store("memory://")
    assert isinstance(store, MemoryTokenStore)
    await store.close()


async def test_redis_url_opens_a_redis_store(redis_scratch: tuple[Redis, str]) -> None:
    _, prefix = redis_scratch
    store = await open_token_store(REDIS_URL, redis_options=RedisOptions(key_prefix=prefix))
    assert isinstance(store, RedisTokenStore)
    await store.ping()
    await store.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("memory://", StateUrl("memory")),
        ("MEMORY://", StateUrl("memory")),
        (
            "sqlite:///var/lib/echowin-gateway/state.db",
            StateUrl("sqlite", "/var/lib/echowin-gateway/state.db"),
        ),
        ("sqlite:////state.db", StateUrl("sqlite", "/state.db")),
        ("sqlite:////var/lib/state.db", StateUrl("sqlite", "/var/lib/state.db")),
        ("sqlite:///state.db", StateUrl("sqlite", "state.db")),
        ("sqlite:///./state.db", StateUrl("sqlite", "./state.db")),
        ("sqlite:///./.run/state.db", StateUrl("sqlite", "./.run/state.db")),
        ("sqlite:///../up/state.db", StateUrl("sqlite", "../up/state.db")),
        ("sqlite:///my%20dir/state.db", StateUrl("sqlite", "/my dir/state.db")),
        (REDIS_URL, StateUrl("redis", url=REDIS_URL)),
        ("REDIS://cache:6379/0", StateUrl("redis", url="REDIS://cache:6379/0")),
        ("rediss://cache.example:6380/2", StateUrl("redis", url="rediss://cache.example:6380/2")),
        ("redis://gateway@cache", StateUrl("redis", url="redis://gateway@cache")),
    ],
)
def test_parse_state_url(url: str, expected: StateUrl) -> None:
    assert parse_state_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "not a URL"),
        ("state.db", "not a URL"),
        ("memory://x", "takes nothing"),
        ("sqlite://", "needs a file path"),
        ("sqlite://state.db", "needs a file path"),
        ("sqlite:///", "needs a file path"),
        ("sqlite:///dir/", "not a database file name"),
        ("sqlite:///:memory:", "not a database file name"),
        ("sqlite:///state.db?mode=ro", "no query"),
        ("postgres://db/x", "unsupported URL scheme 'postgres'"),
        ("redis://:pw@localhost:6379/0", "must not carry a password"),
        ("rediss://user:pw@localhost:6379/0", "must not carry a password"),
        ("redis://localhost:6379/0?ssl_cert_reqs=none", "no query"),
        ("redis://localhost:6379/0#x", "no query"),
        ("redis:///0", "needs a host"),
        ("redis://localhost:port/0", "malformed host or port"),
        ("redis://localhost:99999/0", "malformed host or port"),
        ("redis://localhost:0/0", "needs a port"),
        ("redis://localhost/db0", "database number"),
        ("redis://localhost/0/1", "database number"),
    ],
)
def test_parse_state_url_refuses(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^state: .*{message}"):
        parse_state_url(url)


async def test_errors_never_repeat_credentials() -> None:
    for url in (
        "redis://:hunter2@cache:6379/0",
        "rediss://admin:hunter2@cache:6379/0",
        "redis://cache:hunter2/0",
        "redis://cache/hunter2",
        "redis://cache/0?password=hunter2",
        "postgres://user:hunter2@db/x",
        "postgresql://user:hunter2@db:5432/x",
    ):
        with pytest.raises(ValueError, match=r"^(state|token_store):") as caught:
            await open_token_store(url)
        assert "hunter2" not in str(caught.value)


def _open_at_once(path: str, barrier: Any) -> str | None:
    barrier.wait()  # every process opens the new file at the same moment
    try:
        open_sqlite(path).close()
    except sqlite3.Error as exc:
        return repr(exc)
    return None


def test_processes_opening_a_new_state_file_at_once_all_succeed(tmp_path: Path) -> None:
    """``serve --workers N`` starts N processes on a state file that may not exist yet:
    switching it to WAL needs the file to itself, and SQLite refuses at once ("database is
    locked") to all but one. Seen: 17 of 40 rounds of 4 processes failed before the retry."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager, ctx.Pool(4) as pool:
        for i in range(15):
            barrier = manager.Barrier(4)
            path = str(tmp_path / f"state-{i}.db")
            assert pool.starmap(_open_at_once, [(path, barrier)] * 4) == [None] * 4
