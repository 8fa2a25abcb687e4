"""The cache key of a GET: upstream credential, route template, canonical path, query
normalised (parameters sorted by name, repeated ones kept in their order, empty ones
dropped) and the request fields that change echowin's answer (``Accept``,
``Accept-Encoding``). A GET carrying any other field that may change the answer
(:func:`unkeyed_fields`) is not keyed at all: it goes to echowin alone. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from proxy.upstream.hop_by_hop import HOP_BY_HOP

__all__ = [
    "KEYED_FIELDS",
    "PER_CALLER_FIELDS",
    "SAFE_FIELDS",
    "CacheKey",
    "cache_key",
    "keyed_vary",
    "normalise_query",
    "unkeyed_fields",
    "vary_value",
]

KEYED_FIELDS = frozenset({"accept", "accept-encoding"})
"""Request fields the key holds (lower case)."""
PER_CALLER_FIELDS = frozenset(
    {
        # Directives to the cache itself (proxy/cache/control.py).
        "cache-control",
        "pragma",
        # About the caller or the trace, not the question: echowin answers the same
        # whatever they say (a proxy in front adds the X-Forwarded ones to every request;
        # the gateway adds its own peer and request id anyway).
        "user-agent",
        "traceparent",
        "tracestate",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-request-id",
    }
)
"""Fields that reach echowin with any value a caller gives (lower case)."""
SAFE_FIELDS = (
    KEYED_FIELDS
    | PER_CALLER_FIELDS
    | HOP_BY_HOP
    | frozenset(
        {
            # The gateway's own, never sent on as the caller gave them: the token (the
            # credential's key replaces it), its wait, the framing of a GET.
            "authorization",
            "x-api-key",
            "x-agency-key",
            "x-gateway-max-wait",
            "host",
            "content-length",
        }
    )
)
"""Request fields (lower case) that never change echowin's answer beyond what the key
holds. Any other (``If-None-Match``, ``Accept-Language``, ``Prefer``, ``Cookie``, an
``X-`` field) may: such a GET is neither answered from a copy, nor shared, nor kept."""


class CacheKey(NamedTuple):
    credential: str  # the upstream credential's name: never shared across credentials
    route: str  # the route template (metrics, purges)
    path: str  # the canonical path, as forwarded
    query: str  # normalised
    accept: str
    accept_encoding: str


def normalise_query(query: str) -> str:
    """``query`` (without ``?``) with its parameters in a stable order: sorted by name,
    a name's repeated values in the order given (``tagIds=b&tagIds=a`` differs from
    ``tagIds=a&tagIds=b``: echowin may read the order). Nothing is decoded: two spellings
    of one value are two keys, which can only cost a miss."""
    parts = [part for part in query.split("&") if part]
    # sorted() is stable: equal names keep their order.
    parts.sort(key=lambda part: part.partition("=")[0])
    return "&".join(parts)


def vary_value(values: Iterable[str] | None, default: str = "") -> str:
    """The fields of one name as one canonical value: joined, lower-cased, spaces gone."""
    if values is None:
        return default
    joined = ",".join(values)
    canonical = ",".join(p.strip() for p in joined.lower().split(",") if p.strip())
    return canonical or default


def cache_key(
    credential: str,
    route: str,
    target_path: str,
    raw_target: str,
    accept: Iterable[str] | None,
    accept_encoding: Iterable[str] | None,
) -> CacheKey:
    """The key of a GET of ``raw_target`` (path and query as sent), whose canonical path
    is ``target_path``; ``accept``: its Accept fields (none reads as ``*/*``, which the
    gateway sends echowin then)."""
    query = raw_target.partition("?")[2]
    return CacheKey(
        credential,
        route,
        target_path,
        normalise_query(query),
        vary_value(accept, "*/*"),
        vary_value(accept_encoding),
    )


def unkeyed_fields(names: Iterable[str]) -> list[str]:
    """The field ``names`` (as sent) outside :data:`SAFE_FIELDS`, lower case, sorted."""
    return sorted({name.lower() for name in names} - SAFE_FIELDS)


def keyed_vary(vary: Iterable[str]) -> bool:
    """echowin's ``Vary`` fields (every line) allow one answer for every request of a
    key: none is ``*`` nor a field that reaches echowin with whatever value each caller
    gives (:data:`PER_CALLER_FIELDS`: ``User-Agent``, ...). Any other field is the same
    in every request of a key: held by the key (``Accept``), set by the gateway alike
    for all (the credential's key, ``Host``), or carried by none (``Accept-Language``,
    ``Origin``: a GET with a field outside :data:`SAFE_FIELDS` is not keyed). An answer
    that fails this is neither kept nor shared."""
    named = {p.strip().lower() for line in vary for p in line.split(",") if p.strip()}
    return "*" not in named and not (named & PER_CALLER_FIELDS)
