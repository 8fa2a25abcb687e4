"""The real key in what echowin answers, in every form a caller could turn back into it.

echowin has no reason to send its key back, but a debug page, an error that prints the
request, a redirect that carries it in a query string or an HTML template would, and each
writes it its own way. :class:`KeyWatch` finds a key in one pass over the bytes, in any of
these forms:

- verbatim, in any letter case;
- each character independently as itself, ``%XX`` (or ``%25XX``, a percent-encoded
  percent), JSON ``\\uXXXX`` (or ``\\/`` and the other short escapes), an HTML numeric
  entity (``&#97;``, ``&#x61;``, leading zeros, with or without ``;``) or an HTML named
  entity (``&lowbar;``), hex digits and entity names in any case: so any subset of the
  characters percent-encoded, escaped or entity-encoded, mixed;
- base64 and base64url at each of the three alignments a key can have inside a longer
  encoded text (only the characters that depend on the key's bits alone);
- UTF-16 LE and BE, any letter case; lowercase or uppercase hex of the key's bytes.

Each key has two patterns. The *sieve*, kept for as long as the key, reads each character
of the key as itself or as any escape (a ``%``, ``\\`` or ``&`` and what may follow one):
a pattern every form above also matches, about a quarter of the exact one's memory, and
what every answer is searched with. Only when it matches (a key, or a run of escapes as
long as a key: common enough in JSON of escaped non-Latin text or percent-encoded URLs,
where it costs the exact search, and a compile once a key left the cache) is the *exact*
pattern searched, compiled on demand and kept for the
``EXACT_KEPT`` keys that needed it last. A key's watch took about 165 KB (500 keys: 83 MB)
with the exact pattern kept; with the sieve, about 55 KB (28 MB).

Every match becomes as many ``*`` (the length stays, so ``Content-Length`` holds). A
stream is searched with the last :attr:`KeyWatch.keep` bytes held back, so a form split
between chunks is found. A compressed body (gzip or deflate, the codings the gateway lets
callers ask echowin for: :func:`readable_codings`) is inflated only to be searched
(:class:`Inflated`) and relayed as it came when no form of the key is in it.

Pure: no I/O; imports neither asyncio nor aiohttp.
"""

from __future__ import annotations

import base64
import functools
import html.entities
import re
import zlib
from collections.abc import Iterator
from typing import Any, Protocol, cast

# RE2 (google-re2): a pattern of this size runs as a DFA, one pass over the bytes whatever
# their content, about ten times faster here than the standard library's backtracking
# engine, which tries every alternative at almost every byte. The bindings ship no types.
import re2  # type: ignore[import-untyped]

# Content-Encoding values the gateway can read, and zlib's wbits for them: 47 takes a gzip
# or a zlib header, whichever comes (deflate is zlib-wrapped by RFC 9110 §8.4.1.2).
_WBITS = {"gzip": 47, "x-gzip": 47, "deflate": 47}
_READABLE = frozenset(_WBITS) | {"identity"}
# Inflated at most this much at a time: a small compressed chunk cannot make a huge buffer.
_STEP = 1 << 20
# Inflated in all at most this much for an answer decoded whole (to be masked and sent
# decoded): past it the answer is refused (502) rather than held in memory.
MAX_DECODED = 64 << 20
# Leading zeros an HTML numeric entity may carry and still be found. Browsers accept any
# number; a bound keeps every match, and so what a stream holds back, bounded.
_ZEROS = 8
# JSON's two-character escapes for the characters that have one.
_JSON_SHORT = {"/": "\\/", '"': '\\"', "\\": "\\\\"}


_NOWHERE = (-1, -1)
# What may follow the first character of an escape (``%``, ``\`` or ``&``) in any spelling
# of a character (_char_form): hex and decimal digits, ``%25XX`` and ``%XX%XX``, ``\uXXXX``
# (several for a character beyond the BMP), ``&#``/``&#x`` entities and their ``;``, the
# letters, digits and ``;`` of HTML entity names, JSON's ``\/``, ``\"`` and ``\\``.
# tests/gateway/test_keywatch.py checks that every entity name is covered.
_ESCAPE = r'[%\\&][#%0-9A-Za-z;/"\\]+'
EXACT_KEPT = 64
"""Exact patterns kept compiled, for the keys whose answers needed one last (an answer
matches a key's sieve only when it holds the key, or a run of escapes as long as it)."""


class _Spans(Protocol):
    """One RE2 search: the spans of the match and its groups, ``(-1, -1)`` first for none."""

    def __call__(self, text: bytes, start: int, end: int, /) -> list[tuple[int, int]]: ...


def _compiled(pattern: str) -> _Spans:
    """``pattern`` compiled by RE2 over bytes (Latin-1: one byte, one character), as one
    unanchored search. It calls the compiled program's own ``Match`` (google-re2 1.1's
    binding, pinned in pyproject.toml) instead of the module's ``search``, whose Python
    generator and match object cost about as much again as the search of a small answer,
    on every answer; tests/gateway/test_keywatch.py checks the binding is there."""
    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1
    options.log_errors = False  # RE2 would print the pattern, which starts with the key
    # RE2's default budget (8 MB) leaves the DFA for a slower engine once a key is longer
    # than about 100 characters: a 2 KB answer then took ~400 µs instead of ~10. The DFA
    # grows lazily, by the states the answers visit, so the usual watch stays far below.
    options.max_mem = 32 << 20
    program = re2.compile(pattern.encode("latin-1"), options)._regexp
    return cast(_Spans, functools.partial(program.Match, re2._re2.RE2.Anchor.UNANCHORED))


class Unreadable(Exception):
    """A compressed body the gateway cannot inflate (corrupt, or over MAX_DECODED)."""


def _entity_names() -> dict[str, list[str]]:
    """HTML5 entity names (as written after ``&``) by the one character they stand for."""
    names: dict[str, list[str]] = {}
    for name, text in html.entities.html5.items():
        if len(text) == 1:
            names.setdefault(text, []).append(name)
    return names


_ENTITIES = _entity_names()


@functools.lru_cache(maxsize=512)
def _char_form(char: str) -> tuple[str, int]:
    """The pattern for one character of the key written any way a caller can undo, and the
    longest text it matches. Read case-insensitively: a letter stands for both cases.
    Kept for the characters seen (a watch and its exact pattern both need them)."""
    spellings: dict[str, int] = {_literal(char.encode()): len(char.encode())}
    codes = {ord(char), ord(char.swapcase())} if char.isascii() and char.isalpha() else {ord(char)}
    for code in sorted(codes):
        data = chr(code).encode()
        pct = "".join(f"%(?:25)?{byte:02x}" for byte in data)
        spellings[pct] = 5 * len(data)
        units = chr(code).encode("utf-16-be")
        json_u = "".join(f"\\\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))
        spellings[json_u] = 3 * len(units)
        spellings[f"&#0{{0,{_ZEROS}}}{code};?"] = 4 + _ZEROS + len(str(code))
        spellings[f"&#x0{{0,{_ZEROS}}}{code:x};?"] = 5 + _ZEROS + len(f"{code:x}")
        for name in _ENTITIES.get(chr(code), ()):
            spellings["&" + re.escape(name)] = 1 + len(name)
    if char in _JSON_SHORT:
        spellings[re.escape(_JSON_SHORT[char])] = 2
    return "(?:" + "|".join(spellings) + ")", max(spellings.values())


def _base64_runs(key: bytes) -> Iterator[tuple[str, int]]:
    """The base64 characters fixed by ``key``'s bits alone, at each of the three alignments
    the key can take inside a longer text; ``+`` and ``/`` stand for their base64url twins
    too. A run under 4 characters is too short to tell a key by and is left out."""
    for offset in range(3):
        text = base64.b64encode(bytes(offset) + key + bytes(3)).decode()
        first = -(-8 * offset // 6)  # ceil: the first character made of key bits only
        last = (8 * (offset + len(key))) // 6  # the first one that is not
        run = text[first:last]
        if len(run) >= 4:
            pattern = "".join(
                "[+-]" if c == "+" else "[/_]" if c == "/" else re.escape(c) for c in run
            )
            yield pattern, len(run)


def _literal(data: bytes) -> str:
    """A pattern (text that compiles to bytes through latin-1) matching ``data`` as is."""
    return re.escape(data.decode("latin-1"))


class KeyWatch:
    """Finds and masks every form of one key (see the module's docstring) in one pass of
    its sieve, and of the exact pattern only where the sieve matched.

    Built once per key (a credential's, on its first answer and after a reload that
    changes it): a millisecond or two. Its repr names no key, and it cannot be pickled.
    """

    __slots__ = ("_key", "_sieve", "keep", "shortest")

    def __init__(self, key: str) -> None:
        forms = [_char_form(c) for c in key]
        data = key.encode()
        runs = list(_base64_runs(data))
        self._key = key
        sieve = "".join(f"(?:{_literal(c.encode())}|{_ESCAPE})" for c in key)
        self._sieve = _compiled(_pattern(sieve, key))
        utf16 = len(key.encode("utf-16-le"))
        longest = max(sum(n for _, n in forms), utf16, 2 * len(data), 4 + 4 * len(data) // 3)
        # A stream holds back this many bytes: no match is longer than keep + 1, so one
        # that starts before them lies wholly in what has been read.
        self.keep = longest - 1
        # No form is shorter than this (the key's own bytes, each at least itself): a text
        # shorter cannot hold one, and is not searched.
        self.shortest = min(len(data), *(n for _, n in runs)) if runs else len(data)

    def __repr__(self) -> str:
        return "KeyWatch(<key>)"

    def __reduce__(self) -> Any:
        raise TypeError("a KeyWatch cannot be pickled")

    def found(self, data: bytes | str) -> bool:
        """Whether any form of the key is in ``data`` (a str is read as UTF-8): the sieve,
        then, where the sieve matched, the exact pattern."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        end = len(data)
        if end < self.shortest or self._sieve(data, 0, end)[0] == _NOWHERE:
            return False
        return _exact(self._key)(data, 0, end)[0] != _NOWHERE

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """Where forms of the key lie in ``data``, ``(start, end)`` in order; overlapping
        copies are all found (each search starts one byte after the last match began)."""
        found: list[tuple[int, int]] = []
        search, end = _exact(self._key), len(data)
        span = search(data, 0, end)[0]
        while span != _NOWHERE:
            found.append(span)
            span = search(data, span[0] + 1, end)[0]
        return found

    def masked(self, data: bytes) -> tuple[bytes, int]:
        """``data`` with every form of the key turned into as many ``*``, and how many
        forms there were (0: ``data`` itself, untouched)."""
        if not self.found(data):  # the usual case: one search, or none for a short text
            return data, 0
        spans = self.spans(data)
        out = bytearray(data)
        for start, end in spans:
            out[start:end] = b"*" * (end - start)
        return bytes(out), len(spans)


def _pattern(chars: str, key: str) -> str:
    """The whole pattern of ``key``, ``chars`` its characters' part (exact or sieve)."""
    data = key.encode()
    alternatives = [
        f"(?i:{chars})",
        f"(?i:{_literal(key.encode('utf-16-le'))})",
        f"(?i:{_literal(key.encode('utf-16-be'))})",
        f"(?i:{data.hex()})",
        *(pattern for pattern, _ in _base64_runs(data)),
    ]
    return "|".join(alternatives)


@functools.lru_cache(maxsize=EXACT_KEPT)
def _exact(key: str) -> _Spans:
    """The exact pattern of ``key`` (every form in the module's docstring, nothing else),
    compiled (0.2 to 5 ms for keys of ordinary length) when an answer matched its sieve."""
    return _compiled(_pattern("".join(pattern for pattern, _ in map(_char_form, key)), key))


class Watches:
    """Each credential's :class:`KeyWatch`, by the credential's name, compiled on its first
    answer and kept for the next ones; a reload that changes a credential's key gets the
    new key's watch on the next answer. At most ``size`` names are kept (the oldest go)."""

    __slots__ = ("_kept", "_size")

    def __init__(self, size: int = 4096) -> None:
        self._kept: dict[str, tuple[str, KeyWatch]] = {}
        self._size = size

    def of(self, name: str, key: str) -> KeyWatch:
        """The watch of ``key``, the key of the credential ``name``."""
        kept = self._kept.get(name)
        if kept is not None and kept[0] == key:  # the same str object: no comparing
            return kept[1]
        watch = KeyWatch(key)
        if kept is None and len(self._kept) >= self._size:
            del self._kept[next(iter(self._kept))]
        self._kept[name] = (key, watch)
        return watch


def fields_text(fields: list[tuple[str, str]]) -> bytes:
    """What :func:`leaking_fields` searches first: the values joined as they follow each
    other (a key split across them is whole here), then the names, a newline apart (no
    form of a key holds one)."""
    values = "".join([value for _, value in fields])
    text = values + "\n" + "\n".join([name for name, _ in fields])
    return text.encode("utf-8", "surrogateescape")


def leaking_fields(watch: KeyWatch, fields: list[tuple[str, str]]) -> set[int]:
    """The indexes of ``fields`` (name, value) that hold a form of the key: in a name, in a
    value, or as part of one split across values as they follow each other (a caller could
    join them back). One search when none does, the usual case."""
    if not watch.found(fields_text(fields)):
        return set()
    values = "".join([value for _, value in fields])
    leaking = {i for i, (name, _) in enumerate(fields) if watch.found(name)}
    ends: list[int] = []
    end = 0
    for _, value in fields:
        end += len(value.encode("utf-8", "surrogateescape"))
        ends.append(end)
    for start, stop in watch.spans(values.encode("utf-8", "surrogateescape")):
        begin = 0
        for i, end in enumerate(ends):
            if end > start and begin < stop:
                leaking.add(i)
            begin = end
    return leaking


@functools.lru_cache(maxsize=64)
def readable_codings(accept_encoding: str) -> str:
    """The caller's ``Accept-Encoding`` less what the gateway could not search (br, zstd,
    ``*``...); ``identity`` when nothing is left. Kept for the few values clients send:
    it is worked out for every request."""
    kept = [
        part.strip()
        for part in accept_encoding.split(",")
        if part.partition(";")[0].strip().lower() in _READABLE
    ]
    return ", ".join(kept) or "identity"


def coding_of(content_encoding: str | None) -> str | None:
    """The one coding of an answer, lower case: ``""`` for none (or identity), None for
    one the gateway cannot read (br, zstd, several stacked)."""
    if content_encoding is None:
        return ""
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return ""
    return coding if coding in _WBITS else None


class Inflated:
    """A compressed body inflated as it comes, only to tell whether a form of the key is
    in it; the last ``watch.keep`` inflated bytes are kept, so a form split between
    chunks is found."""

    __slots__ = ("_inflate", "_keep", "_tail", "_watch", "plain_bytes")

    def __init__(self, watch: KeyWatch, coding: str) -> None:
        self._watch = watch
        self._keep = watch.keep
        self._inflate = zlib.decompressobj(_WBITS[coding])
        self._tail = b""
        self.plain_bytes = 0  # inflated so far

    @property
    def keep(self) -> int:
        """Inflated bytes that must follow a chunk before it can go."""
        return self._keep

    def holds_key(self, chunk: bytes) -> bool:
        """Whether the body inflated so far, ``chunk`` included, holds the key. Raises
        Unreadable for a corrupt stream."""
        data = chunk
        try:
            while data:
                if self._found(self._inflate.decompress(data, _STEP)):
                    return True
                data = self._inflate.unconsumed_tail
        except zlib.error:
            raise Unreadable from None
        if self._inflate.unused_data:
            # Bytes after the end of the stream: a second gzip member, which clients go on
            # to decode and this inflater would not. Refused rather than left unsearched.
            raise Unreadable
        return False

    def ends_with_key(self) -> bool:
        """What the stream still held at its end: whether it completes a key."""
        try:
            return self._found(self._inflate.flush())
        except zlib.error:
            raise Unreadable from None

    def _found(self, plain: bytes) -> bool:
        self.plain_bytes += len(plain)
        window = self._tail + plain
        self._tail = window[-self._keep :] if self._keep else b""
        return self._watch.found(window)


def decoded(body: bytes, coding: str) -> bytes:
    """A whole compressed body, inflated (at most MAX_DECODED bytes; else Unreadable)."""
    inflate = zlib.decompressobj(_WBITS[coding])
    try:
        plain = inflate.decompress(body, MAX_DECODED + 1)
        if len(plain) <= MAX_DECODED and not inflate.unconsumed_tail:
            plain += inflate.flush()
    except zlib.error:
        raise Unreadable from None
    if len(plain) > MAX_DECODED or inflate.unconsumed_tail or inflate.unused_data:
        # unused_data: bytes after the stream's end (a second gzip member), which clients
        # decode too: refused rather than relayed unsearched.
        raise Unreadable
    return plain
