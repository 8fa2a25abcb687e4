"""``echowin-gateway token migrate --from URL --to URL``: copy every token from one store
to another (typically from ``redis://`` or ``sqlite:///`` to ``postgresql://``).

Records are copied as they are (id, secret hash, scopes, quotas, times, revocation), so
callers keep their tokens. Running it again copies only what is new: a token already in
the destination with the same record is left alone; one the source has revoked since is
revoked there too; any other difference is a conflict, reported and left as it is (exit
status 1). Each token copied or revoked is written to the destination's audit log
(``token.migrate``). Passwords and the Redis key prefix come from ``--config``
(``redis.password``, ``redis.key_prefix``, ``postgres.password``), never from the URLs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from proxy.admin.audit import Actor, created_detail, record_operation
from proxy.auth.tokens import TokenRecord, TokenStore
from proxy.cli.common import cli_actor, fail, load, state_errors
from proxy.config import ConfigError, GatewayConfig, parse_config
from proxy.config.postgres_url import is_postgres_url, parse_postgres_url
from proxy.config.state_url import parse_redis_url, parse_state_url
from proxy.state import (
    open_token_store,
    postgres_options,
    redis_options,
    sentinel_password,
    state_password,
)
from proxy.state.sqlite.connection import StateFileError

if TYPE_CHECKING:
    from proxy.cli.common import Subparsers

__all__ = ["MigrationReport", "add_migrate_parser", "cmd_token_migrate", "migrate_tokens"]


@dataclass(slots=True)
class MigrationReport:
    """Token ids by what ``migrate_tokens`` did with them."""

    copied: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


async def migrate_tokens(
    source: TokenStore, dest: TokenStore, actor: Actor, origin: str
) -> MigrationReport:
    """Copy ``source``'s tokens into ``dest`` (rules in the module's text). ``origin``
    names the source in the audit entries (no password: ``describe_url``)."""
    report = MigrationReport()
    for record in await source.list():
        there = await dest.get(record.id)
        if there is None:
            try:
                await dest.put(record)
            except ValueError:  # put there since the get: another writer
                report.conflicts.append(record.id)
                continue
            report.copied.append(record.id)
            revoked_at = record.public_view()["revoked_at"]
            detail = {**created_detail(record), "from": origin, "revoked_at": revoked_at}
            await record_operation(dest, actor, "token.migrate", record.id, detail)
        elif there == record:
            report.present.append(record.id)
        elif _revoked_since(record, there):
            assert record.revoked_at is not None
            await dest.revoke(record.id, record.revoked_at)
            report.revoked.append(record.id)
            detail = {"from": origin, "revoked_at": record.public_view()["revoked_at"]}
            await record_operation(dest, actor, "token.revoke", record.id, detail)
        else:
            report.conflicts.append(record.id)
    return report


def _revoked_since(source: TokenRecord, dest: TokenRecord) -> bool:
    """The one difference the source may have gained after a copy: its revocation."""
    return source.revoked_at is not None and dest.revoked_at is None and _unrevoked(source) == dest


def _unrevoked(record: TokenRecord) -> TokenRecord:
    return replace(record, revoked_at=None)


def describe_url(url: str) -> str:
    """A store URL as messages and audit entries show it: never a password (refused in
    every URL anyway), PostgreSQL as ``postgresql://user@host:port/db``."""
    if is_postgres_url(url):
        return parse_postgres_url(url).describe()
    state = parse_state_url(url)
    if state.backend == "sqlite":
        return f"sqlite:///{state.path}"
    if state.backend == "redis":
        where = parse_redis_url(url)
        scheme = "rediss" if where.tls else "redis"
        return f"{scheme}://{where.host}:{where.port}/{where.db}"
    return state.backend + "://"


async def _open(url: str, config: GatewayConfig) -> TokenStore:
    """The store at ``url``, with ``config``'s passwords and key prefix."""
    if url.lower().startswith("memory:"):
        raise ValueError("memory:// keeps no tokens outside a running gateway")
    if is_postgres_url(url):
        ref = config.postgres.password
        password = None if ref is None else ref.resolve("postgres.password", os.environ).reveal()
        return await open_token_store(url, postgres_options=postgres_options(config, password))
    parse_state_url(url)  # ValueError (state: ...) before any password is read
    config = config.model_copy(update={"state": url})
    password = state_password(config, os.environ)
    options = redis_options(config, password, sentinel_password(config, os.environ))
    return await open_token_store(url, redis_options=options)


async def _run(args: argparse.Namespace, config: GatewayConfig) -> int:
    source = await _open(args.source, config)
    try:
        dest = await _open(args.dest, config)
        try:
            origin = describe_url(args.source)
            report = await migrate_tokens(source, dest, Actor(cli_actor()), origin)
        finally:
            await dest.close()
    finally:
        await source.close()
    print(
        f"copied {len(report.copied)}, revoked {len(report.revoked)},"
        f" already there {len(report.present)}, conflicting {len(report.conflicts)}"
        f" ({origin} -> {describe_url(args.dest)})"
    )
    for token_id in report.conflicts:
        print(f"conflict: {token_id} differs in the destination; left as it is")
    return 1 if report.conflicts else 0


def cmd_token_migrate(args: argparse.Namespace) -> int:
    try:
        config = load(args) if args.config else parse_config({})
        if args.source == args.dest:
            return fail(["--from and --to name the same store"])
        return asyncio.run(_run(args, config))
    except ConfigError as exc:
        return fail(exc.lines)
    except ValueError as exc:  # a URL refused: its message names the key, never a password
        return fail([str(exc)])
    except StateFileError as exc:  # a file or database that cannot be used: one line
        return fail([str(exc)], 1)
    except state_errors() as exc:
        return fail([f"token migrate: a token store failed: {type(exc).__name__}: {exc}"], 1)


def add_migrate_parser(tsub: Subparsers) -> None:
    migrate = tsub.add_parser(
        "migrate",
        help="copy every token from one store to another (e.g. redis:// to postgresql://)",
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="URL")
    migrate.add_argument("--to", dest="dest", required=True, metavar="URL")
    migrate.add_argument(
        "--config", help="read redis.password, redis.key_prefix and postgres.password from it"
    )
    migrate.set_defaults(func=cmd_token_migrate, state=None)
