"""Request ids: unique within a process and across processes, shaped like uuid4().hex."""

from __future__ import annotations

import re
import subprocess
import sys

from proxy.observe.request_ids import RequestIds

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
    code = "from proxy.observe.request_ids import RequestIds; print(RequestIds().new())"
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


def test_a_callers_id_is_kept_only_when_plain_and_short() -> None:
    ids = RequestIds()
    for given in ("req-123", "a", "0f8fad5b-d9cb-469f-a165-70867728950e", "svc:1.2_x", "x" * 128):
        assert ids.take(given) == given
    for given in (
        None,
        "",
        "x" * 129,
        "has space",
        "tab\there",
        "new\nline",
        'quote"d',
        "caf\u00e9",
        "\x00nul",
        "slash/ed",
        "abc\n",  # a trailing newline is not "the end" here
    ):
        made = ids.take(given)
        assert made != given and HEX32.fullmatch(made)
