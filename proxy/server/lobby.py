"""How the listeners take their connections, and the proxy listener's lobby.

Every listener answers a request aiohttp cannot parse in the gateway's JSON
(:class:`JsonErrorRunner`). The proxy listener adds a lobby (:class:`ProxyRunner`): a new
connection starts with a :class:`Lobby` protocol instead of aiohttp's handler. aiohttp
holds a waiting request in about 10 KB (the parsed message, the connection's handler and
parser, two tasks, coroutine frames, the Request: docs/performance.md#memory). The lobby
reads the first request's head and asks ``decide`` whether it would wait for budget; if
so it is queued at once (``Admitter.hold``) and the connection keeps only the bytes read,
its transport and its place in the queue, with no coroutine. When the wait ends (a slot,
a refusal, the wait over), or anything else comes (the caller's EOF, the drain, more than
``BUFFER_BYTES`` of body), the connection goes to aiohttp's handler with the bytes read,
and the request handler takes the wait over (``Admitter.admit(request, held)``).

The lobby only chooses where a request waits: whatever it reads is read again by aiohttp
and decided again by the handler. A head it does not find plain (split across reads, a
field it reads given twice, a byte aiohttp might refuse) goes to aiohttp at once.

Every listener applies its :class:`~proxy.server.guard.Guard` (docs/security.md: "Slow and abusive
connections"): a new connection past the listener's bounds is answered 503 and closed by
the first protocol it meets (a Lobby, or aiohttp's handler on the admin listeners); the
head timeout runs from the connection's start for its first request (in the lobby, then
in the handler it goes to with its deadline) and from the first byte of each later
request, so trickling a head byte by byte does not stretch it; an idle kept-alive
connection closes after ``keepalive_timeout`` (aiohttp's own timer, or the lobby's while
parked); a request aiohttp cannot parse is told to the guard's ``MalformedLog`` instead of
aiohttp's error log line.

aiohttp's private attributes read here (aiohttp 3.14; the one module that touches them):
``web.Server._loop`` and ``._kwargs`` (to make handlers); ``RequestHandler._request_count``
(requests parsed on the connection: a whole head came), ``._waiter``, ``._messages``,
``._request_in_progress``, ``._keepalive``, ``._close``, ``._force_close``, ``._upgraded``,
``._payload_parser``, ``._paused`` (an idle connection, for parking), ``._loop``; and
``AppRunner._shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from proxy.budget.admission import Held
from proxy.errors import Reason, json_error
from proxy.server.guard import Guard, Slot

log = logging.getLogger("echowin_gateway")

MAX_LINE_BYTES = 8190
"""The longest request line every listener reads (aiohttp's default): past it, 414."""
MAX_FIELD_BYTES = 16 * 1024
"""The longest header field every listener reads: past it, 431."""
HANDLER_ARGS = {"max_line_size": MAX_LINE_BYTES, "max_field_size": MAX_FIELD_BYTES}

BUFFER_BYTES = 64 * 1024
"""Body bytes a waiting request's connection reads ahead; past them it stops reading."""
HEAD_BYTES = 8 * 1024
"""A longer head goes to aiohttp at once (whose own limit on the request line is 8190)."""

# The fields a decision reads; the others stay in the bytes for aiohttp.
_READ = frozenset(
    {
        b"authorization",
        b"x-api-key",
        b"x-agency-key",
        b"x-gateway-max-wait",
        b"expect",
        b"content-length",
        b"transfer-encoding",
        b"x-forwarded-for",  # the client behind a trusted proxy (the auth throttle)
    }
)
_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[\x21-\x7e]*) HTTP/1\.[01]")
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Control bytes other than tab, and CR or LF outside a CRLF.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")


class Head:
    """A request head as the lobby reads it: method, target, the fields it decides on, and
    its body's length and the request's size on the wire (head and body), when the length
    is known (a Content-Length of at most 18 digits, or none, and no Transfer-Encoding).
    ``peer``: the connection's peer address as aiohttp's ``request.remote`` reads it, set
    by the lobby that read the head."""

    __slots__ = ("fields", "length", "method", "peer", "size", "target")

    def __init__(self, method: str, target: str, fields: CIMultiDict[str], head_size: int) -> None:
        self.method = method
        self.target = target
        self.fields = fields
        length = fields.get("Content-Length", "0")
        known = length.isdigit() and len(length) <= 18 and "Transfer-Encoding" not in fields
        self.length = int(length) if known else None
        self.size = None if self.length is None else head_size + self.length
        self.peer: str | None = None


def parse_head(data: bytes) -> Head | None:
    """The head at the start of ``data``, if ``data`` holds all of it and it is plain;
    None leaves the request to aiohttp."""
    end = data.find(b"\r\n\r\n", 0, HEAD_BYTES)
    if end < 0 or _CONTROL.search(data, 0, end + 4) is not None:
        return None
    lines = data[:end].split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return None
    fields: CIMultiDict[str] = CIMultiDict()
    for raw in lines[1:]:
        name, colon, value = raw.partition(b":")
        if not colon or _FIELD_NAME.fullmatch(name) is None:
            return None  # obs-fold, a space before the colon, no name
        if name.lower() in _READ:
            key = name.decode("ascii")
            if key in fields or not value.isascii():
                return None
            fields[key] = value.strip(b" \t").decode("ascii")
    return Head(line[1].decode("ascii"), line[2].decode("ascii"), fields, end + 4)


class Waiting(Protocol):
    """A request queued from the lobby, as ``decide`` made it."""

    held: Held
    arrived: float  # when the lobby queued it (time.perf_counter)

    def taken(self) -> None:
        """Its handler runs: the request is the handler's to answer and account."""

    def release(self) -> None:
        """Given up before its handler ran (aiohttp refused the bytes): not accounted."""

    def gone(self) -> None:
        """The caller left before its handler ran (in the lobby, or as the connection
        went to aiohttp): given up, and accounted (499)."""


class JsonErrors(web.RequestHandler):
    """aiohttp's connection handler, as every listener runs it, with the listener's
    ``Guard``:

    - a new connection past the listener's bounds is refused (``Guard.admit``) before
      aiohttp sees it; ``slot``: its place in the count, given back when it is lost;
    - a request head must come whole by ``Guard.head_timeout`` after the connection's start
      (or, for a later request on the connection, after its first byte), or the connection
      closes (``head_by``);
    - its own answers to a request it cannot parse (a bad request line or header, a header
      over ``max_field_size``) are the gateway's JSON instead of text, the connection still
      closing after them, and are told to the guard's ``MalformedLog`` instead of aiohttp's
      error line with the caller's address. ``refused``: it answered one.
    """

    __slots__ = ("_answered", "_guard", "_head_timer", "_unread_body", "refused", "slot")

    def __init__(self, server: GuardedServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._guard = server.guard
        self.refused = False
        self.slot: Slot | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._answered = 0  # requests answered; aiohttp's _request_count: requests parsed
        # The body of the last request answered, if it was not all in by then: the bytes
        # that come next are that body's (aiohttp reads it to keep the connection), not a
        # head's, until it is.
        self._unread_body: StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.slot is not None:  # from a lobby, which admitted it and times its head
            super().connection_made(transport)
            return
        slot = self._guard.admit(transport)
        if slot is None:
            return  # refused: answered, and closing
        self.slot = slot
        super().connection_made(transport)
        self.head_by(self._loop.time() + self._guard.head_timeout)

    def head_by(self, deadline: float) -> None:
        """Close the connection at ``deadline`` (the loop's clock) unless a whole request
        head has come by then."""
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self._loop.call_at(deadline, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._request_count == self._answered:  # no head parsed that is not answered
            log.debug("request head timed out; connection closed")
            self.force_close()

    def data_received(self, data: bytes) -> None:
        body = self._unread_body
        if body is not None and body.is_eof():
            body = self._unread_body = None
        super().data_received(data)
        if self._request_count != self._answered:  # a whole head came: no timer for it
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif self._head_timer is None and data and body is None:
            # The first bytes of the next request's head (on a kept-alive connection).
            self.head_by(self._loop.time() + self._guard.head_timeout)

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        # aiohttp calls this once per request, as its answer is written (or fails to be).
        self._answered += 1
        content = request.content
        if not content.is_eof():
            self._unread_body = content
        super().log_access(request, response, time)

    def connection_lost(self, exc: BaseException | None) -> None:
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.release()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._unread_body = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own would log "Error handling request from <address>" at error level,
        # with a traceback: for every malformed request any caller may send.
        self.refused = True
        self.log_exception("request failed", exc_info=exc, status=status)
        if request.writer.output_size > 0:  # as aiohttp's: some of an answer went already
            raise ConnectionError("an answer was sent already; no error answer can follow")
        if isinstance(exc, LineTooLong):
            # Its limit says which: the request line's (the target) or a field's.
            too_long = exc.args[1] if len(exc.args) > 1 else None
            status = (
                HTTPStatus.REQUEST_URI_TOO_LONG
                if too_long == MAX_LINE_BYTES
                else HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            )
        phrase = HTTPStatus(status).phrase
        answer = json_error(status, phrase, reason=Reason.BAD_REQUEST if status < 500 else None)
        answer.force_close()
        return answer

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's error log (its handler's: a request it could not parse, a body cut
        short while it read it, a request handler that raised): a caller's bad bytes go to
        the quiet ``MalformedLog``; anything else is the gateway's own failure, one error
        line naming the exception's class, never the caller's address."""
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            self._guard.malformed.note(kw.get("status", 400), exc)
            return
        error = type(exc).__name__ if isinstance(exc, BaseException) else None
        log.error("request failed", extra={"fields": {"error": error}})


class HeldHandler(JsonErrors):
    """The proxy listener's connection handler, given the connection by the lobby with the
    bytes it read. ``waiting``: its first request's place in the queue, taken in the lobby,
    until the request handler takes it (``take_waiting``). ``size``: that request's bytes
    on the wire, if known; ``fed``: the bytes given to aiohttp's parser. When they are equal
    once the answer is out, no byte of a next request was read: while the listener holds
    more than ``PARK_ABOVE`` connections, the idle connection goes back to a lobby
    (``park``) instead of keeping its handler, parser and last request until the next."""

    __slots__ = ("_lobby_server", "fed", "forwarding", "size", "waiting")

    def __init__(self, server: LobbyServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._lobby_server: LobbyServer | None = server
        self.waiting: Waiting | None = None
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
        waiting, self.waiting = self.waiting, None
        if waiting is not None:  # the request handler never ran
            if self.refused:  # aiohttp answered the bytes itself: no request to account
                waiting.release()
            else:  # the caller left as the connection came from the lobby
                waiting.gone()
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
            or not _idle(self)
            # A lobby neither writes nor hears of the transport's pause_writing: a handler
            # that came after it would write without backpressure.
            or getattr(self, "_paused", True)
            or transport.get_write_buffer_size() != 0
        ):
            return False
        slot, self.slot = self.slot, None  # the connection's place goes with it
        self.transport = None  # kept open: the handler lets go of it, as if it were lost
        self.connection_lost(None)
        lobby = Lobby(server, slot)
        transport.set_protocol(lobby)
        lobby.connection_made(transport)
        return True


PARK_ABOVE = 512
"""Connections (in the lobby and in aiohttp's handlers) above which an idle keep-alive
connection waits in a lobby: about 1.5 KB each instead of about 12 KB."""


def _idle(handler: web.RequestHandler) -> bool:
    """aiohttp's handler waits for a next request it has none of, and will keep the
    connection. Read from aiohttp's own state (3.14); anything unknown reads as busy."""
    waiter = getattr(handler, "_waiter", None)
    return (
        waiter is not None
        and not waiter.done()
        and not getattr(handler, "_messages", True)
        and not getattr(handler, "_request_in_progress", True)
        and getattr(handler, "_keepalive", False) is True
        and not getattr(handler, "_close", True)
        and not getattr(handler, "_force_close", True)
        and not getattr(handler, "_upgraded", True)
        and getattr(handler, "_payload_parser", True) is None
    )


def on_its_way(request: web.BaseRequest) -> Callable[[], None] | None:
    """What to call once the request's head has left for echowin: the lobby then hands
    over the next request granted (see ``LobbyServer.forwarding``)."""
    protocol = request.protocol
    if isinstance(protocol, HeldHandler) and protocol.forwarding:
        return protocol.done_forwarding
    return None


def take_waiting(request: web.BaseRequest) -> Waiting | None:
    """The request's place in the queue, if it was queued in the lobby (once). The first
    request of a connection from the lobby, its size known, may see the connection parked
    once it is answered, if the listener is crowded by then. Later requests on a
    connection that was not parked pass through here with three attribute reads."""
    protocol = request.protocol
    if not isinstance(protocol, HeldHandler):
        return None
    waiting = protocol.waiting
    if waiting is None and protocol.fed != protocol.size:
        return None  # not the lobby's request, and its connection cannot be parked
    task = asyncio.current_task()
    if task is not None:
        if protocol.forwarding:
            task.add_done_callback(protocol.done_forwarding)
        task.add_done_callback(protocol.park_when_idle)
    if waiting is not None:
        protocol.waiting = None
        waiting.taken()
    return waiting


class GuardedServer(web.Server):
    """A listener's protocol factory, holding the listener's ``guard``."""

    __slots__ = ()
    guard: Guard

    def __call__(self) -> web.RequestHandler:
        return JsonErrors(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """A runner whose connections are bounded and timed by ``guard`` and answer unparsable
    requests in JSON (see :class:`JsonErrors`). aiohttp's keep-alive timeout is the
    guard's."""

    def __init__(self, app: web.Application, *, guard: Guard, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", guard.keepalive_timeout)
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer  # aiohttp makes the Server; only its class changes
        assert isinstance(server, GuardedServer)
        server.guard = self.guard
        return server


Decide = Callable[[Head, Any], "Waiting | asyncio.Future[Any] | None"]
"""``decide(head, known)``: queue the head's request if it would wait (a Waiting), leave
it to aiohttp (None), or a future to wait for first (the token's check), whose result is
given back as ``known``."""


class LobbyServer(GuardedServer):
    """The proxy listener's protocol factory: every connection starts in a Lobby."""

    decide: Decide
    lobbies: set[Lobby]  # connections in the lobby
    waiting: int  # of them, those whose request waits
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

    def handler(self) -> HeldHandler:
        return HeldHandler(self, loop=self._loop, **self._kwargs)

    def counts(self) -> tuple[int, int, int]:
        """Connections: in the lobby idle, in the lobby waiting, in aiohttp's handlers."""
        return len(self.lobbies) - self.waiting, self.waiting, self.handlers

    def forwarded(self) -> None:
        self.forwarding -= 1
        ready = self.ready
        while ready and self.forwarding < self.forward_limit():
            ready.popleft().forward()

    def stopped_waiting(self) -> None:
        self.waiting -= 1
        drained = self.drained
        if drained is not None and not drained.done() and not self.waiting:
            drained.set_result(None)

    async def drain(self, within: float) -> None:
        """Close the connections that sent nothing yet, give aiohttp the requests not
        queued, and wait up to ``within`` seconds for those waiting in the lobby to leave
        it (the drain's shed answers them)."""
        for lobby in list(self.lobbies):
            lobby.leave()
        if not self.waiting:
            return
        self.drained = self._loop.create_future()
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
        "waiting",
    )

    def __init__(self, server: LobbyServer, slot: Slot | None = None) -> None:
        self._server = server
        self._slot = slot
        self._transport: asyncio.Transport | None = None
        self._data = b""
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._size: int | None = None  # the request's bytes on the wire, if known
        self.waiting: Waiting | None = None

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

    def _decide(self, head: Head, known: object) -> None:
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
            self.waiting = decision
            self._server.waiting += 1
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
        waiting = self.waiting
        if self._transport is None or self._transport.is_closing() or waiting is None:
            return  # closing: connection_lost gives the place up and accounts the 499
        if not waiting.held.granted:
            self._hand_over(self._data)  # refused, or its wait is over: answered at once
            return
        server = self._server
        if server.forwarding < server.forward_limit():
            self.forward()
        else:
            server.ready.append(self)  # handed over as an earlier one finishes

    def forward(self) -> None:
        """The request, granted its slot, goes on in aiohttp's handler."""
        if self._transport is None or self._transport.is_closing() or self.waiting is None:
            return  # gone while it waited in ``ready``
        self._server.forwarding += 1
        self._hand_over(self._data).forwarding = True

    def eof_received(self) -> bool | None:
        # The connection closes, as aiohttp's does at the caller's EOF: a request waiting
        # here is given up (connection_lost), one not decided yet is aiohttp's to account.
        if self._data and self.waiting is None:
            self._hand_over(self._data).eof_received()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._close_lobby()
        self._data = b""
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            self._server.stopped_waiting()
            waiting.gone()

    def leave(self) -> None:
        """The drain: a request read goes to aiohttp now, a connection without one closes."""
        if self._transport is None or self.waiting is not None:
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

    def _hand_over(self, data: bytes, head_deadline: float | None = None) -> HeldHandler:
        """The connection, with ``data`` read, goes to aiohttp's handler; ``head_deadline``:
        when the head must be whole (None: ``data`` holds it all)."""
        transport = self._transport
        assert transport is not None
        handler = self._server.handler()
        handler.slot, self._slot = self._slot, None
        handler.size = self._size
        handler.waiting, self.waiting = self.waiting, None
        self._data = b""
        self._close_lobby()
        if handler.waiting is not None:
            self._server.stopped_waiting()
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


class ProxyRunner(JsonErrorRunner):
    """The proxy listener's runner: connections start in the lobby, where ``decide``
    queues a new connection's first request if it would wait."""

    def __init__(
        self,
        app: web.Application,
        decide: Decide,
        forward_limit: Callable[[], int],
        count_connections: Callable[[Callable[[], tuple[int, int, int]]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        """``count_connections``: given the server's ``counts`` once it exists (metrics)."""
        super().__init__(app, **kwargs)
        self._decide = decide
        self._forward_limit = forward_limit
        self._count_connections = count_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = LobbyServer
        assert isinstance(server, LobbyServer)
        server.decide = self._decide
        server.lobbies = set()
        server.waiting = 0
        server.handlers = 0
        server.forwarding = 0
        server.forward_limit = self._forward_limit
        server.ready = deque()
        server.drained = None
        server.closing = False
        if self._count_connections is not None:
            self._count_connections(server.counts)
        return server

    async def shutdown(self) -> None:
        """Before aiohttp waits for its handlers: the lobby's waiting requests, within the
        same grace (what they take of it is taken from aiohttp's wait)."""
        server = self.server
        if isinstance(server, LobbyServer):
            loop = asyncio.get_running_loop()
            started = loop.time()
            grace = self._shutdown_timeout
            await server.drain(grace)
            self._shutdown_timeout = max(0.0, grace - (loop.time() - started))
        await super().shutdown()


__all__ = [
    "HeldHandler",
    "JsonErrorRunner",
    "Lobby",
    "ProxyRunner",
    "Waiting",
    "parse_head",
    "take_waiting",
]
