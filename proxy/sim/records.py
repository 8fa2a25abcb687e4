"""What the simulator records of each API request it receives."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Final

from proxy.sim.store import JSONObject

__all__ = ["NO_RESPONSE", "RecordedRequest"]

NO_RESPONSE: Final = 0
"""Status recorded for a request the simulator never answered (the ``reset`` fault)."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One API request as the simulator received it.

    ``at`` is the arrival time on the simulator's ``clock`` (seconds); ``path`` is the raw
    path with its query string; ``headers`` keeps names as sent (repeats joined by ", ");
    ``key`` is the credential header the route reads (X-API-Key, or X-AGENCY-KEY under
    /api/v1/agency/), valid or not, None if absent; ``status`` is the status answered, or
    NO_RESPONSE if the connection was dropped. The log is in completion order.
    """

    at: float
    method: str
    path: str
    headers: dict[str, str]
    key: str | None
    status: int

    def header(self, name: str) -> str | None:
        """The value of header ``name``, matched case-insensitively as HTTP does."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)

    def to_json(self) -> JSONObject:
        return asdict(self)
