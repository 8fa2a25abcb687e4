"""Prometheus metrics: one registry per gateway, never the process-global one.

Labels are bounded: token names come from the token store, routes are TEMPLATES (never
raw paths or ids), methods and statuses are few, reasons are enums. Requests without an
authenticated token are labelled ``token="-"``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy import __version__

ANONYMOUS = "-"

# Upstream latency buckets in seconds: echowin answers in tens to hundreds of ms.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric the gateway exports, registered on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Gauge(
            "echowin_gateway_build_info", "Build information; always 1.", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        self.requests = Counter(
            "echowin_gateway_requests_total",
            "Requests answered by the gateway, by token name, route template, method, status.",
            ["token", "route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "echowin_gateway_request_duration_seconds",
            "Time from request arrival to the last byte of the answer, in seconds.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "echowin_gateway_upstream_duration_seconds",
            "Time from sending to echowin until its response headers arrived, in seconds.",
            ["credential", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_responses = Counter(
            "echowin_gateway_upstream_responses_total",
            "Responses received from echowin, by credential name and status.",
            ["credential", "status"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "echowin_gateway_upstream_errors_total",
            "Upstream exchanges that failed without a response (timeout, connect, reset).",
            ["credential", "kind"],
            registry=r,
        )
        self.auth_failures = Counter(
            "echowin_gateway_auth_failures_total",
            "Requests refused with 401, by reason.",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "echowin_gateway_in_flight_requests",
            "Proxied requests currently being handled.",
            registry=r,
        )

    def exposition(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
