"""Request ids: unique across requests, restarts and replicas, and cheap to make.

``uuid4()`` reads 16 bytes from the OS for every request. A :class:`RequestIds` reads 24
once: a 64-bit prefix that names this process, and a random bijection of 64-bit integers
that turns a per-process counter into the rest of the id. Two ids of one process differ
because the counter does and the bijection keeps them apart; two processes (restarts,
replicas) differ by their prefix, unless 64 random bits collide. Passing the counter
through the bijection keeps ids from telling a caller how many requests came before.
"""

from __future__ import annotations

import itertools
import os

_MASK = (1 << 64) - 1


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

    def __repr__(self) -> str:
        return "RequestIds()"
