"""The real key in echowin's answer body, as the caller would read it.

echowin has no reason to send its key back, but a debug or error page that prints the
request it got would. An identity body is searched as it passes: every copy of the key
becomes as many ``*`` (:func:`masked`; the length stays, so ``Content-Length`` holds). A
compressed body (gzip or deflate, the codings the gateway lets callers ask echowin for:
:func:`readable_codings`) is inflated only to be searched (:class:`Inflated`) and relayed as
it came when the key is not in it.
"""

from __future__ import annotations

import functools
import zlib

# Content-Encoding values the gateway can read, and zlib's wbits for them: 47 takes a gzip
# or a zlib header, whichever comes (deflate is zlib-wrapped by RFC 9110 §8.4.1.2).
_WBITS = {"gzip": 47, "x-gzip": 47, "deflate": 47}
_READABLE = frozenset(_WBITS) | {"identity"}
# Inflated at most this much at a time: a small compressed chunk cannot make a huge buffer.
_STEP = 1 << 20
# Inflated in all at most this much for an answer decoded whole (to be masked and sent
# decoded): past it the answer is refused (502) rather than held in memory.
MAX_DECODED = 64 << 20


class Unreadable(Exception):
    """A compressed body the gateway cannot inflate (corrupt, or over MAX_DECODED)."""


def masked(data: bytes, key: bytes) -> bytes:
    """``data`` with every copy of ``key`` turned into as many ``*``."""
    return data.replace(key, b"*" * len(key)) if key in data else data


@functools.lru_cache(maxsize=64)
def readable_codings(accept_encoding: str) -> str:
    """The caller's ``Accept-Encoding`` less what the gateway could not search (br, zstd,
    ``*``...); ``identity`` when nothing is left. Kept for the few values clients send:
    it is worked out for every request."""
    kept = [
        part.strip()
        for part in accept_encoding.split(",")
        if part.partition(";")[0].strip().lower() in _READABLE
    ]
    return ", ".join(kept) or "identity"


def coding_of(content_encoding: str | None) -> str | None:
    """The one coding of an answer, lower case: ``""`` for none (or identity), None for
    one the gateway cannot read (br, zstd, several stacked)."""
    if content_encoding is None:
        return ""
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return ""
    return coding if coding in _WBITS else None


class Inflated:
    """A compressed body inflated as it comes, only to tell whether the key is in it; the
    last ``len(key) - 1`` inflated bytes are kept, so a key split between chunks is found."""

    __slots__ = ("_inflate", "_keep", "_key", "_tail", "plain_bytes")

    def __init__(self, key: bytes, coding: str) -> None:
        self._key = key
        self._keep = len(key) - 1
        self._inflate = zlib.decompressobj(_WBITS[coding])
        self._tail = b""
        self.plain_bytes = 0  # inflated so far

    @property
    def keep(self) -> int:
        """Inflated bytes that must follow a chunk before it can go: len(key) - 1."""
        return self._keep

    def holds_key(self, chunk: bytes) -> bool:
        """Whether the body inflated so far, ``chunk`` included, holds the key. Raises
        Unreadable for a corrupt stream."""
        data = chunk
        try:
            while data:
                if self._found(self._inflate.decompress(data, _STEP)):
                    return True
                data = self._inflate.unconsumed_tail
        except zlib.error:
            raise Unreadable from None
        return False

    def ends_with_key(self) -> bool:
        """What the stream still held at its end: whether it completes a key."""
        try:
            return self._found(self._inflate.flush())
        except zlib.error:
            raise Unreadable from None

    def _found(self, plain: bytes) -> bool:
        self.plain_bytes += len(plain)
        window = self._tail + plain
        self._tail = window[-self._keep :] if self._keep else b""
        return self._key in window


def decoded(body: bytes, coding: str) -> bytes:
    """A whole compressed body, inflated (at most MAX_DECODED bytes; else Unreadable)."""
    inflate = zlib.decompressobj(_WBITS[coding])
    try:
        plain = inflate.decompress(body, MAX_DECODED + 1)
        if len(plain) <= MAX_DECODED and not inflate.unconsumed_tail:
            plain += inflate.flush()
    except zlib.error:
        raise Unreadable from None
    if len(plain) > MAX_DECODED or inflate.unconsumed_tail:
        raise Unreadable
    return plain
