"""The proxy listener's lobby: where a new connection's first request waits for budget.

A new connection starts with a :class:`Lobby` protocol instead of aiohttp's handler.
aiohttp holds a waiting request in about 10 KB (the parsed message, the connection's
handler and parser, two tasks, coroutine frames, the Request: docs/performance.md#memory).
The lobby reads the first request's head (proxy/server/head.py) and asks ``decide``
whether it would wait for budget; if so it is held at once (a :class:`HeldRequest`) and
the connection keeps only the bytes read, its transport and its place in the queue, with
no coroutine. When the wait ends (a slot, a refusal, the wait over), or anything else comes
(the caller's EOF, the drain, more than ``BUFFER_BYTES`` of body), the connection goes to
aiohttp's handler (proxy/server/proxy_handler.py) with the bytes read, and the request
handler takes the held request over (``take_held``).

The lobby applies the listener's guard as aiohttp's handler does
(proxy/server/connections.py): the connection bounds, and the head timeout from the
connection's start; parked between requests, the keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

from proxy.aiohttp_compat import new_handler
from proxy.budget.admission import Held
from proxy.server.connections import GuardedServer
from proxy.server.guard import Slot
from proxy.server.head import Head, parse_head
from proxy.server.proxy_handler import ProxyHandler, held_since, on_its_way, take_held

log = logging.getLogger("echowin_gateway")

BUFFER_BYTES = 64 * 1024
"""Body bytes a held request's connection reads ahead; past them it stops reading."""

Known = TypeVar("Known")


class HeldRequest(Protocol):
    """A request held from the lobby, as ``decide`` made it."""

    held: Held
    arrived: float  # when the lobby held it (time.perf_counter)

    def taken(self) -> None:
        """Its handler runs: the request is the handler's to answer and account."""

    def release(self) -> None:
        """Given up before its handler ran (aiohttp refused the bytes): not accounted."""

    def gone(self) -> None:
        """The caller left before its handler ran (in the lobby, or as the connection
        went to aiohttp): given up, and accounted (499)."""


Decide = Callable[[Head, Known | None], "HeldRequest | asyncio.Future[Known] | None"]
"""``decide(head, known)``: hold the head's request if it would wait (a HeldRequest),
leave it to aiohttp (None), or a future to wait for first (the token's check), whose
result is given back as ``known`` (None the first time)."""


class LobbyServer(GuardedServer):
    """The proxy listener's protocol factory: every connection starts in a Lobby."""

    decide: Decide[Any]
    lobbies: set[Lobby]  # connections in the lobby
    held_count: int  # of them, those whose request is held
    handlers: int  # connections in aiohttp's handlers
    # Granted requests handed to aiohttp whose heads have not left for echowin yet (nor
    # their handlers ended), at most forward_limit() (the upstream pool's size): the
    # others granted wait in ``ready``, in order, with no handler of their own.
    forwarding: int
    forward_limit: Callable[[], int]
    ready: deque[Lobby]
    drained: asyncio.Future[None] | None  # set while draining: done once none waits
    closing: bool  # the listener is stopping: no connection goes back to a lobby

    def pre_shutdown(self) -> None:
        self.closing = True
        super().pre_shutdown()

    def __call__(self) -> Lobby:  # type: ignore[override]
        return Lobby(self)

    def handler(self) -> ProxyHandler:
        return new_handler(self, ProxyHandler)

    def lobby(self, slot: Slot | None) -> Lobby:
        """A lobby for a connection parked between requests, with its ``slot``."""
        return Lobby(self, slot)

    def counts(self) -> tuple[int, int, int]:
        """Connections: in the lobby idle, in the lobby held, in aiohttp's handlers."""
        return len(self.lobbies) - self.held_count, self.held_count, self.handlers

    def forwarded(self) -> None:
        self.forwarding -= 1
        ready = self.ready
        while ready and self.forwarding < self.forward_limit():
            ready.popleft().forward()

    def stopped_holding(self) -> None:
        self.held_count -= 1
        drained = self.drained
        if drained is not None and not drained.done() and not self.held_count:
            drained.set_result(None)

    async def drain(self, within: float) -> None:
        """Close the connections that sent nothing yet, give aiohttp the requests not
        held, and wait up to ``within`` seconds for those held in the lobby to leave
        it (the drain's shed answers them)."""
        for lobby in list(self.lobbies):
            lobby.leave()
        if not self.held_count:
            return
        self.drained = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self.drained), within)
        except TimeoutError:
            for lobby in list(self.lobbies):
                lobby.close()  # never answered: as aiohttp cancels what is left


class Lobby(asyncio.Protocol):
    """One connection until its first request goes to aiohttp (see the module's text).
    ``slot``: the connection's place in the listener's count, when it comes back from
    aiohttp's handler to wait for its next request (parked); a new connection takes one."""

    __slots__ = (
        "_data",
        "_paused",
        "_server",
        "_size",
        "_slot",
        "_timer",
        "_transport",
        "held",
    )

    def __init__(self, server: LobbyServer, slot: Slot | None = None) -> None:
        self._server = server
        self._slot = slot
        self._transport: asyncio.Transport | None = None
        self._data = b""
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._size: int | None = None  # the request's bytes on the wire, if known
        self.held: HeldRequest | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._server.guard
        if self._slot is None:  # a new connection: its first head is due within the timeout
            self._slot = guard.admit(transport)
            if self._slot is None:
                return  # refused: answered, and closing
            wait = guard.head_timeout
        else:  # parked between requests: idle until the next one's first byte
            wait = guard.keepalive_timeout
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._server.lobbies.add(self)
        self._timer = asyncio.get_running_loop().call_later(wait, self.close)

    def data_received(self, data: bytes) -> None:
        if self._data:  # a body, or the next request: kept for aiohttp
            self._data += data
            self._keep_within_buffer()
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._server.guard.head_timeout
        if self._timer is not None:
            # A new connection's head is due by its first deadline; a parked one's within
            # the timeout of this first byte, and within its idle bound (as in aiohttp).
            deadline = min(deadline, self._timer.when())
            self._timer.cancel()
            self._timer = None
        head = parse_head(data)
        if head is None:
            self._hand_over(data, deadline)  # the rest of the head, or aiohttp's 400
            return
        self._data = data
        self._size = head.size
        head.peer = _peer_of(self._transport)
        self._decide(head, None)

    def _decide(self, head: Head, known: Any) -> None:
        try:
            decision = self._server.decide(head, known)
        except Exception:  # a bug must not cost the connection: aiohttp and the handler
            log.exception("the lobby could not decide; the request goes to its handler")
            decision = None
        if isinstance(decision, asyncio.Future):  # the token's check first
            decision.add_done_callback(functools.partial(self._checked, head))
        elif decision is None:
            self._hand_over(self._data)
        else:
            self.held = decision
            self._server.held_count += 1
            self._keep_within_buffer()
            decision.held.future.add_done_callback(self._settled)

    def _keep_within_buffer(self) -> None:
        if len(self._data) > BUFFER_BYTES and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _checked(self, head: Head, check: asyncio.Future[Any]) -> None:
        if self._transport is None:
            return  # gone, or handed over meanwhile
        if check.cancelled() or check.exception() is not None:
            self._hand_over(self._data)  # the request handler tells the caller
        else:
            self._decide(head, check.result())

    def _settled(self, _: object) -> None:
        request = self.held
        if self._transport is None or self._transport.is_closing() or request is None:
            return  # closing: connection_lost gives the place up and accounts the 499
        if not request.held.granted:
            self._hand_over(self._data)  # refused, or its wait is over: answered at once
            return
        server = self._server
        if server.forwarding < server.forward_limit():
            self.forward()
        else:
            server.ready.append(self)  # handed over as an earlier one finishes

    def forward(self) -> None:
        """The request, granted its slot, goes on in aiohttp's handler."""
        if self._transport is None or self._transport.is_closing() or self.held is None:
            return  # gone while it waited in ``ready``
        self._server.forwarding += 1
        self._hand_over(self._data).forwarding = True

    def eof_received(self) -> bool | None:
        # The connection closes, as aiohttp's does at the caller's EOF: a request held
        # here is given up (connection_lost), one not decided yet is aiohttp's to account.
        if self._data and self.held is None:
            self._hand_over(self._data).eof_received()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._close_lobby()
        self._data = b""
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()
        held, self.held = self.held, None
        if held is not None:
            self._server.stopped_holding()
            held.gone()

    def leave(self) -> None:
        """The drain: a request read goes to aiohttp now, a connection without one closes."""
        if self._transport is None or self.held is not None:
            return
        if self._data:
            self._hand_over(self._data)
        else:
            self._transport.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _close_lobby(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        self._server.lobbies.discard(self)

    def _hand_over(self, data: bytes, head_deadline: float | None = None) -> ProxyHandler:
        """The connection, with ``data`` read, goes to aiohttp's handler; ``head_deadline``:
        when the head must be whole (None: ``data`` holds it all)."""
        transport = self._transport
        assert transport is not None
        handler = self._server.handler()
        handler.slot, self._slot = self._slot, None
        handler.size = self._size
        handler.held, self.held = self.held, None
        self._data = b""
        self._close_lobby()
        if handler.held is not None:
            self._server.stopped_holding()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if head_deadline is not None:
            handler.head_by(head_deadline)
        if self._paused:
            transport.resume_reading()
        if data:
            handler.data_received(data)
        return handler


def _peer_of(transport: asyncio.BaseTransport | None) -> str | None:
    """The peer's address as aiohttp's ``BaseRequest.remote`` gives it."""
    peer = None if transport is None else transport.get_extra_info("peername")
    if isinstance(peer, list | tuple):
        return str(peer[0])
    return None if peer is None else str(peer)


# Head, on_its_way and take_held: what the request handler uses of the lobby, in one place.
__all__ = [
    "BUFFER_BYTES",
    "Decide",
    "Head",
    "HeldRequest",
    "Known",
    "Lobby",
    "LobbyServer",
    "held_since",
    "on_its_way",
    "take_held",
]
