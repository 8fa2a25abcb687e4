"""Loading the config: YAML read once, every problem one line that names the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    ConfigError,
    load_config,
    parse_config,
)
from tests.config.conftest import ROOT, errors_of


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"upstream": {"limits": [{"requests": "abc", "per_seconds": 60}]}},
            'upstream.limits[0].requests: must be a positive integer, got "abc"',
        ),
        (
            {
                "upstream": {
                    "limits": [
                        {"requests": 10, "per_seconds": 1},
                        {"requests": 0, "per_seconds": 5},
                    ]
                }
            },
            "upstream.limits[1].requests: must be a positive integer, got 0",
        ),
        (
            {"upstream": {"limits": [{"requests": True, "per_seconds": 5}]}},
            "upstream.limits[0].requests: must be a positive integer, got True",
        ),
        (
            {"upstream": {"limits": [{"requests": 5, "per_seconds": -1}]}},
            "upstream.limits[0].per_seconds: must be a positive number, got -1",
        ),
        ({"upstream": {"limits": []}}, "upstream.limits: must not be empty"),
        (
            {"queue": {"max_wait_seconds": "soon"}},
            'queue.max_wait_seconds: must be a number, got "soon"',
        ),
        ({"listen": "8080"}, 'listen: must be "host:port" with a port in 1-65535, got "8080"'),
        (
            {"admin_listen": "127.0.0.1:9\u00b2"},  # a superscript two passes str.isdigit()
            'admin_listen: must be "host:port" with a port in 1-65535, got "127.0.0.1:9\u00b2"',
        ),
        ({"upstream": {"colour": "blue"}}, "upstream.colour: unknown key"),
        ({"upstrem": {}}, "upstrem: unknown key; did you mean 'upstream'?"),
        (
            {"upstream": {"timout_seconds": 3}},
            "upstream.timout_seconds: unknown key; did you mean 'timeout_seconds'?",
        ),
        (
            {"logging": {"format": "xml"}},
            "logging.format: must be one of 'json' or 'text', got \"xml\"",
        ),
        ({"upstream": {"api_key": "sk-inline"}}, None),
        ({"upstream": {"api_key": {"env": "A", "file": "/b"}}}, None),
        ({"state": "postgres://x"}, None),
        (
            {"token_store": "postgresql://gw@db/tokens?sslmode=maybe"},
            "token_store: sslmode must be one of disable, prefer, require, verify-ca, verify-full",
        ),
        ({"token_store": "sqlite:///tokens.db"}, None),
        ({"postgres": {"pool_size": 0}}, "postgres.pool_size: must be a positive integer, got 0"),
        ({"upstream": {"base_url": "ftp://echo.win"}}, None),
        ({"upstream": {"extra_keys": {"default": {"env": "X"}}}}, None),
    ],
)
def test_errors_name_the_key(raw: dict[str, Any], expected: str | None) -> None:
    lines = errors_of(raw)
    if expected is not None:
        assert expected in lines
    key = next(iter(raw))
    assert all(line.startswith(key) for line in lines), lines


def test_inline_secret_is_refused_without_echoing_it() -> None:
    lines = errors_of({"upstream": {"api_key": "sk-live-very-secret"}})
    assert lines and all("sk-live-very-secret" not in line for line in lines)
    assert lines[0].startswith("upstream.api_key")


def test_a_token_store_password_is_refused_without_echoing_it() -> None:
    lines = errors_of({"token_store": "postgresql://gw:pg-very-secret@db/tokens"})
    assert lines == [
        "token_store: a postgresql:// URL must not carry a password;"
        " set postgres.password (from env or file) instead"
    ]


def test_the_postgres_password_is_read_only_for_a_postgres_token_store() -> None:
    from proxy.config import resolve_secrets

    raw = {"postgres": {"password": {"env": "PG_PW"}}}
    env = {"ECHOWIN_API_KEY": "k", "PG_PW": "pg-secret"}
    assert resolve_secrets(parse_config(raw), env).token_store_password is None
    raw["token_store"] = "postgresql://gw@db/tokens"
    secret = resolve_secrets(parse_config(raw), env).token_store_password
    assert secret is not None and secret.reveal() == "pg-secret"
    assert "pg-secret" not in repr(secret)
    with pytest.raises(ConfigError, match=r"postgres\.password: environment variable PG_PW"):
        resolve_secrets(parse_config(raw), {"ECHOWIN_API_KEY": "k"})


def test_every_error_is_reported_at_once() -> None:
    lines = errors_of({"listen": "x", "queue": {"max_depth": -3}})
    assert len(lines) == 2


def test_bad_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.lines[0] and "line" in info.value.lines[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            # Two upstream blocks: YAML keeps the last, and the first's key would be dropped.
            "upstream:\n  api_key: {env: ECHOWIN_API_KEY}\nqueue: {}\n"
            "upstream:\n  timeout_seconds: 5\n",
            "upstream: listed twice (lines 1 and 4)",
        ),
        (
            "upstream:\n  limits:\n    - {requests: 10, requests: 20, per_seconds: 60}\n",
            "upstream.limits[0].requests: listed twice (lines 3 and 3)",
        ),
    ],
)
def test_a_key_listed_twice_is_refused_naming_it(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines == [f"{path}: {expected}"]


@pytest.mark.parametrize("name", ["gateway.example.yaml", "gateway.reference.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(ROOT / "config" / name)
    assert config.upstream.api_key.env == "ECHOWIN_API_KEY"


@pytest.mark.parametrize(
    ("listen", "admin_listen"),
    [
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("127.0.0.1:9090", "0.0.0.0:9090"),
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("[::]:8080", "127.0.0.1:8080"),
        ("LOCALHOST:8080", "localhost:8080"),
    ],
)
def test_admin_listen_on_the_proxy_address_is_refused(listen: str, admin_listen: str) -> None:
    # serve could never bind both: check-config must say so, not the start that fails.
    lines = errors_of({"listen": listen, "admin_listen": admin_listen})
    assert len(lines) == 1
    assert lines[0].startswith("admin_listen: "), lines
    assert "listen" in lines[0].removeprefix("admin_listen: ")


def test_admin_listen_on_another_port_or_host_is_fine() -> None:
    parse_config({"listen": "0.0.0.0:8080", "admin_listen": "127.0.0.1:9090"})
    parse_config({"listen": "127.0.0.1:8080", "admin_listen": "127.0.0.2:8080"})


def test_a_route_entry_listed_twice_is_refused_naming_both() -> None:
    # Before, the last entry silently won: one of two contradicting scopes was ignored.
    routes = [
        {"method": "GET", "path": "/api/v1/agents", "scope": "agents:read"},
        {"method": "get", "path": "/api/v1/agents", "scope": "agents:admin"},
    ]
    lines = errors_of({"routes": routes})
    assert lines == ["routes[1]: GET /api/v1/agents is listed twice (also routes[0])"]


def test_a_bad_route_entry_is_named_by_its_index() -> None:
    routes = [
        {"method": "GET", "path": "/api/v1/agents", "scope": "agents:read"},
        {"method": "GET", "path": "/api/v1/calls", "scope": ""},
    ]
    assert errors_of({"routes": routes}) == ["routes[1]: route scope is empty"]


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"upstream": {"api_key": "sk-inline"}}, "upstream.api_key"),
        ({"upstream": {"extra_keys": {"acme": "sk-inline"}}}, "upstream.extra_keys.acme"),
        ({"admin_token": "sk-inline"}, "admin_token"),
        ({"redis": {"password": "sk-inline"}}, "redis.password"),
    ],
)
def test_an_inline_secret_is_told_where_secrets_come_from(raw: dict[str, Any], key: str) -> None:
    # The why, in the config's own words (was pydantic's "... instance of SecretRef").
    assert errors_of(raw) == [f"{key}: must be {{env: NAME}} or {{file: PATH}}, never inline"]


def test_a_section_that_is_not_a_mapping_says_so() -> None:
    lines = errors_of({"upstream": "https://echo.win"})
    assert lines == ['upstream: must be a mapping of keys, got "https://echo.win"']
