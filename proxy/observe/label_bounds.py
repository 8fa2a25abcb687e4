"""Which names (of tokens, of credentials) the metrics may carry as label values: a
bounded set, the busiest.

A label per token name is what an operator wants with ten services, and a problem with
10,000 tokens: every token used multiplies ``echowin_gateway_requests_total``'s series by its
routes, methods and statuses (about 26 series a token in the scale run; 2.4 MB of
``/metrics`` with 1,000 tokens used). Likewise a histogram by credential, with hundreds of
keys (``upstream.keys_file``). So at most ``limit`` names are label values at once; the
rest are counted under ``other``:

- while fewer than ``limit`` names have been seen, each gets its own label at once (a
  gateway with few tokens or keys is labelled exactly as before);
- once full, every ``period`` seconds (checked when metrics are scraped, never on a
  request) the names are ranked by their requests in the period just ended: the busiest
  ``limit`` keep or get their own label, quiet labelled names keep theirs while no busier
  one needs the place, and the names that lose it are returned by ``rerank`` (their
  series are dropped: a counter's series never moves to another label, so ``other``
  only grows by what is counted under it, and ``rate()`` stays right).

Counting is one dict update per request; ranking is a partial sort of the names used in
the period, at scrape time. Pure: no I/O, the clock passed in.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

__all__ = ["OTHER", "BusiestNames"]

OTHER = "other"
"""The label value of every name without its own."""


class BusiestNames:
    """At most ``limit`` token names as label values, re-ranked each ``period`` seconds."""

    def __init__(
        self,
        limit: int = 100,
        period: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.period = period
        self.clock = clock
        self._own: set[str] = set()
        self._counts: dict[str, int] = {}  # requests per token name in this period
        self._since = clock()

    def configure(self, limit: int, period: float) -> None:
        """New bounds (a reload); a smaller limit takes effect at the next ranking."""
        self.limit, self.period = limit, period

    def label(self, name: str) -> str:
        """The label value for one request of ``name``, counted for the ranking."""
        counts = self._counts
        counts[name] = counts.get(name, 0) + 1
        return self.peek(name)

    def peek(self, name: str) -> str:
        """The label value for ``name`` now, not counted (a second metric of a request
        already counted)."""
        own = self._own
        if name in own:
            return name
        if len(own) < self.limit:
            own.add(name)
            return name
        return OTHER

    def shown(self, name: str) -> bool:
        """True when ``name`` has its own label now."""
        return name in self._own

    def rerank(self) -> set[str]:
        """Rank the names if a period has passed: the names that lost their label."""
        now = self.clock()
        if now - self._since < self.period and len(self._own) <= self.limit:
            return set()
        own = self._own
        # Busiest first; at equal counts a name that has its label keeps it (less churn).
        busiest = heapq.nlargest(
            self.limit, self._counts.items(), key=lambda item: (item[1], item[0] in own)
        )
        keep = {name for name, _ in busiest}
        for name in own:  # places left: the quiet labelled names keep theirs
            if len(keep) >= self.limit:
                break
            keep.add(name)
        demoted = own - keep
        self._own = keep
        self._counts = {}
        self._since = now
        return demoted
