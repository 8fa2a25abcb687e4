"""One lease of :class:`~proxy.budget.local_slots.LocalSlots`: the slots a single write-ahead
row reserved, handed out by this process until the lease ends. Pure data."""

from __future__ import annotations

import dataclasses

__all__ = ["LEASE_SECONDS", "Lease", "next_length"]

LEASE_SECONDS = 0.25  # how long a first lease lasts, and the shortest any lasts
# A quiet credential's lease lasts longer (doubling while a lease hands out fewer than
# LEASE_WANT slots before its end, halving back while one runs out with twice that), up
# to LEASE_MAX_SECONDS and 1/LEASE_WINDOW_FRACTION of the shortest window: one of hundreds
# of keys then shares a row among its sends, as a busy key does.
LEASE_WANT = 16
LEASE_MAX_SECONDS = 4.0
LEASE_WINDOW_FRACTION = 16


@dataclasses.dataclass(slots=True, eq=False)
class Lease:
    """Slots reserved by one write-ahead row: ``left`` of them may still go until ``at``;
    ``size``: how many the row reserved (``left`` at first, plus the one taken with it)."""

    at: float
    left: int
    size: int = dataclasses.field(init=False)
    cls: str = ""  # the class its row records every slot of it under
    seconds: float = LEASE_SECONDS  # how long it lasts (``at`` is its end)

    def __post_init__(self) -> None:
        self.size = self.left + 1

    @property
    def used(self) -> int:
        return self.size - self.left


def next_length(lease: Lease, ended: bool, shortest_window: float) -> float:
    """How long the next lease lasts, after ``lease`` (``ended``: it lasted its length; else
    it ran out of slots first). Twice as long after one that handed out fewer than
    ``LEASE_WANT`` slots in its length, half as long after one that ran out with twice
    that many, else as long; between ``LEASE_SECONDS`` and the longest allowed."""
    longest = max(LEASE_SECONDS, min(LEASE_MAX_SECONDS, shortest_window / LEASE_WINDOW_FRACTION))
    seconds = lease.seconds
    if ended and lease.used < LEASE_WANT:
        seconds *= 2
    elif not ended and lease.used >= 2 * LEASE_WANT:
        seconds /= 2
    return max(LEASE_SECONDS, min(seconds, longest))
