"""The asyncio half of a lane: its waiters in a :class:`~proxy.budget.fairness.FairQueue`, each
with one timer for the end of its wait, and the pump that hands every slot the budget frees
to the next waiter in round-robin order, then sets one timer for the next free slot.

Times are wall-clock seconds (the lane's clock); timers run on the event loop's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from proxy.auth.tokens import TokenRecord
from proxy.budget.admission import STATE_DOWN, Refusal
from proxy.budget.class_queue import ClassQueue
from proxy.budget.classes import ClassBook
from proxy.budget.fairness import FairQueue, Tally
from proxy.budget.grants import SlotGrant, Waiter, settled
from proxy.budget.slots import SlotSource, StateUnavailable

__all__ = ["Dispatch", "SlotTaker"]


class SlotTaker(Protocol):
    """What the dispatch asks of its lane (``proxy.budget.lane.Lane``)."""

    source: SlotSource
    classes: ClassBook | None

    def can_send(self) -> bool:
        """A send may go now as far as calibration goes (the budget may still say no)."""

    async def take(
        self, now: float, waiting: bool = False, cls: str | None = None
    ) -> SlotGrant | None:
        """A slot now if the budget allows (and ``cls``'s rules); raises StateUnavailable."""


class Dispatch:
    """A lane's waiters and the pump that serves them. Every change to the queue goes
    through the :class:`FairQueue` (which keeps the counts); the pump runs in at most one
    task at a time, and waits for the budget with at most one timer."""

    __slots__ = ("_pump", "_timer", "clock", "lane", "queue")

    def __init__(self, lane: SlotTaker, tally: Tally, clock: Callable[[], float]) -> None:
        self.lane = lane
        self.clock = clock
        book = lane.classes
        self.queue: FairQueue[Waiter] | ClassQueue[Waiter] = (
            FairQueue(tally)
            if book is None
            else ClassQueue(tally, {name: book.weight(name) for name in book.names})
        )
        self._timer: asyncio.TimerHandle | None = None
        self._pump: asyncio.Task[None] | None = None

    def enqueue(self, now: float, token: TokenRecord, max_wait: float) -> Waiter:
        """Queue a request of ``token`` at ``now`` for at most ``max_wait`` seconds; its
        future is settled with None (the timer) shortly after that."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SlotGrant | Refusal | None] = loop.create_future()
        timer = loop.call_later(max_wait + 0.05, _wait_over, future)
        waiter = Waiter(token, now + max_wait, future, timer, now)
        queue, book = self.queue, self.lane.classes
        if isinstance(queue, ClassQueue) and book is not None:
            queue.push(token.id, token.weight, waiter, book.resolve(token.service_class))
        else:
            queue.push(token.id, token.weight, waiter)
        self.schedule()
        return waiter

    def leave(self, waiter: Waiter) -> None:
        """The waiter's request is gone (its client left, or it never took its place over):
        its timer cancelled, its place left, or the slot already granted to it given
        back. Idempotent."""
        waiter.timer.cancel()
        granted = settled(waiter)
        if isinstance(granted, SlotGrant):
            granted.unsent()
        self.drop(waiter)

    def drop(self, waiter: Waiter) -> None:
        """Out of the queue if still in it; its future cancelled if not yet settled."""
        self.queue.remove(waiter.token.id, waiter)
        if not waiter.future.done():
            waiter.future.cancel()

    def fail(self, refusal: Refusal, before: float | None = None) -> None:
        """Answer every queued request with ``refusal``; with ``before`` (seconds), only
        those whose deadline comes before it."""
        for waiter in self.queue.queued():
            if before is None or waiter.deadline < before:
                if not waiter.future.done():
                    waiter.future.set_result(refusal)
                self.drop(waiter)

    def schedule(self) -> None:
        """Serve waiters as soon as the budget allows: run the pump now, or once."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.queue.depth == 0 or not self.lane.can_send():
            return
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    def _on_timer(self) -> None:
        self._timer = None
        self.schedule()

    async def _run_pump(self) -> None:
        """Hand out slots to waiters until the budget or the queue runs out, then set one
        timer for the moment the budget allows the next send."""
        queue, lane = self.queue, self.lane
        if isinstance(queue, ClassQueue) and lane.classes is not None:
            await self._run_class_pump(queue, lane.classes)
            return
        while queue.depth > 0:
            try:
                grant = await lane.take(self.clock(), waiting=True)
            except StateUnavailable:
                self.fail(STATE_DOWN)
                return
            if grant is None:
                break
            waiter = self._next_live_waiter()
            if waiter is None:  # everyone left while the slot was being reserved
                grant.unsent()
                return
            waiter.future.set_result(grant)
        if queue.depth > 0 and lane.can_send():
            delay = lane.source.retry_in(self.clock())
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(delay, 0.0005), self._on_timer)

    async def _run_class_pump(self, queue: ClassQueue[Waiter], book: ClassBook) -> None:
        """The pump with classes of service: each free slot goes to the class the round
        between classes picks among those whose rules let it send now, then to the next
        of its tokens; one timer for the first moment a waiting class may send."""
        lane = self.lane
        budget = lane.source.budget
        while queue.depth > 0:
            now = self.clock()

            def may_send(name: str, now: float = now) -> bool:
                return book.allows(name, now, budget)

            name = queue.next_class(may_send)
            if name is None:
                break
            try:
                grant = await lane.take(now, waiting=True, cls=name)
            except StateUnavailable:
                self.fail(STATE_DOWN)
                return
            if grant is None:
                break
            waiter = None
            while queue.queued_in(name) and waiter is None:
                waiter = queue.pop(name, may_send)
                if waiter.future.done():  # its wait is over, or its client left
                    waiter = None
            if waiter is None:
                grant.unsent()
                continue
            waiter.future.set_result(grant)
        if queue.depth > 0 and lane.can_send():
            now = self.clock()
            waits = [book.wait(n, now, budget) for n in book.names if queue.queued_in(n)]
            delay = max(lane.source.retry_in(now), min(waits, default=0.0))
            delay = min(delay, 1.0)  # a look again each second at most: views change by others
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(delay, 0.0005), self._on_timer)

    def _next_live_waiter(self) -> Waiter | None:
        """The next waiter in round-robin order whose request still waits. A waiter whose
        wait is over (settled with None) or whose task was cancelled (client gone: a
        cancelled future) stays queued until its task runs again: skip it, it takes no slot."""
        queue = self.queue
        assert isinstance(queue, FairQueue)
        while queue.depth > 0:
            waiter = queue.pop()
            if not waiter.future.done():
                return waiter
        return None

    async def close(self) -> None:
        """Stop: no timer, no waiter (their futures cancelled), no pump."""
        if self._timer is not None:
            self._timer.cancel()
        for waiter in self.queue.queued():
            self.drop(waiter)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump


def _wait_over(future: asyncio.Future[SlotGrant | Refusal | None]) -> None:
    if not future.done():
        future.set_result(None)
