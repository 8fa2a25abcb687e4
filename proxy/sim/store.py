"""One key's data, as echowin keeps it for a team (or, for an agency key, its subteams),
and the readers of request bodies and queries; every refusal is an ``ApiError``.

Pure: no I/O; the wall clock (Unix seconds) is passed in for ``createdAt`` stamps.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from multidict import MultiMapping

__all__ = [
    "ApiError",
    "Contact",
    "ContactPatch",
    "JSONObject",
    "ListQuery",
    "Store",
    "opt_object",
    "opt_str",
    "positive_int",
    "req_str",
    "str_list",
]

JSONObject = dict[str, Any]

_MAX_PAGE_SIZE: Final = 100
_MAX_CONTACTS: Final = 10_000  # per key; past it the oldest contact is evicted
_MAX_NOTES: Final = 1_000  # per contact; past it the oldest note is evicted
_MAX_TAGS: Final = 1_000  # per key; past it tag creation is refused
_MAX_SUBTEAMS: Final = 10_000  # per agency key; past it the oldest is forgotten
_DEFAULT_TAG_COLOR: Final = "#6B7280"
_TEXT_FIELDS: Final = ("firstName", "lastName", "email", "number", "carrier")
_SORT_FIELDS: Final = frozenset({"createdAt", *_TEXT_FIELDS} - {"carrier"})


class ApiError(Exception):
    """An echowin-style error, answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Contact:
    seq: int  # creation order: ties in createdAt sort by it
    id: str
    created_at: str
    text: dict[str, str | None]
    custom_fields: dict[str, Any]
    tag_ids: list[str]
    board_ids: list[str]
    user_ids: list[str]
    notes: deque[JSONObject]


@dataclass(frozen=True, slots=True)
class ContactPatch:
    """A validated contact body; None (or an absent text key) leaves the field alone."""

    text: dict[str, str | None]
    custom_fields: dict[str, Any] | None
    tag_ids: list[str] | None
    tag_names: list[str] | None
    board_ids: list[str] | None
    user_ids: list[str] | None
    note: str | None

    @classmethod
    def parse(cls, body: JSONObject, *, create: bool) -> ContactPatch:
        text: dict[str, str | None] = {n: opt_str(body, n) for n in _TEXT_FIELDS if n in body}
        if create or "number" in body:
            text["number"] = req_str(body, "number")
        return cls(
            text=text,
            custom_fields=opt_object(body, "customFields"),
            tag_ids=str_list(body, "tagIds"),
            tag_names=str_list(body, "tagNames"),
            board_ids=str_list(body, "boardIds"),
            user_ids=str_list(body, "assignUserIds"),
            note=opt_str(body, "note") or None,
        )


@dataclass(frozen=True, slots=True)
class ListQuery:
    page: int
    limit: int
    search: str
    sort_by: str
    descending: bool
    tag_ids: frozenset[str]

    @classmethod
    def parse(cls, query: MultiMapping[str]) -> ListQuery:
        """``tagIds`` is comma-separated, repeated, or both; a contact with any of them
        matches."""
        sort_by, order = query.get("sortBy", "createdAt"), query.get("sortOrder", "desc")
        if sort_by not in _SORT_FIELDS:
            raise ApiError(400, f"sortBy must be one of {', '.join(sorted(_SORT_FIELDS))}")
        if order not in ("asc", "desc"):
            raise ApiError(400, "sortOrder must be asc or desc")
        return cls(
            page=positive_int(query, "page", 1),
            limit=min(positive_int(query, "limit", 20), _MAX_PAGE_SIZE),
            search=query.get("search", "").strip().lower(),
            sort_by=sort_by,
            descending=order == "desc",
            tag_ids=frozenset(
                t for given in query.getall("tagIds", []) for t in given.split(",") if t
            ),
        )

    def matches(self, contact: Contact) -> bool:
        if self.tag_ids and self.tag_ids.isdisjoint(contact.tag_ids):
            return False
        return not self.search or any(
            self.search in (contact.text.get(name) or "").lower() for name in _TEXT_FIELDS
        )

    def sort_key(self, contact: Contact) -> tuple[str, int]:
        if self.sort_by == "createdAt":
            return ("", contact.seq)
        return ((contact.text.get(self.sort_by) or "").lower(), contact.seq)


def _seed_boards() -> dict[str, JSONObject]:
    boards = (
        ("board-sales", "Sales Pipeline", ("Lead", "Qualified", "Won")),
        ("board-support", "Support", ("Open", "Resolved")),
    )
    return {
        board_id: {
            "id": board_id,
            "name": name,
            "stages": [{"id": f"{board_id}-{s.lower()}", "name": s} for s in stages],
        }
        for board_id, name, stages in boards
    }


def _seed_custom_fields() -> list[JSONObject]:
    return [
        {
            "id": f"field-{name}",
            "name": name,
            "label": name.title(),
            "type": "text",
            "required": False,
        }
        for name in ("company", "role")
    ]


class Store:
    """One key's data: what echowin keeps for a team (or, for an agency key, its subteams).

    A refused write leaves no contact half-changed (tags it named may already exist).
    """

    def __init__(self, wall: Callable[[], float]) -> None:
        self._wall = wall
        self._seq = itertools.count()
        self.contacts: dict[str, Contact] = {}
        self.tags: dict[str, JSONObject] = {}
        self.boards = _seed_boards()
        self.custom_fields = _seed_custom_fields()
        self.subteams: deque[JSONObject] = deque(maxlen=_MAX_SUBTEAMS)

    def now_iso(self) -> str:
        stamp = datetime.fromtimestamp(self._wall(), UTC).isoformat(timespec="milliseconds")
        return stamp.replace("+00:00", "Z")

    def contact(self, contact_id: str) -> Contact:
        try:
            return self.contacts[contact_id]
        except KeyError:
            raise ApiError(404, "Contact not found") from None

    def save_contact(self, patch: ContactPatch, contact: Contact | None = None) -> Contact:
        """Create (``contact`` None) or update a contact; a refused write changes no contact."""
        self.check_boards(patch.board_ids or [])
        unknown = [t for t in patch.tag_ids or [] if t not in self.tags]
        if unknown:
            raise ApiError(400, f"Tag not found: {', '.join(unknown)}")
        tag_ids = None
        if patch.tag_ids is not None or patch.tag_names is not None:
            tag_ids = self._resolve_tags(patch.tag_ids or [], patch.tag_names or [])
        contact = contact or self._new_contact()
        contact.text.update(patch.text)
        if patch.custom_fields is not None:
            contact.custom_fields = dict(patch.custom_fields)
        if tag_ids is not None:
            contact.tag_ids = tag_ids
        if patch.board_ids is not None:
            contact.board_ids = list(dict.fromkeys(patch.board_ids))
        if patch.user_ids is not None:
            contact.user_ids = list(dict.fromkeys(patch.user_ids))
        if patch.note:
            self.add_note(contact, patch.note, "general")
        return contact

    def add_note(self, contact: Contact, text: str, kind: str) -> JSONObject:
        note = {"id": str(uuid.uuid4()), "note": text, "type": kind, "createdAt": self.now_iso()}
        contact.notes.append(note)
        return note

    def create_tag(self, name: str, color: str | None) -> JSONObject:
        if any(tag["name"].lower() == name.lower() for tag in self.tags.values()):
            raise ApiError(409, "Tag already exists")
        if len(self.tags) >= _MAX_TAGS:
            raise ApiError(400, f"A team may hold at most {_MAX_TAGS} tags")
        tag = {"id": str(uuid.uuid4()), "name": name, "color": color or _DEFAULT_TAG_COLOR}
        self.tags[tag["id"]] = tag
        return tag

    def check_boards(self, board_ids: list[str]) -> None:
        unknown = [b for b in board_ids if b not in self.boards]
        if unknown:
            raise ApiError(400, f"Board not found: {', '.join(unknown)}")

    def render(self, contact: Contact) -> JSONObject:
        """The public contact shape of SPEC §2."""
        return {
            "id": contact.id,
            **contact.text,
            "customFields": contact.custom_fields,
            "tags": [self.tags[t] for t in contact.tag_ids if t in self.tags],
            "crmStage": self.stage(contact),
            "createdAt": contact.created_at,
        }

    def stage(self, contact: Contact) -> JSONObject | None:
        """The first stage of the contact's first board: where echowin puts new cards."""
        boards = [self.boards[b] for b in contact.board_ids if b in self.boards]
        return dict(boards[0]["stages"][0]) if boards else None

    def list_contacts(self, query: ListQuery) -> JSONObject:
        found = sorted(
            (c for c in self.contacts.values() if query.matches(c)),
            key=query.sort_key,
            reverse=query.descending,
        )
        start = (query.page - 1) * query.limit
        return {
            "data": [self.render(c) for c in found[start : start + query.limit]],
            "pagination": {
                "page": query.page,
                "limit": query.limit,
                "totalCount": len(found),
                "totalPages": math.ceil(len(found) / query.limit),
            },
            "customFieldSchemas": self.custom_fields,
            "availableTags": list(self.tags.values()),
        }

    def _new_contact(self) -> Contact:
        contact = Contact(
            seq=next(self._seq),
            id=str(uuid.uuid4()),
            created_at=self.now_iso(),
            text=dict.fromkeys(_TEXT_FIELDS),
            custom_fields={},
            tag_ids=[],
            board_ids=[],
            user_ids=[],
            notes=deque(maxlen=_MAX_NOTES),
        )
        self.contacts[contact.id] = contact
        if len(self.contacts) > _MAX_CONTACTS:
            del self.contacts[next(iter(self.contacts))]
        return contact

    def _resolve_tags(self, tag_ids: list[str], tag_names: list[str]) -> list[str]:
        by_name = {tag["name"].lower(): tag["id"] for tag in self.tags.values()}
        for name in tag_names:
            if name.lower() not in by_name:
                by_name[name.lower()] = self.create_tag(name, None)["id"]
        return list(dict.fromkeys([*tag_ids, *(by_name[n.lower()] for n in tag_names)]))


# --- body and query readers (raise ApiError 400) -----------------------------------


def opt_str(body: JSONObject, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    return value


def req_str(body: JSONObject, name: str, max_len: int = 255) -> str:
    value = opt_str(body, name)
    if not value or not value.strip():
        raise ApiError(400, f"{name} is required")
    if len(value) > max_len:
        raise ApiError(400, f"{name} must be at most {max_len} characters")
    return value


def str_list(body: JSONObject, name: str) -> list[str] | None:
    value = body.get(name)
    if value is not None and not (
        isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    ):
        raise ApiError(400, f"{name} must be an array of strings")
    return value


def opt_object(body: JSONObject, name: str) -> dict[str, Any] | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise ApiError(400, f"{name} must be an object")
    return value


def positive_int(query: Mapping[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or int(text) < 1:  # "²".isdigit() is True
        raise ApiError(400, f"{name} must be a positive integer")
    return int(text)
