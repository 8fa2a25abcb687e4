"""One upstream credential's lane: admit a request now, queue it, or refuse it at once, and
learn from echowin's answers.

A :class:`Lane` takes its send slots from a :class:`~proxy.budget.slots.SlotSource` (the hard
cap, written ahead before a request leaves, so that a restart never forgets a send), queues
what must wait in its :class:`~proxy.budget.dispatch.Dispatch` (fair between tokens), and
refuses at once what would wait past its ``max_wait``. Time is wall-clock seconds
(``time.time``) because the send log outlives the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.auth.tokens import TokenRecord
from proxy.budget.admission import STATE_DOWN, Refusal
from proxy.budget.class_lane import class_wait, take_shared
from proxy.budget.class_queue import ClassQueue
from proxy.budget.classes import ClassBook
from proxy.budget.dispatch import Dispatch
from proxy.budget.fairness import FairQueue
from proxy.budget.grants import SlotGrant, Waiter
from proxy.budget.local_slots import LocalSlots
from proxy.budget.quotas import TokenCharge
from proxy.budget.ratelimit_headers import (
    UpstreamQuota,
    freeze_until,
    parse_limit_remaining,
    parse_upstream_quota,
)
from proxy.budget.refusals import Refusals
from proxy.budget.slots import SendLog, Slot, SlotSource, StateUnavailable
from proxy.budget.windows import CredentialBudget, Limit
from proxy.errors import Reason

log = logging.getLogger("echowin_gateway.budget")

__all__ = ["Lane", "Observer", "QueuePolicy"]


class Observer(Protocol):
    """What the scheduler reports to metrics; implemented in proxy/observe/metrics.py."""

    def refused(self, credential: str, token: str, reason: str) -> None: ...
    def waited(self, credential: str, seconds: float) -> None: ...
    def upstream_429(self, credential: str) -> None: ...
    def frozen(self, credential: str) -> None: ...
    def reported_remaining(self, credential: str, remaining: int) -> None: ...


@dataclass(slots=True)
class QueuePolicy:
    """Queue bounds shared by every lane (``max_wait`` in seconds); ``waiting``: requests
    queued in all lanes, kept by their queues (:class:`~proxy.budget.fairness.Tally`)."""

    max_wait: float
    max_depth: int
    max_depth_per_token: int
    waiting: int = 0


class Lane:
    """Admission and the upstream's answers for one credential. ``version`` counts the
    changes this lane makes to its budget (sends taken, given back, echowin's answers), so
    that a view of the budget can tell it is out of date."""

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
        classes: ClassBook | None = None,
    ) -> None:
        """Either ``send_log`` (slots kept in this process) or a shared ``source``;
        ``guard``: seconds added to every window of a ``send_log``'s budget; ``classes``:
        the credential's classes of service, kept with a ``send_log``'s slots; with a
        shared source, by this process for its own sends (see ``take``)."""
        self.name = name
        self.classes = classes
        self._local: LocalSlots | None = None
        if source is None:
            assert send_log is not None, "a Lane needs a send log or a slot source"
            budget = CredentialBudget(limits, guard)
            source = self._local = LocalSlots(name, budget, send_log, clock, classes=classes)
        self.source = source
        source.on_frozen = self._frozen_elsewhere
        self.policy = policy
        self.observer = observer
        self.clock = clock
        self.dispatch = Dispatch(self, policy, clock)
        self.queue: FairQueue[Waiter] | ClassQueue[Waiter] = self.dispatch.queue
        # Without a durable log we do not know what was sent before we started: one probe
        # at a time until echowin's headers say where the budget stands.
        self.calibrated = source.durable
        self.probing = False
        self.reported_remaining: int | None = None
        self.version = 0
        self.refusals = Refusals(self)
        # Set by shed (shutting down): what a request that would queue gets instead.
        self.shedding: Refusal | None = None

    @property
    def budget(self) -> CredentialBudget:
        """This lane's view of the budget (exact for local slots, a mirror for shared)."""
        return self.source.budget

    @property
    def depth(self) -> int:
        """Requests queued in this lane."""
        return self.queue.depth

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

    def can_send(self) -> bool:
        """Calibrated, or no calibration probe out."""
        return self.calibrated or not self.probing

    def class_of(self, token: TokenRecord) -> str | None:
        """The class of service ``token``'s sends count in (None: no classes kept)."""
        return None if self.classes is None else self.classes.resolve(token.service_class)

    async def take(
        self, now: float, waiting: bool = False, cls: str | None = None
    ) -> SlotGrant | None:
        """A slot now, if the budget (and the calibration probe) allow; ``waiting``: for a
        queued request; ``cls``: its class of service. May raise StateUnavailable."""
        if not self.can_send():
            return None
        book = self.classes
        if book is None:
            slot = await self.source.take(now, waiting)
        elif self._local is not None:
            slot = await self._local.take(now, waiting, cls)
        else:
            slot = await take_shared(self.source, book, now, waiting, book.resolve(cls))
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
        book, queue = self.classes, self.queue
        if book is None or not isinstance(queue, ClassQueue):
            return self.source.predict_wait(
                now, queue.ahead_of_new(token.id, token.weight), horizon
            )
        return class_wait(self.source, book, queue, now, token, horizon)

    def hold(self, token: TokenRecord, max_wait: float) -> Waiter | None:
        """Queue a new request of ``token`` at once, without awaiting its turn, unless
        ``admit`` would refuse it: the view of the budget is current without reading the
        state, and the prediction does not refuse it. A slot free now is handed out by the
        pump, in the queue's order. None: ``admit`` decides. The waiter is awaited later by
        ``admit(..., held=waiter)``, or given up with ``leave``. The lobby
        (proxy/server/lobby.py) keeps a request queued this way with no coroutine of its
        own: a burst of new connections is queued as it comes, before aiohttp has run one
        of its handlers."""
        if self.shedding is not None:
            return None
        now = self.clock()
        refusals = self.refusals
        try:
            if (
                not self.source.refreshed(now)
                or (self.queue.depth == 0 and refusals.known(now, token, max_wait) is not None)
                or refusals.for_new(now, token, max_wait) is not None
            ):
                return None
        except StateUnavailable:
            return None
        return self.dispatch.enqueue(now, token, max_wait)

    async def admit(
        self,
        token: TokenRecord,
        charge: TokenCharge | None,
        max_wait: float,
        held: Waiter | None = None,
    ) -> SlotGrant | Refusal:
        """A reserved, written-ahead slot, or a refusal. Never waits past ``max_wait``
        (seconds). ``held``: the request was queued by ``hold``; its wait goes on here."""
        grant: SlotGrant | Refusal | None = None
        if held is None:
            now = self.clock()
            try:
                grant = await self._at_once(now, token, max_wait)
            except StateUnavailable:
                return STATE_DOWN
        else:
            now = held.since
        if grant is None:
            # Queued. The wait is awaited here, not in a coroutine of its own: with 10,000
            # queued, every frame and timer per waiter counts (docs/performance.md#memory).
            waiter = self.dispatch.enqueue(now, token, max_wait) if held is None else held
            try:
                result = await waiter.future
            except asyncio.CancelledError:
                self.dispatch.leave(waiter)
                raise
            finally:
                waiter.timer.cancel()
            grant = self._waited(now, waiter, result)  # observed the wait it granted
        elif isinstance(grant, SlotGrant):
            self.observer.waited(self.name, 0.0)  # admitted at once: a wait of 0
        if isinstance(grant, SlotGrant):
            grant.quota = charge
            if not grant.slot.committed:  # written ahead already: nothing to await
                await self._write_ahead(grant)
        return grant

    async def _at_once(
        self, now: float, token: TokenRecord, max_wait: float
    ) -> SlotGrant | Refusal | None:
        """A slot or a refusal for a new request, now; None: it queues. Raises
        StateUnavailable."""
        grant: SlotGrant | Refusal | None = None
        refreshed = False
        if self.queue.depth == 0:
            if self.refusals.cached is not None:  # refused before: has anything changed?
                await self.source.refresh(now)
                refreshed = True
                grant = self.refusals.known(now, token, max_wait)
            if grant is None:
                grant = await self.take(now, cls=self.class_of(token))
        if grant is None:
            if not refreshed:
                await self.source.refresh(now)
            grant = self.refusals.for_new(now, token, max_wait)
        if grant is None and self.shedding is not None:
            # Shed while this request read the state (its quota, Redis): nobody serves the
            # queue now, and the server cancels what still waits at the end of the drain.
            grant = self.shedding
        return grant

    async def known_refusal(self, token: TokenRecord, max_wait: float) -> Refusal | None:
        """The refusal :meth:`admit` would give at once without asking the budget (nobody
        waits and nothing changed since the last refusal), else None."""
        if self.queue.depth or self.refusals.cached is None:
            return None
        now = self.clock()
        try:
            await self.source.refresh(now)
        except StateUnavailable:
            return None  # admit says so
        return self.refusals.known(now, token, max_wait)

    def leave(self, waiter: Waiter) -> None:
        """A queued request gives its place up (see :meth:`Dispatch.leave`)."""
        self.dispatch.leave(waiter)

    def _waited(
        self, now: float, waiter: Waiter, result: SlotGrant | Refusal | None
    ) -> SlotGrant | Refusal:
        if result is None:  # the wait is over
            self.dispatch.drop(waiter)
            return Refusal(
                Reason.UPSTREAM_BUDGET,
                max(self.source.predict_wait(self.clock(), self.queue.depth, None), 1.0),
                "Waited too long for echowin budget",
            )
        if isinstance(result, SlotGrant):
            result.queued_seconds = self.clock() - now
            self.observer.waited(self.name, result.queued_seconds)
        return result

    async def _write_ahead(self, grant: SlotGrant) -> None:
        try:
            await self.source.commit(grant.slot)
        except BaseException:
            grant.unsent()
            raise

    def fail_waiters(self, refusal: Refusal) -> None:
        """Answer every queued request with ``refusal``."""
        self.dispatch.fail(refusal)

    # --- what happened upstream -----------------------------------------------------

    def give_back(self, slot: Slot) -> None:
        """A granted slot never reached echowin: free it and let a waiter have it."""
        self.source.give_back(slot)
        if self._local is None and self.classes is not None:  # kept here for shared slots
            self.classes.release(slot.cls, slot.at)
        self.version += 1
        self.probing = False
        self.dispatch.schedule()

    def on_response(self, grant: SlotGrant, status: int, headers: Mapping[str, str]) -> None:
        """echowin answered ``grant``'s send: learn from its rate-limit fields; an
        unexpected 429 freezes the credential (:func:`freeze_until`)."""
        now = self.clock()
        self.version += 1
        self.source.answered(grant.slot, now)
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
        if self.queue.depth:
            self.dispatch.schedule()

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
        refusal = Refusal(
            Reason.UPSTREAM_FROZEN, resume - now, "echowin asked us to pause; try again later"
        )
        self.dispatch.fail(refusal, before=resume)

    async def close(self) -> None:
        await self.dispatch.close()
        await self.source.close()
