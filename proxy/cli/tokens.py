"""``echowin-gateway token create|list|revoke|audit``: on the token store the config names
(``--config``: ``token_store``, else ``state``), or through a running gateway's admin API
(``--admin-url``). Changes made here are written to the store's audit log as ``cli:USER``."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.admin.audit import Actor, created_detail, record_operation
from proxy.admin.tokenops import create_token, open_store, token_view
from proxy.auth.audit import MAX_AUDIT_PAGE, AuditLog
from proxy.auth.routes import DEFAULT_ROUTES
from proxy.auth.scopes import known_scopes
from proxy.auth.tokens import TokenStore
from proxy.cli.admin_client import AdminClient
from proxy.cli.common import admin_call, cli_actor, fail, load, state_errors
from proxy.cli.migrate import add_migrate_parser
from proxy.config import GatewayConfig
from proxy.config.state_url import parse_state_url
from proxy.state.sqlite.connection import StateFileError

if TYPE_CHECKING:
    from proxy.cli.common import Subparsers

__all__ = [
    "add_token_parser",
    "cmd_token_audit",
    "cmd_token_create",
    "cmd_token_list",
    "cmd_token_revoke",
]

# The built-in routes' scopes (a config's routes: may add more; an unknown one is refused
# with the list of the config's own).
_SCOPES_HELP = ", ".join(sorted(s for s in known_scopes(DEFAULT_ROUTES) if "*" not in s))


async def _with_store(
    config: GatewayConfig, fn: Callable[[TokenStore], Coroutine[Any, Any, int]]
) -> int:
    """``fn`` on the config's token store; 1 and one error line when the state fails, 2
    for ``memory://``: a token kept in this process's memory would reach no gateway."""
    if config.token_store is None and config.state.lower().startswith("memory:"):
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
    except state_errors() as exc:
        if isinstance(exc, StateFileError):
            return fail([str(exc)], code=1)
        # sqlite's, Redis' and asyncpg's texts name no secret (a URL's password is refused).
        return fail([f"state: the token store failed: {type(exc).__name__}: {exc}"], code=1)


def _missing_state_file(config: GatewayConfig) -> int | None:
    """For a command that reads tokens (list, revoke): 1 and an error line when the sqlite
    file the state names does not exist (opening it would create an empty one, and a
    mistyped --state would list nothing instead of saying so); None otherwise, and when
    the tokens live in a ``token_store`` apart from the state."""
    if config.token_store is not None:
        return None
    state = parse_state_url(config.state)
    if state.backend != "sqlite" or state.path is None or Path(state.path).exists():
        return None
    return fail(
        [f"state: no sqlite file at {state.path} (check --state or the config's state)"], code=1
    )


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
        actor = Actor(cli_actor())
        await record_operation(
            store, actor, "token.create", new.record.id, created_detail(new.record)
        )
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
    if (missing := _missing_state_file(config)) is not None:
        return missing

    async def run(store: TokenStore) -> int:
        views = [token_view(r, config) for r in await store.list()]
        _print_tokens(views, args.json)
        return 0

    return asyncio.run(_with_store(config, run))


def cmd_token_revoke(args: argparse.Namespace) -> int:
    if args.admin_url:

        async def remote(client: AdminClient) -> int:
            before = await client.call("GET", f"/admin/tokens/{args.token_id}")
            if before.get("revoked_at"):
                return _already_revoked(before)
            view = await client.revoke(args.token_id)
            print(f"revoked {view['id']} ({view['name']})")
            return 0

        return admin_call(args, remote)
    config = load(args)
    if (missing := _missing_state_file(config)) is not None:
        return missing

    async def run(store: TokenStore) -> int:
        before = await store.get(args.token_id)
        if before is None:
            return fail([f"no token with id {args.token_id}"], code=1)
        if before.revoked_at is not None:
            return _already_revoked(before.public_view())
        record = await store.revoke(args.token_id, time.time())
        assert record is not None  # tokens are revoked, never deleted
        await record_operation(
            store,
            Actor(cli_actor()),
            "token.revoke",
            record.id,
            {"revoked_at": record.public_view()["revoked_at"]},
        )
        print(f"revoked {record.id} ({record.name})")
        return 0

    return asyncio.run(_with_store(config, run))


def _already_revoked(view: dict[str, Any]) -> int:
    """A revocation asked again: nothing changes (the first time is kept); exit 0, since
    the token is revoked as asked, but said so."""
    print(f"{view['id']} ({view['name']}) was already revoked at {view['revoked_at']}")
    return 0


def _print_audit(views: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(views, indent=2))
        return
    for v in views:
        detail = json.dumps(v["detail"], sort_keys=True, separators=(",", ":"))
        who = f"{v['actor'] or '-'} from {v['address'] or '-'}"
        print(f"{v['at']}  {v['action']:<13} {v['token_id']}  {who}  {detail}")


def cmd_token_audit(args: argparse.Namespace) -> int:
    if args.admin_url:

        async def remote(client: AdminClient) -> int:
            _print_audit(await client.audit(args.token_id, args.limit), args.json)
            return 0

        return admin_call(args, remote)
    config = load(args)

    async def run(store: TokenStore) -> int:
        if not isinstance(store, AuditLog):
            return fail(["state: this token store keeps no audit log (Redis)"], code=1)
        entries = await store.entries(token_id=args.token_id, limit=args.limit)
        _print_audit([e.public_view() for e in entries], args.json)
        return 0

    return asyncio.run(_with_store(config, run))


def _limit(text: str) -> int:
    if text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_AUDIT_PAGE:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be 1-{MAX_AUDIT_PAGE}")


def _add_create_parser(tsub: Subparsers) -> argparse.ArgumentParser:
    """``token create`` and its options, each with its help."""
    create = tsub.add_parser("create", help="create a token; printed once, as the last line")
    create.add_argument(
        "--name",
        required=True,
        help="the service's name, 1-64 of A-Z a-z 0-9 . _ -; metrics and logs label by it, so"
        " no two active tokens share one",
    )
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        metavar="SCOPE",
        help="a scope the token holds, repeatable (--scope contacts:read --scope tags:read);"
        " wildcards: contacts:* (every contacts: scope), * (everything, unknown routes too);"
        " scopes: " + _SCOPES_HELP,
    )
    create.add_argument(
        "--hourly", type=int, metavar="N", help="the token's own quota: requests per hour"
    )
    create.add_argument(
        "--per-minute", type=int, metavar="N", help="the token's own quota: requests per minute"
    )
    create.add_argument(
        "--weight",
        type=int,
        default=1,
        metavar="N",
        help="its share when tokens wait for the shared budget (default 1; 2 gets twice)",
    )
    create.add_argument(
        "--expires-in", metavar="DURATION", help="e.g. 30d, 12h, 90m (default: never)"
    )
    create.add_argument(
        "--upstream-key",
        default="default",
        metavar="NAME",
        help="the echowin key it uses: default (upstream.api_key) or a name under"
        " upstream.extra_keys",
    )
    create.add_argument(
        "--class",
        dest="service_class",
        metavar="NAME",
        help="its class of service, a name under classes (default: default_class)",
    )
    return create


def add_token_parser(sub: Subparsers) -> None:
    """``token create|list|revoke``, each with ``--config`` or ``--admin-url``."""
    token = sub.add_parser("token", help="create, list or revoke internal tokens; their audit log")
    tsub = token.add_subparsers(dest="token_command", required=True)
    create = _add_create_parser(tsub)
    create.set_defaults(func=cmd_token_create)
    lst = tsub.add_parser("list", help="list tokens (never their secrets)")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_token_list)
    revoke = tsub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=cmd_token_revoke)
    audit = tsub.add_parser("audit", help="the audit log of token operations, newest first")
    audit.add_argument("--token-id", help="only this token's entries")
    audit.add_argument("--limit", type=_limit, default=100, help="at most this many (1-1000)")
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=cmd_token_audit)
    add_migrate_parser(tsub)
    for sp in (create, lst, revoke, audit):
        where = sp.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", help="work on the token store the config names")
        where.add_argument(
            "--admin-url",
            help="work through a running gateway's admin API (token from $GATEWAY_ADMIN_TOKEN)",
        )
        sp.add_argument("--state", help="override the config's state URL")
