"""Token creation at scale: the time one ``create_token`` takes (the name check and the
insert) in a store that already holds many tokens.

    python -m tests.bench.token_create [--quick] [--tokens 10000] [--creates 200]
                                       [--backend memory|sqlite|redis ...] [--redis URL]

Per backend: ``--tokens`` records stored directly (``put``, no name check: the fill is not
what is measured), then ``--creates`` tokens made one after another through
``proxy.admin.tokenops.create_token``, as the admin API and the CLI make them: the median
and the 90th percentile per create, in milliseconds. Redis is a private ``redis-server`` on
a free port unless ``--redis`` names one (then under a fresh key prefix, deleted after).
Prints one JSON object; never asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from proxy.admin.tokenops import create_token
from proxy.auth.tokens import TokenStore, mint_token
from proxy.config import GatewayConfig
from proxy.state import RedisOptions, open_redis, open_token_store
from tests.bench.replicas import start_redis
from tests.bench.servers import Processes

BACKENDS = ("memory", "sqlite", "redis")
T0 = 1_700_000_000.0


@asynccontextmanager
async def _private_redis(tmp: Path) -> AsyncIterator[str]:
    """A redis-server of its own (tests/bench/replicas.py's) on a free port, stopped after."""
    procs = Processes(tmp)
    try:
        url, _ = start_redis(procs, None)
        client = open_redis(url, RedisOptions(timeout_seconds=2.0))
        try:
            for _ in range(200):  # up to 10 s for it to answer
                try:
                    await client.ping()
                    break
                except RedisError:
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        yield url
    finally:
        procs.close()


@asynccontextmanager
async def _store(backend: str, tmp: Path, redis_url: str | None) -> AsyncIterator[TokenStore]:
    if backend != "redis":
        url = "memory://" if backend == "memory" else f"sqlite:///{tmp}/bench.db"
        store = await open_token_store(url)
        try:
            yield store
        finally:
            await store.close()
        return
    async with _redis_url(tmp, redis_url) as url:
        prefix = f"egw-bench-{uuid.uuid4().hex}:"
        client = open_redis(url, RedisOptions(timeout_seconds=5.0))
        store = await open_token_store(
            url, redis_options=RedisOptions(key_prefix=prefix), redis_client=client
        )
        try:
            yield store
        finally:
            await store.close()
            async for key in client.scan_iter(match=f"{prefix}*", count=1000):
                await client.delete(key)
            await client.aclose()


@asynccontextmanager
async def _redis_url(tmp: Path, given: str | None) -> AsyncIterator[str]:
    if given is not None:
        yield given
    else:
        async with _private_redis(tmp) as url:
            yield url


async def measure(backend: str, tokens: int, creates: int, redis_url: str | None) -> dict[str, Any]:
    config = GatewayConfig()
    routes = config.route_table()
    with tempfile.TemporaryDirectory(prefix="egw-bench-create-") as tmp:
        async with _store(backend, Path(tmp), redis_url) as store:
            started = time.perf_counter()
            for i in range(tokens):
                new = mint_token(name=f"filled-{i}", scopes=["tags:read"], now=T0 + i)
                await store.put(new.record)
            fill = time.perf_counter() - started
            times: list[float] = []
            for i in range(creates):
                began = time.perf_counter()
                await create_token(store, config, routes, name=f"new-{i}", scopes=["tags:read"])
                times.append((time.perf_counter() - began) * 1000)
    ordered = sorted(times)
    return {
        "tokens_before": tokens,
        "creates": creates,
        "fill_seconds": round(fill, 3),
        "create_ms_median": round(statistics.median(ordered), 3),
        "create_ms_p90": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
        "creates_per_second": round(creates / (sum(times) / 1000), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 tokens, 20 creates")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--creates", type=int, default=None)
    p.add_argument("--backend", action="append", choices=BACKENDS)
    p.add_argument("--redis", default=None, help="a Redis URL (default: a private server)")
    args = p.parse_args(argv)
    tokens = max(0, min(args.tokens or (200 if args.quick else 10_000), 100_000))
    creates = max(1, min(args.creates or (20 if args.quick else 200), 10_000))
    result: dict[str, Any] = {}
    for backend in args.backend or BACKENDS:
        print(f"[bench] {backend}: {tokens} tokens, {creates} creates", file=sys.stderr)
        result[backend] = asyncio.run(measure(backend, tokens, creates, args.redis))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
