"""Classes of service on a replica: its :class:`~proxy.budget.classes.ClassBook` follows every
replica's sends through the mirrored view (each send's member names its class, see
``proxy/state/lua/classes.lua``), so that the classes a freed slot may go to, the predicted
waits, a class's pace and what /admin/budget shows count the other replicas' sends too.
Redis' own check (reserve.lua) stays the one that decides a reservation.
"""

from __future__ import annotations

from proxy.budget.classes import ClassBook
from proxy.state.redis.slots import RedisSlots

__all__ = ["class_of_member", "follow_classes"]


def class_of_member(member: bytes) -> str | None:
    """The class a send's member names (``replica:seq|class``); None: none (the default)."""
    _, bar, name = member.rpartition(b"|")
    return name.decode() if bar else None


def follow_classes(slots: RedisSlots, book: ClassBook) -> None:
    """Keep ``book`` in step with ``slots``' view of the shared sends: each send it learns,
    and the whole of them at each rebuild from a snapshot (what other replicas gave back
    leaves the book then too)."""
    slots.class_table = book.table()
    view = slots._view  # the slots' own view: this wires its hooks

    def learn(member: bytes, at: float) -> None:
        book.record(class_of_member(member), at)

    def rebuild(known: dict[bytes, float], now: float) -> None:
        book.reset()
        book.load(((at, class_of_member(m)) for m, at in known.items()), now)

    def move(member: bytes, at: float, to: float) -> None:
        cls = class_of_member(member)
        book.release(cls, at)
        book.record(cls, to)

    view.on_learn = learn
    view.on_move = move
    view.on_rebuild = rebuild
