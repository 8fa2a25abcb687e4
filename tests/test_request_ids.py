"""Request ids: unique within a process and across processes, shaped like uuid4().hex."""

from __future__ import annotations

import re
import subprocess
import sys

from proxy.request_ids import RequestIds

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_ids_are_unique_and_32_hex_digits() -> None:
    ids = RequestIds()
    made = [ids.new() for _ in range(100_000)]
    assert len(set(made)) == len(made)
    assert all(HEX32.fullmatch(i) for i in made)


def test_two_makers_share_no_prefix() -> None:
    a, b = RequestIds(), RequestIds()
    assert a.new()[:16] != b.new()[:16]


def test_ids_do_not_count_visibly() -> None:
    ids = RequestIds()
    tails = [int(ids.new()[16:], 16) for _ in range(3)]
    assert not (tails[1] - tails[0] == 1 and tails[2] - tails[1] == 1)


def test_other_processes_make_other_ids() -> None:
    code = "from proxy.request_ids import RequestIds; print(RequestIds().new())"
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
        for _ in range(3)
    ]
    assert len({run[:16] for run in runs}) == 3
    assert all(HEX32.fullmatch(run) for run in runs)


def test_repr_shows_nothing() -> None:
    assert repr(RequestIds()) == "RequestIds()"
