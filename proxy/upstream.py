"""The only door to the network: one shared aiohttp ClientSession towards echowin.

Bodies stream both ways and are never decompressed or re-encoded (``auto_decompress``
is off), so echowin's bytes reach the caller as echowin sent them. Failures are
classified for the caller: :class:`UpstreamTimeout` (-> 504) and
:class:`UpstreamUnreachable` (-> 502, with ``sent`` telling whether a byte may have left).
Exception texts never carry request headers, so a real key cannot leak through them.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterable, Mapping
from types import TracebackType

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

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


def connection_tokens(headers: Mapping[str, str]) -> set[str]:
    """The header names a ``Connection`` field marks as hop-by-hop, lower-cased."""
    value = headers.get("Connection", "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def end_to_end(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop fields, those named in Connection, and ``drop``.

    ``drop`` holds lower-case names.
    """
    named = connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in named or low in drop:
            continue
        out.add(name, value)
    return out


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
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
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
