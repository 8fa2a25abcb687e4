"""The real key never reaches a caller, in any reversible form (SPEC §5 "Hostile callers").

The simulator plays a hostile echowin: its ``echo_key`` fault sends the key the gateway
used back in its answer, in every form of ``proxy.sim.echo.FORMS``, in every place of
``PLACES`` (body, header, Location, split headers, one byte per chunk, gzip, deflate,
streamed gzip). Each case goes through the real gateway for both keys (team and agency),
and the caller's raw bytes (read with ``auto_decompress=False``, headers as received) are
searched by :func:`reveals_key`, a decoder written here from the formats' definitions and
the standard library, sharing nothing with the gateway's matcher: a copy the gateway
misses is found whatever encoding hides it. A streamed answer may be cut instead of
masked (the caller sees a broken answer); a whole one must arrive, masked.

The oracle is itself tested: every form in every place, straight from the simulator, is
found; the simulator's ordinary answers are not.
"""

from __future__ import annotations

import base64
import binascii
import collections
import html
import re
import urllib.parse
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.sim import Faults, SimConfig, SimLimit, Simulator
from proxy.sim.echo import FORMS, HEADER_PLACES, PLACES, STREAMED, encode
from tests.conftest import (
    AGENCY_KEY,
    TEAM_KEY,
    GatewayHandle,
    ServerFactory,
    SimHandle,
    base_url,
    raw_upstream,
)

MakeGateway = Callable[..., Awaitable[GatewayHandle]]

# Room for every test's requests: the gateway's default budget is not what is tried here.
ROOMY = {"limits": [{"requests": 100_000, "per_seconds": 3600}]}
TIMEOUT = aiohttp.ClientTimeout(total=15)
SUBTEAM = {"firstName": "A", "lastName": "B", "teamName": "T", "email": "a@example.com"}


@dataclass(frozen=True)
class Family:
    """How a caller reaches one of the gateway's keys: the route, the scope, the answer."""

    key: str
    method: str
    path: str
    scope: str
    body: dict[str, Any] | None
    status: int


FAMILIES = {
    "team": Family(TEAM_KEY, "GET", "/api/v1/contacts", "contacts:read", None, 200),
    "agency": Family(
        AGENCY_KEY,
        "POST",
        "/api/v1/agency/subteams",
        "agency:subteams:write",
        SUBTEAM,
        201,
    ),
}
MIXED_KEY = "Ew_Live.Key-0123456789AbCdEfXy"
ROOMY_SIM = (SimLimit(100_000, 3600.0),)
# UTF-16 has NUL bytes, which no header field may hold: sim_echo refuses those pairs (a raw
# upstream tries them below instead).
CASES = [
    (form, place)
    for form in FORMS
    for place in PLACES
    if not (form.startswith("utf16") and place in HEADER_PLACES)
]


# --- what the caller received ---------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """An answer as the caller got it: status (0 if none came) and reason phrase, the header
    fields as received (repeats and order kept), the body's bytes as sent (transfer coding
    removed, content coding kept), and whether it broke off (connection cut, body cut)."""

    status: int
    reason: str
    raw_headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    broken: bool

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        found = [v for k, v in self.raw_headers if k.lower() == wanted]
        return found[0].decode("latin-1") if found else None


async def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, **kw: Any
) -> Received:
    """One request; the answer read piece by piece, so a cut keeps what came before it."""
    async with aiohttp.ClientSession(auto_decompress=False, timeout=TIMEOUT) as session:
        try:
            async with session.request(
                method, url, headers=headers, allow_redirects=False, **kw
            ) as resp:
                body, broken = bytearray(), False
                try:
                    async for piece in resp.content.iter_any():
                        body += piece
                except aiohttp.ClientPayloadError:
                    broken = True
                reason, raw_headers = resp.reason or "", tuple(resp.raw_headers)
                return Received(resp.status, reason, raw_headers, bytes(body), broken)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return Received(0, "", (), b"", True)


async def through_gateway(gw: GatewayHandle, family: Family, token: str) -> Received:
    headers = {"Authorization": f"Bearer {token}"}
    return await fetch(gw.url(family.path), family.method, headers, json=family.body)


# --- the oracle: every reversible way the key could be read back ---------------------------

_B64 = re.compile(rb"[A-Za-z0-9+/]{8,}")
_B64URL = re.compile(rb"[A-Za-z0-9_-]{8,}")
_HEX = re.compile(rb"[0-9A-Fa-f]{8,}")
_JSON_ESCAPE = re.compile(rb'\\u([0-9A-Fa-f]{4})|\\(["\\/bfnrt])')
_JSON_SIMPLE = {b'"': b'"', b"\\": b"\\", b"/": b"/", b"b": b"\b", b"f": b"\f", b"n": b"\n"}
_JSON_SIMPLE |= {b"r": b"\r", b"t": b"\t"}
_INFLATE_STEP = 1024
_MAX_PLAIN = 16 << 20


def _percent(data: bytes) -> list[bytes]:
    """Percent-decoded until nothing changes (``%2541`` -> ``%41`` -> ``A``)."""
    for _ in range(5):
        plain = urllib.parse.unquote_to_bytes(data)
        if plain == data:
            break
        data = plain
    return [data]


def _json(data: bytes) -> list[bytes]:
    def one(match: re.Match[bytes]) -> bytes:
        if match.group(1) is not None:
            return chr(int(match.group(1), 16)).encode("utf-8", "surrogatepass")
        return _JSON_SIMPLE[match.group(2)]

    return [_JSON_ESCAPE.sub(one, data)]


def _html(data: bytes) -> list[bytes]:
    return [html.unescape(data.decode("latin-1")).encode("utf-8", "replace")]


def _base64(data: bytes) -> list[bytes]:
    """Every run of base64 (and of base64url) characters decoded from each of its first
    four characters: a key in the middle of a blob shows at one of those alignments."""
    found: list[bytes] = []
    for pattern, decode in ((_B64, base64.b64decode), (_B64URL, base64.urlsafe_b64decode)):
        runs = pattern.findall(data)
        for shift in range(4):
            cut = [run[shift:] for run in runs]
            found.append(b"\n".join(decode(r[: len(r) - len(r) % 4]) for r in cut))
    return found


def _utf16(data: bytes) -> list[bytes]:
    found = []
    for codec in ("utf-16-le", "utf-16-be"):
        for start in (0, 1):
            part = data[start:]
            text = part[: len(part) - len(part) % 2].decode(codec, "replace")
            found.append(text.encode("utf-8", "replace"))
    return found


def _hex(data: bytes) -> list[bytes]:
    runs = _HEX.findall(data)
    return [
        b"\n".join(binascii.unhexlify(r[s : len(r) - (len(r) - s) % 2]) for r in runs)
        for s in (0, 1)
    ]


_DECODERS: dict[str, Callable[[bytes], list[bytes]]] = {
    "percent": _percent,
    "json": _json,
    "html": _html,
    "base64": _base64,
    "utf16": _utf16,
    "hex": _hex,
}


def _inflated(body: bytes) -> Iterator[bytes]:
    """The body inflated as gzip/zlib and as raw deflate, as far as each gets (a cut or
    corrupt stream still gives what came before the break)."""
    for wbits in (47, -15):
        inflate, plain = zlib.decompressobj(wbits), b""
        try:
            for start in range(0, len(body), _INFLATE_STEP):
                plain += inflate.decompress(body[start : start + _INFLATE_STEP], _MAX_PLAIN)
        except zlib.error:
            pass
        if plain:
            yield plain


def _sources(got: Received) -> Iterator[tuple[str, bytes, int]]:
    """(where, bytes, how many decoding layers to try) for everything the caller holds."""
    yield "status line", got.reason.encode("latin-1", "replace"), 2
    yield "body", got.body, 2
    coding = (got.header("Content-Encoding") or "").lower()
    if coding or got.body[:2] == b"\x1f\x8b":
        for plain in _inflated(got.body):
            yield f"body inflated ({coding or 'magic'})", plain, 2
    for name, value in got.raw_headers:
        yield f"header {name.decode('latin-1')}", name + b": " + value, 2
    # A key cut in two fields: every ordered pair of values, joined.
    values = [(name.decode("latin-1"), value) for name, value in got.raw_headers]
    for i, (name_a, a) in enumerate(values):
        for j, (name_b, b) in enumerate(values):
            if i != j:
                yield f"headers {name_a} + {name_b}", a + b, 1


def _needles(key: str) -> frozenset[bytes]:
    """The key, case-folded, less at most two characters at its ends: a copy missing two
    characters is as good as the key to anyone who can try a few thousand guesses."""
    folded = key.lower().encode()
    return frozenset(folded[i : i + len(folded) - 2] for i in range(3))


def reveals_key(got: Received, key: str) -> str | None:
    """Where (and through which decodings) the caller can read ``key`` back from what it
    received, or None. Case is ignored; decodings are tried two layers deep."""
    needles = _needles(key)
    seen: set[bytes] = set()
    frontier = collections.deque(_sources(got))  # breadth first: the plainest finding first
    while frontier:
        where, data, depth = frontier.popleft()
        if data in seen:
            continue
        seen.add(data)
        folded = data.lower()
        if any(needle in folded for needle in needles):
            return where
        if depth:
            for name, decode in _DECODERS.items():
                frontier.extend((f"{where} | {name}", out, depth - 1) for out in decode(data))
    return None


# --- the oracle finds what the simulator echoes -------------------------------------------


@pytest.mark.parametrize(("form", "place"), CASES)
async def test_the_oracle_finds_every_form_in_every_place_straight_from_the_sim(
    sim: SimHandle, form: str, place: str
) -> None:
    sim.sim.set_faults(Faults(echo_key=form, echo_in=place))
    got = await fetch(f"{sim.url}/api/v1/contacts", headers={"X-API-Key": TEAM_KEY})
    assert got.status == (302 if place == "location" else 200)
    assert not got.broken
    assert reveals_key(got, TEAM_KEY) is not None, (form, place, got)


@pytest.mark.parametrize("form", FORMS)
def test_the_oracle_decodes_every_form_of_a_mixed_case_key(form: str) -> None:
    body = b'{"note": "seen ' + encode(form, MIXED_KEY) + b' here"}'
    assert reveals_key(Received(200, "OK", (), body, False), MIXED_KEY) is not None


async def test_the_oracle_finds_nothing_in_ordinary_answers(sim: SimHandle) -> None:
    headers = {"X-API-Key": TEAM_KEY}
    note = {"firstName": TEAM_KEY[:14], "number": "+15550000001"}
    assert (await fetch(f"{sim.url}/api/v1/contacts", "POST", headers, json=note)).status == 201
    got = await fetch(f"{sim.url}/api/v1/contacts", headers=headers)
    assert got.status == 200
    assert reveals_key(got, TEAM_KEY) is None


# --- through the gateway: zero copies reach the caller -------------------------------------


async def assert_no_copy_reaches_the_caller(
    gw: GatewayHandle, simulator: Simulator, family: Family, form: str, place: str
) -> None:
    """Echo ``family``'s key in ``form`` at ``place``; the caller must not get it back."""
    token = await gw.token(family.scope)
    simulator.set_faults(Faults(echo_key=form, echo_in=place))

    got = await through_gateway(gw, family, token)

    # The simulator did get the real key, so its answer held it in that form.
    assert simulator.log and simulator.log[-1].key == family.key
    where = reveals_key(got, family.key)
    assert where is None, f"the key {family.key[:4]}... reached the caller: {where}"
    if place not in STREAMED:  # a whole answer is masked and delivered, never cut
        assert not got.broken
        assert got.status == (302 if place == "location" else family.status), got.status


@pytest.mark.parametrize(("form", "place"), CASES)
@pytest.mark.parametrize("family_name", list(FAMILIES))
async def test_no_form_of_the_key_reaches_the_caller(
    make_gateway: MakeGateway, sim: SimHandle, family_name: str, form: str, place: str
) -> None:
    gw = await make_gateway(upstream=ROOMY)
    await assert_no_copy_reaches_the_caller(gw, sim.sim, FAMILIES[family_name], form, place)


@pytest.mark.parametrize(("form", "place"), [c for c in CASES if c[1] in ("body", "header")])
async def test_no_form_of_a_mixed_case_key_reaches_the_caller(
    make_gateway: MakeGateway,
    aiohttp_server: ServerFactory,
    tmp_path: Path,
    form: str,
    place: str,
) -> None:
    """The conftest keys are lower case (``lower`` is ``verbatim`` for them) and hold no
    character with an HTML name: this key has capitals, ``_`` (``&lowbar;``) and ``.``
    (``&period;``). Where it goes matters less here: two places."""
    simulator = Simulator(SimConfig(team_keys=frozenset({MIXED_KEY}), limits=ROOMY_SIM))
    upstream = await aiohttp_server(simulator.app())
    key_file = tmp_path / "key"
    key_file.write_text(MIXED_KEY)
    gw = await make_gateway(
        base_url(upstream), upstream=ROOMY | {"api_key": {"file": str(key_file)}}
    )
    family = replace(FAMILIES["team"], key=MIXED_KEY)
    await assert_no_copy_reaches_the_caller(gw, simulator, family, form, place)


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
async def test_a_header_holding_the_key_in_utf16_never_reaches_the_caller(
    make_gateway: MakeGateway, codec: str
) -> None:
    """NUL bytes in a field value: no well-behaved server sends them, a hostile one can."""
    value = TEAM_KEY.encode(codec)
    answer = b"HTTP/1.1 200 OK\r\nX-Debug-Echo: %s\r\nContent-Length: 2\r\n" % value
    async with raw_upstream(answer + b"Connection: close\r\n\r\n{}") as url:
        gw = await make_gateway(url, upstream=ROOMY)
        got = await through_gateway(gw, FAMILIES["team"], await gw.token("contacts:read"))
    assert reveals_key(got, TEAM_KEY) is None


# Hypothesis draws the positions; one gateway serves every example of a run.
KEY_POSITIONS = st.sets(st.integers(0, len(TEAM_KEY) - 1))


@pytest.fixture
async def roomy_gateway(make_gateway: MakeGateway) -> GatewayHandle:
    return await make_gateway(upstream=ROOMY)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    form=st.sampled_from(["percent_some", "mixed_case"]),
    percent=KEY_POSITIONS,
    swapcase=KEY_POSITIONS,
    place=st.sampled_from(["body", "header"]),
)
async def test_no_percent_or_case_variant_of_the_key_reaches_the_caller(
    roomy_gateway: GatewayHandle,
    sim: SimHandle,
    form: str,
    percent: set[int],
    swapcase: set[int],
    place: str,
) -> None:
    positions = tuple(sorted(percent)) if form == "percent_some" else None
    faults = Faults(
        echo_key=form, echo_in=place, echo_percent=positions, echo_swapcase=tuple(swapcase)
    )
    sim.sim.set_faults(faults)
    token = await roomy_gateway.token("contacts:read")
    got = await through_gateway(roomy_gateway, FAMILIES["team"], token)
    echoed = encode(form, TEAM_KEY, percent=positions, swapcase=swapcase)
    assert reveals_key(got, TEAM_KEY) is None, f"{echoed!r} in the {place} reached the caller"
    assert (got.status, got.broken) == (200, False)


# --- no false positives: an answer without the key passes untouched -------------------------


async def harmless_contacts(sim: SimHandle) -> None:
    """Contacts that look like the key without being it: half of it, the key with one
    character changed, and encodings of its first half."""
    half = TEAM_KEY[: len(TEAM_KEY) // 2]
    changed = TEAM_KEY[:10] + "X" + TEAM_KEY[11:]
    texts = [half, changed, encode("percent_all", half).decode(), encode("base64_0", half).decode()]
    for i, text in enumerate(texts):
        body = {"firstName": text, "lastName": "&#114;&amp;", "number": f"+1555000000{i}"}
        created = await fetch(
            f"{sim.url}/api/v1/contacts", "POST", {"X-API-Key": TEAM_KEY}, json=body
        )
        assert created.status == 201


async def test_an_answer_without_the_key_passes_byte_identical(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    await harmless_contacts(sim)
    gw = await make_gateway(upstream=ROOMY)
    token = await gw.token("contacts:read")
    direct = await fetch(f"{sim.url}/api/v1/contacts", headers={"X-API-Key": TEAM_KEY})
    relayed = await through_gateway(gw, FAMILIES["team"], token)
    assert (relayed.status, relayed.broken) == (200, False)
    assert relayed.body == direct.body
    assert reveals_key(relayed, TEAM_KEY) is None


async def test_a_gzip_answer_without_the_key_passes_as_it_came(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    await harmless_contacts(sim)
    gw = await make_gateway(upstream=ROOMY)
    token = await gw.token("contacts:read")
    direct = await fetch(f"{sim.url}/api/v1/contacts", headers={"X-API-Key": TEAM_KEY})
    sim.sim.set_faults(Faults(gzip=True))
    relayed = await through_gateway(gw, FAMILIES["team"], token)
    assert (relayed.status, relayed.broken) == (200, False)
    assert relayed.header("Content-Encoding") == "gzip"
    assert zlib.decompress(relayed.body, 31) == direct.body
