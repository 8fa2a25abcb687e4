"""Secrets come from env or file, one line per missing one, and never show."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from proxy.config import (
    ConfigError,
    Secret,
    parse_config,
    resolve_secrets,
)


def test_secrets_from_env_and_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "agency"
    secret_file.write_text("agency-secret\n")
    config = parse_config(
        {
            "upstream": {
                "api_key": {"env": "TEAM"},
                "agency_key": {"file": str(secret_file)},
                "extra_keys": {"acme": {"env": "ACME"}},
            },
            "admin_token": {"env": "ADMIN"},
        }
    )
    resolved = resolve_secrets(config, {"TEAM": "team-secret", "ACME": "acme-secret", "ADMIN": "a"})
    creds = resolved.credentials
    assert creds["default"].secret.reveal() == "team-secret"
    assert creds["default"].header == "X-API-Key"
    assert creds["agency"].secret.reveal() == "agency-secret"
    assert creds["agency"].header == "X-AGENCY-KEY"
    assert creds["acme"].secret.reveal() == "acme-secret"
    assert resolved.team_key_names() == ("default", "acme")
    for cred in creds.values():
        assert cred.secret.reveal() not in repr(cred) + str(cred.secret)


def test_missing_secrets_are_one_line_each(tmp_path: Path) -> None:
    config = parse_config(
        {"upstream": {"api_key": {"env": "NOPE"}, "agency_key": {"file": str(tmp_path / "none")}}}
    )
    with pytest.raises(ConfigError) as info:
        resolve_secrets(config, {})
    lines = info.value.lines
    assert lines[0] == "upstream.api_key: environment variable NOPE is not set or empty"
    assert lines[1].startswith(f"upstream.agency_key: cannot read secret file {tmp_path / 'none'}")
    assert all("\n" not in line for line in lines)


def test_the_sentinels_password_is_a_secret_read_only_with_redis_state() -> None:
    raw = {
        "upstream": {"api_key": {"env": "TEAM"}},
        "state": "redis-sentinel://127.0.0.1:26379/main",
        "redis": {"sentinel_password": {"env": "SENTINELS"}},
    }
    with pytest.raises(ConfigError) as info:
        resolve_secrets(parse_config(raw), {"TEAM": "t"})
    assert info.value.lines == [
        "redis.sentinel_password: environment variable SENTINELS is not set or empty"
    ]
    resolved = resolve_secrets(parse_config(raw), {"TEAM": "t", "SENTINELS": "s-pass"})
    assert resolved.sentinel_password is not None
    assert resolved.sentinel_password.reveal() == "s-pass"
    assert "s-pass" not in repr(resolved)
    # Not read at all when the state is not in Redis.
    local = resolve_secrets(parse_config(raw | {"state": "memory://"}), {"TEAM": "t"})
    assert local.sentinel_password is None


def test_a_key_pasted_where_its_name_goes_is_not_echoed() -> None:
    pasted = "ew_live_4f9a8c7e6d5b"  # a key, written as the variable's name or the file
    config = parse_config(
        {"upstream": {"api_key": {"env": pasted}, "agency_key": {"file": pasted}}}
    )
    with pytest.raises(ConfigError) as info:
        resolve_secrets(config, {})
    assert info.value.lines == [
        "upstream.api_key: environment variable named at upstream.api_key.env is not set or empty",
        "upstream.agency_key: cannot read secret file named at upstream.agency_key.file: "
        "No such file or directory",
    ]
    # Set, it works, and the secret's source does not show the name either.
    secrets = resolve_secrets(
        parse_config({"upstream": {"api_key": {"env": pasted}}}), {pasted: "k"}
    )
    assert pasted not in repr(secrets.credentials["default"].secret)


def test_secret_never_shows() -> None:
    secret = Secret("hunter2-value", "env:X")
    assert "hunter2" not in repr(secret) and "hunter2" not in f"{secret}"
    with pytest.raises(TypeError):
        pickle.dumps(secret)
