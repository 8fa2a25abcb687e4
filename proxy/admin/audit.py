"""The audit log of token operations, as the admin API and the CLI write and read it.

Every create, revoke and change made through the admin API or the ``token`` commands is
written to the token store's audit log (``proxy.auth.audit``) when the store keeps one
(PostgreSQL, SQLite, memory; Redis keeps none), just after the change itself: a change that
fails writes nothing, and an entry that cannot be written is logged as an error (the change
stands). ``GET /admin/audit`` reads it back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from proxy.auth.audit import MAX_AUDIT_PAGE, AuditEntry, AuditLog, actor_name
from proxy.auth.client_address import parse_address
from proxy.auth.tokens import TokenChanges, TokenRecord, TokenStore
from proxy.errors import Reason, json_error
from proxy.runtime import RUNTIME

__all__ = [
    "ACTOR_HEADER",
    "Actor",
    "admin_actor",
    "audit_list",
    "changes_detail",
    "created_detail",
    "record_operation",
]

log = logging.getLogger("echowin_gateway.audit")

ACTOR_HEADER = "X-Gateway-Actor"
"""Who an admin call is made for (an operator's name, ``cli:USER``); 1-128 characters of
``[A-Za-z0-9@._:+-]``, else not recorded. The admin token is one shared secret: this header
is what tells its holders apart in the log."""
ADMIN_TOKEN_ACTOR = "admin-token"  # noqa: S105 - the actor's name, not a token


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks for a token operation (``name``) and from which address (``address``, the
    admin client's; None from the command line)."""

    name: str | None = None
    address: str | None = None


def admin_actor(request: web.Request) -> Actor:
    """The actor of an admin API call: ``X-Gateway-Actor`` if valid, else ``admin-token``;
    the peer's address (behind ``serve --workers N``, the group listener's peer: a worker
    takes it from its private socket's X-Forwarded-For, ``proxy/server/worker.py``)."""
    name = actor_name(request.headers.get(ACTOR_HEADER)) or ADMIN_TOKEN_ACTOR
    peer = parse_address(request.remote)
    return Actor(name, None if peer is None else str(peer))


_CREATED = (
    "name",
    "scopes",
    "upstream_key",
    "hourly",
    "per_minute",
    "weight",
    "expires_at",
    "class",
)
_VIEW_KEYS = {"service_class": "class"}
"""A change's field named as the admin API shows it, where the two differ."""


def created_detail(record: TokenRecord) -> dict[str, object]:
    """What a create set, as the admin API shows it (never the secret or its hash)."""
    view = record.public_view()
    return {key: view[key] for key in _CREATED}


def changes_detail(changes: TokenChanges, record: TokenRecord) -> dict[str, object]:
    """The fields an update named, with the values ``record`` (as updated) holds (a class
    as ``class``: null for the default class)."""
    view = record.public_view()
    return {key: view[key] for key in (_VIEW_KEYS.get(name, name) for name in changes)}


async def record_operation(
    store: TokenStore,
    actor: Actor,
    action: str,
    token_id: str,
    detail: Mapping[str, object],
    now: float | None = None,
) -> None:
    """Append one entry to ``store``'s audit log, if it keeps one. Never raises for the
    log's sake: the change is made already, so a failure is logged as an error instead."""
    if not isinstance(store, AuditLog):
        return
    entry = AuditEntry(
        at=time.time() if now is None else now,
        action=action,
        token_id=token_id,
        actor=actor.name,
        address=actor.address,
        detail=detail,
    )
    try:
        await store.append(entry)
    except Exception as exc:
        fields = {"action": action, "token_id": token_id, "error": type(exc).__name__}
        log.error("audit entry not written", extra={"fields": fields})


async def audit_list(request: web.Request) -> web.Response:
    """GET /admin/audit[?token_id=ID][&limit=N]: the newest entries first (limit 1-1000,
    default 100). 404 when the token store keeps no audit log (Redis)."""
    store = request.app[RUNTIME].store
    if not isinstance(store, AuditLog):
        return json_error(
            404,
            "This token store keeps no audit log: use token_store: postgresql:// (or sqlite)",
            reason=Reason.NOT_FOUND,
        )
    query = request.query
    text = query.get("limit", "100")
    digits = len(text) <= len(str(MAX_AUDIT_PAGE)) and text.isascii() and text.isdigit()
    if not (digits and 1 <= int(text) <= MAX_AUDIT_PAGE):
        return json_error(400, "limit: must be a whole number 1-1000", reason=Reason.BAD_REQUEST)
    entries = await store.entries(token_id=query.get("token_id") or None, limit=int(text))
    return web.json_response({"entries": [e.public_view() for e in entries]})
