"""The admin API for tokens: create, list, show, update quotas, revoke, usage.

JSON in and out; every change writes one audit log line (action, token id, peer; never a
token or a secret) and one entry of the token store's audit log (``proxy/admin/audit.py``).
Bad input gets a 400 naming the field and changes nothing.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from aiohttp import web

from proxy.admin.audit import (
    admin_actor,
    audit_list,
    changes_detail,
    created_detail,
    record_operation,
)
from proxy.admin.tokenops import NameTaken, create_token, token_changes, token_view
from proxy.errors import Reason, json_error
from proxy.runtime import RUNTIME

audit = logging.getLogger("echowin_gateway.audit")
MAX_ADMIN_BODY = 64 * 1024


async def read_json(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_ADMIN_BODY, actual_size=0)
    try:
        data = json.loads(await request.read() or b"{}")
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _bad("body must be a JSON object") from None
    if not isinstance(data, dict):
        raise _bad("body must be a JSON object")
    return data


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": message, "reason": Reason.BAD_REQUEST}),
        content_type="application/json",
    )


async def _audit(
    request: web.Request, action: str, token_id: str, detail: dict[str, object]
) -> None:
    actor = admin_actor(request)
    fields = {"action": action, "token_id": token_id, "peer": request.remote, "actor": actor.name}
    audit.info("admin action", extra={"fields": fields})
    await record_operation(request.app[RUNTIME].store, actor, action, token_id, detail)


_CREATE_FIELDS = {
    "name",
    "scopes",
    "upstream_key",
    "hourly",
    "per_minute",
    "weight",
    "expires_in",
    "class",
}


async def tokens_create(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    data = await read_json(request)
    unknown = set(data) - _CREATE_FIELDS
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(sorted(unknown))}")
    if not isinstance(data.get("scopes"), list) or not all(
        isinstance(s, str) for s in data["scopes"]
    ):
        raise _bad("scopes: must be a list of strings")
    for key in ("hourly", "per_minute", "weight"):
        if key in data and data[key] is not None and type(data[key]) is not int:
            raise _bad(f"{key}: must be an integer")
    try:
        new = await create_token(
            rt.store,
            rt.config,
            rt.routes,
            key_names=rt.secrets.team_key_names(),
            **_create_args(data),
        )
    except NameTaken as exc:
        return json_error(409, str(exc), reason=Reason.NAME_TAKEN)
    except (ValueError, TypeError) as exc:
        raise _bad(str(exc)) from None
    await _audit(request, "token.create", new.record.id, created_detail(new.record))
    return web.json_response({"token": new.token, **token_view(new.record, rt.config)}, status=201)


def _create_args(data: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {"name": data.get("name"), "scopes": data["scopes"]}
    if not isinstance(args["name"], str):
        raise _bad("name: must be a string")
    for key in ("upstream_key", "hourly", "per_minute", "weight", "expires_in"):
        if data.get(key) is not None:
            args[key] = data[key]
    if data.get("class") is not None:
        args["service_class"] = data["class"]
    return args


async def tokens_list(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    records = await rt.store.list()
    return web.json_response({"tokens": [token_view(r, rt.config) for r in records]})


async def token_show(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    record = await rt.store.get(request.match_info["token_id"])
    if record is None:
        return json_error(404, "Unknown token", reason=Reason.NOT_FOUND)
    return web.json_response(token_view(record, rt.config))


async def token_revoke(request: web.Request) -> web.Response:
    token_id = request.match_info["token_id"]
    record = await request.app[RUNTIME].auth.revoke(token_id)
    if record is None:
        return json_error(404, "Unknown token", reason=Reason.NOT_FOUND)
    await _audit(
        request, "token.revoke", token_id, {"revoked_at": record.public_view()["revoked_at"]}
    )
    return web.json_response(record.public_view())


async def token_update(request: web.Request) -> web.Response:
    """PATCH: quotas, weight, scopes, expiry or class; takes effect at once on this replica."""
    rt = request.app[RUNTIME]
    token_id = request.match_info["token_id"]
    try:
        changes = token_changes(await read_json(request), rt.routes, config=rt.config)
        record = await rt.store.update(token_id, **changes)
    except ValueError as exc:
        raise _bad(str(exc)) from None
    rt.auth.invalidate(token_id)
    if record is None:
        return json_error(404, "Unknown token", reason=Reason.NOT_FOUND)
    await _audit(request, "token.update", token_id, changes_detail(changes, record))
    return web.json_response(token_view(record, rt.config))


async def token_usage(request: web.Request) -> web.Response:
    """What one token has used: answers by status on this replica, its own quota windows."""
    rt = request.app[RUNTIME]
    record = await rt.store.get(request.match_info["token_id"])
    if record is None:
        return json_error(404, "Unknown token", reason=Reason.NOT_FOUND)
    answered = rt.usage.get(record.id, Counter())
    return web.json_response(
        {
            "token": record.public_view(),
            "answered": {str(status): n for status, n in sorted(answered.items())},
            "quota": rt.admitter.token_quota_view(record.id),
        }
    )


async def token_forget(request: web.Request) -> web.Response:
    """Drop what this process caches about a token, so its next request reads the store.

    The supervisor of ``serve --workers N`` calls it on every other worker after one of them
    revoked or changed the token, so the change takes effect at once on all of them."""
    request.app[RUNTIME].auth.invalidate(request.match_info["token_id"])
    return web.json_response({"forgotten": request.match_info["token_id"]})


def add_token_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/admin/tokens", tokens_create)
    router.add_get("/admin/tokens", tokens_list)
    router.add_get("/admin/tokens/{token_id}", token_show)
    router.add_patch("/admin/tokens/{token_id}", token_update)
    router.add_delete("/admin/tokens/{token_id}", token_revoke)
    router.add_get("/admin/tokens/{token_id}/usage", token_usage)
    router.add_post("/admin/tokens/{token_id}/forget", token_forget)
    router.add_get("/admin/audit", audit_list)
