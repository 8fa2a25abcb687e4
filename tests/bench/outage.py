"""The Redis outage benchmark: what loaded replicas admit while their Redis is away.

    python -m tests.bench.outage [--quick] [--replicas 2] [--outage 10] [--rounds 1]
                                 [--json out.json] [--markdown out.md]

Per round: a private ``redis-server`` on a free loopback port, the real simulator (in this
process) with short rolling windows counted at arrival, and ``--replicas`` gateway
processes (``serve``, ``replicas: N``, ``on_state_failure: local``) sharing the Redis, each
loaded by its own callers back to back. After a warm-up with Redis up, Redis is stopped
for ``--outage`` seconds, then started again.

The figure: the sends echowin (the simulator) received during the outage, against what an
ideal coordinator could have sent in the same seconds: every send the simulator saw before
the outage stays counted, and the ideal sender fills each of the gateway's windows (its
limits plus ``window_guard_seconds``) as early as they allow (``ideal_sends``). An ideal
1/N split gives each replica 1/N of that; ``share`` is the replicas' sum against it, and
``per_replica`` each replica's own count against 1/N. Also: upstream 429s (must be 0), and
the longest time any replica went without an admitted answer during the outage.

A second scenario, ``old_view``, leaves one replica idle through the warm-up (its shared
view ages) and loads it only once Redis is away: how long it waits for its first admission
(``first_admit_seconds``) shows whether an old view locks it out for a whole window.
``light``: one caller per replica, a call every LIGHT_PACE seconds, under every limit: every
call could go, so the figures are the calls answered 200 and the longest answer;
``light+window``: the same with a short extra window in the gateway's limits
(EXTRA_WINDOW), which bounds the blind margin to its size.

Prints one JSON object (progress on stderr); asserts nothing about speed (the figures are
counts of sends). docs/budget.md ("Outage without a lockout") holds one run's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.sim import SimConfig, Simulator
from tests.bench.servers import Processes
from tests.procs import CLI, REAL_KEY, child_env, free_ports
from tests.state.redis.test_replicas import RedisServer, mint, replica_configs, wait_redis_up

# Short windows, so that a 10 s outage spans several turns of the tight one and most of
# the long one (echowin's 100 a minute and 1,000 an hour, scaled down).
LIMITS = ((40, 10.0), (12, 2.0))
GUARD = 0.25  # the default window_guard_seconds, which the replicas run with
CALLERS = 6  # back-to-back callers per loaded replica
LIGHT_PACE = 0.8  # light: one caller per replica, a call every 0.8 s (2.5/s in all)
# light+window: the gateway's limits with a short extra window, which bounds the blind
# margin (what a replica alone counts as the others' unseen sends) to its size
EXTRA_WINDOW = (3, 1.0)


def ideal_sends(before: list[float], start: float, end: float) -> int:
    """Sends an ideal coordinator fits in [start, end) after ``before`` (sorted send times),
    under every gateway window (``LIMITS`` each ``GUARD`` longer): each send as early as
    every window allows."""
    sends = sorted(before)
    t, count = start, 0
    while t < end:
        wait = 0.0
        for n, per in LIMITS:
            span = per + GUARD
            inside = [s for s in sends if s > t - span]
            if len(inside) >= n:
                wait = max(wait, inside[-n] + span - t)
        if wait <= 1e-9:
            sends.append(t)
            count += 1
        else:
            t += wait
    return count


async def wait_up(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(300):
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


Call = tuple[float, float, int]  # started, answered (monotonic), status


async def caller(
    url: str, token: str, until: float, admits: list[float], calls: list[Call], pace: float
) -> None:
    """Until ``until`` (monotonic): back to back (``pace`` 0), or one call every ``pace``
    seconds (a light load, under every limit); bounded in count and time."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(100_000):
            started = time.monotonic()
            if started >= until:
                return
            status = 0
            try:
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                pass
            calls.append((started, time.monotonic(), status))
            if status == 200:
                admits.append(time.monotonic())
            pause = pace - (time.monotonic() - started) if pace else 0.0 if status == 200 else 0.05
            await asyncio.sleep(max(pause, 0.0))


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest stretch of [start, end) without one of ``times``."""
    marks = [start, *sorted(t for t in times if start <= t < end), end]
    return max(b - a for a, b in itertools.pairwise(marks))


async def one_round(
    tmp: Path,
    replicas: int,
    outage: float,
    warm: float,
    scenario: str,
    keep: bool = False,
    limits: tuple[tuple[int, float], ...] = LIMITS,
) -> dict[str, Any]:
    """One round of ``scenario`` (``loaded``, ``old_view``, ``light``); ``limits``: the
    gateway's (echowin's stay ``LIMITS``: a shorter extra window bounds the blind margin)."""
    old_view = scenario == "old_view"
    pace = LIGHT_PACE if scenario == "light" else 0.0
    callers = 1 if scenario == "light" else CALLERS
    sim = Simulator(SimConfig(team_keys=frozenset({REAL_KEY}), limits=_sim_limits()))
    runner = web.AppRunner(sim.app(), access_log=None)
    await runner.setup()
    (sim_port,) = free_ports(1)
    await web.TCPSite(runner, "127.0.0.1", sim_port).start()
    (redis_port,) = free_ports(1)
    redis = RedisServer(redis_port, tmp, [])
    redis.start()
    spawned = Processes(tmp)
    try:
        await wait_redis_up(redis.url)
        configs = replica_configs(
            tmp,
            f"http://127.0.0.1:{sim_port}",
            redis.url,
            replicas,
            on_state_failure="local",
            upstream=_upstream(f"http://127.0.0.1:{sim_port}", limits),
            logging={"access_log": keep, "level": "debug" if keep else "info"},
        )
        tokens = await mint(configs[0], replicas)
        serve_env = child_env(ECHOWIN_API_KEY=REAL_KEY)
        for i, cfg in enumerate(configs):
            cmd = [*CLI, "serve", "--config", str(cfg.config)]
            spawned.start(f"replica{i}", cmd, cfg.url(""), None, env=serve_env)
        async with aiohttp.ClientSession() as session:
            for cfg in configs:
                await wait_up(session, cfg.admin_url("/healthz"))
        loaded_first = range(1, replicas) if old_view else range(replicas)
        admits: list[list[float]] = [[] for _ in configs]
        calls: list[Call] = []
        end_all = time.monotonic() + warm + outage + 2.0

        def load(i: int, until: float) -> list[asyncio.Task[None]]:
            url = configs[i].url("/api/v1/contacts")
            return [
                asyncio.ensure_future(caller(url, tokens[i], until, admits[i], calls, pace))
                for _ in range(callers)
            ]

        tasks = [t for i in loaded_first for t in load(i, end_all)]
        if old_view:  # one call: replica 0 knows the token, then idles while its view ages
            async with aiohttp.ClientSession() as session:
                headers = {"Authorization": f"Bearer {tokens[0]}"}
                async with session.get(configs[0].url("/api/v1/contacts"), headers=headers) as r:
                    await r.read()
        await asyncio.sleep(warm)
        redis.stop()
        down_at = time.monotonic()
        sim_down = sim_clock()
        if old_view:
            tasks += load(0, end_all)
        await asyncio.sleep(outage)
        sim_up = sim_clock()
        up_at = time.monotonic()
        redis.start()
        await asyncio.gather(*tasks)
    finally:
        spawned.close()
        for proc in redis.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
        await runner.cleanup()
    served = sorted(r.at for r in sim.log if r.status == 200)
    during = [t for t in served if sim_down <= t < sim_up]
    ideal = ideal_sends([t for t in served if t < sim_down], sim_down, sim_up)
    per = [len([t for t in a if down_at <= t < up_at]) for a in admits]
    result: dict[str, Any] = {
        "replicas": replicas,
        "outage_seconds": outage,
        "sent_during_outage": len(during),
        "ideal_sends": ideal,
        "share": round(len(during) / ideal, 3) if ideal else None,
        "admitted_per_replica": per,
        "per_replica": [round(p / (ideal / replicas), 3) if ideal else None for p in per],
        "longest_gap_seconds": [round(longest_gap(a, down_at, up_at), 2) for a in admits],
        "upstream_429s": sum(1 for r in sim.log if r.status == 429),
    }
    if scenario == "light":  # every call could go: what share did, and how late
        late = [c for c in calls if down_at <= c[0] < up_at]
        ok = [c for c in late if c[2] == 200]
        result["calls_during_outage"] = len(late)
        result["answered_200"] = len(ok)
        result["max_answer_seconds"] = round(max((b - a for a, b, _ in ok), default=0.0), 2)
    if old_view:
        first = [t for t in admits[0] if t >= down_at]
        result["first_admit_seconds"] = round(first[0] - down_at, 2) if first else None
    return result


def _upstream(sim_url: str, limits: tuple[tuple[int, float], ...]) -> dict[str, Any]:
    return {
        "base_url": sim_url,
        "api_key": {"env": "ECHOWIN_API_KEY"},
        "timeout_seconds": 5,
        "connect_timeout_seconds": 2,
        "limits": [{"requests": n, "per_seconds": t} for n, t in limits],
    }


def _sim_limits() -> tuple[Any, ...]:
    from proxy.sim import SimLimit

    return tuple(SimLimit(n, t) for n, t in LIMITS)


def sim_clock() -> float:
    return time.monotonic()  # the simulator's default clock


SCENARIOS = ("loaded", "old_view", "light", "light+window")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"limits": LIMITS, "guard_seconds": GUARD, "rounds": []}
    for scenario in SCENARIOS:
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="egw-outage-") as tmp:
                print(f"round {r} {scenario}", file=sys.stderr)
                name, _, extra = scenario.partition("+")
                limits = (*LIMITS, EXTRA_WINDOW) if extra else LIMITS
                result = await one_round(
                    Path(tmp), args.replicas, args.outage, args.warm, name, limits=limits
                )
                result["scenario"] = scenario
                print(json.dumps(result), file=sys.stderr)
                out["rounds"].append(result)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases: proves it runs")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--outage", type=float, default=10.0)
    parser.add_argument("--warm", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.outage, args.warm, args.rounds = 2.0, 2.0, 1
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
