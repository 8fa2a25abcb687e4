"""proxy/gateway/keywatch.py: every form of a key is found and masked in one pass, nothing else.

Unit tests: no sockets. The forms are written here with the standard library's own encoders,
independently of the patterns the watch compiles.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import pickle
import re
import urllib.parse
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.gateway import keywatch
from proxy.gateway.keywatch import Inflated, KeyWatch, Unreadable, decoded, leaking_fields
from tests.conftest import AGENCY_KEY, TEAM_KEY

KEYS = [TEAM_KEY, AGENCY_KEY, "ew_live_9fQ2/x+Tz=", "K"]


def _percent_some(key: str, positions: set[int], upper_hex: bool = True) -> str:
    out = []
    for i, c in enumerate(key):
        if i in positions:
            code = f"%{ord(c):02X}" if upper_hex else f"%{ord(c):02x}"
            out.append(code)
        else:
            out.append(c)
    return "".join(out)


def _named(c: str) -> str:
    names = [n for n, t in html.entities.html5.items() if t == c and n.endswith(";")]
    return "&" + names[0] if names else f"&#{ord(c)};"


def forms(key: str) -> dict[str, bytes]:
    """The key in each form a caller could undo, as the bytes an answer would carry."""
    raw = key.encode()
    text = {
        "verbatim": key,
        "upper": key.upper(),
        "lower": key.lower(),
        "swapcase": key.swapcase(),
        "percent_all": urllib.parse.quote(key, safe=""),
        "percent_every_char": "".join(f"%{b:02X}" for b in raw),
        "percent_lower_hex": "".join(f"%{b:02x}" for b in raw),
        "percent_odd": _percent_some(key, set(range(1, len(key), 2))),
        "percent_upper_key": _percent_some(key.upper(), set(range(0, len(key), 3))),
        "double_percent": "".join(f"%25{b:02X}" for b in raw),
        "json_u": "".join(f"\\u{ord(c):04x}" for c in key),
        "json_u_upper": "".join(f"\\u{ord(c):04X}" for c in key),
        "json_dumps": json.dumps(key).strip('"'),
        "html_dec": "".join(f"&#{ord(c)};" for c in key),
        "html_dec_zeros": "".join(f"&#000{ord(c)};" for c in key),
        "html_hex": "".join(f"&#x{ord(c):x};" for c in key),
        "html_hex_upper": "".join(f"&#X{ord(c):X};" for c in key),
        "html_named": "".join(_named(c) if not c.isalnum() else c for c in key),
        "html_escape": html.escape(key),
        "hex": raw.hex(),
        "hex_upper": raw.hex().upper(),
    }
    out = {name: value.encode() for name, value in text.items()}
    out["utf16le"] = key.encode("utf-16-le")
    out["utf16be"] = key.encode("utf-16-be")
    out["utf16le_upper"] = key.upper().encode("utf-16-le")
    for offset in range(3):
        for tail in (b"", b"z", b"zz", b"zzz"):
            padded = b"q" * offset + raw + tail
            out[f"base64_{offset}_{len(tail)}"] = base64.b64encode(padded)
            out[f"base64url_{offset}_{len(tail)}"] = base64.urlsafe_b64encode(padded)
    return out


def _long_enough(key: str) -> bool:
    return len(key) >= 8  # a one-letter "key" has no base64 run of its own to find


@pytest.mark.parametrize("key", KEYS)
def test_every_form_is_found_and_masked_in_a_longer_text(key: str) -> None:
    watch = KeyWatch(key)
    for name, form in forms(key).items():
        if name.startswith("base64") and not _long_enough(key):
            continue
        data = b'{"note": "before ' + form + b' after"}'
        assert watch.found(data), name
        masked, count = watch.masked(data)
        assert count >= 1, name
        assert len(masked) == len(data), name
        assert masked.startswith(b'{"note": "before ')
        assert masked.endswith(b' after"}')
        assert not watch.found(masked), name


def test_base64_keeps_only_what_depends_on_the_key() -> None:
    """Around the key, the base64 text depends on neighbouring bytes too: those characters
    stay, the ones fixed by the key alone go, and decoding what is left gives no key."""
    watch = KeyWatch(TEAM_KEY)
    for offset in range(3):
        data = base64.b64encode(b"prefix bytes"[:offset] + TEAM_KEY.encode() + b"suffix")
        masked, _ = watch.masked(data)
        kept = masked.replace(b"*", b"A")
        assert TEAM_KEY.encode() not in base64.b64decode(kept + b"=" * (-len(kept) % 4))
        assert masked.count(b"*") >= len(TEAM_KEY) * 4 // 3 - 2


def test_ordinary_answers_are_left_byte_for_byte() -> None:
    watch = KeyWatch(TEAM_KEY)
    body = json.dumps(
        {
            "data": [
                {
                    "id": f"c_{i}",
                    "firstName": "Ann & Bob",
                    "email": f"a{i}@example.com",
                    "note": "50% off \\u00e9 &amp; r\u00e9al team key",
                    "url": "https://example.com/?q=real%2Dteam",
                }
                for i in range(50)
            ]
        }
    ).encode()
    assert not watch.found(body)
    assert watch.masked(body) == (body, 0)


def test_a_repr_or_a_pickle_never_shows_the_key() -> None:
    watch = KeyWatch(TEAM_KEY)
    assert TEAM_KEY not in repr(watch)
    with pytest.raises(TypeError):
        pickle.dumps(watch)


def test_overlapping_copies_are_all_masked() -> None:
    key = "abcabcabcabc"
    watch = KeyWatch(key)
    data = b"x" + b"abc" * 7 + b"y"
    masked, _ = watch.masked(data)
    assert masked == b"x" + b"*" * 21 + b"y"


@settings(max_examples=200, deadline=None)
@given(
    positions=st.sets(st.integers(0, len(TEAM_KEY) - 1)),
    cases=st.sets(st.integers(0, len(TEAM_KEY) - 1)),
    lower_hex=st.booleans(),
    before=st.binary(max_size=40),
    after=st.binary(max_size=40),
)
def test_any_subset_percent_encoded_and_any_letters_recased_is_found(
    positions: set[int], cases: set[int], lower_hex: bool, before: bytes, after: bytes
) -> None:
    recased = "".join(c.swapcase() if i in cases else c for i, c in enumerate(TEAM_KEY))
    form = _percent_some(recased, positions, upper_hex=not lower_hex).encode()
    masked, count = KeyWatch(TEAM_KEY).masked(before + form + after)
    assert count >= 1
    assert form not in masked


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(sorted(forms(TEAM_KEY))),
    filler=st.integers(0, 600),
    cuts=st.lists(st.integers(1, 97), min_size=1, max_size=40),
)
def test_a_stream_cut_anywhere_is_masked_as_a_whole_would_be(
    name: str, filler: int, cuts: list[int]
) -> None:
    """What _stream_masked does: hold back ``keep`` bytes, mask the rest, go on."""
    watch = KeyWatch(TEAM_KEY)
    form = forms(TEAM_KEY)[name]
    data = b"." * filler + form + b"," * filler
    out, held, pos, i = b"", b"", 0, 0
    while pos < len(data):
        chunk = data[pos : pos + cuts[i % len(cuts)]]
        pos, i = pos + len(chunk), i + 1
        buffered, _ = watch.masked(held + chunk)
        cut = max(0, len(buffered) - watch.keep)
        out, held = out + buffered[:cut], buffered[cut:]
    out += held
    assert len(out) == len(data)
    assert not watch.found(out)
    # The filler is untouched; a match cut at a read's end may leave an optional ";" out.
    assert out[:filler] == data[:filler]
    assert out[len(out) - filler :] == data[len(data) - filler :]
    assert out.count(b"*") >= len(form) - len(TEAM_KEY)


def test_fields_holding_the_key_are_found_in_names_values_and_splits() -> None:
    watch = KeyWatch(TEAM_KEY)
    quoted = urllib.parse.quote(TEAM_KEY, safe="")
    fields = [
        ("Content-Type", "application/json"),
        ("Location", f"/api/v1/contacts?api_key={quoted}"),
        ("X-" + TEAM_KEY.upper(), "1"),
        ("X-Debug-A", TEAM_KEY[:9]),
        ("X-Debug-B", TEAM_KEY[9:]),
        ("Vary", "Accept"),
    ]
    assert leaking_fields(watch, fields) == {1, 2, 3, 4}
    assert leaking_fields(watch, [fields[0], fields[5]]) == set()


def test_inflated_finds_a_form_split_across_compressed_chunks() -> None:
    watch = KeyWatch(TEAM_KEY)
    plain = b"x" * 5000 + forms(TEAM_KEY)["json_u"] + b"y" * 5000
    packed = gzip.compress(plain)
    inflated = Inflated(watch, "gzip")
    seen = False
    for i in range(0, len(packed), 13):
        seen = seen or inflated.holds_key(packed[i : i + 13])
    seen = seen or inflated.ends_with_key()
    assert seen
    clean = Inflated(watch, "deflate")
    assert not clean.holds_key(zlib.compress(b"z" * 9000))
    assert not clean.ends_with_key()


def test_a_corrupt_or_oversized_body_is_unreadable() -> None:
    with pytest.raises(Unreadable):
        decoded(b"not gzip at all", "gzip")
    with pytest.raises(Unreadable):
        Inflated(KeyWatch(TEAM_KEY), "gzip").holds_key(b"\x1f\x8b garbage")


def test_the_re2_binding_the_watch_calls_is_there() -> None:
    """The watch calls google-re2's compiled program (``_regexp.Match`` with an anchor)
    instead of its Python ``search``: a release that renames either fails here, by name."""
    import re2

    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1
    compiled = re2.compile(b"ab", options)
    assert hasattr(compiled, "_regexp"), "re2._Regexp._regexp is gone"
    assert hasattr(re2._re2.RE2, "Anchor"), "re2._re2.RE2.Anchor is gone"
    anchor = re2._re2.RE2.Anchor.UNANCHORED
    assert compiled._regexp.Match(anchor, b"xxab", 0, 4)[0] == (2, 4)
    assert compiled._regexp.Match(anchor, b"xxa", 0, 3)[0] == (-1, -1)


def test_a_credential_keeps_its_watch_until_its_key_changes() -> None:
    from proxy.gateway.keywatch import Watches

    watches = Watches(size=2)
    first = watches.of("default", TEAM_KEY)
    assert watches.of("default", TEAM_KEY) is first
    rotated = watches.of("default", AGENCY_KEY)  # a reload brought a new key
    assert rotated.found(AGENCY_KEY) and not rotated.found(TEAM_KEY)
    acme = watches.of("acme", TEAM_KEY)
    watches.of("third", TEAM_KEY)  # past the bound (2): the oldest name, default, goes
    assert watches.of("acme", TEAM_KEY) is acme
    assert watches.of("default", AGENCY_KEY) is not rotated


def _spellings(c: str) -> list[str]:
    """One character of a key in each way a caller could undo, by the standard library's
    own encoders (json.dumps gives JSON's short escapes and surrogate pairs). Letter case
    is changed for ASCII letters only, as the watch reads it."""
    raw = c.encode()
    out = [c, c.swapcase() if c.isascii() else c]
    out += ["".join(f"%{b:02X}" for b in raw), "".join(f"%25{b:02x}" for b in raw)]
    out += [json.dumps(c)[1:-1], f"\\u{ord(c):04X}" if ord(c) < 0x10000 else ""]
    out += [f"&#{ord(c)};", f"&#0000{ord(c)}", f"&#x{ord(c):X};", f"&#X00{ord(c):x}"]
    out += ["&" + n for n, t in html.entities.html5.items() if t == c]
    return [s for s in out if s]


SPELT_KEY = 'ew_live_9fQ2/x+Tz=\u00e9\U0001f511"K'


@settings(max_examples=200, deadline=None)
@given(picks=st.lists(st.integers(0, 1000), min_size=len(SPELT_KEY), max_size=len(SPELT_KEY)))
def test_each_character_spelt_its_own_way_is_found(picks: list[int]) -> None:
    """Every mix of spellings, character by character: what the sieve (searched first on
    every answer) must let through to the exact pattern, which finds and masks it."""
    form = "".join(
        (s := _spellings(c))[pick % len(s)] for c, pick in zip(SPELT_KEY, picks, strict=True)
    ).encode()
    masked, count = KeyWatch(SPELT_KEY).masked(b"<p>" + form + b"</p>")
    assert count >= 1
    assert masked == b"<p>" + b"*" * len(form) + b"</p>"


def test_the_sieve_lets_every_escape_of_every_character_through() -> None:
    """Each spelling of a character that starts with an escape is one run of the sieve's
    escape pattern: every HTML entity name, and each encoding of a sample of characters."""
    escape = re.compile(keywatch._ESCAPE)
    for name, text in html.entities.html5.items():
        if len(text) == 1:
            assert escape.fullmatch("&" + name), name
    for c in 'aZ09_-/+="\\\u00e9\u20ac\U0001f511':
        for spelt in _spellings(c):
            assert spelt in (c, c.swapcase()) or escape.fullmatch(spelt), (c, spelt)


def test_ordinary_answers_compile_no_exact_pattern_and_few_are_kept() -> None:
    """The bound: 200 keys' watches search ordinary answers with their sieves alone; the
    answers that hold a key compile its exact pattern, and at most EXACT_KEPT are kept,
    while a key whose pattern was dropped is still found and masked."""
    keywatch._exact.cache_clear()
    keys = [f"subteam-{i:04d}-9c8b7a6f5e4d3c2b1a09" for i in range(200)]
    watches = [KeyWatch(key) for key in keys]
    body = json.dumps(
        {"data": [{"id": i, "note": "50% off \\u00e9 &amp; caf\u00e9"} for i in range(40)]}
    )
    for watch in watches:
        assert watch.masked(body.encode()) == (body.encode(), 0)
    assert keywatch._exact.cache_info().currsize == 0
    for key, watch in zip(keys, watches, strict=True):
        masked, count = watch.masked(f"<{urllib.parse.quote(key)}>".encode())
        assert count == 1 and masked.count(b"*") == len(urllib.parse.quote(key))
    assert keywatch._exact.cache_info().currsize == keywatch.EXACT_KEPT < len(keys)
    assert watches[0].found(keys[0].upper())  # its exact pattern went first: compiled again
