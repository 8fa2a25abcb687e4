"""The fallback's arithmetic (proxy/state/redis/fallback.py): how much one replica may send
alone while Redis is away. Pure: a clock moved by hand, no Redis, no event loop."""

from __future__ import annotations

import math

from proxy.budget.windows import CredentialBudget, Limit
from proxy.state.redis.fallback import Fallback, blind_margin

T0 = 1_000.0
MINUTE = [Limit(10, 60.0)]


def view_with(sends: int, limits: list[Limit] = MINUTE, external: int = 0) -> CredentialBudget:
    view = CredentialBudget(limits, 0.0)
    for i in range(sends):
        view.record(T0 - 10 + i * 0.01)
    if external:
        view.load_external(0, [T0 - 5] * external, T0)
    return view


def test_a_young_view_bounds_the_unseen_sends_by_what_the_window_had_free() -> None:
    views = view_with(4).snapshot(T0)
    assert blind_margin(MINUTE, 0.0, views, age=1.0) == 6


def test_a_window_shorter_than_the_gap_bounds_them_by_its_limit_per_turn() -> None:
    limits = [Limit(2, 1.0), Limit(100, 3600.0)]
    views = CredentialBudget(limits, 0.0).snapshot(T0)
    # 2.5 s unseen: the one-second window turned over up to 3 times, 2 sends each.
    assert blind_margin(limits, 0.0, views, age=2.5) == 6


def test_a_view_of_unknown_age_bounds_nothing() -> None:
    views = view_with(4).snapshot(T0)
    assert blind_margin(MINUTE, 0.0, views, age=math.inf) == math.inf


def test_alone_each_own_send_weighs_the_number_of_replicas() -> None:
    fallback = Fallback(CredentialBudget(MINUTE, 0.0), replicas=2)
    taken = [fallback.take(T0 + i * 0.01) for i in range(6)]
    assert taken == [True] * 5 + [False], "10 a minute shared by 2 replicas: 5 each"
    assert fallback.retry_in(T0 + 0.06) > 59


def test_even_a_view_of_no_age_leaves_the_others_what_its_windows_had_free() -> None:
    fallback = Fallback.from_view(CredentialBudget(MINUTE, 0.0), [], age=0.0, replicas=1, now=T0)
    assert fallback.take(T0) is False, "the others may have taken all 10 free slots"


def test_the_unseen_sends_count_as_sent_now() -> None:
    view = view_with(4)  # 4 seen; up to 6 more unseen in the second since
    fallback = Fallback.from_view(view, view.sends(), age=1.0, replicas=1, now=T0)
    assert fallback.take(T0) is False, "4 seen + 6 possibly unseen fill the window"
    assert fallback.retry_in(T0) > 0


def test_an_old_view_counts_every_window_as_full() -> None:
    fallback = Fallback.from_view(view_with(0), [], age=math.inf, replicas=1, now=T0)
    assert fallback.take(T0) is False
    assert fallback.take(T0 + 60.0) is True, "once the window turned over"


def test_externals_and_the_freeze_of_the_view_carry_over() -> None:
    view = view_with(0, external=3)
    view.freeze(T0 + 5)
    fallback = Fallback.from_view(view, [], age=0.0, replicas=1, now=T0)
    assert fallback.budget.frozen_until(T0) == T0 + 5
    assert fallback.take(T0 + 1) is False, "frozen"
    # 3 external + 7 unseen (what the window had free a moment ago): full until they age.
    assert fallback.take(T0 + 6) is False
    assert fallback.take(T0 + 60.0) is True


def test_a_send_given_back_frees_its_whole_weight() -> None:
    fallback = Fallback(CredentialBudget(MINUTE, 0.0), replicas=5)
    assert fallback.take(T0) is True
    assert fallback.take(T0 + 0.01) is True
    assert fallback.take(T0 + 0.02) is False
    fallback.give_back(T0 + 0.01)
    assert fallback.take(T0 + 0.03) is True


def test_predictions_count_the_queue_at_the_replicas_weight() -> None:
    fallback = Fallback(CredentialBudget(MINUTE, 0.0), replicas=2)
    assert fallback.predict_wait(T0, 4, None) == 0.0, "5 sends of weight 2 fit 10"
    assert fallback.predict_wait(T0, 5, None) > 0


def test_new_limits_keep_the_own_sends_and_the_others_allowed_for() -> None:
    view = view_with(0, external=2)
    fallback = Fallback.from_view(view, [], age=0.0, replicas=1, now=T0)
    # 2 external + 8 unseen: the fullest window holds 10 external.
    wider = fallback.relimited([Limit(12, 60.0)], T0)
    assert [wider.take(T0 + i * 0.01) for i in range(3)] == [True, True, False]
