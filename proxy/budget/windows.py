"""The upstream budget of one echowin credential: its send log and the decisions made from it.

Pure core (STYLE: "clock passed in"): no I/O, no asyncio, no locks. Every method takes
``now``, wall-clock seconds as a float; every duration is in seconds. A caller that shares
one budget between tasks must not interleave a decision with its record (``try_record``
does both in one call, so that is the only way to spend).

Counting rule (SPEC §3.1). echowin enforces several limits ``(N, T)`` at once as rolling
windows measured at its arrival clock. To absorb network jitter each window is padded by
``guard``: a send recorded at ``s`` counts in window ``(N, T)`` while ``now < s + T + guard``
and stops counting at exactly ``s + T + guard``. A send at ``now`` is allowed iff every
window counts fewer than ``N`` sends. So no half-open interval of length ``T + guard``
ever holds more than ``N`` recorded sends, and if each send reaches echowin after a delay
in ``[d, d + guard]``, no interval of length ``T`` of echowin's clock holds more than ``N``.

Clock steps. Timestamps later than ``now`` (the wall clock stepped back) keep counting
until they expire at their own ``s + T + guard``: the real time elapsed since such a send
is longer than it looks, so this errs on the safe side.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from proxy.budget.ratelimit_headers import tighter
from proxy.budget.window_log import Reach, WindowLog, entry_time

__all__ = ["CredentialBudget", "Limit", "WindowView"]


def _check_time(value: float, name: str = "now") -> None:
    # A NaN would compare false everywhere and silently disable the cap.
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``requests`` sends in any rolling window of ``per_seconds`` seconds."""

    requests: int
    per_seconds: float

    def __post_init__(self) -> None:
        if isinstance(self.requests, bool) or not isinstance(self.requests, int):
            raise ValueError(f"requests must be an integer, got {self.requests!r}")
        if self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if not (math.isfinite(self.per_seconds) and self.per_seconds > 0):
            raise ValueError(f"per_seconds must be a finite number > 0, got {self.per_seconds!r}")


class WindowView(NamedTuple):
    """One window at one moment, for headers, metrics and /admin/budget (a NamedTuple: one
    is made per window for every answer's rate-limit fields)."""

    requests: int
    per_seconds: float
    used: int  # sends counting now, ours and external
    remaining: int  # requests - used, never below 0
    reset_in: float  # seconds until the oldest counting send stops counting (0 if none)
    external: int  # how many of ``used`` someone else spent (learnt from echowin)


class CredentialBudget:
    """The send log of one credential and the decisions made from it.

    ``try_record`` is the hard cap. Views and decisions prune expired sends lazily at the
    ``now`` they are given; ``now`` should not go backwards (see the module docstring).
    """

    __slots__ = ("_frozen", "_guard", "_limits", "_longest", "_reach", "_windows")

    def __init__(self, limits: Sequence[Limit], guard: float = 0.25) -> None:
        """``guard``: seconds added to every window for network jitter (>= 0).

        Raises ValueError on no limits, a non-Limit, or a bad guard."""
        self._limits = tuple(limits)
        if not self._limits:
            raise ValueError("at least one limit is required")
        if not all(isinstance(limit, Limit) for limit in self._limits):
            raise ValueError("limits must be Limit instances")
        if not (math.isfinite(guard) and guard >= 0):
            raise ValueError(f"guard must be a finite number >= 0, got {guard!r}")
        self._guard = float(guard)
        self._windows = tuple(WindowLog(limit, self._guard) for limit in self._limits)
        spans = [window.span for window in self._windows]
        self._longest = spans.index(max(spans))  # holds every own send any window counts
        self._reach = Reach([(w.limit.requests, w.span) for w in self._windows])
        self._frozen: float | None = None

    @property
    def limits(self) -> tuple[Limit, ...]:
        return self._limits

    @property
    def guard(self) -> float:
        return self._guard

    # --- decisions ---------------------------------------------------------------------

    def wait_time(self, now: float) -> float:
        """Seconds from ``now`` until one send is allowed: 0.0 if it is allowed at ``now``.
        Includes a freeze."""
        self._prune(now)
        return self._earliest(now) - now

    def try_record(self, now: float) -> bool:
        """Record a send at ``now`` and return True if one is allowed; else record nothing
        (a refused attempt never eats budget) and return False. O(len(limits)) amortised."""
        if self.wait_time(now) > 0:
            return False
        entry = (now, False)
        for window in self._windows:
            window.add(entry)
        return True

    def record(self, at: float) -> None:
        """Record a send at ``at`` without checking: one that a shared backend (Redis)
        already admitted, or a fallback's extra weight. Never the way to decide a send."""
        _check_time(at, "at")
        entry = (at, False)
        for window in self._windows:
            window.add(entry)

    def release(self, at: float) -> bool:
        """Give back one own send recorded at ``at`` (it never left: no byte reached
        echowin). Removes one such entry from every window still holding it; True if found.
        Searches from the newest end: O(sends since ``at``) per window."""
        found = False
        for window in self._windows:
            found = window.remove_own(at) or found
        return found

    def move(self, at: float, to: float) -> None:
        """One own send recorded at ``at`` counts from ``to`` instead (its answer came late);
        recorded at ``to`` even when no window counts it at ``at`` any more."""
        self.release(at)
        self.record(to)

    def predict_wait(self, now: float, ahead: int, horizon: float | None = None) -> float:
        """Seconds from ``now`` until a send with ``ahead`` others queued before it could go,
        if they all go as early as every window and the freeze allow (greedy earliest
        schedule, which no schedule beats). ``ahead=0`` equals ``wait_time(now)``.

        With ``horizon`` (seconds), returns math.inf when the predicted wait exceeds it.
        The cost does not grow with ``ahead``: O(len(limits) * (1 + s) * log n) lookups,
        where ``s`` is the number of steps the limits' combined reach (see ``Reach``) takes
        over ``N`` planned sends: at most ``N``, and ``N / min(N)`` when every ``N`` divides
        the larger ones (echowin's 1000/h and 100/min: 10). Once per budget, the reach is
        worked out up to the largest ``ahead`` asked for (at most as far as ``horizon``
        lets a send go). Room in every window for the whole queue: O(len(limits)). Else a
        log with sends later than ``now`` (an open lease's, a step back of the clock) is
        replayed instead: O(ahead * len(limits)), and a copy of each log."""
        if ahead < 0:
            raise ValueError(f"ahead must be >= 0, got {ahead}")
        self._prune(now)
        start = now if self._frozen is None else max(now, self._frozen)
        if all(len(w.entries) + ahead < w.limit.requests for w in self._windows):
            # Room in every window for all ``ahead + 1``: they all go at ``start``, sends
            # logged after ``now`` (an open lease's) or not. O(len(limits)): far from every
            # limit a replay would copy each window's log (an hour of sends) to say so.
            wait = start - now
            return math.inf if horizon is not None and wait > horizon else wait
        if any(w.entries and w.entries[-1][0] > now for w in self._windows):
            return self._replay(now, ahead, horizon)
        # Greedy, planned send k goes at max(send k - 1, send k - N + span per window), where
        # "send k - N" is a logged entry while k < N: only max and + span, so send k is the
        # latest of every chain of such constraints that ends at it. A chain starts at
        # ``start`` or at a logged entry, and the planned sends it passes can add at most
        # ``reach(gap)``: so send k comes at the latest of ``start + reach(k)`` and what
        # each window's entries force (``WindowLog.latest_feed``), with no walk over 0..k.
        reach = self._reach
        if not reach.extend(ahead, math.inf if horizon is None else horizon - (start - now)):
            assert horizon is not None
            if start + reach.value[-1] - now > horizon:
                return math.inf
            reach.extend(ahead, math.inf)  # a rounding ulp away from the horizon
        at = start + reach(ahead)
        for window in self._windows:
            at = max(at, window.latest_feed(ahead, reach))
        if horizon is not None and at - now > horizon:
            return math.inf
        return at - now

    # --- what echowin tells us ---------------------------------------------------------

    def observe(
        self, now: float, *, limit: int | None, remaining: int | None, sent_count: int | None
    ) -> None:
        """Learn from X-RateLimit-Limit/-Remaining on echowin's answer to one of our sends.

        ``sent_count``: OUR OWN sends in the window the header describes at the moment that
        send was recorded, itself included: ``own_count(now, window_index(limit))`` captured
        right after ``try_record``. If echowin counts more (``limit - remaining``), someone
        else spends this key: that window gets external sends at ``now`` (the latest they
        can have happened, so they count longest) up to the excess, less the external ones
        it already counts, at most ``N`` per call. Only ever adds; never touches our own
        sends. A None, negative or inconsistent value makes the whole call a no-op."""
        if limit is None or remaining is None or sent_count is None:
            return
        if limit < 1 or not 0 <= remaining <= limit or sent_count < 0:
            return
        self._prune(now)
        window = self._windows[self.window_index(limit)]
        unseen = (limit - remaining) - sent_count - window.external
        self._add_external(window, now, min(unseen, window.limit.requests))

    def assume_external(self, now: float, used: int) -> None:
        """After a restart without a send log: echowin says ``used`` sends count in its
        longest window and we cannot tell when they happened. Worst case, they all just
        happened, so EVERY window is topped up to ``min(used, N)`` with external sends at
        ``now``: each window then blocks as if they were its newest. Negative is a no-op."""
        self._prune(now)
        for window in self._windows:
            wanted = min(used, window.limit.requests) - len(window.entries)
            self._add_external(window, now, wanted)

    def freeze(self, until: float) -> None:
        """An unexpected upstream 429: no send before ``until`` (wall-clock seconds). An
        earlier freeze never shortens a later one."""
        _check_time(until, "until")
        if self._frozen is None or until > self._frozen:
            self._frozen = until

    def frozen_until(self, now: float) -> float | None:
        """When the freeze ends, or None if no freeze holds at ``now``."""
        if self._frozen is not None and now < self._frozen:
            return self._frozen
        return None

    # --- views -------------------------------------------------------------------------

    def window_index(self, limit: int | None) -> int:
        """The window an X-RateLimit-Limit value describes: the first whose ``requests``
        equals it, else the longest (echowin documents the header as its hourly limit)."""
        for index, window in enumerate(self._windows):
            if window.limit.requests == limit:
                return index
        return self._longest

    def count(self, now: float, index: int) -> int:
        """Sends, ours and external, counting in window ``index`` at ``now``."""
        self._prune(now)
        return len(self._windows[index].entries)

    def own_count(self, now: float, index: int) -> int:
        """Our own sends counting in window ``index`` at ``now`` (for ``observe``)."""
        self._prune(now)
        window = self._windows[index]
        return len(window.entries) - window.external

    def times(self, index: int) -> list[float]:
        """The times of the sends window ``index`` holds (ours and external; as last
        pruned), for :class:`~proxy.budget.classes.ClassBook`'s waits."""
        return [at for at, _ in self._windows[index].entries]

    def newest(self) -> float:
        """The latest send time any window holds, ours or external (-inf if none): a send
        recorded at or after it is appended to every window's log, in O(1)."""
        return max((w.entries[-1][0] for w in self._windows if w.entries), default=-math.inf)

    def remaining(self, now: float, index: int) -> int:
        """``N - count``, never below 0."""
        return max(0, self._windows[index].limit.requests - self.count(now, index))

    def reset_at(self, now: float, index: int) -> float:
        """When the oldest send in window ``index`` stops counting; ``now`` if none counts."""
        self._prune(now)
        entries = self._windows[index].entries
        return entries[0][0] + self._windows[index].span if entries else now

    def snapshot(self, now: float, unused: int = 0) -> list[WindowView]:
        """Every window at ``now``, in the order of ``limits``; ``unused`` of the sends in
        each are reserved but not spent (an open lease's), and shown as free."""
        self._prune(now)
        return [self._view(now, index, unused) for index in range(len(self._windows))]

    def tightest(self, now: float, unused: int = 0) -> tuple[int, int, list[float]]:
        """What the caller's rate-limit fields take from ``snapshot(now, unused)``, without
        making it (they are made for every answer): the index of the tightest window (see
        ``tighter``), its remaining, and every window's ``reset_in`` in order. The same
        numbers as ``_view``'s."""
        self._prune(now)
        tight, fewest, latest = 0, 0, 0.0
        resets = []
        for index, window in enumerate(self._windows):
            entries = window.entries
            remaining = max(0, window.limit.requests - max(0, len(entries) - unused))
            reset_in = entries[0][0] + window.span - now if entries else 0.0
            resets.append(reset_in)
            if index == 0 or tighter(remaining, reset_in, fewest, latest):
                tight, fewest, latest = index, remaining, reset_in
        return tight, fewest, resets

    def sends(self) -> list[float]:
        """Our own send times not yet pruned, oldest first (what a write-ahead log keeps)."""
        return [at for at, external in self._windows[self._longest].entries if not external]

    def counted(self) -> list[float]:
        """Every send time the longest window holds, ours and external, oldest first, in
        seconds; not pruned (read-only: what the status page's history is drawn from)."""
        return [at for at, _ in self._windows[self._longest].entries]

    def load(self, sends: Iterable[float], now: float) -> None:
        """Restore our own sends after a restart, on top of whatever is recorded; each
        window keeps those it still counts at ``now``. O((n + logged) log n)."""
        self._prune(now)
        restored = sorted(sends)
        for at in restored:
            _check_time(at, "send time")
        for window in self._windows:
            kept = [(at, False) for at in restored if at + window.span > now]
            window.entries = deque(heapq.merge(window.entries, kept, key=entry_time))

    def relimited(self, limits: Sequence[Limit], now: float) -> CredentialBudget:
        """A budget with other ``limits`` (same guard) holding this one's own sends and
        freeze; a longer new window counts only the sends this one still kept."""
        budget = CredentialBudget(limits, self.guard)
        budget.load(self.sends(), now)
        frozen = self.frozen_until(now)
        if frozen is not None:
            budget.freeze(frozen)
        return budget

    def load_external(self, index: int, times: Iterable[float], now: float) -> None:
        """Restore external sends counted in window ``index`` (a shared backend's view)."""
        self._prune(now)
        window = self._windows[index]
        for at in sorted(times):
            _check_time(at, "send time")
            if at + window.span > now:
                window.add((at, True))

    # --- internals ---------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        _check_time(now)
        for window in self._windows:
            window.prune(now)

    def _earliest(self, now: float) -> float:
        start = now if self._frozen is None else max(now, self._frozen)
        return max(start, *(window.frees_at() for window in self._windows))

    def _add_external(self, window: WindowLog, now: float, n: int) -> None:
        entry = (now, True)
        for _ in range(n):
            window.add(entry)

    def _replay(self, now: float, ahead: int, horizon: float | None) -> float:
        # Some sends are logged after `now` (a lease's block, stamped at its end; a clock
        # step back), so planned sends interleave with them: replay the greedy schedule on
        # a copy, but only while they do. Once a planned send is at or past every logged
        # one, the rest is the fast recurrence from there, on the copy (same limits, same
        # reach). A queue behind a spent budget rarely replays a step: O(window) to copy.
        copy = CredentialBudget(self._limits, self._guard)
        copy._frozen, copy._reach = self._frozen, self._reach  # the reach: limits only
        for mine, theirs in zip(copy._windows, self._windows, strict=True):
            mine.entries, mine.external = deque(theirs.entries), theirs.external
        newest = max(w.entries[-1][0] for w in self._windows if w.entries)
        at = now
        for done in range(ahead + 1):
            if at >= newest:
                left = None if horizon is None else horizon - (at - now)
                return at - now + copy.predict_wait(at, ahead - done, left)
            copy._prune(at)
            at = copy._earliest(at)
            if horizon is not None and at - now > horizon:
                return math.inf
            for window in copy._windows:
                window.add((at, False))
        return at - now

    def _view(self, now: float, index: int, unused: int = 0) -> WindowView:
        # Only after _prune(now): reset_at(now, index) - now without pruning again.
        window = self._windows[index]
        entries = window.entries
        requests = window.limit.requests
        used = max(0, len(entries) - unused)
        return WindowView(
            requests,
            window.limit.per_seconds,
            used,
            max(0, requests - used),
            entries[0][0] + window.span - now if entries else 0.0,
            window.external,
        )
