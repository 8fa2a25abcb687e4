"""The worker side of ``serve --workers N`` (the supervisor: proxy/workers/supervisor.py).

A worker is the whole gateway, run by ``serve`` with hidden ``--worker-*`` flags: it binds
the proxy port with SO_REUSEPORT, serves its admin app on a private unix socket that only
the supervisor uses, counts as a replica of the budget, and dies with its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger("echowin_gateway.workers")

PR_SET_PDEATHSIG = 1


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, or a process whose threads are still being
    killed, does not: /proc/PID/stat says Z, or X, or nothing)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc: a zombie counts as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process is told by its supervisor (hidden ``serve`` flags)."""

    index: int
    count: int
    admin_socket: str
    parent: int
    watch_parent: bool = True  # poll for the supervisor (the kernel will not tell)

    def bind_to_parent(self) -> WorkerSpec:
        """Die with the supervisor: the spec to run with. Until the event loop runs, SIGHUP
        is ignored (the supervisor resends it once the worker is up) and SIGTERM exits."""
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._exit_now)
        armed = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
        if os.getppid() != self.parent:  # the supervisor died before prctl
            self._leave()
            raise SystemExit(1)
        return dataclasses.replace(self, watch_parent=not armed)

    async def watching_parent(self, app: web.Application) -> AsyncIterator[None]:
        """A cleanup_ctx: where PR_SET_PDEATHSIG is missing, SIGTERM this process (it
        drains) when the supervisor is gone. At the end the worker removes its socket (and
        the supervisor's directory, if that is gone and this is the last worker out)."""
        task = None
        if self.watch_parent:
            task = asyncio.get_running_loop().create_task(self._watch())
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        log.info("worker stopped", extra={"fields": {"worker": self.index}})
        self._leave()

    def _leave(self) -> None:
        """Remove this worker's admin socket; and the supervisor's directory when the
        supervisor is gone and this is the last worker out (a supervisor that is alive
        removes it itself, and needs it to restart workers)."""
        with contextlib.suppress(OSError):
            os.unlink(self.admin_socket)
        if not _alive(self.parent):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.admin_socket))

    def _exit_now(self, signum: int, frame: object) -> None:
        self._leave()
        raise SystemExit(0)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != self.parent:
                break
        log.warning("supervisor gone; stopping", extra={"fields": {"worker": self.index}})
        os.kill(os.getpid(), signal.SIGTERM)

    def ignore_signals(self) -> None:
        """Once draining, ignore SIGTERM, SIGINT and SIGHUP: the supervisor does not repeat
        itself (past the grace it sends SIGKILL), but PR_SET_PDEATHSIG fires once for every
        thread of a dying supervisor (Linux passes its children from thread to thread),
        and a second SIGTERM must not cut the drain short."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)

    def admin_site(self, runner: web.AppRunner) -> web.BaseSite:
        """The worker's admin app: on its private unix socket, not on ``admin_listen``."""
        return web.UnixSite(runner, self.admin_socket)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def forwarded_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On the worker's unix socket (reachable only through the supervisor) the client's
    address comes in X-Forwarded-For, for the audit log."""
    peer = request.headers.get("X-Forwarded-For")
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if peer and sock is not None and sock.family == socket.AF_UNIX:
        request = request.clone(remote=peer[:64])
    return await handler(request)
