"""The per-request metrics kept in plain numbers (proxy/observe/loop_metrics.py, LoopCounter and
LoopHistogram) read exactly as prometheus_client's own Counter and Histogram would."""

from __future__ import annotations

import re

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.observe.loop_metrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.005, 0.01, 0.25, 1.0, 60.0)
# Below, on and above every bound, and past the last one.
AMOUNTS = (0.0, 0.0005, 0.001, 0.0010001, 0.005, 0.2, 0.25, 1.0, 59.9, 60.0, 61.0, 7200.0)


def _page(registry: CollectorRegistry) -> str:
    """The exposition with creation times blanked (the two registries made theirs apart)."""
    text = generate_latest(registry).decode()
    return re.sub(r"^(\w+_created(?:\{[^}]*\})?) \S+$", r"\1 T", text, flags=re.MULTILINE)


def _both() -> tuple[CollectorRegistry, CollectorRegistry]:
    """The same updates to prometheus_client's metrics and to ours, each on a registry."""
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    their_count = Counter("x_requests_total", "Requests.", ["route", "status"], registry=theirs)
    their_time = Histogram("x_seconds", "Time.", ["route"], buckets=BUCKETS, registry=theirs)
    our_count = LoopCounter("x_requests_total", "Requests.", ["route", "status"], ours)
    our_time = LoopHistogram("x_seconds", "Time.", ["route"], ours, BUCKETS)
    for i, amount in enumerate(AMOUNTS):
        route = "/a" if i % 3 else "/b"
        status = "200" if i % 2 else "429"
        their_count.labels(route, status).inc()
        our_count.inc(route, status)
        their_time.labels(route).observe(amount)
        our_time.observe(amount, route)
    return theirs, ours


def test_the_loop_metrics_expose_what_prometheus_clients_own_would() -> None:
    theirs, ours = _both()
    page = _page(ours)
    assert page == _page(theirs)
    assert 'x_seconds_bucket{le="0.001",route="/a"} 2.0' in page  # 0.0005 and 0.001 itself
    assert 'x_seconds_bucket{le="0.25",route="/b"} 3.0' in page  # 0.25 itself counts in it
    assert 'x_seconds_bucket{le="+Inf",route="/a"} 8.0' in page
    assert page.count("x_requests_created{") == 4
    assert ours.get_sample_value("x_seconds_sum", {"route": "/a"}) == pytest.approx(
        sum(a for i, a in enumerate(AMOUNTS) if i % 3)
    )


def test_created_series_follow_prometheus_clients_switch() -> None:
    """PROMETHEUS_DISABLE_CREATED_SERIES (or disable_created_metrics()) leaves the
    ``_created`` companions out of ours as it does of prometheus_client's."""
    theirs, ours = _both()
    prometheus_client.disable_created_metrics()
    try:
        page = _page(ours)
        assert page == _page(theirs)
    finally:
        prometheus_client.enable_created_metrics()
    assert "_created" not in page
    assert "_created" in _page(ours)


def test_a_second_metric_of_the_same_name_is_refused() -> None:
    registry = CollectorRegistry()
    LoopHistogram("z_seconds", "Z.", ["a"], registry, BUCKETS)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        LoopCounter("z_seconds", "Z again.", ["a"], registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("z_seconds_count", "Z's count.", registry=registry)


def test_a_wrong_number_of_label_values_is_refused() -> None:
    registry = CollectorRegistry()
    count = LoopCounter("y_total", "Y.", ["a", "b"], registry)
    with pytest.raises(ValueError, match="takes labels"):
        count.inc("only-one")
    time = LoopHistogram("y_seconds", "Y.", ["a"], registry, BUCKETS)
    with pytest.raises(ValueError, match="takes labels"):
        time.observe(0.1, "a", "b")
    assert "y_total{" not in generate_latest(registry).decode()
