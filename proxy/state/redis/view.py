"""A replica's mirrored view of the shared budget in Redis, for predictions.

Every replica's sends (by member, placed in local time) and the external sends echowin
reported, as of the last answer from Redis. Pure bookkeeping: the caller talks to Redis
(proxy/state/redis/slots.py) and hands the replies in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from proxy.budget.windows import CredentialBudget, Limit

__all__ = ["FREEZE_SAME", "MOVED_MIN", "SharedView"]

# A known send read again with a later score was moved by the replica that sent it (its
# answer came late); smaller differences are the clock offset's jitter between answers.
MOVED_MIN = 0.01
# A freeze read back from Redis within this of the one the view holds is the same freeze
# (each read converts Redis time with its own clock offset: they differ by a round trip).
FREEZE_SAME = 0.05


def _scores(raw: Sequence[bytes]) -> list[float]:
    """Scores out of a ZRANGEBYSCORE ... WITHSCORES reply."""
    return [float(raw[i]) for i in range(1, len(raw), 2)]


class SharedView:
    """``budget``: the mirror. ``known``: member -> local time of every send in it (bounded:
    more than any window can count). ``cursor``: Redis time of the newest send in it (0:
    none yet). ``offset``: Redis time minus local time, seconds, as of the last answer.
    ``read_at``: local time the mirror was last rebuilt from a snapshot; ``seen_at``: local
    time of the last answer from Redis (the view's age)."""

    __slots__ = (
        "budget",
        "cursor",
        "known",
        "known_max",
        "offset",
        "on_learn",
        "on_move",
        "on_rebuild",
        "read_at",
        "seen_at",
    )

    def __init__(self, limits: Sequence[Limit], guard: float) -> None:
        self.known: dict[bytes, float] = {}
        self.cursor = 0.0
        self.offset = 0.0
        self.read_at = -math.inf
        self.seen_at = -math.inf
        # Told of every send the mirror learns (member, local time), and of the whole of
        # it when rebuilt: the classes of service follow the shared sends this way.
        self.on_learn: Callable[[bytes, float], None] | None = None
        self.on_rebuild: Callable[[dict[bytes, float], float], None] | None = None
        # Told when a send counts from a later time (member, from, to): ``move``.
        self.on_move: Callable[[bytes, float, float], None] | None = None
        self.relimit(limits, guard)

    def relimit(self, limits: Sequence[Limit], guard: float) -> None:
        """An empty mirror under ``limits`` (the next snapshot fills it); members kept."""
        self.budget = CredentialBudget(limits, guard)
        self.known_max = 2 * sum(lim.requests for lim in limits) + 1000

    def learn(self, fresh: Sequence[bytes], now: float, member: bytes) -> tuple[float | None, int]:
        """Add the sends Redis recorded since the cursor (``member, score, ...``) to the
        view, each once (concurrent calls return the same ones). Returns the local time of
        ``member`` if it is among them (our own send just recorded), and how many sends
        were new."""
        mine = None
        learnt = 0
        known = self.known
        for i in range(0, len(fresh), 2):
            score = float(fresh[i + 1])
            at = known.get(fresh[i])
            if at is None:
                at = known[fresh[i]] = score - self.offset
                self.budget.record(at)
                learnt += 1
                if self.on_learn is not None:
                    self.on_learn(fresh[i], at)
            elif score - self.offset > at + MOVED_MIN:  # moved since: its answer came late
                self.move(fresh[i], score - self.offset)
                at = score - self.offset
            if fresh[i] == member:
                mine = at
            self.cursor = max(self.cursor, score)
        while known and len(known) > self.known_max:
            del known[next(iter(known))]
        self.budget.wait_time(now)  # prune what no window counts any more
        return mine, learnt

    def heard_freeze(self, until: float, now: float, fallback: CredentialBudget | None) -> bool:
        """Redis holds a freeze until ``until`` (local time): it holds in the mirror, and in
        ``fallback`` if given. True when the mirror did not know it yet (news)."""
        if until <= now:
            return False
        known = self.budget.frozen_until(now)
        self.budget.freeze(until)
        if fallback is not None:
            fallback.freeze(until)
        return known is None or until > known + FREEZE_SAME

    def move(self, member: bytes, to: float) -> None:
        """A known send counts from ``to``, later than its time (its answer came late:
        ``RedisSlots.answered``); nothing if it is not known."""
        at = self.known.get(member)
        if at is None or to <= at:
            return
        self.known[member] = to
        self.budget.move(at, to)
        if self.on_move is not None:
            self.on_move(member, at, to)

    def rebuild(
        self, sends: Sequence[bytes], ext: Sequence[Sequence[bytes]], offset: float, now: float
    ) -> None:
        """Replace the mirror by a snapshot read with clock ``offset``: ``sends`` (member,
        score, ...) and each window's external sends. A send already known keeps the local
        time it was given (its slot and the journal hold that time); only new ones are
        placed with ``offset``. A freeze set here since (an upstream 429 still on its way to
        Redis) is kept."""
        old = self.budget
        mirror = CredentialBudget(old.limits, old.guard)
        known = {}
        for i in range(0, len(sends), 2):
            at = self.known.get(sends[i])
            known[sends[i]] = float(sends[i + 1]) - offset if at is None else at
        self.known = known
        mirror.load(known.values(), now)
        if sends:
            self.cursor = max(self.cursor, float(sends[-1]))
        for index, raw in enumerate(ext):
            mirror.load_external(index, [at - offset for at in _scores(raw)], now)
        local = old.frozen_until(now)
        if local is not None:
            mirror.freeze(local)
        self.budget, self.read_at, self.offset = mirror, now, offset
        self.seen_at = now
        if self.on_rebuild is not None:
            self.on_rebuild(known, now)
