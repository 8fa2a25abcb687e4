"""The ``echowin-gateway`` command line: one parser, one ``cmd_*`` per subcommand (the
token subcommands are in ``proxy.cli.tokens``).

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad configuration, 141 stdout
closed by its reader (``token list | head``). Config and secret errors print one line per
offending key, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import io
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.cli.admin_client import AdminClient
from proxy.cli.common import EXIT_BROKEN_PIPE, EXIT_CONFIG, admin_call, fail, load
from proxy.cli.tokens import add_token_parser
from proxy.config import (
    MAX_WORKERS,
    ConfigError,
    load_config,
    resolve_secrets,
    unshared_state,
)
from proxy.observe.logs import setup_logging, tag_process
from proxy.state.sqlite.connection import StateFileError

if TYPE_CHECKING:
    from proxy.cli.common import Subparsers
    from proxy.server.worker import WorkerSpec

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_CONFIG", "main"]


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
        if not args.skip_secrets:
            resolve_secrets(config)
    except ConfigError as exc:
        return fail(exc.lines)
    routes = config.route_table()
    print(f"{args.path}: OK ({len(routes)} routes, {len(config.upstream.limits)} limits)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.app import serve
    from proxy.reload import EarlyHangups
    from proxy.server.loops import run as run_loop
    from proxy.workers.supervisor import resolve_workers, supervise

    worker = _worker_spec(args)  # a worker ignores SIGHUP until up; its supervisor resends
    hangups = EarlyHangups() if worker is None else None
    try:
        config = load(args)
        if hangups is not None:
            hangups.pending = False  # what came before is read now
        secrets_ = resolve_secrets(config)
        source = "--workers" if args.workers is not None else "server.workers"
        count = resolve_workers(config.server.workers if args.workers is None else args.workers)
        if count > 1 and (problem := unshared_state(config, source, count)):
            raise ConfigError([problem])
    except ConfigError as exc:
        return fail(exc.lines)
    setup_logging(config.logging.level, config.logging.format)
    if worker is not None:
        tag_process(worker=worker.index)
    try:
        if count > 1 and worker is None:
            return supervise(config, args.config, args.state, count)
        run_loop(
            serve(
                config,
                secrets_,
                config_path=args.config,
                state_override=args.state,
                worker=worker,
                hangups=hangups,
            ),
            config.server.event_loop,
        )
    except StateFileError as exc:
        return fail([str(exc)], code=1)
    except OSError as exc:
        return fail([f"cannot start: {exc.strerror or exc}"], code=1)
    return 0


def _worker_spec(args: argparse.Namespace) -> WorkerSpec | None:
    """Set by the supervisor of ``serve --workers N`` on each worker it starts."""
    from proxy.server.worker import WorkerSpec

    if args.worker_index is None:
        return None
    spec = WorkerSpec(args.worker_index, args.workers, args.worker_socket, args.worker_parent)
    return spec.bind_to_parent()


def cmd_status(args: argparse.Namespace) -> int:
    from proxy.admin.status import status_text

    async def fetch(client: AdminClient) -> int:
        print(status_text(await client.call("GET", "/status.json")))
        return 0

    return admin_call(args, fetch)


def _sim_keys(given: list[str] | None, variable: str, header: str, made_up: str) -> list[str]:
    """The keys ``simulate`` accepts: ``given``, else ``$variable``, else ``made_up``, which
    (and only it: the others may be real keys) is told on stderr so a caller can use it."""
    if given:
        return given
    if os.environ.get(variable):
        return [os.environ[variable]]
    print(f"no --key or ${variable}: accepting {header}: {made_up}", file=sys.stderr)
    return [made_up]


def cmd_simulate(args: argparse.Namespace) -> int:
    from proxy.sim import Faults, SimConfig, parse_limit, run_simulator

    try:
        limits = tuple(parse_limit(text) for text in (args.limit or ["1000/3600", "100/60"]))
    except ValueError as exc:
        return fail([f"--limit: {exc}"])
    faults = None
    if args.echo_key is not None or args.echo_in is not None:
        try:  # Faults names the field: echo_key, echo_in
            faults = Faults(echo_key=args.echo_key, echo_in=args.echo_in or "body")
        except ValueError as exc:
            return fail([f"--echo-key/--echo-in: {exc}"])
    keys = _sim_keys(args.key, "ECHOWIN_API_KEY", "X-API-Key", "sim-team-key")
    agency = _sim_keys(args.agency_key, "ECHOWIN_AGENCY_KEY", "X-AGENCY-KEY", "sim-agency-key")
    config = SimConfig(
        team_keys=frozenset(keys),
        agency_keys=frozenset(agency),
        limits=limits,
        reset_format=args.reset_format,
    )
    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(run_simulator(config, args.host, args.port, faults))
        except OSError as exc:  # the port is taken, the host does not resolve, ...
            number = exc.errno or 0  # getaddrinfo's are negative: its strerror says it
            reason = os.strerror(number) if number > 0 else exc.strerror or str(exc)
            return fail([f"cannot start: {args.host}:{args.port}: {reason}"], code=1)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from proxy.cli.quickstart import run_quickstart

    try:
        config = load(args)
    except ConfigError as exc:
        return fail(exc.lines)
    if isinstance(sys.stdout, io.TextIOWrapper):  # the token line must show when piped (docker)
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return asyncio.run(
            run_quickstart(
                config, sim_port=args.sim_port, port=args.port, admin_port=args.admin_port
            )
        )
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = (
                "; pick free ports: make run PORT=N ADMIN_PORT=N SIM_PORT=N"
                " (quickstart --port, --admin-port, --sim-port)"
            )
        return fail([f"cannot start: {exc.strerror or exc}{hint}"], code=1)


def port_arg(text: str) -> int:
    """A TCP port, 0-65535 (0: any free port)."""
    if text.isascii() and text.isdigit() and int(text) <= 65535:
        return int(text)
    raise argparse.ArgumentTypeError("must be a port number, 0-65535 (0: any free port)")


def workers_arg(text: str) -> int | str:
    """``--workers``: 1-64, or 0 or ``auto`` (one per CPU)."""
    if text == "auto" or (text.isdigit() and int(text) <= MAX_WORKERS):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"must be 1-{MAX_WORKERS}, or 0 or auto (one per CPU)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="echowin-gateway", description="Authenticating, budget-keeping proxy for echowin."
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_check_config(sub)
    add_token_parser(sub)
    _add_status(sub)
    _add_simulate(sub)
    _add_quickstart(sub)
    return p


def _add_serve(sub: Subparsers) -> None:
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True)
    serve.add_argument("--state", help="override the config's state URL")
    serve.add_argument(
        "--workers",
        type=workers_arg,
        metavar="N",
        help="processes sharing the listen port (0 or auto: one per CPU); overrides server.workers",
    )
    for hidden, kind in (("index", int), ("socket", str), ("parent", int)):
        serve.add_argument(f"--worker-{hidden}", type=kind, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)


def _add_check_config(sub: Subparsers) -> None:
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.add_argument(
        "--skip-secrets", action="store_true", help="do not require the secrets to be readable"
    )
    check.set_defaults(func=cmd_check_config)


def _add_status(sub: Subparsers) -> None:
    status = sub.add_parser("status", help="a running gateway's budgets, queue and tokens")
    status.add_argument("--admin-url", default="http://127.0.0.1:9090")
    status.set_defaults(func=cmd_status)


def _add_simulate(sub: Subparsers) -> None:
    sim = sub.add_parser("simulate", help="run a local echowin stand-in")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=port_arg, default=8081)
    sim.add_argument("--limit", action="append", help="N/SECONDS, repeatable")
    sim.add_argument(
        "--key",
        action="append",
        help="accepted team key, repeatable (default $ECHOWIN_API_KEY, else sim-team-key)",
    )
    sim.add_argument(
        "--agency-key",
        action="append",
        help="accepted agency key, repeatable (default $ECHOWIN_AGENCY_KEY, else sim-agency-key)",
    )
    sim.add_argument("--reset-format", choices=("unix", "iso"), default="unix")
    sim.add_argument(
        "--echo-key",
        metavar="FORM",
        help="hostile echowin: answer with the key received, in FORM (percent_all, base64_1, ...)",
    )
    sim.add_argument(
        "--echo-in",
        metavar="PLACE",
        help="where --echo-key puts it: body (default), header, location, gzip, chunked, ...",
    )
    sim.set_defaults(func=cmd_simulate)


def _add_quickstart(sub: Subparsers) -> None:
    quick = sub.add_parser(
        "quickstart", help="run the gateway (against the simulator when no key is set)"
    )
    quick.add_argument("--config", required=True)
    quick.add_argument("--state", default="sqlite:///./.run/state.db")
    quick.add_argument(
        "--port", type=port_arg, help="the proxy's port (default: the config's listen)"
    )
    quick.add_argument(
        "--admin-port", type=port_arg, help="the admin port (default: the config's admin_listen)"
    )
    quick.add_argument(
        "--sim-port", type=port_arg, default=8081, help="the simulator's port (default 8081)"
    )
    quick.set_defaults(func=cmd_quickstart)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a reader gone (`token list | head`) shows here, not at exit
    except ConfigError as exc:
        return fail(exc.lines)
    except BrokenPipeError:
        # Python's advice: point stdout at /dev/null so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
