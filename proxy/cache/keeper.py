"""One process's budget savers: the answers kept (``store``), the flights under way
(``flights``), what they saved (``counts``, the metrics), and purges, made here and sent
to the other workers and replicas (``channel``), or heard from them."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry

from proxy.cache.flights import Flight, Flights
from proxy.cache.keys import CacheKey
from proxy.cache.purge import Purge
from proxy.cache.store import ResponseCache
from proxy.cache.trip import Fetched
from proxy.config import CacheConfig
from proxy.observe.cache_metrics import CacheMetrics

__all__ = ["RESULTS", "GatewayCache", "PurgeChannel"]

RESULTS = ("hit", "miss", "stale", "collapsed", "bypass")
"""A lookup's result: ``hit`` (a fresh copy), ``miss`` (sent to echowin), ``stale`` (a
stale copy stood in for a refusal or a failure), ``collapsed`` (shared another caller's
flight), ``bypass`` (the caller asked echowin itself: ``no-cache``)."""
SAVING = frozenset({"hit", "stale", "collapsed"})
"""Results that spent no upstream send."""


class PurgeChannel(Protocol):
    """Carries purges to the other workers and replicas."""

    def publish(self, credential: str | None, purge: Purge) -> None: ...

    async def close(self) -> None: ...


class GatewayCache:
    """The response cache of one gateway process (``config``: ``cache:``). ``clock``:
    monotonic seconds (ages and freshness)."""

    def __init__(
        self,
        config: CacheConfig,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.store = ResponseCache(
            config.max_bytes, config.max_entry_bytes, config.stale_seconds, clock
        )
        # Purges by credential (None: every credential's), counted: a flight stamped
        # with an older count than its credential's now brings an answer a purge missed.
        self._purges: Counter[str | None] = Counter()
        self.flights: Flights[Fetched] = Flights(self._landed, self._epoch)
        self.counts: Counter[str] = Counter()
        self.purged = 0
        self.channel: PurgeChannel | None = None
        self.metrics = CacheMetrics(registry, self._gauges)

    def _gauges(self) -> tuple[int, int, int]:
        return self.store.bytes, self.store.entries, self.store.evictions

    def caches(self, template: str) -> bool:
        """Answers of route ``template`` are kept."""
        return template in self.config.routes

    def takes(self, method: str, template: str) -> bool:
        """A ``method`` request on route ``template`` goes through the cache: a GET of a
        route kept, or of any route while identical GETs in flight are shared."""
        return method == "GET" and (self.config.coalesce or template in self.config.routes)

    def looked_up(self, route: str, result: str) -> None:
        self.counts[result] += 1
        self.metrics.lookup(route, result, result in SAVING)

    def _epoch(self, key: CacheKey) -> tuple[int, int]:
        return self._purges[None], self._purges[key.credential]

    def _landed(self, flight: Flight[Fetched]) -> None:
        fetched = flight.task.result()
        if not flight.keep or flight.epoch != self._epoch(flight.key):
            return  # a purge came while it was under way: what it brings may predate it
        if fetched.answer is not None and fetched.fresh_for > 0:
            fetched.stored = self.store.put(
                flight.key,
                fetched.answer,
                fetched.fresh_for,
                must_revalidate=fetched.must_revalidate,
            )

    def purge(self, credential: str | None, purge: Purge, *, publish: bool = True) -> int:
        """Drop what ``purge`` concerns, of ``credential`` (every credential's: None), here,
        and (``publish``) on every other worker and replica."""
        self._purges[credential] += 1
        dropped = self.store.purge(credential, purge.matches)

        def concerned(key: CacheKey) -> bool:
            return (credential is None or key.credential == credential) and purge.matches(key.path)

        self.flights.ground(concerned)
        self.purged += dropped
        if publish and self.channel is not None:
            self.channel.publish(credential, purge)
        return dropped

    def snapshot(self) -> dict[str, object]:
        """What the cache holds and saved, JSON-able (/admin/budget, the status page)."""
        counts = {result: self.counts[result] for result in RESULTS}
        return {
            "entries": self.store.entries,
            "bytes": self.store.bytes,
            "max_bytes": self.config.max_bytes,
            "evictions": self.store.evictions,
            "purged": self.purged,
            "in_flight": len(self.flights),
            "lookups": counts,
            "sends_saved": sum(counts[r] for r in SAVING),
        }

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
