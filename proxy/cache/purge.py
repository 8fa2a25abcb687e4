"""What a successful write purges, for the credential it was sent with: the cached answers
it can change. Pure.

- A write under ``/api/v1/contacts`` purges the contact lists (``/api/v1/contacts``, any
  query) and, when it names a contact, that contact and everything under it; one that may
  create tags (``tagNames`` on POST and PUT of contacts) the tag list too.
- ``POST /api/v1/tags`` purges the tag list and the contact lists (their ``availableTags``).
- A write elsewhere purges its whole family (``/api/v1/<family>``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EVERYTHING", "WRITES", "Purge", "purge_for"]

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_API = "/api/v1/"
_CONTACTS = "/api/v1/contacts"
_TAGS = "/api/v1/tags"


@dataclass(frozen=True, slots=True)
class Purge:
    """Paths purged exactly (any query), paths purged with everything under them
    (``trees``), and paths purged by how they begin (``prefixes``: ``DELETE /admin/cache``;
    ``""`` purges everything)."""

    exact: frozenset[str] = frozenset()
    trees: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    def matches(self, path: str) -> bool:
        if path in self.exact:
            return True
        if any(path.startswith(prefix) for prefix in self.prefixes):
            return True
        return any(path == tree or path.startswith(tree + "/") for tree in self.trees)

    def to_wire(self) -> str:
        """One line: the exact paths, ``|``, the trees, ``|``, the prefixes, each list
        separated by spaces (paths hold no ``|`` nor space: they are percent-encoded; an
        empty prefix is sent as ``/``'s stand-in ``*``)."""
        prefixes = " ".join(p or "*" for p in self.prefixes)
        return " ".join(sorted(self.exact)) + "|" + " ".join(self.trees) + "|" + prefixes

    @classmethod
    def from_wire(cls, text: str) -> Purge:
        """What :meth:`to_wire` wrote; ValueError for anything else."""
        parts = text.split("|")
        if len(parts) != 3:
            raise ValueError("not a purge")
        prefixes = tuple("" if p == "*" else p for p in parts[2].split())
        return cls(frozenset(parts[0].split()), tuple(parts[1].split()), prefixes)


EVERYTHING = Purge(prefixes=("",))


def purge_for(method: str, path: str) -> Purge | None:
    """The purge a successful ``method`` on the canonical ``path`` calls for; None for a
    read."""
    if method not in WRITES or not path.startswith(_API):
        return None
    segments = path[len(_API) :].split("/")
    family = segments[0]
    if family == "contacts":
        exact = {_CONTACTS}
        trees: list[str] = []
        rest = segments[1:]
        names_contact = bool(rest) and rest[0] not in ("bulk", "custom-fields", "")
        if names_contact:
            trees.append(f"{_CONTACTS}/{rest[0]}")
        if method in ("POST", "PUT") and (not rest or rest == ["bulk"] or len(rest) == 1):
            exact.add(_TAGS)  # tagNames may create tags
        return Purge(frozenset(exact), tuple(trees))
    if family == "tags":
        return Purge(frozenset({_TAGS, _CONTACTS}))
    return Purge(trees=(_API + family,))
