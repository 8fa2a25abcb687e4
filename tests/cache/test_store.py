"""The store's bounds: bytes in all, bytes per entry, TTL plus stale_seconds, evictions.
A fake clock; no sockets."""

from __future__ import annotations

from proxy.cache.keys import CacheKey
from proxy.cache.purge import EVERYTHING, Purge
from proxy.cache.store import Answer, ResponseCache, key_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def key(path: str, credential: str = "default") -> CacheKey:
    return CacheKey(credential, path, path, "", "*/*", "")


def answer(size: int) -> Answer:
    return Answer(200, (("Content-Type", "application/json"),), b"x" * size)


def test_an_entry_over_max_entry_bytes_is_not_kept() -> None:
    store = ResponseCache(100_000, 2_000, 10, Clock())
    assert store.put(key("/a"), answer(1_000), 5)
    assert not store.put(key("/b"), answer(2_000), 5)  # body alone fits; with its fields not
    assert store.get(key("/b")) is None
    assert not store.put(key("/a"), answer(5_000), 5)  # a too-large answer drops the old copy
    assert store.get(key("/a")) is None


def test_the_total_stays_within_max_bytes_least_recently_used_evicted() -> None:
    size = answer(1_000).size + key_bytes(key("/a"))  # each key as long as /a's
    store = ResponseCache(size * 3, size, 10, Clock())
    for name in ("/a", "/b", "/c"):
        assert store.put(key(name), answer(1_000), 5)
    assert store.get(key("/a")) is not None  # /b is now the least recently used
    assert store.put(key("/d"), answer(1_000), 5)
    assert store.bytes <= size * 3
    assert store.entries == 3
    assert store.get(key("/b")) is None
    assert store.evictions == 1


def test_a_copy_is_fresh_for_its_ttl_then_stale_then_gone() -> None:
    clock = Clock()
    store = ResponseCache(100_000, 10_000, 30, clock)
    store.put(key("/a"), answer(10), 5)
    clock.now += 4
    entry = store.get(key("/a"))
    assert entry is not None and entry.staleness(clock()) < 0 and entry.age(clock()) == 4
    clock.now += 20
    entry = store.get(key("/a"))
    assert entry is not None and entry.staleness(clock()) == 19
    clock.now += 12  # 36 s: past 5 + 30
    assert store.get(key("/a")) is None
    assert store.entries == 0
    assert store.evictions == 0  # expired, not evicted


def test_purges_by_credential_and_path() -> None:
    store = ResponseCache(100_000, 10_000, 30, Clock())
    for path in ("/api/v1/contacts", "/api/v1/contacts/7", "/api/v1/contacts/77", "/api/v1/tags"):
        store.put(key(path), answer(10), 5)
    store.put(key("/api/v1/tags", "acme"), answer(10), 5)
    purge = Purge(frozenset({"/api/v1/contacts"}), ("/api/v1/contacts/7",))
    assert store.purge("default", purge.matches) == 2
    assert store.get(key("/api/v1/contacts/77")) is not None
    assert store.purge("acme", EVERYTHING.matches) == 1
    assert store.get(key("/api/v1/tags")) is not None
    assert store.purge(None, EVERYTHING.matches) == 2


def test_the_key_counts_against_max_bytes() -> None:
    store = ResponseCache(100_000, 10_000, 30, Clock())
    long = CacheKey("default", "/api/v1/contacts", "/api/v1/contacts", "q=" + "x" * 8000, "*/*", "")
    assert store.put(long, answer(10), 5)
    assert store.bytes == answer(10).size + key_bytes(long)
    assert store.bytes > 8000


def test_a_copy_echowin_said_must_revalidate_never_stands_in_stale() -> None:
    clock = Clock()
    store = ResponseCache(100_000, 10_000, 30, clock)
    store.put(key("/a"), answer(10), 5)
    store.put(key("/b"), answer(10), 5, must_revalidate=True)
    clock.now += 10  # both 5 s stale
    a, b = store.get(key("/a")), store.get(key("/b"))
    assert a is not None and a.may_stand_in(clock(), 30)
    assert b is not None and not b.may_stand_in(clock(), 30)
    assert not a.may_stand_in(clock(), 4)
