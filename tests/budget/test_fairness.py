"""Unit tests for proxy.budget.fairness: the pure round-robin. No event loop, no clock."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.budget.fairness import FairQueue


@dataclass
class Tally:
    waiting: int = 0


def test_weights_share_the_turns_and_one_owner_keeps_the_counts() -> None:
    tally = Tally()
    queue: FairQueue[str] = FairQueue(tally)
    for i in range(6):
        queue.push("heavy", 2, f"h{i}")
    for i in range(3):
        queue.push("light", 1, f"l{i}")
    assert (queue.depth, tally.waiting, queue.waiting_tokens()) == (9, 9, 2)
    served = [queue.pop() for _ in range(6)]
    assert served == ["h0", "l0", "h1", "h2", "l1", "h3"]  # 2 : 1, spread through the round
    assert queue.remove("light", "l2") and not queue.remove("light", "l2")
    assert (queue.depth, tally.waiting) == (2, 2)
    assert queue.queued() == ["h4", "h5"]
    assert [queue.pop(), queue.pop()] == ["h4", "h5"]
    assert (queue.depth, tally.waiting, queue.tokens) == (0, 0, {})  # every debt forgotten


@settings(max_examples=200, deadline=None)
@given(
    pushes=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), max_size=40),
    pops=st.integers(0, 40),
    who=st.integers(0, 4),
    weight=st.integers(1, 4),
)
def test_the_play_ahead_is_the_round_robin_played_for_real(
    pushes: list[tuple[int, int]], pops: int, who: int, weight: int
) -> None:
    # With nobody else arriving, a new item is served after exactly as many as predicted:
    # the prediction plays the same round-robin step (take_turn) on copies of the credits.
    queue: FairQueue[str] = FairQueue(Tally())
    for n, (key, w) in enumerate(pushes):
        queue.push(f"t{key}", w, f"t{key}.{n}")
    for _ in range(min(pops, queue.depth)):
        queue.pop()
    credits = {k: q.current for k, q in queue.tokens.items()}
    ahead = queue.ahead_of_new(f"t{who}", weight)
    assert {k: q.current for k, q in queue.tokens.items()} == credits  # played on copies
    queue.push(f"t{who}", weight, "new")
    served = 0
    while queue.pop() != "new":
        served += 1
    assert served == ahead
