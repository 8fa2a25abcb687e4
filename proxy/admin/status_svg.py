"""The last hour of one credential as an inline SVG for /status: server-rendered, no
JavaScript, no outside assets (styled by the page's own ``<style>``).

Three strips share one time axis of 60 minutes, oldest on the left:

- sends per minute as bars, with a dashed line at each limit of a minute or less (scaled
  to a minute: ``requests * 60 / per_seconds``); a bar at or past that line is red;
- for the longest window over a minute (echowin's hour), the sends it counted at the end
  of each minute as a line against its limit, the strip's top;
- the deepest queue seen in each minute, as bars.

Every bar carries ``data-minute`` (0 oldest .. 59 now), ``data-start`` (the minute's
start, seconds since the epoch) and ``data-sends`` or ``data-queue``, and a ``<title>``
tooltip; a minute the budget's log no longer covers has no bar. Pure: data in, text out.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SVG_STYLE", "history_svg", "running_totals"]

WIDTH = 660
LEFT = 48  # room for the axis labels
SLOT = 10  # pixels per minute
BAR = 8
SENDS_TOP, SENDS_HEIGHT = 8, 120
HOUR_TOP, HOUR_HEIGHT = 150, 50
QUEUE_TOP, QUEUE_HEIGHT = 224, 36
HEIGHT = QUEUE_TOP + QUEUE_HEIGHT + 18

SVG_STYLE = """
svg.history{display:block;margin:.75em 0 0}
svg.history text{font:11px system-ui,sans-serif;fill:#555}
svg.history .axis{stroke:#c9ced6}
.sends{fill:#2563eb}.sends.full{fill:#dc2626}.queue{fill:#f59e0b}
.limit{stroke:#dc2626;stroke-dasharray:4 3}.hourly{fill:none;stroke:#7c3aed;stroke-width:2}
"""


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _clock(start: int) -> str:
    return time.strftime("%H:%M UTC", time.gmtime(start))


def running_totals(sends: Sequence[int | None], minutes: int) -> list[int]:
    """For each minute, the sends of it and the ``minutes - 1`` before it (a window of
    ``minutes`` minutes ending with it); an unknown minute counts 0."""
    out, total = [], 0
    for index, n in enumerate(sends):
        total += n or 0
        if index >= minutes:
            total -= sends[index - minutes] or 0
        out.append(total)
    return out


def _bars(
    values: Sequence[int | None],
    start: int,
    kind: str,
    box: tuple[int, int, float],
    full: Sequence[float] = (),
) -> list[str]:
    """One bar per known minute; ``box``: the strip's top and height (pixels) and the
    value its height stands for; ``full``: the values at which a bar turns red."""
    top, height, scale = box
    out = []
    unit = "sends" if kind == "sends" else "waiting at most"
    for index, n in enumerate(values):
        if n is None:
            continue
        tall = n / scale * height
        minute = start + 60 * index
        css = kind
        if any(n >= limit for limit in full):
            css += " full"
        out.append(
            f'<rect class="{css}" data-minute="{index}" data-start="{minute}" '
            f'data-{kind}="{n}" x="{LEFT + SLOT * index + 1}" y="{_num(top + height - tall)}" '
            f'width="{BAR}" height="{_num(tall)}"><title>{_clock(minute)}: {n} {unit}'
            "</title></rect>"
        )
    return out


def _axis(y: int) -> str:
    return f'<line class="axis" x1="{LEFT}" y1="{y}" x2="{LEFT + SLOT * 60}" y2="{y}"/>'


def _limit_line(requests: int, per_seconds: float, scale: float) -> str:
    per_minute = requests * 60 / per_seconds
    y = _num(SENDS_TOP + SENDS_HEIGHT - per_minute / scale * SENDS_HEIGHT)
    label = f"limit {requests} / {per_seconds:g} s"
    return (
        f'<line class="limit" data-limit="{_num(per_minute)}" x1="{LEFT}" y1="{y}" '
        f'x2="{LEFT + SLOT * 60}" y2="{y}"><title>{label}</title></line>'
        f'<text x="{LEFT + SLOT * 60 + 4}" y="{y}" dy="4">{_num(per_minute)}</text>'
    )


def _hour_strip(sends: Sequence[int | None], window: Mapping[str, Any]) -> list[str]:
    requests, per_seconds = int(window["requests"]), float(window["per_seconds"])
    totals = running_totals(sends, max(1, math.ceil(per_seconds / 60)))
    scale = max(requests, max(totals), 1)
    points = " ".join(
        f"{LEFT + SLOT * i + SLOT}," + _num(HOUR_TOP + HOUR_HEIGHT - t / scale * HOUR_HEIGHT)
        for i, t in enumerate(totals)
    )
    y = _num(HOUR_TOP + HOUR_HEIGHT - requests / scale * HOUR_HEIGHT)
    label = f"counted in the {per_seconds:g} s window (limit {requests})"
    return [
        f'<text x="0" y="{HOUR_TOP - 4}">{label}</text>',
        _axis(HOUR_TOP + HOUR_HEIGHT),
        f'<line class="limit" data-limit="{requests}" x1="{LEFT}" y1="{y}" '
        f'x2="{LEFT + SLOT * 60}" y2="{y}"><title>limit {requests} / {per_seconds:g} s</title>'
        "</line>",
        f'<polyline class="hourly" data-totals="{" ".join(map(str, totals))}" '
        f'points="{points}"><title>sends counted in the {per_seconds:g} s window</title>'
        "</polyline>",
    ]


def history_svg(name: str, lane: Mapping[str, Any]) -> str:
    """The SVG of ``lane`` (one credential of ``status_data``); "" without a history."""
    history = lane.get("history")
    if not history:
        return ""
    start, sends, queue = int(history["start"]), history["sends"], history["queue_max"]
    windows = lane["windows"]
    short = [w for w in windows if float(w["per_seconds"]) <= 60]
    long = [w for w in windows if float(w["per_seconds"]) > 60]
    limits = [int(w["requests"]) * 60 / float(w["per_seconds"]) for w in short]
    # A tenth of headroom over the busiest minute or the highest limit line, whole.
    scale = float(math.ceil(max([1.0, *limits, *(n for n in sends if n is not None)]) * 1.1))
    queue_scale = float(max([1, *(n for n in queue if n is not None)]))
    parts = [
        f'<text x="0" y="{SENDS_TOP + 10}">sends/min</text>',
        _axis(SENDS_TOP + SENDS_HEIGHT),
        *_bars(sends, start, "sends", (SENDS_TOP, SENDS_HEIGHT, scale), limits),
        *(_limit_line(int(w["requests"]), float(w["per_seconds"]), scale) for w in short),
    ]
    if long:
        parts += _hour_strip(sends, max(long, key=lambda w: float(w["per_seconds"])))
    parts += [
        f'<text x="0" y="{QUEUE_TOP + 10}">queue</text>',
        *_bars(queue, start, "queue", (QUEUE_TOP, QUEUE_HEIGHT, queue_scale)),
        _axis(QUEUE_TOP + QUEUE_HEIGHT),
        f'<text x="{LEFT + SLOT * 60 + 4}" y="{QUEUE_TOP}" dy="8">{_num(queue_scale)}</text>',
        f'<text x="{LEFT}" y="{HEIGHT - 2}">{_clock(start)}</text>',
        f'<text x="{LEFT + SLOT * 30}" y="{HEIGHT - 2}" text-anchor="middle">-30 min</text>',
        f'<text x="{LEFT + SLOT * 60}" y="{HEIGHT - 2}" text-anchor="end">now</text>',
    ]
    label = html.escape(f"{name}: sends per minute and queue depth, last hour", quote=True)
    return (
        f'<svg class="history" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{label}" '
        f'data-credential="{html.escape(name, quote=True)}" data-scale="{_num(scale)}" '
        f'data-height="{SENDS_HEIGHT}">' + "".join(parts) + "</svg>"
    )
