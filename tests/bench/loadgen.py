"""Load generators for the benchmark harness; every loop is bounded in count and time.

* :func:`run_wrk` drives wrk (the Debian package) pinned to one core and reads its summary
  from a ``done`` hook (no per-request Lua, so wrk runs at full speed).
* :func:`run_python` is the fallback when wrk is absent: a fixed number of keep-alive
  connections on raw asyncio transports, each sending requests back to back, recording
  every request's latency. It is slower than wrk; its numbers are comparable only with each
  other, within one run.
* :func:`burst` fires N requests at once (one connection each) with aiohttp and reports how
  each was answered: the queued scenario.

Each returns a plain dict; latencies are in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

# Requests one Python connection sends at most in one measurement (the time bound comes first
# at any realistic speed).
MAX_REQUESTS_PER_CONNECTION = 2_000_000
# The Python generator stops waiting this long after its deadline.
GRACE_SECONDS = 10.0

_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect":%.0f,"read":%.0f,' ..
    '"write":%.0f,"status":%.0f,"timeout":%.0f,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,' ..
    '"mean_us":%.1f,"max_us":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""
WRK_DONE = _WRK_DONE
"""The ``done`` hook every wrk script of the bench ends with: the summary as one JSON line."""
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")


def wrk_path() -> str | None:
    return shutil.which("wrk")


def version_text(path: str) -> str:
    """What ``path -v`` prints (wrk prints to stdout, nginx to stderr), stripped."""
    out = subprocess.run(
        [path, "-v"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return (out.stdout or out.stderr).strip()


def wrk_version(path: str) -> str:
    first = version_text(path).splitlines()
    return first[0].split(" [")[0] if first else "wrk"


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    """``cmd`` run on CPU ``cpu`` only: taskset when present, else a Python exec shim."""
    if cpu is None:
        return cmd
    taskset = shutil.which("taskset")
    if taskset:
        return [taskset, "-c", str(cpu), *cmd]
    shim = f"import os,sys;os.sched_setaffinity(0,{{{cpu}}});os.execvp(sys.argv[1],sys.argv[1:])"
    return [sys.executable, "-c", shim, *cmd]


def _result(
    requests: int,
    seconds: float,
    latencies_ms: list[float] | None,
    *,
    p50: float | None = None,
    p90: float | None = None,
    p99: float | None = None,
    statuses: Mapping[int, int] | None = None,
    non_2xx: int,
    errors: int,
) -> dict[str, Any]:
    if latencies_ms:
        qs = statistics.quantiles(latencies_ms, n=100, method="inclusive")
        p50, p90, p99 = qs[49], qs[89], qs[98]
    return {
        "requests": requests,
        "seconds": round(seconds, 3),
        "rps": round(requests / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": None if p50 is None else round(p50, 4),
        "p90_ms": None if p90 is None else round(p90, 4),
        "p99_ms": None if p99 is None else round(p99, 4),
        "statuses": {str(k): v for k, v in sorted((statuses or {}).items())},
        "non_2xx": non_2xx,
        "errors": errors,
    }


async def run_wrk(
    wrk: str,
    url: str,
    headers: Mapping[str, str],
    connections: int,
    seconds: int,
    cpu: int | None,
    script_dir: Path,
    script: Path | None = None,
) -> dict[str, Any]:
    """One wrk run (one thread); the dict of :func:`_result` plus wrk's raw summary.
    ``script``: a Lua script of one's own (which must end with :data:`WRK_DONE`'s hook)."""
    if script is None:
        script = script_dir / "wrk_done.lua"
        if not script.exists():
            script.write_text(_WRK_DONE, encoding="utf-8")
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency"]
    cmd += ["-s", str(script)]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    proc = await asyncio.create_subprocess_exec(
        *pinned([*cmd, url], cpu),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"wrk did not finish within {seconds + 30}s") from None
    text = out.decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {text[-2000:]}{err.decode()[-2000:]}")
    raw = json.loads(line[len("WRKJSON ") :])
    match = _NON_2XX.search(text)
    socket_errors = int(raw["connect"] + raw["read"] + raw["write"] + raw["timeout"])
    res = _result(
        int(raw["requests"]),
        raw["duration_us"] / 1e6,
        None,
        p50=raw["p50_us"] / 1000,
        p90=raw["p90_us"] / 1000,
        p99=raw["p99_us"] / 1000,
        non_2xx=int(match.group(1)) if match else 0,
        errors=socket_errors,
    )
    res["status_4xx_5xx"] = int(raw["status"])
    return res


# --- the Python fallback ---------------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection: one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bool]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return
        try:
            parsed = parse_response(self.buf)
        except ValueError as exc:
            self.waiter.set_exception(exc)
            return
        if parsed is not None:
            status, used, close = parsed
            del self.buf[:used]
            self.waiter.set_result((status, close))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))


def parse_response(buf: bytearray | bytes) -> tuple[int, int, bool] | None:
    """(status, bytes used, server closes) for one complete response at the start of
    ``buf``; None while incomplete. Content-Length and chunked bodies only."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {head[0]!r}")
    status = int(parts[1])
    fields: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip().lower()
    close = fields.get("connection") == "close" or parts[0] == "HTTP/1.0"
    body_at = end + 4
    if "chunked" in fields.get("transfer-encoding", ""):
        pos = body_at
        for _ in range(1_000_000):
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            pos = line_end + 2
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", pos - 2)
                return None if trailer_end < 0 else (status, trailer_end + 4, close)
            if len(buf) < pos + size + 2:
                return None
            pos += size + 2
        raise ValueError("too many chunks")
    if "content-length" in fields:
        total = body_at + int(fields["content-length"])
        return (status, total, close) if len(buf) >= total else None
    if status in (204, 304) or 100 <= status < 200:
        return status, body_at, close
    raise ValueError("response without a length (read-until-close is not supported)")


def _request_bytes(url: str, headers: Mapping[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _connection(
    host: str,
    port: int,
    requests: list[bytes],
    deadline: float,
    latencies: list[float],
    statuses: Counter[int],
    errors: Counter[str],
) -> None:
    loop = asyncio.get_running_loop()
    sent = 0
    proto: _Conn | None = None
    while sent < MAX_REQUESTS_PER_CONNECTION and time.perf_counter() < deadline:
        if proto is None or proto.transport is None or proto.transport.is_closing():
            try:
                _, proto = await loop.create_connection(_Conn, host, port)
            except OSError as exc:
                errors[type(exc).__name__] += 1
                await asyncio.sleep(0.01)
                continue
        assert proto.transport is not None
        proto.waiter = loop.create_future()
        started = time.perf_counter()
        transport = proto.transport
        transport.write(requests[sent % len(requests)])
        sent += 1
        try:
            status, close = await proto.waiter
        except (OSError, ValueError) as exc:
            errors[type(exc).__name__] += 1
            transport.close()
            proto = None
            continue
        latencies.append((time.perf_counter() - started) * 1000)
        statuses[status] += 1
        if close:
            transport.close()
            proto = None
    if proto is not None and proto.transport is not None:
        proto.transport.close()


async def run_python(
    url: str,
    headers: Mapping[str, str],
    connections: int,
    seconds: float,
    rotate: list[Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """``connections`` keep-alive connections for ``seconds``; same dict as :func:`run_wrk`.
    ``rotate``: header sets each connection takes in turn (``headers`` added to each)."""
    host, port, request = _request_bytes(url, headers)
    requests = [request]
    if rotate:
        requests = [_request_bytes(url, {**headers, **more})[2] for more in rotate]
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    started = time.perf_counter()
    deadline = started + seconds
    tasks = [
        asyncio.create_task(
            _connection(host, port, _turned(requests, i), deadline, latencies, statuses, errors)
        )
        for i in range(connections)
    ]
    done, pending = await asyncio.wait(tasks, timeout=seconds + GRACE_SECONDS)
    for task in pending:
        task.cancel()
        errors["unfinished"] += 1
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            errors[type(task.exception()).__name__] += 1
    elapsed = time.perf_counter() - started
    non_2xx = sum(n for s, n in statuses.items() if not 200 <= s < 400)
    res = _result(
        len(latencies),
        elapsed,
        latencies,
        statuses=statuses,
        non_2xx=non_2xx,
        errors=sum(errors.values()),
    )
    res["status_4xx_5xx"] = sum(n for s, n in statuses.items() if s > 399)
    if errors:
        res["error_kinds"] = dict(errors)
    return res


def _turned(items: list[bytes], by: int) -> list[bytes]:
    """``items`` starting at ``by`` (modulo its length): each connection its own start."""
    by %= len(items)
    return items[by:] + items[:by]


# --- the queued scenario ---------------------------------------------------------------------


def _queue_ms(timing: str) -> float | None:
    """The ``queue;dur=`` value of a Server-Timing header, in ms."""
    for part in timing.split(","):
        name, _, rest = part.strip().partition(";")
        if name == "queue" and rest.startswith("dur="):
            try:
                return float(rest[4:])
            except ValueError:
                return None
    return None


async def burst(url: str, headers: Mapping[str, str], count: int, timeout: float) -> dict[str, Any]:
    """Fire ``count`` requests at once, one connection each; how every one was answered.

    ``answered`` counts requests that got an HTTP status (200 and 429 both count); a
    connection error or a timeout is an error. Bounded by ``timeout`` per request and
    ``timeout + GRACE_SECONDS`` in all.
    """
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    queue_ms: list[float] = []
    finished_at: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    started = time.perf_counter()

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(url, headers=dict(headers)) as resp:
                await resp.read()
                statuses[resp.status] += 1
                waited = _queue_ms(resp.headers.get("Server-Timing", ""))
                if waited is not None:
                    queue_ms.append(waited)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            errors[type(exc).__name__] += 1
        finished_at.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(count)]
        _, pending = await asyncio.wait(tasks, timeout=timeout + GRACE_SECONDS)
        for task in pending:
            task.cancel()
            errors["unfinished"] += 1
        await asyncio.gather(*pending, return_exceptions=True)
    queued = [q for q in queue_ms if q > 1.0]
    return {
        "requests": count,
        "answered": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "seconds": round(max(finished_at, default=0.0), 3),
        "queued": len(queued),
        "max_queue_ms": round(max(queued), 1) if queued else 0.0,
    }
