"""The metrics' token and credential label values, bounded (label_bounds.py's
:class:`BusiestNames`), and the series a ranking drops.

Registered first on the metrics' registry, :class:`LabelBounds` is collected first at
every scrape: it ranks the names then, and drops the series of the names that lost their
label before the other collectors read theirs. It exports nothing itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeVar

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from proxy.observe.label_bounds import BusiestNames

if TYPE_CHECKING:
    from proxy.observe.metrics import Metrics

__all__ = ["ANONYMOUS", "LabelBounds"]

ANONYMOUS = "-"
"""The token label of a request without an authenticated token (never bounded)."""

_V = TypeVar("_V")


class LabelBounds(Collector):
    """Token names (``metrics.token_labels``, default 100) and credential names in the
    histograms by credential (``metrics.credential_labels``, default 50) as label values."""

    def __init__(self, metrics: Metrics) -> None:
        self.tokens = BusiestNames()
        self.credentials = BusiestNames(50)
        self._metrics = metrics
        metrics.registry.register(self)

    def token(self, name: str) -> str:
        """The token label of one request (counted for the ranking: once per request)."""
        return name if name == ANONYMOUS else self.tokens.label(name)

    def token_now(self, name: str) -> str:
        """The token label of a request already counted."""
        return name if name == ANONYMOUS else self.tokens.peek(name)

    def credential(self, name: str) -> str:
        """The credential label of one admitted request in a histogram (counted)."""
        return self.credentials.label(name)

    def credential_now(self, name: str) -> str:
        return self.credentials.peek(name)

    def shown_tokens(
        self, source: Callable[[], Mapping[str, _V]]
    ) -> Callable[[], Mapping[str, _V]]:
        """``source`` (by token name) with only the names that have their own label: the
        token quota gauges, which have no sum to put under ``other``."""
        return lambda: {k: v for k, v in source().items() if self.tokens.shown(k)}

    def collect(self) -> Iterator[Metric]:
        """Rank the names (each ``period``) and drop the series of those that lost their
        label. Yields nothing."""
        m = self._metrics
        credentials = self.credentials.rerank()
        if credentials:
            m.queue_wait.drop("credential", credentials)
            m.upstream_duration.drop("credential", credentials)
        tokens = self.tokens.rerank()
        if tokens:
            m.requests.drop("token", tokens)
            # refusals' label children, kept by Metrics.child: (id, credential, token, reason)
            kept = m._children
            for key in [k for k in kept if k[0] == id(m.refusals) and k[2] in tokens]:
                del kept[key]
                m.refusals.remove(*key[1:])
        return iter(())

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def __repr__(self) -> str:
        return "LabelBounds()"
