"""What any server on this stack needs to hold N waiting requests: the memory floor.

    python -m tests.bench.memory_floor [--requests 10000] [--loop asyncio|uvloop] [--json F]

The queued scenario's target is 10,000 queued requests in < 100 MB RSS. This measures,
for the same N requests (one connection each, from the bench's burst generator), the RSS
of two servers that do nothing but hold every request until all N are in, then answer:

* ``aiohttp``: an aiohttp web server whose one handler awaits an event. The floor of any
  gateway built on aiohttp's server, as ours is.
* ``protocol``: an ``asyncio.Protocol`` that parses with aiohttp's C request parser and
  keeps each request as its parsed message, with no task and no coroutine per request.
  The floor of a server core written for this, short of keeping only raw bytes.

Each server prints its RSS when it starts listening and once it holds all N (read from
``/proc/self/status``), as JSON on stdout. A server imports only what it serves with (the
load side's modules are imported by the measuring process alone). docs/performance.md#memory
shows a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any, cast

KINDS = ("aiohttp", "protocol")
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\n{}"
)
HEADERS = {"Authorization": "Bearer egw_" + "x" * 52}  # a token's size
PATH = "/api/v1/contacts"
TIMEOUT = 120.0


def _rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


class _Held:
    """Counts the requests in; sets ``full`` at the N-th."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.full = asyncio.Event()

    def one_more(self) -> None:
        self.count += 1
        if self.count == self.n:
            self.full.set()


async def _serve_aiohttp(port: int, held: _Held) -> dict[str, int]:
    from aiohttp import web

    release = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        held.one_more()
        await release.wait()
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hold)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=held.n).start()
    start = _rss_kb()
    print("ready", flush=True)
    await held.full.wait()
    peak = _rss_kb()
    release.set()
    await runner.shutdown()
    await runner.cleanup()
    return {"start_kb": start, "held_kb": peak}


async def _serve_protocol(port: int, held: _Held) -> dict[str, int]:
    from aiohttp.http_parser import HttpRequestParser

    loop = asyncio.get_running_loop()
    waiting: list[tuple[asyncio.Transport, object]] = []

    class Hold(asyncio.Protocol):
        __slots__ = ("parser", "transport")

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
            self.parser = HttpRequestParser(
                self, loop, 2**16, max_line_size=8190, max_field_size=8190
            )

        def data_received(self, data: bytes) -> None:
            messages, _, _ = self.parser.feed_data(data)
            for message, _payload in messages:
                waiting.append((self.transport, message))
                held.one_more()

    server = await loop.create_server(Hold, "127.0.0.1", port, backlog=held.n)
    start = _rss_kb()
    print("ready", flush=True)
    await held.full.wait()
    peak = _rss_kb()
    for transport, _message in waiting:
        transport.write(ANSWER)
        transport.close()
    server.close()
    await server.wait_closed()
    return {"start_kb": start, "held_kb": peak}


def _serve(kind: str, port: int, n: int, event_loop: str) -> None:
    if event_loop == "uvloop":
        import uvloop

        uvloop.install()
    serve = _serve_aiohttp if kind == "aiohttp" else _serve_protocol

    async def main() -> dict[str, int]:
        return await serve(port, _Held(n))

    print(json.dumps(asyncio.run(main())), flush=True)


async def _measure(kind: str, n: int, event_loop: str) -> dict[str, Any]:
    from tests.bench import loadgen, servers

    (port,) = servers.free_ports(1)
    cmd = [sys.executable, "-m", "tests.bench.memory_floor", "--serve", kind]
    cmd += ["--port", str(port), "--requests", str(n), "--loop", event_loop]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, env=servers.child_env(), cwd=servers.REPO
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(servers.STARTUP_SECONDS):
            ready = await proc.stdout.readline()
        if ready.strip() != b"ready":
            raise RuntimeError(f"{kind} floor server did not start: {ready!r}")
        started = time.perf_counter()
        res = await loadgen.burst(f"http://127.0.0.1:{port}{PATH}", HEADERS, n, TIMEOUT)
        if res["answered"] != n:
            raise RuntimeError(f"{kind} floor server answered {res['answered']} of {n}: {res}")
        async with asyncio.timeout(TIMEOUT):
            out = json.loads(await proc.stdout.readline())
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    start, peak = out["start_kb"] / 1024, out["held_kb"] / 1024
    return {
        "server": kind,
        "event_loop": event_loop,
        "requests": n,
        "answered": res["answered"],
        "errors": res["errors"],
        "seconds": round(time.perf_counter() - started, 3),
        "rss_start_mb": round(start, 1),
        "rss_held_mb": round(peak, 1),
        "kb_per_request": round((peak - start) * 1024 / n, 2),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Server holding the requests | event loop | answered | RSS at start, MB "
        "| RSS with all held, MB | KB per request |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['event_loop']} | {r['answered']:,} / {r['requests']:,} "
            f"| {r['rss_start_mb']} | {r['rss_held_mb']} | {r['kb_per_request']} |"
        )
    return "\n".join(lines) + "\n"


async def run(n: int, loops: list[str]) -> list[dict[str, Any]]:
    from tests.bench.harness import raise_nofile

    raise_nofile()
    return [await _measure(kind, n, lp) for lp in loops for kind in KINDS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--loop", action="append", choices=["asyncio", "uvloop"], help="repeatable")
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    loops = args.loop or ["asyncio"]
    if args.serve:
        _serve(args.serve, args.port, args.requests, loops[0])
        return
    rows = asyncio.run(run(args.requests, loops))
    text = json.dumps(rows, indent=2)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
    print(markdown(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
