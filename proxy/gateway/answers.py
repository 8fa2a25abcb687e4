"""The answers the gateway writes itself instead of echowin's: every one JSON shaped like
echowin's (proxy/errors.py), with the caller's X-Request-ID, and its reason recorded in
the request's :class:`~proxy.gateway.account.Exchange` as it is built: the body's
``reason`` and the access log's ``refusal`` are one value."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from aiohttp import web

from proxy.budget.admission import Refusal
from proxy.errors import Reason, json_body, json_error, json_response
from proxy.gateway.account import METHODS, Exchange
from proxy.gateway.gate import AGENCY_PREFIX, OTHER_SCHEME, Refused

_ALLOW = ", ".join(sorted(METHODS))
_THROTTLED = "Too many failed authentications"
_AUTH_MESSAGES = {
    Reason.MALFORMED: "Invalid API key",
    Reason.UNKNOWN: "Invalid API key",
    Reason.EXPIRED: "API key expired",
    Reason.REVOKED: "API key revoked",
}
_CHALLENGE = 'Bearer realm="echowin-gateway"'
# The admin listener's open paths, asked of the proxy by probes and people: told where.
_ADMIN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/status", "/status.json"})
_ADMIN_REASONS = frozenset({Reason.MISSING, Reason.UNKNOWN_ROUTE})
_NOT_BEARER = (
    "Authorization scheme not recognised: send Authorization: Bearer <token>"
    " (or X-API-Key: <token>)"
)


def refuse(
    ex: Exchange,
    status: int,
    reason: Reason,
    message: str,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> web.Response:
    """The ``status`` answer refusing ``ex`` for ``reason``: ``message`` for people,
    ``headers`` beside X-Request-ID, ``extra`` fields in the body."""
    ex.refusal = reason
    fields = {"X-Request-ID": ex.request_id}
    if headers:
        fields.update(headers)
    return json_error(status, message, reason=reason, headers=fields, **extra)


def refused(ex: Exchange, outcome: Refused, method: str, raw_path: str) -> web.Response:
    """The answer for the gate's ``outcome`` on ``method raw_path``."""
    reason = outcome.reason
    if reason in _ADMIN_REASONS and raw_path.partition("?")[0] in _ADMIN_PATHS:
        path = raw_path.partition("?")[0]
        told = f"{path} is served on the admin listener (admin_listen), not the proxy"
        return refuse(ex, 404, Reason.NOT_FOUND, told)
    if reason is Reason.AUTH_THROTTLED:
        ex.refusal = reason
        retry = outcome.retry_after
        body = _refusal_body(_THROTTLED, reason, retry)
        return json_response(429, body, {"X-Request-ID": ex.request_id, "Retry-After": str(retry)})
    if reason is Reason.MISSING and outcome.detail == OTHER_SCHEME:
        return _unauthorised(ex, reason, _NOT_BEARER)
    if reason is Reason.MISSING:
        header = "X-AGENCY-KEY" if raw_path.startswith(AGENCY_PREFIX) else "X-API-Key"
        return _unauthorised(ex, reason, f"Missing {header} header")
    message = _AUTH_MESSAGES.get(reason)
    if message is not None:
        return _unauthorised(ex, reason, message)
    if reason is Reason.BAD_PATH:
        return refuse(ex, 400, reason, f"Bad request path: {outcome.detail}")
    if reason is Reason.METHOD_NOT_ALLOWED:
        message = f"Method {method} is not forwarded"
        return refuse(ex, 405, reason, message, {"Allow": _ALLOW})
    if reason is Reason.UNKNOWN_ROUTE:
        return refuse(ex, 404, reason, f"Unknown route: {method} {outcome.detail}")
    if reason is Reason.MISSING_SCOPE:
        scope = outcome.detail
        return refuse(ex, 403, reason, f"Token lacks scope {scope}", scope=scope)
    assert reason is Reason.NO_CREDENTIAL, reason
    return refuse(ex, 503, reason, "No upstream key is configured for this route")


def _unauthorised(ex: Exchange, reason: Reason, message: str) -> web.Response:
    return refuse(ex, 401, reason, message, {"WWW-Authenticate": _CHALLENGE})


def bad_expect(ex: Exchange) -> web.Response:
    return refuse(ex, 417, Reason.BAD_EXPECT, "Only Expect: 100-continue is supported")


def body_too_large(ex: Exchange) -> web.Response:
    return refuse(ex, 413, Reason.BODY_TOO_LARGE, "Request body too large")


def state_unavailable(ex: Exchange) -> web.Response:
    """The token store could not say who the caller is."""
    message = "The gateway's token store is unavailable"
    return refuse(ex, 503, Reason.STATE_UNAVAILABLE, message, {"Retry-After": "1"})


def internal_error(ex: Exchange) -> web.Response:
    """A bug in the gateway: this request's answer (no X-Request-ID, none is trusted)."""
    ex.refusal = Reason.INTERNAL_ERROR
    return json_error(500, "Internal gateway error", reason=Reason.INTERNAL_ERROR)


@functools.lru_cache(maxsize=256)
def _refusal_body(message: str, reason: Reason, retry: int) -> bytes:
    # A refused caller usually is refused again, with the same text and Retry-After.
    return json_body(message, reason, retryAfter=retry)


def limited(ex: Exchange, refusal: Refusal, limits: Mapping[str, str]) -> web.Response:
    """The 429 (or 503) for the budget's ``refusal``, with the caller's rate-limit fields
    ``limits`` and Retry-After (whole seconds, rounded up, at least 1)."""
    ex.refusal = refusal.reason
    retry = max(1, int(-(-refusal.retry_after // 1)))
    headers = dict(limits)
    headers["X-Request-ID"] = ex.request_id
    headers["Retry-After"] = str(retry)
    body = _refusal_body(refusal.message, refusal.reason, retry)
    return json_response(refusal.status, body, headers)


__all__ = [
    "bad_expect",
    "body_too_large",
    "internal_error",
    "limited",
    "refuse",
    "refused",
    "state_unavailable",
]
