"""An OTLP/HTTP traces sink for the benchmark's tracing variants: it takes every export,
counts its spans, and answers as a collector would.

    python -m tests.bench.otlp_sink --port P

``POST /v1/traces`` decodes the protobuf (opentelemetry-proto) and counts; ``GET /count``
answers ``{"exports": N, "spans": M}``: how many spans the traced gateways really sent.
"""

from __future__ import annotations

import argparse
import sys

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

COUNTS = web.AppKey("counts", dict)
ANSWER = ExportTraceServiceResponse().SerializeToString()


async def receive(request: web.Request) -> web.Response:
    export = ExportTraceServiceRequest.FromString(await request.read())
    counts = request.app[COUNTS]
    counts["exports"] += 1
    counts["spans"] += sum(
        len(scope.spans) for rs in export.resource_spans for scope in rs.scope_spans
    )
    return web.Response(body=ANSWER, content_type="application/x-protobuf")


async def count(request: web.Request) -> web.Response:
    return web.json_response(request.app[COUNTS])


def build_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[COUNTS] = {"exports": 0, "spans": 0}
    app.router.add_post("/v1/traces", receive)
    app.router.add_get("/count", count)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench OTLP/HTTP sink: counts spans")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(build_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
