"""At a glance without Grafana: each upstream key's windows as bars, its last hour as a
picture (sends per minute against its limits, and the queue: proxy/admin/status_svg.py),
and the busiest tokens. Served by the admin listener as HTML (/status) and JSON
(/status.json), and drawn in a terminal by ``echowin-gateway status``.

Like /metrics it shows token names and budgets, never a token or a key.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.admin.status_svg import SVG_STYLE, history_svg
from proxy.budget.scheduler import Scheduler
from proxy.observe.history import first_minute, sends_per_minute
from proxy.runtime import RUNTIME, Runtime

BUSIEST = 10


def _histories(rt: Runtime, credentials: dict[str, Any]) -> None:
    """Add each credential's last hour (``history``) to its ``credentials`` entry: sends
    per minute counted from the budget's own log (every process's and replica's sends,
    as this process last saw them), and the deepest queue this process sampled."""
    if not isinstance(rt.admitter, Scheduler):
        return
    now = time.time()
    for name, lane in rt.admitter.lanes.items():
        if name not in credentials:
            continue
        budget = lane.source.budget
        longest = max(limit.per_seconds for limit in budget.limits) + budget.guard
        credentials[name]["history"] = {
            "start": first_minute(now),
            "sends": sends_per_minute(budget.counted(), now, now - longest),
            "queue_max": rt.queue_history.series(name, now),
        }


async def _refresh(rt: Runtime) -> None:
    """Bring each credential's view of the budget up to date (a shared one in Redis may
    be up to its mirror's age old), as a prediction would."""
    if isinstance(rt.admitter, Scheduler):
        for lane in rt.admitter.lanes.values():
            await lane.source.refresh(time.time())


def status_data(rt: Runtime) -> dict[str, Any]:
    """The status as JSON-able data: credentials (windows, queue, freeze, last hour) and
    tokens."""
    names = rt.usage_names
    busiest = sorted(rt.usage.items(), key=lambda item: -sum(item[1].values()))[:BUSIEST]
    credentials = rt.admitter.snapshot()
    _histories(rt, credentials)
    return {
        "version": __version__,
        "credentials": credentials,
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
        f'<p class="notes">{notes}</p>{_classes_html(lane)}{history_svg(name, lane)}</section>'
    )


def _classes_html(lane: Mapping[str, Any]) -> str:
    """Each class of service (when configured): per window reserved, used and free."""
    classes = lane.get("classes")
    if not classes:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(
            f"<td>{w['per_seconds']:g} s: {w['reserved']} reserved, {w['used']} used,"
            f" {w['free']} free</td>"
            for w in c["windows"]
        )
        + f"<td>{c['queue_depth']} waiting</td></tr>"
        for name, c in sorted(classes.items())
    )
    return f"<h3>classes</h3><table>{rows}</table>"


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
        f"<style>{_STYLE}{SVG_STYLE}</style></head><body>"
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


_TICKS = " ▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[int | None]) -> str:
    """One character per minute: blank for none, taller for more; "?" where not known."""
    top = max([1, *(v for v in values if v is not None)])
    return "".join(
        "?" if v is None else _TICKS[0 if v == 0 else max(1, round(v / top * 8))] for v in values
    )


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
        history = lane.get("history")
        if history:
            lines.append(f"  {'sends/min':>12} {sparkline(history['sends'])}  last hour")
        for cls, c in sorted(lane.get("classes", {}).items()):
            shown = ", ".join(
                f"{w['per_seconds']:g}s {w['used']}/{w['reserved']} used/reserved {w['free']} free"
                for w in c["windows"]
            )
            lines.append(f"  class {cls}: {shown}")
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
    await _refresh(request.app[RUNTIME])
    data = status_data(request.app[RUNTIME])
    return web.Response(text=status_html(data), content_type="text/html")


async def status_json(request: web.Request) -> web.Response:
    await _refresh(request.app[RUNTIME])
    return web.json_response(status_data(request.app[RUNTIME]))
