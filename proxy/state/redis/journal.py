"""A replica's journal of its own recent sends, put back into Redis when Redis answers again
(idempotent: members are unique ids), so that a Redis that restarted empty learns again what
was sent; and the slots given back while Redis was away, removed from it once back."""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Mapping

from proxy.state.redis.client import RedisClient

__all__ = ["Journal"]


class Journal:
    """``sends``: (local time, member) of this replica's sends, oldest first, kept for
    ``horizon`` seconds (the longest window plus the guard). ``pending_release``: members
    given back while Redis was away that it may still hold."""

    def __init__(self, client: RedisClient, sends_key: str, horizon: float) -> None:
        self._redis = client
        self._key = sends_key
        self.horizon = horizon
        self.sends: deque[tuple[float, str]] = deque()
        self.pending_release: list[str] = []

    def add(self, at: float, member: str, now: float) -> None:
        self.sends.append((at, member))
        self.trim(now)

    def remove(self, at: float, member: str) -> None:
        """Forget a send that never left (no error if it is not there)."""
        with contextlib.suppress(ValueError):
            self.sends.remove((at, member))

    def trim(self, now: float) -> None:
        sends = self.sends
        while sends and sends[0][0] + self.horizon <= now:
            sends.popleft()

    async def replay(
        self, offset: float, now: float, others: Mapping[bytes, float] | None = None
    ) -> None:
        """Put our own recent sends (back) into the shared set, at local time plus
        ``offset`` (Redis time minus local time); idempotent. ``others``: the other
        replicas' sends we know of (member -> local time) too, for a Redis that lost them."""
        self.trim(now)
        mapping: dict[str, float] = {}
        if others is not None:
            mapping.update(
                (member.decode(), at + offset)
                for member, at in others.items()
                if at + self.horizon > now
            )
        mapping.update((member, at + offset) for at, member in self.sends)
        if mapping:
            await self._redis.zadd(self._key, mapping)
            await self._redis.pexpire(self._key, math.ceil(self.horizon * 1000))

    async def release_pending(self) -> None:
        """Remove from Redis the slots given back while it was away."""
        while self.pending_release:
            member = self.pending_release[-1]
            await self._redis.zrem(self._key, member)
            # Not pop(): a slot given back during the await was appended after it.
            self.pending_release.remove(member)
