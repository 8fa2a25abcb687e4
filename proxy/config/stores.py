"""The connection settings of the shared stores: ``redis:`` (with its ``tls:``) and
``postgres:``. Part of the config schema (proxy/config/schema.py)."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import BeforeValidator, field_validator, model_validator

from proxy.config.fields import Model as _Model
from proxy.config.fields import PositiveFloat, PositiveInt
from proxy.config.secrets import SecretRef

__all__ = ["PostgresConfig", "RedisConfig", "RedisTlsConfig"]


def _readable_file(value: str | None) -> str | None:
    if value is not None and not os.access(value, os.R_OK):
        raise ValueError(f"{value!r} is not a readable file")
    return value


ReadableFile = Annotated[str | None, BeforeValidator(_readable_file)]


class RedisTlsConfig(_Model):
    """TLS to Redis (``rediss://``, ``rediss-sentinel://``, ``rediss-cluster://``): the CA
    that signs the server's certificate (default: the system's), a client certificate and
    key (mutual TLS), the name the server's certificate must carry (default: the URL's
    host) and whether the name is checked at all."""

    ca_file: ReadableFile = None
    cert_file: ReadableFile = None
    key_file: ReadableFile = None
    server_name: str | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> RedisTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a certificate and its key)")
        return self


class RedisConfig(_Model):
    """Connection details for a Redis ``state`` (ignored by other backends)."""

    password: SecretRef | None = None
    username: str | None = None
    # The sentinels' own AUTH (their requirepass, or an ACL user), redis-sentinel:// only.
    sentinel_password: SecretRef | None = None
    sentinel_username: str | None = None
    key_prefix: str = "egw:"
    timeout_seconds: PositiveFloat = 0.5
    connect_timeout_seconds: PositiveFloat | None = None
    pool_size: PositiveInt = 100
    tls: RedisTlsConfig | None = None

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or len(value) > 64 or not value.isprintable() or " " in value:
            raise ValueError("must be 1-64 printable characters without spaces")
        if "{" in value or "}" in value:
            raise ValueError("must not hold { or } (the gateway adds its own hash tags)")
        return value

    @field_validator("username", "sentinel_username")
    @classmethod
    def _username(cls, value: str | None) -> str | None:
        if value is not None and (not value or not value.isprintable() or " " in value):
            raise ValueError("must be a non-empty ACL user name without spaces")
        return value


class PostgresConfig(_Model):
    """Connection details for ``token_store: postgresql://...`` (ignored otherwise)."""

    password: SecretRef | None = None
    # One connect, or one statement, seconds; slower counts as the store failing.
    timeout_seconds: PositiveFloat = 5.0
    # Connections each process keeps at most (token lookups that miss the cache, admin calls).
    pool_size: PositiveInt = 4
