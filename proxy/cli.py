"""The ``echowin-gateway`` command line.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad configuration. Config and
secret errors print one line per offending key, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from proxy import __version__
from proxy.config import ConfigError, GatewayConfig, load_config, resolve_secrets
from proxy.logs import setup_logging
from proxy.tokenops import create_token, open_store
from proxy.tokens import TokenStore

EXIT_CONFIG = 2


def _fail(lines: Sequence[str], code: int = EXIT_CONFIG) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return code


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
        if not args.skip_secrets:
            resolve_secrets(config)
    except ConfigError as exc:
        return _fail(exc.lines)
    routes = config.route_table()
    print(f"{args.path}: OK ({len(routes)} routes, {len(config.upstream.limits)} limits)")
    return 0


def _load(args: argparse.Namespace) -> GatewayConfig:
    config = load_config(args.config)
    if getattr(args, "state", None):
        config = config.model_copy(update={"state": args.state})
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.app import serve

    try:
        config = _load(args)
        secrets_ = resolve_secrets(config)
    except ConfigError as exc:
        return _fail(exc.lines)
    setup_logging(config.logging.level, config.logging.format)
    try:
        asyncio.run(serve(config, secrets_))
    except OSError as exc:
        return _fail([f"cannot start: {exc.strerror or exc}"], code=1)
    return 0


async def _with_store(
    config: GatewayConfig, fn: Callable[[TokenStore], Coroutine[Any, Any, int]]
) -> int:
    store = await open_store(config)
    try:
        return await fn(store)
    finally:
        await store.close()


def cmd_token_create(args: argparse.Namespace) -> int:
    config = _load(args)

    async def run(store: TokenStore) -> int:
        try:
            new = await create_token(
                store,
                config,
                config.route_table(),
                name=args.name,
                scopes=args.scope,
                upstream_key=args.upstream_key,
                hourly=args.hourly,
                per_minute=args.per_minute,
                weight=args.weight,
                expires_in=args.expires_in,
            )
        except ValueError as exc:
            return _fail([str(exc)])
        view = new.record.public_view()
        print(
            f"created token {view['id']} for {view['name']}; scopes: {' '.join(new.record.scopes)}"
        )
        print("it is shown once; store it now:")
        print(new.token)
        return 0

    return asyncio.run(_with_store(config, run))


def cmd_token_list(args: argparse.Namespace) -> int:
    config = _load(args)

    async def run(store: TokenStore) -> int:
        records = await store.list()
        if args.json:
            print(json.dumps([r.public_view() for r in records], indent=2))
            return 0
        print(f"{'ID':<14}{'NAME':<24}{'STATUS':<9}{'KEY':<12}SCOPES")
        for r in records:
            status = str(r.public_view()["status"])
            scopes = " ".join(r.scopes)
            print(f"{r.id:<14}{r.name:<24}{status:<9}{r.upstream_key:<12}{scopes}")
        return 0

    return asyncio.run(_with_store(config, run))


def cmd_token_revoke(args: argparse.Namespace) -> int:
    config = _load(args)

    async def run(store: TokenStore) -> int:
        record = await store.revoke(args.token_id, time.time())
        if record is None:
            return _fail([f"no token with id {args.token_id}"], code=1)
        print(f"revoked {record.id} ({record.name})")
        return 0

    return asyncio.run(_with_store(config, run))


def cmd_simulate(args: argparse.Namespace) -> int:
    from proxy.sim import SimConfig, parse_limit, run_simulator

    try:
        limits = tuple(parse_limit(text) for text in (args.limit or ["1000/3600", "100/60"]))
    except ValueError as exc:
        return _fail([f"--limit: {exc}"])
    keys = args.key or [os.environ.get("ECHOWIN_API_KEY") or "sim-team-key"]
    agency = args.agency_key or [os.environ.get("ECHOWIN_AGENCY_KEY") or "sim-agency-key"]
    config = SimConfig(
        team_keys=frozenset(keys),
        agency_keys=frozenset(agency),
        limits=limits,
        reset_format=args.reset_format,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_simulator(config, args.host, args.port))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from proxy.quickstart import run_quickstart

    try:
        config = _load(args)
    except ConfigError as exc:
        return _fail(exc.lines)
    if isinstance(sys.stdout, io.TextIOWrapper):  # the token line must show when piped (docker)
        sys.stdout.reconfigure(line_buffering=True)
    return asyncio.run(run_quickstart(config, sim_port=args.sim_port))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="echowin-gateway", description="Authenticating, budget-keeping proxy for echowin."
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True)
    serve.add_argument("--state", help="override the config's state URL")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.add_argument(
        "--skip-secrets", action="store_true", help="do not require the secrets to be readable"
    )
    check.set_defaults(func=cmd_check_config)

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
    create.set_defaults(func=cmd_token_create)
    lst = tsub.add_parser("list", help="list tokens (never their secrets)")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_token_list)
    revoke = tsub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=cmd_token_revoke)
    for sp in (create, lst, revoke):
        sp.add_argument("--config", required=True)
        sp.add_argument("--state", help="override the config's state URL")

    sim = sub.add_parser("simulate", help="run a local echowin stand-in")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8081)
    sim.add_argument("--limit", action="append", help="N/SECONDS, repeatable")
    sim.add_argument("--key", action="append", help="accepted team key (default $ECHOWIN_API_KEY)")
    sim.add_argument("--agency-key", action="append", help="accepted agency key")
    sim.add_argument("--reset-format", choices=("unix", "iso"), default="unix")
    sim.set_defaults(func=cmd_simulate)

    quick = sub.add_parser(
        "quickstart", help="run the gateway (against the simulator when no key is set)"
    )
    quick.add_argument("--config", required=True)
    quick.add_argument("--state", default="sqlite:///./.run/state.db")
    quick.add_argument("--sim-port", type=int, default=8081)
    quick.set_defaults(func=cmd_quickstart)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        return _fail(exc.lines)
    return code


if __name__ == "__main__":
    sys.exit(main())
