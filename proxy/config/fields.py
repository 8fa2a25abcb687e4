"""The value types and the base model every config section is made of (errors worded for
people: ``must be a positive integer``), apart so that each section's module shares them."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = ["Model", "NonNegativeFloat", "PositiveFloat", "PositiveInt"]


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _number(value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError("must be a number >= 0" if allow_zero else "must be a positive number")
    return float(value)


PositiveInt = Annotated[int, BeforeValidator(_positive_int)]
PositiveFloat = Annotated[float, BeforeValidator(lambda v: _number(v, allow_zero=False))]
NonNegativeFloat = Annotated[float, BeforeValidator(lambda v: _number(v, allow_zero=True))]


class Model(BaseModel):
    """Every config section: unknown keys refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
