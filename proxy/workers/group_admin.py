"""The admin listener of a group of workers (``serve --workers N``), served by the supervisor.

- ``/metrics``: every worker's metrics, each sample labelled ``worker="<index>"``, and the
  supervisor's own process metrics (``worker="supervisor"``); each family's HELP and TYPE
  once.
- ``/healthz``: 200 while at least one worker process runs (503 when none does), with each
  worker's pid, readiness and restart count.
- ``/readyz``: 200 only when every worker's own /readyz answers 200.
- ``/admin/budget``, ``/status``, ``/status.json``: every worker's view, merged
  (proxy/workers/group_status.py).
- Everything else (``/admin/tokens``, ...) is forwarded to the lowest-numbered ready worker:
  tokens live in the shared state, so any worker answers for all.

Workers are reached on their private unix sockets (proxy/workers/supervisor.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from proxy import SERVER_NAME
from proxy.admin.app import json_errors
from proxy.admin.cache import merge_cache
from proxy.admin.status import status_html
from proxy.admin.tokens import MAX_ADMIN_BODY
from proxy.aiohttp_compat import name_servers
from proxy.errors import Reason, json_error
from proxy.observe.metrics import CONNECTIONS_REFUSED_HELP, expose
from proxy.server.guard import REFUSAL_REASONS
from proxy.server.listeners import HANDLER_ARGS
from proxy.workers.group_metrics import WORKER_LABEL, merge_metrics
from proxy.workers.group_status import merge_credentials, merge_status

log = logging.getLogger("echowin_gateway.admin")

CALL_SECONDS = 5.0  # one call to a worker's admin socket, at most
# Not forwarded either way: they describe one hop, not the message.
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}
)
# Nor these, on the way back: the client already decoded the body.
ANSWER_SKIP = HOP_HEADERS | {"content-encoding"}


class Member(Protocol):
    """One worker as the admin listener sees it (proxy/workers/supervisor.py: Worker)."""

    index: int
    socket: str
    ready: bool
    restarts: int

    @property
    def pid(self) -> int | None: ...


class Group(Protocol):
    @property
    def workers(self) -> Sequence[Member]: ...

    @property
    def links(self) -> WorkerLinks: ...


GROUP = web.AppKey("group", Group)
SUPERVISOR_REGISTRY = web.AppKey("supervisor_registry", CollectorRegistry)


class WorkerLinks:
    """HTTP over each worker's admin socket; one short connection per call, so a restarted
    worker is never asked on a dead connection."""

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def session(self, member: Member) -> aiohttp.ClientSession:
        found = self._sessions.get(member.socket)
        if found is None or found.closed:
            connector = aiohttp.UnixConnector(path=member.socket, force_close=True)
            timeout = aiohttp.ClientTimeout(total=CALL_SECONDS)
            found = aiohttp.ClientSession(connector=connector, timeout=timeout)
            self._sessions[member.socket] = found
        return found

    async def get(
        self, member: Member, path: str, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        return await self.call(member, "GET", path, headers)

    async def call(
        self, member: Member, method: str, path: str, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        url = f"http://worker{path}"
        async with self.session(member).request(method, url, headers=headers) as resp:
            return resp.status, await resp.read()

    async def healthy(self, member: Member) -> bool:
        try:
            status, _ = await self.get(member, "/healthz")
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False
        return status == 200

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


# --- /metrics ----------------------------------------------------------------------------


class _Restarts(Collector):
    """``echowin_gateway_worker_restarts_total``: the supervisor's count per worker."""

    def __init__(self, group: Group) -> None:
        self._group = group

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "echowin_gateway_worker_restarts",
            "Times the supervisor restarted a worker that died, by worker index.",
            labels=[WORKER_LABEL],
        )
        for member in self._group.workers:
            family.add_metric([str(member.index)], member.restarts)
        yield family


class ConnectionsRefused(Collector):
    """``echowin_gateway_connections_refused_total`` of the supervisor's admin listener
    (``refused`` is its guard's callback). Built here rather than as a prometheus_client
    Counter: a Counter carries its ``_created`` series inside its own family, while the
    workers' pages parse theirs into a family apart, which the merged page would then name
    twice."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(REFUSAL_REASONS, 0)

    def refused(self, reason: str) -> None:
        self.counts[reason] += 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "echowin_gateway_connections_refused",
            CONNECTIONS_REFUSED_HELP,
            labels=["reason"],
        )
        for reason, count in self.counts.items():
            family.add_metric([reason], count)
        yield family


CONNECTIONS_REFUSED = web.AppKey("connections_refused", ConnectionsRefused)


async def metrics(request: web.Request) -> web.Response:
    group = request.app[GROUP]
    ready = [w for w in group.workers if w.ready]

    async def fetch(member: Member) -> str | None:
        try:
            status, body = await group.links.get(member, "/metrics")
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        return body.decode("utf-8", "replace") if status == 200 else None

    pages = await asyncio.gather(*(fetch(w) for w in ready))
    found = {str(w.index): page for w, page in zip(ready, pages, strict=True) if page is not None}
    own = request.app[SUPERVISOR_REGISTRY].collect()
    merged = merge_metrics(found, own)
    headers = request.headers
    answer = expose(merged, headers.get("Accept"), headers.get("Accept-Encoding"))
    return web.Response(body=answer.body, headers=answer.headers)


# --- health ------------------------------------------------------------------------------


def _members(group: Group) -> list[dict[str, Any]]:
    return [
        {"worker": w.index, "pid": w.pid, "ready": w.ready, "restarts": w.restarts}
        for w in group.workers
    ]


async def healthz(request: web.Request) -> web.Response:
    group = request.app[GROUP]
    alive = sum(1 for w in group.workers if w.pid is not None)
    status = "ok" if alive == len(group.workers) else "degraded" if alive else "down"
    body = {"status": status, "workers": _members(group)}
    return web.json_response(body, status=200 if alive else 503)


async def readyz(request: web.Request) -> web.Response:
    """Ready when every worker is; ``degraded`` when every worker answers 200 but one
    carries on without its shared state (see proxy/admin/app.py: readyz)."""
    group = request.app[GROUP]

    async def ask(member: Member) -> tuple[int, str]:
        if not member.ready:
            return 503, "starting" if member.pid is not None else "down"
        try:
            status, body = await group.links.get(member, "/readyz")
            return status, str(json.loads(body).get("status", "?"))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return 503, "down"

    answers = await asyncio.gather(*(ask(w) for w in group.workers))
    ok = all(status == 200 for status, _ in answers)
    states = {state for _, state in answers}
    overall = ("ready" if states == {"ready"} else "degraded") if ok else "unavailable"
    rows = [
        {"worker": w.index, "status": s} for w, (_, s) in zip(group.workers, answers, strict=True)
    ]
    return web.json_response({"status": overall, "workers": rows}, status=200 if ok else 503)


# --- /admin/budget, /status: one view of the shared budget ------------------------------


async def _every_worker(
    request: web.Request, path: str, headers: Mapping[str, str] | None = None
) -> list[Any] | web.Response:
    """``path``'s JSON from every ready worker; or the first answer that is not a 200."""
    group = request.app[GROUP]
    ready = [w for w in group.workers if w.ready]
    if not ready:
        return json_error(503, "No worker is ready", reason=Reason.NO_WORKER)
    try:
        answers = await asyncio.gather(*(group.links.get(w, path, headers) for w in ready))
    except (aiohttp.ClientError, OSError, TimeoutError):
        return json_error(502, "A worker did not answer", reason=Reason.WORKER_UNAVAILABLE)
    for status, body in answers:
        if status != 200:
            return web.Response(status=status, body=body, content_type="application/json")
    return [json.loads(body) for _, body in answers]


async def budget(request: web.Request) -> web.Response:
    auth = {"Authorization": request.headers.get("Authorization", "")}
    views = await _every_worker(request, "/admin/budget", auth)
    if isinstance(views, web.Response):
        return views
    body: dict[str, Any] = {"credentials": merge_credentials([v["credentials"] for v in views])}
    if any("cache" in v for v in views):
        body["cache"] = merge_cache([v.get("cache") for v in views])
    return web.json_response(body)


async def status_json(request: web.Request) -> web.Response:
    datas = await _every_worker(request, "/status.json")
    return datas if isinstance(datas, web.Response) else web.json_response(merge_status(datas))


async def status_page(request: web.Request) -> web.Response:
    datas = await _every_worker(request, "/status.json")
    if isinstance(datas, web.Response):
        return datas
    return web.Response(text=status_html(merge_status(datas)), content_type="text/html")


# --- everything else ---------------------------------------------------------------------


async def forward(request: web.Request) -> web.StreamResponse:
    """The request, as it came, to one ready worker; its answer, as it came, back."""
    group = request.app[GROUP]
    member = next((w for w in group.workers if w.ready), None)
    if member is None:
        return json_error(503, "No worker is ready", reason=Reason.NO_WORKER)
    if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_ADMIN_BODY, actual_size=0)
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
    headers["X-Forwarded-For"] = request.remote or ""
    session = group.links.session(member)
    try:
        async with session.request(
            request.method, f"http://worker{request.rel_url}", headers=headers, data=body or None
        ) as resp:
            data = await resp.read()
            out = CIMultiDict(
                (k, v) for k, v in resp.headers.items() if k.lower() not in ANSWER_SKIP
            )
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError):
        return json_error(502, "The worker did not answer", reason=Reason.WORKER_UNAVAILABLE)
    token_id = _changed_token(request, status)
    if token_id is not None:
        await _forget_everywhere(group, member, token_id, request.headers)
    return web.Response(status=status, body=data, headers=out)


_TOKEN_PATH = re.compile(r"/admin/tokens/([^/]+)")


def _changed_token(request: web.Request, status: int) -> str | None:
    """The id of the token a successful revoke or update just changed, else None."""
    if request.method not in ("DELETE", "PATCH") or not 200 <= status < 300:
        return None
    match = _TOKEN_PATH.fullmatch(request.path)
    return None if match is None else match.group(1)


async def _forget_everywhere(
    group: Group, done: Member, token_id: str, headers: Mapping[str, str]
) -> None:
    """Tell every other ready worker to drop its cached copy of ``token_id``: the worker
    that made the change forgot its own, the others would keep theirs for up to
    ``tokens.cache_ttl_seconds``. Best effort: a worker that does not answer is starting or
    gone, and a starting worker has nothing cached."""
    auth = {"Authorization": headers.get("Authorization", "")}
    path = f"/admin/tokens/{quote(token_id, safe='')}/forget"

    async def forget(member: Member) -> None:
        try:
            await group.links.call(member, "POST", path, auth)
        except (aiohttp.ClientError, OSError, TimeoutError):
            log.warning("worker did not forget a token", extra={"fields": {"worker": member.index}})

    await asyncio.gather(*(forget(w) for w in group.workers if w.ready and w is not done))


def build_group_admin_app(group: Group) -> web.Application:
    app = web.Application(
        client_max_size=MAX_ADMIN_BODY, handler_args=HANDLER_ARGS, middlewares=[json_errors]
    )
    name_servers(SERVER_NAME)  # every listener's answers: the gateway, without versions
    app[GROUP] = group
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # the supervisor's own process_*
    registry.register(_Restarts(group))
    app[SUPERVISOR_REGISTRY] = registry
    refused = ConnectionsRefused()
    registry.register(refused)
    app[CONNECTIONS_REFUSED] = refused
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/budget", budget)
    app.router.add_get("/status", status_page)
    app.router.add_get("/status.json", status_json)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app
