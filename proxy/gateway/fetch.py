"""A cacheable GET's trip to echowin, as one flight that identical callers share
(proxy/gateway/cached.py): admitted by the budget under the first caller's token, sent,
and echowin's whole answer read and watched for the key (relay.watched), so that it can be
shared and kept. What the flight could not share it hands to its first caller alone: an
answer too large to hold (relayed as it streams), or the gateway's own refusal or error,
with why a stale copy could stand in for it."""

from __future__ import annotations

import time
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from proxy.budget.admission import AdmitRequest, Grant, Held, Refusal
from proxy.cache.control import answer_ttl, must_revalidate
from proxy.cache.keys import keyed_vary
from proxy.cache.store import Answer
from proxy.cache.trip import Fetched
from proxy.errors import Reason
from proxy.gateway import answers
from proxy.gateway.account import Exchange
from proxy.gateway.forward import upstream_429, upstream_failed, upstream_headers
from proxy.gateway.gate import Passed
from proxy.gateway.keywatch import Unreadable
from proxy.gateway.relay import watched
from proxy.runtime import Runtime
from proxy.upstream import UpstreamError, UpstreamResponse, UpstreamTimeout, UpstreamUnreachable

__all__ = ["Fetched", "fetch"]

# Why a stale copy stands in (Cache-Status ``detail``), by the refusal it replaces.
STALE_FOR = {
    Reason.UPSTREAM_BUDGET: "stale-budget",
    Reason.QUEUE_FULL: "stale-budget",
    Reason.UPSTREAM_FROZEN: "stale-frozen",
    Reason.UPSTREAM_429: "stale-frozen",
    Reason.STATE_UNAVAILABLE: "stale-state",
}


async def fetch(
    request: web.Request,
    rt: Runtime,
    ex: Exchange,
    passed: Passed,
    admit: AdmitRequest,
    held: Held | None,
) -> Fetched:
    """One flight: admitted under ``admit`` (``held``: the lobby's place, if any), sent,
    its answer read whole when it fits the cache's entry bound."""
    admitted = await rt.admitter.admit(admit, held)
    limits = rt.admitter.caller_headers(admit)
    if isinstance(admitted, Refusal):
        stale = STALE_FOR.get(admitted.reason, "")
        return Fetched(refusal=answers.limited(ex, admitted, limits), stale=stale, limits=limits)
    ex.queue_seconds = admitted.queued_seconds
    try:
        return await _exchange(request, rt, ex, passed, admitted, limits)
    except BaseException:
        # As the handler does for forward(): a head that may have left spends the slot.
        if ex.on_wire:
            admitted.sent(0, {})
        else:
            admitted.unsent()
        raise


async def _exchange(
    request: web.Request,
    rt: Runtime,
    ex: Exchange,
    passed: Passed,
    grant: Grant,
    limits: Mapping[str, str],
) -> Fetched:
    credential = passed.credential
    raw = request.raw_path
    query = raw.find("?")
    path = passed.match.path
    path_qs = path if query < 0 or query == len(raw) - 1 else path + raw[query:]
    sent_at = ex.sent_at = time.perf_counter()
    headers = upstream_headers(request, credential, ex, rt.upstream.host)
    try:
        upstream = await rt.upstream.send("GET", path_qs, headers, None, ex.wired)
    except UpstreamError as exc:
        ex.upstream_seconds = time.perf_counter() - sent_at
        failed = upstream_failed(rt, ex, exc, grant)  # the quota refunded when unsent
        return Fetched(refusal=failed, stale=_stale_for(exc), limits=limits, charged=exc.sent)
    ex.upstream_seconds = time.perf_counter() - sent_at
    ex.upstream_status = upstream.status
    grant.sent(upstream.status, upstream.headers)
    metrics = rt.metrics
    metrics.upstream_responses.inc(credential.name, str(upstream.status))
    if upstream.status == 429:  # the credential is frozen now (see Grant.sent)
        upstream.release()
        metrics.upstream_duration.observe(ex.upstream_seconds, credential.name, ex.route)
        refusal = upstream_429(ex, upstream, limits)
        return Fetched(refusal=refusal, stale="stale-frozen", charged=True)
    try:
        fetched = await _read_whole(request, rt, ex, passed, upstream, limits)
        fetched.charged = True
        return fetched
    finally:
        metrics.upstream_duration.observe(ex.upstream_seconds, credential.name, ex.route)


async def _read_whole(
    request: web.Request,
    rt: Runtime,
    ex: Exchange,
    passed: Passed,
    upstream: UpstreamResponse,
    limits: Mapping[str, str],
) -> Fetched:
    """echowin's body read to its end when its length is known and within the entry
    bound (else ``upstream`` is handed over to be relayed), watched for the key."""
    content = upstream.content
    assert content is not None and rt.cache is not None
    length = upstream.content_length
    whole = content.is_eof() and content.exception() is None
    if not whole and (length is None or length > rt.cache.config.max_entry_bytes):
        return Fetched(upstream=upstream, limits=limits)
    try:
        body = content.read_nowait() if whole else await content.read()
    except (aiohttp.ClientError, TimeoutError):
        upstream.release()
        message = "echowin's answer broke off"
        refusal = answers.refuse(ex, 502, Reason.UPSTREAM_UNREACHABLE, message)
        return Fetched(refusal=refusal, stale="stale-unreachable", limits=limits)
    upstream.release()
    try:
        status, fields, body = watched(request, upstream, rt.upstream, passed.credential, body)
    except Unreadable:
        message = "echowin's answer is in an encoding the gateway cannot check"
        refusal = answers.refuse(ex, 502, Reason.UPSTREAM_UNREADABLE, message)
        return Fetched(refusal=refusal, limits=limits)
    stale = "stale-upstream-error" if status >= 500 else ""
    fresh_for = 0.0
    ttl = rt.cache.config.ttl_of(ex.route, status)
    if ttl is not None:
        given = upstream.headers
        fresh_for = answer_ttl(ttl, given, given.getall("Cache-Control", ()), time.time())
    answer = Answer(status, tuple(fields), body)
    fetched = Fetched(answer, stale=stale, limits=limits, fresh_for=fresh_for)
    fetched.shareable = keyed_vary(upstream.headers.getall("Vary", ()))
    fetched.must_revalidate = must_revalidate(upstream.headers.getall("Cache-Control", ()))
    return fetched


def _stale_for(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamTimeout):
        return "stale-timeout"
    if isinstance(exc, UpstreamUnreachable):
        return "stale-unreachable"
    return "stale-upstream-error"
