"""Per-token quotas: a token's own ``hourly`` / ``per_minute`` limits, charged before its
credential's shared budget is asked and refunded when the request is refused or never sent.

Each token with a quota has one :class:`~proxy.budget.slots.SlotSource` of its own, made by
the state backend (:data:`QuotaSources`), so that every worker, replica and restart sees the
same charges. Times are wall-clock seconds (``time.time``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass

from proxy.auth.tokens import TokenRecord
from proxy.budget.admission import Refusal
from proxy.budget.local_slots import LocalSlots
from proxy.budget.slots import SendLog, Slot, SlotSource, StateUnavailable
from proxy.budget.windows import CredentialBudget, Limit, WindowView
from proxy.errors import Reason

__all__ = [
    "QUOTA_HORIZON",
    "QuotaSources",
    "TokenCharge",
    "TokenQuotas",
    "local_quota_source",
    "token_limits",
]

QUOTA_HORIZON = 3600.0
"""The longest window of a token's own quota (``hourly``), seconds."""


def token_limits(token: TokenRecord) -> tuple[Limit, ...]:
    """The token's own quota as limits (longest first); empty without one."""
    limits: list[Limit] = []
    if token.hourly is not None:
        limits.append(Limit(token.hourly, QUOTA_HORIZON))
    if token.per_minute is not None:
        limits.append(Limit(token.per_minute, 60.0))
    return tuple(limits)


QuotaSources = Callable[[str, tuple[Limit, ...]], SlotSource]
"""Makes the slot source of one token's own quota: ``(name, limits)``. The name is
``quota:<token id>`` (credential names cannot hold a colon). A source on the gateway's
state (SQLite, Redis) holds the quota across workers, replicas and restarts."""


def local_quota_source(
    name: str,
    limits: Sequence[Limit],
    log: SendLog,
    clock: Callable[[], float] | None = None,
) -> LocalSlots:
    """A token's quota on a send log (``memory://``, SQLite). No guard: the gateway counts
    it, echowin does not. No leases: a token's requests may move between processes, and a
    lease's unused slots would stay with the one that took it until it takes again."""
    return LocalSlots(name, CredentialBudget(limits, 0.0), log, clock, leases=False)


@dataclass(slots=True)
class TokenCharge:
    """One send charged to a token's own quota: a slot of the quota's source."""

    source: SlotSource
    slot: Slot
    refunded: bool = False

    def refund(self) -> None:
        """Give the send back to the token's quota (idempotent)."""
        if not self.refunded:
            self.refunded = True
            self.source.give_back(self.slot)


@dataclass(slots=True, eq=False)
class Quota:
    """One token's quota in use: its limits, their slot source, and ``ready``: done once the
    source's view is loaded from the state (restored, or rebuilt for new limits)."""

    limits: tuple[Limit, ...]
    source: SlotSource
    token_name: str
    ready: asyncio.Future[None]


class TokenQuotas:
    """The quotas of the tokens that have one, by token id, each made on its first use."""

    def __init__(self, sources: QuotaSources, clock: Callable[[], float]) -> None:
        self.in_use: dict[str, Quota] = {}
        self.clock = clock
        self._sources = sources
        self._closing: set[asyncio.Future[None]] = set()  # sources of dropped quotas

    def has_own(self, token: TokenRecord) -> bool:
        """The token has a quota now, or had one (its removal is seen on the next charge)."""
        return token.hourly is not None or token.per_minute is not None or token.id in self.in_use

    async def charge(
        self, token: TokenRecord, lane_refusal: Refusal | None
    ) -> TokenCharge | Refusal | None:
        """One send charged to the token's own quota, a refusal, or None (no quota). With
        ``lane_refusal`` (the lane refuses at once anyway) nothing is charged: the quota's
        own refusal if it is spent too (the quota comes first), else ``lane_refusal``.
        Raises StateUnavailable when the quota's state cannot be read."""
        quota = await self._get(token)
        if quota is None:
            return lane_refusal
        source = quota.source
        now = self.clock()
        slot = None if lane_refusal is not None else await source.take(now)
        if slot is None:
            # The view says spent; another process may have given a charge back since this
            # one last looked (the view catches up at most every few tens of ms).
            await source.refresh(now)
            wait = source.predict_wait(now, 0, None)
            if wait <= 0:
                if lane_refusal is not None:
                    return lane_refusal
                slot = await source.take(now)
            if slot is None:
                # Past the lane's refusal too, when it is known: back sooner, the client
                # would be refused again by the shared budget.
                shared = 0.0 if lane_refusal is None else lane_refusal.retry_after
                return Refusal(
                    Reason.TOKEN_QUOTA,
                    max(wait, source.retry_in(now), shared),
                    "This token's own quota is spent",
                )
        return TokenCharge(source, slot)

    async def _get(self, token: TokenRecord) -> Quota | None:
        """The token's quota, its source made and restored on first use and its view
        rebuilt when its limits change; None without one. One source per token for as
        long as it has a quota: slots charged before a change are given back to it."""
        limits = token_limits(token)
        known = self.in_use.get(token.id)
        if not limits:
            if known is not None:  # the quota was taken away
                del self.in_use[token.id]
                self._in_background(known.source.close())
            return None
        now = self.clock()
        if known is None:
            source = self._sources(f"quota:{token.id}", limits)
            restore = asyncio.ensure_future(source.restore(now))
            known = self.in_use[token.id] = Quota(limits, source, token.name, restore)
        elif known.limits != limits:
            known.limits = limits
            relimit = functools.partial(known.source.relimit, limits, now)
            known.ready = asyncio.ensure_future(_after(known.ready, relimit))
        ready = known.ready
        if not ready.done():
            # Shared by every request of the token that arrives meanwhile; a caller that
            # leaves does not cancel it for the others.
            with contextlib.suppress(Exception):
                await asyncio.shield(ready)
        if ready.cancelled() or ready.exception() is not None:
            if self.in_use.get(token.id) is known:  # made again by the next request
                del self.in_use[token.id]
                self._in_background(known.source.close())
            raise StateUnavailable("token quota: the state could not be read")
        return known

    def _in_background(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def views(self) -> dict[str, list[WindowView]]:
        """Every quota in use, by token name, at now."""
        now = self.clock()
        return {q.token_name: q.source.snapshot(now) for q in self.in_use.values()}

    async def close(self) -> None:
        """Close every quota's source, and wait for those closing in the background."""
        while self.in_use:
            _, quota = self.in_use.popitem()
            quota.ready.cancel()
            await quota.source.close()
        await asyncio.gather(*self._closing, return_exceptions=True)


async def _after(
    previous: asyncio.Future[None], then: Callable[[], Coroutine[object, object, None]]
) -> None:
    """``then()`` once ``previous`` has ended, however it ended; cancelled, it cancels
    ``previous`` too (a closing scheduler cancels only the last of a chain)."""
    try:
        await asyncio.wait([previous])
    except asyncio.CancelledError:
        previous.cancel()
        raise
    if not previous.cancelled():
        previous.exception()  # retrieved: its callers were told, or there were none
    await then()
