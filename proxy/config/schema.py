"""The gateway's configuration schema: pydantic models, validated once at start-up.

Every model refuses unknown keys and is frozen. Validators raise ValueError with a message
that ``proxy.config.load`` prefixes with the key's path. Units are in the key names
(``_seconds``, ``_bytes``).
"""

from __future__ import annotations

import importlib.util
import ipaddress
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from proxy.auth.routes import DEFAULT_ROUTES, Route, RouteTable
from proxy.auth.tokens import DEFAULT_UPSTREAM_KEY
from proxy.config.cache import CacheConfig
from proxy.config.classes import ClassConfig
from proxy.config.fields import Model as _Model
from proxy.config.fields import NonNegativeFloat, PositiveFloat, PositiveInt
from proxy.config.postgres_url import parse_postgres_url
from proxy.config.secrets import AGENCY_KEY_NAME, SecretRef
from proxy.config.state_url import REDIS_SCHEMES, parse_state_url
from proxy.config.stores import PostgresConfig, RedisConfig, RedisTlsConfig
from proxy.config.tracing import TracingConfig

__all__ = [
    "EVENT_LOOPS",
    "MAX_WORKERS",
    "MISSING_UVLOOP",
    "AuthConfig",
    "CacheConfig",
    "EventLoop",
    "GatewayConfig",
    "LimitConfig",
    "LoggingConfig",
    "MetricsConfig",
    "PostgresConfig",
    "QueueConfig",
    "RedisConfig",
    "RedisTlsConfig",
    "RouteConfig",
    "ServerConfig",
    "TokensConfig",
    "TracingConfig",
    "UpstreamConfig",
    "check_state_url",
    "parse_address",
    "uvloop_installed",
]

# server.event_loop: proxy/server/loops.py runs the one chosen.
EventLoop = Literal["auto", "asyncio", "uvloop"]
EVENT_LOOPS: tuple[EventLoop, ...] = ("auto", "asyncio", "uvloop")
MISSING_UVLOOP = "uvloop is not installed (pip install 'echowin-gateway[fast]')"


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


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
    # A JSON or YAML map of key name to key (proxy/config/keys_file.py), read like a secret.
    keys_file: SecretRef | None = None
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


class MetricsConfig(_Model):
    # Token names as label values at once: the busiest, re-ranked every period; the rest
    # are token="other" (proxy/observe/label_bounds.py). Bounds /metrics at many tokens.
    token_labels: PositiveInt = 100
    token_label_period_seconds: PositiveFloat = 60.0
    # Credential names in the histograms by credential (queue wait, upstream duration);
    # the budget gauges and counters keep every credential.
    credential_labels: PositiveInt = 50


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: bool = True


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
    # Where tokens and their audit log live when not in the state backend: postgresql://.
    token_store: str | None = None
    postgres: PostgresConfig = PostgresConfig()
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
    metrics: MetricsConfig = MetricsConfig()
    routes: tuple[RouteConfig, ...] = ()
    # Budget savers (proxy/cache/): off unless present.
    cache: CacheConfig | None = None
    # OpenTelemetry traces (proxy/observe/tracing.py): off unless present or OTEL_* set.
    tracing: TracingConfig | None = None
    # Classes of service (proxy/config/classes.py; checked against upstream.limits by
    # check_classes once the whole config is read).
    classes: dict[str, ClassConfig] = Field(default_factory=dict)
    default_class: str | None = None

    @field_validator("classes")
    @classmethod
    def _class_names(cls, value: dict[str, ClassConfig]) -> dict[str, ClassConfig]:
        for name in value:
            if not (0 < len(name) <= 64 and name.replace("-", "").replace("_", "").isalnum()):
                raise ValueError(f"{name!r}: names are 1-64 of [A-Za-z0-9_-]")
        return value

    @field_validator("listen", "admin_listen")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("state")
    @classmethod
    def _state(cls, value: str) -> str:
        redis = tuple(f"{scheme}://" for scheme in REDIS_SCHEMES)
        if not value.startswith(("memory://", "sqlite:///", *redis)):
            raise ValueError(
                "must start with memory://, sqlite:///, redis://, rediss://, redis-sentinel://"
                " or redis-cluster://"
            )
        check_state_url(value)
        return value

    @field_validator("token_store")
    @classmethod
    def _token_store(cls, value: str | None) -> str | None:
        if value is not None:
            _require_asyncpg()
            try:
                parse_postgres_url(value)
            except ValueError as exc:
                raise ValueError(str(exc).removeprefix("token_store: ")) from None
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


def _require_asyncpg() -> None:
    if importlib.util.find_spec("asyncpg") is None:
        raise ValueError("postgresql:// needs asyncpg: pip install 'echowin-gateway[postgres]'")


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
