"""Helpers of the auth tests: a fake clock, a counting token store, minted tokens."""

from __future__ import annotations

import asyncio
import re

from proxy.auth.tokens import (
    NewToken,
    TokenRecord,
    mint_token,
)
from proxy.state.memory import MemoryTokenStore

T0 = 1_700_000_000.0


TOKEN_RE = re.compile(r"egw_[a-z0-9]{12}_[A-Za-z0-9]{43}")

# A well-formed token (its id and secret of the right alphabets and lengths).
GOOD = "egw_abcdefghij01_" + "A" * 21 + "z" * 21 + "9"


class FakeClock:
    """A clock that moves only when told to (seconds)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingStore(MemoryTokenStore):
    """MemoryTokenStore that counts lookups and can hold them at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def get(self, token_id: str) -> TokenRecord | None:
        self.gets += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return await super().get(token_id)


def mint(**overrides: object) -> NewToken:
    kwargs: dict[str, object] = {"name": "crm-sync", "scopes": ["contacts:read"], "now": T0}
    kwargs.update(overrides)
    return mint_token(**kwargs)  # type: ignore[arg-type]


async def stored(store: MemoryTokenStore, **overrides: object) -> NewToken:
    new = mint(**overrides)
    await store.put(new.record)
    return new
