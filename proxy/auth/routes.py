"""Route table: which scope each echowin endpoint needs, and the exact path we forward.

Pure: no I/O, no asyncio, no aiohttp, no regex. The gateway's least-privilege promise
(SPEC §3.6) rests on one rule kept here: a request path is normalised *before* it is
matched, anything ambiguous is refused (`PathError`, answered with 400), and what goes
upstream is rebuilt from the decoded segments we matched, so no server that decodes,
re-splits or resolves dot segments can read it as a different route.

Matching is a walk over a segment trie (dict lookups): a literal segment beats a
`{param}` segment at the same position, there is no backtracking, and the method is
looked up only on the node the path reached. So `PUT /api/v1/contacts/custom-fields`
does not fall back to `PUT /api/v1/contacts/{contactId}`; it is simply unmatched. Nor does
a segment that folds to a literal (`Custom-Fields`; `%EF%BD%83ustom-fields`, whose first
letter is a fullwidth c) take the `{param}` beside it: an upstream that routes
case-insensitively or after NFKC would read it as the literal's route, whose scope may be
wider than the param route's.

Path decoding is ``proxy.auth.paths``'s job and scope rules ``proxy.auth.scopes``'s; their
public names are re-exported here, as every user of the route table needs them with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal
from unicodedata import normalize
from urllib.parse import quote

from proxy.auth.paths import PathError, normalise_path
from proxy.auth.scopes import (
    WILDCARD,
    check_route_scope,
    is_valid_scope,
    known_scopes,
    scope_allows,
)

__all__ = [
    "DEFAULT_ROUTES",
    "HTTP_METHODS",
    "UNMATCHED_TEMPLATE",
    "WILDCARD",
    "Family",
    "PathError",
    "Route",
    "RouteMatch",
    "RouteTable",
    "is_valid_scope",
    "known_scopes",
    "normalise_path",
    "scope_allows",
]

Family = Literal["team", "agency"]
"""Which upstream credential a route uses: team -> X-API-Key, agency -> X-AGENCY-KEY."""

UNMATCHED_TEMPLATE: Final = "unmatched"
"""Template label for paths no route matched (a bounded metrics label, never a raw path)."""

HTTP_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

API_PREFIX: Final = "/api/v1/"
AGENCY_PREFIX: Final = "/api/v1/agency/"

# RouteTable.match remembers this many answers, for paths up to this long (bounded memory:
# paths are chosen by callers). Past the bound it starts over.
MATCH_CACHE_SIZE: Final = 4096
MATCH_CACHE_PATH_LENGTH: Final = 512

# Characters quote(..., safe="") never escapes; template literals must use only these so
# the literal we forward is byte-for-byte the one we matched.
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream endpoint: method + path template -> the scope a token needs.

    Construction validates (ValueError with a message naming the field), so config can
    build routes from YAML and report the message as is:
    - `method`: one of HTTP_METHODS, upper-case exactly;
    - `template`: starts with /api/v1/, is itself a normal path (no empty or dot segments,
      no percent escapes), literal segments use only A-Z a-z 0-9 - . _ ~, and a parameter
      is a whole segment `{name}` with a unique identifier name;
    - `scope`: a concrete scope, ':'-separated non-empty parts of a-z 0-9 _ -. Wildcards
      are for tokens, not routes.
    `family` is derived, never passed: "agency" iff the template starts with /api/v1/agency/.
    """

    method: str
    template: str
    scope: str
    family: Family = field(init=False)

    def __post_init__(self) -> None:
        if self.method not in HTTP_METHODS:
            allowed = ", ".join(sorted(HTTP_METHODS))
            raise ValueError(f"route method {self.method!r}: must be one of {allowed}")
        _template_shape(self.template)
        check_route_scope(self.scope)
        family: Family = "agency" if self.template.startswith(AGENCY_PREFIX) else "team"
        # Frozen dataclass: the derived field is set once, here, and never again.
        object.__setattr__(self, "family", family)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The outcome of matching one request.

    `route` is None when no known route matched (the caller answers 404 unless the token
    holds "*"); `template` is then UNMATCHED_TEMPLATE. `path` is the canonical,
    percent-encoded path to forward upstream (without query string). `family` is the
    route's, or for unmatched paths "agency" iff the first three segments are api, v1,
    agency compared case-insensitively and after NFKC: should the upstream route so, an
    agency-looking path still gets the agency credential and never the team key.
    """

    route: Route | None
    template: str
    path: str
    family: Family


def _template_shape(template: str) -> tuple[str, ...]:
    """Validate a template; return its segments with every parameter as "{}".

    Two templates with the same shape match exactly the same paths.
    """
    where = f"route template {template!r}"
    if not template.startswith(API_PREFIX):
        raise ValueError(f"{where}: must start with {API_PREFIX}")
    try:
        normalise_path(template)
    except PathError as exc:
        raise ValueError(f"{where}: {exc.reason}") from None
    shape: list[str] = []
    names: set[str] = set()
    for segment in template[1:].split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            name = segment[1:-1]
            if not (name.isascii() and name.isidentifier()):
                raise ValueError(f"{where}: parameter {segment!r} needs an identifier name")
            if name in names:
                raise ValueError(f"{where}: parameter {segment!r} appears twice")
            names.add(name)
            shape.append("{}")
        elif "{" in segment or "}" in segment:
            raise ValueError(f"{where}: a parameter must be a whole segment like {{name}}")
        elif not _UNRESERVED.issuperset(segment):
            raise ValueError(f"{where}: literal segments use only A-Z a-z 0-9 - . _ ~")
        else:
            shape.append(segment)
    return tuple(shape)


@dataclass(frozen=True, slots=True)
class _Node:
    """One trie level: literal children win over the param child; methods end here."""

    literals: Mapping[str, _Node]
    param: _Node | None
    methods: Mapping[str, Route]
    folded: frozenset[str] = frozenset()
    """The literals' `_fold`s, kept only beside a param child (the only place they matter)."""


def _build(entries: Sequence[tuple[tuple[str, ...], Route]], depth: int) -> _Node:
    """Build the (immutable) subtrie for routes sharing the first `depth` shape segments."""
    methods: dict[str, Route] = {}
    literal_groups: dict[str, list[tuple[tuple[str, ...], Route]]] = {}
    param_group: list[tuple[tuple[str, ...], Route]] = []
    for shape, route in entries:
        if len(shape) == depth:
            methods[route.method] = route
        elif shape[depth] == "{}":
            param_group.append((shape, route))
        else:
            literal_groups.setdefault(shape[depth], []).append((shape, route))
    literals = {seg: _build(group, depth + 1) for seg, group in literal_groups.items()}
    return _Node(
        literals=MappingProxyType(literals),
        param=_build(param_group, depth + 1) if param_group else None,
        methods=MappingProxyType(methods),
        folded=frozenset(map(_fold, literals)) if param_group else frozenset(),
    )


def _fold(segment: str) -> str:
    """`segment` as a case-insensitive, NFKC-normalising router would compare it."""
    if segment.isascii():
        return segment.lower()
    return normalize("NFKC", normalize("NFKC", segment).casefold())


class RouteTable:
    """An immutable set of routes, matched by a dict walk over path segments.

    Duplicates (same method and same template shape, whatever the parameter names) are a
    ValueError naming both. Matching never uses regular expressions.
    """

    __slots__ = ("_matches", "_root", "routes")

    routes: tuple[Route, ...]

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        entries: list[tuple[tuple[str, ...], Route]] = []
        seen: dict[tuple[str, tuple[str, ...]], Route] = {}
        for route in self.routes:
            shape = _template_shape(route.template)
            earlier = seen.setdefault((route.method, shape), route)
            if earlier is not route:
                raise ValueError(
                    f"duplicate route {route.method} {route.template}"
                    f" (same as {earlier.method} {earlier.template})"
                )
            entries.append((shape, route))
        self._root = _build(entries, 0)
        # Answers already given: the table is immutable and a match depends only on its
        # arguments. Refused paths are not kept (they raise every time).
        self._matches: dict[tuple[str, str], RouteMatch] = {}

    def match(self, method: str, raw_path: str) -> RouteMatch:
        """Normalise `raw_path` (may raise PathError), then match it case-exactly.

        `method` must equal a route's method exactly ("get" matches nothing). The path
        picks one trie node, literal segments first and without backtracking; a method
        missing on that node gives an unmatched result rather than a looser route, and so
        does a segment that is not a literal but folds to one (`_fold`) where a `{param}`
        could have taken it.
        """
        key = (method, raw_path)
        found = self._matches.get(key)
        if found is None:
            found = self._match(method, raw_path)
            if len(raw_path) <= MATCH_CACHE_PATH_LENGTH:
                if len(self._matches) >= MATCH_CACHE_SIZE:
                    self._matches.clear()
                self._matches[key] = found
        return found

    def _match(self, method: str, raw_path: str) -> RouteMatch:
        segments = normalise_path(raw_path)
        route = self._lookup(method, segments)
        path = "/" + "/".join(quote(segment, safe="") for segment in segments)
        if route is not None:
            return RouteMatch(route=route, template=route.template, path=path, family=route.family)
        head = [_fold(segment) for segment in segments[:3]]
        family: Family = "agency" if head == ["api", "v1", "agency"] else "team"
        return RouteMatch(route=None, template=UNMATCHED_TEMPLATE, path=path, family=family)

    def _lookup(self, method: str, segments: Sequence[str]) -> Route | None:
        node = self._root
        for segment in segments:
            child = node.literals.get(segment)
            if child is None:
                if node.param is None or (node.folded and _fold(segment) in node.folded):
                    return None
                child = node.param
            node = child
        return node.methods.get(method)

    def __len__(self) -> int:
        return len(self.routes)

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def __repr__(self) -> str:
        return f"RouteTable({len(self.routes)} routes)"


DEFAULT_ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", "/api/v1/contacts", "contacts:read"),
    Route("POST", "/api/v1/contacts", "contacts:write"),
    Route("GET", "/api/v1/contacts/{contactId}", "contacts:read"),
    Route("PUT", "/api/v1/contacts/{contactId}", "contacts:write"),
    Route("DELETE", "/api/v1/contacts/{contactId}", "contacts:delete"),
    Route("POST", "/api/v1/contacts/bulk", "contacts:write"),
    Route("GET", "/api/v1/contacts/{contactId}/notes", "contacts:read"),
    Route("POST", "/api/v1/contacts/{contactId}/notes", "contacts:write"),
    Route("GET", "/api/v1/contacts/{contactId}/assignments", "contacts:read"),
    Route("POST", "/api/v1/contacts/{contactId}/assignments", "contacts:write"),
    Route("PUT", "/api/v1/contacts/{contactId}/assignments", "contacts:write"),
    Route("POST", "/api/v1/contacts/{contactId}/boards", "contacts:write"),
    Route("PUT", "/api/v1/contacts/{contactId}/boards", "contacts:write"),
    Route("GET", "/api/v1/contacts/custom-fields", "contacts:read"),
    Route("GET", "/api/v1/boards", "boards:read"),
    Route("GET", "/api/v1/tags", "tags:read"),
    Route("POST", "/api/v1/tags", "tags:write"),
    Route("POST", "/api/v1/agency/subteams", "agency:subteams:write"),
)
"""Every endpoint of SPEC §2 with its scope per the §4 table."""
