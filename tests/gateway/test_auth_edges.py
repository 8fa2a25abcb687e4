"""Authentication, scopes and secret handling at the edges: what a caller can send that
would carry the real key back to it, widen its scope, or pass a field meant for one hop.
Real gateway and, where echowin's behaviour matters, a loopback upstream that behaves as
the RFCs allow a server to."""

from __future__ import annotations

import asyncio
import gzip
import unicodedata
import zlib
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
import yarl
from aiohttp import web
from multidict import CIMultiDict

from tests.conftest import (
    SECRETS,
    TEAM_KEY,
    GatewayHandle,
    ServerFactory,
    SimHandle,
    base_url,
    raw_upstream,
)

MakeGateway = Callable[..., Awaitable[GatewayHandle]]


async def exchange(gw: GatewayHandle, request: bytes) -> bytes:
    """One raw HTTP/1.1 exchange with the gateway (the request must say Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def reflecting_upstream(aiohttp_server: ServerFactory) -> str:
    """An upstream that answers TRACE as RFC 9110 §9.3.8 describes: the request it
    received, headers included, as a message/http body."""

    async def trace(request: web.Request) -> web.Response:
        lines = [f"{request.method} {request.raw_path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in request.headers.items()]
        return web.Response(body="\r\n".join(lines).encode(), content_type="message/http")

    app = web.Application()
    app.router.add_route("TRACE", "/{tail:.*}", trace)
    server = await aiohttp_server(app)
    return base_url(server)


async def test_trace_never_reflects_the_real_key(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    gw = await make_gateway(await reflecting_upstream(aiohttp_server))
    token = await gw.token("*")
    for path in ("/api/v1/contacts", "/api/v1/agency/subteams"):
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                "TRACE", gw.url(path), headers={"Authorization": f"Bearer {token}"}
            ) as resp,
        ):
            body = await resp.read()
            fields = list(resp.headers.items())
        for secret in SECRETS:
            assert secret.encode() not in body, path
            assert all(secret not in f"{name}: {value}" for name, value in fields), path
        assert resp.status == 405, path
        assert "TRACE" not in resp.headers.get("Allow", "TRACE")


async def test_every_connection_field_line_names_hop_by_hop_fields(
    gateway: GatewayHandle, sim: SimHandle
) -> None:
    token = await gateway.token("contacts:read")
    request = (
        "GET /api/v1/contacts HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Connection: keep-alive\r\nConnection: X-Hop-One\r\nConnection: close, X-Hop-Two\r\n"
        "X-Hop-One: 1\r\nX-Hop-Two: 2\r\nX-Kept: yes\r\n\r\n"
    )
    answer = await exchange(gateway, request.encode())
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    seen = {name.lower() for name in sim.sim.log[-1].headers}
    assert "x-kept" in seen
    assert not seen & {"x-hop-one", "x-hop-two"}, seen


async def test_every_connection_field_line_of_echowin_is_honoured(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    async def answer(request: web.Request) -> web.Response:
        headers = CIMultiDict(
            [
                ("Connection", "keep-alive"),
                ("Connection", "X-Upstream-Hop"),
                ("X-Upstream-Hop", "for the gateway only"),
                ("X-Kept", "yes"),
            ]
        )
        return web.Response(body=b"{}", headers=headers)

    app = web.Application()
    app.router.add_get("/api/v1/contacts", answer)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(base_url(upstream))
    token = await gw.token("contacts:read")
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url("/api/v1/contacts"), headers={"X-API-Key": token}) as resp,
    ):
        assert resp.status == 200
        names = {name.lower() for name in resp.headers}
    assert "x-kept" in names
    assert "x-upstream-hop" not in names


def case_blind_upstream() -> web.Application:
    """An echowin that routes as Express does by default (case-insensitively), after a
    Unicode compatibility fold (NFKC), as some stacks do: ``/contacts/Export`` and
    ``/contacts/%EF%BD%85xport`` reach the ``export`` route."""

    async def route(request: web.Request) -> web.Response:
        path = unicodedata.normalize("NFKC", request.path).lower()
        if path == "/api/v1/contacts/export":
            return web.json_response({"export": "every contact"})
        contact_id = request.match_info["cid"]
        return web.json_response({"data": {"id": contact_id}})

    app = web.Application()
    app.router.add_get("/api/v1/contacts/{cid}", route)
    return app


@pytest.mark.parametrize(
    "segment", ["Export", "EXPORT", "%EF%BD%85xport", "%EF%BC%A5XPORT", "export"]
)
async def test_a_case_variant_of_a_literal_segment_never_takes_the_param_route(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory, segment: str
) -> None:
    upstream = await aiohttp_server(case_blind_upstream())
    routes = [{"method": "GET", "path": "/api/v1/contacts/export", "scope": "contacts:export"}]
    gw = await make_gateway(base_url(upstream), routes=routes)
    reader = await gw.token("contacts:read")
    url = yarl.URL(gw.url("/api/v1/contacts/") + segment, encoded=True)
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Authorization": f"Bearer {reader}"}) as resp,
    ):
        body = await resp.json()
    assert "export" not in body, segment
    assert resp.status in (403, 404), segment
    # An id is still an id: the param route itself keeps working.
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            gw.url("/api/v1/contacts/c-123"), headers={"Authorization": f"Bearer {reader}"}
        ) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["data"]["id"] == "c-123"


def path_override_upstream() -> web.Application:
    """An echowin behind a stack that routes on a path-override header when one is sent
    (Symfony's X-Original-URL / X-Rewrite-URL, IIS URL Rewrite, ...)."""

    async def route(request: web.Request) -> web.Response:
        path = request.path
        for name in ("X-Original-URL", "X-Rewrite-URL", "X-Original-URI", "X-Forwarded-URI"):
            path = request.headers.get(name, path)
        return web.json_response({"routed_to": path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", route)
    return app


@pytest.mark.parametrize(
    "header", ["X-Original-URL", "X-Rewrite-URL", "X-Original-URI", "X-Forwarded-URI"]
)
async def test_path_override_headers_never_reach_echowin(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory, header: str
) -> None:
    upstream = await aiohttp_server(path_override_upstream())
    gw = await make_gateway(base_url(upstream))
    reader = await gw.token("contacts:read")
    headers = {"Authorization": f"Bearer {reader}", header: "/api/v1/agency/subteams"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url("/api/v1/contacts"), headers=headers) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["routed_to"] == "/api/v1/contacts", header


async def test_byte_ranges_never_reach_echowin(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    """Pieces of one answer are each searched for the key alone: a caller joining ranges
    back could rebuild it. echowin gets no Range, and answers whole."""
    seen: list[dict[str, str]] = []

    async def route(request: web.Request) -> web.Response:
        seen.append({k: v for k, v in request.headers.items() if "range" in k.lower()})
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", route)
    gw = await make_gateway(base_url(await aiohttp_server(app)))
    reader = await gw.token("contacts:read")
    headers = {
        "Authorization": f"Bearer {reader}",
        "Range": "bytes=0-3",
        "If-Range": '"x"',
    }
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url("/api/v1/contacts"), headers=headers) as resp,
    ):
        assert resp.status == 200
        assert await resp.json() == {"ok": True}
    assert seen == [{}]


async def test_an_upstream_naming_a_field_after_the_key_never_shows_it(
    make_gateway: MakeGateway,
) -> None:
    # Field names as a Go server would canonicalise them, and as sent.
    fields = (
        f"X-{TEAM_KEY}: 1\r\nX-{TEAM_KEY.title()}: 2\r\n{TEAM_KEY.upper()}: 3\r\nX-Kept: yes\r\n"
    )
    answer = f"HTTP/1.1 200 OK\r\n{fields}Content-Length: 2\r\n\r\n{{}}".encode()
    async with raw_upstream(answer) as url:
        gw = await make_gateway(url)
        token = await gw.token("contacts:read")
        request = (
            f"GET /api/v1/contacts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n"
        )
        answered = await exchange(gw, request.encode())
    assert answered.startswith(b"HTTP/1.1 200 "), answered[:200]
    assert b"X-Kept: yes" in answered
    assert TEAM_KEY.lower().encode() not in answered.lower()


async def test_an_upstream_echoing_the_key_in_its_body_never_shows_it(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    """A debug page that prints the request it got: once whole, once streamed in pieces that
    split the key between two of them."""

    async def whole(request: web.Request) -> web.Response:
        return web.Response(text=f"key={request.headers['X-API-Key']}; again {TEAM_KEY}.")

    async def pieces(request: web.Request) -> web.StreamResponse:
        body = f"<pre>X-API-Key: {request.headers['X-API-Key']}</pre>".encode()
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(body), 7):  # 7-byte chunks: the key spans several
            await response.write(body[i : i + 7])
            await asyncio.sleep(0)  # each its own chunk on the wire
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/api/v1/contacts", whole)
    app.router.add_get("/api/v1/tags", pieces)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(base_url(upstream))
    token = await gw.token("*")
    masked = "*" * len(TEAM_KEY)
    async with aiohttp.ClientSession() as session:
        auth = {"Authorization": f"Bearer {token}"}
        async with session.get(gw.url("/api/v1/contacts"), headers=auth) as resp:
            text = await resp.text()
            assert text == f"key={masked}; again {masked}."
            assert resp.headers["Content-Length"] == str(len(text))
        async with session.get(gw.url("/api/v1/tags"), headers=auth) as resp:
            text = await resp.text()
            assert text == f"<pre>X-API-Key: {masked}</pre>"


async def test_an_upstream_echoing_the_key_in_a_compressed_body_never_shows_it(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    """The same debug page, gzip-compressed as a server may when the caller accepts gzip:
    the key is not in the bytes on the wire, but it is in what the caller reads."""

    async def page(request: web.Request) -> web.Response:
        response = web.Response(text=f"X-API-Key: {request.headers['X-API-Key']}")
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression(web.ContentCoding.gzip)
        return response

    app = web.Application()
    app.router.add_get("/api/v1/contacts", page)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(base_url(upstream))
    token = await gw.token("*")
    headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": "gzip"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url("/api/v1/contacts"), headers=headers) as resp,
    ):
        text = await resp.text()  # decompressed, as every client does
    assert resp.status == 200
    assert text == "X-API-Key: " + "*" * len(TEAM_KEY)


def gzip_stream_upstream(body: bytes, *, coding: str = "gzip") -> web.Application:
    """An upstream sending ``body`` gzip-compressed, flushed in small pieces: a key in it
    spans several chunks on the wire. It records the Accept-Encoding it was sent."""

    async def page(request: web.Request) -> web.StreamResponse:
        request.app[SEEN].append(request.headers.get("Accept-Encoding", ""))
        response = web.StreamResponse(headers={"Content-Encoding": coding})
        response.enable_chunked_encoding()
        await response.prepare(request)
        packed = gzip.compress(body.replace(b"{key}", request.headers["X-API-Key"].encode()))
        for i in range(0, len(packed), 5):
            await response.write(packed[i : i + 5])
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    app = web.Application()
    app[SEEN] = []
    app.router.add_get("/api/v1/contacts", page)
    return app


SEEN = web.AppKey("seen", list[str])


async def test_a_streamed_compressed_body_holding_the_key_is_cut_before_any_of_it(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    page = b"<pre>" + b"x" * 3000 + b"X-API-Key: {key}</pre>" + b"y" * 3000
    upstream = await aiohttp_server(gzip_stream_upstream(page))
    gw = await make_gateway(base_url(upstream))
    token = await gw.token("*")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
    writer.write(
        f"GET /api/v1/contacts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Accept-Encoding: gzip\r\n\r\n".encode()
    )
    try:
        got = await asyncio.wait_for(reader.read(), 5)  # the gateway cuts the connection
    finally:
        writer.close()
    head, _, chunked = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert not chunked.endswith(b"0\r\n\r\n")  # broken off, not ended
    packed = b""
    while chunked:  # what came of the chunked body, inflated as far as it goes
        size, _, rest = chunked.partition(b"\r\n")
        if not size or int(size, 16) == 0 or len(rest) < int(size, 16):
            break
        packed, chunked = packed + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
    plain = zlib.decompressobj(47).decompress(packed)
    assert plain.startswith(b"<pre>xxx")  # what came before the key went out
    # Not the key, nor any part of it longer than a few bytes.
    assert TEAM_KEY[:4].encode() not in plain


async def test_a_clean_compressed_body_streams_as_it_came(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    page = b"<pre>" + b"z" * 5000 + b"</pre>"
    app = gzip_stream_upstream(page)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(base_url(upstream))
    token = await gw.token("*")
    # br and * would be codings the gateway cannot search: echowin is asked for gzip only.
    headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": "br, gzip;q=0.8, *"}
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(gw.url("/api/v1/contacts"), headers=headers) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await resp.read()) == page
    assert app[SEEN] == ["gzip;q=0.8"]


async def test_a_body_in_a_coding_the_gateway_cannot_read_is_refused(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    upstream = await aiohttp_server(gzip_stream_upstream(b"{key}", coding="br"))
    gw = await make_gateway(base_url(upstream))
    token = await gw.token("*")
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(
            gw.url("/api/v1/contacts"), headers={"Authorization": f"Bearer {token}"}
        ) as resp,
    ):
        assert resp.status == 502
        assert (await resp.json())["reason"] == "upstream_unreadable"
