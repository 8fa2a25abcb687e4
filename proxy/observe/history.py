"""The last hour, minute by minute, for the status page: sends per minute counted from the
budget's own send log at render time, and the deepest queue seen in each minute.

Pure (no I/O, no event loop): times are wall-clock seconds passed in. Minutes are
wall-clock minutes (``floor(t / 60)``), oldest first; the last is the minute of ``now``,
so far.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable

__all__ = ["MINUTES", "QueueHistory", "first_minute", "sends_per_minute"]

MINUTES = 60
"""How many minutes the history shows: the current one and the 59 before it."""


def _minute(t: float) -> int:
    return math.floor(t / 60)


def first_minute(now: float, minutes: int = MINUTES) -> int:
    """Start of the oldest minute shown at ``now``, in seconds since the epoch."""
    return (_minute(now) - minutes + 1) * 60


def sends_per_minute(
    times: Iterable[float], now: float, known_since: float, minutes: int = MINUTES
) -> list[int | None]:
    """Sends in each of the last ``minutes`` minutes, oldest first, from the send times
    the budget holds (``CredentialBudget.counted``). ``known_since``: the oldest moment
    the log still covers (``now`` minus its longest window); a minute that ended by then
    is None (not known), not 0, and the minute it falls in may be partly counted (only
    with windows shorter than the hour shown). A send stamped after ``now`` (a lease's
    block is recorded at its end, a fraction of a second ahead) counts in the current
    minute. One sort (linear on the budget's times, oldest first already), then a search
    per minute: a key's hour of sends costs no Python step per send."""
    last = _minute(now)
    first = last - minutes + 1
    ordered = sorted(times)
    counts: list[int | None] = []
    lo = bisect.bisect_left(ordered, first, key=_minute)
    for minute in range(first, last + 1):
        hi = (
            len(ordered)
            if minute == last
            else bisect.bisect_left(ordered, minute + 1, lo, key=_minute)
        )
        counts.append(None if (minute + 1) * 60 <= known_since else hi - lo)
        lo = hi
    return counts


class QueueHistory:
    """Per credential, the most requests seen waiting in each of the last ``minutes``
    minutes, from samples (a periodic task reads each lane's depth: nothing is added to a
    request's path). A minute without a sample (before the process started) is None.

    Bounded: ``minutes`` entries per credential."""

    __slots__ = ("_minutes", "_rings")

    def __init__(self, minutes: int = MINUTES) -> None:
        self._minutes = minutes
        self._rings: dict[str, deque[list[int]]] = {}  # [minute, most seen], oldest first

    def sample(self, credential: str, now: float, depth: int) -> None:
        """``depth`` requests wait for ``credential`` at ``now``."""
        ring = self._rings.get(credential)
        if ring is None:
            ring = self._rings[credential] = deque(maxlen=self._minutes)
        minute = _minute(now)
        if ring and ring[-1][0] >= minute:  # same minute (or the clock stepped back)
            ring[-1][1] = max(ring[-1][1], depth)
        else:
            ring.append([minute, depth])

    def series(self, credential: str, now: float) -> list[int | None]:
        """The most seen per minute, oldest first, aligned with ``sends_per_minute``."""
        first = _minute(now) - self._minutes + 1
        out: list[int | None] = [None] * self._minutes
        for minute, most in self._rings.get(credential, ()):
            if 0 <= minute - first < self._minutes:
                out[minute - first] = most
        return out
