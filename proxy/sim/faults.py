"""The faults a test switches on: latency, errors, dropped connections, forced 429s, gzip,
and the key echo (``proxy.sim.echo``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Final

from proxy.sim import echo as sim_echo
from proxy.sim.store import JSONObject

__all__ = ["NO_FAULTS", "Faults"]

_MAX_LATENCY_SECONDS: Final = 600.0


@dataclass(frozen=True, slots=True)
class Faults:
    """Misbehaviour applied to API requests (never to ``/_sim/`` control requests).

    ``arrival_delay_seconds`` holds the request that long before it arrives (its time on
    the way in: the network, echowin's load balancer): it is counted, and its windows
    measured, from then. ``latency_seconds`` delays whatever answer follows. The answer
    itself, by precedence: ``reset`` (drop the connection unanswered) > ``status`` (a JSON
    error with that status) > ``force_429`` (echowin's 429 with ``Retry-After:
    retry_after`` seconds) > the normal answer. ``gzip`` sends the answer's body
    gzip-encoded. ``count`` limits the faults to the next ``count`` API requests (counted
    at arrival); None keeps them until cleared.

    ``echo_key`` (a form of ``sim_echo.FORMS``) puts the key the request carried (its
    X-API-Key, or X-AGENCY-KEY under /api/v1/agency/), encoded in that form, into the answer
    at ``echo_in`` (one of ``sim_echo.PLACES``), whatever the answer; a request without a key
    gets no echo. ``echo_percent`` and ``echo_swapcase`` are the character positions the
    ``percent_some`` and ``mixed_case`` forms encode or case-swap (``sim_echo.encode``).
    ``gzip`` leaves an echoed answer that has its own coding, or is streamed, as it is.
    """

    latency_seconds: float = 0.0
    arrival_delay_seconds: float = 0.0
    status: int | None = None
    reset: bool = False
    force_429: bool = False
    retry_after: int = 1
    count: int | None = None
    gzip: bool = False
    echo_key: str | None = None
    echo_in: str = "body"
    echo_percent: tuple[int, ...] | None = None
    echo_swapcase: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.latency_seconds <= _MAX_LATENCY_SECONDS:
            raise ValueError(f"latency_seconds must be within 0..{_MAX_LATENCY_SECONDS:g}")
        if not 0 <= self.arrival_delay_seconds <= _MAX_LATENCY_SECONDS:
            raise ValueError(f"arrival_delay_seconds must be within 0..{_MAX_LATENCY_SECONDS:g}")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP error status (400..599), got {self.status}")
        if self.retry_after < 1:
            raise ValueError(f"retry_after must be >= 1 second, got {self.retry_after}")
        if self.count is not None and self.count < 1:
            raise ValueError(
                f"count must be >= 1 (or absent for 'until cleared'), got {self.count}"
            )
        for name in ("echo_percent", "echo_swapcase"):
            if isinstance(getattr(self, name), list):  # kept as a tuple: the faults are frozen
                object.__setattr__(self, name, tuple(getattr(self, name)))
        sim_echo.check(self.echo_key, self.echo_in, self.echo_percent, self.echo_swapcase)

    @classmethod
    def from_json(cls, data: object) -> Faults:
        """Build from a decoded JSON object; ValueError names the offending field."""
        if not isinstance(data, dict):
            raise ValueError("faults must be a JSON object")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(map(str, unknown))}")
        retry_after = _json_int(data, "retry_after")
        echo_in = _json_str(data, "echo_in")
        return cls(
            latency_seconds=_json_number(data, "latency_seconds"),
            arrival_delay_seconds=_json_number(data, "arrival_delay_seconds"),
            status=_json_int(data, "status"),
            reset=_json_bool(data, "reset"),
            force_429=_json_bool(data, "force_429"),
            retry_after=1 if retry_after is None else retry_after,
            count=_json_int(data, "count"),
            gzip=_json_bool(data, "gzip"),
            echo_key=_json_str(data, "echo_key"),
            echo_in="body" if echo_in is None else echo_in,
            echo_percent=_json_ints(data, "echo_percent"),
            echo_swapcase=_json_ints(data, "echo_swapcase"),
        )

    def to_json(self) -> JSONObject:
        return asdict(self)


def _json_bool(data: Mapping[str, object], name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")
    return value


def _json_int(data: Mapping[str, object], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def _json_str(data: Mapping[str, object], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _json_ints(data: Mapping[str, object], name: str) -> tuple[int, ...] | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{name} must be an array of integers")
    return tuple(value)


def _json_number(data: Mapping[str, object], name: str) -> float:
    value = data.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    return float(value)


NO_FAULTS: Final = Faults()
