"""In-process token store (``memory://``): for tests, demos and throwaway sidecars.

It forgets every token on restart; use ``sqlite:///path`` for anything that must survive one.
"""

from __future__ import annotations

import builtins
import dataclasses
import itertools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Unpack

from proxy.auth.audit import MAX_AUDIT_PAGE, AuditEntry
from proxy.auth.tokens import TokenChanges, TokenRecord, apply_changes
from proxy.budget.quotas import QuotaSources, local_quota_source
from proxy.budget.slots import Line, SlotSource
from proxy.budget.windows import Limit

if TYPE_CHECKING:
    from proxy.budget.slots import Row

__all__ = ["MemorySendLog", "MemoryTokenStore", "memory_quota_sources"]


class MemoryTokenStore:
    """A dict of records keyed by public id, implementing ``proxy.auth.tokens.TokenStore``.

    Each method runs without awaiting, so on one event loop it is atomic. Records are frozen,
    so handing out the stored objects is safe. After ``close`` every method raises RuntimeError.
    """

    AUDIT_KEPT = 10_000
    """Audit entries kept (the oldest are dropped past it): memory:// is for tests and demos."""

    def __init__(self) -> None:
        self._records: dict[str, TokenRecord] = {}
        self._by_name: dict[str, builtins.list[str]] = {}  # name -> ids (names never change)
        self._audit: deque[AuditEntry] = deque(maxlen=self.AUDIT_KEPT)
        self._seq = itertools.count(1)
        self._closed = False

    def _open_records(self) -> dict[str, TokenRecord]:
        if self._closed:
            raise RuntimeError("memory token store is closed")
        return self._records

    async def put(self, record: TokenRecord) -> None:
        records = self._open_records()
        if record.id in records:
            raise ValueError(f"token id {record.id!r} already exists")
        records[record.id] = record
        self._by_name.setdefault(record.name, []).append(record.id)

    async def get(self, token_id: str) -> TokenRecord | None:
        return self._open_records().get(token_id)

    async def list(self) -> builtins.list[TokenRecord]:
        return sorted(self._open_records().values(), key=lambda r: (r.created_at, r.id))

    async def by_name(self, name: str) -> builtins.list[TokenRecord]:
        records = self._open_records()
        named = (records[token_id] for token_id in self._by_name.get(name, ()))
        return sorted(named, key=lambda r: (r.created_at, r.id))

    async def revoke(self, token_id: str, now: float) -> TokenRecord | None:
        records = self._open_records()
        record = records.get(token_id)
        if record is None or record.revoked_at is not None:
            return record
        records[token_id] = revoked = dataclasses.replace(record, revoked_at=now)
        return revoked

    async def update(self, token_id: str, **changes: Unpack[TokenChanges]) -> TokenRecord | None:
        records = self._open_records()
        record = records.get(token_id)
        if record is None:
            return None
        records[token_id] = updated = apply_changes(record, changes)
        return updated

    async def append(self, entry: AuditEntry) -> None:
        self._open_records()
        self._audit.append(dataclasses.replace(entry, seq=next(self._seq)))

    async def entries(
        self, *, token_id: str | None = None, limit: int = 100
    ) -> builtins.list[AuditEntry]:
        self._open_records()
        limit = max(1, min(limit, MAX_AUDIT_PAGE))
        found = (e for e in reversed(self._audit) if token_id in (None, e.token_id))
        return builtins.list(itertools.islice(found, limit))

    async def ping(self) -> None:
        self._open_records()

    async def close(self) -> None:
        self._closed = True


class MemorySendLog:
    """A send log that keeps nothing (``proxy.budget.slots.SendLog`` for ``memory://``).

    ``durable`` is False: after a start the scheduler sends one probe at a time until
    echowin's rate-limit headers say how much of the budget is already spent.
    """

    durable = False
    # Nothing is written, but a block of slots planned at once (far from every limit) saves
    # planning each send: the same leases as a SQLite log's (proxy.budget.local_slots.LocalSlots).
    block_max = 256

    def reserve(
        self,
        credential: str,
        plan: Callable[[builtins.list[Row], Line], Row | None],
        returned: Row | None,
    ) -> Row | None:
        return plan([], Line([]))  # one process: no one else in line

    def poll(self, credential: str) -> builtins.list[Row]:
        return []

    async def give_back(self, credential: str, at: float, n: int, cls: str = "") -> None:
        return None

    async def move(self, credential: str, at: float, to: float, cls: str = "") -> None:
        return None

    async def freeze(self, credential: str, until: float) -> None:
        return None

    async def frozen(self, credential: str) -> float | None:
        return None

    async def recent(self, credential: str, since: float) -> builtins.list[float]:
        return []

    async def recent_classes(
        self, credential: str, since: float
    ) -> builtins.list[tuple[float, str]]:
        return []

    async def prune(self, before: float) -> None:
        return None

    async def close(self) -> None:
        return None


def memory_quota_sources(clock: Callable[[], float] | None = None) -> QuotaSources:
    """Token quotas kept in this process (a fresh send log), for a scheduler whose state
    keeps none of its own: ``memory://``, and the tests."""
    log = MemorySendLog()

    def quota_source(name: str, limits: tuple[Limit, ...]) -> SlotSource:
        return local_quota_source(name, limits, log, clock)

    return quota_source
