"""Where one credential's send slots come from: the scheduler's state boundary.

A :class:`SlotSource` reserves a send slot (the hard cap), makes it durable before the
request leaves, gives it back when nothing left, and learns from echowin's answers.
:class:`~proxy.budget.local_slots.LocalSlots` keeps the budget in this process (``memory://``,
``sqlite://``); ``proxy.state.redis.slots.RedisSlots`` keeps it in Redis, shared by every
replica. The scheduler (fairness, queueing) is the same for both; one place
(proxy/state/__init__.py) picks.

All times are wall-clock seconds (``time.time``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

from proxy.budget.windows import CredentialBudget, Limit, WindowView


class StateUnavailable(Exception):
    """The shared state cannot be reached and the configured mode says: stop (503)."""


@dataclasses.dataclass(slots=True, eq=False)
class Slot:
    """One reserved send. ``at`` is local wall-clock seconds; ``ref`` is the backend's own
    handle (a Redis member id), None for local slots. ``committed`` once written ahead.
    ``cls``: the class of service it was taken for (None: classes are not kept)."""

    at: float
    ref: str | None = None
    committed: bool = False
    cls: str | None = None


Row = tuple[float, int, str]
"""One write-ahead record: ``(at, n, cls)``, ``n`` sends counted at ``at`` (seconds); a
negative ``n`` gives back that many sends recorded at ``at`` (they never left); ``n`` = 0 is
a freeze: no send before ``at``. ``cls``: the class of service of those sends ("" when
classes are not configured, or the row is a freeze), so that every process on the log and
a restart count each class's sends (docs/budget.md, "Classes of service")."""

LINE_GRACE = 0.05
"""Seconds a process keeps its turn for a free slot past the moment it said it would try
(see :class:`Line`); after that the others stop waiting for it."""


@dataclasses.dataclass(slots=True)
class Line:
    """The processes that wait to send with one credential (``serve --workers``: they
    share one SQLite file; replicas: one Redis). Each waiting process has one place,
    ``(served, due)``: when it last got a slot, and the moment after which it has lost
    its turn (it said it would try again by ``due`` - LINE_GRACE). A free slot goes to the
    waiting process served longest ago, so no worker's queue can lose every race for the
    next slot to another's. ``others`` is read inside the log's transaction; ``plan``
    sets ``mine`` (None: not in line) and the log writes it there.
    """

    others: list[tuple[float, float]]
    mine: tuple[float, float] | None = None


class SendLog(Protocol):
    """Write-ahead record of sends, per credential (local backends only). A SQLite file
    may be shared by several processes (``serve --workers N``): each sees the others' rows.
    """

    durable: bool  # False: forgets on restart (memory://)
    block_max: int  # the most sends one row may reserve ahead (1: a row per send)

    def reserve(
        self,
        credential: str,
        plan: Callable[[list[Row], Line], Row | None],
        returned: Row | None,
    ) -> Row | None:
        """One atomic step, synchronous (a few tens of microseconds, on the event loop):
        read the rows other processes wrote for ``credential`` since the last call and
        the :class:`Line`, hand them to ``plan``, and write the row ``plan`` returns (if
        any) together with ``returned`` (slots given back, ``n`` < 0) and this process's
        place in line as ``plan`` left it. Durable when it returns; returns the planned
        row. Raises what the backend raises; nothing is written then."""

    def poll(self, credential: str) -> list[Row]:
        """Rows other processes wrote for ``credential`` since the last call."""

    async def give_back(self, credential: str, at: float, n: int, cls: str = "") -> None:
        """Record that ``n`` sends of class ``cls`` recorded at ``at`` never left."""

    async def move(self, credential: str, at: float, to: float, cls: str = "") -> None:
        """Record that one send of class ``cls`` recorded at ``at`` counts from ``to``
        instead (it may have reached echowin that late): both rows in one write."""

    async def freeze(self, credential: str, until: float) -> None:
        """Record a freeze: no send before ``until`` (a row with ``n`` = 0)."""

    async def frozen(self, credential: str) -> float | None:
        """The latest freeze recorded for ``credential``, if any."""

    async def recent(self, credential: str, since: float) -> list[float]:
        """Sends recorded after ``since``, net of those given back, oldest first. Later
        ``poll`` and ``reserve`` calls return only rows written after this one read."""

    async def recent_classes(self, credential: str, since: float) -> list[tuple[float, str]]:
        """The sends of a class (``cls`` not "") recorded after ``since``, net of those
        given back, with their class, oldest first (a restart rebuilds the classes)."""

    async def prune(self, before: float) -> None:
        """Drop every row recorded before ``before``."""

    async def close(self) -> None: ...


class SlotSource(Protocol):
    """The budget of one upstream credential, as the scheduler sees it."""

    durable: bool  # False: after a start nothing is known; calibrate with one probe
    remembers_external: bool  # True: others' use of the key learnt before a restart is kept
    healthy: bool  # False while a shared backend is unreachable
    changes: int  # bumped whenever the view learns what other processes did
    # Set by the lane that owns the source: called with ``until`` when the view learns of a
    # freeze another process set (its unexpected upstream 429), not for ``freeze`` here.
    on_frozen: Callable[[float], None] | None

    @property
    def budget(self) -> CredentialBudget:
        """The local view: exact for local slots, a mirror of the shared state otherwise."""

    async def refresh(self, now: float) -> None:
        """Bring the local view up to date before a prediction (no-op for local slots)."""

    def refreshed(self, now: float) -> bool:
        """Bring the view up to date as ``refresh`` does if that needs no wait (local
        slots read their log at once): True when it is up to date, False when only
        ``refresh`` can bring it (a shared view past its age)."""

    async def take(self, now: float, waiting: bool = False, cls: str | None = None) -> Slot | None:
        """Reserve one send at ``now`` if every limit allows it and no other process is
        ahead in line for it, else None. ``waiting``: this process has requests queued
        for the credential, so it keeps (or takes) a place in line. ``cls``: the class of
        service of the send (a source that keeps classes checks their rules in the same
        step). Raises StateUnavailable when the backend is down and the mode is "closed"."""

    async def commit(self, slot: Slot) -> None:
        """Make ``slot`` durable; returns before the request may leave."""

    def give_back(self, slot: Slot) -> None:
        """The slot's request never reached echowin: free it (durable state in background)."""

    def answered(self, slot: Slot, now: float) -> None:
        """echowin answered ``slot``'s send at ``now``, so it arrived no later. An answer
        more than the budget's guard after ``slot.at`` (a slow way in, a stalled process)
        moves the send to ``now - guard``: it counts until ``now`` plus each window, as
        echowin's count may (docs/budget.md, "Late answers")."""

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

    def tightest(self, now: float) -> tuple[int, int, list[float]]:
        """``CredentialBudget.tightest`` of the view ``snapshot`` shows."""

    async def restore(self, now: float) -> None:
        """Load what the backend remembers (after a restart)."""

    async def relimit(self, limits: Sequence[Limit], now: float) -> None:
        """New limits over the same sends (a token's quota changed): the view is rebuilt
        from what the state still holds (a longer new window counts only the sends the
        state kept: SQLite an hour, Redis the old longest window); slots handed out before
        stay valid to give back, during the rebuild too."""

    async def close(self) -> None: ...
