"""Classes of service for one credential's budget (SPEC §5): what each class has reserved,
how a paced class spreads each window, and whether a send of a class may go now.

Pure core (STYLE: "clock passed in"): no I/O, no asyncio. Every method takes ``now``,
wall-clock seconds. The credential's own windows (every send, ours and external) are a
:class:`~proxy.budget.windows.CredentialBudget`; a :class:`ClassBook` keeps, beside it, each
class's own sends, counted in the same windows (the same span: ``per_seconds`` + guard).

**Reserve.** For a class ``d`` reserving ``R`` in the window of limit ``(N, T)``, its unused
reservation is ``max(0, R - its sends in the window)``. A send of class ``c`` may go only
while, in every window, what is free (``N`` - every send counting) exceeds the unused
reservations of the classes other than ``c``. Every admitted send keeps *free >= the sum of
every class's unused reservation* (a send of ``c`` takes one of its own unused, or one of
the surplus), and so does a send that stops counting (free and its class's unused each grow
by at most one): a class under its reservation is never refused because of the others.
External sends (someone else on the key, learnt from echowin's headers) eat the surplus
first, then, when there is none left, the reservations.

**Pace.** A paced class has, per limit ``(N, T)``, a bucket of ``B = min(burst, N)`` that
refills at ``N / T`` a second; a send takes one. So in any ``t`` seconds it sends at most
``N * t / T + burst``. ``burst`` defaults to the requests of the shortest window.

Weights (which class goes first when several wait) are the queue's business
(:mod:`proxy.budget.class_queue`); :meth:`ClassBook.weight` tells it.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from proxy.budget.windows import CredentialBudget, Limit

__all__ = ["UNCLASSED", "ClassBook", "ClassWindow", "ServiceClass"]

UNCLASSED = "*"
"""The class of sends no class counts: a lease's block, taken far from every reservation
(see :meth:`ClassBook.surplus`), whose slots may go to requests of any class."""


@dataclass(frozen=True, slots=True)
class ServiceClass:
    """One class of service. ``reserve``: windows held for it alone (each ``per_seconds``
    the length of one of the credential's limits); ``burst``: a paced class's burst (None:
    the shortest window's requests)."""

    name: str
    weight: int = 1
    reserve: tuple[Limit, ...] = ()
    pace: bool = False
    burst: int | None = None


class ClassWindow(NamedTuple):
    """One class in one window at one moment (for /admin/budget, metrics, headers)."""

    requests: int  # the window's limit
    per_seconds: float
    reserved: int  # held for this class in the window
    used: int  # this class's sends counting in it
    free: int  # what this class may still send in it now (its reserve and the surplus)
    share: int  # the most it may ever use in the window: the limit less the others' reserves


class _Bucket:
    """A paced class's bucket for one limit: ``level`` at ``last`` (seconds)."""

    __slots__ = ("last", "level", "rate", "size")

    def __init__(self, size: int, rate: float) -> None:
        self.size = size
        self.rate = rate  # sends per second
        self.level = float(size)
        self.last = -math.inf

    def at(self, now: float) -> float:
        if now <= self.last:
            return self.level
        return min(float(self.size), self.level + self.rate * (now - self.last))

    def take(self, at: float) -> None:
        if at > self.last:
            self.level, self.last = self.at(at), at
        self.level -= 1.0

    def give(self) -> None:
        self.level = min(float(self.size), self.level + 1.0)

    def wait(self, now: float, sends: int = 1) -> float:
        """Seconds until ``sends`` sends may go one after another from ``now``."""
        short = sends - self.at(now)
        return 0.0 if short <= 0 else short / self.rate


class _Class:
    """One class's state in one credential: its sends per window, its buckets."""

    __slots__ = ("buckets", "logs", "reserved", "spec")

    def __init__(self, spec: ServiceClass, limits: Sequence[Limit]) -> None:
        self.spec = spec
        held = {r.per_seconds: r.requests for r in spec.reserve}
        self.reserved = [held.get(limit.per_seconds, 0) for limit in limits]
        self.logs: list[deque[float]] = [deque() for _ in limits]
        self.buckets: list[_Bucket] = []
        if spec.pace:
            shortest = min(limits, key=lambda lim: lim.per_seconds).requests
            burst = spec.burst if spec.burst is not None else shortest
            self.buckets = [
                _Bucket(min(burst, lim.requests), lim.requests / lim.per_seconds) for lim in limits
            ]

    def used(self, index: int) -> int:
        return len(self.logs[index])

    def unused(self, index: int) -> int:
        return max(0, self.reserved[index] - len(self.logs[index]))


class ClassBook:
    """The classes of one credential: each one's sends, its reserve and its pace.

    ``record`` a send of a class when the credential's budget records it (the same ``at``),
    ``release`` it when the budget does; ``allows`` is asked before a send of a class."""

    __slots__ = ("_classes", "_limits", "_spans", "default")

    def __init__(
        self, classes: Sequence[ServiceClass], limits: Sequence[Limit], guard: float, default: str
    ) -> None:
        """``default``: the class of a send whose class is unknown here (a token of none)."""
        self._limits = tuple(limits)
        self._spans = [limit.per_seconds + guard for limit in self._limits]
        self._classes = {spec.name: _Class(spec, self._limits) for spec in classes}
        if default not in self._classes:
            raise ValueError(f"default class {default!r} is not one of the classes")
        self.default = default
        for index, limit in enumerate(self._limits):
            held = sum(c.reserved[index] for c in self._classes.values())
            if held > limit.requests:
                raise ValueError(f"reservations for {limit.per_seconds:g} s sum past the limit")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._classes)

    def resolve(self, name: str | None) -> str:
        """The class a send of ``name`` counts in: itself if known, else the default."""
        return name if name is not None and name in self._classes else self.default

    def table(
        self,
    ) -> tuple[str, list[tuple[str, list[int]]], dict[str, list[tuple[int, float]]]]:
        """The class rules' data for a shared backend's own check (reserve.lua): the
        default class, per class its reservation in each window (0: none), and per paced
        class its bucket in each window (size, refill per second)."""
        reserves = [(n, list(c.reserved)) for n, c in self._classes.items()]
        paces = {n: [(b.size, b.rate) for b in c.buckets] for n, c in self._classes.items()}
        return self.default, reserves, {n: b for n, b in paces.items() if b}

    def weight(self, name: str | None) -> int:
        return self._classes[self.resolve(name)].spec.weight

    def paced(self, name: str | None) -> bool:
        return self._classes[self.resolve(name)].spec.pace

    # --- what was sent ---------------------------------------------------------------

    def record(self, name: str | None, at: float) -> None:
        """A send of class ``name`` recorded at ``at`` (seconds) in the credential's budget
        (of UNCLASSED: nothing to record here)."""
        if name == UNCLASSED:
            return
        cls = self._classes[self.resolve(name)]
        for log in cls.logs:
            if log and at < log[-1]:
                bisect.insort(log, at)
            else:
                log.append(at)
        for bucket in cls.buckets:
            bucket.take(at)

    def release(self, name: str | None, at: float) -> bool:
        """A send of class ``name`` recorded at ``at`` never left; True if it was found."""
        if name == UNCLASSED:
            return False
        cls = self._classes[self.resolve(name)]
        found = False
        for log in cls.logs:
            index = bisect.bisect_left(log, at)
            if index < len(log) and log[index] == at:
                del log[index]
                found = True
        if found:
            for bucket in cls.buckets:
                bucket.give()
        return found

    def reset(self) -> None:
        """Forget every class's sends (before loading a new picture of them)."""
        self._classes = {n: _Class(c.spec, self._limits) for n, c in self._classes.items()}

    def load(self, sends: Iterable[tuple[float, str | None]], now: float) -> None:
        """Restore classed sends after a restart (oldest first or not): each class's
        windows keep those that still count, its buckets replay them in order."""
        for at, name in sorted(sends, key=lambda send: send[0]):
            self.record(name, at)
        self._prune(now)

    # --- decisions -------------------------------------------------------------------

    def allows(self, name: str | None, now: float, budget: CredentialBudget) -> bool:
        """May a send of class ``name`` go at ``now``, as far as classes go (the budget's
        own windows are the budget's to check)? Its pace has room, and in every window
        what is free exceeds the others' unused reservations."""
        return self.wait(name, now, budget) <= 0.0

    def wait(self, name: str | None, now: float, budget: CredentialBudget, ahead: int = 0) -> float:
        """Seconds from ``now`` until a send of class ``name`` with ``ahead`` of its own
        class before it passes the class rules, if nothing else is sent meanwhile (0: now).
        The reserve part assumes the ``ahead`` take nothing from the others' reservations."""
        self._prune(now)
        key = self.resolve(name)
        cls = self._classes[key]
        wait = max((b.wait(now, ahead + 1) for b in cls.buckets), default=0.0)
        for index in range(len(self._limits)):
            wait = max(wait, self._reserve_wait(key, index, now, budget))
        return wait

    def covers(self, name: str | None, now: float, sends: int) -> bool:
        """Class ``name``'s unused reservation holds ``sends`` more in every window: the
        other classes cannot delay them (only the budget's own windows, pace and freezes)."""
        self._prune(now)
        cls = self._classes[self.resolve(name)]
        return all(cls.unused(index) >= sends for index in range(len(self._limits)))

    def surplus(self, now: float, budget: CredentialBudget) -> int:
        """What is free in the tightest window beyond every class's unused reservation:
        sends that may go to any class without touching a reservation (a lease's size)."""
        self._prune(now)
        return min(
            limit.requests
            - budget.count(now, index)
            - sum(c.unused(index) for c in self._classes.values())
            for index, limit in enumerate(self._limits)
        )

    def _others_unused(self, key: str, index: int) -> int:
        return sum(c.unused(index) for n, c in self._classes.items() if n != key)

    def _reserve_wait(self, key: str, index: int, now: float, budget: CredentialBudget) -> float:
        """Seconds until, in window ``index``, what is free exceeds the other classes'
        unused reservations. Both only change when a send stops counting: walk those."""
        limit = self._limits[index].requests
        if limit - budget.count(now, index) > self._others_unused(key, index):
            return 0.0
        span = self._spans[index]
        ends = sorted(at + span for at in budget.times(index))
        others = [
            (c.logs[index], c.reserved[index])
            for n, c in self._classes.items()
            if n != key and c.reserved[index]
        ]
        for moment in ends:
            if moment <= now:
                continue
            counting = len(ends) - bisect.bisect_right(ends, moment)
            unused = 0
            for log, held in others:
                unused += max(0, held - (len(log) - bisect.bisect_right(log, moment - span)))
            if limit - counting > unused:
                return moment - now
        return math.inf  # cannot happen: once nothing counts, free = limit >= reservations

    # --- views -----------------------------------------------------------------------

    def views(self, now: float, budget: CredentialBudget) -> dict[str, list[ClassWindow]]:
        """Every class in every window at ``now``: reserved, used, and free (what it may
        still send there: the window's free less the others' unused reservations)."""
        self._prune(now)
        out: dict[str, list[ClassWindow]] = {}
        for key, cls in self._classes.items():
            rows = []
            for index, limit in enumerate(self._limits):
                free = limit.requests - budget.count(now, index)
                free = max(0, free - self._others_unused(key, index))
                held = sum(c.reserved[index] for n, c in self._classes.items() if n != key)
                rows.append(
                    ClassWindow(
                        limit.requests,
                        limit.per_seconds,
                        cls.reserved[index],
                        cls.used(index),
                        free,
                        limit.requests - held,
                    )
                )
            out[key] = rows
        return out

    def caller_windows(
        self, name: str | None, now: float, budget: CredentialBudget
    ) -> list[tuple[int, int]]:
        """Per window, what a caller of class ``name`` is told: the most its class may use
        (the limit less the others' reservations) and what it may still send now. The
        numbers of ``views``, for one class (made for every answer)."""
        self._prune(now)
        key = self.resolve(name)
        out = []
        for index, limit in enumerate(self._limits):
            held = unused = 0
            for other, cls in self._classes.items():
                if other != key:
                    held += cls.reserved[index]
                    unused += cls.unused(index)
            free = limit.requests - budget.count(now, index) - unused
            out.append((limit.requests - held, max(0, free)))
        return out

    def _prune(self, now: float) -> None:
        for cls in self._classes.values():
            for log, span in zip(cls.logs, self._spans, strict=True):
                while log and log[0] + span <= now:
                    log.popleft()
