"""Fairness between the tokens that wait for one credential's budget: a FIFO per token and a
smooth weighted round-robin between them (as nginx does), and how many sends that
round-robin serves before a new request.

Pure: no event loop, no I/O; what is queued is opaque here (the lane's waiters). One
round-robin step, :func:`take_turn`, serves both the live queue (:meth:`FairQueue.pop`) and the
prediction (:meth:`FairQueue.ahead_of_new`, which plays it forward on copies of the credits).

:class:`FairQueue` is the one owner of the queue's counts: ``depth`` (items queued in it),
``version`` (bumped by every change to its queues or their credits) and the ``waiting`` of
the :class:`Tally` that every lane of a scheduler shares.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = ["FairQueue", "Member", "Tally", "TokenQueue", "Turns", "take_turn"]

T = TypeVar("T")


class Tally(Protocol):
    """Requests queued in every lane together; kept by the lanes' :class:`FairQueue`."""

    waiting: int


class Member(Protocol):
    """One token's place in the round: its credit, its weight and how many of its wait."""

    current: float
    waiting: int

    @property
    def weight(self) -> int: ...


M = TypeVar("M", bound=Member)


def take_turn(members: dict[str, M]) -> M:
    """One step of the smooth weighted round-robin over ``members`` (in the dict's order: a
    tie goes to the first): every member gains its weight; of those that wait, the one
    with the most credit is chosen and pays the round's total weight. Returns it (the
    caller serves one of its items). Needs a member that waits.

    A member with none waiting takes part while in debt (negative credit: it was just
    served), repaying by its weight, but is never chosen; once it owes nothing it is
    retired, its credit shared among the others by weight. The credits keep summing to
    zero, so a token that comes and goes cannot leave the others ahead of a newcomer."""
    for key in [k for k, m in members.items() if not m.waiting and m.current >= 0]:
        gone = members.pop(key)
        weights = sum(m.weight for m in members.values())
        for member in members.values():
            member.current += gone.current * member.weight / weights
    total = 0
    best: M | None = None
    for member in members.values():
        member.current += member.weight
        total += member.weight
        if member.waiting and (best is None or member.current > best.current):
            best = member
    assert best is not None, "take_turn needs a member that waits"
    best.current -= total
    return best


class TokenQueue(Generic[T]):
    """One token's FIFO and its round-robin credit. ``weight``: the token's, when queued;
    ``waiting``: ``len(waiters)``, kept by :class:`FairQueue` (a plain attribute: the
    round-robin reads it for every token at every turn)."""

    __slots__ = ("current", "waiters", "waiting", "weight")

    def __init__(self, weight: int) -> None:
        self.weight = weight
        self.waiters: deque[T] = deque()
        self.waiting = 0
        self.current = 0.0


@dataclass(slots=True, eq=False)
class Turns:
    """A copy of one token queue's round-robin state, for a prediction to play forward."""

    current: float
    waiting: int
    weight: int


class FairQueue(Generic[T]):
    """The queue of one credential: a FIFO per token (by token id), served in weighted
    round-robin order. Changed only through ``push``, ``pop`` and ``remove``."""

    # Sends ahead of a new request that a prediction plays out exactly (echowin's tightest
    # window holds 100): a deeper queue shared by several tokens gets a bound instead. So
    # does one shared by so many tokens that the play would look at more than PLAYED_WORK
    # token queues in all (exact up to 256 sends for 32 tokens; about a millisecond).
    PLAYED_MAX = 256
    PLAYED_WORK = 8192

    __slots__ = ("_ahead", "_ahead_version", "_tally", "depth", "tokens", "version")

    def __init__(self, tally: Tally) -> None:
        self.tokens: dict[str, TokenQueue[T]] = {}
        self.depth = 0
        self.version = 0
        self._tally = tally
        # The sends ahead of a new request per (token id if it has a queue, weight), played
        # for ``_ahead_version``: a flood of refused arrivals plays the round-robin once.
        self._ahead: dict[tuple[str | None, int], int] = {}
        self._ahead_version = -1

    def push(self, key: str, weight: int, item: T) -> None:
        """Queue ``item`` last in token ``key``'s FIFO (made with ``weight`` if new)."""
        queue = self.tokens.get(key)
        if queue is None:
            queue = self.tokens[key] = TokenQueue(weight)
        queue.waiters.append(item)
        queue.waiting += 1
        self.version += 1
        self.depth += 1
        self._tally.waiting += 1

    def pop(self) -> T:
        """Take the next item in round-robin order out of the queue. Needs ``depth > 0``."""
        queue = take_turn(self.tokens)
        item = queue.waiters.popleft()
        self._left(queue)
        return item

    def remove(self, key: str, item: T) -> bool:
        """Take ``item`` out of token ``key``'s FIFO; False if it is not there."""
        queue = self.tokens.get(key)
        if queue is None or item not in queue.waiters:
            return False
        queue.waiters.remove(item)
        self._left(queue)
        return True

    def _left(self, queue: TokenQueue[T]) -> None:
        """One item has just left ``queue``: every count follows."""
        queue.waiting -= 1
        self.version += 1
        self.depth -= 1
        self._tally.waiting -= 1
        if not queue.waiting:
            self._emptied()

    def _emptied(self) -> None:
        """A token's FIFO has just emptied. In debt (it was just served) it stays in the
        round, not chosen, until the rounds have repaid it: a token that keeps one request
        waiting (its next comes as the last is served) would otherwise come back at 0 each
        time, its debt left with the others, and take every slot from a noisy token of
        lower weight. Its client's next request may come before ``take_turn`` retires it,
        credit and all. With nobody waiting, every debt is forgotten."""
        if self.depth == 0:
            self.tokens.clear()

    def queued(self) -> list[T]:
        """Every queued item, token by token, FIFO within each (a copy: safe to remove from
        the queue while going through it)."""
        return [item for queue in self.tokens.values() for item in queue.waiters]

    def waiting_tokens(self) -> int:
        """How many tokens have an item queued."""
        return sum(1 for queue in self.tokens.values() if queue.waiting)

    def ahead_of_new(self, key: str, weight: int) -> int:
        """Items the round-robin serves before a new one of token ``key`` (of ``weight``) if
        nothing else comes, played once per ``version`` and kind of arrival (a new token's
        depends on its weight only)."""
        if self._ahead_version != self.version:
            self._ahead.clear()
            self._ahead_version = self.version
        cached = (key if key in self.tokens else None, weight)
        ahead = self._ahead.get(cached)
        if ahead is None:
            ahead = self._ahead[cached] = self._play_ahead(key, weight)
        return ahead

    def _play_ahead(self, key: str, weight: int) -> int:
        """``take_turn`` played forward on copies of the credits until the new item is
        served (exact: smooth round-robin spreads a token's turns through a round and the
        credits carry over). O(items ahead * tokens waiting) until only the token's own are
        left; past PLAYED_MAX items ahead or PLAYED_WORK queues looked at, a bound by
        rounds of weights (``_rounds_ahead``)."""
        own = self.tokens.get(key)
        members = {
            k: Turns(q.current, q.waiting + (q is own), q.weight) for k, q in self.tokens.items()
        }
        if own is None:  # a new token's turn comes after every other's, on a tie
            me = members[key] = Turns(0.0, 1, weight)
        else:
            me = members[key]
        ahead = 0
        work = 0
        while ahead <= self.PLAYED_MAX and work <= self.PLAYED_WORK:
            work += len(members)
            if not any(m.waiting for m in members.values() if m is not me):
                return ahead + me.waiting - 1  # the rest are its own, in order
            best = take_turn(members)
            best.waiting -= 1
            if best is me and not me.waiting:
                return ahead
            ahead += 1
        return max(ahead + 1, self._rounds_ahead(key, weight))  # more than were played

    def _rounds_ahead(self, key: str, weight: int) -> int:
        """A bound on the items ahead of a new one of token ``key``, by rounds of weights."""
        own = self.tokens.get(key)
        mine = own.waiting if own is not None else 0
        rounds = (mine + 1) / weight
        ahead = mine
        for other, queue in self.tokens.items():
            if other != key:
                ahead += min(queue.waiting, math.ceil(rounds * queue.weight))
        return ahead
