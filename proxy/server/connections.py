"""Every listener's connection handler (:class:`JsonErrors`) and its factory
(:class:`GuardedServer`), as aiohttp runs them with the listener's
:class:`~proxy.server.guard.Guard` (docs/security.md: "Slow and abusive connections"):

- a new connection past the listener's bounds is answered 503 and closed by the first
  protocol it meets (a Lobby on the proxy listener, this handler on the admin listeners);
- the head timeout runs from the connection's start for its first request (in the lobby,
  then in the handler it goes to with its deadline) and from the first byte of each later
  request, so trickling a head byte by byte does not stretch it; an idle kept-alive
  connection closes after ``keepalive_timeout`` (aiohttp's own timer, or the lobby's while
  parked);
- a request aiohttp cannot parse is answered in the gateway's JSON and told to the guard's
  ``MalformedLog`` instead of aiohttp's error log line.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader

from proxy.aiohttp_compat import (
    HandlerState,
    HttpProcessingError,
    LineTooLong,
    answer_started,
    line_limit,
    new_handler,
)
from proxy.errors import Reason, json_error
from proxy.server.guard import Guard, Slot

log = logging.getLogger("echowin_gateway")

MAX_LINE_BYTES = 8190
"""The longest request line every listener reads (aiohttp's default): past it, 414."""
MAX_FIELD_BYTES = 16 * 1024
"""The longest header field every listener reads: past it, 431."""


class JsonErrors(HandlerState):
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
        self._answered = 0  # requests answered (requests_parsed: requests parsed)
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
        self.head_by(self.event_loop.time() + self._guard.head_timeout)

    def head_by(self, deadline: float) -> None:
        """Close the connection at ``deadline`` (the loop's clock) unless a whole request
        head has come by then."""
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.event_loop.call_at(deadline, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.requests_parsed == self._answered:  # no head parsed that is not answered
            log.debug("request head timed out; connection closed")
            self.force_close()

    def data_received(self, data: bytes) -> None:
        body = self._unread_body
        if body is not None and body.is_eof():
            body = self._unread_body = None
        super().data_received(data)
        if self.requests_parsed != self._answered:  # a whole head came: no timer for it
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif self._head_timer is None and data and body is None:
            # The first bytes of the next request's head (on a kept-alive connection).
            self.head_by(self.event_loop.time() + self._guard.head_timeout)

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
        if answer_started(request):  # as aiohttp's
            raise ConnectionError("an answer was sent already; no error answer can follow")
        if isinstance(exc, LineTooLong):
            # Its limit says which: the request line's (the target) or a field's.
            too_long = line_limit(exc)
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


class GuardedServer(web.Server):
    """A listener's protocol factory, holding the listener's ``guard``."""

    __slots__ = ()
    guard: Guard

    def __call__(self) -> web.RequestHandler:
        return new_handler(self, JsonErrors)


__all__ = ["MAX_FIELD_BYTES", "MAX_LINE_BYTES", "GuardedServer", "JsonErrors"]
