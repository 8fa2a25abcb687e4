"""The response cache on the admin listener: ``DELETE /admin/cache`` purges by hand
(optionally one credential's copies, optionally under one path prefix), here and on every
other worker and replica; what the cache holds and saved, for /admin/budget and the status
page (docs/cache.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from proxy.cache.purge import Purge
from proxy.errors import Reason, json_error
from proxy.runtime import RUNTIME, Runtime

__all__ = ["cache_view", "merge_cache", "purge_cache"]

_COUNTS = ("entries", "bytes", "evictions", "purged", "in_flight", "sends_saved")


def cache_view(rt: Runtime) -> dict[str, object] | None:
    """What the cache holds and saved (None when it is off)."""
    return None if rt.cache is None else rt.cache.snapshot()


def merge_cache(views: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """Every worker's :func:`cache_view`, added up (each worker keeps its own copies)."""
    present = [v for v in views if v is not None]
    if not present:
        return None
    out: dict[str, Any] = dict(present[0])
    for key in _COUNTS:
        out[key] = sum(int(v.get(key, 0)) for v in present)
    lookups: dict[str, int] = {}
    for view in present:
        for result, count in view.get("lookups", {}).items():
            lookups[result] = lookups.get(result, 0) + int(count)
    out["lookups"] = lookups
    return out


async def purge_cache(request: web.Request) -> web.Response:
    """``DELETE /admin/cache[?credential=NAME][&prefix=/api/v1/...]``: how many copies were
    dropped here; the purge is sent to the other workers and replicas too."""
    rt = request.app[RUNTIME]
    if rt.cache is None:
        return json_error(
            404, "The response cache is off (no cache: section)", reason=Reason.NOT_FOUND
        )
    credential = request.query.get("credential")
    prefix = request.query.get("prefix", "")
    if credential is not None and credential not in rt.secrets.credentials:
        return json_error(
            400, f"credential: no upstream key is named {credential!r}", reason=Reason.BAD_REQUEST
        )
    if prefix and (not prefix.startswith("/") or any(c.isspace() or c == "|" for c in prefix)):
        return json_error(
            400, "prefix: a path starting with / (no spaces)", reason=Reason.BAD_REQUEST
        )
    purged = rt.cache.purge(credential, Purge(prefixes=(prefix,)))
    return web.json_response({"purged": purged, "credential": credential, "prefix": prefix})
