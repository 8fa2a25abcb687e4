"""The seam between "authorised" and "forwarded": where the budget keeper sits.

The handler asks an :class:`Admitter` for a :class:`Grant` before a request leaves for
echowin, and tells the grant what happened: ``sent`` once echowin answered (any status),
``unsent`` when no byte can have left (the slot is given back). A :class:`Refusal`
becomes a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.auth.tokens import TokenRecord
from proxy.errors import Reason


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    token: TokenRecord
    credential: str  # the upstream credential's name; each has its own budget
    route: str  # route template, for metrics
    max_wait: float | None  # the caller's own cap on queueing, seconds


@dataclass(frozen=True, slots=True)
class Refusal:
    # upstream_budget | token_quota | queue_full | upstream_frozen | state_unavailable |
    # shutting_down; upstream_429 (echowin's own, answered by the handler)
    reason: Reason
    retry_after: float  # seconds
    message: str
    status: int = 429  # 503 for state_unavailable (on_state_failure: closed), shutting_down


STATE_DOWN = Refusal(
    Reason.STATE_UNAVAILABLE, 1.0, "The gateway's shared state is unavailable", status=503
)
"""The shared state cannot be read and ``on_state_failure`` is ``closed``."""
SHUTTING_DOWN = Refusal(
    Reason.SHUTTING_DOWN, 1.0, "The gateway is shutting down; try again", status=503
)
"""The drain's grace is over: queued and new requests are answered at once."""


class Grant(Protocol):
    queued_seconds: float

    def sent(self, status: int, headers: Mapping[str, str]) -> None:
        """echowin answered with ``status`` and ``headers``: the slot is spent."""

    def unsent(self) -> None:
        """Nothing reached echowin: give the slot back."""


class Held(Protocol):
    """A request queued before its handler runs (:meth:`Admitter.hold`)."""

    @property
    def future(self) -> asyncio.Future[Any]:
        """Done when its wait is: ``admit(request, held)`` will not wait."""

    @property
    def granted(self) -> bool:
        """A slot is reserved for it: the wait ended with a send."""

    def release(self) -> None:
        """Give the place (or the slot already granted) up; a no-op once admit took it."""


class Admitter(Protocol):
    def hold(self, request: AdmitRequest) -> Held | None:
        """Queue ``request`` at once, with no coroutine, if it would be queued; None when
        ``admit`` must decide."""

    async def admit(self, request: AdmitRequest, held: Held | None = None) -> Grant | Refusal:
        """Wait (bounded) for budget, or refuse at once. ``held``: what ``hold`` gave for
        this request; its wait goes on here."""

    async def charge_own(self, request: AdmitRequest) -> Refusal | None:
        """Charge one request to the token's own quota only (an answer that spends no
        upstream send: the response cache's); the refusal when that quota is spent."""

    def caller_headers(self, request: AdmitRequest) -> Mapping[str, str]:
        """The caller's own rate-limit view, as response header fields."""

    def snapshot(self) -> dict[str, object]:
        """The budget state, JSON-able, for /admin/budget."""

    def token_quota_view(self, token_id: str) -> list[dict[str, object]] | None:
        """A token's own quota windows (JSON-able), or None when it has no quota."""

    def shed(self) -> None:
        """Shutting down: answer every queued request with a refusal now, and refuse
        every later one at once."""

    async def close(self) -> None: ...


class _OpenGrant:
    __slots__ = ()
    queued_seconds = 0.0

    def sent(self, status: int, headers: Mapping[str, str]) -> None:
        return None

    def unsent(self) -> None:
        return None


class OpenAdmitter:
    """Admits everything at once: no upstream budget is kept."""

    _grant = _OpenGrant()

    def hold(self, request: AdmitRequest) -> Held | None:
        return None

    async def admit(self, request: AdmitRequest, held: Held | None = None) -> Grant | Refusal:
        return self._grant

    async def charge_own(self, request: AdmitRequest) -> Refusal | None:
        return None

    def caller_headers(self, request: AdmitRequest) -> Mapping[str, str]:
        return {}

    def snapshot(self) -> dict[str, object]:
        return {}

    def token_quota_view(self, token_id: str) -> list[dict[str, object]] | None:
        return None

    def shed(self) -> None:
        return None

    async def close(self) -> None:
        return None
