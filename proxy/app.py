"""The one place that wires the gateway: apps, runtime, listeners, signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.web import UrlMappingMatchInfo

from proxy import SERVER_NAME
from proxy.admin.app import build_admin_app
from proxy.aiohttp_compat import name_servers, retype
from proxy.auth.authenticator import AuthResult
from proxy.config import GatewayConfig, Secrets
from proxy.gateway.handler import WATCHES, expect_later, handle, lobby_decider
from proxy.gateway.keywatch import Watches
from proxy.gateway.traced import traced_handle
from proxy.reload import EarlyHangups, reload_config
from proxy.runtime import RUNTIME, Runtime
from proxy.server.guard import Guard, MalformedLog
from proxy.server.listeners import HANDLER_ARGS, JsonErrorRunner, ProxyRunner
from proxy.server.loops import loop_name

if TYPE_CHECKING:
    from proxy.server.worker import WorkerSpec

log = logging.getLogger("echowin_gateway")

# Requests still queued this long before the drain's grace ends are refused (503
# shutting_down): an answer written then reaches the caller before the server cancels
# what is left, where a cancelled request would get no answer at all.
SHED_MARGIN_SECONDS = 0.25


class _OneRoute(web.UrlDispatcher):
    """The proxy app's router: its one route takes every request, whatever its method and
    target (proxy/auth/routes.py reads the path), with no URL built, no path matched and
    no index walked. A route added to the app after ``over`` is never reached."""

    async def resolve(self, request: web.Request) -> UrlMappingMatchInfo:
        return UrlMappingMatchInfo({}, self._route)

    @classmethod
    def over(cls, router: web.UrlDispatcher) -> None:
        """Make ``router``, holding one route, this kind of router."""
        (resource,) = router.resources()
        (route,) = resource
        retype(router, cls)._route = route

    _route: web.AbstractRoute


def build_proxy_app(runtime: Runtime) -> web.Application:
    """The proxy listener's app; its cleanup_ctx opens and closes ``runtime``."""
    app = web.Application(handler_args=HANDLER_ARGS)
    name_servers(SERVER_NAME)  # every listener's answers: the gateway, without versions
    app[RUNTIME] = runtime
    app[WATCHES] = Watches()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await runtime.open()
        yield
        await runtime.close()

    app.cleanup_ctx.append(lifecycle)
    # No "100 Continue" before the request is authenticated and admitted (expect_later).
    # With tracing on, every request through traced_handle; without, no trace of it.
    entry = handle if runtime.trace_settings is None else traced_handle
    app.router.add_route("*", "/{tail:.*}", entry, expect_handler=expect_later)
    _OneRoute.over(app.router)
    return app


def build_apps(config: GatewayConfig, secrets: Secrets) -> tuple[web.Application, web.Application]:
    """(proxy app, admin app) sharing one Runtime. Start the proxy app first."""
    runtime = Runtime.from_config(config, secrets)
    return build_proxy_app(runtime), build_admin_app(runtime)


async def serve(
    config: GatewayConfig,
    secrets: Secrets,
    *,
    ready: asyncio.Event | None = None,
    config_path: str | None = None,
    state_override: str | None = None,
    worker: WorkerSpec | None = None,
    hangups: EarlyHangups | None = None,
) -> None:
    """Run both listeners until SIGTERM or SIGINT, then drain and return.

    On SIGTERM/SIGINT the proxy stops accepting at once, requests in flight get
    ``server.shutdown_grace_seconds`` to finish, and then everything closes. On SIGHUP the
    config at ``config_path`` is read again (see proxy/reload.py). As one of ``serve
    --workers N`` (``worker``), the proxy port is shared (SO_REUSEPORT) and the admin app
    listens on the worker's private socket (see proxy/server/worker.py). A SIGHUP noted in
    ``hangups`` while starting is one reload once the runtime is open; one during the
    drain is ignored.
    """
    proxy_app, admin_app = build_apps(config, secrets)
    if worker is not None:
        _as_worker(proxy_app, admin_app, worker)
    runtime = proxy_app[RUNTIME]
    grace = config.server.shutdown_grace_seconds
    malformed = MalformedLog()  # one per process: both listeners' malformed requests
    proxy_runner, admin_runner = _runners(proxy_app, admin_app, grace, malformed)
    await proxy_runner.setup()
    await admin_runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    _on_signals(loop, stop, runtime, config_path, state_override, hangups)
    try:
        await _listen(config, proxy_runner, admin_runner, worker)
        fields: dict[str, object] = {"listen": config.listen, "event_loop": loop_name(loop)}
        if worker is None:  # a worker's admin app is reached through its supervisor's
            fields["admin_listen"] = config.admin_listen
        log.info("gateway listening", extra={"fields": fields})
        if ready is not None:
            ready.set()
        await stop.wait()
        _start_drain(runtime, grace)
    finally:
        _ignore_signals(loop, worker)
        await proxy_runner.cleanup()
        await admin_runner.cleanup()
        malformed.close()


def _runners(
    proxy_app: web.Application, admin_app: web.Application, grace: float, malformed: MalformedLog
) -> tuple[ProxyRunner[AuthResult], JsonErrorRunner]:
    """The proxy listener's runner (its lobby, a drain of ``grace`` seconds) and the admin
    listener's, each with its own guard."""
    runtime = proxy_app[RUNTIME]
    # handler_cancellation: a client that hangs up while queued leaves the queue at once.
    proxy_runner = ProxyRunner(
        proxy_app,
        lobby_decider(runtime),
        lambda: runtime.config.upstream.max_connections,
        runtime.metrics.count_connections,
        guard=listener_guard(runtime, malformed),
        access_log=None,
        shutdown_timeout=grace,
        handler_cancellation=True,
    )
    admin_runner = JsonErrorRunner(
        admin_app,
        guard=listener_guard(runtime, malformed),
        access_log=None,
        shutdown_timeout=1.0,
    )
    return proxy_runner, admin_runner


def _on_signals(
    loop: asyncio.AbstractEventLoop,
    stop: asyncio.Event,
    runtime: Runtime,
    config_path: str | None,
    state_override: str | None,
    hangups: EarlyHangups | None,
) -> None:
    """SIGTERM and SIGINT set ``stop``; SIGHUP reloads the config at ``config_path`` (and a
    SIGHUP that came while starting, noted in ``hangups``, is one reload now)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_config, runtime, config_path, state_override)
        if hangups is not None and hangups.pending:
            loop.call_soon(reload_config, runtime, config_path, state_override)


async def _listen(
    config: GatewayConfig,
    proxy_runner: web.AppRunner,
    admin_runner: web.AppRunner,
    worker: WorkerSpec | None,
) -> None:
    """Start the proxy listener on ``listen`` (shared with the other workers, if one), then
    the admin listener (``admin_listen``, or the worker's private socket)."""
    host, port = config.listen_address()
    # A burst of new connections must not overflow the listen queue (aiohttp's default
    # is 128; the kernel caps this at net.core.somaxconn).
    site = web.TCPSite(
        proxy_runner,
        host,
        port,
        reuse_address=True,
        reuse_port=worker is not None,
        backlog=4096,
    )
    await start_site(site, "listen", config.listen)
    if worker is not None:
        await worker.admin_site(admin_runner).start()
    else:
        ahost, aport = config.admin_address()
        admin_site = web.TCPSite(admin_runner, ahost, aport, reuse_address=True)
        await start_site(admin_site, "admin_listen", config.admin_listen)


def _start_drain(runtime: Runtime, grace: float) -> None:
    """Stopping: no new request is queued, and those still queued ``SHED_MARGIN_SECONDS``
    before the ``grace`` ends are refused."""
    log.info("shutting down", extra={"fields": {"grace_seconds": grace}})
    runtime.draining = True
    loop = asyncio.get_running_loop()
    loop.call_later(max(0.0, grace - SHED_MARGIN_SECONDS), runtime.admitter.shed)


def _ignore_signals(loop: asyncio.AbstractEventLoop, worker: WorkerSpec | None) -> None:
    """Draining: the signals' handlers go; a reload is moot, and SIGHUP's default action
    would cut the drain short."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if worker is not None:
        worker.ignore_signals()


def listener_guard(runtime: Runtime, malformed: MalformedLog) -> Guard:
    """A listener's guard (its own connection bounds) from the ``server:`` config section,
    read at start; refused connections are counted in the runtime's metrics."""
    return Guard.of(runtime.config.server, malformed, runtime.metrics.connection_refused)


async def start_site(site: web.BaseSite, key: str, address: str) -> None:
    """Start ``site``; an OSError (a port in use, a host that does not resolve) names the
    config key and its address."""
    try:
        await site.start()
    except OSError as exc:
        raise listener_error(exc, key, address) from None


def listener_error(exc: OSError, key: str, address: str) -> OSError:
    """``exc`` (a listener that cannot start) as one naming the config key and address."""
    # The errno's own text: asyncio's repeats the address in a sentence of its own.
    errno = exc.errno
    reason = os.strerror(errno) if errno is not None and errno > 0 else exc.strerror or exc
    return OSError(errno, f"{key} {address}: {reason}")


def _as_worker(proxy_app: web.Application, admin_app: web.Application, worker: WorkerSpec) -> None:
    """One of ``worker.count`` processes: a replica of the budget, stopping when its
    supervisor is gone; its admin app is reached through the supervisor only."""
    from proxy.server.worker import forwarded_peer

    proxy_app[RUNTIME].workers = worker.count
    proxy_app[RUNTIME].siblings = (os.path.dirname(worker.admin_socket), worker.index)
    admin_app.middlewares.append(forwarded_peer)
    admin_app.cleanup_ctx.append(worker.watching_parent)
