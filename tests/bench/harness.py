"""Performance benchmark: the full gateway against a bare aiohttp pass-through and nginx.

    python -m tests.bench.harness [--quick] [--rounds N] [--seconds S] [--queued N]
                                  [--json out.json] [--markdown out.md] [--profile DIR]
                                  [--only SCENARIO ...] [--loop asyncio --loop uvloop]
                                  [--baseline DIR] [--tracing]

One run starts an upstream (nginx ``return 200`` when nginx is installed, else
tests/bench/upstream.py), the gateway (``echowin-gateway serve``: auth, scope, budget with
huge limits, metrics, JSON access log), the bare pass-through (tests/bench/passthrough.py,
the floor) and nginx as a reverse proxy (when installed, the ceiling). The servers are
pinned to one CPU, the load generator and the upstream to another. Each scenario measures
its servers interleaved (gateway, pass-through, nginx, gateway, ...) for N rounds:

    admitted       50 connections, token with the route's scope, budget never binding: 200s
    latency        1 connection, same requests: the latency each server adds
    refusal        50 connections, budget spent (1/3600, max_wait 0): every answer a 429
    unauthorized   50 connections, an unknown (well-formed) token: every answer a 401
    cache_hit      50 connections, the admitted request on a gateway whose cache keeps the
                   route: every answer a copy, echowin never asked (docs/cache.md)
    cache_missing  the admitted scenario on a gateway with ``cache:`` configured for other
                   routes: the cost of the cache's step when it holds nothing
    queued         N requests at once (default 10,000) against a budget that lets through a
                   tenth of them per second: peak RSS while they wait, every one answered
    workers        the admitted scenario against ``serve --workers 1`` and ``--workers 2``
                   (sqlite state), on every CPU: the 2/1 ratio (tests/bench/workers.py)

``--loop`` picks the event loop of the Python servers (default: the one the gateway picks by
itself); given twice, the servers of the second loop run beside the first, interleaved, as
``gateway+uvloop`` and ``passthrough+uvloop``. ``--baseline DIR`` adds ``gateway@base``, the
gateway from another source tree, to every scenario: a before/after in the same run.
``--tracing`` adds ``gateway+trace100`` and ``gateway+trace1`` to the admitted and latency
scenarios: the same gateway with OpenTelemetry tracing on (docs/observability.md), sampling
every request and one in a hundred, exporting to a local OTLP/HTTP sink
(tests/bench/otlp_sink.py) that counts what it receives (``meta.otlp_sink``).

The pass-through and nginx do no checks: in the refusal and unauthorized scenarios they
forward the same requests and answer 200, which is what the gateway's refusals are compared
with. Load comes from wrk when installed, else from a bounded asyncio generator.

Prints one JSON object on stdout (progress goes to stderr); ``--json``/``--markdown`` also
write it and a Markdown table. Targets are checked and reported, never asserted: the exit
status is 0 whatever the numbers, non-zero only when the harness itself failed (a server
that would not start, an unexpected status, a request left unanswered).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp

from proxy.server.loops import resolve
from tests.bench import loadgen, servers
from tests.bench import workers as bench_workers
from tests.bench.servers import HUGE_LIMITS, UNKNOWN_TOKEN, Gateway, Proc, Processes

PATH = "/api/v1/contacts"
SCOPE = "contacts:read"
SPENT_LIMITS = [(1, 3600.0)]
# The admitted path with classes of service (docs/budget.md): the bench token is in the
# default class, which another class's reservation holds back from a part of each window.
CLASSES: dict[str, Any] = {
    "classes": {
        "interactive": {
            "weight": 4,
            "reserve": [{"requests": n // 5, "per_seconds": t} for n, t in HUGE_LIMITS],
        },
        "batch": {},
    },
    "default_class": "batch",
}

SCENARIOS = (
    "admitted",
    "latency",
    "refusal",
    "unauthorized",
    "cache_hit",
    "cache_missing",
    "queued",
)
# --tracing: the traced gateways' sampling ratios, and the scenarios they run in.
TRACING_VARIANTS = {"trace100": 1.0, "trace1": 0.01}
TRACED_SCENARIOS = ("admitted", "latency")
DESCRIPTIONS = {
    "admitted": "admitted path, 50 connections: valid token, scope held, budget never binding",
    "latency": "added latency, 1 connection: the admitted request, one at a time",
    "refusal": "refusal path, 50 connections: budget spent (max_wait 0), every answer a 429",
    "unauthorized": "401 path, 50 connections: an unknown token, every answer a 401",
    "cache_hit": "cache-hit path, 50 connections: the route kept (cache:), every answer a copy",
    "cache_missing": "admitted path with cache: configured but the route not kept (shared"
    " in-flight GETs only)",
    "queued": "N requests at once, queued for budget: peak RSS, every one answered",
}
TARGET_ORDER = ("gateway", "passthrough", "nginx")
LOOPS = ("asyncio", "uvloop")
# (scenario, server) pairs --profile samples with py-spy.
PROFILED = (
    ("admitted", "gateway"),
    ("admitted", "passthrough"),
    ("refusal", "gateway"),
    ("unauthorized", "gateway"),
)

# The targets, as ratios to the bare pass-through in the same run.
ADMITTED_RATIO = 0.85
ADDED_P50_MS = 0.1
REFUSAL_RATIO = 1.5
CACHE_HIT_RATIO = 2.0
# The cache sections of the cache scenarios' gateways.
CACHE_HIT = {"routes": {PATH: 3600}}
CACHE_MISSING = {"routes": {"/api/v1/tags": 60}}
QUEUED_RSS_MB = 100.0


@dataclass(frozen=True)
class Options:
    rounds: int
    seconds: int
    warmup: int
    queued: int
    drain: tuple[int, float]  # (windows the queued burst takes to drain, window seconds)
    quick: bool
    load: str  # auto | wrk | python
    use_nginx: bool
    profile: Path | None
    profile_seconds: int
    run_queued: bool = True
    # Event loops the Python servers run on; the first is the main one ("gateway",
    # "passthrough"), each other one adds "gateway+LOOP" and "passthrough+LOOP".
    loops: tuple[str, ...] = ("asyncio",)
    scenarios: tuple[str, ...] = SCENARIOS[:-1]  # throughput scenarios to run
    # Another source tree of the gateway (say, the last commit): "gateway@base" beside it.
    baseline: Path | None = None
    run_workers: bool = True  # the workers scenario (tests/bench/workers.py)
    tracing: bool = False  # gateway+trace100 and gateway+trace1 beside gateway


@dataclass
class Stack:
    """The Python servers of one event loop: gateways (open, spent, queued) and floors."""

    loop: str
    suffix: str  # "" for the main loop, "+LOOP" for another, "@base" for --baseline
    gw: Gateway
    gw_spent: Gateway
    pt: Proc | None  # None for the baseline: the floor is the same
    gw_queue: Gateway | None = None
    pt_queue: Proc | None = None
    gw_cache: Gateway | None = None  # None: a baseline tree that knows no cache
    gw_cache_missing: Gateway | None = None
    gw_classes: Gateway | None = None  # the main stack only: the admitted path with classes
    cache_token: str = ""
    cache_missing_token: str = ""
    token: str = ""
    spent_token: str = ""
    queue_token: str = ""
    classes_token: str = ""
    # Traced gateways (--tracing) by variant name ("trace100"), and their tokens.
    traced: dict[str, Gateway] = field(default_factory=dict)
    traced_tokens: dict[str, str] = field(default_factory=dict)

    def gateways(self) -> list[Gateway]:
        extra = [g for g in (self.gw_queue, self.gw_classes) if g is not None]
        return [self.gw, self.gw_spent, *extra]

    def cache_gateways(self) -> list[Gateway]:
        return [g for g in (self.gw_cache, self.gw_cache_missing) if g is not None]


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: dict[str, str]
    expect: int
    pid: int | None = None  # the server process, for its CPU time (None: not read)


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU time of process ``pid`` so far, or None (no pid, unreadable)."""
    return None if pid is None else servers.cpu_seconds(pid)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def choose_cpus() -> tuple[int | None, int | None]:
    """(servers' CPU, load generator's CPU); (None, None) on a single-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[1], cpus[0]


def spread(values: list[float], digits: int = 4) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def expected(res: dict[str, Any], status: int) -> bool:
    """Every answer had the status the scenario expects, and no socket error happened."""
    if res["errors"] or res["requests"] == 0:
        return False
    if status < 400:
        return bool(res["status_4xx_5xx"] == 0 and res["non_2xx"] == 0)
    return bool(res["status_4xx_5xx"] == res["requests"])


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(10_000_000):
            kb = servers.read_status_kb(self.pid, "VmRSS")
            if kb is not None:
                self.peak_kb = max(self.peak_kb, kb)
                self.samples += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Bench:
    def __init__(self, opts: Options, tmp: Path) -> None:
        self.opts = opts
        self.tmp = tmp
        self.procs = Processes(tmp)
        self.server_cpu, self.load_cpu = choose_cpus()
        self.wrk = loadgen.wrk_path() if opts.load in ("auto", "wrk") else None
        if opts.load == "wrk" and self.wrk is None:
            raise RuntimeError("--load wrk: wrk is not installed")
        self.nginx = servers.nginx_path() if opts.use_nginx else None
        self.session: aiohttp.ClientSession
        self.meta: dict[str, Any] = {}

    # --- set-up ------------------------------------------------------------------------------

    async def start(self) -> None:
        opts, cpu = self.opts, self.server_cpu
        if self.load_cpu is not None:
            os.sched_setaffinity(0, {self.load_cpu})
        if self.nginx:
            self.upstream = servers.start_nginx_upstream(self.procs, self.nginx, self.load_cpu)
        else:
            self.upstream = servers.start_python_upstream(self.procs, self.load_cpu)
        await servers.wait_ready(self.session, self.upstream)
        self.sink: Proc | None = None
        if opts.tracing:
            self.sink = servers.start_otlp_sink(self.procs, self.load_cpu)
            await servers.wait_ready(self.session, self.sink, "/count")
        self.stacks = [self._start_stack(loop, i > 0) for i, loop in enumerate(opts.loops)]
        if opts.baseline is not None:
            self.stacks.append(self._start_stack(opts.loops[0], True, opts.baseline))
        main = self.stacks[0]
        assert main.pt is not None
        self.gw, self.gw_spent, self.pt = main.gw, main.gw_spent, main.pt
        waiting: list[Proc] = [p for st in self.stacks for p in (st.pt, st.pt_queue) if p]
        self.ngx: Proc | None = None
        if self.nginx:
            self.ngx = servers.start_nginx_proxy(self.procs, self.nginx, self.upstream.url, cpu)
            waiting.append(self.ngx)
        await asyncio.gather(*(servers.wait_ready(self.session, p) for p in waiting))
        for stack in self.stacks:
            tokens = dict(
                zip(
                    map(id, stack.gateways()),
                    await asyncio.gather(
                        *(servers.create_token(self.session, g, SCOPE) for g in stack.gateways())
                    ),
                    strict=True,
                )
            )
            stack.token, stack.spent_token = tokens[id(stack.gw)], tokens[id(stack.gw_spent)]
            stack.queue_token = tokens.get(id(stack.gw_queue), "")
            stack.classes_token = tokens.get(id(stack.gw_classes), "")
            for variant, gw in stack.traced.items():
                stack.traced_tokens[variant] = await servers.create_token(self.session, gw, SCOPE)
            if stack.gw_cache is not None and stack.gw_cache_missing is not None:
                stack.cache_token, stack.cache_missing_token = await asyncio.gather(
                    *(servers.create_token(self.session, g, SCOPE) for g in stack.cache_gateways())
                )
            # Spend the refusal gateway's whole budget (1 request per hour) once.
            auth = self._auth(stack.spent_token)
            status = await self._probe(stack.gw_spent.url + PATH, auth)
            if status != 200:
                raise RuntimeError(f"spending gateway-spent's budget: got {status}, want 200")
        self.token, self.spent_token = main.token, main.spent_token
        self.meta = self._describe()

    def _start_stack(self, loop: str, extra: bool, source: Path | None = None) -> Stack:
        """The servers on ``loop``; from the gateway tree ``source``, the gateways only
        (with that tree's default loop: it may not know ``server.event_loop``)."""
        opts, cpu, up = self.opts, self.server_cpu, self.upstream.url
        sfx = "@base" if source else f"+{loop}" if extra else ""
        gateway = functools.partial(
            servers.start_gateway, self.procs, up, cpu, event_loop=None if source else loop
        )
        if source is not None:
            gateway = functools.partial(gateway, source=source)
        stack = Stack(
            loop,
            sfx,
            gw=gateway(f"gateway{sfx}", limits=HUGE_LIMITS, max_wait=10),
            gw_spent=gateway(f"gateway-spent{sfx}", limits=SPENT_LIMITS, max_wait=0),
            pt=None
            if source
            else servers.start_passthrough(self.procs, up, cpu, f"passthrough{sfx}", loop),
        )
        wanted = set(opts.scenarios)
        if self.sink is not None and not extra and wanted & set(TRACED_SCENARIOS):
            for variant, ratio in TRACING_VARIANTS.items():
                traced = {"endpoint": self.sink.url + "/v1/traces", "sampling_ratio": ratio}
                stack.traced[variant] = gateway(
                    f"gateway+{variant}", limits=HUGE_LIMITS, max_wait=10, tracing=traced
                )
        if wanted & {"cache_hit", "cache_missing"} and (
            source is None or servers.knows(source, "CacheConfig")
        ):
            stack.gw_cache = gateway(
                f"gateway-cache{sfx}", limits=HUGE_LIMITS, max_wait=10, cache=CACHE_HIT
            )
            stack.gw_cache_missing = gateway(
                f"gateway-cache-missing{sfx}", limits=HUGE_LIMITS, max_wait=10, cache=CACHE_MISSING
            )
        if not extra and source is None:
            stack.gw_classes = gateway(
                "gateway+classes", limits=HUGE_LIMITS, max_wait=10, classes=CLASSES
            )
        if opts.run_queued:
            windows, per = opts.drain
            stack.gw_queue = gateway(
                f"gateway-queued{sfx}",
                limits=[(max(1, opts.queued // windows), per)],
                max_wait=120,
                max_depth=opts.queued + 100,
            )
            name = f"passthrough-queued{sfx}"
            if source is None:
                stack.pt_queue = servers.start_passthrough(self.procs, up, cpu, name, loop)
        return stack

    def _describe(self) -> dict[str, Any]:
        return {
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "quick": self.opts.quick,
            "rounds": self.opts.rounds,
            "seconds_per_measurement": self.opts.seconds,
            "warmup_seconds": self.opts.warmup,
            "load_generator": loadgen.wrk_version(self.wrk) if self.wrk else "python asyncio",
            "upstream": f"nginx {servers.nginx_version(self.nginx)} return 200"
            if self.nginx
            else "aiohttp (tests/bench/upstream.py)",
            "reference": f"nginx {servers.nginx_version(self.nginx)} proxy_pass"
            if self.nginx
            else None,
            "cpus": {
                "online": os.cpu_count(),
                "servers": self.server_cpu,
                "load_generator_and_upstream": self.load_cpu,
                "pinned_by": (shutil.which("taskset") and "taskset") or "sched_setaffinity",
            },
            "python": platform.python_version(),
            "aiohttp": metadata.version("aiohttp"),
            "event_loops": {loop: _loop_version(loop) for loop in self.opts.loops},
            "kernel": platform.release(),
            "nofile": list(raise_nofile()),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        }

    @staticmethod
    def _auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def _probe(self, url: str, headers: dict[str, str]) -> int:
        async with self.session.get(url, headers=headers) as resp:
            await resp.read()
            return resp.status

    def targets(self, scenario: str) -> list[Target]:
        want = {"refusal": 429, "unauthorized": 401}.get(scenario, 200)
        out: list[Target] = []
        for stack in self.stacks:
            token = {
                "admitted": stack.token,
                "latency": stack.token,
                "refusal": stack.spent_token,
                "unauthorized": UNKNOWN_TOKEN,
                "cache_hit": stack.cache_token,
                "cache_missing": stack.cache_missing_token,
            }[scenario]
            gw: Gateway | None = {
                "refusal": stack.gw_spent,
                "cache_hit": stack.gw_cache,
                "cache_missing": stack.gw_cache_missing,
            }.get(scenario, stack.gw)
            if gw is None:  # a baseline tree without the cache: the pass-through only
                if scenario == "cache_missing":  # its plain gateway is the path compared
                    gw, token = stack.gw, stack.token
                else:
                    continue
            name, auth = f"gateway{stack.suffix}", self._auth(token)
            out.append(Target(name, gw.url + PATH, auth, want, gw.pid))
            classed = stack.gw_classes
            if classed is not None and scenario in ("admitted", "latency"):
                auth = self._auth(stack.classes_token)
                out.append(Target("gateway+classes", classed.url + PATH, auth, 200, classed.pid))
            if stack.pt is not None:
                pt = stack.pt.url + PATH
                name = f"passthrough{stack.suffix}"
                out.append(Target(name, pt, self._auth(token), 200, stack.pt.pid))
            if scenario in TRACED_SCENARIOS:
                for variant, traced in stack.traced.items():
                    auth = self._auth(stack.traced_tokens[variant])
                    target = Target(f"gateway+{variant}", traced.url + PATH, auth, 200, traced.pid)
                    out.append(target)
        if self.ngx is not None:
            token = self.token if scenario != "unauthorized" else UNKNOWN_TOKEN
            out.append(Target("nginx", self.ngx.url + PATH, self._auth(token), 200))
        return out

    # --- measuring ---------------------------------------------------------------------------

    async def measure(self, target: Target, connections: int, seconds: int) -> dict[str, Any]:
        cpu_before = cpu_seconds(target.pid)
        if self.wrk:
            res = await loadgen.run_wrk(
                self.wrk, target.url, target.headers, connections, seconds, self.load_cpu, self.tmp
            )
        else:
            res = await loadgen.run_python(target.url, target.headers, connections, seconds)
        cpu_after = cpu_seconds(target.pid)
        if cpu_before is not None and cpu_after is not None and res["requests"]:
            # The server's own CPU time per answer: unlike req/s, it hardly moves when a
            # neighbour on a shared machine takes CPU time away.
            res["cpu_us"] = round((cpu_after - cpu_before) * 1e6 / res["requests"], 1)
        return res

    async def throughput_scenario(self, scenario: str) -> dict[str, Any]:
        connections = 1 if scenario == "latency" else 50
        targets = self.targets(scenario)
        probes = {}
        for t in targets:
            probes[t.name] = status = await self._probe(t.url, t.headers)
            if status != t.expect:
                raise RuntimeError(f"{scenario}/{t.name}: probe got {status}, want {t.expect}")
        if self.opts.warmup:
            for t in targets:
                await self.measure(t, connections, self.opts.warmup)
        rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for r in range(self.opts.rounds):
            for t in targets:
                res = await self.measure(t, connections, self.opts.seconds)
                res["expected_status"] = t.expect
                res["as_expected"] = expected(res, t.expect)
                rounds[t.name].append(res)
                log(
                    f"{scenario} round {r + 1}/{self.opts.rounds} {t.name:<11} "
                    f"{res['rps']:>9.1f} req/s  p50 {res['p50_ms']:.3f} ms  "
                    f"p99 {res['p99_ms']:.3f} ms"
                    + ("" if res["as_expected"] else "  UNEXPECTED STATUS OR ERRORS")
                )
        return summarise(scenario, connections, rounds, probes)

    async def queued_scenario(self) -> dict[str, Any]:
        n = self.opts.queued
        out: dict[str, Any] = {
            "description": DESCRIPTIONS["queued"].replace("N ", f"{n:,} "),
            "requests": n,
            "budget": {
                "requests": max(1, n // self.opts.drain[0]),
                "per_seconds": self.opts.drain[1],
            },
            "targets": {},
        }
        cases: list[tuple[str, Proc, dict[str, str]]] = []
        for stack in self.stacks:
            assert stack.gw_queue is not None
            auth = self._auth(stack.queue_token)
            cases.append((f"gateway{stack.suffix}", stack.gw_queue, auth))
            if stack.pt_queue is not None:
                cases.append((f"passthrough{stack.suffix}", stack.pt_queue, auth))
        for name, proc, headers in cases:
            baseline = servers.read_status_kb(proc.pid, "VmRSS") or 0
            spy = None
            if self.opts.profile is not None and name.startswith("gateway"):
                spy = await self._spy_start(proc.pid, f"{name}-queued", 240)
            with RssSampler(proc.pid) as sampler:
                res = await loadgen.burst(proc.url + PATH, headers, n, timeout=180.0)
            if spy is not None:
                found = await self._spy_finish(spy, stop=True)
                found["server"] = name
                key = "queued" if name == "gateway" else f"queued-{name}"
                out.setdefault("profiles", {})[key] = found
            proc.check_alive()
            hwm = servers.read_status_kb(proc.pid, "VmHWM") or 0
            peak = max(sampler.peak_kb, hwm)
            res["rss_baseline_mb"] = round(baseline / 1024, 1)
            res["rss_peak_mb"] = round(peak / 1024, 1)
            res["rss_samples"] = sampler.samples
            res["all_answered"] = res["answered"] == n and res["errors"] == 0
            out["targets"][name] = res
            log(
                f"queued {name:<11} answered {res['answered']}/{n} "
                f"{res['statuses']} errors {res['errors']} in {res['seconds']} s, "
                f"RSS {res['rss_baseline_mb']} -> {res['rss_peak_mb']} MB, "
                f"{res['queued']} queued (max {res['max_queue_ms']} ms)"
            )
            self.procs.stop(proc)  # free its sockets and memory before the next one
        gw, pt = out["targets"]["gateway"], out["targets"]["passthrough"]
        out["rss_ratio"] = (
            round(gw["rss_peak_mb"] / pt["rss_peak_mb"], 3) if pt["rss_peak_mb"] else None
        )
        return out

    def _py_spy(self) -> str | None:
        spy = Path(sys.executable).parent / "py-spy"
        return str(spy) if spy.exists() else shutil.which("py-spy")

    async def _spy_start(self, pid: int, name: str, seconds: int) -> tuple[Any, Path] | None:
        """Start ``py-spy record`` on ``pid`` for ``seconds``: every sample, idle included; the
        process is paused for each sample (py-spy's default), which keeps samples taken
        in C code and syscalls (``--nonblocking`` loses many of those and skews the shares)."""
        spy = self._py_spy()
        if spy is None or self.opts.profile is None:
            return None
        self.opts.profile.mkdir(parents=True, exist_ok=True)
        raw = self.opts.profile / f"{name}.txt"
        cmd = [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200"]
        cmd += ["--idle", "--format", "raw", "-o", str(raw)]
        proc = await asyncio.create_subprocess_exec(
            *loadgen.pinned(cmd, self.load_cpu),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(0.5)  # attached before the load starts
        return proc, raw

    async def _spy_finish(self, started: tuple[Any, Path] | None, stop: bool) -> dict[str, Any]:
        if started is None:
            return {"error": "py-spy is not installed (pip install py-spy)"}
        proc, raw = started
        if stop and proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return {"error": "py-spy did not finish"}
        if not raw.exists():
            return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
        found = hotspots(raw)
        found["collapsed_stacks"] = str(raw)
        return found

    async def profile(self) -> dict[str, Any]:
        """py-spy during extra (unmeasured) runs of the 50-connection scenarios: the gateway
        in each, and the pass-through in the admitted one (to see where the difference is)."""
        out: dict[str, Any] = {}
        seconds = self.opts.profile_seconds
        for scenario, server in PROFILED:
            if scenario not in self.opts.scenarios:  # not run (--only)
                continue
            key = scenario if server == "gateway" else f"{scenario}-{server}"
            target = next(t for t in self.targets(scenario) if t.name == server)
            proc = {"gateway": self.gw_spent if scenario == "refusal" else self.gw}.get(
                server, self.pt
            )
            spy = await self._spy_start(proc.pid, f"{server}-{scenario}", seconds)
            load = await self.measure(target, 50, seconds)
            found = out[key] = await self._spy_finish(spy, stop=False)
            found["server"] = server
            found["rps_while_profiled"] = load["rps"]
            per_request(found)
            log(f"profiled {key}: {found.get('samples', 0)} samples")
        return out

    async def run(self) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as self.session:
            try:
                await self.start()
                result: dict[str, Any] = {"meta": self.meta, "scenarios": {}}
                for scenario in self.opts.scenarios:
                    log(f"scenario {scenario}")
                    result["scenarios"][scenario] = await self.throughput_scenario(scenario)
                if self.opts.profile is not None:
                    log(f"profiling the gateway, {self.opts.profile_seconds} s per scenario")
                    result["profile"] = await self.profile()
                if self.opts.run_queued:
                    log(f"scenario queued ({self.opts.queued} requests)")
                    result["scenarios"]["queued"] = queued = await self.queued_scenario()
                    for key, found in queued.pop("profiles", {}).items():
                        result.setdefault("profile", {})[key] = found
                if self.opts.run_workers:
                    log("scenario workers (serve --workers 1 and 2)")
                    result["scenarios"]["workers"] = await self.workers_scenario()
                if self.sink is not None:
                    result["meta"]["otlp_sink"] = await self._sink_counts()
                for stack in self.stacks:
                    stack.gw.check_alive()
                    stack.gw_spent.check_alive()
                    for gw in stack.cache_gateways():
                        gw.check_alive()
            finally:
                self.procs.close()
        result["meta"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        gateways = [f"gateway{stack.suffix}" for stack in self.stacks]
        result["targets"] = check_targets(result["scenarios"], gateways)
        if "workers" in result["scenarios"]:
            result["targets"].append(bench_workers.target_row(result["scenarios"]["workers"]))
        return result

    async def _sink_counts(self) -> dict[str, Any]:
        """What the traced gateways exported, once they have flushed (SIGTERM exports what
        waits): spans and exports received by the sink."""
        for stack in self.stacks:
            for gw in stack.traced.values():
                self.procs.stop(gw)
        assert self.sink is not None
        async with self.session.get(self.sink.url + "/count") as resp:
            counts: dict[str, Any] = await resp.json()
        counts["sampling_ratios"] = dict(TRACING_VARIANTS)
        return counts

    async def workers_scenario(self) -> dict[str, Any]:
        return await bench_workers.run_scenario(
            self.procs,
            self.session,
            self.upstream.url,
            tmp=self.tmp,
            wrk=self.wrk,
            load_cpu=self.load_cpu,
            rounds=self.opts.rounds,
            seconds=self.opts.seconds,
            warmup=self.opts.warmup,
            loop=self.opts.loops[0],
            log=log,
        )


# --- summarising -----------------------------------------------------------------------------


def summarise(
    scenario: str,
    connections: int,
    rounds: dict[str, list[dict[str, Any]]],
    probes: dict[str, int],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": DESCRIPTIONS[scenario],
        "connections": connections,
        "probes": probes,
        "targets": {},
    }
    for name, runs in rounds.items():
        # A server on another loop ("gateway+uvloop") is compared with the floor on that loop.
        loop = name.partition("+")[2]
        floor = rounds.get(f"passthrough+{loop}", rounds["passthrough"])
        entry: dict[str, Any] = {
            "rps": spread([r["rps"] for r in runs], 1),
            "p50_ms": spread([r["p50_ms"] for r in runs]),
            "p90_ms": spread([r["p90_ms"] for r in runs]),
            "p99_ms": spread([r["p99_ms"] for r in runs]),
            "all_as_expected": all(r["as_expected"] for r in runs),
            "rounds": runs,
        }
        paired_ratio = [r["rps"] / f["rps"] for r, f in zip(runs, floor, strict=True) if f["rps"]]
        paired_added = [r["p50_ms"] - f["p50_ms"] for r, f in zip(runs, floor, strict=True)]
        floor_rps = statistics.median(f["rps"] for f in floor)
        entry["rps_ratio"] = round(entry["rps"]["median"] / floor_rps, 3) if floor_rps else None
        entry["rps_ratio_paired"] = spread(paired_ratio, 3)
        cpu = [r["cpu_us"] for r in runs if "cpu_us" in r]
        floor_cpu = [f["cpu_us"] for f in floor if "cpu_us" in f]
        if cpu and floor_cpu:
            entry["cpu_us"] = spread(cpu, 1)
            # The floor's CPU per answer over this server's: the req/s ratio a CPU-bound
            # server would reach on a quiet machine.
            entry["cpu_ratio"] = round(statistics.median(floor_cpu) / statistics.median(cpu), 3)
        entry["p50_added_ms"] = spread(paired_added)
        base = rounds.get(_variant_of(name))
        if base is not None:  # the same server on the main loop, or from --baseline
            entry["vs_main"] = {
                "rps_ratio_paired": spread(
                    [r["rps"] / b["rps"] for r, b in zip(runs, base, strict=True) if b["rps"]], 3
                ),
                "p50_diff_ms": spread(
                    [r["p50_ms"] - b["p50_ms"] for r, b in zip(runs, base, strict=True)]
                ),
            }
        out["targets"][name] = entry
    return out


def check_targets(
    scenarios: dict[str, Any], gateways: list[str] | None = None
) -> list[dict[str, Any]]:
    """The issue's targets for each gateway (the main one, then one per extra loop), for
    the scenarios that ran."""
    found: list[dict[str, Any]] = []
    for gw in gateways or ["gateway"]:
        found += _gateway_targets(scenarios, gw, "" if gw == "gateway" else f" ({gw})")
    return found


def _at_least(name: str, ratio: float | None, floor: float) -> dict[str, Any]:
    """A target row: a req/s ratio that must reach ``floor``."""
    return {
        "name": name,
        "want": f">= {floor} x",
        "value": ratio,
        "met": ratio is not None and ratio >= floor,
    }


def _gateway_targets(scenarios: dict[str, Any], gw: str, tag: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if "admitted" in scenarios:
        ratio = scenarios["admitted"]["targets"][gw]["rps_ratio"]
        found.append(_at_least(f"admitted req/s vs pass-through{tag}", ratio, ADMITTED_RATIO))
    if "latency" in scenarios:
        added = scenarios["latency"]["targets"][gw]["p50_added_ms"]["median"]
        found.append(
            {
                "name": f"added p50 latency at 1 connection{tag}",
                "want": f"<= {ADDED_P50_MS} ms",
                "value": added,
                "met": added is not None and added <= ADDED_P50_MS,
            }
        )
    if "refusal" in scenarios:
        ratio = scenarios["refusal"]["targets"][gw]["rps_ratio"]
        found.append(_at_least(f"refusal (429) req/s vs pass-through{tag}", ratio, REFUSAL_RATIO))
    if "cache_hit" in scenarios and gw in scenarios["cache_hit"]["targets"]:
        ratio = scenarios["cache_hit"]["targets"][gw]["rps_ratio"]
        found.append(_at_least(f"cache hit req/s vs pass-through{tag}", ratio, CACHE_HIT_RATIO))
    if "queued" not in scenarios:  # --no-queued
        return found
    que = scenarios["queued"]["targets"][gw]
    n = scenarios["queued"]["requests"]
    return [
        *found,
        {
            "name": f"{n:,} queued requests: peak RSS{tag}",
            "want": f"< {QUEUED_RSS_MB:g} MB",
            "value": que["rss_peak_mb"],
            "met": que["rss_peak_mb"] < QUEUED_RSS_MB,
        },
        {
            "name": f"{n:,} queued requests: every one answered{tag}",
            "want": f"{n:,} answered, 0 errors",
            "value": que["answered"],
            "met": que["all_answered"],
        },
    ]


def _short_frame(frame: str) -> str:
    """``func (path:line)`` -> ``func (short/path)``: the line dropped, the path shortened."""
    func, _, where = frame.rpartition(" (")
    if not func:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", "/lib/python3/", str(servers.REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


def _package(short: str) -> str:
    path = short.rpartition(" (")[2].rstrip(")")
    head = path.split("/", 1)[0]
    if head == "proxy":
        return path
    return head.removesuffix(".py")


def hotspots(raw: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive shares of samples per function and per package, from py-spy's
    collapsed stacks (``frame;frame;... count`` per line). Only the main thread's: the
    event loop runs there, and another thread (the state file's worker thread, mostly
    idle) would make every share look half as large."""
    total = 0
    other_threads = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    package: Counter[str] = Counter()
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if frames[0].startswith("Thread._bootstrap (threading.py"):
            other_threads += n
            continue
        total += n
        own[frames[-1]] += n
        package[_package(frames[-1])] += n
        for frame in set(frames):
            inclusive[frame] += n

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": k, "samples": v, "share": round(v / total, 4)}
            for k, v in counter.most_common(top)
        ]

    by_package = [
        {"package": k, "samples": v, "share": round(v / total, 4)} for k, v in package.most_common()
    ]
    gateway = Counter({k: v for k, v in inclusive.items() if "(proxy/" in k})
    return {
        "samples": total,
        "other_threads_samples": other_threads,
        "self": share(own),
        "inclusive": share(inclusive),
        "inclusive_gateway": share(gateway),
        "by_package": by_package,
    }


def per_request(found: dict[str, Any]) -> None:
    """Add ``us_per_request`` (share x 1e6 / req/s) to each row: the server is CPU-bound under
    this load and idle samples are included, so a share of samples is a share of its time."""
    rps = found.get("rps_while_profiled")
    if not rps or "samples" not in found:
        return
    for key in ("self", "inclusive", "inclusive_gateway", "by_package"):
        for row in found[key]:
            row["us_per_request"] = round(row["share"] * 1e6 / rps, 1)


# --- Markdown --------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _range(s: dict[str, float | None], digits: int) -> str:
    return f"{_fmt(s['median'], digits)} [{_fmt(s['min'], digits)}, {_fmt(s['max'], digits)}]"


def render_markdown(result: dict[str, Any]) -> str:
    meta, sc = result["meta"], result["scenarios"]
    cpus = meta["cpus"]
    lines = [
        f"Run {meta['started']}: {meta['rounds']} rounds x {meta['seconds_per_measurement']} s "
        f"per server and scenario, interleaved; load {meta['load_generator']} on CPU "
        f"{cpus['load_generator_and_upstream']}, servers on CPU {cpus['servers']}; upstream "
        f"{meta['upstream']}; Python {meta['python']}, aiohttp {meta['aiohttp']}; event loop "
        f"{_loops_text(meta)}; load average "
        f"{meta['loadavg_before'][0]} before, {meta['loadavg_after'][0]} after.",
        "",
        "| Scenario | Server | req/s: median [min, max] | x pass-through | "
        "p50 ms: median [min, max] | p99 ms: median | p50 minus pass-through, ms | "
        "CPU µs per answer | pass-through's CPU / this |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in SCENARIOS[:-1]:
        entry = sc.get(scenario)
        if entry is None:  # not run (--only)
            continue
        names = [n for n in TARGET_ORDER if n in entry["targets"]]
        names += [n for n in entry["targets"] if n not in TARGET_ORDER]
        for name in names:
            t = entry["targets"][name]
            flag = "" if t["all_as_expected"] else " (UNEXPECTED STATUS)"
            lines.append(
                f"| {scenario} ({entry['connections']} conn.) | {name}{flag} | "
                f"{_range(t['rps'], 0)} | {_fmt(t['rps_ratio'], 2)} | {_range(t['p50_ms'], 3)} | "
                f"{_fmt(t['p99_ms']['median'], 3)} | {_fmt(t['p50_added_ms']['median'], 3)} | "
                f"{_fmt(t.get('cpu_us', {}).get('median'), 1)} | {_fmt(t.get('cpu_ratio'), 2)} |"
            )
    lines += _loops_markdown(sc)
    lines += _queued_markdown(sc["queued"]) if "queued" in sc else []
    if "workers" in sc:
        lines += bench_workers.markdown(sc["workers"], cpus["load_generator_and_upstream"])
    lines += ["", "| Target | Wanted | Measured | Met |", "| --- | --- | ---: | --- |"]
    for t in result["targets"]:
        lines.append(
            f"| {t['name']} | {t['want']} | {t['value']} | {'yes' if t['met'] else '**no**'} |"
        )
    profiles = result.get("profile") or {}
    if "admitted" in profiles and "admitted-passthrough" in profiles:
        lines += _difference_markdown(profiles["admitted"], profiles["admitted-passthrough"])
    for scenario, prof in profiles.items():
        lines += _profile_markdown(scenario, prof)
    return "\n".join(lines) + "\n"


def _variant_of(name: str) -> str:
    """``gateway+uvloop`` and ``gateway@base`` are variants of ``gateway``; else ``""``."""
    for mark in ("+", "@"):
        if mark in name:
            return name.partition(mark)[0]
    return ""


def _loops_text(meta: dict[str, Any]) -> str:
    loops = meta.get("event_loops") or {"asyncio": ""}
    main, *extra = (f"{loop} {version}".strip() for loop, version in loops.items())
    return main + "".join(f", and {text} for the +{text.split()[0]} servers" for text in extra)


def _loops_markdown(sc: dict[str, Any]) -> list[str]:
    """Each variant against its main server, round by round: a server on another event loop
    (its "x pass-through" above is against the pass-through on its own loop), or the
    gateway from --baseline."""
    rows = []
    for scenario in SCENARIOS[:-1]:
        for name, t in sc.get(scenario, {}).get("targets", {}).items():
            vs = t.get("vs_main")
            if vs is not None:
                rows.append(
                    f"| {scenario} | {name} vs {_variant_of(name)} | "
                    f"{_range(vs['rps_ratio_paired'], 3)} | {_range(vs['p50_diff_ms'], 3)} |"
                )
    if not rows:
        return []
    return [
        "",
        "Variants, paired by round (req/s of the variant over its main server's; its p50 "
        "minus the main server's):",
        "",
        "| Scenario | Servers | req/s ratio: median [min, max] | p50 difference ms: median "
        "[min, max] |",
        "| --- | --- | ---: | ---: |",
        *rows,
    ]


def _queued_markdown(q: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Queued: {q['requests']:,} requests at once, budget {q['budget']['requests']:,} per "
        f"{q['budget']['per_seconds']:g} s (the gateway queues the rest; the pass-through "
        "forwards through its 100-connection pool).",
        "",
        "| Server | answered | statuses | errors | queued (max wait) | seconds | "
        "RSS before -> peak, MB |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, t in q["targets"].items():
        statuses = ", ".join(f"{k}: {v:,}" for k, v in t["statuses"].items())
        lines.append(
            f"| {name} | {t['answered']:,} | {statuses} | {t['errors']} | "
            f"{t['queued']:,} ({t['max_queue_ms'] / 1000:.1f} s) | {t['seconds']:.1f} | "
            f"{t['rss_baseline_mb']:.1f} -> {t['rss_peak_mb']:.1f} |"
        )
    return lines


def _profile_markdown(scenario: str, prof: dict[str, Any]) -> list[str]:
    if "samples" not in prof:
        return ["", f"Profile of {scenario}: {prof.get('error', 'none')}"]
    rps = prof.get("rps_while_profiled")
    load = f", {rps:,.0f} req/s while sampled" if rps else ""
    server = prof.get("server", "gateway")
    lines = [
        "",
        f"Profile of the {server}, {scenario.split('-')[0]} (py-spy, {prof['samples']:,} "
        f"samples{load}):",
        "",
        "| Package (self time) | share | us/request | Function (self time) | share |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    packages, functions = prof["by_package"][:12], prof["self"][:12]
    for i in range(max(len(packages), len(functions))):
        pk = packages[i] if i < len(packages) else {}
        fn = functions[i] if i < len(functions) else {}
        lines.append(
            f"| {pk.get('package', '')} | {format(pk['share'], '.1%') if pk else ''} | "
            f"{pk.get('us_per_request', '')} | "
            f"{'`' + fn['function'] + '`' if fn else ''} | "
            f"{format(fn['share'], '.1%') if fn else ''} |"
        )
    own = prof["inclusive_gateway"][:12]
    if own:
        lines += [
            "",
            "Gateway functions, inclusive time: "
            + "; ".join(f"`{r['function'].split(' (')[0]}` {r['share']:.0%}" for r in own)
            + ".",
        ]
    return lines


def _difference_markdown(gw: dict[str, Any], pt: dict[str, Any]) -> list[str]:
    """Per package, microseconds per admitted request: gateway, pass-through, difference."""
    if "samples" not in gw or "samples" not in pt or not gw.get("rps_while_profiled"):
        return []
    mine = {r["package"]: r.get("us_per_request", 0.0) for r in gw["by_package"]}
    floor = {r["package"]: r.get("us_per_request", 0.0) for r in pt["by_package"]}
    rows = sorted(set(mine) | set(floor), key=lambda k: floor.get(k, 0.0) - mine.get(k, 0.0))
    total_gw = 1e6 / gw["rps_while_profiled"]
    total_pt = 1e6 / pt["rps_while_profiled"] if pt.get("rps_while_profiled") else 0.0
    lines = [
        "",
        "Admitted path, time per request by package (self time; us = share x 1e6 / req/s):",
        "",
        "| Package | gateway us | pass-through us | difference us |",
        "| --- | ---: | ---: | ---: |",
        f"| all | {total_gw:.1f} | {total_pt:.1f} | {total_gw - total_pt:+.1f} |",
    ]
    for name in rows[:15]:
        a, b = mine.get(name, 0.0), floor.get(name, 0.0)
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
    return lines


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[Options, Path | None, Path | None]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 1 s, 500 queued (~20 s)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per scenario (default 5)")
    p.add_argument("--seconds", type=int, help="seconds per measurement (default 3)")
    p.add_argument("--queued", type=int, help="requests fired at once (default 10000)")
    p.add_argument("--no-queued", action="store_true", help="skip the queued scenario")
    p.add_argument("--no-workers", action="store_true", help="skip the workers scenario")
    p.add_argument(
        "--only",
        action="append",
        choices=(*SCENARIOS, "workers"),
        help="run only this scenario (repeatable)",
    )
    p.add_argument(
        "--loop",
        action="append",
        choices=("auto", *LOOPS),
        help="event loop of the Python servers (default auto: the one the gateway picks by "
        "itself); twice (--loop asyncio --loop uvloop) measures both, interleaved",
    )
    p.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--no-nginx", action="store_true", help="ignore an installed nginx")
    p.add_argument(
        "--baseline",
        type=Path,
        help="also run the gateway from this source tree as gateway@base (say, the last "
        "commit: git archive HEAD | tar -x -C DIR)",
    )
    p.add_argument(
        "--tracing",
        action="store_true",
        help="also run the gateway with tracing on (gateway+trace100, gateway+trace1) in the "
        "admitted and latency scenarios, exporting to a local OTLP/HTTP sink",
    )
    p.add_argument("--profile", type=Path, help="also run py-spy on the gateway; output dir")
    p.add_argument("--profile-seconds", type=int, default=10)
    p.add_argument("--json", type=Path, help="also write the JSON here")
    p.add_argument("--markdown", type=Path, help="write the Markdown table here")
    args = p.parse_args(argv)
    quick = args.quick
    opts = Options(
        rounds=max(1, min(args.rounds or (1 if quick else 5), 50)),
        seconds=max(1, min(args.seconds or (1 if quick else 3), 60)),
        warmup=0 if quick else 1,
        queued=max(10, min(args.queued or (500 if quick else 10_000), 15_000)),
        drain=(4, 0.5) if quick else (10, 1.0),
        quick=quick,
        load=args.load,
        use_nginx=not args.no_nginx,
        profile=args.profile,
        profile_seconds=max(1, min(args.profile_seconds, 60)),
        run_queued=not args.no_queued and (not args.only or "queued" in args.only),
        loops=tuple(dict.fromkeys(resolve(loop) for loop in args.loop or ["auto"])),
        scenarios=tuple(s for s in SCENARIOS[:-1] if not args.only or s in args.only),
        baseline=args.baseline.resolve() if args.baseline else None,
        run_workers=not args.no_workers and (not args.only or "workers" in args.only),
        tracing=args.tracing,
    )
    return opts, args.json, args.markdown


def _loop_version(loop: str) -> str:
    return metadata.version(loop) if loop != "asyncio" else ""


def main(argv: list[str] | None = None) -> int:
    opts, json_out, md_out = parse_args(argv)
    raise_nofile()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="egw-bench-") as tmp:
        os.chmod(tmp, 0o755)  # nginx workers drop root and still read their files here
        result = asyncio.run(Bench(opts, Path(tmp)).run())
    result["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        json_out.write_text(text + "\n", encoding="utf-8")
    markdown = render_markdown(result)
    if md_out:
        md_out.write_text(markdown, encoding="utf-8")
    for t in result["targets"]:
        log(
            f"target {'MET    ' if t['met'] else 'NOT MET'} {t['name']}: {t['value']} ({t['want']})"
        )
    unexpected = [
        f"{s}/{n}"
        for s, entry in result["scenarios"].items()
        for n, t in entry["targets"].items()
        if not t.get("all_as_expected", t.get("all_answered", True))
    ]
    if unexpected:
        log(f"unexpected statuses or errors in: {', '.join(unexpected)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
