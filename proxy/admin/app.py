"""The admin listener: /healthz, /readyz, /metrics (open) and /admin/* (bearer token)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy import SERVER_NAME
from proxy.admin.cache import cache_view, purge_cache
from proxy.admin.openapi import openapi_document
from proxy.admin.status import status_json, status_page
from proxy.admin.tokenops import upstream_key_names
from proxy.admin.tokens import MAX_ADMIN_BODY, add_token_routes
from proxy.aiohttp_compat import name_servers
from proxy.errors import Reason, json_error
from proxy.runtime import RUNTIME, Runtime
from proxy.server.listeners import HANDLER_ARGS

log = logging.getLogger("echowin_gateway.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the token store answers. While a shared store (Redis, or PostgreSQL for
    tokens) is down, a replica configured with ``on_state_failure: local`` carries on with
    the tokens it has seen and stays ready (say so in the body); with ``closed`` it answers
    503 until the store is back. Once SIGTERM's drain
    has begun the proxy accepts no more: 503 ``draining``."""
    rt = request.app[RUNTIME]
    if rt.draining:
        return web.json_response({"status": "draining"}, status=503)
    try:
        await rt.store.ping()
    except Exception as exc:  # any backend failure means the store cannot answer
        log.warning("token store not ready", extra={"fields": {"error": type(exc).__name__}})
        carries_on = rt.tokens_shared and rt.config.on_state_failure == "local"
        body = {
            "status": "degraded" if carries_on else "unavailable",
            "token_store": "down",
            "on_state_failure": rt.config.on_state_failure,
        }
        return web.json_response(body, status=200 if carries_on else 503)
    return web.json_response({"status": "ready", "token_store": "up"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus' text format, or OpenMetrics when Accept asks; gzip when allowed."""
    headers = request.headers
    answer = request.app[RUNTIME].metrics.answer(
        headers.get("Accept"), headers.get("Accept-Encoding")
    )
    return web.Response(body=answer.body, headers=answer.headers)


_ADMIN_CHALLENGE = 'Bearer realm="echowin-gateway admin"'
_PATHS = "/healthz, /readyz, /metrics, /status, /status.json and /admin/*"


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own error pages (404, 405, 413, ...) as the JSON every admin error is;
    an error already JSON passes as it is."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return _as_json(exc, request)


def _as_json(exc: web.HTTPException, request: web.Request) -> web.Response:
    if exc.status == 404:
        message = f"Not found: {request.path}; this listener serves {_PATHS}"
        return json_error(404, message, reason=Reason.NOT_FOUND)
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        message = f"Method {request.method} is not allowed on {request.path} (allowed: {allow})"
        headers = {"Allow": allow}
        return json_error(405, message, reason=Reason.METHOD_NOT_ALLOWED, headers=headers)
    if exc.status == 413:
        return json_error(413, "Request body too large", reason=Reason.BODY_TOO_LARGE)
    return json_error(exc.status, exc.reason, reason=Reason.BAD_REQUEST)


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Guard /admin/* with the admin bearer token, compared in constant time."""
    if not request.path.startswith("/admin/"):
        return await handler(request)
    expected = request.app[RUNTIME].secrets.admin_token
    if expected is None:
        return json_error(
            403, "Admin API disabled: set GATEWAY_ADMIN_TOKEN", reason=Reason.DISABLED
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.reveal().encode()
    ):
        message = "Invalid admin token" if given.strip() else "Missing admin token"
        headers = {"WWW-Authenticate": _ADMIN_CHALLENGE}
        return json_error(401, message, reason=Reason.UNAUTHORIZED, headers=headers)
    return await handler(request)


async def openapi(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return web.json_response(openapi_document(rt.routes, upstream_key_names(rt.config)))


async def budget(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    body: dict[str, object] = {"credentials": rt.admitter.snapshot()}
    if rt.cache is not None:
        body["cache"] = cache_view(rt)
    return web.json_response(body)


def build_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application(
        middlewares=[json_errors, admin_auth],
        client_max_size=MAX_ADMIN_BODY,
        handler_args=HANDLER_ARGS,
    )
    name_servers(SERVER_NAME)  # every listener's answers: the gateway, without versions
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status_page)
    app.router.add_get("/status.json", status_json)
    add_token_routes(app.router)
    app.router.add_get("/admin/openapi.json", openapi)
    app.router.add_get("/admin/budget", budget)
    app.router.add_delete("/admin/cache", purge_cache)
    return app
