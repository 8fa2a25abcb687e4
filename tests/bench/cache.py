"""Budget benchmark of the response cache: the same workload against two gateways at once,
one without the cache and one with it, each in front of its own simulator with echowin's
published limits (1000/h, 100/min), on loopback, for a bounded time.

The workload: a dashboard polling the contact list every 2 s, three services each reading
the tag list and the board list every second, and a batch writer creating a contact every
5 s. Prints one JSON object: per gateway, the upstream sends, the callers' answers by
status and kind, and echowin's 429s (always 0).

    .venv/bin/python -m tests.bench.cache [--seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
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
from tests.bench.budget import _site

KEY = "bench-team-key-0123456789"
LIMITS = ((1000, 3600.0), (100, 60.0))
CACHE = {
    "routes": {
        "/api/v1/tags": 60,
        "/api/v1/boards": 60,
        "/api/v1/contacts/custom-fields": 300,
        "/api/v1/contacts": 10,
        "/api/v1/contacts/{contactId}": 10,
    }
}
# (kind, method, path, every seconds, callers)
WORKLOAD = (
    ("dashboard", "GET", "/api/v1/contacts?page=1&limit=20", 2.0, 1),
    ("service", "GET", "/api/v1/tags", 1.0, 3),
    ("service", "GET", "/api/v1/boards", 1.0, 3),
    ("writer", "POST", "/api/v1/contacts", 5.0, 1),
)


class Side:
    """One gateway and its simulator; what its callers got."""

    def __init__(self, name: str, sim: Simulator, url: str, token: str) -> None:
        self.name = name
        self.sim = sim
        self.url = url
        self.token = token
        self.answers: Counter[str] = Counter()

    def report(self, seconds: float) -> dict[str, Any]:
        ok = sum(n for k, n in self.answers.items() if k.split()[1].startswith("2"))
        return {
            "upstream_sends": len(self.sim.log),
            "upstream_429s": self.sim.statuses()[429],
            "caller_successes": ok,
            "caller_requests": self.answers.total(),
            "success_share": round(ok / max(1, self.answers.total()), 4),
            "answers": dict(sorted(self.answers.items())),
            "sends_per_minute": round(len(self.sim.log) * 60 / seconds, 1),
        }


async def _side(name: str, cache: dict[str, Any] | None) -> tuple[Side, list[web.AppRunner]]:
    sim = Simulator(
        SimConfig(team_keys=frozenset({KEY}), limits=tuple(SimLimit(*x) for x in LIMITS))
    )
    sim_runner, sim_url = await _site(sim.app())
    raw: dict[str, Any] = {
        "state": "memory://",
        "logging": {"access_log": False},
        "upstream": {
            "base_url": sim_url,
            "api_key": {"env": "BENCH_KEY"},
            "limits": [{"requests": n, "per_seconds": t} for n, t in LIMITS],
        },
        "queue": {"max_wait_seconds": 1},
    }
    if cache is not None:
        raw["cache"] = cache
    config = parse_config(raw)
    proxy_app, _ = build_apps(config, resolve_secrets(config, {"BENCH_KEY": KEY}))
    gw_runner, gw_url = await _site(proxy_app)
    rt = proxy_app[RUNTIME]
    token = (await create_token(rt.store, config, rt.routes, name=name, scopes=["*"])).token
    return Side(name, sim, gw_url, token), [gw_runner, sim_runner]


async def _caller(
    side: Side,
    kind: str,
    method: str,
    path: str,
    every: float,
    until: float,
    session: aiohttp.ClientSession,
) -> None:
    headers = {"Authorization": f"Bearer {side.token}"}
    n = 0
    while time.monotonic() < until:
        n += 1
        body = {"number": f"+1555{n:07d}", "firstName": "Batch"} if method == "POST" else None
        started = time.monotonic()
        async with session.request(method, side.url + path, headers=headers, json=body) as resp:
            await resp.read()
            side.answers[f"{kind} {resp.status}"] += 1
        await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))


async def run(seconds: float) -> dict[str, Any]:
    without, runners_a = await _side("without", None)
    with_cache, runners_b = await _side("with", CACHE)
    until = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(
            *(
                _caller(side, kind, method, path, every, until, session)
                for side in (without, with_cache)
                for kind, method, path, every, callers in WORKLOAD
                for _ in range(callers)
            )
        )
    for runner in runners_a + runners_b:
        await runner.cleanup()
    a, b = without.report(seconds), with_cache.report(seconds)
    return {
        "seconds": seconds,
        "limits": [f"{n}/{t:g}s" for n, t in LIMITS],
        "without_cache": a,
        "with_cache": b,
        "sends_saved_share": round(1 - b["upstream_sends"] / max(1, a["upstream_sends"]), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args(argv)
    result = asyncio.run(run(min(args.seconds, 600.0)))
    print(json.dumps(result, indent=2))
    failed = result["without_cache"]["upstream_429s"] or result["with_cache"]["upstream_429s"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
