"""What one flight to echowin brought back (proxy/gateway/fetch.py makes it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

from proxy.cache.store import Answer
from proxy.upstream import UpstreamResponse

__all__ = ["Fetched"]


@dataclass(slots=True)
class Fetched:
    """What one flight got. ``answer``: echowin's whole answer, the key watch applied,
    shared by every caller of the flight, and kept ``fresh_for`` seconds when that is
    above 0 (``stored`` once it is). Otherwise for the first caller alone: ``upstream``,
    an answer too large to hold, to relay; or ``refusal``, the gateway's own answer.
    ``stale``: why a stale copy may stand in for what came ("" when none may);
    ``limits``: the first caller's rate-limit fields. ``shareable``: False when echowin's
    ``Vary`` names a field the callers of one key may send differently (the answer is
    the first caller's alone). ``charged``: the first caller's token's own quota paid for
    this trip (it reached echowin, or may have): a stale copy in its place is not charged
    again. ``must_revalidate``: echowin forbade serving the answer stale."""

    answer: Answer | None = None
    upstream: UpstreamResponse | None = None
    refusal: web.Response | None = None
    stale: str = ""
    limits: Mapping[str, str] = field(default_factory=dict)
    fresh_for: float = 0.0
    stored: bool = False
    shareable: bool = True
    charged: bool = False
    must_revalidate: bool = False

    def release(self) -> None:
        """Nobody will relay ``upstream``: its connection goes back (or is closed)."""
        if self.upstream is not None:
            self.upstream.release()
            self.upstream = None
