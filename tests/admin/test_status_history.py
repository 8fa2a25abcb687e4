"""The status page's last hour, end to end: a gateway on a SQLite state whose send log
holds sends from earlier minutes (as after a restart) sends more now; /status.json
counts them per minute, and a real headless Chromium renders /status. Its DOM and its
screenshot are compared with the counts by structure (which minute has a bar, how tall
it stands), never pixel for pixel against a stored image."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.admin.status_svg import SENDS_HEIGHT
from proxy.budget.slots import Line, Row
from proxy.state.sqlite.sends import SqliteSendLog
from tests.admin.test_status import ARTIFACTS, get
from tests.conftest import GatewayHandle

EARLIER = {42: 3, 20: 5, 5: 2}  # minutes before this one: sends the log already holds
LIVE = 4  # sent through the gateway now
LIMITS = [{"requests": 40, "per_seconds": 3600}, {"requests": 6, "per_seconds": 60}]
ONE_A_SECOND = {"requests": 1, "per_seconds": 1}
BAR_RGB = (0x25, 0x63, 0xEB)  # .sends in proxy/admin/status_svg.py


async def write_earlier_sends(path: Path, now: float) -> dict[int, int]:
    """Rows in the send log, 10 s into minutes before ``now``'s; by minute start."""
    log = await SqliteSendLog.open(path)
    this_minute = math.floor(now / 60) * 60
    expected = {}
    try:
        for ago, n in EARLIER.items():
            row: Row = (this_minute - 60 * ago + 10, n, "")

            def plan(rows: list[Row], line: Line, row: Row = row) -> Row:
                return row

            log.reserve("default", plan, None)
            expected[this_minute - 60 * ago] = n
    finally:
        await log.close()
    return expected


class SvgBars(HTMLParser):
    """The sends bars of each credential's SVG, as the browser's DOM holds them."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: dict[str, dict[str, str]] = {}
        self.bars: dict[str, list[dict[str, str]]] = {}
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "svg" and "data-credential" in found:
            self._in = found["data-credential"]
            self.svgs[self._in] = found
            self.bars[self._in] = []
        elif tag == "rect" and self._in and "data-sends" in found:
            self.bars[self._in].append(found)


def chromium(*args: str, profile: str) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed (.ci/run installs the Debian package)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        "--window-size=1000,2200",
    ]
    return subprocess.run(
        [browser, *flags, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": profile},
    )


def png_rgb(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of RGB triples of an 8-bit, non-interlaced PNG (RGB or RGBA:
    what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0
    channels = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * channels
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
        rows.append(bytes(v for i, v in enumerate(line) if i % channels < 3))
    return width, height, rows


def bar_heights(width: int, rows: list[bytes]) -> list[int]:
    """Left to right, the height in pixels of each run of columns holding the bar colour."""
    colour = bytes(BAR_RGB)
    counts = [sum(row[3 * x : 3 * x + 3] == colour for row in rows) for x in range(width)]
    heights, run = [], 0
    for count in [*counts, 0]:
        if count:
            run = max(run, count)
        elif run:
            heights.append(run)
            run = 0
    return heights


async def test_the_last_hour_drawn_by_chromium_matches_the_counts(
    make_gateway: Callable[..., Awaitable[GatewayHandle]], tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    expected = await write_earlier_sends(state, time.time())
    gateway = await make_gateway(
        state=f"sqlite:///{state}",
        upstream={"agency_key": None, "extra_keys": {}, "limits": LIMITS},
    )
    token = await gateway.token("contacts:read")
    started = math.floor(time.time() / 60) * 60
    for _ in range(LIVE):
        assert (await get(gateway.url("/api/v1/contacts"), token))[0] == 200

    status, text = await get(gateway.admin_url("/status.json"))
    assert status == 200
    history = json.loads(text)["credentials"]["default"]["history"]
    sends, start = history["sends"], history["start"]
    assert len(sends) == len(history["queue_max"]) == 60
    by_minute = {start + 60 * i: n for i, n in enumerate(sends)}
    for minute, n in expected.items():
        assert by_minute[minute] == n, (minute, by_minute)
    assert sum(n for minute, n in by_minute.items() if minute >= started) == LIVE
    assert sum(sends) == sum(EARLIER.values()) + LIVE  # every other minute holds none
    assert history["queue_max"][-1] == 0  # sampled since the start: nothing waited

    dom, heights = await render(gateway.admin_url("/status"))
    parsed = SvgBars()
    parsed.feed(dom)
    svg, bars = parsed.svgs["default"], parsed.bars["default"]
    assert int(svg["data-height"]) == SENDS_HEIGHT
    scale = float(svg["data-scale"])
    assert scale == math.ceil(max(6, *sends) * 1.1)  # the per-minute limit or the busiest
    assert len(bars) == 60
    drawn_start = int(bars[0]["data-start"])  # a minute may have turned since the JSON
    assert drawn_start - start in (0, 60)
    for bar in bars:
        minute, n = int(bar["data-minute"]), int(bar["data-sends"])
        assert int(bar["data-start"]) == drawn_start + 60 * minute
        assert n == by_minute.get(drawn_start + 60 * minute, 0), (minute, n, sends)
        assert abs(float(bar["height"]) - n / scale * SENDS_HEIGHT) < 0.01
    # The screenshot: one bar of the bar colour per busy minute, left to right, each as
    # tall as its count says (to a pixel: its top edge is antialiased).
    busy = [n for n in sends if n]
    assert len(heights) == len(busy), (heights, busy)
    for got, n in zip(heights, busy, strict=True):
        assert abs(got - n / scale * SENDS_HEIGHT) <= 1.5, (heights, busy)


async def render(url: str) -> tuple[str, list[int]]:
    """``url`` in headless Chromium: its DOM, and the bar heights in its screenshot
    (kept as tests/artifacts/status-history.png)."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-history.png"
    shot.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        dom = await asyncio.to_thread(chromium, "--dump-dom", url, profile=profile)
        assert "sends/min" in dom.stdout, dom.stderr[-2000:]
        done = await asyncio.to_thread(chromium, f"--screenshot={shot}", url, profile=profile)
    assert shot.exists(), done.stderr[-2000:]
    width, _, rows = await asyncio.to_thread(png_rgb, shot.read_bytes())
    return dom.stdout, bar_heights(width, rows)


def test_the_png_reader_reads_what_zlib_wrote() -> None:
    # Two rows of 2 RGB pixels: filter 0 (none), then filter 2 (up: add the row above).
    raw = b"\x00" + bytes([1, 2, 3, 4, 5, 6]) + b"\x02" + bytes([1, 1, 1, 0, 0, 0])
    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + b"\0\0\0\0"

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
    png += chunk(b"IEND", b"")
    assert png_rgb(png) == (2, 2, [bytes([1, 2, 3, 4, 5, 6]), bytes([2, 3, 4, 4, 5, 6])])


@pytest.mark.service
async def test_on_redis_a_replica_draws_the_other_replicas_sends(
    make_gateway: Callable[..., Awaitable[GatewayHandle]], redis_client: Redis
) -> None:
    prefix = f"egw-statusvg-{uuid.uuid4().hex[:8]}:"
    shared = {
        "state": "redis://127.0.0.1:6379/0",
        "redis": {"key_prefix": prefix},
        "upstream": {"agency_key": None, "extra_keys": {}, "limits": LIMITS},
    }
    try:
        a = await make_gateway(**shared)
        b = await make_gateway(**shared)
        token = await a.token("contacts:read")
        for gateway, n in ((a, 3), (b, 2)):
            for _ in range(n):
                assert (await get(gateway.url("/api/v1/contacts"), token))[0] == 200
        for gateway in (a, b):
            # A replica's mirror of Redis may be a tenth of a second behind the others.
            for _ in range(50):
                status, text = await get(gateway.admin_url("/status.json"))
                assert status == 200
                history = json.loads(text)["credentials"]["default"]["history"]
                if sum(history["sends"]) == 5:
                    break
                await asyncio.sleep(0.05)
            assert sum(history["sends"]) == 5, history["sends"][-3:]
            assert history["queue_max"][-1] == 0, history["queue_max"][-3:]
    finally:
        keys = [key async for key in redis_client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await redis_client.delete(*keys)


async def history_of(gateway: GatewayHandle) -> dict[str, Any]:
    status, text = await get(gateway.admin_url("/status.json"))
    assert status == 200
    history: dict[str, Any] = json.loads(text)["credentials"]["default"]["history"]
    return history


async def test_the_queue_strip_shows_requests_that_waited(
    make_gateway: Callable[..., Awaitable[GatewayHandle]],
) -> None:
    # One send a second: of three sent at once, two wait (about one and two seconds).
    gateway = await make_gateway(
        upstream={"agency_key": None, "extra_keys": {}, "limits": [ONE_A_SECOND]},
        queue={"max_wait_seconds": 5},
    )
    token = await gateway.token("contacts:read")
    sent = [asyncio.ensure_future(get(gateway.url("/api/v1/contacts"), token)) for _ in range(3)]
    try:
        for _ in range(60):  # the sampler reads the depth once a second
            queue = (await history_of(gateway))["queue_max"]
            if max(n or 0 for n in queue) >= 1:
                break
            await asyncio.sleep(0.05)
    finally:
        answers = await asyncio.gather(*sent)
    assert [status for status, _ in answers] == [200, 200, 200]
    assert max(n or 0 for n in queue) in (1, 2), queue[-2:]
    _, page = await get(gateway.admin_url("/status"))
    history = await history_of(gateway)  # read after the page: a minute may have turned
    known = {history["start"] + 60 * m: n for m, n in enumerate(history["queue_max"])}
    known = {start: n for start, n in known.items() if n is not None}
    drawn = re.findall(r'data-start="(\d+)" data-queue="(\d+)"', page)
    assert all(known[int(start)] == int(n) for start, n in drawn), (drawn, known)
    assert len(drawn) >= len(known) - 1
    assert max(int(n) for _, n in drawn) in (1, 2)
