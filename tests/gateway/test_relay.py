"""Edge cases of relaying: the status line's free text never reaches the caller (it could
carry the key); a caller that stops reading does not hold an echowin connection past the
request's deadline; ``100 Continue`` only once a request is admitted; a ``Location`` into
echowin comes back as the gateway's path; a broken upload is the caller's, not echowin's.
Real gateway, loopback only."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import TEAM_KEY, GatewayHandle, ServerFactory, base_url, raw_upstream

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

    async with raw_upstream(answer % TEAM_KEY.encode()) as url:
        gw = await make_gateway(url)
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
        base_url(upstream),
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


async def exchange_raw(port: int, data: bytes, *, body: bytes | None = None) -> list[bytes]:
    """Send ``data``; read heads until a final one. With ``body``, it is sent after the
    first head (as a client that waits for ``100 Continue`` does). Returns every head read
    and, last, the final answer's body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    heads: list[bytes] = []
    try:
        writer.write(data)
        async with asyncio.timeout(5):
            while True:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                if not heads[-1].startswith(b"HTTP/1.1 1"):
                    break
                if body is not None:
                    writer.write(body)
            length = next(
                int(line.split(b":")[1])
                for line in heads[-1].lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            heads.append(await reader.readexactly(length))
    finally:
        writer.transport.abort()
    return heads


def post_head(token: str, body: bytes, *fields: str, version: str = "1.1") -> bytes:
    lines = [f"POST /api/v1/contacts HTTP/{version}", "Host: x"]
    lines += [f"Authorization: Bearer {token}", "Content-Type: application/json"]
    lines += [f"Content-Length: {len(body)}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


CONTACT = b'{"number": "+15550100", "firstName": "Ada"}'


async def test_100_continue_comes_only_once_the_request_is_admitted(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(
        upstream={"limits": [{"requests": 2, "per_seconds": 3600}]},
        queue={"max_wait_seconds": 1},
        server={"max_request_body_bytes": 1 << 20},
    )
    token = await gw.token("contacts:*")
    port = gw.proxy.port
    expect = "Expect: 100-continue"

    # Admitted: "100 Continue", then the body goes through to echowin.
    heads = await exchange_raw(port, post_head(token, CONTACT, expect), body=CONTACT)
    assert heads[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert heads[1].startswith(b"HTTP/1.1 201 ")
    assert b'"Ada"' in heads[2]

    # Refused, before its body: no "100 Continue", and the connection is not kept for a
    # body the caller may never send.
    for head in (
        post_head("egw_" + "x" * 52, CONTACT, expect),  # unknown token: 401
        post_head(token, b"x" * (2 << 20), expect),  # over max_request_body_bytes: 413
    ):
        first, body = await exchange_raw(port, head)
        assert not first.startswith(b"HTTP/1.1 100"), first
        assert b"connection: close" in first.lower()
        assert b'"reason"' in body

    assert await get_status(gw, token, "/api/v1/contacts") == 200  # the budget's last send
    first, body = await exchange_raw(port, post_head(token, CONTACT, expect))
    assert first.startswith(b"HTTP/1.1 429 "), first
    assert b"upstream_budget" in body

    # An expectation other than 100-continue: 417, as JSON.
    first, body = await exchange_raw(port, post_head(token, CONTACT, "Expect: teapot"))
    assert first.startswith(b"HTTP/1.1 417 "), first
    assert b'"bad_expect"' in body


async def test_http_1_0_expect_is_ignored(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    token = await gw.token("contacts:*")
    head = post_head(token, CONTACT, "Expect: 100-continue", version="1.0")
    heads = await exchange_raw(gw.proxy.port, head + CONTACT)
    assert heads[0].startswith(b"HTTP/1.0 201 "), heads[0]
    assert b'"Ada"' in heads[1]


async def test_a_location_into_echowin_comes_back_as_the_gateways_path(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    async def created(request: web.Request) -> web.Response:
        base = f"http://{request.host}/echowin"
        return web.json_response(
            {"data": {"id": "42"}},
            status=201,
            headers={
                "Location": f"{base}/api/v1/contacts/42?x=1",
                "Content-Location": "http://elsewhere.example/echowin/api/v1/contacts/42",
            },
        )

    app = web.Application()
    app.router.add_post("/echowin/api/v1/contacts", created)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(str(upstream.make_url("/echowin")))
    token = await gw.token("contacts:write")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url("/api/v1/contacts"),
            json={"number": "+15550100"},
            headers={"Authorization": f"Bearer {token}"},
            allow_redirects=False,
        ) as resp,
    ):
        assert resp.status == 201
        assert resp.headers["Location"] == "/api/v1/contacts/42?x=1"
        # Not echowin: relayed as it came.
        assert (
            resp.headers["Content-Location"]
            == "http://elsewhere.example/echowin/api/v1/contacts/42"
        )


def sample(gw: GatewayHandle, name: str, **labels: str) -> float:
    return gw.runtime.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_caller_that_breaks_its_upload_is_not_an_echowin_failure(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    reading = asyncio.Event()

    async def slow_reader(request: web.Request) -> web.Response:
        reading.set()
        await request.read()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/api/v1/contacts", slow_reader)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(base_url(upstream))
    token = await gw.token("contacts:write")
    port = gw.proxy.port

    # A caller that hangs up halfway through its upload: 499 in the metrics, not a 502
    # and an echowin error (the request is cancelled before the broken body is read).
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post_head(token, b"x" * 100_000) + b"x" * 10)
    await asyncio.wait_for(reading.wait(), 5)  # echowin is reading the body
    writer.transport.abort()
    labels = {"token": "svc", "route": "/api/v1/contacts", "method": "POST"}

    async with asyncio.timeout(5):
        while sample(gw, "echowin_gateway_requests_total", status="499", **labels) < 1:
            await asyncio.sleep(0.01)
    assert sample(gw, "echowin_gateway_requests_total", status="502", **labels) == 0
    for kind in ("reset", "timeout", "connect"):
        errors = sample(
            gw, "echowin_gateway_upstream_errors_total", credential="default", kind=kind
        )
        assert errors == 0, kind


async def test_a_caller_gone_while_a_connection_is_awaited_gives_its_slot_back(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    holding, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        holding.set()
        await release.wait()
        return web.json_response({"data": []})

    async def quick(request: web.Request) -> web.Response:
        # The first answer calibrates the budget (one send, ours, in the hour so far).
        limits = {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "2"}
        return web.json_response({"data": []}, headers=limits)

    app = web.Application()
    app.router.add_get("/api/v1/contacts", slow)
    app.router.add_get("/api/v1/tags", quick)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(
        base_url(upstream),
        upstream={"max_connections": 1, "limits": [{"requests": 3, "per_seconds": 3600}]},
        queue={"max_wait_seconds": 0.5},
    )
    token = await gw.token("*")
    pool = gw.runtime.upstream
    assert await get_status(gw, token, "/api/v1/tags") == 200  # send 1 of 3
    first = asyncio.ensure_future(get_status(gw, token, "/api/v1/contacts"))  # send 2
    await asyncio.wait_for(holding.wait(), 5)  # it holds the pool's one connection
    _, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
    writer.write(request_bytes(token))  # admitted with the last slot, waits for the pool
    async with asyncio.timeout(5):
        while not pool._waiters:
            await asyncio.sleep(0.01)
    writer.transport.abort()  # and hangs up: nothing of it left for echowin
    async with asyncio.timeout(5):
        while pool._waiters:
            await asyncio.sleep(0.01)
    release.set()
    assert await first == 200
    # The slot came back: the third send of the window goes out.
    assert await get_status(gw, token, "/api/v1/tags") == 200


async def test_a_417_before_the_body_closes_the_connection(make_gateway: MakeGateway) -> None:
    """An expectation the gateway cannot meet is refused before the body, like any other
    refusal: the caller may hold its body back (it waits for an answer to its Expect), and
    a kept connection would read its next request as that body."""
    gw = await make_gateway()
    token = await gw.token("contacts:*")
    for expect in ("Expect: teapot", "Expect: 100-continue, x-also"):
        first, body = await exchange_raw(gw.proxy.port, post_head(token, CONTACT, expect))
        assert first.startswith(b"HTTP/1.1 417 "), first
        assert b"connection: close" in first.lower(), first
        assert b'"bad_expect"' in body


@pytest.mark.parametrize(
    ("fields", "body"),
    [
        # Two gzip members: clients decode both; the second holds the key.
        (b"Content-Encoding: gzip\r\n", "two_members"),
        # Two Content-Encoding fields: a client applies both (identity, then gzip).
        (b"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n", "one_member"),
        # gzip twice: one inflation would search the inner gzip bytes only.
        (b"Content-Encoding: gzip\r\nContent-Encoding: gzip\r\n", "twice"),
    ],
)
async def test_a_compressed_answer_the_gateway_cannot_search_whole_is_refused(
    make_gateway: MakeGateway, fields: bytes, body: str
) -> None:
    """What a client would decode further than the gateway inflates (a second gzip member,
    stacked codings in several fields) is refused (502), never relayed unsearched."""
    secret = b"key=" + TEAM_KEY.encode()
    payload = {
        "two_members": gzip.compress(b"hello ") + gzip.compress(secret),
        "one_member": gzip.compress(secret),
        "twice": gzip.compress(gzip.compress(secret)),
    }[body]
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        + fields
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
        + payload
    )
    async with raw_upstream(answer) as url:
        gw = await make_gateway(url)
        token = await gw.token("contacts:read")
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.get(
                gw.url("/api/v1/contacts"), headers={"Authorization": f"Bearer {token}"}
            ) as resp,
        ):
            raw = await resp.read()
    assert resp.status == 502
    assert b"upstream_unreadable" in raw
    assert TEAM_KEY.encode() not in raw


async def test_fields_made_neighbours_by_a_dropped_field_are_checked_again(
    make_gateway: MakeGateway,
) -> None:
    """A: first part of the key, B: the key, C: the rest. B is dropped; A and C, now side
    by side, would spell the key: they go too."""
    key = TEAM_KEY.encode()
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        b"X-Debug-A: " + key[:10] + b"\r\nX-Debug-B: " + key + b"\r\n"
        b"X-Debug-C: " + key[10:] + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    )
    async with raw_upstream(answer) as url:
        gw = await make_gateway(url)
        token = await gw.token("contacts:read")
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                gw.url("/api/v1/contacts"), headers={"Authorization": f"Bearer {token}"}
            ) as resp,
        ):
            assert await resp.read() == b"ok"
            values = "".join(v for k, v in resp.headers.items() if k.startswith("X-Debug"))
    assert TEAM_KEY not in values
    assert "X-Debug-B" not in resp.headers


async def test_fields_around_a_dropped_content_encoding_are_checked_again(
    make_gateway: MakeGateway,
) -> None:
    """A gzip answer holding the key is sent inflated, its Content-Encoding dropped: the
    fields either side of it, side by side now, would spell the key: they go too."""
    key = TEAM_KEY.encode()
    payload = gzip.compress(b'{"echo": "' + key + b'"}')
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"X-Debug-A: " + key[:10] + b"\r\nContent-Encoding: gzip\r\n"
        b"X-Debug-C: " + key[10:] + b"\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload) + payload
    )
    async with raw_upstream(answer) as url:
        gw = await make_gateway(url)
        token = await gw.token("contacts:read")
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                gw.url("/api/v1/contacts"), headers={"Authorization": f"Bearer {token}"}
            ) as resp,
        ):
            body = await resp.read()
            values = "".join(v for k, v in resp.headers.items() if k.startswith("X-Debug"))
    assert resp.status == 200
    assert "Content-Encoding" not in resp.headers
    assert key not in body and b"*" * len(key) in body
    assert TEAM_KEY not in values
