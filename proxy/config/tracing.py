"""The ``tracing:`` section (SPEC §5 "Operators"): OpenTelemetry traces exported over
OTLP/HTTP. Off unless the section is present (and ``enabled``) or the standard
``OTEL_EXPORTER_OTLP_*ENDPOINT`` variables are set; needs the ``otel`` extra."""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from proxy.config.secrets import SecretRef

__all__ = ["MISSING_OTEL", "TracingConfig", "otel_installed", "tracing_from_env"]

MISSING_OTEL = "needs the otel extra: pip install 'echowin-gateway[otel]'"
_FIELD_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
# The variables that switch tracing on without a ``tracing:`` section.
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def otel_installed() -> bool:
    """True when the ``otel`` extra's SDK can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("opentelemetry.sdk") is not None
    except ModuleNotFoundError:  # no opentelemetry package at all
        return False


class TracingConfig(BaseModel):
    """``tracing:``. Unset keys fall back to the standard ``OTEL_*`` variables (read by the
    OpenTelemetry SDK), then to the defaults in config/gateway.reference.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # The OTLP/HTTP traces URL (``http://collector:4318/v1/traces``).
    endpoint: str | None = None
    service_name: str | None = None
    # Of the traces that start here (parent-based: a caller's sampled flag is followed).
    sampling_ratio: float | None = None
    # Sent with every export (a tracing service's API key): secrets, from env or file.
    headers: dict[str, SecretRef] = Field(default_factory=dict)
    timeout_seconds: PositiveFloat = 10.0
    # How long finished spans wait to be exported together, at most.
    schedule_delay_seconds: PositiveFloat = 5.0
    # Finished spans waiting at most; past it new ones are dropped (and counted by the SDK).
    max_queue_size: PositiveInt = 2048

    @model_validator(mode="after")
    def _installed(self) -> TracingConfig:
        if self.enabled and not otel_installed():
            raise ValueError(MISSING_OTEL)
        return self

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL (OTLP/HTTP, e.g. .../v1/traces)")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials; put them under tracing.headers")
        return value

    @field_validator("service_name")
    @classmethod
    def _service_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or len(value) > 128):
            raise ValueError("must be 1-128 characters")
        return value

    @field_validator("sampling_ratio")
    @classmethod
    def _ratio(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or not 0.0 <= value <= 1.0):
            raise ValueError("must be a number from 0 to 1")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, SecretRef]) -> dict[str, SecretRef]:
        for name in value:
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"{name[:64]!r}: not a header field name")
        return value


def tracing_from_env(
    section: TracingConfig | None, environ: Mapping[str, str]
) -> TracingConfig | None:
    """The tracing a gateway runs with: ``section`` when present and enabled; without one,
    the defaults when an ``OTEL_EXPORTER_OTLP_*ENDPOINT`` variable is set (and neither
    ``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none``) and the extra is
    installed; else None."""
    if section is not None:
        return section if section.enabled else None
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    if not any(environ.get(name, "").strip() for name in _ENDPOINT_VARS):
        return None
    return TracingConfig() if otel_installed() else None
