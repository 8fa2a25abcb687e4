"""The ``state`` URL, parsed and checked without opening anything (for ``check-config``).

Supported ``state`` URLs:

- ``memory://``: in-process, forgotten on restart.
- ``sqlite:///var/lib/echowin-gateway/state.db``: an absolute path (three slashes, then the
  path without its leading ``/``; four slashes such as ``sqlite:////state.db`` also work and
  are needed for a file directly under ``/``).
- ``sqlite:///state.db``, ``sqlite:///./data/state.db``, ``sqlite:///../state.db``: relative
  to the working directory. A bare file name or a path starting ``./`` or ``../`` is relative.
- ``redis://host:6379/0`` (``rediss://`` for TLS): shared by several replicas. The password
  comes from the config's ``redis.password``, never from the URL (one there is refused); an
  ACL user name may precede the host (``redis://gateway@host:6379/0``), or be set as
  ``redis.username``. Needs the ``redis`` extra; this package imports redis-py only when a
  Redis URL is used.
- ``redis-sentinel://host:26379,host:26379/MASTER_NAME[/DB]``: the master the sentinels name
  (``rediss-sentinel://`` for TLS, to the sentinels and the servers alike).
- ``redis-cluster://host:7000,host:7001``: a Redis Cluster, found from any of the nodes
  listed (``rediss-cluster://`` for TLS); it has no database number.

Missing directories of a SQLite path are created. Percent-escapes in the path are decoded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

__all__ = [
    "REDIS_SCHEMES",
    "RedisAddress",
    "RedisShape",
    "StateUrl",
    "parse_redis_url",
    "parse_state_url",
]

_SUPPORTED = (
    "use memory://, sqlite:///path/to/state.db, redis://host:6379/0,"
    " redis-sentinel://host:26379/MASTER or redis-cluster://host:7000,host:7001"
)
_MAX_DB = 2**31 - 1
_SCHEMES = ("redis", "rediss")
_MULTI = {
    "redis-sentinel": "sentinel",
    "rediss-sentinel": "sentinel",
    "redis-cluster": "cluster",
    "rediss-cluster": "cluster",
}
REDIS_SCHEMES = (*_SCHEMES, *_MULTI)
"""Every scheme of a Redis ``state`` URL (``rediss...``: TLS)."""

RedisShape = Literal["standalone", "sentinel", "cluster"]


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
    if scheme in REDIS_SCHEMES:
        _require_redis()
        parse_redis_url(url)
        return StateUrl("redis", url=url)
    raise ValueError(f"state: unsupported URL scheme {scheme[:20]!r}: {_SUPPORTED}")


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where a Redis URL points. ``tls`` is True for the ``rediss`` schemes.

    ``username`` is an ACL user name (not a secret); the password is never part of it.
    ``shape``: ``standalone`` (``host``, ``port``), ``sentinel`` (``nodes`` are the sentinels,
    ``service`` the master's name) or ``cluster`` (``nodes``: where to find it; ``host`` and
    ``port`` are the first of them, ``db`` 0).
    """

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False
    username: str | None = None
    shape: RedisShape = "standalone"
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None


def parse_redis_url(url: str) -> RedisAddress:
    """Parse ``redis[s]://[user@]host[:port][/db]`` without connecting.

    ValueError, starting ``state:``, for anything else: a password in the URL (it belongs in
    ``redis.password``), a query or fragment, a bad port or db. Messages never repeat the URL.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme in _MULTI:
        return _parse_multi(scheme, rest)
    if not sep or scheme not in _SCHEMES:
        raise ValueError(
            "state: a Redis URL starts with redis://, rediss://, redis-sentinel:// or"
            " redis-cluster://"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"state: {scheme}:// URL has a malformed host or port") from None
    if parts.password is not None:
        raise ValueError(
            f"state: a {scheme}:// URL must not carry a password;"
            " set redis.password (from env or file) instead"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"state: a {scheme}:// URL takes no query or fragment")
    if not parts.hostname:
        raise ValueError(f"state: a {scheme}:// URL needs a host")
    if port == 0:
        raise ValueError(f"state: a {scheme}:// URL needs a port in 1-65535")
    return RedisAddress(
        host=parts.hostname,
        port=6379 if port is None else port,
        db=_db_index(scheme, parts.path),
        tls=scheme == "rediss",
        username=None if parts.username is None else unquote(parts.username),
    )


def _db_index(scheme: str, path: str) -> int:
    digits = path[1:] if path.startswith("/") else path
    if not digits:
        return 0
    if not (digits.isascii() and digits.isdigit()) or int(digits) > _MAX_DB:
        raise ValueError(f"state: a {scheme}:// URL path must be a database number such as /0")
    return int(digits)


def _parse_multi(scheme: str, rest: str) -> RedisAddress:
    """``redis-sentinel://`` and ``redis-cluster://`` (``rediss-...`` for TLS): a list of
    ``[user@]host:port`` nodes, comma-separated, then for a sentinel ``/MASTER[/DB]``."""
    shape: RedisShape = "sentinel" if _MULTI[scheme] == "sentinel" else "cluster"
    if "?" in rest or "#" in rest:
        raise ValueError(f"state: a {scheme}:// URL takes no query or fragment")
    netloc, _, path = rest.partition("/")
    username = None
    if "@" in netloc:
        user, _, netloc = netloc.rpartition("@")
        if ":" in user:
            raise ValueError(
                f"state: a {scheme}:// URL must not carry a password;"
                " set redis.password (from env or file) instead"
            )
        username = unquote(user) or None
    nodes = tuple(_node(scheme, part) for part in netloc.split(","))
    service, db = None, 0
    if shape == "sentinel":
        name, _, db_text = path.partition("/")
        if not name:
            raise ValueError(f"state: a {scheme}:// URL needs the master's name: /MASTER_NAME")
        service, db = unquote(name), _db_index(scheme, db_text)
    elif path:
        raise ValueError(f"state: a {scheme}:// URL takes no path (a cluster has no database)")
    host, port = nodes[0]
    tls = scheme.startswith("rediss")
    return RedisAddress(host, port, db, tls, username, shape, nodes, service)


def _node(scheme: str, text: str) -> tuple[str, int]:
    try:
        parts = urlsplit(f"redis://{text}")
        port = parts.port
    except ValueError:
        raise ValueError(f"state: {scheme}:// URL has a malformed host or port") from None
    if not parts.hostname or port is None or port == 0 or "@" in text:
        raise ValueError(f"state: each node of a {scheme}:// URL is host:port (port 1-65535)")
    return parts.hostname, port
