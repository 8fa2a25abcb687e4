"""Loading the configuration: YAML read once (a key listed twice is refused with its line
numbers), validated by the schema, every problem turned into one ``ConfigError`` line that
names the key (``upstream.limits[0].requests: must be a positive integer, got "abc"``).
Values of keys that may hold a secret are never echoed."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from proxy.config.classes import check_classes
from proxy.config.errors import ConfigError
from proxy.config.schema import GatewayConfig
from proxy.config.secrets import SecretRef
from proxy.config.state_url import REDIS_SCHEMES, parse_redis_url

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
}


_NOT_INLINE = "must be {env: NAME} or {file: PATH}, never inline"

# Keys whose values may be a secret pasted inline by mistake: never echo their input.
_SECRET_KEYS = frozenset(
    {"api_key", "agency_key", "extra_keys", "admin_token", "state", "token_store", "password"}
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
    if kind == "literal_error":
        message = f"must be one of {error.get('ctx', {}).get('expected', 'the allowed values')}"
    if kind == "extra_forbidden" and loc and isinstance(loc[-1], str):
        message = "unknown key" + _suggestion(loc[-1], _keys_at(loc[:-1]))
    if message is None:
        message = str(error["msg"]).removeprefix("Value error, ")
    line = f"{_loc(loc)}: {message}"
    secretish = any(part in _SECRET_KEYS for part in loc)
    if kind not in ("missing", "extra_forbidden") and "input" in error and not secretish:
        shown = error["input"]
        if isinstance(shown, str | int | float | bool) or shown is None:
            line += f", got {_show(shown)}"
    return line


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the schema takes at ``loc`` (a path of mapping keys and list indexes); []
    where it cannot tell (a map of names, such as ``upstream.extra_keys``)."""
    model: Any = GatewayConfig
    for part in loc:
        if isinstance(part, int):
            continue
        is_model = isinstance(model, type) and issubclass(model, BaseModel)
        field = model.model_fields.get(part) if is_model else None
        if field is None:
            return []
        model = _model_in(field.annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _model_in(annotation: Any) -> Any:
    """The pydantic model an annotation holds (``X``, ``X | None``, ``list[X]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None and get_origin(annotation) is not dict:
            return found
    return None


def _suggestion(given: str, known: list[str]) -> str:
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


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
    if problem := _cache_routes(config):
        raise ConfigError([problem])
    if problems := check_classes(config):
        raise ConfigError(problems)
    if problem := _shared_address(config) or _redis_problem(config):
        raise ConfigError([problem])
    if config.server.workers != 1 and (problem := unshared_state(config, "server.workers")):
        raise ConfigError([problem])
    return config


def _cache_routes(config: GatewayConfig) -> str:
    """Why ``cache.routes`` names a route the gateway does not forward GET on ("" if not)."""
    if config.cache is None:
        return ""
    gets = {r.template for r in config.route_table().routes if r.method == "GET"}
    for template in config.cache.routes:
        if template not in gets:
            return f"cache.routes: {template!r} is not a GET route of the route table"
    return ""


def _redis_problem(config: GatewayConfig) -> str:
    """Why ``redis:`` does not fit ``state`` ("" when it does): ``redis.tls`` needs a TLS
    URL; a user name in the URL and ``redis.username`` must agree."""
    scheme = config.state.partition("://")[0].lower()
    if scheme not in REDIS_SCHEMES:
        return ""
    if config.redis.tls is not None and not scheme.startswith("rediss"):
        return f"redis.tls: needs a TLS state URL (rediss{scheme.removeprefix('redis')}://...)"
    address = parse_redis_url(config.state)
    tls = config.redis.tls
    if address.shape == "cluster" and tls is not None and tls.server_name is not None:
        return (
            "redis.tls.server_name: a cluster's nodes are checked by the names they announce;"
            " leave it out (or set redis.tls.check_hostname: false)"
        )
    in_url = address.username
    if in_url is not None and config.redis.username not in (None, in_url):
        return "redis.username: differs from the user name in the state URL"
    return ""


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
        changed = GatewayConfig.model_validate({**config.model_dump(), "state": state})
    except ValidationError as exc:
        raise ConfigError(_error_lines(exc)) from None
    if problem := _redis_problem(changed):
        raise ConfigError([problem])
    return changed


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


_QUOTED_VALUE = re.compile(r"""^\s*(?:-\s+|[^#'"]*?:\s+)(["'])(.*)$""")


def _unclosed_quote(text: str, upto: int) -> int | None:
    """The first line (1-based, at most ``upto``) whose value opens a quote that the line
    does not close, or None. A quoted scalar may span lines in YAML, so PyYAML reports an
    unclosed one where it stopped making sense, often lines later."""
    for number, line in enumerate(text.splitlines()[:upto], start=1):
        match = _QUOTED_VALUE.match(line)
        if match is None:
            continue
        quote, rest = match.groups()
        if quote == '"':  # escapes: \\ and \" close nothing
            rest = rest.replace("\\\\", "").replace('\\"', "")
        else:  # '' is a quote inside single quotes
            rest = rest.replace("''", "")
        if quote not in rest:
            return number
    return None


def _yaml_where(exc: yaml.YAMLError, text: str) -> str:
    """Where a YAML error is, and what: an unclosed quote or bracket is reported by PyYAML
    where it gave up (often the end of the file), so the place it opened (an unclosed
    quote's line, or the error's context mark) is named first. Never the offending text
    itself: it could be a pasted secret."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return ""
    what = " ".join(part for part in (exc.context, exc.problem) if part)
    start, end = exc.context_mark, exc.problem_mark
    quoted = _unclosed_quote(text, end.line + 1) if end is not None else None
    if quoted is not None and end is not None:
        return (
            f" at line {quoted}: a quote opened there is not closed on its line"
            f" (PyYAML: {what}, at line {end.line + 1})"
        )
    if start is not None and end is not None and start.line != end.line:
        return (
            f" at line {start.line + 1}, column {start.column + 1}: {what}"
            f" (noticed at line {end.line + 1})"
        )
    mark = end or start
    if mark is None:
        return f": {what}" if what else ""
    return f" (line {mark.line + 1}, column {mark.column + 1}): {what}"


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
        raise ConfigError([f"{path}: not valid YAML{_yaml_where(exc, text)}"]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError([f"{path}: not a usable config: nested too deeply"]) from None
    finally:
        loader.dispose()
    return parse_config(raw, str(path))
