"""The simulator's rolling windows (pure: no I/O, time passed in as ``now``, in seconds).

echowin counts a send at ``t`` against every window until ``t + per_seconds``; a key is
served only while every one of its windows has room.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass

__all__ = ["KeyBudget", "Quota", "SimLimit", "Window", "parse_limit"]


@dataclass(frozen=True, slots=True)
class SimLimit:
    """At most ``requests`` sends per key in any rolling window of ``per_seconds`` seconds."""

    requests: int
    per_seconds: float

    def __post_init__(self) -> None:
        if isinstance(self.requests, bool) or not isinstance(self.requests, int):
            raise ValueError(f"limit requests must be an integer, got {self.requests!r}")
        if self.requests < 1:
            raise ValueError(f"limit requests must be >= 1, got {self.requests}")
        if not (math.isfinite(self.per_seconds) and self.per_seconds > 0):
            raise ValueError(f"limit per_seconds must be finite and > 0, got {self.per_seconds}")


def parse_limit(text: str) -> SimLimit:
    """Parse ``REQUESTS/SECONDS`` (e.g. ``"1000/3600"``); ValueError names the bad text."""
    requests_text, slash, seconds_text = text.strip().partition("/")
    try:
        if not slash:
            raise ValueError("no '/'")
        return SimLimit(int(requests_text), float(seconds_text))
    except ValueError as exc:
        raise ValueError(
            f"invalid limit {text!r}: expected REQUESTS/SECONDS such as 1000/3600 ({exc})"
        ) from None


@dataclass(frozen=True, slots=True)
class Quota:
    """What the rate-limit headers report; ``reset_at`` is on the simulator's clock."""

    limit: int
    remaining: int
    reset_at: float


class Window:
    """Arrival times of counted sends inside one rolling window, oldest first.

    A send at ``t`` counts until ``t + per_seconds`` exactly. Only the newest ``requests``
    times are kept: admission and headers depend on no others, so memory stays bounded even
    when ``spend`` records more sends than the limit allows.
    """

    __slots__ = ("limit", "sends")

    def __init__(self, limit: SimLimit) -> None:
        self.limit = limit
        self.sends: deque[float] = deque(maxlen=limit.requests)

    def prune(self, now: float) -> None:
        sends, per = self.sends, self.limit.per_seconds
        while sends and sends[0] + per <= now:
            sends.popleft()

    def remaining(self) -> int:
        return self.limit.requests - len(self.sends)

    def frees_at(self, now: float) -> float:
        """When the oldest counted send leaves (``now`` if none is counted)."""
        return self.sends[0] + self.limit.per_seconds if self.sends else now


class KeyBudget:
    """Every configured window of one key; each method prunes at ``now`` first."""

    __slots__ = ("_longest_index", "_windows")

    def __init__(self, limits: tuple[SimLimit, ...]) -> None:
        self._windows = tuple(Window(limit) for limit in limits)
        self._longest_index = max(range(len(limits)), key=lambda i: limits[i].per_seconds)

    def admit(self, now: float) -> float | None:
        """Count a send at ``now`` if every window has room, returning None; otherwise count
        nothing (echowin counts only what it serves) and return seconds until all have room."""
        self._prune(now)
        full = [w for w in self._windows if w.remaining() <= 0]
        if full:
            return max(w.frees_at(now) for w in full) - now
        for window in self._windows:
            window.sends.append(now)
        return None

    def spend(self, now: float, n: int) -> None:
        """Count ``n`` sends at ``now``, limits notwithstanding (another client's traffic)."""
        self._prune(now)
        for window in self._windows:
            window.sends.extend(itertools.repeat(now, min(n, window.limit.requests)))

    def quota(self, now: float, tightest: bool) -> Quota:
        """Limit of the longest window ("per hour", as echowin documents X-RateLimit-Limit);
        remaining and reset of that window, or with ``tightest`` of the one with fewest left."""
        self._prune(now)
        longest = self._windows[self._longest_index]
        shown = longest
        if tightest:
            shown = min(self._windows, key=lambda w: (w.remaining(), -w.frees_at(now)))
        return Quota(longest.limit.requests, shown.remaining(), shown.frees_at(now))

    def _prune(self, now: float) -> None:
        for window in self._windows:
            window.prune(now)
