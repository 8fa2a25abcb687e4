"""The last hour as SVG (proxy/admin/status_svg.py): pure, read back as XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from proxy.admin.status_svg import SENDS_HEIGHT, SENDS_TOP, history_svg, running_totals

NS = "{http://www.w3.org/2000/svg}"
START = 1_800_000_000 - 1_800_000_000 % 60


def lane(sends: list[int | None], queue: list[int | None], **extra: Any) -> dict[str, Any]:
    windows = [
        {"requests": 10, "per_seconds": 60.0, "used": 0, "remaining": 10},
        {"requests": 50, "per_seconds": 3600.0, "used": 0, "remaining": 50},
    ]
    return {
        "windows": windows,
        "queue_depth": 0,
        "history": {"start": START, "sends": sends, "queue_max": queue},
        **extra,
    }


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def bars(root: ET.Element, kind: str) -> list[ET.Element]:
    return [r for r in root.iter(f"{NS}rect") if kind in r.get("class", "").split()]


def test_one_bar_per_known_minute_its_height_the_count() -> None:
    sends: list[int | None] = [None] * 10 + [0] * 50
    sends[20], sends[45], sends[59] = 3, 12, 7
    root = parse(history_svg("default", lane(sends, [0] * 60)))
    drawn = bars(root, "sends")
    assert [int(r.get("data-minute", "")) for r in drawn] == list(range(10, 60))
    assert {int(r.get("data-minute", "")): int(r.get("data-sends", "")) for r in drawn} == {
        i: n for i, n in enumerate(sends) if n is not None
    }
    scale = float(root.get("data-scale", ""))
    assert scale == 14  # a tenth over the busiest minute (above the limit of 10), whole
    for r in drawn:
        n = int(r.get("data-sends", ""))
        height, y = float(r.get("height", "")), float(r.get("y", ""))
        assert abs(height - n / scale * SENDS_HEIGHT) < 0.01
        assert abs(y + height - (SENDS_TOP + SENDS_HEIGHT)) < 0.01  # standing on the axis
        assert int(r.get("data-start", "")) == START + 60 * int(r.get("data-minute", ""))
        title = r.find(f"{NS}title")
        assert title is not None and title.text and title.text.endswith(f": {n} sends")
    full = [int(r.get("data-minute", "")) for r in drawn if "full" in r.get("class", "")]
    assert full == [45]  # at or past 10 a minute: red


def test_the_limits_and_the_hour_window_are_drawn() -> None:
    sends: list[int | None] = [1] * 60
    root = parse(history_svg("default", lane(sends, [None] * 59 + [2])))
    lines = [ln for ln in root.iter(f"{NS}line") if ln.get("class") == "limit"]
    assert [ln.get("data-limit") for ln in lines] == ["10", "50"]
    per_minute = lines[0]
    scale = float(root.get("data-scale", ""))
    assert (
        abs(float(per_minute.get("y1", "")) - (SENDS_TOP + SENDS_HEIGHT * (1 - 10 / scale))) < 0.01
    )
    hourly = next(root.iter(f"{NS}polyline"))
    assert [int(t) for t in hourly.get("data-totals", "").split()] == list(range(1, 61))
    queue = bars(root, "queue")
    assert [(r.get("data-minute"), r.get("data-queue")) for r in queue] == [("59", "2")]


def test_running_totals_over_a_window_of_minutes() -> None:
    assert running_totals([1, 2, None, 4, 5], 2) == [1, 3, 2, 4, 9]
    assert running_totals([1, 2, 3], 60) == [1, 3, 6]


def test_no_history_no_picture_and_names_are_escaped() -> None:
    assert history_svg("default", {"windows": [], "queue_depth": 0}) == ""
    name = '</svg><script>alert("x")</script>&'
    svg = history_svg(name, lane([0] * 60, [0] * 60))
    root = parse(svg)  # still one well-formed SVG element
    assert root.get("data-credential") == name
    assert "<script" not in svg
    assert "href" not in svg and "url(" not in svg  # no outside assets, no links
