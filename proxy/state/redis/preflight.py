"""The start-up check of a Redis state: may this gateway's user run what it needs?

A user without a permission the gateway needs (an ACL without ``+time``, a key pattern
that misses ``redis.key_prefix``), a wrong password, a TLS certificate that does not verify
or a URL that points at a read-only replica are configuration errors: ``check_access``
raises :class:`StateAccessError` (``serve`` prints one ``error: state: ...`` line and exits
1), so they are not mistaken for an outage later, when every refusal would read as "Redis
is down". A Redis that does not answer at all is an outage: the gateway starts, and runs
as ``on_state_failure`` says until Redis answers.

The check runs every command and script the gateway uses, on probe keys under the prefix
(``{prefix}~probe...``) that expire within a second or two: it writes nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    ConnectionError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.auth.tokens import TokenRecord
from proxy.budget.windows import Limit
from proxy.state.redis import scripts
from proxy.state.redis.client import RedisClient
from proxy.state.redis.tokens import RedisTokenStore
from proxy.state.sqlite.connection import StateFileError

__all__ = ["ACL_COMMANDS", "PROBE_SECONDS", "StateAccessError", "acl_rule", "check_access"]

log = logging.getLogger("echowin_gateway.state")

ACL_COMMANDS = (
    "ping time select evalsha script|load"
    " get set exists pexpire zadd zrem zrange zrangebyscore zcount zremrangebyscore"
    " hgetall hset hsetnx hdel watch unwatch multi exec discard"
    " publish subscribe unsubscribe cluster|slots command"
)
"""Every command the gateway runs (the scripts' own calls included); the least an ACL
user needs (docs/operations.md, "An ACL user"). ``cluster|slots`` and ``command`` only on
a cluster (redis-py's cluster client learns the slots and the commands' key positions),
``select`` only for a database other than 0. (redis-py also sends ``CLIENT SETINFO`` on
Redis 7.2 and later, and goes on without it when refused.)"""

OUTAGE = (ConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError, OSError)
"""What says "Redis is not there (yet)": the gateway starts, and runs as on_state_failure
says until it answers. (MASTERDOWN, a replica without its master, is a ClusterDownError.)"""

PROBE_SECONDS = 2
"""The probe keys expire this long after the check, at most."""


def acl_rule(user: str, prefix: str) -> str:
    """The ``ACL SETUSER`` arguments after the password for ``user`` on ``prefix``: its keys
    and channels only, those commands only."""
    commands = " ".join(f"+{command}" for command in ACL_COMMANDS.split())
    return f"{user} on resetkeys ~{prefix}* resetchannels &{prefix}* -@all {commands}"


class StateAccessError(StateFileError):
    """The Redis state cannot be used as configured (a permission, the password, TLS, a
    read-only server). The message starts ``state:``, names what failed and never the
    password."""


def _refused(exc: RedisError) -> bool:
    """An answer that says "not allowed" (before Redis 7.2 a script's refused call is an
    ``ERR ... can't run this command``) or "not writable" rather than "not there"."""
    text = str(exc)
    return isinstance(exc, NoPermissionError) or any(
        needle in text for needle in ("NOPERM", "can't run this command", "READONLY")
    )


async def check_access(client: RedisClient, prefix: str) -> None:
    """Run every command the gateway needs on probe keys; StateAccessError naming the first
    one Redis refuses. Redis not answering: a warning, and the gateway starts."""
    probe = f"~probe{secrets.token_hex(4)}"
    steps = _budget_steps(client, prefix, probe) + _token_steps(client, prefix, probe)
    try:
        for what, step in steps:
            await _run(what, step)
    except (*OUTAGE, RedisClusterException) as exc:
        log.warning(
            "shared state unreachable at start",
            extra={"fields": {"error": type(exc).__name__}},
        )


async def _run(what: str, step: Callable[[], Awaitable[Any]]) -> None:
    """One step; what says "configured wrong" becomes StateAccessError, what says "not
    there" (a connection error, a timeout) goes through."""
    try:
        await step()
    except AuthenticationError as exc:
        raise StateAccessError(f"state: Redis refused the user or password: {exc}") from None
    except (ConnectionError, RedisTimeoutError, OSError) as exc:
        if "SSL" in str(exc) or "certificate" in str(exc):
            raise StateAccessError(f"state: TLS to Redis failed: {exc}") from None
        raise
    except RedisClusterException as exc:
        # No node could be used: its reason is in the text (TLS, the password, or "cluster
        # mode is not enabled", also what a user without +cluster|slots meets).
        if "SSL" in str(exc) or "certificate" in str(exc):
            raise StateAccessError(f"state: TLS to Redis failed: {exc}") from None
        if "invalid username-password" in str(exc) or "WRONGPASS" in str(exc):
            raise StateAccessError(f"state: Redis refused the user or password: {exc}") from None
        if "not enabled" in str(exc):
            raise StateAccessError(
                f"state: a redis-cluster:// URL, but {exc} (or the user may not run"
                " CLUSTER SLOTS: docs/operations.md, An ACL user)"
            ) from None
        raise
    except (ClusterDownError, TryAgainError):
        raise  # a cluster without a master for the slot, for now: an outage
    except ResponseError as exc:
        if _refused(exc):
            raise StateAccessError(
                f"state: the Redis user may not run {what}: {exc} (the ACL the gateway needs:"
                " docs/operations.md, An ACL user)"
            ) from None
        raise StateAccessError(f"state: Redis refused {what}: {exc}") from None


Step = tuple[str, Callable[[], Awaitable[Any]]]

_PROBE_CLASSES: scripts.ClassTable = (
    "probe",
    (("probe", (0,)), ("other", (1,))),
    {"probe": ((1, 1.0),)},
)
"""Two classes for the probe's one window: ``other`` holds a reservation, ``probe`` is paced."""


def _budget_steps(client: RedisClient, prefix: str, probe: str) -> list[Step]:
    keys = scripts.BudgetKeys(prefix, probe, 1, tagged=scripts.hash_tagged(client))
    run = scripts.Scripts(client)
    limits = (Limit(1, 1.0),)
    reserve = scripts.reserve_args(
        member="probe:1",
        waiting=True,
        served=0.0,
        cursor=0.0,
        known_epoch="",
        new_epoch="probe",
        replica="probe",
        guard=0.0,
        horizon=1.0,
        limits=limits,
    )
    # The same step with classes of service (classes.lua): another class's reservation to
    # respect, and this send's class paced, so every call of the class rules runs.
    classed = scripts.reserve_args(
        member="probe:3|probe",
        waiting=False,
        served=0.0,
        cursor=0.0,
        known_epoch="",
        new_epoch="probe",
        replica="probe",
        guard=0.0,
        horizon=1.0,
        limits=limits,
    ) + scripts.class_args("probe", _PROBE_CLASSES)
    observe = scripts.observe_args(used=0, span=1.0, requests=1, prefix="probe")
    freeze = scripts.freeze_args(seconds=0.001, channel=keys.freezes, replica="probe")
    horizon = PROBE_SECONDS * 1000
    return [
        ("PING", client.ping),
        ("TIME", client.time),
        (
            "the reservation script (EVALSHA, SCRIPT LOAD)",
            lambda: run.reserve(keys.reserve, reserve),
        ),
        ("the reservation script's class rules", lambda: run.reserve(keys.reserve, classed)),
        ("the snapshot script", lambda: run.snapshot(keys.snapshot, [1.0, "probe"])),
        ("the observation script", lambda: run.observe(keys.observe(0), observe)),
        ("the freeze script (PUBLISH)", lambda: run.freeze([keys.frozen], freeze)),
        ("ZADD", lambda: client.zadd(keys.sends, {"probe:2": time.time()})),
        ("ZREM", lambda: client.zrem(keys.sends, "probe:2")),
        ("PEXPIRE", lambda: client.pexpire(keys.sends, horizon)),
        ("GET", lambda: client.get(keys.frozen)),
        ("HDEL", lambda: client.hdel(keys.line, "probe")),
        ("SUBSCRIBE", lambda: _subscribe(client, keys.freezes)),
    ]


async def _subscribe(client: RedisClient, channel: str) -> None:
    async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(channel)
        await asyncio.wait_for(pubsub.get_message(timeout=0.1), timeout=1.0)
        await pubsub.unsubscribe(channel)


def _token_steps(client: RedisClient, prefix: str, probe: str) -> list[Step]:
    store = RedisTokenStore(client, key_prefix=f"{prefix}{probe}:")
    record = TokenRecord(
        id=secrets.token_hex(6), name="probe", secret_hash="0" * 64, scopes=("probe",)
    )
    hash_key, index, name_index, count = store.keys(record.id, record.name)
    expire = PROBE_SECONDS * 1000
    return [
        ("the token scripts", lambda: store.put(record)),
        ("PEXPIRE", lambda: client.pexpire(hash_key, expire)),
        ("PEXPIRE", lambda: client.pexpire(index, expire)),
        ("PEXPIRE", lambda: client.pexpire(name_index, expire)),
        ("PEXPIRE", lambda: client.pexpire(count, expire)),
        ("HGETALL", lambda: store.get(record.id)),
        ("MULTI, GET, ZCOUNT, HGETALL, EXEC", lambda: store.by_name(record.name)),
        ("WATCH, MULTI, HSET, HDEL, EXEC", lambda: store.update(record.id, weight=2, hourly=None)),
        ("ZRANGE", store.list),
        ("the revocation script", lambda: store.revoke(record.id, time.time())),
    ]
