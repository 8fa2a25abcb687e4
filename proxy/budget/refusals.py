"""What a lane refuses a new request at once: a full queue, or a predicted wait past the
request's ``max_wait`` (the budget, or echowin's freeze). Times are wall-clock seconds.

A refusal with nobody queued is remembered with what it was predicted from, so that a flood
of arrivals the budget would refuse anyway is refused again without predicting again.
"""

from __future__ import annotations

from typing import Any, Protocol

from proxy.auth.tokens import TokenRecord
from proxy.budget.admission import Refusal
from proxy.budget.class_queue import ClassQueue
from proxy.budget.classes import ClassBook
from proxy.budget.fairness import FairQueue
from proxy.budget.slots import SlotSource
from proxy.errors import Reason

__all__ = ["LaneState", "Refusals"]

# What a remembered refusal was predicted from: (lane's version, source's changes, a
# calibration probe out, the state healthy). The counters only grow; health may return.
# With classes of service, the class too: when the budget frees for a request depends on it.
_Basis = tuple[int, int, bool, bool, str | None]


class QueueBounds(Protocol):
    """The lanes' queue bounds (``proxy.budget.lane.QueuePolicy``)."""

    max_depth: int
    max_depth_per_token: int
    waiting: int


class LaneState(Protocol):
    """What the refusals read of their lane (``proxy.budget.lane.Lane``)."""

    @property
    def source(self) -> SlotSource: ...
    @property
    def policy(self) -> QueueBounds: ...
    @property
    def version(self) -> int: ...
    @property
    def probing(self) -> bool: ...
    @property
    def queue(self) -> FairQueue[Any] | ClassQueue[Any]: ...
    @property
    def classes(self) -> ClassBook | None: ...

    def predicted_wait(self, now: float, token: TokenRecord, horizon: float | None) -> float:
        """Seconds until a new request of ``token`` would be served, given who waits."""


class Refusals:
    """One lane's refusals of new requests. ``cached``: the last prediction made with
    nobody queued (what it was made from, when the budget frees, the freeze then), or
    None."""

    __slots__ = ("cached", "lane")

    def __init__(self, lane: LaneState) -> None:
        self.lane = lane
        self.cached: tuple[_Basis, float, float | None] | None = None

    def _basis(self, token: TokenRecord) -> _Basis:
        lane = self.lane
        cls = None if lane.classes is None else lane.classes.resolve(token.service_class)
        return (lane.version, lane.source.changes, lane.probing, lane.source.healthy, cls)

    def known(self, now: float, token: TokenRecord, max_wait: float) -> Refusal | None:
        """With nobody queued and nothing changed since the last refusal, the budget frees
        at the same moment: refuse again without asking it (a flood of refused requests).
        None when that refusal is out of date, or the request can wait that long."""
        known = self.cached
        if known is None or known[0] != self._basis(token):
            self.cached = None
            return None
        _, free_at, frozen = known
        if free_at - now <= max_wait:
            return None
        return self.queue_full(token) or _refusal(now, free_at - now, frozen, max_wait)

    def queue_full(self, token: TokenRecord) -> Refusal | None:
        """``queue_full`` when every lane's queues together, or the token's, are full."""
        policy = self.lane.policy
        queue = self.lane.queue.tokens.get(token.id)
        if policy.waiting >= policy.max_depth or (
            queue is not None and len(queue.waiters) >= policy.max_depth_per_token
        ):
            return Refusal(Reason.QUEUE_FULL, 1.0, "Too many requests are waiting; try again later")
        return None

    def for_new(self, now: float, token: TokenRecord, max_wait: float) -> Refusal | None:
        """The refusal of a new request of ``token`` that would wait past ``max_wait``
        behind who waits now (remembered when nobody waits), else None: it may queue."""
        full = self.queue_full(token)
        if full is not None:
            return full
        lane = self.lane
        frozen = lane.source.frozen_until(now)
        # One prediction, without a horizon: a refusal needs the whole wait for Retry-After.
        wait = lane.predicted_wait(now, token, None)
        if lane.queue.depth == 0:  # the moment the budget frees, as long as nothing changes
            self.cached = (self._basis(token), now + wait, frozen)
        if wait <= max_wait:
            return None
        return _refusal(now, wait, frozen, max_wait)


def _refusal(now: float, wait: float, frozen: float | None, max_wait: float) -> Refusal:
    if frozen is not None and frozen - now > max_wait:
        # ``wait`` covers the freeze and what the budget holds after it (a 429 that said
        # the window is spent): the client is not refused again when it comes back.
        return Refusal(
            Reason.UPSTREAM_FROZEN,
            max(wait, frozen - now),
            "echowin asked us to pause; try again later",
        )
    return Refusal(
        Reason.UPSTREAM_BUDGET, max(wait, 1.0), "Rate limit exceeded. Please try again later."
    )
