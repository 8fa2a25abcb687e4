"""What a lane does differently with classes of service: take a slot of a shared source
for a class, and predict a new request's wait in its class. Times are wall-clock seconds.
"""

from __future__ import annotations

from typing import Any

from proxy.auth.tokens import TokenRecord
from proxy.budget.class_queue import ClassQueue
from proxy.budget.classes import ClassBook
from proxy.budget.slots import Slot, SlotSource

__all__ = ["class_wait", "take_shared"]


async def take_shared(
    source: SlotSource, book: ClassBook, now: float, waiting: bool, cls: str
) -> Slot | None:
    """A slot of a shared source (Redis) for class ``cls``. The source checks the class
    rules (reserve, pace) against every replica's sends in the reservation's own step
    (reserve.lua); the book follows the shared view of every replica's sends
    (proxy/state/redis/class_view.py) and is asked first: it picks the class a free slot
    goes to and predicts waits (docs/budget.md, "Classes of service")."""
    if not book.allows(cls, now, source.budget):
        return None
    slot = await source.take(now, waiting, cls)  # Redis checks the class rules again
    if slot is not None:
        slot.cls = cls  # the book learnt it with the view (given back: the lane releases it)
    return slot


def class_wait(
    source: SlotSource,
    book: ClassBook,
    queue: ClassQueue[Any],
    now: float,
    token: TokenRecord,
    horizon: float | None,
) -> float:
    """Seconds until a new request of ``token`` would be served in its class: behind those
    of its class ahead of it, and the other classes' share too unless its unused
    reservation covers them all; never before the class rules (reserve, pace) let it."""
    cls = book.resolve(token.service_class)
    own = queue.ahead_in_class(token.id, token.weight, cls)
    if book.covers(cls, now, own + 1):  # its reservation covers it and those ahead
        ahead = own
    else:
        ahead = queue.ahead_of_new(token.id, token.weight, cls)
    budget_wait = source.predict_wait(now, ahead, horizon)
    return max(budget_wait, book.wait(cls, now, source.budget, own))
