"""Rate-limit header fields: reading echowin's, writing the caller's.

echowin sends ``X-RateLimit-Limit`` (per hour), ``X-RateLimit-Remaining``,
``X-RateLimit-Reset`` (Unix seconds in the public docs, ISO 8601 in newer ones) and, on
429, ``Retry-After`` (seconds, or an HTTP date). Callers get their own view in the same
``X-RateLimit-*`` fields plus the IETF draft's ``RateLimit-Policy`` and ``RateLimit``
(draft-ietf-httpapi-ratelimit-headers-08 and later). An unexpected 429's fields also say how
long the credential is frozen (:func:`freeze_until`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import NamedTuple, Protocol

# Reset values below this are read as "seconds from now" rather than a Unix time.
_DELTA_MAX = 10 * 365 * 86400


class UpstreamQuota(NamedTuple):
    """What one echowin response said about its budget. Times are Unix seconds.

    A NamedTuple (immutable, and cheaper to make than a frozen dataclass): one is made for
    every answer from echowin."""

    limit: int | None
    remaining: int | None
    reset_at: float | None
    retry_at: float | None

    def resume_at(self, now: float) -> float | None:
        """When echowin will serve again after a 429: Retry-After, else Reset, the first of
        them later than ``now`` (a ``Retry-After: 0`` or a past date says nothing about when;
        a Reset still may); None if neither is."""
        for at in (self.retry_at, self.reset_at):
            if at is not None and at > now:
                return at
        return None


# An unexpected 429 with no usable Retry-After or Reset freezes the credential this long.
DEFAULT_FREEZE_SECONDS = 60.0
# A freeze never lasts longer than this, whatever echowin's headers say.
MAX_FREEZE_SECONDS = 3600.0


def freeze_until(now: float, quota: UpstreamQuota | None) -> float:
    """When a credential frozen at ``now`` by an unexpected upstream 429 may send again
    (Unix seconds), from what that 429 said (``quota``): its Retry-After, else its
    X-RateLimit-Reset, else ``DEFAULT_FREEZE_SECONDS``; never past
    ``MAX_FREEZE_SECONDS``. The caller's own Retry-After for that 429 says the same."""
    until = quota.resume_at(now) if quota is not None else None
    if until is None:
        until = now + DEFAULT_FREEZE_SECONDS
    return min(until, now + MAX_FREEZE_SECONDS)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)  # int() ignores surrounding whitespace itself
    except ValueError:
        return None
    return number if number >= 0 else None


def parse_reset(value: str | None, now: float) -> float | None:
    """X-RateLimit-Reset as a Unix time: Unix seconds, ISO 8601, or small delta seconds."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number >= 0:
        return now + number if number < _DELTA_MAX else number
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:  # no offset: UTC, like the Unix form, never the host's zone
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After (RFC 9110 §10.2.3) as a Unix time: delay seconds or an HTTP date."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # "²".isdigit() too, and int() refuses it
        # float, not int: int() refuses more than 4300 digits. Capped: finite, far away.
        return now + min(float(text), _DELTA_MAX)
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def parse_upstream_quota(headers: Mapping[str, str], now: float) -> UpstreamQuota | None:
    """echowin's view of the budget, or None when the response carried none of it."""
    limit, remaining = parse_limit_remaining(headers)
    get = headers.get
    raw_reset = get("X-RateLimit-Reset")
    reset = None if raw_reset is None else parse_reset(raw_reset, now)
    raw_retry = get("Retry-After")
    retry = None if raw_retry is None else parse_retry_after(raw_retry, now)
    if limit is None and remaining is None and reset is None and retry is None:
        return None
    return UpstreamQuota(limit, remaining, reset, retry)


def parse_limit_remaining(headers: Mapping[str, str]) -> tuple[int | None, int | None]:
    """X-RateLimit-Limit and X-RateLimit-Remaining only (every answer carries them)."""
    get = headers.get
    return _int(get("X-RateLimit-Limit")), _int(get("X-RateLimit-Remaining"))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class WindowLimit(Protocol):
    @property
    def requests(self) -> int: ...
    @property
    def per_seconds(self) -> float: ...


class WindowState(WindowLimit, Protocol):
    @property
    def remaining(self) -> int: ...
    @property
    def reset_in(self) -> float: ...


def policy_header(windows: Sequence[tuple[str, WindowLimit]]) -> str:
    """RateLimit-Policy for ``windows`` ((owner, window) pairs): every window, named
    ``<owner>-<seconds>s``. It depends on the limits only, so callers may keep it."""
    return ", ".join(
        f'"{window_name(o, w.per_seconds)}";q={w.requests};w={_number(w.per_seconds)}'
        for o, w in windows
    )


def caller_headers(now: float, windows: Sequence[tuple[str, WindowState]]) -> dict[str, str]:
    """The caller's rate-limit fields. ``windows`` are (owner, window) pairs, owner being
    "echowin" (the shared budget) or "token" (the token's own quota).

    X-RateLimit-* and RateLimit describe the tightest window (see ``tighter``);
    RateLimit-Policy lists every window, named ``<owner>-<seconds>s``.
    """
    if not windows:
        return {}
    owner, tight = windows[0]
    for pair in windows[1:]:
        w = pair[1]
        if tighter(w.remaining, w.reset_in, tight.remaining, tight.reset_in):
            owner, tight = pair
    return tight_headers(
        now,
        window_name(owner, tight.per_seconds),
        tight.requests,
        tight.remaining,
        tight.reset_in,
        policy_header(windows),
    )


def tighter(remaining: int, reset_in: float, than_remaining: int, than_reset_in: float) -> bool:
    """Whether a window with ``remaining`` sends left that resets in ``reset_in`` seconds is
    tighter than the other: fewer remaining, then a later reset. Of equals the first stays:
    the window the caller's fields describe (CredentialBudget.tightest picks it the same
    way)."""
    return remaining < than_remaining or (remaining == than_remaining and reset_in > than_reset_in)


def window_name(owner: str, per_seconds: float) -> str:
    """A window's name in RateLimit-Policy and RateLimit: ``<owner>-<seconds>s``."""
    return f"{owner}-{_number(per_seconds)}s"


def tight_headers(
    now: float, name: str, requests: int, remaining: int, reset_in: float, policy: str
) -> dict[str, str]:
    """The caller's rate-limit fields (see ``caller_headers``) once the tightest window is
    known: its ``name``, limit, remaining and reset_in; ``policy`` lists every window."""
    reset_in = max(0.0, reset_in)
    left = str(max(0, remaining))
    return {
        "X-RateLimit-Limit": str(requests),
        "X-RateLimit-Remaining": left,
        "X-RateLimit-Reset": str(math.ceil(now + reset_in)),
        "RateLimit-Policy": policy,
        "RateLimit": f'"{name}";r={left};t={math.ceil(reset_in)}',
    }


def unchanged_for(now: float, resets: Iterable[float]) -> float:
    """Seconds, at most 1, during which the caller's fields made at ``now`` from windows
    whose ``reset_in`` are ``resets`` stay the same as long as no send is recorded or given
    back: until the first window's oldest send stops counting, a RateLimit ``t`` (whole
    seconds, rounded up) would tick down, or, for a window with nothing in it,
    X-RateLimit-Reset (``now`` rounded up) would move on."""
    until = 1.0
    for left in resets:
        if left > 0:
            until = min(until, left - math.ceil(left) + 1)
        else:
            until = min(until, math.ceil(now) - now)
    return until
