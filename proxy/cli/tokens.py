"""``echowin-gateway token create|list|revoke``: on the token store the config names
(``--config``), or through a running gateway's admin API (``--admin-url``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from proxy.admin.tokenops import create_token, open_store, token_view
from proxy.auth.tokens import TokenStore
from proxy.cli.admin_client import AdminClient
from proxy.cli.common import admin_call, fail, load
from proxy.config import GatewayConfig
from proxy.state.sqlite.connection import StateFileError

if TYPE_CHECKING:
    from proxy.cli.common import Subparsers

__all__ = ["add_token_parser", "cmd_token_create", "cmd_token_list", "cmd_token_revoke"]


def _state_errors() -> tuple[type[Exception], ...]:
    """What the token store raises when its state cannot answer (Redis' errors once
    redis-py is loaded: it is imported only for a redis:// state)."""
    errors: list[type[Exception]] = [StateFileError, sqlite3.Error]
    redis_exceptions = sys.modules.get("redis.exceptions")
    if redis_exceptions is not None:
        errors.append(redis_exceptions.RedisError)
    return tuple(errors)


async def _with_store(
    config: GatewayConfig, fn: Callable[[TokenStore], Coroutine[Any, Any, int]]
) -> int:
    """``fn`` on the config's token store; 1 and one error line when the state fails, 2
    for ``memory://``: a token kept in this process's memory would reach no gateway."""
    if config.state.lower().startswith("memory:"):
        return fail(
            [
                "state: memory:// keeps tokens inside the running gateway; use --admin-url"
                " (its admin API) or a sqlite:/// or redis:// state"
            ]
        )
    try:
        store = await open_store(config)
        try:
            return await fn(store)
        finally:
            await store.close()
    except _state_errors() as exc:
        if isinstance(exc, StateFileError):
            return fail([str(exc)], code=1)
        # sqlite's and Redis' texts name no secret (the URL's password is refused).
        return fail([f"state: the token store failed: {type(exc).__name__}: {exc}"], code=1)


def _print_created(view: dict[str, Any], token: str) -> None:
    scopes = " ".join(view["scopes"])
    print(f"created token {view['id']} for {view['name']}; scopes: {scopes}")
    print("it is shown once; store it now:")
    print(token)


def _token_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"name": args.name, "scopes": args.scope, "weight": args.weight}
    body["upstream_key"] = args.upstream_key
    if args.service_class is not None:
        body["class"] = args.service_class
    for key in ("hourly", "per_minute", "expires_in"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    return body


def cmd_token_create(args: argparse.Namespace) -> int:
    if args.admin_url:

        async def remote(client: AdminClient) -> int:
            created = await client.create(_token_body(args))
            _print_created(created, created["token"])
            return 0

        return admin_call(args, remote)
    config = load(args)

    async def run(store: TokenStore) -> int:
        try:
            body = _token_body(args)
            body["service_class"] = body.pop("class", None)
            new = await create_token(store, config, config.route_table(), **body)
        except ValueError as exc:
            return fail([str(exc)])
        _print_created(new.record.public_view(), new.token)
        return 0

    return asyncio.run(_with_store(config, run))


def _print_tokens(views: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(views, indent=2))
        return
    rows = [("ID", "NAME", "STATUS", "KEY", "CLASS", "SCOPES")]
    rows += [
        (
            v["id"],
            v["name"],
            v["status"],
            v["upstream_key"],
            v.get("class") or "-",
            " ".join(v["scopes"]),
        )
        for v in views
    ]
    # Each column as wide as its longest value (names and keys run to 64 characters).
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(5)]
    for row in rows:
        print("".join(row[i].ljust(widths[i]) for i in range(5)) + row[5])


def cmd_token_list(args: argparse.Namespace) -> int:
    if args.admin_url:

        async def remote(client: AdminClient) -> int:
            _print_tokens(await client.list(), args.json)
            return 0

        return admin_call(args, remote)
    config = load(args)

    async def run(store: TokenStore) -> int:
        views = [token_view(r, config) for r in await store.list()]
        _print_tokens(views, args.json)
        return 0

    return asyncio.run(_with_store(config, run))


def cmd_token_revoke(args: argparse.Namespace) -> int:
    if args.admin_url:

        async def remote(client: AdminClient) -> int:
            view = await client.revoke(args.token_id)
            print(f"revoked {view['id']} ({view['name']})")
            return 0

        return admin_call(args, remote)
    config = load(args)

    async def run(store: TokenStore) -> int:
        record = await store.revoke(args.token_id, time.time())
        if record is None:
            return fail([f"no token with id {args.token_id}"], code=1)
        print(f"revoked {record.id} ({record.name})")
        return 0

    return asyncio.run(_with_store(config, run))


def add_token_parser(sub: Subparsers) -> None:
    """``token create|list|revoke``, each with ``--config`` or ``--admin-url``."""
    token = sub.add_parser("token", help="create, list or revoke internal tokens")
    tsub = token.add_subparsers(dest="token_command", required=True)
    create = tsub.add_parser("create", help="create a token; printed once, as the last line")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", action="append", required=True)
    create.add_argument("--hourly", type=int)
    create.add_argument("--per-minute", type=int)
    create.add_argument("--weight", type=int, default=1)
    create.add_argument("--expires-in", help="e.g. 30d, 12h, 90m")
    create.add_argument("--upstream-key", default="default")
    create.add_argument(
        "--class", dest="service_class", help="its class of service (default: default_class)"
    )
    create.set_defaults(func=cmd_token_create)
    lst = tsub.add_parser("list", help="list tokens (never their secrets)")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_token_list)
    revoke = tsub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=cmd_token_revoke)
    for sp in (create, lst, revoke):
        where = sp.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", help="work on the token store the config names")
        where.add_argument(
            "--admin-url",
            help="work through a running gateway's admin API (token from $GATEWAY_ADMIN_TOKEN)",
        )
        sp.add_argument("--state", help="override the config's state URL")
