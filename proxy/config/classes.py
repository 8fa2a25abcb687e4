"""``classes:`` and ``default_class`` (SPEC §5 "Classes of service"): the models, and the
checks against ``upstream.limits`` that ``proxy.config.load`` makes once the whole config
is read (each error names the key).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from proxy.config.fields import Model as _Model
from proxy.config.fields import PositiveFloat as _PositiveFloat
from proxy.config.fields import PositiveInt as _PositiveInt

if TYPE_CHECKING:
    from proxy.config.schema import GatewayConfig, LimitConfig

__all__ = ["ClassConfig", "ReserveConfig", "check_classes", "check_key_classes"]

Pair = tuple[int, float]
"""A limit as (requests, per_seconds)."""


class ReserveConfig(_Model):
    """Up to ``requests`` sends in any rolling window of ``per_seconds`` held for one class
    alone; ``per_seconds`` must be the length of one of ``upstream.limits``."""

    requests: _PositiveInt
    per_seconds: _PositiveFloat


class ClassConfig(_Model):
    """One class of service. ``weight``: its share of the unreserved budget when several
    classes wait; ``reserve``: windows held for it alone; ``pace``: spread each window
    (at most N*t/W + ``burst`` in any t seconds; ``burst`` default: the shortest window's
    requests)."""

    weight: _PositiveInt = 1
    reserve: tuple[ReserveConfig, ...] = ()
    pace: bool = False
    burst: _PositiveInt | None = None


def check_classes(config: GatewayConfig) -> list[str]:
    """What ``classes`` and ``default_class`` get wrong against the rest of the config,
    one line per error naming the key: a reserve window no limit has, reservations whose
    sum exceeds a limit, an unknown default class, a burst set on an unpaced class."""
    errors: list[str] = []
    classes = config.classes
    if config.default_class is not None and config.default_class not in classes:
        known = ", ".join(classes) or "none configured"
        errors.append(f"default_class: {config.default_class!r} is not a class (known: {known})")
    if classes and config.default_class is None:
        errors.append("default_class: required when classes are configured")
    limits = config.upstream.limits
    for name, cls in classes.items():
        errors += _reserve_errors(name, cls, limits)
        if cls.burst is not None and not cls.pace:
            errors.append(f"classes.{name}.burst: only a paced class (pace: true) has a burst")
    pairs = [(limit.requests, limit.per_seconds) for limit in limits]
    errors += _sum_errors(config, pairs, "upstream.limits")
    return errors


def check_key_classes(config: GatewayConfig, where: str, limits: Sequence[Pair]) -> list[str]:
    """The classes against one key's own limits (``upstream.keys_file``'s ``limits``,
    ``where`` naming them): each reserved window must be one of them, and reservations
    may not sum past any of them, as for ``upstream.limits``."""
    errors: list[str] = []
    lengths = {per for _, per in limits}
    for name, cls in config.classes.items():
        for index, reserve in enumerate(cls.reserve):
            if reserve.per_seconds not in lengths:
                errors.append(
                    f"{where}: no window is {reserve.per_seconds:g} s long, which"
                    f" classes.{name}.reserve[{index}] reserves"
                )
    return errors + _sum_errors(config, limits, where)


def _sum_errors(config: GatewayConfig, limits: Sequence[Pair], where: str) -> list[str]:
    errors: list[str] = []
    for index, (requests, per_seconds) in enumerate(limits):
        total = sum(
            r.requests
            for cls in config.classes.values()
            for r in cls.reserve
            if r.per_seconds == per_seconds
        )
        if total > requests:
            errors.append(
                f"classes: reservations for {per_seconds:g} s windows sum to {total},"
                f" more than {where}[{index}].requests ({requests})"
            )
    return errors


def _reserve_errors(name: str, cls: ClassConfig, limits: tuple[LimitConfig, ...]) -> list[str]:
    errors: list[str] = []
    lengths = {limit.per_seconds for limit in limits}
    seen: set[float] = set()
    for index, reserve in enumerate(cls.reserve):
        key = f"classes.{name}.reserve[{index}].per_seconds"
        if reserve.per_seconds not in lengths:
            shown = ", ".join(f"{length:g}" for length in sorted(lengths))
            errors.append(
                f"{key}: no upstream.limits window is {reserve.per_seconds:g} s long"
                f" (windows: {shown})"
            )
        elif reserve.per_seconds in seen:
            errors.append(f"{key}: {reserve.per_seconds:g} s is reserved twice for this class")
        seen.add(reserve.per_seconds)
    return errors
