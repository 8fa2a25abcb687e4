"""``serve --workers N``: N gateway processes on one listen port, one admin listener.

The supervisor (the ``serve`` process when N > 1) opens no state and proxies nothing. It
starts N workers, each a whole gateway (``serve`` again, with hidden ``--worker-*`` flags;
proxy/server/worker.py), which bind the proxy port with SO_REUSEPORT, so that the kernel spreads
connections across them, and serve their admin app on a private unix socket. The
supervisor serves the configured admin listener for the group (proxy/workers/group_admin.py).

- SIGTERM or SIGINT is forwarded once, as SIGTERM: each worker drains as a single gateway
  does; the supervisor exits when every worker has, with the worst exit status.
- SIGHUP is forwarded: each worker reloads its config (a worker still starting gets it as
  soon as it is up).
- A worker that dies otherwise is restarted after a backoff (0.5 s, doubling up to 30 s
  while it keeps dying within 30 s of its start). A worker of the first start that fails
  stops the group: the configuration or the machine is wrong, not the worker.
- Workers die with the supervisor: PR_SET_PDEATHSIG on Linux, and a watch on the parent
  pid everywhere.

The budget must be shared between processes: sqlite:// (one file) or redis://; memory:// is
refused (proxy/config/: ``unshared_state``). Each worker counts as a replica for Redis'
outage share (1/(replicas x workers)).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from aiohttp import web

from proxy.app import listener_error, start_site
from proxy.config import MAX_WORKERS, GatewayConfig
from proxy.server.guard import Guard, MalformedLog
from proxy.server.listeners import JsonErrorRunner
from proxy.workers.group_admin import CONNECTIONS_REFUSED, WorkerLinks, build_group_admin_app

log = logging.getLogger("echowin_gateway.workers")

READY_SECONDS = 60.0  # a worker not answering on its admin socket by then is killed
POLL_SECONDS = 0.05
BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
HEALTHY_SECONDS = 30.0  # a worker that ran this long restarts without backoff
STOP_MARGIN_SECONDS = 10.0  # past the drain grace, stragglers are killed
MAX_SOCKET_DIR = 80  # sun_path holds 107 bytes; "/worker-63.sock" follows


def resolve_workers(value: int | str) -> int:
    """``server.workers`` or ``--workers`` as a process count: ``auto`` (or 0) is one per
    CPU this process may run on, at most MAX_WORKERS."""
    if value in ("auto", 0):
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, MAX_WORKERS))
    return int(value)


def exit_status(returncode: int) -> int:
    """A child's return code as a shell shows it: killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


# --- the supervisor --------------------------------------------------------------------------


@dataclass(eq=False)
class Worker:
    """One worker slot; its process changes when it is restarted."""

    index: int
    socket: str
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    reload_pending: bool = False
    status: int | None = None  # the last process's exit status
    came_up: asyncio.Event = field(default_factory=asyncio.Event)  # ready once, ever

    @property
    def pid(self) -> int | None:
        """The running process's pid; None while there is none."""
        if self.proc is None or self.proc.returncode is not None:
            return None
        return self.proc.pid

    def send(self, sig: int) -> None:
        if self.pid is not None and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


@dataclass(eq=False)
class Supervisor:
    config: GatewayConfig
    argv: list[str]  # the worker's command line, without the per-worker flags
    socket_dir: str
    count: int
    workers: list[Worker] = field(init=False)
    links: WorkerLinks = field(default_factory=WorkerLinks)
    started: bool = False
    failed: int | None = None  # exit status when the first start failed

    def __post_init__(self) -> None:
        self.workers = [
            Worker(i, os.path.join(self.socket_dir, f"worker-{i}.sock")) for i in range(self.count)
        ]
        self._stopping = asyncio.Event()

    async def run(self) -> int:
        """Start the workers, then serve the group's admin listener (so that, as for one
        process, /healthz answering means the proxy port accepts); keep the workers until
        told to stop."""
        loop = asyncio.get_running_loop()
        app = build_group_admin_app(self)
        malformed = MalformedLog()
        guard = Guard.of(self.config.server, malformed, app[CONNECTIONS_REFUSED].refused)
        admin = JsonErrorRunner(app, guard=guard, access_log=None, shutdown_timeout=1.0)
        await admin.setup()
        keepers: list[asyncio.Task[None]] = []
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop, sig)
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            keepers = [loop.create_task(self._keep(w)) for w in self.workers]
            if await self._first_start():
                await self._open_admin(admin, keepers)
            await self._stopping.wait()
            await self._drain(keepers)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for w in self.workers:  # never leave a worker behind, whatever happened
                w.send(signal.SIGKILL)
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            await self.links.close()
            await admin.cleanup()
            malformed.close()
        if self.failed is not None:
            return self.failed
        return max((w.status or 0 for w in self.workers), default=0)

    async def _first_start(self) -> bool:
        """True once every worker is up; False if the group was stopped before."""
        up = asyncio.ensure_future(asyncio.gather(*(w.came_up.wait() for w in self.workers)))
        stopped = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait((up, stopped), return_when=asyncio.FIRST_COMPLETED)
        up.cancel()
        stopped.cancel()
        # Collected, so that a cancelled gather is not reported as "never retrieved".
        await asyncio.gather(up, stopped, return_exceptions=True)
        self.started = not self._stopping.is_set()
        return self.started

    async def _open_admin(self, admin: web.AppRunner, keepers: list[asyncio.Task[None]]) -> None:
        host, port = self.config.admin_address()
        try:
            site = web.TCPSite(admin, host, port, reuse_address=True)
            await start_site(site, "admin_listen", self.config.admin_listen)
        except OSError:
            self._stopping.set()
            await self._drain(keepers)
            raise
        fields: dict[str, object] = {"listen": self.config.listen, "workers": self.count}
        fields |= {"admin_listen": self.config.admin_listen, "pids": [w.pid for w in self.workers]}
        log.info("gateway listening", extra={"fields": fields})

    def _stop(self, sig: int) -> None:
        if self._stopping.is_set():
            log.info("already stopping", extra={"fields": {"signal": signal.Signals(sig).name}})
            return
        log.info("stopping workers", extra={"fields": {"signal": signal.Signals(sig).name}})
        self._stopping.set()

    def _reload(self) -> None:
        log.info("reloading workers", extra={"fields": {"workers": self.count}})
        for w in self.workers:
            if w.ready:
                w.send(signal.SIGHUP)
            else:
                w.reload_pending = True

    async def _drain(self, keepers: list[asyncio.Task[None]]) -> None:
        """SIGTERM to every worker; SIGKILL to those still there after the grace."""
        for w in self.workers:
            w.send(signal.SIGTERM)
        grace = self.config.server.shutdown_grace_seconds + STOP_MARGIN_SECONDS
        late: set[asyncio.Task[None]] = set()
        if keepers:
            _, late = await asyncio.wait(keepers, timeout=grace)
        if late:
            log.error("workers did not stop in time; killing them", extra={"fields": {}})
            for w in self.workers:
                w.send(signal.SIGKILL)
            await asyncio.wait(late)

    async def _keep(self, w: Worker) -> None:
        """Run worker ``w``, restarting it until the group stops."""
        failures = 0
        while not self._stopping.is_set():
            began = time.monotonic()
            proc = await self._spawn(w)
            if await self._until_ready(w, proc):
                w.ready = True
                w.came_up.set()
                if w.reload_pending:
                    w.reload_pending = False
                    w.send(signal.SIGHUP)
            w.status = exit_status(await proc.wait())
            w.ready = False
            if self._stopping.is_set():
                return
            fields = {"worker": w.index, "pid": proc.pid, "status": w.status}
            if not self.started:
                log.error("worker failed to start; stopping", extra={"fields": fields})
                self.failed = w.status or 1
                self._stopping.set()
                return
            failures = 0 if time.monotonic() - began >= HEALTHY_SECONDS else failures + 1
            delay = min(MAX_BACKOFF_SECONDS, BACKOFF_SECONDS * 2 ** max(0, failures - 1))
            w.restarts += 1
            log.error("worker died; restarting", extra={"fields": {**fields, "in": delay}})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _spawn(self, w: Worker) -> asyncio.subprocess.Process:
        flags = ["--worker-index", str(w.index), "--worker-socket", w.socket]
        flags += ["--worker-parent", str(os.getpid())]
        # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
        # forwards exactly one SIGTERM (a second signal would cut a worker's drain short).
        w.proc = await asyncio.create_subprocess_exec(
            *self.argv, *flags, stdin=asyncio.subprocess.DEVNULL, process_group=0
        )
        log.info("worker started", extra={"fields": {"worker": w.index, "pid": w.proc.pid}})
        if self._stopping.is_set():  # stopped while it was being started
            w.send(signal.SIGTERM)
        return w.proc

    async def _until_ready(self, w: Worker, proc: asyncio.subprocess.Process) -> bool:
        """True once the worker answers on its admin socket; False if it exits first (or
        never answers within READY_SECONDS, and is killed)."""
        deadline = time.monotonic() + READY_SECONDS
        while proc.returncode is None and not self._stopping.is_set():
            if await self.links.healthy(w):
                return True
            if time.monotonic() > deadline:
                log.error(
                    "worker not up in time; killing it", extra={"fields": {"worker": w.index}}
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return False
            await asyncio.sleep(POLL_SECONDS)
        return False


def worker_argv(config_path: str, state: str | None, count: int) -> list[str]:
    """The command line a worker runs: this same ``serve``, in this same interpreter."""
    argv = [sys.executable, "-m", "proxy.cli.main", "serve", "--config", config_path]
    if state:
        argv += ["--state", state]
    return [*argv, "--workers", str(count)]


def check_listen(config: GatewayConfig) -> None:
    """OSError if a port is taken, before any worker starts: on the proxy port the workers'
    SO_REUSEPORT would otherwise join another program's sockets (same user)."""
    listeners = (
        ("listen", config.listen, config.listen_address()),
        ("admin_listen", config.admin_listen, config.admin_address()),
    )
    for key, address, (host, port) in listeners:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise listener_error(exc, key, address) from None


def supervise(config: GatewayConfig, config_path: str, state: str | None, count: int) -> int:
    """Run ``count`` workers; the exit status is the worst of theirs (1 if a start failed)."""
    check_listen(config)
    socket_dir = tempfile.mkdtemp(prefix="echowin-gateway-")  # mode 0700
    if len(socket_dir) > MAX_SOCKET_DIR:  # a long TMPDIR: unix socket paths are short
        os.rmdir(socket_dir)
        socket_dir = tempfile.mkdtemp(prefix="echowin-gateway-", dir="/tmp")
    try:
        argv = worker_argv(config_path, state, count)
        return asyncio.run(Supervisor(config, argv, socket_dir, count).run())
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
