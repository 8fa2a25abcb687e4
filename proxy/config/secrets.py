"""Secrets: never inline in the config; ``{env: NAME}`` or ``{file: PATH}``, read once by
:func:`resolve_secrets` into :class:`Secret` values whose repr never shows the value."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, model_validator

from proxy.auth.tokens import DEFAULT_UPSTREAM_KEY
from proxy.config.classes import check_key_classes
from proxy.config.errors import ConfigError
from proxy.config.keys_file import KEYS_FILE, parse_keys_file, read_entries
from proxy.config.state_url import REDIS_SCHEMES

if TYPE_CHECKING:
    from proxy.config.schema import GatewayConfig

__all__ = [
    "AGENCY_KEY_NAME",
    "Credential",
    "Secret",
    "SecretRef",
    "Secrets",
    "file_key_names",
    "resolve_secrets",
]

AGENCY_KEY_NAME = "agency"


class Secret:
    """A secret value that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_encoded", "_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self._encoded = value.encode()
        self.source = source  # e.g. "env:ECHOWIN_API_KEY": safe to show

    def reveal(self) -> str:
        """The secret itself: only for the one place that puts it on the wire."""
        return self._value

    def reveal_bytes(self) -> bytes:
        """The secret as bytes (UTF-8): only to look for it in what comes back."""
        return self._encoded

    def __repr__(self) -> str:
        return f"Secret(<{self.source}>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


class SecretRef(BaseModel):
    """Where a secret comes from: exactly one of ``env`` or ``file``."""

    # The schema's settings (proxy/config/schema.py's _Model): unknown keys refused, frozen.
    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("must be {env: NAME} or {file: PATH}, exactly one")
        return self

    def resolve(self, key: str, environ: Mapping[str, str]) -> Secret:
        """Read the secret; raises ConfigError naming ``key`` and the variable or file.

        The variable's name or the file's path is shown (in errors, and as the Secret's
        source) only when it looks like one: a key pasted where the name goes must not be
        echoed back."""
        value, source = self.read(key, environ)
        return Secret(value, source)

    def read(self, key: str, environ: Mapping[str, str]) -> tuple[str, str]:
        """The text (stripped, not empty) and where it came from, safe to show (see
        ``resolve``); ConfigError naming ``key`` when it cannot be read."""
        if self.env is not None:
            env = self.env if _ENV_NAME.fullmatch(self.env) else f"named at {key}.env"
            value = environ.get(self.env, "")
            if not value.strip():
                raise ConfigError([f"{key}: environment variable {env} is not set or empty"])
            return value.strip(), f"env:{env}"
        assert self.file is not None
        file = self.file if "/" in self.file else f"named at {key}.file"
        try:
            value = Path(self.file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError([f"{key}: cannot read secret file {file}: {reason}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{key}: secret file {file} is not UTF-8 text"]) from None
        if not value:
            raise ConfigError([f"{key}: secret file {file} is empty"])
        return value, f"file:{file}"


# An environment variable's name as people write them (upper case, digits, underscores).
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class Credential:
    """One upstream echowin credential; each has its own budget."""

    name: str  # "default", "agency", an extra_keys or keys_file name: safe to show
    header: str  # "X-API-Key" or "X-AGENCY-KEY"
    secret: Secret
    # Its own budget windows (requests, per_seconds), from upstream.keys_file; None:
    # upstream.limits.
    limits: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True, slots=True)
class Secrets:
    credentials: Mapping[str, Credential]
    admin_token: Secret | None
    state_password: Secret | None = None
    # redis.sentinel_password, read when the state is in Redis behind sentinels.
    sentinel_password: Secret | None = None
    # postgres.password, read when token_store is a postgresql:// URL.
    token_store_password: Secret | None = None
    # tracing.headers, read when tracing is on: sent with every span export.
    tracing_headers: Mapping[str, Secret] = field(default_factory=dict)

    def team_key_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.credentials if n != AGENCY_KEY_NAME)


def _optional(
    ref: SecretRef | None, key: str, env: Mapping[str, str], errors: list[str]
) -> Secret | None:
    """The secret ``ref`` names (None without one); a missing one adds its line to
    ``errors``."""
    if ref is None:
        return None
    try:
        return ref.resolve(key, env)
    except ConfigError as exc:
        errors.extend(exc.lines)
        return None


def resolve_secrets(config: GatewayConfig, environ: Mapping[str, str] | None = None) -> Secrets:
    """Read every secret the config names; ConfigError lists each one that is missing."""
    env = os.environ if environ is None else environ
    up = config.upstream
    wanted: list[tuple[str, str, str, SecretRef]] = [
        (DEFAULT_UPSTREAM_KEY, "X-API-Key", "upstream.api_key", up.api_key)
    ]
    if up.agency_key is not None:
        wanted.append((AGENCY_KEY_NAME, "X-AGENCY-KEY", "upstream.agency_key", up.agency_key))
    for name, ref in up.extra_keys.items():
        wanted.append((name, "X-API-Key", f"upstream.extra_keys.{name}", ref))
    errors: list[str] = []
    credentials: dict[str, Credential] = {}
    for name, header, key, ref in wanted:
        try:
            credentials[name] = Credential(name, header, ref.resolve(key, env))
        except ConfigError as exc:
            errors.extend(exc.lines)
    if up.keys_file is not None:
        try:
            credentials.update(_file_credentials(config, credentials, env))
        except ConfigError as exc:
            errors.extend(exc.lines)
    admin: Secret | None = None
    if config.admin_token is not None:
        try:
            admin = config.admin_token.resolve("admin_token", env)
        except ConfigError:
            admin = None  # the admin API stays closed; the gateway itself still runs
    redis_state = config.state.partition("://")[0].lower() in REDIS_SCHEMES
    redis, pg = config.redis, config.postgres
    password = _optional(redis.password if redis_state else None, "redis.password", env, errors)
    sentinel = redis.sentinel_password if redis_state else None
    sentinel_pw = _optional(sentinel, "redis.sentinel_password", env, errors)
    pg_ref = pg.password if config.token_store is not None else None
    pg_password = _optional(pg_ref, "postgres.password", env, errors)
    tracing: dict[str, Secret] = {}
    if config.tracing is not None and config.tracing.enabled:
        for name, ref in config.tracing.headers.items():
            try:
                tracing[name] = ref.resolve(f"tracing.headers.{name}", env)
            except ConfigError as exc:
                errors.extend(exc.lines)
    if errors:
        raise ConfigError(errors)
    return Secrets(
        credentials=credentials,
        admin_token=admin,
        state_password=password,
        sentinel_password=sentinel_pw,
        token_store_password=pg_password,
        tracing_headers=tracing,
    )


def _file_credentials(
    config: GatewayConfig, configured: Mapping[str, Credential], environ: Mapping[str, str]
) -> dict[str, Credential]:
    """The credentials of ``upstream.keys_file``. A name the config names already, or a
    key that another name holds (two budgets for one echowin key would let twice its
    limit through), is refused: by name, never by key; so are a key's own limits that the
    classes' reservations do not fit."""
    ref = config.upstream.keys_file
    assert ref is not None
    text, source = ref.read(KEYS_FILE, environ)
    holders = {c.secret.reveal(): c.name for c in configured.values() if c.name != AGENCY_KEY_NAME}
    entries, errors = read_entries(text)
    out: dict[str, Credential] = {}
    for entry in entries:
        if entry.name in configured:
            errors.append(f"{KEYS_FILE}.{entry.name}: also named by the config (extra_keys)")
            continue
        other = holders.setdefault(entry.key, entry.name)
        if other != entry.name:
            errors.append(f"{KEYS_FILE}.{entry.name}: the same key as {other!r}")
            continue
        if entry.limits is not None and config.classes:
            where = f"{KEYS_FILE}.{entry.name}.limits"
            errors += check_key_classes(config, where, entry.limits)
        secret = Secret(entry.key, f"{source}#{entry.name}")
        out[entry.name] = Credential(entry.name, "X-API-Key", secret, entry.limits)
    if errors:
        raise ConfigError(errors)
    return out


def file_key_names(ref: SecretRef, environ: Mapping[str, str]) -> list[str]:
    """The names of ``upstream.keys_file``'s keys (ConfigError if it cannot be read)."""
    text, _ = ref.read(KEYS_FILE, environ)
    return [entry.name for entry in parse_keys_file(text)]
