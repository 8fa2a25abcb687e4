"""JSON error answers shaped like echowin's: ``{"error": ..., "reason": ..., ...}``."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii

from aiohttp import web

_JSON_TYPE = "application/json"

# A listener's connection bounds (proxy/server/guard.py), as the 503's reason and the
# refused-connections metric's label.
TOO_MANY = "too_many_connections"
TOO_MANY_FROM_CLIENT = "too_many_connections_from_client"
REFUSAL_REASONS = (TOO_MANY, TOO_MANY_FROM_CLIENT)


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
    reason: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> web.Response:
    """A JSON error response. ``error`` is for people, ``reason`` a stable machine code."""
    return json_response(status, json_body(error, reason, **extra), headers)
