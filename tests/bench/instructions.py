"""Instructions per admitted request under callgrind: the gateway against the pass-through.

    python -m tests.bench.instructions [--requests 1000] [--concurrency 10] [--repeat 2]
                                       [--source DIR] [--json out.json]

req/s and CPU time move with the machine and its neighbours; the number of instructions a
server executes for the same requests does not (valgrind's callgrind counts them, whatever
else the machine is doing). Each server here runs under ``valgrind --tool=callgrind`` in
front of an nginx ``return 200`` upstream (the admitted scenario's, see servers.py) and
answers the admitted scenario's request, first ``SMALL`` times, then, in a new process,
``SMALL + --requests`` times. The difference of the two totals over ``--requests`` is the
cost of one request, without the start and the stop. ``--repeat`` measures each server
that many times, interleaved; the result keeps the median. ``--source DIR`` adds
``gateway@base``: the gateway from another source tree (``git archive REV | tar -x -C DIR``).

The ratio ``passthrough / gateway`` is what the admitted target (>= 0.85) would read on a
machine where instructions cost the same everywhere; it leaves out what instructions do
not show (cache misses, syscall time in the kernel). About 40 s per server and repeat;
needs valgrind and nginx. Run by hand, never by the tests (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench import servers
from tests.bench.servers import HUGE_LIMITS, Processes

PATH = "/api/v1/contacts"
SCOPE = "contacts:read"
SMALL = 200  # requests of the first run of each pair: the process warmed up
STARTUP_SECONDS = 300.0  # valgrind starts a Python process about 50 times slower
REQUEST_SECONDS = 60.0


def _callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


def _total(out: Path) -> int:
    """The instructions a callgrind output file counted in all (its ``totals:`` line)."""
    for line in reversed(out.read_text(encoding="utf-8", errors="replace").splitlines()):
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


async def _one_run(
    procs: Processes,
    upstream: str,
    server: str,
    source: Path | None,
    n: int,
    concurrency: int,
    tag: str,
    scenario: str,
) -> Path:
    """``server`` under callgrind answers ``n`` admitted requests, ``concurrency`` at a
    time, then stops; the callgrind file it wrote. ``tag`` names this run's files: each
    gateway starts with a state file of its own (one holding an earlier run's sends would
    cost more to load)."""
    out = procs.tmp / f"{tag}.out"
    wrap = lambda cmd: [*_callgrind(out), *cmd]  # noqa: E731
    if server == "passthrough":
        (port,) = servers.free_ports(1)
        cmd = [sys.executable, "-m", "tests.bench.passthrough", "--port", str(port)]
        cmd += ["--upstream", upstream, "--loop", _loop()]
        proc = procs.start(tag, wrap(cmd), f"http://127.0.0.1:{port}", None, servers.child_env())
    else:
        state = f"sqlite:///{procs.tmp}/{tag}.db"
        # A baseline tree gets the auth section only if it knows it (servers.start_gateway).
        throttle = source is None or servers.knows(source, "failures_per_client")
        raw = servers.gateway_config(
            upstream, state, HUGE_LIMITS, max_wait=5, event_loop=None, throttle=throttle
        )
        proc = servers.launch_gateway(procs, tag, raw, None, wrap=wrap, source=source)
    timeout = aiohttp.ClientTimeout(total=REQUEST_SECONDS)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout
    ) as session:
        await servers.wait_ready(session, proc, timeout=STARTUP_SECONDS)
        headers = {}
        if isinstance(proc, servers.Gateway):
            token = await servers.create_token(session, proc, SCOPE)
            headers["Authorization"] = f"Bearer {token}"
        expected = 200
        if scenario == "unauthorized" and server != "passthrough":
            headers["Authorization"] = f"Bearer {servers.UNKNOWN_TOKEN}"
            expected = 401

        async def one(_: int) -> None:
            async with session.get(proc.url + PATH, headers=headers) as resp:
                await resp.read()
                if resp.status != expected:
                    raise RuntimeError(f"{server}: {resp.status}")

        await asyncio.gather(*(one(i) for i in range(n)))
    procs.stop(proc)  # SIGTERM: callgrind writes its file as the process exits
    return out


def _loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


async def measure(
    requests: int,
    concurrency: int,
    repeat: int,
    source: Path | None,
    scenario: str = "admitted",
    keep: Path | None = None,
) -> dict[str, Any]:
    nginx = servers.nginx_path()
    if nginx is None or shutil.which("valgrind") is None:
        raise SystemExit("needs nginx and valgrind (apt-get install nginx-light valgrind)")
    names = ["gateway", "passthrough", *(["gateway@base"] if source is not None else [])]
    per_request: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="egw-instr-") as tmp:
        procs = Processes(Path(tmp))
        try:
            upstream = servers.start_nginx_upstream(procs, nginx, None)
            for round_ in range(repeat):
                for name in names:
                    tree = source if name == "gateway@base" else None
                    server = "passthrough" if name == "passthrough" else "gateway"
                    totals = []
                    for n in (SMALL, SMALL + requests):
                        tag = f"{name.replace('@', '-')}-{round_}-{n}"
                        out = await _one_run(
                            procs, upstream.url, server, tree, n, concurrency, tag, scenario
                        )
                        totals.append(_total(out))
                        if keep is not None:
                            keep.mkdir(parents=True, exist_ok=True)
                            shutil.copy(out, keep / out.name)
                    per_request[name].append((totals[1] - totals[0]) / requests)
                    print(f"[instructions] {name}: {per_request[name][-1]:,.0f}", file=sys.stderr)
        finally:
            procs.close()
    medians = {name: statistics.median(values) for name, values in per_request.items()}
    return {
        "scenario": scenario,
        "requests": requests,
        "concurrency": concurrency,
        "instructions_per_request": {
            name: {"median": round(medians[name]), "runs": [round(v) for v in values]}
            for name, values in per_request.items()
        },
        "passthrough_over_gateway": {
            name: round(medians["passthrough"] / medians[name], 3)
            for name in names
            if name != "passthrough"
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--source", type=Path, help="also measure the gateway from this tree")
    parser.add_argument(
        "--scenario",
        choices=("admitted", "unauthorized"),
        default="admitted",
        help="unauthorized: the gateways answer an unknown token (401)",
    )
    parser.add_argument("--keep", type=Path, help="copy the callgrind files here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    source = args.source and args.source.resolve()
    result = asyncio.run(
        measure(args.requests, args.concurrency, args.repeat, source, args.scenario, args.keep)
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
