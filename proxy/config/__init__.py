"""The gateway's configuration: one YAML file, validated once at start-up.

``schema`` holds the pydantic models, ``load`` reads the YAML and turns validation errors
into lines that name the key, ``secrets`` resolves ``{env: NAME}`` / ``{file: PATH}``
references into values whose repr never shows them, ``state_url`` parses ``state:``.
The names other packages use are re-exported here.
"""

from proxy.config.errors import ConfigError
from proxy.config.load import load_config, parse_config, unshared_state, with_state
from proxy.config.schema import (
    EVENT_LOOPS,
    MAX_WORKERS,
    MISSING_UVLOOP,
    AuthConfig,
    CacheConfig,
    EventLoop,
    GatewayConfig,
    LimitConfig,
    LoggingConfig,
    MetricsConfig,
    PostgresConfig,
    QueueConfig,
    RedisConfig,
    RouteConfig,
    ServerConfig,
    TokensConfig,
    TracingConfig,
    UpstreamConfig,
    check_state_url,
    parse_address,
    uvloop_installed,
)
from proxy.config.secrets import (
    AGENCY_KEY_NAME,
    Credential,
    Secret,
    SecretRef,
    Secrets,
    file_key_names,
    resolve_secrets,
)
from proxy.config.tracing import tracing_from_env

__all__ = [
    "AGENCY_KEY_NAME",
    "EVENT_LOOPS",
    "MAX_WORKERS",
    "MISSING_UVLOOP",
    "AuthConfig",
    "CacheConfig",
    "ConfigError",
    "Credential",
    "EventLoop",
    "GatewayConfig",
    "LimitConfig",
    "LoggingConfig",
    "MetricsConfig",
    "PostgresConfig",
    "QueueConfig",
    "RedisConfig",
    "RouteConfig",
    "Secret",
    "SecretRef",
    "Secrets",
    "ServerConfig",
    "TokensConfig",
    "TracingConfig",
    "UpstreamConfig",
    "check_state_url",
    "file_key_names",
    "load_config",
    "parse_address",
    "parse_config",
    "resolve_secrets",
    "tracing_from_env",
    "unshared_state",
    "uvloop_installed",
    "with_state",
]
