"""The echowin simulator: a local stand-in for https://echo.win/api/v1 (SPEC §2).

It serves echowin's routes with echowin's auth, JSON error bodies and rolling-window rate
limits, keeps an in-memory store per key so writes round-trip, records every request it
receives, and lets tests switch faults on and off while it runs. Developers build against
it without spending quota; the gateway's tests use it as the upstream whose arrival clock
judges "no 429" (SPEC §3.1).

Time: window math reads ``clock`` (seconds, monotonic by default); only the
``X-RateLimit-Reset`` header and ``createdAt`` fields read ``wall`` (Unix seconds).

Every path outside ``/_sim/`` is an API path: authenticated, counted and recorded before
routing, so an unknown route costs budget like any other request and answers JSON 404.
Control endpoints need no key, are never rate limited, never faulted and never recorded:
``GET|DELETE /_sim/requests``, ``GET|POST|DELETE /_sim/faults``, ``POST /_sim/spend``,
``GET /_sim/healthz``.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import itertools
import json
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Final, Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import MultiMapping

from proxy.sim import echo as sim_echo

__all__ = [
    "NO_RESPONSE",
    "SIMULATOR",
    "Faults",
    "RecordedRequest",
    "SimConfig",
    "SimLimit",
    "Simulator",
    "parse_limit",
    "run_simulator",
]

JSONObject = dict[str, Any]

NO_RESPONSE: Final = 0
"""Status recorded for a request the simulator never answered (the ``reset`` fault)."""

_TEAM_HEADER: Final = "X-API-Key"
_AGENCY_HEADER: Final = "X-AGENCY-KEY"
_CONTROL_PREFIX: Final = "/_sim/"
_RATE_LIMITED: Final = "Rate limit exceeded. Please try again later."
_MAX_PAGE_SIZE: Final = 100
_MAX_BULK: Final = 100
_MAX_CONTACTS: Final = 10_000  # per key; past it the oldest contact is evicted
_MAX_NOTES: Final = 1_000  # per contact; past it the oldest note is evicted
_MAX_TAGS: Final = 1_000  # per key; past it tag creation is refused
_MAX_SUBTEAMS: Final = 10_000  # per agency key; past it the oldest is forgotten
_MAX_LATENCY_SECONDS: Final = 600.0
_DEFAULT_TAG_COLOR: Final = "#6B7280"
_TEXT_FIELDS: Final = ("firstName", "lastName", "email", "number", "carrier")
_SORT_FIELDS: Final = frozenset({"createdAt", *_TEXT_FIELDS} - {"carrier"})


@dataclass(frozen=True, slots=True)
class SimLimit:
    """At most ``requests`` sends per key in any rolling window of ``per_seconds`` seconds."""

    requests: int
    per_seconds: float

    def __post_init__(self) -> None:
        if isinstance(self.requests, bool) or not isinstance(self.requests, int):
            raise ValueError(f"limit requests must be an integer, got {self.requests!r}")
        if self.requests < 1:
            raise ValueError(f"limit requests must be >= 1, got {self.requests}")
        if not (math.isfinite(self.per_seconds) and self.per_seconds > 0):
            raise ValueError(f"limit per_seconds must be finite and > 0, got {self.per_seconds}")


@dataclass(frozen=True, slots=True)
class SimConfig:
    """What the simulator accepts: its keys, its limits (all hold per key) and header style."""

    team_keys: frozenset[str]
    agency_keys: frozenset[str] = frozenset()
    limits: tuple[SimLimit, ...] = (SimLimit(1000, 3600.0), SimLimit(100, 60.0))
    reset_format: Literal["unix", "iso"] = "unix"
    log_size: int = 100_000
    # Which window X-RateLimit-Remaining/Reset describe. echowin documents Limit as the
    # hourly limit, so "longest" is the default; "tightest" (the window with the fewest
    # left) lets tests check that the gateway stays safe if echowin reports that instead.
    remaining_window: Literal["longest", "tightest"] = "longest"

    def __post_init__(self) -> None:
        for name in ("team_keys", "agency_keys"):
            keys = getattr(self, name)
            if isinstance(keys, str):  # frozenset("abc") would silently accept "a", "b", "c"
                raise TypeError(f"{name} must be a collection of keys, not a string")
            object.__setattr__(self, name, frozenset(keys))
            if not all(isinstance(key, str) and key for key in getattr(self, name)):
                raise ValueError(f"{name} must hold non-empty strings")
        object.__setattr__(self, "limits", tuple(self.limits))
        if not self.limits:
            raise ValueError("limits must hold at least one SimLimit")
        if self.reset_format not in ("unix", "iso"):
            raise ValueError(f"reset_format must be 'unix' or 'iso', got {self.reset_format!r}")
        if self.remaining_window not in ("longest", "tightest"):
            raise ValueError(
                f"remaining_window must be 'longest' or 'tightest', got {self.remaining_window!r}"
            )
        if self.log_size < 1:
            raise ValueError(f"log_size must be >= 1, got {self.log_size}")


def parse_limit(text: str) -> SimLimit:
    """Parse ``REQUESTS/SECONDS`` (e.g. ``"1000/3600"``); ValueError names the bad text."""
    requests_text, slash, seconds_text = text.strip().partition("/")
    try:
        if not slash:
            raise ValueError("no '/'")
        return SimLimit(int(requests_text), float(seconds_text))
    except ValueError as exc:
        raise ValueError(
            f"invalid limit {text!r}: expected REQUESTS/SECONDS such as 1000/3600 ({exc})"
        ) from None


@dataclass(frozen=True, slots=True)
class Faults:
    """Misbehaviour applied to API requests (never to ``/_sim/`` control requests).

    ``latency_seconds`` delays whatever answer follows. The answer itself, by precedence:
    ``reset`` (drop the connection unanswered) > ``status`` (a JSON error with that status)
    > ``force_429`` (echowin's 429 with ``Retry-After: retry_after`` seconds) > the normal
    answer. ``gzip`` sends the answer's body gzip-encoded. ``count`` limits the faults to
    the next ``count`` API requests (counted at arrival); None keeps them until cleared.

    ``echo_key`` (a form of ``sim_echo.FORMS``) puts the key the request carried (its
    X-API-Key, or X-AGENCY-KEY under /api/v1/agency/), encoded in that form, into the answer
    at ``echo_in`` (one of ``sim_echo.PLACES``), whatever the answer; a request without a key
    gets no echo. ``echo_percent`` and ``echo_swapcase`` are the character positions the
    ``percent_some`` and ``mixed_case`` forms encode or case-swap (``sim_echo.encode``).
    ``gzip`` leaves an echoed answer that has its own coding, or is streamed, as it is.
    """

    latency_seconds: float = 0.0
    status: int | None = None
    reset: bool = False
    force_429: bool = False
    retry_after: int = 1
    count: int | None = None
    gzip: bool = False
    echo_key: str | None = None
    echo_in: str = "body"
    echo_percent: tuple[int, ...] | None = None
    echo_swapcase: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.latency_seconds <= _MAX_LATENCY_SECONDS:
            raise ValueError(f"latency_seconds must be within 0..{_MAX_LATENCY_SECONDS:g}")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP error status (400..599), got {self.status}")
        if self.retry_after < 1:
            raise ValueError(f"retry_after must be >= 1 second, got {self.retry_after}")
        if self.count is not None and self.count < 1:
            raise ValueError(
                f"count must be >= 1 (or absent for 'until cleared'), got {self.count}"
            )
        for name in ("echo_percent", "echo_swapcase"):
            if isinstance(getattr(self, name), list):  # kept as a tuple: the faults are frozen
                object.__setattr__(self, name, tuple(getattr(self, name)))
        sim_echo.check(self.echo_key, self.echo_in, self.echo_percent, self.echo_swapcase)

    @classmethod
    def from_json(cls, data: object) -> Faults:
        """Build from a decoded JSON object; ValueError names the offending field."""
        if not isinstance(data, dict):
            raise ValueError("faults must be a JSON object")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(map(str, unknown))}")
        retry_after = _json_int(data, "retry_after")
        echo_in = _json_str(data, "echo_in")
        return cls(
            latency_seconds=_json_number(data, "latency_seconds"),
            status=_json_int(data, "status"),
            reset=_json_bool(data, "reset"),
            force_429=_json_bool(data, "force_429"),
            retry_after=1 if retry_after is None else retry_after,
            count=_json_int(data, "count"),
            gzip=_json_bool(data, "gzip"),
            echo_key=_json_str(data, "echo_key"),
            echo_in="body" if echo_in is None else echo_in,
            echo_percent=_json_ints(data, "echo_percent"),
            echo_swapcase=_json_ints(data, "echo_swapcase"),
        )

    def to_json(self) -> JSONObject:
        return asdict(self)


def _json_bool(data: Mapping[str, object], name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")
    return value


def _json_int(data: Mapping[str, object], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def _json_str(data: Mapping[str, object], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _json_ints(data: Mapping[str, object], name: str) -> tuple[int, ...] | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{name} must be an array of integers")
    return tuple(value)


def _json_number(data: Mapping[str, object], name: str) -> float:
    value = data.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    return float(value)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One API request as the simulator received it.

    ``at`` is the arrival time on the simulator's ``clock`` (seconds); ``path`` is the raw
    path with its query string; ``headers`` keeps names as sent (repeats joined by ", ");
    ``key`` is the credential header the route reads (X-API-Key, or X-AGENCY-KEY under
    /api/v1/agency/), valid or not, None if absent; ``status`` is the status answered, or
    NO_RESPONSE if the connection was dropped. The log is in completion order.
    """

    at: float
    method: str
    path: str
    headers: dict[str, str]
    key: str | None
    status: int

    def header(self, name: str) -> str | None:
        """The value of header ``name``, matched case-insensitively as HTTP does."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)

    def to_json(self) -> JSONObject:
        return asdict(self)


# --- rolling windows (pure: no I/O, time passed in) ---------------------------------------


@dataclass(frozen=True, slots=True)
class _Quota:
    """What the rate-limit headers report; ``reset_at`` is on the simulator's clock."""

    limit: int
    remaining: int
    reset_at: float


class _Window:
    """Arrival times of counted sends inside one rolling window, oldest first.

    A send at ``t`` counts until ``t + per_seconds`` exactly. Only the newest ``requests``
    times are kept: admission and headers depend on no others, so memory stays bounded even
    when ``spend`` records more sends than the limit allows.
    """

    __slots__ = ("limit", "sends")

    def __init__(self, limit: SimLimit) -> None:
        self.limit = limit
        self.sends: deque[float] = deque(maxlen=limit.requests)

    def prune(self, now: float) -> None:
        sends, per = self.sends, self.limit.per_seconds
        while sends and sends[0] + per <= now:
            sends.popleft()

    def remaining(self) -> int:
        return self.limit.requests - len(self.sends)

    def frees_at(self, now: float) -> float:
        """When the oldest counted send leaves (``now`` if none is counted)."""
        return self.sends[0] + self.limit.per_seconds if self.sends else now


class _KeyBudget:
    """Every configured window of one key; each method prunes at ``now`` first."""

    __slots__ = ("_longest_index", "_windows")

    def __init__(self, limits: tuple[SimLimit, ...]) -> None:
        self._windows = tuple(_Window(limit) for limit in limits)
        self._longest_index = max(range(len(limits)), key=lambda i: limits[i].per_seconds)

    def admit(self, now: float) -> float | None:
        """Count a send at ``now`` if every window has room, returning None; otherwise count
        nothing (echowin counts only what it serves) and return seconds until all have room."""
        self._prune(now)
        full = [w for w in self._windows if w.remaining() <= 0]
        if full:
            return max(w.frees_at(now) for w in full) - now
        for window in self._windows:
            window.sends.append(now)
        return None

    def spend(self, now: float, n: int) -> None:
        """Count ``n`` sends at ``now``, limits notwithstanding (another client's traffic)."""
        self._prune(now)
        for window in self._windows:
            window.sends.extend(itertools.repeat(now, min(n, window.limit.requests)))

    def quota(self, now: float, tightest: bool) -> _Quota:
        """Limit of the longest window ("per hour", as echowin documents X-RateLimit-Limit);
        remaining and reset of that window, or with ``tightest`` of the one with fewest left."""
        self._prune(now)
        longest = self._windows[self._longest_index]
        shown = longest
        if tightest:
            shown = min(self._windows, key=lambda w: (w.remaining(), -w.frees_at(now)))
        return _Quota(longest.limit.requests, shown.remaining(), shown.frees_at(now))

    def _prune(self, now: float) -> None:
        for window in self._windows:
            window.prune(now)


# --- the per-key store -----------------------------------------------------------------------


class _ApiError(Exception):
    """An echowin-style error, answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class _Contact:
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
class _ContactPatch:
    """A validated contact body; None (or an absent text key) leaves the field alone."""

    text: dict[str, str | None]
    custom_fields: dict[str, Any] | None
    tag_ids: list[str] | None
    tag_names: list[str] | None
    board_ids: list[str] | None
    user_ids: list[str] | None
    note: str | None

    @classmethod
    def parse(cls, body: JSONObject, *, create: bool) -> _ContactPatch:
        text: dict[str, str | None] = {n: _opt_str(body, n) for n in _TEXT_FIELDS if n in body}
        if create or "number" in body:
            text["number"] = _req_str(body, "number")
        return cls(
            text=text,
            custom_fields=_opt_object(body, "customFields"),
            tag_ids=_str_list(body, "tagIds"),
            tag_names=_str_list(body, "tagNames"),
            board_ids=_str_list(body, "boardIds"),
            user_ids=_str_list(body, "assignUserIds"),
            note=_opt_str(body, "note") or None,
        )


@dataclass(frozen=True, slots=True)
class _ListQuery:
    page: int
    limit: int
    search: str
    sort_by: str
    descending: bool
    tag_ids: frozenset[str]

    @classmethod
    def parse(cls, query: MultiMapping[str]) -> _ListQuery:
        """``tagIds`` is comma-separated, repeated, or both; a contact with any of them
        matches."""
        sort_by, order = query.get("sortBy", "createdAt"), query.get("sortOrder", "desc")
        if sort_by not in _SORT_FIELDS:
            raise _ApiError(400, f"sortBy must be one of {', '.join(sorted(_SORT_FIELDS))}")
        if order not in ("asc", "desc"):
            raise _ApiError(400, "sortOrder must be asc or desc")
        return cls(
            page=_positive_int(query, "page", 1),
            limit=min(_positive_int(query, "limit", 20), _MAX_PAGE_SIZE),
            search=query.get("search", "").strip().lower(),
            sort_by=sort_by,
            descending=order == "desc",
            tag_ids=frozenset(
                t for given in query.getall("tagIds", []) for t in given.split(",") if t
            ),
        )

    def matches(self, contact: _Contact) -> bool:
        if self.tag_ids and self.tag_ids.isdisjoint(contact.tag_ids):
            return False
        return not self.search or any(
            self.search in (contact.text.get(name) or "").lower() for name in _TEXT_FIELDS
        )

    def sort_key(self, contact: _Contact) -> tuple[str, int]:
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


class _Store:
    """One key's data: what echowin keeps for a team (or, for an agency key, its subteams).

    A refused write leaves no contact half-changed (tags it named may already exist).
    """

    def __init__(self, wall: Callable[[], float]) -> None:
        self._wall = wall
        self._seq = itertools.count()
        self.contacts: dict[str, _Contact] = {}
        self.tags: dict[str, JSONObject] = {}
        self.boards = _seed_boards()
        self.custom_fields = _seed_custom_fields()
        self.subteams: deque[JSONObject] = deque(maxlen=_MAX_SUBTEAMS)

    def now_iso(self) -> str:
        stamp = datetime.fromtimestamp(self._wall(), UTC).isoformat(timespec="milliseconds")
        return stamp.replace("+00:00", "Z")

    def contact(self, contact_id: str) -> _Contact:
        try:
            return self.contacts[contact_id]
        except KeyError:
            raise _ApiError(404, "Contact not found") from None

    def save_contact(self, patch: _ContactPatch, contact: _Contact | None = None) -> _Contact:
        """Create (``contact`` None) or update a contact; a refused write changes no contact."""
        self.check_boards(patch.board_ids or [])
        unknown = [t for t in patch.tag_ids or [] if t not in self.tags]
        if unknown:
            raise _ApiError(400, f"Tag not found: {', '.join(unknown)}")
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

    def add_note(self, contact: _Contact, text: str, kind: str) -> JSONObject:
        note = {"id": str(uuid.uuid4()), "note": text, "type": kind, "createdAt": self.now_iso()}
        contact.notes.append(note)
        return note

    def create_tag(self, name: str, color: str | None) -> JSONObject:
        if any(tag["name"].lower() == name.lower() for tag in self.tags.values()):
            raise _ApiError(409, "Tag already exists")
        if len(self.tags) >= _MAX_TAGS:
            raise _ApiError(400, f"A team may hold at most {_MAX_TAGS} tags")
        tag = {"id": str(uuid.uuid4()), "name": name, "color": color or _DEFAULT_TAG_COLOR}
        self.tags[tag["id"]] = tag
        return tag

    def check_boards(self, board_ids: list[str]) -> None:
        unknown = [b for b in board_ids if b not in self.boards]
        if unknown:
            raise _ApiError(400, f"Board not found: {', '.join(unknown)}")

    def render(self, contact: _Contact) -> JSONObject:
        """The public contact shape of SPEC §2."""
        return {
            "id": contact.id,
            **contact.text,
            "customFields": contact.custom_fields,
            "tags": [self.tags[t] for t in contact.tag_ids if t in self.tags],
            "crmStage": self.stage(contact),
            "createdAt": contact.created_at,
        }

    def stage(self, contact: _Contact) -> JSONObject | None:
        """The first stage of the contact's first board: where echowin puts new cards."""
        boards = [self.boards[b] for b in contact.board_ids if b in self.boards]
        return dict(boards[0]["stages"][0]) if boards else None

    def list_contacts(self, query: _ListQuery) -> JSONObject:
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

    def _new_contact(self) -> _Contact:
        contact = _Contact(
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


# --- request body and query helpers (raise _ApiError 400) -----------------------------------


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


async def _body(request: web.Request) -> JSONObject:
    try:  # NaN and Infinity are Python's, not JSON's: stored, they would come back unreadable
        body = json.loads(await request.read(), parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _ApiError(400, "Invalid JSON body") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "Request body must be a JSON object")
    return body


def _opt_str(body: JSONObject, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _ApiError(400, f"{name} must be a string")
    return value


def _req_str(body: JSONObject, name: str, max_len: int = 255) -> str:
    value = _opt_str(body, name)
    if not value or not value.strip():
        raise _ApiError(400, f"{name} is required")
    if len(value) > max_len:
        raise _ApiError(400, f"{name} must be at most {max_len} characters")
    return value


def _str_list(body: JSONObject, name: str) -> list[str] | None:
    value = body.get(name)
    if value is not None and not (
        isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    ):
        raise _ApiError(400, f"{name} must be an array of strings")
    return value


def _opt_object(body: JSONObject, name: str) -> dict[str, Any] | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise _ApiError(400, f"{name} must be an object")
    return value


def _positive_int(query: Mapping[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or int(text) < 1:  # "²".isdigit() is True
        raise _ApiError(400, f"{name} must be a positive integer")
    return int(text)


# --- API handlers: thin; the store does the work ------------------------------------------


async def _list_contacts(request: web.Request) -> web.Response:
    return web.json_response(request[_STORE].list_contacts(_ListQuery.parse(request.query)))


async def _create_contact(request: web.Request) -> web.Response:
    store, patch = request[_STORE], _ContactPatch.parse(await _body(request), create=True)
    return web.json_response({"data": store.render(store.save_contact(patch))}, status=201)


async def _bulk_create(request: web.Request) -> web.Response:
    store, items = request[_STORE], (await _body(request)).get("contacts")
    if not isinstance(items, list) or not 1 <= len(items) <= _MAX_BULK:
        raise _ApiError(400, f"contacts must be an array of 1..{_MAX_BULK} contacts")
    created: list[JSONObject] = []
    errors: list[JSONObject] = []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise _ApiError(400, "contact must be an object")
            patch = _ContactPatch.parse(item, create=True)
            created.append(store.render(store.save_contact(patch)))
        except _ApiError as exc:
            errors.append({"index": index, "error": exc.message})
    if not created:
        return web.json_response({"error": "No contact was created", "errors": errors}, status=400)
    return web.json_response({"data": {"created": created, "errors": errors}}, status=201)


async def _get_contact(request: web.Request) -> web.Response:
    store = request[_STORE]
    return web.json_response({"data": store.render(store.contact(request.match_info["cid"]))})


async def _update_contact(request: web.Request) -> web.Response:
    store = request[_STORE]
    contact = store.contact(request.match_info["cid"])
    patch = _ContactPatch.parse(await _body(request), create=False)
    return web.json_response({"data": store.render(store.save_contact(patch, contact))})


async def _delete_contact(request: web.Request) -> web.Response:
    contact = request[_STORE].contact(request.match_info["cid"])
    del request[_STORE].contacts[contact.id]
    return web.json_response({"data": {"id": contact.id, "deleted": True}})


async def _list_notes(request: web.Request) -> web.Response:
    contact = request[_STORE].contact(request.match_info["cid"])
    return web.json_response({"data": list(contact.notes)})


async def _add_note(request: web.Request) -> web.Response:
    store = request[_STORE]
    contact = store.contact(request.match_info["cid"])
    body = await _body(request)
    text, kind = _req_str(body, "note", 10_000), _opt_str(body, "type") or "general"
    return web.json_response({"data": store.add_note(contact, text, kind)}, status=201)


async def _assignments(request: web.Request) -> web.Response:
    """GET lists the assigned users; POST adds ``userIds``; PUT replaces them."""
    contact = request[_STORE].contact(request.match_info["cid"])
    if request.method != "GET":
        user_ids = _str_list(await _body(request), "userIds")
        if user_ids is None:
            raise _ApiError(400, "userIds is required")
        kept = contact.user_ids if request.method == "POST" else []
        contact.user_ids = list(dict.fromkeys([*kept, *user_ids]))
    return web.json_response({"data": {"contactId": contact.id, "userIds": contact.user_ids}})


async def _contact_boards(request: web.Request) -> web.Response:
    """POST adds the contact to ``boardIds``; PUT replaces its boards."""
    store = request[_STORE]
    contact = store.contact(request.match_info["cid"])
    board_ids = _str_list(await _body(request), "boardIds")
    if board_ids is None:
        raise _ApiError(400, "boardIds is required")
    store.check_boards(board_ids)
    kept = contact.board_ids if request.method == "POST" else []
    contact.board_ids = list(dict.fromkeys([*kept, *board_ids]))
    data = {
        "contactId": contact.id,
        "boardIds": contact.board_ids,
        "crmStage": store.stage(contact),
    }
    return web.json_response({"data": data})


async def _custom_fields(request: web.Request) -> web.Response:
    return web.json_response({"data": request[_STORE].custom_fields})


async def _list_boards(request: web.Request) -> web.Response:
    return web.json_response({"data": list(request[_STORE].boards.values())})


async def _list_tags(request: web.Request) -> web.Response:
    return web.json_response({"data": list(request[_STORE].tags.values())})


async def _create_tag(request: web.Request) -> web.Response:
    body = await _body(request)
    tag = request[_STORE].create_tag(_req_str(body, "name", 50), _opt_str(body, "color"))
    return web.json_response({"data": tag}, status=201)


async def _create_subteam(request: web.Request) -> web.Response:
    body = await _body(request)
    names = {name: _req_str(body, name, 50) for name in ("firstName", "lastName", "teamName")}
    email = _req_str(body, "email")
    if "@" not in email:
        raise _ApiError(400, "email must be a valid email address")
    credits_ = body.get("totalMonthlyCredits", 1000)
    if isinstance(credits_, bool) or not isinstance(credits_, int | float) or credits_ < 0:
        raise _ApiError(400, "totalMonthlyCredits must be a number >= 0")
    subteam: JSONObject = {"id": str(uuid.uuid4()), **names, "email": email}
    subteam["totalMonthlyCredits"] = credits_
    subteam["accessConfig"] = _opt_object(body, "accessConfig") or {}
    subteam["createdAt"] = request[_STORE].now_iso()
    request[_STORE].subteams.append(subteam)
    return web.json_response({"data": subteam}, status=201)


_ApiHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CONTACT: Final = "/api/v1/contacts/{cid}"

# The route table is data: new echowin families are new rows.
_API_ROUTES: Final[tuple[tuple[str, str, _ApiHandler], ...]] = (
    ("GET", "/api/v1/contacts", _list_contacts),
    ("POST", "/api/v1/contacts", _create_contact),
    ("POST", "/api/v1/contacts/bulk", _bulk_create),
    ("GET", "/api/v1/contacts/custom-fields", _custom_fields),
    ("GET", _CONTACT, _get_contact),
    ("PUT", _CONTACT, _update_contact),
    ("DELETE", _CONTACT, _delete_contact),
    ("GET", f"{_CONTACT}/notes", _list_notes),
    ("POST", f"{_CONTACT}/notes", _add_note),
    ("GET", f"{_CONTACT}/assignments", _assignments),
    ("POST", f"{_CONTACT}/assignments", _assignments),
    ("PUT", f"{_CONTACT}/assignments", _assignments),
    ("POST", f"{_CONTACT}/boards", _contact_boards),
    ("PUT", f"{_CONTACT}/boards", _contact_boards),
    ("GET", "/api/v1/boards", _list_boards),
    ("GET", "/api/v1/tags", _list_tags),
    ("POST", "/api/v1/tags", _create_tag),
    ("POST", "/api/v1/agency/subteams", _create_subteam),
)


# --- the simulator -------------------------------------------------------------------------


_NO_FAULTS: Final = Faults()


@dataclass(frozen=True, slots=True)
class _Arrival:
    """What the simulator decided when an API request arrived (``at`` on its clock,
    ``wall`` in Unix seconds); ``key`` is as presented, ``valid_key`` set if accepted."""

    at: float
    wall: float
    header: str
    key: str | None
    valid_key: str | None
    fault: Faults
    quota: _Quota | None
    retry_in: float | None


class Simulator:
    """An echowin stand-in: auth, rolling-window limits, per-key store, request log, faults.

    Counting: a request counts against its key's windows when the key is valid for the route,
    every window has room at arrival, and ``force_429`` is off, whatever is answered after
    (a ``status`` or ``reset`` fault may hit a request echowin had already counted). 401s
    and 429s are not counted. ``X-RateLimit-*`` headers go on every answer to a valid key,
    computed at arrival.
    """

    def __init__(
        self,
        config: SimConfig,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.log: deque[RecordedRequest] = deque(maxlen=config.log_size)
        self._clock = clock
        self._wall = wall
        self._statuses: collections.Counter[int] = collections.Counter()
        self._budgets: dict[str, _KeyBudget] = {}
        self._stores: dict[str, _Store] = {}
        self._faults: Faults | None = None
        self._fault_uses: int | None = None
        self._limit_header = max(config.limits, key=lambda limit: limit.per_seconds).requests
        self._built = False

    @property
    def faults(self) -> Faults | None:
        """The faults in force, or None."""
        return self._faults

    @property
    def faults_left(self) -> int | None:
        """How many more API requests the counted faults apply to; None if not counted."""
        return self._fault_uses

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults in force; ``faults.count`` uses start from now."""
        self._faults, self._fault_uses = faults, faults.count

    def clear_faults(self) -> None:
        self._faults, self._fault_uses = None, None

    def spend(self, key: str, n: int) -> None:
        """Record ``n`` sends for ``key`` at the current clock, as if another client of the
        same key had been served them; they count even beyond the limits."""
        if key not in self.config.team_keys | self.config.agency_keys:
            raise ValueError("spend: key is not one of the simulator's team or agency keys")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"spend: n must be an integer >= 0, got {n!r}")
        self._budget(key).spend(self._clock(), n)

    def statuses(self) -> collections.Counter[int]:
        """A copy of the count of answered statuses since start (or the last clear_log)."""
        return collections.Counter(self._statuses)

    def clear_log(self) -> None:
        """Forget recorded requests and status counts (not budgets, data or faults)."""
        self.log.clear()
        self._statuses.clear()

    def app(self) -> web.Application:
        """Build the aiohttp application serving this simulator; call it once."""
        if self._built:
            raise RuntimeError("Simulator.app() was already called; build one app per Simulator")
        self._built = True

        @web.middleware
        async def simulate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path.startswith(_CONTROL_PREFIX):
                return await _route(request, handler)
            return await self._serve(request, handler)

        app = web.Application(middlewares=[simulate])
        app[SIMULATOR] = self
        for method, path, handler in (*_API_ROUTES, *_CONTROL_ROUTES):
            app.router.add_route(method, path, handler)
        return app

    async def _serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer one API request, recording it whatever happens (client gone included)."""
        arrival = self._arrive(request)
        status = NO_RESPONSE
        try:
            if arrival.fault.latency_seconds > 0:
                await asyncio.sleep(arrival.fault.latency_seconds)
            if arrival.fault.reset:
                if request.transport is not None:
                    request.transport.close()
                # aiohttp's write of this placeholder fails quietly on the closed transport.
                return web.Response(status=HTTPStatus.BAD_GATEWAY)
            response = await self._respond(request, handler, arrival)
            status = response.status
            return response
        finally:
            self._record(request, arrival, status)

    def _arrive(self, request: web.Request) -> _Arrival:
        """Everything decided at arrival: the fault, the key's validity, the count."""
        at, wall = self._clock(), self._wall()
        fault = self._take_fault()
        header = _key_header(request.path)
        key = request.headers.get(header) or None
        accepted = self.config.agency_keys if header == _AGENCY_HEADER else self.config.team_keys
        valid_key = key if key in accepted else None
        quota: _Quota | None = None
        retry_in: float | None = None
        if fault.force_429:  # an explicit refusal: nothing counted
            quota = _Quota(self._limit_header, 0, at + fault.retry_after)
        elif valid_key is not None:
            budget = self._budget(valid_key)
            retry_in = budget.admit(at)
            quota = budget.quota(at, self.config.remaining_window == "tightest")
        return _Arrival(at, wall, header, key, valid_key, fault, quota, retry_in)

    async def _respond(
        self, request: web.Request, handler: Handler, arrival: _Arrival
    ) -> web.StreamResponse:
        response = await self._pick(request, handler, arrival)
        if arrival.quota is not None:
            response.headers.update(self._quota_headers(arrival))
        fault = arrival.fault
        if fault.echo_key is not None and arrival.key is not None:
            encoded = sim_echo.encode(
                fault.echo_key,
                arrival.key,
                percent=fault.echo_percent,
                swapcase=fault.echo_swapcase,
            )
            response = await sim_echo.echo_answer(
                request, response, arrival.header, encoded, fault.echo_in
            )
        if fault.gzip:
            _gzip(response)
        return response

    async def _pick(
        self, request: web.Request, handler: Handler, arrival: _Arrival
    ) -> web.StreamResponse:
        fault = arrival.fault
        if fault.status is not None:
            return _error(fault.status, _reason(fault.status))
        if fault.force_429:
            return _too_many(fault.retry_after)
        if arrival.valid_key is None:
            missing = arrival.key is None
            return _error(401, f"Missing {arrival.header} header" if missing else "Invalid API key")
        if arrival.retry_in is not None:
            return _too_many(max(1, math.ceil(arrival.retry_in)))
        request[_STORE] = self._store(arrival.valid_key)
        return await _route(request, handler)

    def _quota_headers(self, arrival: _Arrival) -> dict[str, str]:
        quota = arrival.quota
        assert quota is not None
        # Round up: a client that waits until Reset must find the slot free.
        reset = math.ceil(arrival.wall + max(0.0, quota.reset_at - arrival.at))
        if self.config.reset_format == "iso":
            reset_text = datetime.fromtimestamp(reset, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            reset_text = str(reset)
        return {
            "X-RateLimit-Limit": str(quota.limit),
            "X-RateLimit-Remaining": str(quota.remaining),
            "X-RateLimit-Reset": reset_text,
        }

    def _take_fault(self) -> Faults:
        """The faults for the API request arriving now, using up one use of a counted fault."""
        faults = self._faults
        if faults is None:
            return _NO_FAULTS
        if self._fault_uses is not None:
            self._fault_uses -= 1
            if self._fault_uses <= 0:
                self.clear_faults()
        return faults

    def _budget(self, key: str) -> _KeyBudget:
        if key not in self._budgets:
            self._budgets[key] = _KeyBudget(self.config.limits)
        return self._budgets[key]

    def _store(self, key: str) -> _Store:
        if key not in self._stores:
            self._stores[key] = _Store(self._wall)
        return self._stores[key]

    def _record(self, request: web.Request, arrival: _Arrival, status: int) -> None:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        method, path = request.method, request.raw_path
        self.log.append(RecordedRequest(arrival.at, method, path, headers, arrival.key, status))
        self._statuses[status] += 1


SIMULATOR: Final = web.AppKey("echowin_simulator", Simulator)
"""The Simulator serving an app built by ``Simulator.app()``."""

_STORE: Final = web.RequestKey("echowin_sim_store", _Store)


def _key_header(path: str) -> str:
    agency = path == "/api/v1/agency" or path.startswith("/api/v1/agency/")
    return _AGENCY_HEADER if agency else _TEAM_HEADER


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _too_many(retry_after: int) -> web.Response:
    return _error(429, _RATE_LIMITED, {"Retry-After": str(retry_after)})


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Simulated failure"


def _gzip(response: web.StreamResponse) -> None:
    """Gzip a whole answer's body in place; one with a coding already (an echo's) or not
    whole (streamed) is left as it is."""
    if "Content-Encoding" in response.headers:
        return
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        response.body = gzip.compress(response.body)
        response.headers["Content-Encoding"] = "gzip"


async def _route(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run the matched handler, answering every failure as echowin does: JSON ``error``."""
    try:
        return await handler(request)
    except _ApiError as exc:
        return _error(exc.status, exc.message)
    except web.HTTPMethodNotAllowed as exc:
        return _error(405, "Method not allowed", {"Allow": ", ".join(sorted(exc.allowed_methods))})
    except web.HTTPNotFound:
        return _error(404, "Not found")
    except web.HTTPException as exc:  # e.g. 413 for a body past client_max_size
        return _error(exc.status, exc.reason)


# --- control endpoints (/_sim/) ---------------------------------------------------------------


async def _get_requests(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    statuses = {str(status): n for status, n in sorted(sim.statuses().items())}
    return web.json_response({"requests": [r.to_json() for r in sim.log], "statuses": statuses})


async def _clear_requests(request: web.Request) -> web.Response:
    request.app[SIMULATOR].clear_log()
    return web.json_response({"cleared": True})


async def _get_faults(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    faults = None if sim.faults is None else sim.faults.to_json()
    return web.json_response({"faults": faults, "left": sim.faults_left})


async def _set_faults(request: web.Request) -> web.Response:
    try:
        faults = Faults.from_json(await _body(request))
    except ValueError as exc:
        raise _ApiError(400, str(exc)) from None
    request.app[SIMULATOR].set_faults(faults)
    return web.json_response({"faults": faults.to_json()})


async def _clear_faults(request: web.Request) -> web.Response:
    request.app[SIMULATOR].clear_faults()
    return web.json_response({"faults": None})


async def _spend(request: web.Request) -> web.Response:
    body = await _body(request)
    key, n = body.get("key"), body.get("n")
    if not isinstance(key, str) or not isinstance(n, int):
        raise _ApiError(400, 'body must be {"key": string, "n": integer}')
    try:
        request.app[SIMULATOR].spend(key, n)
    except ValueError as exc:
        raise _ApiError(400, str(exc)) from None
    return web.json_response({"spent": n})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


_CONTROL_ROUTES: Final[tuple[tuple[str, str, _ApiHandler], ...]] = (
    ("GET", "/_sim/requests", _get_requests),
    ("DELETE", "/_sim/requests", _clear_requests),
    ("GET", "/_sim/faults", _get_faults),
    ("POST", "/_sim/faults", _set_faults),
    ("DELETE", "/_sim/faults", _clear_faults),
    ("POST", "/_sim/spend", _spend),
    ("GET", "/_sim/healthz", _healthz),
)


async def run_simulator(
    config: SimConfig, host: str, port: int, faults: Faults | None = None
) -> None:
    """Serve a Simulator on ``host:port`` until cancelled (port 0 picks a free port), with
    ``faults`` in force from the start if given (``/_sim/faults`` changes them later).

    Once the socket is bound it prints exactly one line to stdout,
    ``echowin simulator listening on http://HOST:PORT``, so scripts can wait for it.
    """
    simulator = Simulator(config)
    if faults is not None:
        simulator.set_faults(faults)
    runner = web.AppRunner(simulator.app())
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_port = runner.addresses[0][1] if runner.addresses else port
        url_host = f"[{host}]" if ":" in host else host
        print(f"echowin simulator listening on http://{url_host}:{bound_port}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
