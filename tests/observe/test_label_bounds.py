"""Names as metric labels stay bounded: with 10,000 tokens the series are bounded by
metrics.token_labels, the busy tokens keep their own label, the rest count as "other"."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.observe.label_bounds import OTHER, BusiestNames
from proxy.observe.metrics import Metrics

TOKENS = 10_000
LIMIT = 50


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_few_tokens_are_labelled_at_once_and_many_are_bounded() -> None:
    clock = Clock()
    labels = BusiestNames(limit=3, period=60, clock=clock)
    assert [labels.label(n) for n in ("a", "b", "c", "d")] == ["a", "b", "c", OTHER]
    assert labels.peek("d") == OTHER and labels.shown("a") and not labels.shown("d")
    assert labels.rerank() == set()  # the period has not passed
    for _ in range(5):
        labels.label("d")
    labels.label("b")
    labels.label("c")
    clock.now += 60
    assert labels.rerank() == {"a"}  # d was busier; a, quiet, gives its place
    assert labels.peek("d") == "d" and labels.peek("a") == OTHER
    clock.now += 60  # a quiet period: the labelled names keep their labels
    assert labels.rerank() == set()
    assert {n for n in "abcd" if labels.shown(n)} == {"b", "c", "d"}


def _series(metrics: Metrics, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = metrics.exposition().decode()
    out = {}
    for metric in text_string_to_metric_families(text):
        if metric.name == family:
            for sample in metric.samples:
                if sample.name == f"{family}_total":
                    out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _tokens(series: dict[tuple[tuple[str, str], ...], float]) -> set[str]:
    return {dict(key)["token"] for key in series}


def test_10000_tokens_keep_metrics_bounded_and_the_busy_ones_visible() -> None:
    clock = Clock()
    metrics = Metrics()
    metrics.labels.tokens = BusiestNames(limit=LIMIT, period=60, clock=clock)
    busy = [f"svc-busy-{i}" for i in range(10)]

    def request(name: str, status: str = "200") -> None:
        metrics.requests.inc(metrics.labels.token(name), "/api/v1/contacts", "GET", status)

    for i in range(TOKENS):  # every token once: the first LIMIT take the labels
        request(f"svc-{i:05d}")
        metrics.refused("default", f"svc-{i:05d}", "upstream_budget")
    for _ in range(20):
        for name in busy:
            request(name)
            request(name, "429")
            metrics.refused("default", name, "upstream_budget")
    before = _series(metrics, "echowin_gateway_requests")
    assert len(_tokens(before)) == LIMIT + 1  # LIMIT names and "other"
    assert sum(before.values()) == TOKENS + 400
    assert not set(busy) & _tokens(before)  # they came late: "other" for now

    clock.now += 60  # the next scrape ranks the period: the busy ones get their labels
    after = _series(metrics, "echowin_gateway_requests")
    assert len(_tokens(after)) <= LIMIT + 1
    assert len(_tokens(after) - {OTHER}) == LIMIT - len(busy)  # the demoted names' are gone
    for name in busy:  # their next requests have their own series; "other" keeps its count
        request(name)
    final = _series(metrics, "echowin_gateway_requests")
    assert set(busy) <= _tokens(final)
    assert len(_tokens(final)) == LIMIT + 1
    other = (("method", "GET"), ("route", "/api/v1/contacts"), ("status", "200"), ("token", OTHER))
    assert final[other] == after[other]
    busy_key = (*other[:3], ("token", "svc-busy-3"))
    assert final[busy_key] == 1

    for name in busy:
        metrics.refused("default", name, "upstream_budget")
    refusals = _series(metrics, "echowin_gateway_refusals")
    assert len(_tokens(refusals)) == LIMIT + 1
    assert set(busy) <= _tokens(refusals)
    assert len(metrics.exposition()) < 64 * 1024


def test_histograms_by_credential_keep_the_busiest_keys_and_other() -> None:
    clock = Clock()
    metrics = Metrics()
    metrics.labels.credentials = BusiestNames(limit=5, period=60, clock=clock)
    for i in range(500):  # 500 keys from a keys file, a request each
        metrics.waited(f"team-{i:03d}", 0.0)
        answered(metrics, f"team-{i:03d}")
    for _ in range(10):
        metrics.waited("team-499", 0.0)
        answered(metrics, "team-499")
    text = metrics.exposition().decode()
    waits = _label_values(text, "echowin_gateway_queue_wait_seconds_count", "credential")
    assert waits == {"team-000", "team-001", "team-002", "team-003", "team-004", OTHER}
    clock.now += 60
    metrics.exposition()  # ranked: team-499 was the busiest
    metrics.waited("team-499", 0.0)
    answered(metrics, "team-499")
    text = metrics.exposition().decode()
    for family in ("queue_wait_seconds_count", "upstream_duration_seconds_count"):
        values = _label_values(text, f"echowin_gateway_{family}", "credential")
        assert "team-499" in values and len(values) <= 6, (family, values)
    # The counters by credential keep every key: an alert on one key reads them.
    responses = _label_values(text, "echowin_gateway_upstream_responses_total", "credential")
    assert len(responses) == 500


def answered(metrics: Metrics, credential: str) -> None:
    """What proxy/gateway/forward.py counts of an answer from echowin."""
    label = metrics.labels.credential_now(credential)
    metrics.upstream_duration.observe(0.01, label, "/api/v1/contacts")
    metrics.upstream_responses.inc(credential, "200")


def _label_values(text: str, sample: str, label: str) -> set[str]:
    return {
        s.labels[label]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    }


def test_the_class_wait_histogram_keeps_the_credential_bound() -> None:
    """With classes of service, each admission is also observed by class: its wait
    histogram labels credentials as the gateway's own do (busiest names, then other)."""
    from proxy.observe.class_metrics import ClassMetrics

    metrics = Metrics()
    metrics.labels.credentials = BusiestNames(limit=5, period=60, clock=Clock())
    classes = ClassMetrics(metrics.registry, dict, metrics.labels.credential_now)
    for i in range(500):
        metrics.waited(f"team-{i:03d}", 0.0)
        classes.class_admitted(f"team-{i:03d}", "interactive", 0.0)
    text = metrics.exposition().decode()
    waits = _label_values(text, "echowin_gateway_class_queue_wait_seconds_count", "credential")
    assert waits == {"team-000", "team-001", "team-002", "team-003", "team-004", OTHER}
    sends = _label_values(text, "echowin_gateway_class_sends_total", "credential")
    assert len(sends) == 500  # counters keep every key, as the gateway's own do
