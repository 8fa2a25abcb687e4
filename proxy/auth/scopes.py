"""Scopes: what a token holds against what a route needs (pure).

A route needs one concrete scope (``contacts:read``); a token holds scopes, where ``*``
grants everything and a scope ending in ``:*`` grants every scope under its prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from proxy.auth.routes import Route

__all__ = [
    "WILDCARD",
    "check_route_scope",
    "is_valid_scope",
    "known_scopes",
    "scope_allows",
]

WILDCARD: Final = "*"
"""The scope that grants every route, known or not."""

_SCOPE_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


def check_route_scope(scope: str) -> None:
    """ValueError naming ``scope`` unless it is a concrete route scope."""
    if not scope:
        raise ValueError("route scope is empty")
    if not all(part and _SCOPE_CHARS.issuperset(part) for part in scope.split(":")):
        raise ValueError(
            f"route scope {scope!r}: must be ':'-separated parts of a-z 0-9 _ - "
            "(lower-case; wildcards belong to tokens, not routes)"
        )


def scope_allows(granted: Iterable[str], needed: str) -> bool:
    """True iff a token holding `granted` may use a route needing `needed`.

    "*" grants everything, including unknown routes (ask with needed="*"). A scope ending
    in ":*" grants every scope that starts with what precedes the "*" and goes on after
    it ("agency:*" grants "agency:subteams:write"). Any other scope grants only itself.
    Comparison is case-exact; there are no partial prefixes ("contacts" grants nothing).
    """
    if isinstance(granted, str):
        # A bare string would be iterated character by character, and "*" is a character.
        raise TypeError("granted must be a collection of scopes, not a str")
    for scope in granted:
        if scope in (WILDCARD, needed):
            return True
        if scope.endswith(":*"):
            prefix = scope[:-1]
            if len(needed) > len(prefix) and needed.startswith(prefix):
                return True
    return False


def known_scopes(routes: Iterable[Route]) -> frozenset[str]:
    """Every scope a token may be created with: each route scope, "*", and each wildcard
    that grants at least one route scope ("agency:*" and "agency:subteams:*" for
    "agency:subteams:write")."""
    scopes = {WILDCARD}
    for route in routes:
        scopes.add(route.scope)
        parts = route.scope.split(":")
        scopes.update(":".join(parts[:n]) + ":*" for n in range(1, len(parts)))
    return frozenset(scopes)


def is_valid_scope(scope: str, routes: Iterable[Route]) -> bool:
    """True iff `scope` is one of known_scopes(routes)."""
    return scope in known_scopes(routes)
