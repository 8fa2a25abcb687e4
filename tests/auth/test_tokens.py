"""Unit tests for proxy.auth.tokens: format, hashing, records, durations.

No sockets and no sleeping: time is passed in as ``now``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

import proxy.auth.authenticator
import proxy.auth.tokens
from proxy.auth.tokens import (
    DEFAULT_UPSTREAM_KEY,
    TokenRecord,
    hash_secret,
    parse_duration,
    parse_token,
)
from tests.auth.conftest import GOOD, T0, TOKEN_RE, mint


def test_all_is_pinned() -> None:
    assert sorted(proxy.auth.tokens.__all__) == sorted(
        [
            "DEFAULT_UPSTREAM_KEY",
            "NewToken",
            "TokenChanges",
            "TokenFeed",
            "TokenRecord",
            "TokenStore",
            "apply_changes",
            "hash_secret",
            "mint_token",
            "parse_duration",
            "parse_token",
        ]
    )


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


def test_hash_secret_is_hex_sha256() -> None:
    assert hash_secret("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert hash_secret("abd") != hash_secret("abc")


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
        "class": None,
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
