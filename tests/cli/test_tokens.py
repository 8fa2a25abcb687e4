"""End-to-end tests of ``echowin-gateway token create|list|revoke`` (SPEC §4).

Every test runs the real console script in subprocesses that talk only to 127.0.0.1 on
ports picked free per test. Every wait has a deadline; every process is killed at teardown.
Children run without PYTHONUNBUFFERED, as under docker or systemd, so a line that only
shows up when stdout is a terminal fails here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from tests.procs import (
    CLI,
    COMMAND_SECONDS,
    TOKEN_RE,
    assert_clean_error,
    create_token,
    gateway_config,
    run_cli,
)


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


def test_token_list_keeps_long_names_and_keys_in_their_columns(tmp_path: Path) -> None:
    name = "crm-sync-for-the-eu-west-datacenter"  # longer than the NAME column's 24
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    token_id = create_token(gw, "--name", name, "--scope", "contacts:read").split("_")[1]
    create_token(gw, "--name", "short", "--scope", "tags:read")
    listed = run_cli("token", "list", "--config", gw.config, env=gw.env)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "STATUS", "KEY", "CLASS", "SCOPES"]
    (row,) = [r for r in rows if r.startswith(token_id)]
    assert row.split() == [token_id, name, "active", "default", "-", "contacts:read"]
    # The columns line up: every field starts where its header does.
    for field in ("NAME", "STATUS", "KEY", "CLASS", "SCOPES"):
        column = header.index(field)
        assert all(r[column - 1] == " " and r[column] != " " for r in rows), (field, rows)


CLASSES = {
    "classes": {
        "interactive": {"weight": 4, "reserve": [{"requests": 20, "per_seconds": 60}]},
        "batch": {"pace": True},
    },
    "default_class": "batch",
}


def test_token_create_takes_a_class_and_list_shows_every_tokens_class(tmp_path: Path) -> None:
    gw = gateway_config(tmp_path, "http://127.0.0.1:9", **CLASSES)
    fast = create_token(gw, "--name", "calls", "--scope", "contacts:read", "--class", "interactive")
    plain = create_token(gw, "--name", "sync", "--scope", "contacts:read")
    listed = run_cli("token", "list", "--json", "--config", gw.config, env=gw.env)
    classes = {v["id"]: v["class"] for v in json.loads(listed.stdout)}
    # A token created without --class belongs to default_class.
    assert classes == {fast.split("_")[1]: "interactive", plain.split("_")[1]: "batch"}
    unknown = run_cli(
        "token", "create", "--config", gw.config, "--name", "x", "--scope", "contacts:read",
        "--class", "bulk", env=gw.env,
    )  # fmt: skip
    assert_clean_error(unknown, 2, "class", "bulk", "interactive")


def test_token_list_into_a_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    # `token list | head -1`: the reader leaves before the writer is done.
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    create_token(gw, "--name", "crm", "--scope", "contacts:read")
    read_end, write_end = os.pipe()
    os.close(read_end)  # before the command writes a byte: every write fails with EPIPE
    try:
        result = subprocess.run(
            [*CLI, "token", "list", "--config", str(gw.config)],
            env=gw.env,
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=COMMAND_SECONDS,
            check=False,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr, result.stderr
    assert "BrokenPipeError" not in result.stderr, result.stderr
    assert result.returncode == 141  # what a shell reports for a writer killed by SIGPIPE


@pytest.mark.parametrize(
    ("command", "state_in"),
    [
        (["create", "--name", "x", "--scope", "*"], "config"),
        (["list"], "config"),
        (["revoke", "abcdefghijkl"], "config"),
        (["create", "--name", "x", "--scope", "*"], "--state"),
    ],
    ids=["create", "list", "revoke", "create-state-flag"],
)
def test_token_commands_refuse_a_memory_state(
    tmp_path: Path, command: list[str], state_in: str
) -> None:
    # A token made in this process's memory reaches no gateway: it was printed, then lost.
    gw = gateway_config(tmp_path, "http://127.0.0.1:9", state="memory://")
    args = ["--config", str(gw.config)]
    if state_in == "--state":
        gw = gateway_config(tmp_path, "http://127.0.0.1:9")
        args = ["--config", str(gw.config), "--state", "memory://"]
    result = run_cli("token", *command, *args, env=gw.env)
    assert_clean_error(result, 2, "state", "memory://", "--admin-url")
    assert not TOKEN_RE.search(result.stdout)
