"""One credential's link to Redis off the send path; :class:`RedisSlots` holds one.

The link runs what keeps the shared slots in touch with Redis in the background: the
writes nobody waits for (a release, an observation, a freeze), the freeze listener
(``freezes.py``), the idle refresh of the mirrored view, and the health. When Redis cannot
be reached the replica either refuses (``on_state_failure: closed``) or carries on alone
(``local``) with the budget of ``fallback.py``; the link probes Redis until it answers,
then replays the journal (``journal.py``), so a Redis that restarted empty learns again
what this replica sent, and the slots share again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Literal, Protocol

from redis.exceptions import NoPermissionError, ResponseError

from proxy.budget.windows import CredentialBudget, Limit
from proxy.state.redis import scripts
from proxy.state.redis.client import STATE_ERRORS, RedisClient, cancelling, server_of
from proxy.state.redis.fallback import PROBE_INTERVAL, Fallback
from proxy.state.redis.freezes import FreezeListener
from proxy.state.redis.journal import Journal
from proxy.state.redis.view import SharedView

__all__ = ["VIEW_MAX_IDLE", "Linked", "RedisLink"]

log = logging.getLogger("echowin_gateway.state")

# An idle replica reads the shared view at least this often, seconds: should Redis go away,
# the fallback starts from a view this old at most (see Fallback.from_view).
VIEW_MAX_IDLE = 5.0


class Linked(Protocol):
    """The shared slots a link keeps in touch with Redis (``RedisSlots``)."""

    name: str  # the credential's (or token quota's), for the log
    healthy: bool  # False while Redis is away (the slots decide alone, or refuse)

    @property
    def sent(self) -> int:
        """How many sends this replica took so far, reserved or alone (only grows)."""

    def fall_back(self, fallback: Fallback) -> None:
        """Redis went away: decide with ``fallback`` until it answers again."""

    def rejoined(self) -> None:
        """Redis answers again and holds this replica's sends: share again (keeping to the
        share alone for a while, as others may not be back yet: ``fallback.Settling``)."""

    @property
    def budget(self) -> CredentialBudget:
        """The budget the slots decide with now (the fallback's while Redis is away)."""

    async def refresh(self, now: float) -> None:
        """Read the shared view again if it is old; falls back by itself if Redis is away."""


class RedisLink:
    """The background of one credential's shared slots: its writes nobody waits for, its
    health (went down, probe, rejoin) and the idle refresh of its view. Of ``keys`` it uses
    only those the limits do not change; ``keep_view``: see ``RedisSlots``."""

    def __init__(
        self,
        slots: Linked,
        client: RedisClient,
        budget_scripts: scripts.Scripts,
        keys: scripts.BudgetKeys,
        view: SharedView,
        journal: Journal,
        *,
        replica: str,
        replicas: int,
        mode: Literal["closed", "local"],
        clock: Callable[[], float],
        keep_view: float,
        on_latency: Callable[[str, float], None],
        on_health: Callable[[bool], None],
    ) -> None:
        self._slots = slots
        self._redis = client
        self._scripts = budget_scripts
        self._sends = keys.sends
        self._frozen = keys.frozen
        self._channel = keys.freezes
        self._view = view
        self._journal = journal
        self._replica = replica
        self._replicas = replicas
        self._mode = mode
        self._clock = clock
        self._keep_view = keep_view
        self._on_latency = on_latency
        self._on_health = on_health
        self.used_at = -math.inf  # local time of the last reservation (or restore)
        self.fresh: asyncio.Task[None] | None = None  # the idle refresh (_keep_fresh)
        self.listener: asyncio.Task[None] | None = None  # hears freezes (FreezeListener)
        self.tasks: set[asyncio.Task[Any]] = set()  # the writes nobody waits for
        self.closed = False
        self._observations = itertools.count()  # makes each observe's members unique
        self._server_now = server_of(client, keys.sends)
        self._server = self._server_now()  # who held the shared state at the last answer

    # --- failover and empty restarts -------------------------------------------------

    async def refill(self, others: Mapping[bytes, float] | None = None) -> bool:
        """Redis lost the shared state (it restarted empty, or a failover promoted a server
        that missed the last writes): put back our journal and every other replica's send
        we know of (``others``, default the view's), and the freeze, before anything else is
        read. False (and alone) when Redis went away meanwhile."""
        known = self._view.known if others is None else others
        try:
            await self._journal.replay(self._view.offset, self._clock(), known)
            await self.carry_freeze()
        except STATE_ERRORS as exc:
            self.went_down(exc)
            return False
        self._view.read_at = -math.inf  # read the view again, with what was put back
        return True

    def answered(self) -> None:
        """Redis answered: if another server holds the shared state than at the last answer
        (Sentinel promoted a replica, a cluster moved the slot to one), it may lack sends the
        old one acknowledged but never replicated: put them back, in the background.
        (A replica that met the failover as an error replays anyway, on rejoining.)"""
        server = self._server_now()
        if server != self._server:
            if self._server is not None:
                log.warning(
                    "shared state moved to another server",
                    extra={"fields": {"credential": self._slots.name}},
                )
                self.spawn(self.refill(dict(self._view.known)))  # as known before this answer
            self._server = server

    # --- background writes -----------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def quietly(self, op: str, call: Awaitable[Any]) -> None:
        """Await a write nobody waits for; a failure means Redis went away."""
        started = time.perf_counter()
        try:
            await call
        except STATE_ERRORS as exc:
            self.went_down(exc)
        finally:
            self._on_latency(op, time.perf_counter() - started)

    async def release(self, member: str) -> None:
        """Remove a send from the shared set (given back, or its caller left)."""
        started = time.perf_counter()
        try:
            await self._redis.zrem(self._sends, member)
        except STATE_ERRORS as exc:
            self._journal.pending_release.append(member)  # removed once Redis is back
            self.went_down(exc)
        finally:
            self._on_latency("release", time.perf_counter() - started)

    async def call(self, op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        """One script call the caller waits for, timed as ``op``."""
        started = time.perf_counter()
        try:
            return await script(keys=keys, args=args)
        finally:
            self._on_latency(op, time.perf_counter() - started)

    def move(self, member: str, at: float, to: float, now: float) -> None:
        """Our send ``member`` counts from ``to`` instead of ``at`` (its answer came late):
        in the journal (replayed so), the view (and the classes kept from it) and, when
        Redis answers, its score, which every replica's reservation counts. A send made
        alone keeps its place in the fallback's count."""
        self._journal.remove(at, member)
        self._journal.add(to, member, now)
        self._view.move(member.encode(), to)
        if self._slots.healthy:
            call = self._redis.zadd(self._sends, {member: to + self._view.offset}, xx=True)
            self.spawn(self.quietly("move", call))

    def abandoned(self, member: str, call: asyncio.Future[Any]) -> None:
        """A reservation whose caller left: remove its send if the script recorded one."""
        if call.cancelled():
            return
        if call.exception() is None and int(call.result()[0]) < 1:
            return  # refused: nothing recorded
        # Recorded, or failed (a timeout may come after the script ran): remove it.
        self._view.known.pop(member.encode(), None)
        self.spawn(self.release(member))

    def write_freeze(self, seconds: float) -> Awaitable[Any]:
        """The freeze script: no send for ``seconds`` (Redis time), published to the others."""
        args = scripts.freeze_args(seconds=seconds, channel=self._channel, replica=self._replica)
        result: Awaitable[Any] = self._scripts.freeze(keys=[self._frozen], args=args)
        return result

    def write_observe(self, keys: list[str], used: int, limit: Limit, guard: float) -> None:
        """echowin counts ``used`` sends in ``limit``'s window: what the replicas' sends
        do not explain goes in as external sends (observe.lua), in the background."""
        args = scripts.observe_args(
            used=used,
            span=limit.per_seconds + guard,
            requests=limit.requests,
            prefix=f"x:{self._replica}:{next(self._observations)}",
        )
        self.spawn(self.quietly("observe", self._scripts.observe(keys=keys, args=args)))

    async def carry_freeze(self) -> None:
        """A freeze set while alone (an upstream 429) must hold for every replica too."""
        now = self._clock()
        until = self._slots.budget.frozen_until(now)
        if until is not None:
            await self.write_freeze(until - now)

    def listen(self, heard: Callable[[float, float], None]) -> None:
        """Hear the freezes other replicas set, ``heard(until, now)`` in local time, from
        now until close; once (the listener subscribes again by itself)."""
        if self.listener is not None or self.closed:
            return
        view, clock = self._view, self._clock

        def heard_redis(until: float) -> None:  # the listener tells Redis time
            heard(until - view.offset, clock())

        listener = FreezeListener(
            self._redis,
            channel=self._channel,
            frozen_key=self._frozen,
            replica=self._replica,
            name=self._slots.name,
            heard=heard_redis,
            spawn=self.spawn,
            lost=self.listener_lost,
        )
        self.listener = asyncio.get_running_loop().create_task(listener.run())

    # --- health ----------------------------------------------------------------------

    def went_down(self, error: BaseException | None = None) -> None:
        """Redis did not answer (``error``, what the call raised): the slots decide alone
        from what they knew, and the probe runs until Redis answers again. A permission
        the ACL user lost since the start (NOPERM) is logged as an error, in Redis' words:
        only an operator can mend it; the slots carry on alone meanwhile, as for an outage."""
        slots = self._slots
        if not slots.healthy or self.closed:  # closed: no probe may start any more
            return
        slots.healthy = False
        self._on_health(False)
        now = self._clock()
        view = self._view
        # What every replica had sent as we last saw it, and our own sends (by member, so
        # nothing counts twice); externals echowin reported stay in the view's windows.
        sends = dict(view.known)
        sends.update((member.encode(), at) for at, member in self._journal.sends)
        fallback = Fallback.from_view(
            view.budget, sends.values(), age=now - view.seen_at, replicas=self._replicas, now=now
        )
        slots.fall_back(fallback)
        seen = view.budget.snapshot(now)
        alone = fallback.budget.snapshot(now)
        refused = isinstance(error, NoPermissionError) or (
            isinstance(error, ResponseError) and "can't run this command" in str(error)
        )
        log.log(
            logging.ERROR if refused else logging.WARNING,
            "shared state refuses a permission" if refused else "shared state unreachable",
            extra={
                "fields": {
                    "credential": slots.name,
                    "mode": self._mode,
                    "error": None if error is None else type(error).__name__,
                    # NOPERM, or a script's command refused (the start-up checks name it)
                    "refused": str(error) if refused else None,
                    "view_age_seconds": round(now - view.seen_at, 3),
                    # per window: free as last seen, and free alone (after the margin)
                    "free_seen": [w.remaining for w in seen],
                    "free_alone": [w.remaining for w in alone],
                }
            },
        )
        self.spawn(self._probe())

    async def _probe(self) -> None:
        """Until Redis answers: wait, ping; then replay our journal and share again."""
        slots = self._slots
        while not self.closed:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                # Sends taken alone while these calls are on their way are in the journal
                # only: replay again until a round found none (each round is idempotent).
                sent = None
                while sent != slots.sent:
                    sent = slots.sent
                    redis_now = await self._redis_time()
                    await self._journal.replay(redis_now - self._clock(), self._clock())
                    await self.carry_freeze()
                    await self._journal.release_pending()
            except STATE_ERRORS:
                if cancelling():
                    raise asyncio.CancelledError from None
                continue
            break
        if self.closed:
            return
        slots.rejoined()
        slots.healthy = True
        self._on_health(True)
        log.warning("shared state reachable again", extra={"fields": {"credential": slots.name}})

    def listener_lost(self) -> None:
        """The freeze subscription broke: ask Redis on the budget's own connection, and
        fall back only if it does not answer. A subscription that breaks alone (its node
        moved in a failover, a proxy closed it) must not send this replica alone while the
        others still share: its sends would be counted in Redis by nobody."""
        if self._slots.healthy and not self.closed:
            self.spawn(self._check_reachable())

    async def _check_reachable(self) -> None:
        try:
            await self._redis_time()
        except STATE_ERRORS as exc:
            if not self.closed and not cancelling():  # a close may read as an error
                self.went_down(exc)

    async def _redis_time(self) -> float:
        seconds, micros = await self._redis.time()
        return float(seconds) + micros / 1e6

    # --- the idle refresh ------------------------------------------------------------

    def keep_fresh_running(self) -> None:
        """Start the idle refresh unless it runs (not among tasks: it ends on its own)."""
        if (self.fresh is None or self.fresh.done()) and not self.closed:
            self.fresh = asyncio.get_running_loop().create_task(self._keep_fresh())

    async def _keep_fresh(self) -> None:
        """Read the shared view when nothing else has for VIEW_MAX_IDLE. Without it an idle
        replica's view ages, and a fallback built on an old view must assume the other
        replicas used every window meanwhile (nothing sent until they turn over). Ends once
        this replica has not reserved for ``keep_view`` seconds; a reservation starts it
        again."""
        while not cancelling():  # a cancel the refresh took for an outage ends it too
            now = self._clock()
            if now - self.used_at > self._keep_view:
                return  # not in use: no Redis call for it until it is
            left = self._view.seen_at + VIEW_MAX_IDLE - now
            if not self._slots.healthy or left > 0:  # away: the probe reads Redis again
                await asyncio.sleep(min(left, VIEW_MAX_IDLE) if left > 0 else VIEW_MAX_IDLE)
                continue
            try:
                await self._slots.refresh(now)  # Redis away: refresh falls back by itself
            except Exception as exc:  # a bug must not end the idle refresh for good
                log.warning(
                    "shared view refresh failed",
                    extra={"fields": {"credential": self._slots.name, "error": type(exc).__name__}},
                )
                await asyncio.sleep(VIEW_MAX_IDLE)

    async def close(self) -> None:
        """Stop every task of the link (and start none from now on)."""
        self.closed = True
        running = [task for task in (self.fresh, self.listener, *self.tasks) if task]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
