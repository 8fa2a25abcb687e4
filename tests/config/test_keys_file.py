"""upstream.keys_file: a JSON or YAML map of key name to key, read like every secret; its
errors name the file's entry and line, never a key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.cli.common import EXIT_CONFIG
from proxy.config import ConfigError, parse_config, resolve_secrets
from proxy.config.keys_file import MAX_KEYS, parse_keys_file
from tests.procs import child_env, run_cli, write_config

KEY = "ek_live_5a1d0c9e8f7b6a5d4c3b2a19"
OTHER = "ek_live_0f1e2d3c4b5a69788796a5b4"
ENV = {"TEAM": "team-key-0123456789"}


def _resolve(tmp_path: Path, text: str, **upstream: Any) -> Any:
    path = tmp_path / "keys.yaml"
    path.write_text(text, encoding="utf-8")
    raw = {"upstream": {"api_key": {"env": "TEAM"}, "keys_file": {"file": str(path)}, **upstream}}
    return resolve_secrets(parse_config(raw), ENV)


def _errors(tmp_path: Path, text: str, **upstream: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _resolve(tmp_path, text, **upstream)
    lines = info.value.lines
    for line in lines:  # no key, whole or in part, in any error
        assert KEY not in line and KEY[8:20] not in line and OTHER not in line, line
    return lines


def test_yaml_and_json_maps_become_credentials_with_optional_limits(tmp_path: Path) -> None:
    text = f"acme: {KEY}\nglobex: {{key: {OTHER}, limits: [{{requests: 50, per_seconds: 60}}]}}\n"
    creds = _resolve(tmp_path, text).credentials
    assert list(creds) == ["default", "acme", "globex"]
    assert creds["acme"].secret.reveal() == KEY
    assert creds["acme"].header == "X-API-Key"
    assert creds["acme"].limits is None
    assert creds["globex"].limits == ((50, 60.0),)
    for cred in creds.values():
        assert cred.secret.reveal() not in repr(cred)
    assert creds["acme"].secret.source == f"file:{tmp_path / 'keys.yaml'}#acme"

    as_json = json.dumps({"acme": KEY, "globex": {"key": OTHER}})
    entries = parse_keys_file(as_json)
    assert [k.name for k in entries] == ["acme", "globex"]
    assert KEY not in repr(entries) and OTHER not in repr(entries)


def test_keys_file_from_an_environment_variable() -> None:
    raw = {"upstream": {"api_key": {"env": "TEAM"}, "keys_file": {"env": "KEYS"}}}
    creds = resolve_secrets(parse_config(raw), {**ENV, "KEYS": json.dumps({"acme": KEY})})
    assert creds.credentials["acme"].secret.reveal() == KEY
    assert creds.credentials["acme"].secret.source == "env:KEYS#acme"
    with pytest.raises(ConfigError) as info:
        resolve_secrets(parse_config(raw), ENV)
    assert info.value.lines == ["upstream.keys_file: environment variable KEYS is not set or empty"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"acme: {KEY}\nacme: {OTHER}\n", "upstream.keys_file: 'acme' is listed twice (line 2)"),
        (json.dumps({"acme": KEY}) + "\n", None),
        (
            '{"acme": "' + KEY + '", "acme": "' + OTHER + '"}',
            "upstream.keys_file: 'acme' is listed twice",
        ),
        (f"default: {KEY}\n", "upstream.keys_file: entry 'default': 'default' is reserved"),
        (f"a b: {KEY}\n", "upstream.keys_file: entry 'a b': 'a b': names are 1-64"),
        (f"{KEY * 3}: x\n", "upstream.keys_file: entry '?': names are 1-64"),
        ("acme: ''\n", "upstream.keys_file.acme: the key must be a non-empty string"),
        ("acme: [1, 2]\n", "upstream.keys_file.acme: the key must be a non-empty string"),
        (f"acme: {{key: {KEY}, limit: 3}}\n", "upstream.keys_file.acme: unknown field(s) limit"),
        (
            f"acme: {{key: {KEY}, limits: [{{requests: 0, per_seconds: 60}}]}}\n",
            "upstream.keys_file.acme: limits[0].requests must be a positive integer",
        ),
        (f"acme: {KEY}\nglobex: [{OTHER}\n", "upstream.keys_file: not valid YAML (line 2)"),
        ('{"acme": "' + KEY + '",', "upstream.keys_file: not valid JSON (line 1)"),
        (f"- {KEY}\n", "upstream.keys_file: must be a map of key name to key"),
        (f"acme: {KEY}\nglobex: {KEY}\n", "upstream.keys_file.globex: the same key as 'acme'"),
    ],
)
def test_errors_name_the_entry_never_the_key(
    tmp_path: Path, text: str, expected: str | None
) -> None:
    if expected is None:
        assert _resolve(tmp_path, text).credentials["acme"].secret.reveal() == KEY
        return
    lines = _errors(tmp_path, text)
    assert any(line.startswith(expected) for line in lines), lines


def test_names_and_keys_the_config_holds_already_are_refused(tmp_path: Path) -> None:
    extra = {"extra_keys": {"acme": {"env": "ACME"}}}
    path = tmp_path / "keys.yaml"
    path.write_text(f"acme: {OTHER}\nteam2: {ENV['TEAM']}\n", encoding="utf-8")
    raw = {"upstream": {"api_key": {"env": "TEAM"}, "keys_file": {"file": str(path)}, **extra}}
    with pytest.raises(ConfigError) as info:
        resolve_secrets(parse_config(raw), {**ENV, "ACME": KEY})
    assert info.value.lines == [
        "upstream.keys_file.acme: also named by the config (extra_keys)",
        "upstream.keys_file.team2: the same key as 'default'",
    ]


def test_size_is_bounded(tmp_path: Path) -> None:
    many = {f"team-{i}": f"{KEY}-{i}" for i in range(MAX_KEYS + 1)}
    lines = _errors(tmp_path, json.dumps(many))
    assert lines == [f"upstream.keys_file: {MAX_KEYS + 1} keys; at most {MAX_KEYS}"]
    lines = _errors(tmp_path, "acme: " + "k" * (5 * 1024 * 1024))
    assert lines[0].startswith("upstream.keys_file: larger than")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    raw = {"upstream": {"api_key": {"env": "TEAM"}, "keys_file": {"file": str(tmp_path / "no")}}}
    with pytest.raises(ConfigError) as info:
        resolve_secrets(parse_config(raw), ENV)
    assert info.value.lines[0].startswith(
        f"upstream.keys_file: cannot read secret file {tmp_path / 'no'}"
    )


def test_check_config_names_each_bad_entry_and_prints_no_key(tmp_path: Path) -> None:
    keys = tmp_path / "subteams.yaml"
    keys.write_text(
        f"acme: {KEY}\nglobex: {KEY}\n{OTHER}: x\ndefault: {OTHER}x\n", encoding="utf-8"
    )
    config = tmp_path / "gateway.yaml"
    raw = {"upstream": {"api_key": {"env": "TEAM"}, "keys_file": {"file": str(keys)}}}
    write_config(config, raw)
    result = run_cli("check-config", config, env=child_env(TEAM=ENV["TEAM"]))
    assert result.returncode == EXIT_CONFIG, result.stderr
    out = result.stdout + result.stderr
    assert KEY not in out and OTHER not in out and KEY[8:20] not in out, out
    assert "upstream.keys_file.globex: the same key as 'acme'" in out
    assert "upstream.keys_file: entry " in out and "'default' is reserved" in out


def test_a_keys_own_limits_must_fit_the_classes_reservations(tmp_path: Path) -> None:
    """Classes reserve windows of ``upstream.limits``; a key of the file with limits of its
    own is checked the same way: every reserved window must be one of its own, and the
    reservations may not sum past its limits. A key on upstream.limits is not re-checked."""
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"acme: {KEY}\n"
        f"small: {{key: {OTHER}, limits: [{{requests: 10, per_seconds: 60}}]}}\n"
        "hourly: {key: ek_live_hourly_only_0123456789,"
        " limits: [{requests: 500, per_seconds: 3600}]}\n",
        encoding="utf-8",
    )
    raw = {
        "upstream": {"api_key": {"env": "TEAM"}, "keys_file": {"file": str(path)}},
        "classes": {
            "interactive": {"reserve": [{"requests": 20, "per_seconds": 60}]},
            "batch": {"pace": True},
        },
        "default_class": "batch",
    }
    with pytest.raises(ConfigError) as info:
        resolve_secrets(parse_config(raw), ENV)
    lines = info.value.lines
    assert any(
        "upstream.keys_file.small.limits[0].requests (10)" in line and "sum to 20" in line
        for line in lines
    ), lines
    assert any(
        line.startswith("upstream.keys_file.hourly.limits: no window is 60 s long")
        for line in lines
    ), lines
    assert not any("acme" in line for line in lines), lines
    for line in lines:
        assert KEY not in line and OTHER not in line, line
