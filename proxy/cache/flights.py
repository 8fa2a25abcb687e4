"""Identical GETs in flight share one trip to echowin: the first caller's starts a flight
(a task of its own), every identical caller that arrives before it lands waits for it.
A caller that leaves does not cancel the others: the flight is cancelled only when every
caller waiting for it has left. A purge grounds the flights it concerns (their answers
are not kept, and later callers start a new one); a flight nobody may join, or one
displaced by a newer, is stamped at its start with the purges seen so far (``epoch``), so
that what it brings after a purge is not kept either."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from proxy.cache.keys import CacheKey

__all__ = ["Flight", "Flights"]

T = TypeVar("T")


class Flight(Generic[T]):
    """One trip under way: its task, how many callers wait for it, and whether what it
    brings may still be kept (``keep``: False once a purge concerned it; ``epoch``: the
    purges of its credential seen when it started)."""

    __slots__ = ("epoch", "joined", "keep", "key", "task", "waiting")

    def __init__(self, key: CacheKey, task: asyncio.Task[T], epoch: object = None) -> None:
        self.key = key
        self.task = task
        self.epoch = epoch
        self.waiting = 0
        self.joined = 0  # callers that joined after the first (for Cache-Status collapsed)
        self.keep = True


class Flights(Generic[T]):
    """The flights under way, by cache key (bounded by the requests in flight)."""

    def __init__(
        self,
        landed: Callable[[Flight[T]], None],
        epoch: Callable[[CacheKey], object] = lambda _key: None,
    ) -> None:
        """``landed(flight)``: called once when a flight's task ends, before any caller
        waiting for it resumes (the cache keeps its answer there). ``epoch(key)``: the
        purges seen so far that concern ``key``, stamped on a flight as it starts."""
        self._flying: dict[CacheKey, Flight[T]] = {}
        self._landed = landed
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self._flying)

    def get(self, key: CacheKey) -> Flight[T] | None:
        return self._flying.get(key)

    def start(self, key: CacheKey, trip: Coroutine[Any, Any, T], *, shared: bool) -> Flight[T]:
        """A new flight running ``trip``; ``shared``: later identical callers may join
        it (a caller that asked echowin itself, ``no-cache``, starts one nobody joins)."""
        # Stamped before the trip's first step: nothing of it has left yet.
        flight = Flight(key, asyncio.ensure_future(trip), self._epoch(key))
        if shared:
            self._flying[key] = flight
        flight.task.add_done_callback(lambda _task: self._land(flight))
        return flight

    def _land(self, flight: Flight[T]) -> None:
        if self._flying.get(flight.key) is flight:
            del self._flying[flight.key]
        if not flight.task.cancelled() and flight.task.exception() is None:
            self._landed(flight)

    async def wait(
        self, flight: Flight[T], on_abandoned: Callable[[T], None] | None = None
    ) -> T | None:
        """``flight``'s result; None when the flight was called off while this caller
        still waited (its last other caller left as this one joined): nothing to share,
        the caller goes on alone. Cancelled (the caller left), the flight goes on for
        the others; when nobody waits any more it is cancelled, and joined no more.
        ``on_abandoned`` (the first caller's) gets a result that lands after its caller
        left, so that what only that caller would have used is not leaked."""
        flight.waiting += 1
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if flight.task.cancelled() and me is not None and not me.cancelling():
                return None
            if flight.waiting == 1 and not flight.task.done():
                flight.task.cancel()
                if self._flying.get(flight.key) is flight:
                    del self._flying[flight.key]
            if on_abandoned is not None:
                flight.task.add_done_callback(lambda task: _abandoned(task, on_abandoned))
            raise
        finally:
            flight.waiting -= 1

    def ground(self, matches: Callable[[CacheKey], bool]) -> int:
        """Flights whose key ``matches`` keep nothing, and are joined no more."""
        doomed = [key for key in self._flying if matches(key)]
        for key in doomed:
            self._flying.pop(key).keep = False
        return len(doomed)


def _abandoned(task: asyncio.Task[T], on_abandoned: Callable[[T], None]) -> None:
    if task.cancelled():
        return
    with contextlib.suppress(Exception):
        on_abandoned(task.result())
