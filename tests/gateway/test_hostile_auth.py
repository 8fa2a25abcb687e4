"""Hostile callers against the real gateway and the real simulator (issue 16): guessing
tokens is throttled per client before any token lookup (on the lobby's path and the
handler's alike, behind a trusted proxy by X-Forwarded-For), a caller's X-Request-ID is
kept only when plain, and echowin's own 429 comes back as the gateway's JSON.

Token lookups are counted by a real MemoryTokenStore subclass that the runtime opens in
place of the memory store; nothing of the gateway is mocked.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import string
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

import proxy.runtime
import proxy.state
from proxy.auth.tokens import TokenRecord
from proxy.config import parse_config
from proxy.sim import Faults
from proxy.state.memory import MemoryTokenStore
from tests.conftest import GatewayHandle, SimHandle, gateway_config
from tests.server.test_lobby import lobby_of, read_answer, until

MakeGateway = Callable[..., Awaitable[GatewayHandle]]
WAIT = 10.0  # seconds a condition may take to come true on loopback; only a bug takes it
OTHER = "127.0.0.2"  # a second client address on loopback
CONTACTS = "/api/v1/contacts"


class CountingStore(MemoryTokenStore):
    """The memory token store, noting the id of every lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.looked_up: list[str] = []

    async def get(self, token_id: str) -> TokenRecord | None:
        self.looked_up.append(token_id)
        return await super().get(token_id)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> CountingStore:
    """The token store every gateway of the test opens (state: memory://)."""
    made = CountingStore()

    async def open_counting(url: str, **_: Any) -> CountingStore:
        assert url == "memory://"
        return made

    monkeypatch.setattr(proxy.state, "open_token_store", open_counting)
    return made


def guess() -> str:
    """A well-formed token nobody was given: its id is looked up, and not found."""
    alnum = string.ascii_letters + string.digits
    public = "".join(random.choices(string.ascii_lowercase + string.digits, k=12))
    return f"egw_{public}_{''.join(random.choices(alnum, k=43))}"


def id_of(token: str) -> str:
    return token.split("_")[1]


def session_from(
    local: str = "127.0.0.1", *, limit: int = 1, force_close: bool = False
) -> aiohttp.ClientSession:
    """A client whose connections come from ``local`` (any 127/8 address is loopback)."""
    connector = aiohttp.TCPConnector(local_addr=(local, 0), limit=limit, force_close=force_close)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=WAIT))


async def get(
    session: aiohttp.ClientSession,
    gw: GatewayHandle,
    token: str | None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], dict[str, Any]]:
    fields = dict(headers or {})
    if token is not None:
        fields["Authorization"] = f"Bearer {token}"
    async with session.get(gw.url(CONTACTS), headers=fields) as resp:
        body = await resp.read()
        return resp.status, dict(resp.headers), json.loads(body) if body else {}


def throttle_config(requests: int) -> dict[str, Any]:
    # An hour's leak: nothing leaks while a test runs, so every count below is exact.
    return {"failures_per_client": {"requests": requests, "per_seconds": 3600}}


def access_log(gw: GatewayHandle) -> Callable[[], list[dict[str, Any]]]:
    buffer = io.StringIO()
    gw.runtime.access_log.stream = buffer

    def lines() -> list[dict[str, Any]]:
        gw.runtime.access_log.flush()
        return [json.loads(line) for line in buffer.getvalue().splitlines()]

    return lines


def refusals(gw: GatewayHandle, reason: str) -> float:
    total = 0.0
    for metric in gw.runtime.metrics.refusals.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["reason"] == reason:
                assert sample.labels["token"] == sample.labels["credential"] == "-"
                total += sample.value
    return total


def assert_throttled(
    status: int, headers: dict[str, str], body: dict[str, Any] | bytes, retry: int = 360
) -> None:
    """A 429 auth_throttled as the gateway answers it (``headers``' names in any case),
    saying to come back once one unit has leaked: 3600 s / 10 by default."""
    if isinstance(body, bytes):
        body = json.loads(body)
    headers = {name.lower(): value for name, value in headers.items()}
    assert status == 429
    assert body == {
        "error": "Too many failed authentications",
        "reason": "auth_throttled",
        "retryAfter": retry,
    }
    assert headers["retry-after"] == str(retry)
    assert headers["x-request-id"]


# --- throttling failed authentications -----------------------------------------------------


async def test_two_hundred_guesses_are_throttled_without_lookups_while_others_get_in(
    make_gateway: MakeGateway, store: CountingStore
) -> None:
    gw = await make_gateway(auth=throttle_config(10))
    lines = access_log(gw)
    good = await gw.token("contacts:read", name="good")
    guesses = [guess() for _ in range(200)]
    answers: list[tuple[int, dict[str, str], dict[str, Any]]] = []
    # One after another (about a second on loopback), every fourth on a new connection:
    # both the lobby's decision (a connection's first request) and the handler's.
    async with session_from() as kept, session_from(force_close=True) as fresh:
        for n, token in enumerate(guesses):
            answers.append(await get(fresh if n % 4 == 0 else kept, gw, token))
        # The throttled address is refused even with a valid token: the lookup is what
        # the throttle protects, and a valid token is no reason to look one up.
        assert_throttled(*await get(kept, gw, good))
        assert_throttled(*await get(fresh, gw, good))
    statuses = [status for status, _, _ in answers]
    assert statuses == [401] * 10 + [429] * 190
    for answer in answers[10:]:
        assert_throttled(*answer)
    # Only the ten that were answered 401 were looked up, once each.
    assert Counter(store.looked_up) == Counter(id_of(token) for token in guesses[:10])
    async with session_from(OTHER) as other:
        status, _, _ = await get(other, gw, good)
        assert status == 200  # another address authenticates as usual
    assert store.looked_up[-1] == id_of(good)
    assert refusals(gw, "auth_throttled") == 192
    refused = [line for line in lines() if line["status"] == 429]
    assert len(refused) == 192
    assert {line["refusal"] for line in refused} == {"auth_throttled"}


async def test_concurrent_guesses_cannot_outrun_the_bucket(
    make_gateway: MakeGateway, store: CountingStore
) -> None:
    gw = await make_gateway(auth=throttle_config(10))
    guesses = [guess() for _ in range(200)]
    async with session_from(limit=50) as session:
        answers = await asyncio.gather(*(get(session, gw, token) for token in guesses))
    statuses = Counter(status for status, _, _ in answers)
    assert set(statuses) == {401, 429}
    # Lookups under way hold their places in the bucket: however many connections guess
    # at once, no more than the bucket's ten are looked up and fail. A connection's first
    # request may be checked by the lobby and then refused by its handler if the bucket
    # filled in between: one lookup uncharged, so at most twice the bucket in all.
    assert statuses[401] <= 10
    assert len(store.looked_up) <= 20
    assert len(set(store.looked_up)) == len(store.looked_up)  # each guess at most once


async def test_behind_a_trusted_proxy_x_forwarded_for_names_the_client(
    make_gateway: MakeGateway, store: CountingStore
) -> None:
    gw = await make_gateway(auth=throttle_config(10), server={"trusted_proxies": ["127.0.0.1/32"]})
    good = await gw.token("contacts:read", name="good")
    guessing = {"X-Forwarded-For": "203.0.113.7"}
    # The caller wrote the left one itself; the trusted proxy appended what it saw.
    spoofing = {"X-Forwarded-For": "203.0.113.99, 203.0.113.7"}
    async with session_from() as proxied:
        for _ in range(10):
            status, _, _ = await get(proxied, gw, guess(), guessing)
            assert status == 401
        assert_throttled(*await get(proxied, gw, good, spoofing))
        assert_throttled(*await get(proxied, gw, guess(), guessing))
        # Other clients behind the same proxy are not touched, nor is the proxy itself.
        status, _, _ = await get(proxied, gw, good, {"X-Forwarded-For": "203.0.113.8"})
        assert status == 200
        assert (await get(proxied, gw, good))[0] == 200
    # From a peer that is not trusted, X-Forwarded-For is ignored: the peer is the client,
    # whatever address it claims to speak for.
    async with session_from(OTHER) as untrusted:
        assert (await get(untrusted, gw, good, guessing))[0] == 200
        for n in range(10):
            claimed = {"X-Forwarded-For": f"198.51.100.{n}"}
            assert (await get(untrusted, gw, guess(), claimed))[0] == 401
        claimed = {"X-Forwarded-For": "198.51.100.200"}
        assert_throttled(*await get(untrusted, gw, good, claimed))


async def test_a_reload_keeps_the_buckets_unless_the_rate_changes(
    make_gateway: MakeGateway, sim: SimHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reload routes the gateway's loggers to stderr; this process's other tests read them.
    monkeypatch.setattr(proxy.runtime, "setup_logging", lambda level, fmt: None)
    gw = await make_gateway(auth=throttle_config(3))
    rt = gw.runtime
    async with session_from() as session:
        for _ in range(3):
            assert (await get(session, gw, guess()))[0] == 401
        assert_throttled(*await get(session, gw, guess()), 1200)
        same_rate = {"auth": throttle_config(3), "server": {"trusted_proxies": ["10.0.0.0/8"]}}
        rt.apply(parse_config(gateway_config(sim.url, **same_rate)), rt.secrets)
        assert_throttled(*await get(session, gw, guess()), 1200)
        rt.apply(parse_config(gateway_config(sim.url, auth=throttle_config(4))), rt.secrets)
        assert (await get(session, gw, guess()))[0] == 401  # a new rate: empty buckets


@pytest.fixture
async def connections() -> AsyncIterator[list[asyncio.StreamWriter]]:
    opened: list[asyncio.StreamWriter] = []
    yield opened
    for writer in opened:
        writer.transport.abort()


async def connect(
    gw: GatewayHandle, opened: list[asyncio.StreamWriter], local: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.proxy.port, local_addr=(local, 0)
    )
    opened.append(writer)
    return reader, writer


def request_bytes(token: str, extra: str = "") -> bytes:
    return (
        f"GET {CONTACTS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"{extra}Content-Length: 0\r\n\r\n"
    ).encode()


async def test_the_lobby_throttles_a_request_that_would_wait_for_budget(
    make_gateway: MakeGateway,
    sim: SimHandle,
    store: CountingStore,
    connections: list[asyncio.StreamWriter],
) -> None:
    gw = await make_gateway(
        auth=throttle_config(3), upstream={"limits": [{"requests": 1, "per_seconds": 3}]}
    )
    probe = await gw.token("*", name="probe")
    async with session_from(OTHER) as other:
        assert (await get(other, gw, probe))[0] == 200  # calibrates, and spends the window
    async with session_from(force_close=True) as fresh:
        for _ in range(3):
            assert (await get(fresh, gw, guess()))[0] == 401
    late = await gw.token("*", name="late")  # never used: only a lookup can verify it
    lobby = lobby_of(gw)
    reader, writer = await connect(gw, connections)
    writer.write(request_bytes(late))
    status, fields, body = await read_answer(reader)
    # Without the lobby's own check the token would be looked up and the request queued
    # for the next window, to be refused only once its wait was over.
    assert_throttled(status, fields, body, 1200)
    assert id_of(late) not in store.looked_up
    assert lobby.held_count == 0
    # From another address the same request is looked up once and waits in the lobby.
    reader, writer = await connect(gw, connections, OTHER)
    writer.write(request_bytes(late))
    await until(lambda: lobby.held_count == 1)
    assert store.looked_up.count(id_of(late)) == 1
    status, _, _ = await read_answer(reader)
    assert status == 200
    assert len(sim.sim.log) == 2


async def test_the_handler_throttles_on_a_kept_connection(
    make_gateway: MakeGateway, store: CountingStore, connections: list[asyncio.StreamWriter]
) -> None:
    gw = await make_gateway(auth=throttle_config(3))
    late = await gw.token("*", name="late")
    reader, writer = await connect(gw, connections)
    # The first request of a connection is the lobby's to decide; the next ones on the
    # same connection go straight to aiohttp's handler.
    for _ in range(3):
        writer.write(request_bytes(guess()))
        assert (await read_answer(reader))[0] == 401
    looked_up = len(store.looked_up)
    for token in (guess(), late):
        writer.write(request_bytes(token))
        assert_throttled(*await read_answer(reader), 1200)
    assert len(store.looked_up) == looked_up  # neither was looked up


# --- a caller's X-Request-ID ----------------------------------------------------------------


async def test_an_unsafe_request_id_never_reaches_the_access_log_nor_echowin(
    make_gateway: MakeGateway, sim: SimHandle, connections: list[asyncio.StreamWriter]
) -> None:
    gw = await make_gateway()
    lines = access_log(gw)
    token = await gw.token("contacts:read")
    unsafe = [b"x" * 129, b"binary\x80\xff\xfe", b'quote"and space', b"caf\xc3\xa9"]
    reader, writer = await connect(gw, connections)
    made = []
    for given in unsafe:
        writer.write(request_bytes(token).replace(b"Host: x", b"Host: x\r\nX-Request-ID: " + given))
        status, fields, _ = await read_answer(reader)
        assert status == 200
        ours = fields["x-request-id"]
        assert len(ours) == 32 and ours.encode() != given
        assert sim.sim.log[-1].headers["X-Request-ID"] == ours  # what echowin was sent
        made.append(ours)
    # A plain one is kept, as before.
    writer.write(request_bytes(token, "X-Request-ID: svc:job-7.retry_2\r\n"))
    status, fields, _ = await read_answer(reader)
    assert fields["x-request-id"] == "svc:job-7.retry_2"
    logged = lines()
    assert [line["request_id"] for line in logged] == [*made, "svc:job-7.retry_2"]
    text = json.dumps(logged)
    for given in unsafe:
        assert given.decode("latin-1") not in text
    assert "x" * 129 not in "".join(str(r.headers) for r in sim.sim.log)


# --- echowin's own 429 -------------------------------------------------------------------------


async def test_echowins_own_429_is_the_gateways_json_and_freezes_the_key(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await make_gateway(queue={"max_wait_seconds": 1})
    lines = access_log(gw)
    token = await gw.token("contacts:read")
    sim.sim.set_faults(Faults(force_429=True, retry_after=7, count=1))
    async with session_from() as session:
        status, headers, body = await get(session, gw, token)
        assert status == 429
        assert body == {
            "error": "echowin refused the request: rate limit exceeded",
            "reason": "upstream_429",
            "retryAfter": 7,
        }
        assert headers["Retry-After"] == "7"
        assert headers["X-Request-ID"]
        seen = len(sim.sim.log)
        assert seen == 1
        # The key is frozen: the next request is refused without reaching echowin.
        status, headers, body = await get(session, gw, token)
        assert status == 429
        assert body["reason"] == "upstream_frozen"
        assert int(headers["Retry-After"]) >= 6
    assert len(sim.sim.log) == seen
    first, second = lines()
    assert (first["status"], first["upstream_status"], first["refusal"]) == (
        429,
        429,
        "upstream_429",
    )
    assert (second["upstream_status"], second["refusal"]) == (None, "upstream_frozen")
