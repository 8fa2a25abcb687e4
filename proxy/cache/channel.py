"""Purges to the other workers and replicas, within a second: on Redis pub/sub when the
state is in Redis (every worker and replica is a client of it); between the workers of
``serve --workers N`` on one host otherwise, as datagrams on unix sockets beside their
admin sockets. A purge missed (Redis away) costs at most a copy's TTL of staleness.

A message is ``"<origin> <credential or *> <Purge.to_wire()>"``; a process ignores its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.cache.keeper import GatewayCache
from proxy.cache.purge import EVERYTHING, Purge

if TYPE_CHECKING:
    from proxy.state.redis.client import RedisClient

__all__ = ["RedisChannel", "SiblingChannel", "heard", "open_purge_channel"]

log = logging.getLogger("echowin_gateway.cache")

LISTEN_SECONDS = 5.0  # one wait for a message
MAX_PAUSE = 30.0  # between attempts to listen again, doubling from 1 s while they fail
_MAX_MESSAGE = 16 * 1024
MAX_QUEUED = 64  # datagrams waiting for a sibling's full queue; past it they coalesce
SEND_SECONDS = 2.0  # one queued datagram's wait for room in a sibling's queue


def _message(origin: str, credential: str | None, purge: Purge) -> str:
    return f"{origin} {credential or '*'} {purge.to_wire()}"


def heard(cache: GatewayCache, origin: str, text: str) -> bool:
    """Apply a purge another process sent (not published again); False for our own
    message or one that is not a purge."""
    sender, _, rest = text.partition(" ")
    credential, _, wire = rest.partition(" ")
    if sender == origin or not credential:
        return False
    try:
        purge = Purge.from_wire(wire)
    except ValueError:
        return False
    cache.purge(None if credential == "*" else credential, purge, publish=False)
    return True


class RedisChannel:
    """Purges on the Redis channel ``<key_prefix>cache:purges``."""

    def __init__(self, client: RedisClient, key_prefix: str, cache: GatewayCache) -> None:
        self._redis = client
        self._channel = f"{key_prefix}cache:purges"
        self._cache = cache
        self.origin = secrets.token_hex(8)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.subscribed = asyncio.Event()  # set while the listener is subscribed
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    def publish(self, credential: str | None, purge: Purge) -> None:
        self._spawn(self._publish(_message(self.origin, credential, purge)))

    async def _publish(self, text: str) -> None:
        try:
            await self._redis.publish(self._channel, text)
        except Exception as exc:  # Redis away: the copies live out their TTL elsewhere
            log.warning(
                "cache purge not published", extra={"fields": {"error": type(exc).__name__}}
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self) -> None:
        pause = 1.0
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as channel:
                    await channel.subscribe(self._channel)
                    self.subscribed.set()
                    pause = 1.0
                    while True:
                        message = await channel.get_message(timeout=LISTEN_SECONDS)
                        if message is not None:
                            self._heard(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away, or a bug: listen again after a pause
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # a stop seen as a timeout
                    raise asyncio.CancelledError from None
                self.subscribed.clear()
                log.warning(
                    "cache purge listener failed", extra={"fields": {"error": type(exc).__name__}}
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)

    def _heard(self, data: object) -> None:
        """One message: a bad one (not UTF-8, not a purge) is passed over, never the
        listener's end (the purges after it would be lost while it subscribes again)."""
        try:
            text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
            heard(self._cache, self.origin, text)
        except Exception as exc:
            log.warning(
                "cache purge message passed over", extra={"fields": {"error": type(exc).__name__}}
            )

    async def close(self) -> None:
        self._listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._listener
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, received: Callable[[bytes], object]) -> None:
        self._received = received

    def datagram_received(self, data: bytes, addr: Any) -> None:
        with contextlib.suppress(UnicodeDecodeError):
            self._received(data)


class SiblingChannel:
    """Purges between the workers of one ``serve --workers N``: each binds
    ``<dir>/purge-<index>.sock`` (a unix datagram socket in the supervisor's private
    directory) and sends every purge to the others' sockets there; a burst past a sibling's
    kernel queue waits in a bounded queue of its own (past ``MAX_QUEUED``, it becomes one
    purge of everything)."""

    def __init__(self, directory: str, index: int, cache: GatewayCache) -> None:
        self._dir = Path(directory)
        self._path = self._dir / f"purge-{index}.sock"
        self._cache = cache
        self.origin = f"worker-{index}-{secrets.token_hex(4)}"
        self._transport: asyncio.DatagramTransport | None = None
        self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._out.setblocking(False)
        self._pending: deque[tuple[str, bytes]] = deque()
        self._drainer: asyncio.Task[None] | None = None

    async def open(self) -> SiblingChannel:
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        loop = asyncio.get_running_loop()
        protocol = _Datagrams(lambda data: heard(self._cache, self.origin, data.decode()))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self._path))  # bound here: uvloop takes no unix local_addr
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport = transport
        return self

    def publish(self, credential: str | None, purge: Purge) -> None:
        data = _message(self.origin, credential, purge).encode()
        if len(data) > _MAX_MESSAGE:
            data = _message(self.origin, credential, EVERYTHING).encode()
        for peer in self._dir.glob("purge-*.sock"):
            if peer != self._path:
                self._send(str(peer), data)

    def _send(self, peer: str, data: bytes) -> None:
        """``data`` to ``peer`` now, or queued behind what waits already when its kernel
        queue (``net.unix.max_dgram_qlen`` datagrams) is full."""
        if not self._pending:
            try:
                self._out.sendto(data, peer)
                return
            except BlockingIOError:
                pass
            except OSError:
                # A sibling restarting (its socket gone or not yet bound) misses it: its
                # cache starts empty anyway.
                return
        if len(self._pending) >= MAX_QUEUED:
            # Bounded: what waits becomes one purge of everything per sibling.
            peers = {waiting for waiting, _ in self._pending} | {peer}
            self._pending.clear()
            data = _message(self.origin, None, EVERYTHING).encode()
            self._pending.extend((waiting, data) for waiting in sorted(peers))
        else:
            self._pending.append((peer, data))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """The queued datagrams, each sent once its sibling has room (or given up after
        ``SEND_SECONDS``: a sibling that stopped reading)."""
        loop = asyncio.get_running_loop()
        while self._pending:
            peer, data = self._pending.popleft()
            try:
                await asyncio.wait_for(loop.sock_sendto(self._out, data, peer), SEND_SECONDS)
            except (OSError, TimeoutError):
                continue

    async def close(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        if self._transport is not None:
            self._transport.close()
        self._out.close()
        with contextlib.suppress(OSError):
            os.unlink(self._path)


async def open_purge_channel(
    cache: GatewayCache,
    redis: RedisClient | None,
    key_prefix: str,
    sibling: tuple[str, int] | None,
) -> RedisChannel | SiblingChannel | None:
    """The channel for this process: Redis when the state is there, else the sibling
    workers' sockets (``sibling``: the directory and this worker's index), else none."""
    if redis is not None:
        return RedisChannel(redis, key_prefix, cache)
    if sibling is not None:
        return await SiblingChannel(sibling[0], sibling[1], cache).open()
    return None
