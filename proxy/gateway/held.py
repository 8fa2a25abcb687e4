"""The gateway's side of the lobby (proxy/server/lobby.py): whether a request whose head
the lobby read would wait for budget, asked before its handler runs, and if so the
request held there, in the budget's queue (``Admitter.hold``), with no coroutine."""

from __future__ import annotations

import asyncio
import functools
import time

from proxy.auth.authenticator import AuthResult
from proxy.budget.admission import AdmitRequest, Held
from proxy.gateway.account import Exchange, account
from proxy.gateway.cached import key_of
from proxy.gateway.gate import Passed, Refused, Unverified, asks_continue, client, gate, max_wait
from proxy.runtime import Runtime
from proxy.server.lobby import Decide, Head

_LOBBY_CHECKS = 1024  # distinct tokens the lobby checks at once


class HeldRequest:
    """A request held from the lobby: its place in the queue (``held``), and what its 499
    is accounted with if the caller leaves before its handler runs."""

    __slots__ = ("_rt", "arrived", "held", "method", "passed")

    def __init__(self, rt: Runtime, held: Held, passed: Passed, method: str) -> None:
        self._rt = rt
        self.held = held
        self.passed = passed
        self.method = method
        self.arrived = time.perf_counter()
        rt.metrics.in_flight_now += 1

    def taken(self) -> None:
        """Its handler runs: the request is the handler's to answer and account."""
        self._rt.metrics.in_flight_now -= 1

    def release(self) -> None:
        """Given up before its handler ran: not accounted."""
        self._rt.metrics.in_flight_now -= 1
        self.held.release()

    def gone(self) -> None:
        """The caller left before its handler ran: given up, and accounted (499)."""
        self.release()
        rt, passed = self._rt, self.passed
        ex = Exchange(
            rt.request_ids.new(),
            self.arrived,
            None,
            passed.token,
            passed.match.template,
            passed.credential.name,
        )
        ex.client_gone = True
        account(rt, self.method, ex, None)


def lobby_decider(rt: Runtime) -> Decide[AuthResult]:
    """The lobby's question for ``rt``: would this head's request wait for budget? If so
    it is held now. Only what the handler would admit and queue: no expectation but
    100-continue, no body over the limit, no chunked body, not draining, and through the
    gate (proxy/gateway/gate.py) as the handler will take it; a refusal is the handler's
    to answer and charge, which decides every request the lobby leaves to it again. A
    token this process has not verified lately is checked first (one check per token
    however many connections present it), and the lobby asks again with its result."""
    checks: dict[str, asyncio.Future[AuthResult]] = {}

    def check(raw: str, head: Head) -> asyncio.Future[AuthResult] | None:
        future = checks.get(raw)
        if future is None:
            if len(checks) >= _LOBBY_CHECKS:
                return None  # a flood of tokens: checked by their handlers
            # The lookup holds a place in the client's bucket until it ends. If the bucket
            # fills before the handler decides again, the handler refuses the request and
            # this lookup goes uncharged: the one lookup the throttle lets slip.
            lookup = rt.auth_throttle.looking_up(client(rt, head.peer, head.fields), raw)
            future = checks[raw] = asyncio.ensure_future(rt.auth.authenticate(raw))
            future.add_done_callback(functools.partial(_checked, checks, raw))
            future.add_done_callback(lookup.end)
        return future

    def decide(
        head: Head, known: AuthResult | None
    ) -> HeldRequest | asyncio.Future[AuthResult] | None:
        if not _may_wait(rt, head):
            return None
        outcome = gate(rt, head.method, head.target, head.fields, head.peer, known)
        if isinstance(outcome, Unverified):
            return check(outcome.raw, head)
        if isinstance(outcome, Refused) or _answered_without_budget(rt, head, outcome):
            return None
        request = AdmitRequest(
            outcome.token, outcome.credential.name, outcome.match.template, max_wait(head.fields)
        )
        held = rt.admitter.hold(request)
        if held is None:
            return None
        return HeldRequest(rt, held, outcome, head.method)

    return decide


def _may_wait(rt: Runtime, head: Head) -> bool:
    """The request could wait in the lobby: not draining, no expectation but
    100-continue, and a body of known length within the limit."""
    expect = head.fields.get("Expect")
    return not (
        rt.draining
        or (expect is not None and not asks_continue(expect))
        or head.length is None  # chunked, or a length the lobby does not read
        or head.length > rt.config.server.max_request_body_bytes
    )


def _answered_without_budget(rt: Runtime, head: Head, passed: Passed) -> bool:
    """The response cache holds a copy of this GET, or one like it is in flight: its
    handler answers it without waiting for budget (proxy/gateway/cached.py)."""
    cache = rt.cache
    if cache is None or head.length or not cache.takes(head.method, passed.match.template):
        return False
    key = key_of(passed, head.target, head.fields)
    return cache.flights.get(key) is not None or cache.store.get(key) is not None


def _checked(
    checks: dict[str, asyncio.Future[AuthResult]], raw: str, future: asyncio.Future[AuthResult]
) -> None:
    checks.pop(raw, None)
    if not future.cancelled():
        future.exception()  # read: every lobby that waited on it may have gone meanwhile


__all__ = ["HeldRequest", "lobby_decider"]
