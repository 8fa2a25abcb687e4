"""A minimal upstream for the benchmark when nginx is not installed: 200 JSON on every path.

    python -m tests.bench.upstream --port P

The gateway only forwards ``/api/v1/...``; this answers every path with the same small JSON
body so the gateway, the bare pass-through and nginx all see the same upstream. Like echowin
it sends ``X-RateLimit-*`` headers (a limit as large as the bench gateway's, never spent):
a gateway whose state forgets its sends (memory://) calibrates from the first such answer
and until then sends one request at a time.
"""

from __future__ import annotations

import argparse
import sys

from aiohttp import web

BODY = b'{"data":[],"total":0}'
# What echowin says about its budget on every answer (Reset: seconds from now).
RATE_LIMIT_HEADERS = {
    "X-RateLimit-Limit": "10000000",
    "X-RateLimit-Remaining": "10000000",
    "X-RateLimit-Reset": "3600",
}


async def answer(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json", headers=RATE_LIMIT_HEADERS)


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench upstream: 200 JSON on every path")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(
        build_app(), host=args.host, port=args.port, access_log=None, print=None, backlog=4096
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
