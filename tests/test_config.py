"""Config: validation names the key, secrets come from env or file, shipped files load."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from proxy.config import (
    ConfigError,
    GatewayConfig,
    Secret,
    SecretRef,
    load_config,
    parse_config,
    resolve_secrets,
)

ROOT = Path(__file__).resolve().parent.parent


def errors_of(raw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.lines


def test_defaults_are_the_contract() -> None:
    config = parse_config({})
    assert config.listen == "0.0.0.0:8080"
    assert config.admin_listen == "127.0.0.1:9090"
    assert [(lim.requests, lim.per_seconds) for lim in config.upstream.limits] == [
        (1000, 3600.0),
        (100, 60.0),
    ]
    assert config.upstream.window_guard_seconds == 0.25
    assert config.queue.max_wait_seconds == 10


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
        (
            {"logging": {"format": "xml"}},
            'logging.format: must be one of the allowed values, got "xml"',
        ),
        ({"upstream": {"api_key": "sk-inline"}}, None),
        ({"upstream": {"api_key": {"env": "A", "file": "/b"}}}, None),
        ({"state": "postgres://x"}, None),
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


def test_every_error_is_reported_at_once() -> None:
    lines = errors_of({"listen": "x", "queue": {"max_depth": -3}})
    assert len(lines) == 2


def test_route_entries_are_validated() -> None:
    lines = errors_of({"routes": [{"method": "GET", "path": "agents", "scope": "agents:read"}]})
    assert lines[0].startswith("routes")
    config = parse_config(
        {"routes": [{"method": "get", "path": "/api/v1/agents/{agentId}", "scope": "agents:read"}]}
    )
    table = config.route_table()
    assert table.match("GET", "/api/v1/agents/a1").template == "/api/v1/agents/{agentId}"


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


def _schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.add(path)
        annotation = field.annotation
        if (
            isinstance(annotation, type)
            and issubclass(annotation, BaseModel)
            and annotation is not SecretRef
        ):
            keys |= _schema_keys(annotation, path + ".")
    return keys


def _yaml_keys(node: object, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(node, dict):
        for name, value in node.items():
            path = f"{prefix}{name}"
            keys.add(path)
            if name not in ("api_key", "agency_key", "extra_keys", "admin_token"):
                keys |= _yaml_keys(value, path + ".")
    return keys


def test_reference_names_every_schema_key() -> None:
    raw = yaml.safe_load((ROOT / "config" / "gateway.reference.yaml").read_text())
    documented = _yaml_keys(raw)
    schema = _schema_keys(GatewayConfig)
    assert schema - documented == set(), "keys missing from gateway.reference.yaml"
    assert documented - schema == set(), "reference names keys the schema does not know"


def test_reference_shows_the_defaults() -> None:
    raw = yaml.safe_load((ROOT / "config" / "gateway.reference.yaml").read_text())
    assert parse_config(raw) == GatewayConfig()


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
