"""The config schema: its defaults are the contract, the reference file names every key."""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from proxy.config import (
    GatewayConfig,
    SecretRef,
    parse_config,
)
from tests.config.conftest import ROOT, errors_of


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


def test_route_entries_are_validated() -> None:
    lines = errors_of({"routes": [{"method": "GET", "path": "agents", "scope": "agents:read"}]})
    assert lines[0].startswith("routes")
    config = parse_config(
        {"routes": [{"method": "get", "path": "/api/v1/agents/{agentId}", "scope": "agents:read"}]}
    )
    table = config.route_table()
    assert table.match("GET", "/api/v1/agents/a1").template == "/api/v1/agents/{agentId}"


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
