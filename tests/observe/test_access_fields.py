"""The access log's client and user agent fields (issue 21, point 2), from a real gateway in
front of the real simulator: the client after ``server.trusted_proxies``, the user agent
bounded and escaped, and the text format with ``-`` where a value is not known."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Awaitable, Callable

import aiohttp

from tests.conftest import GatewayHandle, SimHandle

MakeGateway = Callable[..., Awaitable[GatewayHandle]]


async def lines_of(gw: GatewayHandle, *requests: dict[str, str]) -> list[str]:
    """The access lines of one GET /api/v1/tags per header set in ``requests``."""
    stream = io.StringIO()
    gw.runtime.access_log.stream = stream
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent",)) as session:
        for fields in requests:
            async with session.get(gw.url("/api/v1/tags"), headers=fields) as resp:
                await resp.read()
    gw.runtime.access_log.flush()
    return stream.getvalue().splitlines()


async def test_the_client_is_whom_a_trusted_proxy_names(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    direct = await make_gateway()
    token = await direct.token("tags:read")
    auth = {"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.9"}
    (line,) = await lines_of(direct, auth)
    assert json.loads(line)["client_address"] == "127.0.0.1"  # no proxy trusted: the peer

    behind = await make_gateway(server={"trusted_proxies": ["127.0.0.1"]})
    token = await behind.token("tags:read")
    auth = {"Authorization": f"Bearer {token}", "X-Forwarded-For": "198.51.100.1, 203.0.113.9"}
    refused = {"X-Forwarded-For": "203.0.113.10"}  # no token: refused, still logged
    ok, anonymous = (json.loads(line) for line in await lines_of(behind, auth, refused))
    assert (ok["status"], ok["client_address"]) == (200, "203.0.113.9")
    assert (anonymous["status"], anonymous["client_address"]) == (401, "203.0.113.10")


async def test_the_user_agent_is_cut_and_escaped_in_both_formats(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    agent = 'crm "sync" \\ ' + "é" * 10 + " " + "x" * 400
    for fmt in ("json", "text"):
        gw = await make_gateway(logging={"format": fmt})
        token = await gw.token("tags:read")
        auth = {"Authorization": f"Bearer {token}"}
        with_agent, without = await lines_of(gw, {**auth, "User-Agent": agent}, auth)
        assert with_agent.isascii()
        if fmt == "json":
            assert json.loads(with_agent)["user_agent"] == agent[:200]
            assert json.loads(without)["user_agent"] is None
        else:
            shown = re.search(r' user_agent=("(?:[^"\\]|\\.)*")', with_agent)
            assert shown is not None and json.loads(shown[1]) == agent[:200]
            assert " user_agent=-" in without and "None" not in without
            assert " client_address=127.0.0.1 " in without
