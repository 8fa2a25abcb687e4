"""JSON error answers shaped like echowin's: ``{"error": ..., "reason": ..., ...}``."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web


def json_error(
    status: int,
    error: str,
    *,
    reason: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> web.Response:
    """A JSON error response. ``error`` is for people, ``reason`` a stable machine code."""
    body: dict[str, object] = {"error": error}
    if reason is not None:
        body["reason"] = reason
    body.update(extra)
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        headers=headers,
    )
