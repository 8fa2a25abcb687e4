"""Prometheus metrics: one registry per gateway, never the process-global one.

Labels are bounded: token names (the busiest ``metrics.token_labels``, the rest ``other``:
label_series.py), routes are TEMPLATES (never raw paths or ids), methods and statuses are
few, reasons are enums. Requests without an authenticated token are labelled ``token="-"``.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.errors import REFUSAL_REASONS
from proxy.observe.build import revision
from proxy.observe.label_series import LabelBounds
from proxy.observe.loop_metrics import LoopCounter, LoopHistogram

# Upstream latency buckets in seconds: echowin answers in tens to hundreds of ms.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Queue waits run from nothing to queue.max_wait_seconds (10 s by default, but minutes for a
# batch job are fair): the buckets reach an hour, or the p99 of longer waits would stop at the
# highest bucket and EchowinGatewayQueueWaitNearMax (0.8 x the max wait) could never fire.
_WAIT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
    *(120.0, 300.0, 600.0, 1800.0, 3600.0),
)

CONNECTIONS_REFUSED_HELP = (
    "New connections refused past a listener's bounds (503, closed), by reason:"
    " too_many_connections or too_many_connections_from_client."
)
"""The help of ``echowin_gateway_connections_refused_total``, the gateway's and the
supervisor's alike (proxy/workers/group_admin.py)."""

BudgetSource = Callable[[], Mapping[str, Any]]
QuotaSource = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Exposition:
    """A /metrics answer: its body and the fields that say what it is."""

    body: bytes
    headers: dict[str, str]


_GZIP_MIN_BYTES = 1024  # smaller pages gain nothing from compression


def expose(
    registry: CollectorRegistry, accept: str | None, accept_encoding: str | None
) -> Exposition:
    """``registry``'s metrics in the format ``accept`` asks for (OpenMetrics 1.0 when it
    names application/openmetrics-text, else Prometheus' text format; prometheus_client's
    own choice), gzipped when ``accept_encoding`` allows it."""
    encoder, content_type = choose_encoder(accept or "")
    body = encoder(registry)
    headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
    if len(body) >= _GZIP_MIN_BYTES and _takes_gzip(accept_encoding):
        body = gzip.compress(body, compresslevel=6)
        headers["Content-Encoding"] = "gzip"
    return Exposition(body, headers)


def _takes_gzip(accept_encoding: str | None) -> bool:
    """True when ``accept_encoding`` lists gzip (or ``*``) with a q-value above 0."""
    for item in (accept_encoding or "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        q = params.strip().lower().removeprefix("q=")
        try:
            return not params.strip() or float(q) > 0
        except ValueError:
            return False
    return False


def window_label(per_seconds: float) -> str:
    """A window's label value: its length, e.g. ``3600s``."""
    return f"{per_seconds:g}s"


class BudgetCollector(Collector):
    """Budget gauges read at scrape time from the scheduler's snapshot."""

    def __init__(self, source: BudgetSource, quotas: QuotaSource) -> None:
        self._source = source
        self._quotas = quotas

    def collect(self) -> Iterator[Metric]:
        labels = ["credential", "window"]
        limit = GaugeMetricFamily(
            "echowin_gateway_budget_limit",
            "Sends allowed per window, per credential.",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "echowin_gateway_budget_used",
            "Sends counted in the rolling window now (ours and echowin-reported others').",
            labels=labels,
        )
        remaining = GaugeMetricFamily(
            "echowin_gateway_budget_remaining",
            "Sends still allowed in the window now.",
            labels=labels,
        )
        depth = GaugeMetricFamily(
            "echowin_gateway_queue_depth", "Requests waiting for budget.", labels=["credential"]
        )
        frozen = GaugeMetricFamily(
            "echowin_gateway_frozen_seconds",
            "Seconds until a frozen credential may send again (0 when not frozen).",
            labels=["credential"],
        )
        for credential, lane in self._source().items():
            for w in lane["windows"]:
                key = [credential, window_label(w["per_seconds"])]
                limit.add_metric(key, w["requests"])
                used.add_metric(key, w["used"])
                remaining.add_metric(key, w["remaining"])
            depth.add_metric([credential], lane["queue_depth"])
            frozen.add_metric([credential], lane["frozen_for"])
        yield from (limit, used, remaining, depth, frozen)
        yield from self._token_quotas()

    def _token_quotas(self) -> Iterator[Metric]:
        labels = ["token", "window"]
        limit = GaugeMetricFamily(
            "echowin_gateway_token_quota_limit",
            "A token's own quota (--hourly, --per-minute) per window, by token name.",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "echowin_gateway_token_quota_used",
            "Sends counted against a token's own quota in the rolling window now.",
            labels=labels,
        )
        for token, windows in self._quotas().items():
            for w in windows:
                key = [token, window_label(w.per_seconds)]
                limit.add_metric(key, w.requests)
                used.add_metric(key, w.used)
        yield from (limit, used)


class Metrics:
    """Every metric the gateway exports, registered on its own registry.

    The families are declared by group, in the order they are exposed: process, requests,
    upstream, callers (authentication, in flight, connections), budget, state, config."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.labels = LabelBounds(self)  # first: collected (ranked) before the others
        self._declare_process(r)
        self._declare_requests(r)
        self._declare_upstream(r)
        self._declare_callers(r)
        self._declare_budget(r)
        self._declare_state(r)
        self._declare_config(r)
        # Label children of the other labelled metrics (refusals, auth failures, 429s...),
        # kept: labels() validates and locks on every call. Bounded like the label values.
        self._children: dict[tuple[object, ...], Any] = {}
        self._remaining: dict[str, int] = {}  # echowin_remaining as last set, per credential

    def _declare_process(self, r: CollectorRegistry) -> None:
        self.build_info = Gauge(
            "echowin_gateway_build_info",
            "Build information; always 1.",
            ["version", "revision"],
            registry=r,
        )
        self.build_info.labels(__version__, revision()).set(1)
        # CPU seconds, resident memory, open file descriptors of this process, under the
        # standard process_* names generic dashboards and alerts expect.
        ProcessCollector(registry=r)

    def _declare_requests(self, r: CollectorRegistry) -> None:
        # Updated on every request: plain numbers on the event loop (see loop_metrics).
        self.requests = LoopCounter(
            "echowin_gateway_requests_total",
            "Requests answered by the gateway, by token name, route template, method, status.",
            ["token", "route", "method", "status"],
            r,
        )
        self.request_duration = LoopHistogram(
            "echowin_gateway_request_duration_seconds",
            "Time from request arrival to the last byte of the answer, in seconds.",
            ["route"],
            r,
            _LATENCY_BUCKETS,
        )

    def _declare_upstream(self, r: CollectorRegistry) -> None:
        self.upstream_duration = LoopHistogram(
            "echowin_gateway_upstream_duration_seconds",
            "Time from sending to echowin until its response headers arrived, in seconds.",
            ["credential", "route"],
            r,
            _LATENCY_BUCKETS,
        )
        self.upstream_responses = LoopCounter(
            "echowin_gateway_upstream_responses_total",
            "Responses received from echowin, by credential name and status.",
            ["credential", "status"],
            r,
        )
        self.upstream_errors = Counter(
            "echowin_gateway_upstream_errors_total",
            "Upstream exchanges that failed without a response (timeout, connect, reset).",
            ["credential", "kind"],
            registry=r,
        )

    def _declare_callers(self, r: CollectorRegistry) -> None:
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
        # Counted by the handler in a plain int and read at scrape time: a Gauge's inc and
        # dec take a lock each, twice per request.
        self.in_flight_now = 0
        self.in_flight.set_function(lambda: self.in_flight_now)
        self.connections = Gauge(
            "echowin_gateway_client_connections",
            "Callers' connections to the proxy listener, by state: lobby_idle (no request"
            " yet, or parked between requests), lobby_waiting (a request queued in the"
            " lobby), handler (in aiohttp's request handler).",
            ["state"],
            registry=r,
        )
        self._connection_counts: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)
        for index, state in enumerate(("lobby_idle", "lobby_waiting", "handler")):
            self.connections.labels(state).set_function(
                functools.partial(self._connection_count, index)
            )
        self.connections_refused = Counter(
            "echowin_gateway_connections_refused_total",
            CONNECTIONS_REFUSED_HELP,
            ["reason"],
            registry=r,
        )
        for reason in REFUSAL_REASONS:
            self.connections_refused.labels(reason)

    def _declare_budget(self, r: CollectorRegistry) -> None:
        self.refusals = Counter(
            "echowin_gateway_refusals_total",
            "Requests the gateway refused at once (429; 503 for state_unavailable), by"
            " credential, token name and reason.",
            ["credential", "token", "reason"],
            registry=r,
        )
        self.queue_wait = LoopHistogram(
            "echowin_gateway_queue_wait_seconds",
            "Time admitted requests waited for budget, in seconds (0 when admitted at once).",
            ["credential"],
            r,
            _WAIT_BUCKETS,
        )
        self.upstream_429s = Counter(
            "echowin_gateway_upstream_429_total",
            "429 answers from echowin itself (the gateway's promise is that this stays 0).",
            ["credential"],
            registry=r,
        )
        self.freezes = Counter(
            "echowin_gateway_freezes_total",
            "Times a credential was frozen after an unexpected upstream 429.",
            ["credential"],
            registry=r,
        )
        self.echowin_remaining = Gauge(
            "echowin_gateway_echowin_reported_remaining",
            "X-RateLimit-Remaining as echowin last reported it, per credential.",
            ["credential"],
            registry=r,
        )

    def _declare_state(self, r: CollectorRegistry) -> None:
        self.state_up = Gauge(
            "echowin_gateway_state_backend_up",
            "1 when the state backend answers, 0 while it cannot be reached.",
            ["backend"],
            registry=r,
        )
        self.state_resets = Counter(
            "echowin_gateway_state_resets_total",
            "Times this replica found Redis had lost its data (restarted empty, flushed,"
            " evicted, or failed over without the last writes).",
            registry=r,
        )
        self.state_latency = Histogram(
            "echowin_gateway_state_backend_duration_seconds",
            "Time one state-backend (Redis) operation took, in seconds.",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )

    def _declare_config(self, r: CollectorRegistry) -> None:
        self.queue_max_wait = Gauge(
            "echowin_gateway_queue_max_wait_seconds",
            "queue.max_wait_seconds as configured now: the longest a request may wait.",
            registry=r,
        )
        self.reloads = Counter(
            "echowin_gateway_config_reloads_total",
            "Config reloads (SIGHUP), by result: success or failure (the old config stays).",
            ["result"],
            registry=r,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.last_reload = Gauge(
            "echowin_gateway_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully (start or reload), Unix seconds.",
            registry=r,
        )
        self.last_reload.set_to_current_time()

    def child(self, metric: Counter | Gauge, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per distinct label set."""
        key = (id(metric), *values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def connection_refused(self, reason: str) -> None:
        """A new connection was refused past a listener's bounds (proxy/server/guard.py)."""
        self.child(self.connections_refused, reason).inc()

    def count_connections(self, counts: Callable[[], tuple[int, int, int]]) -> None:
        """Export the proxy listener's connections, ``counts()`` at every scrape."""
        self._connection_counts = counts

    def _connection_count(self, index: int) -> float:
        return self._connection_counts()[index]

    def attach_budget(self, source: BudgetSource, quotas: QuotaSource) -> None:
        """Export the scheduler's budget state and token quotas at every scrape."""
        self.registry.register(BudgetCollector(source, quotas))

    # --- the scheduler's Observer ---------------------------------------------------

    def refused(self, credential: str, token: str, reason: str) -> None:
        self.child(self.refusals, credential, self.labels.token_now(token), reason).inc()

    def waited(self, credential: str, seconds: float) -> None:
        self.queue_wait.observe(seconds, self.labels.credential(credential))

    def upstream_429(self, credential: str) -> None:
        self.child(self.upstream_429s, credential).inc()

    def frozen(self, credential: str) -> None:
        self.child(self.freezes, credential).inc()

    def reported_remaining(self, credential: str, remaining: int) -> None:
        # Called on every answer from echowin; the value changes far less often.
        if self._remaining.get(credential) != remaining:
            self._remaining[credential] = remaining
            self.child(self.echowin_remaining, credential).set(remaining)

    def exposition(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)

    def answer(self, accept: str | None, accept_encoding: str | None) -> Exposition:
        """Every metric as the scraper asked: see :func:`expose`."""
        return expose(self.registry, accept, accept_encoding)
