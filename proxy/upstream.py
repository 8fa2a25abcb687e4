"""The only door to the network: one shared aiohttp ClientSession towards echowin.

Bodies stream both ways and are never decompressed or re-encoded (``auto_decompress``
is off), so echowin's bytes reach the caller as echowin sent them. Failures are
classified for the caller: :class:`UpstreamTimeout` (-> 504) and
:class:`UpstreamUnreachable` (-> 502, with ``sent`` telling whether a byte may have left).
Exception texts never carry request headers, so a real key cannot leak through them.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterable, Mapping
from types import TracebackType

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict

# RFC 9110 §7.6.1 connection-specific fields, plus the old Proxy-Connection and
# Keep-Alive that HTTP/1.0 peers still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class UpstreamError(Exception):
    """An exchange with echowin that produced no usable response."""

    kind = "error"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class UpstreamUnreachable(UpstreamError):
    """Connect failure or reset. ``sent`` is False only when no byte can have left."""

    kind = "connect"

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent
        if sent:
            self.kind = "reset"


def connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    """The header names a ``Connection`` field marks as hop-by-hop, lower-cased."""
    value = headers.get("Connection")
    return _NO_TOKENS if value is None else _tokens(value)


_NO_TOKENS: frozenset[str] = frozenset()


@functools.lru_cache(maxsize=64)
def _tokens(value: str) -> frozenset[str]:
    # The same few values ("keep-alive", "close") come with nearly every message.
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


# aiohttp's own additions that must not reach echowin: no User-Agent of ours, no
# Accept-Encoding the caller did not send (bodies are relayed as they come, so echowin must
# not compress for a caller that cannot decompress), and no guessed Content-Type.
_NOT_ADDED = ("User-Agent", "Accept-Encoding", "Content-Type")


class _ForwardRequest(aiohttp.ClientRequest):
    """A ClientRequest that sends the headers it is given, after Host, plus ``Accept: */*``
    when they have none, and nothing else of aiohttp's (``_NOT_ADDED``).

    Stock ClientRequest gets the same result from the session's ``skip_auto_headers``, but
    pays for it on every request (a sorted CIMultiDict of the names and a copy of every
    header), and copies the headers one by one in Python.
    """

    _SKIPPED: CIMultiDict[None] = CIMultiDict((name, None) for name in _NOT_ADDED)

    def update_headers(self, headers: object) -> None:
        if not isinstance(headers, CIMultiDict) or hdrs.HOST in headers:
            super().update_headers(headers)  # type: ignore[arg-type]
            return
        out: CIMultiDict[str] = CIMultiDict()
        host = self.url.host_port_subcomponent
        assert host is not None  # an absolute URL
        out[hdrs.HOST] = host
        out.extend(headers)
        self.headers = out

    def update_auto_headers(self, skip_auto_headers: object) -> None:
        self._skip_auto_headers = self._SKIPPED  # also keeps send() from adding Content-Type
        if hdrs.ACCEPT not in self.headers:
            self.headers[hdrs.ACCEPT] = "*/*"


class Upstream:
    """A keep-alive pool to echowin. Open with ``async with`` or start/close."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_seconds: float,
        connect_timeout_seconds: float,
        max_connections: int,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_seconds, sock_connect=connect_timeout_seconds
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=self._max_connections,
            ttl_dns_cache=300,
            family=socket.AF_UNSPEC,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=_NOT_ADDED,
            cookie_jar=aiohttp.DummyCookieJar(),
            request_class=_ForwardRequest,
        )
        # aiohttp silently re-sends an idempotent request once when a pooled connection
        # drops; that second send would reach echowin without the budget knowing.
        self._session._retry_connection = False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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

    async def send(
        self,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Send one request; the caller streams and then releases the response.

        Raises UpstreamTimeout or UpstreamUnreachable, never an aiohttp exception whose
        text could carry our headers.
        """
        if self._session is None:
            raise RuntimeError("Upstream.send before start()")
        try:
            return await self._session.request(
                method,
                self.base_url + path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
            )
        except TimeoutError:
            raise UpstreamTimeout("echowin did not answer in time") from None
        except aiohttp.ClientConnectorError:
            raise UpstreamUnreachable("cannot connect to echowin", sent=False) from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError):
            raise UpstreamUnreachable("echowin closed the connection", sent=True) from None
