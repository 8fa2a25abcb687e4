"""Where one credential's send slots come from: the scheduler's state boundary.

A :class:`SlotSource` reserves a send slot (the hard cap), makes it durable before the
request leaves, gives it back when nothing left, and learns from echowin's answers.
:class:`LocalSlots` keeps the budget in this process (``memory://``, ``sqlite://``);
``proxy.state.redis_budget.RedisSlots`` keeps it in Redis, shared by every replica. The
scheduler (fairness, queueing) is the same for both; one place (proxy/runtime.py) picks.

All times are wall-clock seconds (``time.time``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Protocol

from proxy.budget import CredentialBudget, WindowView


class StateUnavailable(Exception):
    """The shared state cannot be reached and the configured mode says: stop (503)."""


@dataclass(slots=True, eq=False)
class Slot:
    """One reserved send. ``at`` is local wall-clock seconds; ``ref`` is the backend's own
    handle (a Redis member id), None for local slots. ``committed`` once written ahead."""

    at: float
    ref: str | None = None
    committed: bool = False


class SendLog(Protocol):
    """Write-ahead record of sends, per credential (local backends only)."""

    durable: bool  # False: forgets on restart (memory://)

    async def append(self, credential: str, at: float) -> None:
        """Record a send at ``at`` (seconds); returns once it is durable."""

    async def remove(self, credential: str, at: float) -> None:
        """Forget one send recorded at ``at`` (it never left)."""

    async def recent(self, credential: str, since: float) -> list[float]:
        """Sends recorded after ``since``, oldest first."""

    async def prune(self, before: float) -> None:
        """Drop every send recorded before ``before``."""

    async def close(self) -> None: ...


class SlotSource(Protocol):
    """The budget of one upstream credential, as the scheduler sees it."""

    durable: bool  # False: after a start nothing is known; calibrate with one probe
    healthy: bool  # False while a shared backend is unreachable

    @property
    def budget(self) -> CredentialBudget:
        """The local view: exact for local slots, a mirror of the shared state otherwise."""

    async def refresh(self, now: float) -> None:
        """Bring the local view up to date before a prediction (no-op for local slots)."""

    async def take(self, now: float) -> Slot | None:
        """Reserve one send at ``now`` if every limit allows it, else None. Raises
        StateUnavailable when the backend is down and the mode is "closed"."""

    async def commit(self, slot: Slot) -> None:
        """Make ``slot`` durable; returns before the request may leave."""

    def give_back(self, slot: Slot) -> None:
        """The slot's request never reached echowin: free it (durable state in background)."""

    def retry_in(self, now: float) -> float:
        """Seconds until ``take`` may succeed again (0 if it may now)."""

    def predict_wait(self, now: float, ahead: int, horizon: float | None) -> float:
        """Seconds until a send with ``ahead`` sends before it could go (inf past horizon)."""

    def observe(self, now: float, limit: int, remaining: int) -> None:
        """echowin reported ``remaining`` of ``limit`` in its window after our send."""

    def assume_external(self, now: float, used: int) -> None:
        """After a start without history: ``used`` sends count at echowin, times unknown."""

    def freeze(self, until: float) -> None:
        """An unexpected upstream 429: no send before ``until``."""

    def frozen_until(self, now: float) -> float | None: ...

    def snapshot(self, now: float) -> list[WindowView]: ...

    async def restore(self, now: float) -> None:
        """Load what the backend remembers (after a restart)."""

    async def close(self) -> None: ...


class LocalSlots:
    """The budget in this process, written ahead to a :class:`SendLog`."""

    def __init__(self, name: str, budget: CredentialBudget, log: SendLog) -> None:
        self.name = name
        self.budget = budget
        self.log = log
        self.durable = log.durable
        self.healthy = True
        self._background: set[asyncio.Task[None]] = set()

    async def take(self, now: float) -> Slot | None:
        return Slot(now) if self.budget.try_record(now) else None

    async def refresh(self, now: float) -> None:
        return None

    async def commit(self, slot: Slot) -> None:
        await self.log.append(self.name, slot.at)
        slot.committed = True

    def give_back(self, slot: Slot) -> None:
        self.budget.release(slot.at)
        # A slot never written ahead has no row: removing "one row at that time" would
        # delete another send's, which a restart would then forget.
        if slot.committed:
            self._spawn(self.log.remove(self.name, slot.at))

    def retry_in(self, now: float) -> float:
        return self.budget.wait_time(now)

    def predict_wait(self, now: float, ahead: int, horizon: float | None) -> float:
        return self.budget.predict_wait(now, ahead, horizon=horizon)

    def observe(self, now: float, limit: int, remaining: int) -> None:
        # Compare with every send of ours made before this answer came back, not only those
        # before this one left: concurrent requests reach echowin in any order, and counting
        # a reordered send of ours as someone else's would waste a slot for a whole window.
        # The cost: others' use hidden behind our in-flight sends shows up one answer later.
        index = self.budget.window_index(limit)
        self.budget.observe(
            now, limit=limit, remaining=remaining, sent_count=self.budget.own_count(now, index)
        )

    def assume_external(self, now: float, used: int) -> None:
        self.budget.assume_external(now, used)

    def freeze(self, until: float) -> None:
        self.budget.freeze(until)

    def frozen_until(self, now: float) -> float | None:
        return self.budget.frozen_until(now)

    def snapshot(self, now: float) -> list[WindowView]:
        return self.budget.snapshot(now)

    async def restore(self, now: float) -> None:
        horizon = max(lim.per_seconds for lim in self.budget.limits) + self.budget.guard
        self.budget.load(await self.log.recent(self.name, now - horizon), now)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
