"""The budget keeper: admit a request now, queue it fairly, or refuse it at once.

One :class:`Lane` per upstream credential holds that credential's
:class:`~proxy.budget.windows.CredentialBudget` (the hard cap), a FIFO per token, and a smooth
weighted round-robin over the tokens that wait. A send slot is recorded in the budget and
written ahead to the :class:`SendLog` before the request leaves, so a restart (clean or
SIGKILL) never forgets a send. :class:`Scheduler` is the :class:`~proxy.budget.admission.Admitter`
the handler talks to.

Time is wall-clock seconds (``time.time``) because the send log outlives the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from proxy.auth.tokens import TokenRecord
from proxy.budget.admission import AdmitRequest, Grant, Held, Refusal
from proxy.budget.ratelimit_headers import (
    UpstreamQuota,
    caller_headers,
    parse_limit_remaining,
    parse_upstream_quota,
    policy_header,
    tight_headers,
    unchanged_for,
    window_name,
)
from proxy.budget.slots import LocalSlots, SendLog, Slot, SlotSource, StateUnavailable
from proxy.budget.windows import CredentialBudget, Limit, WindowView
from proxy.errors import Reason

log = logging.getLogger("echowin_gateway.budget")

# An unexpected 429 with no usable Retry-After or Reset freezes the credential this long.
DEFAULT_FREEZE_SECONDS = 60.0
# A freeze never lasts longer than this, whatever echowin's headers say.
MAX_FREEZE_SECONDS = 3600.0


def freeze_until(now: float, quota: UpstreamQuota | None) -> float:
    """When a credential frozen at ``now`` by an unexpected upstream 429 may send again
    (Unix seconds), from what that 429 said (``quota``): its Retry-After, else its
    X-RateLimit-Reset, else ``DEFAULT_FREEZE_SECONDS``; never past
    ``MAX_FREEZE_SECONDS``. The caller's own Retry-After for that 429 says the same."""
    until = quota.resume_at(now) if quota is not None else None
    if until is None:
        until = now + DEFAULT_FREEZE_SECONDS
    return min(until, now + MAX_FREEZE_SECONDS)


class Observer(Protocol):
    """What the scheduler reports to metrics; implemented in proxy/observe/metrics.py."""

    def refused(self, credential: str, token: str, reason: str) -> None: ...
    def waited(self, credential: str, seconds: float) -> None: ...
    def upstream_429(self, credential: str) -> None: ...
    def frozen(self, credential: str) -> None: ...
    def reported_remaining(self, credential: str, remaining: int) -> None: ...


@dataclass(slots=True)
class QueuePolicy:
    """Queue bounds, shared by every lane: ``waiting`` counts requests queued in all."""

    max_wait: float
    max_depth: int
    max_depth_per_token: int
    waiting: int = 0


@dataclass(slots=True, eq=False)
class _Waiter:
    token: TokenRecord
    deadline: float
    # Settled by the pump (a grant), a refusal for everyone (a freeze, the state gone), or
    # None by ``timer`` when the wait is over. One timer handle per waiter: asyncio.timeout
    # would add a Timeout, its handle and a cancellation of the task.
    future: asyncio.Future[SlotGrant | Refusal | None]
    timer: asyncio.TimerHandle
    since: float  # when it was queued


@dataclass(slots=True, eq=False)
class _TokenQueue:
    token: TokenRecord
    waiters: deque[_Waiter] = field(default_factory=deque)
    current: float = 0.0  # smooth weighted round-robin state


@dataclass(slots=True, eq=False)
class _Turns:
    """A copy of one token queue's round-robin state, for a prediction to play forward."""

    current: float
    waiting: int
    weight: int


def _credit(turns: _Turns) -> float:
    return turns.current


@dataclass(slots=True)
class TokenCharge:
    """One send charged to a token's own quota: a slot of the quota's source."""

    source: SlotSource
    slot: Slot
    refunded: bool = False

    def refund(self) -> None:
        """Give the send back to the token's quota (idempotent)."""
        if not self.refunded:
            self.refunded = True
            self.source.give_back(self.slot)


QuotaSources = Callable[[str, tuple[Limit, ...]], SlotSource]
"""Makes the slot source of one token's own quota: ``(name, limits)``. The name is
``quota:<token id>`` (credential names cannot hold a colon). A source on the gateway's
state (SQLite, Redis) holds the quota across workers, replicas and restarts."""


def local_quota_source(
    name: str,
    limits: Sequence[Limit],
    log: SendLog,
    clock: Callable[[], float] | None = None,
) -> LocalSlots:
    """A token's quota on a send log (``memory://``, SQLite). No guard: the gateway counts
    it, echowin does not. No leases: a token's requests may move between processes, and a
    lease's unused slots would stay with the one that took it until it takes again."""
    return LocalSlots(name, CredentialBudget(limits, 0.0), log, clock, leases=False)


@dataclass(slots=True, eq=False)
class _Quota:
    limits: tuple[Limit, ...]
    source: SlotSource
    token_name: str
    # The source's view loaded from the state (restored, or rebuilt for new limits).
    ready: asyncio.Future[None]


class SlotGrant:
    """One reserved send slot. Exactly one of ``sent`` / ``unsent`` takes effect."""

    __slots__ = ("_done", "lane", "queued_seconds", "quota", "slot")

    def __init__(self, lane: Lane, slot: Slot) -> None:
        self.lane = lane
        self.slot = slot
        self.queued_seconds = 0.0
        # The token's own quota and when it was charged, refunded with the slot.
        self.quota: TokenCharge | None = None
        self._done = False

    @property
    def at(self) -> float:
        return self.slot.at

    def sent(self, status: int, headers: Mapping[str, str]) -> None:
        if not self._done:
            self._done = True
            self.lane.on_response(self, status, headers)

    def unsent(self) -> None:
        if not self._done:
            self._done = True
            if self.quota is not None:
                self.quota.refund()
            self.lane.give_back(self.slot)


class Hold:
    """A request queued by :meth:`Scheduler.hold` before its handler runs: its place in
    its lane's queue, until ``admit`` takes it over or ``release`` gives it up."""

    __slots__ = ("lane", "waiter")

    def __init__(self, lane: Lane, waiter: _Waiter) -> None:
        self.lane = lane
        self.waiter: _Waiter | None = waiter

    @property
    def future(self) -> asyncio.Future[SlotGrant | Refusal | None]:
        """Done when the wait is: a slot granted, a refusal, or the wait over (None)."""
        assert self.waiter is not None
        return self.waiter.future

    @property
    def granted(self) -> bool:
        return self.waiter is not None and isinstance(_settled(self.waiter), SlotGrant)

    def take(self, lane: Lane, token: TokenRecord) -> _Waiter | None:
        """The waiter, for ``lane.admit`` to await, if it was queued for ``token`` in
        ``lane`` (else given up: the request is admitted anew)."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None and (lane is not self.lane or waiter.token.id != token.id):
            _give_up(self.lane, waiter)
            return None
        return waiter

    def release(self) -> None:
        """Never taken (the caller left, or was answered before admission): leave the
        queue, or give back the slot already granted."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            _give_up(self.lane, waiter)


def _give_up(lane: Lane, waiter: _Waiter) -> None:
    waiter.timer.cancel()
    lane._left(waiter)


_STATE_DOWN = Refusal(
    Reason.STATE_UNAVAILABLE, 1.0, "The gateway's shared state is unavailable", status=503
)
_SHUTTING_DOWN = Refusal(
    Reason.SHUTTING_DOWN, 1.0, "The gateway is shutting down; try again", status=503
)


class Lane:
    """Queues and fairness for one upstream credential; its slots come from a SlotSource."""

    # Sends ahead of a new request that a prediction plays out exactly (echowin's tightest
    # window holds 100): a deeper queue shared by several tokens gets a bound instead. So
    # does one shared by so many tokens that the play would look at more than PLAYED_WORK
    # token queues in all (exact up to 256 sends for 32 tokens; about a millisecond).
    PLAYED_MAX = 256
    PLAYED_WORK = 8192

    def __init__(
        self,
        name: str,
        limits: Sequence[Limit],
        guard: float,
        send_log: SendLog | None,
        policy: QueuePolicy,
        observer: Observer,
        clock: Callable[[], float] = time.time,
        source: SlotSource | None = None,
    ) -> None:
        """Either ``send_log`` (slots kept in this process) or a shared ``source``."""
        self.name = name
        if source is None:
            assert send_log is not None, "a Lane needs a send log or a slot source"
            source = LocalSlots(name, CredentialBudget(limits, guard), send_log, clock)
        self.source = source
        source.on_frozen = self._frozen_elsewhere
        self.policy = policy
        self.observer = observer
        self.clock = clock
        self.queues: dict[str, _TokenQueue] = {}
        self.depth = 0
        # Without a durable log we do not know what was sent before we started: one probe
        # at a time until echowin's headers say where the budget stands.
        self.calibrated = source.durable
        self.probing = False
        self.reported_remaining: int | None = None
        # Counts the changes this lane makes to its budget (sends taken, given back, echowin's
        # answers), so a view of the budget can tell it is out of date.
        self.version = 0
        self._timer: asyncio.TimerHandle | None = None
        self._pump: asyncio.Task[None] | None = None
        # The last prediction with nobody queued: ((version, changes, probing, state
        # healthy), when the budget frees, the freeze then), for refusing again without
        # predicting again.
        self._refusing: tuple[tuple[int, int, bool, bool], float, float | None] | None = None
        # Counts the changes to the queues and their round-robin credits; the sends ahead
        # of a new request, played out for that state, per (token id if it has a queue,
        # weight): a flood of refused arrivals plays the round-robin once, not each time.
        self._queues_version = 0
        self._ahead: dict[tuple[str | None, int], int] = {}
        self._ahead_version = -1
        # Set by shed (shutting down): what a request that would queue gets instead.
        self.shedding: Refusal | None = None

    @property
    def budget(self) -> CredentialBudget:
        """This lane's view of the budget (exact for local slots, a mirror for shared)."""
        return self.source.budget

    async def restore(self) -> None:
        """Load what the slot source remembers (after a restart). A send log that holds
        nothing in any window (a first start, or a stop longer than the longest window)
        says nothing about anyone else's use of the key either: calibrate with one probe,
        as without a durable log. A log with recent sends is trusted, as before the stop."""
        now = self.clock()
        await self.source.restore(now)
        self.version += 1
        budget = self.source.budget
        if not self.source.remembers_external and not any(
            budget.count(now, index) for index in range(len(budget.limits))
        ):
            self.calibrated = False

    # --- admission ------------------------------------------------------------------

    def _can_send(self) -> bool:
        return self.calibrated or not self.probing

    async def _take(self, now: float, waiting: bool = False) -> SlotGrant | None:
        """A slot now, if the budget (and the calibration probe) allow; ``waiting``: for a
        queued request. May raise StateUnavailable."""
        if not self._can_send():
            return None
        slot = await self.source.take(now, waiting)
        if slot is None:
            return None
        self.version += 1
        if not self.calibrated:
            self.probing = True
        return SlotGrant(self, slot)

    def predicted_wait(self, now: float, token: TokenRecord, horizon: float | None) -> float:
        """Seconds until a new request of ``token`` would be served, given who waits."""
        # While a calibration probe is out the wait is at least its round trip, which no
        # budget math knows; the probe is already recorded, so it is not counted again.
        return self.source.predict_wait(now, self._ahead_of_new(token), horizon)

    def _ahead_of_new(self, token: TokenRecord) -> int:
        """Sends the weighted round-robin serves before a new request of ``token``, played
        once per state of the queues (see ``_play_ahead``): a new token's depends on its
        weight only."""
        if self._ahead_version != self._queues_version:
            self._ahead.clear()
            self._ahead_version = self._queues_version
        key = (token.id if token.id in self.queues else None, token.weight)
        ahead = self._ahead.get(key)
        if ahead is None:
            ahead = self._ahead[key] = self._play_ahead(token)
        return ahead

    def _play_ahead(self, token: TokenRecord) -> int:
        """Sends the weighted round-robin serves before a new request of ``token`` if
        nobody else comes: its choices played forward, as ``_next_queue`` makes them, on
        copies of the credits. Smooth round-robin spreads a token's turns through a round
        and the credits carry over, so counting whole rounds of weights was wrong both
        ways (a request refused that would have been served in time; one queued that then
        waited past its max wait). Costs O(sends ahead * tokens waiting) until only its
        own are left; past PLAYED_MAX sends ahead or PLAYED_WORK queues looked at, a bound
        by rounds of weights."""
        own = self.queues.get(token.id)
        # In the dict's order: ties go to the first, as in _next_queue.
        queues = [
            _Turns(q.current, len(q.waiters) + (q is own), q.token.weight)
            for q in self.queues.values()
        ]
        if own is None:
            me = _Turns(0.0, 1, token.weight)
            queues.append(me)
        else:
            me = queues[list(self.queues).index(token.id)]
        ahead = 0
        work = 0
        while ahead <= self.PLAYED_MAX and work <= self.PLAYED_WORK:
            work += len(queues)
            if not any(q.waiting for q in queues if q is not me):
                return ahead + me.waiting - 1  # the rest are its own, in order
            for gone in [q for q in queues if not q.waiting and q.current >= 0]:
                queues.remove(gone)  # retired, as _retire does
                weights = sum(q.weight for q in queues)
                for q in queues:
                    q.current += gone.current * q.weight / weights
            total = 0
            for q in queues:
                q.current += q.weight
                total += q.weight
            best = max((q for q in queues if q.waiting), key=_credit)
            best.current -= total
            best.waiting -= 1
            if best is me and not me.waiting:
                return ahead
            ahead += 1
        return max(ahead + 1, self._rounds_ahead(token))  # more than were played

    def _rounds_ahead(self, token: TokenRecord) -> int:
        """A bound on the sends ahead of a new request of ``token``, by rounds of weights."""
        own = self.queues.get(token.id)
        mine = len(own.waiters) if own is not None else 0
        rounds = (mine + 1) / token.weight
        ahead = mine
        for tid, queue in self.queues.items():
            if tid != token.id:
                ahead += min(len(queue.waiters), math.ceil(rounds * queue.token.weight))
        return ahead

    def hold(self, token: TokenRecord, max_wait: float) -> _Waiter | None:
        """Queue a new request of ``token`` at once, without awaiting its turn, unless
        ``admit`` would refuse it: the view of the budget is current without reading the
        state, and the prediction does not refuse it. A slot free now is handed out by the
        pump, in the queue's order. None: ``admit`` decides. The waiter is awaited later by
        ``admit(..., held=waiter)``, or given up with ``_left``. The lobby (proxy/server/lobby.py)
        keeps a request queued this way with no coroutine of its own: a burst of new
        connections is queued as it comes, before aiohttp has run one of its handlers."""
        if self.shedding is not None:
            return None
        now = self.clock()
        try:
            if (
                not self.source.refreshed(now)
                or (self.depth == 0 and self._known_refusal(now, token, max_wait) is not None)
                or self._refusal_for_new(now, token, max_wait) is not None
            ):
                return None
        except StateUnavailable:
            return None
        return self._enqueue(now, token, max_wait)

    async def admit(
        self,
        token: TokenRecord,
        charge: TokenCharge | None,
        max_wait: float,
        held: _Waiter | None = None,
    ) -> SlotGrant | Refusal:
        """A reserved, written-ahead slot, or a refusal. Never waits past ``max_wait``.
        ``held``: the request was queued by ``hold``; its wait goes on here."""
        grant: SlotGrant | Refusal | None = None
        if held is None:
            now = self.clock()
            try:
                refreshed = False
                if self.depth == 0:
                    if self._refusing is not None:  # refused before: has anything changed?
                        await self.source.refresh(now)
                        refreshed = True
                        grant = self._known_refusal(now, token, max_wait)
                    if grant is None:
                        grant = await self._take(now)
                if grant is None:
                    if not refreshed:
                        await self.source.refresh(now)
                    grant = self._refusal_for_new(now, token, max_wait)
            except StateUnavailable:
                return _STATE_DOWN
            if grant is None and self.shedding is not None:
                # Shed while this request read the state (its quota, Redis): nobody serves
                # the queue now, and the server cancels what still waits at the end of the
                # drain.
                grant = self.shedding
        else:
            now = held.since
        if grant is None:
            # Queued. The wait is awaited here, not in a coroutine of its own: with 10,000
            # queued, every frame and timer per waiter counts (docs/performance.md#memory).
            waiter = self._enqueue(now, token, max_wait) if held is None else held
            try:
                settled = await waiter.future
            except asyncio.CancelledError:
                self._left(waiter)
                raise
            finally:
                waiter.timer.cancel()
            grant = self._waited(now, waiter, settled)  # observed the wait it granted
        elif isinstance(grant, SlotGrant):
            self.observer.waited(self.name, 0.0)  # admitted at once: a wait of 0
        if isinstance(grant, SlotGrant):
            grant.quota = charge
            if not grant.slot.committed:  # written ahead already: nothing to await
                await self._write_ahead(grant)
        return grant

    async def known_refusal(self, token: TokenRecord, max_wait: float) -> Refusal | None:
        """The refusal :meth:`admit` would give at once without asking the budget (nobody
        waits and nothing changed since the last refusal), else None."""
        if self.depth or self._refusing is None:
            return None
        now = self.clock()
        try:
            await self.source.refresh(now)
        except StateUnavailable:
            return None  # admit says so
        return self._known_refusal(now, token, max_wait)

    def _known_refusal(self, now: float, token: TokenRecord, max_wait: float) -> Refusal | None:
        """With nobody queued and nothing changed since the last refusal, the budget frees
        at the same moment: refuse again without asking it (a flood of refused requests)."""
        known = self._refusing
        if known is None or known[0] != (
            self.version,
            self.source.changes,
            self.probing,
            self.source.healthy,
        ):
            self._refusing = None  # out of date (the counters only grow; health may return)
            return None
        _, free_at, frozen = known
        if free_at - now <= max_wait:
            return None
        return self._queue_full(token) or self._refusal(now, free_at - now, frozen, max_wait)

    def _queue_full(self, token: TokenRecord) -> Refusal | None:
        queue = self.queues.get(token.id)
        if self.policy.waiting >= self.policy.max_depth or (
            queue is not None and len(queue.waiters) >= self.policy.max_depth_per_token
        ):
            return Refusal(Reason.QUEUE_FULL, 1.0, "Too many requests are waiting; try again later")
        return None

    def _refusal_for_new(self, now: float, token: TokenRecord, max_wait: float) -> Refusal | None:
        full = self._queue_full(token)
        if full is not None:
            return full
        frozen = self.source.frozen_until(now)
        # One prediction, without a horizon: a refusal needs the whole wait for Retry-After.
        wait = self.predicted_wait(now, token, None)
        if self.depth == 0:  # the moment the budget frees, as long as nothing changes
            self._refusing = (
                (self.version, self.source.changes, self.probing, self.source.healthy),
                now + wait,
                frozen,
            )
        if wait <= max_wait:
            return None
        return self._refusal(now, wait, frozen, max_wait)

    def _refusal(self, now: float, wait: float, frozen: float | None, max_wait: float) -> Refusal:
        if frozen is not None and frozen - now > max_wait:
            # ``wait`` covers the freeze and what the budget holds after it (a 429 that
            # said the window is spent): the client is not refused again when it comes back.
            return Refusal(
                Reason.UPSTREAM_FROZEN,
                max(wait, frozen - now),
                "echowin asked us to pause; try again later",
            )
        return Refusal(
            Reason.UPSTREAM_BUDGET, max(wait, 1.0), "Rate limit exceeded. Please try again later."
        )

    def _enqueue(self, now: float, token: TokenRecord, max_wait: float) -> _Waiter:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SlotGrant | Refusal | None] = loop.create_future()
        timer = loop.call_later(max_wait + 0.05, _wait_over, future)
        waiter = _Waiter(token, now + max_wait, future, timer, now)
        queue = self.queues.get(token.id)
        if queue is None:
            queue = self.queues[token.id] = _TokenQueue(token)
        queue.waiters.append(waiter)
        self._queues_version += 1
        self.depth += 1
        self.policy.waiting += 1
        self._schedule()
        return waiter

    def _left(self, waiter: _Waiter) -> None:
        """The client went away: leave the queue, or give back a slot already granted."""
        granted = _settled(waiter)
        if isinstance(granted, SlotGrant):
            granted.unsent()
        self._drop(waiter)

    def _waited(
        self, now: float, waiter: _Waiter, settled: SlotGrant | Refusal | None
    ) -> SlotGrant | Refusal:
        if settled is None:  # the wait is over
            self._drop(waiter)
            return Refusal(
                Reason.UPSTREAM_BUDGET,
                max(self.source.predict_wait(self.clock(), self.depth, None), 1.0),
                "Waited too long for echowin budget",
            )
        if isinstance(settled, SlotGrant):
            settled.queued_seconds = self.clock() - now
            self.observer.waited(self.name, settled.queued_seconds)
        return settled

    def _drop(self, waiter: _Waiter) -> None:
        queue = self.queues.get(waiter.token.id)
        if queue is not None and waiter in queue.waiters:
            queue.waiters.remove(waiter)
            self._queues_version += 1
            self.depth -= 1
            self.policy.waiting -= 1
            if not queue.waiters:
                self._emptied(queue)
        if not waiter.future.done():
            waiter.future.cancel()

    async def _write_ahead(self, grant: SlotGrant) -> None:
        try:
            await self.source.commit(grant.slot)
        except BaseException:
            grant.unsent()
            raise

    # --- dispatch -------------------------------------------------------------------

    def _schedule(self) -> None:
        """Serve waiters as soon as the budget allows: run the pump now, or once."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.depth == 0 or not self._can_send():
            return
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()

    async def _run_pump(self) -> None:
        """Hand out slots to waiters until the budget or the queue runs out, then set one
        timer for the moment the budget allows the next send."""
        while self.depth > 0:
            try:
                grant = await self._take(self.clock(), waiting=True)
            except StateUnavailable:
                self.fail_waiters(_STATE_DOWN)
                return
            if grant is None:
                break
            waiter = self._next_live_waiter()
            if waiter is None:  # everyone left while the slot was being reserved
                grant.unsent()
                return
            waiter.future.set_result(grant)
        if self.depth > 0 and self._can_send():
            delay = self.source.retry_in(self.clock())
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(delay, 0.0005), self._on_timer)

    def _next_live_waiter(self) -> _Waiter | None:
        """The next waiter in weighted round-robin order whose request still waits. A waiter
        whose wait is over (settled with None) or whose task was cancelled (client gone: a
        cancelled future) stays queued until its task runs again: skip it, it takes no slot."""
        while self.depth > 0:
            queue = self._next_queue()
            waiter = queue.waiters.popleft()
            self._queues_version += 1
            self.depth -= 1
            self.policy.waiting -= 1
            if not queue.waiters:
                self._emptied(queue)
            if not waiter.future.done():
                return waiter
        return None

    def fail_waiters(self, refusal: Refusal) -> None:
        """Answer every queued request with ``refusal``."""
        for queue in list(self.queues.values()):
            for waiter in list(queue.waiters):
                if not waiter.future.done():
                    waiter.future.set_result(refusal)
                self._drop(waiter)

    def _emptied(self, queue: _TokenQueue) -> None:
        """A token's queue has no waiter left. In debt (negative credit: it was just served)
        it stays in the round, not chosen, until the rounds have repaid it: a token that
        keeps one request waiting (its next comes as the last is served) would otherwise
        come back at 0 each time, its debt left with the others, and take every slot from
        a noisy token of lower weight. With nobody waiting, every debt is forgotten. Left
        in the round until the next choice (``_next_queue`` retires those that owe
        nothing): its client's next request may come before then, credit and all."""
        if self.depth == 0:
            self.queues.clear()

    def _retire(self, queue: _TokenQueue) -> None:
        """Remove an emptied queue that owes nothing. Its credit goes to those still in
        the round, by weight, so the credits keep summing to zero and a token that comes
        and goes cannot leave others ahead of a newcomer."""
        del self.queues[queue.token.id]
        total = sum(q.token.weight for q in self.queues.values())
        for other in self.queues.values():
            other.current += queue.current * other.token.weight / total

    def _next_queue(self) -> _TokenQueue:
        """Smooth weighted round-robin (as nginx does) over tokens that wait; a token in
        debt with none waiting takes part (repaying by its weight) but is not chosen."""
        for queue in [q for q in self.queues.values() if not q.waiters and q.current >= 0]:
            self._retire(queue)  # repaid: out of the round
        total = 0
        best: _TokenQueue | None = None
        for queue in self.queues.values():
            queue.current += queue.token.weight
            total += queue.token.weight
            if queue.waiters and (best is None or queue.current > best.current):
                best = queue
        assert best is not None
        best.current -= total
        return best

    # --- what happened upstream -----------------------------------------------------

    def give_back(self, slot: Slot) -> None:
        """A granted slot never reached echowin: free it and let a waiter have it."""
        self.source.give_back(slot)
        self.version += 1
        self.probing = False
        self._schedule()

    def on_response(self, grant: SlotGrant, status: int, headers: Mapping[str, str]) -> None:
        now = self.clock()
        self.version += 1
        if status == 429:
            quota = parse_upstream_quota(headers, now) if headers else None
            if quota is not None:
                self._reconcile(now, quota)
            self._freeze(now, quota)
        elif headers:
            # Only Limit and Remaining matter here (the times only say when a freeze ends).
            limit, remaining = parse_limit_remaining(headers)
            if remaining is not None:
                self._reconcile(now, UpstreamQuota(limit, remaining, None, None))
        if self.probing:
            self.probing = False
        if self.depth:
            self._schedule()

    def _reconcile(self, now: float, quota: UpstreamQuota) -> None:
        if quota.remaining is None:
            return
        if quota.remaining != self.reported_remaining:
            self.reported_remaining = quota.remaining
            self.observer.reported_remaining(self.name, quota.remaining)
        if quota.limit is None or quota.remaining > quota.limit:
            return
        if not self.calibrated:
            self.source.assume_external(now, quota.limit - quota.remaining)
            self.calibrated = True
            return
        self.source.observe(now, quota.limit, quota.remaining)

    def _freeze(self, now: float, quota: UpstreamQuota | None) -> None:
        until = freeze_until(now, quota)
        self.source.freeze(until)
        self.observer.upstream_429(self.name)
        self.observer.frozen(self.name)
        log.warning(
            "upstream 429: credential frozen",
            extra={"fields": {"credential": self.name, "seconds": round(until - now, 3)}},
        )
        self._refuse_frozen(now)

    def _frozen_elsewhere(self, until: float) -> None:
        """The source learnt of a freeze another process set (its upstream 429): it holds
        here too, and the waiters that cannot wait it out are refused now, not at their
        deadline."""
        now = self.clock()
        if until > now:  # a freeze row read late may have ended already
            self.version += 1
            self._refuse_frozen(now)

    def _refuse_frozen(self, now: float) -> None:
        """Refuse (``upstream_frozen``) every waiter that cannot last until the first send
        the budget allows: the freeze's end, or later when echowin's answer said a window
        is spent."""
        resume = now + self.source.predict_wait(now, 0, None)
        for queue in list(self.queues.values()):
            for waiter in list(queue.waiters):
                if waiter.deadline < resume:
                    if not waiter.future.done():
                        refusal = Refusal(
                            Reason.UPSTREAM_FROZEN,
                            resume - now,
                            "echowin asked us to pause; try again later",
                        )
                        waiter.future.set_result(refusal)
                    self._drop(waiter)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for queue in list(self.queues.values()):
            for waiter in list(queue.waiters):
                self._drop(waiter)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        await self.source.close()


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
    ) -> None:
        """``quota_sources``: where token quotas are kept (the state backend's; in this
        process: proxy.state.memory.memory_quota_sources)."""
        self.lanes = dict(lanes)
        self.policy = policy
        self.observer = observer
        self.clock = clock
        self._quota_sources = quota_sources
        # Per token id with a quota of its own: its limits and their slot source.
        self._quotas: dict[str, _Quota] = {}
        self._closing: set[asyncio.Future[None]] = set()  # sources of dropped quotas
        # Per credential: the caller headers of a token without its own quota (see
        # caller_headers) and what they were made from; what they take from its limits.
        self._headers: dict[str, _KeptHeaders] = {}
        self._shapes: dict[str, _Shape] = {}
        self._shedding = False  # shutting down: see shed

    async def _token_quota(self, token: TokenRecord) -> _Quota | None:
        """The token's quota, its source made and restored on first use and its view
        rebuilt when its limits change; None without one. One source per token for as
        long as it has a quota: slots charged before a change are given back to it."""
        limits = token_limits(token)
        known = self._quotas.get(token.id)
        if not limits:
            if known is not None:  # the quota was taken away
                del self._quotas[token.id]
                self._in_background(known.source.close())
            return None
        now = self.clock()
        if known is None:
            source = self._quota_sources(f"quota:{token.id}", limits)
            restore = asyncio.ensure_future(source.restore(now))
            known = self._quotas[token.id] = _Quota(limits, source, token.name, restore)
        elif known.limits != limits:
            known.limits = limits
            relimit = functools.partial(known.source.relimit, limits, now)
            known.ready = asyncio.ensure_future(_after(known.ready, relimit))
        ready = known.ready
        if not ready.done():
            # Shared by every request of the token that arrives meanwhile; a caller that
            # leaves does not cancel it for the others.
            with contextlib.suppress(Exception):
                await asyncio.shield(ready)
        if ready.cancelled() or ready.exception() is not None:
            if self._quotas.get(token.id) is known:  # made again by the next request
                del self._quotas[token.id]
                self._in_background(known.source.close())
            raise StateUnavailable("token quota: the state could not be read")
        return known

    def _in_background(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _charge(
        self, token: TokenRecord, lane_refusal: Refusal | None
    ) -> TokenCharge | Refusal | None:
        """One send charged to the token's own quota, a refusal, or None (no quota). With
        ``lane_refusal`` (the lane refuses at once anyway) nothing is charged: the quota's
        own refusal if it is spent too (the quota comes first), else ``lane_refusal``."""
        quota = await self._token_quota(token)
        if quota is None:
            return lane_refusal
        source = quota.source
        now = self.clock()
        slot = None if lane_refusal is not None else await source.take(now)
        if slot is None:
            # The view says spent; another process may have given a charge back since this
            # one last looked (the view catches up at most every few tens of ms).
            await source.refresh(now)
            wait = source.predict_wait(now, 0, None)
            if wait <= 0:
                if lane_refusal is not None:
                    return lane_refusal
                slot = await source.take(now)
            if slot is None:
                # Past the lane's refusal too, when it is known: back sooner, the client
                # would be refused again by the shared budget.
                shared = 0.0 if lane_refusal is None else lane_refusal.retry_after
                return Refusal(
                    Reason.TOKEN_QUOTA,
                    max(wait, source.retry_in(now), shared),
                    "This token's own quota is spent",
                )
        return TokenCharge(source, slot)

    def _max_wait(self, request: AdmitRequest) -> float:
        if request.max_wait is None:
            return self.policy.max_wait
        return min(self.policy.max_wait, request.max_wait)

    def _has_quota_of_its_own(self, token: TokenRecord) -> bool:
        return token.hourly is not None or token.per_minute is not None or token.id in self._quotas

    def hold(self, request: AdmitRequest) -> Hold | None:
        """Queue ``request`` now, without a coroutine, when it would be queued (see
        ``Lane.hold``); ``admit(request, held)`` takes the wait over. None when ``admit``
        must decide: a slot free now, a refusal, the state to read first (a token quota of
        its own is charged in the state before the lane is asked)."""
        token = request.token
        if self._shedding or self._has_quota_of_its_own(token):
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
                _give_up(lane, waiter)
            self.observer.refused(lane.name, token.name, _SHUTTING_DOWN.reason)
            return _SHUTTING_DOWN
        max_wait = self._max_wait(request)
        charge: TokenCharge | None = None
        if self._has_quota_of_its_own(token):
            # The token's own quota is charged first, in the gateway's state (a worker or a
            # replica sees the others' charges), and refunded if the request is refused;
            # not at all when the lane refuses at once anyway (a flood costs no writes).
            try:
                charged = await self._charge(token, await lane.known_refusal(token, max_wait))
            except StateUnavailable:
                charged = _STATE_DOWN
            except BaseException:
                if waiter is not None:
                    _give_up(lane, waiter)
                raise
            if isinstance(charged, Refusal):
                if waiter is not None:
                    _give_up(lane, waiter)
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
        return result

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
        quota = self._quotas.get(request.token.id)
        if quota is not None:
            windows = [("echowin", w) for w in lane.source.snapshot(now)]
            windows += [("token", w) for w in quota.source.snapshot(now)]
            return caller_headers(now, windows)
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

    def token_quotas(self) -> dict[str, list[WindowView]]:
        """Every token quota in use, by token name, at now (for metrics)."""
        now = self.clock()
        return {q.token_name: q.source.snapshot(now) for q in self._quotas.values()}

    def token_quota_view(self, token_id: str) -> list[dict[str, object]] | None:
        known = self._quotas.get(token_id)
        if known is None:
            return None
        return [_window_json(w) for w in known.source.snapshot(self.clock())]

    def snapshot(self) -> dict[str, object]:
        now = self.clock()
        out: dict[str, object] = {}
        for name, lane in self.lanes.items():
            out[name] = {
                "windows": [_window_json(w) for w in lane.source.snapshot(now)],
                "queue_depth": lane.depth,
                "waiting_tokens": sum(1 for q in lane.queues.values() if q.waiters),
                "frozen_for": _frozen_for(lane.source, now),
                "state_healthy": lane.source.healthy,
                "echowin_reported_remaining": lane.reported_remaining,
                "calibrated": lane.calibrated,
            }
        return out

    def shed(self) -> None:
        """Shutting down: refuse every queued request now (503 ``shutting_down``), and
        every later one at once. Called as the drain's grace runs out, so that a request
        still waiting for budget gets an answer before the server cancels it."""
        self._shedding = True
        for lane in self.lanes.values():
            lane.shedding = _SHUTTING_DOWN  # a request past the check above, reading state
            lane.fail_waiters(_SHUTTING_DOWN)

    async def close(self) -> None:
        for lane in self.lanes.values():
            await lane.close()
        while self._quotas:
            _, quota = self._quotas.popitem()
            quota.ready.cancel()
            await quota.source.close()
        await asyncio.gather(*self._closing, return_exceptions=True)


def _window_json(w: WindowView) -> dict[str, object]:
    return {
        "requests": w.requests,
        "per_seconds": w.per_seconds,
        "used": w.used,
        "remaining": w.remaining,
        "reset_in": round(w.reset_in, 3),
        "external": w.external,
    }


async def _after(
    previous: asyncio.Future[None], then: Callable[[], Coroutine[object, object, None]]
) -> None:
    """``then()`` once ``previous`` has ended, however it ended; cancelled, it cancels
    ``previous`` too (a closing scheduler cancels only the last of a chain)."""
    try:
        await asyncio.wait([previous])
    except asyncio.CancelledError:
        previous.cancel()
        raise
    if not previous.cancelled():
        previous.exception()  # retrieved: its callers were told, or there were none
    await then()


def _wait_over(future: asyncio.Future[SlotGrant | Refusal | None]) -> None:
    if not future.done():
        future.set_result(None)


def _settled(waiter: _Waiter) -> SlotGrant | Refusal | None:
    """The waiter's result if it was settled before the wait ended, else None."""
    future = waiter.future
    if future.done() and not future.cancelled():
        return future.result()
    return None


def _frozen_for(source: SlotSource, now: float) -> float:
    until = source.frozen_until(now)
    return round(until - now, 3) if until is not None else 0.0


QUOTA_HORIZON = 3600.0
"""The longest window of a token's own quota (``hourly``), seconds."""


def token_limits(token: TokenRecord) -> tuple[Limit, ...]:
    limits: list[Limit] = []
    if token.hourly is not None:
        limits.append(Limit(token.hourly, QUOTA_HORIZON))
    if token.per_minute is not None:
        limits.append(Limit(token.per_minute, 60.0))
    return tuple(limits)


__all__ = [
    "QUOTA_HORIZON",
    "Hold",
    "Lane",
    "QueuePolicy",
    "Scheduler",
    "SendLog",
    "SlotGrant",
    "freeze_until",
    "local_quota_source",
]
