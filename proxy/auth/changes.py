"""Token changes read from the store's own log, so a cached token is read again only when it
changed, not every ``tokens.cache_ttl_seconds``.

Without a change log, each token in use is read from the store every ``cache_ttl`` (so a
revocation made by another process shows within that bound): with thousands of tokens in
use, hundreds of reads a second whatever changed. A store with a change log (``TokenChangeLog``:
the SQLite state file keeps one, written by triggers on its ``tokens`` table, so every
writer's changes are in it) answers instead, in one read, which tokens changed since a
cursor. ``ChangePoller`` asks every ``cache_ttl / 2``: it drops each token named from the
authenticator's cache, then ``confirm``s every other cached record as of when the poll
started. A change made anywhere then shows within ``cache_ttl / 2``; when polls fail, the
records age out at ``cache_ttl`` as they do without a log, and the poller asks again after
1 s, the pause doubling to 30 s while it keeps failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from proxy.auth.authenticator import TokenAuthenticator

__all__ = ["MIN_POLL_SECONDS", "ChangePoller", "TokenChangeLog", "changes_after"]

MIN_POLL_SECONDS = 0.05
MAX_PAUSE_SECONDS = 30.0  # between polls while the log cannot be read
ALL_TOKENS = "*"  # a change log row for every token (no token id has a ``*``)

log = logging.getLogger("echowin_gateway.auth")


@runtime_checkable
class TokenChangeLog(Protocol):
    """A token store that numbers its changes."""

    async def changes_since(self, cursor: int | None) -> tuple[int, list[str] | None]:
        """The number of the newest change, and the ids of the tokens created, changed or
        deleted after change ``cursor``: None for that list when ``cursor`` is None or
        older than the log keeps (any token may have changed)."""


def changes_after(
    cursor: int | None, rows: Sequence[tuple[int, str]], newest: int
) -> tuple[int, list[str] | None]:
    """``changes_since``'s answer from a log whose changes are numbered 1, 2, 3... with no
    gap (a store keeps them so): ``rows``, the (number, token id) after ``cursor`` in
    order, ``newest`` the newest number. The row after ``cursor`` missing means the log
    dropped it; a ``cursor`` the log is behind means another log (a new file, a restored
    database); a row naming ``*`` is a change to every token (a TRUNCATE): each way None,
    any token may have changed."""
    if cursor is None:
        return newest, None
    if not rows:
        return newest, [] if newest == cursor else None
    changed = [token_id for _, token_id in rows]
    if rows[0][0] != cursor + 1 or ALL_TOKENS in changed:
        return newest, None
    return newest, changed


class ChangePoller:
    """Polls ``changes`` every ``interval`` seconds for ``auth``, until ``stop``."""

    def __init__(
        self,
        changes: TokenChangeLog,
        auth: TokenAuthenticator,
        interval: float,
        *,
        timer: Callable[[], float] = time.monotonic,
        on_health: Callable[[bool], None] | None = None,
    ) -> None:
        self._changes = changes
        self._auth = auth
        self.interval = max(MIN_POLL_SECONDS, interval)
        self._timer = timer
        self._on_health = on_health
        self._cursor: int | None = None
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._reading = False  # a poll is under way: left to finish, never cancelled
        self._pause = self.interval  # until the next poll
        self._stopping = False

    async def poll(self) -> None:
        """One poll: the tokens changed since the last one dropped, the rest confirmed. The
        first poll finds where the log stands and drops whatever was cached before it (and
        what is being looked up): a change made before it is behind its cursor, so no
        later poll could name it. Raises what the store raises."""
        started = self._timer()
        newest, changed = await self._changes.changes_since(self._cursor)
        if self._cursor is None or changed is None:
            self._auth.invalidate_all()
        else:
            for token_id in changed:
                self._auth.invalidate(token_id)
            self._auth.confirm(started)
        self._cursor = newest

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._forever())

    async def _forever(self) -> None:
        while not self._stopping:
            self._reading = True
            try:
                await self.poll()
            except Exception as exc:  # any: a poller that ended would leave the TTL alone
                self._health(False, exc)
            else:
                self._health(True, None)
            finally:
                self._reading = False
            if not self._stopping:  # while failing: a longer pause each time, to 30 s
                await asyncio.sleep(self._pause)

    def _health(self, up: bool, exc: Exception | None) -> None:
        if up:
            self._pause = self.interval
        else:  # 1 s after the first failure, twice as long after each next one
            self._pause = min(self._pause * 2, MAX_PAUSE_SECONDS) if self._failing else 1.0
        if up == (not self._failing):
            return
        self._failing = not up
        if exc is not None:
            log.warning(
                "token change log unreadable; cached tokens are read again every cache_ttl",
                extra={"fields": {"error": type(exc).__name__}},
            )
        else:
            log.info("token change log readable again")
        if self._on_health is not None:
            self._on_health(up)

    async def stop(self) -> None:
        """Stop polling: at once between polls; a poll under way is waited for (bounded by
        the store's own timeouts), since a store call cancelled midway may leave its
        connection taken (asyncpg's pool then waits for it at close)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        if not self._reading:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
