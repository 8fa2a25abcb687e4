"""What the simulator accepts: its keys, its limits and its rate-limit header style."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from proxy.sim.windows import SimLimit

__all__ = ["SimConfig"]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """What the simulator accepts: its keys, its limits (all hold per key) and header style."""

    team_keys: frozenset[str]
    agency_keys: frozenset[str] = frozenset()
    limits: tuple[SimLimit, ...] = (SimLimit(1000, 3600.0), SimLimit(100, 60.0))
    reset_format: Literal["unix", "iso"] = "unix"
    log_size: int = 100_000
    # Which window X-RateLimit-Remaining/Reset describe. echowin documents Limit as the
    # hourly limit, so "longest" is the default; "tightest" (the window with the fewest
    # left) lets tests check that the gateway stays safe if echowin reports that instead.
    remaining_window: Literal["longest", "tightest"] = "longest"

    def __post_init__(self) -> None:
        for name in ("team_keys", "agency_keys"):
            keys = getattr(self, name)
            if isinstance(keys, str):  # frozenset("abc") would silently accept "a", "b", "c"
                raise TypeError(f"{name} must be a collection of keys, not a string")
            object.__setattr__(self, name, frozenset(keys))
            if not all(isinstance(key, str) and key for key in getattr(self, name)):
                raise ValueError(f"{name} must hold non-empty strings")
        object.__setattr__(self, "limits", tuple(self.limits))
        if not self.limits:
            raise ValueError("limits must hold at least one SimLimit")
        if self.reset_format not in ("unix", "iso"):
            raise ValueError(f"reset_format must be 'unix' or 'iso', got {self.reset_format!r}")
        if self.remaining_window not in ("longest", "tightest"):
            raise ValueError(
                f"remaining_window must be 'longest' or 'tightest', got {self.remaining_window!r}"
            )
        if self.log_size < 1:
            raise ValueError(f"log_size must be >= 1, got {self.log_size}")
