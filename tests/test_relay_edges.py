"""Edge cases of relaying echowin's answer: the status line's free text never reaches the
caller (it could carry the key), and a caller that stops reading does not hold an echowin
connection past the request's deadline. Real gateway, loopback only."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from tests.conftest import TEAM_KEY, GatewayHandle, ServerFactory

MakeGateway = Callable[..., Awaitable[GatewayHandle]]


async def get_status(gw: GatewayHandle, token: str, path: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url(path), headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        await resp.read()
        return resp.status


def request_bytes(token: str, extra: bytes = b"") -> bytes:
    head = f"GET /api/v1/contacts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
    return head.encode() + extra + b"\r\n"


async def test_the_key_never_leaks_through_the_reason_phrase(make_gateway: MakeGateway) -> None:
    answer = b"HTTP/1.1 401 Invalid key %s\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer % TEAM_KEY.encode())
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        gw = await make_gateway(f"http://127.0.0.1:{port}")
        token = await gw.token("contacts:read")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
        writer.write(request_bytes(token, b"Connection: close\r\n"))
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        finally:
            writer.close()
            await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert TEAM_KEY.encode() not in head


async def test_a_caller_that_never_reads_frees_its_echowin_connection_at_the_deadline(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    big = b"x" * (1 << 20)

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):  # 64 MiB: far more than the sockets buffer
            await response.write(big)
        await response.write_eof()
        return response

    async def small(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/api/v1/contacts", huge)
    app.router.add_get("/api/v1/tags", small)
    upstream = await aiohttp_server(app)
    limits = [{"requests": 100_000, "per_seconds": 3600}]
    gw = await make_gateway(
        str(upstream.make_url("")).rstrip("/"),
        upstream={"max_connections": 1, "timeout_seconds": 1, "limits": limits},
    )
    token = await gw.token("*")
    assert await get_status(gw, token, "/api/v1/tags") == 200  # the calibration probe
    pool = gw.runtime.upstream
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
    writer.write(request_bytes(token))  # and never read the answer
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # the answer has begun
        assert pool._open == 1
        # Past the exchange's deadline (1 s) its connection is closed, though the caller
        # still has not read: the pool's one connection is free for the next request.
        async with asyncio.timeout(5):
            while pool._open:
                await asyncio.sleep(0.01)
        assert await get_status(gw, token, "/api/v1/tags") == 200
    finally:
        writer.transport.abort()
