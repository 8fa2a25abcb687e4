"""One limit's log of sends, and the reach of planned sends: what
:class:`~proxy.budget.windows.CredentialBudget` is made of.

Pure (no I/O, no event loop). Times are wall-clock seconds as floats; a window's ``span`` is
its ``per_seconds`` plus the budget's guard, seconds.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.budget.windows import Limit

__all__ = ["Entry", "Reach", "WindowLog", "entry_time"]

Entry = tuple[float, bool]
"""One send in a window's log: (send time in seconds, sent by someone else)."""


def entry_time(entry: Entry) -> float:
    return entry[0]


class Reach:
    """``reach(m)``: the least time, in seconds, that the limits alone put between planned
    sends ``i`` and ``i + m`` of any schedule. Planned send ``i + N`` of a window comes at
    least ``span`` after send ``i``, so ``reach(m)`` is the most ``sum(a_w * span_w)`` with
    ``sum(a_w * N_w) <= m`` (a knapsack over the windows): 0 below the smallest ``N``.

    A step function of ``m``, kept as its steps (``at``, strictly increasing from 0) and
    the value from each step on (``value``), extended on demand and never invalidated: it
    depends on the limits and the guard only."""

    __slots__ = ("at", "value", "windows")

    def __init__(self, windows: Sequence[tuple[int, float]]) -> None:
        self.windows = tuple(windows)  # (N, span) per limit
        self.at: list[int] = [0]
        self.value: list[float] = [0.0]

    def __call__(self, m: int) -> float:
        """``reach(m)`` for ``0 <= m <= at[-1]``."""
        return self.value[bisect.bisect_right(self.at, m) - 1]

    def extend(self, m: int, cap: float) -> bool:
        """Know every step up to ``m``; False, stopping early, once a step at or before
        ``m`` is known to pass ``cap`` (``reach(m)`` then does too). O(len(limits) log n)
        per step added."""
        at, value = self.at, self.value
        while at[-1] < m:
            if value[-1] > cap:
                return False
            self._add_step()
        return True

    def _add_step(self) -> None:
        # reach(m) = max(reach(m - 1), max over windows of reach(m - N) + span): the next
        # step is the first m at which some window's term beats the current value.
        at, value = self.at, self.value
        last, current = at[-1], value[-1]
        step = min(self._first_beating(n, span, current) for n, span in self.windows)
        step = max(step, last + 1)
        best = current
        for n, span in self.windows:
            if step >= n:
                best = max(best, self(step - n) + span)
        at.append(step)
        value.append(best)

    def _first_beating(self, n: int, span: float, current: float) -> int:
        """The least ``m`` with ``reach(m - n) + span > current`` (``current`` is the last
        value, so such an ``m - n`` is at or before the last step)."""
        value = self.value
        i = bisect.bisect_right(value, current - span)
        # Compare as the recurrence adds: float subtraction may round the other way.
        while i < len(value) and value[i] + span <= current:
            i += 1
        while i > 0 and value[i - 1] + span > current:
            i -= 1
        return self.at[i] + n if i < len(value) else self.at[-1] + 1 + n

    def stretches(self, lo: int, hi: int) -> Iterator[tuple[int, float]]:
        """``(m, reach(m))`` for ``m = lo`` and each step in ``(lo, hi]``: the first ``m``
        of every flat stretch that meets ``[lo, hi]``. Needs ``hi <= at[-1]``."""
        at, value = self.at, self.value
        i = bisect.bisect_right(at, lo)
        yield lo, value[i - 1]
        while i < len(at) and at[i] <= hi:
            yield at[i], value[i]
            i += 1


class WindowLog:
    """One limit's log: every send still counting in it, oldest first, ours and external.

    The log is not cut to the newest ``N`` entries: ``release`` can remove one of those,
    and an older entry that a cut had dropped would then be missing from the count.
    Pruning alone keeps it bounded (about ``N`` own sends plus ``N`` external ones).
    """

    __slots__ = ("entries", "external", "limit", "span")

    def __init__(self, limit: Limit, guard: float) -> None:
        self.limit = limit
        self.span = limit.per_seconds + guard  # how long a send counts, seconds
        self.entries: deque[Entry] = deque()
        self.external = 0

    def prune(self, now: float) -> None:
        entries = self.entries
        while entries and entries[0][0] + self.span <= now:
            if entries.popleft()[1]:
                self.external -= 1

    def add(self, entry: Entry) -> None:
        if not self.entries or entry[0] >= self.entries[-1][0]:
            self.entries.append(entry)
        else:  # before the newest (a step back of the clock, a row of another process, a
            # late answer moved): keep the log sorted so expiry stays a prefix
            bisect.insort(self.entries, entry, key=entry_time)
        self.external += entry[1]

    def remove_own(self, at: float) -> bool:
        entries = self.entries
        # Releases are of recent sends: search from the newest end and stop early.
        for i in range(len(entries) - 1, -1, -1):
            when, external = entries[i]
            if when < at:
                break
            if when == at and not external:
                del entries[i]
                return True
        return False

    def frees_at(self) -> float:
        """Earliest time this window admits one more send; -inf if it has room now."""
        rank = len(self.entries) - self.limit.requests
        if rank < 0:
            return -math.inf
        # That send must have stopped counting: the (rank + 1)-th oldest of all.
        return self.entries[rank][0] + self.span

    def latest_feed(self, k: int, reach: Reach) -> float:
        """The latest time this window's log alone forces on planned send ``k`` (0-based, all
        planned sends after every logged one): -inf if none of its entries binds it.

        Planned send ``i`` must wait for the entry ``N - i`` places from the newest to stop
        counting, and every later planned send at least ``reach(m)`` more after that: so the
        ``j``-th newest entry (``j < N``) forces ``entries[-1 - j] + span + reach(k - N + 1 + j)``.
        Within a stretch of ``m`` where ``reach`` is flat the newest entry forces the most,
        so only the first ``j`` of each stretch is looked at: O(1 + steps of ``reach`` in a
        range of ``N``) lookups, whatever ``k`` is."""
        entries, n = self.entries, self.limit.requests
        base = k - n + 1  # m = base + j
        j_lo, j_hi = max(0, -base), min(len(entries), n) - 1
        if j_lo > j_hi:
            return -math.inf
        last = len(entries) - 1
        best = -math.inf
        for m, gap in reach.stretches(base + j_lo, base + j_hi):
            best = max(best, entries[last - (m - base)][0] + self.span + gap)
        return best
