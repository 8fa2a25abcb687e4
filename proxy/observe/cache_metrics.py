"""The response cache's metrics (proxy/cache/): lookups by route template and result,
upstream sends saved, and what the cache holds, read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CacheMetrics"]

Sizes = Callable[[], tuple[int, int, int]]
"""(bytes held, entries held, evictions since the start)."""


class _Held(Collector):
    def __init__(self, sizes: Sizes) -> None:
        self._sizes = sizes

    def collect(self) -> Iterator[Metric]:
        held, entries, evictions = self._sizes()
        yield GaugeMetricFamily(
            "echowin_gateway_cache_bytes", "Bytes of answers the cache holds.", value=held
        )
        yield GaugeMetricFamily(
            "echowin_gateway_cache_entries", "Answers the cache holds.", value=entries
        )
        yield CounterMetricFamily(
            "echowin_gateway_cache_evictions",
            "Answers dropped from the cache to make room (not those that expired).",
            value=evictions,
        )


class CacheMetrics:
    """Registered on the gateway's registry when ``cache:`` is configured."""

    def __init__(self, registry: CollectorRegistry, sizes: Sizes) -> None:
        self.lookups = Counter(
            "echowin_gateway_cache_lookups",
            "GETs through the cache by route template and result: hit, miss, stale,"
            " collapsed, bypass.",
            ["route", "result"],
            registry=registry,
        )
        self.saved = Counter(
            "echowin_gateway_cache_sends_saved",
            "Upstream sends the cache saved (hit, stale and collapsed answers), by route.",
            ["route"],
            registry=registry,
        )
        registry.register(_Held(sizes))

    def lookup(self, route: str, result: str, saved: bool) -> None:
        self.lookups.labels(route, result).inc()
        if saved:
            self.saved.labels(route).inc()
