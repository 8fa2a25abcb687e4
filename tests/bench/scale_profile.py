"""Where the scale gateway's extra CPU per answer goes: py-spy on both gateways of a
``tests.bench.scale --together`` pair, function by function.

    python -m tests.bench.scale_profile [--keys 500] [--tokens 10000] [--spread 1000]
                                        [--seconds 8] [--rounds 2] [--top 30] [--json out.json]

The scale benchmark's setup (two gateways of this tree on one CPU, nginx and wrk on the
other). For each scale run (``scale-1``, ``scale-1key``, ``scale``), ``--rounds`` times,
the run and a run of ``one`` are measured at the same time, as ``--together`` does, with
py-spy recording each gateway (250 samples a second, none while it waits for the network).
A function's share of its gateway's samples, times the gateway's CPU per answer (/proc),
gives its CPU µs per answer; the output lists the functions whose cost grows most from
``one`` to the scale run beside it. A share of many samples estimates a share of the
time without bias, and both gateways are sampled alike: their difference is what the
scale run adds. Run by hand (docs/performance.md); never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from tests.bench import loadgen
from tests.bench.harness import _short_frame, log, raise_nofile
from tests.bench.scale import Options, Run, Setup, make_tokens, start

RATE = 250


def inclusive(raw: Path) -> tuple[int, Counter[str]]:
    """Main-thread samples, and each function's inclusive samples, from collapsed stacks."""
    total = 0
    found: Counter[str] = Counter()
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short_frame(f) for f in stack.split(";") if f]
        if not frames or frames[0].startswith("Thread._bootstrap (threading.py"):
            continue
        n = int(count)
        total += n
        for frame in set(frames):
            found[frame] += n
    return total, found


async def spy(pid: int, seconds: int, out: Path, cpu: int | None) -> asyncio.subprocess.Process:
    exe = Path(sys.executable).parent / "py-spy"
    cmd = [str(exe), "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking"]
    cmd += ["--duration", str(seconds), "--format", "raw", "-o", str(out)]
    return await asyncio.create_subprocess_exec(
        *loadgen.pinned(cmd, cpu),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


class ProfileRun(Run):
    async def pair(self, one: Setup, gw: Setup, tokens: list[str], name: str) -> dict[str, Any]:
        """One ``--together`` pair under py-spy: per gateway, answers, CPU and samples."""
        seconds = self.opts.seconds
        files = {tag: self.tmp / f"{name}-{tag}.txt" for tag in ("one", "scale")}
        spies = [
            await spy(s.gw.pid, seconds + 2, files[tag], self.load_cpu)
            for tag, s in (("one", one), ("scale", gw))
        ]
        await asyncio.sleep(0.5)
        base, res = await asyncio.gather(
            self.measure(one.gw, one.tokens, f"one-{name}"),
            self.measure(gw.gw, tokens, name),
        )
        for proc in spies:
            await asyncio.wait_for(proc.wait(), timeout=60)
        out = {}
        for tag, measured in (("one", base), ("scale", res)):
            total, found = inclusive(files[tag])
            out[tag] = {"requests": measured["requests"], "cpu_us": measured.get("cpu_us")}
            out[tag]["samples"], out[tag]["functions"] = total, found
        return out

    async def profile(self) -> dict[str, Any]:
        opts = self.opts
        try:
            if self.load_cpu is not None:
                os.sched_setaffinity(0, {self.load_cpu})
            upstream = await self._upstream()
            cpu = self.server_cpu
            one = await start(self.procs, upstream, cpu, "one", 0, opts.cache_ttl)
            await make_tokens(one, 1, 0)
            scale = await start(self.procs, upstream, cpu, "scale", opts.keys, opts.cache_ttl)
            await make_tokens(scale, opts.tokens, opts.keys, opts.spread)
            n = opts.spread
            runs = {
                "scale-1": scale.tokens[:1],
                "scale-1key": scale.tokens[:n],
                "scale": self.spread_tokens(scale),
            }
            for name, tokens in runs.items():  # warm, as the scale benchmark does
                await self.measure(scale.gw, tokens, f"warm-{name}")
            await self.measure(one.gw, one.tokens, "warm-one")
            sums: dict[str, dict[str, Any]] = {}
            for r in range(opts.rounds):
                for name, tokens in runs.items():
                    got = await self.pair(one, Setup("scale", scale.gw, tokens, 0.0), tokens, name)
                    log(f"round {r + 1} {name}: {summary_line(got)}")
                    add(sums.setdefault(name, {}), got)
            return {name: report(s, self.top) for name, s in sums.items()}
        finally:
            self.procs.close()

    top = 30


def summary_line(got: dict[str, Any]) -> str:
    return "  ".join(
        f"{tag} {g['requests']} answers {g['cpu_us']} us CPU {g['samples']} samples"
        for tag, g in got.items()
    )


def add(into: dict[str, Any], got: dict[str, Any]) -> None:
    for tag, g in got.items():
        acc = into.setdefault(tag, {"requests": 0, "samples": 0, "cpu_s": 0.0, "f": Counter()})
        acc["requests"] += g["requests"]
        acc["samples"] += g["samples"]
        acc["cpu_s"] += (g["cpu_us"] or 0.0) * g["requests"] / 1e6
        acc["f"].update(g["functions"])


def report(s: dict[str, Any], top: int) -> dict[str, Any]:
    """µs per answer, per function, in each gateway, and the growth from ``one``."""

    def us(tag: str, samples: int) -> float:
        """A share of the samples, times the CPU per answer (/proc): a sample also falls
        while the gateway waits for the CPU its neighbour holds."""
        cpu_us = s[tag]["cpu_s"] * 1e6 / max(1, s[tag]["requests"])
        return samples / max(1, s[tag]["samples"]) * cpu_us

    rows = []
    for fn in set(s["one"]["f"]) | set(s["scale"]["f"]):
        a, b = us("one", s["one"]["f"][fn]), us("scale", s["scale"]["f"][fn])
        rows.append({"function": fn, "one_us": round(a, 1), "scale_us": round(b, 1)})
    rows.sort(key=lambda r: r["scale_us"] - r["one_us"], reverse=True)
    totals = {
        tag: {
            "answers": s[tag]["requests"],
            "cpu_us_per_answer": round(s[tag]["cpu_s"] * 1e6 / max(1, s[tag]["requests"]), 1),
            "sampled_us_per_answer": round(
                s[tag]["samples"] * 1e6 / RATE / max(1, s[tag]["requests"]), 1
            ),
        }
        for tag in ("one", "scale")
    }
    return {"totals": totals, "grew_most": rows[:top]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--keys", type=int, default=500)
    p.add_argument("--tokens", type=int, default=10_000)
    p.add_argument("--spread", type=int, default=1_000)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--cache-ttl", type=float)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    opts = Options(
        keys=max(1, min(args.keys, 10_000)),
        tokens=max(2, min(args.tokens, 20_000)),
        spread=max(1, min(args.spread, args.tokens // 2)),
        rounds=max(1, min(args.rounds, 20)),
        seconds=max(1, min(args.seconds, 60)),
        quick=False,
        load="auto",
        profile=None,
        cache_ttl=args.cache_ttl,
        together=True,
    )
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="egw-scale-profile-") as tmp:
        os.chmod(tmp, 0o755)
        run = ProfileRun(opts, Path(tmp))
        run.top = max(1, min(args.top, 200))
        result = asyncio.run(run.profile())
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
