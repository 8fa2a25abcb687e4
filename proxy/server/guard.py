"""What every listener does about slow and abusive callers (docs/security.md: "Slow and
abusive connections"), apart from aiohttp: the connection bounds, the timeouts a listener
applies, and the rate-limited log of malformed requests.

proxy/server/connections.py and proxy/server/lobby.py apply them to the connections:

- ``ConnectionBounds``: open connections per listener, in total and per client address;
  past either a new connection gets ``refusal(reason)`` (503 JSON, ``Connection: close``)
  written at once and is closed without a byte of it read.
- ``Guard.head_timeout``: seconds a request head may take, from the connection's start (its
  first request) or from the first byte of a later request on a kept-alive connection;
  ``Guard.keepalive_timeout``: seconds a kept-alive connection may sit idle between an answer
  and the next request's first byte.
- ``MalformedLog``: a request aiohttp cannot parse is one ``info`` line, at most
  ``MALFORMED_LINES`` of them per ``MALFORMED_INTERVAL_SECONDS``, then one summary line per
  interval ("N malformed requests suppressed"); never the caller's address, never the
  exception's text (it may quote the caller's bytes), only its class name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, cast

from proxy.errors import REFUSAL_REASONS, TOO_MANY, TOO_MANY_FROM_CLIENT, json_body

log = logging.getLogger("echowin_gateway.guard")


MALFORMED_LINES = 5
"""Malformed requests told one by one per interval; the rest are counted."""
MALFORMED_INTERVAL_SECONDS = 60.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _refusal(reason: str) -> bytes:
    body = json_body("Too many connections", reason)
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


# Written whole on connection_made: a fixed answer, so a refused connection costs no parser,
# no handler and no read. Immutable bytes, built once.
_REFUSALS = {reason: _refusal(reason) for reason in REFUSAL_REASONS}


def refusal(reason: str) -> bytes:
    """The whole HTTP answer a refused connection gets (one of ``REFUSAL_REASONS``)."""
    return _REFUSALS[reason]


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """``server.trusted_proxies`` (validated by proxy/config/) as networks."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def client_address(peername: object, trusted: tuple[Network, ...]) -> str | None:
    """The address a connection counts against (``transport.get_extra_info("peername")``):
    None for a peer that is exempt from the per-client bound: a trusted proxy (it carries
    many clients) or no IP peer at all (a unix socket). An IPv4 peer on a dual-stack
    listener (``::ffff:10.0.0.1``) counts as its IPv4 address."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return None
    host: str = peername[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    if trusted:
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return host
        if any(address in net for net in trusted):
            return None
    return host


class Slot:
    """One open connection's place in its listener's count; ``release`` gives it back
    (once: later calls do nothing). It passes with the connection from protocol to protocol
    (a lobby, aiohttp's handler, a lobby again while parked)."""

    __slots__ = ("_bounds", "_client")

    def __init__(self, bounds: ConnectionBounds, client: str | None) -> None:
        self._bounds: ConnectionBounds | None = bounds
        self._client = client

    def release(self) -> None:
        bounds, self._bounds = self._bounds, None
        if bounds is not None:
            bounds.give_back(self._client)


class ConnectionBounds:
    """Open connections on one listener of one process, in total and per client address.
    The one owner of the counts: held by the listener's runner (proxy/server/listeners.py)."""

    __slots__ = ("_by_client", "max_per_client", "max_total", "open", "trusted")

    def __init__(self, max_total: int, max_per_client: int, trusted: tuple[Network, ...] = ()):
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.trusted = trusted
        self.open = 0
        self._by_client: dict[str, int] = {}  # only clients with a connection open

    def take(self, peername: object) -> Slot | str:
        """A place for a new connection from ``peername``, or the refusal's reason."""
        if self.open >= self.max_total:
            return TOO_MANY
        client = client_address(peername, self.trusted)
        if client is not None:
            held = self._by_client.get(client, 0)
            if held >= self.max_per_client:
                return TOO_MANY_FROM_CLIENT
            self._by_client[client] = held + 1
        self.open += 1
        return Slot(self, client)

    def give_back(self, client: str | None) -> None:
        self.open -= 1
        if client is not None:
            held = self._by_client[client] - 1
            if held:
                self._by_client[client] = held
            else:
                del self._by_client[client]

    def from_client(self, client: str) -> int:
        """Connections open from ``client`` now."""
        return self._by_client.get(client, 0)


class LogBudget:
    """At most ``lines`` lines per interval of ``interval`` seconds; the rest are counted and
    reported once the interval is over. Pure: the clock (seconds, monotonic) is passed in.

    An interval starts with the first line after the previous one ended (so a quiet log
    writes the first line of an attack at once)."""

    __slots__ = ("_ends", "_written", "interval", "lines", "suppressed")

    def __init__(self, lines: int, interval: float) -> None:
        self.lines = lines
        self.interval = interval
        self._ends: float | None = None  # None between intervals
        self._written = 0
        self.suppressed = 0

    @property
    def ends(self) -> float | None:
        """When the current interval ends; None when none runs."""
        return self._ends

    def take(self, now: float) -> tuple[bool, int]:
        """One more line at ``now``: (write it?, lines suppressed in an interval that ended
        before ``now``, to be reported first; 0 for none)."""
        report = self.due(now)
        if self._ends is None:
            self._ends = now + self.interval
            self._written = 0
        if self._written < self.lines:
            self._written += 1
            return True, report
        self.suppressed += 1
        return False, report

    def due(self, now: float) -> int:
        """Lines suppressed in the interval, if it ended by ``now`` (which closes it); else 0."""
        if self._ends is None or now < self._ends:
            return 0
        report, self.suppressed, self._ends = self.suppressed, 0, None
        return report


class MalformedLog:
    """Tells of requests aiohttp could not parse, within a ``LogBudget``. One per process,
    shared by its listeners. A summary is written when the next malformed request comes
    after its interval, or by a timer at the interval's end, whichever is first."""

    def __init__(
        self,
        lines: int = MALFORMED_LINES,
        interval: float = MALFORMED_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = LogBudget(lines, interval)
        self._clock = clock
        self._timer: asyncio.TimerHandle | None = None

    def note(self, status: int, exc: BaseException | None) -> None:
        """One malformed request, answered with ``status``; ``exc``: what aiohttp raised
        (only its class name is written)."""
        now = self._clock()
        write, report = self.budget.take(now)
        self._summarise(report)
        if write:
            error = type(exc).__name__ if exc is not None else None
            log.info("malformed request", extra={"fields": {"status": status, "error": error}})
        elif self._timer is None:
            ends = self.budget.ends
            assert ends is not None  # take() opened the interval
            self._timer = asyncio.get_running_loop().call_later(max(0.0, ends - now), self.flush)

    def flush(self) -> None:
        """Write the summary of an interval that is over (the timer's call)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._summarise(self.budget.due(self._clock()))

    def close(self) -> None:
        """Write what is suppressed so far, and stop the timer (the listeners are closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        budget = self.budget
        suppressed, budget.suppressed = budget.suppressed, 0
        self._summarise(suppressed)

    def _summarise(self, suppressed: int) -> None:
        if suppressed:
            log.info(
                f"{suppressed} malformed requests suppressed",
                extra={"fields": {"suppressed": suppressed, "seconds": self.budget.interval}},
            )


class Refused(Protocol):
    def __call__(self, reason: str) -> None:
        """A connection was refused for ``reason`` (one of ``REFUSAL_REASONS``)."""


def _not_counted(reason: str) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Guard:
    """One listener's defences. ``bounds`` counts its connections (mutable, one owner: the
    listener); ``malformed`` is shared by a process's listeners; ``refused`` is told of each
    refused connection (a metric)."""

    head_timeout: float
    keepalive_timeout: float
    bounds: ConnectionBounds
    malformed: MalformedLog
    refused: Refused = _not_counted

    @classmethod
    def of(
        cls,
        server: ServerSettings,
        malformed: MalformedLog,
        refused: Refused = _not_counted,
    ) -> Guard:
        """A listener's guard from the ``server:`` config section."""
        bounds = ConnectionBounds(
            server.max_connections,
            server.max_connections_per_client,
            networks(server.trusted_proxies),
        )
        return cls(
            server.request_head_timeout_seconds,
            server.keepalive_timeout_seconds,
            bounds,
            malformed,
            refused,
        )

    def admit(self, transport: asyncio.BaseTransport) -> Slot | None:
        """A place for a new connection; None if refused, in which case the refusal is
        written and the transport closed (connection_lost follows)."""
        taken = self.bounds.take(transport.get_extra_info("peername"))
        if isinstance(taken, Slot):
            return taken
        self.refused(taken)
        cast(asyncio.Transport, transport).write(_REFUSALS[taken])  # uvloop's: no subclass
        transport.close()
        return None


class ServerSettings(Protocol):
    """The ``server:`` config section's keys a guard reads (proxy.config.ServerConfig)."""

    @property
    def request_head_timeout_seconds(self) -> float: ...
    @property
    def keepalive_timeout_seconds(self) -> float: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def max_connections_per_client(self) -> int: ...
    @property
    def trusted_proxies(self) -> tuple[str, ...]: ...


__all__ = [
    "REFUSAL_REASONS",
    "ConnectionBounds",
    "Guard",
    "LogBudget",
    "MalformedLog",
    "Slot",
    "client_address",
    "refusal",
]
