"""The proxy listener's lobby (proxy/server/lobby.py, proxy_handler.py): a new connection's
request waits for budget with no aiohttp handler; idle keep-alive connections wait there
when the listener is crowded; granted requests go on at most as many at once as echowin's
pool holds.

The lanes' ``hold`` is driven directly; the rest runs the real
gateway (in-process, served by its ProxyRunner, as ``serve`` serves it) in front of the
simulator, with raw sockets for callers, and short budget windows.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from prometheus_client import generate_latest

import proxy.server.proxy_handler
from proxy.budget.admission import AdmitRequest
from proxy.budget.grants import Hold, SlotGrant
from proxy.budget.scheduler import Scheduler
from proxy.budget.windows import Limit
from proxy.server.lobby import LobbyServer
from proxy.state.memory import memory_quota_sources
from tests.budget.test_scheduler import Recorder, Rig, settle, token
from tests.budget.test_scheduler import rig as rig  # the fixture
from tests.conftest import GatewayHandle, ServerFactory, SimHandle, base_url
from tests.gateway.test_relay import get_status

MakeGateway = Callable[..., Awaitable[GatewayHandle]]
WAIT = 10.0  # seconds a condition may take to come true on loopback; only a bug takes it


# --- hold: queued at once, the wait taken over by admit ---------------------------------


async def test_a_held_request_is_queued_at_once_and_admit_takes_its_grant(rig: Rig) -> None:
    lane = rig.lane(await rig.sqlite_log(), Limit(5, 60.0))
    tok = token("svc")
    waiter = lane.hold(tok, 10.0)
    assert waiter is not None and lane.depth == 1  # queued, though the budget is free
    await settle()
    assert waiter.future.done()  # the pump granted it, in the queue's order
    rig.clock.now += 0.5
    grant = await lane.admit(tok, None, 10.0, waiter)
    assert isinstance(grant, SlotGrant) and grant is waiter.future.result()
    assert grant.queued_seconds == 0.5  # from when it was held
    assert lane.depth == 0 and len(lane.budget.sends()) == 1


async def test_a_request_admit_would_refuse_is_not_held(rig: Rig) -> None:
    lane = rig.lane(await rig.sqlite_log(), Limit(1, 60.0))
    first = await lane.admit(token("filler"), None, 1.0)
    assert isinstance(first, SlotGrant)
    first.sent(200, {})
    assert lane.hold(token("svc"), 1.0) is None  # the budget frees in a minute
    assert lane.depth == 0
    assert lane.hold(token("svc"), 120.0) is not None  # within its max wait: queued


async def test_a_released_hold_gives_its_slot_back_and_one_taken_for_another_is_dropped(
    rig: Rig,
) -> None:
    lane = rig.lane(await rig.sqlite_log(), Limit(5, 60.0))
    scheduler = Scheduler(
        {"team": lane},
        rig.policy,
        Recorder(),
        rig.clock,
        quota_sources=memory_quota_sources(rig.clock),
    )
    tok = token("svc")
    held = scheduler.hold(AdmitRequest(tok, "team", "/api/v1/contacts", None))
    assert isinstance(held, Hold)
    await settle()
    assert held.granted and len(lane.budget.sends()) == 1
    held.release()  # the caller left before its handler ran
    assert not lane.budget.sends() and lane.depth == 0
    held.release()  # once only

    other = scheduler.hold(AdmitRequest(tok, "team", "/api/v1/contacts", None))
    assert isinstance(other, Hold)
    assert other.take(lane, token("someone-else")) is None  # its handler saw another token
    await settle()
    assert lane.depth == 0 and not lane.budget.sends()


async def test_nothing_is_held_while_shedding_or_for_a_token_with_a_quota(rig: Rig) -> None:
    lane = rig.lane(await rig.sqlite_log(), Limit(5, 60.0))
    scheduler = Scheduler(
        {"team": lane},
        rig.policy,
        Recorder(),
        rig.clock,
        quota_sources=memory_quota_sources(rig.clock),
    )
    capped = token("capped", per_minute=3)
    assert scheduler.hold(AdmitRequest(capped, "team", "/api/v1/contacts", None)) is None
    scheduler.shed()
    assert scheduler.hold(AdmitRequest(token("svc"), "team", "/api/v1/contacts", None)) is None
    assert lane.depth == 0


# --- the real gateway: raw callers --------------------------------------------------------


def request_bytes(token: str, method: str = "GET", body: bytes = b"") -> bytes:
    head = (
        f"{method} /api/v1/contacts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    line, *lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for raw in lines:
        if raw:
            name, _, value = raw.partition(":")
            fields[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(fields["content-length"])), WAIT)
    return int(line.split()[1]), fields, body


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not check():
            await asyncio.sleep(0.005)


def lobby_of(gw: GatewayHandle) -> LobbyServer:
    runner = gw.proxy.runner
    assert runner is not None and isinstance(runner.server, LobbyServer)
    return runner.server


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def connections() -> AsyncIterator[list[Conn]]:
    opened: list[Conn] = []
    yield opened
    for _, writer in opened:
        writer.transport.abort()


async def connect(gw: GatewayHandle, opened: list[Conn]) -> Conn:
    conn = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
    opened.append(conn)
    return conn


def queue_depth(gw: GatewayHandle) -> int:
    lane = gw.runtime.admitter.snapshot()["default"]
    assert isinstance(lane, dict)
    depth = lane["queue_depth"]
    assert isinstance(depth, int)
    return depth


async def test_new_connections_wait_for_budget_in_the_lobby_without_a_handler(
    make_gateway: MakeGateway, sim: SimHandle, connections: list[Conn]
) -> None:
    gw = await make_gateway(upstream={"limits": [{"requests": 4, "per_seconds": 2}]})
    token = await gw.token("*")
    assert await get_status(gw, token, "/api/v1/contacts") == 200  # the calibration probe
    lobby = lobby_of(gw)
    handlers_before = lobby.handlers
    conns = [await connect(gw, connections) for _ in range(9)]
    for _, writer in conns:
        writer.write(request_bytes(token))
    # Three more fit in this window; the other six wait in the lobby, and in the queue.
    await until(lambda: lobby.held_count == 6)
    assert queue_depth(gw) == 6
    assert lobby.handlers <= handlers_before + 3  # no aiohttp handler for those waiting
    exported = generate_latest(gw.runtime.metrics.registry).decode()
    assert 'echowin_gateway_client_connections{state="lobby_waiting"} 6.0' in exported
    assert f'echowin_gateway_client_connections{{state="handler"}} {lobby.handlers}.0' in exported
    answers = [await read_answer(reader) for reader, _ in conns]
    assert [status for status, _, _ in answers] == [200] * 9
    waited = [float(f["server-timing"].split("dur=")[1].split(",")[0]) for _, f, _ in answers]
    assert max(waited) > 1000  # the last ones waited for the next windows (ms)
    assert lobby.held_count == 0 and queue_depth(gw) == 0
    assert len(sim.sim.log) == 10


async def test_a_caller_that_leaves_the_lobby_gives_its_place_back(
    make_gateway: MakeGateway, sim: SimHandle, connections: list[Conn]
) -> None:
    gw = await make_gateway(upstream={"limits": [{"requests": 2, "per_seconds": 2}]})
    token = await gw.token("*")
    assert await get_status(gw, token, "/api/v1/contacts") == 200
    lobby = lobby_of(gw)
    conns = [await connect(gw, connections) for _ in range(4)]
    for _, writer in conns:
        writer.write(request_bytes(token))
    await until(lambda: lobby.held_count == 3)
    gone_before = _requests_with_status(gw, "499")
    conns[-1][1].transport.abort()  # the last in line hangs up
    await until(lambda: lobby.held_count == 2)
    assert queue_depth(gw) == 2
    assert _requests_with_status(gw, "499") == gone_before + 1  # accounted as nginx would
    answers = [await read_answer(reader) for reader, _ in conns[:-1]]
    assert [status for status, _, _ in answers] == [200] * 3
    assert len(sim.sim.log) == 4  # the one that left took no slot from echowin


def _requests_with_status(gw: GatewayHandle, status: str) -> float:
    total = 0.0
    for metric in gw.runtime.metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("status") == status:
                total += sample.value
    return total


async def test_idle_connections_wait_in_the_lobby_when_the_listener_is_crowded(
    make_gateway: MakeGateway,
    sim: SimHandle,
    connections: list[Conn],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        proxy.server.proxy_handler, "PARK_ABOVE", 0
    )  # every idle connection is "crowded"
    gw = await make_gateway()
    token = await gw.token("*")
    lobby = lobby_of(gw)
    reader, writer = await connect(gw, connections)
    for _ in range(3):  # one connection, kept alive, parked after each answer
        writer.write(request_bytes(token))
        status, fields, _ = await read_answer(reader)
        assert status == 200 and fields.get("connection", "").lower() != "close"
        await until(lambda: lobby.handlers == 0 and len(lobby.lobbies) == 1)
    body = json.dumps({"firstName": "Ada", "number": "+15550100"}).encode()
    writer.write(request_bytes(token, "POST", body))  # a body, on a parked connection
    status, _, answer = await read_answer(reader)
    assert status == 201 and b"Ada" in answer
    # Two requests in one write: the second is read with the first and is not lost.
    writer.write(request_bytes(token) + request_bytes(token))
    assert [(await read_answer(reader))[0] for _ in range(2)] == [200, 200]
    assert len(sim.sim.log) == 6


async def test_granted_requests_go_on_no_faster_than_echowins_pool_takes_them(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory, connections: list[Conn]
) -> None:
    gate: asyncio.Queue[None] = asyncio.Queue()  # one item lets one upstream answer go
    seen = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal seen
        seen += 1
        await gate.get()
        quota = {"X-RateLimit-Limit": "1000", "X-RateLimit-Remaining": str(1000 - seen)}
        return web.json_response({"ok": True}, headers=quota)  # the probe calibrates

    app = web.Application()
    app.router.add_get("/api/v1/contacts", slow)
    upstream = await aiohttp_server(app)
    limits = [{"requests": 100, "per_seconds": 60}]
    gw = await make_gateway(base_url(upstream), upstream={"max_connections": 1, "limits": limits})
    token = await gw.token("*")
    lobby = lobby_of(gw)
    probe = asyncio.ensure_future(get_status(gw, token, "/api/v1/contacts"))
    await until(lambda: seen == 1)  # the calibration probe: the others wait for its answer
    conns = [await connect(gw, connections) for _ in range(6)]
    for _, writer in conns:
        writer.write(request_bytes(token))
    await until(lambda: lobby.held_count == 6)
    gate.put_nowait(None)
    assert await probe == 200
    # All six granted: one at echowin on the pool's one connection, one in a handler
    # waiting for that connection, four in the lobby's line with no handler yet.
    await until(lambda: seen == 2)
    await until(lambda: lobby.forwarding == 1)
    assert (len(lobby.ready), lobby.held_count, lobby.handlers) == (4, 4, 2)
    for _ in range(6):
        gate.put_nowait(None)
    answers = [await read_answer(reader) for reader, _ in conns]
    assert [status for status, _, _ in answers] == [200] * 6
    assert lobby.forwarding == 0 and not lobby.ready


async def test_a_request_aiohttp_refuses_after_the_lobby_gives_its_place_back(
    make_gateway: MakeGateway, sim: SimHandle, connections: list[Conn]
) -> None:
    """The lobby reads less than aiohttp: what aiohttp then refuses (here more header
    lines than its max_headers) loses its place in the queue and any slot granted."""
    gw = await make_gateway()
    token = await gw.token("*")
    assert await get_status(gw, token, "/api/v1/contacts") == 200
    gone_before = _requests_with_status(gw, "499")
    reader, writer = await connect(gw, connections)
    many = b"".join(b"X-%d: 1\r\n" % n for n in range(200))
    writer.write(request_bytes(token).replace(b"Host: x\r\n", b"Host: x\r\n" + many))
    status, _, _ = await read_answer(reader)
    assert status == 400
    await until(lambda: queue_depth(gw) == 0)
    lane = gw.runtime.admitter.lanes["default"]  # type: ignore[attr-defined]
    await until(lambda: len(lane.budget.sends()) == 1)  # the probe's only
    assert len(sim.sim.log) == 1
    assert _requests_with_status(gw, "499") == gone_before  # aiohttp's answer, not a leaver


async def test_a_content_length_too_long_to_read_gets_aiohttps_400(
    make_gateway: MakeGateway, connections: list[Conn]
) -> None:
    gw = await make_gateway()
    reader, writer = await connect(gw, connections)
    writer.write(b"POST /api/v1/contacts HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n")
    status, _, body = await read_answer(reader)
    assert status == 400 and json.loads(body)["reason"] == "bad_request"


async def test_a_connection_is_not_parked_while_its_answer_is_still_being_written(
    make_gateway: MakeGateway,
    aiohttp_server: ServerFactory,
    connections: list[Conn],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lobby hears nothing of the transport's pause_writing: parking a connection whose
    answer still sits in the transport's buffer would leave the next handler writing with
    no backpressure. The caller here never reads, so the buffer fills."""
    monkeypatch.setattr(proxy.server.proxy_handler, "PARK_ABOVE", 0)
    decisions: list[tuple[int, bool]] = []
    park_if_idle = proxy.server.proxy_handler.ProxyHandler.park_if_idle

    def recorded(self: proxy.server.proxy_handler.ProxyHandler) -> bool:
        transport = self.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        parked = park_if_idle(self)
        decisions.append((buffered, parked))
        return parked

    monkeypatch.setattr(proxy.server.proxy_handler.ProxyHandler, "park_if_idle", recorded)
    quota = {"X-RateLimit-Limit": "100000", "X-RateLimit-Remaining": "99999"}

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"a" * 60_000, headers=quota)

    app = web.Application()
    app.router.add_get("/api/v1/contacts", big)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(base_url(upstream))
    token = await gw.token("*")
    lobby = lobby_of(gw)
    small = socket.socket()
    small.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
    small.connect(("127.0.0.1", gw.proxy.port))
    small.setblocking(False)
    _, writer = await asyncio.open_connection(sock=small)
    connections.append((_, writer))
    await until(lambda: len(lobby.lobbies) == 1)
    server_side = next(iter(lobby.lobbies))._transport
    assert server_side is not None
    server_side.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for count in range(1, 41):  # never read: answers pile up in the gateway's buffer
        writer.write(request_bytes(token))
        await until(lambda n=count: len(decisions) == n)  # type: ignore[misc]
        if any(buffered for buffered, _ in decisions):
            break
    assert any(buffered for buffered, _ in decisions), decisions  # the case was reached
    assert not [d for d in decisions if d[0] and d[1]], decisions  # and never parked
