"""Helpers for tests that run the gateway's command line in subprocesses.

Every wait has a deadline; every process started through ``spawn`` is killed at teardown.
Children run without PYTHONUNBUFFERED, as under docker or systemd.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = REPO / "config" / "gateway.example.yaml"
REFERENCE_CONFIG = REPO / "config" / "gateway.reference.yaml"

_SCRIPT = Path(sys.executable).parent / "echowin-gateway"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "proxy.cli.main"]

REAL_KEY = "real-team-key-cli-0123456789abcdef"
TOKEN_RE = re.compile(r"egw_[a-z0-9]{12}_[A-Za-z0-9]{43}")
SECRET_ENV = ("ECHOWIN_API_KEY", "ECHOWIN_AGENCY_KEY", "ECHOWIN_ACME_KEY", "GATEWAY_ADMIN_TOKEN")

STARTUP_SECONDS = 10.0  # a cold interpreter importing aiohttp, pydantic, prometheus_client
COMMAND_SECONDS = 20.0
POLL_SECONDS = 0.05


# --- helpers ---------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without any gateway secret or unbuffered-stdout override."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env.pop("PYTHONUNBUFFERED", None)
    env.update(extra)
    return env


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_cli(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)],
        env=child_env() if env is None else env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
        check=False,
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Exit ``code``, exactly one ``error:`` line on stderr holding every needle; no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(encoding="utf-8", errors="replace")

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            pytest.fail(
                f"process exited early with {code}\nstdout:\n{self.stdout()}\n"
                f"stderr:\n{self.stderr()[-3000:]}"
            )

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.popen.poll()) is None:
            if time.monotonic() > deadline:
                pytest.fail(f"process still running after {timeout}s\n{self.stderr()[-3000:]}")
            await asyncio.sleep(POLL_SECONDS)
        return code

    async def wait_line(self, pattern: str, timeout: float = STARTUP_SECONDS) -> re.Match[str]:
        """The first match of ``pattern`` (multiline) in stdout, within ``timeout``."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while (match := regex.search(self.stdout())) is None:
            self.check_alive()
            if time.monotonic() > deadline:
                pytest.fail(
                    f"no {pattern!r} on stdout within {timeout}s:\n{self.stdout()}\n"
                    f"stderr:\n{self.stderr()[-3000:]}"
                )
            await asyncio.sleep(POLL_SECONDS)
        return match


Spawn = Callable[..., Proc]


def workers_under_test() -> int:
    """``EGW_TEST_WORKERS=N``: every ``serve`` these helpers start runs ``--workers N``, so
    the same end-to-end tests prove the budget across N processes (``make test`` runs the
    budget tests once more that way)."""
    return int(os.environ.get("EGW_TEST_WORKERS") or 1)


def _with_workers(args: tuple[str | Path, ...]) -> tuple[str | Path, ...]:
    if args[:1] == ("serve",) and "--workers" not in args and workers_under_test() > 1:
        return (*args, "--workers", str(workers_under_test()))
    return args


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start CLI subprocesses (stdout/stderr to files); all are killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str | Path, env: dict[str, str], name: str) -> Proc:
        out, err = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
        with out.open("wb") as fout, err.open("wb") as ferr:
            popen = subprocess.Popen(
                [*CLI, *map(str, _with_workers(args))],
                env=env,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=fout,
                stderr=ferr,
            )
        procs.append(popen)
        return Proc(popen, out, err)

    try:
        yield start
    finally:
        for popen in procs:
            if popen.poll() is None:
                popen.kill()
            popen.wait(timeout=10)


async def wait_http(
    session: aiohttp.ClientSession, url: str, proc: Proc, timeout: float = STARTUP_SECONDS
) -> int:
    """Poll ``url`` until it answers (any status); fail early if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        proc.check_alive()
        try:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientConnectionError:
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer within {timeout}s\n{proc.stderr()[-3000:]}")
        await asyncio.sleep(POLL_SECONDS)


def http_client() -> aiohttp.ClientSession:
    """A client whose every request is bounded, so no test can hang on a silent server."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=COMMAND_SECONDS))


async def eventually(cond: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        await asyncio.sleep(POLL_SECONDS)


async def connection_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):  # reset: the listener was closing
        return True
    writer.close()
    await writer.wait_closed()
    return False


def connection_refused_sync(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@dataclass
class Sim:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_sim(spawn: Spawn, *extra: str, key: str = REAL_KEY) -> Sim:
    """``simulate`` on a free port; returns once it printed its listening line."""
    (port,) = free_ports(1)
    proc = spawn("simulate", "--port", str(port), "--key", key, *extra, env=child_env(), name="sim")
    await proc.wait_line(rf"^echowin simulator listening on http://127\.0\.0\.1:{port}$")
    return Sim(proc, port)


@dataclass
class Gateway:
    config: Path
    port: int
    admin_port: int
    env: dict[str, str]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"


def gateway_config(tmp_path: Path, upstream: str, **overrides: Any) -> Gateway:
    port, admin_port = free_ports(2)
    raw: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "state": f"sqlite:///{tmp_path}/state.db",
        "upstream": {
            "base_url": upstream,
            "api_key": {"env": "ECHOWIN_API_KEY"},
            "timeout_seconds": 5,
            "connect_timeout_seconds": 2,
        },
        "server": {"shutdown_grace_seconds": 5},
        "tokens": {"cache_ttl_seconds": 0},
    }
    raw.update(overrides)
    path = write_config(tmp_path / "gateway.yaml", raw)
    return Gateway(path, port, admin_port, child_env(ECHOWIN_API_KEY=REAL_KEY))


def create_token(gw: Gateway, *args: str) -> str:
    result = run_cli("token", "create", "--config", gw.config, *args, env=gw.env)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip().splitlines()[-1]
    assert TOKEN_RE.fullmatch(token), token
    return token


async def start_gateway(spawn: Spawn, session: aiohttp.ClientSession, gw: Gateway) -> Proc:
    proc = spawn("serve", "--config", gw.config, env=gw.env, name="serve")
    assert await wait_http(session, gw.admin_url("/healthz"), proc) == 200
    return proc


async def load_loop(url: str, token: str, until: float, statuses: Any) -> None:
    """Call ``url`` back to back until ``until`` (monotonic), counting statuses in
    ``statuses`` (a Counter); a connection error (a gateway down) counts as status 0. After
    a refusal or an error it pauses briefly. Bounded in count and time."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(100_000):
            if time.monotonic() >= until:
                return
            try:
                async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                    if resp.status in (401, 429, 503):
                        await asyncio.sleep(0.2)
            except (aiohttp.ClientError, TimeoutError):
                statuses[0] += 1
                await asyncio.sleep(0.1)
