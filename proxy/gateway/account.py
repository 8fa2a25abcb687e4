"""The last step of a request's path: what it cost and how it ended, into the access log
line and the metrics, once per request (answered, refused, or left by its caller)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.auth.client_address import client_address
from proxy.auth.tokens import TokenRecord
from proxy.errors import Reason
from proxy.observe.label_series import ANONYMOUS
from proxy.runtime import Runtime

if TYPE_CHECKING:  # OpenTelemetry is loaded only when tracing is on
    from proxy.observe.tracing import RequestSpan

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""The methods the metrics name; any other is counted as ``OTHER`` (bounded labels)."""


@dataclass(slots=True)
class Exchange:
    """What the access log and the metrics need to know about one request. Times are
    seconds; ``started`` is ``time.perf_counter()`` at its arrival."""

    request_id: str
    started: float
    span: RequestSpan | None = None  # the request's trace span, when tracing is on
    token: TokenRecord | None = None
    route: str = "unmatched"
    credential: str = ""
    upstream_status: int | None = None
    queue_seconds: float = 0.0
    upstream_seconds: float = 0.0
    refusal: Reason | None = None
    bytes_out: int = 0
    client_gone: bool = False
    awaits_continue: bool = False  # the caller holds its body until "100 Continue"
    on_wire: bool = False  # the request's head may have left for echowin
    then: Callable[[], None] | None = None  # called once when the head leaves
    cache: str | None = None  # the response cache's lookup result (proxy/gateway/cached.py)
    sent_at: float = 0.0  # perf_counter() when the exchange with echowin began (0: never)

    def wired(self) -> None:
        self.on_wire = True
        then, self.then = self.then, None
        if then is not None:
            then()


def account(
    rt: Runtime,
    method: str,
    ex: Exchange,
    response: web.StreamResponse | None,
    request: web.BaseRequest | None = None,
) -> None:
    """Count ``ex``, end its span and write its access log line (with the client and user
    agent of ``request``, when given): status 499 (as nginx logs it) when the caller went
    away before its answer was written (``response`` None, or ``ex.client_gone``)."""
    status = response.status if response is not None and not ex.client_gone else 499
    if not ex.bytes_out and status != 499 and isinstance(response, web.Response):
        body = response.body  # an answer the gateway wrote itself: its JSON body
        if isinstance(body, bytes):
            ex.bytes_out = len(body)
    token_name = ex.token.name if ex.token is not None else ANONYMOUS
    total = time.perf_counter() - ex.started
    metrics = rt.metrics
    label = method if method in METHODS else "OTHER"
    metrics.requests.inc(metrics.labels.token(token_name), ex.route, label, str(status))
    if ex.token is not None:
        counts = rt.usage.get(ex.token.id)
        if counts is None:
            counts = rt.usage[ex.token.id] = Counter()
            rt.usage_names[ex.token.id] = ex.token.name
        counts[status] += 1
    metrics.request_duration.observe(total, ex.route)
    span = ex.span
    if span is not None:
        span.end(ex, status, token_name, ex.refusal)
    access = rt.access_log
    if access.enabled:
        peer = agent = None
        if request is not None:
            peer = request.remote
            agent = request.headers.get("User-Agent")
            if rt.trusted_proxies and peer is not None:
                fields = request.headers.getall("X-Forwarded-For", ())
                address = client_address(peer, fields, rt.trusted_proxies)
                peer = peer if address is None else str(address)
        access.request(
            ex.request_id,
            ex.token.id if ex.token is not None else None,
            token_name,
            method,
            ex.route,
            ex.credential or None,
            status,
            ex.upstream_status,
            ex.queue_seconds,
            ex.upstream_seconds,
            total,
            ex.bytes_out,
            ex.refusal,
            ex.cache,
            peer,
            agent,
            span,
        )


__all__ = ["METHODS", "Exchange", "account"]
