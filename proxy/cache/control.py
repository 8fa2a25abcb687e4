"""Cache-Control, both ways: what a caller's request directives ask (RFC 9111 §5.2.1), and
how long echowin's answer may be kept by its own Cache-Control, Expires and Set-Cookie.
Pure: times are seconds, ``now`` passed in."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from multidict import MultiMapping

from proxy.cache.keys import keyed_vary

__all__ = ["Directives", "answer_ttl", "must_revalidate", "request_directives"]


@dataclass(frozen=True, slots=True)
class Directives:
    """A caller's request directives. ``max_stale``: None when not sent, ``inf`` when sent
    bare (any staleness), else seconds."""

    no_cache: bool = False
    no_store: bool = False
    max_age: float | None = None
    max_stale: float | None = None
    only_if_cached: bool = False


NONE = Directives()


def _directives(values: Iterable[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for value in values:
        for part in value.split(","):
            name, eq, arg = part.strip().partition("=")
            name = name.strip().lower()
            if name and name not in out:  # the first of a repeated directive counts
                out[name] = arg.strip().strip('"') if eq else None
    return out


def _seconds(arg: str | None) -> float | None:
    """A delta-seconds argument; None when missing or not a non-negative integer."""
    if arg is None or not arg.isascii() or not arg.isdigit():
        return None
    return float(arg)


def request_directives(
    cache_control: Iterable[str] | None, pragma: Iterable[str] | None = None
) -> Directives:
    """The caller's directives from its ``Cache-Control`` (and HTTP/1.0 ``Pragma:
    no-cache`` when there is no Cache-Control). An argument that is not delta-seconds is
    read the safe way: ``max-age=x`` as 0 (ask echowin), ``max-stale=x`` as not sent."""
    if cache_control is None:
        if pragma is not None and "no-cache" in _directives(pragma):
            return Directives(no_cache=True)
        return NONE
    found = _directives(cache_control)
    max_age = None
    if "max-age" in found:
        max_age = _seconds(found["max-age"])
        max_age = 0.0 if max_age is None else max_age
    max_stale = None
    if "max-stale" in found:
        arg = found["max-stale"]
        max_stale = math.inf if arg is None else _seconds(arg)
    return Directives(
        no_cache="no-cache" in found,
        no_store="no-store" in found,
        max_age=max_age,
        max_stale=max_stale,
        only_if_cached="only-if-cached" in found,
    )


def _expires_in(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds until echowin's ``Expires`` (from its ``Date`` when sent, else ``now``); 0
    for an invalid date, which RFC 9111 §5.3 reads as already expired."""
    expires = headers.get("Expires")
    if expires is None:
        return None
    try:
        at = parsedate_to_datetime(expires).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0
    base = now
    date = headers.get("Date")
    if date is not None:
        try:
            base = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            base = now
    return max(0.0, at - base)


def answer_ttl(
    ttl: float, headers: MultiMapping[str], all_cache_control: Iterable[str], now: float
) -> float:
    """How long echowin's answer may be kept, at most ``ttl`` (the route's): 0 when it
    must not be (``no-store``, ``private``, ``no-cache``, a ``Set-Cookie``, a ``Vary``
    line naming a field the key does not hold, ``*`` included); echowin's ``s-maxage``,
    else ``max-age``, else ``Expires``, shortens it."""
    if "Set-Cookie" in headers or not keyed_vary(headers.getall("Vary", ())):
        return 0.0
    found = _directives(all_cache_control)
    if "no-store" in found or "private" in found or "no-cache" in found:
        return 0.0
    for name in ("s-maxage", "max-age"):
        if name in found:
            given = _seconds(found[name])
            return min(ttl, 0.0 if given is None else given)
    expires = _expires_in(headers, now)
    return ttl if expires is None else min(ttl, expires)


def must_revalidate(all_cache_control: Iterable[str]) -> bool:
    """echowin's answer must not be served stale (``must-revalidate``, or
    ``proxy-revalidate`` to a shared cache: RFC 9111 §5.2.2.2 and §5.2.2.8)."""
    found = _directives(all_cache_control)
    return "must-revalidate" in found or "proxy-revalidate" in found
