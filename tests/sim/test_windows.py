"""The simulator's rolling windows and limits, on a clock moved by hand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sim import (
    SimLimit,
    parse_limit,
)
from proxy.sim.windows import KeyBudget


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000/3600", SimLimit(1000, 3600.0)),
        (" 100/60 ", SimLimit(100, 60.0)),
        ("5/0.5", SimLimit(5, 0.5)),
    ],
)
def test_parse_limit_reads_requests_per_seconds(text: str, expected: SimLimit) -> None:
    assert parse_limit(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1000",
        "1000/",
        "/60",
        "x/60",
        "10/y",
        "0/60",
        "10/0",
        "10/-5",
        "10/inf",
        "1.5/60",
        "1/2/3",
    ],
)
def test_parse_limit_rejects_malformed_text_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid limit .*REQUESTS/SECONDS"):
        parse_limit(text)


@settings(max_examples=200, deadline=None)
@given(
    limits=st.lists(
        st.builds(SimLimit, st.integers(1, 5), st.integers(1, 20).map(float)),
        min_size=1,
        max_size=3,
    ),
    gaps=st.lists(st.integers(0, 8).map(lambda half_seconds: half_seconds / 2), max_size=60),
)
def test_window_admits_exactly_what_every_rolling_window_allows(
    limits: list[SimLimit], gaps: list[float]
) -> None:
    budget = KeyBudget(tuple(limits))
    admitted: list[float] = []

    def fits(at: float) -> bool:
        """The model: a send at t counts for arrivals in [t, t + per)."""
        counts = ((sum(t <= at < t + lim.per_seconds for t in admitted), lim) for lim in limits)
        return all(count < lim.requests for count, lim in counts)

    now = 0.0
    for gap in gaps:
        now += gap
        allowed = fits(now)
        wait = budget.admit(now)
        assert (wait is None) == allowed
        if wait is None:
            admitted.append(now)
        else:  # with nothing else admitted, every window has room at now + wait, not before
            assert fits(now + wait)
            assert not fits(now + wait - 0.25)
