"""Operational edges: shutdown with a queue, state files that cannot be used, config input
that must give one clear error. Real ``serve`` and CLI subprocesses (tests/procs.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp

from tests.procs import (
    Spawn,
    assert_clean_error,
    create_token,
    eventually,
    free_ports,
    gateway_config,
    http_client,
    run_cli,
    start_gateway,
    start_sim,
    wait_http,
)


async def _queue_depth(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url) as resp:
        text = await resp.text()
    depth = 0.0
    for line in text.splitlines():
        if line.startswith("echowin_gateway_queue_depth{"):
            depth += float(line.rsplit(" ", 1)[1])
    return depth


async def test_sigterm_answers_a_request_still_queued_when_the_grace_ends(
    tmp_path: Path, spawn: Spawn
) -> None:
    """A request waiting for budget when the drain's grace runs out gets an answer (503,
    Retry-After), not a dropped connection, and the process still exits within the grace."""
    sim = await start_sim(spawn)
    gw = gateway_config(
        tmp_path,
        sim.url,
        server={"shutdown_grace_seconds": 1},
        queue={"max_wait_seconds": 30},
    )
    raw_limits = [{"requests": 1, "per_seconds": 20}]
    text = gw.config.read_text(encoding="utf-8")
    gw.config.write_text(
        text.replace("  timeout_seconds: 5\n", f"  timeout_seconds: 5\n  limits: {raw_limits}\n"),
        encoding="utf-8",
    )
    token = create_token(gw, "--name", "svc", "--scope", "contacts:read")
    auth = {"Authorization": f"Bearer {token}"}
    async with http_client() as session:
        proc = await start_gateway(spawn, session, gw)
        async with session.get(gw.url("/api/v1/contacts"), headers=auth) as resp:
            assert resp.status == 200  # the window's one send

        async def queued() -> tuple[int, str, str | None]:
            async with (
                http_client() as client,
                client.get(gw.url("/api/v1/contacts"), headers=auth) as resp,
            ):
                return resp.status, await resp.text(), resp.headers.get("Retry-After")

        waiting = asyncio.create_task(queued())

        async def is_queued() -> bool:
            return await _queue_depth(session, gw.admin_url("/metrics")) >= 1

        await eventually(is_queued, "a request queued for budget", timeout=5)
        signalled = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        try:
            status, body, retry_after = await asyncio.wait_for(waiting, timeout=10)
        except aiohttp.ClientError as exc:
            raise AssertionError(f"the queued request got no answer: {exc!r}") from exc
        assert status == 503, body
        assert '"reason":"shutting_down"' in body.replace(" ", ""), body
        assert retry_after is not None
        assert await proc.wait_exit(timeout=10) == 0, proc.stderr()[-3000:]
        assert time.monotonic() - signalled < 1 + 2
        assert "Traceback" not in proc.stderr()


# --- a state file that cannot be used: one clear error line, never a traceback ------------


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is no sqlite database, only text " * 200)


def _newer_schema(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 9999")
    conn.commit()
    conn.close()


def test_token_commands_on_a_corrupt_state_file_give_one_clear_error(tmp_path: Path) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    state = tmp_path / "state.db"
    _corrupt(state)
    for args in (
        ("list",),
        ("create", "--name", "svc", "--scope", "contacts:read"),
        ("revoke", "tok_abc"),
    ):
        result = run_cli("token", *args, "--config", gw.config, env=gw.env)
        assert_clean_error(result, 1, "state:", str(state), "not a database")


def test_serve_on_a_corrupt_state_file_gives_one_clear_error(tmp_path: Path) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    state = tmp_path / "state.db"
    _corrupt(state)
    result = run_cli("serve", "--config", gw.config, env=gw.env)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    assert f"error: state: cannot use the sqlite file {state}" in result.stderr


def test_a_newer_state_file_is_refused_with_one_clear_error(tmp_path: Path) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    _newer_schema(tmp_path / "state.db")
    result = run_cli("token", "list", "--config", gw.config, env=gw.env)
    assert_clean_error(result, 1, "state:", "newer than this gateway")
    served = run_cli("serve", "--config", gw.config, env=gw.env)
    assert "Traceback" not in served.stderr, served.stderr
    assert served.returncode == 1
    assert "newer than this gateway" in served.stderr


def test_a_state_path_through_a_file_gives_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a directory")
    gw = gateway_config(tmp_path, "http://127.0.0.1:9", state=f"sqlite:///{tmp_path}/plain/s.db")
    result = run_cli("token", "list", "--config", gw.config, env=gw.env)
    assert_clean_error(result, 1, "state:", str(tmp_path / "plain" / "s.db"))


def test_a_nul_byte_in_the_state_path_is_a_config_error(tmp_path: Path) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9", state=f"sqlite:///{tmp_path}/a%00b.db")
    result = run_cli("check-config", gw.config, env=gw.env)
    assert_clean_error(result, 2, "state:")
    result = run_cli("token", "list", "--config", gw.config, env=gw.env)
    assert_clean_error(result, 2, "state:")


def test_token_commands_with_redis_down_give_one_clear_error(tmp_path: Path) -> None:
    (closed,) = free_ports(1)  # nothing listens there
    gw = gateway_config(tmp_path, "http://127.0.0.1:9", state=f"redis://127.0.0.1:{closed}/0")
    for args in (("list",), ("create", "--name", "svc", "--scope", "*"), ("revoke", "x")):
        result = run_cli("token", *args, "--config", gw.config, env=gw.env)
        assert_clean_error(result, 1, "state:")


def test_a_deeply_nested_config_gives_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("routes: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    result = run_cli("check-config", path)
    assert_clean_error(result, 2, str(path))


async def test_a_group_whose_workers_cannot_start_exits_1_without_a_traceback(
    tmp_path: Path, spawn: Spawn
) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    state = tmp_path / "state.db"
    _corrupt(state)
    proc = spawn("serve", "--config", gw.config, "--workers", "2", env=gw.env, name="group")
    assert await proc.wait_exit(20) == 1
    err = proc.stderr()
    assert f"error: state: cannot use the sqlite file {state}" in err
    assert "worker failed to start; stopping" in err
    assert "Traceback" not in err, err
    assert "never retrieved" not in err, err


# --- SIGHUP while the gateway is still starting --------------------------------------------


def _has_open(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.path.realpath(fd) == str(path) for fd in fds.iterdir())
    except OSError:
        return False


async def test_a_sighup_while_starting_neither_kills_the_gateway_nor_is_lost(
    tmp_path: Path, spawn: Spawn
) -> None:
    """A SIGHUP between reading the config and being up (here: while the state file is
    locked by another process) must not kill the gateway (SIGHUP's default action), and the
    config changed meanwhile is applied once it is up."""
    gw = gateway_config(tmp_path, "http://127.0.0.1:9", queue={"max_wait_seconds": 10})
    state = tmp_path / "state.db"
    holder = sqlite3.connect(state, isolation_level=None)
    holder.execute("CREATE TABLE holder (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = spawn("serve", "--config", gw.config, env=gw.env, name="serve")

        async def opening_state() -> bool:
            proc.check_alive()
            return _has_open(proc.popen.pid, state)

        await eventually(opening_state, "serve opening its locked state file", timeout=10)
        text = gw.config.read_text(encoding="utf-8")
        gw.config.write_text(
            text.replace("max_wait_seconds: 10", "max_wait_seconds: 7"), encoding="utf-8"
        )
        proc.popen.send_signal(signal.SIGHUP)  # SIGHUP's default action ends it at once
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    async with http_client() as session:
        assert await wait_http(session, gw.admin_url("/healthz"), proc) == 200

        async def reloaded() -> bool:
            async with session.get(gw.admin_url("/metrics")) as resp:
                text = await resp.text()
            return "echowin_gateway_queue_max_wait_seconds 7.0" in text

        await eventually(reloaded, "the config changed while starting applied", timeout=5)


async def test_a_sighup_during_the_drain_does_not_cut_it_short(
    tmp_path: Path, spawn: Spawn
) -> None:
    sim = await start_sim(spawn)
    gw = gateway_config(tmp_path, sim.url)
    token = create_token(gw, "--name", "slow", "--scope", "contacts:read")
    async with http_client() as session:
        proc = await start_gateway(spawn, session, gw)
        async with session.post(f"{sim.url}/_sim/faults", json={"latency_seconds": 1.5}) as resp:
            assert resp.status == 200

        async def slow_request() -> int:
            url, headers = gw.url("/api/v1/contacts"), {"X-API-Key": token}
            async with http_client() as client, client.get(url, headers=headers) as resp:
                await resp.read()
                return resp.status

        async def in_flight() -> bool:
            async with session.get(gw.admin_url("/metrics")) as resp:
                return "echowin_gateway_in_flight_requests 1.0" in await resp.text()

        request = asyncio.create_task(slow_request())
        await eventually(in_flight, "a request in flight", timeout=5)
        proc.popen.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            return "shutting down" in proc.stderr()

        await eventually(draining, "the drain begun", timeout=5)
        proc.popen.send_signal(signal.SIGHUP)
        assert await asyncio.wait_for(request, timeout=10) == 200
        assert await proc.wait_exit(timeout=10) == 0, proc.stderr()[-3000:]
