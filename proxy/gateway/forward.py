"""Forward: an admitted request to echowin, with the headers echowin gets, through the one
exchange upstream (proxy/upstream.py); the budget told what happened (``Grant.sent`` or
``unsent``); echowin's answer relayed (proxy/gateway/relay.py), or the gateway's own when
echowin's cannot be (unreachable, too slow, its own 429, an upload over the limit)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping

from aiohttp import web
from multidict import CIMultiDict

from proxy.budget.admission import AdmitRequest, Grant, Refusal
from proxy.budget.ratelimit_headers import freeze_until, parse_upstream_quota
from proxy.config import Credential
from proxy.errors import Reason
from proxy.gateway import answers
from proxy.gateway.account import Exchange
from proxy.gateway.gate import Passed
from proxy.gateway.keywatch import readable_codings
from proxy.gateway.relay import relay
from proxy.runtime import Runtime
from proxy.upstream import (
    HOP_BY_HOP,
    UpstreamError,
    UpstreamResponse,
    UpstreamUnreachable,
    connection_tokens,
)

# Client headers that never travel upstream: internal credentials, method and path
# overrides (a scope is decided by the real method and the matched path only: a stack
# that routes on X-Original-URL or X-Rewrite-URL must not see one) and our own control
# headers; and byte ranges: pieces of one answer, each searched for the key alone (see
# proxy/gateway/keywatch.py), could be joined back by the caller into a copy of it.
_DROP_REQUEST = frozenset(
    {
        "range",
        "if-range",
        "authorization",
        "x-api-key",
        "x-agency-key",
        "host",
        "expect",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "x-forwarded-uri",
        "x-gateway-max-wait",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-request-id",
        "content-length",
    }
)
# What never passes: the list above plus the hop-by-hop fields (lower case).
_SKIP_REQUEST = _DROP_REQUEST | HOP_BY_HOP
_CHUNK = 64 * 1024
_UPSTREAM_429 = "echowin refused the request: rate limit exceeded"


class BodyTooLarge(Exception):
    pass


class CappedBody:
    """The request body as a stream of chunks, cut off past ``limit`` bytes.

    ``too_large`` stays set after the cut, because aiohttp may report the aborted upload
    as a connection error rather than re-raising ours.
    """

    __slots__ = ("_request", "limit", "too_large")

    def __init__(self, request: web.Request, limit: int) -> None:
        self._request = request
        self.limit = limit
        self.too_large = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._request.content.iter_chunked(_CHUNK):
            seen += len(chunk)
            if seen > self.limit:
                self.too_large = True
                raise BodyTooLarge
            yield chunk


def upstream_headers(
    request: web.Request, credential: Credential, ex: Exchange, host: str
) -> CIMultiDict[str]:
    """The headers echowin gets, in one pass: Host, the client's end-to-end fields less the
    dropped ones (``Accept: */*`` when it sent none), then the length, X-Forwarded-For/-Proto,
    X-Request-ID, and the real key last."""
    given = request.headers
    named = connection_tokens(given)
    out: CIMultiDict[str] = CIMultiDict()
    out["Host"] = host
    for name, value in given.items():
        low = name.lower()
        if low not in _SKIP_REQUEST and low not in named:
            # Only codings whose bodies the gateway can search for the key (keywatch).
            out.add(name, readable_codings(value) if low == "accept-encoding" else value)
    if "Accept" not in out:
        out["Accept"] = "*/*"
    if request.body_exists:
        length = request.content_length
        if length is not None:
            out["Content-Length"] = str(length)
    peer = request.remote or ""
    prior = given.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    proto = given.get("X-Forwarded-Proto")
    out["X-Forwarded-Proto"] = request.scheme if proto is None else proto
    out["X-Request-ID"] = ex.request_id
    out[credential.header] = credential.secret.reveal()
    return out


async def forward(
    request: web.Request,
    rt: Runtime,
    ex: Exchange,
    passed: Passed,
    grant: Grant,
    admit: AdmitRequest,
) -> web.StreamResponse:
    """``request``, admitted with ``grant``, to echowin and its answer back to the caller."""
    credential = passed.credential
    limit = rt.config.server.max_request_body_bytes
    body = CappedBody(request, limit) if request.body_exists else None
    raw = request.raw_path
    query = raw.find("?")
    path = passed.match.path
    path_qs = path if query < 0 or query == len(raw) - 1 else path + raw[query:]
    sent_at = ex.sent_at = time.perf_counter()
    try:
        upstream = await rt.upstream.send(
            request.method,
            path_qs,
            upstream_headers(request, credential, ex, rt.upstream.host),
            body,
            ex.wired,
        )
    except (UpstreamError, BodyTooLarge) as exc:
        ex.upstream_seconds = time.perf_counter() - sent_at
        if body is not None and body.too_large:
            # echowin saw an incomplete request it cannot act on; it may still count it.
            grant.sent(0, {})
            return answers.body_too_large(ex)
        if isinstance(exc, UpstreamError):
            return _upstream_failed(rt, ex, exc, grant)
        raise
    try:
        ex.upstream_seconds = time.perf_counter() - sent_at
        ex.upstream_status = upstream.status
        grant.sent(upstream.status, upstream.headers)
        if upstream.status == 429:  # the credential is frozen now (see Grant.sent)
            return _upstream_429(ex, upstream, rt.admitter.caller_headers(admit))
        extra = dict(rt.admitter.caller_headers(admit))
        extra["Server-Timing"] = (
            f"queue;dur={ex.queue_seconds * 1000:.3f}, "
            f"upstream;dur={ex.upstream_seconds * 1000:.3f}"
        )
        extra["X-Request-ID"] = ex.request_id
        return await relay(request, upstream, rt.upstream, credential, ex, extra)
    finally:
        upstream.release()  # whatever happened since the answer came: never a leaked connection
        # Counted once the answer is on its way, not on the caller's time.
        metrics = rt.metrics
        label = metrics.labels.credential_now(credential.name)  # bounded: label_series.py
        metrics.upstream_duration.observe(ex.upstream_seconds, label, ex.route)
        metrics.upstream_responses.inc(credential.name, str(upstream.status))


def _upstream_429(
    ex: Exchange, upstream: UpstreamResponse, limits: Mapping[str, str]
) -> web.Response:
    """echowin's own 429 as the gateway's: its body is not relayed, and Retry-After says
    how long the freeze it caused lasts (read from echowin's answer by the same rule)."""
    now = time.time()
    wait = freeze_until(now, parse_upstream_quota(upstream.headers, now)) - now
    # Rounded: "Retry-After: 7" read at now, less now, may come out 7.0000002 (floats).
    refusal = Refusal(Reason.UPSTREAM_429, round(wait, 3), _UPSTREAM_429)
    return answers.limited(ex, refusal, limits)


def _upstream_failed(rt: Runtime, ex: Exchange, exc: UpstreamError, grant: Grant) -> web.Response:
    """No answer from echowin: 502 when it could not be reached (or reset the connection),
    504 when it did not answer in time. The slot goes back when no byte left."""
    rt.metrics.upstream_errors.labels(ex.credential, exc.kind).inc()
    if not exc.sent:
        grant.unsent()
    else:
        grant.sent(0, {})
    if isinstance(exc, UpstreamUnreachable):
        message = "echowin could not be reached"
        return answers.refuse(ex, 502, Reason.UPSTREAM_UNREACHABLE, message)
    message = "echowin did not answer in time"
    return answers.refuse(ex, 504, Reason.UPSTREAM_TIMEOUT, message)


upstream_429 = _upstream_429
upstream_failed = _upstream_failed

__all__ = [
    "BodyTooLarge",
    "CappedBody",
    "forward",
    "upstream_429",
    "upstream_failed",
    "upstream_headers",
]
