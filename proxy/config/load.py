"""Loading the configuration: YAML read once (a key listed twice is refused with its line
numbers), validated by the schema, every problem turned into one ``ConfigError`` line that
names the key (``upstream.limits[0].requests: must be a positive integer, got "abc"``).
Values of keys that may hold a secret are never echoed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from proxy.config.classes import check_classes
from proxy.config.errors import ConfigError
from proxy.config.schema import GatewayConfig
from proxy.config.secrets import SecretRef

__all__ = ["load_config", "parse_config", "unshared_state", "with_state"]

# --- errors ---------------------------------------------------------------------------

_MESSAGES = {
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "extra_forbidden": "unknown key",
    "missing": "is required",
    "too_short": "must not be empty",
    "literal_error": "must be one of the allowed values",
}


_NOT_INLINE = "must be {env: NAME} or {file: PATH}, never inline"

# Keys whose values may be a secret pasted inline by mistake: never echo their input.
_SECRET_KEYS = frozenset(
    {"api_key", "agency_key", "extra_keys", "admin_token", "state", "password"}
)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _format_error(error: Mapping[str, Any]) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind = error["type"]
    message = _MESSAGES.get(kind)
    if kind == "model_type":  # a scalar (or list) where a mapping goes
        secret = error.get("ctx", {}).get("class_name") == SecretRef.__name__
        message = _NOT_INLINE if secret else "must be a mapping of keys"
    if message is None:
        message = str(error["msg"]).removeprefix("Value error, ")
    line = f"{_loc(loc)}: {message}"
    secretish = any(part in _SECRET_KEYS for part in loc)
    if kind not in ("missing", "extra_forbidden") and "input" in error and not secretish:
        shown = error["input"]
        if isinstance(shown, str | int | float | bool) or shown is None:
            line += f", got {_show(shown)}"
    return line


def _show(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"')[:80] + '"'
    return repr(value)


def _error_lines(exc: ValidationError) -> list[str]:
    """One line per error; a list's "too short" is dropped when its items had errors of
    their own (pydantic reports both when every item is invalid)."""
    errors = exc.errors()
    locs = [tuple(e["loc"]) for e in errors]

    def shadowed(loc: tuple[int | str, ...]) -> bool:
        return any(len(other) > len(loc) and other[: len(loc)] == loc for other in locs)

    return [
        _format_error(e)
        for e, loc in zip(errors, locs, strict=True)
        if not (e["type"] == "too_short" and shadowed(loc))
    ]


def parse_config(raw: object, source: str = "config") -> GatewayConfig:
    """Validate a parsed YAML document; ConfigError lists every offending key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of keys"])
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_error_lines(exc)) from None
    try:
        config.route_table()
    except ValueError as exc:
        text = str(exc)
        raise ConfigError([text if text.startswith("routes[") else f"routes: {text}"]) from None
    if problems := check_classes(config):
        raise ConfigError(problems)
    if problem := _shared_address(config):
        raise ConfigError([problem])
    if config.server.workers != 1 and (problem := unshared_state(config, "server.workers")):
        raise ConfigError([problem])
    return config


_ANY_HOST = frozenset({"0.0.0.0", "::"})  # noqa: S104 (compared with, never bound)


def _shared_address(config: GatewayConfig) -> str:
    """Why ``admin_listen`` cannot be bound beside ``listen`` ("" when it can): the same
    port on the same host, or on a wildcard host that takes the port on every address."""
    host, port = config.listen_address()
    admin_host, admin_port = config.admin_address()
    hosts = {host.lower(), admin_host.lower()}
    if port != admin_port or (len(hosts) > 1 and hosts.isdisjoint(_ANY_HOST)):
        return ""
    return (
        f"admin_listen: {config.admin_listen} takes the port of listen ({config.listen});"
        " the admin listener needs a port of its own"
    )


def unshared_state(config: GatewayConfig, source: str, workers: int | str | None = None) -> str:
    """Why ``state`` cannot serve several worker processes ("" when it can): ``memory://``
    keeps the budget inside one process, so each worker would spend all of it. ``source``
    names where the worker count came from (``server.workers``, ``--workers``)."""
    count = config.server.workers if workers is None else workers
    if count == 1 or not config.state.lower().startswith("memory:"):
        return ""
    return (
        f"state: memory:// keeps the budget inside one process; with {source} {count} each"
        " worker would spend the whole budget: use sqlite:///PATH or redis://HOST:PORT/DB"
    )


def with_state(config: GatewayConfig, state: str) -> GatewayConfig:
    """``config`` with its ``state`` replaced (``--state``), checked as the file's would be;
    ConfigError naming ``state`` otherwise."""
    try:
        return GatewayConfig.model_validate({**config.model_dump(), "state": state})
    except ValidationError as exc:
        raise ConfigError(_error_lines(exc)) from None


def _key_listed_twice(root: yaml.Node | None) -> str:
    """The first mapping key given twice, as ``KEY: listed twice (lines A and B)``, or "".

    YAML loaders keep the last value silently: a second ``upstream:`` block would drop
    everything the first one set."""
    seen: set[int] = set()  # aliases may make the node graph loop
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:
        node, where = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(item, f"{where}[{i}]") for i, item in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            lines: dict[object, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                child = f"{where}.{name}" if where else str(name)
                if isinstance(name, str) and name != "<<":
                    line = key.start_mark.line + 1
                    if name in lines:
                        return f"{child}: listed twice (lines {lines[name]} and {line})"
                    lines[name] = line
                stack.append((value, child))
    return ""


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a YAML config file; ConfigError on any problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    loader = yaml.SafeLoader(text)  # one parse: the node graph is checked, then built
    try:
        node = loader.get_single_node()
        twice = _key_listed_twice(node)
        if twice:
            raise ConfigError([f"{path}: {twice}"])
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError([f"{path}: not a usable config: nested too deeply"]) from None
    finally:
        loader.dispose()
    return parse_config(raw, str(path))
