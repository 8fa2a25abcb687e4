"""End-to-end tests of the ``echowin-gateway`` command line (SPEC §4): check-config,
simulate, serve, graceful shutdown, quickstart.

Every test runs the real console script in subprocesses that talk only to 127.0.0.1 on
ports picked free per test. Every wait has a deadline; every process is killed at teardown.
Children run without PYTHONUNBUFFERED, as under docker or systemd, so a line that only
shows up when stdout is a terminal fails here.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.procs import (
    EXAMPLE_CONFIG,
    REAL_KEY,
    REFERENCE_CONFIG,
    TOKEN_RE,
    Gateway,
    Spawn,
    assert_clean_error,
    child_env,
    connection_refused,
    connection_refused_sync,
    create_token,
    eventually,
    free_ports,
    gateway_config,
    http_client,
    run_cli,
    start_gateway,
    start_sim,
    write_config,
)


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


async def test_simulate_tells_the_made_up_keys_it_accepts(spawn: Spawn) -> None:
    # No --key and no $ECHOWIN_API_KEY: a developer must learn which key gets past the 401.
    (port,) = free_ports(1)
    proc = spawn("simulate", "--port", str(port), env=child_env(), name="sim")
    await proc.wait_line(rf"^echowin simulator listening on http://127\.0\.0\.1:{port}$")
    team = re.search(r"X-API-Key: (\S+)", proc.stderr())
    agency = re.search(r"X-AGENCY-KEY: (\S+)", proc.stderr())
    assert team and agency, proc.stderr()
    base = f"http://127.0.0.1:{port}/api/v1"
    subteam = {"firstName": "A", "lastName": "B", "teamName": "C", "email": "a@b.example"}
    async with http_client() as session:
        async with session.get(f"{base}/contacts", headers={"X-API-Key": team[1]}) as resp:
            assert resp.status == 200
        headers = {"X-AGENCY-KEY": agency[1]}
        async with session.post(f"{base}/agency/subteams", json=subteam, headers=headers) as resp:
            assert resp.status == 201


async def test_simulate_never_prints_a_key_from_the_environment(spawn: Spawn) -> None:
    (port,) = free_ports(1)
    env = child_env(ECHOWIN_API_KEY=REAL_KEY, ECHOWIN_AGENCY_KEY="real-agency-key-0123456789")
    proc = spawn("simulate", "--port", str(port), env=env, name="sim")
    await proc.wait_line(rf"^echowin simulator listening on http://127\.0\.0\.1:{port}$")
    for secret in (REAL_KEY, "real-agency-key-0123456789"):
        assert secret not in proc.stdout() + proc.stderr()


def test_simulate_on_a_busy_port_exits_1_with_one_line() -> None:
    (port,) = free_ports(1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = run_cli("simulate", "--port", str(port), "--key", "k", "--agency-key", "a")
    assert_clean_error(result, 1, "cannot start", f"127.0.0.1:{port}", "in use")


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_simulate_bad_port_exits_2(port: str) -> None:
    result = run_cli("simulate", "--port", port, "--key", "k")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "--port" in result.stderr


@pytest.mark.parametrize("limit", ["abc", "10/0", "0/60"])
def test_simulate_bad_limit_exits_2(limit: str) -> None:
    result = run_cli("simulate", "--port", str(free_ports(1)[0]), "--limit", limit)
    assert_clean_error(result, 2, "--limit", limit)


async def test_simulate_can_start_hostile_echoing_the_key(spawn: Spawn) -> None:
    sim = await start_sim(spawn, "--echo-key", "hex", "--echo-in", "header", key="k1")
    async with http_client() as session:
        async with session.get(f"{sim.url}/api/v1/tags", headers={"X-API-Key": "k1"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Debug-Echo"] == b"k1".hex()
        async with session.get(f"{sim.url}/_sim/faults") as resp:
            assert (await resp.json())["faults"]["echo_in"] == "header"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--echo-key", "rot13"], "echo_key"),
        (["--echo-key", "hex", "--echo-in", "moon"], "echo_in"),
        (["--echo-in", "header"], "echo_in"),
        (["--echo-key", "utf16le", "--echo-in", "header"], "cannot go in a header"),
    ],
)
def test_simulate_bad_echo_exits_2(args: list[str], named: str) -> None:
    result = run_cli("simulate", "--port", str(free_ports(1)[0]), "--key", "k", *args)
    assert_clean_error(result, 2, "--echo-key", named)


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


async def has_in_flight(session: aiohttp.ClientSession, gw: Gateway) -> bool:
    """Whether the gateway's /metrics counts a request in flight."""
    async with session.get(gw.admin_url("/metrics")) as resp:
        text = await resp.text()
    match = re.search(r"^echowin_gateway_in_flight_requests (\S+)$", text, re.MULTILINE)
    return match is not None and float(match.group(1)) >= 1


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one", "workers"])
def test_serve_port_in_use_exits_1(tmp_path: Path, workers: tuple[str, ...]) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    for key, port in (("listen", gw.port), ("admin_listen", gw.admin_port)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
            busy.bind(("127.0.0.1", port))
            busy.listen()
            result = run_cli("serve", "--config", gw.config, *workers, env=gw.env)
        # Which of the two listeners could not start, named by its key.
        expected = f"cannot start: {key} 127.0.0.1:{port}: Address already in use"
        assert assert_clean_error(result, 1).endswith(expected)


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

        request = asyncio.create_task(in_flight_request())
        await eventually(
            lambda: has_in_flight(session, gw), "request in flight at the gateway", timeout=5
        )
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


async def test_readyz_says_draining_once_sigterm_closed_the_proxy(
    tmp_path: Path, spawn: Spawn
) -> None:
    """While SIGTERM's drain runs, the proxy port refuses connections: /readyz must not
    keep saying ready (a load balancer or a Service reading it would keep sending there);
    /healthz stays 200, the process is alive and finishing its requests."""
    sim = await start_sim(spawn)
    gw = gateway_config(tmp_path, sim.url)
    token = create_token(gw, "--name", "slow", "--scope", "contacts:read")
    async with http_client() as session:
        gateway = await start_gateway(spawn, session, gw)
        async with session.get(gw.admin_url("/readyz")) as resp:
            assert resp.status == 200
        async with session.post(f"{sim.url}/_sim/faults", json={"latency_seconds": 2.0}) as resp:
            assert resp.status == 200

        async def in_flight_request() -> int:
            url, headers = gw.url("/api/v1/contacts"), {"X-API-Key": token}
            async with http_client() as client, client.get(url, headers=headers) as resp:
                return resp.status

        request = asyncio.create_task(in_flight_request())
        await eventually(
            lambda: has_in_flight(session, gw), "request in flight at the gateway", timeout=5
        )
        gateway.popen.send_signal(signal.SIGTERM)
        await eventually(
            lambda: connection_refused(gw.port), "proxy listener closed after SIGTERM", timeout=3
        )
        assert not request.done()
        async with session.get(gw.admin_url("/readyz")) as resp:
            assert resp.status == 503
            assert (await resp.json())["status"] == "draining"
        async with session.get(gw.admin_url("/healthz")) as resp:
            assert resp.status == 200
        assert await asyncio.wait_for(request, timeout=10) == 200
        assert await gateway.wait_exit(timeout=10) == 0


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
