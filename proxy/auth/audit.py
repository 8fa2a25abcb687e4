"""The audit log of token operations: what was done to which token, by whom, from where
(pure: no I/O; ``at`` comes in as Unix seconds).

A store that keeps one implements ``AuditLog`` beside ``TokenStore`` (PostgreSQL, SQLite,
memory; Redis keeps none). Entries never hold a token or its secret hash: ``detail`` holds
the fields set or changed (name, scopes, quotas, weight, expiry, class).
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Protocol, runtime_checkable

__all__ = ["ACTIONS", "MAX_AUDIT_PAGE", "AuditEntry", "AuditLog", "actor_name"]

ACTIONS = ("token.create", "token.revoke", "token.update", "token.migrate")
MAX_AUDIT_PAGE = 1000
_ACTOR_RE = re.compile(r"[A-Za-z0-9@._:+-]{1,128}")


def actor_name(raw: str | None) -> str | None:
    """An actor name as given (``X-Gateway-Actor``, ``cli:$USER``) if it is 1-128 of
    ``[A-Za-z0-9@._:+-]``; None otherwise (it is then not recorded rather than echoed)."""
    if raw is None or not _ACTOR_RE.fullmatch(raw):
        return None
    return raw


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One token operation. ``at``: Unix seconds. ``actor``: who (an admin identity, or
    ``cli:USER`` for the command line; None when none was given). ``address``: the admin
    client's address (None from the command line). ``seq``: the log's own order, set when
    stored (0 before)."""

    at: float
    action: str
    token_id: str
    actor: str | None = None
    address: str | None = None
    detail: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    seq: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action: must be one of {', '.join(ACTIONS)}")
        if not (math.isfinite(self.at) and self.at >= 0):
            raise ValueError("at: must be Unix seconds")

    def public_view(self) -> dict[str, object]:
        """JSON-able, for the admin API and the CLI; ``at`` in ISO 8601 UTC."""
        at = datetime.fromtimestamp(self.at, tz=UTC).isoformat(timespec="milliseconds")
        return {
            "seq": self.seq,
            "at": at.replace("+00:00", "Z"),
            "action": self.action,
            "token_id": self.token_id,
            "actor": self.actor,
            "address": self.address,
            "detail": dict(self.detail),
        }


@runtime_checkable
class AuditLog(Protocol):
    """Where audit entries are kept. Implementations pass tests/state/test_audit_log.py.
    A token store that keeps the log implements this too (``isinstance(store, AuditLog)``)."""

    async def append(self, entry: AuditEntry) -> None:
        """Store ``entry`` (its ``seq`` is ignored: the log numbers entries itself)."""

    async def entries(
        self, *, token_id: str | None = None, limit: int = 100
    ) -> builtins.list[AuditEntry]:
        """The newest ``limit`` entries (of ``token_id`` alone if given), newest first."""
