"""The simulator's key encoders: each form read back with the standard library's decoder.

No sockets: :func:`proxy.sim.echo.encode` is pure. The answers that carry the encoded key
are tried in tests/sim/test_faults.py (the simulator) and tests/gateway/test_security.py
(the gateway).
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

import proxy.sim.echo
from proxy.sim.echo import FORMS, PLACES, encode

KEY = "Ew_Live.Key-0123456789AbCdEfXy"


def test_public_names_are_pinned() -> None:
    assert sorted(proxy.sim.echo.__all__) == [
        "FORMS",
        "HEADER_PLACES",
        "MAX_POSITION",
        "PLACES",
        "STREAMED",
        "check",
        "echo_answer",
        "encode",
    ]


def test_forms_and_places_are_the_ones_named_in_the_issue() -> None:
    assert set(FORMS) == {
        "verbatim", "upper", "lower", "mixed_case", "percent_all", "percent_some",
        "percent_lower_hex", "double_percent", "json_u", "html_dec", "html_hex", "html_named",
        "base64_0", "base64_1", "base64_2", "base64url_0", "base64url_1", "base64url_2",
        "utf16le", "utf16be", "hex",
    }  # fmt: skip
    assert PLACES == (
        "body", "header", "location", "split_headers", "chunked", "gzip", "deflate",
        "gzip_stream",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("verbatim", KEY),
        ("upper", KEY.upper()),
        ("lower", KEY.lower()),
        ("mixed_case", "EW_liVe.KEy-0123456789ABCDEFXY"),  # odd positions swapped
        ("hex", KEY.encode().hex()),
    ],
)
def test_plain_forms(form: str, expected: str) -> None:
    assert encode(form, KEY) == expected.encode()


def test_percent_forms_encode_every_character_and_decode_back() -> None:
    full = encode("percent_all", KEY).decode()
    assert full.count("%") == len(KEY) and full.startswith("%45%77%5F")
    assert urllib.parse.unquote(full) == KEY
    lower = encode("percent_lower_hex", KEY).decode()
    assert lower == full.lower() and urllib.parse.unquote(lower) == KEY
    double = encode("double_percent", KEY).decode()
    assert double.startswith("%2545%2577")
    assert urllib.parse.unquote(urllib.parse.unquote(double)) == KEY


def test_percent_some_encodes_the_given_positions_after_the_case_swaps() -> None:
    assert encode("percent_some", "abcd") == b"%61b%63d"  # default: even positions
    assert encode("percent_some", "abcd", percent={1, 9}) == b"a%62cd"  # 9 is past the end
    assert encode("percent_some", "abcd", percent={0}, swapcase={0, 3}) == b"%41bcD"
    assert encode("mixed_case", "abcd", swapcase=()) == b"abcd"


@given(
    percent=st.sets(st.integers(0, len(KEY) - 1)),
    swapcase=st.sets(st.integers(0, len(KEY) - 1)),
)
def test_percent_some_decodes_to_the_key_up_to_case(percent: set[int], swapcase: set[int]) -> None:
    encoded = encode("percent_some", KEY, percent=percent, swapcase=swapcase).decode()
    assert encoded.count("%") == len(percent)
    assert urllib.parse.unquote(encoded).lower() == KEY.lower()


def test_json_u_escapes_every_character() -> None:
    encoded = encode("json_u", KEY).decode()
    assert encoded.count("\\u") == len(KEY)
    assert json.loads(f'"{encoded}"') == KEY


@pytest.mark.parametrize("form", ["html_dec", "html_hex", "html_named"])
def test_html_forms_unescape_to_the_key(form: str) -> None:
    assert html.unescape(encode(form, KEY).decode()) == KEY


def test_html_named_uses_names_where_html5_has_them() -> None:
    named = encode("html_named", KEY).decode()
    assert "&lowbar;" in named and "&period;" in named
    assert "&#45;" in named  # "-" has no name: its decimal reference


@pytest.mark.parametrize("offset", [0, 1, 2])
def test_base64_forms_hold_the_key_at_each_alignment(offset: int) -> None:
    plain = b"x" * offset + KEY.encode() + b"tail"
    assert base64.b64decode(encode(f"base64_{offset}", KEY)) == plain
    assert base64.urlsafe_b64decode(encode(f"base64url_{offset}", KEY)) == plain
    # The key's own characters differ with the alignment: three distinct patterns.
    shown = {encode(f"base64_{n}", KEY)[2:10] for n in range(3)}
    assert len(shown) == 3


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_forms(codec: str) -> None:
    form = "utf16le" if codec.endswith("le") else "utf16be"
    assert encode(form, KEY).decode(codec) == KEY


def test_hex_is_binascii_hexlify() -> None:
    assert binascii.unhexlify(encode("hex", KEY)) == KEY.encode()


def test_unknown_form_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown echo form"):
        encode("rot13", KEY)
