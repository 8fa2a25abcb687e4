"""The simulator's key echo: an upstream that sends the key it received back, encoded.

A hostile or careless echowin (a debug page, an error that prints the request) could send
the key the gateway used back in its answer, in any reversible form. The simulator's
``echo_key`` fault does it on purpose so the gateway's masking can be tried as an attacker
would (SPEC §5 "Hostile callers"). The encoders here are deliberately independent of the
gateway's matcher (proxy/gateway/keywatch.py): each is the standard library's own encoding, or the
format's definition written out where the library has no switch for it (urllib's ``quote``
never encodes letters and ``json.dumps`` never escapes ASCII), so a test passing does not
mean one piece of code agrees with itself.

:func:`encode` turns a key into one form (:data:`FORMS`); :func:`echo_answer` puts the
encoded key into one place of the answer (:data:`PLACES`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import html.entities
import random
import types
import urllib.parse
import zlib
from collections.abc import Callable, Collection, Mapping
from typing import Final

from aiohttp import web

__all__ = [
    "FORMS",
    "HEADER_PLACES",
    "MAX_POSITION",
    "PLACES",
    "STREAMED",
    "check",
    "echo_answer",
    "encode",
]

# --- encoders: key text in, the bytes an answer would carry out -----------------------------


def _percent(key: str, at: Collection[int] | None, lower_hex: bool = False) -> bytes:
    """``%XX`` for the UTF-8 bytes of the characters at positions ``at`` (all if None)."""
    out: list[str] = []
    for i, char in enumerate(key):
        if at is None or i in at:
            # bytes.hex with a separator: "%" between the bytes of a multi-byte character.
            hexed = "%" + char.encode().hex("%")
            out.append(hexed if lower_hex else hexed.upper())
        else:
            out.append(char)
    return "".join(out).encode()


def _swapcase(key: str, at: Collection[int]) -> str:
    return "".join(c.swapcase() if i in at else c for i, c in enumerate(key))


def _html_names() -> Mapping[str, str]:
    """The shortest HTML5 named reference (``&lowbar;`` for ``_``) of each character that
    has one; ties go to the alphabetically first name."""
    names: dict[str, str] = {}
    for name, char in sorted(html.entities.html5.items(), key=lambda kv: (len(kv[0]), kv[0])):
        if name.endswith(";") and len(char) == 1:
            names.setdefault(char, name)
    return types.MappingProxyType(names)


_HTML_NAMES: Final = _html_names()


def _html_named(key: str) -> bytes:
    # A character with no name (letters, digits, "-") falls back to its decimal reference.
    return "".join(
        f"&{_HTML_NAMES[c]}" if c in _HTML_NAMES else f"&#{ord(c)};" for c in key
    ).encode()


def _base64(offset: int, urlsafe: bool) -> Callable[[str], bytes]:
    """base64 of the key inside a longer byte text, ``offset`` bytes in: the key's own
    characters then show in the alignment ``offset % 3``, as in any larger base64 blob."""
    encoder = base64.urlsafe_b64encode if urlsafe else base64.b64encode

    def encode(key: str) -> bytes:
        return encoder(b"x" * offset + key.encode() + b"tail")

    return encode


_Encoder = Callable[[str], bytes]

# Forms that take no positions. Keys are ASCII (echowin's are); a non-BMP character would
# need a surrogate pair in json_u, which is not written here.
_PLAIN: Final[Mapping[str, _Encoder]] = types.MappingProxyType(
    {
        "verbatim": str.encode,
        "upper": lambda key: key.upper().encode(),
        "lower": lambda key: key.lower().encode(),
        "percent_all": lambda key: _percent(key, None),
        "percent_lower_hex": lambda key: _percent(key, None, lower_hex=True),
        # quote encodes each "%" of the fully encoded key as "%25": %2565%2577...
        "double_percent": lambda key: urllib.parse.quote(_percent(key, None), safe="").encode(),
        "json_u": lambda key: "".join(f"\\u{ord(c):04x}" for c in key).encode(),
        "html_dec": lambda key: "".join(f"&#{ord(c)};" for c in key).encode(),
        "html_hex": lambda key: "".join(f"&#x{ord(c):X};" for c in key).encode(),
        "html_named": _html_named,
        **{f"base64_{n}": _base64(n, urlsafe=False) for n in range(3)},
        **{f"base64url_{n}": _base64(n, urlsafe=True) for n in range(3)},
        "utf16le": lambda key: key.encode("utf-16-le"),
        "utf16be": lambda key: key.encode("utf-16-be"),
        "hex": lambda key: binascii.hexlify(key.encode()),
    }
)
_POSITIONAL: Final = ("mixed_case", "percent_some")
_BINARY: Final = frozenset({"utf16le", "utf16be"})  # NUL bytes: no header can hold them

FORMS: Final[tuple[str, ...]] = (*_PLAIN, *_POSITIONAL)
"""Every form name :func:`encode` takes."""

PLACES: Final[tuple[str, ...]] = (
    "body",
    "header",
    "location",
    "split_headers",
    "chunked",
    "gzip",
    "deflate",
    "gzip_stream",
)
"""Every place :func:`echo_answer` takes."""

HEADER_PLACES: Final = frozenset({"header", "location", "split_headers"})
"""Places in the answer's header fields: they take no form with NUL bytes (UTF-16)."""

STREAMED: Final = frozenset({"chunked", "gzip_stream"})
"""Places whose answer is streamed: a gateway may cut such an answer instead of masking."""

MAX_POSITION: Final = 4096
"""Positions (and how many of them) a fault may name are bounded by this."""


def encode(
    form: str,
    key: str,
    *,
    percent: Collection[int] | None = None,
    swapcase: Collection[int] | None = None,
) -> bytes:
    """``key`` in ``form``, as the bytes an answer would carry.

    ``mixed_case`` swaps the case of the letters at ``swapcase`` (default: odd positions).
    ``percent_some`` first swaps the case at ``swapcase`` (default: none), then writes the
    characters at ``percent`` (default: even positions) as ``%XX``. Positions are 0-based
    character indices; those past the key's end are ignored. Other forms take neither.
    """
    if form in _PLAIN:
        return _PLAIN[form](key)
    odd, even = range(1, len(key), 2), range(0, len(key), 2)
    if form == "mixed_case":
        return _swapcase(key, odd if swapcase is None else swapcase).encode()
    if form == "percent_some":
        cased = key if swapcase is None else _swapcase(key, swapcase)
        return _percent(cased, even if percent is None else frozenset(percent))
    raise ValueError(f"unknown echo form {form!r}")


def check(
    form: str | None,
    place: str,
    percent: tuple[int, ...] | None,
    swapcase: tuple[int, ...] | None,
) -> None:
    """Validate an echo fault's fields; ValueError names the field (``echo_key``,
    ``echo_in``, ``echo_percent``, ``echo_swapcase``)."""
    if form is not None and form not in FORMS:
        raise ValueError(f"echo_key must be one of {', '.join(FORMS)}; got {form!r}")
    if place not in PLACES:
        raise ValueError(f"echo_in must be one of {', '.join(PLACES)}; got {place!r}")
    if form is None and place != PLACES[0]:
        raise ValueError("echo_in needs echo_key (the form to echo the key in)")
    if form in _BINARY and place in HEADER_PLACES:
        raise ValueError(
            f"echo_key {form!r} cannot go in a header (echo_in {place!r}): its NUL bytes are "
            "forbidden in a field value (RFC 9110 §5.5), and aiohttp refuses to send them"
        )
    if percent is not None and form != "percent_some":
        raise ValueError("echo_percent applies only to echo_key 'percent_some'")
    if swapcase is not None and form not in _POSITIONAL:
        raise ValueError("echo_swapcase applies only to echo_key 'mixed_case' or 'percent_some'")
    for name, positions in (("echo_percent", percent), ("echo_swapcase", swapcase)):
        if positions is None:
            continue
        if not isinstance(positions, tuple):
            raise ValueError(f"{name} must be a sequence of integers")
        if len(positions) > MAX_POSITION:
            raise ValueError(f"{name} may name at most {MAX_POSITION} positions")
        for p in positions:
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < MAX_POSITION:
                raise ValueError(f"{name} must hold integers within 0..{MAX_POSITION - 1}")


# --- places: where the encoded key goes in the answer --------------------------------------

_GZIP_WBITS: Final = 31  # zlib's wbits for a gzip wrapper
_FILLER_BYTES: Final = 4096  # random bytes, hex-written: 8 KB of text before the key
_STREAM_PIECE: Final = 512  # plain bytes per gzip_stream write
# Pauses between writes of a streamed answer, so the gateway sees it arrive in pieces
# (and not whole) rather than as one read: pacing, not a wait for anything.
_BYTE_PAUSE_SECONDS: Final = 0.001
_PIECE_PAUSE_SECONDS: Final = 0.003
# Headers of the original answer that the echoed one sets for itself.
_OWN_HEADERS: Final = frozenset({"content-length", "content-type", "content-encoding"})


def _plain_body(header: str, encoded: bytes, original: bytes, filler: bool) -> bytes:
    """A JSON-ish text holding the encoded key among other text, then the real answer."""
    head = b"{"
    if filler:  # seeded: the same bytes every run
        head += b'"filler":"' + random.Random(0).randbytes(_FILLER_BYTES).hex().encode() + b'",'
    echo = b'"debug":"request carried ' + header.encode() + b": " + encoded + b'",'
    return head + echo + b'"answer":' + (original or b"null") + b"}"


def _kept_headers(original: web.StreamResponse) -> dict[str, str]:
    return {k: v for k, v in original.headers.items() if k.lower() not in _OWN_HEADERS}


async def echo_answer(
    request: web.Request,
    original: web.StreamResponse,
    header: str,
    encoded: bytes,
    place: str,
) -> web.StreamResponse:
    """``original`` (a whole answer) with ``encoded`` (the key as it came in ``header``,
    encoded) put in ``place``. Header values carry the bytes as Latin-1, as HTTP does. A
    streamed place's answer is written here and returned finished."""
    body = original.body if isinstance(original, web.Response) else None
    original_body = body if isinstance(body, bytes) else b""
    headers = _kept_headers(original)
    status = original.status
    text = encoded.decode("latin-1")
    if place in HEADER_PLACES:
        if place == "header":
            headers["X-Debug-Echo"] = text
        elif place == "split_headers":
            half = len(text) // 2
            headers["X-Debug-A"], headers["X-Debug-B"] = text[:half], text[half:]
        else:  # an absolute Location into the API (the gateway rewrites it), a relative one
            status = 302
            query = f"/api/v1/contacts?api_key={text}"
            headers["Location"] = f"{request.scheme}://{request.host}{query}"
            headers["Content-Location"] = query
        return web.Response(
            status=status, body=original_body, headers=headers, content_type="application/json"
        )
    plain = _plain_body(header, encoded, original_body, filler=place == "gzip_stream")
    if place == "chunked":
        return await _one_byte_per_chunk(request, status, headers, plain)
    if place == "gzip_stream":
        return await _gzip_pieces(request, status, headers, plain)
    if place in ("gzip", "deflate"):
        # deflate is zlib-wrapped (RFC 9110 §8.4.1.2); gzip has its own wrapper.
        wbits = _GZIP_WBITS if place == "gzip" else zlib.MAX_WBITS
        packer = zlib.compressobj(wbits=wbits)
        plain = packer.compress(plain) + packer.flush()
        headers["Content-Encoding"] = place
    return web.Response(status=status, body=plain, headers=headers, content_type="application/json")


async def _one_byte_per_chunk(
    request: web.Request, status: int, headers: dict[str, str], plain: bytes
) -> web.StreamResponse:
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = "application/json"
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i in range(len(plain)):
        await response.write(plain[i : i + 1])  # one chunk frame per byte
        await asyncio.sleep(_BYTE_PAUSE_SECONDS)
    await response.write_eof()
    return response


async def _gzip_pieces(
    request: web.Request, status: int, headers: dict[str, str], plain: bytes
) -> web.StreamResponse:
    """gzip written as it is made: a sync flush after each piece, so each write inflates to
    its own plain bytes, and the filler's kilobytes go out long before the key."""
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = "application/json"
    response.headers["Content-Encoding"] = "gzip"
    response.enable_chunked_encoding()
    await response.prepare(request)
    packer = zlib.compressobj(wbits=_GZIP_WBITS)
    for start in range(0, len(plain), _STREAM_PIECE):
        piece = packer.compress(plain[start : start + _STREAM_PIECE])
        await response.write(piece + packer.flush(zlib.Z_SYNC_FLUSH))
        await asyncio.sleep(_PIECE_PAUSE_SECONDS)
    await response.write_eof(packer.flush())
    return response
