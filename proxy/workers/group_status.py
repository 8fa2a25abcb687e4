"""One budget view for a group of workers (``serve --workers N``): /admin/budget, /status.

Each worker sees the shared budget (sqlite or Redis) as of its own last reservation, so a
worker that has been idle lags: it can only under-count sends. The group's view therefore
takes, per window, the most used and the least remaining any worker reports (the most
recent), and adds up what is per worker: queues and answers per token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
