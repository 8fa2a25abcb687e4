"""The echowin simulator: a local stand-in for https://echo.win/api/v1 (SPEC §2).

It serves echowin's routes with echowin's auth, JSON error bodies and rolling-window rate
limits, keeps an in-memory store per key so writes round-trip, records every request it
receives, and lets tests switch faults on and off while it runs. Developers build against
it without spending quota; the gateway's tests use it as the upstream whose arrival clock
judges "no 429" (SPEC §3.1).

Time: window math reads ``clock`` (seconds, monotonic by default); only the
``X-RateLimit-Reset`` header and ``createdAt`` fields read ``wall`` (Unix seconds).

Every path outside ``/_sim/`` is an API path: authenticated, counted and recorded before
routing, so an unknown route costs budget like any other request and answers JSON 404.
Control endpoints need no key, are never rate limited, never faulted and never recorded:
``GET|DELETE /_sim/requests``, ``GET|POST|DELETE /_sim/faults``, ``POST /_sim/spend``,
``GET /_sim/healthz``.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.sim import echo as sim_echo
from proxy.sim.config import SimConfig
from proxy.sim.faults import NO_FAULTS, Faults
from proxy.sim.handlers import (
    API_ROUTES,
    STORE,
    ApiHandler,
    error,
    read_body,
    route,
    status_phrase,
    too_many,
)
from proxy.sim.records import NO_RESPONSE, RecordedRequest
from proxy.sim.store import ApiError, Store
from proxy.sim.windows import KeyBudget, Quota

__all__ = ["SIMULATOR", "Simulator", "run_simulator"]

_TEAM_HEADER: Final = "X-API-Key"
_AGENCY_HEADER: Final = "X-AGENCY-KEY"
_CONTROL_PREFIX: Final = "/_sim/"


@dataclass(frozen=True, slots=True)
class _Arrival:
    """What the simulator decided when an API request arrived (``at`` on its clock,
    ``wall`` in Unix seconds); ``key`` is as presented, ``valid_key`` set if accepted."""

    at: float
    wall: float
    header: str
    key: str | None
    valid_key: str | None
    fault: Faults
    quota: Quota | None
    retry_in: float | None


class Simulator:
    """An echowin stand-in: auth, rolling-window limits, per-key store, request log, faults.

    Counting: a request counts against its key's windows when the key is valid for the route,
    every window has room at arrival, and ``force_429`` is off, whatever is answered after
    (a ``status`` or ``reset`` fault may hit a request echowin had already counted). 401s
    and 429s are not counted. ``X-RateLimit-*`` headers go on every answer to a valid key,
    computed at arrival.
    """

    def __init__(
        self,
        config: SimConfig,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.log: deque[RecordedRequest] = deque(maxlen=config.log_size)
        self._clock = clock
        self._wall = wall
        self._statuses: collections.Counter[int] = collections.Counter()
        self._budgets: dict[str, KeyBudget] = {}
        self._stores: dict[str, Store] = {}
        self._faults: Faults | None = None
        self._fault_uses: int | None = None
        self._limit_header = max(config.limits, key=lambda limit: limit.per_seconds).requests
        self._built = False

    @property
    def faults(self) -> Faults | None:
        """The faults in force, or None."""
        return self._faults

    @property
    def faults_left(self) -> int | None:
        """How many more API requests the counted faults apply to; None if not counted."""
        return self._fault_uses

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults in force; ``faults.count`` uses start from now."""
        self._faults, self._fault_uses = faults, faults.count

    def clear_faults(self) -> None:
        self._faults, self._fault_uses = None, None

    def spend(self, key: str, n: int) -> None:
        """Record ``n`` sends for ``key`` at the current clock, as if another client of the
        same key had been served them; they count even beyond the limits."""
        if key not in self.config.team_keys | self.config.agency_keys:
            raise ValueError("spend: key is not one of the simulator's team or agency keys")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"spend: n must be an integer >= 0, got {n!r}")
        self._budget(key).spend(self._clock(), n)

    def statuses(self) -> collections.Counter[int]:
        """A copy of the count of answered statuses since start (or the last clear_log)."""
        return collections.Counter(self._statuses)

    def clear_log(self) -> None:
        """Forget recorded requests and status counts (not budgets, data or faults)."""
        self.log.clear()
        self._statuses.clear()

    def app(self) -> web.Application:
        """Build the aiohttp application serving this simulator; call it once."""
        if self._built:
            raise RuntimeError("Simulator.app() was already called; build one app per Simulator")
        self._built = True

        @web.middleware
        async def simulate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path.startswith(_CONTROL_PREFIX):
                return await route(request, handler)
            return await self._serve(request, handler)

        app = web.Application(middlewares=[simulate])
        app[SIMULATOR] = self
        for method, path, handler in (*API_ROUTES, *_CONTROL_ROUTES):
            app.router.add_route(method, path, handler)
        return app

    async def _serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer one API request, recording it whatever happens (client gone included)."""
        pending = self._faults
        if pending is not None and pending.arrival_delay_seconds > 0:
            await asyncio.sleep(pending.arrival_delay_seconds)  # still on its way in
        arrival = self._arrive(request)
        status = NO_RESPONSE
        try:
            if arrival.fault.latency_seconds > 0:
                await asyncio.sleep(arrival.fault.latency_seconds)
            if arrival.fault.reset:
                if request.transport is not None:
                    request.transport.close()
                # aiohttp's write of this placeholder fails quietly on the closed transport.
                return web.Response(status=HTTPStatus.BAD_GATEWAY)
            response = await self._respond(request, handler, arrival)
            status = response.status
            return response
        finally:
            self._record(request, arrival, status)

    def _arrive(self, request: web.Request) -> _Arrival:
        """Everything decided at arrival: the fault, the key's validity, the count."""
        at, wall = self._clock(), self._wall()
        fault = self._take_fault()
        header = _key_header(request.path)
        key = request.headers.get(header) or None
        accepted = self.config.agency_keys if header == _AGENCY_HEADER else self.config.team_keys
        valid_key = key if key in accepted else None
        quota: Quota | None = None
        retry_in: float | None = None
        if fault.force_429:  # an explicit refusal: nothing counted
            quota = Quota(self._limit_header, 0, at + fault.retry_after)
        elif valid_key is not None:
            budget = self._budget(valid_key)
            retry_in = budget.admit(at)
            quota = budget.quota(at, self.config.remaining_window == "tightest")
        return _Arrival(at, wall, header, key, valid_key, fault, quota, retry_in)

    async def _respond(
        self, request: web.Request, handler: Handler, arrival: _Arrival
    ) -> web.StreamResponse:
        response = await self._pick(request, handler, arrival)
        if arrival.quota is not None:
            response.headers.update(self._quota_headers(arrival))
        fault = arrival.fault
        if fault.echo_key is not None and arrival.key is not None:
            encoded = sim_echo.encode(
                fault.echo_key,
                arrival.key,
                percent=fault.echo_percent,
                swapcase=fault.echo_swapcase,
            )
            response = await sim_echo.echo_answer(
                request, response, arrival.header, encoded, fault.echo_in
            )
        if fault.gzip:
            _gzip(response)
        return response

    async def _pick(
        self, request: web.Request, handler: Handler, arrival: _Arrival
    ) -> web.StreamResponse:
        fault = arrival.fault
        if fault.status is not None:
            return error(fault.status, status_phrase(fault.status))
        if fault.force_429:
            return too_many(fault.retry_after)
        if arrival.valid_key is None:
            missing = arrival.key is None
            return error(401, f"Missing {arrival.header} header" if missing else "Invalid API key")
        if arrival.retry_in is not None:
            return too_many(max(1, math.ceil(arrival.retry_in)))
        request[STORE] = self._store(arrival.valid_key)
        return await route(request, handler)

    def _quota_headers(self, arrival: _Arrival) -> dict[str, str]:
        quota = arrival.quota
        assert quota is not None
        # Round up: a client that waits until Reset must find the slot free.
        reset = math.ceil(arrival.wall + max(0.0, quota.reset_at - arrival.at))
        if self.config.reset_format == "iso":
            reset_text = datetime.fromtimestamp(reset, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            reset_text = str(reset)
        return {
            "X-RateLimit-Limit": str(quota.limit),
            "X-RateLimit-Remaining": str(quota.remaining),
            "X-RateLimit-Reset": reset_text,
        }

    def _take_fault(self) -> Faults:
        """The faults for the API request arriving now, using up one use of a counted fault."""
        faults = self._faults
        if faults is None:
            return NO_FAULTS
        if self._fault_uses is not None:
            self._fault_uses -= 1
            if self._fault_uses <= 0:
                self.clear_faults()
        return faults

    def _budget(self, key: str) -> KeyBudget:
        if key not in self._budgets:
            self._budgets[key] = KeyBudget(self.config.limits)
        return self._budgets[key]

    def _store(self, key: str) -> Store:
        if key not in self._stores:
            self._stores[key] = Store(self._wall)
        return self._stores[key]

    def _record(self, request: web.Request, arrival: _Arrival, status: int) -> None:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        method, path = request.method, request.raw_path
        self.log.append(RecordedRequest(arrival.at, method, path, headers, arrival.key, status))
        self._statuses[status] += 1


SIMULATOR: Final = web.AppKey("echowin_simulator", Simulator)
"""The Simulator serving an app built by ``Simulator.app()``."""


def _key_header(path: str) -> str:
    agency = path == "/api/v1/agency" or path.startswith("/api/v1/agency/")
    return _AGENCY_HEADER if agency else _TEAM_HEADER


def _gzip(response: web.StreamResponse) -> None:
    """Gzip a whole answer's body in place; one with a coding already (an echo's) or not
    whole (streamed) is left as it is."""
    if "Content-Encoding" in response.headers:
        return
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        response.body = gzip.compress(response.body)
        response.headers["Content-Encoding"] = "gzip"


# --- control endpoints (/_sim/) ---------------------------------------------------------------


async def _get_requests(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    statuses = {str(status): n for status, n in sorted(sim.statuses().items())}
    return web.json_response({"requests": [r.to_json() for r in sim.log], "statuses": statuses})


async def _clear_requests(request: web.Request) -> web.Response:
    request.app[SIMULATOR].clear_log()
    return web.json_response({"cleared": True})


async def _get_faults(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    faults = None if sim.faults is None else sim.faults.to_json()
    return web.json_response({"faults": faults, "left": sim.faults_left})


async def _set_faults(request: web.Request) -> web.Response:
    try:
        faults = Faults.from_json(await read_body(request))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    request.app[SIMULATOR].set_faults(faults)
    return web.json_response({"faults": faults.to_json()})


async def _clear_faults(request: web.Request) -> web.Response:
    request.app[SIMULATOR].clear_faults()
    return web.json_response({"faults": None})


async def _spend(request: web.Request) -> web.Response:
    body = await read_body(request)
    key, n = body.get("key"), body.get("n")
    if not isinstance(key, str) or not isinstance(n, int):
        raise ApiError(400, 'body must be {"key": string, "n": integer}')
    try:
        request.app[SIMULATOR].spend(key, n)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return web.json_response({"spent": n})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


_CONTROL_ROUTES: Final[tuple[tuple[str, str, ApiHandler], ...]] = (
    ("GET", "/_sim/requests", _get_requests),
    ("DELETE", "/_sim/requests", _clear_requests),
    ("GET", "/_sim/faults", _get_faults),
    ("POST", "/_sim/faults", _set_faults),
    ("DELETE", "/_sim/faults", _clear_faults),
    ("POST", "/_sim/spend", _spend),
    ("GET", "/_sim/healthz", _healthz),
)


async def run_simulator(
    config: SimConfig, host: str, port: int, faults: Faults | None = None
) -> None:
    """Serve a Simulator on ``host:port`` until cancelled (port 0 picks a free port), with
    ``faults`` in force from the start if given (``/_sim/faults`` changes them later).

    Once the socket is bound it prints exactly one line to stdout,
    ``echowin simulator listening on http://HOST:PORT``, so scripts can wait for it.
    """
    simulator = Simulator(config)
    if faults is not None:
        simulator.set_faults(faults)
    runner = web.AppRunner(simulator.app())
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_port = runner.addresses[0][1] if runner.addresses else port
        url_host = f"[{host}]" if ":" in host else host
        print(f"echowin simulator listening on http://{url_host}:{bound_port}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
