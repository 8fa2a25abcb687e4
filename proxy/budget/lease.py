"""One lease of :class:`~proxy.budget.local_slots.LocalSlots`: the slots a single write-ahead
row reserved, handed out by this process until the lease ends. Pure data."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["LEASE_SECONDS", "Lease", "block_size", "lease_end", "next_length"]

LEASE_SECONDS = 0.25  # how long a first lease lasts, and the shortest any lasts
# A quiet credential's lease lasts longer (doubling while a lease hands out fewer than
# LEASE_WANT slots before its end, halving back while one runs out with twice that), up
# to LEASE_MAX_SECONDS and 1/LEASE_WINDOW_FRACTION of the shortest window: one of hundreds
# of keys then shares a row among its sends, as a busy key does.
LEASE_WANT = 16
LEASE_FRACTION = 16  # a block is at most 1/16 of what the tightest window has free
LEASE_MIN = 16  # smaller blocks are not worth it: a row per send (>= 256 free to lease)
# A block is at most twice what the last one handed out: a credential with little traffic
# of its own (one of hundreds of keys) does not reserve 256 slots per send.
LEASE_GROWTH = 2
# A block is at most 1/16 of what is free (LEASE_FRACTION), so however long a lease lasts,
# what it counts longer than echowin does is a few slots far from every limit; its length
# bounds for how long (and, after a crash mid-lease, how long the whole block stays counted).
LEASE_MAX_SECONDS = 16.0
LEASE_WINDOW_FRACTION = 4


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

    def idle_after(self, now: float, idle: float) -> float:
        """Seconds from ``now``, when it was taken, until an idle process gives back its
        unused slots: ``idle`` after a first lease's end, and as much later as this one
        ends later (its length, and its end moved past the newest send: ``lease_end``)."""
        late = min(max(0.0, self.at - now - self.seconds), LEASE_MAX_SECONDS)
        return idle + self.seconds + late - LEASE_SECONDS


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


def block_size(free: int, block_max: int, demand: int | None) -> int:
    """How many slots one row reserves with ``free`` slots free (the fewest any window has,
    or what the classes' reservations leave): 1 near any limit, up to ``block_max`` far,
    and at most ``LEASE_GROWTH`` times what the last lease handed out (``demand``; at
    least 2). A credential with a few sends per lease then reserves a few, not
    ``block_max``, per row (every slot reserved is recorded, and released if unused, in
    each window); a busy one doubles its block from lease to lease, back to ``block_max``."""
    block = min(block_max, free // LEASE_FRACTION)
    if block < LEASE_MIN:
        return 1
    if demand is not None:
        block = min(block, max(2, LEASE_GROWTH * demand))
    return block


def lease_end(now: float, seconds: float, newest: float) -> float:
    """Where a new lease's row records its slots: its end, ``now + seconds``, or just after
    ``newest``, the newest send already recorded, when that is later (a shorter lease after
    a longer one, by at most the longest lease). Recorded later than any of its slots can
    leave, each counts a little longer: safe. Recorded before sends already in the log,
    each of its slots would be an insertion into the middle of every window's log
    (``WindowLog.add``: 2.8 µs in a log of 100,000 sends, an append 0.05), and with large
    limits a log holds an hour of sends. Further ahead than the longest lease, the newest
    send is a step back of the clock: left as it is."""
    at = now + seconds
    if at < newest <= at + LEASE_MAX_SECONDS:
        at = math.nextafter(newest, math.inf)  # not the last lease's own ``at``
    return at
