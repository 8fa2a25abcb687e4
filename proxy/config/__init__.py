"""The gateway's configuration: one YAML file, validated once at start-up.

Validation is pydantic's; this module only turns its errors into lines that name the
key (``upstream.limits[0].requests: must be a positive integer, got "abc"``). Secrets
are never inline: a secret is ``{env: NAME}`` or ``{file: PATH}`` and is resolved by
:func:`resolve_secrets` into :class:`Secret` values whose repr never shows the value.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.auth.routes import DEFAULT_ROUTES, Route, RouteTable
from proxy.auth.tokens import DEFAULT_UPSTREAM_KEY
from proxy.config.state_url import parse_state_url

AGENCY_KEY_NAME = "agency"

# server.event_loop: proxy/server/loops.py runs the one chosen.
EventLoop = Literal["auto", "asyncio", "uvloop"]
EVENT_LOOPS: tuple[EventLoop, ...] = ("auto", "asyncio", "uvloop")
MISSING_UVLOOP = "uvloop is not installed (pip install 'echowin-gateway[fast]')"


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _number(value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError("must be a number >= 0" if allow_zero else "must be a positive number")
    return float(value)


PositiveInt = Annotated[int, BeforeValidator(_positive_int)]
PositiveFloat = Annotated[float, BeforeValidator(lambda v: _number(v, allow_zero=False))]
NonNegativeFloat = Annotated[float, BeforeValidator(lambda v: _number(v, allow_zero=True))]


class ConfigError(Exception):
    """A configuration that cannot be used; ``lines`` each name one offending key."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class Secret:
    """A secret value that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_encoded", "_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self._encoded = value.encode()
        self.source = source  # e.g. "env:ECHOWIN_API_KEY": safe to show

    def reveal(self) -> str:
        """The secret itself: only for the one place that puts it on the wire."""
        return self._value

    def reveal_bytes(self) -> bytes:
        """The secret as bytes (UTF-8): only to look for it in what comes back."""
        return self._encoded

    def __repr__(self) -> str:
        return f"Secret(<{self.source}>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Model):
    """Where a secret comes from: exactly one of ``env`` or ``file``."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("must be {env: NAME} or {file: PATH}, exactly one")
        return self

    def resolve(self, key: str, environ: Mapping[str, str]) -> Secret:
        """Read the secret; raises ConfigError naming ``key`` and the variable or file.

        The variable's name or the file's path is shown (in errors, and as the Secret's
        source) only when it looks like one: a key pasted where the name goes must not be
        echoed back."""
        if self.env is not None:
            env = self.env if _ENV_NAME.fullmatch(self.env) else f"named at {key}.env"
            value = environ.get(self.env, "")
            if not value.strip():
                raise ConfigError([f"{key}: environment variable {env} is not set or empty"])
            return Secret(value.strip(), f"env:{env}")
        assert self.file is not None
        file = self.file if "/" in self.file else f"named at {key}.file"
        try:
            value = Path(self.file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError([f"{key}: cannot read secret file {file}: {reason}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{key}: secret file {file} is not UTF-8 text"]) from None
        if not value:
            raise ConfigError([f"{key}: secret file {file} is empty"])
        return Secret(value, f"file:{file}")


# An environment variable's name as people write them (upper case, digits, underscores).
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")


class LimitConfig(_Model):
    """One rolling window: at most ``requests`` sends in any ``per_seconds`` seconds."""

    requests: PositiveInt
    per_seconds: PositiveFloat


def _default_limits() -> tuple[LimitConfig, ...]:
    return (LimitConfig(requests=1000, per_seconds=3600), LimitConfig(requests=100, per_seconds=60))


class UpstreamConfig(_Model):
    base_url: str = "https://echo.win"
    api_key: SecretRef = SecretRef(env="ECHOWIN_API_KEY")
    agency_key: SecretRef | None = None
    extra_keys: dict[str, SecretRef] = Field(default_factory=dict)
    timeout_seconds: PositiveFloat = 30.0
    connect_timeout_seconds: PositiveFloat = 5.0
    max_connections: PositiveInt = 100
    limits: tuple[LimitConfig, ...] = Field(default_factory=_default_limits, min_length=1)
    window_guard_seconds: NonNegativeFloat = 0.25

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        from yarl import URL

        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http(s) URL")
        if url.query_string or url.fragment:
            raise ValueError("must not carry a query or fragment")
        return value.rstrip("/")

    @field_validator("extra_keys")
    @classmethod
    def _extra_key_names(cls, value: dict[str, SecretRef]) -> dict[str, SecretRef]:
        for name in value:
            if name in (DEFAULT_UPSTREAM_KEY, AGENCY_KEY_NAME):
                raise ValueError(f"{name!r} is reserved; pick another name")
            if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
                raise ValueError(f"{name!r}: names are 1-64 of [A-Za-z0-9_-]")
        return value


class QueueConfig(_Model):
    max_wait_seconds: NonNegativeFloat = 10.0
    max_depth: PositiveInt = 10_000
    max_depth_per_token: PositiveInt = 1_000


MAX_WORKERS = 64


def _workers(value: object) -> int | str:
    """``server.workers``: 1-64, or ``auto`` (``0`` is the same): one per CPU."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_WORKERS:
        raise ValueError(f"must be an integer 1-{MAX_WORKERS}, or auto (0): one per CPU")
    return value


def _event_loop(value: object) -> object:
    """``server.event_loop``: naming uvloop needs it installed (the ``fast`` extra)."""
    if value == "uvloop" and not uvloop_installed():
        raise ValueError(MISSING_UVLOOP)
    return value


class ServerConfig(_Model):
    max_request_body_bytes: PositiveInt = 10 * 1024 * 1024
    shutdown_grace_seconds: NonNegativeFloat = 10.0
    # Proxy processes sharing the listen port (SO_REUSEPORT); see proxy/workers/supervisor.py.
    workers: Annotated[int | Literal["auto"], BeforeValidator(_workers)] = 1
    # asyncio's loop or uvloop (proxy/server/loops.py); auto: uvloop when it is installed.
    event_loop: Annotated[EventLoop, BeforeValidator(_event_loop)] = "auto"
    # Hostile callers (docs/security.md): a connection that has not sent a whole request
    # head within this many seconds of its first byte (or of the connection) is closed
    # (nginx client_header_timeout, HAProxy timeout http-request).
    request_head_timeout_seconds: PositiveFloat = 10.0
    # An idle keep-alive connection (no request under way) is closed after this.
    keepalive_timeout_seconds: PositiveFloat = 75.0
    # Open connections at once, on each listener of one process, and from one peer address
    # (a peer in trusted_proxies is exempt: it carries many clients). Past either, a new
    # connection gets 503 JSON and is closed.
    max_connections: PositiveInt = 10_000
    max_connections_per_client: PositiveInt = 512
    # Proxies (CIDRs) whose X-Forwarded-For names the client; empty: the peer is the client.
    trusted_proxies: tuple[str, ...] = ()

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP address or CIDR") from None
        return value

    @model_validator(mode="after")
    def _per_client_within_total(self) -> ServerConfig:
        if self.max_connections_per_client > self.max_connections:
            raise ValueError(
                "max_connections_per_client must not exceed max_connections "
                f"({self.max_connections_per_client} > {self.max_connections})"
            )
        return self


class AuthConfig(_Model):
    # Failed authentications from one client address (a leaky bucket: aiolimiter): past
    # it, 429 auth_throttled with no token lookup. Successful ones are not counted.
    failures_per_client: LimitConfig = LimitConfig(requests=20, per_seconds=60)
    # Client addresses tracked at once (least recently failing forgotten first).
    max_clients_tracked: PositiveInt = 10_000


class TokensConfig(_Model):
    cache_ttl_seconds: NonNegativeFloat = 5.0
    cache_size: PositiveInt = 10_000


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: bool = True


class RedisConfig(_Model):
    """Connection details for ``state: redis://...`` (ignored by other backends)."""

    password: SecretRef | None = None
    key_prefix: str = "egw:"
    timeout_seconds: PositiveFloat = 0.5

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or len(value) > 64 or not value.isprintable() or " " in value:
            raise ValueError("must be 1-64 printable characters without spaces")
        return value


class RouteConfig(_Model):
    """An extra route, or a new scope for a default one (same method and path)."""

    method: str
    path: str
    scope: str

    @model_validator(mode="after")
    def _valid_route(self) -> RouteConfig:
        self.route()  # its ValueError names the field; pydantic adds routes[i]
        return self

    def route(self) -> Route:
        return Route(method=self.method.upper(), template=self.path, scope=self.scope)


class GatewayConfig(_Model):
    listen: str = "0.0.0.0:8080"
    admin_listen: str = "127.0.0.1:9090"
    admin_token: SecretRef | None = SecretRef(env="GATEWAY_ADMIN_TOKEN")
    state: str = "sqlite:///var/lib/echowin-gateway/state.db"
    redis: RedisConfig = RedisConfig()
    # When the shared state (Redis) fails: "closed" answers 503; "local" carries on with
    # 1/replicas of every limit per replica, so the sum stays within echowin's.
    on_state_failure: Literal["closed", "local"] = "local"
    replicas: PositiveInt = 1
    upstream: UpstreamConfig = UpstreamConfig()
    queue: QueueConfig = QueueConfig()
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    tokens: TokensConfig = TokensConfig()
    logging: LoggingConfig = LoggingConfig()
    routes: tuple[RouteConfig, ...] = ()

    @field_validator("listen", "admin_listen")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("state")
    @classmethod
    def _state(cls, value: str) -> str:
        if not value.startswith(("memory://", "sqlite:///", "redis://", "rediss://")):
            raise ValueError("must start with memory://, sqlite:///, redis:// or rediss://")
        check_state_url(value)
        return value

    def route_table(self) -> RouteTable:
        """The default routes with this config's extra or re-scoped ones."""
        extra: dict[tuple[str, str], int] = {}
        for index, entry in enumerate(self.routes):
            key = (entry.method.upper(), entry.path)
            first = extra.setdefault(key, index)
            if first != index:  # two scopes for one route: neither may silently win
                raise ValueError(
                    f"routes[{index}]: {key[0]} {key[1]} is listed twice (also routes[{first}])"
                )
        routes = [r for r in DEFAULT_ROUTES if (r.method, r.template) not in extra]
        routes += [entry.route() for entry in self.routes]
        return RouteTable(routes)

    def listen_address(self) -> tuple[str, int]:
        return parse_address(self.listen)

    def admin_address(self) -> tuple[str, int]:
        return parse_address(self.admin_listen)


def check_state_url(value: str) -> None:
    """The checks ``serve`` makes when it opens the state, made up front: ValueError (its
    message without the ``state:`` prefix, which the error line adds) for a URL it would
    refuse. Messages never repeat the URL, which may carry a password."""
    try:
        parse_state_url(value)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("state: ")) from None


def parse_address(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError otherwise."""
    host, sep, port_text = value.rpartition(":")
    digits = port_text.isascii() and port_text.isdigit()  # "²".isdigit() too; int() refuses it
    if not sep or not host or not digits or not 0 < int(port_text) < 65536:
        raise ValueError('must be "host:port" with a port in 1-65535')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    return host, int(port_text)


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


# --- secrets --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credential:
    """One upstream echowin credential; each has its own budget."""

    name: str  # "default", "agency" or an extra_keys name: safe to show
    header: str  # "X-API-Key" or "X-AGENCY-KEY"
    secret: Secret


@dataclass(frozen=True, slots=True)
class Secrets:
    credentials: Mapping[str, Credential]
    admin_token: Secret | None
    state_password: Secret | None = None

    def team_key_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.credentials if n != AGENCY_KEY_NAME)


def resolve_secrets(config: GatewayConfig, environ: Mapping[str, str] | None = None) -> Secrets:
    """Read every secret the config names; ConfigError lists each one that is missing."""
    env = os.environ if environ is None else environ
    up = config.upstream
    wanted: list[tuple[str, str, str, SecretRef]] = [
        (DEFAULT_UPSTREAM_KEY, "X-API-Key", "upstream.api_key", up.api_key)
    ]
    if up.agency_key is not None:
        wanted.append((AGENCY_KEY_NAME, "X-AGENCY-KEY", "upstream.agency_key", up.agency_key))
    for name, ref in up.extra_keys.items():
        wanted.append((name, "X-API-Key", f"upstream.extra_keys.{name}", ref))
    errors: list[str] = []
    credentials: dict[str, Credential] = {}
    for name, header, key, ref in wanted:
        try:
            credentials[name] = Credential(name, header, ref.resolve(key, env))
        except ConfigError as exc:
            errors.extend(exc.lines)
    admin: Secret | None = None
    if config.admin_token is not None:
        try:
            admin = config.admin_token.resolve("admin_token", env)
        except ConfigError:
            admin = None  # the admin API stays closed; the gateway itself still runs
    password: Secret | None = None
    if config.redis.password is not None and config.state.startswith(("redis://", "rediss://")):
        try:
            password = config.redis.password.resolve("redis.password", env)
        except ConfigError as exc:
            errors.extend(exc.lines)
    if errors:
        raise ConfigError(errors)
    return Secrets(credentials=credentials, admin_token=admin, state_password=password)
