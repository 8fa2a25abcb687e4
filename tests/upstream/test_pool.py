"""The upstream pool on its own, against real servers on loopback: connections are reused
only when that is safe, the pool holds its limit, and one timeout covers a whole exchange.

Some upstreams here are raw asyncio servers that write exact bytes (an answer with no
length, a 100 Continue, a server that drops idle connections), since aiohttp's server
would not misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.upstream import Upstream, UpstreamResponse, UpstreamTimeout, UpstreamUnreachable
from tests.conftest import ServerFactory, base_url
from tests.procs import eventually, free_ports

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def raw_server(handle: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def headers(up: Upstream, **more: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(Host=up.host)
    out.update(more)
    return out


async def body_of(response: UpstreamResponse) -> bytes:
    assert response.content is not None
    try:
        return await response.content.read()
    finally:
        response.release()


async def get(up: Upstream, path: str = "/x") -> tuple[int, bytes]:
    response = await up.send("GET", path, headers(up), None)
    return response.status, await body_of(response)


@pytest.fixture
async def pool_of() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    made: list[Upstream] = []

    async def make(url: str, timeout: float = 5.0, max_connections: int = 10) -> Upstream:
        up = Upstream(
            url,
            timeout_seconds=timeout,
            connect_timeout_seconds=2.0,
            max_connections=max_connections,
        )
        await up.start()
        made.append(up)
        return up

    yield make
    for up in made:
        await up.close()


async def counting_app(aiohttp_server: ServerFactory) -> tuple[set[object], str]:
    """An aiohttp upstream that remembers each connection it was asked on."""
    peers: set[object] = set()

    async def answer(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        if request.method == "POST":
            return web.Response(body=await request.read())
        if request.path == "/big":
            return web.Response(body=b"b" * 4_000_000)
        return web.Response(body=b"ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app)
    return peers, base_url(server)


async def test_a_read_answer_leaves_its_connection_for_the_next(
    aiohttp_server: ServerFactory, pool_of: Callable[..., Awaitable[Upstream]]
) -> None:
    peers, url = await counting_app(aiohttp_server)
    up = await pool_of(url)
    assert [await get(up) for _ in range(5)] == [(200, b"ok")] * 5
    assert len(peers) == 1
    # An answer released before its end closes its connection: the next one is new.
    response = await up.send("GET", "/big", headers(up), None)
    response.release()
    assert await get(up) == (200, b"ok")
    assert len(peers) == 2


async def test_answers_to_head_and_get_alternate_on_one_connection(
    aiohttp_server: ServerFactory, pool_of: Callable[..., Awaitable[Upstream]]
) -> None:
    """A connection reads each answer as its request asks: an answer to HEAD announces a
    length and has no body, the next GET's has one (each read by its own kind of parser,
    kept while requests of the same kind follow)."""
    peers, url = await counting_app(aiohttp_server)
    up = await pool_of(url)
    seen = []
    for method in ("GET", "HEAD", "HEAD", "GET", "GET", "HEAD", "GET"):
        response = await up.send(method, "/x", headers(up), None)
        seen.append((method, response.status, response.content_length, await body_of(response)))
    assert seen == [(m, 200, 2, b"" if m == "HEAD" else b"ok") for m, *_ in seen]
    assert len(peers) == 1


async def test_a_stray_byte_after_an_answer_does_not_spoil_the_next(
    pool_of: Callable[..., Awaitable[Upstream]],
) -> None:
    """An upstream that sends a byte too many after each answer: the next answer on the
    connection is read by a parser of its own, as the byte never was."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                await read_head(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokH")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server, url = await raw_server(handle)
    async with server:
        up = await pool_of(url)
        assert [await get(up) for _ in range(3)] == [(200, b"ok")] * 3
        assert connections == 1


async def test_the_pool_never_opens_more_than_its_limit(
    pool_of: Callable[..., Awaitable[Upstream]],
) -> None:
    open_now = 0
    most = 0
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        try:
            while True:
                try:
                    await read_head(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                await release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        finally:
            open_now -= 1
            writer.close()

    server, url = await raw_server(handle)
    async with server:
        up = await pool_of(url, max_connections=2)
        calls = [asyncio.ensure_future(get(up)) for _ in range(6)]

        async def two_at_the_server() -> bool:
            return open_now == 2

        await eventually(two_at_the_server, "two requests at the server", 5)
        release.set()
        assert await asyncio.gather(*calls) == [(200, b"ok")] * 6
        assert most == 2


async def test_an_answer_without_length_is_read_to_the_end_and_not_reused(
    pool_of: Callable[..., Awaitable[Upstream]],
) -> None:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"z" * 100_000)
        await writer.drain()
        writer.close()  # the end of the body is the end of the connection

    server, url = await raw_server(handle)
    async with server:
        up = await pool_of(url)
        assert await get(up) == (200, b"z" * 100_000)
        assert await get(up) == (200, b"z" * 100_000)
        assert connections == 2


async def test_a_connection_the_server_dropped_while_idle_is_not_used(
    pool_of: Callable[..., Awaitable[Upstream]],
) -> None:
    dropped = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # keep-alive promised, then dropped while idle
        await writer.wait_closed()
        dropped.set()

    server, url = await raw_server(handle)
    async with server:
        up = await pool_of(url)
        assert await get(up) == (200, b"ok")
        await asyncio.wait_for(dropped.wait(), 5)

        async def close_seen() -> bool:
            return not up._idle or not up._idle[-1][0].is_connected()

        await eventually(close_seen, "the close seen on our side", 5)
        assert await get(up) == (200, b"ok")


async def test_an_interim_100_continue_is_skipped(
    pool_of: Callable[..., Awaitable[Upstream]],
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()
        writer.close()

    server, url = await raw_server(handle)
    async with server:
        up = await pool_of(url)
        assert await get(up) == (201, b"done")


async def test_a_body_of_unknown_length_goes_chunked(
    aiohttp_server: ServerFactory, pool_of: Callable[..., Awaitable[Upstream]]
) -> None:
    _, url = await counting_app(aiohttp_server)
    up = await pool_of(url)

    async def body() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            yield part

    response = await up.send("POST", "/echo", headers(up), body())
    assert await body_of(response) == b"one,two,three"
    response = await up.send("POST", "/echo", headers(up), None)  # no body: length 0
    assert await body_of(response) == b""


async def test_one_timeout_covers_the_head_and_the_body(
    pool_of: Callable[..., Awaitable[Upstream]],
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await read_head(reader)
            if b"/stall-body" in head:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
                await writer.drain()
            await reader.read()  # never answers in full; ends when the client hangs up
        finally:
            writer.close()

    server, url = await raw_server(handle)
    async with server:
        up = await pool_of(url, timeout=0.3)
        # The server never answers in full: only the timeout ends each of these.
        with pytest.raises(UpstreamTimeout):
            await up.send("GET", "/stall-head", headers(up), None)
        response = await up.send("GET", "/stall-body", headers(up), None)
        assert response.content is not None
        with pytest.raises(TimeoutError):
            await response.content.read()
        response.release()
        assert not up._idle  # neither connection went back to the pool


async def test_connect_failure_is_unreachable_and_nothing_was_sent(
    pool_of: Callable[..., Awaitable[Upstream]],
) -> None:
    (port,) = free_ports(1)
    up = await pool_of(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamUnreachable) as caught:
        await up.send("GET", "/x", headers(up), None)
    assert caught.value.sent is False
    assert up._open == 0  # the failed attempt holds no place in the pool


def test_host_field_and_path_prefix() -> None:
    up = Upstream(
        "https://echo.win", timeout_seconds=1, connect_timeout_seconds=1, max_connections=1
    )
    assert up.host == "echo.win"
    up = Upstream(
        "http://[::1]:8080/base/", timeout_seconds=1, connect_timeout_seconds=1, max_connections=1
    )
    assert up.host == "[::1]:8080" and up._prefix == "/base"


async def test_a_waiter_that_leaves_passes_its_turn_on(
    aiohttp_server: ServerFactory, pool_of: Callable[..., Awaitable[Upstream]]
) -> None:
    _, url = await counting_app(aiohttp_server)
    up = await pool_of(url, timeout=2.0, max_connections=1)
    held = await up.send("GET", "/x", headers(up), None)
    second = asyncio.ensure_future(get(up))
    third = asyncio.ensure_future(get(up))

    async def both_wait() -> bool:
        return len(up._waiters) == 2

    await eventually(both_wait, "two requests waiting for the connection", 5)
    assert await body_of(held) == b"ok"  # back to the pool: the second is woken ...
    second.cancel()  # ... and leaves before it runs
    assert await third == (200, b"ok")
    assert second.cancelled()


async def test_the_deadline_of_a_complete_empty_answer_harms_nothing(
    aiohttp_server: ServerFactory, pool_of: Callable[..., Awaitable[Upstream]]
) -> None:
    peers, url = await counting_app(aiohttp_server)
    up = await pool_of(url)
    slow = await up.send("HEAD", "/x", headers(up), None)
    assert slow.content is not None and slow.content.is_eof()
    slow._expire()  # the deadline passes while the caller is slow to take the answer
    slow.release()
    again = await up.send("HEAD", "/x", headers(up), None)
    assert again.status == 200 and await body_of(again) == b""
    assert again.content is not None and again.content.exception() is None
    assert len(peers) == 1  # the complete exchange left its connection reusable


async def test_https_upstreams_are_reached_over_verified_tls(
    tmp_path: Path, pool_of: Callable[..., Awaitable[Upstream]]
) -> None:
    """echo.win is https: the pool verifies the server's certificate and its name."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    names = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [*make, *names, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True
    )
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    async with server:
        up = await pool_of(f"https://127.0.0.1:{port}")
        with pytest.raises(UpstreamUnreachable):  # a certificate nobody vouches for
            await up.send("GET", "/x", headers(up), None)
        up._ssl = ssl.create_default_context(cafile=str(cert))  # now one we trust
        assert await get(up) == (200, b"secure")


async def test_the_deadline_covers_a_stalled_upload(
    aiohttp_server: ServerFactory, pool_of: Callable[..., Awaitable[Upstream]]
) -> None:
    _, url = await counting_app(aiohttp_server)
    up = await pool_of(url, timeout=0.3)
    stalled = asyncio.Event()

    async def trickle() -> AsyncIterator[bytes]:
        yield b"first part,"
        await stalled.wait()  # the caller never sends the rest
        yield b"never"

    with pytest.raises(UpstreamTimeout) as caught:  # not a hang (bounded here at 5 s)
        await asyncio.wait_for(up.send("POST", "/echo", headers(up), trickle()), 5)
    assert caught.value.sent is True  # part of the request left
    assert up._open == 0 and not up._idle  # the half-sent connection is closed


async def test_waiting_for_a_connection_is_first_come_first_served(
    aiohttp_server: ServerFactory, pool_of: Callable[..., Awaitable[Upstream]]
) -> None:
    _, url = await counting_app(aiohttp_server)
    up = await pool_of(url, timeout=2.0, max_connections=1)
    order: list[int] = []

    async def call(i: int) -> None:
        assert await get(up) == (200, b"ok")
        order.append(i)

    held = await up.send("GET", "/x", headers(up), None)
    waiting = [asyncio.ensure_future(call(i)) for i in range(5)]

    async def five_wait() -> bool:
        return len(up._waiters) == 5

    await eventually(five_wait, "five requests waiting for the connection", 5)
    assert await body_of(held) == b"ok"  # the connection goes back ...
    await call(5)  # ... and a new caller asks for one before the first waiter has run
    await asyncio.gather(*waiting)
    assert order == list(range(6))


async def test_a_pool_wait_past_the_deadline_sent_nothing(
    aiohttp_server: ServerFactory, pool_of: Callable[..., Awaitable[Upstream]]
) -> None:
    _, url = await counting_app(aiohttp_server)
    up = await pool_of(url, timeout=0.2, max_connections=1)
    held = await up.send("GET", "/x", headers(up), None)
    # The one connection stays busy past the waiter's deadline: held's own deadline, which
    # would free it a moment before (a caller slow to read loses its connection), is off.
    assert held._timer is not None
    held._timer.cancel()
    with pytest.raises(UpstreamTimeout) as caught:
        await up.send("GET", "/x", headers(up), None)
    assert caught.value.sent is False  # the budget gets its slot back
    held.release()


async def test_bytes_arriving_on_an_idle_connection_retire_it(
    pool_of: Callable[..., Awaitable[Upstream]],
) -> None:
    connections = 0
    idle = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await idle.wait()  # ... then, on the idle keep-alive connection, an answer
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            await reader.read()
        finally:
            writer.close()

    server, url = await raw_server(handle)
    async with server:
        up = await pool_of(url)
        assert await get(up) == (200, b"ok")
        assert len(up._idle) == 1
        idle.set()

        async def stray_bytes_seen() -> bool:
            return bool(up._idle) and up._idle[-1][0].should_close

        await eventually(stray_bytes_seen, "the stray answer seen on our side", 5)
        assert await get(up) == (200, b"ok")  # not the stray 408
        assert connections == 2


async def test_an_answer_before_the_whole_upload_is_relayed(
    pool_of: Callable[..., Awaitable[Upstream]],
) -> None:
    """An upstream that refuses a body early (a 413 as soon as it has the head) and then
    reads the rest away before it closes (a lingering close, as nginx does): the caller
    gets that answer, not a 502. (An upstream that closes without reading the rest resets
    the connection, and the kernel may drop its answer: a 502 then.)"""
    answer = b'{"error":"too large"}'
    answered, closed = asyncio.Event(), asyncio.Event()

    async def refuse_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await refuse(reader, writer)
        finally:
            writer.close()
            closed.set()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(answer), answer)
        )
        await writer.drain()
        answered.set()
        while await reader.read(65536):  # bounded: the client sends 65 x 64 KiB and stops
            pass

    server, url = await raw_server(refuse_early)
    up = await pool_of(url)

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 65536
        await answered.wait()  # the rest goes after the answer
        for _ in range(64):
            yield b"x" * 65536

    fields = headers(up, **{"Content-Length": str(65 * 65536)})
    response = await up.send("POST", "/upload", fields, body())
    assert response.status == 413
    assert await body_of(response) == answer
    assert up._open == 0  # "Connection: close": not reused
    await asyncio.wait_for(closed.wait(), 5)  # the server saw the client close: all closed
    server.close()


def test_relative_rewrites_only_what_points_into_echowins_api() -> None:
    """A Location into echowin's API becomes the gateway's path; anything else of echowin's
    (its web pages, the API root) stays absolute: the gateway serves /api/v1/ only."""

    def pool(base: str) -> Upstream:
        return Upstream(base, timeout_seconds=1, connect_timeout_seconds=1, max_connections=1)

    up = pool("https://echo.win")
    assert up.relative("https://echo.win/api/v1/contacts/5?x=1") == "/api/v1/contacts/5?x=1"
    assert up.relative("HTTPS://Echo.Win/api/v1/contacts/5") == "/api/v1/contacts/5"
    # The default port written out is still echowin: a client following it would take its
    # gateway token (X-API-Key: egw_...) to echowin.
    assert up.relative("https://echo.win:443/api/v1/contacts/5") == "/api/v1/contacts/5"
    for elsewhere in (
        "https://echo.win/login?next=/app",  # echowin's web app: the gateway would 404
        "https://echo.win/",
        "https://echo.win:8443/api/v1/contacts/5",
        "https://user@echo.win/api/v1/contacts/5",
        "https://echo.win.example/api/v1/contacts/5",
        "http://echo.win/api/v1/contacts/5",
    ):
        assert up.relative(elsewhere) == elsewhere
    prefixed = pool("http://127.0.0.1:8080/echowin")
    assert prefixed.relative("http://127.0.0.1:8080/echowin/api/v1/tags") == "/api/v1/tags"
    assert prefixed.relative("http://127.0.0.1:8080/echowin/docs") == (
        "http://127.0.0.1:8080/echowin/docs"
    )
    assert prefixed.relative("http://127.0.0.1:8080/api/v1/tags") == (
        "http://127.0.0.1:8080/api/v1/tags"
    )
