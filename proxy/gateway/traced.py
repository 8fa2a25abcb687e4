"""The proxy handler when tracing is on (proxy/observe/tracing.py): each request gets a
server span, continuing its caller's trace, before :func:`proxy.gateway.handler.handle`
runs it; the span ends when the request is accounted (proxy/gateway/account.py).

The proxy app routes here instead of ``handle`` only when tracing is on (proxy/app.py),
so a gateway without tracing does no tracing work at all on its requests.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.aiohttp_compat import replace_fields
from proxy.gateway.gate import client
from proxy.gateway.handler import handle
from proxy.runtime import RUNTIME
from proxy.server.lobby import held_since


async def traced_handle(request: web.Request) -> web.StreamResponse:
    """``handle`` with a span. echowin is sent the span's ``traceparent`` (and the
    caller's ``tracestate``) in place of the caller's: the request's fields are replaced
    by a copy carrying them, which forward.py passes on like any end-to-end field."""
    rt = request.app[RUNTIME]
    tracing = rt.tracing
    assert tracing is not None, "traced_handle routed without tracing"
    fields = request.headers
    address = client(rt, request.remote, fields)
    span = tracing.begin(
        request.method,
        request.raw_path.partition("?")[0],
        fields,
        request.scheme,
        request.host,
        request.remote if address is None else str(address),
        f"{request.version.major}.{request.version.minor}",
        held_since(request),
    )
    replace_fields(request, CIMultiDictProxy(span.outgoing(fields)))
    return await handle(request, span)


__all__ = ["traced_handle"]
