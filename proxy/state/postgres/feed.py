"""Token changes told to every replica at once: PostgreSQL's LISTEN/NOTIFY.

The store's writes (``tokens.py``) each ``NOTIFY egw_tokens, '<token id>'`` in their own
transaction, so the notice leaves when the change is committed, never before. Every gateway
process LISTENs on one connection of its own (outside the pool) and drops what it caches of
that token (``TokenAuthenticator.invalidate``): a revocation made on any replica, or by the
``token`` commands, takes effect everywhere within a round trip instead of
``tokens.cache_ttl_seconds``.

A notice sent while the listening connection is down is lost; the cache's bound still holds
(the record is read again within ``tokens.cache_ttl_seconds``). The connection is checked
every ``PING_SECONDS`` and opened again ``RETRY_SECONDS`` after it fails, the pause
doubling up to ``MAX_RETRY_SECONDS`` while it keeps failing. Whatever fails (a network
error, the server, a bug), the follower goes on: it logs the error's type and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

__all__ = ["CHANNEL", "ChangeFollower"]

CHANNEL = "egw_tokens"
PING_SECONDS = 10.0
RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0

log = logging.getLogger("echowin_gateway.state")
_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class ChangeFollower:
    """LISTENs on ``CHANNEL`` with a connection made from ``connect_args`` (asyncpg's
    keywords: no DSN, so no password in a string); calls ``on_change(token_id)`` for each
    notice, on the event loop, until ``stop``; ``on_health(up)`` when the connection
    starts listening (True) and when it is lost or cannot be made (False)."""

    def __init__(
        self,
        connect_args: dict[str, Any],
        on_change: Callable[[str], None],
        on_health: Callable[[bool], None] | None = None,
    ) -> None:
        self._connect_args = connect_args
        self._on_change = on_change
        self._on_health = on_health
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while a connection listens (for tests, status)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._forever())

    async def _forever(self) -> None:
        told = False  # one warning per outage, not one per retry
        pause = RETRY_SECONDS
        while True:
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any: a follower that ended would be silent forever
                if self.listening.is_set() or not told:
                    log.warning(
                        "token change notices stopped; reconnecting",
                        extra={"fields": {"error": type(exc).__name__}},
                    )
                told = True
            else:
                told = False
            if self.listening.is_set():
                pause = RETRY_SECONDS  # it listened: a new outage starts from the shortest
            self.listening.clear()
            if self._on_health is not None:
                self._on_health(False)
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RETRY_SECONDS)

    async def _listen_once(self) -> None:
        """One connection's life: listen until it ends or fails a ping."""
        conn = await asyncpg.connect(**self._connect_args)
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(CHANNEL, self._notice)
            self.listening.set()
            if self._on_health is not None:
                self._on_health(True)
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), PING_SECONDS)
                except TimeoutError:
                    await conn.fetchval("SELECT 1")  # a silent network loss shows here
        finally:
            with contextlib.suppress(*_ERRORS):
                await conn.close(timeout=1.0)

    def _notice(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if isinstance(payload, str):
            self._on_change(payload)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
