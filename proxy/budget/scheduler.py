"""The budget keeper the handler talks to: :class:`Scheduler` is the
:class:`~proxy.budget.admission.Admitter` that charges a token's own quota first
(:mod:`proxy.budget.quotas`), then asks the credential's :class:`~proxy.budget.lane.Lane`,
and answers every request's rate-limit fields.

Time is wall-clock seconds (``time.time``) because the send log outlives the process.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

from proxy.budget.admission import SHUTTING_DOWN, STATE_DOWN, AdmitRequest, Grant, Held, Refusal
from proxy.budget.class_queue import ClassQueue
from proxy.budget.grants import Hold
from proxy.budget.lane import Lane, Observer, QueuePolicy
from proxy.budget.quotas import QuotaSources, TokenCharge, TokenQuotas
from proxy.budget.ratelimit_headers import (
    caller_headers,
    policy_header,
    tight_headers,
    tighter,
    unchanged_for,
    window_name,
)
from proxy.budget.slots import SlotSource, StateUnavailable
from proxy.budget.windows import Limit, WindowView

__all__ = ["ClassObserver", "Scheduler"]


class ClassObserver(Protocol):
    """What the scheduler reports per class of service (proxy/observe/class_metrics.py)."""

    def class_admitted(self, credential: str, cls: str, waited: float) -> None: ...
    def class_refused(self, credential: str, cls: str, reason: str) -> None: ...


class _ClassState(NamedTuple):
    """One window as a class's caller sees it (``WindowState`` for ``caller_headers``)."""

    requests: int
    per_seconds: float
    remaining: int
    reset_in: float


class _KeptHeaders:
    """Caller headers made at ``made`` when the lane was at ``version``, from windows whose
    ``reset_in`` were ``resets``; good until ``until`` (None: not yet worked out)."""

    __slots__ = ("headers", "made", "resets", "until", "version")

    def __init__(
        self,
        version: tuple[int, int],
        made: float,
        resets: list[float],
        headers: Mapping[str, str],
    ) -> None:
        self.version = version
        self.made = made
        self.resets = resets
        self.headers = headers
        self.until: float | None = None


class _Shape:
    """What a lane's caller headers take from its ``limits``, worked out once: per window
    its name, and RateLimit-Policy."""

    __slots__ = ("limits", "names", "policy")

    def __init__(self, limits: tuple[Limit, ...]) -> None:
        self.limits = limits
        self.names = [window_name("echowin", lim.per_seconds) for lim in limits]
        self.policy = policy_header([("echowin", lim) for lim in limits])


class Scheduler:
    """The Admitter: per-token quota first, then the credential's lane."""

    def __init__(
        self,
        lanes: Mapping[str, Lane],
        policy: QueuePolicy,
        observer: Observer,
        clock: Callable[[], float] = time.time,
        *,
        quota_sources: QuotaSources,
        class_observer: ClassObserver | None = None,
    ) -> None:
        """``quota_sources``: where token quotas are kept (the state backend's; in this
        process: proxy.state.memory.memory_quota_sources); ``class_observer``: told each
        admission and refusal of a lane with classes of service."""
        self.class_observer = class_observer
        self.lanes = dict(lanes)
        self.policy = policy
        self.observer = observer
        self.clock = clock
        self.quotas = TokenQuotas(quota_sources, clock)
        # Per credential: the caller headers of a token without its own quota (see
        # caller_headers) and what they were made from; what they take from its limits.
        self._headers: dict[str, _KeptHeaders] = {}
        self._shapes: dict[str, _Shape] = {}
        self._shedding = False  # shutting down: see shed
        self._class_policies: dict[tuple[str, str], str] = {}  # (credential, class)
        self._retired: set[str] = set()  # lanes of keys a reload took away: see retire

    def add_lane(self, lane: Lane) -> None:
        """A key a reload added (or gave back: its retired lane, with its send history)."""
        self.lanes[lane.name] = lane
        self._retired.discard(lane.name)

    def retire(self, name: str) -> None:
        """A key a reload took away: no new request reaches its lane (the gate no longer
        knows the key), the queued ones are served as before, and the lane leaves the
        snapshot (the budget pages and gauges). It is kept, with its send history, for the
        requests still under way and for a reload that brings the key back."""
        self._retired.add(name)

    def retired(self, name: str) -> bool:
        return name in self._retired

    def _max_wait(self, request: AdmitRequest) -> float:
        if request.max_wait is None:
            return self.policy.max_wait
        return min(self.policy.max_wait, request.max_wait)

    def hold(self, request: AdmitRequest) -> Hold | None:
        """Queue ``request`` now, without a coroutine, when it would be queued (see
        ``Lane.hold``); ``admit(request, held)`` takes the wait over. None when ``admit``
        must decide: a slot free now, a refusal, the state to read first (a token quota of
        its own is charged in the state before the lane is asked)."""
        token = request.token
        if self._shedding or self.quotas.has_own(token):
            return None
        lane = self.lanes[request.credential]
        waiter = lane.hold(token, self._max_wait(request))
        return None if waiter is None else Hold(lane, waiter)

    async def admit(self, request: AdmitRequest, held: Held | None = None) -> Grant | Refusal:
        lane = self.lanes[request.credential]
        token = request.token
        waiter = None
        if isinstance(held, Hold):
            waiter = held.take(lane, token)
        elif held is not None:
            held.release()
        if self._shedding:
            if waiter is not None:
                lane.leave(waiter)
            self.observer.refused(lane.name, token.name, SHUTTING_DOWN.reason)
            return SHUTTING_DOWN
        max_wait = self._max_wait(request)
        charge: TokenCharge | None = None
        if self.quotas.has_own(token):
            # The token's own quota is charged first, in the gateway's state (a worker or a
            # replica sees the others' charges), and refunded if the request is refused;
            # not at all when the lane refuses at once anyway (a flood costs no writes).
            try:
                charged = await self.quotas.charge(token, await lane.known_refusal(token, max_wait))
            except StateUnavailable:
                charged = STATE_DOWN
            except BaseException:
                if waiter is not None:
                    lane.leave(waiter)
                raise
            if isinstance(charged, Refusal):
                if waiter is not None:
                    lane.leave(waiter)
                self.observer.refused(lane.name, token.name, charged.reason)
                return charged
            charge = charged
        try:
            result = await lane.admit(token, charge, max_wait, waiter)
        except BaseException:
            if charge is not None:
                charge.refund()
            raise
        if isinstance(result, Refusal):
            if charge is not None:
                charge.refund()
            self.observer.refused(lane.name, token.name, result.reason)
        cls = lane.class_of(token)
        if cls is not None and self.class_observer is not None:
            if isinstance(result, Refusal):
                self.class_observer.class_refused(lane.name, cls, result.reason)
            else:
                self.class_observer.class_admitted(lane.name, cls, result.queued_seconds)
        return result

    async def charge_own(self, request: AdmitRequest) -> Refusal | None:
        """One request charged to the token's own quota, none to the shared budget (a
        cached answer); the quota's refusal, or STATE_DOWN, when it cannot be."""
        token = request.token
        if not self.quotas.has_own(token):
            return None
        try:
            charged = await self.quotas.charge(token, None)
        except StateUnavailable:
            charged = STATE_DOWN
        if isinstance(charged, Refusal):
            self.observer.refused(request.credential, token.name, charged.reason)
            return charged
        return None

    def caller_headers(self, request: AdmitRequest) -> Mapping[str, str]:
        """X-RateLimit-* and RateLimit fields for the tightest of the token's own quota and
        the shared budget of its credential. Read-only: the same mapping may be returned
        again.

        Without a token quota they depend on the credential only, and are kept until the
        lane changes its budget, a number in them would change with time, or a second has
        passed (which bounds how late changes the lane does not make show: other replicas'
        sends in a shared budget)."""
        now = self.clock()
        lane = self.lanes[request.credential]
        quota = self.quotas.in_use.get(request.token.id)
        if quota is not None:
            windows = self._lane_windows(now, lane, request)
            windows += [("token", w) for w in quota.source.snapshot(now)]
            return caller_headers(now, windows)
        if lane.classes is not None:
            return self._class_headers(now, lane, request)
        version = (lane.version, lane.source.changes)
        kept = self._headers.get(lane.name)
        if kept is not None and kept.version == version and kept.made <= now:
            if kept.until is None:  # worked out on the first reuse: most are never reused
                kept.until = kept.made + unchanged_for(kept.made, kept.resets)
            if now < kept.until:
                return kept.headers
        shape = self._shapes.get(lane.name)
        limits = lane.budget.limits
        if shape is None or shape.limits is not limits:
            shape = self._shapes[lane.name] = _Shape(limits)
        index, remaining, resets = lane.source.tightest(now)
        headers = tight_headers(
            now,
            shape.names[index],
            limits[index].requests,
            remaining,
            resets[index],
            shape.policy,
        )
        self._headers[lane.name] = _KeptHeaders(version, now, resets, headers)
        return headers

    def _class_headers(self, now: float, lane: Lane, request: AdmitRequest) -> Mapping[str, str]:
        """``caller_headers`` of a class's windows, its RateLimit-Policy made once."""
        windows = self._lane_windows(now, lane, request)
        owner, tight = windows[0]
        for pair in windows[1:]:
            if tighter(pair[1].remaining, pair[1].reset_in, tight.remaining, tight.reset_in):
                owner, tight = pair
        key = (lane.name, owner)
        policy = self._class_policies.get(key)
        if policy is None:
            policy = self._class_policies[key] = policy_header(windows)
        name = window_name(owner, tight.per_seconds)
        return tight_headers(now, name, tight.requests, tight.remaining, tight.reset_in, policy)

    def _lane_windows(
        self, now: float, lane: Lane, request: AdmitRequest
    ) -> list[tuple[str, WindowView | _ClassState]]:
        """The shared budget's windows as the token's caller sees them: with classes of
        service, what its class may use (named after the class), else the credential's."""
        cls = lane.class_of(request.token)
        if lane.classes is None or cls is None:
            return [("echowin", w) for w in lane.source.snapshot(now)]
        _, _, resets = lane.source.tightest(now)
        seen = lane.classes.caller_windows(cls, now, lane.source.budget)
        return [
            (cls, _ClassState(share, limit.per_seconds, free, reset_in))
            for (share, free), limit, reset_in in zip(seen, lane.budget.limits, resets, strict=True)
        ]

    def token_quotas(self) -> dict[str, list[WindowView]]:
        """Every token quota in use, by token name, at now (for metrics)."""
        return self.quotas.views()

    def token_quota_view(self, token_id: str) -> list[dict[str, object]] | None:
        known = self.quotas.in_use.get(token_id)
        if known is None:
            return None
        return [_window_json(w) for w in known.source.snapshot(self.clock())]

    def snapshot(self) -> dict[str, object]:
        """Each credential's windows, queue and classes. Local slots first read the rows the
        other processes on their log wrote (``refreshed``: one read, at most every
        POLL_SECONDS), so the view of an idle worker of ``serve --workers N`` counts the
        others' sends, its classes' too."""
        now = self.clock()
        out: dict[str, object] = {}
        for name, lane in self.lanes.items():
            if name in self._retired:
                continue
            with contextlib.suppress(Exception):  # unreadable now: the view it has
                lane.source.refreshed(now)
            out[name] = {
                "windows": [_window_json(w) for w in lane.source.snapshot(now)],
                "queue_depth": lane.depth,
                "waiting_tokens": lane.queue.waiting_tokens(),
                "frozen_for": _frozen_for(lane.source, now),
                "state_healthy": lane.source.healthy,
                "echowin_reported_remaining": lane.reported_remaining,
                "calibrated": lane.calibrated,
            }
            if lane.classes is not None:
                out[name]["classes"] = _classes_json(lane, now)  # type: ignore[index]
        return out

    def shed(self) -> None:
        """Shutting down: refuse every queued request now (503 ``shutting_down``), and
        every later one at once. Called as the drain's grace runs out, so that a request
        still waiting for budget gets an answer before the server cancels it."""
        self._shedding = True
        for lane in self.lanes.values():
            lane.shedding = SHUTTING_DOWN  # a request past the check above, reading state
            lane.fail_waiters(SHUTTING_DOWN)

    async def close(self) -> None:
        for lane in self.lanes.values():
            await lane.close()
        await self.quotas.close()


def _window_json(w: WindowView) -> dict[str, object]:
    return {
        "requests": w.requests,
        "per_seconds": w.per_seconds,
        "used": w.used,
        "remaining": w.remaining,
        "reset_in": round(w.reset_in, 3),
        "external": w.external,
    }


def _classes_json(lane: Lane, now: float) -> dict[str, object]:
    """Each class of ``lane``: its weight, whether paced, per window what it has reserved,
    used, may still send (free) and may use at most (share), and how many of it wait."""
    book = lane.classes
    assert book is not None
    queue = lane.queue
    out: dict[str, object] = {}
    for name, views in book.views(now, lane.source.budget).items():
        out[name] = {
            "weight": book.weight(name),
            "pace": book.paced(name),
            "queue_depth": queue.queued_in(name) if isinstance(queue, ClassQueue) else 0,
            "windows": [v._asdict() for v in views],
        }
    return out


def _frozen_for(source: SlotSource, now: float) -> float:
    until = source.frozen_until(now)
    return round(until - now, 3) if until is not None else 0.0
