"""Durable state behind Protocols, and the one place that picks a backend from the state URL.

Supported ``state`` URLs:

- ``memory://``: in-process, forgotten on restart.
- ``sqlite:///var/lib/echowin-gateway/state.db``: an absolute path (three slashes, then the
  path without its leading ``/``; four slashes such as ``sqlite:////state.db`` also work and
  are needed for a file directly under ``/``).
- ``sqlite:///state.db``, ``sqlite:///./data/state.db``, ``sqlite:///../state.db``: relative
  to the working directory. A bare file name or a path starting ``./`` or ``../`` is relative.

Missing directories of a SQLite path are created. Percent-escapes in the path are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from proxy.state.memory import MemorySendLog, MemoryTokenStore
from proxy.state.sqlite import SqliteSendLog, SqliteTokenStore
from proxy.tokens import TokenStore

__all__ = [
    "MemorySendLog",
    "MemoryTokenStore",
    "SqliteSendLog",
    "SqliteTokenStore",
    "StateUrl",
    "open_send_log",
    "open_token_store",
    "parse_state_url",
]

_SUPPORTED = "use memory:// or sqlite:///path/to/state.db"


@dataclass(frozen=True, slots=True)
class StateUrl:
    """A parsed ``state`` URL: the backend, and for sqlite the file path (maybe relative)."""

    backend: Literal["memory", "sqlite"]
    path: str | None = None


def _sqlite_path(rest: str) -> str:
    """The file path in ``sqlite://<rest>``; see the module docstring for the rules."""
    if not rest.startswith("/") or rest == "/":
        raise ValueError(f"state: a sqlite URL needs a file path: {_SUPPORTED}")
    if "?" in rest or "#" in rest:
        raise ValueError("state: a sqlite URL takes no query or fragment")
    path = unquote(rest[1:])
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
        raise ValueError(f"state: {scheme}:// is not yet supported by this version: {_SUPPORTED}")
    raise ValueError(f"state: unsupported URL scheme {scheme[:20]!r}: {_SUPPORTED}")


async def open_token_store(url: str) -> TokenStore:
    """Open the token store named by a ``state`` URL (async: opening may touch disk or network).

    The caller owns the store and must ``await store.close()``. ValueError for a bad URL (see
    ``parse_state_url``); OSError or ``sqlite3.Error`` if the file cannot be opened.
    """
    state = parse_state_url(url)
    if state.backend == "memory":
        return MemoryTokenStore()
    assert state.path is not None
    return await SqliteTokenStore.open(state.path)


async def open_send_log(url: str) -> MemorySendLog | SqliteSendLog:
    """Open the budget's write-ahead send log named by a ``state`` URL (see above)."""
    state = parse_state_url(url)
    if state.backend == "memory":
        return MemorySendLog()
    assert state.path is not None
    return await SqliteSendLog.open(state.path)
