"""The upstream budget in Redis, shared by every replica (``state: redis://...``).

A reservation is ONE Lua script per send (``proxy/state/lua/reserve.lua``) that reads Redis' own
clock (``TIME``, so replica clocks do not matter), checks every rolling window (the sends of every
replica plus the external sends echowin reported) and records the send only if all of them hold.
Nothing is counted before it is checked, so a refused attempt never eats budget. Keys expire on
their own and old members are trimmed on every reservation: memory stays bounded.

Each replica keeps a journal of its own recent sends (``journal.py``); its link to Redis
(``link.py``) runs the background: the health (alone while Redis is away, the journal replayed once
it answers), the idle refresh and the freeze listener. The mirrored view (``view.py``) serves
predictions. The keys are listed in ``proxy.state.redis``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from proxy.budget.slots import LINE_GRACE, Slot, StateUnavailable
from proxy.budget.windows import CredentialBudget, Limit, WindowView
from proxy.state.redis import scripts
from proxy.state.redis.client import STATE_ERRORS, RedisClient
from proxy.state.redis.fallback import PROBE_INTERVAL, SETTLE_SECONDS, Fallback, Settling
from proxy.state.redis.journal import Journal
from proxy.state.redis.link import RedisLink
from proxy.state.redis.scripts import reply_text
from proxy.state.redis.view import SharedView

__all__ = ["MIRROR_MAX_AGE", "QUOTA_IN_USE", "SETTLE_SECONDS", "RedisSlots"]

MIRROR_MAX_AGE = 0.1  # rebuild the shared view used for predictions at most this often, s
# A token quota's view is kept VIEW_MAX_IDLE fresh only this long after this replica last
# reserved from it (a credential's view: always); see RedisSlots(keep_view=...).
QUOTA_IN_USE = 60.0


class RedisSlots:
    """:class:`proxy.budget.slots.SlotSource` for one credential, on a shared Redis client.

    ``keep_view``: seconds after this replica's last reservation during which the idle
    refresh keeps the view at most VIEW_MAX_IDLE old. A credential's budget keeps it always
    (its fallback should start from a young view); a token's quota QUOTA_IN_USE, so that
    thousands of tokens cost Redis calls only for those in use (an older view only widens
    the fallback's blind margin: never unsafe)."""

    durable = True
    remembers_external = True  # the ext:{i} keys keep what echowin reported to any replica
    class_table: scripts.ClassTable | None = None  # set by a lane with classes of service

    def __init__(
        self,
        name: str,
        client: RedisClient,
        prefix: str,
        limits: Sequence[Limit],
        guard: float,
        *,
        replicas: int,
        mode: Literal["closed", "local"],
        on_latency: Callable[[str, float], None] | None = None,
        on_health: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.time,
        keep_view: float = math.inf,
    ) -> None:
        self.name = name
        self._redis = client
        self._prefix = prefix
        self._guard = guard
        self._mode = mode
        self._clock = clock
        self._on_latency = on_latency or (lambda op, seconds: None)
        self._replica = secrets.token_hex(6)
        self._scripts = scripts.Scripts(client)
        self._set_limits(limits)
        self._view = SharedView(self._limits, guard)
        self._journal = Journal(client, self._keys.sends, self._horizon)
        self._epoch = ""  # the epoch of the Redis state this replica knows ("": none yet)
        self._served = 0.0  # Redis time this replica last got a slot (its order in line)
        self._line_due = -math.inf  # local time our place in line lapses (-inf: no place)
        self._seq = 0
        self._hint_until = 0.0  # Redis said: no slot before this (local time)
        self._fallback: Fallback | None = None  # while Redis is away
        self._settling: Settling | None = None  # just back: its share still holds (Settling)
        self._link = link = RedisLink(
            self,
            client,
            self._scripts,
            self._keys,
            self._view,
            self._journal,
            replica=self._replica,
            replicas=replicas,
            mode=mode,
            clock=clock,
            keep_view=keep_view,
            on_latency=self._on_latency,
            on_health=on_health or (lambda up: None),
        )
        # Bound once: the per-send and per-answer paths look up no link on their way.
        self._spawn = link.spawn
        self._quietly = link.quietly
        self._release = link.release
        # Set by the lane: told when the view learns of a freeze another replica set.
        self.on_frozen: Callable[[float], None] | None = None
        self.healthy = True
        self.changes = 0  # bumped when the view learns what other replicas did

    def _set_limits(self, limits: Sequence[Limit]) -> None:
        self._limits = tuple(limits)
        tagged = scripts.hash_tagged(self._redis)
        self._keys = scripts.BudgetKeys(self._prefix, self.name, len(self._limits), tagged=tagged)
        self._horizon = max(lim.per_seconds for lim in self._limits) + self._guard

    async def relimit(self, limits: Sequence[Limit], now: float) -> None:
        self._set_limits(limits)
        self._view.relimit(self._limits, self._guard)
        self._journal.horizon = self._horizon
        self._hint_until = 0.0
        if self._fallback is not None:  # Redis is away: carry what this replica counts alone
            self._fallback = self._fallback.relimited(self._limits, now)
        await self.restore(now)

    # --- reserving -------------------------------------------------------------------

    async def take(self, now: float, waiting: bool = False, cls: str | None = None) -> Slot | None:
        share = None if self._settling is None else self._settling.share(now, self.healthy)
        if share is not None and not share.take(now):
            return None  # just back in Redis, and past this replica's share (Settling)
        slot = await self._take(now, waiting, cls)
        if slot is None and share is not None:
            share.give_back(now)
        return slot

    async def _take(
        self, now: float, waiting: bool, cls: str | None, *, again: bool = True
    ) -> Slot | None:
        if not self.healthy:
            return self._take_alone(now, cls)
        if now < self._hint_until and not (waiting and self._line_due < self._hint_until):
            return None  # no slot before the hint, and our place in line (if we wait) holds
        self._seq += 1
        member = f"{self._replica}:{self._seq}" + (f"|{cls}" if cls else "")
        args = scripts.reserve_args(
            member=member,
            waiting=waiting,
            served=self._served,
            cursor=self._view.cursor,
            known_epoch=self._epoch,
            new_epoch=secrets.token_hex(8),
            replica=self._replica,
            guard=self._guard,
            horizon=self._horizon,
            limits=self._limits,
        ) + scripts.class_args(cls, self.class_table)
        call = asyncio.ensure_future(
            self._link.call("reserve", self._scripts.reserve, self._keys.reserve, args)
        )
        try:
            # The script runs to its end whoever waits: a caller that leaves meanwhile (a
            # client hanging up) must not leave its send recorded.
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(functools.partial(self._link.abandoned, member))
            raise
        except STATE_ERRORS as exc:
            # A timeout may come after the script ran: its send, if recorded, never leaves.
            self._journal.pending_release.append(member)
            self._link.went_down(exc)
            # The failed call took time (up to the Redis timeout): a send recorded at the
            # earlier `now` would stop counting before echowin stops counting it.
            return self._take_alone(self._clock(), cls)
        return await self._reserved(reply, now, member, waiting, again)

    async def _reserved(
        self, reply: list[Any], now: float, member: str, waiting: bool, again: bool
    ) -> Slot | None:
        """Act on reserve.lua's reply: ok (1, 0; -1: another epoch), wait (seconds), Redis
        time, the sends after our cursor, the epoch, the freeze (Redis time)."""
        ok, wait, redis_now = int(reply[0]), float(reply[1]), float(reply[2])
        self._view.offset = redis_now - now
        if ok < 0:  # Redis lost the shared state: put back what we know, then ask again
            if not await self._refill(reply_text(reply[4])):
                return self._take_alone(self._clock(), member.partition("|")[2] or None)
            if not again or "|" in member:  # a class's send: asked again by the lane
                return None
            # The refill took round trips: a send is placed at the time it is reserved.
            return await self._take(self._clock(), waiting, None, again=False)
        self._epoch = reply_text(reply[4])
        self._view.seen_at = now  # the view is current as of this answer
        link = self._link
        link.answered()
        link.used_at = now
        fresh = link.fresh
        if fresh is not None and fresh.done():  # restored, idle until now
            link.keep_fresh_running()
        self._heard_freeze(float(reply[5]) - self._view.offset, now)
        mine, learnt = self._view.learn(reply[3], now, member.encode())
        self.changes += learnt
        if not ok:
            self._hint_until = now + wait
            if waiting:  # the script wrote our place: good until the retry plus the grace
                self._line_due = self._hint_until + LINE_GRACE
            return None
        self._served = redis_now
        self._line_due = -math.inf
        at = now if mine is None else mine
        self._journal.add(at, member, now)
        return Slot(at, member)

    async def _refill(self, epoch: str) -> bool:
        """Redis answered with another epoch than ours: it lost the shared state (restarted
        empty). Put back our journal and every other replica's send we know of, and the
        freeze, before anything else is reserved or read; then the epoch is ours. False
        (and alone) when Redis went away meanwhile."""
        if not await self._link.refill():
            return False
        self._epoch = epoch
        return True

    def _take_alone(self, now: float, cls: str | None = None) -> Slot | None:
        """A send while Redis is away, if the fallback allows. Its member names its class
        (replayed under it), and the classes kept here (``view.on_learn``) count it now."""
        if self._mode == "closed":
            raise StateUnavailable("the shared state (Redis) cannot be reached")
        assert self._fallback is not None
        if not self._fallback.take(now):
            return None
        self._seq += 1
        member = f"{self._replica}:{self._seq}" + (f"|{cls}" if cls else "")
        self._journal.add(now, member, now)
        if (learn := self._view.on_learn) is not None:
            learn(member.encode(), now)
        return Slot(now, member)

    async def commit(self, slot: Slot) -> None:
        return None  # the reservation script recorded it before returning

    def give_back(self, slot: Slot) -> None:
        self._hint_until = 0.0
        self._view.budget.release(slot.at)
        settling = self._settling
        for fallback in (self._fallback, settling.fallback if settling else None):
            if fallback is not None:
                fallback.give_back(slot.at)
        self._journal.remove(slot.at, slot.ref or "")
        if slot.ref is not None:
            self._view.known.pop(slot.ref.encode(), None)  # never put back after a restart
            if self.healthy:
                self._spawn(self._release(slot.ref))
            else:  # Redis may hold it (taken before it went away): remove it once back
                self._journal.pending_release.append(slot.ref)

    def answered(self, slot: Slot, now: float) -> None:
        to = now - self._guard
        if to > slot.at and slot.ref is not None:
            self._link.move(slot.ref, slot.at, to, now)
            slot.at = to

    def retry_in(self, now: float) -> float:
        if not self.healthy:
            if self._mode == "closed":
                return PROBE_INTERVAL
            assert self._fallback is not None
            return self._fallback.retry_in(now)
        held = 0.0 if self._settling is None else self._settling.retry_in(now)
        return max(0.0, self._hint_until - now, held)

    # --- predictions and views -------------------------------------------------------

    def refreshed(self, now: float) -> bool:
        return not self.healthy or now - self._view.read_at < MIRROR_MAX_AGE

    async def refresh(self, now: float) -> None:
        """Rebuild the shared view from Redis if it is older than MIRROR_MAX_AGE."""
        if self.refreshed(now):
            return
        args = scripts.snapshot_args(horizon=self._horizon, new_epoch=secrets.token_hex(8))
        script, keys = self._scripts.snapshot, self._keys.snapshot
        try:
            reply = await self._link.call("snapshot", script, keys, args)
        except STATE_ERRORS as exc:
            self._link.went_down(exc)
            return
        # The reply: Redis time, the freeze (Redis time), the epoch, the sends (member,
        # score, ...), then each window's external sends.
        offset = float(reply[0]) - now
        epoch = reply_text(reply[2])
        if self._epoch and epoch != self._epoch:
            # Redis lost the shared state: what it holds is no view. Put back what we know
            # (the others' sends too) before the view replaces what we know.
            self._view.offset = offset
            await self._refill(epoch)
            return
        self._epoch = epoch
        self._link.answered()
        self._view.rebuild(reply[3], reply[4:], offset, now)
        self.changes += 1
        # Redis' freeze, told to the lane if it is news only now: the lane predicts who can
        # wait it out on this view, with the others' give-backs in it, not the one before.
        self._heard_freeze(float(reply[1]) - offset, now)
        if self._hint_until > now and self._view.budget.wait_time(now) <= 0:
            self._hint_until = 0.0  # another replica gave a slot back: worth asking again

    @property
    def budget(self) -> CredentialBudget:
        return self._fallback.budget if self._fallback is not None else self._view.budget

    def predict_wait(self, now: float, ahead: int, horizon: float | None) -> float:
        if self._fallback is not None:
            return self._fallback.predict_wait(now, ahead, horizon)
        return self._view.budget.predict_wait(now, ahead, horizon=horizon)

    def snapshot(self, now: float) -> list[WindowView]:
        return self.budget.snapshot(now)

    def tightest(self, now: float) -> tuple[int, int, list[float]]:
        return self.budget.tightest(now)

    def frozen_until(self, now: float) -> float | None:
        return self.budget.frozen_until(now)

    # --- what echowin says -----------------------------------------------------------

    def observe(self, now: float, limit: int, remaining: int) -> None:
        mirror = self._view.budget
        index = mirror.window_index(limit)
        lim = self._limits[index]
        used = limit - remaining
        # While alone, the fallback decides: it learns too. Its own sends count `replicas`
        # times there, which already leaves room for the others; echowin's count beyond
        # that is someone else's.
        fallback = None if self._fallback is None else self._fallback.budget
        for view in (mirror, fallback):
            if view is not None:
                own = view.own_count(now, index)
                view.observe(now, limit=limit, remaining=remaining, sent_count=own)
        if self.healthy:
            self._link.write_observe(self._keys.observe(index), used, lim, self._guard)

    def assume_external(self, now: float, used: int) -> None:
        self._view.budget.assume_external(now, used)

    def freeze(self, until: float) -> None:
        now = self._clock()
        self._view.budget.freeze(until)
        if self._fallback is not None:
            self._fallback.budget.freeze(until)
        if self.healthy and until > now:
            self._spawn(self._quietly("freeze", self._link.write_freeze(until - now)))

    def _heard_freeze(self, until: float, now: float) -> None:
        """Redis holds a freeze until ``until`` (local time): it holds in this view (and
        the fallback) too, and one the view did not know yet (another replica met an
        upstream 429) is told to the lane, which refuses at once the waiters that cannot
        wait it out."""
        fallback = None if self._fallback is None else self._fallback.budget
        if self._view.heard_freeze(until, now, fallback):
            self.changes += 1
            if self.on_frozen is not None:
                self.on_frozen(until)

    # --- health (the link decides when), plumbing ------------------------------------

    @property
    def sent(self) -> int:
        return self._seq

    def fall_back(self, fallback: Fallback) -> None:
        self._fallback, self._settling = fallback, None

    def rejoined(self) -> None:
        if self._fallback is not None and self._fallback.replicas > 1:  # others may be alone
            self._settling = Settling(self._fallback, self._clock() + SETTLE_SECONDS)
        self._fallback = None
        self._hint_until = 0.0
        self._view.read_at = -math.inf

    async def restore(self, now: float) -> None:
        link = self._link
        self._view.read_at = -math.inf
        link.used_at = max(link.used_at, now)
        await self.refresh(now)
        link.keep_fresh_running()
        if self.on_frozen is not None:
            link.listen(self._heard_freeze)

    async def close(self) -> None:
        await self._link.close()
        if self.healthy:  # leave the line at once (else the place lapses by itself)
            with contextlib.suppress(*STATE_ERRORS):
                await self._redis.hdel(self._keys.line, self._replica)
