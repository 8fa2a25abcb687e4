"""Durable state behind Protocols, and the one place that picks a backend from the state URL.

Supported ``state`` URLs:

- ``memory://``: in-process, forgotten on restart.
- ``sqlite:///var/lib/echowin-gateway/state.db``: an absolute path (three slashes, then the
  path without its leading ``/``; four slashes such as ``sqlite:////state.db`` also work and
  are needed for a file directly under ``/``).
- ``sqlite:///state.db``, ``sqlite:///./data/state.db``, ``sqlite:///../state.db``: relative
  to the working directory. A bare file name or a path starting ``./`` or ``../`` is relative.
- ``redis://host:6379/0`` (``rediss://`` for TLS): shared by several replicas. The password
  comes from the config's ``redis.password``, never from the URL (one there is refused); an
  ACL user name may precede the host (``redis://gateway@host:6379/0``). Needs the ``redis``
  extra; this package imports redis-py only when a Redis URL is used.

Missing directories of a SQLite path are created. Percent-escapes in the path are decoded.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

from proxy.state.memory import MemorySendLog, MemoryTokenStore
from proxy.state.sqlite import SqliteSendLog, SqliteTokenStore
from proxy.tokens import TokenStore

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from proxy.state.redis import RedisOptions, RedisTokenStore, open_redis

__all__ = [
    "MemorySendLog",
    "MemoryTokenStore",
    "RedisOptions",
    "RedisTokenStore",
    "SqliteSendLog",
    "SqliteTokenStore",
    "StateUrl",
    "open_redis",
    "open_send_log",
    "open_token_store",
    "parse_state_url",
]

_SUPPORTED = "use memory://, sqlite:///path/to/state.db or redis://host:6379/0"
_REDIS_NAMES = frozenset({"RedisOptions", "RedisTokenStore", "open_redis"})


def __getattr__(name: str) -> object:
    """The Redis names, imported on first use so memory and sqlite work without redis-py."""
    if name in _REDIS_NAMES:
        return getattr(importlib.import_module("proxy.state.redis"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _require_redis() -> None:
    """ValueError naming the missing extra, before anything imports redis-py."""
    if importlib.util.find_spec("redis") is None:
        raise ValueError("state: redis:// needs redis-py: pip install 'echowin-gateway[redis]'")


@dataclass(frozen=True, slots=True)
class StateUrl:
    """A parsed ``state`` URL: the backend; for sqlite the file path (maybe relative); for
    redis the URL itself (checked, and free of any password)."""

    backend: Literal["memory", "sqlite", "redis"]
    path: str | None = None
    url: str | None = field(default=None, repr=False)


def _sqlite_path(rest: str) -> str:
    """The file path in ``sqlite://<rest>``; see the module docstring for the rules."""
    if not rest.startswith("/") or rest == "/":
        raise ValueError(f"state: a sqlite URL needs a file path: {_SUPPORTED}")
    if "?" in rest or "#" in rest:
        raise ValueError("state: a sqlite URL takes no query or fragment")
    path = unquote(rest[1:])
    if "\x00" in path:
        raise ValueError("state: a sqlite file path cannot hold a NUL byte (%00)")
    relative = path.startswith(("./", "../")) or "/" not in path
    if not relative and not path.startswith("/"):
        path = "/" + path
    if path.endswith("/") or path.rsplit("/", 1)[-1] in ("", ".", "..", ":memory:"):
        raise ValueError(f"state: {path!r} is not a database file name")
    return path


def parse_state_url(url: str) -> StateUrl:
    """Parse and check a ``state`` URL without opening anything (for ``check-config``).

    ValueError, starting ``state:``, for anything unsupported. Messages never repeat the whole
    URL, since a later backend's URL (Redis) may carry a password.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"state: not a URL: {_SUPPORTED}")
    if scheme == "memory":
        if rest not in ("", "/"):
            raise ValueError("state: memory:// takes nothing after the scheme")
        return StateUrl("memory")
    if scheme == "sqlite":
        return StateUrl("sqlite", _sqlite_path(rest))
    if scheme in ("redis", "rediss"):
        _require_redis()
        from proxy.state.redis import parse_redis_url

        parse_redis_url(url)
        return StateUrl("redis", url=url)
    raise ValueError(f"state: unsupported URL scheme {scheme[:20]!r}: {_SUPPORTED}")


async def open_token_store(
    url: str,
    *,
    redis_options: RedisOptions | None = None,
    redis_client: Redis | None = None,
) -> TokenStore:
    """Open the token store named by a ``state`` URL (async: opening may touch disk or network).

    The caller owns the store and must ``await store.close()``. ValueError for a bad URL (see
    ``parse_state_url``); ``StateFileError`` (proxy.state.sqlite) if the file cannot be
    opened.

    For ``redis://``: ``redis_options`` gives the password, key prefix and timeout (default
    ``RedisOptions()``). With ``redis_client`` (from ``open_redis``, shared with the budget)
    the store uses it and leaves it open on ``close``; without, the store opens its own client
    and closes it. Nothing is sent to Redis here, so a gateway starts while Redis is down;
    ``ping`` tells. Both keywords are ignored for the other backends.
    """
    state = parse_state_url(url)
    if state.backend == "memory":
        return MemoryTokenStore()
    if state.backend == "redis":
        return _open_redis_store(url, redis_options, redis_client)
    assert state.path is not None
    return await SqliteTokenStore.open(state.path)


def _open_redis_store(
    url: str, options: RedisOptions | None, client: Redis | None
) -> RedisTokenStore:
    from proxy.state.redis import RedisOptions, RedisTokenStore, open_redis

    options = RedisOptions() if options is None else options
    if client is not None:
        return RedisTokenStore(client, key_prefix=options.key_prefix)
    return RedisTokenStore(
        open_redis(url, options), key_prefix=options.key_prefix, owns_client=True
    )


async def open_send_log(url: str) -> MemorySendLog | SqliteSendLog:
    """Open the budget's write-ahead send log named by a ``state`` URL (see above).

    ValueError for ``redis://``: the shared budget keeps its state in Redis by other means.
    """
    state = parse_state_url(url)
    if state.backend == "memory":
        return MemorySendLog()
    if state.backend == "redis":
        raise ValueError("state: open_send_log serves memory:// and sqlite:// only, not redis://")
    assert state.path is not None
    return await SqliteSendLog.open(state.path)
