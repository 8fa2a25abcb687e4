"""Hearing the freezes other replicas publish (their upstream 429s) as they happen.

One pub/sub connection per credential; none for token quotas (nobody listens for theirs).
The message is ``"<replica> <Redis time until>"`` on the channel ``p{c}:freezes``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from proxy.state.redis.client import STATE_ERRORS, RedisClient, cancelling
from proxy.state.redis.fallback import PROBE_INTERVAL

__all__ = ["FreezeListener"]

log = logging.getLogger("echowin_gateway.state")

# One wait for a message, seconds; after a bug, the pause before listening again.
LISTEN_SECONDS = 5.0


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class FreezeListener:
    """Calls ``heard(until)`` (Redis time) for each freeze another replica publishes on
    ``channel``, and for the freeze ``frozen_key`` holds after each subscription and each
    reconnection the client makes by itself (a freeze published meanwhile is not missed).
    ``spawn`` runs a background coroutine owned by the caller. ``lost()`` is called when
    the subscription's connection fails: the first sign that Redis went away, often long
    before the next reservation would tell (a replica waiting out a full window makes
    none), so the fallback starts from a view no older than it must be."""

    def __init__(
        self,
        client: RedisClient,
        *,
        channel: str,
        frozen_key: str,
        replica: str,
        name: str,
        heard: Callable[[float], None],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        lost: Callable[[], None] = lambda: None,
    ) -> None:
        self._redis = client
        self._lost = lost
        self._channel = channel
        self._frozen_key = frozen_key
        self._replica = replica
        self._name = name
        self._heard = heard
        self._spawn = spawn

    async def run(self) -> None:
        """Listen until cancelled. Redis away: subscribe again every PROBE_INTERVAL."""
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as channel:
                    await channel.subscribe(self._channel)
                    connection = channel.connection
                    assert connection is not None  # subscribed
                    connection.register_connect_callback(self._reconnected)
                    try:
                        await self.read()
                        while True:
                            message = await channel.get_message(timeout=LISTEN_SECONDS)
                            if message is not None:
                                replica, _, until = _text(message["data"]).partition(" ")
                                if replica != self._replica:
                                    self._heard(float(until))
                    finally:
                        connection.deregister_connect_callback(self._reconnected)
            except STATE_ERRORS:
                if cancelling():
                    raise asyncio.CancelledError from None
                self._lost()
                await asyncio.sleep(PROBE_INTERVAL)
            except Exception as exc:  # a bug must not end the listening for good
                log.warning(
                    "freeze listener failed",
                    extra={"fields": {"credential": self._name, "error": type(exc).__name__}},
                )
                await asyncio.sleep(LISTEN_SECONDS)

    def _reconnected(self, connection: Any) -> None:
        """The listener's connection came back (the client subscribes again by itself)."""
        self._spawn(self.read(quietly=True))

    async def read(self, quietly: bool = False) -> None:
        """Read the freeze Redis holds and hand it to ``heard``."""
        try:
            raw = await self._redis.get(self._frozen_key)
        except STATE_ERRORS:
            if quietly:  # the listener, or the next reservation or refresh, finds out
                return
            raise
        if raw is not None:
            self._heard(float(raw))
