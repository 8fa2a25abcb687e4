"""At a glance without Grafana: each upstream key's windows as bars, the queue, and the
busiest tokens. Served by the admin listener as HTML (/status) and JSON (/status.json),
and drawn in a terminal by ``echowin-gateway status``.

Like /metrics it shows token names and budgets, never a token or a key.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.runtime import RUNTIME, Runtime

BUSIEST = 10


def status_data(rt: Runtime) -> dict[str, Any]:
    """The status as JSON-able data: credentials (windows, queue, freeze) and tokens."""
    names = rt.usage_names
    busiest = sorted(rt.usage.items(), key=lambda item: -sum(item[1].values()))[:BUSIEST]
    return {
        "version": __version__,
        "credentials": rt.admitter.snapshot(),
        "cache": None if rt.cache is None else rt.cache.snapshot(),
        "busiest_tokens": [
            {
                "id": token_id,
                "name": names.get(token_id, "?"),
                "requests": sum(counts.values()),
                "refused": sum(n for status, n in counts.items() if status == 429),
            }
            for token_id, counts in busiest
        ],
    }


def _bar_html(used: int, limit: int) -> str:
    share = min(1.0, used / limit) if limit else 0.0
    tone = "low" if share < 0.75 else "mid" if share < 0.9 else "high"
    width = round(share * 100, 1)
    return f'<div class="bar"><div class="fill {tone}" style="width:{width}%"></div></div>'


def _credential_html(name: str, lane: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{w['requests']} / {w['per_seconds']:g} s</td>"
        f"<td>{_bar_html(w['used'], w['requests'])}</td>"
        f"<td>{w['used']} used, {w['remaining']} left</td>"
        f"<td>resets in {w['reset_in']:.0f} s</td></tr>"
        for w in lane["windows"]
    )
    frozen = lane["frozen_for"]
    notes = f"queue: {lane['queue_depth']} waiting"
    if frozen:
        notes += f" · <strong>frozen for {frozen:.0f} s</strong>"
    if lane.get("echowin_reported_remaining") is not None:
        notes += f" · echowin says {lane['echowin_reported_remaining']} left"
    return (
        f"<section><h2>{html.escape(name)}</h2><table>{rows}</table>"
        f'<p class="notes">{notes}</p></section>'
    )


_STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;color:#1d2330;background:#f6f7f9}
h1{font-size:20px}h2{font-size:16px;margin:0 0 .5em}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:1em;margin:1em 0}
table{border-collapse:collapse}td{padding:.25em .75em .25em 0;white-space:nowrap}
.bar{width:320px;height:14px;background:#e8ebf0;border-radius:7px;overflow:hidden}
.fill{height:100%}.low{background:#3b82f6}.mid{background:#f59e0b}.high{background:#dc2626}
.notes{color:#555;margin:.5em 0 0}
"""


def status_html(data: Mapping[str, Any]) -> str:
    credentials = "".join(
        _credential_html(name, lane) for name, lane in sorted(data["credentials"].items())
    )
    tokens = "".join(
        f"<tr><td>{html.escape(t['name'])}</td><td>{html.escape(t['id'])}</td>"
        f"<td>{t['requests']}</td><td>{t['refused']}</td></tr>"
        for t in data["busiest_tokens"]
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='refresh' content='5'><title>echowin-gateway status</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>echowin-gateway {html.escape(data['version'])}</h1>{credentials}"
        f"{_cache_html(data.get('cache'))}"
        "<section><h2>Busiest tokens</h2><table><tr><th>name</th><th>id</th>"
        f"<th>requests</th><th>refused (429)</th></tr>{tokens}</table></section>"
        "</body></html>"
    )


def _cache_html(cache: Mapping[str, Any] | None) -> str:
    if not cache:
        return ""
    lookups = " · ".join(f"{k}: {v}" for k, v in sorted(cache["lookups"].items()))
    return (
        "<section><h2>Response cache</h2>"
        f"<p><strong>{cache['sends_saved']} upstream sends saved</strong> · "
        f"{cache['entries']} answers held ({cache['bytes']} of {cache['max_bytes']} bytes)"
        f" · {cache['evictions']} evicted · {cache['purged']} purged</p>"
        f'<p class="notes">{html.escape(lookups)}</p></section>'
    )


def _bar_text(used: int, limit: int, width: int = 30) -> str:
    filled = round(width * min(1.0, used / limit)) if limit else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def status_text(data: Mapping[str, Any]) -> str:
    """The terminal rendering of ``status_data``."""
    lines = [f"echowin-gateway {data['version']}"]
    for name, lane in sorted(data["credentials"].items()):
        lines.append(f"\n{name}")
        for w in lane["windows"]:
            window = f"{w['requests']}/{w['per_seconds']:g}s"
            bar = _bar_text(w["used"], w["requests"])
            lines.append(
                f"  {window:>12} {bar} {w['used']:>5} used  resets in {w['reset_in']:.0f}s"
            )
        queue = f"  queue: {lane['queue_depth']} waiting"
        if lane["frozen_for"]:
            queue += f", frozen for {lane['frozen_for']:.0f}s"
        lines.append(queue)
    cache = data.get("cache")
    if cache:
        lines.append(
            f"\nresponse cache: {cache['sends_saved']} sends saved, {cache['entries']} held"
            f" ({cache['bytes']} bytes)"
        )
    lines.append("\nbusiest tokens")
    for t in data["busiest_tokens"]:
        lines.append(f"  {t['name']:<24} {t['id']:<14} {t['requests']:>7} requests")
    return "\n".join(lines)


async def status_page(request: web.Request) -> web.Response:
    data = status_data(request.app[RUNTIME])
    return web.Response(text=status_html(data), content_type="text/html")


async def status_json(request: web.Request) -> web.Response:
    return web.json_response(status_data(request.app[RUNTIME]))
