"""The proxy handler: a request's path through the gateway.

authenticate -> route and authorise -> admit (the budget seam) -> forward -> account.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from proxy.auth.authenticator import AuthFailure, AuthResult
from proxy.auth.client_address import Address, client_address
from proxy.auth.routes import PathError, RouteMatch, scope_allows
from proxy.auth.tokens import TokenRecord
from proxy.budget.admission import AdmitRequest, Grant, Held, Refusal
from proxy.budget.ratelimit_headers import freeze_until, parse_upstream_quota
from proxy.config import AGENCY_KEY_NAME, Credential
from proxy.errors import json_body, json_error, json_response
from proxy.gateway.keywatch import (
    Inflated,
    KeyWatch,
    Unreadable,
    Watches,
    coding_of,
    decoded,
    leaking_fields,
    readable_codings,
)
from proxy.observe.metrics import ANONYMOUS
from proxy.runtime import RUNTIME, Runtime
from proxy.server.lobby import Decide, Head, on_its_way, take_held
from proxy.upstream import (
    HOP_BY_HOP,
    Upstream,
    UpstreamError,
    UpstreamResponse,
    UpstreamUnreachable,
    connection_tokens,
)

log = logging.getLogger("echowin_gateway.proxy")

WATCHES = web.AppKey("key_watches", Watches)
"""The proxy app's key watches (proxy/gateway/keywatch.py), one per credential."""

# Client headers that never travel upstream: internal credentials, method and path
# overrides (a scope is decided by the real method and the matched path only: a stack
# that routes on X-Original-URL or X-Rewrite-URL must not see one) and our own control
# headers.
_DROP_REQUEST = frozenset(
    {
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
# echowin's own budget view is replaced by the caller's (the key's budget is shared).
_DROP_RESPONSE = frozenset(
    {
        "server",
        "date",
        "set-cookie",
        "x-request-id",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "ratelimit",
        "ratelimit-policy",
    }
)
# What never passes, either way: the lists above plus the hop-by-hop fields (lower case).
_SKIP_REQUEST = _DROP_REQUEST | HOP_BY_HOP
_SKIP_RESPONSE = _DROP_RESPONSE | HOP_BY_HOP
# Response fields holding a URL: one into echowin's API becomes the gateway's own path.
_LOCATIONS = frozenset({"location", "content-location"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_API_PREFIX = "/api/v1/"
_AGENCY_PREFIX = "/api/v1/agency/"
_CHUNK = 64 * 1024
_LOBBY_CHECKS = 1024  # distinct tokens the lobby checks at once
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Methods whose answer is the request as the server received it (TRACE, and IIS's TRACK):
# with the real key the gateway put in it. Never forwarded, whatever the token may do.
_REFLECTING = frozenset({"TRACE", "TRACK"})
_ALLOW = ", ".join(sorted(_METHODS))

_THROTTLED = "Too many failed authentications"
_UPSTREAM_429 = "echowin refused the request: rate limit exceeded"
_AUTH_MESSAGES = {
    AuthFailure.MALFORMED: "Invalid API key",
    AuthFailure.UNKNOWN: "Invalid API key",
    AuthFailure.EXPIRED: "API key expired",
    AuthFailure.REVOKED: "API key revoked",
}


@dataclass(slots=True)
class Exchange:
    """What the access log and the metrics need to know about one request."""

    request_id: str
    started: float
    token: TokenRecord | None = None
    route: str = "unmatched"
    credential: str = ""
    upstream_status: int | None = None
    queue_seconds: float = 0.0
    upstream_seconds: float = 0.0
    refusal: str | None = None
    bytes_out: int = 0
    client_gone: bool = False
    awaits_continue: bool = False  # the caller holds its body until "100 Continue"
    on_wire: bool = False  # the request's head may have left for echowin
    then: Callable[[], None] | None = None  # called once when the head leaves

    def wired(self) -> None:
        self.on_wire = True
        then, self.then = self.then, None
        if then is not None:
            then()


class BodyTooLarge(Exception):
    pass


class _Relayed(web.StreamResponse):
    """The caller's copy of echowin's answer. Its head waits for the first bytes of the
    body (or the end of an empty one) and leaves with them in one write, as a
    web.Response's does: one send to the caller per answer instead of two."""

    _send_headers_immediately = False


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


def _presented_token(headers: Mapping[str, str], raw_path: str) -> str | None:
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""
    key = headers.get("X-API-Key")
    if key is not None:
        return key.strip()
    if raw_path.startswith(_AGENCY_PREFIX):
        return headers.get("X-AGENCY-KEY")
    return None


class _Waiting:
    """A request queued from the lobby (proxy/server/lobby.py): what its 499 is accounted with
    if the caller leaves there."""

    __slots__ = ("_rt", "arrived", "credential", "held", "method", "route", "token")

    def __init__(
        self, rt: Runtime, held: Held, token: TokenRecord, route: str, credential: str, method: str
    ) -> None:
        self._rt = rt
        self.held = held
        self.token = token
        self.route = route
        self.credential = credential
        self.method = method
        self.arrived = time.perf_counter()
        rt.metrics.in_flight_now += 1

    def taken(self) -> None:
        self._rt.metrics.in_flight_now -= 1

    def release(self) -> None:
        self._rt.metrics.in_flight_now -= 1
        self.held.release()

    def gone(self) -> None:
        self.release()
        rt = self._rt
        ex = Exchange(rt.request_ids.new(), self.arrived, self.token, self.route, self.credential)
        ex.client_gone = True
        _account(rt, self.method, ex, None)


def lobby_decider(rt: Runtime) -> Decide[AuthResult]:
    """The lobby's question for ``rt``: would this head's request wait for budget? If so
    it is queued now (``Admitter.hold``). Only what ``_handle`` would admit and queue: a
    valid token from a client the auth throttle does not refuse (checked before any
    lookup, as ``_handle`` does; a failure is charged by the handler, which decides every
    request the lobby leaves to it again), a route it may take, no expectation but
    100-continue, no body over the limit, no chunked body, not draining. A token this
    process has not verified lately is checked first (one check per token however many
    connections present it), and the lobby asks again with its result."""
    checks: dict[str, asyncio.Future[AuthResult]] = {}

    def check(raw: str, head: Head) -> asyncio.Future[AuthResult] | None:
        future = checks.get(raw)
        if future is None:
            if len(checks) >= _LOBBY_CHECKS:
                return None  # a flood of tokens: checked by their handlers
            # The lookup holds a place in the client's bucket until it ends. If the bucket
            # fills before the handler decides again, the handler refuses the request and
            # this lookup goes uncharged: the one lookup the throttle lets slip.
            lookup = rt.auth_throttle.looking_up(_client(rt, head.peer, head.fields))
            future = checks[raw] = asyncio.ensure_future(rt.auth.authenticate(raw))
            future.add_done_callback(functools.partial(_checked, checks, raw))
            future.add_done_callback(lookup.end)
        return future

    def decide(
        head: Head, known: AuthResult | None
    ) -> _Waiting | asyncio.Future[AuthResult] | None:
        fields = head.fields
        expect = fields.get("Expect")
        if (
            rt.draining
            or (expect is not None and not _asks_continue(expect))
            or head.length is None  # chunked, or a length the lobby does not read
            or head.length > rt.config.server.max_request_body_bytes
        ):
            return None
        raw = _presented_token(fields, head.target)
        if not raw or _throttled(rt, head.peer, fields) is not None:
            return None  # the handler refuses it, after the same check
        auth = known if known is not None else rt.auth.recall(raw)
        if auth is None:
            return check(raw, head)
        token = auth.record
        if token is None:
            return None
        try:
            match = rt.routes.match(head.method, head.target.partition("?")[0])
        except PathError:
            return None
        if _authorise(token, match, head.method, {}) is not None:
            return None
        credential = _credential(rt, token, match)
        if credential is None:
            return None
        held = rt.admitter.hold(
            AdmitRequest(token, credential.name, match.template, _max_wait(fields))
        )
        if held is None:
            return None
        return _Waiting(rt, held, token, match.template, credential.name, head.method)

    return decide


def _checked(
    checks: dict[str, asyncio.Future[AuthResult]], raw: str, future: asyncio.Future[AuthResult]
) -> None:
    checks.pop(raw, None)
    if not future.cancelled():
        future.exception()  # read: every lobby that waited on it may have gone meanwhile


async def handle(request: web.Request) -> web.StreamResponse:
    """Every proxied request enters here."""
    rt = request.app[RUNTIME]
    waiting = take_held(request)
    ex = Exchange(
        rt.request_ids.take(request.headers.get("X-Request-ID")),
        waiting.arrived if waiting else time.perf_counter(),
    )
    if waiting is not None:
        ex.then = on_its_way(request)
    rt.metrics.in_flight_now += 1
    response: web.StreamResponse | None = None
    try:
        response = await _handle(request, rt, ex, waiting.held if waiting else None)
    except web.HTTPException:
        raise
    except Exception:
        # A bug must cost one request, never the process; the class name only is logged.
        log.exception("unhandled error", extra={"fields": {"request_id": ex.request_id}})
        ex.refusal = "internal_error"
        response = json_error(500, "Internal gateway error", reason="internal_error")
    finally:
        rt.metrics.in_flight_now -= 1
        if waiting is not None:
            waiting.held.release()  # answered before admission took it over: a no-op after
        _account(rt, request.method, ex, response)
    if ex.awaits_continue:
        # Answered before the caller was told to send its body: it may never send it,
        # and reading it to keep the connection would wait on the caller.
        response.force_close()
    return response


async def expect_later(request: web.Request) -> None:
    """The proxy route's Expect handler: it sends nothing. ``100 Continue`` goes out once
    the request is authenticated and admitted (:func:`_continue`), so that a caller that
    is refused, or waits in the queue, has not sent its body yet."""


def _expects_continue(request: web.Request) -> bool | None:
    """True when the caller waits for ``100 Continue``; None for an expectation the
    gateway cannot meet (417)."""
    expect = request.headers.get("Expect")
    if expect is None or request.version < aiohttp.HttpVersion11:
        return False  # HTTP/1.0 knows no Expect: ignored (RFC 9110 §10.1.1)
    return True if _asks_continue(expect) else None


def _asks_continue(expect: str) -> bool:
    """The one expectation the gateway meets."""
    return expect.strip().lower() == "100-continue"


async def _continue(request: web.Request, ex: Exchange) -> None:
    if ex.awaits_continue:
        ex.awaits_continue = False
        await request.writer.write(_CONTINUE)


async def _handle(
    request: web.Request, rt: Runtime, ex: Exchange, held: Held | None
) -> web.StreamResponse:
    headers = {"X-Request-ID": ex.request_id}
    expects = _expects_continue(request)
    if expects is None:
        # Refused before the body, which the caller may hold back: the connection closes.
        ex.awaits_continue = request.body_exists
        ex.refusal = "bad_expect"
        return json_error(
            417, "Only Expect: 100-continue is supported", reason="bad_expect", headers=headers
        )
    ex.awaits_continue = expects and request.body_exists
    authenticated = await _authenticate(request, rt, ex, headers)
    if isinstance(authenticated, web.Response):
        return authenticated
    token = ex.token = authenticated
    try:
        match = rt.routes.match(request.method, request.raw_path.partition("?")[0])
    except PathError as exc:
        ex.refusal = "bad_path"
        return json_error(
            400, f"Bad request path: {exc.reason}", reason="bad_path", headers=headers
        )
    ex.route = match.template
    denied = _authorise(token, match, request.method, headers)
    if denied is not None:
        ex.refusal = _DENIALS[denied.status]
        return denied
    credential = _credential(rt, token, match)
    if credential is None:
        ex.refusal = "no_credential"
        return json_error(
            503,
            "No upstream key is configured for this route",
            reason="no_credential",
            headers=headers,
        )
    ex.credential = credential.name
    length = request.content_length
    if length is not None and length > rt.config.server.max_request_body_bytes:
        ex.refusal = "body_too_large"
        return json_error(413, "Request body too large", reason="body_too_large", headers=headers)
    admit = AdmitRequest(token, credential.name, match.template, _max_wait(request.headers))
    admitted = await rt.admitter.admit(admit, held)
    if isinstance(admitted, Refusal):
        return _refuse(ex, admitted, rt.admitter.caller_headers(admit))
    ex.queue_seconds = admitted.queued_seconds
    try:
        await _continue(request, ex)
        return await _forward(request, rt, ex, match, credential, admitted, admit)
    except BaseException:
        # Whatever broke once the head left (a client gone mid-send included) may have
        # reached echowin; before that (a caller gone before its "100 Continue" or while
        # a connection was awaited), the slot goes back.
        if ex.on_wire:
            admitted.sent(0, {})
        else:
            admitted.unsent()
        raise


def _client(rt: Runtime, peer: str | None, fields: MultiMapping[str]) -> Address | None:
    """The request's client (proxy/auth/client_address.py): ``peer``, or whom a trusted proxy
    names in X-Forwarded-For."""
    return client_address(peer, fields.getall("X-Forwarded-For", ()), rt.trusted_proxies)


def _throttled(rt: Runtime, peer: str | None, fields: MultiMapping[str]) -> int | None:
    """The auth throttle's verdict on a request from ``peer`` with header ``fields``: the
    seconds to tell it to wait (Retry-After) when its client is refused, else None. The
    one check both the lobby and the handler make before any token lookup; no work but a
    clock read while no client has failed lately."""
    throttle = rt.auth_throttle
    if throttle.idle:
        return None
    return throttle.retry_after(_client(rt, peer, fields))


async def _authenticate(
    request: web.Request, rt: Runtime, ex: Exchange, headers: dict[str, str]
) -> TokenRecord | web.Response:
    """The caller's token, or the answer refusing it: 429 ``auth_throttled`` (with no
    lookup) while its client is throttled, 503 when the token store cannot answer, 401
    (the failure charged to the client) for a missing or bad token. A token verified
    lately costs no lookup; one that needs it holds a place in the client's bucket while
    it is looked up."""
    fields = request.headers
    retry = _throttled(rt, request.remote, fields)
    if retry is not None:
        ex.refusal = "auth_throttled"
        rt.metrics.refused(ANONYMOUS, ANONYMOUS, "auth_throttled")
        body = _refusal_body(_THROTTLED, "auth_throttled", retry)
        return json_response(429, body, {**headers, "Retry-After": str(retry)})
    raw = _presented_token(fields, request.raw_path)
    result = rt.auth.recall(raw) if raw else None
    if result is None:
        try:
            with rt.auth_throttle.looking_up(_client(rt, request.remote, fields)):
                result = await rt.auth.authenticate(raw)
        except Exception as exc:  # the token store cannot answer
            ex.refusal = "state_unavailable"
            # Neither the token nor its key is known yet: both labels are "-".
            rt.metrics.refused(ANONYMOUS, ANONYMOUS, "state_unavailable")
            log.warning("token store failed", extra={"fields": {"error": type(exc).__name__}})
            return json_error(
                503,
                "The gateway's token store is unavailable",
                reason="state_unavailable",
                headers={**headers, "Retry-After": "1"},
            )
    if result.record is None:
        failure = result.failure or AuthFailure.MISSING
        await rt.auth_throttle.failed(_client(rt, request.remote, fields))
        rt.metrics.child(rt.metrics.auth_failures, failure.value).inc()
        ex.refusal = f"auth_{failure.value}"
        return _auth_error(request, failure, headers)
    return result.record


def _auth_error(
    request: web.Request, failure: AuthFailure, headers: dict[str, str]
) -> web.Response:
    if failure is AuthFailure.MISSING:
        header = "X-AGENCY-KEY" if request.raw_path.startswith(_AGENCY_PREFIX) else "X-API-Key"
        message = f"Missing {header} header"
    else:
        message = _AUTH_MESSAGES[failure]
    headers = {**headers, "WWW-Authenticate": 'Bearer realm="echowin-gateway"'}
    return json_error(401, message, reason=failure.value, headers=headers)


def _authorise(
    token: TokenRecord, match: RouteMatch, method: str, headers: dict[str, str]
) -> web.Response | None:
    """None when the token may take this route; otherwise the 403/404/405 to answer."""
    if method in _REFLECTING:
        return json_error(
            405,
            f"Method {method} is not forwarded",
            reason="method_not_allowed",
            headers={**headers, "Allow": _ALLOW},
        )
    if match.route is None:
        if "*" in token.scopes and match.path.startswith(_API_PREFIX):
            return None
        return json_error(
            404, f"Unknown route: {method} {match.path}", reason="unknown_route", headers=headers
        )
    if scope_allows(token.scopes, match.route.scope):
        return None
    return json_error(
        403,
        f"Token lacks scope {match.route.scope}",
        reason="missing_scope",
        scope=match.route.scope,
        headers=headers,
    )


_DENIALS = {403: "forbidden", 404: "unknown_route", 405: "method_not_allowed"}


def _credential(rt: Runtime, token: TokenRecord, match: RouteMatch) -> Credential | None:
    name = AGENCY_KEY_NAME if match.family == "agency" else token.upstream_key
    return rt.secrets.credentials.get(name)


def _max_wait(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("X-Gateway-Max-Wait")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


@functools.lru_cache(maxsize=256)
def _refusal_body(message: str, reason: str, retry: int) -> bytes:
    # A refused caller usually is refused again, with the same text and Retry-After.
    return json_body(message, reason, retryAfter=retry)


def _refuse(ex: Exchange, refusal: Refusal, limits: Mapping[str, str]) -> web.Response:
    """The 429 (or 503) for ``refusal``, with the caller's rate-limit fields ``limits``."""
    ex.refusal = refusal.reason
    retry = max(1, int(-(-refusal.retry_after // 1)))
    headers = dict(limits)
    headers["X-Request-ID"] = ex.request_id
    headers["Retry-After"] = str(retry)
    body = _refusal_body(refusal.message, refusal.reason, retry)
    return json_response(refusal.status, body, headers)


def _upstream_headers(
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


async def _forward(
    request: web.Request,
    rt: Runtime,
    ex: Exchange,
    match: RouteMatch,
    credential: Credential,
    grant: Grant,
    admit: AdmitRequest,
) -> web.StreamResponse:
    headers = {"X-Request-ID": ex.request_id}
    limit = rt.config.server.max_request_body_bytes
    body = CappedBody(request, limit) if request.body_exists else None
    raw = request.raw_path
    query = raw.find("?")
    path_qs = match.path if query < 0 or query == len(raw) - 1 else match.path + raw[query:]
    sent_at = time.perf_counter()
    try:
        upstream = await rt.upstream.send(
            request.method,
            path_qs,
            _upstream_headers(request, credential, ex, rt.upstream.host),
            body,
            ex.wired,
        )
    except (UpstreamError, BodyTooLarge) as exc:
        ex.upstream_seconds = time.perf_counter() - sent_at
        if body is not None and body.too_large:
            # echowin saw an incomplete request it cannot act on; it may still count it.
            grant.sent(0, {})
            ex.refusal = "body_too_large"
            return json_error(
                413, "Request body too large", reason="body_too_large", headers=headers
            )
        if isinstance(exc, UpstreamError):
            return _upstream_failed(rt, ex, exc, grant, headers)
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
        return await _relay(request, upstream, rt.upstream, credential, ex, extra)
    finally:
        upstream.release()  # whatever happened since the answer came: never a leaked connection
        # Counted once the answer is on its way, not on the caller's time.
        metrics = rt.metrics
        metrics.upstream_duration.observe(ex.upstream_seconds, credential.name, ex.route)
        metrics.upstream_responses.inc(credential.name, str(upstream.status))


def _upstream_429(
    ex: Exchange, upstream: UpstreamResponse, limits: Mapping[str, str]
) -> web.Response:
    """echowin's own 429 as the gateway's: its body is not relayed, and Retry-After says
    how long the freeze it caused lasts (read from echowin's answer by the same rule)."""
    now = time.time()
    wait = freeze_until(now, parse_upstream_quota(upstream.headers, now)) - now
    # Rounded: "Retry-After: 7" read at now, less now, may come out 7.0000002 (floats).
    refusal = Refusal("upstream_429", round(wait, 3), _UPSTREAM_429)
    return _refuse(ex, refusal, limits)


def _upstream_failed(
    rt: Runtime,
    ex: Exchange,
    exc: UpstreamError,
    grant: Grant,
    headers: dict[str, str],
) -> web.Response:
    rt.metrics.upstream_errors.labels(ex.credential, exc.kind).inc()
    if not exc.sent:  # no byte left: the slot goes back to the budget
        grant.unsent()
    else:
        grant.sent(0, {})
    ex.refusal = f"upstream_{exc.kind}"
    if isinstance(exc, UpstreamUnreachable):
        return json_error(
            502, "echowin could not be reached", reason="upstream_unreachable", headers=headers
        )
    return json_error(
        504, "echowin did not answer in time", reason="upstream_timeout", headers=headers
    )


async def _relay(
    request: web.Request,
    upstream: UpstreamResponse,
    pool: Upstream,
    credential: Credential,
    ex: Exchange,
    extra: dict[str, str],
) -> web.StreamResponse:
    # The standard reason phrase, not echowin's: its free text is not relayed (it could
    # carry the key, and no header filter sees it).
    response = _Relayed(status=upstream.status)
    given = upstream.headers
    watch = request.app[WATCHES].of(credential, credential.secret.reveal())
    _relay_fields(response.headers, given, pool, credential, watch)
    response.headers.update(extra)  # the caller's rate-limit fields, Server-Timing, X-Request-ID
    length = upstream.content_length
    if length is not None:
        response.content_length = length
    content = upstream.content
    assert content is not None
    # The body is searched for the key as the caller would read it (proxy/gateway/keywatch.py).
    coding = coding_of(given.get("Content-Encoding"))
    whole = content.is_eof() and content.exception() is None
    body = b""
    if whole:  # the whole answer is here already (most are small): one write, no loop
        body = content.read_nowait()
        if not coding:
            body, found = watch.masked(body)
            if found:
                _key_seen(credential, "masked")
    if coding is None or (whole and coding and body):
        try:
            body = _decoded_if_leaking(response, body, watch, coding, credential)
        except Unreadable:
            ex.refusal = "upstream_unreadable"
            return json_error(
                502,
                "echowin's answer is in an encoding the gateway cannot check",
                reason="upstream_unreadable",
                headers={"X-Request-ID": ex.request_id},
            )
    try:
        await response.prepare(request)
        if whole:
            ex.bytes_out += len(body)
            await response.write_eof(body)
            return response
        chunks = _chunks_of(content)
        if coding:
            await _stream_inflated(response, chunks, Inflated(watch, coding), ex, credential)
        else:
            await _stream_masked(response, chunks, watch, ex, credential)
        await response.write_eof()
    except ConnectionResetError:
        # The caller hung up while its answer was being written: nothing to answer, no
        # gateway fault (aiohttp's ClientConnectionResetError is a ConnectionResetError).
        ex.refusal = "client_closed"
        ex.client_gone = True
    except (_BrokenBody, _KeyInBody, Unreadable) as exc:
        # Too late for a status: cut the connection so the client sees a broken answer.
        ex.refusal = _CUT_REASONS[type(exc)]
        if request.transport is not None:
            request.transport.close()
    return response


def _relay_fields(
    headers: CIMultiDict[str],
    given: CIMultiDictProxy[str],
    pool: Upstream,
    credential: Credential,
    watch: KeyWatch,
) -> None:
    """echowin's end-to-end fields into ``headers``, less those the caller never gets and
    every one holding a form of the key, in its name, its value, or split across values
    (proxy/gateway/keywatch.py); a URL into echowin's API becomes the gateway's own path."""
    named = connection_tokens(given)
    kept = [
        (name, value)
        for name, value in given.items()
        if (low := name.lower()) not in _SKIP_RESPONSE and low not in named
    ]
    leaking = leaking_fields(watch, kept)
    if leaking:
        _key_seen(credential, "dropped")
    for i, (name, value) in enumerate(kept):
        if i not in leaking:
            headers.add(name, pool.relative(value) if name.lower() in _LOCATIONS else value)


class _BrokenBody(Exception):
    """echowin's answer broke off (a reset, the deadline) while it was being relayed."""


class _KeyInBody(Exception):
    """The real key is in a compressed body being streamed: it cannot be masked there."""


_CUT_REASONS = {
    _BrokenBody: "upstream_broken_body",
    _KeyInBody: "upstream_key_in_body",
    Unreadable: "upstream_unreadable",
}


async def _chunks_of(content: StreamReader) -> AsyncIterator[bytes]:
    """echowin's body as it comes; _BrokenBody when it breaks off (aiohttp's own errors
    are not told apart from a caller gone, whose write raises a ClientError too)."""
    chunks = content.iter_any()
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except (aiohttp.ClientError, TimeoutError):
            raise _BrokenBody from None
        yield chunk


async def _stream_masked(
    response: web.StreamResponse,
    chunks: AsyncIterator[bytes],
    watch: KeyWatch,
    ex: Exchange,
    credential: Credential,
) -> None:
    """An identity body, every form of the key masked. The last ``watch.keep`` bytes wait
    for the next chunk: a form split between two chunks is masked too."""
    keep = watch.keep
    held = b""
    async for chunk in chunks:
        data, found = watch.masked(held + chunk if held else chunk)
        if found:
            _key_seen(credential, "masked")
        cut = max(0, len(data) - keep)
        held = data[cut:]
        if cut:
            ex.bytes_out += cut
            await response.write(memoryview(data)[:cut])
    ex.bytes_out += len(held)
    await response.write(held)


async def _stream_inflated(
    response: web.StreamResponse,
    chunks: AsyncIterator[bytes],
    inflated: Inflated,
    ex: Exchange,
    credential: Credential,
) -> None:
    """A compressed body, relayed as it came, each chunk held back until len(key) - 1
    inflated bytes follow it: the chunk that completes a key, and every one before it that
    holds a part of it, are never sent (_KeyInBody: the connection is cut)."""
    keep = inflated.keep
    held: deque[tuple[bytes, int]] = deque()  # (chunk, inflated bytes it made)
    after_first = 0  # inflated bytes of every held chunk but the first
    async for chunk in chunks:
        before = inflated.plain_bytes
        if inflated.holds_key(chunk):
            _key_seen(credential, "cut")
            raise _KeyInBody
        held.append((chunk, inflated.plain_bytes - before))
        if len(held) > 1:
            after_first += held[-1][1]
        while len(held) > 1 and after_first >= keep:
            sent, _ = held.popleft()
            after_first -= held[0][1]
            ex.bytes_out += len(sent)
            await response.write(sent)
    if inflated.ends_with_key():
        _key_seen(credential, "cut")
        raise _KeyInBody
    for sent, _ in held:
        ex.bytes_out += len(sent)
        await response.write(sent)


def _decoded_if_leaking(
    response: web.StreamResponse,
    body: bytes,
    watch: KeyWatch,
    coding: str | None,
    credential: Credential,
) -> bytes:
    """A whole compressed ``body`` as the caller gets it: as it came when no form of the
    key is in it inflated, else inflated and masked (Content-Encoding dropped). Unreadable
    for a coding the gateway cannot read (None) or a corrupt body."""
    if coding is None:
        raise Unreadable
    plain, found = watch.masked(decoded(body, coding))
    if not found:
        return body
    _key_seen(credential, "masked")
    del response.headers["Content-Encoding"]
    response.content_length = len(plain)
    return plain


def _key_seen(credential: Credential, action: str) -> None:
    log.warning(
        "echowin's answer held the key",
        extra={"fields": {"credential": credential.name, "action": action}},
    )


def _account(rt: Runtime, method: str, ex: Exchange, response: web.StreamResponse | None) -> None:
    # 499 (as nginx logs it): the caller went away before its answer was written.
    status = response.status if response is not None and not ex.client_gone else 499
    token_name = ex.token.name if ex.token is not None else ANONYMOUS
    total = time.perf_counter() - ex.started
    metrics = rt.metrics
    label = method if method in _METHODS else "OTHER"  # bounded labels
    metrics.requests.inc(token_name, ex.route, label, str(status))
    if ex.token is not None:
        counts = rt.usage.get(ex.token.id)
        if counts is None:
            counts = rt.usage[ex.token.id] = Counter()
            rt.usage_names[ex.token.id] = ex.token.name
        counts[status] += 1
    metrics.request_duration.observe(total, ex.route)
    access = rt.access_log
    if access.enabled:
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
        )


__all__ = ["HOP_BY_HOP", "handle", "lobby_decider"]
