"""The proxy listener's connection handler (:class:`ProxyHandler`): aiohttp's handler for
a connection the lobby hands over, with the bytes the lobby read and, if its first request
was held there, that request's place in the queue, until the request handler takes it
(:func:`take_held`). When the listener is crowded, a connection idle between requests goes
back to a lobby (``park_if_idle``): about 1.5 KB instead of about 12 KB.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.aiohttp_compat import handler_idle, writing_paused
from proxy.server.connections import JsonErrors

if TYPE_CHECKING:
    from proxy.server.lobby import HeldRequest, LobbyServer

PARK_ABOVE = 512
"""Connections (in the lobby and in aiohttp's handlers) above which an idle keep-alive
connection waits in a lobby: about 1.5 KB each instead of about 12 KB."""


class ProxyHandler(JsonErrors):
    """The proxy listener's connection handler, given the connection by the lobby with the
    bytes it read. ``held``: its first request's place in the queue, taken in the lobby,
    until the request handler takes it (``take_held``). ``size``: that request's bytes
    on the wire, if known; ``fed``: the bytes given to aiohttp's parser. When they are equal
    once the answer is out, no byte of a next request was read: while the listener holds
    more than ``PARK_ABOVE`` connections, the idle connection goes back to a lobby
    (``park``) instead of keeping its handler, parser and last request until the next."""

    __slots__ = ("_lobby_server", "fed", "forwarding", "held", "size")

    def __init__(self, server: LobbyServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._lobby_server: LobbyServer | None = server
        self.held: HeldRequest | None = None
        self.size: int | None = None
        self.fed = 0
        self.forwarding = False  # its request was granted a slot in the lobby, and goes on

    def done_forwarding(self, done: object = None) -> None:
        if self.forwarding and self._lobby_server is not None:
            self.forwarding = False
            self._lobby_server.forwarded()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert self._lobby_server is not None
        self._lobby_server.handlers += 1
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.fed += len(data)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        held, self.held = self.held, None
        if held is not None:  # the request handler never ran
            if self.refused:  # aiohttp answered the bytes itself: no request to account
                held.release()
            else:  # the caller left as the connection came from the lobby
                held.gone()
        self.done_forwarding()
        if self._lobby_server is not None:
            self._lobby_server.handlers -= 1
            self._lobby_server = None
        super().connection_lost(exc)

    def park_when_idle(self, done: object) -> None:
        """The request handler's task is done: once aiohttp's ``start`` has seen it (a
        turn of the loop later: on Python 3.12 and later the task may finish before
        ``start`` awaits it), ``park_if_idle``."""
        asyncio.get_running_loop().call_soon(self.park_if_idle)

    def park_if_idle(self) -> bool:
        """If the connection is idle between requests, all of its answer handed to the
        socket, and the listener is crowded: back to a lobby with it. True if parked."""
        server = self._lobby_server
        transport = self.transport
        if (
            server is None
            or server.closing
            or transport is None
            or self.size is None
            or self.fed != self.size
            or server.handlers + len(server.lobbies) <= PARK_ABOVE
            or not handler_idle(self)
            # A lobby neither writes nor hears of the transport's pause_writing: a handler
            # that came after it would write without backpressure.
            or writing_paused(self)
            or transport.get_write_buffer_size() != 0
        ):
            return False
        slot, self.slot = self.slot, None  # the connection's place goes with it
        self.transport = None  # kept open: the handler lets go of it, as if it were lost
        self.connection_lost(None)
        lobby = server.lobby(slot)
        transport.set_protocol(lobby)
        lobby.connection_made(transport)
        return True


def on_its_way(request: web.BaseRequest) -> Callable[[], None] | None:
    """What to call once the request's head has left for echowin: the lobby then hands
    over the next request granted (see ``LobbyServer.forwarding``)."""
    protocol = request.protocol
    if isinstance(protocol, ProxyHandler) and protocol.forwarding:
        return protocol.done_forwarding
    return None


def take_held(request: web.BaseRequest) -> HeldRequest | None:
    """The request's place in the queue, if it was queued in the lobby (once). The first
    request of a connection from the lobby, its size known, may see the connection parked
    once it is answered, if the listener is crowded by then. Later requests on a
    connection that was not parked pass through here with three attribute reads."""
    protocol = request.protocol
    if not isinstance(protocol, ProxyHandler):
        return None
    held = protocol.held
    if held is None and protocol.fed != protocol.size:
        return None  # not the lobby's request, and its connection cannot be parked
    task = asyncio.current_task()
    if task is not None:
        if protocol.forwarding:
            task.add_done_callback(protocol.done_forwarding)
        task.add_done_callback(protocol.park_when_idle)
    if held is not None:
        protocol.held = None
        held.taken()
    return held


def held_since(request: web.BaseRequest) -> float | None:
    """When the lobby held the request in the budget's queue (``time.perf_counter()``),
    if it did and its handler has not taken it over yet; reads only (see ``take_held``)."""
    protocol = request.protocol
    held = protocol.held if isinstance(protocol, ProxyHandler) else None
    return None if held is None else held.arrived


__all__ = ["PARK_ABOVE", "ProxyHandler", "held_since", "on_its_way", "take_held"]
