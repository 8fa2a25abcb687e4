"""The listeners' runners: every listener's (:class:`JsonErrorRunner`: its connections
bounded and timed by its guard, unparsable requests answered in JSON) and the proxy
listener's (:class:`ProxyRunner`: connections start in the lobby). ``HANDLER_ARGS``: the
limits on a request head every listener's app is made with."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Generic

from aiohttp import web

from proxy.aiohttp_compat import ServerMaking
from proxy.server.connections import MAX_FIELD_BYTES, MAX_LINE_BYTES, GuardedServer
from proxy.server.guard import Guard
from proxy.server.lobby import Decide, Known, LobbyServer

HANDLER_ARGS = {"max_line_size": MAX_LINE_BYTES, "max_field_size": MAX_FIELD_BYTES}
"""``web.Application(handler_args=...)`` of every listener's app."""

CountConnections = Callable[[Callable[[], tuple[int, int, int]]], None]


class JsonErrorRunner(ServerMaking):
    """A runner whose connections are bounded and timed by ``guard`` and answer unparsable
    requests in JSON (see proxy/server/connections.py). aiohttp's keep-alive timeout is the
    guard's."""

    server_class: type[web.Server] = GuardedServer

    def __init__(self, app: web.Application, *, guard: Guard, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", guard.keepalive_timeout)
        super().__init__(app, **kwargs)
        self.guard = guard

    def server_made(self, server: web.Server) -> None:
        assert isinstance(server, GuardedServer)
        server.guard = self.guard


class ProxyRunner(JsonErrorRunner, Generic[Known]):
    """The proxy listener's runner: connections start in the lobby, where ``decide``
    holds a new connection's first request if it would wait."""

    server_class = LobbyServer

    def __init__(
        self,
        app: web.Application,
        decide: Decide[Known],
        forward_limit: Callable[[], int],
        count_connections: CountConnections | None = None,
        **kwargs: Any,
    ) -> None:
        """``count_connections``: given the server's ``counts`` once it exists (metrics)."""
        super().__init__(app, **kwargs)
        self._decide = decide
        self._forward_limit = forward_limit
        self._count_connections = count_connections

    def server_made(self, server: web.Server) -> None:
        super().server_made(server)
        assert isinstance(server, LobbyServer)
        server.decide = self._decide
        server.lobbies = set()
        server.held_count = 0
        server.handlers = 0
        server.forwarding = 0
        server.forward_limit = self._forward_limit
        server.ready = deque()
        server.drained = None
        server.closing = False
        if self._count_connections is not None:
            self._count_connections(server.counts)

    async def shutdown(self) -> None:
        """Before aiohttp waits for its handlers: the requests held in the lobby, within
        the same grace (what they take of it is taken from aiohttp's wait)."""
        server = self.server
        if isinstance(server, LobbyServer):
            loop = asyncio.get_running_loop()
            started = loop.time()
            grace = self.shutdown_timeout
            await server.drain(grace)
            self.shutdown_timeout = max(0.0, grace - (loop.time() - started))
        await super().shutdown()


__all__ = ["HANDLER_ARGS", "JsonErrorRunner", "ProxyRunner"]
