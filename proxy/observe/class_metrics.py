"""Metrics by class of service (SPEC §5 "Classes of service"): registered beside the
gateway's own (proxy/observe/metrics.py) when ``classes`` are configured. The scheduler
reports each admission and refusal (it is its ``ClassObserver``); the gauges are read from
its snapshot at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.observe.loop_metrics import LoopCounter, LoopHistogram
from proxy.observe.metrics import _WAIT_BUCKETS, BudgetSource, window_label

__all__ = ["ClassMetrics"]


class ClassMetrics(Collector):
    """Sends, waits and refusals by credential and class; per window what each class has
    reserved, used and may still send."""

    def __init__(
        self,
        registry: CollectorRegistry,
        source: BudgetSource,
        credential_label: Callable[[str], str] = str,
    ) -> None:
        """``credential_label``: the credential's label in the wait histogram, bounded as
        the gateway's own histograms are (``metrics.credential_labels``: the busiest
        credentials by name, the rest as ``other``; the request was counted already)."""
        labels = ["credential", "class"]
        self._credential_label = credential_label
        self.sends = LoopCounter(
            "echowin_gateway_class_sends_total",
            "Requests admitted to echowin (a slot reserved and written ahead), by class.",
            labels,
            registry,
        )
        self.waits = LoopHistogram(
            "echowin_gateway_class_queue_wait_seconds",
            "Time admitted requests waited for budget, by class, in seconds.",
            labels,
            registry,
            _WAIT_BUCKETS,
        )
        self.refusals = Counter(
            "echowin_gateway_class_refusals_total",
            "Requests refused (429/503) instead of forwarded, by class and reason.",
            [*labels, "reason"],
            registry=registry,
        )
        self._source = source
        registry.register(self)

    def class_admitted(self, credential: str, cls: str, waited: float) -> None:
        self.sends.inc(credential, cls)
        self.waits.observe(waited, self._credential_label(credential), cls)

    def class_refused(self, credential: str, cls: str, reason: str) -> None:
        self.refusals.labels(credential, cls, reason).inc()

    def collect(self) -> Iterator[Metric]:
        labels = ["credential", "class", "window"]
        reserved = GaugeMetricFamily(
            "echowin_gateway_class_reserved",
            "Sends held for the class alone in any rolling window of this length.",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "echowin_gateway_class_used",
            "The class's sends counted in the rolling window now.",
            labels=labels,
        )
        free = GaugeMetricFamily(
            "echowin_gateway_class_free",
            "Sends the class may still make in the window now: its unused reserve and what"
            " no class reserves.",
            labels=labels,
        )
        for credential, lane in self._source().items():
            for cls, state in lane.get("classes", {}).items():
                for w in state["windows"]:
                    key = [credential, cls, window_label(w["per_seconds"])]
                    reserved.add_metric(key, w["reserved"])
                    used.add_metric(key, w["used"])
                    free.add_metric(key, w["free"])
        yield from (reserved, used, free)
