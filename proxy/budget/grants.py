"""What a lane hands out: a queued request's place (:class:`Waiter`), a place taken before
the request's handler runs (:class:`Hold`), and a reserved send slot (:class:`SlotGrant`).
Times are wall-clock seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from proxy.auth.tokens import TokenRecord
from proxy.budget.admission import Refusal
from proxy.budget.quotas import TokenCharge
from proxy.budget.slots import Slot

__all__ = ["Hold", "LaneSide", "SlotGrant", "Waiter", "settled"]


class LaneSide(Protocol):
    """What grants and holds tell the lane that made them (``proxy.budget.lane.Lane``)."""

    def on_response(self, grant: SlotGrant, status: int, headers: Mapping[str, str]) -> None:
        """echowin answered ``grant``'s send."""

    def give_back(self, slot: Slot) -> None:
        """``slot``'s request never reached echowin."""

    def leave(self, waiter: Waiter) -> None:
        """``waiter``'s request gives its place up."""


@dataclass(slots=True, eq=False)
class Waiter:
    """One request queued in a lane, until ``deadline`` (seconds; queued at ``since``).

    ``future`` is settled by the lane's pump (a grant), by a refusal for everyone (a freeze,
    the state gone, shutting down), or with None by ``timer`` when the wait is over. One
    timer handle per waiter: asyncio.timeout would add a Timeout, its handle and a
    cancellation of the task (docs/performance.md#memory)."""

    token: TokenRecord
    deadline: float
    future: asyncio.Future[SlotGrant | Refusal | None]
    timer: asyncio.TimerHandle
    since: float


def settled(waiter: Waiter) -> SlotGrant | Refusal | None:
    """The waiter's result if it was settled before the wait ended, else None."""
    future = waiter.future
    if future.done() and not future.cancelled():
        return future.result()
    return None


class SlotGrant:
    """One reserved send slot. Exactly one of ``sent`` / ``unsent`` takes effect; after
    either, the other is a no-op. ``queued_seconds``: how long the request waited for it."""

    __slots__ = ("_done", "lane", "queued_seconds", "quota", "slot")

    def __init__(self, lane: LaneSide, slot: Slot) -> None:
        self.lane = lane
        self.slot = slot
        self.queued_seconds = 0.0
        # The token's own quota and when it was charged, refunded with the slot.
        self.quota: TokenCharge | None = None
        self._done = False

    @property
    def at(self) -> float:
        """When the slot's send counts from (seconds)."""
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
    """A request queued by ``Scheduler.hold`` before its handler runs: its place in its
    lane's queue, until ``admit`` takes it over or ``release`` gives it up."""

    __slots__ = ("lane", "waiter")

    def __init__(self, lane: LaneSide, waiter: Waiter) -> None:
        self.lane = lane
        self.waiter: Waiter | None = waiter

    @property
    def future(self) -> asyncio.Future[SlotGrant | Refusal | None]:
        """Done when the wait is: a slot granted, a refusal, or the wait over (None)."""
        assert self.waiter is not None
        return self.waiter.future

    @property
    def granted(self) -> bool:
        return self.waiter is not None and isinstance(settled(self.waiter), SlotGrant)

    def take(self, lane: LaneSide, token: TokenRecord) -> Waiter | None:
        """The waiter, for ``lane.admit`` to await, if it was queued for ``token`` in
        ``lane`` (else given up: the request is admitted anew)."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None and (lane is not self.lane or waiter.token.id != token.id):
            self.lane.leave(waiter)
            return None
        return waiter

    def release(self) -> None:
        """Never taken (the caller left, or was answered before admission): leave the
        queue, or give back the slot already granted."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            self.lane.leave(waiter)
