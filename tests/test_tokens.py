"""Unit tests for proxy.auth.tokens: format, hashing, records, durations, the authenticator.

No sockets and no sleeping: time moves through a fake clock, and the store is our own
MemoryTokenStore with a small counting subclass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

import proxy.auth.tokens
from proxy.auth.tokens import (
    DEFAULT_UPSTREAM_KEY,
    AuthFailure,
    AuthResult,
    NewToken,
    TokenAuthenticator,
    TokenRecord,
    hash_secret,
    mint_token,
    parse_duration,
    parse_token,
)
from proxy.state.memory import MemoryTokenStore

T0 = 1_700_000_000.0
TOKEN_RE = re.compile(r"egw_[a-z0-9]{12}_[A-Za-z0-9]{43}")


class FakeClock:
    """A clock that moves only when told to (seconds)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingStore(MemoryTokenStore):
    """MemoryTokenStore that counts lookups and can hold them at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def get(self, token_id: str) -> TokenRecord | None:
        self.gets += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return await super().get(token_id)


def mint(**overrides: object) -> NewToken:
    kwargs: dict[str, object] = {"name": "crm-sync", "scopes": ["contacts:read"], "now": T0}
    kwargs.update(overrides)
    return mint_token(**kwargs)  # type: ignore[arg-type]


async def stored(store: MemoryTokenStore, **overrides: object) -> NewToken:
    new = mint(**overrides)
    await store.put(new.record)
    return new


def test_all_is_pinned() -> None:
    assert sorted(proxy.auth.tokens.__all__) == sorted(
        [
            "DEFAULT_UPSTREAM_KEY",
            "AuthFailure",
            "AuthResult",
            "NewToken",
            "TokenAuthenticator",
            "TokenChanges",
            "TokenRecord",
            "TokenStore",
            "apply_changes",
            "hash_secret",
            "mint_token",
            "parse_duration",
            "parse_token",
        ]
    )


# --- format and minting -------------------------------------------------------------------


def test_minted_token_has_the_documented_format() -> None:
    new = mint(hourly=100, per_minute=10, weight=3, expires_in=3600, upstream_key="acme")
    assert TOKEN_RE.fullmatch(new.token)
    token_id, secret = new.token[4:16], new.token[17:]
    record = new.record
    assert record.id == token_id
    assert record.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert record.name == "crm-sync"
    assert record.scopes == ("contacts:read",)
    assert (record.hourly, record.per_minute, record.weight) == (100, 10, 3)
    assert record.upstream_key == "acme"
    assert record.created_at == T0
    assert record.expires_at == T0 + 3600
    assert record.revoked_at is None


def test_mint_defaults() -> None:
    record = mint().record
    assert record.upstream_key == DEFAULT_UPSTREAM_KEY == "default"
    assert (record.hourly, record.per_minute, record.weight) == (None, None, 1)
    assert record.expires_at is None


def test_minted_tokens_are_distinct() -> None:
    tokens = [mint() for _ in range(200)]
    assert len({t.token for t in tokens}) == 200
    assert len({t.record.id for t in tokens}) == 200


def test_scopes_are_deduplicated_in_order() -> None:
    record = mint(scopes=["tags:read", "contacts:*", "tags:read", "*"]).record
    assert record.scopes == ("tags:read", "contacts:*", "*")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": "crm sync"}, "name"),
        ({"name": "crm/sync"}, "name"),
        ({"name": "crm\nsync"}, "name"),
        ({"name": "sÿnc"}, "name"),
        ({"scopes": []}, "scopes"),
        ({"scopes": "contacts:read"}, "scopes"),
        ({"scopes": ["contacts read"]}, "scopes"),
        ({"scopes": [""]}, "scopes"),
        ({"upstream_key": ""}, "upstream_key"),
        ({"upstream_key": "a b"}, "upstream_key"),
        ({"weight": 0}, "weight"),
        ({"weight": 1001}, "weight"),
        ({"weight": 1.5}, "weight"),
        ({"weight": True}, "weight"),
        ({"hourly": 0}, "hourly"),
        ({"hourly": -5}, "hourly"),
        ({"hourly": 2.0}, "hourly"),
        ({"per_minute": 0}, "per_minute"),
        ({"expires_in": 0}, "expires_in"),
        ({"expires_in": -60}, "expires_in"),
        ({"expires_in": float("inf")}, "expires_in"),
        ({"expires_in": float("nan")}, "expires_in"),
        ({"expires_in": 1e12}, "expires_in"),
        ({"expires_in": True}, "expires_in"),
        ({"now": float("nan")}, "created_at"),
        ({"now": -1.0}, "created_at"),
    ],
)
def test_mint_rejects_bad_fields_naming_them(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        mint(**overrides)


def test_name_at_the_bounds_is_fine() -> None:
    assert mint(name="a").record.name == "a"
    assert mint(name="A.b_c-9" * 9 + "x").record.name == "A.b_c-9" * 9 + "x"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"id": "short"}, "id"),
        ({"id": "ABCDEFGHIJKL"}, "id"),
        ({"secret_hash": "0" * 63}, "secret_hash"),
        ({"secret_hash": "G" * 64}, "secret_hash"),
        ({"scopes": ["contacts:read"]}, "scopes"),
        ({"revoked_at": float("inf")}, "revoked_at"),
        ({"expires_at": "tomorrow"}, "expires_at"),
    ],
)
def test_record_validates_every_field(overrides: dict[str, object], field: str) -> None:
    base: dict[str, object] = {
        "id": "abcdefghij01",
        "name": "svc",
        "secret_hash": "0" * 64,
        "scopes": ("*",),
    }
    base.update(overrides)
    with pytest.raises(ValueError, match=rf"^{field}:"):
        TokenRecord(**base)  # type: ignore[arg-type]


# --- parsing ------------------------------------------------------------------------------

GOOD = "egw_abcdefghij01_" + "A" * 21 + "z" * 21 + "9"


def test_parse_accepts_a_well_formed_token() -> None:
    assert parse_token(GOOD) == ("abcdefghij01", "A" * 21 + "z" * 21 + "9")


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "egw_",
        "egw__",
        GOOD[:-1],
        GOOD + "A",
        "EGW" + GOOD[3:],
        "egx" + GOOD[3:],
        " " + GOOD[1:],
        GOOD[:-1] + "\n",
        GOOD[:-1] + "_",
        GOOD[:-1] + "-",
        GOOD[:-1] + "é",
        "egw_ABCDEFGHIJ01_" + GOOD[17:],
        "egw_abcdefghij0_1" + GOOD[17:],
        "egw_abcdefghij01-" + GOOD[17:],
        "egw_abcdefghij01_" + GOOD[17:-1] + "\x00",
        "Bearer " + GOOD,
        GOOD + GOOD,
        "egw_" + "a" * 10_000,
        "x" * 1_000_000,
    ],
)
def test_parse_refuses_malformed_tokens(raw: str) -> None:
    assert parse_token(raw) is None


def test_parse_refuses_non_strings_without_raising() -> None:
    assert parse_token(None) is None  # type: ignore[arg-type]
    assert parse_token(GOOD.encode()) is None  # type: ignore[arg-type]


@given(st.text(max_size=200))
def test_parse_never_raises(raw: str) -> None:
    result = parse_token(raw)
    assert result is None or f"egw_{result[0]}_{result[1]}" == raw


@given(
    name=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    scopes=st.lists(st.from_regex(r"[a-z:*]{1,20}", fullmatch=True), min_size=1, max_size=5),
)
def test_mint_then_parse_round_trips(name: str, scopes: list[str]) -> None:
    new = mint(name=name, scopes=scopes)
    parsed = parse_token(new.token)
    assert parsed is not None
    token_id, secret = parsed
    assert token_id == new.record.id
    assert hash_secret(secret) == new.record.secret_hash


@given(position=st.integers(min_value=0, max_value=59), char=st.sampled_from("_-+/=. é\t"))
def test_any_foreign_character_makes_a_token_malformed(position: int, char: str) -> None:
    raw = GOOD[:position] + char + GOOD[position + 1 :]
    if raw[position] == GOOD[position]:
        return  # replaced "_" by "_": still the same token
    assert parse_token(raw) is None


# --- hashing ------------------------------------------------------------------------------


def test_hash_secret_is_hex_sha256() -> None:
    assert hash_secret("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert hash_secret("abd") != hash_secret("abc")


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45.0),
        ("15m", 900.0),
        ("12h", 43200.0),
        ("30d", 2592000.0),
        ("2w", 1209600.0),
        ("3600", 3600.0),
        ("0", 0.0),
        ("1.5h", 5400.0),
        (" 30D ", 2592000.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "d", "30x", "-5m", "5 m", "1e3", "1h30m", "inf", "nan", "30days", ".5h", "9" * 400],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"^duration:"):
        parse_duration(text)


# --- record views -------------------------------------------------------------------------


def test_public_view_has_no_hash_and_iso_times() -> None:
    record = mint(expires_in=86400, hourly=5).record
    view = record.public_view(now=T0)
    assert "secret_hash" not in view
    assert record.secret_hash not in repr(view)
    assert view == {
        "id": record.id,
        "name": "crm-sync",
        "scopes": ["contacts:read"],
        "upstream_key": "default",
        "hourly": 5,
        "per_minute": None,
        "weight": 1,
        "created_at": "2023-11-14T22:13:20Z",
        "expires_at": "2023-11-15T22:13:20Z",
        "revoked_at": None,
        "status": "active",
    }
    assert datetime.fromisoformat(str(view["created_at"])) == datetime.fromtimestamp(T0, tz=UTC)


def test_status_and_is_active() -> None:
    record = mint(expires_in=60).record
    assert record.is_active(T0 + 59.999)
    assert record.public_view(now=T0 + 60)["status"] == "expired"
    assert not record.is_active(T0 + 60)
    revoked = dataclasses.replace(record, revoked_at=T0 + 1)
    assert revoked.public_view(now=T0 + 2)["status"] == "revoked"
    assert revoked.public_view(now=T0 + 120)["status"] == "revoked"
    assert not revoked.is_active(T0 + 2)


def test_repr_and_str_never_show_the_secret_or_its_hash() -> None:
    new = mint()
    secret = new.token[17:]
    for text in (repr(new), str(new), repr(new.record), str(new.record)):
        assert secret not in text
        assert new.token not in text
        assert new.record.secret_hash not in text
    assert new.record.id in repr(new.record)


# --- authenticator ------------------------------------------------------------------------


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
