"""The proxy handler: a request's path through the gateway.

authenticate, route, authorise (the gate: proxy/gateway/gate.py) -> admit (the budget
seam) -> forward (proxy/gateway/forward.py, relay.py) -> account (account.py).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy.auth.authenticator import AuthResult
from proxy.auth.throttle import Lookup
from proxy.budget.admission import AdmitRequest, Held, Refusal
from proxy.errors import Reason
from proxy.gateway import answers
from proxy.gateway.account import Exchange, account
from proxy.gateway.cached import through_cache, written
from proxy.gateway.forward import forward
from proxy.gateway.gate import (
    AUTH_FAILURES,
    Refused,
    Unverified,
    asks_continue,
    client,
    gate,
    judge,
    max_wait,
)
from proxy.gateway.held import lobby_decider
from proxy.gateway.relay import WATCHES
from proxy.observe.label_series import ANONYMOUS
from proxy.runtime import RUNTIME, Runtime
from proxy.server.lobby import on_its_way, take_held

if TYPE_CHECKING:  # OpenTelemetry is loaded only when tracing is on
    from proxy.observe.tracing import RequestSpan

log = logging.getLogger("echowin_gateway.proxy")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def handle(request: web.Request, span: RequestSpan | None = None) -> web.StreamResponse:
    """Every proxied request enters here (through proxy/gateway/traced.py's
    ``traced_handle``, with its ``span``, when tracing is on)."""
    rt = request.app[RUNTIME]
    held = take_held(request)
    ex = Exchange(
        rt.request_ids.take(request.headers.get("X-Request-ID")),
        held.arrived if held else time.perf_counter(),
        span,
    )
    if held is not None:
        ex.then = on_its_way(request)
    rt.metrics.in_flight_now += 1
    response: web.StreamResponse | None = None
    try:
        response = await _handle(request, rt, ex, held.held if held else None)
    except web.HTTPException:
        raise
    except Exception:
        # A bug must cost one request, never the process; the class name only is logged.
        log.exception("unhandled error", extra={"fields": {"request_id": ex.request_id}})
        response = answers.internal_error(ex)
    finally:
        rt.metrics.in_flight_now -= 1
        if held is not None:
            held.held.release()  # answered before admission took it over: a no-op after
        account(rt, request.method, ex, response, request)
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
    return True if asks_continue(expect) else None


async def _continue(request: web.Request, ex: Exchange) -> None:
    if ex.awaits_continue:
        ex.awaits_continue = False
        await request.writer.write(_CONTINUE)


async def _handle(
    request: web.Request, rt: Runtime, ex: Exchange, held: Held | None
) -> web.StreamResponse:
    expects = _expects_continue(request)
    if expects is None:
        # Refused before the body, which the caller may hold back: the connection closes.
        ex.awaits_continue = request.body_exists
        return answers.bad_expect(ex)
    ex.awaits_continue = expects and request.body_exists
    method, target = request.method, request.raw_path
    passed = gate(rt, method, target, request.headers, request.remote)
    lookup = None
    if isinstance(passed, Unverified):
        lookup = rt.auth_throttle.looking_up(
            client(rt, request.remote, request.headers), passed.raw
        )
        auth = await _look_up(rt, lookup, passed.raw)
        if auth is None:
            rt.metrics.refused(ANONYMOUS, ANONYMOUS, Reason.STATE_UNAVAILABLE)
            return answers.state_unavailable(ex)
        passed = judge(rt, auth, method, target)
    if isinstance(passed, Refused):
        return await _refused(request, rt, ex, passed, lookup)
    token = ex.token = passed.token
    ex.route = passed.match.template
    ex.credential = passed.credential.name
    length = request.content_length
    if length is not None and length > rt.config.server.max_request_body_bytes:
        return answers.body_too_large(ex)
    if rt.cache is not None and rt.cache.takes(method, ex.route) and not request.body_exists:
        return await through_cache(request, rt, ex, passed, held)
    admit = AdmitRequest(token, ex.credential, ex.route, max_wait(request.headers))
    admitted = await rt.admitter.admit(admit, held)
    if isinstance(admitted, Refusal):
        return answers.limited(ex, admitted, rt.admitter.caller_headers(admit))
    ex.queue_seconds = admitted.queued_seconds
    try:
        await _continue(request, ex)
        return await forward(request, rt, ex, passed, admitted, admit)
    except BaseException:
        # Whatever broke once the head left (a client gone mid-send included) may have
        # reached echowin; before that (a caller gone before its "100 Continue" or while
        # a connection was awaited), the slot goes back.
        if ex.on_wire:
            admitted.sent(0, {})
        else:
            admitted.unsent()
        raise
    finally:
        if rt.cache is not None and ex.on_wire:
            written(rt, method, passed, ex.upstream_status)


async def _look_up(rt: Runtime, lookup: Lookup, raw: str) -> AuthResult | None:
    """The verdict on token ``raw``, looked up while ``lookup`` holds a place in its
    client's throttle bucket; None when the token store cannot answer."""
    try:
        with lookup:
            return await rt.auth.authenticate(raw)
    except Exception as exc:
        log.warning("token store failed", extra={"fields": {"error": type(exc).__name__}})
        return None


async def _refused(
    request: web.Request, rt: Runtime, ex: Exchange, refused: Refused, lookup: Lookup | None
) -> web.Response:
    """The answer to the gate's refusal, counted: a throttled client in the refusals, a
    token refused in the auth failures and its client's throttle (through ``lookup``, the
    throttle's entry for the client, when its token was looked up)."""
    reason = refused.reason
    ex.token = refused.token
    if refused.route is not None:
        ex.route = refused.route
    if reason is Reason.AUTH_THROTTLED:
        rt.metrics.refused(ANONYMOUS, ANONYMOUS, reason)
    elif reason in AUTH_FAILURES:
        if lookup is not None:
            await lookup.failed()
        else:
            await rt.auth_throttle.failed(client(rt, request.remote, request.headers))
        rt.metrics.child(rt.metrics.auth_failures, reason).inc()
    return answers.refused(ex, refused, request.method, request.raw_path)


__all__ = ["WATCHES", "expect_later", "handle", "lobby_decider"]
