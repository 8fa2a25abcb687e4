"""The queue of one credential when classes of service are configured: a
:class:`~proxy.budget.fairness.FairQueue` per class (round-robin between the class's tokens,
by token weight), and a smooth weighted round-robin between the classes (by class weight).

Pure: no event loop, no I/O. It offers what the lane and its dispatch use of a
:class:`FairQueue` (``depth``, ``version``, ``tokens``, ``push``, ``pop``, ``remove``,
``queued``, ``waiting_tokens``, ``ahead_of_new``), plus :meth:`ClassQueue.next_class`: the
class the next free slot goes to, among those the class rules let send now.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from proxy.budget.fairness import FairQueue, Tally, TokenQueue, Turns, take_turn

__all__ = ["ClassQueue"]

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class _Credit:
    """A class's place in the round between classes."""

    current: float
    waiting: int
    weight: int


class _Tokens(Generic[T]):
    """A token's queue in whichever class it waits in: ``get`` as a dict's."""

    __slots__ = ("_queue",)

    def __init__(self, queue: ClassQueue[T]) -> None:
        self._queue = queue

    def get(self, key: str) -> TokenQueue[T] | None:
        group = self._queue.tokens_class.get(key)
        return None if group is None else self._queue.queues[group].tokens.get(key)


class ClassQueue(Generic[T]):
    """One :class:`FairQueue` per class and a weighted round-robin between them. A token
    is queued in the class it had when its first waiting request came (``push``'s
    ``group``); ``pop`` takes from the class ``next_class`` chose."""

    __slots__ = ("_credits", "_tally", "_weights", "queues", "tokens_class")

    def __init__(self, tally: Tally, weights: Mapping[str, int]) -> None:
        self._tally = tally
        self._weights = dict(weights)
        self.queues: dict[str, FairQueue[T]] = {name: FairQueue(tally) for name in weights}
        self._credits: dict[str, _Credit] = {}
        self.tokens_class: dict[str, str] = {}  # token id -> the class it is queued in

    @property
    def depth(self) -> int:
        return sum(q.depth for q in self.queues.values())

    @property
    def version(self) -> int:
        return sum(q.version for q in self.queues.values())

    @property
    def tokens(self) -> _Tokens[T]:
        """Every token's queue, by token id (the per-token bound reads it)."""
        return _Tokens(self)

    def push(self, key: str, weight: int, item: T, group: str = "") -> None:
        """Queue ``item`` of token ``key`` in class ``group`` (where the token already
        waits, if it does)."""
        group = self.tokens_class.setdefault(key, group if group in self.queues else "")
        if group not in self.queues:
            group = self.tokens_class[key] = next(iter(self.queues))
        self.queues[group].push(key, weight, item)

    def next_class(self, may_send: Callable[[str], bool]) -> str | None:
        """The class the next free slot goes to: of the classes with a request waiting
        that ``may_send`` lets send now, the one the weighted round-robin picks (without
        moving it: ``pop`` does). None: no waiting class may send."""
        members = self._members(may_send)
        if not members:
            return None
        copies = {k: Turns(m.current, m.waiting, m.weight) for k, m in members.items()}
        chosen = take_turn(copies)
        return next(k for k, m in copies.items() if m is chosen)

    def pop(self, group: str, may_send: Callable[[str], bool] | None = None) -> T:
        """The next item of class ``group``, which ``next_class`` chose with ``may_send``:
        the round between classes moves on (every class that may send gains its weight,
        ``group`` pays the round's total). Needs an item queued in ``group``."""
        members = self._members(may_send or (lambda name: True))
        if group not in members:
            members[group] = self._member(group)
        total = 0
        for credit in members.values():
            credit.current += credit.weight
            total += credit.weight
        members[group].current -= total
        self._credits.update(members)
        item = self.queues[group].pop()
        self._forget(group)
        return item

    def _member(self, name: str) -> _Credit:
        credit = self._credits.get(name)
        current = credit.current if credit is not None else 0.0
        return _Credit(current, self.queues[name].depth, self._weights[name])

    def _members(self, may_send: Callable[[str], bool]) -> dict[str, _Credit]:
        out: dict[str, _Credit] = {}
        for name, queue in self.queues.items():
            if queue.depth and may_send(name):
                out[name] = self._member(name)
        return out

    def remove(self, key: str, item: T) -> bool:
        group = self.tokens_class.get(key)
        if group is None or not self.queues[group].remove(key, item):
            return False
        self._forget(group)
        return True

    def _forget(self, group: str) -> None:
        queue = self.queues[group]
        for key in [k for k, g in self.tokens_class.items() if g == group]:
            if key not in queue.tokens or not queue.tokens[key].waiting:
                del self.tokens_class[key]
        if not queue.depth:
            self._credits.pop(group, None)

    def queued(self) -> list[T]:
        return [item for q in self.queues.values() for item in q.queued()]

    def queued_in(self, group: str) -> int:
        return self.queues[group].depth if group in self.queues else 0

    def waiting_tokens(self) -> int:
        return sum(q.waiting_tokens() for q in self.queues.values())

    def ahead_of_new(self, key: str, weight: int, group: str = "") -> int:
        """Items served before a new one of token ``key`` in class ``group``: those ahead
        of it in its class, and the other classes' share of the slots meanwhile (a bound
        by rounds of class weights)."""
        group = self.tokens_class.get(key, group)
        if group not in self.queues:
            return self.depth
        own = self.queues[group].ahead_of_new(key, weight)
        rounds = (own + 1) / self._weights[group]
        others = sum(
            min(q.depth, math.ceil(rounds * self._weights[name]))
            for name, q in self.queues.items()
            if name != group
        )
        return own + others

    def ahead_in_class(self, key: str, weight: int, group: str) -> int:
        """Items of its own class served before a new one of token ``key``."""
        group = self.tokens_class.get(key, group)
        if group not in self.queues:
            return self.depth
        return self.queues[group].ahead_of_new(key, weight)
