"""Token operations shared by the CLI and the admin API: validate, mint, store."""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from proxy.auth.routes import RouteTable, is_valid_scope
from proxy.auth.scopes import known_scopes
from proxy.auth.tokens import (
    DEFAULT_UPSTREAM_KEY,
    NewToken,
    TokenChanges,
    TokenRecord,
    TokenStore,
    mint_token,
    parse_duration,
)
from proxy.config import AGENCY_KEY_NAME, ConfigError, GatewayConfig, file_key_names
from proxy.state import (
    open_token_store,
    postgres_options,
    redis_options,
    sentinel_password,
    state_password,
)


class NameTaken(ValueError):
    """An active token already has the name asked for (the admin API answers 409)."""


def check_scopes(scopes: Iterable[str], routes: RouteTable) -> None:
    """ValueError naming the first scope that is not one of the known ones, with the close
    ones (or all of them) in the message; one holding a separator is told to repeat
    ``--scope`` instead."""
    known = known_scopes(routes.routes)
    for scope in scopes:
        if is_valid_scope(scope, routes.routes):
            continue
        parts = scope.replace(",", " ").split()
        if len(parts) > 1:
            each = " ".join(f"--scope {part}" for part in parts)
            raise ValueError(
                f"scopes: {scope!r} holds several scopes: give each on its own ({each},"
                ' or a JSON list ["a", "b"])'
            )
        close = difflib.get_close_matches(scope, sorted(known), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(
            f"scopes: unknown scope {scope!r}; {hint}known: {', '.join(sorted(known))}"
        )


@runtime_checkable
class UniqueNames(Protocol):
    """A token store that stores a token only if no active one has its name, in one
    atomic step (SQLite's, PostgreSQL's and Redis': replicas and the CLI may create tokens
    at once)."""

    async def put_unique_name(self, record: TokenRecord, now: float) -> str | None: ...


def _name_taken(name: str, holder: str) -> NameTaken:
    return NameTaken(
        f"name: an active token is already called {name!r} (id {holder}); pick"
        " another name, or revoke that token first"
    )


async def check_name_free(store: TokenStore, name: str, now: float) -> None:
    """NameTaken when an active token is called ``name``: metrics and logs label by name,
    so two active tokens of one name would be counted as one service. A revoked or
    expired token's name may be taken again (its new owner is told apart by the id)."""
    for record in await store.by_name(name):  # indexed: not every token there is
        if record.status(now) == "active":
            raise _name_taken(name, record.id)


async def open_store(config: GatewayConfig) -> TokenStore:
    """The token store ``config`` names (``token_store``, else ``state``), for the CLI
    (reads ``postgres.password`` or ``redis.password`` if needed)."""
    if config.token_store is not None:
        ref = config.postgres.password
        password = None if ref is None else ref.resolve("postgres.password", os.environ).reveal()
        options = postgres_options(config, password)
        return await open_token_store(config.token_store, postgres_options=options)
    password = state_password(config, os.environ)
    redis = redis_options(config, password, sentinel_password(config, os.environ))
    return await open_token_store(config.state, redis_options=redis)


def upstream_key_names(config: GatewayConfig) -> tuple[str, ...]:
    """The team keys a token may be bound to (the agency key is per route, not per token):
    those the config names, and those of ``upstream.keys_file`` (read for their names; a
    file that cannot be read is the ValueError of its ConfigError)."""
    names = (DEFAULT_UPSTREAM_KEY, *config.upstream.extra_keys)
    if config.upstream.keys_file is None:
        return names
    try:
        return names + tuple(file_key_names(config.upstream.keys_file, os.environ))
    except ConfigError as exc:
        raise ValueError("; ".join(exc.lines)) from None


def _known(names: Sequence[str]) -> str:
    """The names for an error line: the first ten of many."""
    shown = ", ".join(names[:10])
    return shown if len(names) <= 10 else f"{shown} and {len(names) - 10} more"


async def create_token(
    store: TokenStore,
    config: GatewayConfig,
    routes: RouteTable,
    *,
    name: str,
    scopes: Sequence[str],
    upstream_key: str = DEFAULT_UPSTREAM_KEY,
    hourly: int | None = None,
    per_minute: int | None = None,
    weight: int = 1,
    expires_in: str | float | None = None,
    now: float | None = None,
    key_names: Sequence[str] | None = None,
    service_class: str | None = None,
) -> NewToken:
    """Validate every field (ValueError naming it), mint a token and store its hash.
    ``key_names``: the team keys a token may be bound to, when known (a running gateway's);
    by default read from ``config`` (see upstream_key_names)."""
    if not scopes:
        raise ValueError("scopes: at least one scope is required")
    check_scopes(scopes, routes)
    if upstream_key == AGENCY_KEY_NAME:
        raise ValueError("upstream_key: agency routes always use the agency key; bind a team key")
    names = upstream_key_names(config) if key_names is None else tuple(key_names)
    if upstream_key not in names:
        known = _known(names)
        raise ValueError(f"upstream_key: {upstream_key!r} is not configured (known: {known})")
    for field_name, value in (("hourly", hourly), ("per_minute", per_minute)):
        if value is not None and (isinstance(value, bool) or value <= 0):
            raise ValueError(f"{field_name}: must be a positive integer, got {value!r}")
    check_class(config, service_class)
    seconds = None if expires_in is None else _expires_in_seconds(expires_in, "")
    now = time.time() if now is None else now
    if not isinstance(store, UniqueNames):  # else checked as it is stored
        await check_name_free(store, name, now)
    new = mint_token(
        name=name,
        scopes=list(scopes),
        now=now,
        upstream_key=upstream_key,
        hourly=hourly,
        per_minute=per_minute,
        weight=weight,
        expires_in=seconds,
        service_class=service_class,
    )
    if isinstance(store, UniqueNames):
        holder = await store.put_unique_name(new.record, now)
        if holder is not None:
            raise _name_taken(name, holder)
    else:
        await store.put(new.record)
    return new


UPDATABLE = ("hourly", "per_minute", "weight", "scopes", "expires_in", "class")


def token_view(record: TokenRecord, config: GatewayConfig) -> dict[str, object]:
    """``record.public_view()`` with ``class`` the token's effective class: its own, else
    ``default_class`` (null when no classes are configured)."""
    view = record.public_view()
    view["class"] = record.service_class or config.default_class
    return view


def check_class(config: GatewayConfig, service_class: object) -> None:
    """ValueError naming ``class`` unless it is None or a configured class."""
    if service_class is None:
        return
    if not isinstance(service_class, str):
        raise ValueError(f"class: must be a class name or null, got {service_class!r}")
    if service_class not in config.classes:
        known = ", ".join(config.classes) or "none configured"
        raise ValueError(f"class: {service_class!r} is not a configured class (known: {known})")


def token_changes(
    data: dict[str, object],
    routes: RouteTable,
    *,
    now: float | None = None,
    config: GatewayConfig | None = None,
) -> TokenChanges:
    """Validate an update (JSON fields of ``UPDATABLE``; null clears a quota or the expiry)
    into TokenChanges. ValueError names the first bad field."""
    unknown = set(data) - set(UPDATABLE)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if not data:
        raise ValueError("nothing to change: give one of " + ", ".join(UPDATABLE))
    changes: TokenChanges = {}
    for key in ("hourly", "per_minute"):
        if key in data:
            value = data[key]
            if value is not None and (type(value) is not int or value <= 0):
                raise ValueError(f"{key}: must be a positive integer or null, got {value!r}")
            changes[key] = value
    if "weight" in data:
        weight = data["weight"]
        if type(weight) is not int or weight <= 0:
            raise ValueError(f"weight: must be a positive integer, got {weight!r}")
        changes["weight"] = weight
    if "scopes" in data:
        scopes = data["scopes"]
        if not (isinstance(scopes, list) and scopes and all(isinstance(x, str) for x in scopes)):
            raise ValueError("scopes: must be a non-empty list of strings")
        check_scopes(scopes, routes)
        changes["scopes"] = tuple(scopes)
    if "expires_in" in data:
        changes["expires_at"] = _expires_at(data["expires_in"], now)
    if "class" in data:
        value = data["class"]
        if value is not None and not isinstance(value, str):
            raise ValueError(f"class: must be a class name or null, got {value!r}")
        if config is not None:
            check_class(config, value)
        changes["service_class"] = value
    return changes


def _expires_at(value: object, now: float | None) -> float | None:
    if value is None:
        return None
    return (time.time() if now is None else now) + _expires_in_seconds(value, ", or null")


def _expires_in_seconds(value: object, also: str) -> float:
    """``expires_in`` in seconds: a duration like ``30d`` or a number of seconds (not a
    bool), positive; ValueError naming the field otherwise (``also``: other values the
    caller takes, for the message)."""
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:  # parse_duration's message starts "duration:"
            raise ValueError("expires_in: " + str(exc).removeprefix("duration: ")) from None
    elif type(value) in (int, float):
        seconds = float(value)  # type: ignore[arg-type]
    else:
        raise ValueError(f"expires_in: must be a duration like 30d{also}, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"expires_in: must be positive, got {value!r}")
    return seconds
