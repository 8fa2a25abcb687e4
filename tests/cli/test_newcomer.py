"""The rough edges a newcomer hits on the command line (issue 21, points 8 to 14), each run
as the real console script in subprocesses on 127.0.0.1, ports picked free per test."""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest
import yaml

from tests.procs import (
    EXAMPLE_CONFIG,
    REPO,
    TOKEN_RE,
    Spawn,
    assert_clean_error,
    child_env,
    create_token,
    eventually,
    free_ports,
    gateway_config,
    http_client,
    run_cli,
    start_gateway,
    start_sim,
    wait_http,
    write_config,
)


def _example(tmp_path: Path) -> Path:
    """The example config ``make run`` uses, unchanged but for a private copy."""
    raw = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    return write_config(tmp_path / "example.yaml", raw)


async def _quickstart(spawn: Spawn, tmp_path: Path, ports: list[int], name: str) -> str:
    """A quickstart on ``ports`` (proxy, admin, simulator); the token it printed."""
    port, admin_port, sim_port = ports
    proc = spawn(
        "quickstart", "--config", _example(tmp_path), "--state", f"sqlite:///{tmp_path}/q.db",
        "--port", str(port), "--admin-port", str(admin_port), "--sim-port", str(sim_port),
        env=child_env(), name=name,
    )  # fmt: skip
    line = await proc.wait_line(r"^token \(scopes: [^;)]*; expires in 24h\): (\S+)$")
    await proc.wait_line(rf"^gateway on http://127\.0\.0\.1:{port}, metrics on "
                         rf"http://127\.0\.0\.1:{admin_port}/metrics$")  # fmt: skip
    token = line.group(1)
    assert TOKEN_RE.fullmatch(token)
    async with http_client() as session:
        url = f"http://127.0.0.1:{port}/api/v1/contacts"
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200, await resp.text()
    proc.popen.send_signal(signal.SIGINT)
    assert await proc.wait_exit(timeout=10) == 0, proc.stderr()[-3000:]
    return token


async def test_quickstart_moves_its_ports_and_replaces_its_token(
    tmp_path: Path, spawn: Spawn
) -> None:
    """Point 8: the ports move with flags (and make run PORT=...); point 12: a second start
    revokes the first start's demo token, which expires anyway, instead of adding one."""
    ports = free_ports(3)
    first = await _quickstart(spawn, tmp_path, ports, "first")
    second = await _quickstart(spawn, tmp_path, ports, "second")
    assert first != second
    config = _example(tmp_path)
    state = f"sqlite:///{tmp_path}/q.db"
    listed = run_cli("token", "list", "--json", "--config", config, "--state", state)
    assert listed.returncode == 0, listed.stderr
    views = {v["id"]: v for v in json.loads(listed.stdout)}
    assert [v["name"] for v in views.values()] == ["quickstart", "quickstart"]
    assert views[first.split("_")[1]]["status"] == "revoked"
    kept = views[second.split("_")[1]]
    assert kept["status"] == "active"
    assert kept["expires_at"] is not None


def test_quickstart_on_a_busy_port_says_how_to_move_it(tmp_path: Path) -> None:
    port, admin_port, sim_port = free_ports(3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = run_cli(
            "quickstart", "--config", _example(tmp_path), "--state",
            f"sqlite:///{tmp_path}/q.db", "--port", str(port), "--admin-port",
            str(admin_port), "--sim-port", str(sim_port),
        )  # fmt: skip
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr
    assert "in use" in line.lower()
    assert "make run PORT=N ADMIN_PORT=N SIM_PORT=N" in line


def test_make_run_and_the_readme_name_the_port_variables() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "--port $(PORT) --admin-port $(ADMIN_PORT) --sim-port $(SIM_PORT)" in makefile
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "make run PORT=" in readme
    assert ".run/state.db" in readme


def test_admin_url_without_the_admin_token_names_the_variable() -> None:
    """Point 9: no request is sent; the error says the variable is unset."""
    (port,) = free_ports(1)
    for args in (("revoke", "abc"), ("list",), ("create", "--name", "x", "--scope", "*")):
        result = run_cli("token", *args, "--admin-url", f"http://127.0.0.1:{port}")
        assert_clean_error(result, 2, "GATEWAY_ADMIN_TOKEN is not set")


def test_token_create_help_explains_every_option() -> None:
    """Point 11."""
    result = run_cli("token", "create", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag, words in (
        ("--name NAME", "metrics and logs label by it"),
        ("--scope SCOPE", "repeatable"),
        ("--hourly N", "requests per hour"),
        ("--per-minute N", "requests per minute"),
        ("--weight N", "its share"),
        ("--expires-in DURATION", "30d"),
        ("--upstream-key NAME", "upstream.extra_keys"),
    ):
        assert f"{flag} {words}" in text or (flag in text and words in text), (flag, text)
    assert "contacts:read" in text


@pytest.mark.parametrize(
    ("scope", "needles"),
    [
        ("contact:read", ("unknown scope 'contact:read'", "did you mean contacts:read", "known:")),
        ("contacts:read,tags:read", ("holds several scopes", "--scope contacts:read --scope")),
        ("contacts:read tags:read", ("holds several scopes", "--scope tags:read")),
    ],
)
def test_a_wrong_scope_is_explained(tmp_path: Path, scope: str, needles: tuple[str, ...]) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    result = run_cli(
        "token", "create", "--config", gw.config, "--name", "x", "--scope", scope, env=gw.env
    )
    line = assert_clean_error(result, 2, *needles)
    if "known:" in line:
        assert "tags:write" in line and "boards:read" in line


def test_an_active_name_is_refused_until_its_token_is_revoked(tmp_path: Path) -> None:
    """Point 12."""
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    token = create_token(gw, "--name", "crm-sync", "--scope", "contacts:read")
    again = run_cli(
        "token", "create", "--config", gw.config, "--name", "crm-sync", "--scope", "*",
        env=gw.env,
    )  # fmt: skip
    token_id = token.split("_")[1]
    assert_clean_error(again, 2, "already called 'crm-sync'", token_id)
    assert run_cli("token", "revoke", token_id, "--config", gw.config).returncode == 0
    create_token(gw, "--name", "crm-sync", "--scope", "contacts:read")


def test_revoking_twice_says_it_already_was(tmp_path: Path) -> None:
    """Point 14."""
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    token_id = create_token(gw, "--name", "svc", "--scope", "*").split("_")[1]
    first = run_cli("token", "revoke", token_id, "--config", gw.config)
    assert first.returncode == 0
    assert first.stdout.startswith(f"revoked {token_id}")
    second = run_cli("token", "revoke", token_id, "--config", gw.config)
    assert second.returncode == 0, second.stderr
    assert re.fullmatch(rf"{token_id} \(svc\) was already revoked at \S+\n", second.stdout)


@pytest.mark.parametrize("command", [("list",), ("revoke", "abc")])
def test_a_mistyped_state_file_is_refused_not_created(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """Point 14: list and revoke read tokens; a missing file would be made empty."""
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    missing = tmp_path / "stat.db"
    result = run_cli(
        "token", *command, "--config", gw.config, "--state", f"sqlite:///{missing}", env=gw.env
    )
    assert_clean_error(result, 1, f"no sqlite file at {missing}")
    assert not missing.exists()


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (
            'listen: "0.0.0.0:8080"\nstate: "sqlite:///x.db\nupstream:\n'
            '  base_url: "https://echo.win"\n  api_key: {env: ECHOWIN_API_KEY}\n',
            ("at line 2: a quote opened there is not closed",),
        ),
        (
            'upstrem:\n  base_url: "https://echo.win"\n',
            ("upstrem: unknown key; did you mean 'upstream'?",),
        ),
        ("logging: {format: xml}\n", ("logging.format: must be one of 'json' or 'text'",)),
    ],
)
def test_check_config_points_at_the_mistake(
    tmp_path: Path, text: str, needles: tuple[str, ...]
) -> None:
    """Point 14."""
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    result = run_cli("check-config", path, "--skip-secrets")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


async def test_workers_do_not_log_the_admin_address_they_do_not_bind(
    tmp_path: Path, spawn: Spawn
) -> None:
    """Point 14: only the supervisor binds admin_listen, and only it names it."""
    sim = await start_sim(spawn)
    gw = gateway_config(tmp_path, sim.url)
    async with http_client() as session:
        proc = spawn("serve", "--config", gw.config, "--workers", "2", env=gw.env, name="serve")
        assert await wait_http(session, gw.admin_url("/healthz"), proc) == 200

        def listening() -> list[dict[str, object]]:
            lines = [json.loads(x) for x in proc.stderr().splitlines() if x.startswith("{")]
            return [x for x in lines if x.get("msg") == "gateway listening"]

        async def all_up() -> bool:
            return len(listening()) >= 3  # two workers and the supervisor

        await eventually(all_up, "three 'gateway listening' lines", 10)
    named = [line for line in listening() if "admin_listen" in line]
    assert len(named) == 1, listening()
    assert named[0]["admin_listen"] == f"127.0.0.1:{gw.admin_port}"
    assert named[0].get("workers") == 2


async def test_own_answers_log_their_bytes(tmp_path: Path, spawn: Spawn) -> None:
    """Point 14: the access log's bytes of a 401 the gateway wrote itself."""
    sim = await start_sim(spawn)
    gw = gateway_config(tmp_path, sim.url)
    async with http_client() as session:
        proc = await start_gateway(spawn, session, gw)
        async with session.get(gw.url("/api/v1/contacts"), headers={"X-Request-ID": "nb"}) as r:
            body = await r.read()
            assert r.status == 401
        proc.popen.send_signal(signal.SIGTERM)
        assert await proc.wait_exit(timeout=15) == 0
    lines = [json.loads(x) for x in proc.stderr().splitlines() if x.startswith("{")]
    (line,) = [x for x in lines if x.get("request_id") == "nb"]
    assert line["bytes"] == len(body) > 0
