"""JSON error answers shaped like echowin's: ``{"error": ..., "reason": ..., ...}``."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from enum import StrEnum, unique
from json.encoder import encode_basestring_ascii

from aiohttp import web

_JSON_TYPE = "application/json"


@unique
class Reason(StrEnum):
    """Why the gateway answered a request itself, or cut its answer short: one value for
    the body's ``reason``, the access log's ``refusal`` and the metrics' ``reason`` label.
    The body's names are the contract callers see. docs/operations.md ("Refusal reasons")
    lists every member with its status; tests/test_errors.py holds the two lists equal."""

    # What HTTP or the path cannot carry.
    BAD_REQUEST = "bad_request"
    BAD_PATH = "bad_path"
    BAD_EXPECT = "bad_expect"
    BODY_TOO_LARGE = "body_too_large"
    # The token (the values of proxy.auth.tokens.AuthFailure), and its client's throttle.
    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REVOKED = "revoked"
    AUTH_THROTTLED = "auth_throttled"
    # The route: what the token may take, and the key it goes with.
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNKNOWN_ROUTE = "unknown_route"
    MISSING_SCOPE = "missing_scope"
    NO_CREDENTIAL = "no_credential"
    # The budget (proxy/budget/), and the state it is kept in.
    UPSTREAM_BUDGET = "upstream_budget"
    TOKEN_QUOTA = "token_quota"  # noqa: S105 (a reason, not a secret)
    QUEUE_FULL = "queue_full"
    UPSTREAM_FROZEN = "upstream_frozen"
    STATE_UNAVAILABLE = "state_unavailable"
    SHUTTING_DOWN = "shutting_down"
    # echowin's side of the exchange.
    UPSTREAM_429 = "upstream_429"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_UNREADABLE = "upstream_unreadable"
    # The response cache: ``Cache-Control: only-if-cached`` and nothing held (504).
    NOT_CACHED = "not_cached"
    # An answer cut short once under way: in the access log only (no body can follow).
    UPSTREAM_BROKEN_BODY = "upstream_broken_body"
    UPSTREAM_KEY_IN_BODY = "upstream_key_in_body"
    CLIENT_CLOSED = "client_closed"
    INTERNAL_ERROR = "internal_error"
    # A listener's connection bounds (proxy/server/guard.py).
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TOO_MANY_CONNECTIONS_FROM_CLIENT = "too_many_connections_from_client"
    # The admin listeners.
    UNAUTHORIZED = "unauthorized"
    DISABLED = "disabled"
    NOT_FOUND = "not_found"
    NAME_TAKEN = "name_taken"
    NO_WORKER = "no_worker"
    WORKER_UNAVAILABLE = "worker_unavailable"


# A listener's connection bounds, as the 503's reason and the refused-connections metric's
# label (each exported from the start).
TOO_MANY = Reason.TOO_MANY_CONNECTIONS
TOO_MANY_FROM_CLIENT = Reason.TOO_MANY_CONNECTIONS_FROM_CLIENT
REFUSAL_REASONS: tuple[str, ...] = (TOO_MANY, TOO_MANY_FROM_CLIENT)


def _value(value: object) -> str:
    """``value`` as json.dumps writes it; str and int (the common cases) without it."""
    if type(value) is str:
        return encode_basestring_ascii(value)
    if type(value) is int:
        return str(value)
    return json.dumps(value, separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def _head(error: str, reason: str | None) -> str:
    """``{"error":...,"reason":...`` (no closing brace); the same few come back all the time."""
    if reason is None:
        return '{"error":' + encode_basestring_ascii(error)
    return (
        '{"error":'
        + encode_basestring_ascii(error)
        + ',"reason":'
        + encode_basestring_ascii(reason)
    )


def json_body(error: str, reason: str | None = None, **extra: object) -> bytes:
    """The body ``json.dumps({"error": error, "reason": reason, **extra})`` would give, with
    compact separators (no "reason" when it is None), built without a dict or an encoder."""
    out = _head(error, reason)
    for key, value in extra.items():
        out += "," + encode_basestring_ascii(key) + ":" + _value(value)
    return (out + "}").encode("ascii")


def json_response(
    status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A response with a JSON ``body`` already encoded (see ``json_body``)."""
    return web.Response(status=status, body=body, content_type=_JSON_TYPE, headers=headers)


def json_error(
    status: int,
    error: str,
    *,
    reason: Reason | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> web.Response:
    """A JSON error response. ``error`` is for people, ``reason`` a stable machine code."""
    return json_response(status, json_body(error, reason, **extra), headers)
