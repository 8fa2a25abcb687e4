"""Flights: identical callers share one trip; one that leaves does not cancel the others;
the last to leave cancels it. An event loop, no sockets, no sleeps: futures gate the trip."""

from __future__ import annotations

import asyncio

import pytest

from proxy.cache.flights import Flight, Flights
from proxy.cache.keys import CacheKey

KEY = CacheKey("default", "/api/v1/tags", "/api/v1/tags", "", "*/*", "")


async def test_callers_share_one_trip_and_one_leaving_does_not_cancel_it() -> None:
    landed: list[Flight[str]] = []
    flights: Flights[str] = Flights(landed.append)
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    trips = 0

    async def trip() -> str:
        nonlocal trips
        trips += 1
        return await gate

    flight = flights.start(KEY, trip(), shared=True)
    assert flights.get(KEY) is flight
    waiters = [asyncio.ensure_future(flights.wait(flight)) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    await asyncio.sleep(0)
    assert not flight.task.cancelled()
    gate.set_result("answer")
    assert await asyncio.gather(*waiters[1:]) == ["answer", "answer"]
    assert trips == 1
    assert landed == [flight]
    assert flights.get(KEY) is None


async def test_the_last_caller_leaving_cancels_the_trip() -> None:
    flights: Flights[str] = Flights(lambda flight: None)
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    abandoned: list[str] = []
    flight = flights.start(KEY, gate_trip(gate), shared=True)
    waiter = asyncio.ensure_future(flights.wait(flight, abandoned.append))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    with pytest.raises(asyncio.CancelledError):
        await flight.task
    await asyncio.sleep(0)  # the task's done callbacks
    assert flights.get(KEY) is None
    assert abandoned == []


async def test_a_result_that_lands_after_its_first_caller_left_is_handed_back() -> None:
    flights: Flights[str] = Flights(lambda flight: None)
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    abandoned: list[str] = []
    flight = flights.start(KEY, gate_trip(gate), shared=True)
    first = asyncio.ensure_future(flights.wait(flight, abandoned.append))
    other = asyncio.ensure_future(flights.wait(flight))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    gate.set_result("answer")
    assert await other == "answer"
    await asyncio.sleep(0)
    assert abandoned == ["answer"]


async def test_a_grounded_flight_keeps_nothing_and_is_joined_no_more() -> None:
    flights: Flights[str] = Flights(lambda flight: None)
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    flight = flights.start(KEY, gate_trip(gate), shared=True)
    assert flights.ground(lambda key: key.path.startswith("/api/v1/tags")) == 1
    assert flights.get(KEY) is None and not flight.keep
    gate.set_result("answer")
    assert await flights.wait(flight) == "answer"


async def test_an_unshared_flight_is_not_joined() -> None:
    flights: Flights[str] = Flights(lambda flight: None)
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    flight = flights.start(KEY, gate_trip(gate), shared=False)
    assert flights.get(KEY) is None
    gate.set_result("x")
    assert await flights.wait(flight) == "x"


async def gate_trip(gate: asyncio.Future[str]) -> str:
    return await gate


async def test_a_flight_is_stamped_with_the_epoch_of_its_start() -> None:
    epoch = 0
    flights: Flights[str] = Flights(lambda flight: None, lambda key: epoch)
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    flight = flights.start(KEY, gate_trip(gate), shared=False)
    epoch = 1
    assert flight.epoch == 0
    gate.set_result("x")
    assert await flights.wait(flight) == "x"


async def test_a_flight_called_off_is_joined_no_more_and_its_late_joiner_goes_alone() -> None:
    flights: Flights[str] = Flights(lambda flight: None)
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    flight = flights.start(KEY, gate_trip(gate), shared=True)
    last = asyncio.ensure_future(flights.wait(flight))
    await asyncio.sleep(0)
    last.cancel()  # the last caller leaves: the flight is called off
    with pytest.raises(asyncio.CancelledError):
        await last
    assert flights.get(KEY) is None  # not found while its task winds down
    # A caller that found it just before: not cancelled itself, it gets "nothing".
    assert await flights.wait(flight) is None
    assert flight.task.cancelled()
