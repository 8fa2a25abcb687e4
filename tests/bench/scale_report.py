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
        f" load average {meta['loadavg']}; load: {meta.get('load_generator', '?')};"
        f" upstream: {meta.get('upstream', '?')}",
        "",
        "| Run | req/s (median) | vs one | CPU µs/answer | vs one"
        " | vs one, round by round: median (range) | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in result["targets"].items():
        paired = t.get("cpu_ratio_by_round")
        by_round = (
            f"{paired['median']:.3f} ({paired['min']:.3f} to {paired['max']:.3f})"
            if paired
            else "-"
        )
        lines.append(
            f"| {name} | {_num(t['rps'])} | {_num(t['rps_ratio'], 3)} | {_num(t['cpu_us'])}"
            f" | {_num(t['cpu_ratio'], 3)} | {by_round} | {t['rss_peak_mb']} |"
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


def _by_round(rows: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, float] | None:
    """CPU per answer of each round against ``one``'s in the same round (measured seconds
    apart, or at the same time with ``--together``): median, least and most."""
    pairs = [(r.get("cpu_us"), r.get("one_cpu_us")) for r in rows]
    if not any(b for _, b in pairs):
        pairs = [(r.get("cpu_us"), b.get("cpu_us")) for r, b in zip(rows, base, strict=False)]
    ratios = [r / b for r, b in pairs if r and b]
    if not ratios:
        return None
    return {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


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
            "cpu_ratio_by_round": _by_round(rows, rounds["one"]),
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
            "together": opts.together,
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
