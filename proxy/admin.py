"""The admin listener: /healthz, /readyz, /metrics (open) and /admin/* (bearer token)."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.errors import json_error
from proxy.runtime import RUNTIME, Runtime
from proxy.tokenops import create_token

audit = logging.getLogger("echowin_gateway.audit")
log = logging.getLogger("echowin_gateway.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_MAX_ADMIN_BODY = 64 * 1024


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, indent=None))


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the token store answers. While a shared store (Redis) is down, a replica
    configured with ``on_state_failure: local`` carries on alone and stays ready (say so in
    the body); with ``closed`` it answers 503 until the store is back."""
    rt = request.app[RUNTIME]
    try:
        await rt.store.ping()
    except Exception as exc:  # any backend failure means the store cannot answer
        log.warning("token store not ready", extra={"fields": {"error": type(exc).__name__}})
        carries_on = rt.shared_state and rt.config.on_state_failure == "local"
        body = {
            "status": "degraded" if carries_on else "unavailable",
            "token_store": "down",
            "on_state_failure": rt.config.on_state_failure,
        }
        return _json(body, status=200 if carries_on else 503)
    return _json({"status": "ready", "token_store": "up"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Guard /admin/* with the admin bearer token, compared in constant time."""
    if not request.path.startswith("/admin/"):
        return await handler(request)
    expected = request.app[RUNTIME].secrets.admin_token
    if expected is None:
        return json_error(403, "Admin API disabled: set GATEWAY_ADMIN_TOKEN", reason="disabled")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.reveal().encode()
    ):
        return json_error(401, "Invalid admin token", reason="unauthorized")
    return await handler(request)


async def _read_json(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > _MAX_ADMIN_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=_MAX_ADMIN_BODY, actual_size=0)
    try:
        data = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise _bad("body must be a JSON object") from None
    if not isinstance(data, dict):
        raise _bad("body must be a JSON object")
    return data


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": message, "reason": "bad_request"}),
        content_type="application/json",
    )


def _audit(request: web.Request, action: str, token_id: str | None) -> None:
    fields = {"action": action, "token_id": token_id, "peer": request.remote}
    audit.info("admin action", extra={"fields": fields})


_CREATE_FIELDS = {"name", "scopes", "upstream_key", "hourly", "per_minute", "weight", "expires_in"}


async def tokens_create(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    data = await _read_json(request)
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
        new = await create_token(rt.store, rt.config, rt.routes, **_create_args(data))
    except (ValueError, TypeError) as exc:
        raise _bad(str(exc)) from None
    _audit(request, "token.create", new.record.id)
    return _json({"token": new.token, **new.record.public_view()}, status=201)


def _create_args(data: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {"name": data.get("name"), "scopes": data["scopes"]}
    if not isinstance(args["name"], str):
        raise _bad("name: must be a string")
    for key in ("upstream_key", "hourly", "per_minute", "weight", "expires_in"):
        if data.get(key) is not None:
            args[key] = data[key]
    return args


async def tokens_list(request: web.Request) -> web.Response:
    records = await request.app[RUNTIME].store.list()
    return _json({"tokens": [r.public_view() for r in records]})


async def token_show(request: web.Request) -> web.Response:
    record = await request.app[RUNTIME].store.get(request.match_info["token_id"])
    if record is None:
        return json_error(404, "Unknown token", reason="not_found")
    return _json(record.public_view())


async def token_revoke(request: web.Request) -> web.Response:
    token_id = request.match_info["token_id"]
    record = await request.app[RUNTIME].auth.revoke(token_id)
    if record is None:
        return json_error(404, "Unknown token", reason="not_found")
    _audit(request, "token.revoke", token_id)
    return _json(record.public_view())


async def budget(request: web.Request) -> web.Response:
    return _json({"credentials": request.app[RUNTIME].admitter.snapshot()})


def build_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[admin_auth], client_max_size=_MAX_ADMIN_BODY)
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/tokens", tokens_create)
    app.router.add_get("/admin/tokens", tokens_list)
    app.router.add_get("/admin/tokens/{token_id}", token_show)
    app.router.add_delete("/admin/tokens/{token_id}", token_revoke)
    app.router.add_get("/admin/budget", budget)
    return app
