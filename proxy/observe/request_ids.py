"""Request ids: unique across requests, restarts and replicas, and cheap to make.

``uuid4()`` reads 16 bytes from the OS for every request. A :class:`RequestIds` reads 24
once: a 64-bit prefix that names this process, and a random bijection of 64-bit integers
that turns a per-process counter into the rest of the id. Two ids of one process differ
because the counter does and the bijection keeps them apart; two processes (restarts,
replicas) differ by their prefix, unless 64 random bits collide. Passing the counter
through the bijection keeps ids from telling a caller how many requests came before.

A caller's own ``X-Request-ID`` is kept only when it is 1 to 128 characters of
``[A-Za-z0-9._:-]`` (a UUID, a ULID, a trace id, ``svc:1234.5`` all fit): anything else
(longer, spaces, quotes, control bytes, non-ASCII) is dropped for a new id, so that what a
caller sends never reaches the access log, echowin or another caller's tools but as a
plain token.
"""

from __future__ import annotations

import itertools
import os
import re

_MASK = (1 << 64) - 1
_ACCEPTED = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIds:
    """Makes request ids: 32 lowercase hex digits, as ``uuid4().hex`` has.

    Make one per process, after any fork (the runtime holds one): a forked child that
    kept its parent's would repeat its ids.
    """

    __slots__ = ("_counter", "_mask", "_multiplier", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()
        # x -> (x * odd) mod 2**64 -> ^ mask: both steps are one-to-one on 64-bit integers.
        self._multiplier = int.from_bytes(os.urandom(8)) | 1
        self._mask = int.from_bytes(os.urandom(8))

    def new(self) -> str:
        """A fresh id; never the same twice in this process (for 2**64 calls)."""
        n = (next(self._counter) * self._multiplier & _MASK) ^ self._mask
        return f"{self._prefix}{n:016x}"

    def take(self, given: str | None) -> str:
        """The caller's id ``given`` (an ``X-Request-ID`` value) when it is of the accepted
        shape, else a fresh one (the caller's is dropped)."""
        if given is not None and _ACCEPTED.fullmatch(given) is not None:
            return given
        return self.new()

    def __repr__(self) -> str:
        return "RequestIds()"
