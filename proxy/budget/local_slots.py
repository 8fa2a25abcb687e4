"""A credential's send slots kept by this process: :class:`LocalSlots`, written ahead to a
:class:`~proxy.budget.slots.SendLog` (``memory://``, ``sqlite://``) and shared through it with
the other processes on the same SQLite file.

All times are wall-clock seconds (``time.time``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine, Sequence

from proxy.budget.classes import UNCLASSED, ClassBook
from proxy.budget.lease import LEASE_SECONDS, Lease, block_size, lease_end, next_length
from proxy.budget.slots import LINE_GRACE, Line, Row, SendLog, Slot, StateUnavailable
from proxy.budget.windows import CredentialBudget, Limit, WindowView

log = logging.getLogger("echowin_gateway.budget")

__all__ = ["LocalSlots"]


class LocalSlots:
    """The budget of one credential kept by this process, written ahead to a :class:`SendLog`
    (and shared through it with the other processes on the same SQLite file).

    Every slot is durable before ``take`` returns it. Far from every limit, one row reserves
    a block of slots (a *lease*) that this process hands out for the next ``lease_seconds``;
    they are recorded at the lease's end, the latest moment any of them can leave, so a
    restart or another process counts every one of them for at least as long as echowin
    does. Slots a lease did not use are given back when the process takes again after the
    lease's end, or by a timer if it does not (an idle worker). Near a limit each send has
    its own row, recorded at the moment it is taken. See docs/budget.md, "Write-ahead".
    """

    LEASE_SECONDS = LEASE_SECONDS  # how long the slots of a first block may be handed out
    # An idle process gives back a lease's unused slots this long (loop time) after taking
    # it: the lease is over by then. Longer than the lease, so a test moving a fake clock
    # meets the timer only if it runs that long in real time.
    LEASE_IDLE_SECONDS = 1.0
    POLL_SECONDS = 0.05  # how often ``refresh`` reads other processes' rows

    def __init__(
        self,
        name: str,
        budget: CredentialBudget,
        log: SendLog,
        clock: Callable[[], float] | None = None,
        *,
        leases: bool = True,
        classes: ClassBook | None = None,
    ) -> None:
        """``clock``: read again when a row is planned, since ``reserve`` may have waited
        for another process's write lock: a send is never stamped before it was decided.
        ``leases``: False for a token's quota, whose requests may move between processes
        (a lease's unused slots stay with the process that took it until it takes again).
        ``classes``: the credential's classes of service, checked with every take. A lease
        is then only as large as what no class's reservation needs, its slots go to
        requests of any class and are counted by none (UNCLASSED), and a paced class never
        takes from one.
        """
        self.name = name
        self.clock = clock
        self.budget = budget
        self.log = log
        self.classes = classes
        self._block_max = log.block_max if leases else 1
        self.durable = log.durable
        self.remembers_external = False  # the log holds this gateway's own sends only
        self.healthy = True
        self.changes = 0
        self.on_frozen: Callable[[float], None] | None = None
        self._lease: Lease | None = None
        # Slots the last lease handed out (None: none yet) and the next one's length: _paced.
        self._demand: int | None = None
        self.lease_seconds = self.LEASE_SECONDS
        self._line_due = -math.inf  # the ``due`` of this process's place in line
        self._yield_until = -math.inf  # a slot is free but another process's turn
        self._served = 0.0  # when this process last got a slot from the log (its line order)
        self._polled = -math.inf
        self._background: set[asyncio.Task[None]] = set()
        # Slots given back while ``relimit`` reads the log: written once the new view is in.
        self._held: list[float] | None = None

    async def take(self, now: float, waiting: bool = False, cls: str | None = None) -> Slot | None:
        book = self.classes
        if book is not None:
            cls = book.resolve(cls)
        lease = self._lease
        if lease is not None:
            if lease.left > 0 and now <= lease.at and not (book and book.paced(cls)):
                lease.left -= 1
                return Slot(lease.at, committed=True, cls=lease.cls or None)
            self._lease = None
            self._paced(lease, ended=now > lease.at)
            returned: Row | None = (lease.at, -lease.left, lease.cls) if lease.left else None
            for _ in range(lease.left):
                self.budget.release(lease.at)
                if book is not None:
                    book.release(lease.cls or None, lease.at)
        else:
            returned = None
        if returned is None:
            # The view is never more pessimistic than the log: no trip needed, unless this
            # process waits and its place in line would lapse before it tries again.
            retry = max(self.budget.wait_time(now), self._yield_until - now)
            if book is not None:
                retry = max(retry, book.wait(cls, now, self.budget))
            if retry > 0 and not (waiting and self._line_due < now + retry + LINE_GRACE / 2):
                return None
        planned: list[Row] = []

        def plan(rows: list[Row], line: Line) -> Row | None:
            row = self._plan(now, rows, line, waiting, cls)
            if row is not None:
                planned.append(row)
            return row

        try:
            row = self.log.reserve(self.name, plan, returned)
        except Exception as exc:
            for at, n, row_cls in planned:  # not written: not reserved
                for _ in range(n):
                    self.budget.release(at)
                    if book is not None:
                        book.release(row_cls or None, at)
            self._line_due = -math.inf  # the place in line was not written either
            log.warning(
                "send log write failed",
                extra={"fields": {"credential": self.name, "error": type(exc).__name__}},
            )
            raise StateUnavailable(f"send log: {type(exc).__name__}") from exc
        if row is None:
            return None
        at, n, row_cls = row
        if n > 1:
            lease = self._lease = Lease(at, n - 1, row_cls, self.lease_seconds)
            idle = lease.idle_after(now, self.LEASE_IDLE_SECONDS)
            asyncio.get_running_loop().call_later(idle, self._lease_idle, lease)
        return Slot(at, committed=True, cls=row_cls or None)

    def _paced(self, lease: Lease, ended: bool) -> None:
        """The next block's size (_block) and length (next_length), after ``lease``."""
        self._demand = lease.used
        shortest = min(lim.per_seconds for lim in self.budget.limits)
        self.lease_seconds = next_length(lease, ended, shortest)

    def _lease_idle(self, lease: Lease) -> None:
        """The lease timer. If this process has not taken since the lease ended (an idle
        worker), its unused slots would stay reserved until it takes again: give them back
        now, for the other processes."""
        if self._lease is lease:
            self._end_lease(paced=True)  # it lasted its length: a pace to learn from

    def _plan(
        self, now: float, rows: list[Row], line: Line, waiting: bool, cls: str | None = None
    ) -> Row | None:
        """Inside the log's transaction: what to reserve, given the others' new rows and
        who else waits in line (each process ahead of this one gets a free slot first)."""
        if self.clock is not None:
            now = max(now, self.clock())
        self._merge(rows)
        self._yield_until = -math.inf
        # Ahead: served before us and about to try (a process that will not try within
        # the grace is not ready for this slot; it keeps its place for a later one).
        ahead = [
            due
            for served, due in line.others
            if served < self._served and now <= due <= now + 2 * LINE_GRACE
        ]
        wait = self.budget.wait_time(now)
        book = self.classes
        if book is not None:  # the class rules, against every process's sends
            wait = max(wait, book.wait(cls, now, self.budget))
        if wait <= 0:
            free = min(self.budget.remaining(now, i) for i in range(len(self.budget.limits)))
            if free > len(ahead):
                n = self._block(now, cls)
                newest = self.budget.newest()
                at = lease_end(now, self.lease_seconds, newest) if n > 1 else now
                # A block's slots go to any class: counted by none (it fits the surplus).
                row_cls = "" if book is None else (cls or "") if n == 1 else UNCLASSED
                for _ in range(n):
                    self.budget.record(at)
                    if book is not None:
                        book.record(row_cls, at)
                line.mine = None  # served: behind every waiting process next time
                self._line_due = -math.inf
                self._served = now
                return at, n, row_cls
            # The slot is theirs: look again when the first of them said it would try
            # (it has taken it by then, or it comes late), and at the latest when its
            # place lapses.
            due = min(ahead)
            self._yield_until = due - LINE_GRACE + 0.001 if due - LINE_GRACE > now else due
            retry = self._yield_until
        else:
            retry = now + wait
        if waiting:
            line.mine = (self._served, retry + LINE_GRACE)
            self._line_due = retry + LINE_GRACE
        return None

    def _block(self, now: float, cls: str | None = None) -> int:
        """How many slots one row reserves (:func:`block_size`): far from every limit, and
        with classes far from what their reservations need; 1 for a paced class."""
        book = self.classes
        if self._block_max <= 1 or (book is not None and book.paced(cls)):
            return 1
        free = min(self.budget.remaining(now, index) for index in range(len(self.budget.limits)))
        if book is not None:
            free = min(free, book.surplus(now, self.budget))
        return block_size(free, self._block_max, self._demand)

    def _merge(self, rows: list[Row]) -> None:
        if rows:
            self.changes += 1
        frozen: float | None = None
        book = self.classes
        for at, n, cls in rows:
            if n == 0:  # another process met an unexpected 429: the key is frozen for all
                self.budget.freeze(at)
                frozen = at if frozen is None else max(frozen, at)
            elif n > 0:
                for _ in range(n):
                    self.budget.record(at)
                    if book is not None:
                        book.record(cls or None, at)
            else:
                for _ in range(-n):
                    self.budget.release(at)
                    if book is not None:
                        book.release(cls or None, at)
        # Told once every row is in: a give-back written after the freeze (the lease's
        # unused slots, a send that never left) may let a waiter last until the first send.
        if frozen is not None and self.on_frozen is not None:
            self.on_frozen(frozen)

    async def refresh(self, now: float) -> None:
        self.refreshed(now)

    def refreshed(self, now: float) -> bool:
        if now - self._polled >= self.POLL_SECONDS or now < self._polled:
            self._polled = now
            self._merge(self.log.poll(self.name))
        return True

    async def commit(self, slot: Slot) -> None:
        if not slot.committed:  # every slot ``take`` hands out is already written ahead
            raise ValueError("a slot must come from take()")

    def give_back(self, slot: Slot) -> None:
        lease = self._lease
        if lease is not None and slot.at == lease.at:
            # Back into its lease, whose row covers it: handed out again only before the
            # lease ends, given back with the lease's other unused slots after.
            lease.left += 1
            return
        self.budget.release(slot.at)
        if self.classes is not None:
            self.classes.release(slot.cls, slot.at)
        if not slot.committed:
            return
        if self._held is not None:
            self._held.append(slot.at)
        else:
            self._spawn(self.log.give_back(self.name, slot.at, 1, slot.cls or ""))

    def answered(self, slot: Slot, now: float) -> None:
        to = now - self.budget.guard
        if to <= slot.at or not slot.committed or self._held is not None:
            return  # in time (most answers); or a relimit reads the log: left as it is
        self.budget.move(slot.at, to)
        if self.classes is not None:
            self.classes.release(slot.cls, slot.at)
            self.classes.record(slot.cls, to)
        self._spawn(self.log.move(self.name, slot.at, to, slot.cls or ""))
        slot.at = to

    def retry_in(self, now: float) -> float:
        return max(self.budget.wait_time(now), self._yield_until - now, 0.0)

    def predict_wait(self, now: float, ahead: int, horizon: float | None) -> float:
        return self.budget.predict_wait(now, ahead, horizon=horizon)

    def observe(self, now: float, limit: int, remaining: int) -> None:
        # Compare with every send of ours made before this answer came back, not only those
        # before this one left: concurrent requests reach echowin in any order, and counting
        # a reordered send of ours as someone else's would waste a slot for a whole window.
        # The cost: others' use hidden behind our in-flight sends shows up one answer later.
        # Unused slots of an open lease count as ours too: far from the limits only.
        index = self.budget.window_index(limit)
        if limit - remaining <= self.budget.count(now, index):
            return  # echowin counts no more than we know of: nothing to learn (most answers)
        # echowin counts more than we know of: first read what the other processes on this
        # log sent (not someone else's use of the key), then compare.
        self._read_others()
        self.budget.observe(
            now, limit=limit, remaining=remaining, sent_count=self.budget.own_count(now, index)
        )

    def assume_external(self, now: float, used: int) -> None:
        # echowin's count includes what the other processes on this log sent (every worker
        # of a first start probes): read their rows first, or they would count twice.
        self._read_others()
        self.budget.assume_external(now, used)

    def _read_others(self) -> None:
        """Merge what the other processes on this log wrote since the last read; a log
        that cannot be read now is read at the next refresh."""
        with contextlib.suppress(Exception):
            self._merge(self.log.poll(self.name))

    def freeze(self, until: float) -> None:
        self.budget.freeze(until)
        self._spawn(self.log.freeze(self.name, until))  # for a restart and other workers
        self._end_lease()  # nothing more leaves before ``until``

    def _end_lease(self, paced: bool = False) -> None:
        """Give the open lease's unused slots back now (the view at once, the log behind).
        ``paced``: it lasted its length (else it ends early: a freeze, new limits, a stop)."""
        lease = self._lease
        # Used up or not: a slot of it given back later goes back to the budget, never
        # into the lease, which would hand it out again (past a freeze, or never give it
        # back to the others).
        self._lease = None
        if lease is not None and paced:
            self._paced(lease, ended=True)
        elif lease is not None:
            self._demand = lease.used
        if lease is not None and lease.left:
            for _ in range(lease.left):
                self.budget.release(lease.at)
                if self.classes is not None:
                    self.classes.release(lease.cls or None, lease.at)
            self._spawn(self.log.give_back(self.name, lease.at, lease.left, lease.cls))

    def frozen_until(self, now: float) -> float | None:
        return self.budget.frozen_until(now)

    def snapshot(self, now: float) -> list[WindowView]:
        # The open lease's unused slots are reserved, not spent: shown as free.
        lease = self._lease
        return self.budget.snapshot(now, lease.left if lease is not None else 0)

    def tightest(self, now: float) -> tuple[int, int, list[float]]:
        lease = self._lease
        return self.budget.tightest(now, lease.left if lease is not None else 0)

    async def restore(self, now: float) -> None:
        await self._load(self.budget, now)
        if self.classes is not None:  # each class's sends, for its reserve and its pace
            horizon = max(lim.per_seconds for lim in self.budget.limits) + self.budget.guard
            sends = await self.log.recent_classes(self.name, now - horizon)
            self.classes.load(((at, cls or None) for at, cls in sends), now)

    async def _load(self, budget: CredentialBudget, now: float) -> None:
        horizon = max(lim.per_seconds for lim in budget.limits) + budget.guard
        budget.load(await self.log.recent(self.name, now - horizon), now)
        until = await self.log.frozen(self.name)
        if until is not None:
            budget.freeze(until)

    async def relimit(self, limits: Sequence[Limit], now: float) -> None:
        old = self.budget
        self._end_lease()
        if not self.durable:  # nothing to read back: the view is all there is
            self.budget = old.relimited(limits, now)
            return
        budget = CredentialBudget(limits, old.guard)
        # The log holds every send, older than the old limits' windows too. Rows written
        # in the background (given back) go first; slots given back while it is read are
        # held, or the read might miss their rows and this process never reads its own.
        held: list[float] = []
        self._held = held
        try:
            await asyncio.gather(*self._background, return_exceptions=True)
            await self._load(budget, now)
            self.budget = budget  # the old view serves until the new one is whole
        finally:
            self._held = None
            for at in held:
                if self.budget is budget:  # the old view released it already
                    budget.release(at)
                self._spawn(self.log.give_back(self.name, at, 1))

    async def close(self) -> None:
        self._end_lease()
        if self._background:  # the lease's slots given back among them
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
