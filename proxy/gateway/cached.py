"""The cache's step on a GET's path (SPEC §5 "Budget savers"), taken once the gate has
authenticated the token and checked its scope: a fresh copy answers at once (charged to
the token's own quota, not the upstream budget); otherwise the GET joins an identical one
in flight, or starts the flight (proxy/gateway/fetch.py); when echowin cannot answer (no
budget, frozen, failing) a stale copy the caller accepts stands in. Every answer says what
happened in ``Cache-Status`` (RFC 9211) and, from a copy, its ``Age``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import MultiMapping

from proxy.budget.admission import AdmitRequest, Held
from proxy.cache.control import Directives, request_directives
from proxy.cache.keeper import GatewayCache
from proxy.cache.keys import CacheKey, cache_key, unkeyed_fields
from proxy.cache.purge import purge_for
from proxy.cache.store import Answer, Entry
from proxy.cache.trip import Fetched
from proxy.errors import Reason
from proxy.gateway import answers
from proxy.gateway.account import Exchange
from proxy.gateway.fetch import fetch
from proxy.gateway.gate import Passed, max_wait
from proxy.gateway.relay import relay
from proxy.runtime import Runtime

__all__ = ["key_of", "through_cache", "written"]

NAME = "echowin-gateway"
_JOINS = 2  # flights a caller joins before it starts its own


def key_of(passed: Passed, target: str, headers: MultiMapping[str]) -> CacheKey:
    """The cache key of a GET of ``target`` (path and query as sent) with ``headers``."""
    return cache_key(
        passed.credential.name,
        passed.match.template,
        passed.match.path,
        target,
        headers.getall("Accept", None),
        headers.getall("Accept-Encoding", None),
    )


@dataclass(slots=True)
class _Lookup:
    """One GET through the cache: who asks, for what, and how (its directives)."""

    rt: Runtime
    cache: GatewayCache
    ex: Exchange
    admit: AdmitRequest
    key: CacheKey
    asked: Directives
    bypass: str = ""  # why no copy, no shared flight, nothing kept ("" when they may be)


async def through_cache(
    request: web.Request, rt: Runtime, ex: Exchange, passed: Passed, held: Held | None
) -> web.StreamResponse:
    """A GET without a body, through the cache (``rt.cache`` is set)."""
    cache = rt.cache
    assert cache is not None
    headers = request.headers
    asked = request_directives(
        headers.getall("Cache-Control", None), headers.getall("Pragma", None)
    )
    admit = AdmitRequest(passed.token, passed.credential.name, ex.route, max_wait(headers))
    look = _Lookup(rt, cache, ex, admit, key_of(passed, request.raw_path, headers), asked)
    if unkeyed_fields(headers.keys()):
        # A field the key does not hold may change echowin's answer: this GET is its own.
        look.bypass = "unkeyed-field"
        if asked.only_if_cached:
            return _not_cached(look)
        return await _alone(request, look, passed, held)
    entry = cache.store.get(look.key) if cache.caches(ex.route) else None
    now = cache.clock()
    if entry is not None and not asked.no_cache and _fresh_enough(entry, now, asked):
        if held is not None:
            held.release()
        return await _from_copy(look, entry, "hit", f"hit; ttl={_ttl(entry, now)}")
    if asked.only_if_cached:
        if entry is not None and asked.max_stale is not None and _stale_ok(look, entry):
            return await _from_copy(look, entry, "stale", _stale_status(look, entry, ""))
        return _not_cached(look)
    shared = not asked.no_cache and cache.config.coalesce
    for _ in range(_JOINS if shared else 0):
        # A flight that brought no answer to share (a refusal, a failure) leaves its
        # callers to try again: the first of them starts the next, the others join it.
        flight = cache.flights.get(look.key)
        if flight is None:
            break
        if held is not None:  # its place in the queue is not needed: the flight has one
            held.release()
            held = None
        flight.joined += 1
        landed = await cache.flights.wait(flight)
        shared_answer = None if landed is None else await _shared(look, landed)
        if shared_answer is not None:
            return shared_answer
    return await _alone(request, look, passed, held, shared=shared)


async def _alone(
    request: web.Request, look: _Lookup, passed: Passed, held: Held | None, *, shared: bool = False
) -> web.StreamResponse:
    """This caller's own flight (joined by later identical callers when ``shared``)."""
    cache = look.cache
    trip = fetch(request, look.rt, look.ex, passed, look.admit, held)
    flight = cache.flights.start(look.key, trip, shared=shared)
    if look.asked.no_store or look.bypass:
        flight.keep = False
    fetched = await cache.flights.wait(flight, Fetched.release)
    if fetched is None:  # called off as it started (see Flights.wait): once more, alone
        return await _alone(request, look, passed, None)
    return await _first(request, look, passed, fetched)


def _fresh_enough(entry: Entry, now: float, asked: Directives) -> bool:
    if entry.staleness(now) > 0:
        return False
    return asked.max_age is None or entry.age(now) <= asked.max_age


def _stale_ok(look: _Lookup, entry: Entry) -> bool:
    """A stale copy the caller accepts in place of a refusal: within its ``max-stale``
    when sent, else within ``stale_seconds``; never with ``no-cache``, nor when echowin
    said ``must-revalidate`` (or ``proxy-revalidate``)."""
    asked = look.asked
    if asked.no_cache or look.bypass:
        return False
    allowed = look.cache.config.stale_seconds if asked.max_stale is None else asked.max_stale
    return entry.may_stand_in(look.cache.clock(), allowed)


def _ttl(entry: Entry, now: float) -> int:
    return math.floor(entry.fresh_for - entry.age(now))


def _stale_status(look: _Lookup, entry: Entry, why: str) -> str:
    """Cache-Status of a stale copy: a hit whose ttl is below 0, and ``why`` it stood in."""
    detail = f"; detail={why}" if why else ""
    return f"hit; ttl={min(-1, _ttl(entry, look.cache.clock()))}{detail}"


async def _from_copy(
    look: _Lookup, entry: Entry, result: str, status: str, *, charged: bool = False
) -> web.Response:
    """A kept copy to the caller, charged to its token's own quota (unless its trip to
    echowin was, ``charged``: one request, one charge)."""
    rt, ex = look.rt, look.ex
    refused = None if charged else await rt.admitter.charge_own(look.admit)
    limits = rt.admitter.caller_headers(look.admit)
    if refused is not None:
        return answers.limited(ex, refused, limits)
    ex.refusal = None  # a refusal or failure it replaces is not this answer's
    _count(look, result)
    age = str(math.floor(entry.age(look.cache.clock())))
    return _answer(ex, entry.answer, limits, status, age)


def _count(look: _Lookup, result: str) -> None:
    look.cache.looked_up(look.ex.route, result)
    look.ex.cache = result


def _answer(
    ex: Exchange, answer: Answer, limits: Mapping[str, str], status: str, age: str | None
) -> web.Response:
    """``answer`` to the caller, with its rate-limit fields, Cache-Status and Age."""
    response = web.Response(status=answer.status, body=answer.body)
    fields = response.headers
    for name, value in answer.headers:
        fields.add(name, value)
    fields.update(limits)
    fields["X-Request-ID"] = ex.request_id
    fields["Cache-Status"] = f"{NAME}; {status}"
    if age is not None:
        fields["Age"] = age
    ex.bytes_out += len(answer.body)
    return response


def _not_cached(look: _Lookup) -> web.Response:
    """``only-if-cached`` and nothing the caller accepts is held: 504 (RFC 9111 §5.2.1.7)."""
    _count(look, "miss")
    message = "Nothing is cached for this request (only-if-cached)"
    fields = {"Cache-Status": f"{NAME}; fwd=miss; detail=only-if-cached"}
    return answers.refuse(look.ex, 504, Reason.NOT_CACHED, message, fields)


def _stale_copy(look: _Lookup, why: str) -> Entry | None:
    """The copy that may stand in for a refusal or failure (``why``: "" when none may)."""
    if not why or not look.cache.caches(look.key.route):
        return None
    entry = look.cache.store.get(look.key)
    if entry is None or not _stale_ok(look, entry):
        return None
    return entry


async def _shared(look: _Lookup, fetched: Fetched) -> web.Response | None:
    """Another caller's flight landed: a stale copy in place of its refusal or failure,
    or its answer, charged to this token's own quota; None when it brought nothing to
    share."""
    stale = _stale_copy(look, fetched.stale)
    if stale is not None:
        return await _from_copy(look, stale, "stale", _stale_status(look, stale, fetched.stale))
    answer = fetched.answer
    if answer is None or not fetched.shareable:
        return None
    rt, ex = look.rt, look.ex
    refused = await rt.admitter.charge_own(look.admit)
    limits = rt.admitter.caller_headers(look.admit)
    if refused is not None:
        return answers.limited(ex, refused, limits)
    _count(look, "collapsed")
    ex.upstream_status = answer.status
    return _answer(ex, answer, limits, "fwd=miss; collapsed", None)


async def _first(
    request: web.Request, look: _Lookup, passed: Passed, fetched: Fetched
) -> web.StreamResponse:
    """The answer of the caller whose flight it was."""
    ex = look.ex
    stale = _stale_copy(look, fetched.stale)
    if stale is not None:
        status = _stale_status(look, stale, fetched.stale)
        return await _from_copy(look, stale, "stale", status, charged=fetched.charged)
    if fetched.refusal is not None:
        return fetched.refusal
    bypass = look.asked.no_cache or bool(look.bypass)
    _count(look, "bypass" if bypass else "miss")
    fwd = "fwd=request" if look.asked.no_cache else "fwd=miss"
    if look.bypass:
        fwd = f"fwd=bypass; detail={look.bypass}"
    if fetched.answer is not None:
        stored = "; stored" if fetched.stored else ""
        return _answer(ex, fetched.answer, _timed(ex, fetched), f"{fwd}{stored}", None)
    upstream = fetched.upstream
    assert upstream is not None
    extra = _timed(ex, fetched)
    extra["Cache-Status"] = f"{NAME}; {fwd}" + ("" if look.bypass else "; detail=too-large")
    try:
        return await relay(request, upstream, look.rt.upstream, passed.credential, ex, extra)
    finally:
        fetched.release()


def _timed(ex: Exchange, fetched: Fetched) -> dict[str, str]:
    extra = dict(fetched.limits)
    extra["Server-Timing"] = (
        f"queue;dur={ex.queue_seconds * 1000:.3f}, upstream;dur={ex.upstream_seconds * 1000:.3f}"
    )
    extra["X-Request-ID"] = ex.request_id
    return extra


def written(rt: Runtime, method: str, passed: Passed, status: int | None) -> None:
    """After a request that reached echowin: when it is a write echowin may have applied
    (any answer but a 4xx, or none at all: a timeout, a reset), purge what it can change,
    for its credential, here and on every other worker and replica."""
    cache = rt.cache
    if cache is None or (status is not None and 400 <= status < 500):
        return
    purge = purge_for(method, passed.match.path)
    if purge is not None:
        cache.purge(passed.credential.name, purge)
