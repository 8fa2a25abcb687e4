"""Slow and abusive callers against the real listeners (docs/security.md: "Slow and abusive
connections"): a head trickled byte by byte is cut off at the head timeout, an idle kept-alive
connection at the keep-alive timeout, connections past a listener's bounds get a 503 JSON
answer and are closed, and a flood of malformed requests writes almost nothing to the log.

The gateway runs in-process (its proxy listener served by its ProxyRunner, its admin listener
by its JsonErrorRunner, as ``serve`` serves them) with raw sockets for callers; the flood and
``serve --workers 2`` run the real command line as subprocesses and read its stderr. A
second client is a second loopback address (127.0.0.2, routable on Linux). Every wait is
for a condition (the server's EOF, a count) within a bounded deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import proxy.server.listeners
import proxy.server.proxy_handler
from proxy.server.guard import MALFORMED_INTERVAL_SECONDS, MALFORMED_LINES, ConnectionBounds
from proxy.sim import SimConfig, SimLimit, Simulator
from tests.conftest import AdminTestServer, GatewayHandle, ProxyTestServer, ServerFactory, base_url
from tests.procs import REAL_KEY, Spawn, free_ports, gateway_config, wait_http, write_config

MakeGateway = Callable[..., Awaitable[GatewayHandle]]
WAIT = 10.0  # seconds a condition may take on loopback; only a bug takes it
MARGIN = 4.0  # past a timeout, the longest its close may take to reach the caller here
OTHER_CLIENT = "127.0.0.2"
LISTENERS = ("proxy", "admin")

HEAD = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nUser-Agent: slow\r\n\r\n"


# --- raw callers ---------------------------------------------------------------------------


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def port_of(gw: GatewayHandle, listener: str) -> int:
    server = gw.proxy if listener == "proxy" else gw.admin
    assert server.port is not None
    return server.port


def bounds_of(gw: GatewayHandle, listener: str) -> ConnectionBounds:
    server = gw.proxy if listener == "proxy" else gw.admin
    assert isinstance(server, ProxyTestServer | AdminTestServer)
    runner = server.runner
    assert isinstance(runner, proxy.server.listeners.JsonErrorRunner)
    return runner.guard.bounds


async def connect(port: int, client: str = "127.0.0.1") -> Conn:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(client, 0))


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer (a Content-Length body): status, headers (lower-case names), body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), WAIT)
    return int(lines[0].split()[1]), headers, body


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the server sent until it closed the connection; fails if it did not within
    ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""
    except TimeoutError:
        pytest.fail(f"the connection was still open after {timeout} s")


def request(listener: str) -> bytes:
    """A request each listener answers at once without a token: 401 on the proxy."""
    if listener == "proxy":
        return HEAD.replace(b"/healthz", b"/api/v1/contacts")
    return HEAD


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> int:
    """Write ``data`` one byte every ``every`` seconds until done or the server closes;
    the bytes written."""
    for sent, byte in enumerate(data):
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            return sent
        if writer.transport.is_closing():
            return sent
        await asyncio.sleep(every)
    return len(data)


@contextlib.asynccontextmanager
async def held(conns: list[Conn]) -> AsyncIterator[list[Conn]]:
    try:
        yield conns
    finally:
        for _, writer in conns:
            writer.close()


async def until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {WAIT} s")
        await asyncio.sleep(0.01)


def timeouts(head: float, keepalive: float) -> dict[str, object]:
    return {
        "server": {"request_head_timeout_seconds": head, "keepalive_timeout_seconds": keepalive}
    }


# --- the head timeout ------------------------------------------------------------------------


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_trickled_head_is_closed_at_the_head_timeout(
    make_gateway: MakeGateway, listener: str
) -> None:
    gw = await make_gateway(**timeouts(1.0, 30.0))
    reader, writer = await connect(port_of(gw, listener))
    head = request(listener)
    sender = asyncio.ensure_future(trickle(writer, head, 0.3))  # 18 s for the whole head
    try:
        assert await closed_within(reader, 1.0 + MARGIN) == b""  # closed, unanswered
        sent = await asyncio.wait_for(sender, WAIT)
        assert sent < len(head)
    finally:
        sender.cancel()
        writer.close()
    await until(lambda: bounds_of(gw, listener).open == 0, "the connection's place given back")


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_connection_that_sends_nothing_is_closed_at_the_head_timeout(
    make_gateway: MakeGateway, listener: str
) -> None:
    gw = await make_gateway(**timeouts(1.0, 30.0))
    reader, writer = await connect(port_of(gw, listener))
    try:
        assert await closed_within(reader, 1.0 + MARGIN) == b""
    finally:
        writer.close()


# Parked: the proxy's idle connection waits in a lobby between requests (as when the
# listener is crowded); the admin listeners have no lobby.
KEPT_ALIVE = [("proxy", False), ("proxy", True), ("admin", False)]


@pytest.mark.parametrize(("listener", "parked"), KEPT_ALIVE)
async def test_a_trickled_head_on_a_kept_alive_connection_is_closed_too(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, listener: str, parked: bool
) -> None:
    """The next request's head is due within the timeout of its first byte."""
    if parked:
        monkeypatch.setattr(proxy.server.proxy_handler, "PARK_ABOVE", 0)
    gw = await make_gateway(**timeouts(1.0, 30.0))
    reader, writer = await connect(port_of(gw, listener))
    sender = None
    try:
        writer.write(request(listener))
        status, headers, _ = await read_answer(reader)
        assert status == (401 if listener == "proxy" else 200)
        assert headers.get("connection") != "close"
        sender = asyncio.ensure_future(trickle(writer, request(listener), 0.3))
        assert await closed_within(reader, 1.0 + MARGIN) == b""
        assert await asyncio.wait_for(sender, WAIT) < len(request(listener))
    finally:
        if sender is not None:
            sender.cancel()
        writer.close()


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_head_in_pieces_within_the_timeout_is_answered_and_the_connection_kept(
    make_gateway: MakeGateway, listener: str
) -> None:
    gw = await make_gateway(**timeouts(1.0, 30.0))
    reader, writer = await connect(port_of(gw, listener))
    head = request(listener)
    try:
        for _ in range(3):  # three requests: the timeout is each head's, not the connection's
            writer.write(head[:10])
            await writer.drain()
            await asyncio.sleep(0.3)  # a slow caller, well within the timeout
            writer.write(head[10:])
            status, _, body = await read_answer(reader)
            assert status == (401 if listener == "proxy" else 200), body
            await asyncio.sleep(0.5)  # idle between requests: not a head's time
    finally:
        writer.close()


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_body_that_comes_after_its_answer_does_not_start_a_head_timeout(
    make_gateway: MakeGateway, listener: str
) -> None:
    """A request refused before its body was read: aiohttp reads the body to keep the
    connection, and those bytes are no head; the connection then idles past the head
    timeout (within the keep-alive timeout) and still takes the next request."""
    gw = await make_gateway(**timeouts(1.0, 30.0))
    reader, writer = await connect(port_of(gw, listener))
    path = b"/api/v1/contacts" if listener == "proxy" else b"/healthz"
    try:
        writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
        status, headers, _ = await read_answer(reader)
        assert status in (401, 405) and headers.get("connection") != "close"
        for piece in (b"ab", b"cd", b"ef"):  # the body, slowly, after its answer
            await asyncio.sleep(0.2)
            writer.write(piece)
        await asyncio.sleep(1.5)  # idle past the head timeout, as a keep-alive caller may
        writer.write(request(listener))
        status, _, _ = await read_answer(reader)
        assert status == (401 if listener == "proxy" else 200)
    finally:
        writer.close()


@pytest.mark.parametrize(("listener", "parked"), KEPT_ALIVE)
async def test_an_idle_kept_alive_connection_is_closed_at_the_keepalive_timeout(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, listener: str, parked: bool
) -> None:
    if parked:
        monkeypatch.setattr(proxy.server.proxy_handler, "PARK_ABOVE", 0)
    gw = await make_gateway(**timeouts(30.0, 1.0))
    reader, writer = await connect(port_of(gw, listener))
    try:
        for _ in range(2):  # kept alive: a second request on it is answered
            writer.write(request(listener))
            status, _, _ = await read_answer(reader)
            assert status == (401 if listener == "proxy" else 200)
        assert await closed_within(reader, 1.0 + MARGIN) == b""
    finally:
        writer.close()


# --- connection bounds ---------------------------------------------------------------------


async def refused_with(port: int, client: str = "127.0.0.1") -> dict[str, object]:
    """A new connection's answer, read without sending a byte, and its close."""
    reader, writer = await connect(port, client)
    try:
        answer = await closed_within(reader, WAIT)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert b"\r\nConnection: close" in head
    found: dict[str, object] = json.loads(body)
    return found


async def answered(port: int, listener: str, client: str = "127.0.0.1") -> Conn:
    """A new connection whose request is answered; kept open (kept alive)."""
    reader, writer = await connect(port, client)
    writer.write(request(listener))
    status, _, _ = await read_answer(reader)
    assert status == (401 if listener == "proxy" else 200)
    return reader, writer


@pytest.mark.parametrize("listener", LISTENERS)
async def test_connections_past_the_per_client_bound_are_refused_and_another_client_is_not(
    make_gateway: MakeGateway, listener: str
) -> None:
    gw = await make_gateway(server={"max_connections": 10, "max_connections_per_client": 3})
    port = port_of(gw, listener)
    bounds = bounds_of(gw, listener)
    await until(lambda: bounds.open == 0, "the fixture's connections gone")
    async with held([await answered(port, listener) for _ in range(3)]) as conns:
        for _ in range(2):
            assert await refused_with(port) == {
                "error": "Too many connections",
                "reason": "too_many_connections_from_client",
            }
        other = await answered(port, listener, OTHER_CLIENT)
        conns.append(other)
        assert bounds.from_client("127.0.0.1") == 3 and bounds.open == 4
        # A connection that closes gives its place back.
        conns[0][1].close()
        await until(lambda: bounds.from_client("127.0.0.1") == 2, "the place given back")
        conns.append(await answered(port, listener))
    await until(lambda: bounds.open == 0, "every place given back")
    if listener == "proxy":
        exposed = gw.runtime.metrics.exposition().decode()
        refused = {
            s.labels["reason"]: s.value
            for f in text_string_to_metric_families(exposed)
            for s in f.samples
            if s.name == "echowin_gateway_connections_refused_total"
        }
        assert refused == {"too_many_connections_from_client": 2, "too_many_connections": 0}


@pytest.mark.parametrize("listener", LISTENERS)
async def test_connections_past_the_listeners_bound_are_refused_whoever_calls(
    make_gateway: MakeGateway, listener: str
) -> None:
    gw = await make_gateway(server={"max_connections": 3, "max_connections_per_client": 2})
    port = port_of(gw, listener)
    bounds = bounds_of(gw, listener)
    await until(lambda: bounds.open == 0, "the fixture's connections gone")
    conns = [await answered(port, listener) for _ in range(2)]
    conns.append(await answered(port, listener, OTHER_CLIENT))
    async with held(conns):
        for client in ("127.0.0.3", OTHER_CLIENT, "127.0.0.1"):
            found = await refused_with(port, client)
            assert found["reason"] == "too_many_connections"


async def test_a_trusted_proxy_is_exempt_from_the_per_client_bound(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(
        server={
            "max_connections": 10,
            "max_connections_per_client": 1,
            "trusted_proxies": [f"{OTHER_CLIENT}/32"],
        }
    )
    port = port_of(gw, "proxy")
    async with held([await answered(port, "proxy", OTHER_CLIENT) for _ in range(3)]) as conns:
        conns.append(await answered(port, "proxy"))
        found = await refused_with(port)
        assert found["reason"] == "too_many_connections_from_client"


# --- malformed requests ----------------------------------------------------------------------


def garbage(rng: random.Random, i: int) -> bytes:
    """A malformed request of one of many kinds (bad request lines, bad headers, oversized
    lines, bad bodies), varied by ``rng``."""
    junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    token = rng.choice([b"", b"Authorization: Bearer egw_nope\r\n"])
    kinds = [
        junk + b"\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + junk,  # TLS to an HTTP port
        b"GET\r\n\r\n",
        b"GET / HTTP/9." + str(i % 10).encode() + b"\r\n\r\n",
        b"G\x00T /api/v1/contacts HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/v1/contacts HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        b"GET /api/v1/contacts HTTP/1.1\r\nHost: x\r\nBad\x01Name: v\r\n\r\n",
        b"GET /api/v1/contacts HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
        b"GET /api/v1/contacts HTTP/1.1\r\n: no name\r\n\r\n",
        b"GET /" + b"a" * (9000 + i % 500) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (17000 + i % 500) + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % n for n in range(200)) + b"\r\n",
        b"POST /api/v1/contacts HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Content-Length: 2\r\n\r\nab",
        b"POST /api/v1/contacts HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /api/v1/contacts HTTP/1.1\r\nHost: x\r\n" + token + b"Transfer-Encoding: chunked"
        b"\r\n\r\nzz\r\n" + junk + b"\r\n0\r\n\r\n",
        b"POST /api/v1/contacts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"GET /api/v1/contacts HTTP/1.1\r\nHost: x\r\n bad fold\r\n\r\n",
        b"GET /api/v1/contacts?" + junk.replace(b" ", b"") + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    return kinds[i % len(kinds)]


async def send_garbage(port: int, data: bytes) -> None:
    """Send ``data`` on a new connection and read until the server closes it."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reader.read(), WAIT)
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def dead_upstream() -> str:
    """A base URL nothing listens on: no malformed request should get that far."""
    (port,) = free_ports(1)
    return f"http://127.0.0.1:{port}"


async def test_a_flood_of_malformed_requests_writes_almost_nothing_to_the_log(
    tmp_path: Path, spawn: Spawn, dead_upstream: str
) -> None:
    """3,000 malformed requests against ``serve`` (half to each listener): fewer than 20
    lines above info on its stderr, never a traceback, never the caller's address, and at
    most MALFORMED_LINES malformed-request lines per interval."""
    gw = gateway_config(tmp_path, dead_upstream)
    proc = spawn("serve", "--config", gw.config, env=gw.env, name="flood")
    async with http_session() as session:
        assert await wait_http(session, gw.admin_url("/healthz"), proc) == 200
    rng = random.Random(16)
    started = time.monotonic()
    pending: set[asyncio.Future[None]] = set()
    for i in range(3000):
        port = gw.port if i % 2 == 0 else gw.admin_port
        pending.add(asyncio.ensure_future(send_garbage(port, garbage(rng, i))))
        if len(pending) >= 32:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if pending:
        await asyncio.wait(pending, timeout=WAIT * 3)
    elapsed = time.monotonic() - started
    proc.check_alive()
    async with http_session() as session:  # still serving
        assert await wait_http(session, gw.admin_url("/healthz"), proc) == 200
    lines = proc.stderr().splitlines()
    loud, malformed = [], 0
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            loud.append(line)  # a traceback, or anything not ours
            continue
        if record["level"] not in ("debug", "info"):
            loud.append(line)
        if record["msg"] == "malformed request":
            malformed += 1
        if record["msg"] != "gateway listening":
            assert "127.0.0.1" not in line, line  # the caller's address: never
    assert len(loud) < 20, loud[:20]
    assert not any("Traceback" in line for line in lines)
    intervals = int(elapsed // MALFORMED_INTERVAL_SECONDS) + 2
    assert 0 < malformed <= MALFORMED_LINES * intervals, malformed


def http_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))


# --- serve --workers 2: the supervisor's admin listener --------------------------------------


@pytest.fixture
async def big_sim(aiohttp_server: ServerFactory) -> str:
    sim = Simulator(SimConfig(team_keys=frozenset({REAL_KEY}), limits=(SimLimit(10**6, 3600),)))
    return base_url(await aiohttp_server(sim.app()))


async def test_the_supervisors_admin_listener_is_bounded_and_timed(
    tmp_path: Path, spawn: Spawn, big_sim: str
) -> None:
    gw = gateway_config(tmp_path, big_sim)
    raw = yaml.safe_load(gw.config.read_text())
    raw["server"].update(
        {"max_connections": 10, "max_connections_per_client": 2, "request_head_timeout_seconds": 1}
    )
    write_config(gw.config, raw)
    proc = spawn("serve", "--config", gw.config, "--workers", "2", env=gw.env, name="group")
    async with http_session() as session:
        assert await wait_http(session, gw.admin_url("/healthz"), proc, timeout=20.0) == 200

    # Two held connections from 127.0.0.1, each answered (the probes' connections above may
    # take a moment to be given back: a refusal meanwhile is retried).
    conns: list[Conn] = []
    deadline = time.monotonic() + WAIT
    async with held(conns):
        while len(conns) < 2:
            reader, writer = await connect(gw.admin_port)
            writer.write(HEAD)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            except (ConnectionError, asyncio.IncompleteReadError):
                head = b"HTTP/1.1 503 reset"  # refused, its request unread: a reset may come
            if b" 503 " in head.split(b"\r\n")[0]:
                writer.close()
                assert time.monotonic() < deadline, "the probes' places never came back"
                await asyncio.sleep(0.05)
                continue
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            conns.append((reader, writer))
        found = await refused_with(gw.admin_port)
        assert found["reason"] == "too_many_connections_from_client"
        conns.append(await answered(gw.admin_port, "admin", OTHER_CLIENT))

        reader, writer = await connect(gw.admin_port, "127.0.0.3")
        try:  # and a trickled head is closed at its timeout
            sender = asyncio.ensure_future(trickle(writer, HEAD, 0.3))
            assert await closed_within(reader, 1.0 + MARGIN) == b""
            assert await asyncio.wait_for(sender, WAIT) < len(HEAD)
        finally:
            writer.close()
    # The held connections' places come back as the supervisor sees them close.
    metrics = await fetch_text(gw.admin_url("/metrics"))
    refused = [
        s
        for f in text_string_to_metric_families(metrics)
        for s in f.samples
        if s.name == "echowin_gateway_connections_refused_total"
        and s.labels.get("worker") == "supervisor"
    ]
    assert {s.labels["reason"]: s.value for s in refused}["too_many_connections_from_client"] >= 1


async def fetch_text(url: str) -> str:
    """``url``'s page, once it answers 200 (a 503 while the listener is full is retried)."""
    deadline = time.monotonic() + WAIT
    async with http_session() as session:
        while True:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return await resp.text()
            assert time.monotonic() < deadline, f"{url}: {resp.status}"
            await asyncio.sleep(0.05)
