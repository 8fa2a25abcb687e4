"""Budget benchmark: how much of echowin's budget the gateway uses, and how fast it says no.

Runs the real gateway in front of the real simulator on loopback with short rolling
windows, drives it with saturating clients for a bounded time, and prints one JSON object:
utilisation (sent / what a perfect sender could send), upstream 429s, refusal latency
p50/p99 and queue wait p50/p99 (from Server-Timing), all in milliseconds.

    .venv/bin/python -m tests.bench.budget [--seconds 30] [--clients 16] [--state memory://]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from proxy.admin.tokenops import create_token
from proxy.app import build_apps
from proxy.config import parse_config, resolve_secrets
from proxy.runtime import RUNTIME
from proxy.sim import SimConfig, SimLimit, Simulator

KEY = "bench-team-key-0123456789"
LIMITS = ((40, 10.0), (12, 2.0))


def perfect_count(limits: tuple[tuple[int, float], ...], duration: float) -> int:
    """Sends a perfect sender fits in [0, duration) under every rolling window."""
    sends: list[float] = []
    t = 0.0
    while t < duration:
        wait = 0.0
        for n, per in limits:
            inside = [s for s in sends if s > t - per]
            if len(inside) >= n:
                wait = max(wait, inside[-n] + per - t)
        if wait <= 1e-12:
            sends.append(t)
        else:
            t += wait
    return len(sends)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


async def _site(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def _client(
    url: str, token: str, until: float, out: dict[str, Any], session: aiohttp.ClientSession
) -> None:
    for _ in range(1_000_000):
        if time.monotonic() >= until:
            return
        started = time.perf_counter()
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            await resp.read()
            elapsed_ms = (time.perf_counter() - started) * 1000
            out["statuses"][resp.status] += 1
            if resp.status == 429:
                out["refusal_ms"].append(elapsed_ms)
                await asyncio.sleep(0.05)
            timing = resp.headers.get("Server-Timing", "")
            if timing.startswith("queue;dur="):
                out["queue_ms"].append(float(timing.split("=")[1].split(",")[0]))


async def run(seconds: float, clients: int, state: str) -> dict[str, Any]:
    sim = Simulator(
        SimConfig(team_keys=frozenset({KEY}), limits=tuple(SimLimit(*x) for x in LIMITS))
    )
    sim_runner, sim_url = await _site(sim.app())
    raw = {
        "state": state,
        "logging": {"access_log": False},
        "upstream": {
            "base_url": sim_url,
            "api_key": {"env": "BENCH_KEY"},
            "limits": [{"requests": n, "per_seconds": t} for n, t in LIMITS],
        },
        "queue": {"max_wait_seconds": 3},
    }
    config = parse_config(raw)
    proxy_app, _ = build_apps(config, resolve_secrets(config, {"BENCH_KEY": KEY}))
    gw_runner, gw_url = await _site(proxy_app)
    rt = proxy_app[RUNTIME]
    tokens = [
        (await create_token(rt.store, config, rt.routes, name=f"svc{i}", scopes=["*"])).token
        for i in range(4)
    ]
    out: dict[str, Any] = {"statuses": Counter(), "refusal_ms": [], "queue_ms": []}
    until = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(
            *(
                _client(f"{gw_url}/api/v1/contacts", tokens[i % 4], until, out, session)
                for i in range(clients)
            )
        )
    await gw_runner.cleanup()
    await sim_runner.cleanup()
    arrivals = sorted(r.at for r in sim.log if r.status not in (0, 401, 429))
    first = arrivals[0] if arrivals else 0.0
    sent = len([t for t in arrivals if t < first + seconds])
    perfect = perfect_count(LIMITS, seconds)
    return {
        "seconds": seconds,
        "clients": clients,
        "state": state.split(":")[0],
        "limits": [f"{n}/{t:g}s" for n, t in LIMITS],
        "sent": sent,
        "perfect": perfect,
        "utilisation": round(sent / perfect, 4),
        "upstream_429s": sim.statuses()[429],
        "answered": dict(sorted(out["statuses"].items())),
        "refusal_ms_p50": percentile(out["refusal_ms"], 50),
        "refusal_ms_p99": percentile(out["refusal_ms"], 99),
        "queue_wait_ms_p50": percentile(out["queue_ms"], 50),
        "queue_wait_ms_p99": percentile(out["queue_ms"], 99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--state", default="memory://", help="memory:// or sqlite (a temp file)")
    args = parser.parse_args(argv)
    state = args.state
    with tempfile.TemporaryDirectory() as tmp:
        if state == "sqlite":
            state = f"sqlite:///{tmp}/bench.db"
        result = asyncio.run(run(min(args.seconds, 300.0), min(args.clients, 500), state))
    print(json.dumps(result, indent=2))
    return 0 if result["upstream_429s"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
