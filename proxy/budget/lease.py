"""One lease of :class:`~proxy.budget.local_slots.LocalSlots`: the slots a single write-ahead
row reserved, handed out by this process until the lease ends. Pure data."""

from __future__ import annotations

import dataclasses

__all__ = ["Lease"]


@dataclasses.dataclass(slots=True, eq=False)
class Lease:
    """Slots reserved by one write-ahead row: ``left`` of them may still go until ``at``;
    ``size``: how many the row reserved (``left`` at first, plus the one taken with it)."""

    at: float
    left: int
    size: int = dataclasses.field(init=False)
    cls: str = ""  # the class its row records every slot of it under

    def __post_init__(self) -> None:
        self.size = self.left + 1

    @property
    def used(self) -> int:
        return self.size - self.left
