"""proxy/gateway/gate.py and answers.py: the one gate (authenticate, route, authorise,
credential) with a real runtime's parts (routes, secrets, throttle, a memory token store),
no sockets; and the answer for each refusal naming in its body the reason the access log
gets."""

from __future__ import annotations

import json
import time
from typing import Any

from multidict import CIMultiDict

from proxy.auth.authenticator import TokenAuthenticator
from proxy.auth.tokens import mint_token
from proxy.config import parse_config, resolve_secrets
from proxy.errors import Reason
from proxy.gateway import answers
from proxy.gateway.account import Exchange
from proxy.gateway.gate import (
    AUTH_FAILURES,
    OTHER_SCHEME,
    Passed,
    Refused,
    Unverified,
    client,
    gate,
    judge,
)
from proxy.runtime import Runtime
from proxy.state import SharedSlotsHooks, open_state
from tests.conftest import ENV, gateway_config

PEER = "192.0.2.7"


async def runtime(**overrides: Any) -> Runtime:
    config = parse_config(gateway_config("http://127.0.0.1:9", **overrides))
    rt = Runtime.from_config(config, resolve_secrets(config, ENV))
    # The gate reads the runtime's token store and authenticator only: a memory state
    # (gateway_config's), opened without the rest of the runtime (no listeners, no pool).
    hooks = SharedSlotsHooks(replicas=1, on_latency=lambda *_: None, on_health=lambda _: None)
    rt._state = await open_state(config, None, hooks)
    rt._auth = TokenAuthenticator(rt._state.store)
    return rt


async def token(rt: Runtime, *scopes: str) -> str:
    new = mint_token(name="svc", scopes=scopes, now=time.time())
    await rt.store.put(new.record)
    return new.token


def fields(raw: str | None = None, **more: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(more)
    if raw is not None:
        out["Authorization"] = f"Bearer {raw}"
    return out


async def through(rt: Runtime, method: str, target: str, raw: str | None) -> Passed | Refused:
    """The gate as the handler takes it: a token not verified lately is looked up."""
    outcome = gate(rt, method, target, fields(raw), PEER)
    if isinstance(outcome, Unverified):
        outcome = judge(rt, await rt.auth.authenticate(outcome.raw), method, target)
    return outcome


async def test_a_token_with_the_routes_scope_passes_and_is_recalled_next_time() -> None:
    rt = await runtime()
    raw = await token(rt, "contacts:read")
    first = gate(rt, "GET", "/api/v1/contacts?page=2", fields(raw), PEER)
    assert isinstance(first, Unverified) and first.raw == raw
    passed = await through(rt, "GET", "/api/v1/contacts?page=2", raw)
    assert isinstance(passed, Passed)
    assert (passed.match.template, passed.match.path) == ("/api/v1/contacts", "/api/v1/contacts")
    assert passed.credential.name == "default" and passed.token.name == "svc"
    again = gate(rt, "GET", "/api/v1/contacts", fields(raw), PEER)
    assert isinstance(again, Passed)  # verified lately: no lookup


async def test_no_token_is_refused_without_a_lookup() -> None:
    rt = await runtime()
    assert gate(rt, "GET", "/api/v1/contacts", fields(), PEER) == Refused(Reason.MISSING)
    basic = CIMultiDict({"Authorization": "Basic abc"})
    other = Refused(Reason.MISSING, detail=OTHER_SCHEME)  # answered: scheme not recognised
    assert gate(rt, "GET", "/api/v1/contacts", basic, PEER) == other
    bare = CIMultiDict({"Authorization": "egw_" + "0" * 12 + "_" + "A" * 43})
    assert gate(rt, "GET", "/api/v1/contacts", bare, PEER) == other
    empty = CIMultiDict({"Authorization": "Bearer "})
    assert gate(rt, "GET", "/api/v1/contacts", empty, PEER) == Refused(Reason.MISSING)


async def test_each_bad_token_is_refused_for_its_own_reason() -> None:
    rt = await runtime()
    assert await through(rt, "GET", "/api/v1/contacts", "nope") == Refused(Reason.MALFORMED)
    unknown = "egw_" + "0" * 12 + "_" + "A" * 43
    assert await through(rt, "GET", "/api/v1/contacts", unknown) == Refused(Reason.UNKNOWN)
    assert {Reason.MISSING, Reason.MALFORMED, Reason.UNKNOWN} <= AUTH_FAILURES


async def test_a_route_the_token_may_not_take_is_refused_with_the_token_and_route() -> None:
    rt = await runtime()
    raw = await token(rt, "tags:read")
    scope = await through(rt, "GET", "/api/v1/contacts", raw)
    assert isinstance(scope, Refused) and scope.reason is Reason.MISSING_SCOPE
    assert (scope.route, scope.detail) == ("/api/v1/contacts", "contacts:read")
    assert scope.token is not None and scope.token.name == "svc"
    unknown = await through(rt, "GET", "/api/v1/agents", raw)
    assert isinstance(unknown, Refused) and unknown.reason is Reason.UNKNOWN_ROUTE
    assert unknown.detail == "/api/v1/agents"
    trace = await through(rt, "TRACE", "/api/v1/tags", raw)
    assert isinstance(trace, Refused) and trace.reason is Reason.METHOD_NOT_ALLOWED
    bad = await through(rt, "GET", "/api/v1/../admin", raw)
    assert isinstance(bad, Refused) and bad.reason is Reason.BAD_PATH
    assert bad.token is not None and bad.route is None and bad.detail


async def test_a_star_token_passes_an_unknown_api_route_only() -> None:
    rt = await runtime()
    raw = await token(rt, "*")
    assert isinstance(await through(rt, "GET", "/api/v1/agents", raw), Passed)
    elsewhere = await through(rt, "GET", "/other", raw)
    assert isinstance(elsewhere, Refused) and elsewhere.reason is Reason.UNKNOWN_ROUTE


async def test_a_route_without_a_configured_key_is_refused() -> None:
    rt = await runtime(upstream={"agency_key": None})
    raw = await token(rt, "agency:subteams:write")
    refused = await through(rt, "POST", "/api/v1/agency/subteams", raw)
    assert isinstance(refused, Refused) and refused.reason is Reason.NO_CREDENTIAL
    assert refused.route == "/api/v1/agency/subteams"


async def test_a_throttled_client_is_refused_first_even_with_its_tokens_verdict() -> None:
    rt = await runtime(auth={"failures_per_client": {"requests": 2, "per_seconds": 60}})
    raw = await token(rt, "contacts:read")
    known = await rt.auth.authenticate(raw)
    assert isinstance(gate(rt, "GET", "/api/v1/contacts", fields(raw), PEER, known), Passed)
    for _ in range(2):
        await rt.auth_throttle.failed(client(rt, PEER, fields()))
    refused = gate(rt, "GET", "/api/v1/contacts", fields(raw), PEER, known)
    assert isinstance(refused, Refused) and refused.reason is Reason.AUTH_THROTTLED
    assert refused.retry_after == 30
    other = gate(rt, "GET", "/api/v1/contacts", fields(raw), "192.0.2.8", known)
    assert isinstance(other, Passed)  # another client is not


def test_every_refusal_of_the_gate_answers_the_reason_the_log_gets() -> None:
    outcomes = [
        Refused(Reason.AUTH_THROTTLED, retry_after=3),
        *(Refused(reason) for reason in AUTH_FAILURES),
        Refused(Reason.BAD_PATH, detail="dot segment"),
        Refused(Reason.METHOD_NOT_ALLOWED, route="/api/v1/tags"),
        Refused(Reason.UNKNOWN_ROUTE, route="unmatched", detail="/api/v1/agents"),
        Refused(Reason.MISSING_SCOPE, route="/api/v1/tags", detail="tags:write"),
        Refused(Reason.NO_CREDENTIAL, route="/api/v1/agency/subteams"),
    ]
    statuses = set()
    for outcome in outcomes:
        ex = Exchange("r-1", 0.0)
        response = answers.refused(ex, outcome, "GET", "/api/v1/tags")
        assert response.body is not None
        body = json.loads(bytes(response.body))  # type: ignore[arg-type]
        assert body["reason"] == ex.refusal == outcome.reason
        assert response.headers["X-Request-ID"] == "r-1"
        statuses.add(response.status)
    assert statuses == {400, 401, 403, 404, 405, 429, 503}
