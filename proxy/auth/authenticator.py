"""The token authenticator: a presented token in, an ``AuthResult`` out, with a bounded
cache in front of the token store.

Time comes in through injected clocks (``clock``: Unix seconds, ``timer``: monotonic
seconds), so tests move a fake clock.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from cachetools import LRUCache, TTLCache

from proxy.auth.tokens import (
    ID_LENGTH,
    TOKEN_PREFIX,
    TokenRecord,
    TokenStore,
    hash_secret,
    parse_token,
)

__all__ = ["RENEWALS", "AuthFailure", "AuthResult", "TokenAuthenticator"]

RENEWALS = 60
"""A record the change log keeps confirming is read again after this many TTLs all the
same (5 minutes with the default 5 s)."""


class AuthFailure(Enum):
    """Why a token was refused; the values are metric label values."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Exactly one of ``record`` (accepted) and ``failure`` (refused) is set."""

    record: TokenRecord | None
    failure: AuthFailure | None

    def __post_init__(self) -> None:
        if (self.record is None) == (self.failure is None):
            raise ValueError("AuthResult: exactly one of record and failure must be set")

    @property
    def ok(self) -> bool:
        return self.record is not None


_FAILED = MappingProxyType({failure: AuthResult(None, failure) for failure in AuthFailure})


class TokenAuthenticator:
    """Turns a presented token into an ``AuthResult``, with a bounded cache in front of the store.

    Found records are cached for ``cache_ttl`` seconds (0 disables caching); ids the store does
    not know are remembered for ``min(negative_ttl, cache_ttl)`` seconds in a separate cache of
    the same bound, so a flood of random ids cannot evict the good entries. Cache ages run on
    ``timer`` (monotonic seconds); expiry and revocation are judged on ``clock`` (Unix seconds)
    at every request, so a cached record still expires on time. A revocation or update made on
    another instance shows here after at most ``cache_ttl`` seconds; one made through
    ``revoke``/``invalidate`` on this instance shows at once.

    A store that keeps a log of its changes (``proxy.auth.changes``) lets a record outlive
    its ``cache_ttl``: each poll of the log drops the records it names and ``confirm``s
    the rest as of when it started, so a cached record is fresh until ``cache_ttl`` after
    the later of its load and the last confirmation, and at most ``RENEWALS`` times
    ``cache_ttl`` after its load (a write the log cannot see, such as one made with the
    triggers off, shows by then). Each token in use is then read once per ``RENEWALS``
    TTLs, not once per TTL, and the bound on a change the log sees holds whether the
    polls succeed or not. A record's load time is when its lookup started.

    Concurrent misses for one id share a single store lookup. A token whose secret matched
    a cached record is remembered with that record until the record's cache entry ends, so
    the next request with it skips the hash: it is compared (in constant time) with the
    token that matched. ``invalidate`` forgets it with the record.
    """

    def __init__(
        self,
        store: TokenStore,
        *,
        clock: Callable[[], float] = time.time,
        cache_ttl: float = 5.0,
        cache_size: int = 10_000,
        negative_ttl: float = 1.0,
        timer: Callable[[], float] = time.monotonic,
        stale_if_error: bool = False,
    ) -> None:
        """``stale_if_error``: when the store fails, answer from the last record this
        instance loaded for that id (bounded by ``cache_size``), so a replica can keep
        serving known tokens through a shared-store outage. Off: store errors propagate."""
        if not (math.isfinite(cache_ttl) and cache_ttl >= 0):
            raise ValueError("cache_ttl: must be seconds >= 0")
        if not (math.isfinite(negative_ttl) and negative_ttl >= 0):
            raise ValueError("negative_ttl: must be seconds >= 0")
        if cache_size < 1:
            raise ValueError("cache_size: must be >= 1")
        self._store = store
        self._clock = clock
        self._caching = cache_ttl > 0
        self._timer = timer
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        # Found records by id, with when (``timer``) each was loaded: fresh while
        # ``_fresh(loaded)``.
        self._records: LRUCache[str, tuple[TokenRecord, float]] = LRUCache(cache_size)
        # When (``timer``) the last poll of the store's change log that ``confirm``ed every
        # record it did not name started.
        self._confirmed = -math.inf
        # Per id: the token that matched the cached record, the record's acceptance, and
        # when the record was loaded.
        self._verified: dict[str, tuple[str, AuthResult, float]] = {}
        negative = min(negative_ttl, cache_ttl)
        self._unknown: TTLCache[str, bool] = TTLCache(cache_size, negative, timer)
        self._negative_caching = negative > 0
        # Joinable lookups by id; `_pending` holds strong references to every running lookup,
        # including ones `invalidate` detached, so none is garbage-collected mid-flight.
        self._inflight: dict[str, asyncio.Task[TokenRecord | None]] = {}
        self._pending: set[asyncio.Task[TokenRecord | None]] = set()
        self._last_known: LRUCache[str, TokenRecord] | None = (
            LRUCache(cache_size) if stale_if_error else None
        )

    async def authenticate(self, raw: str | None) -> AuthResult:
        """Check a presented token (the header value without any ``Bearer`` prefix).

        An unknown id and a wrong secret both give UNKNOWN. Expired or revoked is only told to
        a caller who holds the right secret. Store errors propagate (the caller answers 5xx).
        """
        if not raw:
            return _FAILED[AuthFailure.MISSING]
        recalled = self.recall(raw)
        if recalled is not None:
            return recalled
        parsed = parse_token(raw)
        if parsed is None:
            return _FAILED[AuthFailure.MALFORMED]
        token_id, secret = parsed
        record = await self._lookup(token_id)
        if record is None or not self._secret_matches(record, secret):
            return _FAILED[AuthFailure.UNKNOWN]
        accepted = AuthResult(record, None)
        self._remember(token_id, raw, accepted)
        return self._judge(accepted)

    def recall(self, raw: str) -> AuthResult | None:
        """What ``authenticate(raw)`` answers, if this instance verified ``raw`` lately (no
        hash, no store lookup); None when only ``authenticate`` can tell."""
        known = self._verified.get(raw[len(TOKEN_PREFIX) : len(TOKEN_PREFIX) + ID_LENGTH])
        if (
            known is not None
            and raw.isascii()  # compare_digest takes ASCII strings only
            and hmac.compare_digest(known[0], raw)
            and self._fresh(known[2])
        ):
            return self._judge(known[1])
        return None

    def _judge(self, accepted: AuthResult) -> AuthResult:
        """``accepted`` (its secret matched), unless its record is revoked or expired now."""
        assert accepted.record is not None
        status = accepted.record.status(self._clock())
        if status == "revoked":
            return _FAILED[AuthFailure.REVOKED]
        if status == "expired":
            return _FAILED[AuthFailure.EXPIRED]
        return accepted

    def _remember(self, token_id: str, raw: str, accepted: AuthResult) -> None:
        """Keep ``raw`` as verified for ``accepted.record`` while the cache holds that very
        record (not one loaded before an ``invalidate``, nor a stale one after a store
        error)."""
        cached = self._records.get(token_id) if self._caching else None
        if cached is None or cached[0] is not accepted.record or not self._fresh(cached[1]):
            return
        verified = self._verified
        if token_id not in verified and len(verified) >= self._cache_size:
            del verified[next(iter(verified))]  # the oldest entry
        verified[token_id] = (raw, accepted, cached[1])

    def invalidate(self, token_id: str) -> None:
        """Forget what this instance knows about ``token_id``, including a lookup in flight
        (its answer may predate the change), so the next request reads the store."""
        self._records.pop(token_id, None)
        self._verified.pop(token_id, None)
        self._unknown.pop(token_id, None)
        self._inflight.pop(token_id, None)
        if self._last_known is not None:
            self._last_known.pop(token_id, None)

    def invalidate_all(self) -> None:
        """Forget every token (a change log that lost track: any may have changed)."""
        self._records.clear()
        self._verified.clear()
        self._unknown.clear()
        self._inflight.clear()
        if self._last_known is not None:
            self._last_known.clear()

    def confirm(self, started: float) -> None:
        """Every cached record loaded before ``started`` (``timer``) was current then: a poll
        of the store's change log that started then has dropped the ones it named."""
        self._confirmed = max(self._confirmed, started)

    def _fresh(self, loaded: float) -> bool:
        confirmed = min(self._confirmed, loaded + (RENEWALS - 1) * self._cache_ttl)
        return self._timer() < max(loaded, confirmed) + self._cache_ttl

    async def revoke(self, token_id: str) -> TokenRecord | None:
        """Revoke in the store at ``clock()`` and take effect on this instance at once."""
        try:
            return await self._store.revoke(token_id, self._clock())
        finally:
            self.invalidate(token_id)

    @staticmethod
    def _secret_matches(record: TokenRecord, secret: str) -> bool:
        return hmac.compare_digest(hash_secret(secret), record.secret_hash)

    async def _lookup(self, token_id: str) -> TokenRecord | None:
        cached = self._records.get(token_id)
        if cached is not None:
            if self._fresh(cached[1]):
                return cached[0]
            del self._records[token_id]
        if token_id in self._unknown:
            return None
        task = self._inflight.get(token_id)
        if task is None:
            started = self._timer()  # the record is as of no earlier than this
            task = asyncio.create_task(self._store.get(token_id))
            self._inflight[token_id] = task
            self._pending.add(task)
            task.add_done_callback(functools.partial(self._loaded, token_id, started))
        # Shielded: a waiter that gives up must not cancel the lookup others are sharing.
        try:
            return await asyncio.shield(task)
        except Exception:
            stale = self._last_known.get(token_id) if self._last_known is not None else None
            if stale is None:
                raise
            return stale

    def _loaded(
        self, token_id: str, started: float, task: asyncio.Task[TokenRecord | None]
    ) -> None:
        self._pending.discard(task)
        # Calling exception() also marks a failure as retrieved, so a lookup that every waiter
        # abandoned does not log "exception was never retrieved".
        failed = task.cancelled() or task.exception() is not None
        if self._inflight.get(token_id) is not task:
            return  # invalidated while in flight: the answer may be stale, so do not keep it
        del self._inflight[token_id]
        if failed:
            return
        record = task.result()
        if record is not None and self._last_known is not None:
            self._last_known[token_id] = record
        if record is not None and self._caching:
            self._records[token_id] = (record, started)
        elif record is None and self._negative_caching:
            self._unknown[token_id] = True
