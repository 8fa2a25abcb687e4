"""The cache key of a GET: upstream credential, route template, canonical path, query
normalised (parameters sorted by name, repeated ones kept in their order, empty ones
dropped) and the request fields that change echowin's answer (``Accept``,
``Accept-Encoding``). Pure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["CacheKey", "cache_key", "normalise_query", "vary_value"]


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
