"""End-to-end tests of the ``echowin-gateway`` command line (SPEC §4).

Every test runs the real console script in subprocesses that talk only to 127.0.0.1 on
ports picked free per test. Every wait has a deadline; every process is killed at teardown.
Children run without PYTHONUNBUFFERED, as under docker or systemd, so a line that only
shows up when stdout is a terminal fails here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = REPO / "config" / "gateway.example.yaml"
REFERENCE_CONFIG = REPO / "config" / "gateway.reference.yaml"

_SCRIPT = Path(sys.executable).parent / "echowin-gateway"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "proxy.cli"]

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


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start CLI subprocesses (stdout/stderr to files); all are killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str | Path, env: dict[str, str], name: str) -> Proc:
        out, err = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
        with out.open("wb") as fout, err.open("wb") as ferr:
            popen = subprocess.Popen(
                [*CLI, *map(str, args)],
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
    except ConnectionRefusedError:
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


# --- check-config ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [EXAMPLE_CONFIG, REFERENCE_CONFIG], ids=["example", "reference"])
def test_check_config_shipped_configs_pass(path: Path) -> None:
    result = run_cli("check-config", path, env=child_env(ECHOWIN_API_KEY="k"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"{path}: OK")
    assert result.stderr == ""


def test_check_config_bad_value_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text('upstream: {limits: [{requests: "abc", per_seconds: 60}]}\n', encoding="utf-8")
    result = run_cli("check-config", path, env=child_env(ECHOWIN_API_KEY="k"))
    assert result.returncode == 2
    assert 'upstream.limits[0].requests: must be a positive integer, got "abc"' in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_config_missing_secret_then_skip_secrets() -> None:
    result = run_cli("check-config", EXAMPLE_CONFIG, env=child_env())
    assert_clean_error(result, 2, "upstream.api_key", "ECHOWIN_API_KEY")

    skipped = run_cli("check-config", "--skip-secrets", EXAMPLE_CONFIG, env=child_env())
    assert skipped.returncode == 0, skipped.stderr
    assert "OK" in skipped.stdout


def test_check_config_secret_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "api-key"
    secret.write_text(REAL_KEY + "\n", encoding="utf-8")
    path = write_config(tmp_path / "c.yaml", {"upstream": {"api_key": {"file": str(secret)}}})
    ok = run_cli("check-config", path, env=child_env())
    assert ok.returncode == 0, ok.stderr
    secret.unlink()
    result = run_cli("check-config", path, env=child_env())
    assert_clean_error(result, 2, "upstream.api_key", str(secret))


def test_check_config_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert_clean_error(run_cli("check-config", missing), 2, str(missing), "cannot read")

    broken = tmp_path / "broken.yaml"
    broken.write_text("listen: [\n  nope: {\n", encoding="utf-8")
    assert_clean_error(run_cli("check-config", broken), 2, str(broken), "not valid YAML")


# --- token create / list / revoke --------------------------------------------------------------


def test_token_create_list_revoke(tmp_path: Path) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    result = run_cli(
        "token", "create", "--config", gw.config, "--name", "crm",
        "--scope", "contacts:read", "--scope", "tags:read",
        "--hourly", "100", "--per-minute", "10", "--weight", "2", "--expires-in", "30d",
        env=gw.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip().splitlines()[-1]
    assert TOKEN_RE.fullmatch(token), result.stdout
    assert result.stdout.count(token) == 1  # shown once
    assert token not in result.stderr
    token_id, secret = token.split("_")[1:]

    listed = run_cli("token", "list", "--config", gw.config, env=gw.env)
    assert listed.returncode == 0, listed.stderr
    assert token_id in listed.stdout
    assert "crm" in listed.stdout
    assert secret not in listed.stdout
    assert not re.search(r"[0-9a-f]{64}", listed.stdout)  # no secret hash either

    as_json = run_cli("token", "list", "--json", "--config", gw.config, env=gw.env)
    assert as_json.returncode == 0, as_json.stderr
    assert secret not in as_json.stdout
    assert not re.search(r"[0-9a-f]{64}", as_json.stdout)
    (view,) = json.loads(as_json.stdout)
    assert view["id"] == token_id
    assert view["name"] == "crm"
    assert view["scopes"] == ["contacts:read", "tags:read"]
    assert (view["hourly"], view["per_minute"], view["weight"]) == (100, 10, 2)
    assert view["upstream_key"] == "default"
    assert view["status"] == "active"
    lifetime = datetime.fromisoformat(view["expires_at"]) - datetime.fromisoformat(
        view["created_at"]
    )
    assert lifetime.total_seconds() == pytest.approx(30 * 86400, abs=2)

    revoked = run_cli("token", "revoke", token_id, "--config", gw.config, env=gw.env)
    assert revoked.returncode == 0, revoked.stderr
    assert token_id in revoked.stdout
    listed = run_cli("token", "list", "--config", gw.config, env=gw.env)
    (row,) = [line for line in listed.stdout.splitlines() if line.startswith(token_id)]
    assert "revoked" in row.split()
    (view,) = json.loads(run_cli("token", "list", "--json", "--config", gw.config).stdout)
    assert view["status"] == "revoked"
    assert view["revoked_at"] is not None

    unknown = run_cli("token", "revoke", "doesnotexist", "--config", gw.config, env=gw.env)
    assert_clean_error(unknown, 1, "doesnotexist")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--scope", "contacts:nope"], ["scope", "contacts:nope"]),
        (["--scope", "contacts:read", "--upstream-key", "ghost"], ["upstream_key", "ghost"]),
        (["--scope", "contacts:read", "--expires-in", "soon"], ["soon"]),
    ],
    ids=["unknown-scope", "unknown-upstream-key", "bad-duration"],
)
def test_token_create_refuses_bad_input(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    result = run_cli("token", "create", "--config", gw.config, "--name", "x", *args, env=gw.env)
    assert_clean_error(result, 2, *needles)
    assert not TOKEN_RE.search(result.stdout)
    listed = run_cli("token", "list", "--json", "--config", gw.config, env=gw.env)
    assert json.loads(listed.stdout) == []  # nothing stored


# --- simulate ----------------------------------------------------------------------------------


async def test_simulate_serves_limits_and_answers_429(spawn: Spawn) -> None:
    sim = await start_sim(spawn, "--limit", "3/60", key="k1")
    url = f"{sim.url}/api/v1/contacts"
    async with http_client() as session:
        async with session.get(url) as resp:
            assert resp.status == 401
            assert await resp.json() == {"error": "Missing X-API-Key header"}
        remaining = []
        for _ in range(3):
            async with session.get(url, headers={"X-API-Key": "k1"}) as resp:
                assert resp.status == 200
                body = await resp.json()
                assert "data" in body
                assert "pagination" in body
                for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
                    assert name in resp.headers
                remaining.append(int(resp.headers["X-RateLimit-Remaining"]))
        assert remaining == sorted(remaining, reverse=True)
        assert remaining[-1] == 0
        async with session.get(url, headers={"X-API-Key": "k1"}) as resp:
            assert resp.status == 429
            assert await resp.json() == {"error": "Rate limit exceeded. Please try again later."}
            assert int(resp.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("limit", ["abc", "10/0", "0/60"])
def test_simulate_bad_limit_exits_2(limit: str) -> None:
    result = run_cli("simulate", "--port", str(free_ports(1)[0]), "--limit", limit)
    assert_clean_error(result, 2, "--limit", limit)


# --- serve ------------------------------------------------------------------------------------


async def test_serve_proxies_with_the_real_key(tmp_path: Path, spawn: Spawn) -> None:
    sim = await start_sim(spawn)
    gw = gateway_config(tmp_path, sim.url)
    token = create_token(gw, "--name", "crm", "--scope", "contacts:read")
    async with http_client() as session:
        gateway = await start_gateway(spawn, session, gw)

        async with session.get(
            gw.url("/api/v1/contacts"), headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            text = await resp.text()
            assert resp.status == 200, text
            assert "data" in json.loads(text)
            assert REAL_KEY not in text
            assert all(REAL_KEY not in v for v in resp.headers.values())
        # Existing echowin clients: the token in X-API-Key works too.
        async with session.get(gw.url("/api/v1/contacts"), headers={"X-API-Key": token}) as resp:
            assert resp.status == 200
        # Scopes hold across the process boundary.
        async with session.get(gw.url("/api/v1/tags"), headers={"X-API-Key": token}) as resp:
            assert resp.status == 403

        async with session.get(f"{sim.url}/_sim/requests") as resp:
            recorded = (await resp.json())["requests"]
        assert len(recorded) == 2
        for entry in recorded:
            headers = {k.lower(): v for k, v in entry["headers"].items()}
            assert entry["path"] == "/api/v1/contacts"
            assert headers["x-api-key"] == REAL_KEY
            assert "authorization" not in headers
            assert all(token not in v for v in headers.values())

        async with session.get(gw.admin_url("/healthz")) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        async with session.get(gw.admin_url("/readyz")) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ready"
        async with session.get(gw.admin_url("/metrics")) as resp:
            assert resp.status == 200
            metrics = await resp.text()
        assert "echowin_gateway_requests_total" in metrics
        assert 'token="crm"' in metrics
        assert REAL_KEY not in metrics
        assert token not in metrics

        # A revocation by the CLI reaches the running gateway through the shared state.
        token_id = token.split("_")[1]
        revoked = run_cli("token", "revoke", token_id, "--config", gw.config, env=gw.env)
        assert revoked.returncode == 0, revoked.stderr
        async with session.get(gw.url("/api/v1/contacts"), headers={"X-API-Key": token}) as resp:
            assert resp.status == 401

        gateway.check_alive()
    logs = gateway.stderr()
    assert REAL_KEY not in logs
    assert token not in logs


def test_serve_missing_secret_exits_2(tmp_path: Path) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    result = run_cli("serve", "--config", gw.config, env=child_env())
    assert_clean_error(result, 2, "ECHOWIN_API_KEY")
    assert connection_refused_sync(gw.port)


def test_serve_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: 8080\nqueue: {max_wait_seconds: -1}\n", encoding="utf-8")
    result = run_cli("serve", "--config", path, env=child_env(ECHOWIN_API_KEY=REAL_KEY))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "listen:" in result.stderr
    assert "queue.max_wait_seconds:" in result.stderr


def test_serve_port_in_use_exits_1(tmp_path: Path) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", gw.port))
        busy.listen()
        result = run_cli("serve", "--config", gw.config, env=gw.env)
    assert_clean_error(result, 1, "cannot start")


# --- graceful shutdown -------------------------------------------------------------------------


async def test_serve_sigterm_drains_in_flight_requests(tmp_path: Path, spawn: Spawn) -> None:
    sim = await start_sim(spawn)
    gw = gateway_config(tmp_path, sim.url)
    token = create_token(gw, "--name", "slow", "--scope", "contacts:read")
    async with http_client() as session:
        gateway = await start_gateway(spawn, session, gw)
        async with session.post(f"{sim.url}/_sim/faults", json={"latency_seconds": 1.0}) as resp:
            assert resp.status == 200

        async def in_flight_request() -> tuple[int, str]:
            url, headers = gw.url("/api/v1/contacts"), {"X-API-Key": token}
            async with http_client() as client, client.get(url, headers=headers) as resp:
                return resp.status, await resp.text()

        async def gateway_busy() -> bool:
            async with session.get(gw.admin_url("/metrics")) as resp:
                text = await resp.text()
            match = re.search(r"^echowin_gateway_in_flight_requests (\S+)$", text, re.MULTILINE)
            return match is not None and float(match.group(1)) >= 1

        request = asyncio.create_task(in_flight_request())
        await eventually(gateway_busy, "request in flight at the gateway", timeout=5)
        assert not request.done()
        signalled = time.monotonic()
        gateway.popen.send_signal(signal.SIGTERM)

        await eventually(
            lambda: connection_refused(gw.port), "proxy listener closed after SIGTERM", timeout=3
        )
        assert not request.done(), "listener closed only after the in-flight request finished"

        status, body = await asyncio.wait_for(request, timeout=10)
        assert status == 200, body
        assert "data" in json.loads(body)

        code = await gateway.wait_exit(timeout=5 + 2)
        assert code == 0, gateway.stderr()[-3000:]
        assert time.monotonic() - signalled < 5  # within shutdown_grace_seconds
        assert "Traceback" not in gateway.stderr()


# --- quickstart --------------------------------------------------------------------------------


async def test_quickstart_against_the_simulator(tmp_path: Path, spawn: Spawn) -> None:
    port, admin_port, sim_port = free_ports(3)
    raw = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    raw["listen"] = f"0.0.0.0:{port}"
    raw["admin_listen"] = f"127.0.0.1:{admin_port}"
    config = write_config(tmp_path / "example.yaml", raw)
    proc = spawn(
        "quickstart", "--config", config, "--state", f"sqlite:///{tmp_path}/q.db",
        "--sim-port", str(sim_port),
        env=child_env(), name="quickstart",
    )  # fmt: skip

    token_line = await proc.wait_line(r"^token \(scopes: [^)]*\): (\S+)$")
    token = token_line.group(1)
    assert TOKEN_RE.fullmatch(token)
    curl = await proc.wait_line(r'^try: curl -s (\S+) -H "([^:"]+): ([^"]+)"$')
    url, header, value = curl.groups()
    assert url == f"http://127.0.0.1:{port}/api/v1/contacts"
    assert token in value

    async with http_client() as session:
        async with session.get(url, headers={header: value}) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert "data" in body
            assert "pagination" in body
        async with session.get(f"http://127.0.0.1:{admin_port}/healthz") as resp:
            assert resp.status == 200

    proc.popen.send_signal(signal.SIGINT)
    code = await proc.wait_exit(timeout=10)
    assert code == 0, proc.stderr()[-3000:]
    assert "Traceback" not in proc.stderr()
    assert await connection_refused(port)
    assert await connection_refused(sim_port)
