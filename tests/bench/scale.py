"""The scale benchmark: the gateway at the size people run it, against itself at one key
and one token, in the same run.

    python -m tests.bench.scale [--quick] [--keys 500] [--tokens 10000] [--spread 1000]
                                [--rounds 3] [--seconds 5] [--json out.json]
                                [--markdown out.md] [--profile DIR] [--together]

Two gateways of this tree (SQLite state, every feature on as in tests/bench/harness.py),
pinned to one CPU, the upstream (nginx ``return 200``, else tests/bench/upstream.py) and
the load generator to the other:

    one      the team key, one token
    scale    ``--keys`` keys from ``upstream.keys_file``, ``--tokens`` tokens made through
             the admin API (16 at a time), bound round robin to the keys

Measured interleaved for ``--rounds`` rounds, 50 connections, admitted requests (limits
never binding):

    one         traffic from the one token
    scale-1     the scale gateway, traffic from one of its tokens (its keys and store)
    scale-1key  traffic spread over ``--spread`` tokens, all bound to one key
    scale       traffic spread over ``--spread`` other tokens, bound round robin to the
                keys (the traffic of many subteams)

With ``--together`` each of the three scale runs is measured at the same time as a run of
``one`` (two load generators, both gateways sharing their CPU): each pair sees the same
neighbours, and each run's CPU per answer is compared with its own ``one``.

Spread traffic comes from wrk with a Lua script taking the tokens in turn (else the Python
generator, rotating).

Per measurement: req/s, the gateway's own CPU time per answer (/proc), its peak RSS. Once:
start-up time (process start to ``/readyz`` 200), token creation, RSS at rest (started, and
with the tokens made), and after the load the cost of ``/metrics`` and ``/status.json``
(time, bytes, series). Prints one JSON object (progress on stderr); never asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench import loadgen, servers
from tests.bench.harness import RssSampler, choose_cpus, expected, hotspots, log, raise_nofile
from tests.bench.scale_report import markdown, summarise
from tests.bench.servers import HUGE_LIMITS, Gateway, Processes

PATH = "/api/v1/contacts"
CONNECTIONS = 50
CREATE_AT_ONCE = 16
CREATE_SECONDS = 600.0
READY_SECONDS = 60.0
SCRAPES = 10


@dataclass(frozen=True)
class Options:
    keys: int
    tokens: int
    spread: int
    rounds: int
    seconds: int
    quick: bool
    load: str
    profile: Path | None
    cache_ttl: float | None = None  # tokens.cache_ttl_seconds of both gateways (None: default)
    together: bool = False  # each scale run at the same time as a run of ``one``


@dataclass
class Setup:
    name: str
    gw: Gateway
    tokens: list[str]
    startup_seconds: float
    create_seconds: float = 0.0
    rss_started_mb: float = 0.0
    rss_tokens_mb: float = 0.0


def keys_file(path: Path, count: int) -> list[str]:
    """``count`` subteam keys in a JSON keys file; their names."""
    keys = {f"team-{i:04d}": f"bench-subteam-{i:04d}-9c8b7a6f5e4d3c2b1a09" for i in range(count)}
    path.write_text(json.dumps(keys), encoding="utf-8")
    return list(keys)


def rss_mb(pid: int) -> float:
    return round((servers.read_status_kb(pid, "VmRSS") or 0) / 1024, 1)


async def start(
    procs: Processes,
    upstream: str,
    cpu: int | None,
    name: str,
    keys: int,
    cache_ttl: float | None = None,
) -> Setup:
    """A gateway (with ``keys`` keys from a keys file when above 0), timed to ready."""
    raw = servers.gateway_config(
        upstream,
        f"sqlite:///{procs.tmp / name}.db",
        HUGE_LIMITS,
        max_wait=10,
        connections=10_000,
    )
    if cache_ttl is not None:
        raw["tokens"] = {"cache_ttl_seconds": cache_ttl}
    if keys:
        path = procs.tmp / f"{name}-keys.json"
        keys_file(path, keys)
        raw["upstream"]["keys_file"] = {"file": str(path)}
    started = time.monotonic()
    gw = servers.launch_gateway(procs, name, raw, cpu)
    deadline = started + READY_SECONDS
    async with aiohttp.ClientSession() as session:
        while True:
            gw.check_alive()
            try:
                async with session.get(gw.admin_url + "/readyz") as resp:
                    if resp.status == 200:
                        break
            except (aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready within {READY_SECONDS}s:\n{gw.tail()}")
            await asyncio.sleep(0.02)
    return Setup(name, gw, [], round(time.monotonic() - started, 3), rss_started_mb=rss_mb(gw.pid))


async def make_tokens(setup: Setup, count: int, keys: int, spread: int = 0) -> None:
    """``count`` tokens through the admin API, ``CREATE_AT_ONCE`` at a time, bounded by
    ``CREATE_SECONDS``: the first ``spread`` bound to the first key, the others round robin
    to the keys."""
    gw = setup.gw
    auth = {"Authorization": f"Bearer {gw.admin_token}"}
    tokens: list[str] = [""] * count
    at_once = asyncio.Semaphore(CREATE_AT_ONCE)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body: dict[str, Any] = {"name": f"svc-{i:05d}", "scopes": ["contacts:read"]}
        if keys:  # the first spread on one key, the next spread and the rest round robin
            body["upstream_key"] = f"team-{0 if i < spread else i % keys:04d}"
        async with at_once, session.post(gw.admin_url + "/admin/tokens", json=body) as resp:
            answer = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"token {i} on {gw.name}: {resp.status} {answer}")
            tokens[i] = answer["token"]

    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=auth, timeout=timeout) as session:
        work = asyncio.gather(*(one(session, i) for i in range(count)))
        try:
            await asyncio.wait_for(work, timeout=CREATE_SECONDS)
        except TimeoutError:
            made = sum(1 for t in tokens if t)
            raise RuntimeError(
                f"{gw.name}: {made} of {count} tokens made in {CREATE_SECONDS:.0f} s"
            ) from None
    setup.create_seconds = round(time.monotonic() - started, 2)
    setup.tokens = tokens
    setup.rss_tokens_mb = rss_mb(gw.pid)


def rotating_script(path: Path, tokens: list[str]) -> Path:
    """A wrk script sending each request with the next of ``tokens`` (requests made once,
    in ``init``: the per-request Lua is a table lookup), and the bench's ``done`` hook."""
    quoted = ",\n".join(f'  "{t}"' for t in tokens)
    path.write_text(
        f"""local tokens = {{
{quoted}
}}
local requests = {{}}
local i = 0
init = function(args)
  for n, t in ipairs(tokens) do
    requests[n] = wrk.format(nil, nil, {{["Authorization"] = "Bearer " .. t}})
  end
end
request = function()
  i = i % #requests + 1
  return requests[i]
end
{loadgen.WRK_DONE}""",
        encoding="utf-8",
    )
    return path


class Run:
    def __init__(self, opts: Options, tmp: Path) -> None:
        self.opts = opts
        self.tmp = tmp
        self.procs = Processes(tmp)
        self.server_cpu, self.load_cpu = choose_cpus()
        self.wrk = loadgen.wrk_path() if opts.load in ("auto", "wrk") else None
        self.nginx = servers.nginx_path()

    async def measure(self, gw: Gateway, tokens: list[str], tag: str) -> dict[str, Any]:
        url, seconds = gw.url + PATH, self.opts.seconds
        before = servers.cpu_seconds(gw.pid)
        with RssSampler(gw.pid) as rss:
            if self.wrk:
                script = rotating_script(self.tmp / f"{tag}.lua", tokens)
                res = await loadgen.run_wrk(
                    self.wrk, url, {}, CONNECTIONS, seconds, self.load_cpu, self.tmp, script
                )
            else:
                rotate = [{"Authorization": f"Bearer {t}"} for t in tokens]
                res = await loadgen.run_python(url, {}, CONNECTIONS, seconds, rotate)
        after = servers.cpu_seconds(gw.pid)
        if before is not None and after is not None and res["requests"]:
            res["cpu_us"] = round((after - before) * 1e6 / res["requests"], 1)
        res["rss_peak_mb"] = round(rss.peak_kb / 1024, 1)
        res["as_expected"] = expected(res, 200)
        return res

    async def scrape_cost(self, gw: Gateway) -> dict[str, Any]:
        """``/metrics`` and ``/status.json``, ``SCRAPES`` times each: median ms, bytes, the
        gateway's CPU ms per fetch, and the metric series."""
        out: dict[str, Any] = {}
        async with aiohttp.ClientSession() as session:
            for path in ("/metrics", "/status.json"):
                times, body = [], b""
                cpu = servers.cpu_seconds(gw.pid) or 0.0
                for _ in range(SCRAPES):
                    started = time.perf_counter()
                    async with session.get(gw.admin_url + path) as resp:
                        body = await resp.read()
                        assert resp.status == 200, (path, resp.status)
                    times.append((time.perf_counter() - started) * 1000)
                spent = (servers.cpu_seconds(gw.pid) or 0.0) - cpu
                entry = {
                    "median_ms": round(statistics.median(times), 2),
                    "cpu_ms": round(spent * 1000 / SCRAPES, 2),
                    "bytes": len(body),
                }
                if path == "/metrics":
                    lines = body.decode().splitlines()
                    entry["series"] = sum(1 for x in lines if x and not x.startswith("#"))
                    entry["token_values"] = len(_token_values(lines))
                out[path] = entry
        return out

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        try:
            if self.load_cpu is not None:
                os.sched_setaffinity(0, {self.load_cpu})
            upstream = await self._upstream()
            cpu, ttl = self.server_cpu, opts.cache_ttl
            one = await start(self.procs, upstream, cpu, "one", 0, ttl)
            await make_tokens(one, 1, 0)
            scale = await start(self.procs, upstream, cpu, "scale", opts.keys, ttl)
            log(f"scale gateway ready in {scale.startup_seconds} s; making {opts.tokens} tokens")
            await make_tokens(scale, opts.tokens, opts.keys, opts.spread)
            log(f"{opts.tokens} tokens in {scale.create_seconds} s")
            rounds = await self._rounds(one, scale)
            result = summarise(opts, one, scale, rounds, CONNECTIONS)
            result["meta"]["load_generator"] = (
                loadgen.wrk_version(self.wrk) if self.wrk else "python asyncio"
            )
            result["meta"]["upstream"] = (
                f"nginx {servers.nginx_version(self.nginx)} return 200"
                if self.nginx
                else "python (tests/bench/upstream.py)"
            )
            result["scrapes"] = {
                "one": await self.scrape_cost(one.gw),
                "scale": await self.scrape_cost(scale.gw),
            }
            result["rss_after_load_mb"] = {"one": rss_mb(one.gw.pid), "scale": rss_mb(scale.gw.pid)}
            if opts.profile is not None:
                result["profile"] = await self._profile(scale)
            return result
        finally:
            self.procs.close()

    async def _upstream(self) -> str:
        if self.nginx:
            up = servers.start_nginx_upstream(self.procs, self.nginx, self.load_cpu)
        else:
            up = servers.start_python_upstream(self.procs, self.load_cpu)
        async with aiohttp.ClientSession() as session:
            await servers.wait_ready(session, up)
        return up.url

    async def _rounds(self, one: Setup, scale: Setup) -> dict[str, list[dict[str, Any]]]:
        n = self.opts.spread
        one_key, many_keys = scale.tokens[:n], self.spread_tokens(scale)
        plan = [("one", one.gw, one.tokens), ("scale-1", scale.gw, one_key[:1])]
        plan += [("scale-1key", scale.gw, one_key), ("scale", scale.gw, many_keys)]
        for name, gw, tokens in plan:  # warm: every token of the spread looked up once
            await self.measure(gw, tokens, f"warm-{name}")
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in plan}
        for r in range(self.opts.rounds):
            for name, gw, tokens in plan:
                if self.opts.together and name == "one":
                    continue  # measured beside each of the others
                if self.opts.together:
                    base, res = await asyncio.gather(
                        self.measure(one.gw, one.tokens, f"one-{name}"),
                        self.measure(gw, tokens, name),
                    )
                    res["one_cpu_us"] = base.get("cpu_us")
                    rounds["one"].append(base)
                else:
                    res = await self.measure(gw, tokens, name)
                rounds[name].append(res)
                log(
                    f"round {r + 1}/{self.opts.rounds} {name:<8} {res['rps']:>8.1f} req/s"
                    f"  {res.get('cpu_us')} us CPU/answer  RSS {res['rss_peak_mb']} MB"
                    + ("" if res["as_expected"] else "  UNEXPECTED STATUS OR ERRORS")
                )
        return rounds

    def spread_tokens(self, scale: Setup) -> list[str]:
        """The ``scale`` run's tokens: the spread bound round robin to the keys."""
        n = self.opts.spread
        return scale.tokens[n : 2 * n]

    async def _profile(self, scale: Setup) -> dict[str, Any]:
        """py-spy on the scale gateway during one more spread measurement."""
        assert self.opts.profile is not None
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            return {"error": "py-spy is not installed (pip install py-spy)"}
        self.opts.profile.mkdir(parents=True, exist_ok=True)
        raw = self.opts.profile / "scale.txt"
        cmd = [str(spy), "record", "--pid", str(scale.gw.pid), "--rate", "200", "--idle"]
        cmd += ["--duration", str(self.opts.seconds), "--format", "raw", "-o", str(raw)]
        proc = await asyncio.create_subprocess_exec(
            *loadgen.pinned(cmd, self.load_cpu),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,  # its progress: the JSON alone goes to stdout
        )
        await asyncio.sleep(0.5)
        res = await self.measure(scale.gw, self.spread_tokens(scale), "profile")
        await asyncio.wait_for(proc.wait(), timeout=60)
        found = hotspots(raw) if raw.exists() else {"error": "py-spy wrote nothing"}
        found["rps_while_profiled"] = res["rps"]
        return found


def _token_values(lines: list[str]) -> set[str]:
    values = set()
    for line in lines:
        at = line.find('token="')
        if at >= 0 and not line.startswith("#"):
            values.add(line[at + 7 : line.index('"', at + 7)])
    return values


def parse_args(argv: list[str] | None) -> tuple[Options, Path | None, Path | None]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true", help="20 keys, 200 tokens, 1 s rounds")
    p.add_argument("--keys", type=int, help="upstream keys in the keys file (default 500)")
    p.add_argument("--tokens", type=int, help="tokens made (default 10000)")
    p.add_argument("--spread", type=int, help="tokens the traffic is spread over (default 1000)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    p.add_argument("--seconds", type=int, help="seconds per measurement (default 5)")
    p.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--profile", type=Path, help="also run py-spy on the scale gateway; output dir")
    p.add_argument(
        "--cache-ttl", type=float, help="tokens.cache_ttl_seconds of both gateways (default 5)"
    )
    p.add_argument(
        "--together",
        action="store_true",
        help="measure each scale run at the same time as a run of one (same neighbours)",
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    quick = args.quick
    tokens = max(2, min(args.tokens or (200 if quick else 10_000), 20_000))
    opts = Options(
        keys=max(1, min(args.keys or (20 if quick else 500), 10_000)),
        tokens=tokens,
        spread=max(1, min(args.spread or (100 if quick else 1_000), tokens // 2)),
        rounds=max(1, min(args.rounds or (1 if quick else 3), 20)),
        seconds=max(1, min(args.seconds or (1 if quick else 5), 60)),
        quick=quick,
        load=args.load,
        profile=args.profile,
        cache_ttl=args.cache_ttl,
        together=args.together,
    )
    return opts, args.json, args.markdown


def main(argv: list[str] | None = None) -> int:
    opts, json_out, md_out = parse_args(argv)
    raise_nofile()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="egw-scale-") as tmp:
        os.chmod(tmp, 0o755)  # nginx workers drop root and still read their files here
        result = asyncio.run(Run(opts, Path(tmp)).run())
    result["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        json_out.write_text(text + "\n", encoding="utf-8")
    if md_out:
        md_out.write_text(markdown(result), encoding="utf-8")
    bad = [n for n, t in result["targets"].items() if not t["all_as_expected"]]
    if bad:
        log(f"unexpected statuses or errors in: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
