"""Failed authentications per client (``auth.failures_per_client``, SPEC §5 "Hostile
callers"): past the rate, a client's requests are refused (429 ``auth_throttled``) before
their token is looked up, so guessing tokens, or flooding the token store with lookups,
goes no faster than the configured rate, whatever the caller sends.

Each client that failed lately has a leaky bucket (aiolimiter's ``AsyncLimiter``, of
``requests`` units leaking over ``per_seconds``): a failure adds a unit, and a request is
refused while the bucket has no room for one more. A leaky bucket smooths; it is not a
hard cap: a client that fills it at once gets ``requests`` failures, then one each
``per_seconds / requests`` seconds. Successful authentications add nothing.

A lookup in flight holds a place in its client's bucket until it ends (``looking_up``):
without that, a client's concurrent requests would all find room before the first of
them failed, and a thousand connections would buy a thousand lookups at once.

Clients are held in a bounded TTL cache (``auth.max_clients_tracked``): one whose bucket
has leaked empty is forgotten, and when the bound is reached the least recently seen
goes first (a flood of addresses can only make the gateway forget, never grow). An IPv6
client is its /64: a single subscriber is usually given a whole /64, and counting each of
its 2**64 addresses apart would let it guess without bound.

The limiters run on the event loop's clock (aiolimiter reads ``loop.time()``); the cache
reads the same clock, so a bucket is never forgotten before it has leaked. Everything
here runs on one event loop and never suspends but in ``failed``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Hashable

from aiolimiter import AsyncLimiter
from cachetools import Cache, TTLCache

from proxy.auth.client_address import Address

__all__ = ["AuthThrottle", "Lookup", "client_key"]

_UNKNOWN = "unknown"  # a peer that is no IP address (a unix socket): all are one client


def client_key(client: Address | None) -> Hashable:
    """The bucket a client fills: an IPv4 address, an IPv6 address's /64, or one bucket
    for every peer that has no IP address. As bytes (the address's 4, or the /64's 8
    leading ones: the lengths keep the families apart), which hash natively: an
    ``ipaddress`` object hashes through two Python calls at every cache operation."""
    if client is None:
        return _UNKNOWN
    packed = client.packed
    return packed[:8] if len(packed) == 16 else packed


def _held(clients: TTLCache[Hashable, _Client], key: Hashable) -> _Client | None:
    """``key``'s entry, without TTLCache's expiry check (two clock reads through Python
    calls, about 2 µs against a dict lookup's 0.05): an entry past its time-to-live but not
    yet expired is returned too. That is harmless here: its bucket's level is the leaky
    bucket's own (it leaks by the clock, whatever the cache does), and ``idle``, which
    every request asks first while anyone is tracked, expires the cache."""
    try:
        return Cache.__getitem__(clients, key)
    except KeyError:
        return None


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class _Client:
    """One client's bucket, and its token lookups under way: how many for each token.
    ``pending`` counts distinct tokens: the requests of one token share one store lookup
    (the authenticator joins them), so a busy service whose token left the cache holds one
    place, not one per request."""

    __slots__ = ("bucket", "looking")

    def __init__(self, bucket: AsyncLimiter) -> None:
        self.bucket = bucket
        self.looking: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return len(self.looking)


class Lookup:
    """A token lookup under way (``AuthThrottle.looking_up``). It carries its client's entry
    through the request, so that ending it and charging its failure touch no cache."""

    __slots__ = ("_client", "_key", "_throttle", "_token")

    def __init__(self, throttle: AuthThrottle, key: Hashable, client: _Client, token: str) -> None:
        self._throttle = throttle
        self._key = key
        self._client = client
        self._token: str | None = token

    def end(self, *_: object) -> None:
        """The lookup is over (a no-op after the first call; takes a future's done
        callback argument)."""
        token, self._token = self._token, None
        if token is not None:
            self._throttle._ended(self._key, self._client, token)

    async def failed(self) -> None:
        """The token looked up was refused: one unit in the client's bucket, as
        ``AuthThrottle.failed`` would add, without finding the client again."""
        await self._throttle._charge(self._key, self._client)

    def __enter__(self) -> Lookup:
        return self

    def __exit__(self, *_: object) -> None:
        self.end()


class AuthThrottle:
    """Failed authentications per client, ``requests`` per ``per_seconds`` seconds (a
    leaky bucket), for at most ``max_clients`` clients at once. ``timer``: the clock the
    forgetting runs on, seconds; the running loop's (aiolimiter's own) by default."""

    __slots__ = ("_clients", "_rate", "_retry_after")

    def __init__(
        self,
        requests: int,
        per_seconds: float,
        max_clients: int,
        timer: Callable[[], float] = _loop_time,
    ) -> None:
        self._rate = (requests, per_seconds)
        # A full bucket has room again once one unit has leaked: per_seconds / requests.
        self._retry_after = max(1, math.ceil(per_seconds / requests))
        # A bucket leaks empty at most per_seconds after its last unit: then it may go.
        self._clients: TTLCache[Hashable, _Client] = TTLCache(max_clients, per_seconds, timer)

    @property
    def idle(self) -> bool:
        """No client failed lately, nor is looking a token up: nothing is refused. The
        check every request makes, so it does no more than a clock read."""
        clients = self._clients
        # Cache.__len__, not TTLCache's: that one reads the clock first (the loop's, through
        # a Python call) to expire, and nobody tracked is the case of nearly every request.
        if not Cache.__len__(clients):
            return True
        clients.expire()
        return not Cache.__len__(clients)

    def retry_after(self, client: Address | None) -> int | None:
        """Seconds ``client`` should wait before its next attempt when it is refused now
        (its bucket has no room for one more failure beside its lookups under way), else
        None. Nothing is counted: being refused is not a failed authentication, but a
        refused client is seen: it is the last the bound on clients tracked forgets."""
        key = client_key(client)
        found = _held(self._clients, key)  # (idle() just expired the cache)
        if found is None or found.bucket.has_capacity(1 + found.pending):
            return None
        self._clients[key]  # TTLCache's read: the least recently seen goes first
        return self._retry_after

    def looking_up(self, client: Address | None, token: str) -> Lookup:
        """A lookup of ``token`` for ``client`` starts: until it ends (``Lookup.end``, or
        leaving it as a context manager) the token holds a place in the client's bucket,
        so that ``retry_after`` refuses once as many distinct tokens are being looked up
        as failures would fill it. One cache read; a write only for a client not tracked."""
        key = client_key(client)
        found = _held(self._clients, key)
        if found is None:
            found = self._clients[key] = _Client(AsyncLimiter(*self._rate))
        found.looking[token] = found.looking.get(token, 0) + 1
        return Lookup(self, key, found, token)

    def _ended(self, key: Hashable, found: _Client, token: str) -> None:
        left = found.looking.get(token, 1) - 1
        if left > 0:
            found.looking[token] = left
        else:
            found.looking.pop(token, None)
        if not found.pending and found.bucket.has_capacity(found.bucket.max_rate):  # empty
            # It would only wait for its time-to-live: gone now, in one step (a TTLCache
            # operation costs microseconds), unless another entry took the key meanwhile.
            gone = self._clients.pop(key, None)
            if gone is not None and gone is not found:
                self._clients[key] = gone

    async def failed(self, client: Address | None) -> None:
        """``client`` failed to authenticate: one unit in its bucket (none past full:
        its next request is refused anyway). Never waits. A refusal that followed a
        lookup charges it with ``Lookup.failed``, which need not find the client."""
        key = client_key(client)
        found = _held(self._clients, key)
        await self._charge(key, found if found is not None else _Client(AsyncLimiter(*self._rate)))

    async def _charge(self, key: Hashable, found: _Client) -> None:
        """One unit in ``found``'s bucket, and ``found`` kept (again) for ``key``: its
        time-to-live starts again, so it is not forgotten before the unit has leaked, and
        an entry that expired or was pushed out while its lookup ran is back. (Should a
        later lookup have made a new entry for the client meanwhile, this one replaces it:
        that entry's lookups under way no longer hold places, a rare and bounded slip.)"""
        self._clients[key] = found
        bucket = found.bucket
        if bucket.has_capacity():
            # The public way to add a unit: acquire() suspends only while the bucket has
            # no room (its documented contract: "if the limit has been reached, blocks
            # until enough capacity has been freed"), and room was seen just now, in the
            # same step of the loop: it adds the unit and returns without suspending.
            await bucket.acquire()
