"""Function calls per admitted request, one token against a spread over many: a count, not
a timing, so a busy machine does not move it.

    python -m tests.bench.scale_calls [--keys 500] [--tokens 2000] [--spread 1000]
                                      [--requests 2000] [--top 25] [--json out.json]

One gateway of this tree (``tests.bench.scale``'s setup: SQLite state, every feature on,
``--keys`` keys from a keys file, ``--tokens`` tokens through the admin API) runs under
cProfile, switched on and off by signals around each measurement. A Python client sends
``--requests`` admitted requests, 10 at a time, for each of: ``one`` (one token),
``1key`` (``--spread`` tokens of one key) and ``spread`` (``--spread`` tokens over the
keys), each after a warm-up pass over the same tokens. Prints the calls per request of
each run and the functions whose calls per request grow most from ``one`` to ``spread``.
Also per request: write-ahead transactions, token store reads and timers set (functions
that are not coroutines: cProfile counts a coroutine once per resumption). Those follow
the pace of each key and token (a lease lasts a while, a token is read again every
``tokens.cache_ttl_seconds``), and the profiled gateway is several times slower than a
bare one, so ``rps`` (while profiled) is shown with them: ``--keys`` at the profiled rate
gives each key the pace of more keys at an unprofiled one. Run by hand
(docs/performance.md); never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench import servers
from tests.bench.scale import PATH, make_tokens, start
from tests.bench.servers import Processes

AT_ONCE = 10
# Per request, besides every function's calls: what grows with the spread over keys and
# tokens (file name and function name, as pstats keys them).
MARKERS = {
    "write_ahead_transactions": ("sqlite/sends.py", "reserve"),
    "token_store_reads": ("auth/authenticator.py", "_loaded"),
    "timers_set": ("asyncio/base_events.py", "call_at"),
}
WRAPPER = """
import cProfile, os, signal, sys
from proxy.cli import main
prof = cProfile.Profile()
def on(*_):
    prof.enable()
def off(*_):
    prof.disable()
    prof.dump_stats(os.environ["EGW_PROFILE_OUT"])
    prof.clear()
signal.signal(signal.SIGUSR1, on)
signal.signal(signal.SIGUSR2, off)
sys.exit(main(sys.argv[1:]))
"""


async def send(url: str, tokens: list[str], n: int) -> None:
    """``n`` admitted requests, ``AT_ONCE`` at a time, taking ``tokens`` in turn."""
    queue = iter(range(n))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for i in queue:
                auth = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
                async with session.get(url + PATH, headers=auth) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"request {i}: {resp.status} {await resp.text()}")

        await asyncio.gather(*(worker() for _ in range(AT_ONCE)))


async def profiled(
    gw: servers.Gateway, out: Path, tokens: list[str], n: int
) -> tuple[pstats.Stats, float]:
    """The profile of ``n`` requests over ``tokens``, and their rate (req/s, profiled)."""
    await send(gw.url, tokens, max(n, len(tokens)))  # warm: each token looked up once
    if out.exists():
        out.unlink()
    os.kill(gw.pid, signal.SIGUSR1)
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await send(gw.url, tokens, n)
    rate = n / (time.monotonic() - started)
    os.kill(gw.pid, signal.SIGUSR2)
    for _ in range(100):
        await asyncio.sleep(0.1)
        if out.exists() and out.stat().st_size:
            await asyncio.sleep(0.3)
            return pstats.Stats(str(out)), rate
    raise RuntimeError(f"no profile from {gw.name}:\n{gw.tail()}")


def per_request(stats: pstats.Stats, n: int) -> dict[str, float]:
    calls: dict[str, float] = {}
    for (file, line, func), (_cc, nc, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
        path = Path(file)
        name = f"{path.parent.name}/{path.name}:{line}:{func}" if line else func
        calls[name] = calls.get(name, 0.0) + nc / n
    return calls


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="egw-calls-") as tmp:
        procs = Processes(Path(tmp))
        out = Path(tmp) / "profile.out"
        os.environ["EGW_PROFILE_OUT"] = str(out)
        wrapper = Path(tmp) / "wrapper.py"
        wrapper.write_text(WRAPPER, encoding="utf-8")
        wrap = lambda cmd: [sys.executable, str(wrapper), *cmd[-3:]]  # noqa: E731
        try:
            up = servers.start_python_upstream(procs, None)
            async with aiohttp.ClientSession() as session:
                await servers.wait_ready(session, up)
            orig = servers.launch_gateway
            servers.launch_gateway = lambda *a, **k: orig(*a, **k, wrap=wrap)  # type: ignore[assignment]
            setup = await start(procs, up.url, None, "scale", args.keys)
            servers.launch_gateway = orig  # type: ignore[assignment]
            await make_tokens(setup, args.tokens, args.keys, args.spread)
            n, toks = args.requests, setup.tokens
            plans = {
                "one": toks[:1],
                "1key": toks[: args.spread],
                "spread": toks[args.spread : 2 * args.spread],
            }
            result: dict[str, Any] = {"requests": n, "calls_per_request": {}, "rps": {}}
            result.update({marker: {} for marker in MARKERS})
            calls = {}
            for name, tokens in plans.items():
                stats, rate = await profiled(setup.gw, out, tokens, n)
                result["rps"][name] = round(rate, 1)
                if args.keep is not None:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    stats.dump_stats(str(args.keep / f"{name}.prof"))
                calls[name] = per_request(stats, n)
                for marker, (file, func) in MARKERS.items():
                    found = [
                        v
                        for k, v in calls[name].items()
                        if k.startswith(f"{file}:") and k.endswith(f":{func}")
                    ]
                    result[marker][name] = round(sum(found), 3)
                total = sum(calls[name].values())
                result["calls_per_request"][name] = round(total, 1)
                print(f"[calls] {name}: {total:,.1f} calls per request", file=sys.stderr)
        finally:
            procs.close()
    for name in ("1key", "spread"):
        grown = {
            f: round(calls[name].get(f, 0.0) - calls["one"].get(f, 0.0), 3)
            for f in set(calls[name]) | set(calls["one"])
        }
        top = sorted(grown.items(), key=lambda kv: -abs(kv[1]))[: args.top]
        result[f"grown_{name}"] = {
            f: {"one": round(calls["one"].get(f, 0.0), 3), name: round(calls[name].get(f, 0.0), 3)}
            for f, _ in top
        }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=500)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--spread", type=int, default=1000)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", type=Path, help="write each run's cProfile file here")
    args = p.parse_args(argv)
    text = json.dumps(asyncio.run(run(args)), indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
