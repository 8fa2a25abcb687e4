"""The upstream budget in Redis, shared by every replica (``state: redis://...``).

A reservation is ONE Lua script per send that reads Redis' own clock (``TIME``, so replica
clocks do not matter), checks every rolling window (the sends of every replica plus the
external sends echowin reported) and records the send only if all of them hold. Nothing is
counted before it is checked, so a refused attempt never eats budget. Keys expire on their
own and old members are trimmed on every reservation: memory stays bounded.

Each replica keeps a journal of its own recent sends. When Redis cannot be reached the
replica either refuses (``on_state_failure: closed``) or carries on alone
(``local``) with a budget seeded from the last shared view in which each of its own sends
counts ``replicas`` times: every replica then gets 1/replicas of what is left, so their
sum stays within echowin's limits. When Redis answers again the replica replays its
journal (idempotent: members are unique ids), so a Redis that restarted empty learns
again what was sent.

Keys, for credential ``c`` and prefix ``p``: ``p{c}:sends`` (sorted set, score = Redis
time of the send, member = ``replica:seq``), ``p{c}:ext:{i}`` (external sends counted in
window ``i``), ``p{c}:frozen`` (Redis time until which nothing may be sent) and
``p{c}:line`` (hash: the replicas waiting for the next free slot, ``proxy.budget.slots.Line``).
A freeze is also published on the channel ``p{c}:freezes`` (``"<replica> <Redis time>"``),
so that the other replicas refuse their waiters at once (``RedisSlots.on_frozen``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.budget.slots import LINE_GRACE, Slot, StateUnavailable
from proxy.budget.windows import CredentialBudget, Limit, WindowView

log = logging.getLogger("echowin_gateway.state")

# Rebuild the shared view used for predictions at most this often, seconds.
MIRROR_MAX_AGE = 0.1
# While Redis is down, probe it this often, seconds.
PROBE_INTERVAL = 0.5
# An idle replica reads the shared view at least this often, seconds: should Redis go away,
# the fallback starts from a view this old at most (see RedisSlots._went_down).
VIEW_MAX_IDLE = 5.0
# A token quota's view is kept VIEW_MAX_IDLE fresh only this long after this replica last
# reserved from it (a credential's view: always); see RedisSlots(keep_view=...).
QUOTA_IN_USE = 60.0
# A freeze read back from Redis within this of the one the view holds is the same freeze
# (each read converts Redis time with its own clock offset: they differ by a round trip).
FREEZE_SAME = 0.05

_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local k = tonumber(ARGV[3])
local guard = tonumber(ARGV[2])
local horizon = tonumber(ARGV[4 + 2 * k])
local since = '(' .. ARGV[5 + 2 * k]
local me, waiting, grace = ARGV[6 + 2 * k], ARGV[7 + 2 * k] == '1', tonumber(ARGV[8 + 2 * k])
local served = tonumber(ARGV[9 + 2 * k])
local line = KEYS[k + 3]
-- The state's epoch: set by the first reservation a Redis sees. A replica that knew another
-- one is talking to a Redis that lost its data (restarted empty behind a client that
-- reconnected by itself): it must put back what it knows before anything is reserved.
local epoch = redis.call('GET', KEYS[k + 4])
if not epoch then
  epoch = ARGV[11 + 2 * k]
  redis.call('SET', KEYS[k + 4], epoch)
end
redis.call('PEXPIRE', KEYS[k + 4], math.ceil(horizon * 1000))
if ARGV[10 + 2 * k] ~= '' and ARGV[10 + 2 * k] ~= epoch then
  return {-1, '0', string.format('%.6f', now), {}, epoch}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.6f', now - horizon))
local wait = 0
local free = math.huge
local frozen = tonumber(redis.call('GET', KEYS[k + 2]) or '0')
if frozen > now then wait = frozen - now end
for i = 1, k do
  local n = tonumber(ARGV[3 + i])
  local span = tonumber(ARGV[3 + k + i]) + guard
  local lo = '(' .. string.format('%.6f', now - span)
  local c = redis.call('ZCOUNT', KEYS[1], lo, '+inf')
  c = c + redis.call('ZCOUNT', KEYS[1 + i], lo, '+inf')
  if n - c < free then free = n - c end
  if c >= n then
    local m = c - n + 1
    local scores = {}
    for _, key in ipairs({KEYS[1], KEYS[1 + i]}) do
      local got = redis.call('ZRANGEBYSCORE', key, lo, '+inf', 'WITHSCORES', 'LIMIT', 0, m)
      for j = 2, #got, 2 do scores[#scores + 1] = tonumber(got[j]) end
    end
    table.sort(scores)
    local w = scores[m] + span - now
    if w > wait then wait = w end
  end
end
-- The line of replicas waiting for a free slot (proxy.budget.slots.Line): field = replica,
-- value = 'served due'. Each replica served before this one and about to try gets a
-- free slot first.
local mine = false
local ahead, first = 0, nil
local raw = redis.call('HGETALL', line)
for j = 1, #raw, 2 do
  local s, d = string.match(raw[j + 1], '^(%S+) (%S+)$')
  s, d = tonumber(s), tonumber(d)
  if raw[j] == me then
    mine = true
  elseif d < now - horizon then
    redis.call('HDEL', line, raw[j])
  elseif s < served and d >= now and d <= now + 2 * grace then
    ahead = ahead + 1
    if first == nil or d < first then first = d end
  end
end
local ok = 0
local retry = now + wait
if wait <= 0 then
  if free > ahead then
    redis.call('ZADD', KEYS[1], string.format('%.6f', now), ARGV[1])
    redis.call('PEXPIRE', KEYS[1], math.ceil(horizon * 1000))
    if mine then redis.call('HDEL', line, me) end
    ok = 1
  else
    -- theirs: look again when the first of them said it would try, or when it lapses
    if first - grace > now then retry = first - grace + 0.001 else retry = first end
    wait = retry - now
  end
end
if ok == 0 and waiting then
  redis.call('HSET', line, me, string.format('%.6f %.6f', served, retry + grace))
  redis.call('PEXPIRE', line, math.ceil(horizon * 1000))
end
-- Every send recorded after the caller's cursor (its own included): keeps its view fresh.
local fresh = redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf', 'WITHSCORES', 'LIMIT', 0, 1000)
return {ok, string.format('%.6f', math.max(wait, 0)), string.format('%.6f', now), fresh, epoch,
  string.format('%.6f', frozen)}
"""

_SNAPSHOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lo = '(' .. string.format('%.6f', now - tonumber(ARGV[1]))
-- The state's epoch, as the reservation script keeps it (a new one if Redis has none).
local epoch = redis.call('GET', KEYS[#KEYS])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[#KEYS], epoch, 'PX', math.ceil(tonumber(ARGV[1]) * 1000))
end
local out = {string.format('%.6f', now), redis.call('GET', KEYS[#KEYS - 1]) or '0', epoch}
for i = 1, #KEYS - 2 do
  out[#out + 1] = redis.call('ZRANGEBYSCORE', KEYS[i], lo, '+inf', 'WITHSCORES')
end
return out
"""

_OBSERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lo = '(' .. string.format('%.6f', now - tonumber(ARGV[2]))
local c = redis.call('ZCOUNT', KEYS[1], lo, '+inf') + redis.call('ZCOUNT', KEYS[2], lo, '+inf')
local add = math.min(tonumber(ARGV[1]) - c, tonumber(ARGV[3]))
for j = 1, add do
  redis.call('ZADD', KEYS[2], string.format('%.6f', now), ARGV[4] .. ':' .. j)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', lo)
redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[2]) * 1000))
return math.max(add, 0)
"""

_FREEZE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local untl = now + tonumber(ARGV[1])
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
if held < untl then
  redis.call('SET', KEYS[1], string.format('%.6f', untl), 'PX', math.ceil(tonumber(ARGV[1]) * 1000))
else
  untl = held
end
-- Tell the replicas listening (RedisSlots._listen): their waiters need not wait it out.
redis.call('PUBLISH', ARGV[2], ARGV[3] .. ' ' .. string.format('%.6f', untl))
return 1
"""


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _pairs(raw: Sequence[bytes]) -> list[float]:
    """Scores out of a ZRANGEBYSCORE ... WITHSCORES reply."""
    return [float(raw[i]) for i in range(1, len(raw), 2)]


class RedisSlots:
    """:class:`proxy.budget.slots.SlotSource` for one credential, on a shared Redis client."""

    durable = True
    remembers_external = True  # the ext:{i} keys keep what echowin reported to any replica

    def __init__(
        self,
        name: str,
        client: Redis,
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
        """``keep_view``: seconds after this replica's last reservation during which the
        idle refresh keeps the view at most VIEW_MAX_IDLE old. A credential's budget keeps
        it always (its fallback should start from a young view); a token's quota
        QUOTA_IN_USE, so that thousands of tokens cost Redis calls only for those in use
        (an older view only widens the fallback's blind margin: never unsafe)."""
        self.name = name
        self._redis = client
        self._guard = guard
        self._replicas = replicas
        self._mode = mode
        self._clock = clock
        self._on_latency = on_latency or (lambda op, seconds: None)
        self._on_health = on_health or (lambda up: None)
        self._base = base = f"{prefix}{name}"
        self._sends = f"{base}:sends"
        self._frozen_key = f"{base}:frozen"
        self._line = f"{base}:line"
        self._freezes = f"{base}:freezes"  # pub/sub channel: "<replica> <Redis time>"
        self._epoch_key = f"{base}:epoch"
        self._epoch = ""  # the epoch of the Redis state this replica knows ("": none yet)
        self._served = 0.0  # Redis time this replica last got a slot (its order in line)
        self._line_due = -math.inf  # local time our place in line lapses (-inf: no place)
        self._set_limits(limits)
        self._replica = secrets.token_hex(6)
        self._seq = 0
        self._observations = itertools.count()
        self._offset = 0.0  # Redis time minus local time, seconds
        self.mirror = CredentialBudget(self._limits, guard)  # the shared view, for predictions
        self._mirror_at = -math.inf
        self._seen_at = -math.inf  # local time of the last answer from Redis (the view's age)
        self._hint_until = 0.0  # Redis said: no slot before this (local time)
        self._journal: deque[tuple[float, str]] = deque()  # own sends: (local time, member)
        self._fallback: CredentialBudget | None = None
        self._pending_release: list[str] = []  # given back while Redis was away
        self._fresh: asyncio.Task[None] | None = None  # the idle refresh (_keep_fresh)
        self._keep_view = keep_view
        self._used_at = -math.inf  # local time of the last reservation (or restore)
        self._listener: asyncio.Task[None] | None = None  # hears freezes (_listen)
        # Set by the lane: told when the view learns of a freeze another replica set.
        self.on_frozen: Callable[[float], None] | None = None
        self._closed = False
        # Redis time of the newest send already in the view (0: none yet), and the members
        # already in it (bounded: more than any window can count).
        self._cursor = 0.0
        self._known: dict[bytes, float] = {}
        self.healthy = True
        self.changes = 0  # bumped when the view learns what other replicas did
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reserve = client.register_script(_RESERVE)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._observe = client.register_script(_OBSERVE)
        self._freeze = client.register_script(_FREEZE)

    def _set_limits(self, limits: Sequence[Limit]) -> None:
        self._limits = tuple(limits)
        self._ext = [f"{self._base}:ext:{i}" for i in range(len(self._limits))]
        self._horizon = max(lim.per_seconds for lim in self._limits) + self._guard
        # The members kept known: more than any window can count.
        self._known_max = 2 * sum(lim.requests for lim in self._limits) + 1000

    async def relimit(self, limits: Sequence[Limit], now: float) -> None:
        self._set_limits(limits)
        self.mirror = CredentialBudget(self._limits, self._guard)
        self._hint_until = 0.0
        old = self._fallback
        if old is not None:  # Redis is away: carry what this replica counts alone
            fallback = old.relimited(self._limits, now)
            # The others' sends it allowed for (seen before, or assumed when Redis went
            # away): as many as the fullest old window held, counted from now.
            external = max(view.external for view in old.snapshot(now))
            for index in range(len(self._limits)):
                fallback.load_external(index, [now] * external, now)
            self._fallback = fallback
        await self.restore(now)

    # --- reserving -------------------------------------------------------------------

    async def take(self, now: float, waiting: bool = False, *, again: bool = True) -> Slot | None:
        if not self.healthy:
            return self._take_alone(now)
        if now < self._hint_until and not (waiting and self._line_due < self._hint_until):
            return None  # no slot before the hint, and our place in line (if we wait) holds
        self._seq += 1
        member = f"{self._replica}:{self._seq}"
        k = len(self._limits)
        args: list[Any] = [member, self._guard, k]
        args += [lim.requests for lim in self._limits] + [lim.per_seconds for lim in self._limits]
        args += [self._horizon, f"{self._cursor:.6f}", self._replica, int(waiting), LINE_GRACE]
        args += [f"{self._served:.6f}", self._epoch, secrets.token_hex(8)]
        keys = [self._sends, *self._ext, self._frozen_key, self._line, self._epoch_key]
        call = asyncio.ensure_future(self._call("reserve", self._reserve, keys, args))
        try:
            # The script runs to its end whoever waits: a caller that leaves meanwhile (a
            # client hanging up) must not leave its send recorded.
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(functools.partial(self._abandoned, member))
            raise
        except (RedisError, OSError):
            # A timeout may come after the script ran: its send, if recorded, never leaves.
            self._pending_release.append(member)
            self._went_down()
            # The failed call took time (up to the Redis timeout): a send recorded at the
            # earlier `now` would stop counting before echowin stops counting it.
            return self._take_alone(self._clock())
        ok, wait, redis_now = int(reply[0]), float(reply[1]), float(reply[2])
        self._offset = redis_now - now
        if ok < 0:  # Redis lost the shared state: put back what we know, then ask again
            if not await self._refill(_text(reply[4])):
                return self._take_alone(self._clock())
            if not again:
                return None
            # The refill took round trips: a send is placed at the time it is reserved.
            return await self.take(self._clock(), waiting, again=False)
        self._epoch = _text(reply[4])
        self._seen_at = now  # the view is current as of this answer
        self._used_at = now
        if self._fresh is not None and self._fresh.done():  # restored, idle until now
            self._keep_fresh_running()
        self._heard_freeze(float(reply[5]) - self._offset, now)
        mine = self._learn(reply[3], now, member.encode())
        if not ok:
            self._hint_until = now + wait
            if waiting:  # the script wrote our place: good until the retry plus the grace
                self._line_due = self._hint_until + LINE_GRACE
            return None
        self._served = redis_now
        self._line_due = -math.inf
        at = now if mine is None else mine
        self._journal.append((at, member))
        self._trim_journal(now)
        return Slot(at, member)

    async def _refill(self, epoch: str) -> bool:
        """Redis answered with another epoch than ours: it lost the shared state (restarted
        empty). Put back our journal and every other replica's send we know of, and the
        freeze, before anything else is reserved or read; then the epoch is ours. False
        (and alone) when Redis went away meanwhile."""
        try:
            await self._replay(self._offset, everything=True)
            await self._carry_freeze()
        except (RedisError, OSError):
            self._went_down()
            return False
        self._epoch = epoch
        self._mirror_at = -math.inf  # the view is read again, with what was put back
        return True

    def _abandoned(self, member: str, call: asyncio.Future[Any]) -> None:
        """A reservation whose caller left: remove its send if the script recorded one."""
        if call.cancelled():
            return
        if call.exception() is None and int(call.result()[0]) < 1:
            return  # refused: nothing recorded
        # Recorded, or failed (a timeout may come after the script ran): remove it.
        self._known.pop(member.encode(), None)
        self._spawn(self._release(member))

    async def _release(self, member: str) -> None:
        started = time.perf_counter()
        try:
            await self._redis.zrem(self._sends, member)
        except (RedisError, OSError):
            self._pending_release.append(member)  # removed once Redis is back
            self._went_down()
        finally:
            self._on_latency("release", time.perf_counter() - started)

    def _learn(self, fresh: Sequence[bytes], now: float, member: bytes) -> float | None:
        """Add the sends Redis recorded since our cursor to the view, each once (concurrent
        calls return the same ones); returns the local time of ``member`` if it is among
        them (our own send just recorded)."""
        mine = None
        known = self._known
        for i in range(0, len(fresh), 2):
            score = float(fresh[i + 1])
            at = known.get(fresh[i])
            if at is None:
                at = known[fresh[i]] = score - self._offset
                self.mirror.record(at)
                self.changes += 1
            if fresh[i] == member:
                mine = at
            self._cursor = max(self._cursor, score)
        while known and len(known) > self._known_max:
            del known[next(iter(known))]
        self.mirror.wait_time(now)  # prune what no window counts any more
        return mine

    def _take_alone(self, now: float) -> Slot | None:
        if self._mode == "closed":
            raise StateUnavailable("the shared state (Redis) cannot be reached")
        budget = self._fallback
        assert budget is not None
        # Each own send counts `replicas` times: every replica then gets 1/replicas of what
        # is left, so the replicas' sum stays within the limit while they cannot coordinate.
        if budget.predict_wait(now, self._replicas - 1) > 0:
            return None
        for _ in range(self._replicas):
            budget.record(now)
        self._seq += 1
        member = f"{self._replica}:{self._seq}"
        self._journal.append((now, member))
        self._trim_journal(now)
        return Slot(now, member)

    async def commit(self, slot: Slot) -> None:
        return None  # the reservation script recorded it before returning

    def give_back(self, slot: Slot) -> None:
        self._hint_until = 0.0
        self.mirror.release(slot.at)
        if self._fallback is not None:
            for _ in range(self._replicas):
                self._fallback.release(slot.at)
        with contextlib.suppress(ValueError):
            self._journal.remove((slot.at, slot.ref or ""))
        if slot.ref is not None:
            self._known.pop(slot.ref.encode(), None)  # never put back after a restart
            if self.healthy:
                self._spawn(self._release(slot.ref))
            else:  # Redis may hold it (taken before it went away): remove it once back
                self._pending_release.append(slot.ref)

    def retry_in(self, now: float) -> float:
        if not self.healthy:
            if self._mode == "closed":
                return PROBE_INTERVAL
            assert self._fallback is not None
            return self._fallback.predict_wait(now, self._replicas - 1)
        return max(0.0, self._hint_until - now)

    # --- predictions and views -------------------------------------------------------

    def refreshed(self, now: float) -> bool:
        return not self.healthy or now - self._mirror_at < MIRROR_MAX_AGE

    async def refresh(self, now: float) -> None:
        """Rebuild the shared view from Redis if it is older than MIRROR_MAX_AGE."""
        if self.refreshed(now):
            return
        keys = [self._sends, *self._ext, self._frozen_key, self._epoch_key]
        args = [self._horizon, secrets.token_hex(8)]
        try:
            reply = await self._call("snapshot", self._snapshot, keys, args)
        except (RedisError, OSError):
            self._went_down()
            return
        offset = float(reply[0]) - now
        epoch = _text(reply[2])
        if self._epoch and epoch != self._epoch:
            # Redis lost the shared state: what it holds is no view. Put back what we know
            # (the others' sends too) before the view replaces what we know.
            self._offset = offset
            await self._refill(epoch)
            return
        self._epoch = epoch
        mirror = CredentialBudget(self._limits, self._guard)
        sends = reply[3]
        # A send already in the view keeps the local time it was given (the slot and the
        # journal hold that time); only new ones are placed with this call's clock offset.
        known = {}
        for i in range(0, len(sends), 2):
            at = self._known.get(sends[i])
            known[sends[i]] = float(sends[i + 1]) - offset if at is None else at
        self._known = known
        mirror.load(known.values(), now)
        if sends:
            self._cursor = max(self._cursor, float(sends[-1]))
        for index, raw in enumerate(reply[4:]):
            mirror.load_external(index, [at - offset for at in _pairs(raw)], now)
        # A freeze set here since Redis answered (an upstream 429) is still on its way there.
        local = self.mirror.frozen_until(now)
        if local is not None:
            mirror.freeze(local)
        self.mirror, self._mirror_at, self._offset = mirror, now, offset
        self._seen_at = now
        self.changes += 1
        # Redis' freeze, told to the lane if it is news only now: the lane predicts who can
        # wait it out on this view, with the others' give-backs in it, not the one before.
        self._heard_freeze(float(reply[1]) - offset, now)
        if self._hint_until > now and mirror.wait_time(now) <= 0:
            self._hint_until = 0.0  # another replica gave a slot back: worth asking again

    @property
    def budget(self) -> CredentialBudget:
        return self._fallback if self._fallback is not None else self.mirror

    def predict_wait(self, now: float, ahead: int, horizon: float | None) -> float:
        if self._fallback is not None:
            return self._fallback.predict_wait(now, self._replicas * (ahead + 1) - 1, horizon)
        return self.mirror.predict_wait(now, ahead, horizon=horizon)

    def snapshot(self, now: float) -> list[WindowView]:
        return self.budget.snapshot(now)

    def tightest(self, now: float) -> tuple[int, int, list[float]]:
        return self.budget.tightest(now)

    def frozen_until(self, now: float) -> float | None:
        return self.budget.frozen_until(now)

    # --- what echowin says -----------------------------------------------------------

    def observe(self, now: float, limit: int, remaining: int) -> None:
        index = self.mirror.window_index(limit)
        lim = self._limits[index]
        used = limit - remaining
        # While alone, the fallback decides: it learns too. Its own sends count `replicas`
        # times there, which already leaves room for the others; echowin's count beyond
        # that is someone else's.
        for view in (self.mirror, self._fallback):
            if view is not None:
                own = view.own_count(now, index)
                view.observe(now, limit=limit, remaining=remaining, sent_count=own)
        if self.healthy:
            args: list[str | float] = [
                used,
                lim.per_seconds + self._guard,
                lim.requests,
                f"x:{self._replica}:{next(self._observations)}",
            ]
            keys = [self._sends, self._ext[index]]
            self._spawn(self._quietly("observe", self._observe(keys=keys, args=args)))

    def assume_external(self, now: float, used: int) -> None:
        self.mirror.assume_external(now, used)

    def freeze(self, until: float) -> None:
        now = self._clock()
        self.mirror.freeze(until)
        if self._fallback is not None:
            self._fallback.freeze(until)
        if self.healthy and until > now:
            self._spawn(self._quietly("freeze", self._write_freeze(until - now)))

    def _write_freeze(self, seconds: float) -> Awaitable[Any]:
        """The freeze script: no send for ``seconds`` (Redis time), published to the others."""
        args: list[str | float] = [seconds, self._freezes, self._replica]
        result: Awaitable[Any] = self._freeze(keys=[self._frozen_key], args=args)
        return result

    def _heard_freeze(self, until: float, now: float) -> None:
        """Redis holds a freeze until ``until`` (local time): it holds in this view too, and
        one the view did not know yet (another replica met an upstream 429) is told to the
        lane, which refuses at once the waiters that cannot wait it out."""
        if until <= now:
            return
        known = self.mirror.frozen_until(now)
        self.mirror.freeze(until)
        if self._fallback is not None:
            self._fallback.freeze(until)
        if known is None or until > known + FREEZE_SAME:
            self.changes += 1
            if self.on_frozen is not None:
                self.on_frozen(until)

    # --- health ----------------------------------------------------------------------

    def _went_down(self) -> None:
        if not self.healthy:
            return
        self.healthy = False
        self._on_health(False)
        now = self._clock()
        fallback = CredentialBudget(self._limits, self._guard)
        # What every replica had sent as we last saw it, and our own sends (by member, so
        # nothing counts twice); externals echowin reported stay in the view's windows.
        sends = dict(self._known)
        sends.update((member.encode(), at) for at, member in self._journal)
        fallback.load(sends.values(), now)
        for index, view in enumerate(self.mirror.snapshot(now)):
            fallback.load_external(index, [now] * view.external, now)
        # Other replicas may have sent after our last answer from Redis (``age`` ago) and
        # before it went away. A window at least as long as that gap still counts all of
        # those sends: they are no more than it has free. A shorter window may have turned
        # over meanwhile: over the gap it let through at most its limit per turn. The least
        # of these bounds them; count that much as sent now in every window (each at most
        # full), so the replicas' sum still stays in the limits. A view far older than the
        # longest window (an idle replica) bounds nothing: every window counts as full.
        age = now - self._seen_at
        views = fallback.snapshot(now)
        blind = math.inf
        if math.isfinite(age):
            for view, limit in zip(views, self._limits, strict=True):
                if limit.per_seconds + self._guard >= age:
                    blind = min(blind, view.remaining)
                else:
                    blind = min(blind, limit.requests * math.ceil(age / limit.per_seconds))
        for index, view in enumerate(views):
            fallback.load_external(index, [now] * int(min(view.remaining, blind)), now)
        frozen = self.mirror.frozen_until(now)
        if frozen is not None:
            fallback.freeze(frozen)
        self._fallback = fallback
        log.warning(
            "shared state unreachable",
            extra={"fields": {"credential": self.name, "mode": self._mode}},
        )
        self._spawn(self._probe())

    async def _probe(self) -> None:
        """Until Redis answers: wait, ping; then replay our journal and share again."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                # Sends taken alone while these calls are on their way are in the journal
                # only: replay again until a round found none (each round is idempotent).
                seq = None
                while seq != self._seq:
                    seq = self._seq
                    redis_now = await self._redis_time()
                    await self._replay(redis_now - self._clock())
                    await self._carry_freeze()
                    await self._release_pending()
            except (RedisError, OSError):
                continue
            break
        self._fallback = None
        self._hint_until = 0.0
        self._mirror_at = -math.inf
        self.healthy = True
        self._on_health(True)
        log.warning("shared state reachable again", extra={"fields": {"credential": self.name}})

    async def _release_pending(self) -> None:
        """Slots given back while Redis was away that it may still hold (recorded there
        before it went away, or replayed since): remove them now."""
        while self._pending_release:
            member = self._pending_release[-1]
            await self._redis.zrem(self._sends, member)
            # Not pop(): a slot given back during the await was appended after it.
            self._pending_release.remove(member)

    async def _carry_freeze(self) -> None:
        """A freeze set while alone (an upstream 429) must hold for every replica too."""
        now = self._clock()
        until = self.budget.frozen_until(now)
        if until is not None:
            await self._write_freeze(until - now)

    async def _redis_time(self) -> float:
        seconds, micros = await self._redis.time()
        return float(seconds) + micros / 1e6

    async def _replay(self, offset: float, everything: bool = False) -> None:
        """Put our own recent sends (back) into the shared set; idempotent. ``everything``:
        the other replicas' sends we know of too (a Redis that lost them)."""
        now = self._clock()
        self._trim_journal(now)
        mapping: dict[str, float] = {}
        if everything:
            mapping.update(
                (member.decode(), at + offset)
                for member, at in self._known.items()
                if at + self._horizon > now
            )
        mapping.update((member, at + offset) for at, member in self._journal)
        if mapping:
            await self._redis.zadd(self._sends, mapping)
            await self._redis.pexpire(self._sends, math.ceil(self._horizon * 1000))

    def _trim_journal(self, now: float) -> None:
        while self._journal and self._journal[0][0] + self._horizon <= now:
            self._journal.popleft()

    # --- plumbing --------------------------------------------------------------------

    async def _call(self, op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        started = time.perf_counter()
        try:
            return await script(keys=keys, args=args)
        finally:
            self._on_latency(op, time.perf_counter() - started)

    async def _quietly(self, op: str, call: Awaitable[Any]) -> None:
        started = time.perf_counter()
        try:
            await call
        except (RedisError, OSError):
            self._went_down()
        finally:
            self._on_latency(op, time.perf_counter() - started)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def restore(self, now: float) -> None:
        self._mirror_at = -math.inf
        self._used_at = max(self._used_at, now)
        await self.refresh(now)
        self._keep_fresh_running()
        if self.on_frozen is not None and self._listener is None and not self._closed:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    def _keep_fresh_running(self) -> None:
        """Start the idle refresh unless it runs (not among _tasks: it ends on its own)."""
        if (self._fresh is None or self._fresh.done()) and not self._closed:
            self._fresh = asyncio.get_running_loop().create_task(self._keep_fresh())

    async def _keep_fresh(self) -> None:
        """Read the shared view when nothing else has for VIEW_MAX_IDLE. Without it an idle
        replica's view ages, and a fallback built on an old view must assume the other
        replicas used every window meanwhile (nothing sent until they turn over). Ends once
        this replica has not reserved for ``keep_view`` seconds; ``take`` starts it again."""
        while True:
            now = self._clock()
            if now - self._used_at > self._keep_view:
                return  # not in use: no Redis call for it until it is
            left = self._seen_at + VIEW_MAX_IDLE - now
            if not self.healthy or left > 0:  # away: the probe reads Redis again
                await asyncio.sleep(min(left, VIEW_MAX_IDLE) if left > 0 else VIEW_MAX_IDLE)
                continue
            try:
                await self.refresh(now)  # Redis away: refresh falls back by itself
            except Exception as exc:  # a bug must not end the idle refresh for good
                self._warn("shared view refresh failed", exc)
                await asyncio.sleep(VIEW_MAX_IDLE)

    async def _listen(self) -> None:
        """Hear the freezes the other replicas publish (their upstream 429s) as they happen;
        one connection per credential, none for token quotas (nobody sets ``on_frozen``).
        After each subscription, and each reconnection the client makes by itself, the
        freeze key is read once: a freeze published meanwhile is not missed. Redis away:
        subscribe again every PROBE_INTERVAL."""
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as channel:
                    await channel.subscribe(self._freezes)
                    connection = channel.connection
                    assert connection is not None  # subscribed
                    connection.register_connect_callback(self._reconnected)
                    try:
                        await self._read_freeze()
                        while True:
                            message = await channel.get_message(timeout=VIEW_MAX_IDLE)
                            if message is not None:
                                replica, _, until = _text(message["data"]).partition(" ")
                                if replica != self._replica:
                                    self._heard_freeze(float(until) - self._offset, self._clock())
                    finally:
                        connection.deregister_connect_callback(self._reconnected)
            except (RedisError, OSError):
                await asyncio.sleep(PROBE_INTERVAL)
            except Exception as exc:  # a bug must not end the listening for good
                self._warn("freeze listener failed", exc)
                await asyncio.sleep(VIEW_MAX_IDLE)

    def _reconnected(self, connection: Any) -> None:
        """The listener's connection came back (the client subscribes again by itself)."""
        self._spawn(self._read_freeze(quietly=True))

    async def _read_freeze(self, quietly: bool = False) -> None:
        """Read the freeze Redis holds into the view (the lane is told if it is news)."""
        try:
            raw = await self._redis.get(self._frozen_key)
        except (RedisError, OSError):
            if quietly:  # the listener, or the next reservation or refresh, finds out
                return
            raise
        if raw is not None:
            self._heard_freeze(float(raw) - self._offset, self._clock())

    def _warn(self, message: str, exc: Exception) -> None:
        log.warning(
            message, extra={"fields": {"credential": self.name, "error": type(exc).__name__}}
        )

    async def close(self) -> None:
        self._closed = True
        running = [task for task in (self._fresh, self._listener, *self._tasks) if task]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if self.healthy:  # leave the line at once (else the place lapses by itself)
            with contextlib.suppress(RedisError, OSError):
                await self._redis.hdel(self._line, self._replica)
