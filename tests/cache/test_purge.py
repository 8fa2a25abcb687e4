"""What a write purges. No sockets."""

from __future__ import annotations

import pytest

from proxy.cache.purge import EVERYTHING, Purge, purge_for

LIST = "/api/v1/contacts"
TAGS = "/api/v1/tags"


def purged(method: str, path: str, candidates: list[str]) -> list[str]:
    purge = purge_for(method, path)
    assert purge is not None
    return [p for p in candidates if purge.matches(p)]


PATHS = [
    LIST,
    "/api/v1/contacts/c1",
    "/api/v1/contacts/c1/notes",
    "/api/v1/contacts/c12",
    "/api/v1/contacts/custom-fields",
    TAGS,
    "/api/v1/boards",
]


def test_reads_purge_nothing() -> None:
    assert purge_for("GET", LIST) is None
    assert purge_for("HEAD", TAGS) is None


def test_creating_contacts_purges_the_lists_and_the_tags() -> None:
    assert purged("POST", LIST, PATHS) == [LIST, TAGS]
    assert purged("POST", "/api/v1/contacts/bulk", PATHS) == [LIST, TAGS]


def test_a_write_on_one_contact_purges_it_and_the_lists_only() -> None:
    one = [LIST, "/api/v1/contacts/c1", "/api/v1/contacts/c1/notes"]
    assert purged("PUT", "/api/v1/contacts/c1", PATHS) == [*one, TAGS]
    assert purged("DELETE", "/api/v1/contacts/c1", PATHS) == one
    assert purged("POST", "/api/v1/contacts/c1/notes", PATHS) == one
    assert purged("PUT", "/api/v1/contacts/c1/boards", PATHS) == one


def test_a_new_tag_purges_the_tags_and_the_contact_lists() -> None:
    assert purged("POST", TAGS, PATHS) == [LIST, TAGS]


def test_another_family_purges_itself() -> None:
    assert purged("POST", "/api/v1/agents/a1", ["/api/v1/agents", "/api/v1/agents/a2", TAGS]) == [
        "/api/v1/agents",
        "/api/v1/agents/a2",
    ]


@pytest.mark.parametrize(
    "purge",
    [
        Purge(frozenset({LIST, TAGS}), ("/api/v1/contacts/c1",)),
        Purge(prefixes=("/api/v1/co",)),
        EVERYTHING,
        Purge(),
    ],
)
def test_a_purge_crosses_the_wire_intact(purge: Purge) -> None:
    assert Purge.from_wire(purge.to_wire()) == purge


def test_anything_else_on_the_wire_is_refused() -> None:
    with pytest.raises(ValueError, match="not a purge"):
        Purge.from_wire("hello")
