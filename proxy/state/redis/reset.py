"""Telling that Redis lost its data (restarted empty, flushed, a failover to a replica that
missed the writes, an eviction): one marker key, ``{prefix}instance``, holding a random id
that the first replica to find it missing sets. A replica that saw one id and later finds
none, or another, knows the data it wrote before is gone, and says so (the caller logs and
counts it: ``echowin_gateway_state_resets_total``).

The budget mends itself (each credential's ``epoch`` makes the replicas replay their
journals); tokens kept in Redis do not, which is why the log line names where the tokens
are. Checked every ``interval`` seconds, whatever the traffic, so an idle gateway tells too.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable

from proxy.state.redis.client import STATE_ERRORS, RedisClient, cancelling

__all__ = ["CHECK_SECONDS", "ResetWatch"]

CHECK_SECONDS = 2.0
"""How often a replica reads the marker: a reset is told within about this long of Redis
answering again."""


class ResetWatch:
    """Reads ``{prefix}instance`` on ``client``; calls ``on_reset()`` once per loss seen.

    The first reading only learns the id (setting one if Redis holds none: a new Redis, or
    one emptied before this replica started, cannot be told apart). Redis errors are left
    to the budget's own health reporting: a check that fails is skipped."""

    def __init__(
        self,
        client: RedisClient,
        key_prefix: str,
        on_reset: Callable[[], None],
        *,
        interval: float = CHECK_SECONDS,
    ) -> None:
        self._client = client
        self._key = f"{key_prefix}instance"
        self._on_reset = on_reset
        self._interval = interval
        self._known: bytes | str | None = None
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """One reading; True when it found the data lost since the last one."""
        value = await self._client.get(self._key)
        if value is None:
            await self._client.set(self._key, secrets.token_hex(16), nx=True)
            value = await self._client.get(self._key)  # ours, or another replica's
        lost = self._known is not None and value != self._known
        self._known = value
        if lost:
            self._on_reset()
        return lost

    def start(self) -> None:
        """Check every ``interval`` seconds until ``stop``."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._forever())

    async def _forever(self) -> None:
        while True:
            with contextlib.suppress(*STATE_ERRORS, TimeoutError):
                await self.check()
            if cancelling():  # a stop that surfaced as a timeout
                raise asyncio.CancelledError
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
