"""Redis token store: tokens shared by replicas.

Keys, under the configured prefix (``redis.key_prefix``, default ``egw:``):

- ``{prefix}token:{id}``: a hash with one field per ``TokenRecord`` field (``scopes`` as a
  JSON array, times as Unix seconds, ``None`` as an absent field);
- ``{prefix}tokens``: a sorted set of ids scored by ``created_at``; equal scores sort by id,
  which is exactly the order ``TokenStore.list`` promises;
- ``{prefix}tokens:name:{name}``: a hash of the ids of the tokens called ``name`` (value:
  ``created_at``), so ``by_name`` reads those tokens only;
- ``{prefix}tokens:names``: how many ids the name indexes hold. While it equals the size of
  ``{prefix}tokens`` every token is in its name's index; a token put by an older gateway
  (no name index) leaves it behind, and ``by_name`` then rebuilds the name indexes once.

Records are never deleted (revocation is a field) and names never change, so every id in
the set has its hash, and a name index only grows.

On a cluster (``redis-cluster://``) every token key carries the hash tag ``{tokens}``
(``{prefix}{tokens}:token:{id}``, ``{prefix}{tokens}:index``, ``{prefix}{tokens}:name:{name}``,
``{prefix}{tokens}:names``): the store is one slot, so its scripts and transactions run
there whole. Standalone and Sentinel keep the names above.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, Unpack, cast

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import WatchError
from redis.typing import EncodableT, FieldT

from proxy.auth.tokens import TokenChanges, TokenRecord, apply_changes
from proxy.state.redis.client import RedisClient
from proxy.state.redis.scripts import hash_tagged, lua

__all__ = ["RedisTokenStore"]

T = TypeVar("T")
AnyPipeline = Pipeline | ClusterPipeline

MAX_TRANSACTION_ATTEMPTS = 100
"""Bound on optimistic (WATCH) retries. Each failed attempt means another writer committed, so
N concurrent writers of one key need at most N attempts; hitting this bound raises WatchError."""


_INT_FIELDS = frozenset({"hourly", "per_minute", "weight"})
_FLOAT_FIELDS = frozenset({"created_at", "expires_at", "revoked_at"})
_STR_FIELDS = frozenset({"id", "name", "secret_hash", "upstream_key", "service_class"})


def _encode(record: TokenRecord) -> dict[str, str]:
    """Hash fields of ``record``; None fields are left out. Floats use ``repr`` (exact)."""
    fields: dict[str, str] = {}
    for name in (f.name for f in dataclasses.fields(record)):
        value = getattr(record, name)
        if value is None:
            continue
        if name == "scopes":
            fields[name] = json.dumps(list(value))
        elif name in _FLOAT_FIELDS:
            fields[name] = repr(float(value))
        else:
            fields[name] = str(value)
    return fields


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: Mapping[bytes | str, bytes | str]) -> TokenRecord:
    """Rebuild a record from its hash; TokenRecord's own checks reject a corrupt one.

    Fields it does not know are skipped, so a later version may add some without breaking
    replicas still running this one.
    """
    fields = {_text(key): _text(value) for key, value in raw.items()}
    values: dict[str, Any] = {}
    for name, text in fields.items():
        if name == "scopes":
            values[name] = tuple(json.loads(text))
        elif name in _INT_FIELDS:
            values[name] = int(text)
        elif name in _FLOAT_FIELDS:
            values[name] = float(text)
        elif name in _STR_FIELDS:
            values[name] = text
    missing = {"id", "name", "secret_hash", "scopes"} - values.keys()
    if missing:
        raise ValueError(f"state: stored token lacks {', '.join(sorted(missing))}")
    return TokenRecord(**values)


def _pairs_to_mapping(flat: Sequence[bytes]) -> dict[bytes | str, bytes | str]:
    """HGETALL as a Lua script returns it (``[field, value, ...]``) as a mapping."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisTokenStore:
    """``proxy.auth.tokens.TokenStore`` in Redis, on a client shared with the rest of the process.

    Every method is atomic across processes: ``put``, ``put_unique_name`` and ``revoke``
    are Lua scripts,
    ``update`` and ``list`` are optimistic WATCH/MULTI transactions retried when another
    writer got in first. Several stores (replicas) on the same Redis and prefix see each
    other's writes at once. Redis errors propagate (``redis.exceptions.RedisError``); the
    caller treats any error as "store unavailable".

    The client is NOT closed by ``close`` unless ``owns_client`` is True. After ``close``
    every method raises RuntimeError, whoever owns the client.
    """

    def __init__(
        self, client: RedisClient, *, key_prefix: str = "egw:", owns_client: bool = False
    ) -> None:
        if not key_prefix:
            raise ValueError("redis.key_prefix: must be a non-empty string")
        self._client = client
        self._prefix = f"{key_prefix}{{tokens}}:" if hash_tagged(client) else key_prefix
        self._index = f"{self._prefix}index" if hash_tagged(client) else f"{key_prefix}tokens"
        names = f"{self._prefix}name" if hash_tagged(client) else f"{key_prefix}tokens:name"
        self._names = names  # + ":{name}": a name's index; + "s": how many ids they hold
        self._owns_client = owns_client
        self._closed = False
        self._put_script = client.register_script(lua("token_put"))
        self._revoke_script = client.register_script(lua("token_revoke"))

    def _key(self, token_id: str) -> str:
        return f"{self._prefix}token:{token_id}"

    def _name_key(self, name: str) -> str:
        return f"{self._names}:{name}"

    def keys(self, token_id: str, name: str) -> tuple[str, str, str, str]:
        """The keys a token's record touches: its hash, the index of ids, its name's index
        and the count of ids in the name indexes."""
        return self._key(token_id), self._index, self._name_key(name), f"{self._names}s"

    def _open_client(self) -> RedisClient:
        if self._closed:
            raise RuntimeError("redis token store is closed")
        return self._client

    async def put(self, record: TokenRecord) -> None:
        """Insert ``record`` (hash and indexes in one script); ValueError if the id exists.

        A put whose reply is lost to a dropped connection may have been applied: its retry
        then reports "already exists" for a record that is in fact stored.
        """
        await self._put(record, "", [])

    async def put_unique_name(self, record: TokenRecord, now: float) -> str | None:
        """Store ``record`` unless a token active at ``now`` has its name: then that
        token's id, and nothing stored. One script, atomic across replicas: it is given
        the tokens of the name as read just before, and refuses (to be read again) if the
        name's index has changed since."""
        for _ in range(MAX_TRANSACTION_ATTEMPTS):
            ids = await self._named_ids(record.name)
            holders = [self._key(_text(token_id)) for token_id in ids]
            done = await self._put(record, repr(float(now)), holders)
            if done != -1:
                return None if done == 1 else _text(cast("bytes | str", done))
        raise WatchError(f"gave up after {MAX_TRANSACTION_ATTEMPTS} conflicting writes")

    async def _put(self, record: TokenRecord, now: str, holders: list[str]) -> object:
        """The put script (proxy/state/lua/token_put.lua): 1, -1 or a holder's id;
        ValueError if the id exists."""
        self._open_client()
        args: list[str] = [repr(float(record.created_at)), record.id, now]
        for name, value in _encode(record).items():
            args += (name, value)
        keys = [*self.keys(record.id, record.name), *holders]
        done = await self._put_script(keys=keys, args=args)
        if done == 0:
            raise ValueError(f"token id {record.id!r} already exists")
        return done

    async def get(self, token_id: str) -> TokenRecord | None:
        raw = await self._open_client().hgetall(self._key(token_id))
        return _decode(raw) if raw else None

    async def list(self) -> builtins.list[TokenRecord]:
        """All records as of one instant: the index is WATCHed while the hashes are read."""
        return await self._transaction(self._index, self._list_once)

    async def _list_once(self, pipe: AnyPipeline) -> builtins.list[TokenRecord]:
        # Without withscores, ZRANGE returns the bare members.
        ids = cast("builtins.list[bytes]", await pipe.zrange(self._index, 0, -1))
        pipe.multi()  # type: ignore[no-untyped-call]
        for token_id in ids:
            pipe.hgetall(self._key(token_id.decode()))
        hashes: builtins.list[dict[bytes | str, bytes | str]] = await pipe.execute()
        return [_decode(raw) for raw in hashes if raw]

    async def by_name(self, name: str) -> builtins.list[TokenRecord]:
        """The tokens called ``name`` (any status), from the name's index: one transaction
        to read the index (and check it is complete), one pipeline for the records."""
        ids = await self._named_ids(name)
        async with self._open_client().pipeline(transaction=False) as pipe:
            for token_id in ids:
                pipe.hgetall(self._key(_text(token_id)))
            hashes: builtins.list[dict[bytes | str, bytes | str]] = await pipe.execute()
        return sorted((_decode(raw) for raw in hashes if raw), key=lambda r: (r.created_at, r.id))

    async def _named_ids(self, name: str) -> builtins.list[bytes]:
        """The ids in ``name``'s index, once every token is in its name's index (rebuilt
        first if a token put by an older gateway is missing)."""
        client = self._open_client()
        for _ in range(MAX_TRANSACTION_ATTEMPTS):
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(f"{self._names}s")
                pipe.zcount(self._index, "-inf", "+inf")
                pipe.hgetall(self._name_key(name))
                indexed, stored, ids = await pipe.execute()
            if int(indexed or 0) == stored:
                return builtins.list(ids)
            await self._transaction(self._index, self._reindex_once)
        raise WatchError(f"gave up after {MAX_TRANSACTION_ATTEMPTS} conflicting writes")

    async def _reindex_once(self, pipe: AnyPipeline) -> None:
        """Put every token in its name's index and set the count, unless the id index
        changes meanwhile (it is WATCHed): tokens put by a gateway without name indexes."""
        scored = cast(
            "builtins.list[tuple[bytes, float]]",
            await pipe.zrange(self._index, 0, -1, withscores=True),
        )
        async with self._open_client().pipeline(transaction=False) as reader:
            for token_id, _ in scored:
                reader.hgetall(self._key(token_id.decode()))  # HGETALL: in the ACL already
            hashes: builtins.list[dict[bytes, bytes]] = await reader.execute()
        by_name: dict[str, dict[FieldT, EncodableT]] = {}
        for (token_id, score), raw in zip(scored, hashes, strict=True):
            if b"name" in raw:
                by_name.setdefault(raw[b"name"].decode(), {})[token_id] = repr(float(score))
        pipe.multi()  # type: ignore[no-untyped-call]
        for name, ids in by_name.items():
            pipe.hset(self._name_key(name), mapping=ids)
        pipe.set(f"{self._names}s", len(scored))
        await pipe.execute()

    async def revoke(self, token_id: str, now: float) -> TokenRecord | None:
        """Set ``revoked_at = now`` unless already set, in one script. None for an unknown id."""
        self._open_client()
        flat = await self._revoke_script(keys=[self._key(token_id)], args=[repr(float(now))])
        return None if flat is None else _decode(_pairs_to_mapping(flat))

    async def update(self, token_id: str, **changes: Unpack[TokenChanges]) -> TokenRecord | None:
        """Read, ``apply_changes`` (validated in Python), write the changed fields back.

        The hash is WATCHed from the read to the write, so a concurrent revoke or update makes
        this one start over on fresh data: no change is lost. ValueError writes nothing.
        """
        key = self._key(token_id)

        async def once(pipe: AnyPipeline) -> TokenRecord | None:
            raw = await pipe.hgetall(key)
            if not raw:
                return None
            updated = apply_changes(_decode(raw), changes)
            if not changes:
                return updated
            stored = _encode(updated)
            written: dict[FieldT, EncodableT] = {n: stored[n] for n in changes if n in stored}
            cleared = [name for name in changes if name not in stored]
            pipe.multi()  # type: ignore[no-untyped-call]
            if written:
                pipe.hset(key, mapping=written)
            if cleared:
                pipe.hdel(key, *cleared)
            await pipe.execute()
            return updated

        return await self._transaction(key, once)

    async def _transaction(self, key: str, attempt: Callable[[AnyPipeline], Awaitable[T]]) -> T:
        """Run ``attempt`` with ``key`` WATCHed, again while another writer gets in first."""
        client = self._open_client()
        for _ in range(MAX_TRANSACTION_ATTEMPTS):
            async with client.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                try:
                    return await attempt(pipe)
                except WatchError:
                    continue
        raise WatchError(f"gave up after {MAX_TRANSACTION_ATTEMPTS} conflicting writes")

    async def ping(self) -> None:
        """PING Redis; raises RedisError if it does not answer in time, RuntimeError if closed."""
        await self._open_client().ping()

    async def close(self) -> None:
        """Stop serving; close the client too if this store owns it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()
