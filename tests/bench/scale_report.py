"""The scale benchmark's tables (tests/bench/scale.py), as docs/performance.md shows them."""

from __future__ import annotations

import os
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.bench.scale import Options, Setup

__all__ = ["markdown", "summarise"]


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"{meta['keys']} keys, {meta['tokens']:,} tokens, traffic over {meta['spread']:,};"
        f" {meta['rounds']} rounds of {meta['seconds']} s, {meta['connections']} connections;"
        f" load average {meta['loadavg']}",
        "",
        "| Run | req/s (median) | vs one | CPU µs/answer | vs one | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in result["targets"].items():
        lines.append(
            f"| {name} | {_num(t['rps'])} | {_num(t['rps_ratio'], 3)} | {_num(t['cpu_us'])}"
            f" | {_num(t['cpu_ratio'], 3)} | {t['rss_peak_mb']} |"
        )
    lines += ["", "| Gateway | start-up s | tokens | made in s | RSS started MB |"]
    lines[-1] += " RSS with tokens MB | RSS after load MB |"
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in result["setup"].items():
        lines.append(
            f"| {name} | {s['startup_seconds']} | {s['tokens']:,} | {s['create_seconds']} |"
            f" {s['rss_started_mb']} | {s['rss_with_tokens_mb']} |"
            f" {result['rss_after_load_mb'][name]} |"
        )
    lines += ["", "| Gateway | page | median ms | CPU ms | bytes | series | token values |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for name, pages in result["scrapes"].items():
        for page, c in pages.items():
            lines.append(
                f"| {name} | {page} | {c['median_ms']} | {c['cpu_ms']} | {c['bytes']:,} |"
                f" {c.get('series', '-')} | {c.get('token_values', '-')} |"
            )
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 1) if values else None


def summarise(
    opts: Options,
    one: Setup,
    scale: Setup,
    rounds: dict[str, list[dict[str, Any]]],
    connections: int,
) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    base_rps, base_cpu = _median(rounds["one"], "rps"), _median(rounds["one"], "cpu_us")
    for name, rows in rounds.items():
        rps, cpu = _median(rows, "rps"), _median(rows, "cpu_us")
        targets[name] = {
            "rps": rps,
            "cpu_us": cpu,
            "rss_peak_mb": max(r["rss_peak_mb"] for r in rows),
            "rps_ratio": round(rps / base_rps, 3) if rps and base_rps else None,
            "cpu_ratio": round(cpu / base_cpu, 3) if cpu and base_cpu else None,
            "all_as_expected": all(r["as_expected"] for r in rows),
            "rounds": rows,
        }
    return {
        "meta": {
            "keys": opts.keys,
            "tokens": opts.tokens,
            "spread": opts.spread,
            "rounds": opts.rounds,
            "seconds": opts.seconds,
            "connections": connections,
            "quick": opts.quick,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
        "setup": {
            s.name: {
                "startup_seconds": s.startup_seconds,
                "tokens": len(s.tokens),
                "create_seconds": s.create_seconds,
                "rss_started_mb": s.rss_started_mb,
                "rss_with_tokens_mb": s.rss_tokens_mb,
            }
            for s in (one, scale)
        },
        "targets": targets,
    }
