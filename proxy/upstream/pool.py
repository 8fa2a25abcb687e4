"""The pool of keep-alive connections to echowin and one exchange on it
(:class:`Upstream`), echowin's answer as it streams (:class:`UpstreamResponse`), and the
failures a caller is told (:class:`UpstreamError` and its kinds)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterable, Callable
from types import TracebackType

import aiohttp
from aiohttp import hdrs
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.aiohttp_compat import Connection, HttpProcessingError, start_exchange
from proxy.auth.routes import API_PREFIX


class UpstreamError(Exception):
    """An exchange with echowin that produced no usable response. ``sent`` is False only
    when no byte of the request can have left (the budget gets the slot back then)."""

    kind = "error"

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class UpstreamUnreachable(UpstreamError):
    """Connect failure or reset."""

    kind = "connect"

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message, sent=sent)
        if sent:
            self.kind = "reset"


_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
IDLE_SECONDS = 15.0
"""A pooled connection idle this long is closed instead of reused (echowin's side may have
closed it already; a request sent on a dead connection fails after it may have left)."""
READ_BUFSIZE = 2**16


class UpstreamResponse:
    """echowin's answer: ``status``, ``reason``, ``headers``, and ``content``, the body as
    it arrives. The caller reads the body and then calls :meth:`release` (always): the
    connection goes back to the pool when the body was read to its end, else it is closed.
    Reading past the request's deadline raises ``TimeoutError``."""

    __slots__ = ("_proto", "_timer", "_upstream", "content", "headers", "status")

    def __init__(
        self,
        upstream: Upstream,
        proto: Connection,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
    ) -> None:
        """``deadline``: the request's, on ``loop``'s clock."""
        self._upstream = upstream
        self._proto: Connection | None = proto
        self._timer: asyncio.TimerHandle | None = loop.call_at(deadline, self._expire)
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content: StreamReader | None = None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get(hdrs.CONTENT_LENGTH)
        return int(value) if value is not None and value.isdigit() else None

    def _expire(self) -> None:
        """The request's deadline passed: fail what waits on the head or the body."""
        self._timer = None
        content = self.content
        if content is None or not content.is_eof():
            # (A complete answer, maybe aiohttp's shared EMPTY_PAYLOAD, which must never
            # carry an exception, is left alone: only the caller is slow to take it.)
            exc = aiohttp.ServerTimeoutError("echowin did not answer in time")
            if self._proto is not None:
                self._proto.set_exception(exc)
            if content is not None:
                content.set_exception(exc)
        if content is not None:
            # The head was handed out: its reader may be stuck writing to a caller that
            # stopped reading. The connection must not wait for that caller: back to the
            # pool if the answer is complete, else closed (send() cleans up before that).
            self.release()

    def release(self) -> None:
        """Give the connection back (or close it when the body was not read to its end)."""
        proto = self._proto
        if proto is None:
            return
        self._proto = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._upstream._release(proto)


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class Upstream:
    """A keep-alive pool of HTTP/1.1 connections to echowin. Open with ``async with`` or
    start/close.

    Requests are written and answers parsed by aiohttp's own client protocol (the C
    parser, the header serialiser that refuses CR and LF in a field); what aiohttp's
    ClientSession adds on top (cookies, redirects, tracing, per-request URL and header
    objects, a connector with DNS cache and per-host locks) has no use here and cost more
    than half of a proxied request's CPU time. One timeout, ``timeout_seconds``, covers
    a request from waiting for a connection to the last byte of the answer; connecting
    has its own, shorter one.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_seconds: float,
        connect_timeout_seconds: float,
        max_connections: int,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        url = URL(self.base_url)
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError("upstream base URL must be http(s)://host[:port][/path]")
        self._tls = url.scheme == "https"
        self._host = url.raw_host
        self._port = url.port or (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        default = 443 if self._tls else 80
        self.host = host if self._port == default else f"{host}:{self._port}"
        """The Host field for echowin: what the caller puts first in ``send``'s headers."""
        self._prefix = url.raw_path.rstrip("/")
        # echowin's origin as a Location may write it: the default port left out or not.
        origin = f"{url.scheme}://{host}".lower()
        self._origins = (f"{origin}:{self._port}", *((origin,) if self._port == default else ()))
        self._api = self._prefix + API_PREFIX
        self._timeout = timeout_seconds
        self._connect_timeout = connect_timeout_seconds
        self._max_connections = max_connections
        self._ssl: ssl.SSLContext | None = None
        self._idle: deque[tuple[Connection, float]] = deque()
        self._open = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._started = False

    def relative(self, url: str) -> str:
        """``url`` as the gateway's own path when it points into echowin's API (as a
        ``Location`` echowin sends may), so that the caller comes back through the
        gateway; any other URL (echowin's web pages included: the gateway serves its API
        only) unchanged."""
        for origin in self._origins:
            n = len(origin)
            if url[:n].lower() == origin and url.startswith(self._api, n):
                return url[n + len(self._prefix) :]
        return url

    async def start(self) -> None:
        if self._tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        self._started = True

    async def close(self) -> None:
        self._started = False
        while self._idle:
            self._discard(self._idle.popleft()[0])
        while self._waiters:  # each learns the pool is closed (it was counted a place)
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)

    async def __aenter__(self) -> Upstream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- the pool ---------------------------------------------------------------------

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Connection:
        """A connection: an idle one, a new one, or one handed over by a request that is
        done with it, first come first served (a caller never overtakes one that waits)."""
        if not self._started:
            raise UpstreamUnreachable("the upstream pool is closed", sent=False)
        idle = self._idle
        now = loop.time()
        while idle and now - idle[0][1] > IDLE_SECONDS:  # the oldest first
            self._discard(idle.popleft()[0])
            self._hand_on()
        if not self._waiters:
            while idle:  # the most recently used: the least likely to have been closed
                proto = idle.pop()[0]
                if self._reusable(proto):
                    return proto
                self._discard(proto)
            if self._open < self._max_connections:
                self._open += 1
                return await self._connect(loop, deadline)
        waiter: asyncio.Future[Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                handed = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Handed a connection (or a place to open one) but leaving: pass it on.
                given = waiter.result()
                if given is not None:
                    self._release(given)
                else:
                    self._open -= 1
                    self._hand_on()
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        if handed is not None:
            return handed
        if not self._started:
            self._open -= 1
            raise UpstreamUnreachable("the upstream pool is closed", sent=False)
        return await self._connect(loop, deadline)  # the place was counted for us

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Connection:
        """Open a connection whose place in ``_open`` is already counted."""
        try:
            wait = min(self._connect_timeout, max(0.0, deadline - loop.time()))
            async with asyncio.timeout(wait):
                _, proto = await loop.create_connection(
                    lambda: Connection(loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._tls else None,
                )
        except BaseException:
            self._open -= 1
            self._hand_on()
            raise
        return proto

    @staticmethod
    def _reusable(proto: Connection) -> bool:
        # should_close also covers bytes the server sent while the connection was idle.
        return proto.is_connected() and not proto.should_close

    def _discard(self, proto: Connection) -> None:
        proto.close()
        self._open -= 1

    def _release(self, proto: Connection) -> None:
        """A request is done with ``proto``: to the longest waiter, to the pool, or closed."""
        if self._started and self._reusable(proto):
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(proto)
                    return
            self._idle.append((proto, asyncio.get_running_loop().time()))
            return
        self._discard(proto)
        self._hand_on()

    def _hand_on(self) -> None:
        """A place in the pool came free: the longest waiter may open a connection in it."""
        while self._waiters and self._open < self._max_connections:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1  # counted now, for the waiter
                waiter.set_result(None)
                return

    # --- one request ------------------------------------------------------------------

    async def send(
        self,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
        on_wire: Callable[[], None] | None = None,
    ) -> UpstreamResponse:
        """Send one request; the caller streams and then releases the response.

        ``headers`` start with ``Host`` (:attr:`host`) and are sent as they are, plus the
        body's framing: ``Content-Length: 0`` for a method that usually has a body and has
        none, ``Transfer-Encoding: chunked`` for a body of unknown length. Raises
        UpstreamTimeout or UpstreamUnreachable, never an exception whose text could carry
        our headers; and what the body's iterator raises. ``on_wire`` is called just
        before the head is written: until then nothing has left, whatever stops the send
        (the caller's cancellation while it waits for a connection included).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            proto = await self._acquire(loop, deadline)
        except OSError as exc:  # no connection (in time): nothing left
            raise _not_sent(exc) from None
        response = UpstreamResponse(self, proto, loop, deadline)
        try:
            writer = start_exchange(proto, loop, skip_body=method == "HEAD", bufsize=READ_BUFSIZE)
            if body is None:
                if method not in _NO_BODY_METHODS and hdrs.CONTENT_LENGTH not in headers:
                    headers[hdrs.CONTENT_LENGTH] = "0"
            elif hdrs.CONTENT_LENGTH not in headers:
                headers[hdrs.TRANSFER_ENCODING] = "chunked"
                writer.enable_chunking()
            if on_wire is not None:
                on_wire()
            await writer.write_headers(f"{method} {self._prefix}{path_qs} HTTP/1.1", headers)
            if body is None:
                await writer.write_eof()
            else:
                # The deadline covers the upload too: a caller trickling its body, or an
                # echowin that stops reading, must not hold a connection for longer.
                async with asyncio.timeout_at(deadline):
                    async for chunk in body:
                        await writer.write(chunk)
                    await writer.write_eof()
            while True:
                message, payload = await proto.read()
                if not 100 <= message.code <= 199 or message.code == 101:
                    break  # a 1xx before the answer: read on
            if response._timer is None:  # the deadline passed as the head came in
                raise TimeoutError
        except BaseException as exc:
            proto.set_exception(ConnectionResetError("request abandoned"))
            response.release()  # closed: should_close holds after an exception
            failure = _sent_failure(exc)
            if failure is None:
                raise
            raise failure from None
        response.status, response.headers, response.content = message.code, message.headers, payload
        return response


def _not_sent(exc: OSError) -> UpstreamError:
    """No connection to send on (in time): nothing left."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("echowin did not answer in time", sent=False)
    return UpstreamUnreachable("cannot connect to echowin", sent=False)


def _sent_failure(exc: BaseException) -> UpstreamError | None:
    """What a send that failed after the head may have left raises for ``exc``; None: ``exc``
    itself (the body's iterator's, or a cancellation)."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("echowin did not answer in time")
    if isinstance(exc, (aiohttp.ClientError, HttpProcessingError, OSError)):
        return UpstreamUnreachable("echowin closed the connection", sent=True)
    return None
