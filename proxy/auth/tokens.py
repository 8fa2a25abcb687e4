"""Internal tokens: format, hashing, the stored record and the store Protocol (pure).

A token reads ``egw_<public id>_<secret>``. The public id (12 chars of ``[a-z0-9]``) names the
token in logs, metrics and the admin view; the secret (43 base62 chars, about 256 bits) is shown
once at creation and never stored: the store keeps only its SHA-256. A plain hash is enough
because the secret is uniformly random and long; salting or stretching protects low-entropy
passwords, not this.

Nothing here does I/O or imports asyncio or aiohttp: time comes in as ``now`` arguments
(Unix seconds). The authenticator and its cache are in ``proxy.auth.authenticator``.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import math
import re
import secrets
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypedDict, Unpack, runtime_checkable

__all__ = [
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

DEFAULT_UPSTREAM_KEY = "default"
"""The name under which ``upstream.api_key`` is known; other team keys use their config name."""

TOKEN_PREFIX = "egw_"  # noqa: S105 - a fixed prefix, not a secret
ID_LENGTH = 12
SECRET_LENGTH = 43  # 43 * log2(62) = 256.03 bits
TOKEN_LENGTH = len(TOKEN_PREFIX) + ID_LENGTH + 1 + SECRET_LENGTH
MAX_WEIGHT = 1000
MAX_QUOTA = 2**53 - 1  # requests; fits every store's integers (SQLite: 64 bits) and JSON's
MAX_EXPIRES_IN = 100 * 365 * 86400.0  # seconds; keeps expires_at representable as a date
MAX_TIMESTAMP = 253402300799.0  # 9999-12-31T23:59:59Z, the last instant ISO 8601 can show here

_ID_ALPHABET = string.ascii_lowercase + string.digits
# No "_" in the secret alphabet, so splitting a token on "_" is unambiguous.
_SECRET_ALPHABET = string.ascii_letters + string.digits
_TOKEN_RE = re.compile(
    rf"{re.escape(TOKEN_PREFIX)}([a-z0-9]{{{ID_LENGTH}}})_([A-Za-z0-9]{{{SECRET_LENGTH}}})"
)
_ID_RE = re.compile(rf"[a-z0-9]{{{ID_LENGTH}}}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SCOPE_RE = re.compile(r"[A-Za-z0-9:*._-]{1,64}")
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw]?)")  # ASCII digits only
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def _check_quota(field_name: str, value: int | None) -> None:
    if value is not None and (type(value) is not int or not 1 <= value <= MAX_QUOTA):
        raise ValueError(
            f"{field_name}: must be a whole number in [1, {MAX_QUOTA}] or unset, got {value!r}"
        )


def _check_time(field_name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field_name}: must be Unix seconds, got {type(value).__name__}")
    if not (math.isfinite(value) and 0.0 <= value <= MAX_TIMESTAMP):
        raise ValueError(f"{field_name}: must be Unix seconds in [0, {MAX_TIMESTAMP:.0f}]")


def _normalize_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    """Scopes as a tuple without duplicates, first occurrence kept; a bare string is refused."""
    if isinstance(scopes, str):
        raise ValueError("scopes: must be a list of scope names, not a single string")
    return tuple(dict.fromkeys(scopes))


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What the store keeps about one token. Validated on construction (ValueError names the field).

    Times are Unix seconds. ``hourly``/``per_minute`` are the token's own quotas in requests per
    hour/minute (None: no own quota, only the shared upstream budget applies). ``weight`` (>= 1)
    is the token's share in the round-robin for the shared budget. A set ``revoked_at`` means
    revoked, whatever its value.
    """

    id: str
    name: str
    secret_hash: str = field(repr=False)
    scopes: tuple[str, ...]
    upstream_key: str = DEFAULT_UPSTREAM_KEY
    hourly: int | None = None
    per_minute: int | None = None
    weight: int = 1
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    # The class of service (SPEC §5 "Classes of service"); None: the config's default_class,
    # so records stored before classes existed keep working.
    service_class: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.id, str) and _ID_RE.fullmatch(self.id)):
            raise ValueError(f"id: must be {ID_LENGTH} characters of [a-z0-9]")
        if not (isinstance(self.name, str) and _NAME_RE.fullmatch(self.name)):
            raise ValueError("name: must be 1-64 characters of [A-Za-z0-9._-]")
        if not (isinstance(self.secret_hash, str) and _HASH_RE.fullmatch(self.secret_hash)):
            raise ValueError("secret_hash: must be 64 lowercase hex digits")
        if not isinstance(self.scopes, tuple) or not self.scopes:
            raise ValueError("scopes: must be a non-empty tuple of scope names")
        for scope in self.scopes:
            if not (isinstance(scope, str) and _SCOPE_RE.fullmatch(scope)):
                raise ValueError(f"scopes: {scope!r} is not 1-64 characters of [A-Za-z0-9:*._-]")
        if not (isinstance(self.upstream_key, str) and _NAME_RE.fullmatch(self.upstream_key)):
            raise ValueError("upstream_key: must be 1-64 characters of [A-Za-z0-9._-]")
        _check_quota("hourly", self.hourly)
        _check_quota("per_minute", self.per_minute)
        if type(self.weight) is not int or not 1 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"weight: must be a whole number in [1, {MAX_WEIGHT}]")
        _check_time("created_at", self.created_at)
        _check_time("expires_at", self.expires_at)
        _check_time("revoked_at", self.revoked_at)
        if self.service_class is not None and not (
            isinstance(self.service_class, str) and _NAME_RE.fullmatch(self.service_class)
        ):
            raise ValueError("class: must be 1-64 characters of [A-Za-z0-9._-]")

    def is_active(self, now: float) -> bool:
        """True when neither revoked nor expired at ``now`` (Unix seconds)."""
        return self.status(now) == "active"

    def status(self, now: float) -> str:
        """``"revoked"`` (wins), ``"expired"`` (from ``expires_at`` on) or ``"active"``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def public_view(self, now: float | None = None) -> dict[str, object]:
        """JSON-able view for the admin API and CLI: no ``secret_hash``; times in ISO 8601 UTC.

        ``status`` is computed at ``now`` (Unix seconds; default: the wall clock).
        """
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "upstream_key": self.upstream_key,
            "hourly": self.hourly,
            "per_minute": self.per_minute,
            "weight": self.weight,
            "class": self.service_class,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "status": self.status(time.time() if now is None else now),
        }


@dataclass(frozen=True, slots=True)
class NewToken:
    """A freshly minted token: ``token`` is the only copy of the secret; show it once."""

    token: str = field(repr=False)
    record: TokenRecord


def hash_secret(secret: str) -> str:
    """Lowercase hex SHA-256 of the secret part of a token."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def mint_token(
    *,
    name: str,
    scopes: Sequence[str],
    now: float,
    upstream_key: str = DEFAULT_UPSTREAM_KEY,
    hourly: int | None = None,
    per_minute: int | None = None,
    weight: int = 1,
    expires_in: float | None = None,
    service_class: str | None = None,
) -> NewToken:
    """Make a new random token created at ``now`` (Unix seconds), expiring ``expires_in`` seconds
    later (None: never). Does not store it. ValueError names the offending field.

    The 12-char id has about 62 bits; a clash is astronomically unlikely, and ``TokenStore.put``
    refuses one anyway.
    """
    if expires_in is not None and (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
        or not 0.0 < expires_in <= MAX_EXPIRES_IN
    ):
        raise ValueError(f"expires_in: must be seconds in (0, {MAX_EXPIRES_IN:.0f}]")
    token_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))
    record = TokenRecord(
        id=token_id,
        name=name,
        secret_hash=hash_secret(secret),
        scopes=_normalize_scopes(scopes),
        upstream_key=upstream_key,
        hourly=hourly,
        per_minute=per_minute,
        weight=weight,
        created_at=now,
        expires_at=None if expires_in is None else now + expires_in,
        service_class=service_class,
    )
    return NewToken(token=f"{TOKEN_PREFIX}{token_id}_{secret}", record=record)


def parse_token(raw: str) -> tuple[str, str] | None:
    """``(public_id, secret)`` of a well-formed token, else None. Never raises; the length is
    checked before any regex work, so oversized input costs nothing."""
    if not isinstance(raw, str) or len(raw) != TOKEN_LENGTH:
        return None
    match = _TOKEN_RE.fullmatch(raw)
    if match is None:
        return None
    return match.group(1), match.group(2)


def parse_duration(text: str) -> float:
    """Seconds in ``"45s"``, ``"15m"``, ``"12h"``, ``"30d"``, ``"2w"`` or plain ``"3600"``.

    Decimals (``"1.5h"``) are fine; negative, empty or unknown units raise ValueError.
    """
    match = _DURATION_RE.fullmatch(text.strip().lower()) if len(text) <= 32 else None
    if match is None:
        raise ValueError(f"duration: {text[:32]!r} is not like 45s, 15m, 12h, 30d, 2w or 3600")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"duration: {text!r} is too large")
    return seconds


class TokenChanges(TypedDict, total=False):
    """Fields ``TokenStore.update`` may change; None clears a quota or the expiry."""

    hourly: int | None
    per_minute: int | None
    weight: int
    scopes: tuple[str, ...]
    expires_at: float | None
    service_class: str | None


_CHANGEABLE = frozenset(TokenChanges.__annotations__)


def apply_changes(record: TokenRecord, changes: TokenChanges) -> TokenRecord:
    """``record`` with ``changes`` applied and re-validated (ValueError names the field).

    Shared by every store backend so they agree on what an update may touch.
    """
    unknown = set(changes) - _CHANGEABLE
    if unknown:
        raise ValueError(f"update: cannot change {', '.join(sorted(unknown))}")
    if "scopes" in changes:
        changes = {**changes, "scopes": _normalize_scopes(changes["scopes"])}
    return dataclasses.replace(record, **changes)


class TokenStore(Protocol):
    """Where token records live. Backends: ``proxy.state`` (memory, sqlite, redis,
    postgresql), picked by URL.

    Every method is atomic on its own. Implementations must pass tests/state/test_token_store.py.
    """

    async def put(self, record: TokenRecord) -> None:
        """Insert ``record``; ValueError if its id already exists."""

    async def get(self, token_id: str) -> TokenRecord | None:
        """The record with this public id, or None."""

    async def list(self) -> builtins.list[TokenRecord]:
        """Every record, revoked and expired ones included, ordered by ``created_at`` then id."""

    async def by_name(self, name: str) -> builtins.list[TokenRecord]:
        """The records called ``name``, revoked and expired ones included, ordered as ``list``.
        Indexed: its cost follows the tokens of that name, not all the tokens there are."""

    async def revoke(self, token_id: str, now: float) -> TokenRecord | None:
        """Set ``revoked_at = now`` unless already set (the first revocation time is kept).

        Returns the record as stored afterwards, or None for an unknown id.
        """

    async def update(self, token_id: str, **changes: Unpack[TokenChanges]) -> TokenRecord | None:
        """Apply ``changes`` (see ``apply_changes``) and return the new record; None if unknown."""

    async def ping(self) -> None:
        """Return if the backend answers, raise otherwise (also once closed). Used by /readyz."""

    async def close(self) -> None:
        """Release the backend; idempotent."""


@runtime_checkable
class TokenFeed(Protocol):
    """A token store that tells of changes made by any process (PostgreSQL's NOTIFY), so a
    cache in front of it can drop a token at once instead of after its TTL."""

    def follow(
        self, on_change: Callable[[str], None], on_health: Callable[[bool], None] | None = None
    ) -> None:
        """Call ``on_change(token_id)`` for each token created, changed or revoked anywhere,
        until the store is closed; ``on_health(up)`` as the store's connection comes and
        goes (False: changes may go unheard, the cache's TTL bounds them)."""
