"""The simulator's test fixtures: a real simulator on loopback, on a fake clock.

Window math runs on a fake clock that tests move by hand; nothing sleeps except the one
latency test, which needs real time to pass.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy.sim import (
    SimConfig,
    Simulator,
)

TEAM = "team-key-A"
TEAM_B = "team-key-B"
AGENCY = "agency-key-1"
TEAM_H = {"X-API-Key": TEAM}
AGENCY_H = {"X-AGENCY-KEY": AGENCY}
START = 1000.0
WALL_AT_START = 1_795_708_800  # 2026-11-26T16:00:00Z
RATE_LIMITED = {"error": "Rate limit exceeded. Please try again later."}

Client = TestClient[web.Request, web.Application]
StartSim = Callable[..., Awaitable[tuple[Simulator, Client]]]


class FakeClock:
    """Monotonic seconds when called; ``wall()`` is the matching Unix time."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL_AT_START + (self.now - START)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def start_sim(aiohttp_client: AiohttpClient, clock: FakeClock) -> StartSim:
    """Start a simulator (keys TEAM, TEAM_B, AGENCY; SimConfig overrides as keywords)."""

    async def start(client_kwargs: dict[str, Any] | None = None, **overrides: Any) -> Any:
        settings_: dict[str, Any] = {
            "team_keys": frozenset({TEAM, TEAM_B}),
            "agency_keys": frozenset({AGENCY}),
            "remaining_window": "tightest",
        }
        sim = Simulator(SimConfig(**(settings_ | overrides)), clock=clock, wall=clock.wall)
        return sim, await aiohttp_client(sim.app(), **(client_kwargs or {}))

    return start


@pytest.fixture
async def sim_client(start_sim: StartSim) -> tuple[Simulator, Client]:
    return await start_sim()


@pytest.fixture
def sim(sim_client: tuple[Simulator, Client]) -> Simulator:
    return sim_client[0]


@pytest.fixture
def client(sim_client: tuple[Simulator, Client]) -> Client:
    return sim_client[1]


async def call(
    client: Client,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    response = await client.request(method, path, json=body, headers=TEAM_H | (headers or {}))
    return response.status, await response.json()


async def create_contact(client: Client, **fields: Any) -> dict[str, Any]:
    status, body = await call(
        client, "POST", "/api/v1/contacts", {"number": "+15550000000"} | fields
    )
    assert status == 201, body
    return dict(body["data"])


async def get_tags(client: Client) -> aiohttp.ClientResponse:
    response = await client.get("/api/v1/tags", headers=TEAM_H)
    await response.read()
    return response
