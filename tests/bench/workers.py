"""The workers scenario: ``serve --workers 2`` against ``--workers 1``, per gateway CPU.

    python -m tests.bench.workers [--quick] [--rounds N] [--seconds S] [--state sqlite|redis]
                                  [--json out.json] [--markdown out.md]

Two gateways with the same config (every feature on, as in the admitted scenario, budget
never binding, state in a sqlite file by default or in Redis), one started with
``--workers 1``, one with ``--workers 2``, measured interleaved for N rounds with wrk (50
keep-alive connections, spread over the workers by the kernel).

Placement. This machine has two CPUs, and the load generator and the upstream need one of
their own. As in every other scenario, wrk and the upstream are pinned to the load CPU; both
gateways may run on every CPU. One worker can only ever use one CPU: it gets the server CPU,
as in the other scenarios. Two workers get the server CPU and what the load generator and
the upstream leave of the other: the ratio is what a second worker buys on this machine,
not the gateway's scaling alone. Each round therefore also reports the CPU time the
gateway's processes used (cores = CPU seconds per second) and req/s per core: with linear
scaling req/s per core stays the same with two workers.

Also run by tests/bench/harness.py (``--no-workers`` skips it). Targets are reported, never
asserted.
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
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench import loadgen, servers
from tests.bench.servers import HUGE_LIMITS, Gateway, Proc, Processes

PATH = "/api/v1/contacts"
SCOPE = "contacts:read"
CONNECTIONS = 50
# A second worker keeps at least this share of one worker's req/s per gateway CPU-second
# (the processes' own CPU time). The old target, 2 workers at 1.7 x the req/s of one, is
# retired: on two CPUs shared with wrk and the upstream it measured the machine (see
# docs/performance.md, "Workers, per CPU").
PER_CPU_SHARE = 0.9
COUNTS = (1, 2)
TICKS = os.sysconf("SC_CLK_TCK")
DESCRIPTION = (
    "admitted path, 50 connections, serve --workers 2 vs --workers 1 (wrk and upstream on the"
    " load CPU, the gateways on every CPU)"
)


def name_of(count: int) -> str:
    return f"gateway-{count}w"


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (gone ones count 0)."""
    return sum(servers.cpu_seconds(pid) or 0.0 for pid in pids)


def machine_busy_seconds() -> float:
    """CPU seconds every CPU of the machine has been busy so far (/proc/stat's ``cpu``
    line: all but idle and iowait), whoever used them."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is counted in user time already
    return (sum(fields[:8]) - idle) / TICKS


def every_cpu(cmd: list[str]) -> list[str]:
    """``cmd`` allowed on every CPU (the harness itself is pinned to the load CPU)."""
    cpus = ",".join(str(c) for c in range(os.cpu_count() or 1))
    return ["taskset", "-c", cpus, *cmd] if shutil.which("taskset") else cmd


def start_group(
    procs: Processes, upstream: str, count: int, state: str, loop: str | None
) -> Gateway:
    """``echowin-gateway serve --workers COUNT``: the admitted scenario's gateway, with state
    shared between processes (a sqlite file or a Redis prefix of its own)."""
    name = name_of(count)
    raw = servers.gateway_config(
        upstream, f"sqlite:///{procs.tmp}/{name}.db", HUGE_LIMITS, max_wait=10, event_loop=loop
    )
    if state == "redis":
        raw["state"] = "redis://127.0.0.1:6379/0"
        raw["redis"] = {"key_prefix": f"egw-bench-{uuid.uuid4().hex[:8]}:"}
    return servers.launch_gateway(
        procs, name, raw, None, serve_args=("--workers", str(count)), wrap=every_cpu
    )


async def group_pids(session: aiohttp.ClientSession, gw: Gateway) -> list[int]:
    """The gateway's processes: itself, and its workers when it supervises some."""
    async with session.get(gw.admin_url + "/healthz") as resp:
        body = await resp.json()
    return [gw.pid, *(w["pid"] for w in body.get("workers", []) if w["pid"])]


@dataclass
class Target:
    count: int
    gw: Gateway
    token: str = ""
    pids: tuple[int, ...] = ()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def measure(
    target: Target, seconds: int, wrk: str | None, load_cpu: int | None, tmp: Path
) -> dict[str, Any]:
    url = target.gw.url + PATH
    before = cpu_seconds(list(target.pids))
    busy_before = machine_busy_seconds()
    if wrk:
        res = await loadgen.run_wrk(wrk, url, target.headers, CONNECTIONS, seconds, load_cpu, tmp)
    else:
        res = await loadgen.run_python(url, target.headers, CONNECTIONS, seconds)
    used = cpu_seconds(list(target.pids)) - before
    rest = machine_busy_seconds() - busy_before - used
    res["cores"] = round(used / res["seconds"], 3) if res["seconds"] else None
    res["rps_per_core"] = round(res["rps"] / res["cores"], 1) if res["cores"] else None
    if res["requests"]:
        # CPU per answer: the gateway's, and the rest of the machine's (wrk, the upstream,
        # the harness, the kernel's share not charged to a process, anyone else).
        res["gateway_us"] = round(used / res["requests"] * 1e6, 1)
        res["rest_us"] = round(rest / res["requests"] * 1e6, 1)
    res["as_expected"] = bool(res["requests"] and not res["errors"] and not res["non_2xx"])
    target.gw.check_alive()
    return res


def _spread(values: list[float], digits: int) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def summarise(rounds: dict[int, list[dict[str, Any]]], state: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": DESCRIPTION,
        "connections": CONNECTIONS,
        "state": state,
        "targets": {},
    }
    for count, runs in rounds.items():
        out["targets"][name_of(count)] = {
            "workers": count,
            "rps": _spread([r["rps"] for r in runs], 1),
            "p50_ms": _spread([r["p50_ms"] for r in runs], 4),
            "p99_ms": _spread([r["p99_ms"] for r in runs], 4),
            "cores": _spread([r["cores"] for r in runs if r["cores"] is not None], 3),
            "rps_per_core": _spread([r["rps_per_core"] for r in runs if r["rps_per_core"]], 1),
            "gateway_us": _spread([r["gateway_us"] for r in runs if "gateway_us" in r], 1),
            "rest_us": _spread([r["rest_us"] for r in runs if "rest_us" in r], 1),
            "all_as_expected": all(r["as_expected"] for r in runs),
            "rounds": runs,
        }
    one, two = (out["targets"][name_of(c)]["rps"]["median"] for c in COUNTS)
    out["ratio"] = round(two / one, 3) if one else None
    paired = [b["rps"] / a["rps"] for a, b in zip(rounds[1], rounds[2], strict=True) if a["rps"]]
    out["ratio_paired"] = _spread(paired, 3)
    one, two = (out["targets"][name_of(c)]["rps_per_core"]["median"] for c in COUNTS)
    out["per_cpu_ratio"] = round(two / one, 3) if one and two else None
    paired = [
        b["rps_per_core"] / a["rps_per_core"]
        for a, b in zip(rounds[1], rounds[2], strict=True)
        if a["rps_per_core"] and b["rps_per_core"]
    ]
    out["per_cpu_ratio_paired"] = _spread(paired, 3)
    return out


async def run_scenario(
    procs: Processes,
    session: aiohttp.ClientSession,
    upstream: str,
    *,
    tmp: Path,
    wrk: str | None,
    load_cpu: int | None,
    rounds: int,
    seconds: int,
    warmup: int,
    state: str = "sqlite",
    loop: str | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Start both gateways, measure them interleaved, stop them; the scenario's summary."""
    targets = [Target(c, start_group(procs, upstream, c, state, loop)) for c in COUNTS]
    try:
        for t in targets:
            t.token = await servers.create_token(session, t.gw, SCOPE)
            t.pids = tuple(await group_pids(session, t.gw))
            async with session.get(t.gw.url + PATH, headers=t.headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"workers/{t.gw.name}: probe got {resp.status}, want 200")
        if warmup:
            for t in targets:
                await measure(t, warmup, wrk, load_cpu, tmp)
        runs: dict[int, list[dict[str, Any]]] = {c: [] for c in COUNTS}
        for r in range(rounds):
            for t in targets:
                res = await measure(t, seconds, wrk, load_cpu, tmp)
                runs[t.count].append(res)
                if log is not None:
                    log(
                        f"workers round {r + 1}/{rounds} {t.gw.name:<11} {res['rps']:>9.1f} req/s"
                        f"  {res['cores']} cores  p50 {res['p50_ms']:.3f} ms"
                        + ("" if res["as_expected"] else "  UNEXPECTED STATUS OR ERRORS")
                    )
    finally:
        for t in targets:
            procs.stop(t.gw)
    summary = summarise(runs, state)
    summary["event_loop"] = loop or "the gateway's default"
    return summary


def target_row(scenario: dict[str, Any]) -> dict[str, Any]:
    ratio = scenario["per_cpu_ratio"]
    return {
        "name": "req/s per gateway CPU-second, 2 workers vs 1",
        "want": f">= {PER_CPU_SHARE} x",
        "value": ratio,
        "met": ratio is not None and ratio >= PER_CPU_SHARE,
    }


def markdown(scenario: dict[str, Any], load_cpu: int | None) -> list[str]:
    def fmt(s: dict[str, float | None], digits: int) -> str:
        if s["median"] is None:
            return "-"
        return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f}, {s['max']:,.{digits}f}]"

    lines = [
        "",
        f"Workers: admitted path, {scenario['connections']} connections, state "
        f"{scenario['state']}; load generator and upstream on CPU {load_cpu}, the gateways "
        f"on every CPU. req/s per gateway CPU-second, 2 workers / 1 worker: "
        f"{scenario['per_cpu_ratio']} (paired per round: "
        f"{fmt(scenario['per_cpu_ratio_paired'], 3)}); req/s, 2 workers / 1 worker: "
        f"{scenario['ratio']} (paired: {fmt(scenario['ratio_paired'], 3)}). CPU per answer: the "
        "gateway's processes', and the rest of the machine's (wrk, the upstream, the harness, "
        "anyone else).",
        "",
        "| Server | req/s: median [min, max] | x 1 worker | CPU cores used | req/s per core | "
        "gateway CPU µs per answer | rest of the machine, µs per answer | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = scenario["targets"][name_of(1)]["rps"]["median"]
    for name, t in scenario["targets"].items():
        ratio = f"{t['rps']['median'] / base:.2f}" if base else "-"
        flag = "" if t["all_as_expected"] else " (UNEXPECTED STATUS)"
        lines.append(
            f"| {name}{flag} | {fmt(t['rps'], 0)} | {ratio} | {fmt(t['cores'], 2)} | "
            f"{fmt(t['rps_per_core'], 0)} | {fmt(t['gateway_us'], 1)} | {fmt(t['rest_us'], 1)} | "
            f"{t['p50_ms']['median']} | {t['p99_ms']['median']} |"
        )
    return lines


# --- on its own ------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


async def _main(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    load_cpu = cpus[0] if len(cpus) > 1 else None  # as the harness: the first CPU
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    procs = Processes(tmp)
    nginx = servers.nginx_path()
    wrk = loadgen.wrk_path()
    try:
        if nginx:
            upstream: Proc = servers.start_nginx_upstream(procs, nginx, load_cpu)
        else:
            upstream = servers.start_python_upstream(procs, load_cpu)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await servers.wait_ready(session, upstream)
            started = time.monotonic()
            scenario = await run_scenario(
                procs,
                session,
                upstream.url,
                tmp=tmp,
                wrk=wrk,
                load_cpu=load_cpu,
                rounds=args.rounds,
                seconds=args.seconds,
                warmup=0 if args.quick else 1,
                state=args.state,
                log=log,
            )
            scenario["wall_seconds"] = round(time.monotonic() - started, 1)
    finally:
        procs.close()
    return {
        "meta": {
            "load_generator": loadgen.wrk_version(wrk) if wrk else "python asyncio",
            "upstream": "nginx return 200" if nginx else "aiohttp",
            "load_cpu": load_cpu,
            "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
        "scenarios": {"workers": scenario},
        "targets": [target_row(scenario)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 1 s")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--state", choices=("sqlite", "redis"), default="sqlite")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 1
    args.rounds, args.seconds = max(1, min(args.rounds, 50)), max(1, min(args.seconds, 60))
    with tempfile.TemporaryDirectory(prefix="egw-bench-workers-") as tmp:
        result = asyncio.run(_main(args, Path(tmp)))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    lines = markdown(result["scenarios"]["workers"], result["meta"]["load_cpu"])
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), file=sys.stderr)
    targets = result["scenarios"]["workers"]["targets"].values()
    return 0 if all(t["all_as_expected"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
