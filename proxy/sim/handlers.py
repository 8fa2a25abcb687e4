"""The simulator's API routes: thin handlers over the key's ``Store``, and echowin's JSON
error answers for every failure (``route``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.sim.store import (
    ApiError,
    ContactPatch,
    JSONObject,
    ListQuery,
    Store,
    opt_object,
    opt_str,
    req_str,
    str_list,
)

__all__ = [
    "API_ROUTES",
    "STORE",
    "ApiHandler",
    "error",
    "read_body",
    "route",
    "status_phrase",
    "too_many",
]

_RATE_LIMITED: Final = "Rate limit exceeded. Please try again later."
_MAX_BULK: Final = 100

STORE: Final = web.RequestKey("echowin_sim_store", Store)
"""The key's store, set on an API request once its key is accepted."""


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


async def read_body(request: web.Request) -> JSONObject:
    try:  # NaN and Infinity are Python's, not JSON's: stored, they would come back unreadable
        body = json.loads(await request.read(), parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "Invalid JSON body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    return body


# --- API handlers: thin; the store does the work ------------------------------------------


async def _list_contacts(request: web.Request) -> web.Response:
    return web.json_response(request[STORE].list_contacts(ListQuery.parse(request.query)))


async def _create_contact(request: web.Request) -> web.Response:
    store, patch = request[STORE], ContactPatch.parse(await read_body(request), create=True)
    return web.json_response({"data": store.render(store.save_contact(patch))}, status=201)


async def _bulk_create(request: web.Request) -> web.Response:
    store, items = request[STORE], (await read_body(request)).get("contacts")
    if not isinstance(items, list) or not 1 <= len(items) <= _MAX_BULK:
        raise ApiError(400, f"contacts must be an array of 1..{_MAX_BULK} contacts")
    created: list[JSONObject] = []
    errors: list[JSONObject] = []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise ApiError(400, "contact must be an object")
            patch = ContactPatch.parse(item, create=True)
            created.append(store.render(store.save_contact(patch)))
        except ApiError as exc:
            errors.append({"index": index, "error": exc.message})
    if not created:
        return web.json_response({"error": "No contact was created", "errors": errors}, status=400)
    return web.json_response({"data": {"created": created, "errors": errors}}, status=201)


async def _get_contact(request: web.Request) -> web.Response:
    store = request[STORE]
    return web.json_response({"data": store.render(store.contact(request.match_info["cid"]))})


async def _update_contact(request: web.Request) -> web.Response:
    store = request[STORE]
    contact = store.contact(request.match_info["cid"])
    patch = ContactPatch.parse(await read_body(request), create=False)
    return web.json_response({"data": store.render(store.save_contact(patch, contact))})


async def _delete_contact(request: web.Request) -> web.Response:
    contact = request[STORE].contact(request.match_info["cid"])
    del request[STORE].contacts[contact.id]
    return web.json_response({"data": {"id": contact.id, "deleted": True}})


async def _list_notes(request: web.Request) -> web.Response:
    contact = request[STORE].contact(request.match_info["cid"])
    return web.json_response({"data": list(contact.notes)})


async def _add_note(request: web.Request) -> web.Response:
    store = request[STORE]
    contact = store.contact(request.match_info["cid"])
    body = await read_body(request)
    text, kind = req_str(body, "note", 10_000), opt_str(body, "type") or "general"
    return web.json_response({"data": store.add_note(contact, text, kind)}, status=201)


async def _assignments(request: web.Request) -> web.Response:
    """GET lists the assigned users; POST adds ``userIds``; PUT replaces them."""
    contact = request[STORE].contact(request.match_info["cid"])
    if request.method != "GET":
        user_ids = str_list(await read_body(request), "userIds")
        if user_ids is None:
            raise ApiError(400, "userIds is required")
        kept = contact.user_ids if request.method == "POST" else []
        contact.user_ids = list(dict.fromkeys([*kept, *user_ids]))
    return web.json_response({"data": {"contactId": contact.id, "userIds": contact.user_ids}})


async def _contact_boards(request: web.Request) -> web.Response:
    """POST adds the contact to ``boardIds``; PUT replaces its boards."""
    store = request[STORE]
    contact = store.contact(request.match_info["cid"])
    board_ids = str_list(await read_body(request), "boardIds")
    if board_ids is None:
        raise ApiError(400, "boardIds is required")
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
    return web.json_response({"data": request[STORE].custom_fields})


async def _list_boards(request: web.Request) -> web.Response:
    return web.json_response({"data": list(request[STORE].boards.values())})


async def _list_tags(request: web.Request) -> web.Response:
    return web.json_response({"data": list(request[STORE].tags.values())})


async def _create_tag(request: web.Request) -> web.Response:
    body = await read_body(request)
    tag = request[STORE].create_tag(req_str(body, "name", 50), opt_str(body, "color"))
    return web.json_response({"data": tag}, status=201)


async def _create_subteam(request: web.Request) -> web.Response:
    body = await read_body(request)
    names = {name: req_str(body, name, 50) for name in ("firstName", "lastName", "teamName")}
    email = req_str(body, "email")
    if "@" not in email:
        raise ApiError(400, "email must be a valid email address")
    credits_ = body.get("totalMonthlyCredits", 1000)
    if isinstance(credits_, bool) or not isinstance(credits_, int | float) or credits_ < 0:
        raise ApiError(400, "totalMonthlyCredits must be a number >= 0")
    subteam: JSONObject = {"id": str(uuid.uuid4()), **names, "email": email}
    subteam["totalMonthlyCredits"] = credits_
    subteam["accessConfig"] = opt_object(body, "accessConfig") or {}
    subteam["createdAt"] = request[STORE].now_iso()
    request[STORE].subteams.append(subteam)
    return web.json_response({"data": subteam}, status=201)


ApiHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CONTACT: Final = "/api/v1/contacts/{cid}"

# The route table is data: new echowin families are new rows.
API_ROUTES: Final[tuple[tuple[str, str, ApiHandler], ...]] = (
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


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def too_many(retry_after: int) -> web.Response:
    return error(429, _RATE_LIMITED, {"Retry-After": str(retry_after)})


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Simulated failure"


async def route(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run the matched handler, answering every failure as echowin does: JSON ``error``."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error(exc.status, exc.message)
    except web.HTTPMethodNotAllowed as exc:
        return error(405, "Method not allowed", {"Allow": ", ".join(sorted(exc.allowed_methods))})
    except web.HTTPNotFound:
        return error(404, "Not found")
    except web.HTTPException as exc:  # e.g. 413 for a body past client_max_size
        return error(exc.status, exc.reason)
