"""OpenTelemetry tracing (issue 21, point 1): the real gateway, the real simulator as
echowin, and a real OTLP/HTTP receiver on loopback decoding what the SDK exports with
opentelemetry-proto. No span is inspected in memory: only what crossed the wire."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from proxy.config import (
    ConfigError,
    TracingConfig,
    parse_config,
    resolve_secrets,
    tracing_from_env,
)
from proxy.gateway.handler import handle
from proxy.gateway.traced import traced_handle
from tests.conftest import SECRETS, TEAM_KEY, GatewayHandle, ServerFactory, SimHandle

ROOT = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
MakeGateway = Callable[..., Awaitable[GatewayHandle]]


@dataclass
class Receiver:
    """An OTLP/HTTP traces endpoint: every span exported to it, and the raw bodies."""

    url: str = ""
    spans: list[tuple[dict[str, Any], Span]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)  # each export's X-Otlp-Key
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.headers["Content-Type"] == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(body)
        async with self.arrived:
            self.bodies.append(body)
            self.keys.append(request.headers.get("X-Otlp-Key"))
            for resource_spans in export.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.spans.extend((resource, span) for span in scope.spans)
            self.arrived.notify_all()
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Span]:
        """The spans received once there are at least ``count`` (bounded wait)."""
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(self.spans) >= count)
        return [span for _, span in self.spans]


@pytest.fixture
async def receiver(aiohttp_server: ServerFactory) -> Receiver:
    got = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", got.receive)
    server = await aiohttp_server(app, host="127.0.0.1")
    got.url = str(server.make_url("/v1/traces"))
    return got


def attrs(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


# Tests take ``receiver`` first: it is set up before the gateway and closed after it, so
# the spans a gateway exports as it shuts down still find it.
def tracing(receiver: Receiver, **settings: Any) -> dict[str, Any]:
    return {"endpoint": receiver.url, "schedule_delay_seconds": 0.05, **settings}


async def flush(gw: GatewayHandle) -> None:
    """Every finished span exported now (the SDK's own call, off the event loop)."""
    assert gw.runtime.tracing is not None
    assert await asyncio.to_thread(gw.runtime.tracing.provider.force_flush, 10_000)


async def get(gw: GatewayHandle, path: str, token: str, **fields: str) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}", "User-Agent": "crm-sync/2.1", **fields}
    async with aiohttp.ClientSession() as session, session.get(gw.url(path), headers=headers) as r:
        await r.read()
        return r


async def test_a_request_continues_the_callers_trace_to_echowin(
    receiver: Receiver, make_gateway: MakeGateway, sim: SimHandle, tmp_path: Path
) -> None:
    key_file = tmp_path / "otlp-key"
    key_file.write_text("otlp-secret-123\n")
    headers = {"x-otlp-key": {"file": str(key_file)}}
    gw = await make_gateway(tracing=tracing(receiver, sampling_ratio=1.0, headers=headers))
    access = io.StringIO()
    gw.runtime.access_log.stream = access
    token = await gw.token("contacts:read", name="crm-sync")
    parent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
    answer = await get(gw, "/api/v1/contacts?limit=5", token, traceparent=parent)
    assert answer.status == 200

    spans = await receiver.wait_for(3)
    by_name = {span.name: span for span in spans}
    server = by_name["GET /api/v1/contacts"]
    assert server.kind == Span.SPAN_KIND_SERVER
    assert server.trace_id.hex() == TRACE_ID and server.parent_span_id.hex() == CALLER_SPAN
    queue = by_name["queue wait"]
    upstream = next(s for s in spans if s.kind == Span.SPAN_KIND_CLIENT)
    for child in (queue, upstream):
        assert child.trace_id == server.trace_id and child.parent_span_id == server.span_id
    assert server.start_time_unix_nano <= queue.start_time_unix_nano
    assert queue.end_time_unix_nano <= upstream.start_time_unix_nano + 1_000
    assert upstream.end_time_unix_nano <= server.end_time_unix_nano

    seen = attrs(server)
    assert seen["http.request.method"] == "GET" and seen["http.route"] == "/api/v1/contacts"
    assert seen["url.path"] == "/api/v1/contacts" and seen["url.scheme"] == "http"
    assert seen["http.response.status_code"] == 200 and seen["server.address"] == "127.0.0.1"
    assert seen["client.address"] == "127.0.0.1" and seen["user_agent.original"] == "crm-sync/2.1"
    assert seen["echowin_gateway.token.name"] == "crm-sync"
    assert seen["echowin_gateway.credential"] == "default"
    up = attrs(upstream)
    assert up["http.response.status_code"] == 200 and up["server.address"] == "127.0.0.1"
    assert receiver.spans[0][0]["service.name"] == "echowin-gateway"

    # echowin was sent the gateway's span, in the caller's trace; not the caller's own span.
    sent = sim.sim.log[-1].header("traceparent")
    assert sent == f"00-{TRACE_ID}-{server.span_id.hex()}-01"

    gw.runtime.access_log.flush()
    line = json.loads(access.getvalue().splitlines()[-1])
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, server.span_id.hex())
    assert line["client_address"] == "127.0.0.1" and line["user_agent"] == "crm-sync/2.1"

    assert set(receiver.keys) == {"otlp-secret-123"}  # tracing.headers, read from its file
    # Neither the echowin key nor the caller's token went into any span.
    for body in receiver.bodies:
        for secret in (*SECRETS, token):
            assert secret.encode() not in body


async def test_refusals_and_new_traces_get_a_root_span(
    receiver: Receiver, make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await make_gateway(
        tracing=tracing(receiver, sampling_ratio=1.0, service_name="gw-test"),
        cache={"routes": {"/api/v1/tags": 60}},
    )
    token = await gw.token("contacts:read")
    assert (await get(gw, "/api/v1/tags", "egw_not_a_token")).status == 401
    assert (await get(gw, "/api/v1/tags", token)).status == 403
    tags = await gw.token("tags:read")
    assert (await get(gw, "/api/v1/tags", tags)).status == 200
    assert (await get(gw, "/api/v1/tags", tags)).status == 200  # from the cache

    spans = await receiver.wait_for(4 + 2)  # 4 server spans, queue + upstream of the miss
    servers = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert len(servers) == 4 and all(not s.parent_span_id for s in servers)
    assert len({s.trace_id for s in servers}) == 4  # each a trace of its own
    codes = [attrs(s)["http.response.status_code"] for s in servers]
    assert codes == [401, 403, 200, 200]
    assert attrs(servers[0])["echowin_gateway.refusal"] == "malformed"
    assert attrs(servers[1])["echowin_gateway.refusal"] == "missing_scope"
    assert [attrs(s).get("echowin_gateway.cache") for s in servers[2:]] == ["miss", "hit"]
    assert {resource["service.name"] for resource, _ in receiver.spans} == {"gw-test"}
    assert len(sim.sim.log) == 1  # the hit never reached echowin


async def test_sampling_at_zero_exports_nothing_but_a_sampled_callers_trace(
    receiver: Receiver, make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await make_gateway(tracing=tracing(receiver, sampling_ratio=0.0))
    token = await gw.token("contacts:read")
    for _ in range(5):
        assert (await get(gw, "/api/v1/contacts", token)).status == 200
    # Not sampled: echowin still gets a context, flagged not sampled, and nothing is sent.
    sent = sim.sim.log[-1].header("traceparent")
    assert sent is not None and int(sent.rsplit("-", 1)[1], 16) & 1 == 0  # W3C "sampled" bit
    await flush(gw)
    assert receiver.spans == []
    # Parent-based: a caller's sampled trace is followed whatever the ratio.
    parent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
    assert (await get(gw, "/api/v1/contacts", token, traceparent=parent)).status == 200
    await flush(gw)
    assert {span.trace_id.hex() for _, span in receiver.spans} == {TRACE_ID}


async def test_without_tracing_the_handler_is_the_plain_one(
    make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await make_gateway()
    assert gw.runtime.tracing is None and gw.runtime.trace_settings is None
    (route,) = gw.proxy.app.router.routes()
    assert route.handler is handle
    token = await gw.token("contacts:read")
    parent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
    assert (await get(gw, "/api/v1/contacts", token, traceparent=parent)).status == 200
    assert sim.sim.log[-1].header("traceparent") == parent  # passed on as any field


async def test_with_tracing_the_handler_is_the_traced_one(
    receiver: Receiver, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(tracing=tracing(receiver))
    (route,) = gw.proxy.app.router.routes()
    assert route.handler is traced_handle


def test_the_otel_variables_switch_it_on() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert tracing_from_env(None, {}) is None
    assert tracing_from_env(None, endpoint) == TracingConfig()
    assert tracing_from_env(None, {**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing_from_env(None, {**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None
    off = TracingConfig(enabled=False)
    assert tracing_from_env(off, endpoint) is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"endpoint": "collector:4318"}, "tracing.endpoint: must be an http://"),
        ({"endpoint": "http://u:p@c/v1/traces"}, "tracing.endpoint: must not carry"),
        ({"sampling_ratio": 1.5}, "tracing.sampling_ratio: must be a number from"),
        ({"headers": {"bad name": {"env": "X"}}}, "tracing.headers: 'bad name'"),
        ({"sample": 1}, "tracing.sample"),
    ],
)
def test_bad_settings_name_their_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"tracing": section})
    assert any(line.startswith(message) for line in caught.value.lines), caught.value.lines


def test_a_missing_header_secret_names_its_key() -> None:
    config = parse_config({"tracing": {"headers": {"x-api-key": {"env": "NO_SUCH_TRACING_KEY"}}}})
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(config, {"ECHOWIN_API_KEY": TEAM_KEY})
    assert caught.value.lines == [
        "tracing.headers.x-api-key: environment variable NO_SUCH_TRACING_KEY is not set or empty"
    ]
    off = parse_config({"tracing": {"enabled": False, "headers": {"x": {"env": "NONE_X"}}}})
    assert resolve_secrets(off, {"ECHOWIN_API_KEY": TEAM_KEY}).tracing_headers == {}


BLOCK_OTEL = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def test_a_gateway_without_the_extra_runs_and_says_what_tracing_needs() -> None:
    script = (
        BLOCK_OTEL
        + f"""
from proxy.app import build_apps
from proxy.config import ConfigError, parse_config, resolve_secrets
config = parse_config({{"state": "memory://"}})
build_apps(config, resolve_secrets(config, {{"ECHOWIN_API_KEY": "{TEAM_KEY}"}}))
assert not any(m.startswith(("opentelemetry", "proxy.observe.tracing")) for m in sys.modules)
try:
    parse_config({{"tracing": {{"endpoint": "http://127.0.0.1:4318/v1/traces"}}}})
except ConfigError as exc:
    print(exc.lines)
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "tracing: needs the otel extra" in done.stdout


async def test_a_traced_upload_waiting_for_continue_reaches_echowin_whole(
    receiver: Receiver, make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await make_gateway(tracing=tracing(receiver, sampling_ratio=1.0))
    token = await gw.token("contacts:write", "contacts:read")
    headers = {"Authorization": f"Bearer {token}", "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
    body = {"number": "+15550100", "firstName": "Ada " + "x" * 200_000}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.url("/api/v1/contacts"), json=body, headers=headers, expect100=True) as r,
    ):
        assert r.status == 201, await r.text()
        created = (await r.json())["data"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url(f"/api/v1/contacts/{created['id']}"), headers=headers) as r,
    ):
        assert r.status == 200 and (await r.json())["data"]["firstName"] == body["firstName"]
    spans = await receiver.wait_for(6)
    servers = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert [s.name for s in servers] == [
        "POST /api/v1/contacts",
        "GET /api/v1/contacts/{contactId}",
    ]
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}


async def test_a_queued_request_shows_its_wait_inside_its_server_span(
    receiver: Receiver, make_gateway: MakeGateway, sim: SimHandle
) -> None:
    gw = await make_gateway(
        tracing=tracing(receiver, sampling_ratio=1.0),
        upstream={"limits": [{"requests": 1, "per_seconds": 1}], "window_guard_seconds": 0},
        queue={"max_wait_seconds": 10},
    )
    token = await gw.token("contacts:read")
    answers = await asyncio.gather(*(get(gw, "/api/v1/contacts", token) for _ in range(2)))
    assert [a.status for a in answers] == [200, 200]
    spans = await receiver.wait_for(6)
    queues = sorted(
        (s for s in spans if s.name == "queue wait"),
        key=lambda s: s.end_time_unix_nano - s.start_time_unix_nano,
    )
    waited = queues[-1]
    assert waited.end_time_unix_nano - waited.start_time_unix_nano >= 300_000_000  # >= 0.3 s
    server = next(s for s in spans if s.span_id == waited.parent_span_id)
    assert server.start_time_unix_nano <= waited.start_time_unix_nano
    assert waited.end_time_unix_nano <= server.end_time_unix_nano


def test_unset_keys_follow_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.observe.tracing import Tracing

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    upstream = ("echo.win", 443)
    made = Tracing(TracingConfig(), {}, {"OTEL_SERVICE_NAME": "from-env"}, upstream)
    given = Tracing(TracingConfig(service_name="given", sampling_ratio=0.5), {}, {}, upstream)
    plain = Tracing(TracingConfig(), {}, {}, upstream)
    try:
        assert made.provider.resource.attributes["service.name"] == "from-env"
        assert "TraceIdRatioBased{0.25}" in made.provider.sampler.get_description()
        assert given.provider.resource.attributes["service.name"] == "given"
        assert "TraceIdRatioBased{0.5}" in given.provider.sampler.get_description()
        assert plain.provider.resource.attributes["service.name"] == "echowin-gateway"
    finally:
        for tracer in (made, given, plain):
            tracer.shutdown()
