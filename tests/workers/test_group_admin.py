"""The pieces of ``serve --workers N`` that need no process: merging the workers' metrics and
budget views, the worker count, the refusal of memory:// state. (The processes themselves:
tests/test_workers.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ConfigError, parse_config, unshared_state
from proxy.observe.metrics import expose
from proxy.workers.group_metrics import merge_metrics
from proxy.workers.group_status import merge_credentials, merge_status
from proxy.workers.supervisor import exit_status, resolve_workers


def worker_page(requests: float, depth: float) -> str:
    registry = CollectorRegistry()
    Counter("egw_requests_total", "Requests.", ["status"], registry=registry).labels("200").inc(
        requests
    )
    Gauge("egw_queue_depth", "Waiting.", registry=registry).set(depth)
    Histogram("egw_wait_seconds", "Waits.", buckets=(1.0,), registry=registry).observe(0.5)
    return generate_latest(registry).decode()


def test_merged_metrics_label_every_sample_and_describe_each_family_once() -> None:
    own = CollectorRegistry()
    Gauge("egw_queue_depth", "Waiting.", registry=own).set(0)
    text = generate_latest(
        merge_metrics({"0": worker_page(3, 1), "1": worker_page(4, 2)}, own.collect())
    ).decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), text
    assert text.count("# HELP egw_requests_total ") == 1
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert all("worker" in s.labels for s in samples)
    values = {
        (s.name, s.labels["worker"]): s.value
        for s in samples
        if s.name in ("egw_requests_total", "egw_queue_depth")
    }
    assert values == {
        ("egw_requests_total", "0"): 3,
        ("egw_requests_total", "1"): 4,
        ("egw_queue_depth", "supervisor"): 0,
        ("egw_queue_depth", "0"): 1,
        ("egw_queue_depth", "1"): 2,
    }
    buckets = [s for s in samples if s.name == "egw_wait_seconds_bucket"]
    assert {s.labels["worker"] for s in buckets} == {"0", "1"}


def test_a_page_that_does_not_parse_is_left_out() -> None:
    text = generate_latest(
        merge_metrics({"0": worker_page(1, 0), "1": "# TYPE x counter\nx{ 1\n"})
    ).decode()
    workers = {s.labels["worker"] for f in text_string_to_metric_families(text) for s in f.samples}
    assert workers == {"0"}


def lane(used: int, remaining: int, depth: int, **extra: Any) -> dict[str, Any]:
    window = {"requests": 40, "per_seconds": 10.0, "used": used, "remaining": remaining}
    window |= {"reset_in": used / 10, "external": 0}
    return {
        "windows": [window],
        "queue_depth": depth,
        "waiting_tokens": depth,
        "frozen_for": 0.0,
        "state_healthy": True,
        "echowin_reported_remaining": None,
        "calibrated": True,
        **extra,
    }


def test_the_group_budget_is_the_most_recent_view_and_the_sum_of_the_queues() -> None:
    idle = {"default": lane(3, 37, 0)}
    busy = {"default": lane(9, 31, 2, frozen_for=1.5, echowin_reported_remaining=20)}
    merged = merge_credentials([idle, busy])["default"]
    assert merged["windows"][0] | {"reset_in": 0} == {
        "requests": 40,
        "per_seconds": 10.0,
        "used": 9,
        "remaining": 31,
        "reset_in": 0,
        "external": 0,
    }
    assert (merged["queue_depth"], merged["waiting_tokens"]) == (2, 2)
    assert merged["frozen_for"] == 1.5
    assert merged["echowin_reported_remaining"] == 20


def test_the_group_history_takes_the_most_sends_and_adds_up_the_queues() -> None:
    def history(start: int, sends: list[int | None], queue: list[int | None]) -> dict[str, Any]:
        return {"start": start, "sends": sends, "queue_max": queue}

    idle = {"default": lane(3, 37, 0, history=history(600, [None, 1, 2], [None, None, 0]))}
    busy = {"default": lane(9, 31, 2, history=history(600, [None, 4, 1], [None, 3, 2]))}
    merged = merge_credentials([idle, busy])["default"]
    assert merged["history"] == history(600, [None, 4, 2], [None, 3, 2])
    # Workers read at either side of a minute's turn: aligned on the newest minutes.
    late = {"default": lane(9, 31, 2, history=history(660, [0, 1, 5], [3, 2, 0]))}
    assert merge_credentials([idle, late])["default"]["history"] == history(
        660, [1, 2, 5], [3, 2, 0]
    )


def test_the_group_status_adds_up_each_tokens_answers() -> None:
    def data(*tokens: tuple[str, int, int]) -> dict[str, Any]:
        busiest = [{"id": i, "name": f"n{i}", "requests": r, "refused": x} for i, r, x in tokens]
        return {
            "version": "v",
            "credentials": {"default": lane(1, 39, 0)},
            "busiest_tokens": busiest,
        }

    merged = merge_status([data(("a", 5, 1), ("b", 1, 0)), data(("b", 7, 2))])
    assert merged["busiest_tokens"] == [
        {"id": "b", "name": "nb", "requests": 8, "refused": 2},
        {"id": "a", "name": "na", "requests": 5, "refused": 1},
    ]
    assert merged["version"] == "v"


def test_worker_counts() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert resolve_workers("auto") == resolve_workers(0) == min(cpus, 64)
    assert resolve_workers(3) == 3
    assert exit_status(-9) == 137
    assert exit_status(2) == 2


@pytest.mark.parametrize("value", [0, "auto", 1, 64])
def test_server_workers_takes_a_count_or_auto(value: object) -> None:
    config = parse_config({"state": "sqlite:///x.db", "server": {"workers": value}})
    assert config.server.workers == ("auto" if value in (0, "auto") else value)


@pytest.mark.parametrize("value", [-1, 65, "two", True, 1.5])
def test_server_workers_refuses_anything_else(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"server": {"workers": value}})
    assert err.value.lines[0].startswith("server.workers: must be an integer 1-64, or auto")


def test_memory_state_is_refused_for_several_workers_only() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"state": "memory://", "server": {"workers": 2}})
    assert err.value.lines == [
        "state: memory:// keeps the budget inside one process; with server.workers 2 each"
        " worker would spend the whole budget: use sqlite:///PATH or redis://HOST:PORT/DB"
    ]
    config = parse_config({"state": "memory://"})
    assert unshared_state(config, "--workers", 1) == ""
    assert unshared_state(config, "--workers", 3).startswith("state: memory://")
    assert "--workers 3" in unshared_state(config, "--workers", 3)
    redis = parse_config({"state": "redis://127.0.0.1:6379/0", "server": {"workers": 2}})
    assert unshared_state(redis, "server.workers") == ""


def test_merged_metrics_as_openmetrics_are_valid(tmp_path: Path) -> None:
    """What a Prometheus asking for OpenMetrics gets from ``serve --workers N``: the merged
    families, each once, that the OpenMetrics parser and promtool accept."""
    registry = merge_metrics({"0": worker_page(3, 1), "1": worker_page(4, 2)})
    answer = expose(registry, "application/openmetrics-text; version=1.0.0", None)
    assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
    text = answer.body.decode()
    assert text.endswith("# EOF\n")
    families = list(openmetrics_families(text))
    assert len({f.name for f in families}) == len(families)
    requests = [s for f in families for s in f.samples if s.name == "egw_requests_total"]
    assert {s.labels["worker"]: s.value for s in requests} == {"0": 3, "1": 4}
    page = tmp_path / "metrics.txt"
    page.write_bytes(answer.body)
    if shutil.which("promtool"):
        with page.open("rb") as stdin:
            checked = subprocess.run(
                ["promtool", "check", "metrics"], stdin=stdin, capture_output=True, check=False
            )
        assert b"error" not in checked.stderr.lower(), checked.stderr
