"""The AuditLog contract (proxy.auth.audit), run against every store that keeps one: memory,
SQLite and PostgreSQL (Redis keeps none). PostgreSQL is the real server of
tests/state/pg_server.py, in this session's database: when it does not answer, its tests
FAIL (never skip).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from proxy.auth.audit import MAX_AUDIT_PAGE, AuditEntry, AuditLog, actor_name
from proxy.state import open_token_store
from tests.state.pg_server import empty_tables

T0 = 1_700_000_000.0
ID_A, ID_B = "a" * 12, "b" * 12


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AuditLog]:
    async with AsyncExitStack() as stack:
        if request.param == "postgresql":
            url = request.getfixturevalue("pg_session_url")
            stack.push_async_callback(empty_tables, url)
        else:
            url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path}/state.db"}[request.param]
        store = await open_token_store(url)
        stack.push_async_callback(store.close)
        assert isinstance(store, AuditLog)
        yield store


def entry(n: int, token_id: str = ID_A, **overrides: object) -> AuditEntry:
    fields: dict[str, object] = {
        "at": T0 + n + 0.125,
        "action": "token.update",
        "token_id": token_id,
        "actor": "ops@example.com",
        "address": "10.0.0.7",
        "detail": {"hourly": n, "scopes": ["contacts:read"], "expires_at": None},
    }
    fields.update(overrides)
    return AuditEntry(**fields)  # type: ignore[arg-type]


async def test_an_entry_comes_back_as_written_with_its_number(log: AuditLog) -> None:
    await log.append(entry(1))
    (got,) = await log.entries()
    assert got.seq >= 1
    assert got == entry(1, seq=got.seq)


async def test_entries_are_newest_first_and_bounded(log: AuditLog) -> None:
    assert await log.entries() == []
    for n in range(5):
        await log.append(entry(n))
    got = await log.entries(limit=3)
    assert [e.detail["hourly"] for e in got] == [4, 3, 2]
    assert [e.seq for e in got] == sorted((e.seq for e in got), reverse=True)
    assert len(await log.entries(limit=0)) == 1  # at least one is asked for


async def test_entries_of_one_token(log: AuditLog) -> None:
    await log.append(entry(1, ID_A, action="token.create"))
    await log.append(entry(2, ID_B, action="token.create", actor=None, address=None))
    await log.append(entry(3, ID_A, action="token.revoke", detail={}))
    assert [e.action for e in await log.entries(token_id=ID_A)] == ["token.revoke", "token.create"]
    (b,) = await log.entries(token_id=ID_B)
    assert (b.actor, b.address) == (None, None)
    assert await log.entries(token_id="c" * 12) == []


async def test_concurrent_appends_are_all_kept_in_distinct_order(log: AuditLog) -> None:
    await asyncio.gather(*(log.append(entry(n)) for n in range(20)))
    got = await log.entries(limit=MAX_AUDIT_PAGE)
    assert sorted(e.detail["hourly"] for e in got) == list(range(20))  # type: ignore[type-var]
    assert len({e.seq for e in got}) == 20


def test_an_entry_refuses_an_unknown_action_or_time() -> None:
    with pytest.raises(ValueError, match=r"^action:"):
        AuditEntry(at=T0, action="token.delete", token_id=ID_A)
    with pytest.raises(ValueError, match=r"^at:"):
        AuditEntry(at=float("nan"), action="token.create", token_id=ID_A)


def test_the_public_view_shows_iso_time() -> None:
    view = entry(1, seq=7).public_view()
    assert view["at"] == "2023-11-14T22:13:21.125Z"
    assert view["seq"] == 7 and view["actor"] == "ops@example.com"


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        ("ops@example.com", "ops@example.com"),
        ("cli:root", "cli:root"),
        ("", None),
        (None, None),
        ("a" * 129, None),
        ("Robert'); DROP TABLE", None),
        ("line\nbreak", None),
    ],
)
def test_actor_names(raw: str | None, kept: str | None) -> None:
    assert actor_name(raw) == kept
