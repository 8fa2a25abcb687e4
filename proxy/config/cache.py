"""The ``cache:`` section (SPEC §5 "Budget savers"): which GET answers the gateway keeps,
for how long, within what size. Absent, nothing is cached and nothing is coalesced."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

__all__ = ["CacheConfig"]


def _ttl(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of seconds")
    return float(value)


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number of seconds")
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number of seconds >= 0")
    return float(value)


def _bytes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("must be a positive integer (bytes)")
    return value


Ttl = Annotated[float, BeforeValidator(_ttl)]
Seconds = Annotated[float, BeforeValidator(_seconds)]
Bytes = Annotated[int, BeforeValidator(_bytes)]

# Which answers a cached route keeps: 200 always; 404 only on routes naming one record
# (a contact that does not exist), and only for ``not_found_seconds``.
_ONE_RECORD = "{contactId}"


class CacheConfig(BaseModel):
    """``cache:``. Sizes in bytes, times in seconds. ``routes`` maps a GET route template
    (as in the route table) to how long its answer stays fresh."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: Bytes = 64 * 1024 * 1024
    max_entry_bytes: Bytes = 1024 * 1024
    stale_seconds: Seconds = 300.0
    not_found_seconds: Seconds = 0.0
    coalesce: bool = True
    routes: dict[str, Ttl] = Field(default_factory=dict)

    @field_validator("routes")
    @classmethod
    def _templates(cls, value: dict[str, float]) -> dict[str, float]:
        for template in value:
            if not template.startswith("/api/v1/") or "?" in template:
                raise ValueError(f"{template!r}: a route template like /api/v1/tags")
        return value

    @model_validator(mode="after")
    def _entry_within_total(self) -> CacheConfig:
        if self.max_entry_bytes > self.max_bytes:
            raise ValueError(
                "max_entry_bytes must not exceed max_bytes "
                f"({self.max_entry_bytes} > {self.max_bytes})"
            )
        return self

    def ttl_of(self, template: str, status: int) -> float | None:
        """How long an answer of ``status`` on route ``template`` stays fresh; None when
        such an answer is not kept."""
        ttl = self.routes.get(template)
        if ttl is None:
            return None
        if status == 200:
            return ttl
        if status == 404 and _ONE_RECORD in template and self.not_found_seconds > 0:
            return min(ttl, self.not_found_seconds)
        return None
