"""How much one replica may send alone while Redis is away (``on_state_failure: local``).

Pure (STYLE: "clock passed in"): no asyncio, no redis; every method takes ``now`` in
seconds (local time). The replica starts from the last shared view it had and counts each
of its own sends ``replicas`` times, so each replica gets 1/replicas of what is left and
the replicas' sum stays within echowin's limits while they cannot coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from proxy.budget.windows import CredentialBudget, Limit, WindowView

__all__ = ["PROBE_INTERVAL", "SETTLE_SECONDS", "Fallback", "Settling", "blind_margin"]

# While Redis is down, probe it this often, seconds.
PROBE_INTERVAL = 0.5
# After rejoining, a replica keeps to its share alone this long as well (Settling): every
# other replica alone has rejoined by then, its next probe (PROBE_INTERVAL) having waited
# out at most a Redis timeout (redis.timeout_seconds, 0.5 s by default) first.
SETTLE_SECONDS = 4 * PROBE_INTERVAL


def blind_margin(
    limits: Sequence[Limit], guard: float, views: Sequence[WindowView], age: float
) -> float:
    """Sends the other replicas may have made unseen, in the ``age`` seconds between this
    replica's last answer from Redis and Redis going away.

    A window at least as long as that gap still counts all of those sends: they are no more
    than it has free (``views``, the fallback's windows at the start). A shorter window may
    have turned over meanwhile: over the gap it let through at most its limit per turn. The
    least of these bounds them. A view of unknown age (``inf``) bounds nothing: ``inf``."""
    blind = math.inf
    if math.isfinite(age):
        for view, limit in zip(views, limits, strict=True):
            if limit.per_seconds + guard >= age:
                blind = min(blind, view.remaining)
            else:
                blind = min(blind, limit.requests * math.ceil(age / limit.per_seconds))
    return blind


class Fallback:
    """The budget a replica keeps alone: a :class:`CredentialBudget` in which each own send
    weighs ``replicas``."""

    __slots__ = ("budget", "replicas")

    def __init__(self, budget: CredentialBudget, replicas: int) -> None:
        self.budget = budget
        self.replicas = replicas

    @classmethod
    def from_view(
        cls,
        view: CredentialBudget,
        sends: Iterable[float],
        *,
        age: float,
        replicas: int,
        now: float,
    ) -> Fallback:
        """Start alone from ``view`` (the last shared view: its externals and freeze) and
        ``sends`` (every replica's sends as last seen, and this one's own since, each once).
        ``age``: seconds since the view was current. The others' unseen sends
        (``blind_margin``) count as sent now in every window, each window at most full, so
        the replicas' sum still stays within the limits. A view far older than the longest
        window (an idle replica) bounds nothing: every window counts as full."""
        limits, guard = view.limits, view.guard
        budget = CredentialBudget(limits, guard)
        budget.load(sends, now)
        for index, seen in enumerate(view.snapshot(now)):
            budget.load_external(index, [now] * seen.external, now)
        views = budget.snapshot(now)
        blind = blind_margin(limits, guard, views, age)
        for index, seen in enumerate(views):
            budget.load_external(index, [now] * int(min(seen.remaining, blind)), now)
        frozen = view.frozen_until(now)
        if frozen is not None:
            budget.freeze(frozen)
        return cls(budget, replicas)

    def relimited(self, limits: Sequence[Limit], now: float) -> Fallback:
        """The same fallback under new ``limits``: its own sends and freeze, and the others'
        sends it allowed for (seen, or assumed when Redis went away) as many as the fullest
        old window held, counted from now."""
        budget = self.budget.relimited(limits, now)
        external = max(view.external for view in self.budget.snapshot(now))
        for index in range(len(limits)):
            budget.load_external(index, [now] * external, now)
        return Fallback(budget, self.replicas)

    def take(self, now: float) -> bool:
        """Record one send at ``now`` (weighing ``replicas``) if it fits; False otherwise."""
        if self.budget.predict_wait(now, self.replicas - 1) > 0:
            return False
        for _ in range(self.replicas):
            self.budget.record(now)
        return True

    def give_back(self, at: float) -> None:
        """The send taken at ``at`` never left: its whole weight is free again."""
        for _ in range(self.replicas):
            self.budget.release(at)

    def retry_in(self, now: float) -> float:
        """Seconds until ``take`` can succeed."""
        return self.budget.predict_wait(now, self.replicas - 1)

    def predict_wait(self, now: float, ahead: int, horizon: float | None) -> float:
        """Seconds until a send with ``ahead`` others queued before it could go, each of
        them weighing ``replicas``."""
        return self.budget.predict_wait(now, self.replicas * (ahead + 1) - 1, horizon)


class Settling:
    """The first replica back in Redis shares again while others may still be alone: their
    sends alone are not in Redis until they rejoin and replay them, so Redis alone would
    hand their share to this replica too. Until ``until`` (local seconds) each of its sends
    must fit its ``fallback`` as well as Redis' windows, the share it kept alone."""

    __slots__ = ("fallback", "until")

    def __init__(self, fallback: Fallback, until: float) -> None:
        self.fallback = fallback
        self.until = until

    def share(self, now: float, healthy: bool) -> Fallback | None:
        """The share a send must fit now (None: Redis alone decides, or the fallback)."""
        return self.fallback if healthy and now < self.until else None

    def retry_in(self, now: float) -> float:
        return self.fallback.retry_in(now) if now < self.until else 0.0
