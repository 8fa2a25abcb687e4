"""What every subcommand shares: the exit codes, error lines on stderr, the config with
``--state`` applied, and calls to a running gateway's admin API."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sqlite3
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from proxy.auth.audit import actor_name
from proxy.cli.admin_client import AdminClient, AdminError
from proxy.config import GatewayConfig, load_config, with_state
from proxy.state.sqlite.connection import StateFileError

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_CONFIG",
    "admin_call",
    "cli_actor",
    "fail",
    "load",
    "state_errors",
]

if TYPE_CHECKING:
    # What ``add_subparsers`` returns: generic in typeshed only, so named for type checks.
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_CONFIG = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer its reader left


def fail(lines: Sequence[str], code: int = EXIT_CONFIG) -> int:
    """Print each line as ``error: LINE`` on stderr; return ``code``."""
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return code


def load(args: argparse.Namespace) -> GatewayConfig:
    """The config ``--config`` names, its state replaced by ``--state`` if given;
    ConfigError otherwise."""
    config = load_config(args.config)
    if getattr(args, "state", None):
        config = with_state(config, args.state)
    return config


def state_errors() -> tuple[type[Exception], ...]:
    """What the token store raises when its state cannot answer (Redis' and asyncpg's
    errors once loaded: each is imported only for its own URL)."""
    errors: list[type[Exception]] = [StateFileError, sqlite3.Error]
    redis_exceptions = sys.modules.get("redis.exceptions")
    if redis_exceptions is not None:
        errors.append(redis_exceptions.RedisError)
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is not None:
        errors += [asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError]
    return tuple(errors)


def cli_actor() -> str:
    """``cli:USER``: who the audit log says made a change from this command line."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no name for this uid (a bare container)
        return "cli"
    return actor_name(f"cli:{user}") or "cli"


def admin_call(
    args: argparse.Namespace, fn: Callable[[AdminClient], Coroutine[Any, Any, int]]
) -> int:
    """Run ``fn`` against the admin API ``--admin-url``; 2 for a refusal of bad input, 1
    otherwise."""
    try:
        return int(asyncio.run(fn(AdminClient(args.admin_url, actor=cli_actor()))))
    except AdminError as exc:
        return fail([str(exc)], code=2 if exc.status == 400 else 1)
