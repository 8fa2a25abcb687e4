"""OpenTelemetry tracing (the ``otel`` extra; docs/observability.md "Tracing").

Imported only when tracing is on (proxy/runtime.py opens it): a gateway without the extra
never loads OpenTelemetry, and one with tracing off pays nothing on its requests.

One server span per proxied request, continuing the caller's ``traceparent`` (W3C Trace
Context); the request to echowin carries the server span's context. The queue wait and
the exchange with echowin become child spans once the answer is known, from the times the
access log measures (no span is made current: nothing here touches contextvars). Spans
are exported over OTLP/HTTP in batches, from the SDK's own thread.

Attributes follow OpenTelemetry's HTTP semantic conventions; the gateway's own are under
``echowin_gateway.``. No header is copied whole into a span: the echowin key and the
caller's token never reach one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

__all__ = ["DEFAULT_SERVICE_NAME", "RequestSpan", "TraceSettings", "TracedExchange", "Tracing"]

DEFAULT_SERVICE_NAME = "echowin-gateway"
USER_AGENT_MAX = 200
"""Characters of ``User-Agent`` kept (in spans and in the access log)."""
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT"})
_CONTEXT_FIELDS = ("traceparent", "tracestate")


class TraceSettings(Protocol):
    """The ``tracing:`` section (proxy.config.TracingConfig)."""

    @property
    def endpoint(self) -> str | None: ...
    @property
    def service_name(self) -> str | None: ...
    @property
    def sampling_ratio(self) -> float | None: ...
    @property
    def timeout_seconds(self) -> float: ...
    @property
    def schedule_delay_seconds(self) -> float: ...
    @property
    def max_queue_size(self) -> int: ...


class TracedExchange(Protocol):
    """What a request's end tells its span (proxy.gateway.account.Exchange); seconds, and
    ``sent_at`` on ``time.perf_counter()``'s clock (0 when nothing went to echowin)."""

    request_id: str
    route: str
    credential: str
    upstream_status: int | None
    queue_seconds: float
    upstream_seconds: float
    sent_at: float
    cache: str | None


class Tracing:
    """The tracer provider, its batching exporter and the W3C propagator, for one
    process. Unset settings fall back to the SDK's ``OTEL_*`` variables."""

    def __init__(
        self,
        settings: TraceSettings,
        headers: Mapping[str, str],
        environ: Mapping[str, str],
        upstream: tuple[str, int],
    ) -> None:
        name = settings.service_name or environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
        ratio = settings.sampling_ratio
        self.provider = TracerProvider(
            sampler=None if ratio is None else ParentBased(TraceIdRatioBased(ratio)),
            resource=Resource.create({SERVICE_NAME: name}),
        )
        exporter = OTLPSpanExporter(
            endpoint=settings.endpoint,
            headers=dict(headers) or None,
            timeout=settings.timeout_seconds,
        )
        queue = settings.max_queue_size
        self.processor = BatchSpanProcessor(
            exporter,
            max_queue_size=queue,
            schedule_delay_millis=settings.schedule_delay_seconds * 1000,
            max_export_batch_size=min(512, queue),
            export_timeout_millis=settings.timeout_seconds * 1000,
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("echowin-gateway")
        self.propagator = TraceContextTextMapPropagator()
        self.upstream = upstream

    def begin(
        self,
        method: str,
        path: str,
        fields: CIMultiDictProxy[str],
        scheme: str,
        host: str,
        client: str | None,
        version: str,
        arrived: float | None = None,
    ) -> RequestSpan:
        """Start the server span of a request (``path`` without its query), continuing the
        trace its ``traceparent`` names, if any; at ``arrived`` (``time.perf_counter()``)
        when it came earlier than now (held in the lobby's queue before its handler ran)."""
        known = method in _METHODS
        attributes: dict[str, AttributeValue] = {
            "http.request.method": method if known else "_OTHER",
            "url.path": path,
            "url.scheme": scheme,
            "network.protocol.version": version,
        }
        if not known:
            attributes["http.request.method_original"] = method[:32]
        server, _, port = (
            host.rpartition(":") if host.rpartition(":")[2].isdigit() else (host, "", "")
        )
        attributes["server.address"] = server or host
        if port:
            attributes["server.port"] = int(port)
        if client is not None:
            attributes["client.address"] = client
        agent = fields.get("User-Agent")
        if agent:
            attributes["user_agent.original"] = agent[:USER_AGENT_MAX]
        parent = self.propagator.extract(fields)
        start = time.time_ns()
        if arrived is not None:
            start -= int((time.perf_counter() - arrived) * 1e9)
        span = self.tracer.start_span(
            method, context=parent, kind=SpanKind.SERVER, attributes=attributes, start_time=start
        )
        return RequestSpan(self, span, method, start)

    def shutdown(self) -> None:
        """Export what waits (bounded by ``timeout_seconds``) and stop; blocks: call it
        off the event loop."""
        self.provider.shutdown()


class RequestSpan:
    """A request's server span, ended (with its children) by :meth:`end`."""

    __slots__ = ("_method", "_start", "_tracing", "span", "span_id", "trace_id")

    def __init__(self, tracing: Tracing, span: Span, method: str, start: int) -> None:
        self._tracing = tracing
        self._method = method
        self._start = start
        self.span = span
        context = span.get_span_context()
        self.trace_id = format(context.trace_id, "032x")
        self.span_id = format(context.span_id, "016x")

    def outgoing(self, fields: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        """``fields`` with the caller's trace context replaced by this span's (what
        echowin is sent; proxy/gateway/forward.py passes both fields on)."""
        out = CIMultiDict(fields)
        for name in _CONTEXT_FIELDS:
            out.popall(name, None)
        self._tracing.propagator.inject(out, context=trace.set_span_in_context(self.span))
        return out

    def end(self, ex: TracedExchange, status: int, token_name: str, refusal: str | None) -> None:
        """Close the span of a request answered with ``status`` (499: its caller left)."""
        span = self.span
        if not span.is_recording():
            span.end()
            return
        now = time.perf_counter()
        stamp = time.time_ns()
        if ex.sent_at:
            self._children(ex, lambda at: stamp - int((now - at) * 1e9))
        span.update_name(f"{self._method} {ex.route}")
        span.set_attributes(
            {
                "http.route": ex.route,
                "http.response.status_code": status,
                "echowin_gateway.request_id": ex.request_id,
                "echowin_gateway.token.name": token_name,
            }
        )
        if ex.credential:
            span.set_attribute("echowin_gateway.credential", ex.credential)
        if ex.cache is not None:
            span.set_attribute("echowin_gateway.cache", ex.cache)
        if refusal is not None:
            span.set_attribute("echowin_gateway.refusal", str(refusal))
        if status >= 500:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))
        span.end(stamp)

    def _children(self, ex: TracedExchange, epoch_ns: _Clock) -> None:
        """The queue wait and the exchange with echowin, after the fact."""
        tracing = self._tracing
        parent = trace.set_span_in_context(self.span)
        sent = epoch_ns(ex.sent_at)
        # The budget's clock is not this one: the wait is kept within the server span.
        began = max(self._start, sent - int(ex.queue_seconds * 1e9))
        queued = tracing.tracer.start_span("queue wait", context=parent, start_time=began)
        queued.set_attribute("echowin_gateway.route", ex.route)
        queued.end(sent)
        host, port = tracing.upstream
        upstream = tracing.tracer.start_span(
            f"{self._method} {ex.route}",
            context=parent,
            kind=SpanKind.CLIENT,
            start_time=sent,
            attributes={
                "http.request.method": self._method if self._method in _METHODS else "_OTHER",
                "server.address": host,
                "server.port": port,
                "echowin_gateway.credential": ex.credential,
            },
        )
        if ex.upstream_status is not None:
            upstream.set_attribute("http.response.status_code", ex.upstream_status)
            if ex.upstream_status >= 500:
                upstream.set_attribute("error.type", str(ex.upstream_status))
                upstream.set_status(Status(StatusCode.ERROR))
        else:
            upstream.set_attribute("error.type", "no_answer")
            upstream.set_status(Status(StatusCode.ERROR))
        upstream.end(sent + int(ex.upstream_seconds * 1e9))


def _host_port(host: str) -> tuple[str, int | None]:
    """``Host`` as (address, port): ``[::1]:8080`` is ``("::1", 8080)``."""
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit():
        name, port = host, ""
    return name.strip("[]"), int(port) if port else None


class _Clock(Protocol):
    def __call__(self, at: float, /) -> int: ...
