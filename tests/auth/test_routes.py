"""Unit tests for proxy.auth.routes: route table, path normalisation, scopes. No sockets."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import posixpath
import re
import types
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.auth import paths, routes, scopes
from proxy.auth.routes import (
    DEFAULT_ROUTES,
    UNMATCHED_TEMPLATE,
    Family,
    PathError,
    Route,
    RouteMatch,
    RouteTable,
    is_valid_scope,
    known_scopes,
    normalise_path,
    scope_allows,
)

TABLE = RouteTable(DEFAULT_ROUTES)
C = "/api/v1/contacts"
CID = "/api/v1/contacts/{contactId}"

# Every endpoint of SPEC §2, with its scope per the §4 table: (method, template, scope).
SPEC_ENDPOINTS = [
    ("GET", C, "contacts:read"),
    ("POST", C, "contacts:write"),
    ("GET", CID, "contacts:read"),
    ("PUT", CID, "contacts:write"),
    ("DELETE", CID, "contacts:delete"),
    ("POST", f"{C}/bulk", "contacts:write"),
    ("GET", f"{CID}/notes", "contacts:read"),
    ("POST", f"{CID}/notes", "contacts:write"),
    ("GET", f"{CID}/assignments", "contacts:read"),
    ("POST", f"{CID}/assignments", "contacts:write"),
    ("PUT", f"{CID}/assignments", "contacts:write"),
    ("POST", f"{CID}/boards", "contacts:write"),
    ("PUT", f"{CID}/boards", "contacts:write"),
    ("GET", f"{C}/custom-fields", "contacts:read"),
    ("GET", "/api/v1/boards", "boards:read"),
    ("GET", "/api/v1/tags", "tags:read"),
    ("POST", "/api/v1/tags", "tags:write"),
    ("POST", "/api/v1/agency/subteams", "agency:subteams:write"),
]


def test_public_api_is_pinned() -> None:
    assert sorted(routes.__all__) == sorted(
        [
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
    )


@pytest.mark.parametrize("module", [routes, paths, scopes])
def test_module_is_pure_and_regex_free(module: types.ModuleType) -> None:
    tree = ast.parse(inspect.getsource(module))
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    # Besides the standard library, only each other: the route table, paths and scopes.
    imported -= {"proxy.auth.routes", "proxy.auth.paths", "proxy.auth.scopes"}
    assert imported <= {
        "__future__",
        "collections.abc",
        "dataclasses",
        "types",
        "typing",
        "unicodedata",
        "urllib.parse",
    }


# --- the default table --------------------------------------------------------------------


def test_default_routes_are_exactly_the_spec_endpoints() -> None:
    assert [(r.method, r.template, r.scope) for r in DEFAULT_ROUTES] == SPEC_ENDPOINTS
    assert len(TABLE) == len(SPEC_ENDPOINTS)
    assert TABLE.routes == DEFAULT_ROUTES
    assert list(TABLE) == list(DEFAULT_ROUTES)


@pytest.mark.parametrize(("method", "template", "scope"), SPEC_ENDPOINTS)
def test_every_spec_endpoint_matches(method: str, template: str, scope: str) -> None:
    path = template.replace("{contactId}", "cm1a2b3c4d5e6f7g8h9")
    match = TABLE.match(method, path)
    assert match.route is not None
    assert match.route.scope == scope
    assert match.template == template
    assert match.path == path
    family = "agency" if template.startswith("/api/v1/agency/") else "team"
    assert match.family == match.route.family == family


def test_literal_segment_wins_over_param() -> None:
    assert TABLE.match("GET", f"{C}/custom-fields").template == f"{C}/custom-fields"
    assert TABLE.match("GET", f"{C}/custom-field").template == CID
    assert TABLE.match("GET", f"{C}/bulk2").template == CID


@pytest.mark.parametrize(
    "segment", ["Custom-Fields", "BULK", "Bulk", "%EF%BD%82ulk", "%EF%BC%A2%EF%BC%B5LK"]
)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_a_segment_folding_to_a_literal_never_takes_the_param(method: str, segment: str) -> None:
    # A case-insensitive (or NFKC-folding) upstream would read it as the literal's route.
    match = TABLE.match(method, f"{C}/{segment}")
    assert match.route is None
    assert match.template == UNMATCHED_TEMPLATE


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", C),
        ("PATCH", f"{C}/abc"),
        ("DELETE", f"{C}/abc/notes"),
        ("GET", "/api/v1/agency/subteams"),
        ("HEAD", "/api/v1/tags"),
        # The literal node is chosen first and has no such method: no fallback to {contactId}.
        ("GET", f"{C}/bulk"),
        ("PUT", f"{C}/custom-fields"),
        ("DELETE", f"{C}/custom-fields"),
        # No backtracking from a literal into the param branch.
        ("GET", f"{C}/custom-fields/notes"),
        ("POST", f"{C}/bulk/boards"),
        # Methods are case-exact.
        ("get", C),
        ("Get", C),
    ],
)
def test_wrong_method_or_shadowed_path_is_unmatched(method: str, path: str) -> None:
    match = TABLE.match(method, path)
    assert match.route is None
    assert match.template == UNMATCHED_TEMPLATE


@pytest.mark.parametrize(
    "path",
    [
        "/API/v1/contacts",
        "/api/V1/contacts",
        "/api/v1/Contacts",
        "/api/v1/CONTACTS",
        "/api/v1/contacts/abc/Notes",
        "/api/v1/Tags",
        "/api/v1/%54ags",
        "/api/v1/AGENCY/subteams",
        "/api/v1/agency/Subteams",
        "/api",
        "/api/v1",
        "/api/v2/contacts",
        "/",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_case_games_and_unknown_paths_are_unmatched(method: str, path: str) -> None:
    match = TABLE.match(method, path)
    assert match.route is None
    assert match.template == UNMATCHED_TEMPLATE


def test_escaped_unreserved_letters_are_just_letters() -> None:
    match = TABLE.match("GET", "/api/v1/%74ag%73")
    assert match.template == "/api/v1/tags"
    assert match.path == "/api/v1/tags"


@pytest.mark.parametrize(
    ("path", "family"),
    [
        ("/api/v1/agency/teams", "agency"),
        ("/API/V1/AGENCY/subteams", "agency"),
        ("/api/v1/Agency", "agency"),
        ("/api/v1/%EF%BD%81gency/subteams", "agency"),
        ("/api/v1/%EF%BC%A1GENCY", "agency"),
        ("/api/v1/agencyx/subteams", "team"),
        ("/api/v2/agency/subteams", "team"),
        ("/api/v1/agents", "team"),
        ("/", "team"),
    ],
)
def test_unmatched_family_is_case_insensitive_agency_prefix(path: str, family: Family) -> None:
    match = TABLE.match("POST", path)
    assert match == RouteMatch(route=None, template=UNMATCHED_TEMPLATE, path=path, family=family)


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        (f"{C}/a%20b", f"{C}/a%20b"),
        (f"{C}/a b", f"{C}/a%20b"),
        (f"{C}/%41bc", f"{C}/Abc"),
        (f"{C}/a+b", f"{C}/a%2Bb"),
        (f"{C}/a:b@c", f"{C}/a%3Ab%40c"),
        (f"{C}/a%3ab", f"{C}/a%3Ab"),
        (f"{C}/é", f"{C}/%C3%A9"),
        (f"{C}/%c3%a9", f"{C}/%C3%A9"),
        (f"{C}/a.b~c_d-e", f"{C}/a.b~c_d-e"),
        (f"{C}/...x", f"{C}/...x"),
        (f"{C}/550e8400-e29b-41d4-a716-446655440000", f"{C}/550e8400-e29b-41d4-a716-446655440000"),
    ],
)
def test_param_is_forwarded_canonically(raw: str, forwarded: str) -> None:
    match = TABLE.match("GET", raw)
    assert match.template == CID
    assert match.path == forwarded
    assert TABLE.match("GET", forwarded) == match


def test_unmatched_path_is_forwarded_canonically() -> None:
    assert TABLE.match("GET", "/api/v1/calls/a%20b/x+y").path == "/api/v1/calls/a%20b/x%2By"


# --- path refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "path must start with /"),
        ("api/v1/contacts", "path must start with /"),
        ("http://echo.win/api/v1/contacts", "path must start with /"),
        ("*", "path must start with /"),
        ("//api/v1/contacts", "empty path segment"),
        ("/api//v1/contacts", "empty path segment"),
        ("/api/v1/contacts/", "trailing slash"),
        ("/api/v1/contacts//", "empty path segment"),
        ("/api/v1/./contacts", "dot segment"),
        ("/api/v1/contacts/..", "dot segment"),
        ("/api/v1/tags/../contacts", "dot segment"),
        ("/api/v1/contacts/...", "dot segment"),
        ("/api/v1/contacts/%2e", "encoded dot"),
        ("/api/v1/contacts/%2E%2E", "encoded dot"),
        ("/api/v1/contacts/.%2e", "encoded dot"),
        ("/api/v1/contacts/a%2Eb", "encoded dot"),
        ("/api/v1/contacts/a%2Fnotes", "encoded slash"),
        ("/api/v1/contacts/a%2fnotes", "encoded slash"),
        ("/api/v1/contacts/a%5Cb", "encoded backslash"),
        ("/api/v1/contacts/a%5cb", "encoded backslash"),
        ("/api/v1/contacts\\abc", "backslash"),
        ("/api/v1/contacts/a%00", "encoded NUL"),
        ("/api/v1/contacts/a\x00", "control character"),
        ("/api/v1/contacts/a%0A", "control character"),
        ("/api/v1/contacts/a\r\nX-Evil: 1", "control character"),
        ("/api/v1/contacts/a%7f", "control character"),
        ("/api/v1/contacts/a%C2%85", "control character"),
        ("/api/v1/contacts/a\x85", "control character"),
        ("/api/v1/contacts/a%252F", "double encoding (%25)"),
        ("/api/v1/contacts/a%25", "double encoding (%25)"),
        ("/api/v1/contacts;x=1", "path parameter (;)"),
        ("/api/v1/contacts/a;b/notes", "path parameter (;)"),
        ("/api/v1/contacts/a%3Bb", "path parameter (;)"),
        ("/api/v1/contacts/a%3bb", "path parameter (;)"),
        ("/api/v1/contacts/a%3F", "encoded ? or #"),
        ("/api/v1/contacts/a%23", "encoded ? or #"),
        ("/api/v1/contacts?page=2", "query or fragment in path"),
        ("/api/v1/contacts#x", "query or fragment in path"),
        ("/api/v1/contacts/%zz", "malformed percent escape"),
        ("/api/v1/contacts/%", "malformed percent escape"),
        ("/api/v1/contacts/a%2", "malformed percent escape"),
        ("/api/v1/contacts/%+1", "malformed percent escape"),
        ("/api/v1/contacts/%ff", "invalid UTF-8"),
        ("/api/v1/contacts/%C0%AE", "invalid UTF-8"),  # overlong "."
        ("/api/v1/contacts/%ED%A0%80", "invalid UTF-8"),  # encoded surrogate
        ("/api/v1/contacts/\udcc3", "invalid UTF-8"),  # surrogateescape'd raw byte
        ("/api/v1/contacts/\uff0e\uff0e", "unicode lookalike of a path delimiter"),
        ("/api/v1/contacts/\u2025", "unicode lookalike of a path delimiter"),
        ("/api/v1/contacts/a\uff0fnotes", "unicode lookalike of a path delimiter"),
        ("/api/v1/contacts/a%EF%BC%8Fb", "unicode lookalike of a path delimiter"),
        ("/" + "a" * 8192, "path too long"),
    ],
)
def test_refused_paths(raw: str, reason: str) -> None:
    with pytest.raises(PathError) as info:
        normalise_path(raw)
    assert info.value.reason == reason
    with pytest.raises(PathError):
        TABLE.match("GET", raw)


def test_path_error_is_a_value_error_that_does_not_echo_the_path() -> None:
    with pytest.raises(ValueError, match="encoded slash") as info:
        normalise_path("/api/v1/contacts/secret-id%2F")
    assert "secret-id" not in str(info.value)


def test_root_and_plain_paths_normalise() -> None:
    assert normalise_path("/") == []
    assert normalise_path("/api/v1/contacts/a%20b") == ["api", "v1", "contacts", "a b"]
    assert normalise_path("/a/%7E%7e/.x/x./é") == ["a", "~~", ".x", "x.", "é"]


# --- scopes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("granted", "needed", "allowed"),
    [
        (["*"], "contacts:read", True),
        (["*"], "agency:subteams:write", True),
        (["*"], "*", True),
        (["contacts:read"], "contacts:read", True),
        (["tags:read", "contacts:read"], "contacts:read", True),
        (["contacts:*"], "contacts:read", True),
        (["contacts:*"], "contacts:delete", True),
        (["agency:*"], "agency:subteams:write", True),
        (["agency:subteams:*"], "agency:subteams:write", True),
        ([], "contacts:read", False),
        (["contacts:read"], "contacts:write", False),
        (["contacts"], "contacts:read", False),
        (["contact:*"], "contacts:read", False),
        (["Contacts:read"], "contacts:read", False),
        (["CONTACTS:*"], "contacts:read", False),
        (["contacts:read "], "contacts:read", False),
        (["contacts:rea"], "contacts:read", False),
        (["contacts:read:*"], "contacts:read", False),
        (["contacts*"], "contacts:read", False),
        (["contacts:"], "contacts:read", False),
        (["contacts:*"], "contacts:", False),
        (["contacts:*"], "tags:read", False),
        (["contacts:*"], "*", False),
        (["agency:subteams:*"], "agency:teams:write", False),
        ([":*"], "contacts:read", False),
        (["*:*"], "contacts:read", False),
        (["**"], "contacts:read", False),
    ],
)
def test_scope_allows(granted: list[str], needed: str, allowed: bool) -> None:
    assert scope_allows(granted, needed) is allowed
    assert scope_allows(frozenset(granted), needed) is allowed
    assert scope_allows(iter(granted), needed) is allowed


def test_scope_allows_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError):
        scope_allows("contacts:r*", "contacts:read")


def test_known_scopes() -> None:
    assert known_scopes(DEFAULT_ROUTES) == {
        "*",
        "contacts:*",
        "contacts:read",
        "contacts:write",
        "contacts:delete",
        "tags:*",
        "tags:read",
        "tags:write",
        "boards:*",
        "boards:read",
        "agency:*",
        "agency:subteams:*",
        "agency:subteams:write",
    }
    assert known_scopes(TABLE) == known_scopes(DEFAULT_ROUTES)
    assert known_scopes([]) == {"*"}


@pytest.mark.parametrize(
    ("scope", "valid"),
    [
        ("contacts:read", True),
        ("contacts:*", True),
        ("agency:subteams:*", True),
        ("*", True),
        ("contacts", False),
        ("contacts:list", False),
        ("Contacts:read", False),
        ("calls:*", False),
        ("", False),
    ],
)
def test_is_valid_scope(scope: str, valid: bool) -> None:
    assert is_valid_scope(scope, DEFAULT_ROUTES) is valid


# --- route and table validation -----------------------------------------------------------


def test_route_family_is_derived() -> None:
    assert Route("POST", "/api/v1/agency/subteams", "agency:subteams:write").family == "agency"
    assert Route("GET", "/api/v1/agencyx", "agency:read").family == "team"
    assert Route("GET", "/api/v1/agency", "agency:read").family == "team"
    route = Route("GET", "/api/v1/tags", "tags:read")
    with pytest.raises(dataclasses.FrozenInstanceError):
        route.scope = "*"  # type: ignore[misc]
    assert dataclasses.replace(route, template="/api/v1/agency/tags").family == "agency"


@pytest.mark.parametrize(
    ("method", "template", "scope", "message"),
    [
        ("get", "/api/v1/tags", "tags:read", "route method 'get'"),
        ("FETCH", "/api/v1/tags", "tags:read", "route method 'FETCH'"),
        ("", "/api/v1/tags", "tags:read", "route method ''"),
        ("GET", "/tags", "tags:read", "must start with /api/v1/"),
        ("GET", "/api/v2/tags", "tags:read", "must start with /api/v1/"),
        ("GET", "api/v1/tags", "tags:read", "must start with /api/v1/"),
        ("GET", "/api/v1/", "tags:read", "trailing slash"),
        ("GET", "/api/v1/tags/", "tags:read", "trailing slash"),
        ("GET", "/api/v1//tags", "tags:read", "empty path segment"),
        ("GET", "/api/v1/../tags", "tags:read", "dot segment"),
        ("GET", "/api/v1/t%61gs", "tags:read", "literal segments use only"),
        ("GET", "/api/v1/t ags", "tags:read", "literal segments use only"),
        ("GET", "/api/v1/tags:x", "tags:read", "literal segments use only"),
        ("GET", "/api/v1/tags;x", "tags:read", "path parameter (;)"),
        ("GET", "/api/v1/tags/{id", "tags:read", "whole segment"),
        ("GET", "/api/v1/tags/x{id}", "tags:read", "whole segment"),
        ("GET", "/api/v1/tags/{a}{b}", "tags:read", "identifier name"),
        ("GET", "/api/v1/tags/{}", "tags:read", "identifier name"),
        ("GET", "/api/v1/tags/{1id}", "tags:read", "identifier name"),
        ("GET", "/api/v1/tags/{tag-id}", "tags:read", "identifier name"),
        ("GET", "/api/v1/tags/{id}/x/{id}", "tags:read", "appears twice"),
        ("GET", "/api/v1/tags", "", "route scope is empty"),
        ("GET", "/api/v1/tags", "*", "route scope '*'"),
        ("GET", "/api/v1/tags", "tags:*", "route scope 'tags:*'"),
        ("GET", "/api/v1/tags", "Tags:read", "lower-case"),
        ("GET", "/api/v1/tags", "tags::read", "route scope"),
        ("GET", "/api/v1/tags", "tags:read ", "route scope"),
        ("GET", "/api/v1/tags", ":read", "route scope"),
    ],
)
def test_route_validation(method: str, template: str, scope: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Route(method, template, scope)


def test_table_refuses_duplicates_naming_them() -> None:
    route = Route("GET", "/api/v1/tags", "tags:read")
    with pytest.raises(ValueError, match=r"duplicate route GET /api/v1/tags"):
        RouteTable([route, Route("GET", "/api/v1/tags", "tags:write")])
    with pytest.raises(ValueError, match=r"/api/v1/contacts/\{id\}.*\{contactId\}"):
        RouteTable([*DEFAULT_ROUTES, Route("GET", "/api/v1/contacts/{id}", "x:y")])
    # The same template under another method is not a duplicate.
    assert len(RouteTable([route, Route("POST", "/api/v1/tags", "tags:write")])) == 2


def test_table_is_extendable() -> None:
    table = RouteTable(
        [
            *DEFAULT_ROUTES,
            Route("GET", "/api/v1/agents", "agents:read"),
            Route("GET", "/api/v1/agents/{agentId}/calls/{callId}", "calls:read"),
            Route("GET", "/api/v1/calls/{id}", "calls:read"),
            # A differently named param at a position another template already uses.
            Route("PATCH", "/api/v1/contacts/{id}", "contacts:write"),
        ]
    )
    assert table.match("GET", "/api/v1/agents").route == table.routes[-4]
    assert table.match("GET", "/api/v1/agents/a/calls/b").template == (
        "/api/v1/agents/{agentId}/calls/{callId}"
    )
    assert table.match("PATCH", f"{C}/x").template == "/api/v1/contacts/{id}"
    assert table.match("GET", f"{C}/x").template == CID
    assert "calls:*" in known_scopes(table)
    assert RouteTable([]).match("GET", "/api/v1/tags").route is None


# --- the key promise, as a property --------------------------------------------------------

LITERALS = sorted(
    {s for r in DEFAULT_ROUTES for s in r.template.split("/") if s and not s.startswith("{")}
)
DANGEROUS = [
    ".",
    "..",
    "...",
    "",
    "%2e",
    "%2E",
    "%2e%2e",
    ".%2e",
    "%2F",
    "%2f",
    "%5c",
    "%5C",
    "\\",
    ";x",
    "a;b=1",
    "%3b",
    "%3B",
    "%00",
    "%252f",
    "%252e%252e",
    "%25",
    "%",
    "%z",
    "%zz",
    "%C0%AE",
    "%c0%af",
    "%e2%80%ae",
    "%c2%85",
    "%ED%A0%80",
    "\udcc3",
    "\x00",
    "\n",
    "\t",
    "?",
    "#",
    "%3F",
    "%23",
    "\uff0e\uff0e",
    "\u2025",
    "\uff0f",
    "\u2215",
    "\u212a",
    "é",
    "%C3%A9",
    "~",
    "-",
    "_",
    ":",
    "@",
    "+",
    " ",
    "%20",
    "*",
    "{contactId}",
]
HEX = "0123456789abcdefABCDEF"


def _flip_case(text: str, flips: list[bool]) -> str:
    """Swap the case of text[i] where flips[i] is True (missing flips mean False)."""
    return "".join(c.swapcase() if i < len(flips) and flips[i] else c for i, c in enumerate(text))


@st.composite
def _escaped(draw: st.DrawFn, text: str) -> str:
    """Percent-encode some characters of `text` (UTF-8), in random hex case."""
    out = []
    for char in text:
        if draw(st.booleans()):
            raw = "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))
            out.append(_flip_case(raw, draw(st.lists(st.booleans(), max_size=len(raw)))))
        else:
            out.append(char)
    return "".join(out)


_literal = st.sampled_from(LITERALS)
_atom = st.one_of(
    _literal,
    st.sampled_from(DANGEROUS),
    st.text(max_size=4),
    st.builds(lambda a, b: f"%{a}{b}", st.sampled_from(HEX), st.sampled_from(HEX)),
    st.builds(_flip_case, _literal, st.lists(st.booleans(), max_size=16)),
    _literal.flatmap(_escaped),
)
SEGMENTS = st.lists(_atom, min_size=1, max_size=3).map("".join) | _atom


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str]:
    """(method, raw path): mostly a route's own method and template with its params filled,
    often with a few segments inserted, replaced, escaped or case-flipped; sometimes noise."""
    route = draw(st.sampled_from(DEFAULT_ROUTES))
    method = draw(st.sampled_from([route.method] * 10 + ["GET", "POST", "PUT", "DELETE", "get"]))
    parts = [
        draw(SEGMENTS) if part.startswith("{") else part for part in route.template.split("/")
    ][1:]
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
        index = draw(st.integers(0, len(parts)))
        action = draw(st.sampled_from(["insert", "replace", "escape", "flip"]))
        if action == "insert" or index == len(parts):
            parts.insert(index, draw(SEGMENTS))
        elif action == "replace":
            parts[index] = draw(SEGMENTS)
        elif action == "escape":
            parts[index] = draw(_escaped(parts[index]))
        else:
            parts[index] = _flip_case(parts[index], draw(st.lists(st.booleans(), max_size=16)))
    if draw(st.integers(0, 9)) == 0:
        parts = draw(st.lists(SEGMENTS, max_size=6))
    return method, "/" + "/".join(parts)


SCOPE_POOL = [
    *sorted(known_scopes(DEFAULT_ROUTES) - {"*"}),
    "contacts",
    "contact:*",
    "Contacts:read",
    "contacts:read ",
    "agency:subteams",
    ":*",
    "*:*",
    "contacts:*:*",
]
GRANTED = st.frozensets(st.sampled_from(SCOPE_POOL), max_size=4)


def _reference_route(method: str, segments: list[str]) -> Route | None:
    """How a plain upstream router resolves decoded segments: candidates by brute force,
    the most specific (a literal beats a param at the first differing position) wins."""
    candidates = []
    for route in DEFAULT_ROUTES:
        template = route.template.split("/")[1:]
        if route.method != method or len(template) != len(segments):
            continue
        if all(t.startswith("{") or t == s for t, s in zip(template, segments, strict=True)):
            candidates.append(route)
    if not candidates:
        return None
    return max(candidates, key=lambda r: [not t.startswith("{") for t in r.template.split("/")])


def _reference_allows(granted: frozenset[str], scope: str) -> bool:
    return any(
        g in ("*", scope) or (g.endswith(":*") and scope.startswith(g[:-1]) and scope != g[:-1])
        for g in granted
    )


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests(), granted=GRANTED)
@example(request=("GET", "/api/v1/contacts/x%2F..%2F..%2Ftags"), granted=frozenset())
@example(request=("DELETE", "/api/v1/contacts/%2e%2e"), granted=frozenset({"contacts:delete"}))
@example(request=("GET", "/api/v1/contacts/%252e%252e/notes"), granted=frozenset())
@example(request=("GET", "/api/v1/contacts/custom-fields"), granted=frozenset({"contacts:*"}))
def test_no_path_reaches_a_route_its_scope_does_not_allow(
    request: tuple[str, str], granted: frozenset[str]
) -> None:
    """Either the path is refused, or it is unmatched (needs "*"), or it reaches exactly
    the route whose scope was checked: upstream, decoding per segment or all at once and
    resolving dot segments, sees the same segments and so the same route."""
    method, raw = request
    try:
        match = TABLE.match(method, raw)
    except PathError:
        return
    segments = normalise_path(raw)
    forbidden = {"/", "\\", ";", "%", "?", "#", "\x00"}
    assert all(s and s.strip(".") and forbidden.isdisjoint(s) for s in segments)

    forwarded = match.path
    assert forwarded.isascii()
    assert forwarded.startswith("/")
    # Upstream view 1: split on "/", then decode each segment.
    parts = forwarded[1:].split("/") if forwarded != "/" else []
    split_then_decode = [unquote(s, errors="strict") for s in parts]
    # Upstream view 2: decode the whole path, resolve dot segments, then split.
    decoded = unquote(forwarded, errors="strict")
    resolved = posixpath.normpath(decoded)
    assert resolved == decoded
    decode_then_split = resolved[1:].split("/") if resolved != "/" else []
    assert split_then_decode == decode_then_split == segments
    # Re-sending the forwarded path through the gateway is a fixed point.
    assert TABLE.match(method, forwarded) == match

    allowed = scope_allows(granted, match.route.scope if match.route else "*")
    if match.route is None:
        assert match.template == UNMATCHED_TEMPLATE
        assert not allowed  # GRANTED never holds "*"
        return
    upstream = _reference_route(method, segments)
    assert upstream is match.route
    assert allowed == _reference_allows(granted, upstream.scope)


def test_remembered_matches_are_the_ones_made_afresh() -> None:
    table = RouteTable(DEFAULT_ROUTES)
    paths = ["/api/v1/contacts", "/api/v1/contacts/c%20d", "/api/v1/x" + "y" * 600]
    for path in paths * 2:  # the second round comes from what the table remembers
        assert table.match("GET", path) == RouteTable(DEFAULT_ROUTES).match("GET", path)
    for _ in range(2):  # a refused path is refused every time
        with pytest.raises(PathError):
            table.match("GET", "/api/v1//contacts")


def test_remembered_matches_are_bounded() -> None:
    table = RouteTable(DEFAULT_ROUTES)
    for n in range(routes.MATCH_CACHE_SIZE * 2 + 3):
        path = f"/api/v1/contacts/{n}"
        assert table.match("GET", path).path == path
    assert len(table._matches) <= routes.MATCH_CACHE_SIZE
    assert table.match("GET", "/api/v1/contacts/7").template == "/api/v1/contacts/{contactId}"
