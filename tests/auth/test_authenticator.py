"""Unit tests for proxy.auth.authenticator: the token authenticator and its cache.

No sockets and no sleeping: time moves through a fake clock, and the store is our own
MemoryTokenStore with a small counting subclass.
"""

from __future__ import annotations

import asyncio

import pytest

import proxy.auth.authenticator
import proxy.auth.tokens
from proxy.auth.authenticator import AuthFailure, AuthResult, TokenAuthenticator
from proxy.auth.tokens import (
    TokenRecord,
)
from proxy.state.memory import MemoryTokenStore
from tests.auth.conftest import GOOD, T0, CountingStore, FakeClock, mint, stored


def test_authenticator_all_is_pinned() -> None:
    assert sorted(proxy.auth.authenticator.__all__) == [
        "AuthFailure",
        "AuthResult",
        "RENEWALS",
        "TokenAuthenticator",
    ]


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def timer() -> FakeClock:
    return FakeClock(0.0)


@pytest.fixture
def auth(store: CountingStore, clock: FakeClock, timer: FakeClock) -> TokenAuthenticator:
    return TokenAuthenticator(store, clock=clock, timer=timer, cache_ttl=5.0, negative_ttl=1.0)


@pytest.mark.parametrize("raw", [None, ""])
async def test_missing(auth: TokenAuthenticator, store: CountingStore, raw: str | None) -> None:
    assert await auth.authenticate(raw) == AuthResult(None, AuthFailure.MISSING)
    assert store.gets == 0


@pytest.mark.parametrize("raw", ["Bearer", "egw_nope", GOOD + "x", "x" * 100_000])
async def test_malformed(auth: TokenAuthenticator, store: CountingStore, raw: str) -> None:
    assert await auth.authenticate(raw) == AuthResult(None, AuthFailure.MALFORMED)
    assert store.gets == 0


async def test_valid_token_is_accepted(auth: TokenAuthenticator, store: CountingStore) -> None:
    new = await stored(store)
    result = await auth.authenticate(new.token)
    assert result == AuthResult(new.record, None)
    assert result.ok


async def test_unknown_id(auth: TokenAuthenticator) -> None:
    assert await auth.authenticate(mint().token) == AuthResult(None, AuthFailure.UNKNOWN)


async def test_wrong_secret_is_unknown(auth: TokenAuthenticator, store: CountingStore) -> None:
    new = await stored(store)
    other = mint().token
    forged = new.token[:17] + other[17:]
    assert await auth.authenticate(forged) == AuthResult(None, AuthFailure.UNKNOWN)
    # The right secret still works after a wrong one was tried.
    assert (await auth.authenticate(new.token)).ok


async def test_expiry_follows_the_clock_despite_the_cache(
    auth: TokenAuthenticator, store: CountingStore, clock: FakeClock
) -> None:
    new = await stored(store, expires_in=60)
    assert (await auth.authenticate(new.token)).ok
    clock.now = T0 + 59.5
    assert (await auth.authenticate(new.token)).ok
    clock.now = T0 + 60
    assert await auth.authenticate(new.token) == AuthResult(None, AuthFailure.EXPIRED)
    assert store.gets == 1


async def test_revoke_takes_effect_at_once(
    auth: TokenAuthenticator, store: CountingStore, clock: FakeClock
) -> None:
    new = await stored(store)
    assert (await auth.authenticate(new.token)).ok  # now cached
    clock.now = T0 + 10
    revoked = await auth.revoke(new.record.id)
    assert revoked is not None
    assert revoked.revoked_at == T0 + 10
    assert await auth.authenticate(new.token) == AuthResult(None, AuthFailure.REVOKED)
    assert await auth.revoke("zzzzzzzzzzzz") is None


async def test_revoked_and_expired_stay_unknown_without_the_secret(
    auth: TokenAuthenticator, store: CountingStore, clock: FakeClock
) -> None:
    new = await stored(store, expires_in=60)
    forged = new.token[:17] + mint().token[17:]
    clock.now = T0 + 120
    assert await auth.authenticate(forged) == AuthResult(None, AuthFailure.UNKNOWN)
    await auth.revoke(new.record.id)
    assert await auth.authenticate(forged) == AuthResult(None, AuthFailure.UNKNOWN)
    # Revocation wins over expiry for the holder of the secret.
    assert await auth.authenticate(new.token) == AuthResult(None, AuthFailure.REVOKED)


async def test_store_side_revoke_shows_after_invalidate_or_ttl(
    auth: TokenAuthenticator, store: CountingStore, timer: FakeClock
) -> None:
    a, b = await stored(store), await stored(store)
    for new in (a, b):
        assert (await auth.authenticate(new.token)).ok
        await store.revoke(new.record.id, T0)  # e.g. by another instance
        assert (await auth.authenticate(new.token)).ok  # still cached here
    auth.invalidate(a.record.id)
    assert (await auth.authenticate(a.token)).failure is AuthFailure.REVOKED
    timer.now += 5.0
    assert (await auth.authenticate(b.token)).failure is AuthFailure.REVOKED


async def test_update_then_invalidate_shows_at_once(
    auth: TokenAuthenticator, store: CountingStore
) -> None:
    new = await stored(store)
    assert (await auth.authenticate(new.token)).record == new.record
    await store.update(new.record.id, scopes=("*",), weight=4)
    auth.invalidate(new.record.id)
    record = (await auth.authenticate(new.token)).record
    assert record is not None
    assert (record.scopes, record.weight) == (("*",), 4)


async def test_cache_hits_do_not_call_the_store(
    auth: TokenAuthenticator, store: CountingStore, timer: FakeClock
) -> None:
    new = await stored(store)
    for _ in range(10):
        assert (await auth.authenticate(new.token)).ok
    assert store.gets == 1
    timer.now += 4.9
    assert (await auth.authenticate(new.token)).ok
    assert store.gets == 1
    timer.now += 0.1  # the entry is 5 s old: read again
    assert (await auth.authenticate(new.token)).ok
    assert store.gets == 2


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every secret the authenticator hashes to check it, in order."""
    seen: list[str] = []
    check = TokenAuthenticator._secret_matches

    def counting(record: TokenRecord, secret: str) -> bool:
        seen.append(secret)
        return check(record, secret)

    monkeypatch.setattr(TokenAuthenticator, "_secret_matches", staticmethod(counting))
    return seen


async def test_a_verified_token_is_not_hashed_again_while_cached(
    auth: TokenAuthenticator, store: CountingStore, timer: FakeClock, hashes: list[str]
) -> None:
    new = await stored(store)
    for _ in range(5):
        assert (await auth.authenticate(new.token)).record == new.record
    assert len(hashes) == 1
    timer.now += 5.0  # the record's cache entry ends: read and hash again
    assert (await auth.authenticate(new.token)).ok
    assert (store.gets, len(hashes)) == (2, 2)


async def test_a_wrong_secret_never_rides_on_a_verified_token(
    auth: TokenAuthenticator, store: CountingStore, hashes: list[str]
) -> None:
    new = await stored(store)
    assert (await auth.authenticate(new.token)).ok
    forged = new.token[:17] + mint().token[17:]
    for raw in (forged, new.token[:-1] + "\u00e9", new.token + "x", new.token[:-1]):
        assert not (await auth.authenticate(raw)).ok, raw
    assert (await auth.authenticate(new.token)).ok


async def test_a_verified_token_still_expires_and_is_revoked_at_once(
    auth: TokenAuthenticator, store: CountingStore, clock: FakeClock, hashes: list[str]
) -> None:
    new = await stored(store, expires_in=60)
    assert (await auth.authenticate(new.token)).ok
    clock.now = T0 + 60
    assert (await auth.authenticate(new.token)).failure is AuthFailure.EXPIRED
    other = await stored(store)
    assert (await auth.authenticate(other.token)).ok
    assert (await auth.authenticate(other.token)).ok  # from the verified cache
    await auth.revoke(other.record.id)
    assert (await auth.authenticate(other.token)).failure is AuthFailure.REVOKED


async def test_a_store_side_revoke_reaches_a_verified_token_within_the_ttl(
    auth: TokenAuthenticator, store: CountingStore, timer: FakeClock, hashes: list[str]
) -> None:
    new = await stored(store)
    assert (await auth.authenticate(new.token)).ok
    await store.revoke(new.record.id, T0)  # by another instance
    timer.now += 4.9
    assert (await auth.authenticate(new.token)).ok  # cached here, as records are
    timer.now += 0.1
    assert (await auth.authenticate(new.token)).failure is AuthFailure.REVOKED


async def test_the_verified_cache_is_bounded(store: CountingStore, hashes: list[str]) -> None:
    auth = TokenAuthenticator(store, cache_size=2)
    tokens = [await stored(store) for _ in range(3)]
    for new in tokens:
        assert (await auth.authenticate(new.token)).ok
    assert len(hashes) == 3
    assert (await auth.authenticate(tokens[2].token)).ok  # the newest is still verified
    assert len(hashes) == 3
    assert (await auth.authenticate(tokens[0].token)).ok  # the oldest was let go
    assert len(hashes) == 4


async def test_unknown_ids_are_remembered_briefly(
    auth: TokenAuthenticator, store: CountingStore, timer: FakeClock
) -> None:
    new = mint()
    for _ in range(5):
        assert (await auth.authenticate(new.token)).failure is AuthFailure.UNKNOWN
    assert store.gets == 1
    await store.put(new.record)
    timer.now += 1.0
    assert (await auth.authenticate(new.token)).ok
    assert store.gets == 2


async def test_put_then_invalidate_clears_a_negative_entry(
    auth: TokenAuthenticator, store: CountingStore
) -> None:
    new = mint()
    assert (await auth.authenticate(new.token)).failure is AuthFailure.UNKNOWN
    await store.put(new.record)
    auth.invalidate(new.record.id)
    assert (await auth.authenticate(new.token)).ok


async def test_zero_ttl_reads_the_store_every_time(store: CountingStore) -> None:
    auth = TokenAuthenticator(store, cache_ttl=0)
    new = await stored(store)
    unknown = mint()
    for _ in range(3):
        assert (await auth.authenticate(new.token)).ok
        assert (await auth.authenticate(unknown.token)).failure is AuthFailure.UNKNOWN
    assert store.gets == 6


async def test_cache_is_bounded(store: CountingStore) -> None:
    auth = TokenAuthenticator(store, cache_size=2)
    tokens = [await stored(store) for _ in range(3)]
    for new in tokens:
        assert (await auth.authenticate(new.token)).ok
    assert (await auth.authenticate(tokens[0].token)).ok
    assert store.gets == 4  # the first entry was evicted by the third


async def test_concurrent_misses_share_one_lookup(
    auth: TokenAuthenticator, store: CountingStore
) -> None:
    new = await stored(store)
    store.gate = asyncio.Event()
    waiters = [asyncio.create_task(auth.authenticate(new.token)) for _ in range(20)]
    await asyncio.sleep(0)
    store.gate.set()
    results = await asyncio.gather(*waiters)
    assert all(r.ok for r in results)
    assert store.gets == 1


async def test_a_cancelled_waiter_does_not_cancel_the_shared_lookup(
    auth: TokenAuthenticator, store: CountingStore
) -> None:
    new = await stored(store)
    store.gate = asyncio.Event()
    first = asyncio.create_task(auth.authenticate(new.token))
    second = asyncio.create_task(auth.authenticate(new.token))
    await asyncio.sleep(0)
    first.cancel()
    store.gate.set()
    assert (await second).ok
    with pytest.raises(asyncio.CancelledError):
        await first
    assert store.gets == 1


async def test_store_errors_propagate_and_are_not_cached(
    auth: TokenAuthenticator, store: CountingStore
) -> None:
    new = await stored(store)
    store.fail = OSError("disk gone")
    with pytest.raises(OSError, match="disk gone"):
        await auth.authenticate(new.token)
    store.fail = None
    assert (await auth.authenticate(new.token)).ok
    assert store.gets == 2


async def test_invalidate_during_a_lookup_discards_its_answer(
    auth: TokenAuthenticator, store: CountingStore
) -> None:
    new = await stored(store)
    store.gate = asyncio.Event()
    early = asyncio.create_task(auth.authenticate(new.token))
    await asyncio.sleep(0)
    await store.revoke(new.record.id, T0)
    auth.invalidate(new.record.id)
    store.gate.set()
    await early  # started before the revocation: either answer is fair
    assert (await auth.authenticate(new.token)).failure is AuthFailure.REVOKED
    assert store.gets == 2


async def test_abandoned_lookup_still_completes(
    auth: TokenAuthenticator, store: CountingStore
) -> None:
    new = await stored(store)
    store.gate = asyncio.Event()
    only = asyncio.create_task(auth.authenticate(new.token))
    await asyncio.sleep(0)
    only.cancel()
    store.gate.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert (await auth.authenticate(new.token)).ok
    assert store.gets == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cache_ttl": -1}, "cache_ttl"),
        ({"cache_ttl": float("nan")}, "cache_ttl"),
        ({"negative_ttl": -1}, "negative_ttl"),
        ({"cache_size": 0}, "cache_size"),
    ],
)
def test_authenticator_checks_its_settings(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        TokenAuthenticator(MemoryTokenStore(), **kwargs)  # type: ignore[arg-type]


def test_auth_result_holds_exactly_one_outcome() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        AuthResult(None, None)
    with pytest.raises(ValueError, match="exactly one"):
        AuthResult(mint().record, AuthFailure.UNKNOWN)


def test_failure_values_are_metric_labels() -> None:
    assert [f.value for f in AuthFailure] == [
        "missing",
        "malformed",
        "unknown",
        "expired",
        "revoked",
    ]
