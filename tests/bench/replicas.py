"""The replicas benchmark: gateways sharing one Redis or one Redis Cluster, against one
gateway on SQLite.

    python -m tests.bench.replicas [--quick] [--rounds 3] [--seconds 5]
                                   [--json out.json] [--markdown out.md]

One private Redis (``redis-server`` on a free loopback port, no persistence), one private
Redis Cluster (three masters, no replicas: ``tests/state/redis/shapes.py``'s
``start_cluster``) and the gateways of this tree (every feature on, limits never binding),
measured interleaved:

    sqlite      one gateway, state in a SQLite file (the default)
    redis-1     one gateway on the Redis
    redis-2     two replicas on the same Redis (``replicas: 2``), loaded at once
    redis-3     three replicas, loaded at once
    cluster-1   one gateway on the cluster (``redis-cluster://``)
    cluster-2   two replicas on the cluster, loaded at once

Each replica gets its own wrk (50 connections, the one token made through the first
replica's admin API: tokens are shared). Per round: admitted req/s in all and per
replica, the replicas' own CPU time per answer, and the Redis round trips per admitted
request: the gateway's own count of its Redis operations
(``echowin_gateway_state_backend_duration_seconds_count``, each one exchange with Redis),
and Redis's ``total_commands_processed`` (a pipeline or a script is one exchange but may
be several commands), summed over the cluster's masters for a cluster setup.

Placement: as in every bench, wrk and the upstream run on the load CPU; the replicas take
the other CPUs in turn and Redis and the cluster's nodes the last of them. On a two-CPU
machine the replicas and every Redis share one CPU: the figures are then what a replica
costs, not how replicas scale. Prints one JSON object (progress on stderr); never asserts
a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import redis

from tests.bench import loadgen, servers
from tests.bench.harness import choose_cpus, log, raise_nofile
from tests.bench.servers import HUGE_LIMITS, Gateway, Processes
from tests.procs import free_ports
from tests.state.redis import shapes

PATH = "/api/v1/contacts"
CONNECTIONS = 50
SETUPS = {"sqlite": 1, "redis-1": 1, "redis-2": 2, "redis-3": 3, "cluster-1": 1, "cluster-2": 2}
OPS = "echowin_gateway_state_backend_duration_seconds_count"


def start_redis(procs: Processes, cpu: int | None) -> tuple[str, int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed")
    (port,) = free_ports(1)
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    procs.start("redis", cmd, f"redis://127.0.0.1:{port}/0", cpu)
    return f"redis://127.0.0.1:{port}/0", port


def server_cpus(load_cpu: int | None) -> list[int | None]:
    """The CPUs the servers may have, one each in turn: every CPU this process may use but
    the load's (None on a single-CPU machine: nothing pinned). Asked before the harness
    pins itself to the load CPU."""
    if load_cpu is None:
        return [None]
    return [c for c in sorted(os.sched_getaffinity(0)) if c != load_cpu] or [None]


def start_replicas(
    procs: Processes, upstream: str, cpus: list[int | None], name: str, state: str
) -> list[Gateway]:
    """The setup's gateways, replica ``i`` on ``cpus[i]`` (in turn)."""
    count = SETUPS[name]
    out = []
    for i in range(count):
        cpu = cpus[i % len(cpus)]
        raw = servers.gateway_config(upstream, state, HUGE_LIMITS, max_wait=10, connections=10_000)
        if state.startswith("redis"):  # redis:// and redis-cluster://
            # A command may take 5 s, not 0.5: on a shared machine a Redis pinned beside
            # the loaded replicas can wait that long for its CPU, and a slower answer
            # would be a Redis outage (the fallback: on_state_failure), not the admitted
            # path this measures.
            raw["redis"] = {"key_prefix": f"egw-bench-{name}:", "timeout_seconds": 5}
            raw["replicas"] = count
        out.append(servers.launch_gateway(procs, f"{name}-{i}", raw, cpu))
    return out


async def state_ops(session: aiohttp.ClientSession, gws: list[Gateway]) -> float:
    """The replicas' Redis operations so far (their own count)."""
    total = 0.0
    for gw in gws:
        async with session.get(gw.admin_url + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith(OPS):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def redis_commands(ports: list[int]) -> list[int]:
    """Each server's ``total_commands_processed`` (a cluster node counts its own only)."""
    out = []
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            out.append(int(client.info("stats")["total_commands_processed"]))
        finally:
            client.close()
    return out


def odd_answers(gws: list[Gateway]) -> dict[str, int]:
    """What the replicas' logs hold besides 200s (said when a round had other answers):
    access-log lines by status and refusal, and warnings and errors by message."""
    counts: Counter[str] = Counter()
    for gw in gws:
        for line in gw.tail(10_000_000).splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("status") not in (None, 200) and entry.get("route") == PATH:
                counts[f"{entry['status']} {entry.get('refusal')}"] += 1
            elif entry.get("level") in ("warning", "error"):
                counts[f"{entry['level']}: {entry.get('msg')}"] += 1
    return dict(counts)


def backend(name: str) -> str:
    """``sqlite``, ``redis`` or ``cluster``: what the setup ``name`` keeps its state in."""
    return name.split("-")[0]


class Run:
    def __init__(self, rounds: int, seconds: int, tmp: Path) -> None:
        self.rounds, self.seconds, self.tmp = rounds, seconds, tmp
        self.procs = Processes(tmp)
        _, self.load_cpu = choose_cpus()
        self.cpus = server_cpus(self.load_cpu)
        self.wrk = loadgen.wrk_path()
        # The Redis servers each backend's commands are counted on (the cluster's masters).
        self.ports: dict[str, list[int]] = {"sqlite": [], "redis": [], "cluster": []}
        self.cluster: shapes.Cluster | None = None

    async def load(self, gws: list[Gateway], token: str) -> list[dict[str, Any]]:
        """Every replica at once, each with its own load generator."""
        headers = {"Authorization": f"Bearer {token}"}
        if self.wrk:
            wrk = self.wrk
            runs = [
                loadgen.run_wrk(
                    wrk, gw.url + PATH, headers, CONNECTIONS, self.seconds, self.load_cpu, self.tmp
                )
                for gw in gws
            ]
        else:
            runs = [
                loadgen.run_python(gw.url + PATH, headers, CONNECTIONS, self.seconds) for gw in gws
            ]
        return list(await asyncio.gather(*runs))

    async def measure(
        self, session: aiohttp.ClientSession, name: str, gws: list[Gateway], token: str
    ) -> dict[str, Any]:
        ports = self.ports[backend(name)]
        cpu = sum(servers.cpu_seconds(gw.pid) or 0.0 for gw in gws)
        ops = await state_ops(session, gws)
        before = redis_commands(ports)
        runs = await self.load(gws, token)
        admitted = sum(r["requests"] - r["non_2xx"] for r in runs)
        seconds = max(r["seconds"] for r in runs)
        spent = sum(servers.cpu_seconds(gw.pid) or 0.0 for gw in gws) - cpu
        ops = await state_ops(session, gws) - ops
        by_node = [a - b for a, b in zip(redis_commands(ports), before, strict=True)]
        commands = sum(by_node)
        return {
            "rps": round(admitted / seconds, 1),
            "rps_per_replica": [r["rps"] for r in runs],
            "cpu_us": round(spent * 1e6 / admitted, 1) if admitted else None,
            "redis_ops_per_request": round(ops / admitted, 3) if admitted else None,
            "redis_commands_per_request": round(commands / admitted, 3) if admitted else None,
            "redis_commands_by_node": by_node,
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "socket_errors": sum(r["errors"] for r in runs),
            "as_expected": all(r["requests"] and not (r["errors"] or r["non_2xx"]) for r in runs),
        }

    async def run(self) -> dict[str, Any]:
        try:
            if self.load_cpu is not None:
                os.sched_setaffinity(0, {self.load_cpu})
            up = await self._upstream()
            cpus = self.cpus
            started = time.monotonic()
            states = self._backends(cpus)
            log(f"redis and cluster up in {time.monotonic() - started:.1f} s")
            groups: dict[str, list[Gateway]] = {}
            for name, state in states.items():
                groups[name] = start_replicas(self.procs, up, cpus, name, state)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                tokens = {}
                for name, gws in groups.items():
                    tokens[name] = await servers.create_token(session, gws[0], "contacts:read")
                    for gw in gws[1:]:
                        await servers.wait_ready(session, gw, "/api/v1/contacts")
                log(
                    f"{sum(map(len, groups.values()))} gateways ready in"
                    f" {time.monotonic() - started:.1f} s"
                )
                rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in groups}
                for r in range(self.rounds):
                    for name, gws in groups.items():
                        res = await self.measure(session, name, gws, tokens[name])
                        rounds[name].append(res)
                        log(
                            f"round {r + 1}/{self.rounds} {name:<9} {res['rps']:>8.1f} req/s"
                            f" {res['rps_per_replica']}  {res['cpu_us']} us CPU/answer"
                            f"  redis ops/request {res['redis_ops_per_request']}"
                            f" commands/request {res['redis_commands_per_request']}"
                        )
                        if not res["as_expected"]:
                            log(
                                f"  {name}: {res['non_2xx']} non-2xx answers,"
                                f" {res['socket_errors']} socket errors; in the logs so far:"
                                f" {odd_answers(gws)}"
                            )
            result = summarise(rounds)
            result["meta"].update(
                load="wrk" if self.wrk else "python",
                upstream="nginx" if servers.nginx_path() else "aiohttp",
                cluster_masters=len(self.ports["cluster"]),
            )
            return result
        finally:
            self.procs.close()
            if self.cluster is not None:
                self.cluster.stop()

    def _backends(self, cpus: list[int | None]) -> dict[str, str]:
        """Start the Redis and the cluster, on the last server CPU (replica 0 takes the
        first: the same one on two CPUs); each setup's ``state`` URL."""
        redis_url, port = start_redis(self.procs, cpus[-1])
        self.ports["redis"] = [port]
        pin = cpus[-1]
        self.cluster = shapes.start_cluster(
            self.tmp / "cluster", wrap=lambda cmd: loadgen.pinned(cmd, pin)
        )
        self.ports["cluster"] = list(self.cluster.ports)
        urls = {"redis": redis_url, "cluster": self.cluster.url}
        return {
            name: f"sqlite:///{self.tmp / name}.db" if name == "sqlite" else urls[backend(name)]
            for name in SETUPS
        }

    async def _upstream(self) -> str:
        nginx = servers.nginx_path()
        if nginx:
            up = servers.start_nginx_upstream(self.procs, nginx, self.load_cpu)
        else:
            up = servers.start_python_upstream(self.procs, self.load_cpu)
        async with aiohttp.ClientSession() as session:
            await servers.wait_ready(session, up)
        return up.url


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def summarise(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    base = _median([r["rps"] for r in rounds["sqlite"]])
    for name, rows in rounds.items():
        rps = _median([r["rps"] for r in rows])
        count = SETUPS[name]
        targets[name] = {
            "replicas": count,
            "rps": rps,
            "rps_per_replica": round(rps / count, 1) if rps else None,
            "vs_sqlite": round(rps / base, 3) if rps and base else None,
            "cpu_us": _median([r["cpu_us"] for r in rows]),
            "redis_ops_per_request": _median([r["redis_ops_per_request"] for r in rows]),
            "redis_commands_per_request": _median([r["redis_commands_per_request"] for r in rows]),
            "all_as_expected": all(r["as_expected"] for r in rows),
            "rounds": rows,
        }
    return {
        "meta": {"connections_per_replica": CONNECTIONS, "loadavg": list(os.getloadavg())},
        "targets": targets,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| Setup | replicas | admitted req/s | per replica | vs sqlite | CPU µs/answer |"
        " Redis round trips/request | Redis commands/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in result["targets"].items():
        lines.append(
            f"| {name} | {t['replicas']} | {t['rps']} | {t['rps_per_replica']} |"
            f" {t['vs_sqlite']} | {t['cpu_us']} | {t['redis_ops_per_request']} |"
            f" {t['redis_commands_per_request']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 1 s")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    rounds, seconds = (1, 1) if args.quick else (args.rounds, args.seconds)
    rounds, seconds = max(1, min(rounds, 20)), max(1, min(seconds, 60))
    raise_nofile()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="egw-replicas-") as tmp:
        os.chmod(tmp, 0o755)  # nginx workers drop root and still read their files here
        result = asyncio.run(Run(rounds, seconds, Path(tmp)).run())
    result["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(markdown(result), encoding="utf-8")
    bad = [n for n, t in result["targets"].items() if not t["all_as_expected"]]
    if bad:
        log(f"unexpected statuses or errors in: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
