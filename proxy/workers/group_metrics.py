"""The merged /metrics of a group of workers (``serve --workers N``): every worker's page,
each sample labelled with its worker, and the supervisor's own families, each family once."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger("echowin_gateway.admin")

WORKER_LABEL = "worker"
SUPERVISOR = "supervisor"


def _labelled(families: Iterable[Metric], worker: str) -> Iterator[Metric]:
    """Each sample labelled with its worker (one that names its worker already keeps it)."""
    for family in families:
        out = Metric(family.name, family.documentation, family.type, family.unit)
        out.samples = [
            s if WORKER_LABEL in s.labels else s._replace(labels={**s.labels, WORKER_LABEL: worker})
            for s in family.samples
        ]
        yield out


_WITH_CREATED = frozenset({"counter", "histogram", "summary"})


def _created_folded(families: Iterable[Metric]) -> list[Metric]:
    """``families`` parsed from a text page, each ``X_created`` gauge (the text format's
    rendering of a counter's or histogram's creation times) put back into its family ``X``,
    where OpenMetrics has it: a page of both would name ``X_created`` twice."""
    listed = list(families)
    owners = {f.name: f for f in listed if f.type in _WITH_CREATED}
    kept = []
    for family in listed:
        owner = owners.get(family.name.removesuffix("_created"))
        if family.name.endswith("_created") and family.type == "gauge" and owner is not None:
            owner.samples.extend(family.samples)
        else:
            kept.append(family)
    return kept


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_metrics(pages: Mapping[str, str], own: Iterable[Metric] = ()) -> CollectorRegistry:
    """One exposition of several: ``pages`` maps a worker label to its /metrics text, ``own``
    are the supervisor's families. Families keep their first-seen order; samples are
    labelled with their worker. A page that does not parse is left out (and logged)."""
    merged: dict[str, Metric] = {}
    sources: list[tuple[str, Iterable[Metric]]] = [(SUPERVISOR, own)]
    for worker, text in pages.items():
        try:
            sources.append((worker, list(text_string_to_metric_families(text))))
        except ValueError:
            log.warning("unreadable worker metrics", extra={"fields": {"worker": worker}})
    for worker, families in sources:
        for family in _labelled(_created_folded(families), worker):
            known = merged.setdefault(family.name, family)
            if known is not family:
                known.samples.extend(family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(merged.values())))
    return registry
