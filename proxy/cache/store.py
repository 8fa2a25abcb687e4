"""The cache of GET answers: bounded by bytes (cachetools' ``getsizeof``), each entry kept
until its freshness plus ``stale_seconds`` runs out (a stale copy may still stand in for a
refusal), least recently used evicted first. Pure: the clock is passed in (seconds)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cachetools import TLRUCache

from proxy.cache.keys import CacheKey

__all__ = ["Answer", "Entry", "ResponseCache", "key_bytes"]

# What an entry costs beyond its body, fields and key's text: the objects, the cache's own.
_OVERHEAD = 512


def key_bytes(key: CacheKey) -> int:
    """What ``key``'s text costs (its path and query may run to kilobytes)."""
    return sum(len(part) for part in key)


@dataclass(frozen=True, slots=True)
class Answer:
    """echowin's answer as every caller gets it: the key watch applied (it never holds
    the key), without the per-caller fields (rate limits, X-Request-ID, Server-Timing) and
    without its length (the body carries it)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def size(self) -> int:
        fields = sum(len(name) + len(value) + 4 for name, value in self.headers)
        return len(self.body) + fields + _OVERHEAD


@dataclass(frozen=True, slots=True)
class Entry:
    """An answer kept at ``stored_at`` (the cache's clock), fresh for ``fresh_for``
    seconds; ``size``: what it counts against ``max_bytes``, its key included;
    ``must_revalidate``: echowin forbade serving it stale."""

    answer: Answer
    stored_at: float
    fresh_for: float
    size: int = 0
    must_revalidate: bool = False

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    def staleness(self, now: float) -> float:
        """Seconds past freshness (<= 0 while fresh)."""
        return self.age(now) - self.fresh_for

    def may_stand_in(self, now: float, allowed: float) -> bool:
        """Served stale, at most ``allowed`` seconds past freshness, where echowin
        allowed it at all."""
        return not self.must_revalidate and self.staleness(now) <= allowed


class _Bounded(TLRUCache[CacheKey, Entry]):
    """cachetools' TLRU cache counting what it evicts for room (not what expires)."""

    evictions = 0

    def popitem(self) -> tuple[CacheKey, Entry]:
        item = super().popitem()
        self.evictions += 1
        return item


class ResponseCache:
    """Answers by :class:`~proxy.cache.keys.CacheKey`, within ``max_bytes`` in all and
    ``max_entry_bytes`` each; an entry is dropped ``stale_seconds`` after it went stale."""

    def __init__(
        self,
        max_bytes: int,
        max_entry_bytes: int,
        stale_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self.max_entry_bytes = max_entry_bytes
        self.stale_seconds = stale_seconds
        self.clock = clock
        self._entries = _Bounded(
            max_bytes,
            ttu=lambda _key, entry, _now: entry.stored_at + entry.fresh_for + stale_seconds,
            timer=lambda: self.clock(),  # read at each use: a test may move the clock
            getsizeof=lambda entry: entry.size,
        )

    def get(self, key: CacheKey) -> Entry | None:
        """The entry under ``key`` (fresh or stale), or None."""
        return self._entries.get(key)

    def put(
        self, key: CacheKey, answer: Answer, fresh_for: float, *, must_revalidate: bool = False
    ) -> bool:
        """Keep ``answer`` for ``fresh_for`` seconds (and ``stale_seconds`` past them,
        unless ``must_revalidate``: never served stale); False when it is too large to
        keep (any older copy is dropped then too)."""
        if answer.size > self.max_entry_bytes:
            self._entries.pop(key, None)
            return False
        size = answer.size + key_bytes(key)
        self._entries[key] = Entry(answer, self.clock(), fresh_for, size, must_revalidate)
        return True

    def purge(self, credential: str | None, matches: Callable[[str], bool]) -> int:
        """Drop every entry of ``credential`` (every credential's: None) whose path
        ``matches``; how many were dropped."""
        doomed = [
            key
            for key in self._keys()
            if (credential is None or key.credential == credential) and matches(key.path)
        ]
        for key in doomed:
            self._entries.pop(key, None)
        return len(doomed)

    def _keys(self) -> Iterator[CacheKey]:
        self._entries.expire()
        return iter(list(self._entries.keys()))

    @property
    def bytes(self) -> int:
        """Bytes held (as ``Entry.size`` counts them)."""
        return int(self._entries.currsize)

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def evictions(self) -> int:
        """Entries dropped for room since the start."""
        return self._entries.evictions
