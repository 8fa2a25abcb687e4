"""The processes a benchmark run starts: upstream, gateway, pass-through, nginx reverse proxy.

Every process runs in the foreground of the harness (nginx with ``daemon off``), writes its
output to files in the run's temp dir, is pinned to one CPU when asked, and is stopped
(SIGTERM, then SIGKILL) when the run ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.bench.loadgen import pinned, version_text
from tests.bench.upstream import BODY, RATE_LIMIT_HEADERS
from tests.procs import free_ports

REPO = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).parent / "echowin-gateway"
GATEWAY_CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "proxy.cli.main"]
UPSTREAM_BODY = BODY.decode()
BENCH_KEY = "bench-team-key-0123456789abcdef"
STARTUP_SECONDS = 20.0
STOP_SECONDS = 10.0


def nginx_path() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def nginx_version(path: str) -> str:
    text = version_text(path)
    return text.split("/")[-1] if "/" in text else text


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of process ``pid`` so far (Linux /proc), or None when
    unreadable (gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def read_status_kb(pid: int, key: str) -> int | None:
    """A ``/proc/<pid>/status`` field in kB (VmRSS, VmHWM), or None when unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 3000) -> str:
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with {code}:\n{self.tail()}")


@dataclass
class Gateway(Proc):
    admin_url: str = ""
    admin_token: str = ""
    config_path: Path = field(default_factory=Path)


class Processes:
    """Starts processes in ``tmp`` and stops every one of them on :meth:`close`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        url: str,
        cpu: int | None,
        env: dict[str, str] | None = None,
        cls: type[Proc] = Proc,
        **extra: Any,
    ) -> Proc:
        out, err = self.tmp / f"{name}.stdout", self.tmp / f"{name}.stderr"
        with out.open("wb") as fout, err.open("wb") as ferr:
            popen = subprocess.Popen(
                pinned(cmd, cpu),
                env=env,
                cwd=self.tmp,
                stdin=subprocess.DEVNULL,
                stdout=fout,
                stderr=ferr,
            )
        proc = cls(name, popen, url, err, **extra)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=STOP_SECONDS)
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(reversed(self.procs)):
            try:
                self.stop(proc)
            except (OSError, subprocess.SubprocessError):
                proc.popen.kill()


async def wait_ready(
    session: aiohttp.ClientSession,
    proc: Proc,
    path: str = "/",
    timeout: float = STARTUP_SECONDS,
) -> None:
    """Poll ``proc.url + path`` until it answers any status; raise if it dies or is late."""
    deadline = time.monotonic() + timeout
    while True:
        proc.check_alive()
        try:
            async with session.get(proc.url + path) as resp:
                await resp.read()
                return
        except (aiohttp.ClientError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{proc.name} did not answer within {timeout}s:\n{proc.tail()}"
                ) from None
        await asyncio.sleep(0.05)


# --- nginx -----------------------------------------------------------------------------------


def _nginx_conf(tmp: Path, name: str, server_block: str, http_extra: str = "") -> Path:
    """A whole nginx.conf for one foreground nginx (one worker, files under ``tmp``)."""
    work = tmp / name
    work.mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    {http_extra}
    server {{
{server_block}
    }}
}}
""",
        encoding="utf-8",
    )
    return conf


def _start_nginx(
    procs: Processes, nginx: str, name: str, conf: Path, port: int, cpu: int | None
) -> Proc:
    work = conf.parent
    cmd = [nginx, "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)]
    return procs.start(name, [*cmd, "-g", "daemon off;"], f"http://127.0.0.1:{port}", cpu)


def start_nginx_upstream(procs: Processes, nginx: str, cpu: int | None) -> Proc:
    """nginx answering ``return 200`` with a small JSON body and echowin's rate-limit
    headers on every path (see tests/bench/upstream.py)."""
    (port,) = free_ports(1)
    headers = "\n".join(
        f"            add_header {k} {v} always;" for k, v in RATE_LIMIT_HEADERS.items()
    )
    server = f"""        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
{headers}
            return 200 '{UPSTREAM_BODY}';
        }}"""
    conf = _nginx_conf(procs.tmp, "nginx-upstream", server)
    return _start_nginx(procs, nginx, "nginx-upstream", conf, port, cpu)


def start_nginx_proxy(procs: Processes, nginx: str, upstream: str, cpu: int | None) -> Proc:
    """nginx as a reverse proxy to ``upstream`` with a keep-alive pool (the ceiling)."""
    (port,) = free_ports(1)
    host_port = upstream.removeprefix("http://").rstrip("/")
    pool = f"upstream bench_upstream {{ server {host_port}; keepalive 100; }}"
    server = f"""        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}"""
    conf = _nginx_conf(procs.tmp, "nginx-proxy", server, http_extra=pool)
    return _start_nginx(procs, nginx, "nginx-proxy", conf, port, cpu)


# --- Python servers --------------------------------------------------------------------------


def start_python_upstream(procs: Processes, cpu: int | None) -> Proc:
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "tests.bench.upstream", "--port", str(port)]
    return procs.start("aiohttp-upstream", cmd, f"http://127.0.0.1:{port}", cpu, env=child_env())


def start_otlp_sink(procs: Processes, cpu: int | None) -> Proc:
    """The traced gateways' collector (tests/bench/otlp_sink.py)."""
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "tests.bench.otlp_sink", "--port", str(port)]
    return procs.start("otlp-sink", cmd, f"http://127.0.0.1:{port}", cpu, env=child_env())


def start_passthrough(
    procs: Processes, upstream: str, cpu: int | None, name: str, loop: str = "asyncio"
) -> Proc:
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "tests.bench.passthrough", "--port", str(port)]
    cmd += ["--upstream", upstream, "--loop", loop]
    return procs.start(name, cmd, f"http://127.0.0.1:{port}", cpu, env=child_env())


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a server the bench starts: this checkout first on the path, no
    echowin key (unless ``extra`` gives one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ECHOWIN_API_KEY", "PYTHONUNBUFFERED")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


HUGE_LIMITS = [(10_000_000, 3600.0), (1_000_000, 60.0)]
"""Limits too large to bind in any run: the admitted path's budget."""


# Well-formed (egw_<12>_<43>) so the gateway looks it up; no such token exists.
UNKNOWN_TOKEN = "egw_" + "0" * 12 + "_" + "A" * 43


def gateway_config(
    upstream: str,
    state: str,
    limits: list[tuple[int, float]],
    *,
    max_wait: float,
    max_depth: int | None = None,
    event_loop: str | None = "asyncio",
    connections: int | None = None,
    throttle: bool = True,
) -> dict[str, Any]:
    """A bench gateway's config with every feature on: auth, scope, budget, metrics, JSON
    access log; listeners and admin token are filled in by ``launch_gateway``. The failed
    authentication throttle is on with a bucket no run fills: the unauthorized scenario
    measures the 401 path with the throttle's bookkeeping, not the 429 (auth_throttled)
    a flood from one address would get once its bucket is full. ``connections``:
    ``server.max_connections`` and ``max_connections_per_client`` (every bench caller is
    127.0.0.1); None leaves them out (an older tree may not know them), as ``throttle``
    False leaves out the ``auth`` section."""
    queue: dict[str, Any] = {"max_wait_seconds": max_wait}
    if max_depth is not None:
        queue.update(max_depth=max_depth, max_depth_per_token=max_depth)
    raw: dict[str, Any] = {
        "admin_token": {"env": "GATEWAY_ADMIN_TOKEN"},
        "state": state,
        "upstream": {
            "base_url": upstream,
            "api_key": {"env": "ECHOWIN_API_KEY"},
            "timeout_seconds": 30,
            "connect_timeout_seconds": 5,
            "max_connections": 100,
            "limits": [{"requests": n, "per_seconds": t} for n, t in limits],
        },
        "queue": queue,
        "server": {"shutdown_grace_seconds": 2},
        "logging": {"level": "info", "format": "json", "access_log": True},
    }
    if event_loop is not None:  # None: the gateway's default (an older tree may not know it)
        raw["server"]["event_loop"] = event_loop
    if throttle:
        raw["auth"] = {"failures_per_client": {"requests": 1_000_000_000, "per_seconds": 1}}
    if connections is not None:
        raw["server"].update(max_connections=connections, max_connections_per_client=connections)
    return raw


def launch_gateway(
    procs: Processes,
    name: str,
    raw: dict[str, Any],
    cpu: int | None,
    *,
    serve_args: Sequence[str] = (),
    wrap: Callable[[list[str]], list[str]] = list,
    source: Path | None = None,
) -> Gateway:
    """``echowin-gateway serve`` on free loopback ports with the config ``raw`` (see
    ``gateway_config``), its stderr to a file; ``wrap`` may prefix the command line. A port
    found free can be taken by another process before the gateway binds it: a gateway that
    stops at start on "Address already in use" is started again on new ports (twice at
    most)."""
    for _ in range(2):
        gw = _launch(procs, name, raw, cpu, serve_args, wrap, source)
        if wrap is not list or not _lost_its_port(gw):
            return gw
        procs.procs.remove(gw)
    return _launch(procs, name, raw, cpu, serve_args, wrap, source)


def _lost_its_port(gw: Gateway) -> bool:
    """Whether ``gw`` stopped at start because a port was taken; waits (10 s at most) for
    it to listen on both its ports or to stop."""
    ports = [int(url.rsplit(":", 1)[1]) for url in (gw.url, gw.admin_url)]
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if gw.popen.poll() is not None:
            return "Address already in use" in gw.tail()
        if all(_listening(port) for port in ports):
            return False
        time.sleep(0.02)
    return False


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _launch(
    procs: Processes,
    name: str,
    raw: dict[str, Any],
    cpu: int | None,
    serve_args: Sequence[str],
    wrap: Callable[[list[str]], list[str]],
    source: Path | None,
) -> Gateway:
    port, admin_port = free_ports(2)
    admin_token = secrets.token_urlsafe(24)
    raw = {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}", **raw}
    config = procs.tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    env = child_env(ECHOWIN_API_KEY=BENCH_KEY, GATEWAY_ADMIN_TOKEN=admin_token)
    if source is not None:  # another tree's proxy package, ahead of this one
        env["PYTHONPATH"] = os.pathsep.join([str(source), env["PYTHONPATH"]])
    proc = procs.start(
        name,
        wrap([*GATEWAY_CLI, "serve", "--config", str(config), *serve_args]),
        f"http://127.0.0.1:{port}",
        cpu,
        env=env,
        cls=Gateway,
        admin_url=f"http://127.0.0.1:{admin_port}",
        admin_token=admin_token,
        config_path=config,
    )
    assert isinstance(proc, Gateway)
    return proc


def knows(source: Path, key: str) -> bool:
    """Whether the proxy package of the tree ``source`` names the config key ``key``."""
    return any(key in path.read_text(encoding="utf-8") for path in (source / "proxy").rglob("*.py"))


def start_gateway(
    procs: Processes,
    upstream: str,
    cpu: int | None,
    name: str,
    *,
    limits: list[tuple[int, float]],
    max_wait: float,
    max_depth: int = 10_000,
    event_loop: str | None = "asyncio",
    source: Path | None = None,
    cache: dict[str, Any] | None = None,
    tracing: dict[str, Any] | None = None,
    classes: dict[str, Any] | None = None,
) -> Gateway:
    """The gateway of the throughput scenarios: state in a SQLite file, as ``serve`` keeps
    it by default; ``cache``, ``tracing``: its sections of those names (none by default);
    ``classes``: ``classes`` and ``default_class`` to add to its config."""
    state = f"sqlite:///{procs.tmp / name}.db"
    # The queued scenario holds max_depth connections at once, all from 127.0.0.1. A
    # baseline tree is given the connection bounds and the auth section only if it knows them.
    hostile = source is None or knows(source, "max_connections_per_client")
    connections = max(10_000, max_depth + 1_000) if hostile else None
    raw = gateway_config(
        upstream,
        state,
        limits,
        max_wait=max_wait,
        max_depth=max_depth,
        event_loop=event_loop,
        connections=connections,
        throttle=source is None or knows(source, "failures_per_client"),
    )
    if cache is not None:
        raw["cache"] = cache
    if tracing is not None:
        raw["tracing"] = tracing
    raw.update(classes or {})
    return launch_gateway(procs, name, raw, cpu, source=source)


def _token_name(gw: Gateway) -> str:
    """A token name of its own per gateway: active names are unique, and gateways on one
    Redis share a token store."""
    return "bench-" + re.sub(r"[^A-Za-z0-9._-]", "-", gw.name)[:58]


async def create_token(session: aiohttp.ClientSession, gw: Gateway, scope: str) -> str:
    """A new token holding ``scope``, made through the admin API."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        gw.check_alive()
        try:
            async with session.get(gw.admin_url + "/healthz") as resp:
                if resp.status == 200:
                    break
        except (aiohttp.ClientError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{gw.name} not healthy within {STARTUP_SECONDS}s:\n{gw.tail()}")
        await asyncio.sleep(0.05)
    async with session.post(
        gw.admin_url + "/admin/tokens",
        json={"name": _token_name(gw), "scopes": [scope]},
        headers={"Authorization": f"Bearer {gw.admin_token}"},
    ) as resp:
        body = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"token create on {gw.name}: {resp.status} {body}")
        token: str = body["token"]
        return token
