"""Labelled metrics updated on every request, kept in plain numbers on the event loop's
thread, exposed exactly as prometheus_client's Counter and Histogram are."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = ["LoopCounter", "LoopHistogram"]

_Series = TypeVar("_Series")
# How prometheus_client writes a bucket's bound in ``le`` (typed here: it is not).
_le_of: Callable[[float], str] = floatToGoString


class _LoopMetric(Collector, Generic[_Series]):
    """A labelled metric updated on every request, kept in plain numbers.

    prometheus_client's children take a lock for every update, and a histogram's walks
    its buckets in Python: several microseconds per request for five updates. These are
    only ever updated on the event loop's thread, so a plain number will do; a scrape
    reads them as they are (as it reads prometheus_client's). The exposition is the
    same as prometheus_client's Counter and Histogram make, ``_created`` companions
    included unless prometheus_client is told to leave them out."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], _Series] = {}  # per label set
        self._created: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        """The family without samples: the registry learns the names (a second metric of
        the same name is refused, as for prometheus_client's own)."""
        return self._family([])

    def collect(self) -> Iterator[Metric]:
        return self._family(list(self._series.items()))

    def _family(self, series: list[tuple[tuple[str, ...], _Series]]) -> Iterator[Metric]:
        raise NotImplementedError

    def _created_at(self, values: tuple[str, ...]) -> float | None:
        """The label set's ``_created``, unless prometheus_client is told to leave them out
        (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics())."""
        return self._created[values] if getattr(_prometheus_metrics, "_use_created", True) else None

    def drop(self, label: str, values: set[str]) -> None:
        """Forget every series whose ``label`` is one of ``values`` (token names that lost
        their label value: proxy/observe/label_bounds.py)."""
        index = self.labelnames.index(label)
        for key in [k for k in self._series if k[index] in values]:
            del self._series[key]
            self._created.pop(key, None)

    def _check(self, values: tuple[str, ...]) -> None:
        """A new label set: the right number of values, and its creation time noted."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
        self._created[values] = time.time()


class LoopCounter(_LoopMetric[int]):
    """A counter (see _LoopMetric): ``inc(*label_values)`` adds one."""

    def inc(self, *values: str) -> None:
        counts = self._series
        try:
            counts[values] += 1
        except KeyError:
            self._check(values)
            counts[values] = 1

    def _family(self, series: list[tuple[tuple[str, ...], int]]) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, count in series:
            family.add_metric(values, count, created=self._created_at(values))
        yield family


class LoopHistogram(_LoopMetric[list[float]]):
    """A histogram (see _LoopMetric): ``observe(amount, *label_values)``. Per label set,
    the count of each bucket alone (not cumulative), +Inf's last, then the sum."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        registry: CollectorRegistry,
        buckets: Iterable[float],
    ) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._les = [_le_of(b) for b in self.bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry)

    def observe(self, amount: float, *values: str) -> None:
        series = self._series.get(values)
        if series is None:
            self._check(values)
            series = self._series[values] = [0] * (len(self.bounds) + 2)
        # The first bucket whose bound is at least the amount (``le``: less or equal).
        series[bisect.bisect_left(self.bounds, amount)] += 1
        series[-1] += amount

    def _family(self, series: list[tuple[tuple[str, ...], list[float]]]) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, counts in series:
            total = 0.0
            buckets = []
            for le, count in zip(self._les, counts, strict=False):
                total += count
                buckets.append((le, total))
            family.add_metric(values, buckets, counts[-1])
            created = self._created_at(values)
            if created is not None:
                labels = dict(zip(self.labelnames, values, strict=True))
                family.samples.append(Sample(f"{self.name}_created", labels, created))
        yield family
