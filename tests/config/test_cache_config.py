"""The ``cache:`` section: off unless present, every mistake named by its key."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import ConfigError, parse_config


def errors(cache: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"state": "memory://", "cache": cache})
    return caught.value.lines


def test_off_unless_present() -> None:
    assert parse_config({}).cache is None
    config = parse_config({"cache": {"routes": {"/api/v1/tags": 60}}})
    assert config.cache is not None
    assert config.cache.routes == {"/api/v1/tags": 60.0}
    assert config.cache.max_bytes == 64 * 1024 * 1024
    assert config.cache.ttl_of("/api/v1/tags", 200) == 60.0
    assert config.cache.ttl_of("/api/v1/tags", 404) is None
    assert config.cache.ttl_of("/api/v1/boards", 200) is None


def test_404s_only_on_one_record_routes_and_only_when_asked() -> None:
    routes = {"/api/v1/contacts/{contactId}": 10, "/api/v1/tags": 60}
    off = parse_config({"cache": {"routes": routes}}).cache
    on = parse_config({"cache": {"routes": routes, "not_found_seconds": 3}}).cache
    assert off is not None and on is not None
    assert off.ttl_of("/api/v1/contacts/{contactId}", 404) is None
    assert on.ttl_of("/api/v1/contacts/{contactId}", 404) == 3.0
    assert on.ttl_of("/api/v1/tags", 404) is None


@pytest.mark.parametrize(
    ("cache", "line"),
    [
        ({"routes": {"/api/v1/tags": 0}}, "cache.routes./api/v1/tags: must be a positive number"),
        ({"routes": {"/api/v1/tags": "soon"}}, "cache.routes./api/v1/tags: must be a number"),
        ({"max_bytes": -1}, "cache.max_bytes: must be a positive integer (bytes)"),
        ({"max_bytes": 10, "max_entry_bytes": 20}, "max_entry_bytes must not exceed max_bytes"),
        ({"stale_seconds": -5}, "cache.stale_seconds: must be a number of seconds >= 0"),
        ({"ttl": 5}, "cache.ttl: unknown key"),
        ({"routes": {"tags": 5}}, "cache.routes: 'tags': a route template like /api/v1/tags"),
        ({"routes": {"/api/v1/nothing": 5}}, "cache.routes: '/api/v1/nothing' is not a GET route"),
        ({"routes": {"/api/v1/contacts/bulk": 5}}, "'/api/v1/contacts/bulk' is not a GET route"),
        ("yes", "cache: must be a mapping of keys"),
    ],
)
def test_mistakes_name_the_key(cache: Any, line: str) -> None:
    found = errors(cache)
    assert any(line in text for text in found), found


def test_a_route_added_under_routes_may_be_cached() -> None:
    raw = {
        "routes": [{"method": "GET", "path": "/api/v1/agents", "scope": "agents:read"}],
        "cache": {"routes": {"/api/v1/agents": 30}},
    }
    config = parse_config(raw)
    assert config.cache is not None and "/api/v1/agents" in config.cache.routes
