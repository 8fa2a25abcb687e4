"""One budget view for a group of workers (``serve --workers N``): /admin/budget, /status.

Each worker sees the shared budget (sqlite or Redis) as of its own last reservation, so a
worker that has been idle lags: it can only under-count sends. The group's view therefore
takes, per window, the most used and the least remaining any worker reports (the most
recent), and adds up what is per worker: queues and answers per token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from proxy.admin.cache import merge_cache
from proxy.admin.status import BUSIEST

_WINDOW_MAX = ("used", "external", "reset_in")


def _window(views: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out = dict(views[0])
    for key in _WINDOW_MAX:
        out[key] = max(v[key] for v in views)
    out["remaining"] = min(v["remaining"] for v in views)
    return out


def _credential(lanes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out = dict(lanes[0])
    count = min(len(lane["windows"]) for lane in lanes)
    out["windows"] = [_window([lane["windows"][i] for lane in lanes]) for i in range(count)]
    out["queue_depth"] = sum(lane["queue_depth"] for lane in lanes)
    out["waiting_tokens"] = sum(lane.get("waiting_tokens", 0) for lane in lanes)
    out["frozen_for"] = max(lane["frozen_for"] for lane in lanes)
    out["state_healthy"] = all(lane.get("state_healthy", True) for lane in lanes)
    out["calibrated"] = all(lane.get("calibrated", True) for lane in lanes)
    reported = [r for lane in lanes if (r := lane.get("echowin_reported_remaining")) is not None]
    out["echowin_reported_remaining"] = min(reported) if reported else None
    histories = [h for lane in lanes if (h := lane.get("history"))]
    if histories:
        # Sends: each worker counts the shared log, an idle one lags: the most. Queues
        # are per worker: their deepest added up (at most what waited at once).
        start = max(int(h["start"]) for h in histories)
        out["history"] = {
            "start": start,
            "sends": _per_minute(max, [_from(start, h, "sends") for h in histories]),
            "queue_max": _per_minute(sum, [_from(start, h, "queue_max") for h in histories]),
        }
    return out


def _from(start: int, history: Mapping[str, Any], key: str) -> list[int | None]:
    """A worker's series moved to begin at ``start`` (it was read before a minute turned
    and the others after: its oldest minutes drop off, its newest is not known)."""
    series = list(history[key])
    shift = min(len(series), max(0, (start - int(history["start"])) // 60))
    return series[shift:] + [None] * shift


def _per_minute(
    combine: Callable[[list[int]], int], series: Sequence[Sequence[int | None]]
) -> list[int | None]:
    out: list[int | None] = []
    for values in zip(*series, strict=True):
        known = [v for v in values if v is not None]
        out.append(combine(known) if known else None)
    return out


def merge_credentials(views: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``/admin/budget``'s ``credentials`` of every worker, as one."""
    names = [name for name in views[0] if all(name in v for v in views)]
    return {name: _credential([v[name] for v in views]) for name in names}


def merge_status(datas: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``/status.json`` of every worker, as one (see proxy/admin/status.py: status_data)."""
    tokens: dict[str, dict[str, Any]] = {}
    for data in datas:
        for t in data["busiest_tokens"]:
            row = tokens.setdefault(t["id"], {**t, "requests": 0, "refused": 0})
            row["requests"] += t["requests"]
            row["refused"] += t["refused"]
    busiest = sorted(tokens.values(), key=lambda t: -int(t["requests"]))[:BUSIEST]
    return {
        **datas[0],
        "credentials": merge_credentials([d["credentials"] for d in datas]),
        "cache": merge_cache([d.get("cache") for d in datas]),
        "busiest_tokens": busiest,
    }
