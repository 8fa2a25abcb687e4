"""The request path end to end: real gateway, real simulator, loopback sockets."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
import yarl
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import generate_latest

from proxy.observe.logs import JsonFormatter
from proxy.sim import Faults
from tests.conftest import (
    ACME_KEY,
    ADMIN_TOKEN,
    AGENCY_KEY,
    SECRETS,
    TEAM_KEY,
    GatewayHandle,
    ServerFactory,
    SimHandle,
    base_url,
)
from tests.procs import eventually

MakeGateway = Callable[..., Awaitable[GatewayHandle]]


# /metrics as it is, uncompressed: call() keeps bodies as sent, and /metrics gzips for a
# client that accepts it (aiohttp's default Accept-Encoding).
PLAIN = {"Accept-Encoding": "identity"}


async def call(
    method: str,
    url: str,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    **kw: object,
) -> tuple[int, dict[str, str], bytes]:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs.setdefault("Authorization", f"Bearer {token}")
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(method, url, headers=hdrs, **kw) as resp,  # type: ignore[arg-type]
    ):
        return resp.status, dict(resp.headers), await resp.read()


def capture_access_log(gw: GatewayHandle) -> io.StringIO:
    """Send the gateway's access lines to a buffer (read it after ``flush_access_log``)."""
    buffer = io.StringIO()
    gw.runtime.access_log.stream = buffer
    return buffer


def access_lines(gw: GatewayHandle, buffer: io.StringIO) -> list[dict[str, object]]:
    gw.runtime.access_log.flush()
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def last_request(sim: SimHandle):  # type: ignore[no-untyped-def]
    assert sim.sim.log, "the simulator saw no request"
    return sim.sim.log[-1]


async def test_proxies_with_the_real_key_and_never_the_token(
    gateway: GatewayHandle, sim: SimHandle
) -> None:
    token = await gateway.token("contacts:read")
    status, headers, body = await call(
        "GET", gateway.url("/api/v1/contacts?page=1&limit=5"), token=token
    )
    assert status == 200, body
    data = json.loads(body)
    assert data["pagination"]["limit"] == 5
    seen = last_request(sim)
    assert seen.path == "/api/v1/contacts?page=1&limit=5"
    lowered = {k.lower(): v for k, v in seen.headers.items()}
    assert lowered["x-api-key"] == TEAM_KEY
    assert "authorization" not in lowered
    assert all(token not in v for v in seen.headers.values())
    assert headers["X-Request-ID"]


async def test_the_query_reaches_echowin_byte_for_byte(
    gateway: GatewayHandle, sim: SimHandle
) -> None:
    token = await gateway.token("contacts:read")
    query = "?search=a%20b&tag=%2Fx&plus=1+2&empty="
    url = gateway.url("/api/v1/contacts") + query
    async with (
        aiohttp.ClientSession() as session,
        session.get(yarl.URL(url, encoded=True), headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        assert r.status == 200
    assert last_request(sim).path == "/api/v1/contacts" + query


@pytest.mark.parametrize("style", ["bearer", "x-api-key"])
async def test_token_accepted_where_echowin_clients_put_their_key(
    gateway: GatewayHandle, sim: SimHandle, style: str
) -> None:
    token = await gateway.token("tags:read")
    headers = {"Authorization": f"Bearer {token}"} if style == "bearer" else {"X-API-Key": token}
    status, _, body = await call("GET", gateway.url("/api/v1/tags"), headers=headers)
    assert status == 200, body
    assert {k.lower(): v for k, v in last_request(sim).headers.items()}["x-api-key"] == TEAM_KEY


async def test_agency_route_gets_the_agency_key(gateway: GatewayHandle, sim: SimHandle) -> None:
    token = await gateway.token("agency:subteams:write")
    body = {"firstName": "A", "lastName": "B", "teamName": "T", "email": "a@example.com"}
    status, _, raw = await call(
        "POST", gateway.url("/api/v1/agency/subteams"), headers={"X-AGENCY-KEY": token}, json=body
    )
    assert status in (200, 201), raw
    seen = {k.lower(): v for k, v in last_request(sim).headers.items()}
    assert seen["x-agency-key"] == AGENCY_KEY
    assert "x-api-key" not in seen


async def test_agency_route_without_an_agency_key_is_503_and_never_sent(
    make_gateway: Callable[..., Awaitable[GatewayHandle]], sim: SimHandle
) -> None:
    gateway = await make_gateway(upstream={"agency_key": None})
    token = await gateway.token("agency:subteams:write")
    body = {"firstName": "A", "lastName": "B", "teamName": "T", "email": "a@example.com"}
    status, _, raw = await call(
        "POST", gateway.url("/api/v1/agency/subteams"), headers={"X-AGENCY-KEY": token}, json=body
    )
    assert status == 503, raw
    assert json.loads(raw)["reason"] == "no_credential"
    assert not sim.sim.log  # the team key is never sent in its place


async def test_token_bound_to_an_extra_key_spends_that_key(
    gateway: GatewayHandle, sim: SimHandle
) -> None:
    token = await gateway.token("contacts:read", upstream_key="acme")
    status, _, _ = await call("GET", gateway.url("/api/v1/contacts"), token=token)
    assert status == 200
    assert {k.lower(): v for k, v in last_request(sim).headers.items()}["x-api-key"] == ACME_KEY


async def test_auth_failures_are_401_shaped_like_echowin(
    gateway: GatewayHandle, sim: SimHandle
) -> None:
    expired = await gateway.token("contacts:read", name="old", expires_in=10, now=time.time() - 60)
    revoked = await gateway.token("contacts:read", name="gone")
    await gateway.runtime.auth.revoke(revoked.split("_")[1])
    good = await gateway.token("contacts:read")
    wrong_secret = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    cases = {
        None: ("Missing X-API-Key header", "missing"),
        "not-a-token": ("Invalid API key", "malformed"),
        "egw_aaaaaaaaaaaa_" + "b" * 43: ("Invalid API key", "unknown"),
        wrong_secret: ("Invalid API key", "unknown"),
        expired: ("API key expired", "expired"),
        revoked: ("API key revoked", "revoked"),
    }
    for token, (message, reason) in cases.items():
        status, headers, body = await call("GET", gateway.url("/api/v1/contacts"), token=token)
        assert status == 401, (token, body)
        assert json.loads(body) == {"error": message, "reason": reason}
        assert headers["Content-Type"].startswith("application/json")
    assert len(sim.sim.log) == 0, "no refused request may reach echowin"
    _, _, metrics = await call("GET", gateway.admin_url("/metrics"), headers=PLAIN)
    assert b'echowin_gateway_auth_failures_total{reason="revoked"} 1.0' in metrics


async def test_missing_scope_is_403_naming_it(gateway: GatewayHandle, sim: SimHandle) -> None:
    token = await gateway.token("contacts:read")
    status, _, body = await call(
        "POST", gateway.url("/api/v1/tags"), token=token, json={"name": "x"}
    )
    assert status == 403
    assert json.loads(body)["scope"] == "tags:write"
    assert "tags:write" in json.loads(body)["error"]
    status, _, body = await call("DELETE", gateway.url("/api/v1/contacts/c1"), token=token)
    assert status == 403 and json.loads(body)["scope"] == "contacts:delete"
    assert len(sim.sim.log) == 0


async def test_wildcard_scopes(gateway: GatewayHandle, sim: SimHandle) -> None:
    token = await gateway.token("contacts:*")
    status, _, _ = await call(
        "POST", gateway.url("/api/v1/contacts"), token=token, json={"number": "+15550100"}
    )
    assert status in (200, 201)
    status, _, _ = await call("GET", gateway.url("/api/v1/boards"), token=token)
    assert status == 403


async def test_unknown_routes_need_star(gateway: GatewayHandle, sim: SimHandle) -> None:
    narrow = await gateway.token("contacts:*")
    status, _, body = await call("GET", gateway.url("/api/v1/agents"), token=narrow)
    assert status == 404 and json.loads(body)["reason"] == "unknown_route"
    assert len(sim.sim.log) == 0
    star = await gateway.token("*")
    status, _, _ = await call("GET", gateway.url("/api/v1/agents"), token=star)
    assert len(sim.sim.log) == 1  # forwarded; echowin (the simulator) decides
    assert status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1//contacts",
        "/api/v1/contacts/../tags",
        "/api/v1/contacts/%2e%2e/tags",
        "/api/v1/contacts%2Fabc",
        "/api/v1/contacts/abc;x=1",
        "/api/v1/contacts/a%5Cb",
        "/api/v1/contacts/a%00",
        "/api/v1/contacts/a%0Ab",  # a decoded newline: no pattern of aiohttp matches it
    ],
)
async def test_path_tricks_are_400(gateway: GatewayHandle, sim: SimHandle, path: str) -> None:
    token = await gateway.token("*")
    async with aiohttp.ClientSession() as session:
        url = gateway.url("/").rstrip("/") + path
        async with session.get(
            aiohttp.client.URL(url, encoded=True), headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            assert resp.status == 400, path
            assert (await resp.json())["reason"] == "bad_path"
    assert len(sim.sim.log) == 0


@pytest.mark.parametrize("line", ["OPTIONS * HTTP/1.1", "CONNECT echo.win:443 HTTP/1.1"])
async def test_targets_that_are_no_path_get_the_gateways_json_400(
    gateway: GatewayHandle, sim: SimHandle, line: str
) -> None:
    token = await gateway.token("*")
    host, port = gateway.url("/").removeprefix("http://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = f"{line}\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n"
        writer.write(head.encode())
        status_line = await reader.readline()
        rest = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", rest)[1])  # type: ignore[index]
        body = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
    assert status_line.split()[1] == b"400", status_line
    assert body["reason"] == "bad_path"
    assert len(sim.sim.log) == 0


async def test_case_games_do_not_match(gateway: GatewayHandle, sim: SimHandle) -> None:
    token = await gateway.token("contacts:read")
    for path in ("/API/v1/contacts", "/api/v1/Contacts", "/api/V1/contacts"):
        status, _, _ = await call("GET", gateway.url(path), token=token)
        assert status == 404, path
    assert len(sim.sim.log) == 0


async def test_method_override_headers_are_stripped(gateway: GatewayHandle, sim: SimHandle) -> None:
    token = await gateway.token("contacts:read")
    overrides = {
        "X-HTTP-Method-Override": "DELETE",
        "X-HTTP-Method": "DELETE",
        "X-Method-Override": "DELETE",
    }
    status, _, _ = await call(
        "GET", gateway.url("/api/v1/contacts"), token=token, headers=overrides
    )
    assert status == 200
    seen = {k.lower() for k in last_request(sim).headers}
    assert not seen & {k.lower() for k in overrides}
    assert last_request(sim).method == "GET"


async def test_hop_by_hop_headers_removed_and_forwarding_headers_set(
    gateway: GatewayHandle, sim: SimHandle
) -> None:
    token = await gateway.token("contacts:read")
    headers = {
        "Connection": "keep-alive, X-Private-Hop",
        "X-Private-Hop": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
        "TE": "trailers",
        "X-Custom": "kept",
        "X-Request-ID": "req-123",
        "X-Forwarded-For": "10.9.8.7",
    }
    status, resp_headers, _ = await call(
        "GET", gateway.url("/api/v1/contacts"), token=token, headers=headers
    )
    assert status == 200
    seen = {k.lower(): v for k, v in last_request(sim).headers.items()}
    for gone in ("x-private-hop", "keep-alive", "proxy-authorization", "te"):
        assert gone not in seen, gone
    assert seen["x-custom"] == "kept"
    assert seen["x-request-id"] == "req-123"
    assert seen["x-forwarded-for"] == "10.9.8.7, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert resp_headers["X-Request-ID"] == "req-123"
    assert "Keep-Alive" not in resp_headers


async def test_response_bytes_pass_through_untouched(
    gateway: GatewayHandle, sim: SimHandle
) -> None:
    token = await gateway.token("contacts:read")
    sim.sim.set_faults(Faults(gzip=True))
    status, headers, body = await call(
        "GET", gateway.url("/api/v1/contacts"), token=token, headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(body))["pagination"]["page"] == 1
    assert int(headers["Content-Length"]) == len(body)


async def test_request_body_streams_and_is_capped(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await make_gateway(server={"max_request_body_bytes": 1000})
    token = await gw.token("contacts:write")
    status, _, _ = await call(
        "POST", gw.url("/api/v1/contacts"), token=token, json={"number": "+1555", "note": "x" * 100}
    )
    assert status in (200, 201)
    status, _, body = await call(
        "POST",
        gw.url("/api/v1/contacts"),
        token=token,
        data=b"{" + b" " * 2000 + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert status == 413 and json.loads(body)["reason"] == "body_too_large"

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(30):
            yield b" " * 100

    status, _, body = await call("POST", gw.url("/api/v1/contacts"), token=token, data=chunks())
    assert status == 413


async def test_upstream_timeout_is_504_and_fast(make_gateway: MakeGateway, sim: SimHandle) -> None:
    gw = await make_gateway(upstream={"timeout_seconds": 0.3})
    token = await gw.token("contacts:read")
    sim.sim.set_faults(Faults(latency_seconds=5))
    started = time.monotonic()
    status, _, body = await call("GET", gw.url("/api/v1/contacts"), token=token)
    assert status == 504 and json.loads(body)["reason"] == "upstream_timeout"
    assert time.monotonic() - started < 3
    assert not any(s.encode() in body for s in SECRETS)


async def test_upstream_reset_is_502(gateway: GatewayHandle, sim: SimHandle) -> None:
    token = await gateway.token("contacts:read")
    sim.sim.set_faults(Faults(reset=True))
    status, _, body = await call("GET", gateway.url("/api/v1/contacts"), token=token)
    assert status == 502 and json.loads(body)["reason"] == "upstream_unreachable"


async def test_connect_failure_is_502(make_gateway: MakeGateway, unused_tcp_port: int) -> None:
    gw = await make_gateway(f"http://127.0.0.1:{unused_tcp_port}")
    token = await gw.token("contacts:read")
    status, _, body = await call("GET", gw.url("/api/v1/contacts"), token=token)
    assert status == 502 and json.loads(body)["error"]


async def test_upstream_5xx_passes_through(gateway: GatewayHandle, sim: SimHandle) -> None:
    token = await gateway.token("contacts:read")
    sim.sim.set_faults(Faults(status=503, count=1))
    status, _, _ = await call("GET", gateway.url("/api/v1/contacts"), token=token)
    assert status == 503
    status, _, _ = await call("GET", gateway.url("/api/v1/contacts"), token=token)
    assert status == 200


async def test_secrets_never_leak(
    make_gateway: MakeGateway, sim: SimHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await make_gateway(upstream={"timeout_seconds": 0.3})
    access = capture_access_log(gw)
    token = await gw.token("contacts:read", name="leakcheck")
    seen: list[bytes] = []
    scenarios = [
        None,
        Faults(status=500),
        Faults(reset=True),
        Faults(latency_seconds=2),
        Faults(force_429=True, retry_after=3),
        Faults(gzip=True),
    ]
    for fault in scenarios:
        sim.sim.clear_faults()
        if fault is not None:
            sim.sim.set_faults(fault)
        for path in ("/api/v1/contacts", "/api/v1/contacts/nope", "/api/v1/tags", "/api/v1//x"):
            _status, headers, body = await call("GET", gw.url(path), token=token)
            seen.append(body + json.dumps(headers).encode())
    sim.sim.clear_faults()
    for path in ("/metrics", "/healthz", "/readyz"):
        _, headers, body = await call("GET", gw.admin_url(path))
        seen.append(body + json.dumps(headers).encode())
    _, _, body = await call("GET", gw.admin_url("/admin/tokens"), token=ADMIN_TOKEN)
    seen.append(body)
    formatter = JsonFormatter()
    seen.extend(formatter.format(r).encode() for r in caplog.records)
    assert caplog.records, "expected log lines"
    gw.runtime.access_log.flush()
    assert access.getvalue().count("\n") >= 4 * len(scenarios), "expected access log lines"
    seen.append(access.getvalue().encode())
    for blob in seen:
        for secret in (*SECRETS, token, token.split("_")[2]):
            assert secret.encode() not in blob


async def test_access_log_line(gateway: GatewayHandle) -> None:
    buffer = capture_access_log(gateway)
    token = await gateway.token("contacts:read", name="crm-sync")
    await call(
        "GET", gateway.url("/api/v1/contacts/abc123"), token=token, headers={"X-Request-ID": "r-1"}
    )
    (line,) = access_lines(gateway, buffer)
    assert line["logger"] == "echowin_gateway.access" and line["msg"] == "request"
    assert line["request_id"] == "r-1"
    assert line["token_name"] == "crm-sync"
    assert line["token_id"] == token.split("_")[1]
    assert line["route"] == "/api/v1/contacts/{contactId}"
    assert line["status"] == 404 and line["upstream_status"] == 404
    assert "abc123" not in json.dumps(line)


async def test_metrics_label_route_templates(gateway: GatewayHandle) -> None:
    token = await gateway.token("contacts:read", name="dash")
    # Ids no other text on the page holds (a revision hash in build_info may hold "c1").
    ids = ("contact-id-one", "contact-id-two", "contact-id-three")
    for cid in ids:
        await call("GET", gateway.url(f"/api/v1/contacts/{cid}"), token=token)
    status, _headers, body = await call("GET", gateway.admin_url("/metrics"), headers=PLAIN)
    assert status == 200
    text = body.decode()
    labels = 'method="GET",route="/api/v1/contacts/{contactId}",status="404",token="dash"'
    assert f"echowin_gateway_requests_total{{{labels}}} 3.0" in text
    assert not any(cid in text for cid in ids)
    assert "echowin_gateway_upstream_duration_seconds_bucket" in text


async def test_health_and_readiness(gateway: GatewayHandle) -> None:
    status, _, body = await call("GET", gateway.admin_url("/healthz"))
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = await call("GET", gateway.admin_url("/readyz"))
    assert status == 200 and json.loads(body)["token_store"] == "up"
    await gateway.runtime.store.close()
    status, _, body = await call("GET", gateway.admin_url("/readyz"))
    assert status == 503


async def test_admin_listener_is_separate(gateway: GatewayHandle, sim: SimHandle) -> None:
    token = await gateway.token("*")
    for path in ("/metrics", "/admin/tokens", "/", "/api/v2/contacts"):
        status, _, _ = await call("GET", gateway.url(path), token=token)
        assert status == 404, path  # only echowin's /api/v1/ is proxied, even for "*"
    assert len(sim.sim.log) == 0
    status, _, _ = await call("GET", gateway.admin_url("/admin/tokens"))
    assert status == 401
    status, _, _ = await call("GET", gateway.admin_url("/admin/tokens"), token="wrong")
    assert status == 401


async def test_admin_tokens_round_trip(gateway: GatewayHandle, sim: SimHandle) -> None:
    status, _, body = await call(
        "POST",
        gateway.admin_url("/admin/tokens"),
        token=ADMIN_TOKEN,
        json={"name": "ops", "scopes": ["boards:read"], "expires_in": "1d"},
    )
    assert status == 201, body
    created = json.loads(body)
    token = created["token"]
    assert "secret_hash" not in created
    status, _, _ = await call("GET", gateway.url("/api/v1/boards"), token=token)
    assert status == 200
    status, _, body = await call("GET", gateway.admin_url("/admin/tokens"), token=ADMIN_TOKEN)
    assert [t["name"] for t in json.loads(body)["tokens"]] == ["ops"]
    assert token.encode() not in body
    status, _, _ = await call(
        "DELETE", gateway.admin_url(f"/admin/tokens/{created['id']}"), token=ADMIN_TOKEN
    )
    assert status == 200
    status, _, body = await call("GET", gateway.url("/api/v1/boards"), token=token)
    assert status == 401 and json.loads(body)["reason"] == "revoked"


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1,2]",
        json.dumps({"name": "x", "scopes": ["nope:read"]}).encode(),
        json.dumps({"name": "x", "scopes": ["boards:read"], "hourly": -1}).encode(),
        json.dumps({"name": "x", "scopes": "boards:read"}).encode(),
        json.dumps({"name": "x", "scopes": ["boards:read"], "upstream_key": "ghost"}).encode(),
        json.dumps({"name": "x y z", "scopes": ["boards:read"]}).encode(),
        json.dumps({"name": "x", "scopes": ["boards:read"], "colour": 1}).encode(),
    ],
)
async def test_bad_admin_input_is_400_and_changes_nothing(
    gateway: GatewayHandle, payload: bytes
) -> None:
    status, _, body = await call(
        "POST",
        gateway.admin_url("/admin/tokens"),
        token=ADMIN_TOKEN,
        data=payload,
        headers={"Content-Type": "application/json"},
    )
    assert status == 400, body
    assert json.loads(body)["error"]
    assert await gateway.runtime.store.list() == []


async def test_unusual_methods_share_one_metric_label(gateway: GatewayHandle) -> None:
    token = await gateway.token("*", name="odd")
    for method in ("FOO", "BAR", "PROPFIND"):
        await call(method, gateway.url("/api/v1/contacts"), token=token)
    _, _, body = await call("GET", gateway.admin_url("/metrics"), headers=PLAIN)
    text = body.decode()
    assert 'method="OTHER"' in text
    for method in ("FOO", "BAR", "PROPFIND"):
        assert f'method="{method}"' not in text


async def test_forwarded_headers_are_the_callers_plus_ours(
    gateway: GatewayHandle, sim: SimHandle
) -> None:
    token = await gateway.token("contacts:read")
    # A client that adds nothing of its own: whatever echowin sees beyond this came from us.
    async with (
        aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept")) as s,
        s.get(gateway.url("/api/v1/contacts"), headers={"X-API-Key": token, "X-Custom": "1"}) as r,
    ):
        assert r.status == 200
        request_id = r.headers["X-Request-ID"]
    seen = {k.lower(): v for k, v in last_request(sim).headers.items()}
    # No Accept-Encoding or User-Agent of aiohttp's: echowin compresses only for callers
    # that asked, and the caller's client is the one named.
    assert set(seen) == {
        "host",
        "accept",
        "x-custom",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        "x-api-key",
    }
    assert (seen["x-request-id"], seen["x-api-key"], seen["accept"]) == (
        request_id,
        TEAM_KEY,
        "*/*",
    )
    names = [name.lower() for name in last_request(sim).headers]
    assert names.index("x-api-key") > names.index("x-request-id")  # the real key set last


async def test_request_ids_are_fresh_per_request_and_shared_with_echowin(
    gateway: GatewayHandle, sim: SimHandle
) -> None:
    token = await gateway.token("contacts:read")
    ids = []
    for _ in range(20):
        status, headers, _ = await call("GET", gateway.url("/api/v1/contacts"), token=token)
        assert status == 200
        seen = {k.lower(): v for k, v in last_request(sim).headers.items()}
        assert seen["x-request-id"] == headers["X-Request-ID"]
        ids.append(headers["X-Request-ID"])
    status, headers, _ = await call("GET", gateway.url("/api/v1/contacts"), token="nope")
    assert status == 401
    ids.append(headers["X-Request-ID"])
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


async def test_refusals_are_in_the_access_log(gateway: GatewayHandle) -> None:
    buffer = capture_access_log(gateway)
    token = await gateway.token("tags:read", name="narrow")
    await call("GET", gateway.url("/api/v1/contacts"), token="egw_" + "0" * 12 + "_" + "A" * 43)
    await call("GET", gateway.url("/api/v1/contacts"), token=token)
    unknown, forbidden = access_lines(gateway, buffer)
    assert (unknown["status"], unknown["refusal"], unknown["token_id"]) == (401, "unknown", None)
    assert unknown["token_name"] == "-" and unknown["upstream_status"] is None
    assert (forbidden["status"], forbidden["refusal"]) == (403, "missing_scope")
    assert forbidden["token_name"] == "narrow" and forbidden["route"] == "/api/v1/contacts"


async def test_an_upstream_echoing_the_key_never_shows_it_to_the_caller(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    async def echo(request: web.Request) -> web.Response:
        key = request.headers["X-API-Key"]
        headers = [
            ("X-Echo", key),
            ("X-Echo-Inside", f"before {key} after"),
            ("X-Echo", "plain"),
            ("X-Kept", "yes"),
            ("Connection", "X-Hop"),
            ("X-Hop", key),
            ("Set-Cookie", f"k={key}"),
            ("X-RateLimit-Remaining", "7"),
        ]
        return web.Response(body=b"{}", headers=CIMultiDict(headers))

    app = web.Application()
    app.router.add_get("/api/v1/contacts", echo)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(base_url(upstream))
    token = await gw.token("contacts:read")
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url("/api/v1/contacts"), headers={"X-API-Key": token}) as resp,
    ):
        assert resp.status == 200
        fields = list(resp.headers.items())
    assert all(TEAM_KEY not in name and TEAM_KEY not in value for name, value in fields)
    names = [name.lower() for name, _ in fields]
    assert ("x-echo", "plain") in [(n.lower(), v) for n, v in fields]
    assert "x-kept" in names
    assert "x-echo-inside" not in names and "x-hop" not in names and "set-cookie" not in names
    assert dict(fields)["X-RateLimit-Remaining"] != "7"  # the caller's own view instead


async def test_answers_of_every_shape_relay_whole(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: many chunks

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"X-Shape": "stream"})  # chunked, no length
        await response.prepare(request)
        for start in range(0, len(big), 65536):
            await response.write(big[start : start + 65536])
        await response.write_eof()
        return response

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"X-Shape": "empty"})

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b'{"n":1}', content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/v1/tags", stream)
    app.router.add_get("/api/v1/boards", empty)
    app.router.add_route("*", "/api/v1/contacts", sized)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(base_url(upstream))
    token = await gw.token("*")
    status, headers, body = await call("GET", gw.url("/api/v1/tags"), token=token)
    assert (status, headers["X-Shape"], body) == (200, "stream", big)
    status, headers, body = await call("GET", gw.url("/api/v1/boards"), token=token)
    assert (status, headers["X-Shape"], body) == (204, "empty", b"")
    status, headers, body = await call("HEAD", gw.url("/api/v1/contacts"), token=token)
    assert (status, headers["Content-Length"], body) == (200, "7", b"")
    status, headers, body = await call("GET", gw.url("/api/v1/contacts"), token=token)
    assert (status, headers["Content-Length"], body) == (200, "7", b'{"n":1}')
    assert headers["X-RateLimit-Remaining"] and headers["X-Request-ID"]


async def test_a_caller_hanging_up_mid_answer_is_499_not_a_gateway_error(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller resets its connection while a large answer is being relayed: the
    request is logged and counted as 499 (client closed), never as an unhandled 500."""
    caplog.set_level(logging.ERROR, logger="echowin_gateway")
    chunk = b"x" * 65536
    first_sent = asyncio.Event()
    hung_up = asyncio.Event()

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(chunk)
        first_sent.set()
        await hung_up.wait()
        for _ in range(64):  # 4 MiB more: more than the sockets buffer
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/api/v1/contacts", big)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(base_url(upstream))
    buffer = capture_access_log(gw)
    token = await gw.token("contacts:read")
    rounds = 20

    async def finished() -> bool:
        return gw.runtime.metrics.in_flight_now == 0

    for _ in range(rounds):
        first_sent.clear()
        hung_up.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
        writer.write(
            f"GET /api/v1/contacts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "\r\n".encode()
        )
        await asyncio.wait_for(first_sent.wait(), 10)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # the answer has begun
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        hung_up.set()  # the rest of the answer and the reset reach the gateway together
        writer.transport.abort()  # RST, not FIN
        await eventually(finished, "the gateway done with the request", 5)
    lines = [line for line in access_lines(gw, buffer) if line["route"] != "unmatched"]
    assert len(lines) == rounds
    assert {(line["status"], line["refusal"]) for line in lines} == {(499, "client_closed")}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert 'status="500"' not in generate_latest(gw.runtime.metrics.registry).decode()
