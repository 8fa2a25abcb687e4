"""The gate every proxied request passes before it is admitted: authenticate, route,
authorise, credential. The lobby asks it before the request's handler runs
(proxy/gateway/held.py), the handler asks it again (proxy/gateway/handler.py): one set of
checks, one outcome, and the caller alone decides what to send.

Nothing here waits: a token this process has not verified lately comes back
:class:`Unverified`, for the caller to look up its own way (the handler awaits it, the
lobby makes one future per token) and to give the result to :func:`judge`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import MultiMapping

from proxy.auth.authenticator import AuthFailure, AuthResult
from proxy.auth.client_address import Address, client_address
from proxy.auth.routes import PathError, RouteMatch, scope_allows
from proxy.auth.tokens import TokenRecord
from proxy.config import AGENCY_KEY_NAME, Credential
from proxy.errors import Reason
from proxy.runtime import Runtime

API_PREFIX = "/api/v1/"
AGENCY_PREFIX = "/api/v1/agency/"
# Methods whose answer is the request as the server received it (TRACE, and IIS's TRACK):
# with the real key the gateway put in it. Never forwarded, whatever the token may do.
_REFLECTING = frozenset({"TRACE", "TRACK"})


# Not frozen: a frozen dataclass's __init__ costs three times as much, and every admitted
# request makes one. Nothing writes to it after the gate.
@dataclass(slots=True)
class Passed:
    """The request may be admitted: its token, its route, and the echowin key it goes
    with."""

    token: TokenRecord
    match: RouteMatch
    credential: Credential


@dataclass(frozen=True, slots=True)
class Refused:
    """The request is refused for ``reason``. What the access log and the answer need:
    ``token`` and ``route`` (the route's template) when known by then; ``detail``: the
    path's fault (``bad_path``), the unknown path (``unknown_route``), or the missing scope
    (``missing_scope``); ``retry_after``: seconds (``auth_throttled``)."""

    reason: Reason
    token: TokenRecord | None = None
    route: str | None = None
    detail: str = ""
    retry_after: int = 0


class Unverified:
    """A presented token this process has not verified lately: ``raw``, to look up."""

    __slots__ = ("raw",)

    def __init__(self, raw: str) -> None:
        self.raw = raw


AUTH_FAILURES = frozenset(Reason(failure.value) for failure in AuthFailure)
"""The refusals of a token itself (401): each is charged to its client's throttle."""
_AUTH_REFUSED = {failure: Refused(Reason(failure.value)) for failure in AuthFailure}
OTHER_SCHEME = "scheme"
"""A missing token's ``detail`` when an Authorization field of another scheme than Bearer
came (``Authorization: egw_...``, ``Basic ...``): the answer says so."""
_NO_BEARER = Refused(Reason.MISSING, detail=OTHER_SCHEME)


def gate(
    rt: Runtime,
    method: str,
    target: str,
    fields: MultiMapping[str],
    peer: str | None,
    known: AuthResult | None = None,
) -> Passed | Refused | Unverified:
    """The request ``method target`` with header ``fields`` from ``peer``, through the
    gate. Its client's throttle is asked first, before any lookup; then its token:
    ``known`` when the caller looked it up already, else recalled if verified lately, else
    :class:`Unverified`; then :func:`judge`."""
    retry = throttled(rt, peer, fields)
    if retry is not None:
        return _throttled(retry)
    if known is None:
        raw = presented_token(fields, target)
        if not raw:
            if raw == "" and _other_scheme(fields):
                return _NO_BEARER
            return _AUTH_REFUSED[AuthFailure.MISSING]
        known = rt.auth.recall(raw)
        if known is None:
            return Unverified(raw)
    return judge(rt, known, method, target)


def judge(rt: Runtime, auth: AuthResult, method: str, target: str) -> Passed | Refused:
    """The gate past the throttle, given the token's verdict ``auth``: the token, then the
    route the target's path matches, whether the token may take it, and the key it goes
    with."""
    token = auth.record
    if token is None:
        return _AUTH_REFUSED[auth.failure or AuthFailure.MISSING]
    try:
        match = rt.routes.match(method, target.partition("?")[0])
    except PathError as exc:
        return Refused(Reason.BAD_PATH, token, detail=exc.reason)
    denied = _denied(token, match, method)
    if denied is not None:
        return denied
    credential = credential_of(rt, token, match)
    if credential is None:
        return Refused(Reason.NO_CREDENTIAL, token, match.template)
    return Passed(token, match, credential)


def _denied(token: TokenRecord, match: RouteMatch, method: str) -> Refused | None:
    """None when ``token`` may take the route ``match``; otherwise why not."""
    if method in _REFLECTING:
        return Refused(Reason.METHOD_NOT_ALLOWED, token, match.template)
    if match.route is None:
        if "*" in token.scopes and match.path.startswith(API_PREFIX):
            return None
        return Refused(Reason.UNKNOWN_ROUTE, token, match.template, match.path)
    if scope_allows(token.scopes, match.route.scope):
        return None
    return Refused(Reason.MISSING_SCOPE, token, match.template, match.route.scope)


def credential_of(rt: Runtime, token: TokenRecord, match: RouteMatch) -> Credential | None:
    """The echowin key a request of ``token`` on ``match`` goes with, if configured."""
    name = AGENCY_KEY_NAME if match.family == "agency" else token.upstream_key
    return rt.secrets.credentials.get(name)


@functools.lru_cache(maxsize=16)
def _throttled(retry: int) -> Refused:
    # A throttled client is refused again and again, with the same Retry-After.
    return Refused(Reason.AUTH_THROTTLED, retry_after=retry)


def _other_scheme(fields: Mapping[str, str]) -> bool:
    """True when the Authorization field names a scheme other than Bearer."""
    scheme, _, _ = fields.get("Authorization", "").strip().partition(" ")
    return bool(scheme) and scheme.lower() != "bearer"


def presented_token(headers: Mapping[str, str], raw_path: str) -> str | None:
    """The token as presented (``Authorization: Bearer``, ``X-API-Key``, or on an agency
    path ``X-AGENCY-KEY``); "" for another Authorization scheme, None for none."""
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""
    key = headers.get("X-API-Key")
    if key is not None:
        return key.strip()
    if raw_path.startswith(AGENCY_PREFIX):
        return headers.get("X-AGENCY-KEY")
    return None


def client(rt: Runtime, peer: str | None, fields: MultiMapping[str]) -> Address | None:
    """The request's client (proxy/auth/client_address.py): ``peer``, or whom a trusted
    proxy names in X-Forwarded-For."""
    return client_address(peer, fields.getall("X-Forwarded-For", ()), rt.trusted_proxies)


def throttled(rt: Runtime, peer: str | None, fields: MultiMapping[str]) -> int | None:
    """The auth throttle's verdict on a request from ``peer`` with header ``fields``: the
    seconds to tell it to wait (Retry-After) when its client is refused, else None. No
    work but a clock read while no client has failed lately."""
    throttle = rt.auth_throttle
    if throttle.idle:
        return None
    return throttle.retry_after(client(rt, peer, fields))


def asks_continue(expect: str) -> bool:
    """The one expectation the gateway meets (``Expect: 100-continue``)."""
    return expect.strip().lower() == "100-continue"


def max_wait(headers: Mapping[str, str]) -> float | None:
    """The caller's own cap on queueing (``X-Gateway-Max-Wait``), seconds; None when
    absent or not a number of at least 0."""
    raw = headers.get("X-Gateway-Max-Wait")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


__all__ = [
    "AUTH_FAILURES",
    "Passed",
    "Refused",
    "Unverified",
    "asks_continue",
    "client",
    "credential_of",
    "gate",
    "judge",
    "max_wait",
    "presented_token",
    "throttled",
]
